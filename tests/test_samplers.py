"""Samplers: every step equal to diffusers 0.42, and landing on the data when driven by the ideal denoiser.

The diffusers comparisons feed both sides the same deterministic fake "network" (a fixed function of
x and t) over a whole sampling loop and compare every step in float64 to 1e-8. diffusers hard-codes
float32 in places (its tables, DPM-Solver's sigmas and samples), so ``diffusers_in_float64`` runs its
code with float32 promoted to float64: we compare algorithms, not rounding.

The ideal-denoiser tests need no network and no diffusers: with the exact posterior mean of a
four-point data set as the "model", every sampler must end on a data point and reach every one.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from mini_imagen.ideal_denoiser import ideal_model_fn, ideal_model_output, ideal_x0
from mini_imagen.samplers import (
    TIMESTEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    Sampler,
    make_sampler,
    run_sampler,
    spaced_timesteps,
)
from mini_imagen.schedule import PREDICTION_TYPES, NoiseSchedule

# diffusers' DPM-Solver calls np.array() on a tensor, which NumPy 2 warns about; not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

F64 = dict(dtype=torch.float64)
SHAPE = (2, 3, 4, 4)


@contextmanager
def diffusers_in_float64():
    """Run diffusers' scheduler code with its hard-coded float32 (torch and NumPy) promoted to float64."""
    with mock.patch.object(torch, "float32", torch.float64), mock.patch.object(np, "float32", np.float64):
        yield


def fake_model(x: torch.Tensor, t: torch.Tensor | int, scale: float = 1.0) -> torch.Tensor:
    """A deterministic stand-in for a network: any fixed function of (x_t, t) will do."""
    return scale * (0.8 * torch.sin(x + float(t) / 300) + 0.1 * x)


def compare_loops(ours: Sampler, ref, num_steps: int, spacing: str, scale: float = 1.0, **ref_step_kwargs):
    """Run both samplers from the same x_T with the same model and noise; assert every step agrees.

    DDIM gets the noise through ``noise=`` / ``variance_noise=``; DPM-Solver++(2M) draws none.
    """
    ours.set_timesteps(num_steps, spacing)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), **F64)
    noises = torch.Generator().manual_seed(1)
    for t in ours.timesteps:
        noise = torch.randn(SHAPE, generator=noises, **F64)
        out = ours.step(fake_model(x, t, scale), t, x, noise=noise)
        same_noise = {"variance_noise": noise} if isinstance(ref, DDIMScheduler) else {}
        with diffusers_in_float64():
            ref_out = ref.step(fake_model(y, t, scale), t, y, **same_noise, **ref_step_kwargs)
        x, y = out.prev_sample, ref_out.prev_sample
        torch.testing.assert_close(x, y, rtol=0, atol=1e-8, msg=lambda m: f"step at t={int(t)}: {m}")
        if hasattr(ref_out, "pred_original_sample"):
            torch.testing.assert_close(out.pred_original_sample, ref_out.pred_original_sample, rtol=0, atol=1e-8)
    return x


def compare_ddpm_loops(ours: Sampler, ref: DDPMScheduler, num_steps: int, spacing: str, scale: float = 1.0):
    """``compare_loops`` for DDPM: diffusers' DDPM draws its own noise, so both get one generator seed."""
    ours.set_timesteps(num_steps, spacing)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), **F64)
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ours.timesteps:
        out = ours.step(fake_model(x, t, scale), t, x, generator=g_ours)
        with diffusers_in_float64():
            ref_out = ref.step(fake_model(y, t, scale), t, y, generator=g_ref)
        x, y = out.prev_sample, ref_out.prev_sample
        torch.testing.assert_close(x, y, rtol=0, atol=1e-8, msg=lambda m: f"step at t={int(t)}: {m}")
        torch.testing.assert_close(out.pred_original_sample, ref_out.pred_original_sample, rtol=0, atol=1e-8)
    return x


def reference(cls, schedule: NoiseSchedule, num_steps: int, **config):
    with diffusers_in_float64():
        ref = cls(**schedule.diffusers_config(), **config)
        ref.set_timesteps(num_steps)
    return ref


# ----------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 7, 10, 48, 50, 61, 250, 999])
def test_timesteps_equal_diffusers(spacing, num_steps):
    schedule = NoiseSchedule()
    for ours, cls in [(DDPMSampler, DDPMScheduler), (DDIMSampler, DDIMScheduler), (DPMSolverPP2MSampler, None)]:
        sampler = ours(schedule)
        sampler.set_timesteps(num_steps, spacing)
        ref = (cls or DPMSolverMultistepScheduler)(timestep_spacing=spacing)
        ref.set_timesteps(num_steps)
        # diffusers' "trailing" can overshoot by one timestep (-1, for n = 61); the first n agree.
        assert sampler.timesteps.tolist() == ref.timesteps.tolist()[:num_steps]
        assert len(sampler.timesteps) == num_steps


def test_every_step_count_gives_distinct_decreasing_timesteps():
    for spacing in TIMESTEP_SPACINGS:
        for n in range(1, 1001):
            timesteps = spaced_timesteps(1000, n, spacing)
            assert len(timesteps) == n and np.all(np.diff(timesteps) < 0), (spacing, n)
            assert 0 <= timesteps.min() and timesteps.max() <= 999, (spacing, n)


def test_default_spacings_and_steps_offset_follow_diffusers():
    schedule = NoiseSchedule()
    ddim, dpm = DDIMSampler(schedule, steps_offset=1), DPMSolverPP2MSampler(schedule)
    ddim.set_timesteps(10)
    dpm.set_timesteps(10)
    ref_ddim = DDIMScheduler(steps_offset=1)
    ref_ddim.set_timesteps(10)
    ref_dpm = DPMSolverMultistepScheduler()
    ref_dpm.set_timesteps(10)
    assert ddim.timesteps.tolist() == ref_ddim.timesteps.tolist() == list(range(901, 0, -100))  # "leading"
    assert dpm.timesteps.tolist() == ref_dpm.timesteps.tolist()  # DPM-Solver defaults to "linspace"


# ----------------------------------------------------------------------------- steps equal diffusers
@pytest.mark.parametrize("thresholding", ["none", "static"])
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_ddpm_steps_equal_diffusers(beta_schedule, prediction_type, spacing, thresholding):
    schedule = NoiseSchedule(beta_schedule=beta_schedule)
    ours = DDPMSampler(schedule, prediction_type=prediction_type, thresholding=thresholding)
    ref = reference(
        DDPMScheduler, schedule, 20, prediction_type=prediction_type, timestep_spacing=spacing,
        clip_sample=thresholding == "static",
    )
    compare_ddpm_loops(ours, ref, 20, spacing)


@pytest.mark.parametrize("thresholding", ["none", "static"])
@pytest.mark.parametrize("spacing,num_steps", [("leading", 20), ("leading", 30), ("trailing", 20)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_ddim_steps_equal_diffusers(beta_schedule, prediction_type, eta, spacing, num_steps, thresholding):
    # Grids spaced by T // n, where diffusers' "t - T // n" is the next grid timestep (see DDIMSampler).
    schedule = NoiseSchedule(beta_schedule=beta_schedule)
    ours = DDIMSampler(schedule, prediction_type=prediction_type, thresholding=thresholding, eta=eta)
    ref = reference(
        DDIMScheduler, schedule, num_steps, prediction_type=prediction_type, timestep_spacing=spacing,
        clip_sample=thresholding == "static",
    )
    compare_loops(ours, ref, num_steps, spacing, eta=eta)  # diffusers takes eta in step()


@pytest.mark.parametrize("options", [{"set_alpha_to_one": False}, {"use_clipped_model_output": True}])
def test_ddim_options_equal_diffusers(options):
    schedule = NoiseSchedule(beta_schedule="cosine")
    ours = DDIMSampler(schedule, thresholding="static", eta=0.5, **options)
    ref = reference(DDIMScheduler, schedule, 25, set_alpha_to_one=options.get("set_alpha_to_one", True))
    use_clipped = options.get("use_clipped_model_output", False)
    compare_loops(ours, ref, 25, "leading", eta=0.5, use_clipped_model_output=use_clipped)


@pytest.mark.parametrize("num_steps", [1, 20])
@pytest.mark.parametrize("thresholding", ["none", "static"])
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_dpm_solver_steps_equal_diffusers(beta_schedule, prediction_type, spacing, thresholding, num_steps):
    schedule = NoiseSchedule(beta_schedule=beta_schedule)
    ours = DPMSolverPP2MSampler(schedule, prediction_type=prediction_type, thresholding=thresholding)
    # diffusers' DPM-Solver has no clip_sample: its static clipping is thresholding=True with sample_max_value=1.
    ref = reference(
        DPMSolverMultistepScheduler, schedule, num_steps, prediction_type=prediction_type,
        timestep_spacing=spacing, thresholding=thresholding == "static",
    )
    compare_loops(ours, ref, num_steps, spacing)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++2m"])
def test_dynamic_thresholding_equals_diffusers_only_with_unbounded_sample_max_value(name):
    # An x0-predicting fake model that overshoots [-1, 1], like a strongly guided network.
    schedule = NoiseSchedule(beta_schedule="cosine")
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler}[name]
    spacing = "linspace" if name == "dpm++2m" else "leading"
    config = dict(prediction_type="sample", timestep_spacing=spacing, thresholding=True, dynamic_thresholding_ratio=0.9)

    def run(ours: Sampler, ref) -> torch.Tensor:
        if name == "ddpm":
            return compare_ddpm_loops(ours, ref, 10, spacing, scale=2.5)
        return compare_loops(ours, ref, 10, spacing, scale=2.5)

    dynamic = make_sampler(
        name, schedule, prediction_type="sample", thresholding="dynamic", dynamic_threshold_percentile=0.9
    )
    unbounded = reference(cls, schedule, 10, sample_max_value=float("inf"), **config)
    dynamic_result = run(dynamic, unbounded)

    static = make_sampler(name, schedule, prediction_type="sample", thresholding="static")
    diffusers_default = reference(cls, schedule, 10, **config)  # sample_max_value=1.0: static clipping
    static_result = run(static, diffusers_default)
    assert (dynamic_result - static_result).abs().max() > 0.05  # the two really differ on this model


def test_ddim_with_eta_one_is_ddpm_on_any_grid():
    # DDIM with eta = 1 is DDPM ancestral sampling (Song et al., 2021, sec. 4.1). On a "linspace" grid
    # diffusers' DDIM steps off its own grid (t - T // n), so we check ours against diffusers' DDPM there.
    schedule = NoiseSchedule(beta_schedule="cosine")
    ref = reference(DDPMScheduler, schedule, 20, timestep_spacing="linspace", clip_sample=False)
    ours = DDIMSampler(schedule, eta=1.0)
    ours.set_timesteps(20, "linspace")
    assert ours.previous_timestep(999) == ours.timesteps[1] == 946  # diffusers' DDIM would step to 999 - 50
    compare_ddpm_loops(ours, ref, 20, "linspace")


def test_float32_sampling_stays_float32_and_close_to_float64():
    schedule = NoiseSchedule(beta_schedule="cosine")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), **F64)
    results = []
    for dtype in (torch.float32, torch.float64):
        sampler = DPMSolverPP2MSampler(schedule, prediction_type="v_prediction")
        out = run_sampler(lambda x, t: fake_model(x, t[0]), sampler, x_T.to(dtype), 10)
        assert out.dtype == dtype
        results.append(out.double())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the ideal denoiser
DATA = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), **F64) * 2 - 1  # 4 points, 2.5 or more apart


def test_ideal_denoiser_is_exact_for_a_single_data_point():
    schedule = NoiseSchedule(beta_schedule="cosine")
    x0 = DATA[:1].expand(3, -1, -1, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), **F64)
    t = torch.tensor([5, 500, 990])
    x_t = schedule.add_noise(x0, noise, t)
    for prediction_type in PREDICTION_TYPES:
        output = ideal_model_output(x_t, t, DATA[:1], schedule, prediction_type)
        target = schedule.training_target(x0, noise, t, prediction_type)
        torch.testing.assert_close(output, target, rtol=0, atol=1e-8)


def test_ideal_denoiser_sees_the_data_mean_at_high_noise_and_the_nearest_point_at_low_noise():
    schedule = NoiseSchedule(beta_schedule="linear")
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(2), **F64)
    # abar at t=999 is ~4e-5 here: the data points are all but indistinguishable, so E[x0 | x_t] is their mean.
    torch.testing.assert_close(ideal_x0(x_T, 999, DATA, schedule), DATA.mean(0).expand_as(x_T), rtol=0, atol=0.05)
    near = DATA[[2, 0, 3]] + 0.01 * x_T[:3]
    torch.testing.assert_close(ideal_x0(near, 0, DATA, schedule), DATA[[2, 0, 3]], rtol=0, atol=1e-8)


SAMPLER_CASES = [("ddpm", {}, 50), ("ddim", {}, 25), ("dpm++2m", {}, 15)]  # DDIM with eta = 1 is DDPM (see above)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name,options,num_steps", SAMPLER_CASES)
def test_samplers_driven_by_the_ideal_denoiser_land_on_every_data_point(name, options, num_steps, prediction_type):
    schedule = NoiseSchedule(beta_schedule="cosine")
    sampler = make_sampler(name, schedule, prediction_type=prediction_type, **options)
    x_T = torch.randn(200, 1, 4, 4, generator=torch.Generator().manual_seed(1), **F64)
    model_fn = ideal_model_fn(DATA, schedule, prediction_type)
    samples = run_sampler(model_fn, sampler, x_T, num_steps, generator=torch.Generator().manual_seed(2))

    distances = (samples.flatten(1)[:, None] - DATA.flatten(1)[None]).norm(dim=-1)  # (200, 4)
    nearest_distance, nearest = distances.min(dim=1)
    assert nearest_distance.max() < 1e-6, "every sample must sit on a data point"
    share = torch.bincount(nearest, minlength=4) / 200
    assert share.min() > 0.15 and share.max() < 0.35, f"each point should get ~1/4 of the samples, got {share.tolist()}"


def test_run_sampler_gives_the_model_one_timestep_per_sample_and_is_reproducible():
    schedule = NoiseSchedule()
    seen = []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return fake_model(x, t[0])

    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    first = run_sampler(model_fn, DDPMSampler(schedule), x_T, 5, generator=torch.Generator().manual_seed(1))
    assert [s.tolist() for s in seen] == [[t] * 3 for t in (800, 600, 400, 200, 0)]
    again = run_sampler(model_fn, DDPMSampler(schedule), x_T, 5, generator=torch.Generator().manual_seed(1))
    other = run_sampler(model_fn, DDPMSampler(schedule), x_T, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.allclose(first, other)


# ----------------------------------------------------------------------------- bad input
def test_unknown_sampler_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of: ddpm, ddim, dpm\\+\\+2m"):
        make_sampler("euler", NoiseSchedule())


@pytest.mark.parametrize("num_steps", [0, 1001, 2.5])
def test_step_counts_outside_the_training_steps_are_rejected(num_steps):
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\]"):
        DDIMSampler(NoiseSchedule()).set_timesteps(num_steps)


def test_bad_sampler_settings_are_clear_value_errors():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="unknown timestep_spacing 'uniform'; choose one of: leading, trailing, linsp"):
        DDPMSampler(schedule).set_timesteps(10, "uniform")
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'"):
        DDPMSampler(schedule, prediction_type="noise")
    with pytest.raises(ValueError, match="unknown thresholding 'clip'"):
        DDIMSampler(schedule, thresholding="clip")
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        DDIMSampler(schedule, eta=1.5)
    with pytest.raises(ValueError, match="do not give distinct timesteps"):
        DPMSolverPP2MSampler(schedule).set_timesteps(1000, "leading")  # 1000 // 1001 = 0: every timestep is 0


def test_bad_step_input_is_a_clear_value_error():
    sampler = DDIMSampler(NoiseSchedule())
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="call set_timesteps"):
        sampler.step(x, 999, x)
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 999 is not one of this sampler's timesteps"):
        sampler.step(x, 999, x)
    with pytest.raises(ValueError, match="model_output and sample must have one shape"):
        sampler.step(torch.zeros(2, 2, 4, 4), 900, x)
    with pytest.raises(ValueError, match="one timestep for the whole batch"):
        sampler.step(x, torch.tensor([900, 900]), x)
    stochastic = DDPMSampler(NoiseSchedule())
    stochastic.set_timesteps(10)
    with pytest.raises(ValueError, match="noise must have the sample's shape"):
        stochastic.step(x, 900, x, noise=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="x_t items .* and data items .* must have one shape"):
        ideal_x0(torch.zeros(2, 1, 4, 4), 0, torch.zeros(3, 1, 2, 2), NoiseSchedule())
