"""The cascade: stage losses, guided sampling, save/load round trips and their clear failures."""

from __future__ import annotations

import json

import pytest
import torch

from mini_imagen.checkpoint import CheckpointError
from mini_imagen.imagen import Imagen, ImagenConfig, StageConfig, resize_images
from mini_imagen.text import load_text_encoder
from mini_imagen.unet import UNetConfig


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder()


def tiny_config(sr: bool = True) -> ImagenConfig:
    stages = [StageConfig(unet=UNetConfig.tiny(image_size=16))]
    if sr:
        stages.append(StageConfig(unet=UNetConfig.tiny(image_size=32, lowres_cond=True), prediction_type="v_prediction"))
    return ImagenConfig(stages=stages)


@pytest.fixture(scope="module")
def imagen(encoder):
    torch.manual_seed(0)
    model = Imagen(tiny_config(), text_encoder=encoder).eval()
    with torch.no_grad():  # leave the zero-initialised start: an untrained U-Net would ignore the text
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_stage_losses_are_finite_scalars_that_backpropagate(imagen):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    text = imagen.encode_text(["a red circle", "two blue squares", "a green star at the top"])
    for index, unet in enumerate(imagen.unets):
        unet.zero_grad()
        loss = imagen.stage_loss(index, unet, images, text, generator=torch.Generator().manual_seed(1))
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in unet.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_sample_shapes_per_stage_and_same_seed_same_images(imagen):
    prompts = ["a red circle above a blue square", "two green triangles"]
    out = imagen.sample(prompts, steps=3, seed=5)
    assert [tuple(x.shape) for x in out.stage_images] == [(2, 3, 16, 16), (2, 3, 32, 32)]
    assert out.images.min() >= -1 and out.images.max() <= 1
    again = imagen.sample(prompts, steps=3, seed=5)
    assert torch.equal(out.images, again.images)
    different = imagen.sample(prompts, steps=3, seed=6)
    assert not torch.equal(out.images, different.images)
    base_only = imagen.sample(prompts, steps=3, seed=5, stop_at_stage=0)
    assert torch.equal(base_only.images, out.stage_images[0])
    assert len(out.to_pil()) == 2 and out.to_pil()[0].size == (32, 32)


def test_guidance_scale_changes_the_sample_and_one_is_plain_conditional(imagen):
    prompts = ["a red circle"]
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        w1 = imagen.sample(prompts, steps=3, seed=0, guidance_scale=1.0, sampler=sampler, stop_at_stage=0)
        w5 = imagen.sample(prompts, steps=3, seed=0, guidance_scale=5.0, sampler=sampler, stop_at_stage=0)
        assert not torch.allclose(w1.images, w5.images)


def test_noise_aug_level_reaches_the_super_resolution_stage(imagen):
    low = imagen.sample(["a red circle"], steps=2, seed=0, noise_aug_level=0.0)
    high = imagen.sample(["a red circle"], steps=2, seed=0, noise_aug_level=0.5)
    assert torch.equal(low.stage_images[0], high.stage_images[0])
    assert not torch.allclose(low.images, high.images)


def test_save_and_load_round_trip_gives_identical_samples(imagen, encoder, tmp_path):
    imagen.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["stages"][1]["prediction_type"] == "v_prediction"
    loaded = Imagen.from_pretrained(tmp_path / "model", text_encoder=encoder)
    a = imagen.sample(["a red circle"], steps=2, seed=3)
    b = loaded.sample(["a red circle"], steps=2, seed=3)
    assert torch.equal(a.images, b.images)
    # fp16 storage halves the file and still loads into float32 weights
    imagen.save_pretrained(tmp_path / "half", dtype=torch.float16)
    half = Imagen.from_pretrained(tmp_path / "half", text_encoder=encoder)
    assert next(half.parameters()).dtype == torch.float32
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("half") < 0.6 * size("model")


def test_missing_corrupt_and_mismatched_models_fail_with_one_clear_line(imagen, encoder, tmp_path):
    with pytest.raises(CheckpointError, match="not a mini-imagen model folder"):
        Imagen.from_pretrained(tmp_path / "nothing-here")
    folder = imagen.save_pretrained(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Imagen.from_pretrained(folder, text_encoder=encoder)
    imagen.save_pretrained(folder)
    other = Imagen(tiny_config(sr=True), text_encoder=encoder)
    config = other.config.to_dict()
    config["stages"][0]["unet"]["base_channels"] = 32  # weights now belong to another architecture
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="another architecture") as error:
        Imagen.from_pretrained(folder, text_encoder=encoder)
    assert "\n" not in str(error.value)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid mini-imagen config"):
        Imagen.from_pretrained(folder, text_encoder=encoder)


def test_bad_configs_and_arguments_are_rejected(imagen):
    with pytest.raises(ValueError, match="base model"):
        Imagen(ImagenConfig(stages=[StageConfig(unet=UNetConfig.tiny(image_size=32, lowres_cond=True))]))
    with pytest.raises(ValueError, match="must be super-resolution"):
        Imagen(ImagenConfig(stages=[StageConfig(unet=UNetConfig.tiny(image_size=16)),
                                    StageConfig(unet=UNetConfig.tiny(image_size=32))]))
    with pytest.raises(ValueError, match="needs prompts"):
        imagen.sample([])
    with pytest.raises(ValueError, match="noise_aug_level"):
        imagen.sample(["a red circle"], noise_aug_level=1.5)
    with pytest.raises(ValueError, match="steps has 1 values"):
        imagen.sample(["a red circle"], steps=[2])
    with pytest.raises(ValueError, match="ddim"):
        imagen.sample(["a red circle"], sampler="euler", steps=2)


def test_resize_images_is_antialiased_down_and_smooth_up():
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1  # +-1 checkerboard
    small = resize_images(checker.expand(1, 3, 32, 32), 16)
    assert small.abs().max() < 0.1  # averaged to grey, not aliased to a pattern
    assert resize_images(small, 32).shape == (1, 3, 32, 32)


def test_sample_checks_prompts_before_compute_and_images_after_unless_told_not_to(imagen):
    from mini_imagen.safety import SafetyCheckDisabledWarning, SafetyRefusal

    calls = []
    hook = imagen.unets[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(SafetyRefusal, match="restricted concept 'weapons'"):
            imagen.sample(["a red circle", "a rifle on a wall"], steps=2)
        assert not calls  # refused before the first U-Net call
        checked = imagen.sample(["a red circle"], steps=2, stop_at_stage=0)
        assert checked.nsfw_content_detected == [False] and calls
        flagged = imagen.sample(["a red circle"], steps=2, stop_at_stage=0,
                                safety_checker=lambda x: (torch.full_like(x, -1.0), [True]))
        assert flagged.nsfw_content_detected == [True] and (flagged.images == -1).all()
        with pytest.warns(SafetyCheckDisabledWarning, match=r"safety check is off \(sample\(safety=False\)\)"):
            unchecked = imagen.sample(["a rifle on a wall"], steps=2, stop_at_stage=0, safety=False)
        assert unchecked.nsfw_content_detected is None
    finally:
        hook.remove()


def test_super_resolution_stages_can_train_on_random_crops(encoder):
    config = tiny_config()
    config.stages[1].train_crop_size = 16  # 16 px windows of the 32 px stage
    imagen = Imagen(config, text_encoder=encoder)
    seen = []
    hook = imagen.unets[1].register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (args[0].shape, kwargs["lowres_image"].shape)), with_kwargs=True)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    loss = imagen.stage_loss(1, imagen.unets[1], images, imagen.encode_text(["a"] * 3))
    hook.remove()
    assert torch.isfinite(loss) and seen == [(torch.Size([3, 3, 16, 16]), torch.Size([3, 3, 16, 16]))]
    # the crop of the image and of its low-res condition come from the same window
    from mini_imagen.imagen import random_crops

    hi = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a, b = random_crops(hi, hi.clone(), 4, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="train_crop_size 10 must be in"):
        bad = tiny_config()
        bad.stages[1].train_crop_size = 10
        bad.validate()
    with pytest.raises(ValueError, match="train_crop_size is for super-resolution stages"):
        bad = tiny_config()
        bad.stages[0].train_crop_size = 8
        bad.validate()


def test_sample_can_start_from_given_low_res_images(imagen):
    low = torch.rand(2, 3, 16, 16) * 2 - 1
    out = imagen.sample(["a red circle", "a blue square"], steps=2, lowres_images=low, safety=False)
    assert out.images.shape == (2, 3, 32, 32) and len(out.stage_images) == 1
    other = imagen.sample(["a red circle", "a blue square"], steps=2, lowres_images=-low, safety=False)
    assert not torch.allclose(out.images, other.images)  # the super-resolution stage really reads them
    with pytest.raises(ValueError, match="lowres_images must be"):
        imagen.sample(["a red circle"], steps=2, lowres_images=torch.zeros(1, 3, 32, 32), safety=False)
