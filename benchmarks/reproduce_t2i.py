"""The paper's second claim in miniature: does a text-to-image DiT learn AlignTok latents faster than a VAE's?

    python benchmarks/reproduce_t2i.py [--budget full|debug] [--tokenizers aligntok,vae,vavae]
        [--out runs/reproduce-emoji-<budget>] [--json PATH] [--fresh]

The same text-to-image recipe (`t2i-emoji`: the MMDiT "T" on MiniLM caption features) trained on the latents
of three tokenizers of the class-conditional study (benchmarks/reproduce.py, emoji, its budget's tokenizer
steps; the work directory is shared with it, so tokenizers and latent caches trained by either are reused):
`aligntok` (three stages), `vavae` (VA-VAE-style) and `vae` (vanilla). At every kept DiT checkpoint, one
image per validation caption (names that no training image has) is drawn with guidance, and at the last
checkpoint without it too, and scored by `aligntok.dit_eval.evaluate_t2i`: FID against the training images,
retrieval adherence (top-1 / top-5 of the image's own prompt among the unique validation prompts, by a
contrastive model trained on real training pairs) and category accuracy (the class-adherence classifier).
The ceilings are the same measures on the real validation images. `aligntok` and `vae` get `seeds` DiT
training seeds.

The record, benchmarks/results/reproduce-t2i-emoji.json (`-<budget>` for budgets other than full), is
reproduce.py's ledger: every number lands the moment it is measured, with the commit, date and wall time,
and a rerun measures only what is missing. docs/img/ gets the convergence plot under the same name.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from aligntok.config import apply_overrides, to_dict
from aligntok.data.latents import build_cache
from aligntok.dit_eval import evaluate_t2i, t2i_ceilings
from aligntok.files import write_json
from aligntok.recipes.dit import dit_train_recipe
from aligntok.report import plot_curves
from aligntok.sampling import SampleConfig
from aligntok.train.dit import kept_export, train_dit
from reproduce import BUDGETS as TOKENIZER_BUDGETS
from reproduce import (
    CFG_INTERVAL,
    ROOT,
    default_out,
    git_commit,
    open_ledger,
    tokenizer_recipe,
    train_one_tokenizer,
)

DATASET = "emoji"
TOKENIZERS = ("aligntok", "vae", "vavae")
SEEDED = ("aligntok", "vae")
MEASURES = ("fid", "retrieval_top1", "retrieval_top5", "category_balanced")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    tokenizers: str  # reproduce.py's budget whose tokenizers (and latent caches) are used
    dit_recipe: str
    dit_steps: int
    checkpoints: tuple[int, ...]  # DiT steps evaluated with guidance (the last also without)
    dit_ema_decay: float
    seeds: int  # DiT seeds of the SEEDED tokenizers (the others get one)
    cfg: float
    sample_steps: int
    eval_num: int | None  # validation captions drawn (None: all of them)


BUDGETS = {
    # A DiT run: 1,200 steps, about 25 min on one core (1.27 s per step); 450 held-out prompts per evaluation
    # (a seeded half of emoji's 870 validation captions, the demo's count), 4 evaluations per run.
    "full": Budget(
        tokenizers="full",
        dit_recipe="t2i-emoji",
        dit_steps=1200,
        checkpoints=(300, 600, 1200),
        dit_ema_decay=0.99,
        seeds=2,
        cfg=3.0,
        sample_steps=30,
        eval_num=450,
    ),
    "debug": Budget(
        tokenizers="debug",
        dit_recipe="t2i-debug",
        dit_steps=6,
        checkpoints=(3, 6),
        dit_ema_decay=0.5,
        seeds=2,
        cfg=3.0,
        sample_steps=3,
        eval_num=12,
    ),
}


def dit_recipe(budget: Budget, seed: int) -> Any:
    sets = [f"steps={budget.dit_steps}", f"seed={seed}", f"ema_decay={budget.dit_ema_decay}", "bf16=true"]
    sets.append(f"keep_checkpoints=[{','.join(map(str, budget.checkpoints))}]")
    return apply_overrides(dit_train_recipe(budget.dit_recipe), sets)


def fingerprint(budget: Budget) -> str:
    """What the numbers depend on beyond the code: the budget, the tokenizer and DiT recipes."""
    tok_budget = TOKENIZER_BUDGETS[budget.tokenizers]
    what = {
        "budget": dataclasses.asdict(budget),
        "tokenizers": {n: to_dict(tokenizer_recipe(n, DATASET, tok_budget)) for n in TOKENIZERS},
        "dit": to_dict(dit_recipe(budget, seed=0)),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def pieces(budget: Budget) -> list[tuple[int, float]]:
    """(DiT step, guidance scale) of every evaluation of one run."""
    return [(s, budget.cfg) for s in budget.checkpoints] + [(budget.checkpoints[-1], 1.0)]


def key(name: str, seed: int, step: int, cfg: float) -> str:
    return f"{name}/seed{seed}/step{step}/cfg{cfg:g}"


def sample_config(budget: Budget, cfg: float) -> SampleConfig:
    interval = CFG_INTERVAL if cfg != 1.0 else (0.0, 1.0)
    return SampleConfig(steps=budget.sample_steps, cfg_scale=cfg, interval=interval, bf16=True)


def study(name: str, budget: Budget, out: Path, ledger: Any, *, trained_only: bool = False) -> None:
    """Train what `name` lacks (tokenizer, cache, DiT seeds) and measure every missing piece; with
    `trained_only`, measure only the DiT runs already finished in `out` (another process trains the rest)."""
    run = out / name
    seeds = range(budget.seeds if name in SEEDED else 1)
    if trained_only:
        seeds = [s for s in seeds if (run / f"t2i-seed{s}" / "export").is_dir()]
    todo = {s: [p for p in pieces(budget) if not ledger.has(key(name, s, *p))] for s in seeds}
    if not any(todo.values()):
        return
    tok = train_one_tokenizer(name, DATASET, TOKENIZER_BUDGETS[budget.tokenizers], out)
    cache = build_cache(tokenizer_dir=tok, data=DATASET, out=run / "latents", flip=True, bf16=True)
    for seed, missing in todo.items():
        if not missing:
            continue
        dit_run = run / f"t2i-seed{seed}"
        train_dit(dit_recipe(budget, seed), latents=cache, out=dit_run, resume=True)
        for step, cfg in missing:
            samples = dit_run / "samples" / f"step{step}-cfg{cfg:g}"
            kw = {"out": samples, "sample": sample_config(budget, cfg), "num": budget.eval_num}
            compute = functools.partial(_scores, kept_export(dit_run, step), kw)
            result = ledger.value(key(name, seed, step, cfg), compute)
            print(f"{name}, seed {seed}, {step} steps, guidance {cfg:g}: {result}", flush=True)


def _scores(export: Path, kw: dict[str, Any]) -> dict[str, float]:
    result = evaluate_t2i(export, DATASET, **kw)
    return {k: result[k] for k in MEASURES} | {"category_accuracy": result["category_accuracy"]}


def table(budget: Budget, ledger: Any) -> dict[str, Any]:
    """Per tokenizer and piece: the mean over seeds of every measure, and the seeds' values."""
    rows: dict[str, Any] = {}
    for name in TOKENIZERS:
        seeds = range(budget.seeds if name in SEEDED else 1)
        for step, cfg in pieces(budget):
            got = [ledger.get(key(name, s, step, cfg)) for s in seeds if ledger.has(key(name, s, step, cfg))]
            if got:
                mean = {m: sum(g[m] for g in got) / len(got) for m in MEASURES}
                rows[f"{name}/step{step}/cfg{cfg:g}"] = {**mean, "seeds": got}
    return rows


def plot(budget: Budget, rows: dict[str, Any], stem: str) -> None:
    """FID and retrieval top-1 against DiT steps (guided), one line per tokenizer."""
    for measure in ("fid", "retrieval_top1"):
        series = {
            name: [(s, rows[f"{name}/step{s}/cfg{budget.cfg:g}"][measure]) for s in budget.checkpoints
                   if f"{name}/step{s}/cfg{budget.cfg:g}" in rows]
            for name in TOKENIZERS
        }  # fmt: skip
        path = ROOT / "docs" / "img" / f"{stem}-{measure}.png"
        title = f"text-to-image on emoji: {measure} (guidance {budget.cfg:g})"
        plot_curves(series, path, title=title, xlabel="DiT step", ylabel=measure)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    p.add_argument(
        "--tokenizers", default=",".join(TOKENIZERS), help="comma-separated, studied in this order"
    )
    p.add_argument("--out", default=None, help="work directory (default: reproduce.py's, shared with it)")
    p.add_argument(
        "--json", default=None, help="record (default benchmarks/results/reproduce-t2i-emoji.json)"
    )
    p.add_argument("--fresh", action="store_true", help="start the record over")
    p.add_argument(
        "--trained-only",
        action="store_true",
        help="measure only DiT runs already trained in --out, train none",
    )
    a = p.parse_args()
    budget = BUDGETS[a.budget]
    stem = "reproduce-t2i-emoji" + ("" if a.budget == "full" else f"-{a.budget}")
    json_path = Path(a.json or ROOT / "benchmarks" / "results" / f"{stem}.json")
    out = Path(a.out or default_out(DATASET, budget.tokenizers))
    record: dict[str, Any] = {"budget": a.budget, "settings": dataclasses.asdict(budget)}
    record["fingerprint"] = fingerprint(budget)
    t0 = time.time()

    def save() -> None:
        write_json({**record, "measured": ledger.measured}, json_path)

    ledger = open_ledger(json_path, record["fingerprint"], fresh=a.fresh, save=save, commit=git_commit())
    resolution = apply_overrides(
        tokenizer_recipe("aligntok", DATASET, TOKENIZER_BUDGETS[budget.tokenizers]), []
    )
    ledger.value("ceilings", lambda: t2i_ceilings(DATASET, resolution.model.image_size, num=budget.eval_num))
    for name in a.tokenizers.split(","):
        if name not in TOKENIZERS:
            raise SystemExit(f"unknown tokenizer {name!r}; choose from {', '.join(TOKENIZERS)}")
        study(name, budget, out, ledger, trained_only=a.trained_only)
        record["table"] = table(budget, ledger)
        save()
        plot(budget, record["table"], stem)
    print(json.dumps(record.get("table", {}), indent=1))
    print(f"written: {json_path} ({(time.time() - t0) / 60:.1f} min this run)")


if __name__ == "__main__":
    main()
