r"""Samplers: walk from pure noise $x_T$ back to an image, one network call per step.

Three ways to run the reverse process, with diffusers' method names so the two are swappable:

* ``DDPMSampler``: ancestral sampling from the posterior $q(x_{t-1} \mid x_t, \hat x_0)$
  (Ho et al., 2020, eqs. 6-7). Stochastic; wants many steps.
* ``DDIMSampler``: the non-Markovian sampler of Song et al., 2021 (eqs. 12 and 16). eta = 0
  is deterministic (an ODE solver), eta = 1 is DDPM again. Good at 25-50 steps.
* ``DPMSolverPP2MSampler``: DPM-Solver++(2M) (Lu et al., 2022, Algorithm 2), a second-order
  multistep ODE solver in log-SNR time. Good at 10-25 steps.

All three share one recipe per step: turn the network output into a prediction of the clean
image $\hat x_0$, optionally threshold it (``guidance.apply_thresholding``, Imagen sec. 2.3), and
move $x_t$ towards it by the sampler's rule. A sampler is used like a diffusers scheduler:

    sampler.set_timesteps(50)
    for t in sampler.timesteps:
        x = sampler.step(model(x, t), t, x, generator=g).prev_sample

or in one call, ``run_sampler(model_fn, sampler, x_T, 50)``.

Each sampler equals its diffusers scheduler for the same configuration (the tests check every
step in float64 to 1e-8); the docstrings say where we differ and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mini_imagen.guidance import apply_thresholding, check_thresholding_mode
from mini_imagen.schedule import NoiseSchedule, check_prediction_type

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class SamplerOutput:
    """One sampler step: the next, less noisy sample, and the clean image it was aimed at."""

    prev_sample: Tensor
    pred_original_sample: Tensor


def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """Pick ``num_inference_steps`` of the T training timesteps, largest first, as diffusers does.

    The three spacings of Lin et al., 2023 ("Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Table 2), for T = 1000 and 10 steps:

        "linspace"  evenly over [0, T-1], both ends kept:   999, 888, ..., 111, 0
        "leading"   every T//n-th step counting up from 0:  900, 800, ..., 100, 0   (+ steps_offset)
        "trailing"  every T/n-th step counting down from T: 999, 899, ..., 199, 99

    "leading" never starts at t = T-1, so its first step sees less noise than x_T holds; the
    paper recommends "trailing". Grids are built with NumPy exactly like diffusers' so that the
    rounding agrees to the integer.
    """
    T, n = num_train_timesteps, num_inference_steps
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1]
    elif timestep_spacing == "leading":
        timesteps = (np.arange(n) * (T // n))[::-1] + steps_offset
    elif timestep_spacing == "trailing":
        # np.arange with a float step can overshoot by one element (T=1000, n=61 gives a 62nd
        # timestep, -1, in diffusers 0.42); keeping the first n fixes that and changes nothing else.
        timesteps = np.round(np.arange(T, 0, -T / n))[:n] - 1
    else:
        raise ValueError(
            f"unknown timestep_spacing {timestep_spacing!r}; choose one of: {', '.join(TIMESTEP_SPACINGS)}"
        )
    return timesteps.astype(np.int64)


# ----------------------------------------------------------------------------- the shared part
class Sampler:
    """What every sampler shares: the schedule, the prediction type, thresholding and the timestep grid."""

    default_timestep_spacing = "leading"

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        thresholding: str = "none",
        dynamic_threshold_percentile: float = 0.995,
        steps_offset: int = 0,
    ) -> None:
        check_prediction_type(prediction_type)
        check_thresholding_mode(thresholding)
        if not 0.0 <= dynamic_threshold_percentile <= 1.0:
            raise ValueError(
                f"dynamic_threshold_percentile is a fraction in [0, 1], e.g. 0.995; got {dynamic_threshold_percentile}"
            )
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.thresholding = thresholding
        self.dynamic_threshold_percentile = dynamic_threshold_percentile
        self.steps_offset = steps_offset
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.long)
        self._timestep_list: list[int] = []
        self._reset()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.schedule!r}, prediction_type={self.prediction_type!r}, "
            f"thresholding={self.thresholding!r})"
        )

    # --- the timestep grid -------------------------------------------------------------------
    def set_timesteps(
        self, num_inference_steps: int, timestep_spacing: str | None = None, device: torch.device | str | None = None
    ) -> None:
        """Choose the timesteps to sample at (``self.timesteps``, largest first) and reset any state.

        ``timestep_spacing`` defaults to the diffusers default of this sampler (see ``spaced_timesteps``).
        """
        T = self.schedule.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be an integer in [1, {T}] (the schedule has {T} training steps);"
                f" got {num_inference_steps!r}"
            )
        spacing = timestep_spacing or self.default_timestep_spacing
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of: {', '.join(TIMESTEP_SPACINGS)}")
        timesteps = self._grid(num_inference_steps, spacing)
        distinct = len(timesteps) == num_inference_steps and bool(np.all(np.diff(timesteps) < 0))
        if not distinct or timesteps.min() < 0 or timesteps.max() >= T:
            raise ValueError(
                f"{num_inference_steps} steps with timestep_spacing={spacing!r} and steps_offset={self.steps_offset}"
                f" do not give distinct timesteps in [0, {T - 1}] ({timesteps.tolist()}); use fewer steps or 'trailing'"
            )
        self.num_inference_steps = num_inference_steps
        self._timestep_list = timesteps.tolist()
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._reset()

    def _grid(self, num_inference_steps: int, spacing: str) -> np.ndarray:
        return spaced_timesteps(self.schedule.num_train_timesteps, num_inference_steps, spacing, self.steps_offset)

    def _reset(self) -> None:
        """Forget the state of a previous sampling run (multistep samplers keep some)."""

    def _index(self, timestep: int) -> int:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        try:
            return self._timestep_list.index(timestep)
        except ValueError:
            raise ValueError(
                f"timestep {timestep} is not one of this sampler's timesteps {self._timestep_list}"
            ) from None

    def previous_timestep(self, timestep: int) -> int:
        """Where a step from ``timestep`` lands: the next grid timestep, or -1 (the clean image) after the last."""
        index = self._index(timestep)
        return self._timestep_list[index + 1] if index + 1 < len(self._timestep_list) else -1

    def _alpha_bar(self, t: int) -> float:
        r"""$\bar\alpha_t$ as a Python float (float64); t = -1 is the clean image, $\bar\alpha = 1$."""
        return 1.0 if t < 0 else float(self.schedule.alphas_cumprod[t])

    # --- pieces of a step --------------------------------------------------------------------
    def _check_step_inputs(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor) -> int:
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output and sample must have one shape; got {tuple(model_output.shape)}"
                f" and {tuple(sample.shape)}"
                " (learned-variance outputs with 2x the channels are not supported)"
            )
        if isinstance(timestep, Tensor) and timestep.numel() != 1:
            raise ValueError(f"step() takes one timestep for the whole batch; got shape {tuple(timestep.shape)}")
        return int(timestep)

    def predict_x0(self, model_output: Tensor, sample: Tensor, timestep: int) -> Tensor:
        r"""The thresholded prediction of the clean image, $\hat x_0$, from the network's output."""
        x0 = self.schedule.predict_x0(model_output, sample, timestep, self.prediction_type)
        return apply_thresholding(x0, self.thresholding, self.dynamic_threshold_percentile)

    @staticmethod
    def _noise_like(sample: Tensor, generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
        """``noise`` if given, else fresh N(0, I) drawn on the generator's device (as diffusers' ``randn_tensor``)."""
        if noise is not None:
            if noise.shape != sample.shape:
                raise ValueError(f"noise must have the sample's shape {tuple(sample.shape)}; got {tuple(noise.shape)}")
            return noise.to(sample)
        device = generator.device if generator is not None else sample.device
        return torch.randn(sample.shape, generator=generator, device=device, dtype=sample.dtype).to(sample.device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The forward process $q(x_t \\mid x_0)$; see ``NoiseSchedule.add_noise``."""
        return self.schedule.add_noise(x0, noise, t)

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> SamplerOutput:
        """One step from ``sample`` at ``timestep`` to the previous timestep of the grid."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- DDPM
class DDPMSampler(Sampler):
    r"""Ancestral sampling: draw $x_{t'}$ from the posterior $q(x_{t'} \mid x_t, \hat x_0)$ (DDPM eqs. 6-7).

    With fewer steps than T the sampler jumps from t to the previous grid point t', and the
    one-step $\alpha_t$, $\beta_t$ become those of the jump: $\alpha = \bar\alpha_t / \bar\alpha_{t'}$.
    The variance is DDPM's $\tilde\beta_t$ (diffusers' ``variance_type="fixed_small"``).

    Equals diffusers' ``DDPMScheduler`` with ``clip_sample=(thresholding == "static")`` (diffusers'
    default is ``clip_sample=True``; ours is no clipping). One harmless difference: diffusers draws
    noise whenever t > 0, so with "trailing" spacing its last step adds $10^{-10}$ times a fresh
    draw; we draw noise only when the variance is non-zero.
    """

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> SamplerOutput:
        t = self._check_step_inputs(model_output, timestep, sample)
        prev_t = self.previous_timestep(t)
        alpha_bar, alpha_bar_prev = self._alpha_bar(t), self._alpha_bar(prev_t)
        alpha = alpha_bar / alpha_bar_prev  # $\alpha_t$ of this jump
        beta = 1 - alpha  # $\beta_t$ of this jump

        x0 = self.predict_x0(model_output, sample, t)
        # posterior mean $\tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1-\bar\alpha_t} x_0
        #                 + \frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t} x_t$ (DDPM eq. 7)
        x0_coeff = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
        sample_coeff = math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        # posterior variance $\tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$ (DDPM eq. 7)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta
        if variance > 0:  # zero on the last step, which lands on the clean image
            prev_sample = prev_sample + math.sqrt(variance) * self._noise_like(sample, generator, noise)
        return SamplerOutput(prev_sample=prev_sample, pred_original_sample=x0)


# ----------------------------------------------------------------------------- DDIM
class DDIMSampler(Sampler):
    r"""DDIM (Song et al., 2021, eq. 12): jump to $\hat x_0$'s noisy version at the previous grid point.

    $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1 - \bar\alpha_{t'} - \sigma_t^2}\;\hat\epsilon + \sigma_t z$,
    with $\sigma_t = \eta \sqrt{(1-\bar\alpha_{t'})/(1-\bar\alpha_t)}\,\sqrt{1 - \bar\alpha_t/\bar\alpha_{t'}}$
    (eq. 16).

    ``eta`` in [0, 1]: 0 is deterministic, 1 has DDPM's variance. ``set_alpha_to_one`` makes the
    last step land on $\bar\alpha = 1$ (the clean image) rather than on $\bar\alpha_0$.
    ``use_clipped_model_output`` re-derives $\hat\epsilon$ from the thresholded $\hat x_0$ (GLIDE's
    choice); both as in diffusers, with its defaults.

    Equals diffusers' ``DDIMScheduler`` (``eta`` goes to its ``step()``) on every grid spaced by
    T // n: all "leading" grids, and "trailing" when n divides T. Where we differ: diffusers
    always steps to t - T // n, which for "linspace" (and "trailing" with n not dividing T) is
    not the next timestep of its own grid; we step to the next grid timestep, as DDIM defines it.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        thresholding: str = "none",
        dynamic_threshold_percentile: float = 0.995,
        steps_offset: int = 0,
        eta: float = 0.0,
        set_alpha_to_one: bool = True,
        use_clipped_model_output: bool = False,
    ) -> None:
        super().__init__(schedule, prediction_type, thresholding, dynamic_threshold_percentile, steps_offset)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like); got {eta}")
        self.eta = eta
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(schedule.alphas_cumprod[0])
        self.use_clipped_model_output = use_clipped_model_output

    def _alpha_bar(self, t: int) -> float:
        return self.final_alpha_cumprod if t < 0 else float(self.schedule.alphas_cumprod[t])

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> SamplerOutput:
        t = self._check_step_inputs(model_output, timestep, sample)
        prev_t = self.previous_timestep(t)
        alpha_bar, alpha_bar_prev = self._alpha_bar(t), self._alpha_bar(prev_t)

        eps = self.schedule.predict_eps(model_output, sample, t, self.prediction_type)
        x0 = self.predict_x0(model_output, sample, t)
        if self.use_clipped_model_output:
            # the $\hat\epsilon$ that the thresholded $\hat x_0$ implies
            eps = (sample - math.sqrt(alpha_bar) * x0) / math.sqrt(1 - alpha_bar)

        # $\sigma_t(\eta)$ (DDIM eq. 16)
        std = self.eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        # $\sqrt{\bar\alpha_{t-1}}\,\hat x_0$ + "direction pointing to $x_t$" (DDIM eq. 12)
        prev_sample = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev - std**2) * eps
        if std > 0:
            prev_sample = prev_sample + std * self._noise_like(sample, generator, noise)  # "random noise" $\sigma_t z$
        return SamplerOutput(prev_sample=prev_sample, pred_original_sample=x0)


# ----------------------------------------------------------------------------- DPM-Solver++(2M)
class DPMSolverPP2MSampler(Sampler):
    r"""DPM-Solver++(2M) (Lu et al., 2022, "DPM-Solver++", Algorithm 2), deterministic.

    Sampling is an ODE in $\lambda_t = \log(\alpha_t / \sigma_t)$, with $\alpha_t = \sqrt{\bar\alpha_t}$
    and $\sigma_t = \sqrt{1 - \bar\alpha_t}$. Its exact solution from s to t (Lu et al., 2022) is

        $x_t = \frac{\sigma_t}{\sigma_s} x_s + \sigma_t \int_{\lambda_s}^{\lambda_t} e^{\lambda} \hat x_0\, d\lambda$,

    leaves only the integral to approximate. First order takes $\hat x_0$ constant (this is DDIM);
    the multistep second order also uses the slope between this $\hat x_0$ and the previous step's,
    so it costs no extra network calls.

    Equals diffusers' ``DPMSolverMultistepScheduler`` with its defaults (``solver_order=2``,
    ``algorithm_type="dpmsolver++"``, ``solver_type="midpoint"``, ``lower_order_final=True``,
    ``final_sigmas_type="zero"``, timestep spacing "linspace"): the first step is first order (no
    history yet), and the last step jumps to $\sigma = 0$, where the update is exactly $\hat x_0$.
    ``generator`` and ``noise`` are accepted for a uniform interface and not used.
    """

    default_timestep_spacing = "linspace"

    def _grid(self, num_inference_steps: int, spacing: str) -> np.ndarray:
        # The final jump goes to sigma = 0, the clean image. "linspace" and "leading" therefore lay
        # n + 1 points on [0, T) and drop the last one (t = 0), which that jump replaces.
        T = self.schedule.num_train_timesteps
        if spacing == "trailing":
            return spaced_timesteps(T, num_inference_steps, spacing)
        return spaced_timesteps(T, num_inference_steps + 1, spacing, self.steps_offset)[:-1]

    def _reset(self) -> None:
        self._previous: tuple[Tensor, float] | None = None  # ($\hat x_0$, $\lambda$) of the previous step

    def _alpha_sigma_lambda(self, t: int) -> tuple[float, float, float]:
        alpha_bar = self._alpha_bar(t)
        alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
        return alpha, sigma, math.log(alpha) - math.log(sigma)  # $\lambda_t = \log\alpha_t - \log\sigma_t$

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> SamplerOutput:
        s = self._check_step_inputs(model_output, timestep, sample)
        t = self.previous_timestep(s)  # where this step lands; -1 means sigma = 0
        x0 = self.predict_x0(model_output, sample, s)
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(s)

        if t < 0:
            # Last step, to sigma = 0: h = inf, so the first-order update below is exactly x0.
            prev_sample = x0
        else:
            alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(t)
            h = lambda_t - lambda_s  # the step size in log-SNR time
            phi = math.expm1(-h)  # $e^{-h} - 1$
            if self._previous is None:
                # DPM-Solver++(1) = DDIM: $x_t = \frac{\sigma_t}{\sigma_s} x_s - \alpha_t (e^{-h} - 1)\,\hat x_0$
                prev_sample = (sigma_t / sigma_s) * sample - (alpha_t * phi) * x0
            else:
                x0_prev, lambda_prev = self._previous
                r = (lambda_s - lambda_prev) / h  # $r = h_{i-1} / h_i$
                slope = (x0 - x0_prev) / r  # $D_1 = \frac{1}{r}(\hat x_0^{(i)} - \hat x_0^{(i-1)})$
                # $x_t = \frac{\sigma_t}{\sigma_s} x_s - \alpha_t (e^{-h} - 1) (\hat x_0 + \tfrac12 D_1)$ (Algorithm 2)
                prev_sample = (sigma_t / sigma_s) * sample - (alpha_t * phi) * x0 - 0.5 * (alpha_t * phi) * slope
        self._previous = (x0, lambda_s)
        return SamplerOutput(prev_sample=prev_sample, pred_original_sample=x0)


# ----------------------------------------------------------------------------- choosing and running
SAMPLERS: dict[str, type[Sampler]] = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpm++2m": DPMSolverPP2MSampler}


def make_sampler(name: str, schedule: NoiseSchedule, **kwargs) -> Sampler:
    """A sampler by name: "ddpm", "ddim" or "dpm++2m"; ``kwargs`` go to its constructor."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](schedule, **kwargs)


@torch.no_grad()
def run_sampler(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    sampler: Sampler,
    x_T: Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    timestep_spacing: str | None = None,
) -> Tensor:
    """The sampling loop: from noise ``x_T`` to an image, calling ``model_fn(x_t, t)`` once per step.

    ``t`` is given to ``model_fn`` as a (B,) integer tensor, one timestep per sample.
    """
    sampler.set_timesteps(num_inference_steps, timestep_spacing, device=x_T.device)
    x = x_T
    for t in tqdm(sampler.timesteps, desc="sampling", disable=not progress, leave=False):
        model_output = model_fn(x, t.expand(x.shape[0]))
        x = sampler.step(model_output, t, x, generator=generator).prev_sample
    return x
