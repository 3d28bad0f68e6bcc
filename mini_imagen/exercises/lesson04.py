"""Lesson 04 exercises: padding and the attention mask, a cosine-similarity matrix, attention pooling."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mini_imagen.exercises import _attempt, _report

PAD_ID, SEP_ID = 0, 102  # [PAD] and [SEP] in the WordPiece vocabulary of all-MiniLM-L6-v2 (BERT's)


def check_pad_and_mask(pad_and_mask: Callable[[list[list[int]], int], tuple[Tensor, Tensor]]) -> bool:
    """Lesson 04: ``pad_and_mask(token_ids, max_length) -> (ids, mask)`` pads and cuts like the tokenizer.

    ``token_ids`` holds one list per prompt, each ``[CLS] ... [SEP]``. The answer: ids (B, max_length)
    long, padded on the right with [PAD] = 0; mask (B, max_length) bool, True at real tokens; a list longer
    than ``max_length`` is cut to its first ``max_length - 1`` ids followed by [SEP] = 102. Checked against
    the tokenizer's own ``padding="max_length", truncation=True``.
    """
    from mini_imagen.text import load_tokenizer

    name = "pad and mask"
    tokenizer = load_tokenizer()
    prompts = ["a red circle", "two small crimson squares above a blue star on a black background",
               "a picture of a big green triangle to the left of three little white crosses"]
    max_length = 12
    unpadded = tokenizer(prompts)["input_ids"]  # lists of different lengths, the last two longer than 12
    expected = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    expected_ids, expected_mask = expected["input_ids"], expected["attention_mask"].bool()
    result, problem = _attempt(pad_and_mask, [list(ids) for ids in unpadded], max_length)
    if problem:
        return _report(False, name, problem)
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, Tensor) for r in result)):
        return _report(False, name, "return a pair of tensors (ids, mask)")
    ids, mask = result
    if ids.shape != expected_ids.shape or mask.shape != expected_mask.shape:
        hint = " (cut prompts longer than max_length)" if ids.shape[-1:] != (max_length,) else ""
        return _report(False, name, f"expected ids and mask of shape {tuple(expected_ids.shape)}, "
                                    f"got {tuple(ids.shape)} and {tuple(mask.shape)}{hint}")
    if mask.dtype != torch.bool:
        return _report(False, name, f"the mask should be a bool tensor (True = real token), got {mask.dtype}")
    if torch.equal(mask, expected_mask.flip(1)):
        return _report(False, name, "that pads on the left; pad on the right, so that the real tokens come first")
    if not torch.equal(mask, expected_mask):
        return _report(False, name, "the mask is wrong: True for every real token ([CLS] and [SEP] included), "
                                    "False for every [PAD]")
    ids = ids.long()
    if not torch.equal(ids[0], expected_ids[0]):
        return _report(False, name, f"a short prompt is padded on the right with [PAD] = {PAD_ID}: "
                                    f"expected {expected_ids[0].tolist()}")
    if torch.equal(ids, expected_ids):
        return _report(True, name, "same ids and mask as the tokenizer, [SEP] kept at the end of cut prompts")
    if torch.equal(ids[1:, :-1], expected_ids[1:, :-1]):
        return _report(False, name, f"a cut prompt must still end with [SEP] = {SEP_ID}: the encoder was trained "
                                    "on sentences that end with it")
    return _report(False, name, f"ids differ from the tokenizer's: expected {expected_ids.tolist()}")


def check_cosine_similarity_matrix(cosine_similarity_matrix: Callable[[Tensor, Tensor], Tensor]) -> bool:
    r"""Lesson 04: ``cosine_similarity_matrix(a, b)`` (N, D) x (M, D) -> (N, M) with entries
    $\cos(a_i, b_j) = a_i \cdot b_j / (\lVert a_i \rVert \lVert b_j \rVert)$."""
    name = "cosine similarity matrix"
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, generator=generator) * torch.tensor([[0.5], [1.0], [3.0], [10.0]])  # different lengths
    b = torch.randn(3, 6, generator=generator)
    expected = F.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1)
    result, problem = _attempt(cosine_similarity_matrix, a.clone(), b.clone())
    if problem:
        return _report(False, name, problem)
    if not isinstance(result, Tensor) or result.shape != expected.shape:
        shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
        return _report(False, name, f"expected shape {tuple(expected.shape)} for a (4, 6) and a (3, 6), got {shape}: "
                                    "row i holds a[i] against every row of b")
    result = result.float()
    if torch.allclose(result, expected, atol=1e-5):
        return _report(True, name, "matches torch.nn.functional.cosine_similarity, pair by pair")
    if torch.allclose(result, a @ b.T, atol=1e-4):
        return _report(False, name, "that is the plain dot product: divide by both vectors' lengths")
    return _report(False, name, "values differ from the cosine similarity")


def check_attention_pool(attention_pool: Callable[[Tensor, Tensor, Tensor], Tensor]) -> bool:
    r"""Lesson 04: ``attention_pool(tokens, mask, query)`` (B, L, D), (B, L), (D,) -> (B, D):
    $w = \mathrm{softmax}_i(q \cdot h_i / \sqrt{D})$ over the real tokens only, output $\sum_i w_i h_i$."""
    name = "attention pooling"
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 5, 8, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    tokens = tokens * mask.unsqueeze(-1)  # padding is zero, as in TextEmbeddings
    query = torch.randn(8, generator=generator) * 2

    def pool(scale: float, use_mask: bool) -> Tensor:
        scores = tokens @ query * scale  # (B, L)
        if use_mask:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.einsum("bl,bld->bd", scores.softmax(dim=-1), tokens)

    expected = pool(8 ** -0.5, use_mask=True)
    result, problem = _attempt(attention_pool, tokens.clone(), mask.clone(), query.clone())
    if problem:
        return _report(False, name, problem)
    if not isinstance(result, Tensor) or result.shape != expected.shape:
        shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
        return _report(False, name, f"expected shape {tuple(expected.shape)}, got {shape}")
    result = result.float()
    if torch.allclose(result, expected, atol=1e-5):
        return _report(True, name, "a weighted mean of the real tokens, weights softmax(q . h / sqrt(D))")
    if torch.allclose(result, pool(8 ** -0.5, use_mask=False), atol=1e-5):
        return _report(False, name, "padding got weight too: set its scores to -inf before the softmax")
    if torch.allclose(result, pool(1.0, use_mask=True), atol=1e-5):
        return _report(False, name, "forgot to divide the scores by sqrt(D)")
    return _report(False, name, "values differ from the softmax-weighted mean of the real tokens")
