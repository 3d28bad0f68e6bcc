r"""Domain FID and KID: Fréchet and kernel distances measured with a feature network trained on *our* scenes.

FID (Heusel et al., 2017) compares two sets of images through the features of a pretrained
classifier, Inception-v3's 2048-d pool layer: fit a Gaussian to each set's features and measure

    $\mathrm{FID} = \lVert\mu_r - \mu_g\rVert^2 + \mathrm{Tr}\big(\Sigma_r + \Sigma_g - 2(\Sigma_r\Sigma_g)^{1/2}\big)$

KID (Bińkowski et al., 2018, sec. 3) is the squared maximum mean discrepancy between the same
features under the kernel $k(x, y) = (x^\top y / d + 1)^3$: unbiased, so it is ~0 for two draws of
one distribution at any sample size, and it comes with a standard deviation over random subsets.

Imagen reports FID-30K on COCO with Inception features (Saharia et al., 2022, sec. 4.3). Inception's
weights cannot be downloaded here, and it was trained on photographs anyway, so -- as fastai's course
does for Fashion-MNIST -- we train a small classifier on the course's own pictures and use its
penultimate layer instead. Why a *supervised* classifier (and not the mini-CLIP image tower)? The
Inception features FID was designed around are a classifier's; and each scene comes with the exact
truth of what it shows, so the labels can ask for everything a good sample must get right:

    which colour-shape pairs are present   54 labels, multi-label   (binding a colour to a shape)
    which colours, which shapes            9 + 6 labels, multi-label (the easy halves of a pair)
    how many objects there are             4 classes                (counting)
    which 3x3 cells hold an object         9 labels, multi-label    (layout)

It is trained on every colour-shape pair, held-out ones included: it is the measuring instrument,
not the model being measured, and it must recognise a purple triangle to judge one.

**Numbers are comparable only within this domain, this feature network and this sample size**:
a "domain FID" of 5 says nothing about an Inception FID of 5, and FID is biased upwards at small N
(use the same N, ideally >= 1000, when comparing two models; KID is unbiased).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mini_imagen.data.scenes import ALL_PAIRS, COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, Scene, SceneObject

EVAL_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights" / "eval"
FEATURES_FILE = "domain_features.safetensors"
CONFIG_FILE = "config.json"
TRAIN_COMMAND = "python -m mini_imagen.evaluation.train_eval_models"


# ----------------------------------------------------------------------------- the image encoder
@dataclass
class SceneEncoderConfig:
    """A small CNN: ``image_size`` -> three stages halving the size -> a 4x4 map -> ``feature_dim`` features."""

    image_size: int = 32  # every input is resized to this (box filter down, bilinear up)
    width: int = 32  # channels of the first stage; the next two have 2x and 4x
    feature_dim: int = 128

    def __post_init__(self) -> None:
        if self.image_size not in (16, 32, 64):
            raise ValueError(f"image_size must be 16, 32 or 64 pixels, got {self.image_size}")
        if self.width < 4 or self.feature_dim < 2:
            raise ValueError(f"need width >= 4 and feature_dim >= 2, got {self.width} and {self.feature_dim}")


def conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
    """3x3 convolution -> batch norm -> SiLU."""
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels_out), nn.SiLU())


def to_model_input(images: Tensor, image_size: int) -> Tensor:
    """Check a batch of images, bring it to [-1, 1] floats and resize it to ``image_size``.

    A 64 px sample is box-filtered down to 32 px, exactly as ``render_scene`` anti-aliases, so a
    super-resolved image and a base-resolution one are compared on the same grid.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (N, 3, H, W) batch of RGB images, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0  # [0, 255] -> [-1, 1]
    elif not images.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1] or uint8 in [0, 255], got dtype {images.dtype}")
    if images.numel() and images.abs().max() > 2:
        raise ValueError(f"float images must be in [-1, 1], got values in [{images.min():.3g}, {images.max():.3g}]; "
                         "convert [0, 255] pixels with x / 127.5 - 1 (or pass a uint8 tensor)")
    images = images.float().clamp(-1, 1)  # as saving to PNG would
    if images.shape[-1] > image_size or images.shape[-2] > image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="area")  # box filter
    elif images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images


class SceneEncoder(nn.Module):
    """The CNN both evaluation models share: (N, 3, H, W) in [-1, 1] -> (N, feature_dim).

    Its last (4w, 8, 8) map is read two ways and the two are concatenated:

    * a global max pool -- "is there a purple triangle *anywhere*?", the same detector at every place;
    * an average pool to 4x4, flattened -- *where* things are (layout is half of what a caption says).
    """

    def __init__(self, config: SceneEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or SceneEncoderConfig()
        w = config.width
        self.stages = nn.Sequential(
            conv_block(3, w), conv_block(w, w), nn.AvgPool2d(2),  # 32 -> 16 (for image_size 32)
            conv_block(w, 2 * w), conv_block(2 * w, 2 * w), nn.AvgPool2d(2),  # 16 -> 8
            conv_block(2 * w, 4 * w), conv_block(4 * w, 4 * w),
        )
        self.project = nn.Linear(4 * w + 4 * w * 4 * 4, config.feature_dim)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stages(to_model_input(images, self.config.image_size))  # (N, 4w, 8, 8)
        anywhere = x.amax(dim=(2, 3))  # (N, 4w)
        layout = F.adaptive_avg_pool2d(x, 4).flatten(1)  # (N, 4w * 16)
        return self.project(torch.cat([anywhere, layout], dim=1))  # (N, feature_dim)


# ----------------------------------------------------------------------------- what the classifier predicts
# Multi-label heads: which of these are in the picture? (colours and shapes alone are the easy
# half of a pair: they give the encoder a gradient before it can bind a colour to a shape).
PRESENCE = {"pairs": ALL_PAIRS, "colours": tuple(COLOURS), "shapes": SHAPES, "cells": POSITIONS}
NUM_COUNTS = MAX_OBJECTS


def object_keys(obj: SceneObject) -> dict[str, Any]:
    """What one object contributes to each multi-label head."""
    return {"pairs": (obj.colour, obj.shape), "colours": obj.colour, "shapes": obj.shape, "cells": obj.position}


def scene_labels(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """The supervised targets of a batch of scenes: what is present (multi-hot), and the object count."""
    index = {head: {key: i for i, key in enumerate(keys)} for head, keys in PRESENCE.items()}
    labels = {head: torch.zeros(len(scenes), len(keys)) for head, keys in PRESENCE.items()}
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            for head, key in object_keys(obj).items():
                labels[head][row, index[head][key]] = 1.0
    labels["count"] = torch.tensor([len(scene.objects) - 1 for scene in scenes])  # 1..4 objects -> class 0..3
    return labels


class DomainFeatureNet(nn.Module):
    """A scene classifier whose ``forward`` returns its penultimate features: the Inception of this course.

    ``forward(images) -> (N, feature_dim)`` is what torchmetrics' FID / KID call (``feature=net``);
    ``classify(images)`` gives the logits of the five label heads (``PRESENCE`` and the count).
    """

    def __init__(self, config: SceneEncoderConfig | None = None):
        super().__init__()
        self.encoder = SceneEncoder(config)
        self.config = self.encoder.config
        self.num_features = self.config.feature_dim  # torchmetrics reads this instead of probing with a dummy
        # Whitened per dimension on real scenes (batch norm without scale or shift): FID and KID come out in
        # units of the real data's own feature spread, whatever scale training happened to settle on.
        self.whiten = nn.BatchNorm1d(self.num_features, affine=False)
        self.heads = nn.ModuleDict({head: nn.Linear(self.num_features, len(keys)) for head, keys in PRESENCE.items()}
                                   | {"count": nn.Linear(self.num_features, NUM_COUNTS)})

    def forward(self, images: Tensor) -> Tensor:
        return self.whiten(self.encoder(images))  # (N, feature_dim)

    def classify(self, images: Tensor) -> dict[str, Tensor]:
        hidden = F.silu(self(images))
        return {name: head(hidden) for name, head in self.heads.items()}

    def loss(self, images: Tensor, scenes: Sequence[Scene]) -> Tensor:
        """Binary cross-entropy summed over each multi-label head's labels, plus cross-entropy for the count.

        Summed, not averaged, over labels: averaged over 54 mostly-absent pairs, the colour-shape
        signal is 50x weaker than the count's, and the encoder learns to ignore it.
        """
        logits = self.classify(images)
        labels = {k: v.to(images.device) for k, v in scene_labels(scenes).items()}
        loss = F.cross_entropy(logits["count"], labels["count"])
        for head in PRESENCE:
            loss = loss + F.binary_cross_entropy_with_logits(logits[head], labels[head], reduction="sum") / len(images)
        return loss


# ----------------------------------------------------------------------------- shipped weights
def save_eval_weights(model: nn.Module, name: str, config: dict, training: dict | None = None,
                      directory: str | Path = EVAL_WEIGHTS_DIR) -> Path:
    """Write ``model``'s weights to ``<name>.safetensors`` (float16), its config and training record to config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    path = directory / f"{name}.safetensors"
    save_file(tensors, str(path))
    path.chmod(0o644)  # readable by everyone, like the rest of the package
    config_path = directory / CONFIG_FILE
    entries = json.loads(config_path.read_text()) if config_path.is_file() else {}
    entries[name] = {"config": config, "training": training or {}}
    config_path.write_text(json.dumps(entries, indent=2) + "\n")
    return path


def read_eval_weights(name: str, directory: str | Path = EVAL_WEIGHTS_DIR) -> tuple[dict[str, Tensor], dict]:
    """The float32 state dict and config of ``<name>.safetensors``, or one clear error saying how to make them."""
    directory = Path(directory)
    path, config_path = directory / f"{name}.safetensors", directory / CONFIG_FILE
    for needed in (path, config_path):
        if not needed.is_file():
            raise FileNotFoundError(f"evaluation weights {needed} are missing; train them with `{TRAIN_COMMAND}` "
                                    "(about 20 minutes on one CPU core)")
    try:
        tensors = load_file(str(path))
        config = json.loads(config_path.read_text())[name]["config"]
    except (SafetensorError, json.JSONDecodeError, KeyError, OSError) as error:
        raise ValueError(f"{path} (or its entry in {config_path}) is unreadable: {error}; "
                         f"re-create it with `{TRAIN_COMMAND}`") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, config


def checked_config(config_class: type, fields: dict, where: str) -> Any:
    """``config_class(**fields)``, failing with one line that says how to re-create the file."""
    try:
        return config_class(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} holds a bad {config_class.__name__}: {error}; "
                         f"re-create it with `{TRAIN_COMMAND}`") from None


def load_checked_state(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """``model.load_state_dict(state)``, failing with one line that says how to re-create the file."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # missing / unexpected keys or wrong shapes
        raise ValueError(f"{where} does not match the model: {str(error).splitlines()[0]}; "
                         f"re-create it with `{TRAIN_COMMAND}`") from None


def load_domain_feature_net(directory: str | Path = EVAL_WEIGHTS_DIR) -> DomainFeatureNet:
    """The shipped feature network, frozen and in eval mode (loaded once per process and shared)."""
    return _load_domain_feature_net(str(Path(directory).resolve()))


@lru_cache(maxsize=2)
def _load_domain_feature_net(directory: str) -> DomainFeatureNet:
    state, config = read_eval_weights("domain_features", directory)
    net = DomainFeatureNet(checked_config(SceneEncoderConfig, config, f"{directory}/{CONFIG_FILE}"))
    load_checked_state(net, state, f"{directory}/{FEATURES_FILE}")
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- FID and KID
def _check_sets(real_images: Tensor, fake_images: Tensor, minimum: int) -> None:
    for name, images in (("real_images", real_images), ("fake_images", fake_images)):
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{name} must be a (N, 3, H, W) tensor of images in [-1, 1], got {shape}")
        if images.shape[0] < minimum:
            raise ValueError(f"{name} has {images.shape[0]} images; need at least {minimum} (ideally >= 1000)")


def _feed(metric: nn.Module, images: Tensor, real: bool, batch_size: int) -> None:
    """Features of ``images``, a batch at a time, into the metric; the network runs in eval mode (and is put back)."""
    net = metric.inception
    was_training, device = net.training, next(net.parameters()).device
    net.eval()  # batch norm must use its running statistics: a feature may not depend on the rest of the batch
    try:
        for batch in images.split(batch_size):
            metric.update(batch.to(device), real=real)
    finally:
        net.train(was_training)


def domain_fid(real_images: Tensor, fake_images: Tensor, feature_net: DomainFeatureNet | None = None,
               batch_size: int = 256) -> float:
    """Fréchet distance between the domain features of two image sets ((N, 3, H, W) in [-1, 1], any H = W)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_sets(real_images, fake_images, minimum=2)
    net = feature_net if feature_net is not None else load_domain_feature_net()
    fid = FrechetInceptionDistance(feature=net)
    _feed(fid, real_images, True, batch_size)
    _feed(fid, fake_images, False, batch_size)
    return float(fid.compute())


def domain_kid(real_images: Tensor, fake_images: Tensor, feature_net: DomainFeatureNet | None = None,
               subsets: int = 50, subset_size: int | None = None, seed: int = 0,
               batch_size: int = 256) -> tuple[float, float]:
    """Kernel distance (mean, std over ``subsets`` random subsets) between the domain features of two sets.

    ``subset_size`` defaults to the smaller set's size, capped at 1000 (KID's usual subset size).
    The subsets are drawn from a generator seeded with ``seed``: the same sets give the same numbers.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_sets(real_images, fake_images, minimum=2)
    size = subset_size or min(len(real_images), len(fake_images), 1000)
    if not 2 <= size <= min(len(real_images), len(fake_images)):
        raise ValueError(f"subset_size must be between 2 and the smaller set's size "
                         f"({min(len(real_images), len(fake_images))}), got {size}")
    with warnings.catch_warnings():  # "KID will save all extracted features in buffer": that is the point
        warnings.simplefilter("ignore", UserWarning)
        net = feature_net if feature_net is not None else load_domain_feature_net()
        kid = KernelInceptionDistance(feature=net, subsets=subsets, subset_size=size)
    _feed(kid, real_images, True, batch_size)
    _feed(kid, fake_images, False, batch_size)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws subsets with the global RNG: keep it untouched
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)
