"""CNN encoders: EfficientNet-Lite0, VGG16 (pretrained) and the LDM AutoencoderKL encoder (from scratch)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aligntok.models.encoders.base import HALF, Encoder, EncoderConfig, as_int, norm_kwargs
from aligntok.models.layers import AttnBlock, ResnetBlock, group_norm

# The TF EfficientNet-Lite recipe normalises with (x * 255 - 127) / 128. The ported weights agree: on photos
# the stem BatchNorm's batch variance sits within exp(0.40) of its running variance with this scaling and
# exp(1.68) with ImageNet statistics (docs/encoders.md; tested in tests/models/test_encoders.py).
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3


def _check_cnn_config(cfg: EncoderConfig, valid_blocks: range, default: int) -> int:
    if cfg.path is not None or cfg.hf_config is not None or cfg.layer is not None:
        raise ValueError(
            f"encoder {cfg.name!r} is a built-in CNN: path, hf_config and layer apply to the transformers "
            "encoders (dinov2, siglip, clip, mae); choose the feature map with `block`"
        )
    block = default if cfg.block is None else cfg.block
    if block not in valid_blocks:
        raise ValueError(
            f"encoder {cfg.name!r}: block {block} is out of range; choose "
            f"{valid_blocks.start}..{valid_blocks.stop - 1} (default {default})"
        )
    return block


class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite0 (package `efficientnet_lite_pytorch`) tapped after MBConv block `block`.

    Only the stem and blocks 0..`block` run for `features()`; the rest of the network (later blocks, head,
    classifier) is kept, frozen, for `logits()`. Padding is TF "SAME" computed per input (the package's
    dynamic variant), which equals the package's default static padding at 224 px and at any multiple of 32,
    and stays correct at other sizes. Drop-connect is off: tokenizer features must be deterministic.
    """

    NUM_BLOCKS = 16
    DEFAULT_BLOCK = 10  # 112 channels, stride 16: docs/design.md's measured choice (55% probe on emoji)

    def __init__(self, cfg: EncoderConfig) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        block = _check_cnn_config(cfg, range(self.NUM_BLOCKS), self.DEFAULT_BLOCK)
        norm = norm_kwargs(cfg, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)
        super().__init__(input_size=cfg.input_size, **norm)
        self.block = block
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        if cfg.pretrained:
            from safetensors.torch import load_file

            from aligntok import assets

            state = load_file(assets.require("efficientnet-lite0") / "model.safetensors")
            self.net.load_state_dict(state, strict=True)
        taps = self.net._blocks[: self.block + 1]
        self.dim = int(taps[-1]._block_args.output_filters)
        # The stem has stride 2; each block's depthwise conv contributes its own (stored as int or [int]).
        self._strides = [2] + [as_int(b._block_args.stride) for b in taps]
        self.stride = math.prod(self._strides)
        net = self.net
        self._freeze_unused([*net._blocks[self.block + 1 :], net._conv_head, net._bn1, net._fc])

    def _stem(self, x: Tensor) -> Tensor:
        # Channels-last activations: the CPU's depthwise and 1x1 convolutions run ~1.5x faster in that layout
        # (forward and backward, fp32 and bf16; the weights keep theirs) for the same sums to ~1e-6.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.net._swish(self.net._bn0(self.net._conv_stem(x)))

    def _run(self, x: Tensor) -> Tensor:
        x = self._stem(x)
        for block in self.net._blocks[: self.block + 1]:
            x = block(x, drop_connect_rate=None)
        return x.contiguous()

    def _grid(self, size: int) -> int:
        for s in self._strides:  # "SAME" padding: every strided conv gives ceil(n / s)
            size = -(-size // s)
        return size

    def logits(self, images: Tensor) -> Tensor:
        """ImageNet-1k logits (B, 1000) of images in [0, 1] through the whole classifier (all 16 blocks)."""
        net = self.net
        x = self._stem(self.prepare(images))
        for block in net._blocks:
            x = block(x, drop_connect_rate=None)
        x = net._swish(net._bn1(net._conv_head(x)))
        return net._fc(net._dropout(net._avg_pooling(x).flatten(1)))


class VGG16Encoder(Encoder):
    """VGG16 convs (the LPIPS trunk, ImageNet weights) tapped after the ReLU closing stage `block` (1..5)."""

    DEFAULT_BLOCK = 4  # relu4_3: 512 channels, stride 8

    def __init__(self, cfg: EncoderConfig) -> None:
        from aligntok.models.lpips import VGG_MEAN, VGG_STD, VGG16Features, load_vgg16_trunk

        block = _check_cnn_config(cfg, range(1, 6), self.DEFAULT_BLOCK)
        super().__init__(input_size=cfg.input_size, **norm_kwargs(cfg, VGG_MEAN, VGG_STD))
        self.block = block
        self.trunk = load_vgg16_trunk() if cfg.pretrained else VGG16Features()
        self.dim = VGG16Features.CHANNELS[self.block - 1]
        self.stride = 2 ** (self.block - 1)
        self._freeze_unused([self.trunk.features[VGG16Features.TAPS[self.block - 1] + 1 :]])

    def _run(self, x: Tensor) -> Tensor:
        return self.trunk(x, stages=self.block)[-1]

    def _grid(self, size: int) -> int:
        for _ in range(self.block - 1):  # each 2x2 max-pool floors
            size //= 2
        return size


# ---------------------------------------------------------------------------------------------------------
# A CNN trained from scratch: the LDM AutoencoderKL encoder shape


# A small LDM-shaped encoder; recipes write their own `arch` (e.g. mirroring their decoder).
CNN_ARCH_DEFAULTS: dict = {
    "ch": 64,  # width of the first level; GroupNorm(32) needs every ch * ch_mult to be a multiple of 32
    "ch_mult": [1, 2, 2, 4],  # one level per entry, a stride-2 conv between consecutive levels
    "num_res_blocks": 1,  # ResnetBlocks per level
    "attn_resolutions": [],  # feature-map sizes (at `input_size`) whose level gets self-attention
    "out_dim": 256,  # feature channels (the adapter's input width)
}


def _cnn_arch(cfg: EncoderConfig) -> dict:
    """`cfg.arch` over CNN_ARCH_DEFAULTS, checked, as JSON-like data (lists), for `resolved_config`."""
    given = {} if cfg.arch is None else cfg.arch
    if not isinstance(given, dict) or set(given) - set(CNN_ARCH_DEFAULTS):
        raise ValueError(
            f"encoder 'cnn': arch={given!r} must be a mapping with keys among {sorted(CNN_ARCH_DEFAULTS)}"
        )
    arch = {**CNN_ARCH_DEFAULTS, **given}

    def positive_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    ok = all(positive_int(arch[k]) for k in ("ch", "num_res_blocks", "out_dim")) and all(
        isinstance(arch[k], (list, tuple)) and all(positive_int(v) for v in arch[k])
        for k in ("ch_mult", "attn_resolutions")
    )
    if not ok or not arch["ch_mult"]:
        raise ValueError(
            f"encoder 'cnn': arch {arch} needs positive ints ch, num_res_blocks, out_dim, a non-empty "
            "ch_mult list and an attn_resolutions list (possibly empty) of positive ints"
        )
    arch["ch_mult"], arch["attn_resolutions"] = list(arch["ch_mult"]), list(arch["attn_resolutions"])
    bad = [arch["ch"] * m for m in arch["ch_mult"] if (arch["ch"] * m) % 32]
    if bad:
        raise ValueError(
            f"encoder 'cnn': widths {bad} (ch * ch_mult) must be multiples of 32 for GroupNorm(32)"
        )
    return arch


class CNNEncoder(Encoder):
    """The LDM AutoencoderKL encoder, randomly initialised and trained with the tokenizer (no weights exist).

    conv_in -> one level per `ch_mult` entry: `num_res_blocks` ResnetBlocks (each followed by self-attention
    where the level's size is in `attn_resolutions`), then a 3x3 stride-2 conv except after the last level
    -> mid (ResnetBlock, attention, ResnetBlock) -> GroupNorm + SiLU + conv_out to `out_dim` channels. The
    blocks are the decoder's (aligntok.models.layers). The downsampling conv pads by 1 on every side (LDM
    pads right/bottom only), so an n-pixel map becomes ceil(n / 2). Input normalisation maps [0, 1] to
    [-1, 1] (mean = std = 0.5) unless the config says otherwise. Attention sizes are feature-map sizes, which
    depend on the input size: with `attn_resolutions` set, `input_size` must be set too.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        if cfg.pretrained:
            raise ValueError(
                "encoder 'cnn' is trained from scratch and has no pretrained weights; set "
                "pretrained=False (--set encoder.pretrained=false)"
            )
        wrong = [k for k in ("block", "path", "hf_config", "layer") if getattr(cfg, k) is not None]
        if wrong:
            raise ValueError(f"encoder 'cnn' takes its architecture from `arch`; remove {', '.join(wrong)}")
        arch = _cnn_arch(cfg)
        super().__init__(input_size=cfg.input_size, **norm_kwargs(cfg, HALF, HALF))
        self.arch = arch
        widths = [arch["ch"] * m for m in arch["ch_mult"]]
        sizes = [self._grid_after(cfg.input_size, i) for i in range(len(widths))] if cfg.input_size else []
        attn = set(arch["attn_resolutions"])
        if attn and not cfg.input_size:
            raise ValueError(
                f"encoder 'cnn': attn_resolutions {sorted(attn)} are feature-map sizes, which depend on the "
                "input size; set encoder.input_size (e.g. to the tokenizer's image_size)"
            )
        if attn - set(sizes):
            raise ValueError(
                f"encoder 'cnn': attn_resolutions {sorted(attn)} match none of the level sizes {sizes} at "
                f"input_size {cfg.input_size}; pick sizes from that list"
            )
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        levels, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            level: list[nn.Module] = []
            for _ in range(arch["num_res_blocks"]):
                level.append(ResnetBlock(in_ch, width, dropout=0.0))
                in_ch = width
                if sizes and sizes[i] in attn:
                    level.append(AttnBlock(width))
            if i < len(widths) - 1:
                level.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
            levels.append(nn.Sequential(*level))
        self.down = nn.ModuleList(levels)
        self.mid = nn.Sequential(
            ResnetBlock(in_ch, in_ch, dropout=0.0), AttnBlock(in_ch), ResnetBlock(in_ch, in_ch, dropout=0.0)
        )
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, arch["out_dim"], 3, padding=1)
        self.dim = arch["out_dim"]
        self.stride = 2 ** (len(widths) - 1)

    @staticmethod
    def _grid_after(size: int, downsamples: int) -> int:
        for _ in range(downsamples):
            size = -(-size // 2)  # 3x3 conv, stride 2, padding 1: ceil(n / 2)
        return size

    def resolved_config(self, cfg: EncoderConfig) -> EncoderConfig:
        """`cfg` with the full architecture written out (defaults filled in); no weights to drop."""
        return dataclasses.replace(cfg, pretrained=False, arch=dict(self.arch))

    def _run(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))

    def _grid(self, size: int) -> int:
        return self._grid_after(size, len(self.down) - 1)
