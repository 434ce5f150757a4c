"""Prompt adherence: does a generated image show what it was asked for? Two models built offline.

CLIP and the GenEval detectors cannot be fetched here (docs/design.md section 3), so both models are small
heads on frozen ImageNet features, trained on a dataset's real TRAINING images:

- `CategoryClassifier`: the class of an image (a class-conditional sample should show its class). The
  linear probe of `metrics.semantics` (same objective and solver), kept with its weights.
- `ContrastiveAdherence` (`metrics.contrastive`): image-text agreement, CLIP-style, on the same features.

Image features (`image_features`): EfficientNet-Lite0's pooled final features (1280-d: head conv, BN, swish,
global average pool; the input of its ImageNet classifier), images enlarged first: to CATEGORY_INPUT_SIZE
under bf16 for the classifier, to FEATURE_INPUT_SIZE in fp32 for the contrastive model.
Float images are rounded to uint8 as samples are saved (`files.to_uint8`), so in-memory samples and their
PNGs score the same.

Measured on emoji at 32 px (real val images: the ceiling a generator can reach):
- category classifier (fitted on the 6692 train images): val accuracy 87.2%, balanced 63.4% (9 classes; the
  val emoji are names absent from train) at 224 px fp32; 86.4%, 64.6% at 128 px bf16. Chance: labels
  shuffled 48.0% / 11.3% balanced, blank images 4.8% / 11.1%.
- contrastive model (all-MiniLM-L6-v2 masked-mean caption features; steps=500, lr=1e-3, batch_size=256,
  chosen on a group-disjoint part of train): each val image's caption among the 435 unique val captions,
  top-1 34.4%, top-5 61.6%, mean rank 28.5. Shuffled images: 0.1%, 1.6%, 213.5 (chance 0.23%, 1.15%, 218).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from aligntok import assets, distributed
from aligntok.data import DATASETS, ArrayImageDataset, build_dataset
from aligntok.files import write_json
from aligntok.metrics.semantics import ProbeFit, balanced_accuracy, fit_linear_probe
from aligntok.models.encoders import EncoderConfig, build_encoder

FEATURE_ENCODER = "efficientnet-lite0"
FEATURE_DIM = 1280
# Images are enlarged (bilinear, antialias) to this size before the encoder: EfficientNet-Lite0's own
# training size. Chosen by 5-fold group-disjoint cross-validation on the 32 px emoji TRAIN split (val kept
# out), input 64 / 96 / 128 / 160 / 224 px: the category probe's balanced accuracy 62.4 / 64.6 / 66.8 / 67.8 /
# 69.6%, the contrastive model's top-1 among held-out captions 21.5 / 25.0 / 26.0 / 28.5 / 31.0%; 224 beat
# 160 on every fold in both. The cost grows with the pixels: 224 px is about 5x the time of 96 px.
FEATURE_INPUT_SIZE = 224
# The category classifier's features: 128 px under bf16 autocast. On the emoji val images (classifier fitted
# on the 6,692 train images) 224 px fp32 scored 87.2% / 63.4% balanced, 128 px bf16 86.4% / 64.6%, in a sixth
# of the time or less (benchmarks/adherence_cost.py, docs/metrics.md "Adherence"): on 2 cores the 224 px
# features cost a fresh demo minutes. The contrastive model keeps 224 px, where 128 lost 5 points.
CATEGORY_INPUT_SIZE = 128
CATEGORY_BF16 = True
WEIGHTS_NAME = "model.safetensors"
RECORD_NAME = "record.json"


# Image features


@functools.lru_cache(maxsize=2)
def _encoder(input_size: int, device: str) -> nn.Module:
    cfg = EncoderConfig(name=FEATURE_ENCODER, block=15, input_size=input_size)
    return build_encoder(cfg).to(device).eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def _encoder_sha256() -> str:
    return assets.sha256_file(assets.require(FEATURE_ENCODER) / "model.safetensors")


def feature_extractor(input_size: int = FEATURE_INPUT_SIZE) -> dict[str, Any]:
    """What `image_features` computes, for records: the network, its weights' sha256, the input size."""
    return {
        "name": FEATURE_ENCODER,
        "features": f"pooled final features ({FEATURE_DIM})",
        "input_size": input_size,
        "weights_sha256": _encoder_sha256(),
    }


def _pooled(encoder: nn.Module, images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1280): all 16 blocks, then the head conv, BN, swish, average pool."""
    net = encoder.net
    x = encoder.features(images)  # (B, 320, h, w): block 15
    x = net._swish(net._bn1(net._conv_head(x)))  # (B, 1280, h, w)
    return x.mean((2, 3))


def _as_uint8_nchw(images: Tensor | np.ndarray) -> Tensor:
    """Images as uint8 (N, 3, H, W) on their device: float tensors (N, 1 | 3, H, W) in [0, 1] are rounded
    as `files.to_uint8` does; uint8 tensors (N, 1 | 3, H, W) and uint8 arrays (N, H, W, 1 | 3) pass."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"image arrays must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(getattr(images, "shape", ()))
        raise ValueError(f"images must be a tensor (N, 3, H, W) or a uint8 array (N, H, W, 3), got {shape}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"image tensors must be float in [0, 1] or uint8, got {images.dtype}")
        images = images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def image_features(
    images: Tensor | np.ndarray,
    *,
    batch_size: int = 256,
    bf16: bool = False,
    input_size: int = FEATURE_INPUT_SIZE,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Tensor:
    """EfficientNet-Lite0 pooled final features (N, 1280), float32 on the CPU.

    `images`: float (N, 3, H, W) in [0, 1] (rounded to uint8 first), uint8 (N, 3, H, W), or a uint8 numpy
    array (N, H, W, 3); gray (one channel) is repeated. Enlarged to `input_size`; run under no_grad in
    batches of `batch_size`, in bf16 autocast when `bf16`, on `device` (default: the process's device).
    A progress bar shows for more than one batch unless `progress` is False.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = _as_uint8_nchw(images)
    if len(images) == 0:
        raise ValueError("no images to compute features of")
    dev = torch.device(device) if device is not None else distributed.device()
    encoder = _encoder(int(input_size), str(dev))
    show = len(images) > batch_size if progress is None else progress
    out = []
    for lo in tqdm(range(0, len(images), batch_size), desc="adherence features", disable=not show):
        x = images[lo : lo + batch_size].to(dev).float().div_(255.0).contiguous()  # NCHW layout: same sums
        with distributed.autocast(bf16, device_type=dev.type):
            out.append(_pooled(encoder, x).float().cpu())
    return torch.cat(out)  # (N, 1280)


# Real images of a dataset


@dataclass
class RealImages:
    images: Tensor  # uint8 (N, 3, H, W)
    labels: Tensor  # (N,)
    captions: list[str]
    classes: list[str]


def real_images(
    dataset: str | Path, *, split: str = "train", resolution: int, num: int | None = None, seed: int = 0
) -> RealImages:
    """The images (uint8), labels and captions of `dataset`'s `split` at `resolution` (`build_dataset`);
    with `num`, a random subset of that many (drawn with `seed`, kept in dataset order; all if fewer)."""
    if num is not None and num < 1:
        raise ValueError(f"num must be >= 1 (or None for every image), got {num}")
    ds = build_dataset(dataset, split=split, resolution=resolution)
    if isinstance(ds, torch.utils.data.IterableDataset):
        items = [item for _, item in zip(range(num or 2**62), ds)]  # a stream: its first `num` items
    else:
        pick = torch.arange(len(ds))
        if num is not None:
            order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
            pick = order[:num].sort().values
        if isinstance(ds, ArrayImageDataset):  # held in memory as uint8 (named datasets): no per-item copy
            return RealImages(
                images=ds.images[pick].expand(-1, 3, -1, -1).contiguous(),
                labels=ds.labels[pick].clone(),
                captions=[ds.captions[i] for i in pick.tolist()],
                classes=list(ds.classes),
            )
        items = [ds[i] for i in pick.tolist()]
    if not items:
        raise ValueError(f"dataset {str(dataset)!r} has no {split} images")
    return RealImages(
        images=_as_uint8_nchw(torch.stack([it["image"] for it in items])),
        labels=torch.tensor([int(it["label"]) for it in items]),
        captions=[str(it["caption"]) for it in items],
        classes=list(ds.classes),
    )


# Saving a head (the classifier here, the contrastive model in `metrics.contrastive`): safetensors weights
# + a JSON record holding their sha256


def save_head(directory: str | Path, tensors: dict[str, Tensor], record: dict[str, Any]) -> Path:
    """Write weights, then the record with their sha256 (the record last: its presence means complete)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with assets.atomic_file(directory / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    record = {**record, "weights_sha256": assets.sha256_file(directory / WEIGHTS_NAME)}
    write_json(record, directory / RECORD_NAME)
    return directory


def load_head(directory: str | Path, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    directory = Path(directory)
    rec_path, weights = directory / RECORD_NAME, directory / WEIGHTS_NAME
    if not rec_path.is_file() or not weights.is_file():
        raise ValueError(f"{directory} holds no saved {kind} ({RECORD_NAME} + {WEIGHTS_NAME}); fit one first")
    record = json.loads(rec_path.read_text())
    if record.get("kind") != kind:
        raise ValueError(f"{directory} holds a {record.get('kind')!r}, not a {kind!r}")
    if assets.sha256_file(weights) != record.get("weights_sha256"):
        raise ValueError(f"{weights} does not match the sha256 in its {RECORD_NAME}; fit and save it again")
    return load_file(str(weights)), record


# Category classifier


@dataclass
class CategoryClassifier:
    """A linear classifier on `image_features`, fitted on a dataset's real training images.

    `probe` holds the standardisation (training mean / std) and the weights; `classes` the label names;
    `record` where it came from (dataset, split, number of images, seed, feature extractor).
    """

    probe: ProbeFit
    classes: list[str]
    record: dict[str, Any] = field(default_factory=dict)

    KIND = "category-classifier"

    @property
    def input_size(self) -> int:
        return int(self.record.get("feature_extractor", {}).get("input_size", FEATURE_INPUT_SIZE))

    @property
    def bf16(self) -> bool:
        return bool(self.record.get("bf16", False))

    def features(self, images: Tensor | np.ndarray, **kwargs: Any) -> Tensor:
        """`image_features` at the input size and precision this classifier was fitted with (keywords passed
        on; `bf16` may override the precision)."""
        kwargs.setdefault("bf16", self.bf16)
        return image_features(images, input_size=self.input_size, **kwargs)

    @torch.no_grad()
    def predict_features(self, feats: Tensor) -> Tensor:
        """Labels (N,) of image features (N, 1280)."""
        return self.probe.logits(feats).argmax(1).cpu()

    def predict(self, images: Tensor | np.ndarray, **kwargs: Any) -> Tensor:
        """Labels (N,) of images (any form `image_features` takes; its keywords passed on)."""
        return self.predict_features(self.features(images, **kwargs))

    def accuracy_of_features(self, feats: Tensor, labels: Tensor) -> dict[str, Any]:
        """Overall accuracy, balanced accuracy (mean per-class recall over the classes present) and the
        recall of each class present in `labels` (by class name)."""
        pred = self.predict_features(feats)
        labels = torch.as_tensor(labels).long().flatten().cpu()
        if len(labels) != len(pred):
            raise ValueError(f"{len(labels)} labels for {len(pred)} images; pass one label per image")
        if int(labels.min()) < 0 or int(labels.max()) >= len(self.classes):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1} (this classifier's classes)")
        per_class = {
            self.classes[c]: float((pred[labels == c] == c).float().mean()) for c in labels.unique().tolist()
        }
        return {
            "overall": float((pred == labels).float().mean()),
            "balanced": balanced_accuracy(pred, labels),
            "per_class": per_class,
            "num": len(labels),
        }

    def accuracy(self, images: Tensor | np.ndarray, labels: Tensor, **kwargs: Any) -> dict[str, Any]:
        """`accuracy_of_features` of images (keywords passed on to `image_features`)."""
        return self.accuracy_of_features(self.features(images, **kwargs), labels)

    def save(self, directory: str | Path) -> Path:
        p = self.probe
        tensors = {"mean": p.mean.flatten(), "std": p.std.flatten(), "weight": p.weight, "bias": p.bias}
        return save_head(directory, tensors, {**self.record, "kind": self.KIND, "classes": self.classes})

    @classmethod
    def load(cls, directory: str | Path) -> CategoryClassifier:
        t, record = load_head(directory, cls.KIND)
        probe = ProbeFit(mean=t["mean"][None], std=t["std"][None], weight=t["weight"], bias=t["bias"])
        return cls(probe=probe, classes=list(record["classes"]), record=record)


def fit_category_classifier(
    dataset: str | Path,
    *,
    resolution: int,
    seed: int = 0,
    num: int | None = None,
    input_size: int = CATEGORY_INPUT_SIZE,
    batch_size: int = 256,
    bf16: bool = CATEGORY_BF16,
    features: Tensor | None = None,
) -> CategoryClassifier:
    """Fit the category classifier on `dataset`'s real training images at `resolution` (all, or a random
    `num` drawn with `seed`): `image_features`, then `semantics.fit_linear_probe` (the probe's protocol)."""
    real = real_images(dataset, split="train", resolution=resolution, num=num, seed=seed)
    feats = features  # precomputed by a caller that also needs them: `image_features` of these same images
    if feats is None:
        feats = image_features(real.images, batch_size=batch_size, bf16=bf16, input_size=input_size)
    probe = fit_linear_probe(feats, real.labels, num_classes=len(real.classes))
    train_acc = float((probe.logits(feats).argmax(1) == real.labels).float().mean())
    record = {
        "dataset": str(dataset),
        "split": "train",
        "resolution": resolution,
        "num_images": len(real.labels),
        "num_requested": num,
        "seed": seed,
        "bf16": bf16,
        "feature_extractor": feature_extractor(input_size),
        "train_accuracy": train_acc,
    }
    return CategoryClassifier(probe=probe, classes=real.classes, record=record)


def _cache_name(dataset: str | Path, resolution: int, seed: int, num: int | None, input_size: int) -> str:
    name = str(dataset)
    if name not in DATASETS:
        path = str(Path(name).expanduser().resolve())
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).name)[:40]
        name = f"{safe}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
    return f"category-{name}-{resolution}px-in{input_size}-seed{seed}" + (f"-n{num}" if num else "")


def category_classifier(
    dataset: str | Path,
    resolution: int,
    *,
    cache_dir: str | Path,
    seed: int = 0,
    num: int | None = None,
    input_size: int = CATEGORY_INPUT_SIZE,
    bf16: bool = CATEGORY_BF16,
    features: Callable[[], Tensor] | None = None,
) -> CategoryClassifier:
    """The category classifier of (dataset, resolution) from `cache_dir`, or fitted and saved there
    (atomically) when absent or made with other encoder weights or precision. `features()`, called only for
    a fit, gives the training images' `image_features` at `input_size` and `bf16`."""
    target = Path(cache_dir) / _cache_name(dataset, resolution, seed, num, input_size)
    if (target / RECORD_NAME).is_file():
        try:
            clf = CategoryClassifier.load(target)
        except ValueError:
            clf = None  # damaged: fitted again below
        same = clf is not None and clf.record.get("feature_extractor") == feature_extractor(input_size)
        if same and clf.bf16 == bf16:
            return clf
    feats = features() if features is not None else None  # called only when a fit is needed
    kw = {"seed": seed, "num": num, "input_size": input_size, "bf16": bf16, "features": feats}
    clf = fit_category_classifier(dataset, resolution=resolution, **kw)
    with assets.atomic_dir(target) as tmp:
        clf.save(tmp)
    return CategoryClassifier.load(target)


__all__ = [
    "CATEGORY_BF16",
    "CATEGORY_INPUT_SIZE",
    "FEATURE_DIM",
    "FEATURE_ENCODER",
    "FEATURE_INPUT_SIZE",
    "CategoryClassifier",
    "RealImages",
    "category_classifier",
    "feature_extractor",
    "fit_category_classifier",
    "image_features",
    "load_head",
    "real_images",
    "save_head",
]
