"""Stage 2 in the paper's regime: how far does the encoder drift without L_sp, and what does L_sp protect?

    python benchmarks/stage2_study.py --dataset emoji|fashion-mnist [--stage1-steps 2400]
        [--stage2-steps 1600] [--encoder-lrs 2e-5,2e-4] [--sp-weights 0,1] [--sp-kind l2_norm]
        [--out runs/stage2-<dataset>] [--json PATH] [--fresh]

One stage 1 of the 32 px recipe (`emoji32` / `fashion`), trained once for `--stage1-steps` with its export
kept on a doubling grid of steps; the plateau criterion below picks the export that stage 2 starts from
(and that L_sp compares to). Then stage 2 from it for every (encoder lr, w_sp), each with its export
(EMA weights) kept on a doubling grid of stage-2 steps. Every kept export is measured with
`aligntok tokenizer eval` on the val split (PSNR, LPIPS, rFID, class-balanced linear probe, CKNNA to the
original encoder): semantics against stage-2 steps is the drift curve.

Plateau criterion for stage 1 (ours; the paper gives no lengths): the first kept step s whose validation
PSNR (of the fixed val batch, logged every `val_every` steps), averaged over the `PLATEAU_WINDOW` logs up to
s, is within `PLATEAU_DB` of the same average at the end of the run: the rest of the run, at least as long
again on the doubling grid, gains less than that. (The average, because one log moves +-0.3 dB from the
next; against the best later log, that noise alone would keep every step from qualifying.) A run whose
last kept step is the first to qualify has not shown a plateau; the record says so and stage 2 then starts
from the last export.

The record, benchmarks/results/stage2-<dataset>.json, is reproduce.py's ledger: every number lands the
moment it is measured, with the commit, date and wall time that measured it, and a rerun (on any machine)
measures only what is missing, so a study longer than a session lands piece by piece. It is bound to a
fingerprint of the settings (`--fresh` starts over). docs/img/stage2-<dataset>-from<stage-1 step>-*.png
plot the drift curves and the frontier, one set per stage-1 starting point.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from aligntok.config import apply_overrides, to_dict
from aligntok.data import build_dataset
from aligntok.exports import load_tokenizer
from aligntok.files import write_json
from aligntok.metrics.reconstruction import eval_indices, psnr, reconstructed
from aligntok.recipes.tokenizer import tokenizer_train_recipe
from aligntok.report import plot_curves
from aligntok.tokenizer_eval import semantic_metrics, tokenizer_metrics
from aligntok.train.common import read_log
from aligntok.train.tokenizer import kept_stage_export, stage_dir, train_tokenizer
from reproduce import BASES, ROOT, git_commit, open_ledger

PLATEAU_DB = 0.25
PLATEAU_WINDOW = 5
METRICS = ("psnr", "lpips", "rfid", "probe_balanced", "cknna")


@dataclasses.dataclass(frozen=True)
class Settings:
    dataset: str
    stage1_steps: int
    stage2_steps: int
    encoder_lrs: tuple[float, ...]
    sp_weights: tuple[float, ...]
    sp_kind: str
    eval_num: int = 870
    base: str | None = None  # the tokenizer recipe (default: the dataset's, BASES; the tests' is "debug")


S1_FIRST, S2_FIRST = 300, 100  # the first kept step of each stage; later ones double


def doubling(last: int, first: int) -> tuple[int, ...]:
    """first, 2 first, 4 first, ... below `last`, then `last`."""
    steps, s = [], first
    while s < last:
        steps.append(s)
        s *= 2
    return (*steps, last)


def recipe(s: Settings, stage2: dict[str, Any] | None = None, *, stage1_steps: int | None = None) -> Any:
    """The base recipe with stage 1's length and kept exports; with `stage2`, that stage's settings too.
    Under the recipes' constant lr an export kept at step k is the export of a k-step stage, so numbers keyed
    by step stay valid when a later session lengthens a stage."""
    n1 = stage1_steps or s.stage1_steps
    sets = [
        f"data={s.dataset}",
        f"stages.0.steps={n1}",
        f"stages.0.keep_exports={list(doubling(n1, S1_FIRST))}",
    ]
    if stage2 is not None:
        kept = list(doubling(s.stage2_steps, S2_FIRST))
        sets += [f"stages.1.steps={s.stage2_steps}", f"stages.1.keep_exports={kept}"]
        sets += [f"stages.1.{k}={json.dumps(v)}" for k, v in stage2.items()]
    return apply_overrides(tokenizer_train_recipe(s.base or BASES[s.dataset]), sets)


# Stage-2 settings every variant sets itself (its name and `Settings.sp_kind` hold them).
VARIANT_FIELDS = ("encoder_lr", "sp_weight", "sp_kind")


def fingerprint(s: Settings) -> str:
    """What the numbers depend on besides the keys they are stored under: stages 1 and 2 of the recipe
    without their lengths and the fields each variant sets (stage 3 is never trained here), so that the
    recipe's own choices of them can change without orphaning the record."""
    cfg = to_dict(recipe(s))
    cfg["stages"] = cfg["stages"][:2]
    for stage in cfg["stages"]:
        stage.pop("steps"), stage.pop("keep_exports")
    for k in VARIANT_FIELDS:
        cfg["stages"][1].pop(k)
    what = [s.dataset, s.sp_kind, s.eval_num, cfg]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def plateau(log: list[dict[str, Any]], kept: tuple[int, ...]) -> tuple[int, bool]:
    """The kept stage-1 step the criterion picks, and whether the run showed a plateau there."""
    psnr_at = {r["step"]: r["val_psnr"] for r in log if "val_psnr" in r}

    def smoothed(step: int) -> float:
        window = [v for t, v in sorted(psnr_at.items()) if t <= step][-PLATEAU_WINDOW:]
        return sum(window) / len(window)

    final = smoothed(max(psnr_at))
    for k in kept:
        if k in psnr_at and final - smoothed(k) < PLATEAU_DB:
            return k, k != kept[-1]
    return kept[-1], False


def stage1(s: Settings, out: Path) -> tuple[Path, int, bool]:
    """Train (or find) the shared stage 1; the export stage 2 starts from, its step, and the plateau flag."""
    run = stage1_dir(s, out)
    cfg = recipe(s)
    train_tokenizer(cfg, out=run, stage="1", resume=True)
    step, flat = plateau(
        read_log(stage_dir(run, cfg.stages[0]) / "log.jsonl"), doubling(s.stage1_steps, S1_FIRST)
    )
    return kept_stage_export(run, cfg.stages[0], step), step, flat


def stage1_dir(s: Settings, out: Path) -> Path:
    """One work directory per stage-1 length: a finished stage is never lengthened in place (its export
    records its length), so a longer run retrains, and its kept exports equal this one's step by step."""
    return out / f"stage1-{s.stage1_steps}"


def variant_name(lr: float, w: float) -> str:
    return f"elr{lr:g}-wsp{w:g}"


def stage2(s: Settings, out: Path, start: Path, start_step: int, lr: float, w: float) -> tuple[Any, Path]:
    """Stage 2 of one variant from the chosen stage-1 export (copied in as that run's stage 1)."""
    cfg = recipe(s, {"encoder_lr": lr, "sp_weight": w, "sp_kind": s.sp_kind}, stage1_steps=start_step)
    run = out / f"from{start_step}-{variant_name(lr, w)}-{s.stage2_steps}"
    first = stage_dir(run, cfg.stages[0]) / "export"
    if not first.exists():
        shutil.copytree(start, first)
    train_tokenizer(cfg, out=run, stage="2", resume=True)
    return cfg, run


def measure(export: Path, s: Settings, where: Path, *, full: bool) -> dict[str, float]:
    """Semantics (probe, CKNNA) and PSNR of a kept export; with `full`, every `tokenizer eval` metric
    (rFID costs about a minute more per export on the CPU, so the curves' inner points skip it)."""
    if full:
        m = tokenizer_metrics(export, s.dataset, num=s.eval_num, bf16=True, out=where)
        return {k: m[k] for k in (*METRICS, "cknna_centered_mask") if k in m}
    tok = load_tokenizer(export)
    res = tok.config.image_size
    train, test = (build_dataset(s.dataset, split=x, resolution=res) for x in ("train", "val"))
    sem = semantic_metrics(tok, train, test, num=s.eval_num, bf16=True)
    psnr = reconstruction_psnr(tok, test, num=s.eval_num)
    return {"psnr": psnr, **{k: sem[k] for k in ("probe_balanced", "cknna", "cknna_centered_mask")}}


@torch.no_grad()
def reconstruction_psnr(tok: Any, dataset: Any, *, num: int) -> float:
    """Mean PSNR of the uint8-saved reconstructions of the seeded eval subset (as `tokenizer eval`)."""
    sub = torch.utils.data.Subset(dataset, eval_indices(len(dataset), num))
    values = [psnr(torch.from_numpy(saved).permute(0, 3, 1, 2).float() / 255, x).mean().item() * len(x)
              for x, saved in reconstructed(tok, sub, bf16=True)]  # fmt: skip
    return sum(values) / len(sub)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(BASES), default="emoji")
    p.add_argument("--stage1-steps", type=int, default=2400)
    p.add_argument("--stage2-steps", type=int, default=1600)
    p.add_argument("--encoder-lrs", default="2e-4,2e-5", help="comma-separated, studied in this order")
    p.add_argument("--sp-weights", default="0,1", help="comma-separated, studied in this order")
    p.add_argument("--sp-kind", default="l2_norm", choices=["l2", "l2_norm", "cosine"])
    p.add_argument("--out", default=None, help="work directory (default runs/stage2-<dataset>)")
    p.add_argument("--json", default=None, help="record (default benchmarks/results/stage2-<dataset>.json)")
    p.add_argument("--fresh", action="store_true", help="start the record over")
    a = p.parse_args()
    s = Settings(
        dataset=a.dataset,
        stage1_steps=a.stage1_steps,
        stage2_steps=a.stage2_steps,
        encoder_lrs=tuple(float(x) for x in a.encoder_lrs.split(",")),
        sp_weights=tuple(float(x) for x in a.sp_weights.split(",")),
        sp_kind=a.sp_kind,
    )
    out = Path(a.out or f"runs/stage2-{a.dataset}")
    json_path = Path(a.json or ROOT / "benchmarks" / "results" / f"stage2-{a.dataset}.json")
    record: dict[str, Any] = {"settings": dataclasses.asdict(s), "fingerprint": fingerprint(s)}
    ledger = open_ledger(
        json_path, record["fingerprint"], fresh=a.fresh, save=lambda: save(), commit=git_commit()
    )

    def save() -> None:
        write_json({**record, "measured": ledger.measured}, json_path)

    start, step, flat = stage1(s, out)
    record["plateau"] = {
        **{"stage1_steps": s.stage1_steps, "step": step, "plateau_seen": flat},
        **{"db": PLATEAU_DB, "window": PLATEAU_WINDOW},
    }
    kept1, run1 = doubling(s.stage1_steps, S1_FIRST), stage1_dir(s, out)
    for k in kept1:
        export, where = kept_stage_export(run1, recipe(s).stages[0], k), run1 / f"eval-{k}.json"
        ledger.value(
            f"stage1/{k}", lambda e=export, w=where, f=k in (step, kept1[-1]): measure(e, s, w, full=f)
        )
    kept2 = doubling(s.stage2_steps, S2_FIRST)
    for lr in s.encoder_lrs:
        for w in s.sp_weights:
            cfg, run = stage2(s, out, start, step, lr, w)
            for k in kept2:
                export, where = kept_stage_export(run, cfg.stages[1], k), run / f"eval-{k}.json"
                key = f"from{step}/{variant_name(lr, w)}/{k}"
                ledger.value(key, lambda e=export, wh=where, f=k == kept2[-1]: measure(e, s, wh, full=f))
            print(f"{variant_name(lr, w)}: measured", flush=True)
            plot(s, ledger.measured, step)
    save()
    print(f"written: {json_path}")


def variants(measured: dict[str, Any], start_step: int) -> dict[str, tuple[float, float]]:
    """Every stage-2 variant the record holds from `start_step` (this run's grid and earlier runs'), by name,
    with its (encoder lr, w_sp), in order of lr then w_sp."""
    found = {}
    for key in measured:
        head, _, rest = key.partition("/")
        if head == f"from{start_step}" and rest.count("/") == 1:
            name = rest.split("/")[0]
            lr, w = name.removeprefix("elr").split("-wsp")
            found[name] = (float(lr), float(w))
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def plot(s: Settings, measured: dict[str, Any], start_step: int) -> None:
    """Probe and CKNNA against stage-2 steps, one line per variant (step 0: the stage-1 export); and the
    frontier: PSNR against each semantic measure at the last stage-2 step, one line per encoder lr through
    its w_sp grid, beside the stage-1 export it started from."""
    base = measured.get(f"stage1/{start_step}", {}).get("value", {})
    kept = doubling(s.stage2_steps, S2_FIRST)
    found = variants(measured, start_step)
    value = lambda name, k: measured.get(f"from{start_step}/{name}/{k}", {}).get("value")  # noqa: E731
    for metric in ("probe_balanced", "cknna"):
        series = {}
        for name, (lr, w) in found.items():
            points = [(0, base[metric])] if metric in base else []
            points += [(k, value(name, k)[metric]) for k in kept if value(name, k)]
            series[f"encoder lr {lr:g}, w_sp {w:g}"] = points
        path = ROOT / "docs" / "img" / f"stage2-{s.dataset}-from{start_step}-{metric}.png"
        plot_curves(
            series, path, title=f"{s.dataset}: {metric} in stage 2", xlabel="stage-2 step", ylabel=metric
        )
        frontier: dict[str, list[tuple[float, float]]] = {}
        for name, (lr, _) in found.items():
            if value(name, s.stage2_steps):
                frontier.setdefault(f"stage 2, encoder lr {lr:g} (w_sp grid)", []).append(
                    (value(name, s.stage2_steps)[metric], value(name, s.stage2_steps)["psnr"])
                )
        if base:
            frontier[f"stage-1 export (step {start_step})"] = [(base[metric], base["psnr"])]
        path = ROOT / "docs" / "img" / f"stage2-{s.dataset}-from{start_step}-frontier-{metric}.png"
        title = f"{s.dataset}: reconstruction vs {metric} after {s.stage2_steps} stage-2 steps"
        plot_curves(frontier, path, title=title, xlabel=metric, ylabel="val PSNR (dB)")


if __name__ == "__main__":
    main()
