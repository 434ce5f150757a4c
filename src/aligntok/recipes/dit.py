"""DiT size presets: the published DiT/LightningDiT widths and depths, plus a CPU-sized `debug` size.

A preset name is a size and a patch size, "XL/1", or a bare size with `patch_size=` given.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aligntok.models.dit import DiTConfig
from aligntok.train.dit import DiTTrainConfig

# size -> (hidden_size, depth, num_heads); DiT table 1 (Peebles & Xie 2023), used unchanged by LightningDiT.
DIT_PRESETS: dict[str, dict[str, int]] = {
    "debug": {"hidden_size": 64, "depth": 2, "num_heads": 4},
    # Not a published size: the CPU-sized model of our small-data recipes (emoji, Fashion-MNIST).
    "T": {"hidden_size": 256, "depth": 4, "num_heads": 4},
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}


def dit_preset(
    name: str,
    *,
    in_channels: int,
    input_size: int,
    num_classes: int,
    patch_size: int | None = None,
    **overrides: Any,
) -> DiTConfig:
    """DiTConfig for a preset such as "XL/1" (or "XL" with `patch_size`), on a latent of `in_channels`
    channels and an `input_size` grid; `overrides` set any other DiTConfig field (e.g. qk_norm=True)."""
    size, sep, patch_text = name.partition("/")
    if size not in DIT_PRESETS:
        raise ValueError(f"unknown DiT size {size!r} in {name!r}; known: {sorted(DIT_PRESETS)}")
    if sep:
        if not patch_text.isdigit():
            raise ValueError(f"DiT preset {name!r}: the part after '/' must be a patch size, e.g. 'XL/1'")
        if patch_size is not None and patch_size != int(patch_text):
            raise ValueError(f"DiT preset {name!r} conflicts with patch_size={patch_size}; give one of them")
        patch_size = int(patch_text)
    if patch_size is None:
        raise ValueError(f"DiT preset {name!r} has no patch size; write e.g. '{size}/1' or pass patch_size=")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(
            f"unknown DiTConfig field(s) {sorted(unknown)} for preset {name!r}; known: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {
        **DIT_PRESETS[size],
        "in_channels": in_channels,
        "input_size": input_size,
        "patch_size": patch_size,
        "num_classes": num_classes,
    }
    kwargs.update(overrides)
    return DiTConfig(**kwargs)


def _paper() -> DiTTrainConfig:
    # PAPER.md, "Diffusion model": LightningDiT-XL/1, AdamW lr 2e-4, beta2 0.95, batch 1024, 80K steps
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
