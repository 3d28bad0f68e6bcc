"""The weights that ship inside the package: intact, loadable offline, and far better than an untrained model."""

import hashlib

import torch

from mini_imagen.evaluation import score_images
from mini_imagen.generate import SHIPPED_SCENE_MODEL, default_model_dir
from mini_imagen.imagen import Imagen
from mini_imagen.text import load_text_encoder

SCENE_MODEL_SHA256 = "f5fa99dbb467d01de427d1845f87a548cc04129c0cda971b8c4fe1e778c9c803"
SR_NO_AUG_SHA256 = "ab578c429b1c87e170f4b9462639d0f773e7184a4f2971bfca58867c2757d816"
EMOJI_MODEL_SHA256 = "6cbdce30ca79131ca98598c96526340dc8d7ea67e8ce597519c57a47cc859a6a"
BASELINE_SHA256 = "ffc819db9e9f7b9b5d13a4b336c0c804d72b44dee811e13eba24f84b97dbe3cb"
WEIGHTS = SHIPPED_SCENE_MODEL.parent
BUDGET_BYTES = 30_000_000  # every shipped model together (issue: shipped weights)
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


def test_every_shipped_model_fits_the_30_mb_budget():
    total = sum(path.stat().st_size for path in WEIGHTS.rglob("*") if path.is_file())
    assert total < BUDGET_BYTES, f"the shipped weights are {total / 1e6:.1f} MB, over the 30 MB budget"


# ----------------------------------------------------------------------------- the emoji model
def test_the_emoji_model_is_the_one_its_card_describes():
    folder = WEIGHTS / "emoji"
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == EMOJI_MODEL_SHA256, "the shipped emoji weights changed: update the model card and this hash"
    assert (folder / "README.md").is_file()
    model = Imagen.from_pretrained(folder, text_encoder=load_text_encoder())
    assert [s.image_size for s in model.config.stages] == [32, 64]
    image = model.sample(["red apple"], steps=3, seed=0, safety=False).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


EMOJI_NAMES = ["red apple", "pizza", "red heart", "dog face", "grinning face", "rocket", "sun", "banana"]


def emoji_ranks(model: Imagen, **settings) -> list[int]:
    """For each of EMOJI_NAMES: how many of the 1,554 training emoji lie closer (pixel distance at 32 px) to the
    generated image than the asked-for emoji does. 0 = the nearest emoji is the right one."""
    from mini_imagen.data.emoji import EmojiDataset

    emoji = EmojiDataset(resolution=32, split="train", caption_mode="name")
    index = {record.name: i for i, record in enumerate(emoji.records)}
    library = emoji.images.float() / 127.5 - 1.0  # (N, 3, 32, 32) in [-1, 1]
    images = model.sample(EMOJI_NAMES, safety=False, seed=0, stop_at_stage=0, **settings).images.float()
    distances = torch.cdist(images.flatten(1), library.flatten(1))  # (8, N)
    return [int((row < row[index[name]]).sum()) for row, name in zip(distances, EMOJI_NAMES)]


def test_the_emoji_model_draws_the_emoji_it_is_asked_for():
    encoder = load_text_encoder()
    trained = Imagen.from_pretrained(WEIGHTS / "emoji", text_encoder=encoder)
    torch.manual_seed(0)
    untrained = Imagen(trained.config, text_encoder=encoder)
    cli = dict(guidance_scale=2.0, steps=15, sampler="dpm++2m", thresholding="static")
    # DDIM with static clipping at guidance 2 once fell apart here (clipped x0 mixed with the raw eps)
    ddim = dict(guidance_scale=2.0, steps=15, sampler="ddim", thresholding="static")
    ranks = {"trained": emoji_ranks(trained, **cli), "trained, DDIM": emoji_ranks(trained, **ddim),
             "untrained": emoji_ranks(untrained, **cli)}
    print(f"rank of the asked-for emoji among 1,554: {ranks}")
    median = {name: sorted(values)[len(values) // 2] for name, values in ranks.items()}
    assert median["trained"] <= 2 and median["trained, DDIM"] <= 2
    assert median["untrained"] > 50


# ----------------------------------------------------------------------------- the diffusers baseline
def test_the_diffusers_baseline_loads_from_the_package_offline_and_generates(monkeypatch):
    from diffusers import UNet2DConditionModel

    from mini_imagen.diffusers_baseline import DiffusersBaseUNet, load_baseline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub: everything comes from the package folder
    folder = WEIGHTS / "diffusers_baseline"
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == BASELINE_SHA256, "update the card and this hash"
    assert (folder / "README.md").is_file()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")  # diffusers' own loader reads it as it is
    assert unet.config.sample_size == 32 and unet.config.cross_attention_dim == 384
    model = load_baseline(folder, text_encoder=load_text_encoder())
    assert isinstance(model.unets[0], DiffusersBaseUNet)
    images = model.sample(["a green star", "a blue square"], steps=10, seed=0, safety=False,
                          guidance_scale=2.0, thresholding="static").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    colour = [bool(s.colour) for s in score_images(images.float(), ["a green star", "a blue square"])]
    assert any(colour)  # trained: an untrained U-Net draws noise, with no colour right


def test_shipped_models_are_picked_by_name(tmp_path, monkeypatch):
    from mini_imagen import cli
    from mini_imagen.generate import SHIPPED_MODELS, load_model

    monkeypatch.chdir(tmp_path)  # no folder called "emoji" here
    assert load_model("emoji").config.to_dict() == Imagen.from_pretrained(SHIPPED_MODELS["emoji"]).config.to_dict()
    code = cli.main(["generate", "red apple", "--model", "emoji", "--num-images", "1", "--steps", "2",
                     "--base-only", "--out", str(tmp_path / "apple.png")])
    assert code == 0 and (tmp_path / "apple.png").is_file()
