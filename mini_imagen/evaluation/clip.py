r"""mini-CLIP: a contrastive image-text model trained on the course scenes, for CLIP-score and retrieval.

CLIP (Radford et al., 2021, sec. 2.3 and fig. 3) trains an image encoder and a text encoder so that,
in a batch of $N$ (image, caption) pairs, each image's embedding is closest to its own caption's:

    $I = \mathrm{normalise}(W_i\, f_{img}(x))$,  $T = \mathrm{normalise}(W_t\, f_{txt}(c))$      (unit vectors)
    $\text{logits} = e^{\tau} \, I T^\top$                            ($N \times N$, temperature $e^{-\tau}$ learned)
    $\mathcal{L} = \tfrac12\big(\mathrm{CE}(\text{logits}, \text{diag}) + \mathrm{CE}(\text{logits}^\top,
    \text{diag})\big)$                                                (symmetric InfoNCE)

Imagen reports CLIP score beside FID (Saharia et al., 2022, sec. 4.3): how well images match
their prompts. OpenAI's CLIP cannot be downloaded here, so this one is small and trained on our
scenes: the image tower is the ``SceneEncoder`` CNN of ``features.py`` trained from scratch, the
text tower is the course's *frozen* MiniLM (its mean-pooled sentence vector) with a small learned
MLP on top (LiT, Zhai et al., 2022, locks a pretrained image tower; we lock the text one). It trains
on the training split only -- no held-out colour-shape pair, training wording -- so retrieval on
held-out pairs and held-out wording measures generalisation, not memory.

    clip_score(images, prompts) = 100 * mean(max(cos(I, T), 0))    (torchmetrics' CLIPScore)

Like the domain FID, its numbers are comparable only within this domain and this model.
The safety checker reuses ``encode_image``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mini_imagen.evaluation.features import (
    CONFIG_FILE,
    EVAL_WEIGHTS_DIR,
    SceneEncoder,
    SceneEncoderConfig,
    checked_config,
    load_checked_state,
    read_eval_weights,
)
from mini_imagen.text import DEFAULT_TEXT_ENCODER, load_text_encoder

CLIP_FILE = "mini_clip.safetensors"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the temperature so that logits are scaled by at most 100


@dataclass
class MiniCLIPConfig:
    """Sizes of the two towers and the shared embedding space."""

    encoder: SceneEncoderConfig = field(default_factory=SceneEncoderConfig)
    text_encoder: str = DEFAULT_TEXT_ENCODER  # frozen; only its pooled vector is used
    text_dim: int = 384  # width of the frozen encoder's pooled vector
    text_hidden: int = 256
    embed_dim: int = 128  # the shared image-text space
    init_temperature: float = 0.07  # CLIP's initial $1/e^{\tau}$

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = SceneEncoderConfig(**self.encoder)
        if not 0 < self.init_temperature < 1:
            raise ValueError(f"init_temperature must be in (0, 1), e.g. 0.07, got {self.init_temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MiniCLIP(nn.Module):
    """Image tower (CNN) and text head (on frozen MiniLM) projected into one unit-length embedding space."""

    def __init__(self, config: MiniCLIPConfig | None = None, text_encoder: Any = None):
        super().__init__()
        self.config = config = config or MiniCLIPConfig()
        self.image_encoder = SceneEncoder(config.encoder)
        self.image_projection = nn.Linear(config.encoder.feature_dim, config.embed_dim, bias=False)  # $W_i$
        self.text_projection = nn.Sequential(  # $W_t$: a small MLP, because the text tower itself is frozen
            nn.LayerNorm(config.text_dim), nn.Linear(config.text_dim, config.text_hidden), nn.SiLU(),
            nn.Linear(config.text_hidden, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))  # $\tau$
        self._text_encoder = text_encoder  # not an nn.Module: never in state_dict, never trained

    @property
    def text_encoder(self) -> Any:
        """The frozen text encoder, loaded (once per process, shared) the first time a prompt is encoded."""
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder(self.config.text_encoder)
        return self._text_encoder

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] (any H = W, resized to 32 px) -> (N, embed_dim) unit vectors."""
        return F.normalize(self.image_projection(self.image_encoder(images.to(self.device, self.logit_scale.dtype))), dim=-1)

    def encode_text_pooled(self, pooled: Tensor) -> Tensor:
        """Frozen encoder's pooled vectors (N, text_dim) -> (N, embed_dim) unit vectors (training uses this)."""
        return F.normalize(self.text_projection(pooled.to(self.device, self.logit_scale.dtype)), dim=-1)

    def encode_text(self, prompts: str | Sequence[str]) -> Tensor:
        """Prompts -> (N, embed_dim) unit vectors."""
        return self.encode_text_pooled(self.text_encoder.encode(prompts).pooled)

    def forward(self, images: Tensor, text_pooled: Tensor) -> Tensor:
        """The (N, N) logits of every image against every caption: $e^{\\tau} I T^\\top$."""
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return scale * self.encode_image(images) @ self.encode_text_pooled(text_pooled).T

    def similarity(self, images: Tensor, prompts: str | Sequence[str]) -> Tensor:
        """Cosine similarity of each image with its own prompt: (N,)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        return (self.encode_image(images) * self.encode_text(prompts)).sum(dim=-1)

    def clip_score(self, images: Tensor, prompts: str | Sequence[str]) -> float:
        """CLIP-score analog: $100 \\cdot \\mathrm{mean}(\\max(\\cos(I, T), 0))$ over the pairs (as torchmetrics)."""
        with torch.no_grad():
            return float(100 * self.similarity(images, prompts).clamp(min=0).mean())


def contrastive_loss(logits: Tensor) -> Tensor:
    """Symmetric InfoNCE (CLIP fig. 3): row i should pick column i, and column i row i."""
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def retrieval_accuracy(image_embeddings: Tensor, text_embeddings: Tensor, candidates: int = 32) -> tuple[float, float]:
    """Zero-shot top-1 retrieval within groups of ``candidates`` pairs: (image -> caption, caption -> image).

    Row i of both inputs is one (image, caption) pair. Chance is ``1 / candidates``.
    """
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"need matching (N, D) embeddings, got {tuple(image_embeddings.shape)} "
                         f"and {tuple(text_embeddings.shape)}")
    if not 2 <= candidates <= len(image_embeddings):
        raise ValueError(f"candidates must be between 2 and the number of pairs ({len(image_embeddings)}), "
                         f"got {candidates}")
    hits_i2t = hits_t2i = groups = 0
    for start in range(0, len(image_embeddings) - candidates + 1, candidates):  # whole groups only
        similarity = image_embeddings[start:start + candidates] @ text_embeddings[start:start + candidates].T
        truth = torch.arange(candidates, device=similarity.device)
        hits_i2t += int((similarity.argmax(dim=1) == truth).sum())
        hits_t2i += int((similarity.argmax(dim=0) == truth).sum())
        groups += 1
    return hits_i2t / (groups * candidates), hits_t2i / (groups * candidates)


def load_mini_clip(directory: str | Path = EVAL_WEIGHTS_DIR) -> MiniCLIP:
    """The shipped mini-CLIP, frozen and in eval mode (loaded once per process and shared)."""
    return _load_mini_clip(str(Path(directory).resolve()))


@lru_cache(maxsize=2)
def _load_mini_clip(directory: str) -> MiniCLIP:
    state, config = read_eval_weights("mini_clip", directory)
    model = MiniCLIP(checked_config(MiniCLIPConfig, config, f"{directory}/{CONFIG_FILE}"))
    load_checked_state(model, state, f"{directory}/{CLIP_FILE}")
    return model.eval().requires_grad_(False)
