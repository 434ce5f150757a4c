"""The paper's central comparison in miniature: which latent space does a DiT learn fastest?

    python benchmarks/reproduce.py --dataset emoji|fashion-mnist --budget short|full [--out runs/reproduce]
                                   [--tokenizers aligntok,vae,...]

Tokenizers with the same latent size (8x8x8 at 32 px), decoder, data and training budget (recipes
`emoji32` / `fashion` and their variants): `aligntok` (3 stages), `aligntok_stage1` (stage 1 for the whole
budget), `aligntok_wsp0` (3 stages, w_sp = 0; it shares aligntok's stage 1), `vavae` (VA-VAE-style),
`vae` (vanilla), and `vae_blur`, the vanilla VAE stopped early (`blur_fraction` of the budget) so that it
reconstructs no better than AlignTok stage 1: it separates "a smoother latent" from "a semantic latent".

For each: rFID, PSNR, LPIPS, class-balanced linear probe and CKNNA (`aligntok tokenizer eval`, val split);
then the same DiT recipe on its latents, with gFID against the training images with and without guidance
at every checkpoint (the mean over seeds; `aligntok` and `vae` get `seeds` training seeds), for `aligntok`,
`vae` and `vavae` a guidance sweep and a sampling-steps sweep at the last checkpoint, the DiT steps each
needs to reach the vanilla VAE's final gFID, and the real-vs-real FID floor at the same sample count, and
for each tokenizer its reconstruction floor (the same real images through the tokenizer: the gFID its
decoder sets, however well a DiT learns the latents).
Every step is resumable (rerun the same command). Writes benchmarks/results/reproduce-<dataset>.json (after
each tokenizer, with `complete` and `pending`), docs/img/reproduce-<dataset>.png (the convergence plot)
and prints the markdown tables for docs/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from aligntok.config import apply_overrides
from aligntok.data import build_dataset
from aligntok.data.latents import build_cache
from aligntok.evaluate import fid_floor, generation_fid
from aligntok.recipes.dit import dit_train_recipe
from aligntok.recipes.tokenizer import tokenizer_train_recipe
from aligntok.report import cached_json, plot_curves, write_json
from aligntok.tokenizer_eval import tokenizer_metrics
from aligntok.train.dit import kept_export, train_dit
from aligntok.train.tokenizer import stage_dir, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BASES = {"emoji": "emoji32", "fashion-mnist": "fashion"}
# name -> recipe variant (tokenizer_train_recipe's `<base>-<variant>`)
TOKENIZERS = {  # in the order they are studied: the paper's three-way comparison first
    "aligntok": "",
    "vae": "-vae",
    "vavae": "-vavae",
    "aligntok_stage1": "-stage1",
    "aligntok_wsp0": "-wsp0",
    "vae_blur": "-vae",
}
SEEDED = ("aligntok", "vae")  # the two the paper's claim is about get several DiT training seeds
# The paper's three-way comparison gets the guidance and sampling-steps sweeps; the ablations are compared
# at the study's fixed setting (a sweep is four more 2,000-sample gFIDs, ~35 min of one core per tokenizer).
SWEPT = ("aligntok", "vae", "vavae")
CFG_INTERVAL = (0.0, 0.9)  # guidance acts for t in this interval (LightningDiT's; noise at t = 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    stage_steps: tuple[int, int, int]  # AlignTok's three stages; one-stage recipes get the sum
    blur_fraction: float  # vae_blur trains for this fraction of the budget
    eval_num: int  # val (and train, for the probe) images of the tokenizer metrics
    flip: bool  # cache mirrored copies too
    dit_steps: int
    checkpoints: tuple[int, ...]  # DiT steps evaluated (the last is dit_steps)
    dit_ema_decay: float
    seeds: int
    num_samples: int
    ref_num: int | None  # training images in the gFID reference: a seeded subset this large (None, or a
    # split no larger: all of them; main resolves it per dataset with reference_size)
    cfg: float  # guidance scale of the per-checkpoint gFID
    cfg_sweep: tuple[float, ...]  # scales tried at the last checkpoint (seed 0)
    sample_steps: int
    steps_sweep: tuple[int, ...]  # Euler steps tried at the last checkpoint, no guidance (seed 0)
    base: str | None = None  # tokenizer base recipe (default: by dataset)
    dit_recipe: str = "emoji"


BUDGETS = {
    # About an hour and a half per dataset on one CPU core: the shape of the study, one DiT seed, with sample
    # counts far below what separates close FIDs (see the floor it reports).
    "short": Budget(
        stage_steps=(200, 60, 40),
        blur_fraction=0.25,
        eval_num=200,
        flip=False,
        dit_steps=300,
        checkpoints=(150, 300),
        dit_ema_decay=0.99,
        seeds=1,
        num_samples=250,
        ref_num=2000,
        cfg=3.0,
        cfg_sweep=(1.5, 3.0, 5.0),
        sample_steps=30,
        steps_sweep=(10, 30),
    ),
    # The protocol: 2,000 samples against the training images, two DiT seeds for aligntok and vae,
    # three checkpoints, the sweeps. Cost on 2 cores (measured): a DiT step ~0.5 s, and a 2,000-sample gFID
    # ~6 min with guidance, ~4 min without (30 Euler steps of T/1 at ~440 forwards/s, then Inception at
    # ~18 images/s): about 9 hours per dataset, most of it sampling and Inception. The reference holds at
    # most 10,000 training images: all of emoji's 6,692, a seeded 10,000 of Fashion-MNIST's 60,000, whose
    # Inception pass then takes ~10 min instead of ~1 h. What that costs: FID's finite-sample bias falls as
    # c/N + c/M (N samples, M reference images); emoji's floor (6.5 at 2,000 vs 6,692) puts c near 10^4, so
    # the reference's share is ~1 point at M = 10,000 against ~0.2 at 60,000, the same for every tokenizer.
    "full": Budget(
        stage_steps=(600, 400, 200),
        blur_fraction=0.25,
        eval_num=870,
        flip=True,
        dit_steps=2400,
        checkpoints=(600, 1200, 2400),
        dit_ema_decay=0.999,
        seeds=2,
        num_samples=2000,
        ref_num=10_000,
        cfg=3.0,
        cfg_sweep=(1.5, 3.0, 5.0),
        sample_steps=30,
        steps_sweep=(10, 20, 30),
    ),
    # Seconds: the tests' budget (debug tokenizer and DiT).
    "debug": Budget(
        stage_steps=(3, 2, 2),
        blur_fraction=0.5,
        eval_num=16,
        flip=False,
        dit_steps=6,
        checkpoints=(3, 6),
        dit_ema_decay=0.5,
        seeds=2,
        num_samples=12,
        ref_num=24,
        cfg=3.0,
        cfg_sweep=(2.0, 3.0),
        sample_steps=3,
        steps_sweep=(2, 3),
        base="debug",
        dit_recipe="debug",
    ),
}


def tokenizer_recipe(name: str, dataset: str, budget: Budget) -> Any:
    base = budget.base or BASES[dataset]
    cfg = tokenizer_train_recipe(base + TOKENIZERS[name])
    total = sum(budget.stage_steps)
    if len(cfg.stages) == 3:
        steps = [f"stages.{i}.steps={n}" for i, n in enumerate(budget.stage_steps)]
    else:
        fraction = budget.blur_fraction if name == "vae_blur" else 1.0
        steps = [f"stages.0.steps={max(1, round(total * fraction))}"]
    return apply_overrides(cfg, [f"data={dataset}", *steps])


def train_one_tokenizer(name: str, dataset: str, budget: Budget, out: Path) -> Path:
    run = out / name / "tokenizer"
    cfg = tokenizer_recipe(name, dataset, budget)
    stage1 = cfg.stages[0]
    if name == "aligntok_wsp0" and not stage_dir(run, stage1).exists():
        # Same stage 1 as aligntok (the recipes differ from stage 2 on): reuse it, so that the two differ
        # only by w_sp, and the study spends one stage 1 less.
        shutil.copytree(stage_dir(out / "aligntok" / "tokenizer", stage1), stage_dir(run, stage1))
    return train_tokenizer(cfg, out=run, resume=True)


def reference_size(dataset: str, budget: Budget) -> int | None:
    """The gFID reference's `ref_num`: `budget.ref_num` training images, or None (all) if there are no more
    (so that emoji's all-images reference, and every gFID measured against it, keeps its cache key)."""
    if budget.ref_num is None:
        return None
    size = len(build_dataset(dataset, split="train", resolution=32))
    return budget.ref_num if budget.ref_num < size else None


def steps_to_reach(curve: dict[int, float], target: float) -> float | None:
    """DiT steps at which gFID first reaches `target`, interpolated linearly between checkpoints."""
    points = sorted(curve.items())
    for i, (step, value) in enumerate(points):
        if value <= target:
            if i == 0:
                return float(step)
            (s0, v0) = points[i - 1]
            return float(s0 + (step - s0) * (v0 - target) / (v0 - value))
    return None


def reconstruction_floor(run: Path, dataset: str, budget: Budget) -> dict[str, Any]:
    """The decoder's share of every gFID of the tokenizer in `run` (a study's `<out>/<name>`, its export in
    `tokenizer/export`): its reconstructions of the floor's real images against the same reference
    (evaluate.fid_floor), the gFID of a DiT that sampled real images' latents exactly. Cached in
    `run/recon_floor.json`."""
    return cached_json(
        run / "recon_floor.json",
        lambda: fid_floor(
            dataset,
            num=budget.num_samples,
            resolution=tokenizer_recipe("aligntok", dataset, budget).model.image_size,  # all six share it
            ref_num=budget.ref_num,
            bf16=True,
            tokenizer_dir=run / "tokenizer" / "export",
        ),
    )


def study_gfid(
    export: Path,
    samples: Path,
    dataset: str,
    budget: Budget,
    *,
    cfg: float = 1.0,
    steps: int | None = None,
    tokenizer_dir: Path | None = None,
) -> float:
    """gFID of a DiT export's samples in `samples` (found there if measured before) at the study's sample
    count and reference; guidance `cfg` on CFG_INTERVAL, `steps` Euler steps (default the budget's), through
    `tokenizer_dir` (default the DiT's own tokenizer)."""
    guided = {"cfg_scale": cfg, "interval": CFG_INTERVAL} if cfg != 1.0 else {}
    return generation_fid(
        export,
        out=samples,
        data=dataset,
        num=budget.num_samples,
        ref_num=budget.ref_num,
        bf16=True,
        steps=steps or budget.sample_steps,
        tokenizer_dir=tokenizer_dir,
        **guided,
    )["fid"]


def dit_run(run: Path, seed: int) -> Path:
    """Where a study trains `run`'s (`<out>/<name>`) DiT of training seed `seed`."""
    return run / f"dit-seed{seed}"


def checkpoint_dit(run: Path, seed: int, step: int) -> Path:
    """The export of `run`'s DiT seed `seed` at checkpoint `step`."""
    return kept_export(dit_run(run, seed), step)


def checkpoint_samples(run: Path, seed: int, step: int, cfg: float) -> Path:
    """Where a study keeps the samples of `run`'s (`<out>/<name>`) DiT seed `seed` at `step` with guidance
    `cfg` (the study's Euler steps)."""
    return run / "samples" / f"seed{seed}-step{step}" / f"cfg{cfg:g}"


def study_tokenizer(name: str, dataset: str, budget: Budget, out: Path) -> dict[str, Any]:
    t0 = time.time()
    tok = train_one_tokenizer(name, dataset, budget, out)
    metrics = tokenizer_metrics(
        tok, dataset, num=budget.eval_num, bf16=True, out=out / name / "tokenizer_eval.json"
    )
    recon_floor = reconstruction_floor(out / name, dataset, budget)
    cache = build_cache(
        tokenizer_dir=tok, data=dataset, out=out / name / "latents", flip=budget.flip, bf16=True
    )
    seeds = range(budget.seeds if name in SEEDED else 1)
    gfid: dict[int, list[float]] = {c: [] for c in budget.checkpoints}
    gfid_nocfg: dict[int, list[float]] = {c: [] for c in budget.checkpoints}

    def measure(
        export: Path, samples: Path, what: str, *, cfg: float = 1.0, steps: int | None = None
    ) -> float:
        """gFID of `export`'s samples in `samples` (found there if measured before), logged as it comes."""
        steps = steps or budget.sample_steps
        fid = study_gfid(export, samples, dataset, budget, cfg=cfg, steps=steps)
        print(f"{name}, {what}, guidance {cfg:g}, {steps} Euler steps: gFID {fid:.2f}", flush=True)
        return fid

    for seed in seeds:
        cfg = apply_overrides(
            dit_train_recipe(budget.dit_recipe),
            [
                f"steps={budget.dit_steps}",
                f"seed={seed}",
                f"ema_decay={budget.dit_ema_decay}",
                "bf16=true",
                f"keep_checkpoints=[{','.join(map(str, budget.checkpoints))}]",
            ],
        )
        train_dit(cfg, latents=cache, out=dit_run(out / name, seed), resume=True)  # found, not retrained
        for c in budget.checkpoints:
            export = checkpoint_dit(out / name, seed, c)
            what = f"seed {seed}, {c} DiT steps"
            guided = checkpoint_samples(out / name, seed, c, budget.cfg)
            gfid[c].append(measure(export, guided, what, cfg=budget.cfg))
            gfid_nocfg[c].append(measure(export, checkpoint_samples(out / name, seed, c, 1.0), what))
    # The sweeps at the last checkpoint (seed 0); a setting already measured there is read, not redone.
    last = checkpoint_dit(out / name, 0, budget.checkpoints[-1])
    sweep = out / name / "samples" / "sweep"
    what = f"seed 0, {budget.checkpoints[-1]} DiT steps"
    swept = name in SWEPT
    cfg_sweep = {
        f"{w:g}": measure(
            last,
            checkpoint_samples(out / name, 0, budget.checkpoints[-1], w)
            if w == budget.cfg
            else sweep / f"cfg{w:g}",
            what,
            cfg=w,
        )
        for w in (budget.cfg_sweep if swept else ())
    }
    steps_sweep = {
        str(s): measure(
            last,
            checkpoint_samples(out / name, 0, budget.checkpoints[-1], 1.0)
            if s == budget.sample_steps
            else sweep / f"steps{s}",
            what,
            steps=s,
        )
        for s in (budget.steps_sweep if swept else ())
    }
    return {
        "rfid": metrics["rfid"],
        "psnr": metrics["psnr"],
        "lpips": metrics["lpips"],
        "probe": metrics["probe_balanced"],
        "cknna": metrics["cknna"],
        "recon_floor": recon_floor["fid"],
        "gfid": {str(c): float(np.mean(v)) for c, v in gfid.items()},
        "gfid_nocfg": {str(c): float(np.mean(v)) for c, v in gfid_nocfg.items()},
        "gfid_seeds": {str(c): v for c, v in gfid.items()},
        "gfid_nocfg_seeds": {str(c): v for c, v in gfid_nocfg.items()},
        "cfg_sweep": cfg_sweep,
        "sampling_steps_sweep": steps_sweep,
        "tokenizer_steps": sum(s.steps for s in tokenizer_recipe(name, dataset, budget).stages),
        "wall_s_this_call": round(time.time() - t0, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    checkpoints = list(next(iter(result["tokenizers"].values()))["gfid"])
    head = ["tokenizer", "PSNR", "LPIPS", "rFID", "probe", "CKNNA", "recon floor"]
    head += [f"gFID@{c}" for c in checkpoints] + [f"gFID@{c} no CFG" for c in checkpoints] + ["steps to VAE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in result["tokenizers"].items():
        reach = result["steps_to_target"].get(name)
        cells = [
            name,
            f"{t['psnr']:.2f}",
            f"{t['lpips']:.3f}",
            f"{t['rfid']:.1f}",
            f"{100 * t['probe']:.1f}%",
        ]
        floor = t.get("recon_floor")  # absent from results measured before it was added
        cells += [f"{t['cknna']:.3f}", "-" if floor is None else f"{floor:.1f}"]
        cells += [f"{t['gfid'][c]:.1f}" for c in checkpoints]
        cells += [f"{t['gfid_nocfg'][c]:.1f}" for c in checkpoints] + [
            "-" if reach is None else f"{reach:.0f}"
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + sweeps_markdown(result)


def sweeps_markdown(result: dict[str, Any]) -> str:
    """At the last checkpoint: gFID of each DiT seed, and the guidance and sampling-steps sweeps (seed 0;
    "-" for a tokenizer outside SWEPT)."""
    rows = result["tokenizers"]
    last = list(next(iter(rows.values()))["gfid"])[-1]
    scales = list(dict.fromkeys(w for t in rows.values() for w in t["cfg_sweep"]))
    steps = list(dict.fromkeys(s for t in rows.values() for s in t["sampling_steps_sweep"]))
    head = ["tokenizer", f"gFID@{last} per seed"]
    head += [f"guidance {w}" for w in scales] + [f"{s} Euler steps, no CFG" for s in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in rows.items():
        cells = [name, " / ".join(f"{v:.1f}" for v in t["gfid_seeds"][last])]
        cells += [f"{t['cfg_sweep'][w]:.1f}" if w in t["cfg_sweep"] else "-" for w in scales]
        cells += [
            f"{t['sampling_steps_sweep'][s]:.1f}" if s in t["sampling_steps_sweep"] else "-" for s in steps
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(BASES), required=True)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="short")
    parser.add_argument(
        "--out", default=None, help="work directory (default runs/reproduce-<dataset>-<budget>)"
    )
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS), help="comma-separated subset")
    parser.add_argument(
        "--json", default=None, help="result path (default benchmarks/results/reproduce-<dataset>.json)"
    )
    parser.add_argument("--plot", default=None, help="plot path (default docs/img/reproduce-<dataset>.png)")
    parser.add_argument(
        "--report-only", action="store_true", help="redraw the plot and table from the results JSON (no runs)"
    )
    args = parser.parse_args()
    names = args.tokenizers.split(",")
    unknown = set(names) - set(TOKENIZERS)
    if unknown:
        parser.error(f"unknown tokenizers {sorted(unknown)}; choose from {list(TOKENIZERS)}")
    if "aligntok_wsp0" in names and "aligntok" not in names:
        parser.error("aligntok_wsp0 reuses aligntok's stage 1: include aligntok")
    names.sort(key=list(TOKENIZERS).index)  # aligntok before aligntok_wsp0
    budget = BUDGETS[args.budget]
    out = Path(args.out or f"runs/reproduce-{args.dataset}-{args.budget}")
    json_path = Path(args.json or ROOT / "benchmarks" / "results" / f"reproduce-{args.dataset}.json")
    plot_path = Path(args.plot or ROOT / "docs" / "img" / f"reproduce-{args.dataset}.png")
    if args.report_only:
        if not json_path.is_file():
            parser.error(f"--report-only: {json_path} does not exist yet; run the study first")
        report(json.loads(json_path.read_text()), plot_path)
        return
    # The reference size resolved once for this dataset (None where the cap holds the whole split): the
    # floor, every gFID and the result file's budget_settings use the same value.
    budget = dataclasses.replace(budget, ref_num=reference_size(args.dataset, budget))
    t0 = time.time()
    resolution = tokenizer_recipe(names[0], args.dataset, budget).model.image_size
    floor = cached_json(
        out / "fid_floor.json",
        lambda: fid_floor(
            args.dataset,
            num=budget.num_samples,
            resolution=resolution,
            ref_num=budget.ref_num,
            bf16=True,
        ),
    )
    tokenizers: dict[str, Any] = {}
    for name in names:  # the results so far are written after each tokenizer: a long study shows progress
        tokenizers[name] = study_tokenizer(name, args.dataset, budget, out)
        result = summarize(args, budget, floor, tokenizers, t0=t0)
        write_json(result, json_path)
    report(result, plot_path)
    print(f"written: {json_path}, {plot_path}")


def report(result: dict[str, Any], plot_path: Path) -> None:
    """The convergence plot (gFID against DiT steps, with and without guidance) and the markdown table."""
    floor = result["fid_floor"]
    series = {
        f"{n}{suffix}": [(int(c), v) for c, v in t[key].items()]
        for n, t in result["tokenizers"].items()
        for key, suffix in (("gfid", ""), ("gfid_nocfg", " (no CFG)"))
    }
    plot_curves(
        series,
        plot_path,
        title=f"{result['dataset']}: gFID vs DiT steps ({result['num_samples']} samples, "
        f"floor {floor['fid']:.1f})",
        xlabel="DiT training steps",
        ylabel="gFID",
    )
    print(markdown(result))
    print(
        f"floor {floor['fid']:.2f} ({floor['num']} real {floor['split']} images); "
        f"this call {result['wall_s_this_call']:.0f} s; pending: {', '.join(result['pending']) or 'none'}"
    )


def summarize(
    args: argparse.Namespace,
    budget: Budget,
    floor: dict[str, Any],
    tokenizers: dict[str, Any],
    *,
    t0: float,
) -> dict[str, Any]:
    """The result file: settings, floor, per-tokenizer numbers, and the steps each needs to reach the
    vanilla VAE's final gFID (once the VAE is measured). `complete` only when all six are measured: a
    `--tokenizers` subset lists the others as pending."""
    pending = [n for n in TOKENIZERS if n not in tokenizers]
    target = None
    if "vae" in tokenizers:
        target = {
            "tokenizer": "vae",
            "gfid": tokenizers["vae"]["gfid"][str(budget.checkpoints[-1])],
            "note": "its final gFID (with guidance)",
        }
    return {
        "dataset": args.dataset,
        "budget": args.budget,
        "budget_settings": dataclasses.asdict(budget),
        "num_samples": budget.num_samples,
        "complete": not pending,
        "pending": pending,
        "fid_floor": floor,
        "target": target,
        "steps_to_target": {
            n: steps_to_reach({int(c): v for c, v in t["gfid"].items()}, target["gfid"])
            for n, t in tokenizers.items()
        }
        if target
        else {},
        "tokenizers": tokenizers,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "wall_s_this_call": round(time.time() - t0, 1),  # a resumed study reuses earlier work
    }


if __name__ == "__main__":
    main()
