"""The scene scorer reads drawn scenes back: right on fresh ground truth, wrong captions and noise rejected."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from mini_imagen.data import CaptionClaims, ObjectGroup, Scene, SceneConfig, claims_hold, render_scene, sample_scene
from mini_imagen.data.scenes import SceneObject
from mini_imagen.evaluation.scorer import (
    BLOB,
    category_accuracy,
    find_objects,
    score_image,
    score_images,
    shape_moments,
)
from mini_imagen.recipes import HELD_OUT_PAIRS

# Seeds the scorer was never tuned on: every scene here is new to it.
FRESH = {
    "seen pairs": SceneConfig(held_out_pairs=HELD_OUT_PAIRS, seed=2025),
    "held-out pairs": SceneConfig(held_out_pairs=HELD_OUT_PAIRS, pairs="heldout", seed=2026),
    "held-out wording": SceneConfig(wording="heldout", seed=2027),
}


def fresh_scenes(per_config: int = 100) -> list[Scene]:
    return [sample_scene(config, i) for config in FRESH.values() for i in range(per_config)]


def drawn(objects: list[SceneObject], resolution: int = 32) -> torch.Tensor:
    claims = CaptionClaims.make([ObjectGroup(1, o.colour, o.shape) for o in objects])
    return render_scene(Scene(objects, claims, "", "list"), resolution)


@pytest.mark.parametrize("resolution", [32, 64])
def test_ground_truth_scenes_are_judged_faithful(resolution):
    scenes = fresh_scenes()
    scores = score_images([render_scene(s, resolution) for s in scenes], [s.caption for s in scenes])
    accuracy = category_accuracy(scores)
    print(f"\n{resolution} px, {len(scenes)} fresh scenes:", {k: f"{v:.3f}" for k, v in accuracy.items() if v})
    assert accuracy["faithful"] >= 0.99
    assert all(value >= 0.99 for value in accuracy.values() if value is not None)
    # Not just the verdict: the objects themselves are found, with the right centre.
    exact = 0
    for scene, score in zip(scenes, scores):
        truth = sorted((o.colour, o.shape, o.size) for o in scene.objects)
        found = sorted((o.colour, o.shape, o.size) for o in score.objects)
        centres = all(min(math.dist((t.x, t.y), (o.x, o.y)) for o in score.objects) < 0.01 for t in scene.objects)
        exact += truth == found and centres
    assert exact >= 0.99 * len(scenes)


def test_the_caption_of_another_scene_is_rejected():
    scenes = [sample_scene(FRESH["seen pairs"], i) for i in range(200, 400)]
    images = [render_scene(s, 32) for s in scenes]
    wrong = right = 0
    for image, scene, other in zip(images, scenes, scenes[1:] + scenes[:1]):
        verdict = score_image(image, other.caption).faithful
        if claims_hold(other.claims, scene.objects):  # rare: the other caption happens to be true here
            right += verdict
        else:
            wrong += verdict
    print(f"\nwrong captions judged faithful: {wrong} of {len(scenes)}")
    assert wrong <= 0.01 * len(scenes) and right == sum(
        claims_hold(o.claims, s.objects) for s, o in zip(scenes, scenes[1:] + scenes[:1]))


def test_noise_and_blank_images_are_unfaithful():
    generator = torch.Generator().manual_seed(0)
    captions = [sample_scene(FRESH["seen pairs"], i).caption for i in range(20)]
    for resolution in (32, 64):
        noise = [score_image(torch.randn(3, resolution, resolution, generator=generator).clamp(-1, 1), c)
                 for c in captions]
        assert not any(s.faithful or s.background for s in noise)
    for value in (-1.0, 0.0, 1.0):  # black, grey, white
        blank = score_images(torch.full((len(captions), 3, 32, 32), value), captions)
        assert not any(s.faithful or s.colour or s.objects for s in blank)
        assert all(s.background == (value == -1.0) for s in blank)


def test_every_category_judges_its_own_claim():
    circle, square = SceneObject("circle", "red", "small", 0.25, 0.5), SceneObject("square", "blue", "small", 0.75, 0.5)
    image = drawn([circle, square], resolution=64)

    def verdicts(caption: str) -> dict:
        return {k: v for k, v in score_image(image, caption).categories().items() if v is not None}

    assert verdicts("a red circle to the left of a blue square") == dict(
        colour=True, shape=True, count=True, relation=True, background=True)
    assert verdicts("a blue square to the right of a red circle")["relation"]  # the same claim, said the other way
    assert verdicts("a red circle to the right of a blue square") == dict(
        colour=True, shape=True, count=True, relation=False, background=True)
    assert verdicts("a blue circle left of a red square") == dict(  # colours on the wrong shapes
        colour=False, shape=True, count=False, relation=False, background=True)
    assert verdicts("two red circles and a blue square")["count"] is False
    assert verdicts("a red circle")["count"] is False  # the square is one object too many
    assert verdicts("a large red circle and a small blue square")["size"] is False
    assert verdicts("a small red circle and a small blue square")["size"] is True
    single = drawn([SceneObject("star", "green", "large", 0.2, 0.2)])
    assert score_image(single, "a green star in the top left corner").faithful
    assert score_image(single, "a green star in the bottom right corner").position is False
    assert score_image(single, "a green triangle in the top left corner").shape is False


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_objects_are_found_where_they_are_drawn(resolution):
    objects = [SceneObject("triangle", "purple", "large", 0.3, 0.3), SceneObject("cross", "orange", "small", 0.75, 0.2),
               SceneObject("diamond", "cyan", "small", 0.2, 0.8), SceneObject("star", "white", "large", 0.7, 0.7)]
    found = find_objects(drawn(objects, resolution))
    assert sorted((o.colour, o.shape, o.size) for o in found) == sorted((o.colour, o.shape, o.size) for o in objects)
    for truth in objects:
        match = next(o for o in found if o.shape == truth.shape)
        assert abs(match.x - truth.x) < 0.01 and abs(match.y - truth.y) < 0.01
        assert abs(match.side - truth.extent) < 0.02 and match.match > 0.9


def test_soft_noisy_images_are_still_read():
    """Generated images are blurry and grainy: a little of both must not change the verdict."""
    scenes = [sample_scene(FRESH["held-out pairs"], i) for i in range(300, 400)]
    rng = np.random.default_rng(0)
    images = []
    for scene in scenes:
        pixels = ndimage.gaussian_filter(render_scene(scene, 32).numpy(), (0, 0.5, 0.5))
        images.append(torch.from_numpy(pixels + 0.05 * rng.standard_normal(pixels.shape)).clamp(-1, 1).float())
    accuracy = category_accuracy(score_images(images, [s.caption for s in scenes]))
    assert accuracy["faithful"] >= 0.97


def test_a_shape_that_is_no_shape_is_a_blob():
    image = torch.full((3, 32, 32), -1.0)
    image[:, 8:12, 4:28] = 1.0  # a white bar: 4 px high, 24 px wide
    (bar,) = find_objects(image)
    assert bar.shape == BLOB and bar.colour == "white"
    assert not score_image(image, "a white square").faithful


def test_shape_moments_match_geometry():
    assert shape_moments("square") == pytest.approx((1.0, 0.0, 0.0))
    assert shape_moments("diamond") == pytest.approx((0.5, 0.0, 0.0))
    assert shape_moments("triangle") == pytest.approx((0.5, 0.0, 1 / 6))  # centroid a third up from the base
    assert shape_moments("circle")[0] == pytest.approx(math.pi / 4)
    assert shape_moments("cross")[0] == pytest.approx(1 - (1 - 0.36) ** 2)  # a square minus four corner squares


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        score_image(torch.zeros(1, 3, 32, 32), "a red circle")
    with pytest.raises(ValueError, match="one caption per image"):
        score_images(torch.zeros(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match="no object like"):
        score_image(torch.zeros(3, 32, 32), "a photo of a dog")
