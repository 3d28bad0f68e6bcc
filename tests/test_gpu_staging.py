"""scripts/gpu: the int8 MiniLM that travels to a lent GPU comes back as the same model, within int8 error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load, save

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "gpu"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shrink_then_unpack_restores_every_tensor_within_int8_error():
    stage, unstage = script("stage"), script("unstage")
    generator = torch.Generator().manual_seed(0)
    weights = {
        "embeddings.word_embeddings.weight": torch.randn(10, 64, generator=generator),
        "encoder.layer.0.attention.self.query.weight": torch.randn(64, 64, generator=generator) * 0.05,
        "encoder.layer.0.attention.self.query.bias": torch.randn(64, generator=generator),
        "embeddings.position_ids": torch.arange(8)[None],
    }
    packed = stage.shrink(weights, keep_rows={0, 3})
    assert packed["encoder.layer.0.attention.self.query.weight.q8"].dtype == torch.int8
    restored = unstage.unpack(load(save(packed)))  # through the bytes that travel
    assert set(restored) == set(weights)
    for name, value in weights.items():
        assert restored[name].shape == value.shape and restored[name].dtype == value.dtype, name
    assert torch.equal(restored["embeddings.position_ids"], weights["embeddings.position_ids"])
    query = weights["encoder.layer.0.attention.self.query.weight"]
    error = (restored["encoder.layer.0.attention.self.query.weight"] - query).abs()
    assert error.max() <= query.abs().max() / 127  # half a step of the coarsest group scale, at most, plus fp16
    assert 0 < error.mean() < 1e-3
    table = restored["embeddings.word_embeddings.weight"]
    assert table[[1, 2, 4]].abs().sum() == 0  # rows no caption uses are dropped ...
    assert torch.allclose(table[[0, 3]], weights["embeddings.word_embeddings.weight"][[0, 3]], atol=0.03)  # ... kept rows stay
