"""Lesson 03 exercises: one deterministic DDIM step, the ideal denoiser's posterior mean, "trailing" timesteps."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from mini_imagen.exercises import _attempt, _report


def check_ddim_step(ddim_step: Callable[[Tensor, Tensor, float, float], Tensor]) -> bool:
    r"""Lesson 03: ``ddim_step(eps, x_t, alpha_bar_t, alpha_bar_prev)`` is DDIM's eta = 0 update (Song et al., 2021, eq. 12)
    $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1 - \bar\alpha_{t'}}\,\hat\epsilon$ with
    $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon) / \sqrt{\bar\alpha_t}$; checked against ``DDIMSampler.step``."""
    from mini_imagen.samplers import DDIMSampler
    from mini_imagen.schedule import NoiseSchedule

    name = "DDIM step"
    generator = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule(1000, "cosine")
    sampler = DDIMSampler(schedule, eta=0.0)  # set_alpha_to_one: the last step lands on alpha_bar = 1
    sampler.set_timesteps(10, "trailing")
    for t in sampler.timesteps.tolist():
        x_t = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
        eps = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
        prev_t = sampler.previous_timestep(t)  # -1 after the last grid timestep: the clean image
        alpha_bar = float(schedule.alphas_cumprod[t])
        alpha_bar_prev = 1.0 if prev_t < 0 else float(schedule.alphas_cumprod[prev_t])
        expected = sampler.step(eps, t, x_t)
        result, problem = _attempt(ddim_step, eps.clone(), x_t.clone(), alpha_bar, alpha_bar_prev)
        if problem:
            return _report(False, name, problem)
        if not isinstance(result, Tensor) or result.shape != x_t.shape:
            return _report(False, name, f"return the next sample, a tensor shaped like x_t {tuple(x_t.shape)}")
        result = result.to(torch.float64)
        if torch.allclose(result, expected.prev_sample, atol=1e-6):
            continue
        where = f"(step from t = {t} to {'the clean image' if prev_t < 0 else f't = {prev_t}'})"
        if torch.allclose(result, expected.pred_original_sample, atol=1e-6):
            return _report(False, name, f"that is x0_hat {where}; now move it to the next noise level")
        x0 = expected.pred_original_sample
        if torch.allclose(result, alpha_bar_prev * x0 + (1 - alpha_bar_prev) * eps, atol=1e-6):
            return _report(False, name, f"forgot the square roots of alpha_bar_prev and 1 - alpha_bar_prev {where}")
        wrong_x0 = (x_t - (1 - alpha_bar) * eps) / alpha_bar
        if torch.allclose(result, alpha_bar_prev**0.5 * wrong_x0 + (1 - alpha_bar_prev) ** 0.5 * eps, atol=1e-6):
            return _report(False, name, f"x0_hat needs square roots too: (x_t - sqrt(1 - a) eps) / sqrt(a) {where}")
        return _report(False, name, f"values differ from DDIMSampler(eta=0).step {where}")
    return _report(True, name, "equals DDIMSampler(eta=0).step at every step of a 10-step trailing grid")


def check_ideal_x0(ideal_x0: Callable[[Tensor, float, Tensor], Tensor]) -> bool:
    r"""Lesson 03: ``ideal_x0(x_t, alpha_bar, data)`` is $\mathbb{E}[x_0 \mid x_t] = \sum_i w_i x^{(i)}$ with
    $w = \mathrm{softmax}_i(-\|x_t - \sqrt{\bar\alpha}\,x^{(i)}\|^2 / 2(1-\bar\alpha))$; checked against
    ``ideal_denoiser.ideal_x0``."""
    from mini_imagen.ideal_denoiser import ideal_x0 as reference
    from mini_imagen.schedule import NoiseSchedule

    name = "ideal denoiser"
    generator = torch.Generator().manual_seed(1)
    schedule = NoiseSchedule(1000, "cosine")
    data = torch.rand(5, 3, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    for t in (950, 700, 300):  # from "nearly the data mean" to "nearly one data point"
        alpha_bar = float(schedule.alphas_cumprod[t])
        x_t = schedule.add_noise(data[[0, 3, 4]], torch.randn(3, 3, 4, 4, generator=generator, dtype=torch.float64), t)
        expected = reference(x_t, t, data, schedule)
        result, problem = _attempt(ideal_x0, x_t.clone(), alpha_bar, data.clone())
        if problem:
            return _report(False, name, problem)
        if not isinstance(result, Tensor) or result.shape != x_t.shape:
            return _report(False, name, f"return one x0_hat per noisy image, shaped like x_t {tuple(x_t.shape)}")
        result = result.to(torch.float64)
        if torch.allclose(result, expected, atol=1e-6):
            continue
        flat, points = x_t.flatten(1), data.flatten(1)
        scaled = torch.cdist(flat, alpha_bar**0.5 * points) ** 2
        if torch.allclose(result, points[scaled.argmin(1)].reshape(x_t.shape), atol=1e-6):
            return _report(False, name, f"that is the nearest data point; the ideal denoiser *averages* them with "
                                        f"weights (they differ at t = {t}, where several points are plausible)")
        unscaled = torch.cdist(flat, points) ** 2
        if torch.allclose(result, _weighted_mean(unscaled, 1 - alpha_bar, data, x_t.shape), atol=1e-6):
            return _report(False, name, "compare x_t with the *shrunken* points sqrt(alpha_bar) * x_i, not with x_i")
        if torch.allclose(result, _weighted_mean(scaled, (1 - alpha_bar) / 2, data, x_t.shape), atol=1e-6):
            return _report(False, name, "the exponent is -|x_t - sqrt(a) x_i|^2 / (2 (1 - a)): you lost the 2")
        if torch.allclose(result, points.mean(0).expand_as(flat).reshape(x_t.shape), atol=1e-6):
            return _report(False, name, "that is the plain data mean; weight each point by how likely it made x_t")
        return _report(False, name, f"values differ from ideal_denoiser.ideal_x0 at t = {t}")
    return _report(True, name, "equals ideal_denoiser.ideal_x0 from high noise to low noise")


def _weighted_mean(sq_dist: Tensor, variance: float, data: Tensor, shape: torch.Size) -> Tensor:
    """softmax(-sq_dist / (2 variance)) @ data: the posterior mean for a given (possibly wrong) distance and variance."""
    return (torch.softmax(-sq_dist / (2 * variance), dim=1) @ data.flatten(1)).reshape(shape)


def check_trailing_timesteps(trailing_timesteps: Callable[[int, int], object]) -> bool:
    """Lesson 03: ``trailing_timesteps(T, n)`` is the "trailing" grid: every T/n-th step counting down from T - 1."""
    from mini_imagen.samplers import spaced_timesteps

    name = "trailing timesteps"
    for T, n in ((1000, 10), (1000, 4), (1000, 7), (1000, 50), (20, 20), (1000, 1)):
        expected = spaced_timesteps(T, n, "trailing").tolist()
        result, problem = _attempt(trailing_timesteps, T, n)
        if problem:
            return _report(False, name, problem)
        try:
            values = [int(v) for v in np.asarray(result).reshape(-1)]
        except (TypeError, ValueError):
            return _report(False, name, f"return a list (or array) of integers; got {type(result).__name__}")
        if values == expected:
            continue
        if values == expected[::-1]:
            return _report(False, name, "right numbers, wrong order: samplers go from the noisiest timestep down")
        if values == spaced_timesteps(T, n, "leading").tolist():
            return _report(False, name, "that is 'leading' (counting up from 0); 'trailing' counts down from T - 1")
        if values == [v + 1 for v in expected]:
            return _report(False, name, f"off by one: the last training timestep is T - 1 = {T - 1}, not T")
        return _report(False, name, f"for T = {T}, n = {n} expected {expected}, got {values}")
    return _report(True, name, "matches spaced_timesteps(T, n, 'trailing') for six grids, including n = 7")


__all__ = ["check_ddim_step", "check_ideal_x0", "check_trailing_timesteps"]
