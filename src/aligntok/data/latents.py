"""The latent cache: a dataset encoded once by a tokenizer, in sharded safetensors.

Layout of a cache directory:
    shard-00000.safetensors   latents (n, C, h, w) float32, labels (n,), indices (n,) dataset index,
                              flipped (n,) 1 where the image was mirrored before encoding
    ...
    meta.json                 written last (its presence marks a complete cache): tokenizer identity
                              (hash of its export), dataset, latent shape, classes, per-channel mean/std

Shards are written atomically and independently, so an interrupted run resumes where it stopped, and
under torchrun rank r encodes shards r, r + world, ... (from WebDataset shards: latent shard i encodes input
shard i, streamed). The identity check refuses to mix a cache with
another tokenizer: latents are only meaningful to the decoder that made them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from aligntok import distributed
from aligntok.checkpoint import export_hash
from aligntok.data.shards import ShardDataset

META = "meta.json"


def _shard_path(out: Path, i: int) -> Path:
    return out / f"shard-{i:05d}.safetensors"


@torch.no_grad()
def build_cache(
    *,
    tokenizer_dir: str | Path,
    data: str,
    out: str | Path,
    split: str = "train",
    flip: bool = False,
    shard_size: int = 4096,
    batch_size: int = 64,
    num_workers: int = 0,
    bf16: bool = False,
) -> Path:
    """Encode `data` with the tokenizer exported at `tokenizer_dir` into a latent cache at `out`."""
    from aligntok.data import build_dataset
    from aligntok.models.tokenizer import Tokenizer

    out = Path(out)
    world = distributed.init()
    tok_hash = export_hash(tokenizer_dir)
    if (out / META).exists():
        meta = json.loads((out / META).read_text())
        if meta["tokenizer"]["hash"] != tok_hash:
            raise ValueError(f"{out} already holds latents of another tokenizer; choose a new --out")
        distributed.print0(f"latent cache complete at {out}")
        return out
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir).to(world.device).eval()
    dataset = build_dataset(data, split=split, resolution=tokenizer.config.image_size)
    if isinstance(dataset, ShardDataset):  # streamed: latent shard i holds input shard i
        num_shards, part = dataset.num_shards, dataset.shard
    else:
        num_shards = math.ceil(len(dataset) / shard_size)

        def part(i: int) -> Subset:
            return Subset(dataset, range(i * shard_size, min(len(dataset), (i + 1) * shard_size)))

    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(world.rank, num_shards, world.world_size) if not _shard_path(out, i).exists()]
    bar = tqdm(total=len(todo), desc="encoding shards", disable=not world.is_main)
    for i in todo:
        tensors: dict[str, list[torch.Tensor]] = {"latents": [], "labels": [], "indices": [], "flipped": []}
        for batch in DataLoader(part(i), batch_size=batch_size, num_workers=num_workers):
            images = batch["image"].to(world.device)
            views = [(images, 0), (images.flip(-1), 1)] if flip else [(images, 0)]
            for view, flipped in views:
                with distributed.autocast(bf16):
                    z = tokenizer.encode(view)  # (B, C, h, w)
                tensors["latents"].append(z.float().cpu())
                tensors["labels"].append(batch["label"].long())
                tensors["indices"].append(batch["index"].long())
                tensors["flipped"].append(torch.full((len(view),), flipped, dtype=torch.uint8))
        shard = {k: torch.cat(v).contiguous() for k, v in tensors.items()}
        tmp = _shard_path(out, i).with_suffix(".tmp")
        save_file(shard, str(tmp))
        os.replace(tmp, _shard_path(out, i))
        bar.update()
    bar.close()
    distributed.barrier()
    if world.is_main:
        _write_meta(
            out,
            num_shards=num_shards,
            tokenizer_dir=Path(tokenizer_dir),
            tok_hash=tok_hash,
            data=data,
            split=split,
            flip=flip,
            dataset=dataset,
        )
    distributed.barrier()
    distributed.print0(f"latent cache written to {out}")
    return out


class ChannelMoments:
    """Per-channel mean/std of (B, C, h, w) latents, accumulated in float64 over any number of batches."""

    def __init__(self) -> None:
        self.count = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().double().cpu()
        s1, s2 = z.sum((0, 2, 3)), (z**2).sum((0, 2, 3))
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.count += z.shape[0] * z.shape[2] * z.shape[3]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.s1 is None:
            raise ValueError("no latents were seen: the dataset is empty")
        mean = self.s1 / self.count
        return mean, (self.s2 / self.count - mean**2).clamp_min(1e-12).sqrt()


def _write_meta(
    out: Path,
    *,
    num_shards: int,
    tokenizer_dir: Path,
    tok_hash: str,
    data: str,
    split: str,
    flip: bool,
    dataset: Any,
) -> None:
    # Per-channel statistics over every cached latent (flipped copies included: they are what the DiT
    # trains on).
    moments = ChannelMoments()
    for i in range(num_shards):
        z = load_file(str(_shard_path(out, i)))["latents"]
        moments.update(z)
    mean, std = moments.mean_std()
    shape = list(z.shape[1:])
    meta = {
        "tokenizer": {"path": str(tokenizer_dir.resolve()), "hash": tok_hash},
        "data": data,
        "split": split,
        "flip": flip,
        "num_shards": num_shards,
        "latent_shape": shape,
        "classes": list(dataset.classes),
        "mean": mean.tolist(),
        "std": std.tolist(),
    }
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META)


@dataclass
class LatentCache:
    """A complete cache loaded into memory (latents are small: 256 tokens x 32 channels per image)."""

    path: Path
    meta: dict[str, Any]
    latents: torch.Tensor  # (N, C, h, w), raw (not normalised)
    labels: torch.Tensor  # (N,)
    indices: torch.Tensor  # (N,)

    @classmethod
    def load(cls, path: str | Path) -> LatentCache:
        path = Path(path)
        if not (path / META).exists():
            raise ValueError(
                f"{path} is not a complete latent cache (no {META}); build it with "
                "`aligntok latents cache --tokenizer DIR --data D --out DIR` (rerun to resume)"
            )
        meta = json.loads((path / META).read_text())
        shards = [load_file(str(_shard_path(path, i))) for i in range(meta["num_shards"])]
        return cls(
            path=path,
            meta=meta,
            latents=torch.cat([s["latents"] for s in shards]),
            labels=torch.cat([s["labels"] for s in shards]),
            indices=torch.cat([s["indices"] for s in shards]),
        )

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.meta["mean"], dtype=torch.float32)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.meta["std"], dtype=torch.float32)

    @property
    def tokenizer_hash(self) -> str:
        return self.meta["tokenizer"]["hash"]

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    def normalized(self) -> torch.Tensor:
        """Latents standardised per channel with the cache's statistics (PAPER.md, 'Diffusion model')."""
        return (self.latents - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.latents)


def check_tokenizer(expected_hash: str, tokenizer_dir: str | Path, *, what: str) -> None:
    """Refuse a tokenizer other than the one `what` was made with."""
    got = export_hash(tokenizer_dir)
    if got != expected_hash:
        raise ValueError(
            f"{what} was made with tokenizer {expected_hash[:12]}, but {tokenizer_dir} is tokenizer "
            f"{got[:12]}; latents only decode with the tokenizer that encoded them: pass the matching "
            "--tokenizer or rebuild the latent cache with this one"
        )
