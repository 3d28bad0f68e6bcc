"""Training recipes (presets + YAML/JSON overrides), ``train_recipe`` end to end, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mini_imagen import generate, recipes
from mini_imagen.imagen import Imagen
from mini_imagen.recipes import PRESETS, cpu_small, cpu_tiny, load_recipe, train_recipe


def micro_recipe(steps: tuple[int, int] = (4, 2)) -> recipes.TrainRecipe:
    recipe = recipes.cpu_tiny()
    for stage, size in zip(recipe.model.stages, (16, 32)):
        stage.unet.image_size = size
        stage.unet.attention_resolutions = (size // 4,) if not stage.unet.lowres_cond else ()
        stage.unet.cross_attention_resolutions = (size // 4,)
    recipe.data.resolution = 32
    recipe.train.batch_size = 4
    recipe.train.checkpoint_every = 2
    recipe.train.progress_bar = False
    recipe.num_scenes = 32
    recipe.stage_steps = list(steps)
    return recipe


def test_every_preset_builds_and_validates():
    for name, factory in PRESETS.items():
        recipe = factory()
        recipe.model.validate()
        assert len(recipe.model.stages) == 2, name
        assert recipe.steps_for(0) > 0 and recipe.steps_for(1) > 0


def test_config_file_overrides_a_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: cpu-tiny\ntrain: {learning_rate: 3.0e-4, steps: 7}\n"
                    "data: {held_out_pairs: [[purple, triangle]]}\nstage_steps: [7, 3]\n")
    recipe, name = load_recipe(path)
    assert name == "mine"
    assert recipe.train.learning_rate == 3e-4 and recipe.stage_steps == [7, 3]
    assert recipe.data.held_out_pairs == (("purple", "triangle"),)
    json_path = tmp_path / "other.json"
    json_path.write_text(json.dumps({"preset": "cpu-tiny", "num_scenes": 99}))
    assert load_recipe(json_path)[0].num_scenes == 99
    # stages merge one by one: {} keeps a stage, a mapping changes only the fields it names
    path.write_text("preset: cpu-tiny\nmodel: {stages: [{}, {noise_aug_max: 0.0, unet: {base_channels: 8}}]}\n")
    stages = load_recipe(path)[0].model.stages
    assert stages[0] == cpu_tiny().model.stages[0]
    assert stages[1].noise_aug_max == 0.0 and stages[1].unet.base_channels == 8 and stages[1].unet.lowres_cond
    shipped_ablation = load_recipe(Path(recipes.__file__).parent / "weights" / "scenes_sr_no_aug.yaml")[0].model.stages
    assert shipped_ablation[1].noise_aug_max == 0.0 and shipped_ablation[0] == cpu_small().model.stages[0]


@pytest.mark.parametrize("text, message", [
    ("train: {learning_rat: 1}\n", "unknown field"),
    ("preset: gpu-huge\n", "unknown preset"),
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("train: [1, 2\n", "not valid YAML"),
    ("- a list\n", "must hold a mapping"),
    ("preset: cpu-tiny\nmodel: {stages: [{}]}\n", "must be a list of 2 mappings"),
    ("preset: cpu-tiny\nmodel: {stages: [{}, {noise_aug: 0}]}\n", "unknown field.*noise_aug"),
])
def test_bad_config_files_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(path)
    with pytest.raises(ValueError, match="unknown config"):
        load_recipe(tmp_path / "missing.yaml")


def test_train_recipe_trains_every_stage_saves_and_resumes(tmp_path):
    out = train_recipe(micro_recipe(), tmp_path / "run")
    model = Imagen.from_pretrained(out)
    assert [s.image_size for s in model.config.stages] == [16, 32]
    assert (out / "recipe.json").is_file()
    assert sorted(p.name for p in (out / "stage0" / "checkpoints").iterdir())[-1] == "step_0000004.pt"
    before = {k: v.clone() for k, v in model.unets[1].state_dict().items()}
    # Asking for more steps of stage 1 resumes its checkpoint (step 2) and keeps stage 0 as trained.
    train_recipe(micro_recipe(steps=(4, 4)), out, stages=[1])
    after = Imagen.from_pretrained(out)
    assert sorted(p.name for p in (out / "stage1" / "checkpoints").iterdir())[-1] == "step_0000004.pt"
    assert all(torch.equal(a, b) for a, b in zip(model.unets[0].state_dict().values(),
                                                  after.unets[0].state_dict().values()))
    assert any(not torch.equal(before[k], v) for k, v in after.unets[1].state_dict().items())


def test_an_emoji_recipe_trains_on_emoji_captions(tmp_path):
    recipe = micro_recipe(steps=(2, 1))
    recipe.dataset = "emoji"
    dataset, collate = recipe.make_dataset()
    batch = collate([dataset[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 32, 32) and all(isinstance(c, str) for c in batch["caption"])
    assert len(dataset) >= recipe.num_scenes  # every train emoji at least once
    out = train_recipe(recipe, tmp_path / "emoji")
    assert json.loads((out / "recipe.json").read_text())["dataset"] == "emoji"
    with pytest.raises(ValueError, match="unknown dataset"):
        recipes.TrainRecipe(dataset="faces")


def test_generate_grid_writes_one_row_per_prompt(tmp_path):
    out = train_recipe(micro_recipe(steps=(1, 1)), tmp_path / "m")
    png = generate.generate_grid(["a red circle", "two blue squares"], model=out, out=tmp_path / "g.png",
                                 num_images=3, steps=2)
    width, height = Image.open(png).size
    assert (width, height) == (3 * 34 + 2, 2 * 34 + 2)  # 32 px tiles, 2 px padding
    with pytest.raises(ValueError, match="prompt is empty"):
        generate.generate_grid(["  \t\x00 "], model=out, out=tmp_path / "x.png")


def test_demo_fallback_trains_once_and_is_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINI_IMAGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(generate, "SHIPPED_SCENE_MODEL", tmp_path / "no-shipped-weights")
    monkeypatch.setitem(PRESETS, "cpu-tiny", lambda: micro_recipe(steps=(1, 1)))
    first = generate.default_model_dir()
    assert "being trained" in capsys.readouterr().out
    assert generate.default_model_dir() == first and "being trained" not in capsys.readouterr().out


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "mini_imagen.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_cli_generate_and_its_errors(tmp_path):
    model = train_recipe(micro_recipe(steps=(1, 1)), tmp_path / "m")
    ok = _cli("generate", "a red circle", "--model", str(model), "--out", str(tmp_path / "cli.png"),
              "--num-images", "2", "--steps", "2", "--sampler", "dpm++2m")
    assert ok.returncode == 0, ok.stderr
    assert Path(tmp_path / "cli.png").is_file() and "wrote" in ok.stdout
    missing = _cli("generate", "a red circle", "--model", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "not a mini-imagen model folder" in missing.stderr and "Traceback" not in missing.stderr
    empty = _cli("generate", "   ", "--model", str(model))
    assert empty.returncode == 2 and "prompt is empty" in empty.stderr
    no_gpu = _cli("generate", "a red circle", "--model", str(model), "--device", "cuda")
    if not torch.cuda.is_available():
        assert no_gpu.returncode == 2 and "no CUDA GPU" in no_gpu.stderr


def test_generate_refuses_a_restricted_prompt_before_any_compute_and_can_be_told_not_to(tmp_path, capsys):
    from mini_imagen import cli

    model = train_recipe(micro_recipe(steps=(1, 1)), tmp_path / "m")
    code = cli.main(["generate", "a blue square next to a g.u.n", "--model", str(model), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "restricted concept 'weapons'" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()  # nothing was generated
    with pytest.warns(UserWarning, match="safety check is off"):
        code = cli.main(["generate", "a red circle", "--model", str(model), "--out", str(tmp_path / "y.png"),
                         "--num-images", "1", "--steps", "1", "--no-safety"])
    assert code == 0 and "safety check is off" in capsys.readouterr().out


def test_cli_presets_lists_every_preset():
    out = _cli("presets")
    assert out.returncode == 0
    for name in PRESETS:
        assert name in out.stdout


def test_cli_train_steps_override_every_stage_and_max_minutes_stops_early(tmp_path, monkeypatch):
    from mini_imagen import cli

    config = tmp_path / "micro.json"  # the micro recipe as a file: cpu-tiny with stage_steps [4, 2] and small sizes
    recipe = micro_recipe()
    config.write_text(json.dumps({"preset": "cpu-tiny", "model": recipe.model.to_dict(), "num_scenes": 32,
                                  "data": {"resolution": 32}, "stage_steps": [4, 2],
                                  "train": {"batch_size": 4, "checkpoint_every": 2, "progress_bar": False}}))
    # --steps replaces the per-stage steps (it once lost to stage_steps and was ignored)
    assert cli.main(["train", "--config", str(config), "--stage", "1", "--steps", "3",
                     "--output", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a" / "stage1" / "checkpoints").iterdir())[-1] == "step_0000003.pt"
    # --max-minutes: a 1000-step run stops on the clock with a checkpoint, and a rerun resumes from it
    assert cli.main(["train", "--config", str(config), "--stage", "0", "--steps", "1000", "--max-minutes", "0.002",
                     "--output", str(tmp_path / "b")]) == 0
    (last,) = sorted(p.name for p in (tmp_path / "b" / "stage0" / "checkpoints").iterdir())[-1:]
    assert last < "step_0001000.pt"


def test_the_gpu_preset_prerenders_and_is_time_limited():
    recipe = PRESETS["gpu-quick"]()
    assert recipe.prerender and recipe.render_cache and recipe.train.max_minutes > 0
    assert recipe.train.mixed_precision == "auto" and recipe.train.batch_size == 256
    assert recipe.model.stages[1].unet.base_channels == 24  # the shipped SR stages' width


def test_init_from_fine_tunes_a_trained_model_and_refuses_a_different_unet(tmp_path):
    trained = train_recipe(micro_recipe(steps=(4, 2)), tmp_path / "trained")
    start = Imagen.from_pretrained(trained)
    # Zero steps from init_from: the saved stage is exactly the model it started from (a random init is not).
    recipe = micro_recipe(steps=(0, 0))
    recipe.init_from = str(trained)
    tuned = Imagen.from_pretrained(train_recipe(recipe, tmp_path / "tuned", stages=[0]))
    assert all(torch.equal(a, b) for a, b in zip(start.unets[0].state_dict().values(),
                                                  tuned.unets[0].state_dict().values()))
    scratch = Imagen.from_pretrained(train_recipe(micro_recipe(steps=(0, 0)), tmp_path / "scratch", stages=[0]))
    assert not all(torch.equal(a, b) for a, b in zip(start.unets[0].state_dict().values(),
                                                      scratch.unets[0].state_dict().values()))
    # Training on from there moves the weights; the recipe file and the command line both say init_from.
    recipe.stage_steps = [2, 0]
    moved = Imagen.from_pretrained(train_recipe(recipe, tmp_path / "moved", stages=[0]))
    assert any(not torch.equal(a, b) for a, b in zip(start.unets[0].state_dict().values(),
                                                      moved.unets[0].state_dict().values()))
    assert json.loads((tmp_path / "moved" / "recipe.json").read_text())["init_from"] == str(trained)
    # A different U-Net (here: wider) cannot start from these weights: one clear error, nothing trained.
    wider = micro_recipe(steps=(2, 0))
    wider.model.stages[0].unet.base_channels *= 2
    wider.init_from = str(trained)
    with pytest.raises(ValueError, match="stage 0 is not the recipe's U-Net.*channels"):
        train_recipe(wider, tmp_path / "wider", stages=[0])
    assert not (tmp_path / "wider").exists()
    wider.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="init_from .*nowhere.* is neither a shipped model"):
        train_recipe(wider, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    from mini_imagen import cli

    config = tmp_path / "micro.json"
    config.write_text(json.dumps({"preset": "cpu-tiny", "model": micro_recipe().model.to_dict(), "num_scenes": 32,
                                  "data": {"resolution": 32}, "train": {"batch_size": 4, "progress_bar": False}}))
    assert cli.main(["train", "--config", str(config), "--stage", "0", "--steps", "1", "--init-from", str(trained),
                     "--output", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "recipe.json").read_text())["init_from"] == str(trained)
    assert cli.main(["train", "--config", str(config), "--stage", "0", "--steps", "1", "--init-from",
                     str(tmp_path / "nowhere"), "--output", str(tmp_path / "bad")]) == 2
