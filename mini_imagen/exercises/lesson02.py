"""Lesson 02 exercises: the sinusoidal timestep embedding, the simple DDPM loss, the EMA update."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mini_imagen.exercises import _attempt, _report


def check_timestep_embedding(embed: Callable[[Tensor, int], Tensor]) -> bool:
    """Lesson 02: ``embed(t, dim)`` equals ``unet.timestep_embedding(t, dim)`` ([sin | cos], period 10,000)."""
    from mini_imagen.unet import timestep_embedding

    name = "timestep embedding"
    t = torch.tensor([0, 1, 7, 250, 999])
    dim = 16
    expected = timestep_embedding(t, dim)
    result, problem = _attempt(embed, t.clone(), dim)
    if problem:
        return _report(False, name, problem)
    if not isinstance(result, Tensor) or result.shape != expected.shape:
        shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
        return _report(False, name, f"expected a tensor of shape {tuple(expected.shape)} for {len(t)} timesteps "
                                    f"and dim={dim}, got {shape}")
    result = result.float()
    if torch.allclose(result, expected, atol=1e-4):
        return _report(True, name, "matches timestep_embedding")
    half = dim // 2
    if torch.allclose(result, torch.cat([expected[:, half:], expected[:, :half]], dim=1), atol=1e-4):
        return _report(False, name, "sin and cos are swapped: put the sines in the first half, the cosines after")
    interleaved = torch.stack([expected[:, :half], expected[:, half:]], dim=-1).flatten(1)
    if torch.allclose(result, interleaved, atol=1e-4):
        return _report(False, name, "you interleaved sin and cos; the package concatenates [all sines, all cosines]")
    if not torch.allclose(result[0], expected[0], atol=1e-4):
        return _report(False, name, "wrong at t = 0, where every sine is 0 and every cosine is 1")
    if torch.allclose(result[:, :half], expected[:, :half], atol=1e-4):
        return _report(False, name, "the sines are right but the cosines are not")
    return _report(False, name, "values differ: use frequencies exp(-ln(10000) * i / (dim/2)) for i = 0 .. dim/2 - 1")


def check_simple_loss(simple_loss: Callable[..., Tensor]) -> bool:
    """Lesson 02: ``simple_loss(predict_noise, x0, noise, t, schedule)`` equals ``diffusion_loss`` on the
    network's output at $x_t = \\sqrt{\\bar\\alpha_t} x_0 + \\sqrt{1 - \\bar\\alpha_t} \\epsilon$ (DDPM eq. 14)."""
    from mini_imagen.schedule import NoiseSchedule, diffusion_loss

    name = "simple loss"
    generator = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule(1000, "cosine")
    x0 = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([5, 200, 600, 990])
    weight = torch.randn(3, 3, generator=generator) * 0.5

    def predict_noise(x_t: Tensor, t: Tensor) -> Tensor:
        """A stand-in for the U-Net: any fixed function of x_t and t will do for checking the loss."""
        mixed = torch.einsum("oc,bchw->bohw", weight.to(x_t.dtype), x_t)
        return mixed * (1 + t.to(x_t.dtype) / 1000).view(-1, 1, 1, 1)

    expected = diffusion_loss(predict_noise(schedule.add_noise(x0, noise, t), t), x0, noise, t, schedule)
    result, problem = _attempt(simple_loss, predict_noise, x0.clone(), noise.clone(), t.clone(), schedule)
    if problem:
        return _report(False, name, problem)
    if not isinstance(result, Tensor) or result.numel() != 1:
        return _report(False, name, "return one number: a scalar tensor (average the squared error with .mean())")
    value = float(result)
    if math.isclose(value, float(expected), rel_tol=1e-4, abs_tol=1e-6):
        return _report(True, name, f"{value:.5f} equals diffusion_loss")
    alpha_bar = schedule.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    wrong_inputs = {
        "you forgot the square roots: x_t = sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise":
            alpha_bar * x0 + (1 - alpha_bar) * noise,
        "the network must see the noisy image x_t, not the clean x0": x0,
        "the network must see the noisy image x_t = sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise, "
        "not the pure noise": noise,
    }
    for hint, x_t in wrong_inputs.items():
        if math.isclose(value, float((predict_noise(x_t, t) - noise).pow(2).mean()), rel_tol=1e-4):
            return _report(False, name, hint)
    x_t = schedule.add_noise(x0, noise, t)
    if math.isclose(value, float((predict_noise(x_t, t) - x0).pow(2).mean()), rel_tol=1e-4):
        return _report(False, name, "the target of an epsilon-prediction network is the noise, not x0")
    if math.isclose(value, float((predict_noise(x_t, t) - noise).pow(2).sum()), rel_tol=1e-4):
        return _report(False, name, "you summed the squared errors: take their mean")
    return _report(False, name, f"got {value:.5f}, expected {float(expected):.5f}")


def check_ema_update(ema_update: Callable[[nn.Module, nn.Module, float], None]) -> bool:
    """Lesson 02: ``ema_update(ema_model, model, decay)`` moves every EMA parameter in place, as ``update_ema``."""
    from mini_imagen.train import update_ema

    name = "EMA update"
    with torch.random.fork_rng():  # leave the caller's random numbers alone
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
        ema_model = copy.deepcopy(model)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))  # the live weights moved on; the EMA has not yet
    decay = 0.9
    expected = copy.deepcopy(ema_model)
    update_ema(expected, model, decay)
    before = copy.deepcopy(ema_model)
    live = copy.deepcopy(model)
    _, problem = _attempt(lambda *args: ema_update(*args) or "done", ema_model, model, decay)
    if problem:
        return _report(False, name, problem)
    if any(not torch.equal(a, b) for a, b in zip(model.parameters(), live.parameters())):
        return _report(False, name, "you changed the live model: only the EMA copy should move")
    got = list(ema_model.parameters())
    if all(torch.equal(a, b) for a, b in zip(got, before.parameters())):
        return _report(False, name, "the EMA parameters did not change: update them in place (e.g. p.copy_(...))")
    if all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected.parameters())):
        return _report(True, name, f"theta_ema <- {decay} * theta_ema + {1 - decay:.1f} * theta, as update_ema")
    swapped = copy.deepcopy(before)
    update_ema(swapped, model, 1 - decay)
    if all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, swapped.parameters())):
        return _report(False, name,
                       "decay weighs the *old* average: theta_ema <- decay * theta_ema + (1 - decay) * theta")
    return _report(False, name, "values differ from decay * theta_ema + (1 - decay) * theta")

