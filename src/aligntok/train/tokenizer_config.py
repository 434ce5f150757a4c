"""The tokenizer training config: a recipe's stages (`StageConfig`) and what they share
(`TokenizerTrainConfig`). Range checks run where a config is built, so `--set` fails before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from aligntok.config import check_ranges
from aligntok.losses import SP_KINDS, VF_MARGINS
from aligntok.models.discriminator import DiscriminatorConfig
from aligntok.models.encoders import EncoderConfig
from aligntok.models.tokenizer import TokenizerConfig
from aligntok.parallelize import ParallelConfig

GROUPS = ("encoder", "adapter", "decoder")
VF_WEIGHT_MODES = ("fixed", "adaptive")


@dataclass(kw_only=True)
class StageConfig:
    """One stage: trained parameter groups, losses, length, learning rates, EMA."""

    name: str  # "1", "2", "3" for AlignTok; e.g. "vae" for a one-stage baseline
    steps: int
    train: tuple[str, ...]  # parameter groups that train: subset of encoder, adapter, decoder
    lr: float = 1e-4
    encoder_lr: float | None = None  # stage 2 fine-tunes the encoder with a lower lr (None: same as lr)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    gan_weight: float = 0.5  # base weight of the adaptive GAN term (taming/LDM rule); 0 disables the GAN
    gan_start: int = 0  # stage step at which the discriminator and the GAN term start
    sp_weight: float = 0.0  # w_sp of L_sp (stage 2 only in AlignTok)
    # "l2": the paper's raw MSE; "l2_norm": per channel over the stage-1 latent's variance (scale-free);
    # "cosine": 1 - cos over channels (aligntok.losses.semantic_preservation_loss). The CPU recipes use
    # "l2_norm", the `paper` recipe the published "l2" (docs/training.md).
    sp_kind: Literal["l2", "l2_norm", "cosine"] = "l2"
    kl_weight: float = 0.0  # vanilla VAE baselines: 1e-6
    vf_weight: float = 0.0  # VA-VAE baseline: vision-foundation alignment loss (its base weight if adaptive)
    # "adaptive": VA-VAE's rule, vf_weight x ||grad L_rec|| / ||grad L_vf|| at the adapter's last layer
    vf_weight_mode: Literal["fixed", "adaptive"] = "fixed"
    ema_decay: float | None = None  # keep an EMA and export it (stage 2)
    keep_exports: tuple[int, ...] = ()  # steps whose export is also kept (studies against steps)
    max_consecutive_skips: int = 20  # steps with a non-finite loss or gradient in a row before the run stops

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive=("steps",),
            non_negative=(
                *("lr", "encoder_lr", "warmup_steps", "gan_start", "max_consecutive_skips"),
                *("l1_weight", "lpips_weight", "gan_weight", "sp_weight", "kl_weight", "vf_weight"),
            ),
            probability=("ema_decay",),
        )
        self.train = tuple(self.train)
        unknown = set(self.train) - set(GROUPS)
        if unknown or not self.train:
            raise ValueError(f"stage {self.name}: train={self.train} must be a non-empty subset of {GROUPS}")
        for field_name, allowed in (("sp_kind", SP_KINDS), ("vf_weight_mode", VF_WEIGHT_MODES)):
            if getattr(self, field_name) not in allowed:
                raise ValueError(
                    f"stage {self.name}: {field_name}={getattr(self, field_name)!r} is not in {allowed}"
                )
        self.keep_exports = tuple(self.keep_exports)
        if not all(0 < s <= self.steps for s in self.keep_exports):
            raise ValueError(
                f"stage {self.name}: keep_exports={self.keep_exports} must be steps in 1..{self.steps} "
                "(set the stage's steps first)"
            )
        if self.vf_weight_mode == "adaptive" and self.vf_weight > 0 and "adapter" not in self.train:
            raise ValueError(
                f"stage {self.name}: vf_weight_mode='adaptive' balances gradients at the adapter's last "
                "layer, which this stage does not train; add 'adapter' to train or use vf_weight_mode='fixed'"
            )

    @property
    def length_free(self) -> bool:
        """Whether nothing before a step depends on the stage's length: under a constant lr schedule the data
        order, the warm-up and the EMA are functions of the step alone. Then the stage's export at step s is
        the export of the same stage s steps long, and a finished stage can be lengthened by resuming it."""
        return self.schedule == "constant"


@dataclass(kw_only=True)
class TokenizerTrainConfig:
    model: TokenizerConfig
    data: str = "emoji"
    stages: tuple[StageConfig, ...]
    batch_size: int = 32  # global
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lpips_net: Literal["vgg", "alex"] = "vgg"  # AlexNet LPIPS is ~50x cheaper: the CPU recipes' choice
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    disc_lr: float = 1e-4
    vf_encoder: EncoderConfig | None = None  # VA-VAE: the frozen foundation encoder the latent aligns to
    vf_margins: tuple[float, float] = VF_MARGINS  # VA-VAE's cosine and distance-matrix margins
    bf16: bool = False
    seed: int = 0
    num_workers: int = 0
    log_every: int = 25
    val_every: int = 250
    num_val: int = 16
    ckpt_every: int = 500
    stats_batches: int | None = None  # batches of training data for latent statistics (None: all)
    sp_stats_batches: int = 16  # batches of 64 for the stage-1 latent variance of sp_kind="l2_norm"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive=(
                "batch_size",
                "grad_clip",
                "log_every",
                "val_every",
                "num_val",
                "ckpt_every",
                "stats_batches",
                "sp_stats_batches",
            ),
            non_negative=("weight_decay", "disc_lr", "num_workers"),
        )
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TokenizerTrainConfig.betas={self.betas} must lie in [0, 1)")
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"stages need distinct names, got {names}")
        if any(s.vf_weight > 0 for s in self.stages) and self.vf_encoder is None:
            raise ValueError("a stage has vf_weight > 0 but vf_encoder is not set")
