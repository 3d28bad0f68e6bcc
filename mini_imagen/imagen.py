"""The Imagen cascade: a frozen text encoder and a chain of text-conditioned U-Nets.

Imagen (Saharia et al., 2022, sec. 2 and Fig. A.4) generates a small image first and then
*refines* it with super-resolution diffusion models, every stage seeing the text:

    prompt ─► frozen text encoder ─► stage 0: 32×32 base U-Net
                                  └► stage 1: 64×64 super-resolution U-Net (+ upsampled 32×32 image)
                                  └► stage 2: 128×128 (optional)

Two ideas from the paper live in this file:

* **Classifier-free guidance** (sec. 2.2): each U-Net is trained with the text dropped
  ``cond_drop_prob`` of the time, so at sampling it can predict both with and without the
  text; the two predictions are combined by ``guidance.classifier_free_guidance``.
* **Noise-conditioning augmentation** (sec. 2.4): a super-resolution stage is trained on a
  low-resolution image that has been *noised* to a random level, and it is told that level.
  At sampling time the base stage's output is noised to a chosen ``noise_aug_level`` so the
  super-resolution stage does not mistake the base model's artefacts for detail to keep.

Everything the cascade needs to be rebuilt lives in ``ImagenConfig`` (plain dataclasses, saved
as ``config.json``) and the U-Net weights (``model.safetensors``): ``save_pretrained`` /
``from_pretrained`` round-trip a model folder, like ``diffusers``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mini_imagen.checkpoint import CheckpointError
from mini_imagen.guidance import classifier_free_guidance
from mini_imagen.safety import SafetyChecks, warn_safety_off
from mini_imagen.samplers import make_sampler, run_sampler
from mini_imagen.schedule import BETA_SCHEDULES, NoiseSchedule, check_prediction_type, diffusion_loss
from mini_imagen.text import FrozenTextEncoder, TextEmbeddings, load_text_encoder
from mini_imagen.unet import EfficientUNet, UNetConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# ----------------------------------------------------------------------------- configuration
@dataclass
class StageConfig:
    """One diffusion model of the cascade: its U-Net and its own noise schedule."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    beta_schedule: str = "cosine"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    # Noise-conditioning augmentation (super-resolution stages only): during training the
    # low-res image is noised to a level drawn uniformly from [0, noise_aug_max] (a fraction of T).
    noise_aug_max: float = 0.5
    # Super-resolution stages may train on random crops (Imagen appendix: its 1024 px model trains
    # on 256 px crops). A convolutional U-Net without self-attention works at any size, so a
    # 32 px crop of a 64 px stage costs a quarter of the compute per sample. None = whole images.
    train_crop_size: int | None = None

    @property
    def image_size(self) -> int:
        return self.unet.image_size

    @property
    def is_super_resolution(self) -> bool:
        return self.unet.lowres_cond


@dataclass
class ImagenConfig:
    """The whole cascade: which text encoder, which stages, how often the text is dropped."""

    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    text_encoder: str = "all-MiniLM-L6-v2"
    max_text_len: int = 32
    cond_drop_prob: float = 0.1  # classifier-free guidance training dropout (Imagen sec. 2.2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImagenConfig":
        data = dict(data)
        stages = []
        for stage in data.pop("stages"):
            stage = dict(stage)
            unet = stage.pop("unet")
            unet = {k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()}
            stages.append(StageConfig(unet=UNetConfig(**unet), **stage))
        return cls(stages=stages, **data)

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("ImagenConfig needs at least one stage")
        if self.stages[0].is_super_resolution:
            raise ValueError("stage 0 must be a base model (unet.lowres_cond=False)")
        for i, (low, high) in enumerate(zip(self.stages, self.stages[1:]), start=1):
            if not high.is_super_resolution:
                raise ValueError(f"stage {i} follows another stage, so it must be super-resolution (lowres_cond=True)")
            if high.image_size <= low.image_size:
                raise ValueError(f"stage {i} ({high.image_size}px) must be larger than stage {i - 1} ({low.image_size}px)")
        for stage in self.stages:
            check_prediction_type(stage.prediction_type)
            crop = stage.train_crop_size
            if crop is not None:
                factor = 2 ** (len(stage.unet.channel_mults) - 1)
                if not stage.is_super_resolution or stage.unet.attention_resolutions:
                    raise ValueError("train_crop_size is for super-resolution stages without self-attention "
                                     "(a crop of a base image no longer matches its caption); set it to None")
                if not 0 < crop <= stage.image_size or crop % factor:
                    raise ValueError(f"train_crop_size {crop} must be in (0, {stage.image_size}] and a multiple "
                                     f"of {factor} (the U-Net halves the size {factor // 2 or 1} time(s))")
            if stage.beta_schedule not in BETA_SCHEDULES:
                raise ValueError(f"unknown beta_schedule {stage.beta_schedule!r}; choose one of: {', '.join(BETA_SCHEDULES)}")
            if stage.unet.text_embed_dim <= 0 or stage.unet.max_text_len != self.max_text_len:
                raise ValueError("every stage's unet.max_text_len must equal ImagenConfig.max_text_len")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")


@dataclass
class ImagenOutput:
    """What ``Imagen.sample`` returns: the final images, and every stage's output for lessons."""

    images: Tensor  # (B, 3, H, W) in [-1, 1], the last stage
    stage_images: list[Tensor]  # one (B, 3, h, w) tensor per stage that ran
    nsfw_content_detected: list[bool] | None = None

    def to_pil(self) -> list:
        return tensor_to_pil(self.images)


def tensor_to_pil(images: Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> list of PIL images."""
    from PIL import Image

    arrays = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arrays]


# ----------------------------------------------------------------------------- the cascade
class Imagen(nn.Module):
    """A frozen text encoder plus a cascade of U-Nets, each with its own noise schedule."""

    def __init__(self, config: ImagenConfig, text_encoder: FrozenTextEncoder | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.unets = nn.ModuleList(EfficientUNet(stage.unet) for stage in config.stages)
        self.schedules = [
            NoiseSchedule(stage.num_train_timesteps, beta_schedule=stage.beta_schedule) for stage in config.stages
        ]
        # The text encoder is frozen and *not* a submodule: it is never saved with the model.
        self._text_encoder = text_encoder
        self._safety_checks: SafetyChecks | None = None  # built on the first sample() that needs them

    # --- text ------------------------------------------------------------------------------
    @property
    def text_encoder(self) -> FrozenTextEncoder:
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder(self.config.text_encoder, max_length=self.config.max_text_len)
        return self._text_encoder

    def encode_text(self, prompts: Sequence[str]) -> TextEmbeddings:
        return self.text_encoder.encode(list(prompts)).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- training ----------------------------------------------------------------------------
    def stage_loss(
        self,
        stage_index: int,
        unet: nn.Module,
        images: Tensor,
        text: TextEmbeddings,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The denoising loss of one stage on a batch of full-size images (Imagen sec. 2.1, 2.4).

        ``unet`` is passed in (rather than read from ``self.unets``) so a trainer can hand in its
        own wrapped copy (DDP, compiled, ...).
        """
        stage = self.config.stages[stage_index]
        schedule = self.schedules[stage_index]
        batch = images.shape[0]
        device = images.device
        x0 = resize_images(images, stage.image_size)

        # Classifier-free guidance training: drop the text for a random subset of the batch.
        drop_text = torch.rand(batch, device=device, generator=generator) < self.config.cond_drop_prob

        lowres_image = lowres_noise_level = None
        if stage.is_super_resolution:
            previous_size = self.config.stages[stage_index - 1].image_size
            # The low-res condition is what the previous stage would produce: shrink, then upsample back.
            lowres_clean = resize_images(resize_images(images, previous_size), stage.image_size)
            if stage.train_crop_size is not None and stage.train_crop_size < stage.image_size:
                x0, lowres_clean = random_crops(x0, lowres_clean, stage.train_crop_size, generator)
            # Noise-conditioning augmentation: a random level in [0, noise_aug_max * T).
            max_level = max(1, int(stage.noise_aug_max * stage.num_train_timesteps))
            lowres_noise_level = torch.randint(0, max_level, (batch,), device=device, generator=generator)
            aug_noise = torch.randn(lowres_clean.shape, device=device, generator=generator)
            noised = schedule.add_noise(lowres_clean, aug_noise, lowres_noise_level)
            # level 0 means clean, as at sampling time (noise_aug_max = 0 trains without augmentation)
            lowres_image = torch.where((lowres_noise_level > 0).view(-1, 1, 1, 1), noised, lowres_clean)

        # $t \sim U\{0..T-1\}$, $\epsilon \sim N(0, I)$, $x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t}\epsilon$
        t = torch.randint(0, stage.num_train_timesteps, (batch,), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        x_t = schedule.add_noise(x0, noise, t)
        model_output = unet(
            x_t, t, text.tokens, text.mask, text.pooled,
            lowres_image=lowres_image, lowres_noise_level=lowres_noise_level, drop_text=drop_text,
        )
        return diffusion_loss(model_output, x0, noise, t, schedule, prediction_type=stage.prediction_type)

    # --- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str] | None = None,
        *,
        text: TextEmbeddings | None = None,
        guidance_scale: float | Sequence[float] = 4.0,
        steps: int | Sequence[int] = 50,
        sampler: str = "ddim",
        thresholding: str = "dynamic",
        dynamic_threshold_percentile: float = 0.995,
        noise_aug_level: float = 0.2,
        seed: int | None = 0,
        stop_at_stage: int | None = None,
        lowres_images: Tensor | None = None,
        safety: bool = True,
        safety_checker: Callable[[Tensor], Any] | None = None,
        progress: bool = False,
    ) -> ImagenOutput:
        """Run the whole cascade: text -> 32 px -> 64 px (-> 128 px).

        ``guidance_scale`` and ``steps`` take one value for all stages or one per stage.
        ``noise_aug_level`` (a fraction of T) is how much the previous stage's image is noised
        before a super-resolution stage sees it (Imagen sec. 2.4); 0 disables the augmentation.

        ``lowres_images`` (B, 3, h, w) in [-1, 1] skips the stages up to size h: the cascade starts at the
        super-resolution stage that follows, as if the earlier stages had drawn them (to upsample your
        own images, or to test a super-resolution stage on real low-res images).

        ``safety`` (on by default, ``mini_imagen.safety``): prompts are checked before any compute
        (a refused one raises ``SafetyRefusal``) and images after; flagged images come back black and
        ``nsfw_content_detected`` says which. ``safety_checker`` replaces the image check (e.g.
        ``load_stable_diffusion_safety_checker()``). ``safety=False`` skips both, with a warning:
        right for measuring a model (lessons, ``evaluate``), not for serving one.
        """
        if text is None:
            if not prompts:
                raise ValueError("sample() needs prompts (a non-empty list of strings) or precomputed text embeddings")
        if safety:
            if self._safety_checks is None:
                self._safety_checks = SafetyChecks(text_encoder=self.text_encoder)
            if prompts:  # precomputed embeddings carry no words to check; the image check still runs
                self._safety_checks.check_prompts(prompts)
        else:
            warn_safety_off("sample(safety=False)", stacklevel=4)  # 4: past no_grad's wrapper
        if text is None:
            text = self.encode_text(prompts)
        text = text.to(self.device)
        batch = text.pooled.shape[0]
        num_stages = len(self.unets) if stop_at_stage is None else stop_at_stage + 1
        first_stage, previous = 0, None
        if lowres_images is not None:
            sizes = [stage.image_size for stage in self.config.stages]
            if lowres_images.ndim != 4 or lowres_images.shape[0] != batch or lowres_images.shape[-1] not in sizes[:-1]:
                raise ValueError(f"lowres_images must be ({batch}, 3, h, h) with h the size of a stage that a "
                                 f"super-resolution stage follows ({', '.join(map(str, sizes[:-1]))}); got "
                                 f"{tuple(lowres_images.shape)}")
            first_stage = sizes.index(lowres_images.shape[-1]) + 1
            previous = lowres_images.to(self.device).clamp(-1, 1)
        scales = _per_stage(guidance_scale, num_stages, "guidance_scale")
        step_counts = _per_stage(steps, num_stages, "steps")
        if not 0.0 <= noise_aug_level < 1.0:
            raise ValueError(f"noise_aug_level is a fraction of the schedule, in [0, 1); got {noise_aug_level}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        stage_images: list[Tensor] = []
        for index in range(first_stage, num_stages):
            stage, schedule, unet = self.config.stages[index], self.schedules[index], self.unets[index]
            size = stage.image_size
            lowres_image = lowres_level = None
            if stage.is_super_resolution:
                assert previous is not None
                lowres_clean = resize_images(previous, size)
                level = int(noise_aug_level * stage.num_train_timesteps)
                lowres_level = torch.full((batch,), level, device=self.device, dtype=torch.long)
                aug_noise = torch.randn(lowres_clean.shape, generator=generator).to(self.device)
                lowres_image = schedule.add_noise(lowres_clean, aug_noise, lowres_level) if level > 0 else lowres_clean

            model_fn = self._guided_model_fn(unet, text, scales[index], lowres_image, lowres_level)
            # DDIM with thresholding steps with the $\hat\epsilon$ that the *thresholded* $\hat x_0$ implies
            # (GLIDE's choice): mixing the clipped $\hat x_0$ with the network's own $\hat\epsilon$ (diffusers'
            # default) describes no single $x_t$, and under guidance the samples fall apart (lesson 06).
            ddim_options = {"use_clipped_model_output": thresholding != "none"} if sampler == "ddim" else {}
            stage_sampler = make_sampler(
                sampler, schedule, prediction_type=stage.prediction_type,
                thresholding=thresholding, dynamic_threshold_percentile=dynamic_threshold_percentile, **ddim_options,
            )
            x_T = torch.randn((batch, stage.unet.out_channels, size, size), generator=generator).to(self.device)
            previous = run_sampler(
                model_fn, stage_sampler, x_T, step_counts[index], generator=generator,
                progress=progress,
            ).clamp(-1, 1)
            stage_images.append(previous)

        output = ImagenOutput(images=stage_images[-1], stage_images=stage_images)
        if safety:
            check = safety_checker or self._safety_checks.check_images
            output.images, output.nsfw_content_detected = check(output.images)
        return output

    def _guided_model_fn(
        self, unet: nn.Module, text: TextEmbeddings, guidance_scale: float,
        lowres_image: Tensor | None, lowres_level: Tensor | None,
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """Wrap a U-Net as ``model_fn(x_t, t)`` with classifier-free guidance in one batched call."""

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return guided_prediction(unet, x_t, t, text, guidance_scale, lowres_image, lowres_level)

        return model_fn

    # --- saving and loading --------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (optionally fp16) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.unets.state_dict().items()}
        tmp_weights = directory / (WEIGHTS_NAME + ".tmp")
        save_file(tensors, str(tmp_weights), metadata={"format": "pt", "mini_imagen": "1"})
        tmp_weights.replace(directory / WEIGHTS_NAME)  # atomic: a crash never leaves half a file
        tmp_config = directory / (CONFIG_NAME + ".tmp")
        tmp_config.write_text(json.dumps(self.config.to_dict(), indent=2))
        tmp_config.replace(directory / CONFIG_NAME)
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", text_encoder: FrozenTextEncoder | None = None
    ) -> "Imagen":
        """Rebuild a cascade from a folder written by ``save_pretrained``; clear errors if it is not one."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise CheckpointError(
                f"{directory} is not a mini-imagen model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                "train one with `mini-imagen train` or omit --model to use the shipped weights"
            )
        try:
            config = ImagenConfig.from_dict(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, TypeError, KeyError) as error:
            raise CheckpointError(f"{config_path} is not a valid mini-imagen config ({error})") from None
        try:
            state = load_file(str(weights_path))
        except Exception as error:  # safetensors raises several types for a damaged file
            raise CheckpointError(f"{weights_path} is corrupt or truncated ({error}); re-save or re-train it") from None
        model = cls(config, text_encoder=text_encoder)
        expected = model.unets.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            detail = (missing or unexpected or wrong)[0]
            raise CheckpointError(
                f"{weights_path} does not match its config.json ({len(missing)} missing, {len(unexpected)} unexpected, "
                f"{len(wrong)} mis-shaped tensors, e.g. '{detail}'); the weights belong to another architecture"
            )
        model.unets.load_state_dict({k: v.float() for k, v in state.items()})
        return model.to(device).eval()


# ----------------------------------------------------------------------------- helpers
def guided_prediction(
    unet: nn.Module, x_t: Tensor, t: Tensor, text: TextEmbeddings, guidance_scale: float,
    lowres_image: Tensor | None = None, lowres_level: Tensor | None = None,
) -> Tensor:
    """The U-Net's output with classifier-free guidance, the conditional and unconditional passes in one batch."""
    batch = text.pooled.shape[0]
    if t.ndim == 0 or t.shape[0] != batch:  # one shared timestep -> one per sample
        t = t.reshape(-1)[:1].expand(batch)
    if guidance_scale == 1.0:  # plain conditional prediction, half the compute
        return unet(x_t, t, text.tokens, text.mask, text.pooled,
                    lowres_image=lowres_image, lowres_noise_level=lowres_level)

    def twice(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.cat([x, x])

    drop_text = torch.cat([torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)])
    out = unet(twice(x_t), twice(t), twice(text.tokens), twice(text.mask), twice(text.pooled),
               lowres_image=twice(lowres_image), lowres_noise_level=twice(lowres_level),
               drop_text=drop_text.to(x_t.device))  # rows B..2B see the learned null text
    cond, uncond = out.chunk(2)
    # $\tilde\epsilon = \epsilon(z, \emptyset) + w\,(\epsilon(z, c) - \epsilon(z, \emptyset))$
    return classifier_free_guidance(cond, uncond, guidance_scale)


def resize_images(images: Tensor, size: int) -> Tensor:
    """Resize a batch to ``size``×``size``: antialiased area-style down, bilinear up."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=images.shape[-1] > size,
                         align_corners=False)


def random_crops(images: Tensor, lowres: Tensor, size: int, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
    """The same random ``size``×``size`` window of each image and of its low-res condition."""
    batch, _, height, width = images.shape
    device = generator.device if generator is not None else "cpu"
    top = torch.randint(0, height - size + 1, (batch,), generator=generator, device=device).tolist()
    left = torch.randint(0, width - size + 1, (batch,), generator=generator, device=device).tolist()
    crop = lambda x: torch.stack([x[i, :, t:t + size, l:l + size] for i, (t, l) in enumerate(zip(top, left))])
    return crop(images), crop(lowres)


def _per_stage(value: float | int | Sequence, num_stages: int, name: str) -> list:
    if isinstance(value, (int, float)):
        return [value] * num_stages
    values = list(value)
    if len(values) < num_stages:
        raise ValueError(f"{name} has {len(values)} values but the cascade runs {num_stages} stages")
    return values[:num_stages]
