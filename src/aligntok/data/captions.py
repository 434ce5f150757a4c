"""The caption-feature cache: a latent cache's captions encoded once by a text encoder, kept beside it.

Layout, in `<latents>/text-minilm` (or `<latents>/text-<folder name>-<sha8 of its path>` for a local text
encoder folder, `caption_cache_dir`):
    features.safetensors   one row per UNIQUE caption (emoji repeats each caption for two vendors and for
                           flipped copies): tokens (U, L, D) float16, zero where padded; mask (U, L) bool;
                           pooled (U, D) float32; null (U,) uint8, 1 for the empty caption; and rows (N,)
                           int64, the unique caption of each latent row. L is the longest tokenized caption
                           (at most the encoder's max_length).
    meta.json              written last (its presence marks a complete cache): identity (the text encoder's
                           identity, sha256 of the captions list, N rows, L), unique U, length L, dim D

A rerun with the same encoder and captions returns at once; a directory holding another encoder's or
other captions' features is refused. Under torchrun rank 0 encodes and writes, the other ranks wait.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from aligntok import distributed
from aligntok.assets import atomic_file
from aligntok.config import differences
from aligntok.data.latents import LatentCache
from aligntok.files import write_json
from aligntok.models.text import (
    MINILM,
    PromptsTruncated,
    TextCond,
    TextEncoder,
    build_text_encoder,
    resolve_text_encoder,
    text_encoder_identity,
)
from aligntok.rundir import run_lock

FEATURES = "features.safetensors"
META = "meta.json"


def caption_cache_dir(latents: str | Path, text_encoder: str) -> Path:
    """Where the features of `text_encoder` ('minilm' or a local folder) live beside the latent cache."""
    where = resolve_text_encoder(text_encoder)
    if where == MINILM:
        return Path(latents) / f"text-{MINILM}"
    digest = hashlib.sha256(str(where).encode()).hexdigest()[:8]
    return Path(latents) / f"text-{Path(where).name}-{digest}"


def captions_sha256(captions: list[str]) -> str:
    """sha256 of the JSON-dumped captions list: what the features are bound to, row order included."""
    return hashlib.sha256(json.dumps(captions).encode()).hexdigest()


def _rebuild_hint(latents: Path, text_encoder: str) -> str:
    return f"rebuild them with `aligntok latents captions --latents {latents} --text-encoder {text_encoder}`"


def build_caption_cache(
    latents: str | Path,
    *,
    text_encoder: str = MINILM,
    max_length: int | None = None,
    batch_size: int = 256,
) -> Path:
    """Encode the captions of the latent cache at `latents` with `text_encoder` (once) into
    `caption_cache_dir(latents, text_encoder)`; returns that directory. A collective under torchrun."""
    distributed.init()
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    captions = LatentCache.load(latents).captions
    out = caption_cache_dir(latents, text_encoder)
    # Every rank computes the expected identity (hashing files, no weights loaded): all raise alike.
    want = {"text_encoder": text_encoder_identity(text_encoder, max_length=max_length)}
    want["captions_sha256"] = captions_sha256(captions)
    with run_lock(out) as out:
        # Every rank reads the directory before rank 0 writes to it, so all of them take the same branch
        # (as data/latents.py `_check_inputs`).
        recorded = json.loads((out / META).read_text()) if (out / META).is_file() else None
        distributed.barrier()
        if recorded is not None:
            got = {k: recorded["identity"].get(k) for k in want}
            differs = differences(got, want)
            if differs:
                raise ValueError(
                    f"{out} holds caption features of another text encoder or other captions (differs in: "
                    f"{', '.join(differs)}); delete {out} to rebuild it with these"
                )
            distributed.print0(f"caption features complete at {out}")
            return out
        if distributed.world().is_main:
            _encode_captions(captions, out, text_encoder, max_length=max_length, batch_size=batch_size)
        distributed.barrier()
    distributed.print0(f"caption features written to {out}")
    return out


def _encode_captions(
    captions: list[str], out: Path, text_encoder: str, *, max_length: int | None, batch_size: int
) -> None:
    """Encode each unique caption once, write features.safetensors and then meta.json (rank 0 only)."""
    unique = list(dict.fromkeys(captions))  # first appearance order
    where = {c: u for u, c in enumerate(unique)}
    encoder = build_text_encoder(text_encoder, max_length=max_length).to(distributed.device())
    ids, cut = encoder.token_ids(unique)
    if cut:
        warnings.warn(
            f"{cut} of {len(unique)} distinct captions are longer than the text encoder's "
            f"{encoder.max_length} tokens and were truncated",
            PromptsTruncated,
            stacklevel=3,
        )
    lengths = [len(row) for row in ids]
    length = max(max(lengths, default=1), 1)
    features = _encode_unique(encoder, unique, lengths, length=length, batch_size=batch_size)
    features["rows"] = torch.tensor([where[c] for c in captions], dtype=torch.long)  # (N,)
    with atomic_file(out / FEATURES) as tmp:
        save_file(features, str(tmp), metadata={"captions": json.dumps(unique)})
    identity = {
        "text_encoder": encoder.identity(),
        "captions_sha256": captions_sha256(captions),
        "rows": len(captions),
        "length": length,
    }
    meta = {"identity": identity, "unique": len(unique), "length": length, "dim": encoder.dim}
    write_json(meta, out / META)


def _encode_unique(
    encoder: TextEncoder, unique: list[str], lengths: list[int], *, length: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """Features of `unique` captions, every row padded to `length` tokens, on the CPU. Batches group
    captions of similar token counts (`lengths`), so that little compute goes to padding."""
    n, dim = len(unique), encoder.dim
    tokens = torch.zeros(n, length, dim, dtype=torch.float16)  # (U, L, D)
    mask = torch.zeros(n, length, dtype=torch.bool)  # (U, L)
    pooled = torch.zeros(n, dim)  # (U, D)
    null = torch.zeros(n, dtype=torch.uint8)  # (U,)
    order = torch.tensor(sorted(range(n), key=lambda i: lengths[i]), dtype=torch.long)
    for pick in tqdm(
        order.split(batch_size), desc="encoding captions", disable=not distributed.world().is_main
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptsTruncated)  # counted once for all captions above
            cond = encoder.encode([unique[i] for i in pick.tolist()], pad_to=length)
        half = cond["tokens"].cpu().half()
        if not torch.isfinite(half).all():
            raise ValueError(
                "the text encoder's token features exceed the float16 range of the caption cache; "
                "use another text encoder"
            )
        tokens[pick], mask[pick] = half, cond["mask"].cpu()
        pooled[pick], null[pick] = cond["pooled"].cpu(), cond["null"].cpu().to(torch.uint8)
    return {"tokens": tokens, "mask": mask, "pooled": pooled, "null": null}


class CaptionCache:
    """A complete caption-feature cache, held in memory (unique captions only; `rows` gathers per row)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        self.identity: dict[str, Any] = meta["identity"]
        self.dim: int = int(meta["dim"])
        self.length: int = int(meta["length"])
        features = load_file(str(path / FEATURES))
        self._rows = features["rows"]  # (N,) unique caption of each latent row
        self._tokens = features["tokens"]  # (U, L, D) float16
        self._mask = features["mask"].bool()  # (U, L)
        self._pooled = features["pooled"].float()  # (U, D)
        self._null = features["null"].bool()  # (U,)

    @classmethod
    def load(cls, path: str | Path) -> CaptionCache:
        path = Path(path)
        if not (path / META).is_file():
            raise ValueError(
                f"{path} is not a complete caption-feature cache (no {META}); build it with "
                "`aligntok latents captions --latents DIR --text-encoder X`"
            )
        return cls(path, json.loads((path / META).read_text()))

    def check(self, text_encoder_identity: dict[str, Any], captions: list[str]) -> None:
        """Refuse features made by another text encoder, or for other captions than `captions`."""
        name = text_encoder_identity.get("name")
        spec = MINILM if name == MINILM else f"/path/to/{name}"
        hint = _rebuild_hint(self.path.parent, spec)
        differs = differences(self.identity["text_encoder"], text_encoder_identity)
        if differs:
            raise ValueError(
                f"the caption features at {self.path} were made by another text encoder (differs in: "
                f"{', '.join(differs)}); {hint}, or pass another caption-feature directory"
            )
        if captions_sha256(list(captions)) != self.identity["captions_sha256"]:
            raise ValueError(
                f"the caption features at {self.path} were made for other captions ({self.identity['rows']} "
                f"rows, now {len(captions)}); {hint}, or pass another caption-feature directory"
            )

    def rows(self, idx: torch.Tensor) -> TextCond:
        """Features of latent rows `idx` (in that order), as float32 tensors on the CPU."""
        u = self._rows[idx.cpu()]
        return {
            "tokens": self._tokens[u].float(),  # (B, L, D)
            "mask": self._mask[u],  # (B, L)
            "pooled": self._pooled[u],  # (B, D)
            "null": self._null[u],  # (B,)
        }

    @property
    def unique_captions(self) -> list[str]:
        """The distinct captions, in the order of the feature rows."""
        with safe_open(str(self.path / FEATURES), "pt") as f:
            return json.loads(f.metadata()["captions"])

    def __len__(self) -> int:
        return len(self._rows)
