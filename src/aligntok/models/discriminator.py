"""PatchGAN discriminator (Isola et al. 2017, pix2pix; the taming / LDM / VA-VAE "NLayerDiscriminator" shape).

Images in [0, 1] -> conv 4x4/2 + LeakyReLU(0.2) -> (num_layers - 1) x [conv 4x4/2 + norm + LeakyReLU],
widths doubling up to 8 * ch -> conv 4x4/1 + norm + LeakyReLU -> conv 4x4/1 to one channel: a grid of patch
logits (B, 1, h', w'). All convs pad by 1, so a 4x4/2 conv halves the size (floor) and a 4x4/1 conv takes
one off it: 32 px with 3 layers gives 2x2 logits, 64 px 6x6, 256 px 30x30.

Normalisation: GroupNorm by default instead of pix2pix's BatchNorm. BatchNorm's statistics depend on the
per-rank batch (different under DDP/FSDP than on one device, unless synced) and are noisy at the small
batches of CPU runs; GroupNorm normalises each sample alone, so the discriminator computes the same function
at any batch size or world size. "batch" stays available for comparison with the reference recipes.
Architecture only: the hinge loss and the adaptive weight live in aligntok.losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn


@dataclass(kw_only=True)
class DiscriminatorConfig:
    """Width `ch` of the first conv, number of stride-2 convs, normalisation, input channels."""

    ch: int = 64
    num_layers: int = 3
    norm: Literal["group", "batch", "none"] = "group"
    input_channels: int = 3

    def __post_init__(self) -> None:
        if self.ch < 1 or self.num_layers < 1 or self.input_channels < 1:
            raise ValueError(
                f"discriminator sizes must be positive (ch={self.ch}, num_layers={self.num_layers}, "
                f"input_channels={self.input_channels})"
            )
        if self.norm not in ("group", "batch", "none"):
            raise ValueError(f"discriminator norm={self.norm!r}; use 'group', 'batch' or 'none'")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        # 32 groups where the width allows it (the LDM convention), fewer for narrow debug widths.
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """Images (B, C_in, H, W) in [0, 1] -> patch logits (B, 1, h', w'); `output_size` gives h'."""

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = cfg
        ch, bias = cfg.ch, cfg.norm == "none"  # a norm's affine shift makes a conv bias redundant
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.input_channels, ch, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = ch
        for n in range(1, cfg.num_layers + 1):
            out = ch * min(2**n, 8)
            stride = 2 if n < cfg.num_layers else 1  # the last block keeps the size (pix2pix)
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=bias),
                _norm(cfg.norm, out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        # pix2pix init: conv weights N(0, 0.02), norm scales N(1, 0.02), shifts and biases 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def output_size(self, size: int) -> int:
        """Side of the logit grid for an input side of `size` pixels."""
        for _ in range(self.config.num_layers):
            size //= 2  # 4x4, stride 2, padding 1
        return size - 2  # two 4x4 stride-1 convs with padding 1

    def forward(self, images: Tensor) -> Tensor:
        """Patch logits (B, 1, h', w') of images (B, C_in, H, W) in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != self.config.input_channels:
            raise ValueError(
                f"discriminator expects (B, {self.config.input_channels}, H, W) images, got "
                f"{tuple(images.shape)}"
            )
        if min(self.output_size(s) for s in images.shape[-2:]) < 1:
            raise ValueError(
                f"images of {tuple(images.shape[-2:])} px are too small for a {self.config.num_layers}-layer "
                f"discriminator (no logits left); lower disc.num_layers"
            )
        return self.net(images * 2.0 - 1.0)
