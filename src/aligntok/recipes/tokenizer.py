"""Tokenizer presets: `paper` (DINOv2-L/14, f16 d32, the ~41M LDM decoder) and CPU-sized variants.

Each preset is a function returning a fresh `TokenizerConfig`; change fields with `--set`
(`aligntok.config.apply_overrides`). Measured sizes are in docs/tokenizer.md.
"""

from __future__ import annotations

from collections.abc import Callable

from aligntok.models.decoder import DecoderConfig
from aligntok.models.encoders import EncoderConfig
from aligntok.models.tokenizer import TokenizerConfig

# Architecture of DINOv2 ViT-L/14 as a `transformers` Dinov2Config. The preset asks for pretrained weights
# but names no folder (they cannot be fetched offline here), so building it as is fails with a message
# naming both fixes: `--set encoder.path=/local/dinov2-large` for real runs, or
# `--set encoder.pretrained=false` for this architecture randomly initialised. The position table is the
# released one (518 px = 37x37 patches); at 224 px input it is interpolated to 16x16.
DINOV2_LARGE = {
    "model_type": "dinov2",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
}


def paper() -> TokenizerConfig:
    """PAPER.md: DINOv2-L/14 at 224 px -> 16x16 tokens, adapter 1024 -> 512 -> 32, VA-VAE f16d32 decoder."""
    return TokenizerConfig(
        image_size=256,
        encoder=EncoderConfig(name="dinov2", input_size=224, hf_config=dict(DINOV2_LARGE), pretrained=True),
        # UNKNOWN in the paper: a hidden width between the 1024-d tokens and the 32-d latent.
        adapter_hidden=512,
        latent_channels=32,
        decoder=DecoderConfig(
            z_channels=32, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,)
        ),
    )


def emoji() -> TokenizerConfig:
    """64 px emoji: EfficientNet-Lite0 block 10 (112 ch, stride 16) fed at 128 px -> 8x8x16 latent."""
    return TokenizerConfig(
        image_size=64,
        encoder=EncoderConfig(name="efficientnet-lite0", block=10, input_size=128),
        adapter_hidden=256,
        # 16 channels: 32 px used 8x8x8 (DESIGN.md); 4x the pixels at the same grid get 2x the channels.
        latent_channels=16,
        # Width halves as resolution doubles (256@8 .. 32@64 px): each level costs about the same, 2.8
        # GFLOP/image in all, where ch=64 with (1, 2, 2, 4) costs 5.7 (docs/tokenizer.md).
        decoder=DecoderConfig(
            z_channels=16, ch=32, ch_mult=(1, 2, 4, 8), num_res_blocks=1, attn_resolutions=(8,)
        ),
    )


def fashion() -> TokenizerConfig:
    """32 px Fashion-MNIST: EfficientNet-Lite0 block 10 fed at 128 px -> 8x8x8 (DESIGN.md's 32 px setup)."""
    return TokenizerConfig(
        image_size=32,
        encoder=EncoderConfig(name="efficientnet-lite0", block=10, input_size=128),
        adapter_hidden=256,
        latent_channels=8,
        decoder=DecoderConfig(
            z_channels=8, ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(8,)
        ),
    )


def debug() -> TokenizerConfig:
    """Seconds on a CPU: EfficientNet-Lite0 block 4 (40 ch, stride 8) at 32 px -> 4x4x4 latent."""
    return TokenizerConfig(
        image_size=32,
        encoder=EncoderConfig(name="efficientnet-lite0", block=4),
        adapter_hidden=32,
        latent_channels=4,
        decoder=DecoderConfig(
            z_channels=4, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(4,)
        ),
    )


TOKENIZER_PRESETS: dict[str, Callable[[], TokenizerConfig]] = {
    "paper": paper,
    "emoji": emoji,
    "fashion": fashion,
    "debug": debug,
}


def tokenizer_preset(name: str) -> TokenizerConfig:
    """A fresh copy of the named tokenizer config; ValueError listing the names if unknown."""
    if name not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
    return TOKENIZER_PRESETS[name]()
