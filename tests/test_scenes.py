"""The captioned scene data set: deterministic, held-out pairs never drawn, captions true, any resolution."""

import json
import re
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mini_imagen.data import (
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    WORDINGS,
    CaptionClaims,
    ObjectGroup,
    Scene,
    SceneConfig,
    SceneDataset,
    claims_hold,
    collate_scenes,
    make_scenes,
    parse_caption,
    render_scene,
    sample_scene,
)
from mini_imagen.data.scenes import MIN_GAP

HELD_OUT = (("purple", "triangle"), ("red", "circle"))


def scenes(config: SceneConfig, count: int = 400) -> list[Scene]:
    return [sample_scene(config, i) for i in range(count)]


# ----------------------------------------------------------------------------- determinism
def test_same_seed_and_index_give_the_same_sample():
    a, b = SceneDataset(SceneConfig(seed=3), 50), SceneDataset(SceneConfig(seed=3), 50)
    for i in (0, 7, 49):
        assert a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert a[i]["scene"] == b[i]["scene"]


def test_other_seeds_give_other_samples():
    captions = [SceneDataset(SceneConfig(seed=seed), 20).captions() for seed in (0, 1)]
    assert captions[0] != captions[1]
    assert len(set(captions[0])) > 10  # and the samples of one data set differ


def test_dataloader_batches_match_items():
    dataset = SceneDataset(SceneConfig(resolution=32), length=12)
    batch = next(iter(DataLoader(dataset, batch_size=6, collate_fn=collate_scenes)))
    assert batch["image"].shape == (6, 3, 32, 32)
    assert batch["caption"] == [dataset[i]["caption"] for i in range(6)]
    assert torch.equal(batch["image"][4], dataset[4]["image"])
    assert isinstance(batch["scene"][0], Scene)
    with pytest.raises(IndexError):
        dataset[12]


# ----------------------------------------------------------------------------- held-out combinations
def test_held_out_pairs_are_never_drawn_in_training():
    for scene in scenes(SceneConfig(held_out_pairs=HELD_OUT), 1000):
        assert not any((o.colour, o.shape) in HELD_OUT for o in scene.objects), scene.caption


def test_heldout_split_always_shows_a_held_out_pair():
    config = SceneConfig(held_out_pairs=HELD_OUT, pairs="heldout")
    for scene in scenes(config, 300):
        assert any((o.colour, o.shape) in HELD_OUT for o in scene.objects), scene.caption


def test_recipe_style_lists_are_accepted_as_held_out_pairs():
    assert SceneConfig(held_out_pairs=[["Purple", "triangle"]]).held_out_pairs == (("purple", "triangle"),)


# ----------------------------------------------------------------------------- captions tell the truth
def _third(value: float) -> int:
    return min(int(value * 3), 2)


def _independent_check(scene: Scene) -> None:
    """Re-derive what the caption claims straight from the coordinates (not via the module's helpers)."""
    claims, objects = scene.claims, scene.objects
    counted = {}
    for o in objects:
        counted[(o.colour, o.shape)] = counted.get((o.colour, o.shape), 0) + 1
    assert counted == {(g.colour, g.shape): g.count for g in claims.groups}
    for group in claims.groups:
        if group.size:
            assert all(o.size == group.size for o in objects if (o.colour, o.shape) == (group.colour, group.shape))
    if claims.position:
        (obj,) = objects
        row, column = divmod(POSITIONS.index(claims.position), 3)
        assert (_third(obj.y), _third(obj.x)) == (row, column)
        for value in (obj.x, obj.y):  # clearly inside the cell, not on a border
            assert min(abs(value - 1 / 3), abs(value - 2 / 3)) >= 0.029
    if claims.relation:
        subject = (claims.groups[0].colour, claims.groups[0].shape)
        for a in (o for o in objects if (o.colour, o.shape) == subject):
            for b in (o for o in objects if (o.colour, o.shape) != subject):
                dx, dy = b.x - a.x, b.y - a.y  # y grows downwards
                along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
                    claims.relation]
                assert along >= 0.2 and abs(across) <= 0.5 * along, scene


@pytest.mark.parametrize("wording", list(WORDINGS))
def test_captions_are_true_and_parse_back(wording):
    for scene in scenes(SceneConfig(wording=wording, held_out_pairs=HELD_OUT, pairs="heldout"), 500):
        _independent_check(scene)
        assert claims_hold(scene.claims, scene.objects)
        assert parse_caption(scene.caption) == scene.claims, scene.caption


def test_wordings_do_not_share_vocabulary():
    def words(wording: str) -> set[str]:
        return {w for s in scenes(SceneConfig(wording=wording), 600) for w in re.findall(r"[a-z]+", s.caption)}

    train, heldout = words("train"), words("heldout")
    assert {"crimson", "azure", "violet", "tiny", "showing"} <= heldout
    assert not {"crimson", "azure", "violet", "tiny", "showing", "center"} & train
    assert not {"red", "blue", "purple", "small", "picture", "centre"} & heldout


def test_vocabulary_is_all_used():
    drawn = scenes(SceneConfig(), 1500)
    objects = [o for s in drawn for o in s.objects]
    assert len(COLOURS) >= 8 and len(SHAPES) >= 5
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.size for o in objects} == set(SIZES)
    assert {s.claims.position for s in drawn} - {None} == set(POSITIONS)
    assert {s.claims.relation for s in drawn} - {None} == set(RELATIONS)
    assert {len(s.objects) for s in drawn} == {1, 2, 3, 4}
    assert {s.kind for s in drawn} == {"single", "pair", "triple", "group", "list"}
    assert len({s.caption.split(" ")[0] for s in drawn}) >= 4  # several templates
    assert all(word in " ".join(s.caption for s in drawn) for word in ("left of", "right of", "above", "below"))


def test_parse_caption_handles_paraphrases():
    left = parse_caption("a red circle to the left of a blue square")
    assert left == CaptionClaims.make([ObjectGroup(1, "red", "circle"), ObjectGroup(1, "blue", "square")], "left of")
    assert parse_caption("there is a blue square right of a red circle") == left
    assert parse_caption("an image showing an azure square on the right side of a crimson circle") == left
    assert parse_caption("Two red circles and a blue square.") == parse_caption("a blue square, two red circles")
    assert parse_caption("a small green triangle at the top").position == "top"
    assert parse_caption("a tiny emerald triangle toward the top left").groups[0].size == "small"
    assert len(parse_caption("a red circle and a small red circle").groups) == 2  # odd, but parsed
    with pytest.raises(ValueError, match="no object"):
        parse_caption("a photo of a cat")


def test_objects_fit_and_never_overlap():
    for scene in scenes(SceneConfig(), 500):
        for i, a in enumerate(scene.objects):
            assert a.extent / 2 <= a.x <= 1 - a.extent / 2 and a.extent / 2 <= a.y <= 1 - a.extent / 2
            for b in scene.objects[i + 1:]:
                gap = max(abs(a.x - b.x), abs(a.y - b.y)) - (a.extent + b.extent) / 2
                assert gap >= MIN_GAP - 1e-9


def test_scene_round_trips_through_json():
    for scene in scenes(SceneConfig(), 30):
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


# ----------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_every_resolution_renders_antialiased_scenes(resolution):
    config = SceneConfig(resolution=resolution)
    sample = SceneDataset(config, 4)[1]
    image, scene = sample["image"], sample["scene"]
    assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert (image == -1).all(0).float().mean() > 0.3  # plain black background
    for obj in scene.objects:  # the centre of every shape is filled with exactly its colour
        row, column = int(obj.y * resolution), int(obj.x * resolution)
        expected = torch.tensor(COLOURS[obj.colour]) / 127.5 - 1
        assert torch.allclose(image[:, row, column], expected, atol=1e-5)
    palette = torch.stack([torch.tensor(c) / 127.5 - 1 for c in [(0, 0, 0), *COLOURS.values()]])
    off_palette = torch.cdist(image.flatten(1).T, palette).min(dim=1).values > 0.05
    assert off_palette.any()  # blended edge pixels: anti-aliasing


def test_resolutions_show_the_same_scene():
    scene = sample_scene(SceneConfig(), 5)
    small, large = render_scene(scene, 32), render_scene(scene, 64)
    assert (F.avg_pool2d(large[None], 2)[0] - small).abs().mean() < 0.03


def test_a_thousand_scenes_render_fast():
    start = time.perf_counter()
    batch = make_scenes(1000, SceneConfig(resolution=32))
    assert batch["image"].shape == (1000, 3, 32, 32)
    assert time.perf_counter() - start < 5.0


# ----------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize("kwargs, message", [
    ({"held_out_pairs": (("mauve", "circle"),)}, "colours:"),
    ({"held_out_pairs": (("red", "hexagon"),)}, "shapes:"),
    ({"pairs": "heldout"}, "needs held_out_pairs"),
    ({"pairs": "test"}, "'train' or 'heldout'"),
    ({"wording": "fancy"}, "wording must be one of"),
    ({"resolution": 8}, "between 16 and 1024"),
    ({"min_objects": 3, "max_objects": 2}, "min_objects <= max_objects"),
    ({"max_objects": 5}, "max_objects <= 4"),
])
def test_bad_config_fails_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SceneConfig(**kwargs)


def test_relation_vocabulary_is_complete():
    for wording in WORDINGS.values():
        assert set(wording.relations) == set(RELATIONS) and set(wording.positions) == set(POSITIONS)
