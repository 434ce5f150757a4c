"""`aligntok eval`: generated samples vs a reference -> FID, KID, IS, precision/recall, printed and as JSON.

Samples are a folder of images (PNG/JPG/..., any layout, searched recursively, sorted by path) or an
ADM-format .npz (uint8 `arr_0`). A folder written by `aligntok sample` (it holds `sampling.json`) is read
through its `samples.npz`, so its `grid.png` never counts as a sample. The reference is a dataset (a name
or an image folder, taken at the samples' resolution, features cached) or an ADM reference batch .npz.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.checkpoint import export_hash
from aligntok.data import build_dataset
from aligntok.data.folder import images_under
from aligntok.data.images import load_image
from aligntok.exports import load_tokenizer
from aligntok.files import write_json
from aligntok.generate import generate
from aligntok.metrics.fid import (
    fid,
    fid_from_stats,
    inception_score,
    kid,
    precision_recall,
    stats_from_features,
)
from aligntok.metrics.inception import INCEPTION_SIZE, Features, FIDError, InceptionFeatures, extract_features
from aligntok.metrics.reconstruction import reconstructed
from aligntok.metrics.reference import load_reference, npz_images, reference_features, reference_indices
from aligntok.sampling import SampleConfig

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
                raise FIDError(f"{path} holds no images; pass a folder of PNG/JPG files or an .npz")
            self.array = None
            total = len(self.files)
        elif path.suffix == ".npz" and path.is_file():
            self.files = []
            self.array = npz_images(path)
            if self.array is None:
                raise FIDError(f"{path} has no arr_0 images; samples must be an ADM-format .npz")
            total = len(self.array)
        elif not path.exists():
            raise FIDError(f"samples {path} does not exist; pass a folder of images or an .npz")
        else:
            raise FIDError(f"samples {path} is neither a folder of images nor an .npz file")
        if num is not None and not 1 <= num <= total:
            raise FIDError(f"--num {num} but {path} holds {total} images; lower --num")
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
                raise FIDError(f"cannot read sample image {file} ({e}); remove or replace it") from None
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


def _table(result: dict[str, Any], sizes: dict[str, int], ref_name: str) -> str:
    """The printed summary of `evaluate`: what was compared, then a markdown table of the metrics."""
    ref = f"{ref_name} ({result['ref_size'] or 'stats'})"
    lines = [
        f"{result['num_samples']} samples ({', '.join(sizes)}) vs {ref}",
        "| metric | value |",
        "|---|---|",
    ]
    names = {
        "FID": "fid",
        "KID": "kid",
        "IS": "inception_score",
        "precision": "precision",
        "recall": "recall",
    }
    lines += [f"| {name} | {_fmt(result[key])} |" for name, key in names.items()]
    return "\n".join(lines)


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
    model = InceptionFeatures.from_assets(device=device)
    kw: dict[str, Any] = {"batch_size": batch_size, "bf16": bf16, "progress": progress, "model": model}
    if ref_resolution is None:
        h, w = src.peek_size()
        ref_resolution = h if h == w else max(h, w)
    reference = load_reference(ref, resolution=ref_resolution, split=ref_split, **kw)
    fake = extract_features(src.batches(batch_size), **kw)

    notes = []
    result: dict[str, Any] = {
        "samples": str(src.path),
        "num_samples": len(fake),
        "sample_sizes": src.sizes,
        "ref": reference.name,
        "ref_num": len(reference.features) if reference.features is not None else reference.stats.num or None,
        "ref_size": f"{reference.image_size[0]}x{reference.image_size[1]}" if reference.image_size else None,
        "ref_fid_stats": "features" if reference.features is not None else "stored mu/sigma",
        "compared_at": f"{INCEPTION_SIZE}x{INCEPTION_SIZE} (bilinear resize, align_corners=False)",
        "inception_sha256": model.sha256,
        "bf16": bf16,
    }
    if reference.features is not None:
        result["fid"] = fid(fake, reference.features)
        kid_mean, kid_std = kid(fake, reference.features, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE)
        precision, recall = precision_recall(reference.features, fake, k=PR_K, device=device)
        result.update(kid=kid_mean, kid_std=kid_std, precision=precision, recall=recall)
    else:
        result["fid"] = fid_from_stats(stats_from_features(fake), reference.stats)
        result.update(kid=None, kid_std=None, precision=None, recall=None)
        notes.append("the reference has only mu/sigma: KID and precision/recall need its images")
    if fake.logits is not None:
        is_mean, is_std = inception_score(fake)
        result.update(inception_score=is_mean, inception_score_std=is_std)
    else:
        result.update(inception_score=None, inception_score_std=None)
        notes.append("Inception Score needs the Inception softmax layer, which the network file lacks")
    result["notes"] = notes
    result["wall_s"] = round(time.time() - t0, 1)

    default_dir = src.path if src.path.is_dir() else src.path.parent
    out_path = Path(out) if out is not None else default_dir / "metrics.json"
    write_json(result, out_path)

    print(_table(result, src.sizes, reference.name))
    print(f"metrics written to {out_path}")
    return result


def _same_sampling(out: Path, wanted: dict[str, Any]) -> bool:
    """Whether `out` already holds the complete samples of these settings (a rerun then skips sampling)."""
    try:
        done = json.loads((out / "sampling.json").read_text())
        with np.load(out / "samples.npz") as f:
            complete = f["arr_0"].shape[0] == wanted["num"] * len(wanted.get("prompts", [None]))
    except (OSError, ValueError, KeyError):  # missing, or cut short by an interruption: sample again
        return False
    return complete and all(done.get(k) == v for k, v in wanted.items())


def generation_fid(
    dit_dir: str | Path,
    *,
    data: str | Path,
    out: str | Path,
    num: int,
    sample: SampleConfig | None = None,
    ref_num: int | None = None,
    tokenizer_dir: str | Path | None = None,
    save_pngs: bool = False,
    prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """gFID of `num` class-balanced samples of a DiT (for a text DiT: `num` samples of each of `prompts`),
    drawn with `sample`, against the training images of `data`.

    The reference is the whole train split or `ref_num` of it (a seeded subset); its features are cached.
    Samples go to `out` (`samples.npz`, `grid.png`, `sampling.json`) and the result to `out/fid.json`; a
    rerun with the same settings and the same DiT weights (by export hash) reuses both, so interrupted
    studies resume. `sample.bf16` is the DiT's autocast and the Inception's (docs/metrics.md: it moved FID
    by 0.14% on emoji).
    """
    sample = sample or SampleConfig()
    out = Path(out)
    settings = sample.record()
    bf16 = settings.pop("bf16")  # recorded under its own key below, as before SampleConfig
    wanted = {"num": num, **settings, "dit": str(Path(dit_dir).resolve()), "dit_hash": export_hash(dit_dir)}
    if prompts is not None:
        wanted["prompts"] = list(prompts)
    if tokenizer_dir is not None:  # another decoder than the DiT's own: samples of the default never stand in
        wanted["tokenizer"] = str(Path(tokenizer_dir).resolve())
    result_path = out / "fid.json"
    if _same_sampling(out, wanted):
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            if result.get("ref_num_asked") == ref_num and result.get("bf16") == bf16:
                return result
    else:
        result_path.unlink(missing_ok=True)
        kw = {"tokenizer_dir": tokenizer_dir, "save_pngs": save_pngs, "prompts": prompts}
        generate(dit_dir=dit_dir, num=num, out=out, sample=sample, **kw)
    images = npz_images(out / "samples.npz")
    model = InceptionFeatures.from_assets()
    fake = extract_features(images, bf16=bf16, model=model)
    ref = _training_reference(data, resolution=images.shape[1], ref_num=ref_num, bf16=bf16, model=model)
    result = {
        "fid": float(fid_from_stats(stats_from_features(ref), stats_from_features(fake))),
        "num_samples": len(fake),
        "num_ref": len(ref.pool),
        "ref_num_asked": ref_num,
        "bf16": bf16,
        **wanted,
    }
    write_json(result, result_path)
    return result


def _training_reference(
    data: str | Path, *, resolution: int, ref_num: int | None, bf16: bool, model: InceptionFeatures
) -> Features:
    """The gFID reference: the train split, or `ref_num` of it (seed 0). One place, so that the floor is
    measured against exactly the reference the samples are."""
    return reference_features(
        data, split="train", resolution=resolution, num=ref_num, seed=0, bf16=bf16, model=model
    )


def fid_floor(
    data: str | Path,
    *,
    num: int,
    resolution: int,
    ref_num: int | None = None,
    bf16: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The real-vs-real floor of `generation_fid`: FID of `num` real images against the same reference.

    The real images are a seeded subset of the val split when it holds `num`, else of the train split (then
    they may overlap the reference, which makes the floor optimistic; `split` in the result says which).
    A generated set cannot be expected to score below this at the same sample count.

    With `tokenizer_dir`, the same images pass through that tokenizer first (encoded, decoded, saved as
    uint8): the reconstruction floor, the gFID of a DiT whose samples were exactly the latents of real
    images. What a gFID has above it is the DiT's; what this has above the real-vs-real floor is the
    decoder's, which no DiT training removes.
    """
    split = "val" if len(build_dataset(data, split="val", resolution=resolution)) >= num else "train"
    model = InceptionFeatures.from_assets()
    kw: dict[str, Any] = {"resolution": resolution, "bf16": bf16, "model": model}
    if tokenizer_dir is None:
        real = reference_features(data, split=split, num=num, seed=1, **kw)
    else:
        real = _reconstruction_features(tokenizer_dir, data, split=split, num=num, seed=1, **kw)
    ref = _training_reference(data, ref_num=ref_num, **kw)
    fid = fid_from_stats(stats_from_features(ref), stats_from_features(real))
    result = {"fid": float(fid), "num": len(real.pool), "split": split, "num_ref": len(ref.pool)}
    return result | ({"tokenizer": str(Path(tokenizer_dir).resolve())} if tokenizer_dir is not None else {})


def _reconstruction_features(
    tokenizer_dir: str | Path,
    data: str | Path,
    *,
    split: str,
    num: int,
    seed: int,
    resolution: int,
    bf16: bool,
    model: InceptionFeatures,
) -> Features:
    """Inception features of the tokenizer's reconstructions of the images `reference_features` would
    read for (data, split, num, seed)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.config.image_size != resolution:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} works at {tokenizer.config.image_size} px, "
            f"the floor at {resolution}"
        )
    ds = build_dataset(data, split=split, resolution=resolution)
    if num < len(ds):
        ds = torch.utils.data.Subset(ds, reference_indices(len(ds), num, seed=seed))
    recons = (saved for _, saved in reconstructed(tokenizer, ds, bf16=bf16))
    return extract_features(recons, bf16=bf16, model=model)
