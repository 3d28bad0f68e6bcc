"""Where and how the course runs: smoke mode, device choice and seeding.

Every lesson and script asks *this* module how big to make things, so one switch
shrinks the whole course for CI:

    MINI_IMAGEN_SMOKE=1   (also on whenever the CI variable is set)

turns training steps, image sizes and sample counts down to "does it run at all"
sizes. Lessons write ``steps = smoke(full=2000, small=20)`` and never test the
variable themselves.
"""

from __future__ import annotations

import os
import random
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}


def is_smoke_mode() -> bool:
    """True when ``MINI_IMAGEN_SMOKE`` is truthy, or when running under CI (``CI`` set)."""
    flag = os.environ.get("MINI_IMAGEN_SMOKE")
    if flag is not None and flag.strip() != "":
        return flag.strip().lower() in _TRUE
    return os.environ.get("CI", "").strip().lower() in _TRUE


def smoke(full: T, small: T) -> T:
    """Return ``small`` in smoke mode, ``full`` otherwise: ``steps = smoke(2000, 20)``."""
    return small if is_smoke_mode() else full


def pick_device(preferred: str | None = None) -> torch.device:
    """The best available device: CUDA, then Apple's MPS, then the CPU.

    ``preferred`` ("cpu", "cuda", "cuda:0", "mps") forces a choice, and fails with
    one clear line when that device is not available here.
    """
    if preferred not in (None, "", "auto"):
        if preferred.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"unknown device '{preferred}'; choose one of: auto, cpu, cuda, cuda:N, mps")
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device '{preferred}' was asked for but no CUDA GPU is visible; use --device cpu (or auto)"
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device '{preferred}' was asked for but MPS is not available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU ``torch.Generator`` seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
