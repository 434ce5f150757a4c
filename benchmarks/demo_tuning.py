"""Where should the demo's minutes go? gFID and class adherence against the minutes the demo would spend.

    python benchmarks/demo_tuning.py [--preset quick] [--tokenizers 500/150/100,1000/150/100]
        [--dit-steps 700,1050,1400] [--guidance 1,5] [--out runs/demo-tuning] [--json PATH] [--fresh]

For each tokenizer schedule (stage 1 / 2 / 3 steps of the preset's recipe) this runs the demo's own steps,
timing each: the tokenizer, its metrics, the latent cache, and the DiT, kept at every `--dit-steps` count (its
constant lr makes the export at step n the n-step run's). For each (tokenizer, DiT steps, guidance) it draws
the preset's class-balanced samples and measures their gFID against the preset's reference and their class
adherence per class, and charges the minutes the demo would spend on them: the tokenizer, its metrics, the
cache, the DiT's first n steps (at the run's mean step time), that sample set, the floor and the ceiling,
plus the other sample set the demo always draws. A class is recognisable when its adherence reaches
demo_report.ADHERENCE_GOAL of its real-image ceiling. Run it with the machine to itself: the minutes are the
ones the demo would take on it. The ledger (reproduce.py's) keeps every number: a rerun measures only what
is missing. Default record: benchmarks/results/demo-tuning-<preset>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from aligntok.config import apply_overrides, to_dict
from aligntok.data.latents import build_cache
from aligntok.demo import PRESETS, DemoPreset, recipe_overrides
from aligntok.demo_report import recognisable
from aligntok.dit_eval import class_adherence, real_scores
from aligntok.evaluate import fid_floor, generation_fid
from aligntok.files import write_json
from aligntok.recipes.dit import dit_train_recipe
from aligntok.recipes.tokenizer import tokenizer_train_recipe
from aligntok.tokenizer_eval import tokenizer_metrics
from aligntok.train.dit import kept_export, train_dit
from aligntok.train.tokenizer import train_tokenizer
from reproduce import git_commit, open_ledger

ROOT = Path(__file__).resolve().parents[1]


def tokenizer_name(stage_steps: tuple[int, ...]) -> str:
    return "tok" + "-".join(map(str, stage_steps))


def study_tokenizer(
    p: DemoPreset, out: Path, ledger: Any, dit_steps: list[int], guidance: list[float]
) -> None:
    """Everything of one tokenizer schedule `p.stage_steps` that `ledger` lacks; each step's wall time is
    the ledger's record of how long measuring it took."""
    name = tokenizer_name(p.stage_steps)
    wanted = [f"{name}/dit{n}/cfg{w:g}" for n in dit_steps for w in guidance]
    if all(ledger.has(k) for k in wanted):
        return
    run = out / name
    p = dataclasses.replace(p, dit_steps=max(dit_steps))
    tok_set, dit_set = recipe_overrides(p)
    tok_cfg = apply_overrides(tokenizer_train_recipe(p.tokenizer_recipe), tok_set)
    keep = f"keep_checkpoints=[{','.join(map(str, sorted(dit_steps)))}]"
    dit_cfg = apply_overrides(dit_train_recipe(p.dit_recipe), [*dit_set, keep])
    tok = run / "tokenizer" / "export"
    ledger.value(
        f"{name}/tokenizer", lambda: str(train_tokenizer(tok_cfg, out=run / "tokenizer", resume=True))
    )
    metrics_kw = {"num": p.eval_num, "bf16": p.bf16, "out": run / "tokenizer.json"}
    ledger.value(f"{name}/metrics", lambda: tokenizer_metrics(tok, p.data, **metrics_kw))
    cache_kw = {"tokenizer_dir": tok, "data": p.data, "out": run / "latents", "flip": True, "bf16": p.bf16}
    ledger.value(f"{name}/cache", lambda: str(build_cache(**cache_kw)))
    dit_run = run / f"dit{p.dit_steps}"  # one DiT run per longest count, kept at every count
    train = lambda: train_dit(dit_cfg, latents=run / "latents", out=dit_run, resume=True)  # noqa: E731
    ledger.value(f"{name}/dit{p.dit_steps}", lambda: str(train()))
    resolution = tok_cfg.model.image_size
    for n in dit_steps:
        for w in guidance:
            where = run / "samples" / f"dit{n}-cfg{w:g}"

            def measure(n: int = n, w: float = w, where: Path = where) -> dict[str, Any]:
                kw = {"data": p.data, "num": p.num_samples, "ref_num": p.ref_num, "sample": p.sample(w)}
                fid = generation_fid(kept_export(dit_run, n), out=where, **kw)["fid"]
                return {"gfid": fid, **class_adherence(where / "samples.npz", p.data, resolution)}

            ledger.value(f"{name}/dit{n}/cfg{w:g}", measure)


def rows(
    ledger: Any, tokenizers: list[tuple[int, ...]], dit_steps: list[int], guidance: list[float]
) -> list[dict[str, Any]]:
    """One row per measured (tokenizer, DiT steps, guidance), with the demo's minutes to get there."""
    ceiling = ledger.get("fixed/ceiling")
    max_steps = max(dit_steps)
    out = []
    for stages in tokenizers:
        name = tokenizer_name(stages)
        if not ledger.has(f"{name}/dit{max_steps}"):
            continue
        before = (f"{name}/tokenizer", f"{name}/metrics", f"{name}/cache", "fixed/floor", "fixed/ceiling")
        base = sum(map(ledger.seconds, before))
        for n in dit_steps:
            sets = [w for w in guidance if ledger.has(f"{name}/dit{n}/cfg{w:g}")]
            for w in sets:
                r = ledger.get(f"{name}/dit{n}/cfg{w:g}")
                samples_s = ledger.seconds(f"{name}/dit{n}/cfg{w:g}")
                others = [ledger.seconds(f"{name}/dit{n}/cfg{v:g}") for v in sets if v != w]
                other = sum(others) / max(len(others), 1)
                seconds = base + ledger.seconds(f"{name}/dit{max_steps}") * n / max_steps + samples_s + other
                met = recognisable(r["category_per_class"], ceiling["category_per_class"])
                out.append({
                    "tokenizer": list(stages),
                    "dit_steps": n,
                    "guidance": w,
                    "minutes": seconds / 60,
                    "gfid": r["gfid"],
                    "floor": ledger.get("fixed/floor"),
                    "adherence_balanced": r["category_balanced"],
                    "recognisable": met,
                    "psnr": ledger.get(f"{name}/metrics")["psnr"],
                })  # fmt: skip
    return sorted(out, key=lambda r: r["minutes"])


def table(found: list[dict[str, Any]]) -> str:
    lines = [
        "| tokenizer steps | DiT steps | guidance | minutes | gFID | floor | PSNR | adherence (bal.) "
        "| recognisable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in found:
        lines.append(
            f"| {' / '.join(map(str, r['tokenizer']))} | {r['dit_steps']} | {r['guidance']:g} | "
            f"{r['minutes']:.1f} | {r['gfid']:.1f} | {r['floor']:.1f} | {r['psnr']:.2f} | "
            f"{100 * r['adherence_balanced']:.1f}% | {len(r['recognisable'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=[k for k, v in PRESETS.items() if not v.text])
    p.add_argument(
        "--tokenizers", default=None, help="stage steps a/b/c, comma-separated (default: the preset's)"
    )
    p.add_argument("--dit-steps", default=None, help="comma-separated (default: the preset's)")
    p.add_argument("--guidance", default=None, help="comma-separated scales (default: the preset's two)")
    p.add_argument("--out", default=None, help="default runs/demo-tuning-<preset>")
    p.add_argument("--json", default=None)
    p.add_argument("--fresh", action="store_true", help="discard the record's numbers")
    a = p.parse_args()
    preset = PRESETS[a.preset]
    tokenizers = (
        [tuple(map(int, t.split("/"))) for t in a.tokenizers.split(",")]
        if a.tokenizers
        else [preset.stage_steps]
    )
    dit_steps = sorted(map(int, a.dit_steps.split(","))) if a.dit_steps else [preset.dit_steps]
    guidance = [float(w) for w in a.guidance.split(",")] if a.guidance else list(preset.guidance.values())
    out = Path(a.out or f"runs/demo-tuning-{a.preset}")
    path = Path(a.json or ROOT / "benchmarks" / "results" / f"demo-tuning-{a.preset}.json")
    what = {
        "preset": dataclasses.asdict(preset),
        "tokenizer": to_dict(tokenizer_train_recipe(preset.tokenizer_recipe)),
        "dit": to_dict(dit_train_recipe(preset.dit_recipe)),
    }
    fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    record: dict[str, Any] = {"preset": a.preset, "fingerprint": fingerprint}

    def save() -> None:
        write_json({**record, "measured": ledger.measured}, path)

    ledger = open_ledger(path, record["fingerprint"], fresh=a.fresh, save=save, commit=git_commit())
    resolution = tokenizer_train_recipe(preset.tokenizer_recipe).model.image_size
    floor_kw = {
        "num": preset.num_samples,
        "resolution": resolution,
        "ref_num": preset.ref_num,
        "bf16": preset.bf16,
    }
    ledger.value("fixed/floor", lambda: fid_floor(preset.data, **floor_kw)["fid"])
    ledger.value("fixed/ceiling", lambda: real_scores(preset.data, resolution, text=False))
    for stages in tokenizers:
        study_tokenizer(dataclasses.replace(preset, stage_steps=stages), out, ledger, dit_steps, guidance)
    found = rows(ledger, tokenizers, dit_steps, guidance)
    record["rows"] = found
    save()
    print(table(found))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
