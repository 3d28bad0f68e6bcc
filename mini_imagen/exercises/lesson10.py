"""Lesson 10 exercises: call diffusers' U-Net yourself, build a diffusers scheduler equal to our sampler, and write
the sampling loop a diffusers pipeline runs (U-Net + scheduler + guidance)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mini_imagen.exercises import _attempt, _report

BASELINE_FOLDER = "diffusers_baseline"  # under mini_imagen/weights


def _tensor_result(result: Any) -> tuple[Tensor | None, str | None]:
    """``result`` as a tensor, or a hint about what it is instead."""
    if isinstance(result, Tensor):
        return result, None
    if hasattr(result, "sample") and isinstance(result.sample, Tensor):
        return None, ("you returned diffusers' output object; return the tensor inside it: `.sample` "
                      "(or call the U-Net with return_dict=False and take [0])")
    return None, f"return a tensor, got {type(result).__name__}"


def _max_difference(a: Tensor, b: Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


# ----------------------------------------------------------------------------- 1. calling diffusers' U-Net
def check_unet_call(fn: Callable[..., Any]) -> bool:
    """Lesson 10: ``fn(unet, x_t, t, text)`` runs diffusers' ``UNet2DConditionModel`` on our text and returns its output.

    ``unet`` is the shipped baseline's ``UNet2DConditionModel`` (``weights/diffusers_baseline/unet``), ``x_t`` a
    (B, 3, 32, 32) noisy image, ``t`` (B,) timesteps and ``text`` a ``TextEmbeddings`` (tokens, mask, pooled). The
    answer is the (B, 3, 32, 32) prediction, exactly what ``DiffusersBaseUNet`` (which wraps it) computes.
    """
    from diffusers import UNet2DConditionModel

    from mini_imagen.diffusers_baseline import DiffusersBaseUNet
    from mini_imagen.generate import SHIPPED_SCENE_MODEL
    from mini_imagen.text import load_text_encoder

    name = "calling UNet2DConditionModel"
    unet = UNet2DConditionModel.from_pretrained(SHIPPED_SCENE_MODEL.parent / BASELINE_FOLDER / "unet").float().eval()
    text = load_text_encoder().encode(["a red circle above a blue square", "two green triangles"])
    generator = torch.Generator().manual_seed(10)
    x_t = torch.randn(2, 3, 32, 32, generator=generator)
    t = torch.tensor([150, 700])
    wrapper = DiffusersBaseUNet(unet, text.tokens.shape[1], text.tokens.shape[2])
    with torch.no_grad():
        expected = wrapper(x_t, t, text.tokens, text.mask, text.pooled)
        unmasked = unet(x_t, t, encoder_hidden_states=text.tokens, class_labels=text.pooled).sample
        result, problem = _attempt(lambda: fn(unet, x_t.clone(), t.clone(), text))
    if problem:
        if "class_labels" in problem:
            problem = ("pass the pooled text as class_labels=text.pooled: this U-Net adds a projection of it to the "
                       "timestep embedding (class_embed_type='projection'), as Imagen adds the pooled text")
        return _report(False, name, problem)
    result, problem = _tensor_result(result)
    if problem:
        return _report(False, name, problem)
    if tuple(result.shape) != tuple(expected.shape):
        return _report(False, name, f"expected shape {tuple(expected.shape)}, got {tuple(result.shape)}")
    if _max_difference(result, expected) <= 1e-4:
        return _report(True, name, "tokens to encoder_hidden_states, padding mask to encoder_attention_mask, pooled "
                                   "text to class_labels: the same prediction as DiffusersBaseUNet")
    if _max_difference(result, unmasked) <= 1e-4:
        return _report(False, name, "the padding tokens are being attended to: pass text.mask as "
                                    "encoder_attention_mask")
    return _report(False, name, f"differs from DiffusersBaseUNet by up to {_max_difference(result, expected):.3g}: "
                                "tokens go to encoder_hidden_states, the mask to encoder_attention_mask, the pooled "
                                "vector to class_labels")


# ----------------------------------------------------------------------------- 2. a diffusers scheduler = our sampler
def _test_imagens() -> list[tuple[str, Any]]:
    """The shipped cascade's config (cosine, v) and a small one (linear, epsilon, T = 500): no weights needed."""
    import json

    from mini_imagen.generate import SHIPPED_SCENE_MODEL
    from mini_imagen.imagen import CONFIG_NAME, Imagen, ImagenConfig, StageConfig
    from mini_imagen.unet import UNetConfig

    shipped = ImagenConfig.from_dict(json.loads((SHIPPED_SCENE_MODEL / CONFIG_NAME).read_text()))
    other = ImagenConfig(stages=[StageConfig(unet=UNetConfig.tiny(image_size=16), beta_schedule="linear",
                                             num_train_timesteps=500, prediction_type="epsilon")])
    return [("the shipped base stage", Imagen(shipped)), ("a linear, epsilon, T = 500 stage", Imagen(other))]


def check_ddim_scheduler(fn: Callable[[Any], Any]) -> bool:
    """Lesson 10: ``fn(imagen)`` is a diffusers ``DDIMScheduler`` that steps exactly like ``Imagen.sample``'s default.

    That is our ``DDIMSampler`` for the base stage (``imagen.schedules[0]``, ``imagen.config.stages[0]``): the same
    noise schedule ($\\bar\\alpha_t$), the same prediction type, and dynamic thresholding at p = 0.995 (lesson 06).
    Checked on the shipped model's config and on a stage with another schedule, prediction type and T, step by step
    against ``samplers.DDIMSampler`` with outputs large enough for thresholding to matter.
    """
    from diffusers import DDIMScheduler

    from mini_imagen.samplers import DDIMSampler

    name = "a DDIMScheduler equal to our DDIM"
    for label, imagen in _test_imagens():
        stage, schedule = imagen.config.stages[0], imagen.schedules[0]
        try:
            scheduler = fn(imagen)
        except NotImplementedError as error:
            if "is not implemented for" in str(error):  # diffusers' words for an unknown beta_schedule
                return _report(False, name, f"diffusers says: {error}. Its name for the cosine schedule is "
                                            "'squaredcos_cap_v2'")
            return _report(False, name, "not attempted yet (the function raises NotImplementedError)")
        except Exception as error:  # a student's bug is feedback, not a crash
            return _report(False, name, f"your function raised {type(error).__name__}: {error}")
        if scheduler is None:
            return _report(False, name, "not attempted yet (the function returns None)")
        if not isinstance(scheduler, DDIMScheduler):
            return _report(False, name, f"return a diffusers DDIMScheduler, got {type(scheduler).__name__}")
        config = scheduler.config
        if config.num_train_timesteps != stage.num_train_timesteps:
            return _report(False, name, f"{label}: num_train_timesteps is {config.num_train_timesteps}, the stage "
                                        f"trains with {stage.num_train_timesteps}")
        ours = schedule.alphas_cumprod.float()
        if _max_difference(scheduler.alphas_cumprod, ours) > 1e-5:
            hint = f"{label}: alphas_cumprod differs from imagen.schedules[0].alphas_cumprod"
            if stage.beta_schedule == "cosine":
                hint += " (the stage uses the cosine schedule: beta_schedule='squaredcos_cap_v2' in diffusers)"
            return _report(False, name, hint)
        if config.prediction_type != stage.prediction_type:
            return _report(False, name, f"{label}: the U-Net predicts {stage.prediction_type!r} but the scheduler "
                                        f"reads its output as {config.prediction_type!r} (prediction_type=...)")
        if not config.thresholding:
            return _report(False, name, "Imagen.sample's default is dynamic thresholding (lesson 06): "
                                        "thresholding=True" + (" (clip_sample=True alone is static clipping)"
                                                               if config.clip_sample else ""))
        if abs(config.dynamic_thresholding_ratio - 0.995) > 1e-9:
            return _report(False, name, f"the percentile p is 0.995 (dynamic_thresholding_ratio), not "
                                        f"{config.dynamic_thresholding_ratio}")
        if config.sample_max_value < 1e6:
            return _report(False, name, f"sample_max_value={config.sample_max_value} caps s at that value: with the "
                                        "default 1.0 diffusers' 'dynamic' thresholding is static clipping (lesson "
                                        "06's pitfall); Imagen's rule has no cap: sample_max_value=float('inf')")
        reference = DDIMSampler(schedule, stage.prediction_type, thresholding="dynamic")
        steps = 10
        scheduler.set_timesteps(steps)
        reference.set_timesteps(steps)
        if scheduler.timesteps.tolist() != reference.timesteps.tolist():
            return _report(False, name, f"{label}: 10 steps visit {scheduler.timesteps.tolist()}, our DDIM "
                                        f"{reference.timesteps.tolist()} (keep diffusers' default 'leading' spacing)")
        generator = torch.Generator().manual_seed(11)
        x = torch.randn(2, 3, 8, 8, generator=generator)
        for t in reference.timesteps:
            output = 3 * torch.randn(x.shape, generator=generator)  # large: x0-hat leaves [-1, 1]
            expected = reference.step(output, t, x).prev_sample
            got = scheduler.step(output, t, x).prev_sample
            if _max_difference(got, expected) > 1e-4:
                return _report(False, name, f"{label}: at t = {int(t)} the step differs from our DDIM by "
                                            f"{_max_difference(got, expected):.3g}")
            x = expected
    return _report(True, name, "same alphas_cumprod, prediction type, timesteps and dynamic thresholding: every "
                               "step equals our DDIMSampler, on two different stages")


# ----------------------------------------------------------------------------- 3. the sampling loop
def _reference_denoise(unet: Any, scheduler: Any, text: Any, guidance_scale: float, num_inference_steps: int,
                       generator: torch.Generator, backwards: bool = False) -> Tensor:
    """``MiniImagenPipeline.denoise`` without the pipeline: x_T, then U-Net + guidance + ``scheduler.step``.

    ``backwards`` makes the usual mistake, cond + w (uncond - cond), for the check's hint.
    """
    size, channels, batch = unet.config.image_size, unet.config.out_channels, len(text)
    x = torch.randn((batch, channels, size, size), generator=generator) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps)
    drop_text = torch.arange(2 * batch) >= batch  # rows B..2B see the learned null text
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        both = unet(torch.cat([x_in, x_in]), t.reshape(1).expand(2 * batch), text.tokens.repeat(2, 1, 1),
                    text.mask.repeat(2, 1), text.pooled.repeat(2, 1), drop_text=drop_text)
        cond, uncond = both.chunk(2)
        output = (cond + guidance_scale * (uncond - cond) if backwards
                  else uncond + guidance_scale * (cond - uncond))
        x = scheduler.step(output, t, x).prev_sample
    return x.clamp(-1, 1)


def check_denoise(fn: Callable[..., Any]) -> bool:
    """Lesson 10: ``fn(unet, scheduler, text, guidance_scale, num_inference_steps, generator)`` samples one stage.

    ``unet`` has the course's call, ``unet(x_t, t, tokens, mask, pooled, drop_text=...)`` (an ``EfficientUNet``;
    ``drop_text`` (B,) bool swaps in the learned null text), ``scheduler`` is any diffusers scheduler, ``text`` a
    ``TextEmbeddings`` of B prompts. Draw $x_T$ of shape (B, 3, size, size) with ``torch.randn(..., generator=
    generator)``, then for every timestep: the guided prediction
    $\\hat\\epsilon_\\emptyset + w(\\hat\\epsilon_c - \\hat\\epsilon_\\emptyset)$ and ``scheduler.step``. Return the
    final image (clamped to [-1, 1] or not). Checked against ``MiniImagenPipeline``'s loop with DDIM and DPM-Solver++.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from mini_imagen.pipeline import make_scheduler
    from mini_imagen.schedule import NoiseSchedule
    from mini_imagen.text import TextEmbeddings
    from mini_imagen.unet import EfficientUNet, UNetConfig

    name = "the sampling loop"
    torch.manual_seed(12)
    unet = EfficientUNet(UNetConfig.tiny(image_size=16)).eval()
    with torch.no_grad():  # leave the zero-initialised start: an untrained U-Net would ignore the text
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    generator = torch.Generator().manual_seed(13)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    text = TextEmbeddings(torch.randn(2, 8, 384, generator=generator) * mask[..., None], mask,
                          torch.randn(2, 384, generator=generator))
    schedule = NoiseSchedule(beta_schedule="cosine")
    cases = [("DDIM, v-prediction, w = 3", make_scheduler("ddim", schedule, "v_prediction", "none"), 3.0, 4),
             ("DPM-Solver++, epsilon, w = 2", make_scheduler("dpm++2m", schedule, "epsilon", "static"), 2.0, 5)]
    for label, scheduler, w, steps in cases:
        assert isinstance(scheduler, (DDIMScheduler, DPMSolverMultistepScheduler))

        def run(function: Callable[..., Any], scale: float = w, seed: int = 14, scheduler: Any = scheduler,
                steps: int = steps) -> tuple[Any, str | None]:
            fresh = type(scheduler).from_config(scheduler.config)  # a new scheduler for every run: no stale state
            with torch.no_grad():
                return _attempt(function, unet, fresh, text, scale, steps, torch.Generator().manual_seed(seed))

        expected, _ = run(_reference_denoise)
        result, problem = run(fn)
        if problem:
            return _report(False, name, problem if problem.startswith("not attempted") else f"{label}: {problem}")
        result, problem = _tensor_result(result)
        if problem:
            return _report(False, name, problem)
        if tuple(result.shape) != tuple(expected.shape):
            return _report(False, name, f"{label}: expected shape {tuple(expected.shape)}, got {tuple(result.shape)}")
        result = result.clamp(-1, 1)
        if _max_difference(result, expected) <= 1e-4:
            continue
        again, _ = run(fn)
        if isinstance(again, Tensor) and _max_difference(again.clamp(-1, 1), result) > 1e-6:
            return _report(False, name, "two runs with the same seed differ: draw x_T with "
                                        "torch.randn(shape, generator=generator)")
        unguided, _ = run(_reference_denoise, scale=1.0)
        if _max_difference(result, unguided) <= 1e-4:
            return _report(False, name, "that is the conditional prediction alone: combine the two passes, "
                                        "uncond + guidance_scale * (cond - uncond)")
        reversed_, _ = run(lambda *args: _reference_denoise(*args, backwards=True))
        if _max_difference(result, reversed_) <= 1e-4:
            return _report(False, name, "guidance points the wrong way: uncond + w (cond - uncond), where cond "
                                        "sees the prompt and uncond the null text (drop_text=True)")
        return _report(False, name, f"{label}: differs from the pipeline's loop by up to "
                                    f"{_max_difference(result, expected):.3g}")
    return _report(True, name, "x_T from the generator, guided predictions, scheduler.step: the same images as "
                               "MiniImagenPipeline, with DDIM and with DPM-Solver++")


__all__ = ["check_ddim_scheduler", "check_denoise", "check_unet_call"]
