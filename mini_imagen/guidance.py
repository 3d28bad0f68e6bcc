r"""Classifier-free guidance and the thresholding that makes large guidance weights usable.

**Classifier-free guidance** (Ho & Salimans, 2021; Imagen sec. 2.2). One network is trained both
with the text and, a fraction of the time, without it. At sampling time it is run both ways and
the two predictions are extrapolated away from the unconditional one:

    $\tilde\epsilon(z_t, c) = \epsilon(z_t, \emptyset) + w\,\big(\epsilon(z_t, c) - \epsilon(z_t, \emptyset)\big)$

w = 1 is the plain conditional model, w > 1 trades diversity for text alignment. (Imagen writes
the same thing as $w\,\epsilon(z_t, c) + (1 - w)\,\epsilon(z_t, \emptyset)$; Ho & Salimans' own w is
ours minus one.) The formula is linear, so it works on any prediction type (epsilon, x_0, v) and
with every sampler: guide the network's output, then hand it to the sampler.

**Thresholding** (Imagen sec. 2.3). Large w pushes the predicted $\hat x_0$ far outside the
[-1, 1] that real images live in, and the sampler then drifts into saturated, over-bright images.

* *Static* thresholding clips $\hat x_0$ to [-1, 1]: cheap, but saturated pixels stay saturated.
* *Dynamic* thresholding picks s, the p-th percentile of $|\hat x_0|$ over each image; if s > 1 it
  clips to [-s, s] and divides by s. Saturated pixels are pushed *inwards* and the picture keeps
  its contrast. It never touches an $\hat x_0$ that is already inside [-1, 1].

diffusers implements the same formula (``thresholding=True``) but also clamps s to at most
``sample_max_value``, whose default 1.0 pins s = 1: with default settings diffusers' "dynamic
thresholding" *is* static clipping. Our dynamic thresholding equals diffusers' with
``sample_max_value=float("inf")`` (the tests check both facts).
"""

from __future__ import annotations

import torch
from torch import Tensor

THRESHOLDING_MODES = ("none", "static", "dynamic")


def classifier_free_guidance(cond_out: Tensor, uncond_out: Tensor, guidance_scale: float) -> Tensor:
    r"""Guide a prediction: $\hat y_\emptyset + w\,(\hat y_c - \hat y_\emptyset)$ (Imagen sec. 2.2).

    ``cond_out`` and ``uncond_out`` are the network's outputs with and without the text, for the
    same $x_t$ and t; ``guidance_scale`` is w (1 = no guidance).
    """
    if cond_out.shape != uncond_out.shape:
        raise ValueError(
            f"cond_out and uncond_out must have one shape; got {tuple(cond_out.shape)} and {tuple(uncond_out.shape)}"
        )
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 = no guidance, 0 = unconditional); got {guidance_scale}")
    return uncond_out + guidance_scale * (cond_out - uncond_out)


def static_threshold(x0: Tensor) -> Tensor:
    r"""Clip the predicted $\hat x_0$ to [-1, 1] (Imagen sec. 2.3, "static thresholding")."""
    return x0.clamp(-1.0, 1.0)


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    r"""Imagen's dynamic thresholding of a predicted $\hat x_0$ of shape (B, ...) (Imagen sec. 2.3).

    ``percentile`` is a fraction: 0.995 means the 99.5th percentile (the paper's value). For each
    image, s is that percentile of $|\hat x_0|$, then s = max(s, 1), then clip to [-s, s] and divide
    by s. Percentiles interpolate linearly between pixel values, like ``torch.quantile``.
    """
    if not 0.0 <= percentile <= 1.0:
        raise ValueError(f"percentile is a fraction in [0, 1], e.g. 0.995 for the 99.5th percentile; got {percentile}")
    if x0.ndim < 2:
        raise ValueError(f"dynamic_threshold needs a batch of shape (B, ...), one s per item; got {tuple(x0.shape)}")
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # torch.quantile needs float32 or float64
    s = torch.quantile(flat.abs(), percentile, dim=1, keepdim=True)  # s = p-th percentile of $|\hat x_0|$, per image
    s = s.clamp(min=1.0)  # s = max(s, 1): images already inside [-1, 1] are left alone
    flat = torch.clamp(flat, -s, s) / s  # clip to [-s, s], then divide by s
    return flat.reshape(x0.shape).to(dtype)


def apply_thresholding(x0: Tensor, mode: str, percentile: float = 0.995) -> Tensor:
    """Threshold a predicted $\\hat x_0$: ``mode`` is "none", "static" or "dynamic"."""
    check_thresholding_mode(mode)
    if mode == "static":
        return static_threshold(x0)
    if mode == "dynamic":
        return dynamic_threshold(x0, percentile)
    return x0


def check_thresholding_mode(mode: str) -> None:
    """Raise a ``ValueError`` naming the allowed values unless ``mode`` is one of them."""
    if mode not in THRESHOLDING_MODES:
        raise ValueError(f"unknown thresholding {mode!r}; choose one of: {', '.join(THRESHOLDING_MODES)}")
