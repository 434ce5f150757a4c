"""Datasets: named ones fetched and prepared once (`aligntok data fetch NAME`), and image folders.

    fetch_dataset("emoji")                               # -> home()/data/emoji, prepared once
    ds = build_dataset("emoji", split="val", resolution=32)
    ds[0]  # {"image": (3, 32, 32) float in [0, 1], "label": int, "caption": str, "style": int, "index": int}

A spec is a dataset name (`emoji`, `fashion-mnist`), a path to a folder of images (see data/folder.py), or
a path to a folder of WebDataset shards (data/shards.py, streamed: an IterableDataset). Named datasets
live in memory as uint8, resized once per (split, resolution); folders decode lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from aligntok.assets import atomic_dir, download, home
from aligntok.data import emoji, fashion
from aligntok.data.folder import ImageFolderDataset
from aligntok.data.images import (
    ArrayImageDataset,
    ImageDataset,
    center_crop_adm,
    check_resolution,
    check_split,
)
from aligntok.data.shards import ShardDataset, is_shard_folder, write_shards

__all__ = [
    "DATASETS",
    "ArrayImageDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "ShardDataset",
    "build_dataset",
    "center_crop_adm",
    "dataset_dir",
    "fetch_dataset",
    "is_prepared",
    "write_shards",
]

DATASETS: dict[str, ModuleType] = {emoji.NAME: emoji, fashion.NAME: fashion}


def _module(name: str) -> ModuleType:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_dir(name: str) -> Path:
    """Where the prepared dataset `name` lives: `home()/data/<name>`."""
    _module(name)
    return home() / "data" / name


def is_prepared(name: str) -> bool:
    """Whether `name` is prepared, in the format this version of the code reads."""
    meta = dataset_dir(name) / "meta.json"
    if not meta.is_file():
        return False
    return json.loads(meta.read_text()).get("format") == _module(name).FORMAT


def fetch_dataset(name: str, *, force: bool = False) -> Path:
    """Download (verified), unpack and prepare dataset `name` once; returns its directory.

    Idempotent: a prepared dataset is returned as is unless `force`. The directory appears atomically,
    so an interrupted fetch leaves nothing half-written.
    """
    module = _module(name)
    target = dataset_dir(name)
    if is_prepared(name) and not force:
        return target
    archives = [download(pkg) for pkg in module.PACKAGES]
    with atomic_dir(target) as tmp:
        module.prepare(archives, tmp)
    return target


def check_dataset(spec: str | Path) -> None:
    """Refuse, with one line saying what to do, a dataset `build_dataset` could not open: a name that is not
    prepared, or a path that is not a folder. Cheap: commands call it before they write anything."""
    name = str(spec)
    if name in DATASETS:
        if not is_prepared(name):
            raise ValueError(
                f"dataset {name!r} is not prepared in {dataset_dir(name)}; run `aligntok data fetch {name}`"
            )
    elif not Path(name).expanduser().is_dir():
        raise ValueError(
            f"{name!r} is neither a dataset name ({', '.join(DATASETS)}) nor a folder of images "
            "(one subfolder per class, or images directly) or of shards (`aligntok data shards`)"
        )


def build_dataset(
    spec: str | Path, *, split: str = "train", resolution: int, base_only: bool = False
) -> ImageDataset | ShardDataset:
    """The dataset `spec` (a name in DATASETS, an image folder or a shard folder) for `split` ("train" |
    "val").

    `base_only` keeps base emoji only (no skin-tone variants); the other datasets have no variants and
    ignore it.
    """
    check_split(split)
    check_resolution(resolution)
    check_dataset(spec)
    name = str(spec)
    if name in DATASETS:
        return DATASETS[name].load(dataset_dir(name), split=split, resolution=resolution, base_only=base_only)
    path = Path(name).expanduser()
    if is_shard_folder(path):
        return ShardDataset(path, resolution=resolution, split=split)
    return ImageFolderDataset(path, resolution=resolution, split=split)
