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
them, so a bad sample before the resume point shifts the resumed stream by one sample. Needs at least
ranks x workers shards.

Bad samples are skipped, never fatal, as the folder reader skips unreadable files: a key that is not a
number, a missing, non-integer or out-of-range `.cls` label, a caption that is not UTF-8, no image or one
that does not decode, and the rest of a tar file that is damaged. Each shard with bad samples gives one
warning (its count and the first reason); a full pass (`iter(ds)`) and each epoch of `loader` end with a
warning of their total; `num_skipped` and `skip_report()` give them on demand (bad samples seen by this
process: in DataLoader worker processes those counts stay in the worker, as the warnings still show).
"""

from __future__ import annotations

import itertools
import json
import os
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
    # The folder reader lists, labels and captions the images (and skips unreadable ones); no decoding.
    folders = {
        s: ImageFolderDataset(images, resolution=1, split="train" if s == "all" else s) for s in splits
    }
    for folder in folders.values():
        _check_class_names(folder)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"format": FORMAT, "source": str(images.resolve()), "splits": {}}
    for split, folder in folders.items():
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
    print(f"{total} images written as {sum(len(s) for s in meta['splits'].values())} shards to {_shown(out)}")
    return out


def _shown(path: Path) -> str:
    """`path` printable: bytes that are not UTF-8 appear as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_class_names(folder: ImageFolderDataset) -> None:
    """A ValueError naming the first class folder whose name is not UTF-8 (class names become captions
    and meta.json entries, which must be text)."""
    for name in folder.classes:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            path = folder.root / name if (folder.root / name).is_dir() else folder.root
            raise ValueError(
                f"{_shown(path)}: the folder name is not valid UTF-8 (class names become captions and "
                "meta.json entries); rename it"
            ) from None


def _raw_samples(path: Path) -> Iterator[dict[str, bytes]]:
    """The samples of one tar file as {"__key__": key, ext: bytes}, in file order (undecoded). A damaged
    tar raises tarfile.TarError (or OSError) after the samples before the damage."""
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


class _BadSample(ValueError):
    """What is wrong with one shard sample (it is skipped)."""


class _Tally:
    """The bad samples of one read of one shard: how many, and the first reason."""

    def __init__(self) -> None:
        self.bad, self.first = 0, ""

    def add(self, reason: str, count: int = 1) -> None:
        self.bad += count
        self.first = self.first or reason


def _key_text(key: str) -> str:
    return key if key.isascii() and key.isprintable() else ascii(key)


class ShardDataset(IterableDataset):
    """The `split` of a shard folder at `resolution` (ADM center crop), streamed; see the module docstring.

    `skipped` maps a shard's file name to (bad samples, first reason) from its latest full read in this
    process; a `subset` shares it with the dataset it was cut from."""

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
        self.skipped: dict[str, tuple[int, str]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_skipped(self) -> int:
        """Bad samples found so far in the shards read (each shard counted once, at its latest read)."""
        return sum(n for n, _ in self.skipped.values())

    def skip_report(self) -> str:
        """One line on the bad samples found so far ("" when none): the total, and per shard its count and
        first reason."""
        if not self.skipped:
            return ""
        parts = [f"{name}: {n} (first: {why})" for name, (n, why) in sorted(self.skipped.items())]
        return f"{self.root}: {self.num_skipped} bad sample(s) skipped; " + "; ".join(parts)

    def __len__(self) -> int:
        return sum(self.sizes)

    def _decode(self, raw: dict[str, bytes]) -> dict[str, Any]:
        """The item of one raw sample, or a _BadSample saying what is wrong with it."""
        key = raw["__key__"]
        if not (key.isascii() and key.isdigit()):
            raise _BadSample("its key is not a number")
        if "cls" not in raw:
            raise _BadSample("it has no .cls label")
        text = raw["cls"].strip()
        if not (text.isascii() and text.isdigit()):
            raise _BadSample(f"its label {raw['cls'][:20]!r} is not a non-negative integer")
        label = int(text)
        if label >= self.num_classes:
            raise _BadSample(f"its label {label} is not a class (0..{self.num_classes - 1})")
        try:
            caption = raw.get("txt", b"").decode("utf-8")
        except UnicodeDecodeError:
            raise _BadSample("its caption (.txt) is not UTF-8") from None
        ext = next((e for e in raw if e in _EXTS), None)
        if ext is None:
            raise _BadSample(f"it has no image (.{', .'.join(sorted(_EXTS))})")
        try:
            image = center_crop_adm(load_image(raw[ext]), self.resolution)
        except Exception as e:  # PIL raises many types on garbage; the data loaders skip and count bad files
            raise _BadSample(f"its .{ext} image does not decode ({type(e).__name__}: {e})") from None
        return {
            "image": pil_to_uint8(image).float().div_(255.0),  # (3, H, W)
            "label": label,
            "caption": caption,
            "style": 0,
            "index": int(key),
        }

    def _item(self, raw: dict[str, bytes], tally: _Tally) -> dict[str, Any] | None:
        """The item of one raw sample, or None (counted in `tally`) for a bad one."""
        try:
            return self._decode(raw)
        except _BadSample as e:
            tally.add(f"sample {_key_text(raw['__key__'])}: {e}")
            return None

    def _raws(self, i: int, tally: _Tally) -> Iterator[dict[str, bytes]]:
        """The raw samples of shard i; samples lost to a damaged or short tar file are counted in `tally`."""
        n = 0
        try:
            for raw in _raw_samples(self.shards[i]):
                n += 1
                yield raw
        except (tarfile.TarError, OSError, EOFError) as e:
            lost = max(1, self.sizes[i] - n)
            tally.add(f"the tar file is damaged after {n} samples ({type(e).__name__}: {e})", lost)
        else:
            if n < self.sizes[i]:
                tally.add(f"the tar file ends after {n} of its {self.sizes[i]} samples", self.sizes[i] - n)

    def _close_shard(self, i: int, tally: _Tally, *, complete: bool) -> int:
        """Record (and warn of) the bad samples of shard i when its reading ends (`complete`) or stops
        early (the stream was closed inside it); returns their number."""
        name = self.shards[i].name
        if not tally.bad:
            if complete:
                self.skipped.pop(name, None)
            return 0
        self.skipped[name] = (tally.bad, tally.first)
        when = "" if complete else " before the stream stopped inside it"
        msg = f"{self.shards[i]}: skipped {tally.bad} bad sample(s){when}; first: {tally.first}"
        warnings.warn(msg, stacklevel=3)
        return tally.bad

    def samples(self, shards: list[int]) -> Iterator[dict[str, Any]]:
        """The decoded items of the shards numbered `shards`, in that order; bad samples are skipped and
        reported (see the module docstring)."""
        total = 0
        for i in shards:
            tally, complete = _Tally(), False
            try:
                for raw in self._raws(i, tally):
                    item = self._item(raw, tally)
                    if item is not None:
                        yield item
                complete = True
            finally:  # also when the consumer stops inside this shard, so that no warning is lost
                total += self._close_shard(i, tally, complete=complete)
        if total:
            msg = f"{self.root}: {total} bad sample(s) skipped in a pass over {len(shards)} shard(s)"
            warnings.warn(msg, stacklevel=2)

    def subset(self, shards: list[int]) -> ShardDataset:
        """The shards numbered `shards` alone, as a dataset (sharing `skipped` with this one)."""
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
            mine = order[self.rank :: self.world][role::workers]
            bad = used = 0
            for i in mine:
                tally, complete = _Tally(), False
                raws = list(self.ds._raws(i, tally))  # one shard in memory, undecoded
                try:
                    for j in torch.randperm(len(raws), generator=g).tolist():
                        if skip:
                            skip, used = skip - 1, used + 1
                            continue
                        item = self.ds._item(raws[j], tally)
                        if item is None:
                            continue
                        used += 1
                        items.append(item)
                        if len(items) == self.batch:
                            yield torch.utils.data.default_collate(items)
                            items = []
                    complete = True
                finally:  # also when training stops inside this shard, so that no warning is lost
                    bad += self.ds._close_shard(i, tally, complete=complete)
            if bad:
                where = f"{len(mine)} shard(s) of rank {self.rank}, worker {worker}"
                msg = f"{self.ds.root}: epoch {epoch}: {bad} bad sample(s) skipped in {where}"
                warnings.warn(msg, stacklevel=2)
            if not used:
                raise ValueError(
                    f"{self.ds.root}: no sample in shards {sorted(mine)} can be read; see the warnings"
                )


__all__ = ["ShardDataset", "is_shard_folder", "write_shards"]
