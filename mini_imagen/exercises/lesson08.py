"""Lesson 08 exercises: the typo-tolerant word match of the prompt check, and the image check's decision rule."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mini_imagen.exercises import _attempt, _report
from mini_imagen.safety import ImageSafetyChecker, _one_typo_apart

_WORDS = ["pistol", "pistl", "pistoll", "pitsol", "pistil", "pistols", "bistol", "pisotl", "rifle", "rilfe",
          "rifles", "trifle", "murder", "murderr", "mudrer", "muder", "murdered", "gun", "gnu", "gum", "guns", "g"]


def check_one_typo_apart(fn: Callable[[str, str], bool]) -> bool:
    """Lesson 08: ``fn(a, b)`` is True when a and b are at most one typo apart (Damerau-Levenshtein <= 1).

    One typo = one letter added, one dropped, one changed, or two *neighbouring* letters swapped.
    Checked on every ordered pair of a list of real words and their misspellings.
    """
    name = "one typo apart"
    wrong: list[tuple[str, str, bool]] = []
    for a, b in itertools.product(_WORDS, repeat=2):
        result, problem = _attempt(fn, a, b)
        if problem:
            return _report(False, name, problem)
        if bool(result) != _one_typo_apart(a, b):
            wrong.append((a, b, _one_typo_apart(a, b)))
    if not wrong:
        return _report(True, name, f"all {len(_WORDS) ** 2} pairs agree with safety._one_typo_apart")
    a, b, expected = wrong[0]
    if len(a) == len(b) and sorted(a) == sorted(b) and expected:
        hint = "a swap of two neighbouring letters counts as one typo"
    elif len(a) != len(b):
        hint = "one longer than the other: dropping one of the longer word's letters must give the shorter"
    else:
        hint = "equal lengths: exactly one letter changed, or two neighbouring letters swapped"
    return _report(False, name, f"{len(wrong)} pair(s) wrong, e.g. ({a!r}, {b!r}) should be {expected}; {hint}")


def check_image_flags(fn: Callable[[Tensor, Tensor, Tensor, float], Tensor]) -> bool:
    r"""Lesson 08: ``fn(cosine, thresholds, special_care, adjustment)`` -> (B,) bool flags, as diffusers decides.

    ``cosine``: (B, K) similarities of B images to K concepts; ``thresholds``: (K,); ``special_care``: (K,) bool.
    An image whose score $\cos - \tau_k$ is positive for a special-care concept gets every threshold lowered by
    ``adjustment``; it is flagged when any $\cos - \tau_k + a > 0$. Checked against ``ImageSafetyChecker``.
    """
    name = "image check decision rule"
    generator = torch.Generator().manual_seed(8)
    concepts = F.normalize(torch.randn(3, 6, generator=generator), dim=-1)
    embeddings = F.normalize(torch.randn(64, 6, generator=generator), dim=-1)
    thresholds = torch.tensor([0.55, 0.40, 0.62])
    special = torch.tensor([True, False, False])
    adjustment = 0.2
    reference = ImageSafetyChecker(lambda x: x, concepts, thresholds, ["a", "b", "c"], special.tolist(), adjustment)
    expected = (reference.scores(embeddings) > 0).any(dim=1)
    cosine = embeddings @ concepts.T
    result, problem = _attempt(fn, cosine.clone(), thresholds.clone(), special.clone(), adjustment)
    if problem:
        return _report(False, name, problem)
    result = torch.as_tensor(result)
    if result.shape != expected.shape:
        return _report(False, name, f"return one flag per image, shape {tuple(expected.shape)}; got {tuple(result.shape)}")
    result = result.bool()
    if torch.equal(result, expected):
        return _report(True, name, f"{int(expected.sum())} of {len(expected)} images flagged, the same ones as diffusers")
    plain = (cosine - thresholds > 0).any(dim=1)
    if torch.equal(result, plain):
        return _report(False, name, "right without special care; now lower every threshold of an image by "
                                    "`adjustment` once a special-care concept matches it")
    everywhere = (cosine - thresholds + adjustment > 0).any(dim=1)
    if torch.equal(result, everywhere):
        return _report(False, name, "the adjustment applies only to images where a special-care concept already matched")
    return _report(False, name, f"{int((result != expected).sum())} image(s) decided differently; "
                                "score = cos - threshold (+ adjustment), flagged if any score > 0")
