"""WebDataset shards: image + caption + label per sample, streamed shard by shard (never the whole set).

    aligntok data shards --images DIR --out SHARDS [--shard-size 1000]
    ds = build_dataset("SHARDS", split="train", resolution=256)   # a ShardDataset

Layout of a shard folder (written by `write_shards` from an image folder, data/folder.py's conventions):
    <split>-000000.tar ...   one sample per image: `<key>.<ext>` (the image file's own bytes, not
                             re-encoded), `<key>.cls` (label), `<key>.txt` (caption); key = the image's
                             index in the folder, zero-padded
    meta.json                written last: format, classes, and per split its shard names and sizes
A folder with a `train/` subfolder gives `train-*.tar` (and `val-*.tar` when it has `val/`); a flat folder
gives `all-*.tar`, which serve both splits, as the folder itself does.

Reading: `ShardDataset` is a torch IterableDataset yielding the items every dataset yields (data/images.py)
in shard order; DataLoader workers split the shards between them. Training streams with `loader`: rank r
of w reads shards r, r + w, ... of a per-epoch shuffled order (so every sample is read once per epoch by
the whole job), each DataLoader worker a share of those, each shard's samples shuffled in memory. Resume is
exact at the same number of ranks and workers: a stream is a pure function of (seed, epoch, rank, worker),
and the batches already trained on are skipped before decoding. Skipping counts samples without decoding
them, so an undecodable sample (a warning names it) before the resume point shifts the resumed stream by
one sample. Needs at least ranks x workers shards.
"""

from __future__ import annotations

import itertools
import json
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from aligntok.assets import atomic_file
from aligntok.data.folder import IMAGE_SUFFIXES, ImageFolderDataset
from aligntok.data.images import center_crop_adm, check_resolution, check_split, load_image, pil_to_uint8
from aligntok.files import write_json

META = "meta.json"
FORMAT = "aligntok-shards-1"
_EXTS = {s.lstrip(".") for s in IMAGE_SUFFIXES}


def is_shard_folder(path: str | Path) -> bool:
    meta = Path(path).expanduser() / META
    return meta.is_file() and json.loads(meta.read_text()).get("format") == FORMAT


def write_shards(images: str | Path, out: str | Path, *, shard_size: int = 1000) -> Path:
    """Write the image folder `images` as WebDataset shards of `shard_size` samples into `out`."""
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size} must be a positive number of images per shard")
    images, out = Path(images).expanduser(), Path(out)
    if (out / META).exists():
        raise ValueError(f"{out} already holds shards; choose a new --out")
    split_layout = (images / "train").is_dir()
    splits = [s for s in ("train", "val") if (images / s).is_dir()] if split_layout else ["all"]
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"format": FORMAT, "source": str(images.resolve()), "splits": {}}
    for split in splits:
        # The folder reader lists, labels and captions the images (and skips unreadable ones); no decoding.
        folder = ImageFolderDataset(images, resolution=1, split="train" if split == "all" else split)
        meta["classes"] = folder.classes
        shards = []
        starts = range(0, len(folder.files), shard_size)
        for n, start in enumerate(tqdm(starts, desc=f"writing {split} shards")):
            name = f"{split}-{n:06d}.tar"
            with atomic_file(out / name) as tmp, open(tmp, "wb") as f, wds.TarWriter(f) as sink:
                for i in range(start, min(start + shard_size, len(folder.files))):
                    path = folder.files[i]
                    sink.write(
                        {
                            "__key__": f"{i:09d}",
                            path.suffix.lower().lstrip("."): path.read_bytes(),
                            "cls": int(folder.labels[i]),
                            "txt": folder.captions[i],
                        }
                    )
            shards.append([name, min(shard_size, len(folder.files) - start)])
        meta["splits"][split] = shards
    write_json(meta, out / META)
    total = sum(n for s in meta["splits"].values() for _, n in s)
    print(f"{total} images written as {sum(len(s) for s in meta['splits'].values())} shards to {out}")
    return out


def _raw_samples(path: Path) -> Iterator[dict[str, bytes]]:
    """The samples of one tar file as {"__key__": key, ext: bytes}, in file order (undecoded)."""
    sample: dict[str, Any] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield sample


class ShardDataset(IterableDataset):
    """The `split` of a shard folder at `resolution` (ADM center crop), streamed; see the module docstring."""

    def __init__(self, root: str | Path, *, resolution: int, split: str = "train") -> None:
        check_split(split)
        check_resolution(resolution)
        self.root = Path(root).expanduser()
        if not is_shard_folder(self.root):
            raise ValueError(
                f"{self.root} is not a shard folder (no {META}); write one with `aligntok data shards`"
            )
        meta = json.loads((self.root / META).read_text())
        splits = meta["splits"]
        key = "all" if "all" in splits else split
        if key not in splits:
            raise ValueError(f"{self.root} has no {split} shards (it has {', '.join(splits)})")
        self.name = str(self.root)
        self.classes: list[str] = list(meta["classes"])
        self.resolution = resolution
        self.shards = [self.root / name for name, _ in splits[key]]
        self.sizes = [n for _, n in splits[key]]
        self.num_skipped = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def __len__(self) -> int:
        return sum(self.sizes)

    def _decode(self, raw: dict[str, bytes]) -> dict[str, Any] | None:
        ext = next((e for e in raw if e in _EXTS), None)
        try:
            image = center_crop_adm(load_image(raw[ext]), self.resolution)
        except Exception:  # PIL raises many types on garbage; the data loaders skip and count bad files
            self.num_skipped += 1
            return None
        return {
            "image": pil_to_uint8(image).float().div_(255.0),  # (3, H, W)
            "label": int(raw["cls"]),
            "caption": raw.get("txt", b"").decode("utf-8"),
            "style": 0,
            "index": int(raw["__key__"]),
        }

    def samples(self, shards: list[int]) -> Iterator[dict[str, Any]]:
        """The decoded items of the shards numbered `shards`, in that order."""
        for i in shards:
            for raw in _raw_samples(self.shards[i]):
                item = self._decode(raw)
                if item is not None:
                    yield item

    def subset(self, shards: list[int]) -> ShardDataset:
        """The shards numbered `shards` alone, as a dataset."""
        part = ShardDataset.__new__(ShardDataset)
        part.__dict__.update(
            self.__dict__, shards=[self.shards[i] for i in shards], sizes=[self.sizes[i] for i in shards]
        )
        return part

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.samples(list(range(self.num_shards))[worker::workers])

    def loader(
        self,
        *,
        batch: int,
        seed: int,
        start: int,
        stop: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """This rank's training batches (`batch` items each) for steps [start, stop); see the module
        docstring."""
        workers = max(1, num_workers)
        if self.num_shards < world * workers:
            raise ValueError(
                f"{self.root}: {self.num_shards} shards cannot feed {world} ranks x {workers} workers; "
                "write smaller shards (--shard-size) or use fewer workers"
            )
        stream = _Stream(self, batch=batch, seed=seed, start=start, rank=rank, world=world)
        return itertools.islice(
            iter(DataLoader(stream, batch_size=None, num_workers=num_workers)), stop - start
        )


class _Stream(IterableDataset):
    """Endless collated batches of one rank (and DataLoader worker): epochs of shuffled shards."""

    def __init__(self, ds: ShardDataset, *, batch: int, seed: int, start: int, rank: int, world: int) -> None:
        self.ds, self.batch, self.seed, self.start, self.rank, self.world = (
            ds,
            batch,
            seed,
            start,
            rank,
            world,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A DataLoader hands out its batch j from worker j % workers, so step `start + j` comes from this
        # worker when j = worker: it plays the part of the uninterrupted stream's worker `role`, which had
        # made the batches of steps role, role + workers, ... < start.
        role = (worker + self.start) % workers
        skip = len(range(role, self.start, workers)) * self.batch
        items: list[dict[str, Any]] = []
        for epoch in itertools.count():
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.ds.num_shards, generator=g).tolist()
            for i in order[self.rank :: self.world][role::workers]:
                raws = list(_raw_samples(self.ds.shards[i]))  # one shard in memory, undecoded
                for j in torch.randperm(len(raws), generator=g).tolist():
                    if skip:
                        skip -= 1
                        continue
                    item = self.ds._decode(raws[j])
                    if item is None:
                        warnings.warn(
                            f"{self.ds.shards[i].name}: sample {raws[j]['__key__']} does not decode; skipped "
                            "(a run resumed after this point reads one sample off the uninterrupted order)",
                            stacklevel=2,
                        )
                        continue
                    items.append(item)
                    if len(items) == self.batch:
                        yield torch.utils.data.default_collate(items)
                        items = []


__all__ = ["ShardDataset", "is_shard_folder", "write_shards"]
