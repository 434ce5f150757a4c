"""Trained models as files, for the pipelines that use them (sampling, evaluation, scoring).

A DiT export holds the EMA weights and everything sampling needs: the model config (a class-conditional
`DiT`, or a text-conditioned `MMDiT`, told apart by `arch`), the training config, the latent statistics, the
identity of the tokenizer whose latents it learnt and, for text, the text encoder its captions came from.
A tokenizer export is written by `Tokenizer.save_pretrained`. Pipelines import this module, never the
trainers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aligntok import distributed
from aligntok.checkpoint import load_export, save_export
from aligntok.config import from_dict, to_dict
from aligntok.models.dit import DiT, DiTConfig
from aligntok.models.mmdit import MMDiT, MMDiTConfig
from aligntok.models.tokenizer import Tokenizer

# arch -> (model, config); exports written before text conditioning have no "arch": they are DiTs
ARCHS: dict[str, tuple[type, type]] = {"dit": (DiT, DiTConfig), "mmdit": (MMDiT, MMDiTConfig)}


def save_dit(
    out: str | Path,
    weights: dict[str, torch.Tensor],
    *,
    config: DiTConfig | MMDiTConfig,
    train: Any,
    latents: dict[str, Any],
) -> None:
    """Write a DiT export: `weights` (a full, unsharded state dict), its config, the training config
    `train` and `latents`, the cache's statistics, classes and tokenizer identity (and, for a text model,
    `latents["text"]`: the text encoder and its identity)."""
    arch = next(name for name, (_, cls) in ARCHS.items() if isinstance(config, cls))
    model = ARCHS[arch][0](config)
    model.load_state_dict(weights)
    meta = {
        "kind": "dit",
        "arch": arch,
        "config": to_dict(config),
        "train": to_dict(train),
        "latents": latents,
    }
    save_export(out, model, meta)


@dataclass
class TrainedDiT:
    """A DiT export loaded for sampling."""

    model: DiT | MMDiT
    meta: dict[str, Any]

    @property
    def text(self) -> dict[str, Any] | None:
        """For a text-conditioned model: {"encoder", "identity", "length"} of its captions' features."""
        return self.meta["latents"].get("text")

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.meta["latents"]["mean"])

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.meta["latents"]["std"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["latents"]["classes"])

    @property
    def tokenizer_hash(self) -> str:
        return self.meta["latents"]["tokenizer"]["hash"]

    @property
    def tokenizer_path(self) -> str:
        return self.meta["latents"]["tokenizer"]["path"]


def load_dit(path: str | Path, map_location: str | torch.device = "cpu") -> TrainedDiT:
    """The DiT export in `path` on `map_location`, in eval mode."""
    state, meta = load_export(path)
    if meta.get("kind") != "dit":
        raise ValueError(
            f"{path} is not a DiT export (kind {meta.get('kind')!r}); pass the run's export/ dir"
        )
    model_cls, config_cls = ARCHS[meta.get("arch", "dit")]
    model = model_cls(from_dict(config_cls, meta["config"]))
    model.load_state_dict(state)
    return TrainedDiT(model.to(map_location).eval(), meta)


def load_tokenizer(tokenizer_dir: str | Path) -> Tokenizer:
    """The exported tokenizer in `tokenizer_dir` on this process's device, frozen, in eval mode."""
    return Tokenizer.from_pretrained(tokenizer_dir).to(distributed.device()).requires_grad_(False).eval()
