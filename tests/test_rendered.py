"""Drawing a data set once (data/rendered.py): the same pixels and captions, cached on disk, used by recipes."""

from __future__ import annotations

import torch

from mini_imagen.data import SceneConfig, SceneDataset
from mini_imagen.data.rendered import RenderedDataset, cache_key, collate_rendered, render_all
from mini_imagen.recipes import cpu_tiny


def test_rendered_items_equal_the_drawn_ones_exactly():
    scenes = SceneDataset(SceneConfig(resolution=32), length=25)
    rendered = render_all(scenes, workers=2, chunk=7)  # 4 chunks over 2 processes, kept in order
    assert len(rendered) == 25 and rendered.images.dtype == torch.uint8
    for index in (0, 6, 7, 24):
        assert torch.equal(rendered[index]["image"], scenes[index]["image"])  # 8-bit drawing: lossless
        assert rendered[index]["caption"] == scenes[index]["caption"]
    batch = collate_rendered([rendered[0], rendered[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and len(batch["caption"]) == 2


def test_cache_is_reused_and_keyed_by_config(tmp_path):
    scenes = SceneDataset(SceneConfig(resolution=32), length=10)
    first = render_all(scenes, workers=1, cache_dir=tmp_path)
    (file,) = tmp_path.glob("*.pt")
    assert file.stem == cache_key(scenes)
    again = render_all(scenes, workers=1, cache_dir=tmp_path)  # memory-mapped from disk, not drawn
    assert torch.equal(again.images, first.images) and again.captions == first.captions
    other = SceneDataset(SceneConfig(resolution=32, seed=1), length=10)
    assert cache_key(other) != cache_key(scenes)


def test_bad_arrays_are_refused():
    import pytest

    with pytest.raises(ValueError, match="uint8 images"):
        RenderedDataset(torch.zeros(2, 3, 8, 8), ["a", "b"])


def test_a_recipe_can_prerender(tmp_path):
    recipe = cpu_tiny()
    recipe.num_scenes, recipe.prerender, recipe.render_cache = 12, True, str(tmp_path)
    dataset, collate = recipe.make_dataset()
    assert isinstance(dataset, RenderedDataset) and collate is collate_rendered and len(dataset) == 12
