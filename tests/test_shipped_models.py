"""The weights that ship inside the package: intact, loadable offline, and far better than an untrained model."""

import hashlib

import torch

from mini_imagen.evaluation import score_images
from mini_imagen.generate import SHIPPED_SCENE_MODEL, default_model_dir
from mini_imagen.imagen import Imagen
from mini_imagen.text import load_text_encoder

SCENE_MODEL_SHA256 = "75eb315890dc56fd7bc4cddd9ac07bb84d67a6340239da3656f88f01575e991b"
SR_NO_AUG_SHA256 = "b81ebc2429bd6452e19052fc749f67a465f96bc5e16f38fb2978dcc0142dd4f1"
PROMPTS = ["a green star", "a blue square", "two white circles", "a purple triangle", "a yellow circle",
           "a red circle", "an orange diamond", "a cyan circle"]


def test_the_scene_model_is_the_one_its_card_describes():
    digest = hashlib.sha256((SHIPPED_SCENE_MODEL / "model.safetensors").read_bytes()).hexdigest()
    assert digest == SCENE_MODEL_SHA256, "the shipped weights changed: update the model card and this hash"
    assert default_model_dir() == SHIPPED_SCENE_MODEL  # the demo uses it, nothing is trained on first use
    model = Imagen.from_pretrained(SHIPPED_SCENE_MODEL, text_encoder=load_text_encoder())
    assert [s.image_size for s in model.config.stages] == [32, 64]
    assert [s.prediction_type for s in model.config.stages] == ["v_prediction", "v_prediction"]
    assert (SHIPPED_SCENE_MODEL / "README.md").is_file()


def test_the_scene_model_draws_what_it_is_asked_far_better_than_an_untrained_one():
    encoder = load_text_encoder()
    trained = Imagen.from_pretrained(SHIPPED_SCENE_MODEL, text_encoder=encoder)
    torch.manual_seed(0)
    untrained = Imagen(trained.config, text_encoder=encoder)
    settings = dict(guidance_scale=2.0, steps=15, sampler="dpm++2m", thresholding="static", seed=0, stop_at_stage=0)
    # safety=False: this measures the models (the image check would black out a few fair images)
    scores = {name: score_images(model.sample(PROMPTS, safety=False, **settings).images, PROMPTS)
              for name, model in (("trained", trained), ("untrained", untrained))}
    colour = {name: sum(bool(s.colour) for s in rows) / len(rows) for name, rows in scores.items()}
    faithful = {name: sum(s.faithful for s in rows) / len(rows) for name, rows in scores.items()}
    print(f"colour right: {colour}; faithful: {faithful}")
    assert colour["trained"] >= 0.5 and colour["untrained"] == 0.0
    assert faithful["trained"] >= 0.25 > faithful["untrained"]


def test_the_super_resolution_stage_beats_bilinear_upsampling_on_real_low_res_scenes():
    from mini_imagen.data import SceneConfig, SceneDataset
    from mini_imagen.imagen import resize_images

    model = Imagen.from_pretrained(SHIPPED_SCENE_MODEL, text_encoder=load_text_encoder())
    scenes = SceneDataset(SceneConfig(resolution=64, seed=2718), length=8)
    truth = torch.stack([scenes[i]["image"] for i in range(8)])
    captions = [scenes[i]["caption"] for i in range(8)]
    low = resize_images(truth, 32)
    upsampled = model.sample(captions, lowres_images=low, steps=10, sampler="dpm++2m", guidance_scale=1.0,
                             thresholding="static", noise_aug_level=0.0, seed=0, safety=False).images

    def psnr(images: torch.Tensor) -> float:  # dB, images in [-1, 1] (peak-to-peak 2)
        return (10 * torch.log10(4 / ((images - truth) ** 2).mean(dim=(1, 2, 3)))).mean().item()

    print(f"PSNR against the true 64 px scenes: bilinear {psnr(resize_images(low, 64)):.1f} dB, "
          f"super-resolution stage {psnr(upsampled):.1f} dB")
    assert psnr(upsampled) > psnr(resize_images(low, 64)) + 3.0
    assert sum(s.faithful for s in score_images(upsampled, captions)) >= 7


def test_the_lesson_07_ablation_is_the_same_sr_stage_trained_without_augmentation():
    from safetensors.torch import load_file

    folder = SHIPPED_SCENE_MODEL.parent / "scenes_sr_no_aug"
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == SR_NO_AUG_SHA256, "the shipped ablation changed: update its model card and this hash"
    model = Imagen.from_pretrained(SHIPPED_SCENE_MODEL, text_encoder=load_text_encoder())
    state = load_file(folder / "model.safetensors")
    assert not torch.equal(state["init_conv.weight"].float(), model.unets[1].init_conv.weight)  # other weights
    model.unets[1].load_state_dict({k: v.float() for k, v in state.items()})  # strict: same architecture
    image = model.sample(["a blue square"], steps=2, seed=0, safety=False).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_a_full_cascade_image_on_the_cpu():
    model = Imagen.from_pretrained(SHIPPED_SCENE_MODEL, text_encoder=load_text_encoder())
    image = model.sample(["a green star"], steps=3, seed=0).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
