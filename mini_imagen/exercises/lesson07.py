"""Lesson 07 exercises: the super-resolution stage's noisy low-res condition, and PSNR."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mini_imagen.exercises import _attempt, _report
from mini_imagen.imagen import resize_images
from mini_imagen.schedule import NoiseSchedule


def check_lowres_condition(fn: Callable[[Tensor, int, float, NoiseSchedule, Tensor], Tensor]) -> bool:
    r"""Lesson 07: ``fn(previous, size, noise_aug_level, schedule, noise)`` is what a super-resolution stage sees.

    Upsample the previous stage's images to ``size`` (``resize_images``), then noise them to
    $t_{aug} = \lfloor \text{level} \cdot T \rfloor$ with ``noise``:
    $z = \sqrt{\bar\alpha_{t_{aug}}}\, x_{low} + \sqrt{1 - \bar\alpha_{t_{aug}}}\, \epsilon$, and level 0 means no noise.
    Checked against ``Imagen.sample``'s own code path.
    """
    name = "noise-conditioning augmentation"
    generator = torch.Generator().manual_seed(7)
    previous = torch.rand(3, 3, 8, 8, generator=generator) * 2 - 1
    schedule = NoiseSchedule(1000, beta_schedule="cosine")
    for level in (0.25, 0.0):
        noise = torch.randn(3, 3, 16, 16, generator=generator)
        upsampled = resize_images(previous, 16)
        t = torch.full((3,), int(level * schedule.num_train_timesteps), dtype=torch.long)
        expected = schedule.add_noise(upsampled, noise, t) if level > 0 else upsampled
        result, problem = _attempt(fn, previous.clone(), 16, level, schedule, noise.clone())
        if problem:
            return _report(False, name, problem)
        if not isinstance(result, Tensor) or result.shape != expected.shape:
            return _report(False, name, f"return a (3, 3, 16, 16) tensor; got {getattr(result, 'shape', result)}")
        if torch.allclose(result.float(), expected, atol=1e-5):
            continue
        if level == 0.0:
            return _report(False, name, "at level 0 the condition is the clean upsampled image (no noise at all)")
        if torch.allclose(result.float(), upsampled, atol=1e-5):
            return _report(False, name, "upsampled right; now noise it to t_aug = int(level * T) with schedule.add_noise")
        if torch.allclose(result.float(), resize_images(previous + 0, 16) + noise * level, atol=1e-5):
            return _report(False, name, "the noise is not added with weight `level`: use the schedule's alpha-bar at t_aug")
        return _report(False, name, "values differ; upsample with resize_images(previous, size), then "
                                    "schedule.add_noise(upsampled, noise, t) with t = int(level * T) per image")
    return _report(True, name, "upsample, then q(z | x_low) at t_aug; at level 0 the clean image")


def check_psnr(fn: Callable[[Tensor, Tensor], Tensor]) -> bool:
    r"""Lesson 07: ``fn(images, references)`` is the PSNR in dB of each image, for images in [-1, 1].

    $\mathrm{PSNR} = 10 \log_{10}(R^2 / \mathrm{MSE})$ with the data range $R = 2$ and the MSE per image
    (over channels and pixels): a (B,) tensor. Checked against torchmetrics.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    name = "PSNR"
    generator = torch.Generator().manual_seed(3)
    references = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    images = (references + torch.randn(4, 3, 8, 8, generator=generator) * torch.tensor([0.01, 0.1, 0.3, 1.0]).view(4, 1, 1, 1)).clamp(-1, 1)
    expected = torch.stack([peak_signal_noise_ratio(i, r, data_range=2.0) for i, r in zip(images, references)])
    result, problem = _attempt(fn, images.clone(), references.clone())
    if problem:
        return _report(False, name, problem)
    result = torch.as_tensor(result, dtype=torch.float32)
    if result.shape != expected.shape:
        return _report(False, name, f"return one value per image, shape (4,); got {tuple(result.shape)}")
    if torch.allclose(result, expected, atol=1e-3):
        return _report(True, name, "10 log10(R^2 / MSE) per image with R = 2 for [-1, 1] images")
    if torch.allclose(result, expected - 10 * torch.log10(torch.tensor(4.0)), atol=1e-3):
        return _report(False, name, "the data range of [-1, 1] images is 2, so the peak is R^2 = 4, not 1")
    return _report(False, name, "average the squared error per image (dims 1, 2, 3), then 10 * log10(4 / mse)")
