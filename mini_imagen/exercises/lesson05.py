"""Lesson 05 exercises: classifier-free guidance, conditioning dropout with a null text, guidance as extrapolation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mini_imagen.exercises import _attempt, _report


def check_classifier_free_guidance(guide: Callable[[Tensor, Tensor, float], Tensor]) -> bool:
    r"""Lesson 05: ``guide(cond, uncond, w)`` returns $\hat y_\emptyset + w\,(\hat y_c - \hat y_\emptyset)$
    (Imagen sec. 2.2), checked against ``mini_imagen.guidance.classifier_free_guidance`` for several w."""
    from mini_imagen.guidance import classifier_free_guidance

    name = "classifier-free guidance"
    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 2, 3, 4, 4, generator=generator)
    for w in (3.0, 7.5, 0.0, 1.0):  # w > 1 first: there the common mistakes differ from the right answer
        expected = classifier_free_guidance(cond, uncond, w)
        result, problem = _attempt(guide, cond.clone(), uncond.clone(), w)
        if problem:
            return _report(False, name, problem)
        if not isinstance(result, Tensor) or result.shape != expected.shape:
            shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
            return _report(False, name, f"expected a tensor of shape {tuple(expected.shape)}, got {shape}")
        if torch.allclose(result, expected, atol=1e-5):
            continue
        if torch.allclose(result, cond + w * (cond - uncond), atol=1e-5):
            return _report(False, name, "that is Ho & Salimans' form cond + w (cond - uncond), whose w is ours "
                                        "minus one; start from the unconditional prediction")
        if torch.allclose(result, uncond + w * (uncond - cond), atol=1e-5):
            return _report(False, name, "the difference points the wrong way: guide *towards* the text, "
                                        "uncond + w (cond - uncond)")
        return _report(False, name, f"wrong values at w = {w}: w = 0 must give uncond, w = 1 cond")
    return _report(True, name, "w = 0 gives the unconditional prediction, w = 1 the conditional, w > 1 goes beyond")


def check_drop_text(drop_text: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> bool:
    """Lesson 05: ``drop_text(tokens, mask, pooled, drop, null_tokens, null_pooled) -> (tokens, mask, pooled)``.

    Rows where ``drop`` (B,) is True get the learned null text: ``null_tokens`` (L, D) as their tokens, a mask
    that is True everywhere (every null token is attended to) and ``null_pooled`` (D,) as their pooled vector.
    The other rows are left as they are. Checked against ``EfficientUNet._drop_text``.
    """
    from mini_imagen.unet import EfficientUNet, UNetConfig

    name = "conditioning dropout"
    torch.manual_seed(0)  # the tiny U-Net's null text is random: fix it
    unet = EfficientUNet(UNetConfig.tiny(text_embed_dim=8, max_text_len=5))
    generator = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    tokens = torch.randn(4, 5, 8, generator=generator) * mask.unsqueeze(-1)
    pooled = torch.randn(4, 8, generator=generator)
    drop = torch.tensor([True, False, False, True])
    with torch.no_grad():
        expected = unet._drop_text(drop, tokens, mask, pooled)
        null_tokens, null_pooled = unet.null_text_tokens.detach().clone(), unet.null_text_pooled.detach().clone()
    result, problem = _attempt(drop_text, tokens.clone(), mask.clone(), pooled.clone(), drop.clone(),
                               null_tokens, null_pooled)
    if problem:
        return _report(False, name, problem)
    if not (isinstance(result, tuple) and len(result) == 3 and all(isinstance(r, Tensor) for r in result)):
        return _report(False, name, "return three tensors: (tokens, mask, pooled)")
    for got, want, what in zip(result, expected, ("tokens", "mask", "pooled")):
        if got.shape != want.shape:
            return _report(False, name, f"{what} should keep its shape {tuple(want.shape)}, got {tuple(got.shape)}")
    new_tokens, new_mask, new_pooled = result
    if not torch.equal(new_tokens[1:3], tokens[1:3]) or not torch.equal(new_pooled[1:3], pooled[1:3]):
        return _report(False, name, "rows that are not dropped must keep their own text")
    if not torch.allclose(new_tokens.float(), expected[0]) or not torch.allclose(new_pooled.float(), expected[2]):
        return _report(False, name, "a dropped row's tokens must be null_tokens and its pooled vector null_pooled")
    if new_mask.dtype != torch.bool or not torch.equal(new_mask, expected[1]):
        if torch.equal(new_mask.bool(), mask):
            return _report(False, name, "the mask of a dropped row still hides the null tokens beyond the prompt's "
                                        "length: set it to True everywhere for dropped rows")
        return _report(False, name, "the mask is wrong: True everywhere for dropped rows, unchanged for the others")
    return _report(True, name, "dropped rows read the learned null text, the others their prompt")


def check_recover_guidance_scale(recover: Callable[[Tensor, Tensor, Tensor], float]) -> bool:
    r"""Lesson 05: ``recover(guided, cond, uncond) -> w``: the guided output lies on the line through
    uncond and cond, $g = u + w (c - u)$; recover w by projecting $g - u$ onto $c - u$ (least squares),
    and it must come out right for w < 1 (interpolation) and w > 1 (extrapolation) alike."""
    from mini_imagen.guidance import classifier_free_guidance

    name = "recover the guidance scale"
    generator = torch.Generator().manual_seed(0)
    for w in (0.5, 1.0, 3.0, 6.0):
        cond, uncond = torch.randn(2, 2, 3, 8, 8, generator=generator)
        guided = classifier_free_guidance(cond, uncond, w)
        guided = guided + 1e-3 * torch.randn(guided.shape, generator=generator)  # a little numerical noise
        result, problem = _attempt(recover, guided, cond, uncond)
        if problem:
            return _report(False, name, problem)
        try:
            value = float(result)
        except (TypeError, ValueError):
            return _report(False, name, f"return one number (a float), got {type(result).__name__}")
        if abs(value - w) > 1e-2:
            return _report(False, name, f"for w = {w} you returned {value:.3f}: project g - u onto c - u, "
                                        "w = <g - u, c - u> / <c - u, c - u>")
    return _report(True, name, "w comes back from the three predictions, inside (w < 1) and beyond (w > 1) the pair")


__all__ = ["check_classifier_free_guidance", "check_drop_text", "check_recover_guidance_scale"]
