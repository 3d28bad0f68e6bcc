"""Lesson 09 exercises: the Fréchet distance behind FID, a CLIP score, and per-category accuracy of the scene scorer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from mini_imagen.exercises import _attempt, _report


def _as_float(value: Any) -> float | None:
    """A Python float from a float, a 0-d / 1-element tensor or array; None if it is none of these."""
    try:
        array = np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value)
        if array.size != 1:
            return None
        number = complex(array.reshape(()))
    except (TypeError, ValueError):
        return None
    return number.real if abs(number.imag) < 1e-6 * max(1.0, abs(number.real)) else None


def _gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) covariance of (N, D) features, as FID fits them."""
    return features.mean(0), torch.cov(features.T)


def _reference_frechet(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    r"""$\lVert\mu_1-\mu_2\rVert^2 + \mathrm{Tr}(\Sigma_1 + \Sigma_2 - 2(\Sigma_1\Sigma_2)^{1/2})$ with scipy's sqrtm."""
    root = linalg.sqrtm(sigma1.numpy() @ sigma2.numpy()).real
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * np.trace(root))


def check_frechet_distance(fn: Callable[[Tensor, Tensor, Tensor, Tensor], Any]) -> bool:
    r"""Lesson 09: ``fn(mu1, sigma1, mu2, sigma2)`` is the Fréchet distance between two Gaussians (FID's formula).

    $d^2 = \lVert\mu_1-\mu_2\rVert^2 + \mathrm{Tr}\big(\Sigma_1 + \Sigma_2 - 2(\Sigma_1\Sigma_2)^{1/2}\big)$, with
    $(\cdot)^{1/2}$ the *matrix* square root (``scipy.linalg.sqrtm``). Inputs are float64 tensors, (D,) and (D, D);
    the answer is one number. Checked against scipy and torchmetrics on random correlated features, then on
    the domain features of rendered scenes against ``mini_imagen.evaluation.domain_fid``.
    """
    from torchmetrics.image.fid import _compute_fid

    name = "Fréchet distance"
    generator = torch.Generator().manual_seed(9)
    dim = 12
    mixing = [torch.randn(dim, dim, generator=generator, dtype=torch.float64) for _ in range(2)]
    real = torch.randn(400, dim, generator=generator, dtype=torch.float64) @ mixing[0]  # correlated features
    fake = torch.randn(300, dim, generator=generator, dtype=torch.float64) @ mixing[1] + 0.5
    (mu1, sigma1), (mu2, sigma2) = _gaussian_stats(real), _gaussian_stats(fake)
    expected = _reference_frechet(mu1, sigma1, mu2, sigma2)
    assert abs(expected - float(_compute_fid(mu1, sigma1, mu2, sigma2))) < 1e-6 * expected  # scipy == torchmetrics
    result, problem = _attempt(fn, mu1.clone(), sigma1.clone(), mu2.clone(), sigma2.clone())
    if problem:
        return _report(False, name, problem)
    value = _as_float(result)
    if value is None:
        return _report(False, name, f"return one real number (a float or a 0-d tensor), got {type(result).__name__}"
                                    + (f" of shape {tuple(result.shape)}" if hasattr(result, "shape") else ""))
    if abs(value - expected) > 1e-4 * abs(expected):
        diff = float((mu1 - mu2).square().sum())
        wrong = {
            "the mean term is the *squared* distance ||mu1 - mu2||^2, not the distance":
                expected - diff + diff ** 0.5,
            "Tr(sigma1 sigma2) needs its matrix square root: scipy.linalg.sqrtm(sigma1 @ sigma2)":
                expected + 2 * np.trace(linalg.sqrtm(sigma1.numpy() @ sigma2.numpy()).real)
                - 2 * float(torch.trace(sigma1 @ sigma2)),
            "that square root is element by element; use the matrix square root, scipy.linalg.sqrtm":
                expected + 2 * np.trace(linalg.sqrtm(sigma1.numpy() @ sigma2.numpy()).real)
                - 2 * float(torch.trace((sigma1 @ sigma2).abs().sqrt())),
            "sqrt(sigma1) sqrt(sigma2) equals (sigma1 sigma2)^(1/2) only when the two commute: take sqrtm of the product":
                expected + 2 * np.trace(linalg.sqrtm(sigma1.numpy() @ sigma2.numpy()).real)
                - 2 * np.trace(linalg.sqrtm(sigma1.numpy()).real @ linalg.sqrtm(sigma2.numpy()).real),
            "the mean term is missing": expected - diff,
        }
        for hint, mistake in wrong.items():
            if abs(value - mistake) <= 1e-4 * abs(mistake):
                return _report(False, name, hint)
        return _report(False, name, f"expected {expected:.4f} on random features, got {value:.4f}")
    same, problem = _attempt(fn, mu1.clone(), sigma1.clone(), mu1.clone(), sigma1.clone())
    if problem or _as_float(same) is None or abs(_as_float(same)) > 1e-6 * abs(expected):
        return _report(False, name, "a Gaussian's distance to itself must be 0")

    # The same formula on real domain features is domain_fid (torchmetrics fits the Gaussians the same way).
    from mini_imagen.data import SceneConfig, make_scenes
    from mini_imagen.evaluation import domain_fid, load_domain_feature_net

    net = load_domain_feature_net()
    images_a = make_scenes(64, SceneConfig(seed=31))["image"]
    images_b = make_scenes(64, SceneConfig(seed=32))["image"]
    with torch.no_grad():
        stats = [_gaussian_stats(net(images).double()) for images in (images_a, images_b)]
    result, problem = _attempt(fn, *stats[0], *stats[1])
    value = None if problem else _as_float(result)
    reference = domain_fid(images_a, images_b)
    if value is None or abs(value - reference) > 1e-3 * reference:
        return _report(False, name, f"right on random features but not on domain features: domain_fid says "
                                    f"{reference:.3f}, yours {value if value is None else round(value, 3)}")
    return _report(True, name, f"matches scipy and torchmetrics ({expected:.2f}), 0 for identical Gaussians, "
                               f"and domain_fid on rendered scenes ({reference:.2f})")


def check_clip_score(fn: Callable[[Any, Tensor, Sequence[str]], Any]) -> bool:
    r"""Lesson 09: ``fn(clip, images, prompts)`` is the CLIP score $100 \cdot \mathrm{mean}_i \max(\cos(I_i, T_i), 0)$.

    ``clip`` is the shipped ``MiniCLIP``; ``clip.encode_image(images)`` and ``clip.encode_text(prompts)`` give unit
    vectors, row i of one belongs with row i of the other. Checked against ``MiniCLIP.clip_score`` on rendered scenes,
    half with their own caption and half with another one (so some cosines are negative).
    """
    from mini_imagen.data import SceneConfig, make_scenes
    from mini_imagen.evaluation import load_mini_clip
    from mini_imagen.recipes import HELD_OUT_PAIRS

    name = "CLIP score"
    clip = load_mini_clip()
    scenes = make_scenes(16, SceneConfig(held_out_pairs=HELD_OUT_PAIRS, seed=33))
    images, captions = scenes["image"], list(scenes["caption"])
    prompts = captions[:8] + captions[9:] + captions[8:9]  # the last 8 images get their neighbour's caption
    expected = clip.clip_score(images, prompts)
    result, problem = _attempt(fn, clip, images.clone(), list(prompts))
    if problem:
        return _report(False, name, problem)
    value = _as_float(result)
    if value is None:
        return _report(False, name, f"return one number, got {type(result).__name__}")
    if abs(value - expected) <= 1e-3:
        return _report(True, name, f"{value:.2f}: matched pairs score high, mismatched ones near 0")
    with torch.no_grad():
        cosine = (clip.encode_image(images) * clip.encode_text(prompts)).sum(-1)
        matrix = clip.encode_image(images) @ clip.encode_text(prompts).T
    wrong = {
        "clamp each cosine at 0 before averaging: max(cos, 0)": 100 * float(cosine.mean()),
        "multiply by 100 (CLIP score is on a 0-100 scale)": float(cosine.clamp(min=0).mean()),
        "average only the matching pairs (the diagonal), not every image against every prompt":
            100 * float(matrix.clamp(min=0).mean()),
    }
    for hint, mistake in wrong.items():
        if abs(value - mistake) <= 1e-3 * max(1.0, abs(mistake)):
            return _report(False, name, hint)
    return _report(False, name, f"expected {expected:.3f}, got {value:.3f}")


def check_category_accuracy(fn: Callable[[Sequence[Any]], Any]) -> bool:
    """Lesson 09: ``fn(scores)`` turns a list of ``SceneScore`` into ``{category: accuracy}``.

    Keys: each of ``CATEGORIES`` and ``"faithful"``. A category's accuracy is the fraction of the images whose
    caption *claims* it (its value is not None) that pass it; None when no caption claims it. Checked against
    ``mini_imagen.evaluation.category_accuracy`` on rendered scenes scored against their own and wrong captions.
    """
    from mini_imagen.data import SceneConfig, make_scenes
    from mini_imagen.evaluation import CATEGORIES, category_accuracy, score_images
    from mini_imagen.recipes import HELD_OUT_PAIRS

    name = "per-category accuracy"
    scenes = make_scenes(24, SceneConfig(held_out_pairs=HELD_OUT_PAIRS, min_objects=2, seed=34))
    captions = list(scenes["caption"])
    captions = captions[:12] + captions[13:] + captions[12:13]  # half the images get a wrong caption
    captions[0] = "a red circle in the top left corner"  # one position claim, so "position" is not None
    scores = score_images(scenes["image"], captions)
    expected = category_accuracy(scores)
    result, problem = _attempt(fn, list(scores))
    if problem:
        return _report(False, name, problem)
    if not isinstance(result, dict):
        return _report(False, name, f"return a dict {{category: accuracy}}, got {type(result).__name__}")
    keys = (*CATEGORIES, "faithful")
    missing = [key for key in keys if key not in result]
    if missing:
        return _report(False, name, f"missing keys {missing}: give one entry for each of CATEGORIES and 'faithful'")
    for key in keys:
        got, want = result[key], expected[key]
        if want is None:
            if got is not None:
                return _report(False, name, f"no caption claims {key!r}: its accuracy is None, not {got!r}")
            continue
        got = _as_float(got)
        if got is not None and abs(got - want) <= 1e-9:
            continue
        claimed = [getattr(s, key) for s in scores if getattr(s, key) is not None]
        if got is not None and abs(got - sum(claimed) / len(scores)) <= 1e-9:
            return _report(False, name, f"{key!r}: divide by the images whose caption claims it "
                                        f"({len(claimed)}), not by all {len(scores)}")
        if got is not None and abs(got - sum(claimed)) <= 1e-9:
            return _report(False, name, f"{key!r}: return the fraction, not the count")
        return _report(False, name, f"{key!r}: expected {want:.4f}, got {result[key]!r}")
    return _report(True, name, "fractions over the images that claim each category; None where none does")


__all__ = ["check_category_accuracy", "check_clip_score", "check_frechet_distance"]
