r"""The ideal denoiser: the best possible network for a tiny data set, in closed form.

Training minimises $\mathbb{E}\,\|\hat x_0(x_t, t) - x_0\|^2$, and the minimiser is the posterior
mean $\mathbb{E}[x_0 \mid x_t]$. When the data set is a handful of points $x^{(1)}, \dots, x^{(N)}$
(each equally likely) that mean needs no training at all. By Bayes' rule with
$q(x_t \mid x_0) = \mathcal{N}(\sqrt{\bar\alpha_t}\, x_0, (1 - \bar\alpha_t) I)$ (DDPM eq. 4):

    $\mathbb{E}[x_0 \mid x_t] = \sum_i w_i\, x^{(i)}$,
    $w = \mathrm{softmax}_i\!\Big(-\frac{\|x_t - \sqrt{\bar\alpha_t}\, x^{(i)}\|^2}{2 (1 - \bar\alpha_t)}\Big)$.

At high noise every point gets a similar weight and the prediction is the data mean; as the
noise falls the weights sharpen onto the nearest point. A sampler driven by this denoiser must
therefore end exactly on the data points, and reach each of them; that tests a sampler with no
network in the way. (It also shows why a network that fits its training set perfectly can only
reproduce it: generalisation comes from the network *failing* to be this function.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mini_imagen.schedule import NoiseSchedule, check_prediction_type


def ideal_x0(x_t: Tensor, t: Tensor | int, data: Tensor, schedule: NoiseSchedule) -> Tensor:
    r"""$\mathbb{E}[x_0 \mid x_t]$ for a batch ``x_t`` (B, ...), the data being uniform over ``data`` (N, ...)."""
    if x_t.shape[1:] != data.shape[1:]:
        raise ValueError(f"x_t items {tuple(x_t.shape[1:])} and data items {tuple(data.shape[1:])} must have one shape")
    alpha, sigma = schedule.signal_and_noise_scales(t, x_t)  # $\sqrt{\bar\alpha_t}$, $\sqrt{1-\bar\alpha_t}$
    alpha, sigma = alpha.reshape(-1, 1), sigma.reshape(-1, 1)  # (B, 1), or (1, 1) for one shared t
    points = data.to(x_t).flatten(1)  # (N, D)
    queries = x_t.flatten(1)  # (B, D)
    # $\|x_t - \sqrt{\bar\alpha_t}\, x^{(i)}\|^2$ for every sample and every data point: (B, N)
    sq_dist = (queries[:, None, :] - alpha[:, :, None] * points[None]).pow(2).sum(-1)
    weights = torch.softmax(-sq_dist / (2 * sigma**2), dim=1)  # (B, N), the posterior $p(x^{(i)} \mid x_t)$
    return (weights @ points).reshape(x_t.shape)  # $\sum_i w_i x^{(i)}$


def ideal_model_output(
    x_t: Tensor, t: Tensor | int, data: Tensor, schedule: NoiseSchedule, prediction_type: str = "epsilon"
) -> Tensor:
    r"""What a perfectly trained network of ``prediction_type`` outputs: $\hat\epsilon$, $\hat x_0$ or $\hat v$."""
    check_prediction_type(prediction_type)
    x0 = ideal_x0(x_t, t, data, schedule)
    eps = schedule.predict_eps(x0, x_t, t, "sample")  # the noise that this $\hat x_0$ implies
    return schedule.training_target(x0, eps, t, prediction_type)


def ideal_model_fn(
    data: Tensor, schedule: NoiseSchedule, prediction_type: str = "epsilon"
) -> Callable[[Tensor, Tensor], Tensor]:
    """The ideal denoiser as a ``model_fn(x_t, t)`` for ``samplers.run_sampler``."""
    check_prediction_type(prediction_type)

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        return ideal_model_output(x_t, t, data, schedule, prediction_type)

    return model_fn
