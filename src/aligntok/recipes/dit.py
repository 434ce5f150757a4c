"""DiT training recipes: a model size preset (aligntok.models.dit.DIT_PRESETS, or for text conditioning
aligntok.models.mmdit.MMDIT_PRESETS) plus its optimisation."""

from __future__ import annotations

import dataclasses

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


def _t2i_paper() -> DiTTrainConfig:
    # docs/text.md: the paper trains a ~2B FLUX-style model at 256 px for 100K steps on LAION; its text
    # encoder, batch size and optimiser are not given. Ours: the "t2i-paper" MMDiT size, the class recipe's
    # AdamW settings, batch 1024, 10% caption dropout, QK-norm; a T5 / CLIP text folder is passed with
    # --set text_encoder=PATH (the embedded MiniLM default is far smaller than what the paper's size expects).
    return dataclasses.replace(
        _paper(),
        conditioning="text",
        model="t2i-paper/1",
        steps=100_000,
        cosine_weight=0.0,
        label_dropout=0.1,
    )


def _t2i_small(steps: int) -> DiTTrainConfig:
    # Emoji captions on 2 CPU cores: the class recipe's optimisation on the CPU-sized MMDiT, QK-norm on (the
    # joint attention over text and image tokens has no other bound on its logits).
    return dataclasses.replace(_small(steps), conditioning="text", model="T/1", qk_norm=True)


def _t2i_debug() -> DiTTrainConfig:
    return dataclasses.replace(_debug(), conditioning="text", qk_norm=True)


DIT_TRAIN_RECIPES = {
    "paper": _paper,
    "emoji": lambda: _small(4000),
    "fashion": lambda: _small(4000),
    "debug": _debug,
    "t2i-paper": _t2i_paper,
    "t2i-emoji": lambda: _t2i_small(4000),
    "t2i-debug": _t2i_debug,
}


def dit_train_recipe(name: str) -> DiTTrainConfig:
    """The training recipe `name` (model size + optimisation); `--set k=v` refines it."""
    if name not in DIT_TRAIN_RECIPES:
        raise ValueError(f"unknown DiT recipe {name!r}; known: {sorted(DIT_TRAIN_RECIPES)}")
    return DIT_TRAIN_RECIPES[name]()
