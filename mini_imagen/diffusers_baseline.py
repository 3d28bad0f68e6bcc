"""The same recipe with diffusers' U-Net: a ``UNet2DConditionModel`` baseline for the base stage.

Is the course's Efficient U-Net any good? The fair test trains Stable Diffusion's U-Net
(``diffusers.UNet2DConditionModel``) with *everything else* unchanged: the same frozen text encoder,
noise schedule, $v$ / $\\epsilon$ target, classifier-free-guidance dropout, optimizer, EMA, data and
steps, and samples it with the same samplers. This file makes that a one-line swap:

    imagen = Imagen(recipe.model)                       # text encoder, schedules, stage_loss, sample
    imagen.unets[0] = DiffusersBaseUNet.like(recipe.model.stages[0].unet)   # diffusers' U-Net, same size
    train_recipe(...)  /  imagen.sample(...)  /  evaluate(imagen, ...)      # unchanged

``DiffusersBaseUNet`` wraps the diffusers model behind ``EfficientUNet``'s call signature:

* the text tokens go to its cross-attention (``encoder_hidden_states``, with the padding mask as
  ``encoder_attention_mask``), the pooled text to its time embedding (``class_embed_type="projection"``,
  the way Imagen adds the pooled vector, sec. 2.2 / appendix);
* a learned null text (token sequence + pooled vector) replaces the prompt where ``drop_text`` is set,
  exactly as in ``EfficientUNet`` (classifier-free guidance, Imagen sec. 2.2);
* its width is chosen so that it has (about) as many parameters as the Efficient U-Net it replaces.

``save_baseline`` writes the diffusers model with its own ``save_pretrained`` (so
``UNet2DConditionModel.from_pretrained(folder / "unet")`` loads it anywhere, offline) plus the null
text and the mini-imagen config; ``load_baseline`` gives back an ``Imagen`` whose base stage is it.
Base stages only: a super-resolution stage would need diffusers' low-res conditioning, which is
another model (DeepFloyd IF's stage II).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mini_imagen.imagen import CONFIG_NAME, Imagen, ImagenConfig
from mini_imagen.text import FrozenTextEncoder
from mini_imagen.unet import EfficientUNet, UNetConfig, swap_in_null_text

NULL_TEXT_NAME = "null_text.safetensors"


def diffusers_unet(config: UNetConfig, width: int):
    """A ``UNet2DConditionModel`` shaped like ``config``: same levels, blocks per level, attention levels, text width."""
    from diffusers import UNet2DConditionModel

    if config.lowres_cond:
        raise ValueError("DiffusersBaseUNet stands in for a base stage only (lowres_cond=False)")
    attended = [size in config.attention_resolutions or size in config.cross_attention_resolutions
                for size in config.level_sizes]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attended)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attended))
    return UNet2DConditionModel(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.out_channels,
        block_out_channels=tuple(width * m for m in config.channel_mults), layers_per_block=config.num_res_blocks,
        down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if attended[-1] else "UNetMidBlock2D",
        norm_num_groups=math.gcd(32, width), cross_attention_dim=config.text_embed_dim,
        attention_head_dim=config.num_heads,  # sic: diffusers reads this as the number of heads
        class_embed_type="projection", projection_class_embeddings_input_dim=config.text_embed_dim,
    )


def matched_width(config: UNetConfig, widths: range = range(8, 257, 2)) -> int:
    """The width whose ``UNet2DConditionModel`` has the parameter count closest to ``EfficientUNet(config)``'s."""
    target = EfficientUNet(config).num_parameters()
    best, best_gap = None, math.inf
    for width in widths:
        try:
            count = sum(p.numel() for p in diffusers_unet(config, width).parameters())
        except (ValueError, AssertionError, RuntimeError):  # e.g. a width the group norm cannot split
            continue
        if abs(count - target) < best_gap:
            best, best_gap = width, abs(count - target)
        if count > target:
            break
    if best is None:
        raise ValueError(f"no width in {widths} builds a UNet2DConditionModel for {config}")
    return best


class DiffusersBaseUNet(nn.Module):
    """diffusers' ``UNet2DConditionModel`` with ``EfficientUNet``'s call, so the course's code drives it unchanged."""

    def __init__(self, unet: nn.Module, max_text_len: int, text_embed_dim: int):
        super().__init__()
        self.unet = unet
        # The learned "empty prompt" for classifier-free guidance, as in EfficientUNet.
        self.null_text_tokens = nn.Parameter(torch.randn(max_text_len, text_embed_dim))
        self.null_text_pooled = nn.Parameter(torch.randn(text_embed_dim))

    @classmethod
    def like(cls, config: UNetConfig, width: int | None = None) -> DiffusersBaseUNet:
        """A baseline of (about) the size of ``EfficientUNet(config)``; ``width`` overrides the matching."""
        if config.lowres_cond:
            raise ValueError("DiffusersBaseUNet stands in for a base stage only (lowres_cond=False)")
        width = matched_width(config) if width is None else width
        return cls(diffusers_unet(config, width), config.max_text_len, config.text_embed_dim)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, x_t: Tensor, t: Tensor, text_tokens: Tensor, text_mask: Tensor, text_pooled: Tensor,
                lowres_image: Tensor | None = None, lowres_noise_level: Tensor | None = None,
                drop_text: Tensor | None = None) -> Tensor:
        if lowres_image is not None:
            raise ValueError("DiffusersBaseUNet is a base-stage model: it takes no lowres_image")
        if drop_text is not None:
            text_tokens, text_mask, text_pooled = swap_in_null_text(
                drop_text, text_tokens, text_mask, text_pooled, self.null_text_tokens, self.null_text_pooled)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        return self.unet(x_t, t, encoder_hidden_states=text_tokens, class_labels=text_pooled,
                         encoder_attention_mask=text_mask).sample


def baseline_imagen(config: ImagenConfig, text_encoder: FrozenTextEncoder | None = None,
                    width: int | None = None) -> Imagen:
    """A one-stage ``Imagen`` (the config's base stage only) whose U-Net is a ``DiffusersBaseUNet``."""
    base_only = ImagenConfig(stages=[config.stages[0]], text_encoder=config.text_encoder,
                             max_text_len=config.max_text_len, cond_drop_prob=config.cond_drop_prob)
    imagen = Imagen(base_only, text_encoder=text_encoder)
    imagen.unets[0] = DiffusersBaseUNet.like(base_only.stages[0].unet, width)
    return imagen


def save_baseline(imagen: Imagen, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """``folder/unet`` (diffusers' own format), ``folder/null_text.safetensors`` and ``folder/config.json``."""
    unet = imagen.unets[0]
    if not isinstance(unet, DiffusersBaseUNet):
        raise TypeError(f"save_baseline saves a DiffusersBaseUNet base stage, not {type(unet).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.unet.to(dtype).save_pretrained(folder / "unet")
    unet.unet.float()
    save_file({"tokens": unet.null_text_tokens.detach().to(dtype).contiguous(),
               "pooled": unet.null_text_pooled.detach().to(dtype).contiguous()}, str(folder / NULL_TEXT_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(imagen.config.to_dict(), indent=2))
    return folder


def load_baseline(folder: str | Path, text_encoder: FrozenTextEncoder | None = None,
                  device: str | torch.device = "cpu") -> Imagen:
    """The ``Imagen`` saved by ``save_baseline``; its base stage is ``UNet2DConditionModel.from_pretrained``."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    for needed in (CONFIG_NAME, NULL_TEXT_NAME, "unet"):
        if not (folder / needed).exists():
            raise FileNotFoundError(f"{folder} is not a diffusers baseline folder: {needed} is missing "
                                    "(write one with mini_imagen.diffusers_baseline.save_baseline)")
    config = ImagenConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
    imagen = Imagen(config, text_encoder=text_encoder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").float()
    null = load_file(str(folder / NULL_TEXT_NAME))
    baseline = DiffusersBaseUNet(unet, config.max_text_len, config.stages[0].unet.text_embed_dim)
    baseline.null_text_tokens.data.copy_(null["tokens"].float())
    baseline.null_text_pooled.data.copy_(null["pooled"].float())
    imagen.unets[0] = baseline
    return imagen.to(device).eval()


def train_baseline(recipe, output: str | Path, resume: bool = True) -> Path:
    """Train the diffusers baseline with ``recipe``'s base-stage settings (``recipes.train_stage``, the code that
    trains mini-imagen's own base stage: same data, loss, optimizer, EMA, steps, checkpoints); save it to ``output``."""
    from mini_imagen.recipes import train_stage

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    imagen = baseline_imagen(recipe.model)
    train_stage(imagen, 0, recipe, output, resume)  # resumes from output/stage0 when a checkpoint is there
    return save_baseline(imagen, output)


__all__ = ["DiffusersBaseUNet", "baseline_imagen", "diffusers_unet", "load_baseline", "matched_width",
           "save_baseline", "train_baseline"]
