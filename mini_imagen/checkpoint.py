"""Training checkpoints: one file, written atomically, checked before it is trusted.

A training run can be killed at any moment (a preempted cloud GPU, a closed laptop, Ctrl-C).
A checkpoint is what lets it continue *exactly* where it stopped, so it holds everything the
next step depends on: the model, the EMA copy, the optimizer's moments, the step counter, the
position in the data and the state of every random number generator (see ``train.py``).

Three rules make checkpoints safe to rely on:

1. **Atomic writes.** The state is written to a temporary file in the same folder, flushed to
   disk (``fsync``) and only then renamed over the destination with ``os.replace``. A rename
   within one file system is atomic on POSIX and Windows: a reader sees the old file or the
   new one, never half of each. A crash mid-write leaves the previous checkpoint untouched.
2. **One file.** Weights, optimizer and RNG state travel together, so one rename commits all
   of them. (Two files, e.g. ``model.safetensors`` + ``optimizer.pt``, could be torn apart by a
   crash between the two renames.) The finished *model* is exported separately as
   ``model.safetensors`` by the cascade's ``save_pretrained``; this file is for resuming.
3. **Safe, checked loads.** The file is ``torch.save`` output whose content is restricted to
   tensors, numbers, strings, ``None`` and lists/tuples/dicts of them, so it loads with
   ``torch.load(weights_only=True)``: unpickling can build only those types and cannot run
   code hidden in a downloaded file. A file that is missing, truncated or garbled, or that was
   saved for another model (another class, parameter shape or config value), is refused with a
   one-line ``CheckpointError`` saying what is wrong and what to do. (Flipped bits *inside*
   tensor data are not detected: there is no checksum over the bytes.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FORMAT_NAME = "mini-imagen-checkpoint"
FORMAT_VERSION = 1

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or made for another model."""


# ----------------------------------------------------------------------------- writing
def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    ``state`` may hold only tensors, numbers, strings, ``None`` and lists/tuples/dicts of them
    (anything else would not load with ``weights_only=True``); a ``TypeError`` names the
    offending entry. ``format`` and ``version`` entries are added so loads can recognise the file.
    """
    _check_plain(state, "state")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file must live in the destination folder: os.replace is only atomic within
    # one file system. Its name starts with "." so it never looks like a checkpoint.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save({"format": FORMAT_NAME, "version": FORMAT_VERSION, **state}, file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp_name, path)  # the commit point: old file or new file, never a mix
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # make the rename itself survive a power cut


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder for fsync; its rename is durable enough
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is made only of types ``weights_only`` loading accepts."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint entry {where} has a key of type {type(key).__name__}; use str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__name__}; store only tensors, numbers, strings, "
        "None and lists/tuples/dicts of them (convert arrays with torch.as_tensor, objects with .tolist())"
    )


# ----------------------------------------------------------------------------- reading
def load_checkpoint(path: str | Path, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, refusing anything that is not a sound one.

    ``expected`` lists entries that must equal the saved ones, typically
    ``model_fingerprint(model)``. Every failure is a ``CheckpointError`` with a one-line message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; check the path, or start training without resuming")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises OSError, EOFError, KeyError, UnpicklingError, ... here
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(error).__name__} while reading it); "
            "delete it to resume from the previous checkpoint, or start over without resuming"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a mini-imagen training checkpoint; point at a step_*.pt file")
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('version')}, this mini-imagen reads "
            f"version {FORMAT_VERSION}; use the mini-imagen that wrote it, or start over"
        )
    for key, wanted in (expected or {}).items():
        saved = state.get(key)
        if saved != wanted:
            raise CheckpointError(
                f"{path} was saved for a different model ({_describe_difference(key, saved, wanted)}); "
                "use a new output_dir for this model, or start over without resuming"
            )
    return state


def _describe_difference(key: str, saved: Any, wanted: Any) -> str:
    """The first thing that differs, in words, e.g. "parameter_shapes: 'conv.weight' is [8, 3] here but [4, 3] ..."."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for name in wanted:
            if name not in saved:
                return f"{key}: '{name}' is missing from the checkpoint"
            if saved[name] != wanted[name]:
                return f"{key}: '{name}' is {wanted[name]} here but {saved[name]} in the checkpoint"
        extra = next(name for name in saved if name not in wanted)
        return f"{key}: the checkpoint has '{extra}', which this model lacks"
    return f"{key} is {wanted!r} here but {saved!r} in the checkpoint"


# ----------------------------------------------------------------------------- matching a model
def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into ``model``: class, parameter shapes, config.

    The shapes catch most architecture changes; the config catches the rest (e.g. another
    number of attention heads, which changes no shape). ``model_config`` is the model's
    dataclass ``config`` attribute as plain JSON values, or None for models without one.
    """
    config = getattr(model, "config", None)
    model_config = None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        model_config = json.loads(json.dumps(dataclasses.asdict(config), default=str))  # tuples -> lists, etc.
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameter_shapes": {name: list(tensor.shape) for name, tensor in model.state_dict().items()},
        "model_config": model_config,
    }


# ----------------------------------------------------------------------------- naming
def step_checkpoint_path(directory: str | Path, step: int) -> Path:
    """``directory/step_0000500.pt``: zero-padded so names sort in step order."""
    return Path(directory) / f"step_{step:07d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The ``step_*.pt`` files in ``directory``, oldest step first (temp files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir() if (match := _STEP_FILE.match(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or None if there is none."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None
