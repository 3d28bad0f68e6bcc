"""MiniImagenPipeline: same images as Imagen.sample, offline save/load round trips, scheduler swaps, clear errors.

The equality tests run ``Imagen.sample`` (our samplers) and the pipeline (diffusers' schedulers) from the
same seed. In float64, with diffusers' hard-coded float32 promoted as in ``test_samplers.py``, they agree
to 1e-10: same noise in the same order, same guidance, same thresholding, same noise augmentation.
"""

from __future__ import annotations

import inspect
import json
import socket
from contextlib import contextmanager
from dataclasses import asdict, fields
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from mini_imagen.guidance import dynamic_threshold, static_threshold
from mini_imagen.imagen import Imagen, ImagenConfig, StageConfig, tensor_to_pil
from mini_imagen.pipeline import (
    MiniImagenPipeline,
    MiniImagenUNet,
    diffusers_thresholding,
    make_scheduler,
)
from mini_imagen.recipes import cpu_tiny
from mini_imagen.schedule import NoiseSchedule
from mini_imagen.text import load_text_encoder
from mini_imagen.unet import UNetConfig

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

PROMPTS = ["a red circle above a blue square", "two green triangles"]


@contextmanager
def everything_in_float64():
    """New tensors and diffusers' hard-coded float32 (torch, NumPy) in float64: compare algorithms, not rounding."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with mock.patch.object(torch, "float32", torch.float64), mock.patch.object(np, "float32", np.float64):
            yield
    finally:
        torch.set_default_dtype(default)


def tiny_config() -> ImagenConfig:
    """cpu-tiny's cascade at half the size (16 -> 32 px, for speed); the SR stage predicts v."""
    config = cpu_tiny().model
    sr = config.stages[1]
    return ImagenConfig(stages=[StageConfig(unet=UNetConfig.tiny(image_size=16)),
                                StageConfig(unet=UNetConfig.tiny(image_size=32, lowres_cond=True),
                                            beta_schedule=sr.beta_schedule, prediction_type="v_prediction")],
                        text_encoder=config.text_encoder, max_text_len=config.max_text_len)


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder()


@pytest.fixture(scope="module")
def imagen(encoder):
    torch.manual_seed(0)
    model = Imagen(tiny_config(), text_encoder=encoder).eval()
    with torch.no_grad():  # leave the zero-initialised start: an untrained U-Net would ignore the text
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def make_pipe(imagen: Imagen, scheduler: str = "ddim", **options) -> MiniImagenPipeline:
    pipe = MiniImagenPipeline.from_imagen(imagen, scheduler=scheduler, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(imagen):
    return make_pipe(imagen)


def generate(pipe: MiniImagenPipeline, seed: int = 3, steps: int = 3, **options) -> torch.Tensor:
    return pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="pt", **options).images


# ----------------------------------------------------------------------------- same images as Imagen.sample
@pytest.mark.filterwarnings("ignore:the safety check is off")
@pytest.mark.parametrize("sampler,guidance_scale,noise_aug_level", [("ddim", (4.0, 2.0), 0.2),
                                                                    ("dpm++2m", (3.0, 1.0), 0.5),
                                                                    ("ddpm", (1.0, 5.0), 0.0)])
def test_pipeline_gives_imagen_sample_images_from_the_same_seed_in_float64(imagen, encoder, sampler, guidance_scale,
                                                                          noise_aug_level):
    double = Imagen(imagen.config, text_encoder=encoder)
    double.load_state_dict(imagen.state_dict())
    double.double().eval()
    text = encoder.encode(PROMPTS).to(dtype=torch.float64)
    with everything_in_float64():  # the safety checks are not what this compares: off in both
        pipe = make_pipe(double, sampler, requires_safety_checker=False)
        ours = double.sample(text=text, guidance_scale=guidance_scale, steps=3, sampler=sampler, seed=7,
                             noise_aug_level=noise_aug_level, safety=False)
        theirs = pipe(prompt_embeds=text, guidance_scale=guidance_scale, num_inference_steps=3,
                      noise_aug_level=noise_aug_level, generator=torch.Generator().manual_seed(7),
                      output_type="pt").images
    assert theirs.dtype == torch.float64 and theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(theirs, ours.images, rtol=0, atol=1e-10)


def test_pipeline_defaults_match_imagen_sample_defaults_in_float32(imagen, pipe):
    ours = imagen.sample(PROMPTS, steps=4, seed=11)  # DDIM, dynamic thresholding, w = 4, noise_aug_level 0.2
    theirs = generate(pipe, seed=11, steps=4)
    torch.testing.assert_close(theirs, ours.images, rtol=0, atol=1e-4)  # diffusers' tables are float32
    assert not torch.allclose(theirs, generate(pipe, seed=12, steps=4))


# ----------------------------------------------------------------------------- saving and loading
def test_save_and_load_round_trip_offline_gives_identical_weights_and_images(pipe, encoder, tmp_path, monkeypatch):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "MiniImagenPipeline"
    assert index["unet"] == index["super_res_unet"] == ["mini_imagen.pipeline", "MiniImagenUNet"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["safety_checker"] == [None, None]
    assert index["text_encoder_name"] == "all-MiniLM-L6-v2"
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) < 5e6  # no 91 MB text encoder

    def no_network(*args, **kwargs):
        raise AssertionError("from_pretrained tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded = MiniImagenPipeline.from_pretrained(tmp_path)  # the text encoder comes by name, offline
    loaded.set_progress_bar_config(disable=True)
    assert loaded.text_encoder is encoder  # load_text_encoder shares one encoder per process
    for name in ("unet", "super_res_unet"):
        saved, restored = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == restored.keys()
        assert all(torch.equal(saved[k], restored[k]) for k in saved)
    for name in ("scheduler", "super_res_scheduler", "image_noising_scheduler"):
        public = [{k: v for k, v in getattr(p, name).config.items() if not k.startswith("_")} for p in (pipe, loaded)]
        assert public[0] == public[1]
    assert loaded.scheduler.config.sample_max_value == float("inf")  # dynamic thresholding survives JSON
    assert torch.equal(generate(loaded), generate(pipe))
    # plain diffusers, through its loader for pipelines defined outside diffusers (the saved pipeline.py)
    generic = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(tmp_path), trust_remote_code=True)
    assert type(generic).__name__ == "MiniImagenPipeline"
    generic.set_progress_bar_config(disable=True)
    assert torch.equal(generate(generic), generate(pipe))


def test_a_mini_imagen_model_folder_loads_as_a_pipeline(imagen, encoder, pipe, tmp_path):
    imagen.save_pretrained(tmp_path)  # config.json + model.safetensors, no model_index.json
    loaded = MiniImagenPipeline.from_pretrained(tmp_path, text_encoder=encoder)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded.super_res_unet.model.init_conv.weight, imagen.unets[1].init_conv.weight)
    assert torch.equal(generate(loaded), generate(pipe))


def test_unet_component_takes_exactly_the_unet_config_fields():
    parameters = inspect.signature(MiniImagenUNet.__init__).parameters
    assert list(parameters)[1:] == [f.name for f in fields(UNetConfig)]
    defaults = UNetConfig()
    assert all(parameters[f.name].default == getattr(defaults, f.name) for f in fields(UNetConfig))
    unet = MiniImagenUNet(**asdict(UNetConfig.tiny(image_size=16)))
    assert unet.unet_config == UNetConfig.tiny(image_size=16)


# ----------------------------------------------------------------------------- schedulers
def test_scheduler_swap_ddim_to_dpm_solver_to_ddpm_changes_only_the_sampler(imagen):
    pipe = make_pipe(imagen, "ddim")
    unet, super_res_scheduler = pipe.unet, pipe.super_res_scheduler
    ddim_images = generate(pipe)

    ddim_config = pipe.scheduler.config
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(ddim_config, timestep_spacing="linspace")
    assert pipe.config.scheduler == ("diffusers", "DPMSolverMultistepScheduler")
    for key in ("num_train_timesteps", "beta_schedule", "prediction_type", "thresholding",
                "dynamic_thresholding_ratio", "sample_max_value"):
        assert pipe.scheduler.config[key] == ddim_config[key]
    assert pipe.unet is unet and pipe.super_res_scheduler is super_res_scheduler
    dpm_images = generate(pipe)
    assert not torch.allclose(dpm_images, ddim_images)
    reference = make_pipe(imagen, "ddim")
    reference.scheduler = make_scheduler("dpm++2m", imagen.schedules[0], "epsilon")
    assert torch.equal(dpm_images, generate(reference))  # the swap is exactly our "dpm++2m" for stage 0

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    pipe.super_res_scheduler = DDPMScheduler.from_config(pipe.super_res_scheduler.config)
    assert torch.equal(generate(pipe), generate(make_pipe(imagen, "ddpm")))


def test_any_diffusers_scheduler_runs(imagen):
    pipe = make_pipe(imagen)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # init_noise_sigma != 1
    images = generate(pipe)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_diffusers_thresholding_settings_give_our_thresholding(cls, mode):
    scheduler = cls.from_config({**NoiseSchedule().diffusers_config(), **diffusers_thresholding(mode, 0.9)})
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.3, 2.0, 5.0])[:, None,
                                                                                                            None, None]
    ours = dynamic_threshold(x0, 0.9) if mode == "dynamic" else static_threshold(x0)
    torch.testing.assert_close(scheduler._threshold_sample(x0), ours, rtol=0, atol=1e-6)
    assert mode == "static" or not torch.allclose(ours, static_threshold(x0))  # the two really differ


# ----------------------------------------------------------------------------- outputs and the safety checker
def test_output_types_agree_with_each_other(pipe):
    pt = generate(pipe)
    assert pt.min() >= -1 and pt.max() <= 1
    arrays = pipe(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="np").images
    assert arrays.shape == (2, 32, 32, 3) and arrays.dtype == np.float32
    np.testing.assert_allclose(arrays, (pt.permute(0, 2, 3, 1).numpy() + 1) / 2, rtol=0, atol=1e-6)
    pil = pipe(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(3)).images
    assert [np.asarray(image).tolist() for image in pil] == [np.asarray(i).tolist() for i in tensor_to_pil(pt)]
    images, flags = pipe(PROMPTS[0], num_inference_steps=2, num_images_per_prompt=3, output_type="pt",
                         return_dict=False)
    assert images.shape == (3, 3, 32, 32) and flags == [False, False, False]  # the default image check ran
    assert not torch.allclose(images[0], images[1])  # three samples of one prompt, not three copies


def test_safety_checker_flags_reach_the_output_and_it_is_not_saved(imagen, tmp_path):
    seen = []

    def black_out_second(images: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        seen.append(images.clone())
        images = images.clone()
        images[1] = -1.0
        return images, [False, True]

    pipe = make_pipe(imagen, safety_checker=black_out_second)
    out = pipe(PROMPTS, num_inference_steps=2, output_type="np")
    assert out.nsfw_content_detected == [False, True]
    assert seen[0].shape == (2, 3, 32, 32) and seen[0].min() >= -1  # it sees the [-1, 1] tensor
    assert (out.images[1] == 0).all() and (out.images[0] > 0).any()
    pipe.save_pretrained(tmp_path)  # a plain function cannot be saved: recorded as absent
    assert json.loads((tmp_path / "model_index.json").read_text())["safety_checker"] == [None, None]


def test_safety_is_on_by_default_survives_a_save_and_is_turned_off_only_with_a_warning(imagen, pipe, tmp_path):
    from mini_imagen.safety import ImageSafetyChecker, SafetyCheckDisabledWarning, SafetyRefusal

    assert isinstance(pipe.safety_checker, ImageSafetyChecker) and pipe.config.requires_safety_checker
    calls = []
    pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(SafetyRefusal, match="restricted concept 'weapons'"):
        pipe(["a red circle", "a blue square next to a g u n"], num_inference_steps=2)
    assert not calls  # refused before any compute
    pipe.save_pretrained(tmp_path / "on")
    assert isinstance(MiniImagenPipeline.from_pretrained(tmp_path / "on").safety_checker, ImageSafetyChecker)

    with pytest.warns(SafetyCheckDisabledWarning, match="safety check is off"):
        off = make_pipe(imagen, requires_safety_checker=False)
    assert off.safety_checker is None
    assert off("a pistol", num_inference_steps=1, output_type="pt").nsfw_content_detected is None  # not checked
    off.save_pretrained(tmp_path / "off")
    with pytest.warns(SafetyCheckDisabledWarning):
        assert MiniImagenPipeline.from_pretrained(tmp_path / "off").safety_checker is None  # the choice is kept
    with pytest.warns(SafetyCheckDisabledWarning, match="image safety check is off"):
        make_pipe(imagen, safety_checker=None)  # prompts still checked, images not: said out loud


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_value_errors(imagen, pipe):
    with pytest.raises(ValueError, match="every prompt must be a non-empty string"):
        pipe("   ")
    with pytest.raises(ValueError, match="prompt must be a string or a non-empty list"):
        pipe([])
    with pytest.raises(ValueError, match="either prompt .* or prompt_embeds, not both or neither"):
        pipe()
    with pytest.raises(ValueError, match="unknown output_type 'latent'; choose one of: pil, np, pt"):
        pipe(PROMPTS, output_type="latent")
    with pytest.raises(ValueError, match=r"noise_aug_level .* in \[0, 1\)"):
        pipe(PROMPTS, noise_aug_level=1.0)
    with pytest.raises(ValueError, match="guidance_scale has 1 values but the pipeline runs 2 stages"):
        pipe(PROMPTS, guidance_scale=[4.0], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"unknown scheduler 'euler'; choose one of: ddpm, ddim, dpm\+\+2m"):
        MiniImagenPipeline.from_imagen(imagen, scheduler="euler")
    with pytest.raises(ValueError, match="unknown thresholding 'clip'"):
        MiniImagenPipeline.from_imagen(imagen, thresholding="clip")
    with pytest.raises(ValueError, match="unet must be a base model"):
        MiniImagenPipeline(unet=pipe.super_res_unet, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="needs a super_res_scheduler and an image_noising_scheduler"):
        MiniImagenPipeline(unet=pipe.unet, scheduler=pipe.scheduler, super_res_unet=pipe.super_res_unet)
