"""What keeping frozen outputs saves a tokenizer stage (docs/training.md, "Frozen outputs").

    python benchmarks/frozen_outputs.py [--recipe emoji32] [--steps 10] [--json PATH]

For each stage of the recipe (on its own data, its first stage from a fresh tokenizer, later ones from the
same weights: the cost does not depend on them) this times `keep_frozen_outputs` (one pass over the training
split) and then `--steps` training steps (forward, losses, backward, AdamW) with the kept outputs and with
everything computed per step, alternately. Writes JSON (default
benchmarks/results/frozen-outputs-<recipe>.json) and prints a table with the break-even step count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from aligntok.data import build_dataset
from aligntok.files import write_json
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.tokenizer import tokenizer_train_recipe
from aligntok.train import tokenizer_stage as ts
from aligntok.train.common import SpikeGuard
from reproduce import provenance

ROOT = Path(__file__).resolve().parents[1]


def stage_row(recipe: str, index: int, steps: int) -> dict[str, Any]:
    cfg = tokenizer_train_recipe(recipe)
    stage = cfg.stages[index]
    tok = Tokenizer(cfg.model)
    parts = ts.build_stage(cfg, stage, lambda: tok, lambda: Tokenizer(cfg.model))
    ds = build_dataset(cfg.data, split="train", resolution=cfg.model.image_size)
    t0 = time.perf_counter()
    ts.keep_frozen_outputs(parts, cfg, ds, images_read=len(ds))
    keep_s = time.perf_counter() - t0
    kept = parts.frozen
    guard = SpikeGuard(None, stage.max_consecutive_skips)
    g = torch.Generator().manual_seed(0)

    def step(frozen: bool) -> float:
        index_ = torch.randint(0, len(ds), (cfg.batch_size,), generator=g)
        batch = {"image": torch.stack([ds[i]["image"] for i in index_.tolist()]), "index": index_}
        parts.frozen = kept if frozen else {}
        noise = ts.posterior_noise(parts, cfg)
        t = time.perf_counter()
        total, _, _ = ts.stage_losses(
            parts, cfg, batch["image"], noise, gan_on=False, frozen=parts.frozen_batch(batch)
        )
        ts.optimizer_step(parts, cfg, guard, total, step=0, ckpt_dir=Path("."))
        return time.perf_counter() - t

    step(True), step(False)  # warm-up
    times: dict[str, list[float]] = {"kept": [], "computed": []}
    for _ in range(steps):
        times["kept"].append(step(True))
        times["computed"].append(step(False))
    kept_s, computed_s = (statistics.median(times[k]) for k in ("kept", "computed"))
    saved = computed_s - kept_s
    return {
        "stage": stage.name,
        "kept": sorted(kept),
        "keep_s": round(keep_s, 1),
        "bytes": sum(v.nbytes for v in kept.values()),
        "step_s": {"kept": kept_s, "computed": computed_s},
        "break_even_steps": round(keep_s / saved) if saved > 0 else None,
        "stage_steps": stage.steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="emoji32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    t0 = time.time()
    rows = [stage_row(a.recipe, k, a.steps) for k in range(len(tokenizer_train_recipe(a.recipe).stages))]
    record = {
        **provenance(t0),
        "recipe": a.recipe,
        "rows": rows,
    }
    out = Path(a.json or ROOT / "benchmarks" / "results" / f"frozen-outputs-{a.recipe}.json")
    write_json(record, out)
    print("| stage | kept | once, s | MB | step s: kept / computed | break-even steps | stage steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {', '.join(r['kept']) or '-'} | {r['keep_s']} | {r['bytes'] / 2**20:.0f} | "
            f"{r['step_s']['kept']:.3f} / {r['step_s']['computed']:.3f} | {r['break_even_steps']} | "
            f"{r['stage_steps']} |"
        )
    print(f"written: {out}")


if __name__ == "__main__":
    main()
