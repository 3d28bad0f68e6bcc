"""Lesson 01 exercises: alphas_cumprod from betas, the one-jump forward process, where SNR crosses 1."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mini_imagen.exercises import _attempt, _report


def _schedules() -> list:
    from mini_imagen.schedule import NoiseSchedule

    return [NoiseSchedule(1000, "linear"), NoiseSchedule(1000, "cosine"),
            NoiseSchedule(1000, "scaled_linear", beta_start=0.00085, beta_end=0.012)]


def check_alphas_cumprod(alphas_cumprod: Callable[[Tensor], Tensor]) -> bool:
    r"""Lesson 01: ``alphas_cumprod(betas)`` is $\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)$ (DDPM eq. 4)."""
    name = "alphas_cumprod"
    for schedule in _schedules():
        betas = schedule.betas.clone()
        expected = schedule.alphas_cumprod
        result, problem = _attempt(alphas_cumprod, betas)
        if problem:
            return _report(False, name, problem)
        if not isinstance(result, Tensor) or result.shape != expected.shape:
            shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
            return _report(False, name, f"expected a tensor of shape {tuple(expected.shape)}, one value per step; got {shape}")
        result = result.to(torch.float64)
        if torch.allclose(result, expected, rtol=1e-5, atol=1e-12):
            continue
        alphas = 1 - schedule.betas
        if torch.allclose(result, torch.cumprod(schedule.betas, 0), rtol=1e-5, atol=1e-12):
            return _report(False, name, "you multiplied the betas; multiply the alphas = 1 - betas")
        if torch.allclose(result, torch.cumsum(alphas, 0), rtol=1e-5):
            return _report(False, name, "that is a cumulative *sum*; alpha-bar is a cumulative *product* (torch.cumprod)")
        if torch.allclose(result, alphas, rtol=1e-5):
            return _report(False, name, "that is alpha_t itself; alpha-bar multiplies all alphas up to and including t")
        if torch.allclose(result[1:], expected[:-1], rtol=1e-5):
            return _report(False, name, "shifted by one step: alpha-bar at t = 0 is 1 - beta_0, not 1")
        return _report(False, name, f"values differ for the {schedule.beta_schedule} schedule")
    return _report(True, name, "matches NoiseSchedule.alphas_cumprod for the linear, cosine and scaled_linear schedules")


def check_add_noise(add_noise: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]) -> bool:
    r"""Lesson 01: ``add_noise(x0, noise, t, alphas_cumprod)`` is $\sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$,
    with one timestep per image of the batch."""
    from mini_imagen.schedule import NoiseSchedule

    name = "add_noise"
    generator = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule(1000, "cosine")
    x0 = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([0, 250, 600, 999])
    expected = schedule.add_noise(x0, noise, t)
    table = schedule.alphas_cumprod.float()
    result, problem = _attempt(add_noise, x0.clone(), noise.clone(), t.clone(), table.clone())
    if problem:
        hint = " (index alphas_cumprod with t, then reshape to (B, 1, 1, 1) so it broadcasts over the image)"
        return _report(False, name, problem + (hint if "size" in problem or "shape" in problem else ""))
    if not isinstance(result, Tensor) or result.shape != expected.shape:
        shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
        return _report(False, name, f"expected a tensor shaped like x0 {tuple(x0.shape)}; got {shape} "
                                    "(reshape alpha-bar to (B, 1, 1, 1) so it broadcasts per image)")
    if torch.allclose(result, expected, atol=1e-5):
        return _report(True, name, "matches NoiseSchedule.add_noise, one timestep per image")
    alpha_bar = table[t].view(-1, 1, 1, 1)
    if torch.allclose(result, alpha_bar * x0 + (1 - alpha_bar) * noise, atol=1e-5):
        return _report(False, name, "forgot the square roots: the *scales* are sqrt(alpha_bar) and sqrt(1 - alpha_bar)")
    if torch.allclose(result, alpha_bar.sqrt() * noise + (1 - alpha_bar).sqrt() * x0, atol=1e-5):
        return _report(False, name, "x0 and the noise are swapped: the image gets sqrt(alpha_bar)")
    if torch.allclose(result, alpha_bar.sqrt() * x0 + (1 - alpha_bar) * noise, atol=1e-5):
        return _report(False, name, "the noise scale is sqrt(1 - alpha_bar), not 1 - alpha_bar")
    if torch.allclose(result[0], expected[0], atol=1e-5):
        return _report(False, name, "right for the first image only: give each image its own timestep, "
                                    "alphas_cumprod[t].view(-1, 1, 1, 1)")
    return _report(False, name, "values differ from sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise")


def check_snr_crossing(snr_crosses_one: Callable[[Tensor], int]) -> bool:
    r"""Lesson 01: ``snr_crosses_one(alphas_cumprod)`` is the first t with $\mathrm{SNR}(t) = \bar\alpha_t/(1-\bar\alpha_t) < 1$."""
    name = "SNR crosses 1"
    for schedule in _schedules():
        snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
        expected = int((snr < 1).nonzero()[0])
        result, problem = _attempt(snr_crosses_one, schedule.alphas_cumprod.clone())
        if problem:
            return _report(False, name, problem)
        try:
            value = int(result)
        except (TypeError, ValueError, RuntimeError):
            return _report(False, name, f"return one integer timestep; got {type(result).__name__}")
        if value == expected:
            continue
        if value == expected - 1:
            return _report(False, name, f"off by one ({schedule.beta_schedule}): t = {value} is the last step with "
                                        "SNR >= 1; the answer is the first step with SNR < 1")
        if value == int((schedule.alphas_cumprod < 1).nonzero()[0]) or value == 0:
            return _report(False, name, "SNR(t) is alpha_bar / (1 - alpha_bar); it falls below 1 where alpha_bar < 1/2")
        return _report(False, name, f"for the {schedule.beta_schedule} schedule you said t = {value}")
    return _report(True, name, "right for the linear, cosine and scaled_linear schedules")


__all__ = ["check_add_noise", "check_alphas_cumprod", "check_snr_crossing"]
