"""The frozen text encoder (matches sentence-transformers, never trains, caches, warns, fails fast offline)."""

import socket
import time
import warnings

import pytest
import torch

from mini_imagen.text import (
    FrozenTextEncoder,
    PrecomputedTextEncoder,
    PromptTruncatedWarning,
    ScratchTextEncoder,
    TextEmbeddings,
    TextEncoderUnavailableError,
    bundled_model_path,
    hub_is_reachable,
    load_text_encoder,
    mean_pool,
    precompute_text_embeddings,
)

PROMPTS = ["a red circle above a blue square", "two green stars", "an image showing 2 violet triangles"]


@pytest.fixture(scope="module")
def encoder() -> FrozenTextEncoder:
    return load_text_encoder(max_length=32, device="cpu")


# ----------------------------------------------------------------------------- what comes out
def test_shapes_and_mask(encoder):
    text = encoder.encode(PROMPTS)
    assert encoder.dim == 384
    assert text.tokens.shape == (3, 32, 384) and text.mask.shape == (3, 32) and text.pooled.shape == (3, 384)
    assert text.mask.dtype == torch.bool and text.tokens.dtype == torch.float32
    lengths = [len(ids) for ids in encoder.tokenizer(PROMPTS)["input_ids"]]  # [CLS] words [SEP]
    assert text.mask.sum(dim=1).tolist() == lengths
    assert all(text.mask[i, :n].all() and not text.mask[i, n:].any() for i, n in enumerate(lengths))
    assert (text.tokens[~text.mask] == 0).all()  # padding carries no signal
    assert torch.allclose(text.pooled, mean_pool(text.tokens, text.mask))


def test_matches_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(bundled_model_path()), device="cpu")
    normalized = FrozenTextEncoder(max_length=32, device="cpu", normalize_pooled=True)
    expected = torch.from_numpy(reference.encode(PROMPTS))  # mean pooling + L2 normalisation
    assert torch.allclose(normalized.encode(PROMPTS).pooled, expected, atol=1e-5)
    text = encoder.encode(PROMPTS)
    for row, expected_tokens in enumerate(reference.encode(PROMPTS, output_value="token_embeddings")):
        assert torch.allclose(text.tokens[row, : len(expected_tokens)], expected_tokens, atol=1e-5)


def test_encoder_is_frozen(encoder):
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert not isinstance(encoder, torch.nn.Module)  # no optimizer can ever see its weights
    with torch.enable_grad():
        text = encoder.encode(["a yellow cross"])
    assert not text.tokens.requires_grad and not text.pooled.requires_grad


def test_identical_prompts_give_identical_embeddings(encoder):
    first = encoder.encode(PROMPTS)
    encoder.clear_cache()
    again = encoder.encode(PROMPTS)  # recomputed from scratch
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.pooled, again.pooled)
    alone = encoder.encode(["two green stars"])  # batch company does not matter either
    assert torch.allclose(alone.tokens[0], first.tokens[1], atol=1e-5)


def test_cache_skips_the_model_for_known_prompts(encoder, monkeypatch):
    encoder.clear_cache()
    calls = []
    forward = encoder.model.forward
    monkeypatch.setattr(encoder.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    first = encoder.encode(["a pink diamond", "a white star", "a pink diamond"])
    assert len(calls) == 1 and encoder.cache_info().misses == 2
    second = encoder.encode(["a white star", "a pink diamond"])
    assert len(calls) == 1 and encoder.cache_info().hits == 2  # no new forward pass
    assert torch.equal(second.tokens[0], first.tokens[1])
    monkeypatch.setattr(encoder, "cache_size", 2)
    encoder.encode(["a blue cross"])  # evicts the least recently used prompt ("a white star")
    encoder.encode(["a white star"])
    assert len(calls) == 3 and encoder.cache_info().currsize == 2


def test_long_prompts_are_truncated_with_a_warning(encoder):
    with pytest.warns(PromptTruncatedWarning, match="max_length=32"):
        text = encoder.encode(["a red circle " * 20])
    assert text.mask.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(["a short prompt"])


@pytest.mark.parametrize("prompts", [[""], ["   \n"], [], ["a red circle", " "]])
def test_empty_prompts_are_rejected(encoder, prompts):
    with pytest.raises(ValueError, match="prompt"):
        encoder.encode(prompts)


# ----------------------------------------------------------------------------- other encoders, offline
def test_hub_encoder_offline_fails_fast_with_one_line():
    start = time.perf_counter()
    with pytest.raises(TextEncoderUnavailableError) as error:
        FrozenTextEncoder("google/t5-v1_1-base")
    assert time.perf_counter() - start < 5
    assert "\n" not in str(error.value) and "google/t5-v1_1-base" in str(error.value)


def test_unreachable_hub_is_detected_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as closed:  # a free local port with nothing listening
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    assert not hub_is_reachable()
    with pytest.raises(TextEncoderUnavailableError, match="cannot be reached"):
        FrozenTextEncoder("t5-small")
    assert time.perf_counter() - start < 5
    with socket.socket() as server:  # and a listening one is seen as reachable
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_is_reachable(timeout=1.0)


def test_load_text_encoder_shares_one_instance(encoder):
    assert load_text_encoder(max_length=32, device="cpu") is encoder


# ----------------------------------------------------------------------------- helpers
def test_text_embeddings_helpers(encoder):
    text = encoder.encode(PROMPTS)
    assert len(text) == 3 and len(text[0]) == 1 and len(text[1:]) == 2
    assert torch.equal(TextEmbeddings.cat([text[0], text[1:]]).tokens, text.tokens)
    half = text.to("cpu", torch.float16)
    assert half.tokens.dtype == half.pooled.dtype == torch.float16 and half.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="shapes disagree"):
        TextEmbeddings(text.tokens, text.mask[:, :5], text.pooled)


def test_precomputed_embeddings_round_trip(encoder, tmp_path):
    path = precompute_text_embeddings(encoder, PROMPTS + PROMPTS[:1], tmp_path / "captions.safetensors",
                                      dtype=torch.float32)
    loaded = load_text_encoder(str(path), max_length=32)
    assert isinstance(loaded, PrecomputedTextEncoder) and len(loaded) == 3 and loaded.dim == 384
    text, expected = loaded.encode(PROMPTS[::-1]), encoder.encode(PROMPTS[::-1])
    assert torch.equal(text.mask, expected.mask)
    assert torch.allclose(text.tokens, expected.tokens) and torch.allclose(text.pooled, expected.pooled)
    with pytest.raises(ValueError, match="not in"):
        loaded.encode(["a prompt never precomputed"])


def test_scratch_encoder_trains(encoder):
    torch.manual_seed(0)
    scratch = ScratchTextEncoder(dim=384, width=32, depth=2, heads=2, max_length=32, tokenizer=encoder.tokenizer)
    prompts = ["a red circle", "a blue circle", "a red square", "a blue square"]
    text = scratch.encode(prompts)
    assert text.tokens.shape == (4, 32, 384) and torch.equal(text.mask, encoder.encode(prompts).mask)
    assert text.tokens.requires_grad and (text.tokens[~text.mask] == 0).all()
    target = torch.tensor([0, 1, 0, 1])  # learn the colour word from the pooled vector
    head = torch.nn.Linear(384, 2)
    optimizer = torch.optim.Adam([*scratch.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(head(scratch(prompts).pooled), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
