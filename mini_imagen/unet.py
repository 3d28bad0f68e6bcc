r"""The Efficient U-Net: Imagen's text-conditioned denoiser (Saharia et al., 2022, sec. 2.5 and appendix B.1).

The network predicts the noise $\epsilon$ in a noisy image $x_t$, given the timestep $t$ and the text:

    x_t ─► conv ─► DBlock 32px ─► DBlock 16px ─► DBlock 8px ─┐
                      │ skip         │ skip                   │  (bottleneck: no skip)
    ε̂  ◄─ conv ◄─ UBlock 32px ◄─ UBlock 16px ◄─ UBlock 8px ◄─┘

It is the DDPM U-Net (Ho et al., 2020) with Imagen's three "Efficient U-Net" changes (appendix B.1,
Figs. A.28-A.30):

1. **More residual blocks at low resolution** (``num_res_blocks=(1, 2, 3)``): parameters move to the
   cheap small feature maps, away from the expensive large ones.
2. **Skip connections scaled by** $1/\sqrt{2}$, which speeds up convergence when blocks are deep. Here
   a UBlock *adds* the skip, $(h + \mathrm{skip})/\sqrt{2}$, which keeps unit variance and, unlike
   DDPM's concatenation, does not double the channels its first convolution must read.
3. **Down-sample first, up-sample last**: a DBlock halves the image *before* its convolutions and a
   UBlock doubles it *after* them, so every convolution of a block runs at the lower resolution.

and Imagen's conditioning (sec. 2.2, 2.4, 2.5):

* the timestep embedding, **plus the pooled text embedding**, (plus, for super-resolution, the
  embedding of the low-res image's augmentation noise level) form one vector $c$ that every
  residual block reads as a per-channel scale and shift (FiLM, "adaptive GroupNorm");
* the text **tokens** are read by cross-attention, with the padding mask, at the feature-map sizes
  the config names (``cross_attention_resolutions``); self-attention likewise
  (``attention_resolutions``), and only at small sizes because it costs $O((HW)^2)$;
* a **learned null text** (tokens and pooled vector) replaces the prompt for the rows flagged by
  ``drop_text``: the "empty prompt" of classifier-free guidance (Ho & Salimans, 2021);
* a super-resolution stage (``lowres_cond=True``) also sees the low-res image, up-sampled to the
  output size and concatenated to $x_t$ as extra input channels (sec. 2.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- configuration


@dataclass
class UNetConfig:
    """Every size of the Efficient U-Net. ``channel_mults`` has one entry per resolution level."""

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4)  # level i runs at image_size / 2^i with base * mult_i channels
    num_res_blocks: tuple[int, ...] = (1, 2, 3)  # more blocks at low resolution (Efficient U-Net)
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sizes that get self-attention
    cross_attention_resolutions: tuple[int, ...] = (8, 16)  # sizes that get text cross-attention
    num_heads: int = 4
    text_embed_dim: int = 384
    max_text_len: int = 32
    dropout: float = 0.0
    lowres_cond: bool = False  # super-resolution stage: takes a low-res image + its noise-aug level

    def __post_init__(self) -> None:
        for name in ("channel_mults", "num_res_blocks", "attention_resolutions", "cross_attention_resolutions"):
            setattr(self, name, tuple(getattr(self, name)))  # lists from JSON/YAML -> tuples
        self.validate()

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """The feature-map size of every level, e.g. (32, 16, 8)."""
        return tuple(self.image_size // 2**level for level in range(len(self.channel_mults)))

    @property
    def level_channels(self) -> tuple[int, ...]:
        """The channel count of every level, e.g. (64, 128, 256)."""
        return tuple(self.base_channels * mult for mult in self.channel_mults)

    def validate(self) -> None:
        levels = len(self.channel_mults)
        if levels == 0 or len(self.num_res_blocks) != levels:
            raise ValueError(
                f"num_res_blocks {self.num_res_blocks} needs one entry per level of channel_mults {self.channel_mults}"
            )
        if min(self.channel_mults) < 1 or min(self.num_res_blocks) < 1:
            raise ValueError("channel_mults and num_res_blocks entries must all be >= 1")
        if min(self.in_channels, self.out_channels, self.text_embed_dim, self.max_text_len, self.num_heads) < 1:
            raise ValueError("in_channels, out_channels, text_embed_dim, max_text_len and num_heads must be >= 1")
        if self.base_channels < 2 or self.base_channels % 2:
            raise ValueError(f"base_channels must be a positive even number (it is also the width of the "
                             f"sine/cosine timestep embedding), got {self.base_channels}")
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by {2 ** (levels - 1)} "
                f"(the U-Net halves it {levels - 1} times)"
            )
        for name in ("attention_resolutions", "cross_attention_resolutions"):
            unknown = sorted(set(getattr(self, name)) - set(self.level_sizes))
            if unknown:
                raise ValueError(
                    f"{name} has {unknown}, which are not feature-map sizes; choose from {self.level_sizes}"
                )
        attended = set(self.attention_resolutions) | set(self.cross_attention_resolutions)
        for size, channels in zip(self.level_sizes, self.level_channels, strict=True):
            if size in attended and channels % self.num_heads:
                raise ValueError(
                    f"the {size}px level has {channels} channels, not divisible by num_heads={self.num_heads}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    # --- presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, image_size: int = 32, lowres_cond: bool = False, **overrides: Any) -> UNetConfig:
        """About 0.3M parameters: unit tests and CPU smoke runs. Attention at the smallest level only."""
        smallest = image_size // 4
        preset = cls(
            image_size=image_size, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=(1, 1, 2),
            attention_resolutions=() if lowres_cond else (smallest,), cross_attention_resolutions=(smallest,),
            num_heads=2, lowres_cond=lowres_cond,
        )
        return replace(preset, **overrides)

    @classmethod
    def base32(cls, **overrides: Any) -> UNetConfig:
        """The course's 32 px base model (about 3M parameters): self-attention at 8 px, text at 8 and 16 px."""
        return replace(cls(base_channels=32), **overrides)

    @classmethod
    def sr64(cls, **overrides: Any) -> UNetConfig:
        """The 32 -> 64 px super-resolution model (about 3M parameters). Like Imagen's 1024 px model
        (sec. 2.5) it drops self-attention but keeps the text cross-attention, here at 16 px."""
        preset = cls(
            image_size=64, base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=(1, 2, 3),
            attention_resolutions=(), cross_attention_resolutions=(16,), lowres_cond=True,
        )
        return replace(preset, **overrides)


# ----------------------------------------------------------------------------- building blocks


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (Wu & He, 2018), as in DDPM."""
    return nn.GroupNorm(math.gcd(32, channels), channels, affine=affine)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: a residual branch it ends starts as zero, so the block starts as the
    identity; the output conv starts by predicting zero noise (as in ADM and imagen-pytorch)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim) (Vaswani et al.; DDPM)."""
    half = dim // 2
    # $\omega_i = \mathrm{max\_period}^{-i / (d/2)}$, then $[\sin(t\,\omega_i), \cos(t\,\omega_i)]$
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResBlock(nn.Module):
    """Imagen's ResNetBlock (appendix B.1) with FiLM conditioning: the condition $c$ scales and shifts the features."""

    def __init__(self, channels: int, cond_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * channels)
        self.norm2 = group_norm(channels, affine=False)  # its scale and shift come from c instead
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        # adaptive GroupNorm: $h \leftarrow \mathrm{GN}(h)\,(1 + \gamma(c)) + \beta(c)$
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return x + h


class Attention(nn.Module):
    """Multi-head attention of every pixel to a set of keys: the other pixels, or the text tokens.

    Self-attention when ``context`` is None; cross-attention to ``context`` (B, L, context_dim) otherwise.
    For cross-attention a learned *null key/value* is always attendable, so a pixel may "ignore the
    text", and a row whose tokens are all masked out stays well defined (as in imagen-pytorch).
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        if context_dim is None:
            self.to_qkv = nn.Linear(channels, 3 * channels)
        else:
            self.to_q = nn.Linear(channels, channels)
            self.to_kv = nn.Linear(context_dim, 2 * channels)
            self.null_kv = nn.Parameter(torch.randn(2, 1, channels) / math.sqrt(channels))
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        batch, channels, height, width = x.shape
        pixels = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): one token per pixel
        attn_mask = None
        if context is None:
            q, k, v = self.to_qkv(pixels).chunk(3, dim=-1)
        else:
            q = self.to_q(pixels)
            k, v = self.to_kv(context).chunk(2, dim=-1)
            null_k, null_v = self.null_kv.expand(2, batch, channels).unsqueeze(2)  # (B, 1, C) each
            k, v = torch.cat([null_k, k], dim=1), torch.cat([null_v, v], dim=1)
            keep = torch.cat([context_mask.new_ones(batch, 1), context_mask], dim=1)  # the null key is always kept
            attn_mask = keep[:, None, None, :]  # (B, 1, 1, 1 + L): broadcast over heads and queries
        q, k, v = (self._split_heads(z) for z in (q, k, v))
        # $\mathrm{softmax}(q k^\top / \sqrt{d})\,v$ in one fused kernel; masked-out keys get weight 0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(batch, height * width, channels)
        return x + self.out(out).transpose(1, 2).reshape(batch, channels, height, width)

    def _split_heads(self, z: Tensor) -> Tensor:
        """(B, N, C) -> (B, heads, N, C / heads)."""
        batch, length, channels = z.shape
        return z.view(batch, length, self.num_heads, channels // self.num_heads).transpose(1, 2)


class Block(nn.Module):
    """What runs at one resolution: ResBlocks, then optional self-attention and text cross-attention."""

    def __init__(self, channels: int, num_res_blocks: int, cond_dim: int, dropout: float, num_heads: int,
                 self_attention: bool, cross_attention_dim: int | None):
        super().__init__()
        self.res_blocks = nn.ModuleList(ResBlock(channels, cond_dim, dropout) for _ in range(num_res_blocks))
        self.self_attention = Attention(channels, num_heads) if self_attention else None
        self.cross_attention = Attention(channels, num_heads, cross_attention_dim) if cross_attention_dim else None

    def forward(self, x: Tensor, cond: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        for res_block in self.res_blocks:
            x = res_block(x, cond)
        if self.self_attention is not None:
            x = self.self_attention(x)
        if self.cross_attention is not None:
            x = self.cross_attention(x, text, text_mask)
        return x


class DBlock(Block):
    """Efficient U-Net DBlock (appendix B.1): *first* halve the image (strided conv), then run the Block small."""

    def __init__(self, in_channels: int, channels: int, downsample: bool, **block: Any):
        super().__init__(channels, **block)
        self.downsample = nn.Conv2d(in_channels, channels, 3, stride=2, padding=1) if downsample else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        return super().forward(self.downsample(x), cond, text, text_mask)


class UBlock(Block):
    """Efficient U-Net UBlock (appendix B.1): add the scaled skip, run the Block, and *then* double the image."""

    def __init__(self, channels: int, out_channels: int, upsample: bool, **block: Any):
        super().__init__(channels, **block)
        # Sub-pixel up-sampling (Shi et al., 2016), as in imagen-pytorch: a 1x1 conv makes 4 x out_channels
        # channels at the low resolution, and PixelShuffle rearranges them into a 2x larger image, so every
        # output pixel of a 2x2 patch gets its own weights and there is no checkerboard pattern.
        self.upsample = (nn.Sequential(nn.Conv2d(channels, 4 * out_channels, 1), nn.PixelShuffle(2))
                         if upsample else nn.Identity())

    def forward(self, x: Tensor, skip: Tensor | None, cond: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        if skip is not None:
            # U-Net skip connection, scaled by $1/\sqrt{2}$ (appendix B.1): $\mathrm{Var}[(a + b)/\sqrt{2}] = 1$
            x = (x + skip) * 2**-0.5
        return self.upsample(super().forward(x, cond, text, text_mask))


# ----------------------------------------------------------------------------- the network


class EfficientUNet(nn.Module):
    """Imagen's Efficient U-Net: predicts the noise in ``x_t`` from ``t``, the text and (SR) a low-res image."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        base, cond_dim, text_dim = config.base_channels, 4 * config.base_channels, config.text_embed_dim

        # Condition vector $c$ = MLP(timestep) + Linear(LayerNorm(pooled text)) [+ MLP(noise-aug level)].
        self.time_mlp = nn.Sequential(nn.Linear(base, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.pooled_text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, cond_dim))
        self.text_norm = nn.LayerNorm(text_dim)  # LayerNorm on the text helps considerably (sec. 2.5)
        if config.lowres_cond:
            self.noise_level_mlp = nn.Sequential(nn.Linear(base, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        # The learned "empty prompt" for classifier-free guidance: a token sequence and a pooled vector.
        self.null_text_tokens = nn.Parameter(torch.randn(config.max_text_len, text_dim))
        self.null_text_pooled = nn.Parameter(torch.randn(text_dim))

        in_channels = config.in_channels * (2 if config.lowres_cond else 1)  # x_t ++ up-sampled low-res image
        self.init_conv = nn.Conv2d(in_channels, base, 3, padding=1)
        channels, sizes = config.level_channels, config.level_sizes

        def block_options(level: int) -> dict[str, Any]:
            return {
                "num_res_blocks": config.num_res_blocks[level], "cond_dim": cond_dim, "dropout": config.dropout,
                "num_heads": config.num_heads, "self_attention": sizes[level] in config.attention_resolutions,
                "cross_attention_dim": text_dim if sizes[level] in config.cross_attention_resolutions else None,
            }

        self.down_blocks = nn.ModuleList(
            DBlock(channels[max(level - 1, 0)], channels[level], downsample=level > 0, **block_options(level))
            for level in range(len(channels))
        )
        self.up_blocks = nn.ModuleList(  # smallest level first
            UBlock(channels[level], channels[max(level - 1, 0)], upsample=level > 0, **block_options(level))
            for level in reversed(range(len(channels)))
        )
        self.out_norm = group_norm(base)
        self.out_conv = zero_init(nn.Conv2d(base, config.out_channels, 3, padding=1))

    def num_parameters(self) -> int:
        """How many trainable parameters the network has."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        text_pooled: Tensor,
        lowres_image: Tensor | None = None,
        lowres_noise_level: Tensor | None = None,
        drop_text: Tensor | None = None,
    ) -> Tensor:
        """Predict the noise: (B, C, H, W) -> (B, out_channels, H, W).

        ``t`` and ``lowres_noise_level`` are (B,) timesteps (int or float, 0..T-1), or scalars shared
        by the batch; ``lowres_noise_level`` defaults to 0 (a clean low-res image).
        ``drop_text`` (B,) bool replaces those rows' text by the learned null text (CFG).
        """
        self._check_inputs(x_t, text_tokens, text_mask, text_pooled, lowres_image, lowres_noise_level)
        batch = x_t.shape[0]
        t = _per_sample(t, batch, "t", x_t.device)
        if drop_text is not None:
            text_tokens, text_mask, text_pooled = self._drop_text(drop_text, text_tokens, text_mask, text_pooled)

        # $c = \mathrm{MLP}(\mathrm{emb}(t)) + W\,\mathrm{LN}(\mathrm{pooled})$ (+ the aug-level MLP, SR)
        cond = self.time_mlp(timestep_embedding(t, self.config.base_channels)) + self.pooled_text_proj(text_pooled)
        x = x_t
        if self.config.lowres_cond:
            level = _per_sample(0 if lowres_noise_level is None else lowres_noise_level, batch,
                                "lowres_noise_level", x_t.device)
            cond = cond + self.noise_level_mlp(timestep_embedding(level, self.config.base_channels))
            if lowres_image.shape[-2:] != x_t.shape[-2:]:
                lowres_image = F.interpolate(lowres_image, size=x_t.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x_t, lowres_image.to(x_t.dtype)], dim=1)
        cond = F.silu(cond)  # every ResBlock reads SiLU(c) through its own Linear (FiLM)
        text = self.text_norm(text_tokens)

        h = self.init_conv(x)
        skips = []
        for down in self.down_blocks:
            h = down(h, cond, text, text_mask)
            skips.append(h)
        skips[-1] = None  # the smallest level's output goes straight up, not through a skip
        for up in self.up_blocks:
            h = up(h, skips.pop(), cond, text, text_mask)
        return self.out_conv(F.silu(self.out_norm(h)))

    def _drop_text(self, drop_text: Tensor, tokens: Tensor, mask: Tensor, pooled: Tensor) -> tuple[Tensor, ...]:
        return swap_in_null_text(drop_text, tokens, mask, pooled, self.null_text_tokens, self.null_text_pooled)

    def _check_inputs(self, x_t: Tensor, tokens: Tensor, mask: Tensor, pooled: Tensor,
                      lowres_image: Tensor | None, lowres_noise_level: Tensor | None) -> None:
        config = self.config
        if x_t.ndim != 4 or x_t.shape[1] != config.in_channels:
            raise ValueError(f"x_t must be (B, {config.in_channels}, H, W), got {tuple(x_t.shape)}")
        factor = 2 ** (len(config.channel_mults) - 1)
        if x_t.shape[-2] % factor or x_t.shape[-1] % factor:
            raise ValueError(f"image size {tuple(x_t.shape[-2:])} must be divisible by {factor} "
                             f"(the U-Net halves it {len(config.channel_mults) - 1} times)")
        batch, dim = x_t.shape[0], config.text_embed_dim
        if tokens.ndim != 3 or tokens.shape[0] != batch or tokens.shape[2] != dim:
            raise ValueError(f"text_tokens must be (B={batch}, L, text_embed_dim={dim}), got {tuple(tokens.shape)}; "
                             "encode with the matching text encoder or change UNetConfig.text_embed_dim")
        if tokens.shape[1] > config.max_text_len:
            raise ValueError(f"text_tokens has {tokens.shape[1]} tokens, more than max_text_len={config.max_text_len}")
        if mask.shape != tokens.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"text_mask must be a bool tensor of shape {tuple(tokens.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if pooled.shape != (batch, dim):
            raise ValueError(f"text_pooled must be (B={batch}, text_embed_dim={dim}), got {tuple(pooled.shape)}")
        if config.lowres_cond:
            if lowres_image is None:
                raise ValueError("this is a super-resolution U-Net (lowres_cond=True): pass lowres_image")
            if lowres_image.ndim != 4 or lowres_image.shape[:2] != (batch, config.in_channels):
                raise ValueError(f"lowres_image must be (B={batch}, {config.in_channels}, h, w), "
                                 f"got {tuple(lowres_image.shape)}")
        elif lowres_image is not None or lowres_noise_level is not None:
            raise ValueError("lowres_image / lowres_noise_level were given but this U-Net is a base model "
                             "(lowres_cond=False)")


def swap_in_null_text(drop_text: Tensor, tokens: Tensor, mask: Tensor, pooled: Tensor,
                      null_tokens: Tensor, null_pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Swap in the learned null text for the rows where ``drop_text`` is True (classifier-free guidance)."""
    if drop_text.shape != (tokens.shape[0],) or drop_text.dtype != torch.bool:
        raise ValueError(f"drop_text must be a (B,) bool tensor with B={tokens.shape[0]}, "
                         f"got {tuple(drop_text.shape)} {drop_text.dtype}")
    drop = drop_text.to(tokens.device)
    tokens = torch.where(drop[:, None, None], null_tokens[: tokens.shape[1]].to(tokens.dtype), tokens)
    mask = mask | drop[:, None]  # every null token is attended to
    pooled = torch.where(drop[:, None], null_pooled.to(pooled.dtype), pooled)
    return tokens, mask, pooled


def _per_sample(value: Tensor | float, batch: int, name: str, device: torch.device) -> Tensor:
    """A scalar or (B,) timestep as a (B,) tensor."""
    value = torch.as_tensor(value, device=device)
    if value.ndim == 0:
        return value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape (B,)=({batch},), got {tuple(value.shape)}")
    return value
