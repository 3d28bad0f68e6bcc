"""What makes a resumed training run equal an uninterrupted one (the trainer's "exact resume", ``train.py``).

A checkpoint at step t must hold everything step t+1 depends on. Weights, EMA weights and optimizer moments
are tensors the trainer saves; two more things are easy to forget:

* **randomness**: every generator a step draws from (Python's, NumPy's, torch's on the CPU and on the GPU),
  snapshotted by ``rng_state`` and put back by ``set_rng_state``;
* **the data order**: ``EpochShuffleSampler`` makes the order of each epoch a pure function of
  (seed, epoch), so a checkpoint stores only (epoch, batches done) and the order is rebuilt, not stored.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

if TYPE_CHECKING:
    from mini_imagen.train import TrainConfig


# ----------------------------------------------------------------------------- randomness
def rng_state() -> dict[str, Any]:
    """A snapshot of every random number generator a training step may draw from."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": keys.tolist(), "pos": position, "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: one per process under DDP
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back to a snapshot taken by ``rng_state``."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    keys = np.array(numpy["keys"], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# ----------------------------------------------------------------------------- data
class EpochShuffleSampler(Sampler[int]):
    """Dataset indices in a shuffled order that depends only on (seed, epoch).

    A resumed run rebuilds the order of any epoch instead of storing it. Accelerate calls
    ``set_epoch`` when a pass starts, and under data parallelism gives each process every N-th
    batch of this one shared order.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        # A private generator seeded with (seed, epoch): the global RNGs are never touched.
        return iter(np.random.default_rng((self.seed, self.epoch)).permutation(self.size).tolist())


def build_dataloader(data: Dataset | DataLoader, config: TrainConfig) -> DataLoader:
    """A DataLoader whose batches depend only on (seed, epoch).

    ``data`` is a map-style dataset (anything with ``__len__`` and ``__getitem__``), batched with
    ``config.batch_size`` and ``config.num_workers``; or a DataLoader, whose dataset, batch size,
    collate_fn, workers and drop_last are kept while its sampling is replaced by
    ``EpochShuffleSampler`` (a plain shuffled loader draws its order from the global RNG).
    """
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            raise ValueError(
                "the Trainer shuffles and batches itself; pass a DataLoader made with batch_size=..., or the Dataset"
            )
        dataset, batch_size, drop_last = data.dataset, data.batch_size, data.drop_last
        collate_fn, num_workers, pin_memory = data.collate_fn, data.num_workers, data.pin_memory
    else:
        dataset, batch_size, drop_last = data, config.batch_size, True
        collate_fn, num_workers, pin_memory = None, config.num_workers, False
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            f"the Trainer needs a map-style dataset (with __len__ and __getitem__) to shuffle and resume exactly; "
            f"got {type(dataset).__name__}"
        )
    if len(dataset) == 0 or (drop_last and len(dataset) < batch_size):
        raise ValueError(
            f"the dataset has {len(dataset)} items, fewer than one batch of {batch_size}; lower batch_size"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), config.seed),
        drop_last=drop_last,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(config.seed),  # worker seeds come from here, not the global RNG
    )
