"""Noise schedules, prediction targets and the loss: equal to diffusers 0.42, and consistent with each other.

diffusers builds its tables with a hard-coded ``dtype=torch.float32``. To compare *algorithms* rather
than float32 rounding, ``diffusers_in_float64`` runs its code with float32 promoted to float64; then the
two agree to 1e-8 (in fact to ~1e-16). A separate test shows that diffusers' default float32 tables
differ from ours by float32 rounding only.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from mini_imagen.schedule import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    NoiseSchedule,
    cosine_alpha_bar,
    diffusion_loss,
    min_snr_weights,
)

F64 = dict(dtype=torch.float64)
# (beta_schedule, beta_start, beta_end): DDPM's defaults, Stable Diffusion's, and the cosine schedule.
SCHEDULES = [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("cosine", 1e-4, 0.02)]


@contextmanager
def diffusers_in_float64():
    """Run diffusers' scheduler code with its hard-coded float32 (torch and NumPy) promoted to float64."""
    with mock.patch.object(torch, "float32", torch.float64), mock.patch.object(np, "float32", np.float64):
        yield


def make_schedule(name: str, start: float, end: float, T: int = 1000) -> NoiseSchedule:
    return NoiseSchedule(T, beta_schedule=name, beta_start=start, beta_end=end)


# ----------------------------------------------------------------------------- equal to diffusers
@pytest.mark.parametrize("T", [1000, 50])
@pytest.mark.parametrize("name,start,end", SCHEDULES)
def test_betas_and_alphas_cumprod_equal_diffusers(name, start, end, T):
    ours = make_schedule(name, start, end, T)
    with diffusers_in_float64():
        ref = DDPMScheduler(**ours.diffusers_config())
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=1e-8)
    torch.testing.assert_close(ours.alphas, ref.alphas, rtol=0, atol=1e-8)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name,start,end", SCHEDULES)
def test_diffusers_default_float32_tables_differ_by_rounding_only(name, start, end):
    ours = make_schedule(name, start, end)
    ref = DDPMScheduler(**ours.diffusers_config())  # float32, as diffusers ships it
    assert ref.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("name,start,end", SCHEDULES)
def test_add_noise_and_velocity_equal_diffusers(name, start, end):
    ours = make_schedule(name, start, end)
    with diffusers_in_float64():
        ref = DDPMScheduler(**ours.diffusers_config())
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4, generator=g, **F64) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=g, **F64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=1e-8)
    torch.testing.assert_close(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=0, atol=1e-8)


def test_squaredcos_cap_v2_is_diffusers_name_for_cosine():
    cosine, alias = NoiseSchedule(beta_schedule="cosine"), NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    assert alias.beta_schedule == "cosine"
    assert torch.equal(cosine.betas, alias.betas)
    assert cosine.diffusers_config()["beta_schedule"] == "squaredcos_cap_v2"


# ----------------------------------------------------------------------------- the forward process
@pytest.mark.parametrize("name,start,end", SCHEDULES)
def test_alphas_cumprod_falls_from_one_towards_zero(name, start, end):
    schedule = make_schedule(name, start, end)
    alpha_bar = schedule.alphas_cumprod
    assert 0.99 < alpha_bar[0] < 1 and alpha_bar[-1] < 0.01
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1])
    log_snr = schedule.log_snr(torch.arange(1000))
    assert torch.all(log_snr[1:] < log_snr[:-1])
    torch.testing.assert_close(log_snr, schedule.snr(torch.arange(1000)).log(), rtol=0, atol=1e-10)


def test_cosine_alphas_cumprod_is_the_continuous_curve_sampled():
    # The product of beta_t = 1 - abar((t+1)/T) / abar(t/T) telescopes to abar((t+1)/T) / abar(0),
    # wherever the 0.999 cap on beta_t did not bite (it only does in the last steps).
    schedule = NoiseSchedule(1000, beta_schedule="cosine")
    t = torch.arange(1000)
    uncapped = torch.cumprod(schedule.betas < 0.999, dim=0).bool()
    assert uncapped[:990].all()
    u = (t + 1).double() / 1000
    expected = cosine_alpha_bar(u) / cosine_alpha_bar(torch.zeros(1, **F64))
    torch.testing.assert_close(schedule.alphas_cumprod[uncapped], expected[uncapped], rtol=1e-12, atol=1e-14)


def test_add_noise_has_the_forward_process_statistics():
    # $x_t \sim \mathcal{N}(\sqrt{\bar\alpha_t} x_0, (1-\bar\alpha_t) I)$ (DDPM eq. 4), checked on 20 000 draws.
    schedule = NoiseSchedule(beta_schedule="cosine")
    x0 = torch.full((20_000, 1), 0.7, **F64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), **F64)
    x_t = schedule.add_noise(x0, noise, 600)
    alpha_bar = schedule.alphas_cumprod[600]
    assert abs(x_t.mean() - alpha_bar.sqrt() * 0.7) < 0.02
    assert abs(x_t.var() - (1 - alpha_bar)) < 0.03


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_every_target_converts_back_to_x0_eps_and_v(prediction_type):
    schedule = NoiseSchedule(beta_schedule="cosine")
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 3, 4, 4, generator=g, **F64) * 2 - 1
    noise = torch.randn(5, 3, 4, 4, generator=g, **F64)
    t = torch.tensor([0, 10, 500, 900, 999])
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.training_target(x0, noise, t, prediction_type)
    torch.testing.assert_close(schedule.predict_x0(target, x_t, t, prediction_type), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(schedule.predict_eps(target, x_t, t, prediction_type), noise, rtol=0, atol=1e-9)
    torch.testing.assert_close(
        schedule.predict_v(target, x_t, t, prediction_type), schedule.velocity(x0, noise, t), rtol=0, atol=1e-9
    )


def test_one_timestep_broadcasts_over_the_batch_and_dtype_follows_the_input():
    schedule = NoiseSchedule()
    x0, noise = torch.ones(3, 2, 4, 4), torch.zeros(3, 2, 4, 4)
    shared = schedule.add_noise(x0, noise, 100)
    per_sample = schedule.add_noise(x0, noise, torch.full((3,), 100))
    assert shared.dtype == torch.float32 and torch.equal(shared, per_sample)
    assert schedule.add_noise(x0.half(), noise.half(), 5).dtype == torch.float16


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_loss_is_mse_on_the_target_and_zero_for_a_perfect_prediction(prediction_type):
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    output = torch.randn(4, 3, 8, 8, generator=g)
    target = schedule.training_target(x0, noise, t, prediction_type)
    loss = diffusion_loss(output, x0, noise, t, schedule, prediction_type)
    torch.testing.assert_close(loss, F.mse_loss(output, target))
    assert diffusion_loss(target, x0, noise, t, schedule, prediction_type) == 0


def test_min_snr_weighting_is_the_same_x0_weighting_for_every_prediction_type():
    # A model whose x0 estimate is off by delta has an epsilon error of delta * sqrt(SNR) and a v error of
    # delta * sqrt(SNR + 1). Min-SNR weighting turns all three losses into min(SNR, gamma) * |delta|^2.
    schedule = NoiseSchedule(beta_schedule="cosine")
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(6, 2, 4, 4, generator=g, **F64), torch.randn(6, 2, 4, 4, generator=g, **F64)
    delta = 0.1 * torch.randn(6, 2, 4, 4, generator=g, **F64)
    t = torch.tensor([1, 50, 200, 500, 800, 990])
    x_t = schedule.add_noise(x0, noise, t)
    wrong_x0 = x0 + delta
    wrong_eps = schedule.predict_eps(wrong_x0, x_t, t, "sample")
    expected = (schedule.snr(t).clamp(max=5.0) * delta.pow(2).flatten(1).mean(1)).mean()
    for prediction_type in PREDICTION_TYPES:
        output = schedule.training_target(wrong_x0, wrong_eps, t, prediction_type)
        loss = diffusion_loss(output, x0, noise, t, schedule, prediction_type, min_snr_gamma=5.0)
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)


def test_min_snr_weights_by_hand():
    snr = torch.tensor([0.5, 5.0, 20.0], **F64)
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25], **F64))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0], **F64))
    expected_v = torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21], **F64)
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), expected_v)


def test_loss_goes_down_when_fitting_the_target():
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    x_t = schedule.add_noise(x0, noise, t)
    model = torch.nn.Conv2d(1, 1, 1)  # can at best learn eps from x_t in a per-pixel, affine way
    torch.nn.init.zeros_(model.weight)  # a fixed start, whatever the global RNG did before
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        loss = diffusion_loss(model(x_t), x0, noise, t, schedule, "epsilon", min_snr_gamma=5.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ----------------------------------------------------------------------------- bad input
def test_unknown_schedule_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown beta_schedule 'sigmoid'.*" + ", ".join(BETA_SCHEDULES)):
        NoiseSchedule(beta_schedule="sigmoid")


def test_unknown_prediction_type_names_the_allowed_ones():
    schedule = NoiseSchedule()
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'.*epsilon, sample, v_prediction"):
        schedule.predict_x0(x, x, 0, "noise")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        diffusion_loss(x, x, x, 0, schedule, prediction_type="x0")


@pytest.mark.parametrize(
    "x0_shape,noise_shape,t,message",
    [
        ((2, 1, 4, 4), (2, 1, 4, 5), 3, "shapes must match"),
        ((2, 1, 4, 4), (2, 1, 4, 4), torch.tensor([1, 2, 3]), "3 timesteps for a batch of 2"),
        ((2, 1, 4, 4), (2, 1, 4, 4), 1000, r"must lie in \[0, 999\]"),
        ((2, 1, 4, 4), (2, 1, 4, 4), torch.tensor([-1, 0]), r"must lie in \[0, 999\]"),
        ((2, 1, 4, 4), (2, 1, 4, 4), torch.tensor([0.5, 1.0]), "must be integers"),
    ],
)
def test_bad_add_noise_input_is_a_clear_value_error(x0_shape, noise_shape, t, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule().add_noise(torch.zeros(x0_shape), torch.zeros(noise_shape), t)


def test_bad_schedule_arguments_are_clear_value_errors():
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        NoiseSchedule(beta_start=0.02, beta_end=1e-4)
    with pytest.raises(ValueError, match="num_train_timesteps must be an integer >= 2"):
        NoiseSchedule(num_train_timesteps=1)
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        min_snr_weights(torch.ones(2), 0.0, "epsilon")
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="model_output .* target"):
        diffusion_loss(torch.zeros(2, 1, 2, 3), x, x, 0, NoiseSchedule())
