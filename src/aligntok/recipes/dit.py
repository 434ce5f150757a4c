"""DiT training recipes: a model size preset (aligntok.models.dit.DIT_PRESETS) plus its optimisation."""

from __future__ import annotations

from aligntok.train.dit import DiTTrainConfig


def _paper() -> DiTTrainConfig:
    # docs/method.md, "Diffusion model": LightningDiT-XL/1, AdamW lr 2e-4, beta2 0.95, batch 1024, 80K steps
    # (64 ImageNet epochs); QK-norm on because long runs diverged without it; LightningDiT's cosine term.
    return DiTTrainConfig(
        model="XL/1",
        qk_norm=True,
        steps=80_000,
        batch_size=1024,
        lr=2e-4,
        betas=(0.9, 0.95),
        ema_decay=0.9999,
        cosine_weight=1.0,
        bf16=True,
        log_every=100,
        ckpt_every=5000,
    )


def _small(steps: int) -> DiTTrainConfig:
    # Small data on 2 CPU cores: a ~3M model, a higher lr and a faster EMA suit runs of a few thousand steps.
    return DiTTrainConfig(
        model="T/1",
        steps=steps,
        batch_size=64,
        lr=5e-4,
        betas=(0.9, 0.95),
        warmup_steps=100,
        ema_decay=0.999,
        cosine_weight=0.0,
        log_every=50,
        ckpt_every=500,
    )


def _debug() -> DiTTrainConfig:
    return DiTTrainConfig(
        model="debug/1", steps=40, batch_size=16, lr=1e-3, ema_decay=0.9, log_every=10, ckpt_every=20
    )


DIT_TRAIN_RECIPES = {
    "paper": _paper,
    "emoji": lambda: _small(4000),
    "fashion": lambda: _small(4000),
    "debug": _debug,
}


def dit_train_recipe(name: str) -> DiTTrainConfig:
    """The training recipe `name` (model size + optimisation); `--set k=v` refines it."""
    if name not in DIT_TRAIN_RECIPES:
        raise ValueError(f"unknown DiT recipe {name!r}; known: {sorted(DIT_TRAIN_RECIPES)}")
    return DIT_TRAIN_RECIPES[name]()
