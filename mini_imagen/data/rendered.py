"""Draw a data set once, keep it as bytes: for a GPU that trains faster than the CPU draws.

``SceneDataset`` draws every scene on the fly (about 1,500 a second on one CPU core). A CPU
training run never notices, but a GPU step on a batch of 256 takes a few milliseconds, and a
Colab machine has two CPU cores: the GPU would wait for the drawing. ``render_all`` draws each
item once, with every core, and keeps the images as ``uint8`` (the scenes are drawn into 8-bit
RGB anyway, so nothing is lost): 200,000 scenes at 64 px are 2.5 GB instead of 10 GB of floats.
With ``cache_dir`` the bytes also go to disk, so the next run (or another stage of the cascade,
trained in parallel) memory-maps them instead of drawing again.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset


class RenderedDataset(Dataset):
    """Images kept as ``uint8`` (N, 3, H, W) plus their captions; items look like ``SceneDataset``'s."""

    def __init__(self, images: Tensor, captions: Sequence[str]):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(captions):
            raise ValueError(f"need uint8 images (N, 3, H, W) and N captions; got {images.dtype} "
                             f"{tuple(images.shape)} and {len(captions)} captions")
        self.images, self.captions = images, list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # [0, 255] -> [-1, 1], exactly the floats the drawing code returns
        return {"image": self.images[index].float() / 127.5 - 1.0, "caption": self.captions[index]}


def collate_rendered(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"image": (B, 3, H, W), "caption": [str] * B}``."""
    return {"image": torch.stack([s["image"] for s in samples]), "caption": [s["caption"] for s in samples]}


_SOURCE: Dataset | None = None  # the data set being drawn, inherited by the worker processes


def _draw_range(bounds: tuple[int, int]) -> tuple[Tensor, list[str]]:
    torch.set_num_threads(1)
    items = [_SOURCE[i] for i in range(*bounds)]
    images = torch.stack([((item["image"] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8) for item in items])
    return images, [item["caption"] for item in items]


def cache_key(dataset: Dataset) -> str:
    """A name for ``dataset``'s drawing: its class, its config and its length (same key, same pixels)."""
    config = getattr(dataset, "config", None)
    described = json.dumps({"class": type(dataset).__name__, "length": len(dataset),
                            "config": repr(config)}, sort_keys=True)
    return f"{type(dataset).__name__.lower()}-{hashlib.sha256(described.encode()).hexdigest()[:16]}"


def render_all(dataset: Dataset, workers: int | None = None, cache_dir: str | Path | None = None,
               chunk: int = 1000) -> RenderedDataset:
    """Every item of ``dataset`` drawn once (``workers`` processes, default: every core), as a ``RenderedDataset``.

    With ``cache_dir``, a drawing saved there earlier under the same ``cache_key`` is memory-mapped
    instead of drawn; a new drawing is written there atomically (a temporary file, then a rename).
    """
    global _SOURCE
    path = Path(cache_dir) / f"{cache_key(dataset)}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        saved = torch.load(path, mmap=True, weights_only=True)
        return RenderedDataset(saved["images"], saved["captions"])
    workers = workers or os.cpu_count() or 1
    ranges = [(start, min(start + chunk, len(dataset))) for start in range(0, len(dataset), chunk)]
    _SOURCE = dataset
    try:
        if workers == 1:
            parts = [_draw_range(bounds) for bounds in ranges]
        else:  # fork: the workers inherit the data set instead of unpickling it
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_draw_range, ranges)
    finally:
        _SOURCE = None
    rendered = RenderedDataset(torch.cat([images for images, _ in parts]),
                               [caption for _, captions in parts for caption in captions])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": rendered.images, "captions": rendered.captions}, partial)
        os.replace(partial, path)
    return rendered
