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
The result file, benchmarks/results/reproduce-<dataset>.json (`-<budget>` added for budgets other than
`full`), is also the study's record: every number (tokenizer metrics, floors, each gFID) goes into its
`measured` map the moment it is known, keyed by what it measured, with the commit that measured it, and a
rerun (the same command, on any machine, e.g. a fresh clone) measures only what is missing there: a study
longer than a session lands its progress in git piece by piece. A tokenizer or DiT is trained only while
one of its numbers is missing (in `--out`, where an interrupted one resumes). The file is bound to the
study's `fingerprint` (the budget and every resolved tokenizer and DiT recipe): a changed recipe does not
mix with old numbers (`--fresh` starts over). It also holds the finished tokenizers' rows, `complete` and
`pending`; docs/img/ gets the convergence plot under the same name; the markdown tables for docs/results.md
are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.checkpoint import export_hash
from aligntok.config import apply_overrides, to_dict
from aligntok.data import build_dataset
from aligntok.data.latents import build_cache
from aligntok.evaluate import fid_floor, generation_fid
from aligntok.files import cached_json, write_json
from aligntok.recipes.dit import dit_train_recipe
from aligntok.recipes.tokenizer import tokenizer_train_recipe
from aligntok.report import plot_curves
from aligntok.sampling import SampleConfig
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
    shared = stage_dir(out / "aligntok" / "tokenizer", stage1)
    if name == "aligntok_wsp0" and shared.exists() and not stage_dir(run, stage1).exists():
        # The same stage 1 as aligntok (the recipes differ from stage 2 on): reuse it where this work
        # directory has it, so that the study spends one stage 1 less; elsewhere (aligntok's numbers already
        # in the record) the same recipe trains the same stage 1 here (training is deterministic).
        shutil.copytree(shared, stage_dir(run, stage1))
    return train_tokenizer(cfg, out=run, resume=True)


def dit_recipe(budget: Budget, seed: int) -> Any:
    """The study's DiT recipe: the same for every tokenizer, `seed` its training seed."""
    return apply_overrides(
        dit_train_recipe(budget.dit_recipe),
        [
            f"steps={budget.dit_steps}",
            f"seed={seed}",
            f"ema_decay={budget.dit_ema_decay}",
            "bf16=true",
            f"keep_checkpoints=[{','.join(map(str, budget.checkpoints))}]",
        ],
    )


def fingerprint(dataset: str, budget: Budget) -> str:
    """What a study's numbers depend on beyond the code: its budget and every resolved recipe."""
    what = {
        "dataset": dataset,
        "budget": dataclasses.asdict(budget),
        "tokenizers": {name: to_dict(tokenizer_recipe(name, dataset, budget)) for name in TOKENIZERS},
        "dit": to_dict(dit_recipe(budget, seed=0)),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    """The checkout's commit (with "+changes" when its tracked files differ from it), or None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def provenance(t0: float) -> dict[str, Any]:
    """Where and when a benchmark's numbers were made: the commit, the date, the wall time since `t0` (a
    `time.time()`), the machine and its load average."""
    return {
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - t0, 1),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "load_avg": os.getloadavg()[0],
    }


EXPORTS = "/exports"  # the key suffix of `Ledger.record_export`'s lists


class Ledger:
    """Every number a study has measured, keyed by what it measured: `{key: {"value", "commit", "date",
    "wall_s"}}`. `value(key, compute)` returns the recorded value, or computes, records and `save`s it at
    once: the result file always holds all that is known, and a rerun anywhere recomputes none of it.

    With the result file's `path`, every save first takes in what other processes have recorded there since
    (under a lock on its folder), so that runs measuring different pieces of one study (one per core) share
    one record and none overwrites another's numbers."""

    def __init__(
        self,
        measured: dict[str, Any],
        save: Callable[[], None],
        commit: str | None,
        path: Path | None = None,
    ) -> None:
        self.measured, self._save, self.commit, self.path = measured, save, commit, path

    def has(self, key: str) -> bool:
        return key in self.measured

    def get(self, key: str) -> Any:
        return self.measured[key]["value"]

    def seconds(self, key: str) -> float:
        """The wall time that measuring `key` took."""
        return self.measured[key]["wall_s"]

    def save(self) -> None:
        if self.path is None:
            self._save()
            return
        with _folder_lock(self.path.parent):
            if self.path.is_file():
                for key, entry in json.loads(self.path.read_text()).get("measured", {}).items():
                    mine = self.measured.setdefault(key, entry)
                    if key.endswith(EXPORTS) and mine is not entry:  # both saw the export: every hash
                        mine["value"] += [d for d in entry["value"] if d not in mine["value"]]
            self._save()

    def value(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.measured:
            t0 = time.time()
            value = compute()
            self.measured[key] = {
                "value": value,
                "commit": self.commit,
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "wall_s": round(time.time() - t0, 1),
            }
            self.save()
        return self.get(key)

    def record_export(self, name: str, digest: str) -> None:
        """Note the tokenizer export `name`'s numbers are measured on. Training is deterministic on one
        machine, so a tokenizer retrained for a later piece is the same one; a second hash under
        `<name>/exports` says it was not (another CPU's kernels), and the report says so."""
        key = f"{name}{EXPORTS}"
        seen = self.measured.setdefault(key, {"value": [], "commit": self.commit})["value"]
        if digest not in seen:
            seen.append(digest)
            self.save()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself (no lock file left beside the records)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_ledger(path: Path, fp: str, *, fresh: bool, save: Callable[[], None], commit: str | None) -> Ledger:
    """The ledger recorded in the result file at `path` for the study `fp` (empty if there is none, or with
    `fresh`). A result file of another study is not overwritten unless `fresh` says so."""
    previous = json.loads(path.read_text()) if path.is_file() and not fresh else None
    if previous is not None and previous.get("fingerprint") != fp:
        raise SystemExit(
            f"{path} holds another study (budget {previous.get('budget')}, fingerprint "
            f"{previous.get('fingerprint')}; this one is {fp}): pass --fresh to replace it, "
            "or --json elsewhere"
        )
    if fresh and path.is_file():
        path.unlink()  # so that the first save does not take the old numbers back in
    return Ledger(previous["measured"] if previous else {}, save, commit, path)


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
    interval = CFG_INTERVAL if cfg != 1.0 else (0.0, 1.0)
    sample = SampleConfig(steps=steps or budget.sample_steps, cfg_scale=cfg, interval=interval, bf16=True)
    kw = {
        "data": dataset,
        "num": budget.num_samples,
        "ref_num": budget.ref_num,
        "tokenizer_dir": tokenizer_dir,
    }
    return generation_fid(export, out=samples, sample=sample, **kw)["fid"]


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


def piece_key(name: str, seed: int, step: int, cfg: float, euler: int) -> str:
    """The ledger key of one gFID: tokenizer, DiT seed and steps, guidance scale (1: none), Euler steps."""
    return f"{name}/seed{seed}/step{step}/cfg{cfg:g}/euler{euler}"


def study_pieces(name: str, budget: Budget) -> dict[int, list[tuple[int, float, int]]]:
    """The gFIDs the study measures for `name`, per DiT seed, as (DiT steps, guidance, Euler steps): every
    checkpoint with guidance and without, and for SWEPT tokenizers the sweeps at seed 0's last checkpoint (a
    setting the checkpoints measure is not listed twice)."""
    last = budget.checkpoints[-1]
    pieces: dict[int, list[tuple[int, float, int]]] = {
        seed: [(c, w, budget.sample_steps) for c in budget.checkpoints for w in (budget.cfg, 1.0)]
        for seed in range(budget.seeds if name in SEEDED else 1)
    }
    if name in SWEPT:
        sweeps = [(last, w, budget.sample_steps) for w in budget.cfg_sweep]
        sweeps += [(last, 1.0, s) for s in budget.steps_sweep]
        pieces[0] += [p for p in dict.fromkeys(sweeps) if p not in pieces[0]]
    return pieces


def piece_samples(run: Path, budget: Budget, seed: int, step: int, cfg: float, euler: int) -> Path:
    """Where the study keeps one piece's samples: a checkpoint's, or a sweep's under `samples/sweep`."""
    if euler != budget.sample_steps:
        return run / "samples" / "sweep" / f"steps{euler}"
    if cfg in (budget.cfg, 1.0):
        return checkpoint_samples(run, seed, step, cfg)
    return run / "samples" / "sweep" / f"cfg{cfg:g}"


def study_tokenizer(
    name: str, dataset: str, budget: Budget, out: Path, ledger: Ledger
) -> dict[str, Any] | None:
    """Measure what `ledger` lacks of `name` (work in `out / name`), training its tokenizer and a DiT seed
    only while one of their numbers is missing; return its row once complete (`tokenizer_row`)."""
    earlier = ledger.measured.get(f"{name}/metrics", {}).get("value", {})
    if "cknna" in earlier and "cknna_centered_mask" not in earlier:  # the earlier estimator: measure again
        del ledger.measured[f"{name}/metrics"]
    row = tokenizer_row(name, dataset, budget, ledger)
    if row is not None:
        return row
    run = out / name
    missing = {
        seed: [p for p in todo if not ledger.has(piece_key(name, seed, *p))]
        for seed, todo in study_pieces(name, budget).items()
    }
    tok = train_one_tokenizer(name, dataset, budget, out)
    ledger.record_export(name, export_hash(tok))

    def metrics() -> dict[str, float]:
        m = tokenizer_metrics(tok, dataset, num=budget.eval_num, bf16=True, out=run / "tokenizer_eval.json")
        return {"rfid": m["rfid"], "psnr": m["psnr"], "lpips": m["lpips"], "probe": m["probe_balanced"],
                "cknna": m["cknna"], "cknna_centered_mask": m["cknna_centered_mask"]}  # fmt: skip

    ledger.value(f"{name}/metrics", metrics)
    ledger.value(f"{name}/recon_floor", lambda: reconstruction_floor(run, dataset, budget)["fid"])
    cache = None
    for seed, todo in missing.items():
        if not todo:
            continue
        if cache is None:
            cache = build_cache(
                tokenizer_dir=tok, data=dataset, out=run / "latents", flip=budget.flip, bf16=True
            )
        train_dit(dit_recipe(budget, seed), latents=cache, out=dit_run(run, seed), resume=True)
        for step, cfg, euler in todo:
            export = checkpoint_dit(run, seed, step)
            samples = piece_samples(run, budget, seed, step, cfg, euler)
            fid = ledger.value(
                piece_key(name, seed, step, cfg, euler),
                functools.partial(study_gfid, export, samples, dataset, budget, cfg=cfg, steps=euler),
            )
            what = f"{name}, seed {seed}, {step} DiT steps, guidance {cfg:g}, {euler} Euler steps"
            print(f"{what}: gFID {fid:.2f}", flush=True)
    return tokenizer_row(name, dataset, budget, ledger)


def tokenizer_row(name: str, dataset: str, budget: Budget, ledger: Ledger) -> dict[str, Any] | None:
    """`name`'s row of the result file from the ledger (None while a number is missing): its metrics, the
    gFID at every checkpoint (the mean over DiT seeds, each seed's too), with and without guidance, and the
    sweeps."""
    pieces = study_pieces(name, budget)
    keys = [f"{name}/metrics", f"{name}/recon_floor"]
    keys += [piece_key(name, seed, *p) for seed, todo in pieces.items() for p in todo]
    if not all(map(ledger.has, keys)):
        return None
    s, last = budget.sample_steps, budget.checkpoints[-1]

    def per_seed(cfg: float) -> dict[str, list[float]]:
        return {
            str(c): [ledger.get(piece_key(name, seed, c, cfg, s)) for seed in pieces]
            for c in budget.checkpoints
        }

    swept = name in SWEPT
    gfid, gfid_nocfg = per_seed(budget.cfg), per_seed(1.0)
    return {
        **ledger.get(f"{name}/metrics"),
        "recon_floor": ledger.get(f"{name}/recon_floor"),
        "gfid": {c: float(np.mean(v)) for c, v in gfid.items()},
        "gfid_nocfg": {c: float(np.mean(v)) for c, v in gfid_nocfg.items()},
        "gfid_seeds": gfid,
        "gfid_nocfg_seeds": gfid_nocfg,
        "cfg_sweep": {
            f"{w:g}": ledger.get(piece_key(name, 0, last, w, s)) for w in (budget.cfg_sweep if swept else ())
        },
        "sampling_steps_sweep": {
            str(n): ledger.get(piece_key(name, 0, last, 1.0, n))
            for n in (budget.steps_sweep if swept else ())
        },
        "tokenizer_steps": sum(st.steps for st in tokenizer_recipe(name, dataset, budget).stages),
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


def blur_suffix(blur_fraction: float | None) -> str:
    """`-blur<fraction>` where vae_blur's fraction is not the budget's own: another study, which must not
    share the main study's result file, plot or work directory (its finished vae_blur tokenizer)."""
    return "" if blur_fraction is None else f"-blur{blur_fraction:g}"


def result_stem(dataset: str, budget_name: str, blur_fraction: float | None = None) -> str:
    """The result file's and plot's name: `reproduce-<dataset>`, then `-<budget>` for budgets other than
    `full`, then the blur suffix."""
    stem = f"reproduce-{dataset}" + ("" if budget_name == "full" else f"-{budget_name}")
    return stem + blur_suffix(blur_fraction)


def default_out(dataset: str, budget_name: str, blur_fraction: float | None = None) -> Path:
    """The work directory: `runs/reproduce-<dataset>-<budget>`, then the blur suffix."""
    return Path(f"runs/reproduce-{dataset}-{budget_name}{blur_suffix(blur_fraction)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(BASES), required=True)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="short")
    parser.add_argument(
        "--out", default=None, help="work directory (default runs/reproduce-<dataset>-<budget>[-blur<F>])"
    )
    parser.add_argument(
        "--tokenizers", default=",".join(TOKENIZERS), help="comma-separated subset, studied in this order"
    )
    parser.add_argument(
        "--json",
        default=None,
        help="result path (default benchmarks/results/reproduce-<dataset>.json; other budgets than full: "
        "reproduce-<dataset>-<budget>.json)",
    )
    parser.add_argument(
        "--plot", default=None, help="plot path (default docs/img/ and the result file's name, .png)"
    )
    parser.add_argument(
        "--blur-fraction",
        type=float,
        default=None,
        help="vae_blur's fraction of the budget instead of the budget's own (another study: its result "
        "file, plot and default work directory get -blur<fraction> in their names)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="redraw the plot and table from the results JSON (no runs)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start a new record, replacing the result file's (another study's)",
    )
    args = parser.parse_args()
    names = args.tokenizers.split(",")
    unknown = set(names) - set(TOKENIZERS)
    if unknown:
        parser.error(f"unknown tokenizers {sorted(unknown)}; choose from {list(TOKENIZERS)}")
    if {"aligntok", "aligntok_wsp0"} <= set(names):  # after aligntok, whose stage 1 it then reuses
        names.remove("aligntok_wsp0")
        names.insert(names.index("aligntok") + 1, "aligntok_wsp0")
    budget = BUDGETS[args.budget]
    if args.blur_fraction is not None:
        if not 0 < args.blur_fraction <= 1:
            parser.error(f"--blur-fraction must be in (0, 1], got {args.blur_fraction}")
        budget = dataclasses.replace(budget, blur_fraction=args.blur_fraction)
    out = Path(args.out) if args.out else default_out(args.dataset, args.budget, args.blur_fraction)
    stem = result_stem(args.dataset, args.budget, args.blur_fraction)
    json_path = Path(args.json or ROOT / "benchmarks" / "results" / f"{stem}.json")
    plot_path = Path(args.plot or ROOT / "docs" / "img" / f"{stem}.png")
    if args.report_only:
        if not json_path.is_file():
            parser.error(f"--report-only: {json_path} does not exist yet; run the study first")
        report(json.loads(json_path.read_text()), plot_path)
        return
    # The reference size resolved once for this dataset (None where the cap holds the whole split): the
    # floor, every gFID and the result file's budget_settings use the same value.
    budget = dataclasses.replace(budget, ref_num=reference_size(args.dataset, budget))
    t0 = time.time()
    fp = fingerprint(args.dataset, budget)
    ledger = open_ledger(
        json_path,
        fp,
        fresh=args.fresh,
        save=lambda: write_json(summarize(args.dataset, args.budget, budget, fp, ledger, t0=t0), json_path),
        commit=git_commit(),
    )
    resolution = tokenizer_recipe(names[0], args.dataset, budget).model.image_size
    ledger.value(
        "fid_floor",
        lambda: cached_json(
            out / "fid_floor.json",
            lambda: fid_floor(
                args.dataset, num=budget.num_samples, resolution=resolution, ref_num=budget.ref_num, bf16=True
            ),
        ),
    )
    for name in names:
        study_tokenizer(name, args.dataset, budget, out, ledger)
    result = summarize(args.dataset, args.budget, budget, fp, ledger, t0=t0)
    write_json(result, json_path)
    report(result, plot_path)
    print(f"written: {json_path}, {plot_path}")


def progress_markdown(result: dict[str, Any]) -> str:
    """Every number the ledger holds, finished tokenizer or not ("-": not measured yet; blank: not part of the
    study): each tokenizer's metrics, then its gFIDs per DiT seed (the sweeps on seed 0's row)."""
    b, measured = result["budget_settings"], result["measured"]

    def cell(key: str, spec: str = ".1f", scale: float = 1.0) -> str:
        return format(scale * measured[key]["value"], spec) if key in measured else "-"

    names = [n for n in TOKENIZERS if any(k.startswith(f"{n}/") for k in measured)]
    head = ["tokenizer", "PSNR", "LPIPS", "rFID", "probe (%)", "CKNNA", "recon floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        m = measured.get(f"{n}/metrics", {}).get("value", {})
        cells = [f"{m[k]:{spec}}" if k in m else "-" for k, spec in
                 (("psnr", ".2f"), ("lpips", ".3f"), ("rfid", ".1f"))]  # fmt: skip
        cells += [f"{100 * m['probe']:.1f}" if m else "-", f"{m['cknna']:.3f}" if m else "-"]
        lines.append("| " + " | ".join([n, *cells, cell(f"{n}/recon_floor")]) + " |")
    s, last = b["sample_steps"], b["checkpoints"][-1]
    columns = [(c, b["cfg"], s) for c in b["checkpoints"]] + [(c, 1.0, s) for c in b["checkpoints"]]
    columns += [(last, w, s) for w in b["cfg_sweep"] if w != b["cfg"]]
    columns += [(last, 1.0, n) for n in b["steps_sweep"] if n != s]
    head = ["tokenizer", "DiT seed"] + [f"@{c} cfg {w:g}, {e} steps" for c, w, e in columns]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        for seed, pieces in study_pieces(n, Budget(**b)).items():
            cells = [cell(piece_key(n, seed, *col)) if col in pieces else "" for col in columns]
            table.append("| " + " | ".join([n, str(seed), *cells]) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(table)


def report(result: dict[str, Any], plot_path: Path) -> None:
    """The convergence plot (gFID against DiT steps, with and without guidance) and the markdown tables of the
    finished tokenizers, then every number measured so far."""
    floor = result["fid_floor"]
    if result["tokenizers"]:
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
        print(markdown(result) + "\n")
    if "measured" in result:  # (results written before the record was kept have only the rows)
        print(progress_markdown(result) + "\n")
    if floor is not None:
        print(f"floor {floor['fid']:.2f} ({floor['num']} real {floor['split']} images)")
    print(f"this call {result['wall_s_this_call']:.0f} s; pending: {', '.join(result['pending']) or 'none'}")
    if result.get("retrained_differently"):
        print(f"retrained to another export (numbers span two): {', '.join(result['retrained_differently'])}")


def summarize(
    dataset: str, budget_name: str, budget: Budget, fp: str, ledger: Ledger, *, t0: float
) -> dict[str, Any]:
    """The result file: settings, floor, the finished tokenizers' rows, the steps each needs to reach the
    vanilla VAE's final gFID (once the VAE is finished), and the ledger. `complete` only when all six are
    finished; the others are `pending`."""
    rows = {name: tokenizer_row(name, dataset, budget, ledger) for name in TOKENIZERS}
    tokenizers = {name: row for name, row in rows.items() if row is not None}
    pending = [name for name, row in rows.items() if row is None]
    target = None
    if "vae" in tokenizers:
        target = {
            "tokenizer": "vae",
            "gfid": tokenizers["vae"]["gfid"][str(budget.checkpoints[-1])],
            "note": "its final gFID (with guidance)",
        }
    return {
        "dataset": dataset,
        "budget": budget_name,
        "budget_settings": dataclasses.asdict(budget),
        "fingerprint": fp,
        "num_samples": budget.num_samples,
        "complete": not pending,
        "pending": pending,
        "fid_floor": ledger.get("fid_floor") if ledger.has("fid_floor") else None,
        "target": target,
        "steps_to_target": {
            n: steps_to_reach({int(c): v for c, v in t["gfid"].items()}, target["gfid"])
            for n, t in tokenizers.items()
        }
        if target
        else {},
        "tokenizers": tokenizers,
        "retrained_differently": [
            k.split("/")[0]
            for k, e in ledger.measured.items()
            if k.endswith("/exports") and len(e["value"]) > 1
        ],
        "measured": ledger.measured,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "wall_s_this_call": round(time.time() - t0, 1),  # a resumed study reuses earlier work
    }


if __name__ == "__main__":
    main()
