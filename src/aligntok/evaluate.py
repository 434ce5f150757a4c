"""`aligntok eval`: generated samples vs a reference -> FID, KID, IS, precision/recall, printed and as JSON.

Samples are a folder of images (PNG/JPG/..., any layout, searched recursively, sorted by path) or an
ADM-format .npz (uint8 `arr_0`). A folder written by `aligntok sample` (it holds `sampling.json`) is read
through its `samples.npz`, so its `grid.png` never counts as a sample. The reference is a dataset (a name
or an image folder, taken at the samples' resolution, features cached) or an ADM reference batch .npz.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.data.folder import images_under
from aligntok.data.images import load_image
from aligntok.metrics import fid as F

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3


class _Samples:
    """The sample images of a folder or an .npz: their count, sizes, and uint8 NHWC batches."""

    def __init__(self, path: Path, num: int | None) -> None:
        if path.is_dir() and (path / "sampling.json").is_file() and (path / "samples.npz").is_file():
            path = path / "samples.npz"
        self.path = path
        if path.is_dir():
            self.files = images_under(path)
            if not self.files:
                raise F.FIDError(f"{path} holds no images; pass a folder of PNG/JPG files or an .npz")
            self.array = None
            total = len(self.files)
        elif path.suffix == ".npz" and path.is_file():
            self.files = []
            self.array = F.npz_images(path)
            if self.array is None:
                raise F.FIDError(f"{path} has no arr_0 images; samples must be an ADM-format .npz")
            total = len(self.array)
        elif not path.exists():
            raise F.FIDError(f"samples {path} does not exist; pass a folder of images or an .npz")
        else:
            raise F.FIDError(f"samples {path} is neither a folder of images nor an .npz file")
        if num is not None and not 1 <= num <= total:
            raise F.FIDError(f"--num {num} but {path} holds {total} images; lower --num")
        self.num = total if num is None else num
        self.sizes: dict[str, int] = {}

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches; a batch is cut early where the image size changes."""
        if self.array is not None:
            self.sizes = {f"{self.array.shape[1]}x{self.array.shape[2]}": self.num}
            for i in range(0, self.num, batch_size):
                yield self.array[i : min(i + batch_size, self.num)]
            return
        batch: list[np.ndarray] = []
        for file in self.files[: self.num]:
            try:
                img = np.asarray(load_image(file), dtype=np.uint8)
            except Exception as e:  # PIL raises many types on a broken file
                raise F.FIDError(f"cannot read sample image {file} ({e}); remove or replace it") from None
            size = f"{img.shape[0]}x{img.shape[1]}"
            self.sizes[size] = self.sizes.get(size, 0) + 1
            if batch and (img.shape != batch[0].shape or len(batch) == batch_size):
                yield np.stack(batch)
                batch = []
            batch.append(img)
        if batch:
            yield np.stack(batch)

    def peek_size(self) -> tuple[int, int]:
        """(H, W) of the first sample."""
        if self.array is not None:
            return int(self.array.shape[1]), int(self.array.shape[2])
        img = load_image(self.files[0])
        return img.height, img.width


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def evaluate(
    samples: str | Path,
    ref: str,
    *,
    num: int | None = None,
    batch_size: int = 50,
    bf16: bool = False,
    out: str | Path | None = None,
    ref_split: str = "train",
    ref_resolution: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """FID, KID, Inception Score, precision and recall of `samples` against `ref`; prints a table, writes
    JSON (default `metrics.json` beside the samples) and returns the dict.

    `num` takes the first `num` samples (sorted order). A dataset reference is its whole `ref_split`, at
    `ref_resolution` (default: the samples' size). A reference with only `mu`/`sigma` gives FID only; IS
    needs the Inception softmax layer, which the stock network file lacks (then it is None).
    """
    t0 = time.time()
    samples = Path(samples).expanduser()
    src = _Samples(samples, num)
    model = F.InceptionFeatures.from_assets(device=device)
    kw: dict[str, Any] = {"batch_size": batch_size, "bf16": bf16, "progress": progress, "model": model}
    if ref_resolution is None:
        h, w = src.peek_size()
        ref_resolution = h if h == w else max(h, w)
    reference = F.load_reference(ref, resolution=ref_resolution, split=ref_split, **kw)
    fake = F.extract_features(src.batches(batch_size), **kw)

    notes = []
    result: dict[str, Any] = {
        "samples": str(src.path),
        "num_samples": len(fake),
        "sample_sizes": src.sizes,
        "ref": reference.name,
        "ref_num": len(reference.features) if reference.features is not None else reference.stats.num or None,
        "ref_size": f"{reference.image_size[0]}x{reference.image_size[1]}" if reference.image_size else None,
        "ref_fid_stats": "features" if reference.features is not None else "stored mu/sigma",
        "compared_at": f"{F.INCEPTION_SIZE}x{F.INCEPTION_SIZE} (bilinear resize, align_corners=False)",
        "inception_sha256": model.sha256,
        "bf16": bf16,
    }
    if reference.features is not None:
        result["fid"] = F.fid(fake, reference.features)
        kid_mean, kid_std = F.kid(fake, reference.features, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE)
        precision, recall = F.precision_recall(reference.features, fake, k=PR_K, device=device)
        result.update(kid=kid_mean, kid_std=kid_std, precision=precision, recall=recall)
    else:
        result["fid"] = F.fid_from_stats(F.stats_from_features(fake), reference.stats)
        result.update(kid=None, kid_std=None, precision=None, recall=None)
        notes.append("the reference has only mu/sigma: KID and precision/recall need its images")
    if fake.logits is not None:
        is_mean, is_std = F.inception_score(fake)
        result.update(inception_score=is_mean, inception_score_std=is_std)
    else:
        result.update(inception_score=None, inception_score_std=None)
        notes.append("Inception Score needs the Inception softmax layer, which the network file lacks")
    result["notes"] = notes
    result["wall_s"] = round(time.time() - t0, 1)

    default_dir = src.path if src.path.is_dir() else src.path.parent
    out_path = Path(out) if out is not None else default_dir / "metrics.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")

    rows = [
        ("FID", result["fid"]),
        ("KID", result["kid"]),
        ("IS", result["inception_score"]),
        ("precision", result["precision"]),
        ("recall", result["recall"]),
    ]
    print(
        f"{len(fake)} samples ({', '.join(src.sizes)}) vs {reference.name} ({result['ref_size'] or 'stats'})"
    )
    print("| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {_fmt(value)} |")
    print(f"metrics written to {out_path}")
    return result
