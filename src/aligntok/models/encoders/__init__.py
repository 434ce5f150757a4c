"""Foundation encoders behind one interface: images in [0, 1] -> a (B, D, h, w) feature grid.

Registry (`ENCODERS`): `efficientnet-lite0` (the offline default, a CNN), `vgg16` (the LPIPS trunk), the
ViT families of the paper, loaded through `transformers` from a local folder or built from a config:
`dinov2` (with or without registers), `siglip` (SigLIP and SigLIP 2, fixed-size or NaFlex), `clip`, `mae`;
and `cnn`, the LDM AutoencoderKL encoder trained from scratch (the VAE baselines' encoder, not a foundation
model).
The interface (`EncoderConfig`, `Encoder`) is in `base.py`, the CNNs in `cnn.py`, the ViTs in `vit.py`; this
module is the registry.
Measured dims and strides per block, and why the presets feed images at the sizes they do: docs/encoders.md.
"""

from __future__ import annotations

from collections.abc import Callable

from aligntok.models.encoders.base import Encoder, EncoderConfig
from aligntok.models.encoders.cnn import CNN_ARCH_DEFAULTS, CNNEncoder, EfficientNetLiteEncoder, VGG16Encoder
from aligntok.models.encoders.vit import HFViTEncoder

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
