"""The encoder interface: `EncoderConfig`, the `Encoder` base class and helpers the implementations share.

Every encoder resizes its input to `input_size`, normalises it with its own mean/std (or the config's), runs
only the layers its feature map needs, and returns channels-first features; `grid(image_size)` says how large
that map is. `resolved_config(cfg)` is the config that rebuilds the same architecture, preprocessing included,
without any file but a tokenizer export (no weights folder, no asset).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def norm_kwargs(
    cfg: EncoderConfig, mean: Iterable[float], std: Iterable[float]
) -> dict[str, Iterable[float]]:
    """The config's mean/std where set, else the encoder's own (`mean`, `std`)."""
    return {
        "mean": mean if cfg.mean is None else cfg.mean,
        "std": std if cfg.std is None else cfg.std,
    }


def as_int(v: int | list[int] | tuple[int, ...]) -> int:
    """A size stored as int or as a one-element (or per-axis, first taken) list."""
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)
