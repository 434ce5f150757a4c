"""Reference features for the generation metrics: datasets, image folders and ADM reference-batch .npz
files, through the Inception network (`metrics.inception`) once, then cached under `home()/fid_refs/`."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok import assets
from aligntok.data import DATASETS, build_dataset
from aligntok.data.folder import images_under
from aligntok.metrics.fid import Stats
from aligntok.metrics.inception import (
    Features,
    FIDError,
    InceptionFeatures,
    extract_features,
    file_sha256,
    inception_sha256,
)


def cache_dir() -> Path:
    """Where reference features are cached: `home()/fid_refs`."""
    return assets.home() / "fid_refs"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "x"


def _dataset_id(spec: str | Path) -> str:
    """A file-name-safe id of a dataset spec; a folder's id also hashes its path and its file listing, so
    added, removed or rewritten images give a new cache entry."""
    name = str(spec)
    if name in DATASETS:
        return name
    folder = Path(name).expanduser().resolve()
    digest = hashlib.sha256(str(folder).encode())
    if folder.is_dir():
        for p in sorted(folder.glob("*.tar")) + images_under(folder):  # shards or images
            st = p.stat()
            digest.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{_safe(folder.name)}-{digest.hexdigest()[:12]}"


def _save_features(path: Path, features: Features, meta: dict) -> None:
    """Atomic write: pool as float32 (the network's own precision, half the bytes), logits, meta JSON."""
    arrays = {"pool": features.pool.astype(np.float32), "meta": np.array(json.dumps(meta))}
    if features.logits is not None:
        arrays["logits"] = features.logits.astype(np.float32)
    with assets.atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # a file object: np.savez would append .npz to a path


def _load_features(path: Path) -> Features:
    with np.load(path) as f:
        return Features(f["pool"], f.get("logits"))


def _cached(
    key: dict,
    compute: Callable[[InceptionFeatures | None], Features],
    *,
    model: InceptionFeatures | None,
    bf16: bool,
) -> Features:
    """Features for `key` from the cache, or computed by `compute(model)`, stored and returned.

    The key always holds the Inception file's sha256 and the precision, so a changed network or bf16
    features never stand in for others.
    """
    sha = model.sha256 if model is not None else inception_sha256()
    key = {**key, "bf16": bf16, "inception_sha256": sha}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{_safe(str(key['source']))}-{digest}.npz"
    if path.is_file():
        try:
            features = _load_features(path)
            if features.logits is not None or model is None or model.head is None:
                return features
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"ignoring unreadable cached features {path} ({e}); recomputing", stacklevel=3)
    features = compute(model)
    _save_features(path, features, key)
    return features


def reference_indices(n: int, num: int, *, seed: int) -> list[int]:
    """Which `num` of `n` dataset items `reference_features(num=num, seed=seed)` reads, in dataset order."""
    return np.sort(np.random.default_rng(seed).choice(n, num, replace=False)).tolist()


def reference_features(
    spec: str | Path,
    *,
    split: str = "train",
    resolution: int,
    num: int | None = None,
    seed: int = 0,
    bf16: bool = False,
    model: InceptionFeatures | None = None,
    **extract: Any,
) -> Features:
    """Inception features of a dataset (a name or an image folder), cached under `home()/fid_refs/`.

    `num` takes a random subset (drawn with `seed`, kept in dataset order) instead of the whole split;
    `extract` (batch_size, device, progress) goes to `extract_features`.
    The cache key is (dataset, split, resolution, num, seed, bf16, Inception sha256): the network runs
    only the first time.
    """
    key = {
        "source": _dataset_id(spec),
        "split": split,
        "resolution": resolution,
        "num": num,
        "seed": seed if num is not None else None,
    }

    def compute(model: InceptionFeatures | None) -> Features:
        ds = build_dataset(spec, split=split, resolution=resolution)
        if num is not None and isinstance(ds, torch.utils.data.IterableDataset):
            raise FIDError(f"{spec} is streamed (shards): use all of it (no --num) or its image folder")
        if num is not None and not 1 <= num <= len(ds):
            raise FIDError(f"num={num} images asked of {spec} {split}, which has {len(ds)}; lower num")
        items: object = ds
        if num is not None and num < len(ds):
            items = torch.utils.data.Subset(ds, reference_indices(len(ds), num, seed=seed))
        loader = torch.utils.data.DataLoader(items, batch_size=extract.get("batch_size", 50))
        return extract_features((b["image"] for b in loader), bf16=bf16, model=model, **extract)

    return _cached(key, compute, model=model, bf16=bf16)


def open_npz(path: str | Path) -> np.lib.npyio.NpzFile:
    """`np.load` of an .npz given by a user, refusing what is not one (numpy would call a non-zip file
    "pickled data") and never unpickling (allow_pickle stays False)."""
    if not zipfile.is_zipfile(path):
        raise FIDError(
            f"{path} is not an .npz file (not a zip archive); pass the samples.npz of a run or an ADM batch"
        )
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise FIDError(f"{path} is not a readable .npz file ({e})") from None


def npz_images(path: str | Path) -> np.ndarray | None:
    """The uint8 (N, H, W, 3) images under `arr_0` of an ADM-format .npz, or None when it has none."""
    with open_npz(path) as f:
        if "arr_0" not in f:
            return None
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise FIDError(f"{path}: arr_0 must be uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    return images


def npz_features(
    path: str | Path,
    *,
    bf16: bool = False,
    model: InceptionFeatures | None = None,
    **extract: Any,
) -> Features:
    """Inception features of the `arr_0` images of an .npz, cached by the file's sha256."""
    path = Path(path)
    key = {"source": path.stem, "npz_sha256": file_sha256(path)}

    def compute(model: InceptionFeatures | None) -> Features:
        images = npz_images(path)
        if images is None:
            raise FIDError(f"{path} has no arr_0 images to extract features from")
        return extract_features(images, bf16=bf16, model=model, **extract)

    return _cached(key, compute, model=model, bf16=bf16)


@dataclass
class Reference:
    """What a reference provides: stored statistics (ADM `mu`/`sigma`), features of its images, or both.

    FID uses the features when present (one pipeline for both sides), else the stored statistics.
    `image_size` is (H, W) of its images, None when only statistics are known.
    """

    name: str
    features: Features | None
    stats: Stats | None
    image_size: tuple[int, int] | None


def load_reference(
    path_or_spec: str | Path,
    *,
    resolution: int | None = None,
    split: str = "train",
    num: int | None = None,
    seed: int = 0,
    bf16: bool = False,
    model: InceptionFeatures | None = None,
    **extract: Any,
) -> Reference:
    """A reference for the metrics: an ADM reference-batch .npz (keys `mu`, `sigma` and/or uint8 `arr_0`)
    or a dataset spec (a name or an image folder; then `resolution` is required).

    From an .npz with images, features are computed from `arr_0` (cached) with our preprocessing; stored
    `mu`/`sigma` are read too, but used for FID only when the file has no images.
    """
    kwargs = {"bf16": bf16, "model": model, **extract}
    p = Path(path_or_spec).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise FIDError(f"reference {p} does not exist; pass an ADM .npz or a dataset name/folder")
        with open_npz(p) as f:
            stats = Stats(f["mu"], f["sigma"]) if "mu" in f and "sigma" in f else None
            shape = f["arr_0"].shape if "arr_0" in f else None
        if stats is None and shape is None:
            raise FIDError(f"{p} has neither mu/sigma nor arr_0 images; it is not an ADM reference batch")
        features = npz_features(p, **kwargs) if shape is not None else None
        if features is not None and num is not None:
            if num > len(features):
                raise FIDError(f"num={num} but {p} holds {len(features)} images; lower num")
            features = features.subset(np.sort(np.random.default_rng(seed).choice(len(features), num, False)))
        size = (int(shape[1]), int(shape[2])) if shape is not None else None
        return Reference(name=str(p), features=features, stats=stats, image_size=size)
    if resolution is None:
        raise FIDError(f"reference dataset {path_or_spec!r} needs a resolution (pixels)")
    feats = reference_features(path_or_spec, split=split, resolution=resolution, num=num, seed=seed, **kwargs)
    return Reference(
        name=f"{path_or_spec} ({split})", features=feats, stats=None, image_size=(resolution, resolution)
    )
