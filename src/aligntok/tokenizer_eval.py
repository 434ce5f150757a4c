"""`aligntok tokenizer eval` and `aligntok tokenizer score`: how good a tokenizer is, and how diffusable.

`evaluate_tokenizer` measures reconstruction (rFID, PSNR, SSIM, LPIPS) and semantics (linear probe, k-NN,
CKNNA to the original foundation encoder), PAPER.md "Evaluation protocol". `score_tokenizer` is the cheap
signal of what a tokenizer is worth to a diffusion model: the semantic measures plus the gFID of a small,
fixed DiT trained on its latents, every piece resumable. Both run in one process (not under torchrun).
The protocols are stated in docs/metrics.md, "Tokenizer metrics".
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from aligntok import distributed
from aligntok.config import to_dict
from aligntok.data.images import ImageDataset
from aligntok.metrics.reconstruction import eval_indices, reconstruction_metrics
from aligntok.metrics.semantics import cknna, knn_accuracy, linear_probe
from aligntok.models.encoders import Encoder, EncoderConfig, build_encoder
from aligntok.models.tokenizer import Tokenizer, TokenizerConfig
from aligntok.report import write_json

CKNNA_K = 10  # neighbours per item: a fixed protocol choice (small k measures local structure)
KNN_K = 20


def reference_encoder_config(config: TokenizerConfig) -> EncoderConfig:
    """The encoder CKNNA compares a tokenizer's latents with: its ORIGINAL foundation encoder.

    Not the encoder inside the tokenizer: stage 2 fine-tunes that one, and CKNNA asks how much of the
    foundation model's structure the latents keep, so the yardstick is the untouched pretrained model. A
    tokenizer whose encoder is trained from scratch (`cnn`, the VAE baselines) has no foundation model: it
    gets the default one, EfficientNet-Lite0 block 10 fed at max(128, image_size) px, which is what the
    emoji and Fashion-MNIST presets use, so that baselines and AlignTok tokenizers share one yardstick.
    """
    if config.encoder.name == "cnn":
        return EncoderConfig(name="efficientnet-lite0", block=10, input_size=max(128, config.image_size))
    return dataclasses.replace(config.encoder, pretrained=True)


def reference_encoder(config: TokenizerConfig, reference: EncoderConfig | None = None) -> Encoder:
    """`reference` (default `reference_encoder_config(config)`) built with its weights, frozen, eval mode."""
    enc = reference if reference is not None else reference_encoder_config(config)
    if enc.path is None and enc.hf_config is not None:
        warnings.warn(
            f"reference encoder {enc.name!r} has an architecture (hf_config) but no weights (path): CKNNA "
            "compares against a randomly initialised encoder; set encoder.path to the real model",
            stacklevel=2,
        )
    return build_encoder(enc).requires_grad_(False).eval()


@torch.no_grad()
def _encode(
    tokenizer: Tokenizer,
    dataset: Dataset,
    indices: list[int],
    *,
    reference: Encoder | None,
    batch_size: int,
    bf16: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Normalised latents (N, C, h, w), reference features (N, D, h, w) or None, labels (N,), on the CPU."""
    device = next(tokenizer.parameters()).device
    latents, feats, labels = [], [], []
    for batch in tqdm(DataLoader(Subset(dataset, indices), batch_size=batch_size), desc=desc):
        x = batch["image"].to(device)
        with distributed.autocast(bf16):
            latents.append(tokenizer.normalize(tokenizer.encode(x).float()).cpu())
            if reference is not None:
                feats.append(reference.features(x).float().cpu())
        labels.append(batch["label"].long())
    return torch.cat(latents), (torch.cat(feats) if reference is not None else None), torch.cat(labels)


def semantic_metrics(
    tokenizer: Tokenizer,
    train: ImageDataset,
    test: ImageDataset,
    *,
    num: int | None = None,
    batch_size: int = 64,
    bf16: bool = False,
    seed: int = 0,
    reference: EncoderConfig | None = None,
) -> dict[str, Any]:
    """Linear probe and k-NN (trained on `train` latents, scored on `test`), CKNNA on `test`.

    Latents are the normalised ones the DiT sees; CKNNA compares them, flattened, with the flattened
    features of `reference_encoder(config, reference)` on the same `test` images, at k = 10 (capped at
    N - 1). `num` caps the images per split (a seeded subset). Runs on the tokenizer's device.
    """
    device = next(tokenizer.parameters()).device
    ref_cfg = reference if reference is not None else reference_encoder_config(tokenizer.config)
    ref_net = reference_encoder(tokenizer.config, ref_cfg).to(device)
    num_classes = len(train.classes)
    tr_idx = eval_indices(len(train), num, seed=seed)
    te_idx = eval_indices(len(test), num, seed=seed)
    kw: dict[str, Any] = {"batch_size": batch_size, "bf16": bf16}
    z_tr, _, y_tr = _encode(tokenizer, train, tr_idx, reference=None, desc="latents (train)", **kw)
    z_te, f_te, y_te = _encode(tokenizer, test, te_idx, reference=ref_net, desc="latents (test)", **kw)
    assert f_te is not None
    z_tr, y_tr, z_te, y_te = z_tr.to(device), y_tr.to(device), z_te.to(device), y_te.to(device)
    probe = linear_probe(z_tr, y_tr, z_te, y_te, num_classes=num_classes, seed=seed)
    knn = knn_accuracy(z_tr, y_tr, z_te, y_te, k=KNN_K)
    k = min(CKNNA_K, len(te_idx) - 1)
    return {
        "probe_accuracy": probe["accuracy"],
        "probe_balanced": probe["balanced_accuracy"],
        "probe_train_accuracy": probe["train_accuracy"],
        "knn_accuracy": knn["accuracy"],
        "knn_balanced": knn["balanced_accuracy"],
        "knn_k": knn["k"],
        "cknna": cknna(z_te, f_te.to(device), k=k) if k >= 1 else float("nan"),
        "cknna_k": k,
        "num_train_images": len(tr_idx),
        "num_test_images": len(te_idx),
        "reference_encoder": to_dict(ref_cfg),
    }


def tokenizer_metrics(
    tokenizer_dir: str | Path, data: str | Path, *, num: int | None, bf16: bool, out: Path
) -> dict[str, Any]:
    """`evaluate_tokenizer`'s result at `out`, computed (and written there by it) only when `out` is missing:
    the resumable step of the demo and the reproduction study."""
    if out.is_file():
        return json.loads(out.read_text())
    return evaluate_tokenizer(tokenizer_dir, data, num=num, bf16=bf16, out=out)


def format_table(result: dict[str, Any]) -> str:
    """Two aligned columns, metric and value; floats to 4 significant digits, dicts as k=v (None left out)."""
    width = max(len(k) for k in result)
    rows = []
    for key, value in result.items():
        if isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, dict):
            text = " ".join(f"{k}={v}" for k, v in value.items() if v is not None)
        else:
            text = str(value)
        rows.append(f"{key:<{width}}  {text}")
    return "\n".join(rows)


def load_tokenizer(tokenizer_dir: str | Path) -> Tokenizer:
    """The exported tokenizer in `tokenizer_dir` on this process's device, frozen, in eval mode."""
    return Tokenizer.from_pretrained(tokenizer_dir).to(distributed.device()).requires_grad_(False).eval()


def evaluate_tokenizer(
    tokenizer_dir: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    num: int | None = None,
    probe: bool = True,
    batch_size: int = 64,
    bf16: bool = False,
    out: str | Path | None = None,
    reference: EncoderConfig | None = None,
) -> dict[str, Any]:
    """rFID, PSNR, SSIM, LPIPS on `split`; probe, k-NN (train split -> `split`) and CKNNA unless not `probe`.

    `num` caps the images of each split (a seeded subset, the same for every tokenizer); `reference` is the
    encoder CKNNA compares with (default: `reference_encoder_config`). Writes JSON to
    `out` (default `<tokenizer_dir>/../report/tokenizer_eval.json`), prints a table, returns the dict.
    """
    from aligntok.data import build_dataset

    t0 = time.time()
    tokenizer = load_tokenizer(tokenizer_dir)
    resolution = tokenizer.config.image_size
    test = build_dataset(data, split=split, resolution=resolution)
    if isinstance(test, torch.utils.data.IterableDataset):
        raise ValueError(
            f"tokenizer eval draws seeded subsets, which {data} (streamed shards) cannot give; "
            "pass its image folder"
        )
    result: dict[str, Any] = {
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "data": str(data),
        "split": split,
    }
    recon = reconstruction_metrics(tokenizer, test, num=num, batch_size=batch_size, bf16=bf16)
    result.update({k: v for k, v in recon.items() if k != "wall_s"})
    if probe:
        train = build_dataset(data, split="train", resolution=resolution)
        kw: dict[str, Any] = {"batch_size": batch_size, "bf16": bf16, "reference": reference}
        result.update(semantic_metrics(tokenizer, train, test, num=num, **kw))
    result["wall_s"] = round(time.time() - t0, 2)
    path = (
        Path(out)
        if out is not None
        else Path(tokenizer_dir).resolve().parent / "report" / "tokenizer_eval.json"
    )
    write_json(result, path)
    print(format_table(result))
    print(f"tokenizer metrics written to {path}")
    return result


@dataclass(frozen=True, kw_only=True)
class ScoreBudget:
    """What `score_tokenizer` spends: a fixed DiT recipe and step count, samples, probe and reference."""

    dit_recipe: str  # a name in recipes.dit.DIT_TRAIN_RECIPES; its model, batch and optimiser are kept
    dit_steps: int
    num_samples: int
    sample_steps: int  # Euler steps, no guidance (cfg 1): the score must not depend on a guidance sweep
    probe_num: int | None  # images per split for the probe / k-NN / CKNNA; None = all
    ref_num: int | None  # training images in the gFID reference; None = all


SCORE_BUDGETS: dict[str, ScoreBudget] = {
    # The emoji/fashion DiT recipe (T/1, ~3M parameters, batch 64) cut to 1500 steps.
    "small": ScoreBudget(
        dit_recipe="emoji", dit_steps=1500, num_samples=1000, sample_steps=30, probe_num=None, ref_num=10_000
    ),
    "debug": ScoreBudget(
        dit_recipe="debug", dit_steps=20, num_samples=8, sample_steps=4, probe_num=32, ref_num=None
    ),
}


def score_tokenizer(
    tokenizer_dir: str | Path,
    data: str | Path,
    *,
    out: str | Path,
    budget: str = "small",
    seed: int = 0,
    reference: EncoderConfig | None = None,
) -> dict[str, Any]:
    """The diffusability score of a tokenizer: balanced probe, CKNNA, and gFID of a small fixed DiT.

    Under `out`: `latents/` (the train split with flips), `dit/` (the run), `samples/` (no guidance),
    `score.json`. Rerunning resumes: the cache skips finished shards, training resumes from its checkpoint,
    sampling and its FID are skipped when `samples/` holds them. gFID is against the training images
    (`ref_num` of them, a seeded subset). `wall_s` is the time of this call.
    """
    from aligntok.config import apply_overrides
    from aligntok.data import build_dataset
    from aligntok.data.latents import build_cache
    from aligntok.evaluate import generation_fid
    from aligntok.recipes.dit import dit_train_recipe
    from aligntok.train.dit import train_dit

    if budget not in SCORE_BUDGETS:
        raise ValueError(f"unknown score budget {budget!r}; choose one of {sorted(SCORE_BUDGETS)}")
    plan = SCORE_BUDGETS[budget]
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    resolution = tokenizer.config.image_size
    train = build_dataset(data, split="train", resolution=resolution)
    test = build_dataset(data, split="val", resolution=resolution)
    semantics = semantic_metrics(tokenizer, train, test, num=plan.probe_num, seed=seed, reference=reference)
    del tokenizer

    cache = build_cache(tokenizer_dir=tokenizer_dir, data=str(data), out=out / "latents", flip=True)
    cfg = apply_overrides(dit_train_recipe(plan.dit_recipe), [f"steps={plan.dit_steps}", f"seed={seed}"])
    export = train_dit(cfg, latents=cache, out=out / "dit", resume=True)
    ref_num = plan.ref_num if plan.ref_num is not None and plan.ref_num < len(train) else None
    fid = generation_fid(
        export,
        data=data,
        out=out / "samples",
        num=plan.num_samples,
        steps=plan.sample_steps,
        tokenizer_dir=tokenizer_dir,
        seed=seed,
        ref_num=ref_num,
    )
    gfid = fid["fid"]

    result: dict[str, Any] = {
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "data": str(data),
        "budget": budget,
        "seed": seed,
        "probe_balanced": semantics["probe_balanced"],
        "probe_accuracy": semantics["probe_accuracy"],
        "knn_balanced": semantics["knn_balanced"],
        "cknna": semantics["cknna"],
        "reference_encoder": semantics["reference_encoder"],
        "gfid": gfid,
        "dit_model": cfg.model,
        "dit_steps": cfg.steps,
        "num_samples": plan.num_samples,
        "sample_steps": plan.sample_steps,
        "num_ref_images": fid["num_ref"],
        "wall_s": round(time.time() - t0, 2),
    }
    if not all(math.isfinite(result[k]) for k in ("probe_balanced", "cknna", "gfid")):
        warnings.warn(f"score of {tokenizer_dir} has a non-finite value: {result}", stacklevel=2)
    write_json(result, out / "score.json")
    print(format_table(result))
    print(f"tokenizer score written to {out / 'score.json'}")
    return result


__all__ = [
    "SCORE_BUDGETS",
    "ScoreBudget",
    "evaluate_tokenizer",
    "format_table",
    "reference_encoder",
    "score_tokenizer",
    "semantic_metrics",
]
