"""The trainer: loss goes down, warmup and EMA math, exact resume after a kill, NaN stop, data parallel.

Everything runs on a toy problem (a small MLP regressing a fixed linear map from noisy inputs)
that trains in well under a second. Its loss draws from the Python, NumPy and torch RNGs,
like a diffusion loss draws timesteps and noise, so the resume test checks that all of them
are restored.
"""

from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mini_imagen.checkpoint import CheckpointError, list_checkpoints
from mini_imagen.train import (
    EpochShuffleSampler,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    ema_decay_at,
    learning_rate_at,
    update_ema,
)

TESTS_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- the toy problem
@dataclass
class ToyConfig:
    hidden: int = 32
    activation: str = "silu"


class ToyNet(nn.Module):
    def __init__(self, config: ToyConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config or ToyConfig()
        torch.manual_seed(seed)
        activation = nn.SiLU() if self.config.activation == "silu" else nn.ReLU()
        self.net = nn.Sequential(nn.Linear(4, self.config.hidden), activation, nn.Linear(self.config.hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def toy_dataset(size: int = 48) -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(size, 4, generator=generator)
    target_map = torch.randn(4, 2, generator=generator)
    return TensorDataset(x, x @ target_map)


def noisy_loss(model: nn.Module, batch) -> torch.Tensor:
    """A denoising-style loss: random input noise whose level draws from all three RNGs."""
    x, y = batch
    level = 0.05 * (1 + random.random() + float(np.random.rand()))
    return F.mse_loss(model(x + level * torch.randn_like(x)), y)


def plain_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def toy_config(folder: Path | str, **overrides) -> TrainConfig:
    settings = dict(
        steps=18,
        batch_size=8,
        learning_rate=1e-2,
        warmup_steps=3,
        ema_decay=0.9,
        log_every=1,
        checkpoint_every=0,
        device="cpu",
        output_dir=str(Path(folder) / "run"),
        progress_bar=False,
    )
    return TrainConfig(**{**settings, **overrides})


def losses(records: list[dict]) -> list[float]:
    return [record["loss"] for record in records]


# ----------------------------------------------------------------------------- it learns
def test_loss_goes_down(tmp_path):
    trainer = Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config(tmp_path, steps=60, log_every=10))
    history = trainer.train()
    assert [record["step"] for record in history] == [10, 20, 30, 40, 50, 60]
    assert history[-1]["loss"] < 0.25 * history[0]["loss"]
    assert all(record["it/s"] > 0 and math.isfinite(record["grad_norm"]) for record in history)
    assert trainer.step == 60 and list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "step_0000060.pt"


def test_warmup_learning_rate_schedule(tmp_path):
    config = toy_config(tmp_path, learning_rate=1.0, warmup_steps=4)
    assert [learning_rate_at(step, config) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate_at(0, toy_config(tmp_path, learning_rate=1.0, warmup_steps=0)) == 1.0  # no warmup

    # ... and those are the rates the optimizer really used, step by step.
    config = toy_config(tmp_path, learning_rate=0.01, warmup_steps=4)
    history = Trainer(ToyNet(), plain_loss, toy_dataset(), config).train(steps=5)
    assert [record["lr"] for record in history] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01])


def test_ema_update_by_hand():
    model, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        ema.weight.copy_(torch.tensor([0.0, 0.0, 6.0]))
        model.running_mean.fill_(5.0)
    update_ema(ema, model, decay=0.75)
    # ema = decay * ema + (1 - decay) * param, element by element
    assert torch.allclose(ema.weight, torch.tensor([0.25, 0.5, 5.25]))
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers are copied, not averaged


def test_ema_decay_warmup(tmp_path):
    config = toy_config(tmp_path, ema_decay=0.999)
    assert ema_decay_at(0, config) == pytest.approx(1 / 10)
    assert ema_decay_at(90, config) == pytest.approx(91 / 100)
    assert ema_decay_at(100_000, config) == 0.999  # capped at ema_decay
    assert ema_decay_at(0, toy_config(tmp_path, ema_decay=0.999, ema_warmup=False)) == 0.999


def test_trainer_ema_follows_the_formula(tmp_path):
    config = toy_config(tmp_path, ema_decay=0.9, ema_warmup=False)
    trainer = Trainer(ToyNet(), plain_loss, toy_dataset(), config)
    before = {name: p.clone() for name, p in trainer.model.named_parameters()}
    trainer.train(steps=1)
    for name, ema_param in trainer.ema_model.named_parameters():
        param = dict(trainer.model.named_parameters())[name]
        assert not torch.equal(param, before[name])  # the model moved ...
        assert torch.allclose(ema_param, 0.9 * before[name] + 0.1 * param)  # ... and the EMA a tenth of the way


# ----------------------------------------------------------------------------- exact resume
class Killed(Exception):
    """Stands in for SIGKILL: the run dies between two checkpoints, losing everything in memory."""


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    # 48 items / batch 8 = 6 batches an epoch; the kill at step 11 falls mid-epoch, after the
    # step-9 checkpoint, so the resumed run must also rebuild the epoch order and skip 3 batches.
    uninterrupted = Trainer(ToyNet(), noisy_loss, toy_dataset(), toy_config(tmp_path / "a"))
    expected = losses(uninterrupted.train())

    calls = []

    def dies_at_step_11(model, batch):
        calls.append(1)
        if len(calls) == 11:
            raise Killed
        return noisy_loss(model, batch)

    doomed = Trainer(ToyNet(), dies_at_step_11, toy_dataset(), toy_config(tmp_path / "b", checkpoint_every=9))
    with pytest.raises(Killed):
        doomed.train()
    del doomed

    # A new process would build everything afresh: other initial weights, a freshly seeded RNG.
    resumed = Trainer(ToyNet(seed=99), noisy_loss, toy_dataset(), toy_config(tmp_path / "b"))
    assert resumed.resume() == 9
    after_resume = losses(resumed.train())

    assert after_resume == expected[9:]  # bit for bit: same batches, same noise, same AdamW moments
    for trained, reference in [(resumed.model, uninterrupted.model), (resumed.ema_model, uninterrupted.ema_model)]:
        for a, b in zip(trained.state_dict().values(), reference.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert losses(resumed.history) == expected  # the log history survives the kill too


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    trainer = Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config(tmp_path))
    assert trainer.resume() == 0


def test_resume_refuses_another_architecture(tmp_path):
    Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config(tmp_path)).train(steps=2)
    bigger = Trainer(ToyNet(ToyConfig(hidden=64)), plain_loss, toy_dataset(), toy_config(tmp_path))
    with pytest.raises(CheckpointError, match="different model") as error:
        bigger.resume()
    assert "net.0.weight" in str(error.value) and "\n" not in str(error.value)


def test_resume_refuses_a_corrupt_latest_checkpoint(tmp_path):
    trainer = Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config(tmp_path, checkpoint_every=1))
    trainer.train(steps=2)
    latest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*delete it"):
        Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config(tmp_path)).resume()


def test_max_minutes_stops_with_a_checkpoint_and_resume_continues(tmp_path):
    import time

    def slow_loss(model, batch):  # 50 ms a step: a 0.3 s budget (0.005 min) stops after a handful of steps
        time.sleep(0.05)
        return plain_loss(model, batch)

    config = toy_config(tmp_path, steps=1000, max_minutes=0.005)
    trainer = Trainer(ToyNet(), slow_loss, toy_dataset(), config)
    trainer.train()
    assert 1 <= trainer.step < 50  # stopped by the clock, long before 1000 steps
    stopped_at = trainer.step
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == f"step_{stopped_at:07d}.pt"
    resumed = Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config(tmp_path, steps=stopped_at + 3))
    assert resumed.resume() == stopped_at
    resumed.train()
    assert resumed.step == stopped_at + 3


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    config = toy_config(tmp_path, checkpoint_every=2, keep_checkpoints=2)
    Trainer(ToyNet(), plain_loss, toy_dataset(), config).train(steps=7)
    names = [path.name for path in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step_0000006.pt", "step_0000007.pt"]  # step 7: written when train() returned


def test_sampling_does_not_change_training(tmp_path):
    def sample_fn(ema_model, step):  # draws random numbers, as any diffusion sampler does
        return ema_model(torch.randn(6, 4)).reshape(6, 1, 1, 2).tanh()

    # (One trainer after the other: trainers in one process share the global RNGs.)
    plain = losses(Trainer(ToyNet(), noisy_loss, toy_dataset(), toy_config(tmp_path / "a", steps=6)).train())
    config = toy_config(tmp_path / "b", steps=6, sample_every=2)
    assert losses(Trainer(ToyNet(), noisy_loss, toy_dataset(), config, sample_fn).train()) == plain
    samples = sorted(path.name for path in (tmp_path / "b" / "run" / "samples").iterdir())
    assert samples == ["step_0000002.png", "step_0000004.png", "step_0000006.png"]


# ----------------------------------------------------------------------------- data order
def test_data_order_is_a_function_of_seed_and_epoch():
    sampler = EpochShuffleSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and list(EpochShuffleSampler(10, seed=4)) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_batches_follow_the_seeded_epoch_order(tmp_path):
    dataset, seen = toy_dataset(), []

    def recording_loss(model, batch):
        seen.append(batch[0])
        return plain_loss(model, batch)

    loader = DataLoader(dataset, batch_size=8, shuffle=True)  # its own (global-RNG) shuffling is replaced
    Trainer(ToyNet(), recording_loss, loader, toy_config(tmp_path, steps=12)).train()
    for epoch in range(2):  # 6 batches an epoch
        sampler = EpochShuffleSampler(len(dataset), seed=0)
        sampler.set_epoch(epoch)
        assert torch.equal(torch.cat(seen[6 * epoch : 6 * epoch + 6]), dataset.tensors[0][list(sampler)])


# ----------------------------------------------------------------------------- clear failures
def test_nan_loss_stops_before_corrupting_anything(tmp_path):
    def explodes_at_step_3(model, batch):
        loss = plain_loss(model, batch)
        return loss * float("nan") if trainer.step == 2 else loss

    trainer = Trainer(ToyNet(), explodes_at_step_3, toy_dataset(), toy_config(tmp_path, checkpoint_every=1))
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 3.*Lower learning_rate") as error:
        trainer.train()
    assert error.value.step == 3 and "\n" not in str(error.value)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    names = [path.name for path in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step_0000001.pt", "step_0000002.pt"]  # nothing written for the bad step
    assert Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config(tmp_path)).resume() == 2


def test_loss_fn_must_return_a_scalar(tmp_path):
    trainer = Trainer(ToyNet(), lambda model, batch: model(batch[0]), toy_dataset(), toy_config(tmp_path))
    with pytest.raises(ValueError, match=r"scalar tensor .*shape \(8, 2\)"):
        trainer.train(steps=1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mixed_precision": "fp32"}, "mixed_precision must be one of auto, no, fp16, bf16"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda, cuda:N, mps"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"log_every": 0}, "log_every must be >= 1"),
        ({"max_minutes": -1}, "max_minutes must be >= 0"),
    ],
)
def test_bad_config_values_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        toy_config(tmp_path, **overrides)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    def checked_loss(model, batch):
        assert torch.is_autocast_enabled("cpu")  # the loss runs under autocast ...
        return plain_loss(model, batch)

    trainer = Trainer(ToyNet(), checked_loss, toy_dataset(), toy_config(tmp_path, steps=30, mixed_precision="bf16"))
    history = trainer.train()
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert next(trainer.model.parameters()).dtype == torch.float32  # ... while the weights stay fp32


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16.*needs a GPU"):
        Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config(tmp_path, mixed_precision="fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_missing_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config(tmp_path, device="cuda"))


def test_a_dataset_smaller_than_a_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        Trainer(ToyNet(), plain_loss, toy_dataset(size=5), toy_config(tmp_path))


# ----------------------------------------------------------------------------- data parallel
DDP_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests_dir!r})
from test_train import ToyNet, plain_loss, toy_config, toy_dataset
from mini_imagen.train import Trainer

trainer = Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config({out!r}, steps=9, batch_size=4))
history = trainer.train()
rank = trainer.accelerator.process_index
torch.save({{"model": trainer.model.state_dict(), "history": history, "processes": trainer.accelerator.num_processes}},
           {out!r} + f"/rank{{rank}}.pt")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_process_data_parallel_equals_one_big_batch(tmp_path):
    """`accelerate launch` with 2 CPU processes x batch 4 trains exactly like 1 process x batch 8.

    Each process gets every other batch of the shared (seed, epoch) order and DDP averages the
    gradients, so the two runs see the same 8 samples per step and must end with the same weights.
    """
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests_dir=str(TESTS_DIR), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    launch = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no"
    command = [sys.executable, *launch.split(), "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    command.append(str(script))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2]
    single = Trainer(ToyNet(), plain_loss, toy_dataset(), toy_config(tmp_path / "single", steps=9, batch_size=8))
    single_losses = losses(single.train())
    for r in ranks:
        assert losses(r["history"]) == pytest.approx(single_losses, rel=1e-5)
        for name, value in single.model.state_dict().items():
            assert torch.allclose(r["model"][name], value, atol=1e-5), name
    checkpoint = torch.load(list_checkpoints(tmp_path / "run" / "checkpoints")[-1], weights_only=True)
    assert checkpoint["step"] == 9 and len(checkpoint["rng"]) == 2  # one RNG snapshot per process
