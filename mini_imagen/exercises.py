"""Self-checks for the lessons' exercises: each says *right* or *not yet*, and why.

A check never raises on a wrong answer (a lesson must still run top to bottom); it prints one
line and returns ``True`` / ``False``. An unfinished exercise (a function that raises
``NotImplementedError`` or returns ``None``) is reported as "not yet attempted".
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def _report(ok: bool, name: str, detail: str = "") -> bool:
    mark = "right" if ok else "not yet"
    print(f"[{mark}] {name}" + (f": {detail}" if detail else ""))
    return ok


def _attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
    try:
        result = fn(*args)
    except NotImplementedError:
        return None, "not attempted yet (the function raises NotImplementedError)"
    except Exception as error:  # a student's bug is feedback, not a crash
        return None, f"your function raised {type(error).__name__}: {error}"
    if result is None:
        return None, "not attempted yet (the function returns None)"
    return result, None


# ----------------------------------------------------------------------------- lesson 00
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
