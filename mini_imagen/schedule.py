r"""The forward (noising) process, what the network predicts, and the training loss.

A diffusion model destroys an image x_0 by mixing it with Gaussian noise over T steps and learns
to undo one step at a time (Ho et al., 2020, "DDPM", sec. 2). Everything about *how much* noise
sits at step t lives in one table, the noise schedule:

    $\beta_t$            noise added at step t                            (DDPM sec. 2)
    $\alpha_t = 1 - \beta_t$
    $\bar\alpha_t = \prod_{s \le t} \alpha_s$    signal left after t steps      (DDPM eq. 4)

and the whole forward process collapses to one jump (DDPM eq. 4):

    $q(x_t \mid x_0) = \mathcal{N}(\sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I)$,
    i.e. $x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon$.

We write $\alpha_t := \sqrt{\bar\alpha_t}$ and $\sigma_t := \sqrt{1-\bar\alpha_t}$ for the signal and
noise *scales* when it reads better (Kingma et al., 2021, "VDM"; DPM-Solver uses the same), and
$\mathrm{SNR}(t) = \alpha_t^2 / \sigma_t^2$.

Three things a network can be asked to predict from x_t, all interchangeable given x_t:

    "epsilon"       the noise $\epsilon$                                   (DDPM eq. 14)
    "sample"        the clean image $x_0$
    "v_prediction"  the velocity $v = \alpha_t \epsilon - \sigma_t x_0$    (Salimans & Ho, 2022, sec. 4;
                                                                            Imagen Video sec. 2.4)

The names are diffusers' (``prediction_type``). Schedules: "linear" (DDPM sec. 4), "scaled_linear"
(Stable Diffusion's), and "cosine" (Nichol & Dhariwal, 2021, "Improved DDPM", eq. 17), which
diffusers calls "squaredcos_cap_v2" and which Imagen's models use.

The tables are built and kept in float64 (so they agree with diffusers to 1e-8 when diffusers
runs in float64 too; it builds them in float32 by default) and are cast to the input's dtype
and device on use.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

# diffusers' name for the cosine schedule; accepted here so configs carry over.
_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}
_DIFFUSERS_SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ``ValueError`` naming the allowed values unless ``prediction_type`` is one of them."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of: {', '.join(PREDICTION_TYPES)}")


# ----------------------------------------------------------------------------- beta schedules
def cosine_alpha_bar(u: Tensor, s: float = 0.008) -> Tensor:
    r"""The cosine schedule in continuous time $u \in [0, 1]$ (Improved DDPM eq. 17).

    $\bar\alpha(u) = \cos^2\!\big(\tfrac{u + s}{1 + s} \cdot \tfrac{\pi}{2}\big)$; the offset s keeps
    $\beta$ from being vanishingly small near u = 0. (The paper divides by $\bar\alpha(0)$ too;
    diffusers and we do not, which changes $\bar\alpha$ by a factor of $1 - 4 \cdot 10^{-5}$.)
    """
    return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def make_betas(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float) -> Tensor:
    r"""The (T,) float64 table of $\beta_t$ for a named schedule, as diffusers builds it."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)  # DDPM sec. 4: 1e-4 -> 0.02
    if beta_schedule == "scaled_linear":
        # linear in $\sqrt\beta$ (latent diffusion / Stable Diffusion)
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "cosine":
        u = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = cosine_alpha_bar(u)
        # $\beta_t = 1 - \bar\alpha(\tfrac{t+1}{T}) / \bar\alpha(\tfrac{t}{T})$, capped at 0.999 (Improved DDPM sec 3.2)
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of: {', '.join(BETA_SCHEDULES)}")


# ----------------------------------------------------------------------------- the schedule
class NoiseSchedule:
    r"""The discrete-time forward process $q(x_t \mid x_0)$ with $t = 0, \dots, T-1$.

    ``betas``, ``alphas`` and ``alphas_cumprod`` are (T,) float64 tensors on the CPU, named as in
    diffusers. Every method takes integer timesteps ``t`` (an int, a 0-d tensor, or one per
    sample, shape (B,)) and returns tensors in the dtype and on the device of its image input.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        beta_schedule = _SCHEDULE_ALIASES.get(beta_schedule, beta_schedule)
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"unknown beta_schedule {beta_schedule!r}; choose one of: {', '.join(BETA_SCHEDULES)}"
                " ('squaredcos_cap_v2' is accepted as diffusers' name for 'cosine')"
            )
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2; got {num_train_timesteps!r}")
        if beta_schedule != "cosine" and not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1; got beta_start={beta_start}, beta_end={beta_end}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end

        self.betas = make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end)
        self.alphas = 1.0 - self.betas  # $\alpha_t = 1 - \beta_t$
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # $\bar\alpha_t = \prod_{s\le t} \alpha_s$ (DDPM eq 4)

    def __repr__(self) -> str:
        ends = "" if self.beta_schedule == "cosine" else f", beta_start={self.beta_start}, beta_end={self.beta_end}"
        return f"NoiseSchedule({self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}{ends})"

    def diffusers_config(self) -> dict:
        """The keyword arguments that give a diffusers scheduler this same schedule."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": _DIFFUSERS_SCHEDULE_NAMES[self.beta_schedule],
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    # --- looking values up -------------------------------------------------------------------
    def _timesteps(self, t: Tensor | int, device: torch.device | None = None) -> Tensor:
        """``t`` as a checked int64 tensor of shape () or (B,)."""
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers in [0, {self.num_train_timesteps - 1}]; got dtype {t.dtype}")
        if t.ndim > 1:
            raise ValueError(f"timesteps must be a scalar or have shape (B,); got shape {tuple(t.shape)}")
        if t.numel() > 0 and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps - 1}] (num_train_timesteps="
                f"{self.num_train_timesteps}); got values from {int(t.min())} to {int(t.max())}"
            )
        return t.long()

    def _alphas_cumprod_at(self, t: Tensor | int, like: Tensor) -> Tensor:
        r"""$\bar\alpha_t$ shaped (B, 1, 1, ...) to broadcast against ``like``, in float64 (float32 on MPS)."""
        t = self._timesteps(t, like.device)
        if t.ndim == 1 and t.shape[0] not in (1, like.shape[0]):
            raise ValueError(
                f"got {t.shape[0]} timesteps for a batch of {like.shape[0]}; pass one per sample or one for all"
            )
        work_dtype = torch.float32 if like.device.type == "mps" else torch.float64  # MPS has no float64
        alpha_bar = self.alphas_cumprod.to(device=like.device, dtype=work_dtype)[t]
        return alpha_bar.reshape(-1, *([1] * (like.ndim - 1)))

    def signal_and_noise_scales(self, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
        r"""$(\alpha_t, \sigma_t) = (\sqrt{\bar\alpha_t}, \sqrt{1 - \bar\alpha_t})$, broadcastable against ``like``."""
        alpha_bar = self._alphas_cumprod_at(t, like)
        return alpha_bar.sqrt().to(like.dtype), (1 - alpha_bar).sqrt().to(like.dtype)

    def snr(self, t: Tensor | int) -> Tensor:
        r"""$\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)$ (Kingma et al., 2021), as float64 in the shape of t."""
        alpha_bar = self.alphas_cumprod[self._timesteps(t).cpu()]
        return alpha_bar / (1 - alpha_bar)

    def log_snr(self, t: Tensor | int) -> Tensor:
        r"""$\lambda_t = \log \mathrm{SNR}(t)$, the "time" DPM-Solver steps in (float64, shape of t)."""
        alpha_bar = self.alphas_cumprod[self._timesteps(t).cpu()]
        return torch.log(alpha_bar) - torch.log1p(-alpha_bar)

    # --- the forward process -----------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        r"""Sample $x_t \sim q(x_t \mid x_0)$ given the noise: $x_t = \alpha_t x_0 + \sigma_t \epsilon$ (DDPM eq. 4)."""
        _check_same_shape(x0=x0, noise=noise)
        alpha, sigma = self.signal_and_noise_scales(t, x0)
        return alpha * x0 + sigma * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        r"""$v = \alpha_t \epsilon - \sigma_t x_0$ (Salimans & Ho, 2022, sec. 4); diffusers' ``get_velocity``."""
        _check_same_shape(x0=x0, noise=noise)
        alpha, sigma = self.signal_and_noise_scales(t, x0)
        return alpha * noise - sigma * x0

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor | int, prediction_type: str) -> Tensor:
        """What a network of this ``prediction_type`` should output for $x_t$ = ``add_noise(x0, noise, t)``."""
        check_prediction_type(prediction_type)
        _check_same_shape(x0=x0, noise=noise)
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        return self.velocity(x0, noise, t)

    # --- converting a prediction -------------------------------------------------------------
    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor | int, prediction_type: str) -> Tensor:
        """The clean image implied by a network output at $x_t$."""
        check_prediction_type(prediction_type)
        _check_same_shape(model_output=model_output, x_t=x_t)
        alpha, sigma = self.signal_and_noise_scales(t, x_t)
        if prediction_type == "epsilon":
            return (x_t - sigma * model_output) / alpha  # $x_0 = (x_t - \sigma_t \epsilon) / \alpha_t$ (DDPM eq. 15)
        if prediction_type == "sample":
            return model_output
        return alpha * x_t - sigma * model_output  # $x_0 = \alpha_t x_t - \sigma_t v$

    def predict_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor | int, prediction_type: str) -> Tensor:
        """The noise implied by a network output at $x_t$."""
        check_prediction_type(prediction_type)
        _check_same_shape(model_output=model_output, x_t=x_t)
        alpha, sigma = self.signal_and_noise_scales(t, x_t)
        if prediction_type == "epsilon":
            return model_output
        if prediction_type == "sample":
            return (x_t - alpha * model_output) / sigma  # $\epsilon = (x_t - \alpha_t x_0) / \sigma_t$
        return alpha * model_output + sigma * x_t  # $\epsilon = \alpha_t v + \sigma_t x_t$

    def predict_v(self, model_output: Tensor, x_t: Tensor, t: Tensor | int, prediction_type: str) -> Tensor:
        """The velocity implied by a network output at $x_t$."""
        x0 = self.predict_x0(model_output, x_t, t, prediction_type)
        eps = self.predict_eps(model_output, x_t, t, prediction_type)
        return self.velocity(x0, eps, t)


def _check_same_shape(**tensors: Tensor) -> None:
    """Raise a ``ValueError`` naming the tensors unless all have one shape."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes must match; got " + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))


# ----------------------------------------------------------------------------- the loss
def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    r"""Per-sample loss weights of Min-SNR-$\gamma$ (Hang et al., 2023).

    The idea is to weight the *x_0-space* error by $\min(\mathrm{SNR}, \gamma)$, so the nearly
    clean, easy timesteps stop dominating training. An $\epsilon$ error is $\sqrt{\mathrm{SNR}}$
    times the x_0 error and a v error is $\sqrt{\mathrm{SNR} + 1}$ times it, so the squared
    errors are divided by SNR and SNR + 1 to give the same weighting in every parametrization.
    """
    check_prediction_type(prediction_type)
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 (5 is the paper's choice); got {gamma}")
    clipped = snr.clamp(max=gamma)  # $\min(\mathrm{SNR}_t, \gamma)$
    if prediction_type == "epsilon":
        return clipped / snr  # $\min(\mathrm{SNR}, \gamma) / \mathrm{SNR}$
    if prediction_type == "sample":
        return clipped  # $\min(\mathrm{SNR}, \gamma)$
    return clipped / (snr + 1)  # $\min(\mathrm{SNR}, \gamma) / (\mathrm{SNR} + 1)$


def diffusion_loss(
    model_output: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor | int,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
) -> Tensor:
    r"""The denoising loss: mean squared error against the ``prediction_type``'s target (DDPM eq. 14).

    ``model_output`` is the network's output at $x_t$ = ``schedule.add_noise(x0, noise, t)``. With
    ``min_snr_gamma`` each sample's error is weighted by ``min_snr_weights``; without it this is
    plain ``F.mse_loss(model_output, target)``.
    """
    target = schedule.training_target(x0, noise, t, prediction_type)
    _check_same_shape(model_output=model_output, target=target)
    per_sample = (model_output - target).pow(2).flatten(1).mean(dim=1)  # (B,)
    if min_snr_gamma is None:
        return per_sample.mean()
    weights = min_snr_weights(schedule.snr(t), min_snr_gamma, prediction_type)
    return (weights.to(per_sample) * per_sample).mean()
