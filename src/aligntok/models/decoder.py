"""CNN pixel decoder of the LDM AutoencoderKL / VA-VAE shape (docs/method.md, "Decoder D").

Latent (B, latent_channels, h, w) -> conv_in -> mid (ResnetBlock, self-attention, ResnetBlock) -> one up level
per entry of `ch_mult`, walked from the last (widest) to the first, each with `num_res_blocks + 1` residual
blocks (+ attention where the feature map size is in `attn_resolutions`) and a nearest x2 upsample + conv
between levels -> GroupNorm + SiLU + conv_out. The output lives on the [-1, 1] scale; mapping to [0, 1]
is the tokenizer's business. Architecture only: no losses here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from aligntok.models.layers import AttnBlock, ResnetBlock, group_norm


@dataclass(kw_only=True)
class DecoderConfig:
    """Widths and depth of the decoder; `attn_resolutions` are feature-map sizes (e.g. 16 for 16x16).

    The input width is not here: it is the tokenizer's `latent_channels`, passed to `Decoder` (configs written
    before that carry it as `decoder.z_channels`; `TokenizerConfig.migrate` reads them).
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...] = ()
    out_channels: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"decoder.ch_mult={self.ch_mult} must be a non-empty list of positive ints")
        if self.ch < 1 or self.out_channels < 1 or self.num_res_blocks < 0:
            raise ValueError(
                f"decoder sizes must be positive (ch={self.ch}, out_channels={self.out_channels}, "
                f"num_res_blocks={self.num_res_blocks})"
            )
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(f"decoder widths {bad} (ch * ch_mult) must be multiples of 32 for GroupNorm(32)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"decoder.dropout={self.dropout} must be in [0, 1)")

    @property
    def upsample_factor(self) -> int:
        """Output size over latent size: one x2 upsample between consecutive levels."""
        return 2 ** (len(self.ch_mult) - 1)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpLevel(nn.Module):
    """One decoder resolution: residual blocks (each optionally followed by attention), then upsample."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, attn: bool, upsample: bool, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(num_blocks)
        )
        self.attns = nn.ModuleList(AttnBlock(out_ch) for _ in range(num_blocks)) if attn else None
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.attns is not None:
                x = self.attns[i](x)
        return x if self.upsample is None else self.upsample(x)


class Decoder(nn.Module):
    """Latent (B, latent_channels, s, s) -> image (B, out_channels, s * f, s * f) on the [-1, 1] scale.

    `latent_size` (s) fixes where attention goes: level sizes are s, 2s, 4s, ... from the bottom up, and a
    level gets attention when its size is listed in `cfg.attn_resolutions`. The network is convolutional,
    so other input sizes run too (with attention where it was placed at construction).
    """

    def __init__(self, cfg: DecoderConfig, latent_size: int, *, latent_channels: int) -> None:
        super().__init__()
        if latent_size < 1 or latent_channels < 1:
            raise ValueError(
                f"decoder latent_size={latent_size} and latent_channels={latent_channels} must be positive"
            )
        self.config = cfg
        self.latent_size = latent_size
        self.latent_channels = latent_channels
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(latent_channels, widths[-1], 3, padding=1)
        self.mid = nn.Sequential(
            ResnetBlock(widths[-1], widths[-1], cfg.dropout),
            AttnBlock(widths[-1]),
            ResnetBlock(widths[-1], widths[-1], cfg.dropout),
        )
        levels, size, in_ch = [], latent_size, widths[-1]
        for level in reversed(range(len(widths))):
            levels.append(
                UpLevel(
                    in_ch,
                    widths[level],
                    cfg.num_res_blocks + 1,
                    attn=size in cfg.attn_resolutions,
                    upsample=level > 0,
                    dropout=cfg.dropout,
                )
            )
            in_ch = widths[level]
            size *= 2 if level > 0 else 1
        self.up = nn.ModuleList(levels)  # bottom (widest) level first, in the order they run
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    @property
    def output_size(self) -> int:
        return self.latent_size * self.config.upsample_factor

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final conv: the adaptive GAN weight (taming/LDM) compares gradient norms here."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.up:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))
