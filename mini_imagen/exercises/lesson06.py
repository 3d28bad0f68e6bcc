"""Lesson 06 exercises: Imagen's dynamic thresholding, and a saturation measure."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mini_imagen.exercises import _attempt, _report
from mini_imagen.guidance import dynamic_threshold, static_threshold


def check_dynamic_threshold(fn: Callable[[Tensor, float], Tensor]) -> bool:
    """Lesson 06: ``fn(x0, percentile)`` is Imagen's dynamic thresholding (sec. 2.3).

    Per image: s = the ``percentile`` (a fraction, e.g. 0.995) of $|\\hat x_0|$ over all its pixels and
    channels, s = max(s, 1), clip to [-s, s], divide by s. Checked against ``mini_imagen.guidance.dynamic_threshold``
    on a batch whose images need different s, one of them already inside [-1, 1].
    """
    name = "dynamic thresholding"
    generator = torch.Generator().manual_seed(6)
    x0 = torch.randn(4, 3, 8, 8, generator=generator) * torch.tensor([3.0, 1.5, 0.3, 2.0]).view(4, 1, 1, 1)
    percentile = 0.9
    expected = dynamic_threshold(x0, percentile)
    result, problem = _attempt(fn, x0.clone(), percentile)
    if problem:
        return _report(False, name, problem)
    if not isinstance(result, Tensor) or result.shape != x0.shape:
        return _report(False, name, f"return a tensor of the input's shape {tuple(x0.shape)}")
    result = result.float()
    if torch.allclose(result, expected, atol=1e-5):
        return _report(True, name, "one s per image, never below 1, clip to [-s, s] and divide by s")
    if torch.allclose(result, static_threshold(x0), atol=1e-5):
        return _report(False, name, "that is static clipping to [-1, 1]: divide by s after clipping to [-s, s]")
    s_all = torch.quantile(x0.abs().flatten(), percentile).clamp(min=1.0)
    if torch.allclose(result, x0.clamp(-s_all, s_all) / s_all, atol=1e-5):
        return _report(False, name, "s must be computed per image (over dims 1, 2, 3), not over the whole batch")
    if not torch.allclose(result[2], x0[2], atol=1e-5):
        return _report(False, name, "an image already inside [-1, 1] must not change: use s = max(s, 1)")
    if result.abs().max() > 1 + 1e-5:
        return _report(False, name, "the result should lie in [-1, 1]: clip to [-s, s], then divide by s")
    return _report(False, name, "values differ from Imagen's rule; s = torch.quantile(|x0| per image, percentile)")


def check_saturation_fraction(fn: Callable[[Tensor], Tensor]) -> bool:
    """Lesson 06: ``fn(images)`` is the fraction of pixels, per image, with at least one channel at the top.

    ``images`` is (B, 3, H, W) in [-1, 1]; a channel counts as "at the top" when it is >= 0.99. The answer
    is a (B,) float tensor of fractions in [0, 1].
    """
    name = "saturation fraction"
    images = torch.full((2, 3, 4, 4), -1.0)
    images[0, 0, 0, :] = 1.0  # 4 pixels with red at the top
    images[0, :, 1, 0] = 1.0  # 1 white pixel: three channels at the top, still one pixel
    images[0, 1, 2, 0] = 0.98  # just below the level: not saturated
    images[1, 2, :2, :] = 0.995  # 8 pixels of image 1
    expected = torch.tensor([5 / 16, 8 / 16])
    result, problem = _attempt(fn, images.clone())
    if problem:
        return _report(False, name, problem)
    result = torch.as_tensor(result).float().reshape(-1)
    if result.shape != (2,):
        return _report(False, name, f"return one fraction per image, shape (2,); got shape {tuple(result.shape)}")
    if torch.allclose(result, expected, atol=1e-6):
        return _report(True, name, "one number per image: pixels with any channel >= 0.99, over all pixels")
    if torch.allclose(result, torch.tensor([7 / 48, 8 / 48]), atol=1e-6):
        return _report(False, name, "that counts channel values; count pixels (any channel at the top)")
    if torch.allclose(result, torch.tensor([1.0, 1.0]), atol=1e-6):
        return _report(False, name, "count only the top (>= 0.99): the black background sits at -1 by design")
    return _report(False, name, f"expected {expected.tolist()}, got {[round(v, 4) for v in result.tolist()]}")


__all__ = ["check_dynamic_threshold", "check_saturation_fraction"]
