"""Tokenizer presets: `paper` (DINOv2-L/14, f16 d32, the ~41M LDM decoder) and CPU-sized variants.

Each preset is a function returning a fresh `TokenizerConfig`; change fields with `--set`
(`aligntok.config.apply_overrides`). Measured sizes are in docs/tokenizer.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aligntok.models.decoder import DecoderConfig
from aligntok.models.encoders import EncoderConfig
from aligntok.models.tokenizer import TokenizerConfig
from aligntok.train.tokenizer_config import StageConfig, TokenizerTrainConfig

# VA-VAE's base VF weight under its adaptive rule (LightningDiT's VA-VAE config), for the `vavae` baseline.
VAVAE_VF_WEIGHT = 0.1
# w_sp of the 32 px recipes (scale-free `l2_norm`): the stage-2 study's choice (docs/results.md, "Stage 2
# in the paper's regime").
SP_WEIGHT_32PX = 0.01

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
    """docs/method.md: DINOv2-L/14 at 224 px -> 16x16 tokens, adapter 1024 -> 512 -> 32, VA-VAE f16d32
    decoder."""
    return TokenizerConfig(
        image_size=256,
        encoder=EncoderConfig(name="dinov2", input_size=224, hf_config=dict(DINOV2_LARGE), pretrained=True),
        # UNKNOWN in the paper: a hidden width between the 1024-d tokens and the 32-d latent.
        adapter_hidden=512,
        latent_channels=32,
        decoder=DecoderConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,)),
    )


def emoji() -> TokenizerConfig:
    """64 px emoji: EfficientNet-Lite0 block 10 (112 ch, stride 16) fed at 128 px -> 8x8x16 latent."""
    return TokenizerConfig(
        image_size=64,
        encoder=EncoderConfig(name="efficientnet-lite0", block=10, input_size=128),
        adapter_hidden=256,
        # 16 channels: 32 px used 8x8x8 (docs/design.md); 4x the pixels at the same grid get 2x the channels.
        latent_channels=16,
        # Width halves as resolution doubles (256@8 .. 32@64 px): each level costs about the same. One
        # residual block per level (num_res_blocks=0) costs ~70% of two; the decoder is what a CPU step
        # spends most on (docs/training.md).
        decoder=DecoderConfig(ch=32, ch_mult=(1, 2, 4, 8), num_res_blocks=0, attn_resolutions=(8,)),
    )


def small32() -> TokenizerConfig:
    """32 px images (Fashion-MNIST; emoji for `aligntok demo`): EfficientNet-Lite0 block 10 fed at 128 px ->
    8x8x8, docs/design.md's 32 px setup (frozen, that block reached 55% balanced probe accuracy on emoji)."""
    return TokenizerConfig(
        image_size=32,
        encoder=EncoderConfig(name="efficientnet-lite0", block=10, input_size=128),
        adapter_hidden=256,
        latent_channels=8,
        decoder=DecoderConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(8,)),
    )


def debug() -> TokenizerConfig:
    """Seconds on a CPU: EfficientNet-Lite0 block 4 (40 ch, stride 8) at 32 px -> 4x4x4 latent."""
    return TokenizerConfig(
        image_size=32,
        encoder=EncoderConfig(name="efficientnet-lite0", block=4),
        adapter_hidden=32,
        latent_channels=4,
        decoder=DecoderConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(4,)),
    )


TOKENIZER_PRESETS: dict[str, Callable[[], TokenizerConfig]] = {
    "paper": paper,
    "emoji": emoji,
    "fashion": small32,
    "emoji32": small32,
    "debug": debug,
}


def tokenizer_preset(name: str) -> TokenizerConfig:
    """A fresh copy of the named tokenizer config; ValueError listing the names if unknown."""
    if name not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
    return TOKENIZER_PRESETS[name]()


# ---------------------------------------------------------------------------------------------------------
# Training recipes: a model preset + a budget + a variant. Variants are data: the AlignTok three stages, and
# the baselines it is measured against (docs/method.md; issue "Three-stage alignment training", item 3).


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Lengths and optimisation of one dataset's recipe; the three AlignTok stages share the total."""

    batch_size: int
    stage_steps: tuple[int, int, int]
    lr: float
    encoder_lr: float  # stage 2 fine-tunes the foundation encoder (docs/method.md, stage 2)
    gan_start: int  # stage-1 step at which the discriminator starts (later stages keep it on)
    gan_weight: float = 0.5  # base weight of the adaptive GAN term in every stage; 0: no discriminator
    sp_weight: float = 1.0  # w_sp of L_sp in stage 2
    sp_kind: str = "l2_norm"  # scale-free: w_sp means the same for any stage-1 latent (docs/training.md)
    ema_decay: float  # stage 2's EMA
    refine_lr: float | None = None  # stage 3's lr (None: `lr`)
    refine_ema: float | None = None  # stage 3's decoder EMA, which it exports (None: none)
    log_every: int
    val_every: int
    ckpt_every: int
    bf16: bool
    data: str
    lpips_net: str = "vgg"


BUDGETS: dict[str, Budget] = {
    # Our choice for GPU users (docs/method.md: lengths UNKNOWN): VA-VAE's budget of ~50 ImageNet epochs at
    # batch 256 (~250K steps), split 2 : 2 : 1 over the stages. `data` must be set to an image folder.
    "paper": Budget(
        batch_size=256,
        stage_steps=(100_000, 100_000, 50_000),
        lr=1e-4,
        encoder_lr=1e-5,
        gan_start=20_000,
        sp_kind="l2",  # the paper's raw L2 at w_sp = 1, as published (its latent's scale: UNKNOWN)
        ema_decay=0.9999,
        refine_ema=0.9999,
        log_every=100,
        val_every=2000,
        ckpt_every=5000,
        bf16=True,
        data="",
    ),
    # CPU-sized: minutes per stage on 2 cores (docs/results.md has the measured runs). AlexNet LPIPS: VGG's
    # costs about as much as the whole decoder at 64 px on a CPU (docs/training.md).
    "emoji": Budget(
        batch_size=16,
        stage_steps=(600, 400, 200),
        lr=2e-4,
        encoder_lr=2e-5,
        gan_start=300,
        ema_decay=0.99,
        refine_ema=0.99,
        log_every=20,
        val_every=100,
        ckpt_every=100,
        bf16=True,
        data="emoji",
        lpips_net="alex",
    ),
    "debug": Budget(
        batch_size=4,
        stage_steps=(4, 4, 3),
        lr=1e-3,
        encoder_lr=1e-4,
        gan_start=2,
        ema_decay=0.5,
        refine_ema=0.5,
        log_every=1,
        val_every=2,
        ckpt_every=2,
        bf16=False,
        data="emoji",
    ),
}


# 32 px at batch 32 (the `small32` model): a 3x higher lr. Measured, stage 1 of emoji32 for 500 steps, val
# PSNR at steps 100 / 300: 11.9 / 13.7 dB at lr 2e-4 against 15.9 / 18.6 dB at 6e-4 (1e-3: 15.6 / 18.6).
# No GAN: at these budgets the discriminator never leaves chance in training (though, trained alone against
# the frozen reconstructions, it separates them in 200 steps: benchmarks/disc_probe.py), and the adaptive
# term it drives cost every tokenizer measured reconstruction and gFID (the Fashion-MNIST VAE's val PSNR
# fell from 21.8 dB at the GAN's start to 17.6 dB 100 steps later; the same 800 decoder-only steps gave it
# 26.6 dB / rFID 34 without the GAN against 23.0 dB / 56 with it; docs/results.md, "Why the GAN went").
# Stage 2 and 3 as the stage-2 study chose them (docs/results.md, "Stage 2 in the paper's regime"): an
# encoder lr of 2e-4, at which w_sp = 0 measurably drifts and w_sp has something to protect; stage 3 at
# 2e-4 with a decoder EMA of 0.99 (+0.6 dB and 5 rFID over no EMA at the recipe's lr).
BUDGETS["emoji32"] = dataclasses.replace(
    BUDGETS["emoji"],
    batch_size=32,
    lr=6e-4,
    gan_weight=0.0,
    encoder_lr=2e-4,
    sp_weight=SP_WEIGHT_32PX,
    refine_lr=2e-4,
)
BUDGETS["fashion"] = dataclasses.replace(BUDGETS["emoji32"], data="fashion-mnist")


def _aligntok_stages(b: Budget, *, sp_weight: float) -> tuple[StageConfig, ...]:
    s1, s2, s3 = b.stage_steps
    return (
        # Stage 1, latent alignment: frozen encoder, adapter + decoder learn to reconstruct.
        StageConfig(
            name="1",
            steps=s1,
            train=("adapter", "decoder"),
            lr=b.lr,
            gan_weight=b.gan_weight,
            gan_start=b.gan_start,
        ),
        # Stage 2, perceptual alignment: everything trains, the encoder at a lower lr; L_sp keeps the latent
        # close to the frozen stage-1 tokenizer's; the EMA is what stage 2 exports.
        StageConfig(
            name="2",
            steps=s2,
            train=("encoder", "adapter", "decoder"),
            lr=b.lr,
            encoder_lr=b.encoder_lr,
            gan_weight=b.gan_weight,
            sp_weight=sp_weight,
            sp_kind=b.sp_kind,
            ema_decay=b.ema_decay,
        ),
        # Stage 3, decoder refinement: encoder and adapter frozen, the latent space no longer moves; its own
        # lr, and a decoder EMA that it exports.
        StageConfig(
            name="3",
            steps=s3,
            train=("decoder",),
            lr=b.refine_lr or b.lr,
            gan_weight=b.gan_weight,
            ema_decay=b.refine_ema,
        ),
    )


def _vae_model(model: TokenizerConfig) -> TokenizerConfig:
    """The vanilla-VAE baseline's model: same latent size and decoder, a CNN encoder trained from scratch
    (the LDM encoder shape mirroring the decoder), a Gaussian posterior."""
    dec = model.decoder
    grid = model.image_size // dec.upsample_factor
    arch = {
        "ch": dec.ch,
        "ch_mult": list(dec.ch_mult),
        "num_res_blocks": max(1, dec.num_res_blocks),
        "attn_resolutions": [grid],
        "out_dim": dec.ch * dec.ch_mult[-1],
    }
    return dataclasses.replace(
        model,
        encoder=EncoderConfig(name="cnn", arch=arch, input_size=model.image_size, pretrained=False),
        posterior="gaussian",
    )


def _one_stage(b: Budget, **losses: Any) -> tuple[StageConfig, ...]:
    """A single stage with the whole budget, every part trained (the baselines' fair share)."""
    return (
        StageConfig(
            name="all",
            steps=sum(b.stage_steps),
            train=("encoder", "adapter", "decoder"),
            lr=b.lr,
            gan_weight=b.gan_weight,
            gan_start=b.gan_start,
            **losses,
        ),
    )


VARIANTS = ("aligntok", "stage1", "wsp0", "vae", "vavae")


def tokenizer_train_recipe(name: str) -> TokenizerTrainConfig:
    """`<base>` or `<base>-<variant>`: base in BUDGETS, variant in VARIANTS (`aligntok` is the default).

    - aligntok: the three stages (the budget's w_sp);  stage1: stage 1 alone for the whole budget;
    - wsp0: the three stages with w_sp = 0 (docs/method.md: semantics collapse);
    - vae: a CNN encoder from scratch, Gaussian posterior, KL weight 1e-6, one stage, the same budget;
    - vavae: the vae plus VA-VAE's vision-foundation alignment loss to the frozen foundation encoder, with
      VA-VAE's adaptive weight (`stages.0.vf_weight_mode=fixed` for a fixed one).
    """
    base, _, variant = name.partition("-")
    variant = variant or "aligntok"
    if base not in BUDGETS or variant not in VARIANTS:
        raise ValueError(
            f"unknown tokenizer recipe {name!r}; use <base>[-<variant>] with base in "
            f"{sorted(BUDGETS)} and variant in {list(VARIANTS)}, e.g. emoji-vae"
        )
    b = BUDGETS[base]
    model = tokenizer_preset(base)
    vf_encoder = None
    if variant == "aligntok":
        stages = _aligntok_stages(b, sp_weight=b.sp_weight)
    elif variant == "wsp0":
        stages = _aligntok_stages(b, sp_weight=0.0)
    elif variant == "stage1":
        stages = (
            dataclasses.replace(_aligntok_stages(b, sp_weight=b.sp_weight)[0], steps=sum(b.stage_steps)),
        )
    else:
        vf_encoder = model.encoder if variant == "vavae" else None
        model = _vae_model(model)
        vf = {"vf_weight": VAVAE_VF_WEIGHT, "vf_weight_mode": "adaptive"} if vf_encoder else {}
        stages = _one_stage(b, kl_weight=1e-6, **vf)
    return TokenizerTrainConfig(
        model=model,
        data=b.data,
        stages=stages,
        batch_size=b.batch_size,
        bf16=b.bf16,
        vf_encoder=vf_encoder,
        log_every=b.log_every,
        val_every=b.val_every,
        lpips_net=b.lpips_net,
        ckpt_every=b.ckpt_every,
    )


def tokenizer_train_recipes() -> list[str]:
    return [base if v == "aligntok" else f"{base}-{v}" for base in BUDGETS for v in VARIANTS]
