"""Classifier-free guidance and static / dynamic thresholding (Imagen sec. 2.2-2.3)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from mini_imagen.guidance import (
    THRESHOLDING_MODES,
    apply_thresholding,
    classifier_free_guidance,
    dynamic_threshold,
    static_threshold,
)
from mini_imagen.schedule import PREDICTION_TYPES, NoiseSchedule

F64 = dict(dtype=torch.float64)


# ----------------------------------------------------------------------------- classifier-free guidance
def test_guidance_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)  # u + (c - u): equal up to rounding
    assert torch.equal(classifier_free_guidance(cond, uncond, 0.0), uncond)


def test_guidance_by_hand_and_in_imagens_form():
    cond, uncond = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]])
    guided = classifier_free_guidance(cond, uncond, 4.0)
    torch.testing.assert_close(guided, torch.tensor([[2.5, -11.0]]))  # 0.5 + 4 (0.5), 1 + 4 (-3)
    torch.testing.assert_close(guided, 4.0 * cond + (1 - 4.0) * uncond)  # Imagen: w c + (1 - w) u


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_guidance_commutes_with_converting_the_prediction(prediction_type):
    # Guidance is linear, and so is turning an output into x0 at fixed x_t: guiding epsilon, x0 or v
    # predictions gives the same guided x0, so any sampler can take the guided output.
    schedule = NoiseSchedule(beta_schedule="cosine")
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 3, 4, 4, generator=g, **F64)
    cond, uncond = torch.randn(2, 3, 4, 4, generator=g, **F64), torch.randn(2, 3, 4, 4, generator=g, **F64)
    t, w = torch.tensor([300, 700]), 7.5
    guided_then_converted = schedule.predict_x0(classifier_free_guidance(cond, uncond, w), x_t, t, prediction_type)
    converted_then_guided = classifier_free_guidance(
        schedule.predict_x0(cond, x_t, t, prediction_type), schedule.predict_x0(uncond, x_t, t, prediction_type), w
    )
    torch.testing.assert_close(guided_then_converted, converted_then_guided, rtol=0, atol=1e-10)


def test_guidance_bad_input():
    with pytest.raises(ValueError, match="cond_out and uncond_out must have one shape"):
        classifier_free_guidance(torch.zeros(2, 3), torch.zeros(3, 3), 2.0)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        classifier_free_guidance(torch.zeros(2, 3), torch.zeros(2, 3), -1.0)


# ----------------------------------------------------------------------------- thresholding
def test_static_threshold_clips_to_unit_range():
    x0 = torch.tensor([[-3.0, -1.0, 0.2, 1.0, 2.5]])
    assert torch.equal(static_threshold(x0), torch.tensor([[-1.0, -1.0, 0.2, 1.0, 1.0]]))


def test_dynamic_threshold_never_changes_an_x0_inside_the_unit_range():
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x0[0, 0, 0, 0] = 1.0  # the boundary is "inside" too
    assert torch.equal(dynamic_threshold(x0, 0.995), x0)
    assert torch.equal(dynamic_threshold(x0, 0.0), x0)


def test_dynamic_threshold_by_hand():
    # Image 0: |x| = 0, 1, 2, 3, 4. The 75th percentile sits at position 0.75 * (5 - 1) = 3, so s = 3:
    # clip to [-3, 3], divide by 3. Image 1 lies inside [-1, 1]: s = max(0.6, 1) = 1, unchanged.
    x0 = torch.tensor([[0.0, 1.0, -2.0, 3.0, -4.0], [0.2, -0.4, 0.6, 0.0, 0.1]])
    expected = torch.tensor([[0.0, 1 / 3, -2 / 3, 1.0, -1.0], [0.2, -0.4, 0.6, 0.0, 0.1]])
    torch.testing.assert_close(dynamic_threshold(x0, 0.75), expected)
    # The percentile interpolates: at p = 0.5 the position is 2, so s = 2.
    torch.testing.assert_close(dynamic_threshold(x0[:1], 0.5), torch.tensor([[0.0, 0.5, -1.0, 1.0, -1.0]]))
    # p = 1 divides by the largest |x|, which then lands exactly on 1.
    assert dynamic_threshold(x0[:1], 1.0).abs().max() == 1.0


def test_dynamic_threshold_keeps_saturation_lower_than_static_clipping_at_high_guidance():
    # Two smooth x0 predictions (with and without text) guided with w = 10 overshoot [-1, 1] widely.
    ramp = torch.linspace(-1, 1, 32)
    image = torch.sin(3 * ramp)[None, :] * torch.cos(2 * ramp)[:, None]  # (32, 32) in [-1, 1]
    cond = (0.9 * image).expand(2, 3, 32, 32)
    uncond = (0.6 * image).expand(2, 3, 32, 32)
    x0 = classifier_free_guidance(cond, uncond, 10.0)  # = 3.6 image
    assert x0.abs().max() > 3

    def saturated(x: torch.Tensor) -> float:
        return (x.abs() >= 0.999).double().mean().item()

    static, dynamic = static_threshold(x0), dynamic_threshold(x0, 0.995)
    assert saturated(static) > 0.4  # static clipping flattens most of the image to +-1
    assert saturated(dynamic) <= 0.01  # dynamic: only the top 0.5% of pixels reach +-1
    assert dynamic.abs().max() <= 1.0
    # ... and it keeps the picture: a rescaled copy of x0, not a clipped one.
    inside = x0.abs() < x0.abs().flatten().quantile(0.99)
    ratio = dynamic[inside] / x0[inside]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.mean().item()))


def test_dynamic_threshold_is_per_image():
    x0 = torch.stack([torch.full((1, 2, 2), 0.5), torch.linspace(-5, 5, 4).reshape(1, 2, 2)])
    out = dynamic_threshold(x0, 0.995)
    assert torch.equal(out[0], x0[0])
    assert out[1].abs().max() <= 1.0 and out[1].abs().max() > 0.99


def test_thresholding_keeps_dtype():
    x0 = torch.linspace(-3, 3, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert dynamic_threshold(x0.to(dtype)).dtype == dtype


def test_apply_thresholding_dispatches_and_rejects_unknown_modes():
    x0 = torch.linspace(-3, 3, 10).reshape(2, 5)
    assert torch.equal(apply_thresholding(x0, "none"), x0)
    assert torch.equal(apply_thresholding(x0, "static"), static_threshold(x0))
    assert torch.equal(apply_thresholding(x0, "dynamic", 0.9), dynamic_threshold(x0, 0.9))
    with pytest.raises(ValueError, match="unknown thresholding 'clip'.*" + ", ".join(THRESHOLDING_MODES)):
        apply_thresholding(x0, "clip")
    with pytest.raises(ValueError, match="percentile is a fraction in"):
        dynamic_threshold(x0, 99.5)


# ----------------------------------------------------------------------------- versus diffusers
def test_diffusers_thresholding_with_defaults_is_static_clipping_not_dynamic():
    # diffusers clamps s to [1, sample_max_value]; its default sample_max_value = 1.0 pins s to 1.
    x0 = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3), **F64)
    default = DDPMScheduler(thresholding=True)
    assert default.config.sample_max_value == 1.0
    diffusers_out = default._threshold_sample(x0)  # the method diffusers' step() calls
    torch.testing.assert_close(diffusers_out, static_threshold(x0), rtol=0, atol=0)
    assert (diffusers_out - dynamic_threshold(x0)).abs().max() > 0.1


def test_dynamic_threshold_equals_diffusers_with_unbounded_sample_max_value():
    x0 = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4), **F64)
    for ratio in (0.9, 0.995):
        unbounded = DDPMScheduler(thresholding=True, sample_max_value=float("inf"), dynamic_thresholding_ratio=ratio)
        torch.testing.assert_close(dynamic_threshold(x0, ratio), unbounded._threshold_sample(x0), rtol=0, atol=1e-12)
