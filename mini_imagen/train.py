"""The trainer: one diffusion model at a time, resumable to the exact step.

Imagen trains every model of its cascade as a separate run (Saharia et al., 2022, sec. 2.4
and App. F): the base model and each super-resolution model get their own optimizer and
their own schedule. ``Trainer`` is one such run, and it is generic over *what* it trains:
hand it a model and ``loss_fn(model, batch) -> scalar loss`` and it does the rest.

One optimizer step (``Trainer._train_step``), with the diffusion-training choices of DDPM
(Ho et al., 2020: EMA weights in App. B, gradient-norm clipping at 1 in its code) and Imagen
(App. F: a learning rate of 1e-4 reached by 10,000 linear warmup steps, then held; Adam for
the super-resolution models and Adafactor for the base model, where we use AdamW for both):

    lr_t   = lr * min(1, (t + 1) / warmup_steps)            linear warmup, then constant
    loss   = loss_fn(model, batch)                          under autocast (bf16/fp16) on a GPU
             stop with NonFiniteLossError if it is NaN/inf   (before any weight changes)
    g      = grad(loss);  g <- g * min(1, c / ||g||)        clip the global gradient norm at c
    theta  <- AdamW(theta, g, lr_t)
    theta_ema <- b * theta_ema + (1 - b) * theta            EMA weights: the ones to sample from

Around it: a tqdm bar (loss, it/s), a log record every ``log_every`` steps, a sample grid
from the EMA model every ``sample_every`` steps, and a checkpoint every ``checkpoint_every``.

**Exact resume.** A checkpoint at step t holds everything step t+1 depends on: weights, EMA
weights, AdamW moments, the fp16 GradScaler, the position in the data and the state of every
random number generator (Python, NumPy, torch CPU, CUDA/MPS), so a killed run continues with
the very losses an uninterrupted run would have seen. The data order is a pure function of
(seed, epoch) (``EpochShuffleSampler``, in ``resumable.py`` with the RNG snapshots) and the
checkpoint stores (epoch, batches done), so the order is rebuilt rather than stored. The loader owns its generator, so starting an epoch never
draws from the global RNG that ``loss_fn`` uses for timesteps and noise.

**Devices and scale.** Hugging Face Accelerate places the model on the device (cuda, mps or
cpu, chosen by ``pick_device`` or ``config.device``), runs autocast and the GradScaler, and under
``accelerate launch --num_processes N`` wraps the model in DistributedDataParallel and hands
each process every N-th batch. The loop below is the same in every case; there is no code
path of its own for distribution. (On a machine without GPUs, launch N CPU processes with
``accelerate launch --multi_gpu --num_processes N``: torchrun plus the gloo backend.)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import gather_object
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # the plain bar: tqdm.notebook would need ipywidgets

from mini_imagen.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
    step_checkpoint_path,
)
from mini_imagen.resumable import (  # noqa: F401 (EpochShuffleSampler is part of this module's API)
    EpochShuffleSampler,
    build_dataloader,
    rng_state,
    set_rng_state,
)
from mini_imagen.runtime import pick_device, seed_everything

MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """One training run of one stage. Defaults are DDPM/Imagen choices at course scale."""

    steps: int = 1000  # total optimizer steps of the run
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time; 0 = no limit (Colab sessions)
    batch_size: int = 32  # per process; used when `data` is a Dataset (a DataLoader keeps its own)
    learning_rate: float = 2e-4  # peak AdamW learning rate (DDPM App. B)
    warmup_steps: int = 100  # linear warmup from ~0 to learning_rate (Imagen App. F uses 10k)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    ema_decay: float = 0.999  # b in theta_ema <- b * theta_ema + (1 - b) * theta
    ema_warmup: bool = True  # b_t = min(b, (1 + t) / (10 + t)): early averages forget the random init
    mixed_precision: str = "auto"  # "auto" (CUDA: bf16 if supported, else fp16; else "no") | "no" | "fp16" | "bf16"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    seed: int = 0
    log_every: int = 50
    sample_every: int = 0  # 0 = never
    checkpoint_every: int = 500  # 0 = only when train() returns
    keep_checkpoints: int = 2  # newest step_*.pt files kept in output_dir/checkpoints/
    output_dir: str = "runs/default"
    num_workers: int = 0  # DataLoader worker processes; used when `data` is a Dataset
    progress_bar: bool | None = None  # None = only on an interactive terminal or in a notebook

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # YAML and JSON give a list
        _require(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _require(self.max_minutes >= 0, f"max_minutes must be >= 0 (0 = no time limit), got {self.max_minutes}")
        _require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(
            len(self.adam_betas) == 2 and all(0 <= beta < 1 for beta in self.adam_betas),
            f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}",
        )
        _require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        _require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (typically 0.999-0.9999), got {self.ema_decay}")
        _require(
            self.mixed_precision in MIXED_PRECISION_CHOICES,
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}; got {self.mixed_precision!r}",
        )
        _require(
            self.device.split(":")[0] in DEVICE_CHOICES,
            f"device must be one of auto, cpu, cuda, cuda:N, mps; got {self.device!r}",
        )
        for name in ("log_every", "keep_checkpoints"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sample_every", "checkpoint_every", "num_workers"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training stops before the weights do."""

    def __init__(self, what: str, value: float, step: int, learning_rate: float) -> None:
        self.step, self.value = step, value
        super().__init__(
            f"{what} is {value} at step {step}; stopped before updating the weights, and the checkpoints "
            f"on disk are from earlier steps. Lower learning_rate (now {learning_rate:g}), lengthen "
            "warmup_steps, or use mixed_precision 'bf16' or 'no' instead of 'fp16'"
        )


# ----------------------------------------------------------------------------- schedules
def learning_rate_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, then constant."""
    if config.warmup_steps == 0:
        return config.learning_rate
    # $\eta_t = \eta \cdot \min(1, (t + 1) / T_{warmup})$: the first step already moves a little.
    return config.learning_rate * min(1.0, (step + 1) / config.warmup_steps)


def ema_decay_at(step: int, config: TrainConfig) -> float:
    """The EMA decay used after optimizer step ``step`` (0-based).

    With ``ema_warmup`` it is $\\beta_t = \\min(\\beta, (1 + t) / (10 + t))$, the schedule of
    TensorFlow's ``ExponentialMovingAverage(num_updates=t)`` and diffusers' ``EMAModel``: 0.1 at
    t = 0, so the average does not stay stuck near the random initial weights for ~1/(1-b) steps.
    """
    if not config.ema_warmup:
        return config.ema_decay
    return min(config.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """Move every EMA parameter towards the live one; copy buffers (e.g. norm statistics) as they are."""
    for ema_param, param in zip(ema_model.parameters(), model.parameters(), strict=True):
        # $\theta_{ema} \leftarrow \beta\,\theta_{ema} + (1-\beta)\,\theta$   (lerp: a + w (b - a), w = 1 - beta)
        ema_param.lerp_(param.detach(), 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers(), strict=True):
        ema_buffer.copy_(buffer)


# ----------------------------------------------------------------------------- devices
def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete choice for ``device``: bf16 on CUDA if supported, else fp16; "no" elsewhere."""
    if choice == "auto":
        if device.type != "cuda":
            return "no"  # CPU autocast is slow, and fp16 on MPS is not worth the trouble at this scale
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "fp16" and device.type == "cpu":
        raise ValueError("mixed_precision='fp16' needs a GPU; on the CPU use 'bf16' or 'no'")
    return choice


def _make_accelerator(config: TrainConfig) -> Accelerator:
    device = pick_device(config.device)  # "auto" picks cuda, then mps, then cpu; a missing device is a clear error
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # "cuda:N": make N the current device that Accelerate uses
    if not torch.distributed.is_initialized():
        # Accelerate keeps device and precision in process-wide singletons. Outside a distributed
        # launch there is nothing to share, so start clean: each Trainer gets what its config says
        # (a notebook may train on the CPU first and on the GPU later).
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    mixed_precision = resolve_mixed_precision(config.mixed_precision, device)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Trains one model by minimising ``loss_fn(model, batch)``; resumable and data parallel.

        trainer = Trainer(unet, loss_fn, dataset, TrainConfig(steps=2000, output_dir="runs/base"))
        trainer.resume()             # continue a killed run if output_dir has a checkpoint
        history = trainer.train()    # [{"step": 50, "loss": 0.31, "lr": ..., "grad_norm": ..., "it/s": ...}, ...]
        images = my_sampler(trainer.ema_model)

    ``sample_fn(ema_model, step)`` returns an image tensor ((B, C, H, W) in [-1, 1]) or a PIL
    image, saved as ``output_dir/samples/step_XXXXXXX.png``. Checkpoints go to
    ``output_dir/checkpoints/step_XXXXXXX.pt``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        data: Dataset | DataLoader,
        config: TrainConfig | None = None,
        sample_fn: Callable[[nn.Module, int], Any] | None = None,
    ) -> None:
        self.config = config = config or TrainConfig()
        self.loss_fn, self.sample_fn = loss_fn, sample_fn
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.accelerator = _make_accelerator(config)
        # Each process draws its own timesteps and noise; a resumed run restores these states.
        seed_everything(config.seed + self.accelerator.process_index)

        optimizer = torch.optim.AdamW(
            [param for param in model.parameters() if param.requires_grad],
            lr=learning_rate_at(0, config),
            betas=config.adam_betas,
            weight_decay=config.weight_decay,
        )
        self.ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # copied before Accelerate patches `model`
        # `prepare` moves everything to the device; under DDP it wraps the model and shards the data.
        self.train_model, self.optimizer, self.loader = self.accelerator.prepare(
            model, optimizer, build_dataloader(data, config)
        )
        self.model = model  # the bare module: its weights are the ones `train_model` updates
        # Start the average at the initial weights (under DDP: process 0's, which DDP just broadcast).
        self.ema_model.to(self.accelerator.device).load_state_dict(model.state_dict())

        self.step = 0  # optimizer steps taken
        self.epoch = 0  # data position: the current epoch and how many of its batches were used
        self.batch_in_epoch = 0
        self.history: list[dict[str, float]] = []  # every log record of the run, across resumes
        self._batches: Iterator[Any] | None = None
        self._saved_step = -1

    # --- the loop ------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> list[dict[str, float]]:
        """Take ``steps`` more optimizer steps (default: up to ``config.steps``); return their log records.

        A checkpoint is written every ``checkpoint_every`` steps and when the call returns.
        """
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        config = self.config
        end = config.steps if steps is None else self.step + steps
        if self._batches is None:
            self._batches = self._batch_stream()
        self.train_model.train()
        records: list[dict[str, float]] = []
        window_losses: list[float] = []
        window_start = time.perf_counter()
        deadline = window_start + 60 * config.max_minutes if config.max_minutes else math.inf
        with tqdm(total=end, initial=self.step, disable=not self._show_progress(), desc="train") as bar:
            while self.step < end:
                if deadline < math.inf and self._out_of_time(deadline):  # stop cleanly: the checkpoint below keeps it
                    if self.accelerator.is_main_process:
                        print(f"stopped at step {self.step}/{end}: max_minutes={config.max_minutes:g} reached", flush=True)
                    break
                loss, grad_norm = self._train_step(next(self._batches))
                self.step += 1
                window_losses.append(loss)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if self.step % config.log_every == 0 or self.step == end:
                    seconds = time.perf_counter() - window_start
                    record = {
                        "step": self.step,
                        "loss": sum(window_losses) / len(window_losses),
                        "lr": learning_rate_at(self.step - 1, config),
                        "grad_norm": grad_norm,
                        "it/s": len(window_losses) / max(seconds, 1e-9),
                    }
                    records.append(record)
                    self.history.append(record)
                    if bar.disable and self.accelerator.is_main_process:  # no bar (not a terminal): log lines
                        print(f"step {self.step}/{end}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                              f"{record['it/s']:.2f} it/s", flush=True)
                    window_losses, window_start = [], time.perf_counter()
                if config.sample_every and self.step % config.sample_every == 0:
                    self.save_samples()
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
        if self.step > 0 and self._saved_step != self.step:
            self.save_checkpoint()
        return records

    def _out_of_time(self, deadline: float) -> bool:
        """Past ``deadline`` on any process? All of them stop at the same step (under data parallelism one
        process stopping alone would leave the others waiting forever at the next gradient all-reduce)."""
        if self.accelerator.num_processes == 1:  # nothing to agree on: no device round trip every step
            return time.perf_counter() > deadline
        late = torch.tensor([float(time.perf_counter() > deadline)], device=self.accelerator.device)
        return bool(self.accelerator.gather(late).max() > 0)

    def _train_step(self, batch: Any) -> tuple[float, float]:
        """One optimizer step; returns (loss averaged over processes, gradient norm before clipping)."""
        config, accelerator = self.config, self.accelerator
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(self.step, config)
        with accelerator.autocast():
            loss = self.loss_fn(self.train_model, batch)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar tensor (reduce it with .mean()); got {_describe(loss)}")
        # The check uses the loss of *every* process, so all of them stop together (one stopping
        # alone would leave the others waiting forever at the next gradient all-reduce).
        mean_loss = accelerator.gather(loss.detach().float()).mean().item()
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError("the loss", mean_loss, self.step + 1, config.learning_rate)

        accelerator.backward(loss)  # under fp16: scaled by the GradScaler; under DDP: all-reduced
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        # $g \leftarrow g \cdot \min(1, c / \lVert g \rVert)$; returns $\lVert g \rVert$ before clipping.
        grad_norm = float(accelerator.clip_grad_norm_(self.train_model.parameters(), max_norm))
        # Under fp16 an inf norm is routine: the GradScaler skips that step and lowers its scale.
        if not math.isfinite(grad_norm) and accelerator.scaler is None:
            raise NonFiniteLossError("the gradient norm", grad_norm, self.step + 1, config.learning_rate)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema_model, self.model, ema_decay_at(self.step, config))
        return mean_loss, grad_norm

    def _batch_stream(self) -> Iterator[Any]:
        """Batches forever, epoch after epoch, starting at the stored (epoch, batch_in_epoch)."""
        while True:
            self.loader.set_epoch(self.epoch)  # selects this epoch's shuffle order
            loader = self.loader
            if self.batch_in_epoch > 0:  # resuming mid-epoch: skip the indices already used
                loader = self.accelerator.skip_first_batches(self.loader, self.batch_in_epoch)
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _show_progress(self) -> bool:
        if not self.accelerator.is_main_process:
            return False
        if self.config.progress_bar is not None:
            return self.config.progress_bar
        return sys.stderr.isatty() or "ipykernel" in sys.modules

    # --- samples -------------------------------------------------------------------------------
    def save_samples(self) -> Path | None:
        """Save ``sample_fn(ema_model, step)`` as ``output_dir/samples/step_XXXXXXX.png`` (main process).

        The RNG states are restored afterwards, so sampling never changes what training draws
        next: a run with sample grids trains exactly like one without.
        """
        if self.sample_fn is None or not self.accelerator.is_main_process:
            return None
        saved_rng = rng_state()
        try:
            with torch.no_grad():
                images = self.sample_fn(self.ema_model, self.step)
        finally:
            set_rng_state(saved_rng)
        path = self.output_dir / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_image_grid(images, path)
        return path

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the whole training state atomically (default ``output_dir/checkpoints/step_XXXXXXX.pt``).

        Under data parallelism every process must call it: each contributes its RNG state, and
        the main process alone writes the file.
        """
        path = Path(path) if path is not None else step_checkpoint_path(self.checkpoint_dir, self.step)
        rng_states = gather_object([rng_state()])  # one snapshot per process, in process order
        if self.accelerator.is_main_process:
            scaler = self.accelerator.scaler
            state = {
                **model_fingerprint(self.model),  # checked on load: class, parameter shapes, config
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "num_processes": self.accelerator.num_processes,
                "model": self.model.state_dict(),
                "ema_model": self.ema_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states,
                "history": self.history,
                "train_config": dataclasses.asdict(self.config),
            }
            save_checkpoint(path, state)
            for old in list_checkpoints(self.checkpoint_dir)[: -self.config.keep_checkpoints]:
                old.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        self._saved_step = self.step
        return path

    def resume(self, path: str | Path | None = None) -> int:
        """Restore a checkpoint (default: the newest in ``output_dir/checkpoints``); return its step.

        With no ``path`` and no checkpoint yet this does nothing and returns the current step, so
        ``trainer.resume(); trainer.train()`` both starts and continues a run. A missing, corrupt
        or mismatched checkpoint raises ``CheckpointError``.
        """
        if path is None:
            path = latest_checkpoint(self.checkpoint_dir)
            if path is None:
                return self.step
        state = load_checkpoint(path, expected=model_fingerprint(self.model))
        self.model.load_state_dict(state["model"])
        self.ema_model.load_state_dict(state["ema_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and state["grad_scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.step, self.epoch, self.history = state["step"], state["epoch"], list(state["history"])
        # Batches are counted per process; with a different process count, convert (approximately).
        saved_processes, processes = state["num_processes"], self.accelerator.num_processes
        self.batch_in_epoch = state["batch_in_epoch"] * saved_processes // processes
        self._batches = None  # the next train() restarts the data stream at this position
        self._saved_step = self.step
        if len(state["rng"]) == processes:
            set_rng_state(state["rng"][self.accelerator.process_index])
        else:
            warnings.warn(
                f"{path} was written by {saved_processes} processes and this run has {processes}; "
                "training continues, but not with the exact data order and random draws of the original run",
                stacklevel=2,
            )
        return self.step


# ----------------------------------------------------------------------------- helpers
def _save_image_grid(images: Any, path: Path) -> None:
    """Save a PIL image, or an image tensor ((B, C, H, W) or (C, H, W), values in [-1, 1]) as a grid."""
    if isinstance(images, Tensor):
        images = images.detach().float().cpu()
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"sample_fn returned a tensor of shape {tuple(images.shape)}; expected (B, C, H, W)")
        nrow = math.ceil(math.sqrt(images.shape[0]))  # a near-square grid
        torchvision.utils.save_image((images.clamp(-1, 1) + 1) / 2, path, nrow=nrow)
    elif hasattr(images, "save"):
        images.save(path)
    else:
        raise TypeError(f"sample_fn must return an image tensor in [-1, 1] or a PIL image; got {_describe(images)}")


def _describe(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"
