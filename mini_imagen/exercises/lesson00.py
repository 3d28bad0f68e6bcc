"""Lesson 00 exercises: mean pooling of token embeddings, reading a scene description."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from mini_imagen.exercises import _attempt, _report


def check_mean_pooling(mean_pool: Callable[[Tensor, Tensor], Tensor]) -> bool:
    """Lesson 00: pooled = average of the token vectors where mask is True (padding ignored)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 5, 4, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.stack([tokens[i, mask[i]].mean(0) for i in range(3)])
    result, problem = _attempt(mean_pool, tokens, mask)
    if problem:
        return _report(False, "mean pooling", problem)
    if not isinstance(result, Tensor) or result.shape != expected.shape:
        return _report(False, "mean pooling", f"expected a tensor of shape {tuple(expected.shape)}")
    if torch.allclose(result, tokens.mean(1), atol=1e-5) and not torch.allclose(result, expected, atol=1e-5):
        return _report(False, "mean pooling", "you averaged the padding too: use the mask")
    return _report(torch.allclose(result, expected, atol=1e-5), "mean pooling",
                   "matches the encoder's pooled vector" if torch.allclose(result, expected, atol=1e-5)
                   else "values differ from the masked mean")


def check_count_objects(count_objects: Callable[[Any, str, str], int]) -> bool:
    """Lesson 00: count the objects of a colour and shape in a ``Scene``."""
    from mini_imagen.data import SceneConfig, sample_scene

    config = SceneConfig(resolution=32, min_objects=1, max_objects=4, seed=7)
    for index in range(40):
        scene = sample_scene(config, index)
        for obj in scene.objects[:1]:
            truth = sum(o.colour == obj.colour and o.shape == obj.shape for o in scene.objects)
            result, problem = _attempt(count_objects, scene, obj.colour, obj.shape)
            if problem:
                return _report(False, "count objects", problem)
            if result != truth:
                return _report(False, "count objects",
                               f"scene {index} ('{scene.caption}') has {truth} {obj.colour} {obj.shape}(s), you said {result}")
        result, problem = _attempt(count_objects, scene, "no-such-colour", "circle")
        if problem or result != 0:
            return _report(False, "count objects", "a colour that is not in the scene should count 0")
    return _report(True, "count objects", "correct on 40 scenes")
