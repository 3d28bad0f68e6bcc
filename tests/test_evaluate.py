"""Prompt sets and ``evaluate``: the sets parse and rebuild, an oracle scores 100 %, noise 0 %, the CLI reports."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mini_imagen import cli, recipes
from mini_imagen.data import SceneConfig, parse_caption, render_scene, sample_scene
from mini_imagen.evaluation import evaluate, evaluate_images, format_report
from mini_imagen.imagen import Imagen
from mini_imagen.prompts import (
    CATEGORIES,
    PROMPT_SETS,
    PROMPTS_DIR,
    EvalPrompt,
    build_prompt_set,
    load_prompts,
    prompt_set_to_json,
    uses_held_out_pair,
)

SPLIT_CONFIGS = {"seen": SceneConfig(held_out_pairs=recipes.HELD_OUT_PAIRS, seed=31),
                 "heldout": SceneConfig(held_out_pairs=recipes.HELD_OUT_PAIRS, pairs="heldout", seed=32)}


# ----------------------------------------------------------------------------- prompt sets
@pytest.mark.parametrize("name", sorted(PROMPT_SETS))
def test_prompt_set_files_rebuild_byte_for_byte_and_every_prompt_parses(name):
    description = PROMPT_SETS[name][0]
    prompts = build_prompt_set(name)
    assert (PROMPTS_DIR / f"{name}.json").read_text() == prompt_set_to_json(name, prompts, description), \
        "data/prompts is stale: run `python -m mini_imagen.prompts`"
    assert load_prompts(name) == (prompts, name)
    assert len({p.prompt for p in prompts}) == len(prompts)
    for prompt in prompts:
        claims = parse_caption(prompt.prompt)
        assert prompt.category in CATEGORIES
        assert prompt.split == ("heldout" if uses_held_out_pair(prompt.prompt) else "seen")
        assert sum(g.count for g in claims.groups) <= 4
        # The words say what the category promises (long filler adds no position or relation).
        kind = {"single": len(claims.groups) == 1 and claims.groups[0].count == 1 and not claims.position,
                "binding": len(claims.groups) >= 2 and all(g.count == 1 for g in claims.groups) and not claims.relation,
                "counting": claims.groups[0].count >= 2 or any(g.count >= 2 for g in claims.groups),
                "position": claims.position is not None,
                "relation": claims.relation is not None}
        if prompt.category in kind:
            assert kind[prompt.category], prompt
        if prompt.category == "long":
            assert len(prompt.prompt.split()) > 20


def test_eval64_mixes_seen_and_held_out_and_every_category():
    prompts = build_prompt_set("eval64")
    assert len(prompts) == 64
    assert sum(p.split == "heldout" for p in prompts) == 32
    assert {p.category for p in prompts} == {"single", "binding", "counting", "position", "relation"}


def test_bad_prompt_files_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown prompt set 'nope'"):
        load_prompts("nope")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompts(broken)
    unreadable = tmp_path / "dogs.json"
    unreadable.write_text(json.dumps(["a red circle", {"prompt": "a photo of a dog"}]))
    with pytest.raises(ValueError, match=r"prompt 1 \('a photo of a dog'\) cannot be scored"):
        load_prompts(unreadable)
    with pytest.raises(ValueError, match="unknown prompt set 'nope'"):
        evaluate(SceneOracle([]), "nope", progress=False)
    plain = tmp_path / "mine.json"
    plain.write_text(json.dumps(["a red circle", {"prompt": "a purple triangle", "split": "heldout"}]))
    assert load_prompts(plain) == ([EvalPrompt("a red circle", "custom", "seen"),
                                    EvalPrompt("a purple triangle", "custom", "heldout")], "mine")


# ----------------------------------------------------------------------------- the pipeline, proven
class SceneOracle:
    """A "model" that draws the true scene of every caption it knows: a perfect text-to-image model."""

    def __init__(self, scenes, noise: bool = False):
        self.scenes, self.noise, self.calls = {s.caption: s for s in scenes}, noise, []

    def sample(self, prompts, seed=0, **kwargs):
        self.calls.append((len(prompts), seed, kwargs))
        if self.noise:
            noise = torch.randn(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
            return SimpleNamespace(images=noise.clamp(-1, 1))
        return SimpleNamespace(images=torch.stack([render_scene(self.scenes[p], 32) for p in prompts]))


def oracle_prompts(per_split: int = 6) -> tuple[list, list[EvalPrompt]]:
    scenes, prompts = [], []
    for split, config in SPLIT_CONFIGS.items():
        for i in range(per_split):
            scene = sample_scene(config, i)
            scenes.append(scene)
            prompts.append(EvalPrompt(scene.caption, scene.kind, split))
    return scenes, prompts


def test_an_oracle_scores_full_marks_and_noise_scores_nothing():
    scenes, prompts = oracle_prompts()
    oracle = SceneOracle(scenes)
    report = evaluate(oracle, prompts, samples_per_prompt=2, seed=5, batch_size=5, progress=False, steps=3)
    assert [call[:2] for call in oracle.calls] == [(5, 5), (5, 6), (5, 7), (5, 8), (4, 9)]  # seed + batch index
    assert oracle.calls[0][2] == {"steps": 3, "safety": False}  # measuring, not serving: no image check
    assert report.overall["faithful"] == 1.0 and report.overall["images"] == 24
    assert set(report.by_split) == {"seen", "heldout"} and report.by_split["heldout"]["images"] == 12
    assert all(summary["faithful"] == 1.0 for summary in report.by_category.values())
    assert [row["sample"] for row in report.samples[:4]] == [0, 1, 0, 1]
    assert report.images.shape == (24, 3, 32, 32)

    noise = evaluate(SceneOracle(scenes, noise=True), prompts, samples_per_prompt=2, progress=False)
    assert noise.overall["faithful"] == 0.0 and noise.overall["background"] == 0.0
    # The same images scored directly give the same report.
    again = evaluate_images(report.images, [p for p in prompts for _ in range(2)], samples_per_prompt=2)
    assert again.overall == report.overall


def test_evaluate_a_tiny_untrained_cascade_and_format_the_report():
    imagen = Imagen(recipes.cpu_tiny().model)
    prompts = [p for p in build_prompt_set("eval64") if p.category == "relation"][::7][:2]
    report = evaluate(imagen, prompts, samples_per_prompt=2, steps=2, progress=False, prompt_set="eval64")
    assert report.images.shape == (4, 3, 64, 64) and report.resolution == 64
    assert report.sampling == {"seed": 0, "batch_size": 32, "steps": 2}
    assert {row["relation"] for row in report.samples} <= {True, False}
    saved = json.loads(json.dumps(report.to_dict()))  # plain JSON all the way down
    assert saved["overall"]["images"] == 4 and "images" not in saved  # the tensor stays out of the JSON
    table = format_report(report)
    assert "eval64: 2 prompts x 2 samples at 64 px" in table
    assert "faithful" in table.splitlines()[1] and "relation" in table


# ----------------------------------------------------------------------------- the command line
def test_cli_evaluate_writes_the_report_and_fails_in_one_line(tmp_path, capsys):
    model = Imagen(recipes.cpu_tiny().model).save_pretrained(tmp_path / "model")
    prompts = tmp_path / "two.json"
    prompts.write_text(json.dumps({"prompts": [{"prompt": "a red circle", "category": "single", "split": "seen"},
                                               {"prompt": "a purple triangle", "split": "heldout"}]}))
    out = tmp_path / "report.json"
    code = cli.main(["evaluate", "--model", str(model), "--prompts", str(prompts), "--samples", "1",
                     "--steps", "2", "--base-only", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads(out.read_text())
    assert report["prompt_set"] == "two" and report["resolution"] == 32
    assert set(report["by_split"]) == {"seen", "heldout"} and len(report["samples"]) == 2
    assert "split heldout" in printed.out and f"wrote {out}" in printed.out

    for bad, message in [(tmp_path / "missing.json", "unknown prompt set"), ("eval65", "unknown prompt set 'eval65'")]:
        assert cli.main(["evaluate", "--model", str(model), "--prompts", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mini-imagen: error:") and message in err and err.count("\n") == 1
    assert cli.main(["evaluate", "--model", str(tmp_path / "nope"), "--prompts", "eval64"]) == 2
    assert "not a mini-imagen model folder" in capsys.readouterr().err
