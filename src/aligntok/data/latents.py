"""The latent cache: a dataset encoded once by a tokenizer, in sharded safetensors.

Layout of a cache directory:
    shard-00000.safetensors   latents (n, C, h, w) float32, labels (n,), indices (n,) dataset index,
                              flipped (n,) 1 where the image was mirrored before encoding;
                              metadata "captions": the JSON list of the rows' captions, in row order
    ...
    meta.json                 written last (its presence marks a complete cache): tokenizer identity
                              (hash of its export), dataset, latent shape, classes, per-channel mean/std

Shards are written atomically and independently, so an interrupted run resumes where it stopped, and
under torchrun rank r encodes shards r, r + world, ... (from WebDataset shards: latent shard i encodes input
shard i, streamed). The identity check refuses to mix a cache with
another tokenizer: latents are only meaningful to the decoder that made them.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from aligntok import distributed
from aligntok.assets import atomic_file
from aligntok.checkpoint import export_hash
from aligntok.config import differences
from aligntok.data import build_dataset, check_dataset
from aligntok.data.shards import ShardDataset
from aligntok.files import write_json
from aligntok.models.tokenizer import Tokenizer
from aligntok.rundir import run_lock

META = "meta.json"
INPUTS = "inputs.json"


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
    """Encode `data` with the tokenizer exported at `tokenizer_dir` into a latent cache at `out`.

    The request (tokenizer export hash, data, split, flip, shard size) is written to `out/inputs.json`
    before the first shard; a rerun on the same `out` continues only the same request and refuses any
    other with one line saying what differs, whether the cache is finished or not."""
    distributed.init()
    check_dataset(data)
    tok_hash = export_hash(tokenizer_dir)
    inputs = {"tokenizer_hash": tok_hash, "data": _data_id(data), "split": split, "flip": flip}
    inputs["shard_size"] = shard_size
    with run_lock(out) as out:
        if _check_inputs(out, inputs):
            distributed.print0(f"latent cache complete at {out}")
            return out
        return _encode_all(
            tokenizer_dir, data, out, inputs, batch_size=batch_size, num_workers=num_workers, bf16=bf16
        )


def _data_id(data: str) -> str:
    """A dataset as the cache records it: a name, or an existing folder's absolute path."""
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else str(data)


def _check_inputs(out: Path, inputs: dict[str, Any]) -> bool:
    """True when `out` holds the finished cache of `inputs`; refuses a cache, finished or not, of another
    request. Records `inputs` in a fresh directory. A collective under torchrun: every rank reads the
    directory before rank 0 writes to it, so all of them take the same branch."""
    recorded = json.loads((out / INPUTS).read_text()) if (out / INPUTS).is_file() else None
    if recorded is None and (out / META).is_file():  # written before inputs.json existed: its meta says
        meta = json.loads((out / META).read_text())
        recorded = {"tokenizer_hash": meta["tokenizer"]["hash"], "data": _data_id(meta["data"])}
        recorded |= {"split": meta["split"], "flip": meta["flip"], "shard_size": inputs["shard_size"]}
    finished = (out / META).is_file()
    orphans = recorded is None and any(out.glob("shard-*.safetensors"))
    distributed.barrier()
    if orphans:
        raise ValueError(
            f"{out} holds latent shards of unknown origin (no {INPUTS}); delete it or choose a new --out"
        )
    if recorded is None:
        if distributed.world().is_main:
            write_json(inputs, out / INPUTS)
        return False
    differs = differences(recorded, inputs)
    if differs:
        raise ValueError(
            f"{out} holds latents of another request (differs in: {', '.join(differs)}); rerun with the "
            "tokenizer export, data, split, flip and shard size it was made with, or choose a new --out"
        )
    return finished


@torch.no_grad()
def _encode_all(
    tokenizer_dir: str | Path,
    data: str,
    out: Path,
    inputs: dict[str, Any],
    *,
    batch_size: int,
    num_workers: int,
    bf16: bool,
) -> Path:
    """Encode every shard `out` does not hold yet, then write meta.json (a collective)."""
    world = distributed.world()
    split, flip, shard_size = inputs["split"], inputs["flip"], inputs["shard_size"]
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir).to(world.device).eval()
    dataset = build_dataset(data, split=split, resolution=tokenizer.config.image_size)
    if isinstance(dataset, ShardDataset):  # streamed: latent shard i holds input shard i
        num_shards = dataset.num_shards

        def part(i: int) -> ShardDataset:
            return dataset.subset([i])
    else:
        num_shards = math.ceil(len(dataset) / shard_size)

        def part(i: int) -> Subset:
            return Subset(dataset, range(i * shard_size, min(len(dataset), (i + 1) * shard_size)))

    todo = [i for i in range(world.rank, num_shards, world.world_size) if not _shard_path(out, i).exists()]
    bar = tqdm(total=len(todo), desc="encoding shards", disable=not world.is_main)
    for i in todo:
        tensors: dict[str, list[torch.Tensor]] = {"latents": [], "labels": [], "indices": [], "flipped": []}
        captions: list[str] = []  # one a row, flipped copies included (data/captions.py reads them)
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
                captions.extend(batch["caption"])
        shard = {k: torch.cat(v).contiguous() for k, v in tensors.items()}
        with atomic_file(_shard_path(out, i)) as tmp:
            save_file(shard, str(tmp), metadata={"captions": json.dumps(captions)})
        bar.update()
    bar.close()
    distributed.barrier()
    _write_meta(
        out,
        num_shards=num_shards,
        tokenizer_dir=Path(tokenizer_dir),
        tok_hash=inputs["tokenizer_hash"],
        data=data,
        split=split,
        flip=flip,
        dataset=dataset,
    )
    distributed.barrier()
    distributed.print0(f"latent cache written to {out}")
    return out


class ChannelMoments:
    """Per-channel mean/std of (B, C, h, w) latents, accumulated in float64 over any number of batches (and,
    with `all_reduce`, over ranks)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.s1 = torch.zeros(channels, dtype=torch.float64)
        self.s2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().double().cpu()
        self.s1 += z.sum((0, 2, 3))
        self.s2 += (z**2).sum((0, 2, 3))
        self.count += z.shape[0] * z.shape[2] * z.shape[3]

    def all_reduce(self) -> None:
        """Sum the moments of every rank, each of which saw its own share of the data. Every rank calls it."""
        if not torch.distributed.is_initialized():
            return
        packed = torch.cat([self.s1, self.s2, torch.tensor([float(self.count)], dtype=torch.float64)])
        packed = packed.to(distributed.device())  # NCCL reduces device tensors only
        torch.distributed.all_reduce(packed)
        packed = packed.cpu()
        c = len(self.s1)
        self.s1, self.s2, self.count = packed[:c], packed[c : 2 * c], int(packed[-1])

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
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
    """Per-channel statistics over every cached latent (flipped copies included: they are what the DiT
    trains on), rank r reading shards r, r + world, ...; then rank 0 writes meta.json. A collective."""
    world = distributed.world()
    shape = list(load_file(str(_shard_path(out, 0)))["latents"].shape[1:])
    moments = ChannelMoments(shape[0])
    for i in range(world.rank, num_shards, world.world_size):
        moments.update(load_file(str(_shard_path(out, i)))["latents"])
    moments.all_reduce()
    if not world.is_main:
        return
    mean, std = moments.mean_std()
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
    write_json(meta, out / META)


class LatentCache:
    """A complete cache: labels and indices in memory, latents read on demand (`rows`) from the
    memory-mapped shards, so that a cache larger than memory trains and the ranks of a machine share one
    copy of it in the page cache. `latents` reads them all (small caches, tests)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        self._files = [safe_open(str(_shard_path(path, i)), "pt") for i in range(meta["num_shards"])]
        self.labels = torch.cat([f.get_tensor("labels") for f in self._files])  # (N,)
        self.indices = torch.cat([f.get_tensor("indices") for f in self._files])  # (N,) dataset index
        sizes = [f.get_slice("latents").get_shape()[0] for f in self._files]
        self._starts = torch.tensor([0, *sizes]).cumsum(0)  # first row of each shard

    @classmethod
    def load(cls, path: str | Path) -> LatentCache:
        path = Path(path)
        if not (path / META).exists():
            raise ValueError(
                f"{path} is not a complete latent cache (no {META}); build it with "
                "`aligntok latents cache --tokenizer DIR --data D --out DIR` (rerun to resume)"
            )
        return cls(path, json.loads((path / META).read_text()))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Raw latents (len(idx), C, h, w) of the items `idx` (in that order), read from their shards."""
        shard = torch.searchsorted(self._starts, idx, right=True) - 1
        out = torch.empty((len(idx), *self.meta["latent_shape"]))
        for s in shard.unique().tolist():
            mine = shard == s
            part = self._files[s].get_slice("latents")
            out[mine] = torch.cat([part[i : i + 1] for i in (idx[mine] - self._starts[s]).tolist()])
        return out

    @functools.cached_property
    def captions(self) -> list[str]:
        """The caption of every row (N,), flipped copies included, from the shards' metadata."""
        captions: list[str] = []
        for i, f in enumerate(self._files):
            recorded = (f.metadata() or {}).get("captions")
            if recorded is None:
                raise ValueError(
                    f"{self.path} predates captions ({_shard_path(self.path, i).name} has none); rebuild it "
                    "with `aligntok latents cache ...` into a new --out"
                )
            captions.extend(json.loads(recorded))
        assert len(captions) == len(self), (len(captions), len(self))
        return captions

    @functools.cached_property
    def latents(self) -> torch.Tensor:
        """All raw latents (N, C, h, w) in memory."""
        return torch.cat([f.get_tensor("latents") for f in self._files])

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

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) standardised per channel with the cache's statistics (docs/method.md,
        'Diffusion model')."""
        return (z - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def normalized(self) -> torch.Tensor:
        """Every latent, standardised."""
        return self.normalize(self.latents)

    def __len__(self) -> int:
        return len(self.labels)


def same_latent_space(a: str | Path, b: str | Path, *, statistics: bool = True) -> bool:
    """Whether two tokenizer exports hold the same weights and buffers (latent statistics included)
    outside the decoder: they encode, and normalise latents, identically, and differ at most in how they
    decode (a decoder refined further, as AlignTok's stage 3 does with everything else frozen). With
    `statistics=False` the normalising statistics are not compared (a stage's export has none yet: the
    final export measures them)."""
    wa, wb = (load_file(Path(p) / "model.safetensors") for p in (a, b))
    skip = ("decoder.",) if statistics else ("decoder.", "latent_mean", "latent_std")
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa if not k.startswith(skip))


def check_tokenizer(
    expected_hash: str, tokenizer_dir: str | Path, *, what: str, encoded_by: str | Path | None = None
) -> None:
    """Refuse a tokenizer other than the one `what` was made with, unless it has that one's latent space
    (`same_latent_space`, checked against `encoded_by`, the recorded tokenizer's path, when it still holds
    the tokenizer of `expected_hash`): another decoder for the same latents is accepted."""
    got = export_hash(tokenizer_dir)
    if got == expected_hash:
        return
    if (
        encoded_by is not None
        and (Path(encoded_by) / "model.safetensors").is_file()
        and export_hash(encoded_by) == expected_hash
        and same_latent_space(encoded_by, tokenizer_dir)
    ):
        return
    raise ValueError(
        f"{what} was made with tokenizer {expected_hash[:12]}, but {tokenizer_dir} is tokenizer "
        f"{got[:12]} with another latent space; latents only decode with a tokenizer that encodes as the "
        "one that made them: pass the matching --tokenizer or rebuild the latent cache with this one"
    )
