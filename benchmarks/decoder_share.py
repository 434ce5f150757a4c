"""How much of a study's gFID does the decoder set? Refine an AlignTok decoder longer, keep its latent space.

    python benchmarks/decoder_share.py --dataset fashion-mnist --budget full --stage3-steps 1000
                                       [--out runs/reproduce-fashion-mnist-full] [--tokenizer aligntok]

AlignTok's stage 3 trains only the decoder (encoder and adapter frozen), so a longer stage 3 leaves the
latent space, and every DiT a `reproduce.py` study trained on it, exactly as they were. This copies the
tokenizer's stages 1 and 2 from the study in `--out`, runs stage 3 for `--stage3-steps` instead of the
budget's, checks that the new export encodes exactly as the study's (every weight and buffer outside the
decoder equal), then measures with the refined decoder: PSNR, LPIPS and rFID, the reconstruction floor,
and the gFID of the study's DiT (seed 0, last checkpoint, with and without guidance) from the same DiT
export and the same sampling seeds, so that only the decoder differs. The study must have measured that
DiT. Work goes to `<out>/<tokenizer>-stage3-<steps>/` (resumable); the result to
benchmarks/results/decoder-share-<dataset>.json (one entry per stage-3 length), and a table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import reproduce as rep
from aligntok.config import apply_overrides
from aligntok.data.latents import same_latent_space
from aligntok.report import write_json
from aligntok.tokenizer_eval import tokenizer_metrics
from aligntok.train.tokenizer import train_tokenizer

THREE_STAGE = ("aligntok", "aligntok_wsp0")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(rep.BASES), required=True)
    parser.add_argument("--budget", choices=sorted(rep.BUDGETS), default="full")
    parser.add_argument("--out", default=None, help="the study's work directory (reproduce.py's --out)")
    parser.add_argument("--tokenizer", choices=THREE_STAGE, default="aligntok")
    parser.add_argument("--stage3-steps", type=int, required=True, help="stage 3's length in this run")
    parser.add_argument(
        "--json", default=None, help="default benchmarks/results/decoder-share-<dataset>.json"
    )
    args = parser.parse_args()
    budget = rep.BUDGETS[args.budget]
    budget = dataclasses.replace(budget, ref_num=rep.reference_size(args.dataset, budget))
    study = Path(args.out or f"runs/reproduce-{args.dataset}-{args.budget}")
    try:
        baseline, entry = refine_decoder(study, args.tokenizer, args.dataset, budget, args.stage3_steps)
    except FileNotFoundError as e:
        parser.error(str(e))
    json_path = Path(args.json or rep.ROOT / "benchmarks" / "results" / f"decoder-share-{args.dataset}.json")
    result: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if result.get("tokenizer") != args.tokenizer or result.get("budget") != args.budget:
        result = {"dataset": args.dataset, "budget": args.budget, "tokenizer": args.tokenizer, "runs": {}}
    result["fid_floor"] = json.loads((study / "fid_floor.json").read_text())["fid"]
    result["runs"][str(baseline["stage3_steps"])] = baseline
    result["runs"][str(entry["stage3_steps"])] = entry
    write_json(result, json_path)
    print(markdown(result))
    print(f"written: {json_path}")


def refine_decoder(
    study: Path, name: str, dataset: str, budget: rep.Budget, steps: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The study's `name` (its measurements read back) and the same tokenizer with stage 3 `steps` long
    (trained and measured in `<study>/<name>-stage3-<steps>/`, resumable). FileNotFoundError when the study
    has not measured `name`'s seed-0 DiT at the last checkpoint yet."""
    source = study / name / "tokenizer"
    last = budget.checkpoints[-1]
    dit = study / name / "dit-seed0" / "exports" / f"step-{last:07d}"
    scales = (budget.cfg, 1.0)
    measured = {w: rep.checkpoint_samples(study / name, 0, last, w) / "fid.json" for w in scales}
    missing = [p for p in [source / "export", dit, *measured.values()] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the study in {study} has not measured {name} yet: no {missing[0]}")
    t0 = time.time()
    run = study / f"{name}-stage3-{steps}"
    for stage in ("stage-1", "stage-2"):  # the latent space: the study's, untouched
        if not (run / "tokenizer" / stage).exists():
            shutil.copytree(source / stage, run / "tokenizer" / stage)
    cfg = apply_overrides(rep.tokenizer_recipe(name, dataset, budget), [f"stages.2.steps={steps}"])
    tok = train_tokenizer(cfg, out=run / "tokenizer", resume=True)
    if not same_latent_space(source / "export", tok):
        raise RuntimeError(
            f"{tok} does not encode as {source / 'export'}: its stages 1-2 are not the study's"
        )
    metrics = tokenizer_metrics(tok, dataset, num=budget.eval_num, bf16=True, out=run / "tokenizer_eval.json")
    gfid = {
        f"{w:g}": rep.study_gfid(
            dit, rep.checkpoint_samples(run, 0, last, w), dataset, budget, cfg=w, tokenizer_dir=tok
        )
        for w in scales
    }
    entry = {
        "stage3_steps": steps,
        "decoder_steps": sum(s.steps for s in cfg.stages),  # the decoder trains in all three stages
        "psnr": metrics["psnr"],
        "lpips": metrics["lpips"],
        "rfid": metrics["rfid"],
        "recon_floor": rep.reconstruction_floor(run, dataset, budget)["fid"],
        "gfid": gfid,
        "dit": str(dit.resolve()),
        "wall_s_this_call": round(time.time() - t0, 1),
    }
    before = json.loads((study / name / "tokenizer_eval.json").read_text())
    baseline = {
        "stage3_steps": budget.stage_steps[2],
        "decoder_steps": sum(budget.stage_steps),
        "psnr": before["psnr"],
        "lpips": before["lpips"],
        "rfid": before["rfid"],
        "recon_floor": rep.reconstruction_floor(study / name, dataset, budget)["fid"],
        "gfid": {f"{w:g}": json.loads(p.read_text())["fid"] for w, p in measured.items()},
    }
    return baseline, entry


def markdown(result: dict[str, Any]) -> str:
    """One row per stage-3 length: reconstruction, the reconstruction floor, and the DiT's gFID."""
    runs = sorted(result["runs"].values(), key=lambda r: r["stage3_steps"])
    scales = list(runs[0]["gfid"])
    head = ["stage 3 steps", "decoder steps", "PSNR", "LPIPS", "rFID", "recon floor"]
    head += [f"gFID, guidance {w}" for w in scales]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [str(r["stage3_steps"]), str(r["decoder_steps"]), f"{r['psnr']:.2f}", f"{r['lpips']:.3f}"]
        cells += [f"{r['rfid']:.1f}", f"{r['recon_floor']:.1f}"] + [f"{r['gfid'][w]:.1f}" for w in scales]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nreal-vs-real floor {result['fid_floor']:.1f}"


if __name__ == "__main__":
    main()
