"""How much of a study's gFID does the decoder set? Train a tokenizer's decoder longer, keep its latent space.

    python benchmarks/decoder_share.py --dataset fashion-mnist --budget full --decoder-steps 2000
                                       [--out runs/reproduce-fashion-mnist-full] [--tokenizer aligntok]
                                       [--gan-weight 0]

Training only the decoder (encoder and adapter frozen) leaves the latent space, and every DiT a
`reproduce.py` study trained on it, exactly as they were. This copies the tokenizer's stages from the
study in `--out` and lets its decoder train for `--decoder-steps` steps in all (the study's budget gives
every decoder the same 1,200 at `full`): a recipe whose last stage trains only the decoder (AlignTok's
stage 3) gets that stage lengthened; any other (the one-stage baselines) gets a decoder-only stage
appended, set as AlignTok's stage 3 is (the recipe's lr and GAN weight, any GAN from its first step). The
study must come from the same recipes (the same commit of aligntok). `--gan-weight` sets the base weight
of the GAN term in that decoder-only stage (0: no GAN; default: the recipe's). It checks that
the new export encodes exactly as the study's (every weight and buffer outside the decoder equal), then
measures with the refined decoder: PSNR, LPIPS and rFID, the reconstruction floor, and the gFID of the
study's DiT (seed 0, last checkpoint, with and without guidance) from the same DiT export and the same
sampling seeds, so that only the decoder differs. The study must have measured that DiT. Work goes to
`<out>/<tokenizer>-decoder-<steps>[-gan<w>]/` (resumable); the result to
benchmarks/results/decoder-share-<dataset>.json (per tokenizer, one entry per decoder length and GAN
weight), and a table is printed.
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
from aligntok.data.latents import same_latent_space
from aligntok.files import write_json
from aligntok.tokenizer_eval import tokenizer_metrics
from aligntok.train.tokenizer import stage_dir, train_tokenizer
from aligntok.train.tokenizer_config import StageConfig, TokenizerTrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(rep.BASES), required=True)
    parser.add_argument("--budget", choices=sorted(rep.BUDGETS), default="full")
    parser.add_argument("--out", default=None, help="the study's work directory (reproduce.py's --out)")
    parser.add_argument("--tokenizer", choices=list(rep.TOKENIZERS), default="aligntok")
    parser.add_argument(
        "--decoder-steps", type=int, required=True, help="the decoder's training steps in all, stages summed"
    )
    parser.add_argument(
        "--gan-weight", type=float, default=None, help="the decoder-only stage's GAN weight (default: recipe)"
    )
    parser.add_argument(
        "--json", default=None, help="default benchmarks/results/decoder-share-<dataset>.json"
    )
    args = parser.parse_args()
    budget = rep.BUDGETS[args.budget]
    budget = dataclasses.replace(budget, ref_num=rep.reference_size(args.dataset, budget))
    study = Path(args.out or f"runs/reproduce-{args.dataset}-{args.budget}")
    try:  # too few steps: refused before any work
        recipe = rep.tokenizer_recipe(args.tokenizer, args.dataset, budget)
        longer_decoder(recipe, args.decoder_steps, gan_weight=args.gan_weight)
    except ValueError as e:
        parser.error(str(e))
    try:
        baseline, entry = refine_decoder(
            study, args.tokenizer, args.dataset, budget, args.decoder_steps, gan_weight=args.gan_weight
        )
    except FileNotFoundError as e:  # the study has not measured this tokenizer's DiT yet
        parser.error(str(e))
    json_path = Path(args.json or rep.ROOT / "benchmarks" / "results" / f"decoder-share-{args.dataset}.json")
    result: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if result.get("budget") != args.budget or "tokenizers" not in result:
        result = {"dataset": args.dataset, "budget": args.budget, "tokenizers": {}}
    result["fid_floor"] = json.loads((study / "fid_floor.json").read_text())["fid"]
    runs = result["tokenizers"].setdefault(args.tokenizer, {})
    runs[run_key(baseline["decoder_steps"], None)] = baseline
    runs[run_key(args.decoder_steps, args.gan_weight)] = entry
    write_json(result, json_path)
    print(markdown(result))
    print(f"written: {json_path}")


def run_key(decoder_steps: int, gan_weight: float | None) -> str:
    """A refinement's name: its run directory's suffix and its key in the JSON."""
    return f"{decoder_steps}" if gan_weight is None else f"{decoder_steps}-gan{gan_weight:g}"


def longer_decoder(
    cfg: TokenizerTrainConfig, decoder_steps: int, *, gan_weight: float | None = None, **settings: Any
) -> TokenizerTrainConfig:
    """`cfg` with its decoder trained `decoder_steps` steps in all, the extra ones with nothing else
    training: the last stage lengthened if it trains only the decoder, else a decoder-only stage appended
    (the last stage's lr and GAN weight; pass AlignTok stage 3's own lr and EMA in `settings` to match it);
    that stage's GAN weight `gan_weight` if given, and any other StageConfig `settings` (e.g. lr,
    ema_decay). ValueError unless that adds steps."""
    now = decoder_training_steps(cfg)
    if decoder_steps <= now:
        raise ValueError(f"--decoder-steps {decoder_steps} adds nothing: the recipe's decoder trains {now}")
    extra = decoder_steps - now
    last = cfg.stages[-1]
    if last.train == ("decoder",):
        refined = dataclasses.replace(last, steps=last.steps + extra)
        stages = cfg.stages[:-1]
    else:
        refined = StageConfig(
            name="decoder", steps=extra, train=("decoder",), lr=last.lr, gan_weight=last.gan_weight
        )
        stages = cfg.stages
    if gan_weight is not None:
        settings["gan_weight"] = gan_weight
    refined = dataclasses.replace(refined, **settings)
    return dataclasses.replace(cfg, stages=(*stages, refined))


def refine_decoder(
    study: Path,
    name: str,
    dataset: str,
    budget: rep.Budget,
    decoder_steps: int,
    *,
    gan_weight: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The study's `name` (its measurements read back) and the same tokenizer with its decoder trained
    `decoder_steps` steps (in `<study>/<name>-decoder-<run_key>/`, resumable; see `longer_decoder`).
    FileNotFoundError when the study has not measured `name`'s seed-0 DiT at the last checkpoint yet."""
    study_cfg = rep.tokenizer_recipe(name, dataset, budget)
    cfg = longer_decoder(study_cfg, decoder_steps, gan_weight=gan_weight)
    source = study / name / "tokenizer"
    last = budget.checkpoints[-1]
    dit = rep.checkpoint_dit(study / name, 0, last)
    scales = (budget.cfg, 1.0)
    measured = {w: rep.checkpoint_samples(study / name, 0, last, w) / "fid.json" for w in scales}
    missing = [p for p in [source / "export", dit, *measured.values()] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the study in {study} has not measured {name} yet: no {missing[0]}")
    t0 = time.time()
    run = study / f"{name}-decoder-{run_key(decoder_steps, gan_weight)}"
    for s in cfg.stages:  # the stages that set the latent space: the study's, untouched
        if s in study_cfg.stages and not stage_dir(run / "tokenizer", s).exists():
            shutil.copytree(stage_dir(source, s), stage_dir(run / "tokenizer", s))
    tok = train_tokenizer(cfg, out=run / "tokenizer", resume=True)
    if not same_latent_space(source / "export", tok):
        raise RuntimeError(
            f"{tok} does not encode as {source / 'export'}: the stages it copied are not the study's"
        )
    metrics = tokenizer_metrics(tok, dataset, num=budget.eval_num, bf16=True, out=run / "tokenizer_eval.json")
    gfid = {
        f"{w:g}": rep.study_gfid(
            dit, rep.checkpoint_samples(run, 0, last, w), dataset, budget, cfg=w, tokenizer_dir=tok
        )
        for w in scales
    }
    entry = {
        "decoder_steps": decoder_steps,
        "decoder_only_steps": _decoder_only(cfg),
        "decoder_only_gan_weight": _decoder_only_gan_weight(cfg),
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
        "decoder_steps": decoder_training_steps(study_cfg),
        "decoder_only_steps": _decoder_only(study_cfg),
        "decoder_only_gan_weight": _decoder_only_gan_weight(study_cfg),
        "psnr": before["psnr"],
        "lpips": before["lpips"],
        "rfid": before["rfid"],
        "recon_floor": rep.reconstruction_floor(study / name, dataset, budget)["fid"],
        "gfid": {f"{w:g}": json.loads(p.read_text())["fid"] for w, p in measured.items()},
    }
    return baseline, entry


def decoder_training_steps(cfg: TokenizerTrainConfig) -> int:
    return sum(s.steps for s in cfg.stages if "decoder" in s.train)


def _decoder_only(cfg: TokenizerTrainConfig) -> int:
    return sum(s.steps for s in cfg.stages if s.train == ("decoder",))


def _decoder_only_gan_weight(cfg: TokenizerTrainConfig) -> float | None:
    """The GAN weight of the recipe's closing decoder-only stage; None if it has none."""
    last = cfg.stages[-1]
    return last.gan_weight if last.train == ("decoder",) else None


def markdown(result: dict[str, Any]) -> str:
    """One row per tokenizer and refinement: reconstruction, the reconstruction floor, the DiT's gFID."""
    tokenizers = result["tokenizers"]
    scales = list(dict.fromkeys(w for runs in tokenizers.values() for r in runs.values() for w in r["gfid"]))
    head = ["tokenizer", "decoder steps (decoder only)", "GAN weight (decoder only)", "PSNR", "LPIPS", "rFID"]
    head += ["recon floor"] + [f"gFID, guidance {w}" for w in scales]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in tokenizers.items():
        for _, r in sorted(runs.items(), key=lambda kv: (kv[1]["decoder_steps"], kv[0])):
            gan = "-" if r["decoder_only_gan_weight"] is None else f"{r['decoder_only_gan_weight']:g}"
            cells = [name, f"{r['decoder_steps']} ({r['decoder_only_steps']})", gan]
            cells += [f"{r['psnr']:.2f}", f"{r['lpips']:.3f}", f"{r['rfid']:.1f}", f"{r['recon_floor']:.1f}"]
            cells += [f"{r['gfid'][w]:.1f}" if w in r["gfid"] else "-" for w in scales]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nreal-vs-real floor {result['fid_floor']:.1f}"


if __name__ == "__main__":
    main()
