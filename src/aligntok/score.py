"""`aligntok tokenizer score`: the cheap signal of what a tokenizer is worth to a diffusion model.

The semantic measures of `aligntok.tokenizer_eval` plus the gFID of a small, fixed DiT trained on the
tokenizer's latents; every piece resumable. One process (not under torchrun). The protocol is stated in
docs/metrics.md, "The diffusability score".
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligntok.config import apply_overrides
from aligntok.data import build_dataset
from aligntok.data.latents import build_cache
from aligntok.evaluate import generation_fid
from aligntok.exports import load_tokenizer
from aligntok.files import write_json
from aligntok.models.encoders import EncoderConfig
from aligntok.recipes.dit import dit_train_recipe
from aligntok.sampling import SampleConfig
from aligntok.tokenizer_eval import format_table, semantic_metrics
from aligntok.train.dit import train_dit


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
        sample=SampleConfig(steps=plan.sample_steps, seed=seed),
        tokenizer_dir=tokenizer_dir,
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
