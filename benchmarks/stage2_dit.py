"""Stage 2's DiT half: once every decoder has had the same refinement, which latent does a DiT learn best?

    python benchmarks/stage2_dit.py --dataset emoji [--stage1-steps 2400] [--stage2-steps 800]
        [--variants elr0.0002-wsp0,elr0.0002-wsp0.01,elr0.0002-wsp1,stage1,vae,vavae] [--seeds 1]
        [--refine-steps 1600] [--refine-lr 2e-4] [--refine-ema 0.99] [--budget full]
        [--dit-steps 1200] [--num-samples 1000]
        [--sp-kind l2_norm] [--out runs/stage2-<dataset>] [--json PATH] [--fresh]

The tokenizers, in work shared with benchmarks/stage2_study.py (whose `--stage1-steps`, `--stage2-steps` and
`--sp-kind` these are; its plateau criterion picks the stage-1 export at step P that stage 2 starts from):
- `elr<lr>-wsp<w>`: stage 2 at that encoder lr and w_sp for `--stage2-steps` steps from the stage-1 export
  at P, as stage2_study.py trains it (trained here if it has not been);
- `stage1`: stage 1 alone for P + `--stage2-steps` steps, the same stage-1 length plus the same extra steps
  (the shared stage-1 run lengthened, where P is its last step: its constant lr makes that the same run);
- `vae`, `vavae`: the one-stage baselines of the same base recipe, also for P + `--stage2-steps` steps;
  `vavae` with VA-VAE's adaptive VF weight (the recipe's: `VAVAE_VF_WEIGHT` times the gradient-norm
  ratio at the adapter's last layer).

Every one then gets the same decoder-only refinement, stage 3 as this study proposes it: `--refine-steps`
steps at `--refine-lr`, exporting an EMA of decay `--refine-ema`; its latent space is checked unchanged. So
the decoders, which set each tokenizer's reconstruction floor, have all trained as long as they usefully can
on a fixed latent, and do not decide the ranking. Measured per tokenizer: `tokenizer eval`'s PSNR, LPIPS,
rFID, probe and CKNNA; the reconstruction floor (reproduce.py's: the gFID of real latents, decoded); and
per DiT seed, reproduce.py's class-conditional DiT recipe at `--budget` trained on its latents, with the
gFID at its last checkpoint with guidance and without. For the stage-2 variants, stage 3's claim that the
refinement leaves generation unchanged: DiT seed 0's guided samples (the same latents) decoded also by the
decoder stage 2 left, so that only the refinement differs. `--dit-steps` and `--num-samples` shorten the
budget's DiT and gFID (half the `full` study's by default: six tokenizers at its 2,400 steps and 2,000
samples would take about 8 hours of one core; a ranking needs only that all share one budget). The ranking
orders the tokenizers by end-to-end gFID and by the DiT's share above its decoder floor, sqrt(gFID) -
sqrt(floor). `--seeds N` trains seeds 0..N-1 of the `--variants` named: add a seed where gaps are close by
rerunning with just those.

Record: benchmarks/results/stage2-dit-<dataset>.json, reproduce.py's ledger (every number lands when it is
measured, with its commit, date and wall time; a rerun measures only what is missing), bound to a
fingerprint of the settings; the ranking is printed and kept under "table".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import reproduce as rep
import stage2_study as st2
from aligntok import assets
from aligntok.config import apply_overrides, to_dict
from aligntok.data.latents import build_cache, same_latent_space
from aligntok.files import write_json
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.tokenizer import tokenizer_train_recipe
from aligntok.tokenizer_eval import tokenizer_metrics
from aligntok.train.dit import train_dit
from aligntok.train.tokenizer import stage_dir, train_tokenizer
from aligntok.train.tokenizer_config import TokenizerTrainConfig
from decoder_share import decoder_training_steps, longer_decoder

BASELINES = ("stage1", "vae", "vavae")


@dataclasses.dataclass(frozen=True)
class Refine:
    """The decoder-only refinement every tokenizer gets before its DiT."""

    steps: int
    lr: float
    ema_decay: float


def baseline_recipe(name: str, s: st2.Settings, steps: int) -> TokenizerTrainConfig:
    """`vae` or `vavae` of the study's base recipe, one stage of `steps` (vavae with VA-VAE's adaptive VF
    weight, as the recipe has it)."""
    sets = [f"data={s.dataset}", f"stages.0.steps={steps}"]
    return apply_overrides(tokenizer_train_recipe(f"{s.base or rep.BASES[s.dataset]}-{name}"), sets)


def source(name: str, s: st2.Settings, out: Path) -> tuple[TokenizerTrainConfig, Path]:
    """`name`'s tokenizer before the refinement: its recipe (the stages it trained) and run directory,
    trained first where missing."""
    start, step, _ = st2.stage1(s, out)
    if name.startswith("elr"):
        lr, w = (float(x) for x in name.removeprefix("elr").split("-wsp"))
        cfg, run = st2.stage2(s, out, start, step, lr, w)
        return dataclasses.replace(cfg, stages=cfg.stages[:2]), run
    steps = step + s.stage2_steps
    if name == "stage1":
        alone = dataclasses.replace(s, stage1_steps=steps)
        cfg, run = st2.recipe(alone), st2.stage1_dir(alone, out)
        if step == s.stage1_steps and not run.exists():
            # Under stage 1's constant lr, the shared run's P steps are this run's first P: lengthen a copy.
            shutil.copytree(st2.stage1_dir(s, out), run)
        train_tokenizer(cfg, out=run, stage="1", resume=True)
        return dataclasses.replace(cfg, stages=cfg.stages[:1]), run
    if name in ("vae", "vavae"):
        cfg, run = baseline_recipe(name, s, steps), out / f"{name}-{steps}"
        train_tokenizer(cfg, out=run, resume=True)
        return cfg, run
    raise ValueError(f"unknown variant {name!r}: use elr<lr>-wsp<w> or one of {BASELINES}")


def refined(cfg: TokenizerTrainConfig, source_run: Path, out: Path, refine: Refine) -> Path:
    """The tokenizer of `cfg` (trained in `source_run`) with the decoder-only refinement, trained into `out`
    (its stages copied in); its export, checked to encode exactly as the source's last stage does."""
    plus = longer_decoder(
        cfg, decoder_training_steps(cfg) + refine.steps, lr=refine.lr, ema_decay=refine.ema_decay
    )
    for stage in cfg.stages:
        if not stage_dir(out, stage).exists():
            shutil.copytree(stage_dir(source_run, stage), stage_dir(out, stage))
    tok = train_tokenizer(plus, out=out, resume=True)
    before = stage_dir(source_run, cfg.stages[-1]) / "export"
    if not same_latent_space(before, tok, statistics=False):
        raise RuntimeError(f"{tok} does not encode as {before}: the refinement moved the latent space")
    return tok


def gfid_key(name: str, seed: int, cfg: float) -> str:
    return f"{name}/seed{seed}/cfg{cfg:g}"


def unrefined_decoder(tok: Path, stage_export: Path, out: Path) -> Path:
    """The refined export `tok` with the decoder of `stage_export` (the one stage 2 left): the same latent
    space and latent statistics, the decoder before the refinement. Written once to `out`."""
    if not (out / "config.json").is_file():
        refined_tok = Tokenizer.from_pretrained(tok)
        refined_tok.decoder.load_state_dict(Tokenizer.from_pretrained(stage_export).decoder.state_dict())
        with assets.atomic_dir(out) as tmp:
            refined_tok.save_pretrained(tmp)
    return out


def unrefined_key(name: str, cfg: float) -> str:
    """The gFID of DiT seed 0's samples decoded by `name`'s stage-2 decoder, before the refinement."""
    return f"{name}/seed0/cfg{cfg:g}/unrefined-decoder"


GFID_KEY = re.compile(r"(?P<name>.+)/seed(?P<seed>\d+)/cfg(?P<cfg>[^/]+)")  # gfid_key's keys


def measured_seeds(ledger: rep.Ledger, name: str, cfg: float) -> list[int]:
    """The DiT seeds of tokenizer `name` whose gFID at guidance `cfg` `ledger` holds (`gfid_key` inverted)."""
    found = (GFID_KEY.fullmatch(k) for k in ledger.measured)
    return sorted(int(m["seed"]) for m in found if m and m["name"] == name and m["cfg"] == f"{cfg:g}")


def study_variant(
    name: str, s: st2.Settings, refine: Refine, budget: rep.Budget, seeds: int, out: Path, ledger: rep.Ledger
) -> None:
    """Measure what `ledger` lacks of `name`, training its tokenizer and DiT seeds only if something is."""
    run = work_dir(s, out, refine) / name
    last, scales = budget.checkpoints[-1], (budget.cfg, 1.0)
    keys = [f"{name}/metrics", f"{name}/recon_floor"]
    keys += [gfid_key(name, seed, w) for seed in range(seeds) for w in scales]
    if name.startswith("elr"):
        keys.append(unrefined_key(name, budget.cfg))
    if all(map(ledger.has, keys)):
        return
    cfg, source_run = source(name, s, out)
    tok = refined(cfg, source_run, run / "tokenizer", refine)

    def metrics() -> dict[str, float]:
        m = tokenizer_metrics(tok, s.dataset, num=s.eval_num, bf16=True, out=run / "tokenizer_eval.json")
        return {k: m[k] for k in (*st2.METRICS, "cknna_centered_mask")}

    ledger.value(f"{name}/metrics", metrics)
    ledger.value(f"{name}/recon_floor", lambda: rep.reconstruction_floor(run, s.dataset, budget)["fid"])
    cache = None
    for seed in range(seeds):
        todo = [w for w in scales if not ledger.has(gfid_key(name, seed, w))]
        if not todo:
            continue
        if cache is None:
            cache = build_cache(
                tokenizer_dir=tok, data=s.dataset, out=run / "latents", flip=budget.flip, bf16=True
            )
        train_dit(rep.dit_recipe(budget, seed), latents=cache, out=rep.dit_run(run, seed), resume=True)
        export = rep.checkpoint_dit(run, seed, last)
        for w in todo:
            samples = rep.checkpoint_samples(run, seed, last, w)
            fid = ledger.value(
                gfid_key(name, seed, w),
                functools.partial(rep.study_gfid, export, samples, s.dataset, budget, cfg=w),
            )
            print(f"{name}, DiT seed {seed}, guidance {w:g}: gFID {fid:.2f}", flush=True)
    if name.startswith("elr") and not ledger.has(unrefined_key(name, budget.cfg)):
        # Stage 3's "generation unchanged": seed 0's samples (the same DiT, latents and sampling seeds)
        # through the decoder stage 2 left, so that only the refinement differs.
        unrefined = unrefined_decoder(
            tok, stage_dir(source_run, cfg.stages[-1]) / "export", run / "unrefined"
        )
        samples = rep.checkpoint_samples(run, 0, last, budget.cfg).with_name(
            f"cfg{budget.cfg:g}-unrefined-decoder"
        )
        study = functools.partial(
            rep.study_gfid, rep.checkpoint_dit(run, 0, last), samples, s.dataset, budget
        )
        fid = ledger.value(
            unrefined_key(name, budget.cfg), lambda: study(cfg=budget.cfg, tokenizer_dir=unrefined)
        )
        print(f"{name}, DiT seed 0, guidance {budget.cfg:g}, stage 2's decoder: gFID {fid:.2f}", flush=True)


def work_dir(s: st2.Settings, out: Path, refine: Refine) -> Path:
    """Where the refined tokenizers and their DiTs live: one directory per stage lengths and refinement."""
    return out / f"dit-s1_{s.stage1_steps}-s2_{s.stage2_steps}-refine{refine.steps}"


def ranking(names: list[str], ledger: rep.Ledger, budget: rep.Budget) -> list[dict[str, Any]]:
    """One row per tokenizer with its metrics, floor and guided gFID measured: the gFIDs averaged over the
    DiT seeds measured, the DiT's share sqrt(gFID) - sqrt(floor), and the rank under both (1: best)."""
    rows = []
    for name in names:
        seeds = measured_seeds(ledger, name, budget.cfg)
        if not seeds or not ledger.has(f"{name}/metrics") or not ledger.has(f"{name}/recon_floor"):
            continue
        gfid = [ledger.get(gfid_key(name, k, budget.cfg)) for k in seeds]
        nocfg = [ledger.get(gfid_key(name, k, 1.0)) for k in seeds if ledger.has(gfid_key(name, k, 1.0))]
        floor = ledger.get(f"{name}/recon_floor")
        rows.append({
            "tokenizer": name,
            **ledger.get(f"{name}/metrics"),
            "recon_floor": floor,
            "gfid": float(np.mean(gfid)),
            "gfid_seeds": gfid,
            "gfid_nocfg": float(np.mean(nocfg)) if nocfg else None,
            "dit_share": math.sqrt(np.mean(gfid)) - math.sqrt(floor),
            "gfid_unrefined": ledger.measured.get(unrefined_key(name, budget.cfg), {}).get("value"),
        })  # fmt: skip
    for measure in ("gfid", "dit_share"):
        for rank, row in enumerate(sorted(rows, key=lambda r: r[measure]), start=1):
            row[f"rank_{measure}"] = rank
    return rows


def markdown(rows: list[dict[str, Any]], budget: rep.Budget) -> str:
    head = (
        "| tokenizer | PSNR | rFID | probe | CKNNA | floor | gFID (seeds) | gFID, no guidance | DiT share "
        "| seed 0, stage-2 decoder |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: r["gfid"]):
        seeds = ", ".join(f"{g:.1f}" for g in r["gfid_seeds"])
        nocfg = _fmt(r["gfid_nocfg"])
        lines.append(
            f"| {r['tokenizer']} | {r['psnr']:.2f} | {r['rfid']:.1f} | {r['probe_balanced']:.1%} | "
            f"{r['cknna']:.3f} | {r['recon_floor']:.1f} | {r['gfid']:.1f} ({seeds}) | {nocfg} | "
            f"{r['dit_share']:.2f} (#{r['rank_dit_share']}) | {_fmt(r['gfid_unrefined'])} |"
        )
    return (
        "\n".join(lines)
        + f"\n\ngFID with guidance {budget.cfg:g}; rows by gFID; #: rank by the DiT's share; "
        "the last column: DiT seed 0's same samples through the decoder before the refinement."
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fingerprint(s: st2.Settings, refine: Refine, budget: rep.Budget) -> str:
    """What the numbers depend on besides their keys: the stage-2 study's recipe and both stages' lengths,
    the refinement, the DiT budget and the baselines' recipes."""
    what = [
        st2.fingerprint(s),
        s.stage1_steps,
        s.stage2_steps,
        dataclasses.asdict(refine),
        dataclasses.asdict(budget),
        {n: to_dict(baseline_recipe(n, s, 1)) for n in ("vae", "vavae")},
    ]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(rep.BASES), default="emoji")
    p.add_argument("--stage1-steps", type=int, default=2400)
    p.add_argument("--stage2-steps", type=int, default=800)
    p.add_argument("--sp-kind", default="l2_norm", choices=["l2", "l2_norm", "cosine"])
    p.add_argument("--variants", default="elr0.0002-wsp0,elr0.0002-wsp0.01,elr0.0002-wsp1,stage1,vae,vavae")
    p.add_argument("--seeds", type=int, default=1, help="DiT seeds 0..N-1 for every variant named")
    p.add_argument("--refine-steps", type=int, default=1600)
    p.add_argument("--refine-lr", type=float, default=2e-4)
    p.add_argument("--refine-ema", type=float, default=0.99)
    p.add_argument("--budget", choices=sorted(rep.BUDGETS), default="full", help="reproduce.py's DiT budget")
    p.add_argument("--dit-steps", type=int, default=1200, help="0: the budget's")
    p.add_argument("--num-samples", type=int, default=1000, help="gFID and floor samples; 0: the budget's")
    p.add_argument("--base", default=None, help="tokenizer base recipe (default: the dataset's)")
    p.add_argument("--eval-num", type=int, default=870)
    p.add_argument("--out", default=None, help="work directory (default runs/stage2-<dataset>)")
    p.add_argument(
        "--json", default=None, help="record (default benchmarks/results/stage2-dit-<dataset>.json)"
    )
    p.add_argument("--fresh", action="store_true", help="start the record over")
    a = p.parse_args(argv)
    s = st2.Settings(
        dataset=a.dataset,
        stage1_steps=a.stage1_steps,
        stage2_steps=a.stage2_steps,
        encoder_lrs=(),
        sp_weights=(),
        sp_kind=a.sp_kind,
        eval_num=a.eval_num,
        base=a.base,
    )
    refine = Refine(a.refine_steps, a.refine_lr, a.refine_ema)
    base = rep.BUDGETS[a.budget]
    steps, num = a.dit_steps or base.dit_steps, a.num_samples or base.num_samples
    budget = dataclasses.replace(base, dit_steps=steps, checkpoints=(steps,), num_samples=num)
    budget = dataclasses.replace(budget, ref_num=rep.reference_size(a.dataset, budget))
    names = a.variants.split(",")
    out = Path(a.out or f"runs/stage2-{a.dataset}")
    json_path = Path(a.json or rep.ROOT / "benchmarks" / "results" / f"stage2-dit-{a.dataset}.json")
    record: dict[str, Any] = {
        "settings": {
            **dataclasses.asdict(s),
            "refine": dataclasses.asdict(refine),
            "budget": a.budget,
            "dit_steps": budget.dit_steps,
            "num_samples": budget.num_samples,
        },
        "fingerprint": fingerprint(s, refine, budget),
    }

    def save() -> None:
        measured = [k.removesuffix("/metrics") for k in ledger.measured if k.endswith("/metrics")]
        record["table"] = ranking(measured, ledger, budget)
        write_json({**record, "measured": ledger.measured}, json_path)

    ledger = rep.open_ledger(
        json_path, record["fingerprint"], fresh=a.fresh, save=lambda: save(), commit=rep.git_commit()
    )
    for name in names:
        study_variant(name, s, refine, budget, a.seeds, out, ledger)
    save()
    print(markdown(record["table"], budget))
    print(f"written: {json_path}")
    return record


if __name__ == "__main__":
    main()
