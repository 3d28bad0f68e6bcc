"""The checkpoint file: atomic writes, safe round trips, one clear error for every bad file."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mini_imagen import checkpoint
from mini_imagen.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
    step_checkpoint_path,
)


@dataclass
class NetConfig:
    hidden: int = 8
    heads: int = 2  # changes no parameter shape, like a U-Net's attention head count


class Net(nn.Module):
    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetConfig()
        self.proj = nn.Linear(3, self.config.hidden)
        self.norm = nn.BatchNorm1d(self.config.hidden)


def a_state(model: nn.Module | None = None) -> dict:
    model = model or Net()
    optimizer = torch.optim.AdamW(model.parameters())
    model.proj.weight.sum().backward()
    optimizer.step()
    return {
        **model_fingerprint(model),
        "step": 7,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": [{"python": random.getstate(), "torch": torch.get_rng_state()}],
        "history": [{"step": 7, "loss": 0.5}],
    }


def leftovers(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


# ----------------------------------------------------------------------------- round trip
def test_round_trip_keeps_every_value(tmp_path):
    state = a_state()
    path = tmp_path / "nested" / "step_0000007.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["format"] == checkpoint.FORMAT_NAME and loaded["version"] == checkpoint.FORMAT_VERSION
    assert loaded["step"] == 7 and loaded["history"] == state["history"]
    assert loaded["rng"][0]["python"] == state["rng"][0]["python"]
    for name, tensor in state["model"].items():
        assert torch.equal(loaded["model"][name], tensor)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert leftovers(path.parent) == []  # no temp file left behind
    # The file is plain torch.save output that loads with the safe unpickler, no mini-imagen needed.
    assert torch.load(path, weights_only=True)["step"] == 7


def test_objects_that_would_not_load_safely_are_refused_at_save_time(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\] is a ndarray"):
        save_checkpoint(tmp_path / "x.pt", {"rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------- atomic writes
def test_a_write_that_dies_midway_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "step_0000001.pt"
    save_checkpoint(path, a_state())
    original = path.read_bytes()

    def dies_halfway(obj, file):  # writes some bytes, then the disk fills up
        file.write(b"PK\x03\x04 half a zip archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == original and load_checkpoint(path)["step"] == 7
    assert leftovers(tmp_path) == []


def test_a_kill_before_the_rename_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "step_0000001.pt"
    save_checkpoint(path, a_state())

    def killed(*args):
        raise KeyboardInterrupt  # the moment between "new file complete" and "renamed into place"

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 7
    assert leftovers(tmp_path) == []


def test_temp_files_are_never_taken_for_checkpoints(tmp_path):
    for step in (9, 10, 123):
        save_checkpoint(step_checkpoint_path(tmp_path, step), {"step": step})
    (tmp_path / ".step_0999999.pt.abc.tmp").write_bytes(b"a crashed write")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert [path.name for path in list_checkpoints(tmp_path)] == [
        "step_0000009.pt",
        "step_0000010.pt",
        "step_0000123.pt",
    ]
    assert latest_checkpoint(tmp_path).name == "step_0000123.pt"
    assert latest_checkpoint(tmp_path / "missing") is None


# ----------------------------------------------------------------------------- one clear error
def assert_one_clear_line(error: pytest.ExceptionInfo, *phrases: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "step_0000005.pt")
    assert_one_clear_line(error, "no checkpoint at", "step_0000005.pt")


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "step_0000001.pt"
    save_checkpoint(path, a_state())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert_one_clear_line(error, str(path), "truncated or corrupt", "delete it")


@pytest.mark.parametrize("content", [b"", b"hello, I am not a checkpoint" * 8, os.urandom(4096)])
def test_corrupt_checkpoint(tmp_path, content):
    path = tmp_path / "step_0000001.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert_one_clear_line(error, "truncated or corrupt")


def test_a_torch_file_that_is_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(Net().state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert_one_clear_line(error, "not a mini-imagen training checkpoint")


def test_a_newer_format_version(tmp_path):
    path = tmp_path / "step_0000001.pt"
    save_checkpoint(path, {"step": 1})
    state = torch.load(path, weights_only=True)
    torch.save({**state, "version": checkpoint.FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert_one_clear_line(error, "format version 2", "reads version 1")


@pytest.mark.parametrize(
    "other_model, phrase",
    [
        (Net(NetConfig(hidden=16)), "parameter_shapes: 'proj.weight' is [16, 3] here but [8, 3] in the checkpoint"),
        (Net(NetConfig(heads=4)), "model_config: 'heads' is 4 here but 2 in the checkpoint"),
        (nn.Linear(3, 8), "model_class is 'torch.nn.modules.linear.Linear' here"),
    ],
    ids=["other-shape", "other-config", "other-class"],
)
def test_checkpoint_of_another_model(tmp_path, other_model, phrase):
    path = tmp_path / "step_0000007.pt"
    save_checkpoint(path, a_state(Net()))
    assert load_checkpoint(path, expected=model_fingerprint(Net()))["step"] == 7  # the same model is fine
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, expected=model_fingerprint(other_model))
    assert_one_clear_line(error, "was saved for a different model", phrase, "use a new output_dir")
