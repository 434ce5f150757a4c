"""`aligntok dit eval`: what a trained DiT's samples are worth, beside the same measures on real images.

A text DiT (docs/text.md, "Evaluation") draws one image per validation caption (a seeded subset of `num`
validation items, or all of them): FID against the training images (`evaluate.generation_fid`),
retrieval adherence (the rank of each image's own prompt among the unique validation prompts under a
contrastive image-text model trained on real training pairs) and category accuracy (the class-adherence
classifier against the labels of the prompts' items). A class DiT draws `num` class-balanced images: FID
and class adherence, per class and overall. `ceilings` are the same measures on the real validation
images. The adherence models are fitted once per dataset and resolution and cached under
`$ALIGNTOK_HOME/adherence`; their records (training data, seed, weight hash) go into every result.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok import assets
from aligntok.evaluate import fid_floor, generation_fid
from aligntok.exports import load_dit
from aligntok.files import cached_json, write_json
from aligntok.metrics.adherence import (
    CATEGORY_BF16,
    CATEGORY_INPUT_SIZE,
    FEATURE_INPUT_SIZE,
    CategoryClassifier,
    RealImages,
    category_classifier,
    feature_extractor,
    image_features,
    real_images,
)
from aligntok.metrics.contrastive import ContrastiveAdherence, fit_contrastive
from aligntok.metrics.reference import npz_images
from aligntok.models.text import MINILM, build_text_encoder
from aligntok.sampling import SampleConfig

VAL_SEED = 0  # which validation items a `num`-subset evaluates (the same for every DiT compared)
# The retrieval model's training (ours; docs/metrics.md, "Adherence", has what it reaches on emoji).
CONTRASTIVE = {"seed": 0, "steps": 500, "lr": 1e-3, "batch_size": 256}


def adherence_dir() -> Path:
    return assets.home() / "adherence"


def _resolution(dit_dir: str | Path) -> int:
    """The image size of the tokenizer the DiT's latents came from."""
    tokenizer = Path(load_dit(dit_dir).tokenizer_path)
    return int(json.loads((tokenizer / "config.json").read_text())["config"]["image_size"])


@functools.lru_cache(maxsize=2)
def _train_images(data: str, resolution: int) -> RealImages:
    """The real training images of `data`, read once per process: both adherence models fit on them."""
    return real_images(data, split="train", resolution=resolution)


@functools.lru_cache(maxsize=2)
def _train_features(data: str, resolution: int, input_size: int, bf16: bool) -> torch.Tensor:
    """Their adherence features (most of a fit's time), computed once per process and setting."""
    return image_features(_train_images(data, resolution).images, input_size=input_size, bf16=bf16)


def _classifier(data: str | Path, resolution: int) -> CategoryClassifier:
    features = lambda: _train_features(str(data), resolution, CATEGORY_INPUT_SIZE, CATEGORY_BF16)  # noqa: E731
    return category_classifier(data, resolution, cache_dir=adherence_dir(), features=features)


def _prompt_features(prompts: list[str]) -> torch.Tensor:
    """Pooled MiniLM features (N, 384) of `prompts`: the adherence model's text side, whatever encoder the
    DiT itself uses (the evaluation must not change with the model it judges)."""
    encoder = build_text_encoder(MINILM)
    return torch.cat([encoder.encode(prompts[i : i + 256])["pooled"] for i in range(0, len(prompts), 256)])


def contrastive_model(data: str | Path, resolution: int) -> ContrastiveAdherence:
    """The retrieval-adherence model of `data`: fitted once on every real training (image, caption) pair,
    then loaded from `adherence_dir()` (refitted when the record's training data or settings differ)."""
    encoder = build_text_encoder(MINILM)
    what = {
        "dataset": str(data),
        "split": "train",
        "resolution": resolution,
        "text_encoder": encoder.identity(),
    }
    what |= {"image_features": feature_extractor(), **CONTRASTIVE}
    target = adherence_dir() / f"contrastive-{Path(str(data)).name}-{resolution}px"
    if (target / "record.json").is_file():
        model = ContrastiveAdherence.load(target)
        if model.record.get("data") == what:
            return model
    real = _train_images(str(data), resolution)
    feats = _train_features(str(data), resolution, FEATURE_INPUT_SIZE, False)
    unique, ids = _caption_ids(real.captions)
    model = fit_contrastive(feats, _prompt_features(unique)[ids], ids, data=what, **CONTRASTIVE)
    with assets.atomic_dir(target) as tmp:
        model.save(tmp)
    return ContrastiveAdherence.load(target)


def _caption_ids(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """The unique captions (sorted) and each caption's index among them."""
    unique = sorted(set(captions))
    where = {c: i for i, c in enumerate(unique)}
    return unique, torch.tensor([where[c] for c in captions])


def _retrieval(model: ContrastiveAdherence, images: torch.Tensor | np.ndarray, captions: list[str]) -> dict:
    """Top-1 / top-5 / mean rank of each image's own caption among the unique captions."""
    unique, true_index = _caption_ids(captions)
    return model.retrieval(image_features(images), _prompt_features(unique), true_index)


def _scores(
    images: torch.Tensor | np.ndarray,
    val: RealImages,
    clf: CategoryClassifier,
    model: ContrastiveAdherence | None,
) -> dict[str, Any]:
    cat = clf.accuracy(images, val.labels)
    scores = {"category_accuracy": cat["overall"], "category_balanced": cat["balanced"]}
    scores["category_per_class"] = cat["per_class"]
    if model is not None:
        ret = _retrieval(model, images, val.captions)
        scores |= {
            "retrieval_top1": ret["top1"],
            "retrieval_top5": ret["top5"],
            "mean_rank": ret["mean_rank"],
        }
    return scores


def real_scores(data: str | Path, resolution: int, *, num: int | None = None, text: bool = True) -> dict:
    """The measures of `evaluate_t2i` (class adherence alone with `text` False) on the real validation
    images themselves (all, or a seeded subset of `num`): the ceilings generated images are read against."""
    val = real_images(data, split="val", resolution=resolution, num=num, seed=VAL_SEED)
    clf = _classifier(data, resolution)
    model = contrastive_model(data, resolution) if text else None
    return {**_scores(val.images, val, clf, model), "num": len(val.labels)}


def t2i_ceilings(data: str | Path, resolution: int, *, num: int | None = None, text: bool = True) -> dict:
    """`real_scores` and the real-vs-real FID floor at the same count against the same reference."""
    scores = real_scores(data, resolution, num=num, text=text)
    floor = fid_floor(data, num=scores["num"], resolution=resolution, bf16=True)
    return {**scores, "fid_floor": floor["fid"]}


def class_adherence(samples: str | Path, data: str | Path, resolution: int) -> dict[str, Any]:
    """Class adherence of the class-labelled samples in the npz `samples`: the accuracy of the fixed category
    classifier (trained on the real training images), overall, balanced and per class, with its record."""
    clf = _classifier(data, resolution)
    with np.load(samples) as f:
        labels = torch.from_numpy(f["labels"]).long()
    cat = clf.accuracy(npz_images(samples), labels)
    return {
        "category_accuracy": cat["overall"],
        "category_balanced": cat["balanced"],
        "category_per_class": cat["per_class"],
        "models": {"category": clf.record},
    }


def evaluate_t2i(
    dit_dir: str | Path, data: str | Path, *, out: str | Path, sample: SampleConfig, num: int | None = None
) -> dict[str, Any]:
    """FID and adherence of a text DiT's images of the validation captions (all, or `num` items); writes
    `out/t2i.json` beside the samples and returns it. A rerun with the same settings reuses the samples."""
    out, resolution = Path(out), _resolution(dit_dir)
    val = real_images(data, split="val", resolution=resolution, num=num, seed=VAL_SEED)
    fid = generation_fid(dit_dir, data=data, out=out, num=1, prompts=val.captions, sample=sample)
    clf = _classifier(data, resolution)
    model = contrastive_model(data, resolution)
    result = {"fid": fid["fid"], **_scores(npz_images(out / "samples.npz"), val, clf, model)}
    result |= {"num": len(val.labels), "sampling": sample.record(), "dit_hash": fid["dit_hash"]}
    result["models"] = {"category": clf.record, "contrastive": model.record}
    write_json(result, out / "t2i.json")
    return result


def evaluate_class_dit(
    dit_dir: str | Path, data: str | Path, *, out: str | Path, sample: SampleConfig, num: int
) -> dict[str, Any]:
    """gFID and class adherence (per class and overall) of `num` class-balanced samples of a class DiT."""
    out, resolution = Path(out), _resolution(dit_dir)
    fid = generation_fid(dit_dir, data=data, out=out, num=num, sample=sample)
    result = {"fid": fid["fid"], **class_adherence(out / "samples.npz", data, resolution)}
    result |= {"num": num, "sampling": sample.record()}
    write_json(result, out / "class_eval.json")
    return result


def evaluate_dit(
    dit_dir: str | Path, data: str | Path, *, out: str | Path, sample: SampleConfig, num: int | None = None
) -> dict[str, Any]:
    """`aligntok dit eval`: the text or class evaluation, with the ceilings of real validation images
    (cached in `out/ceilings.json`); prints a table."""
    out = Path(out)
    text = load_dit(dit_dir).text is not None
    if text:
        result = evaluate_t2i(dit_dir, data, out=out / "samples", sample=sample, num=num)
    else:
        result = evaluate_class_dit(dit_dir, data, out=out / "samples", sample=sample, num=num or 1000)
    resolution = _resolution(dit_dir)
    ceilings = cached_json(
        out / "ceilings.json", lambda: t2i_ceilings(data, resolution, num=num if text else None, text=text)
    )
    keys = [k for k in ("fid", "category_accuracy", "category_balanced", "retrieval_top1", "retrieval_top5")
            if k in result]  # fmt: skip
    print(f"{'measure':20s} {'samples':>10s} {'real val':>10s}")
    for k in keys:
        real = ceilings["fid_floor"] if k == "fid" else ceilings.get(k)
        print(f"{k:20s} {result[k]:10.4g} {real:10.4g}")
    full = {"samples": result, "ceilings": ceilings}
    write_json(full, out / "eval.json")
    print(f"written: {out / 'eval.json'}")
    return full
