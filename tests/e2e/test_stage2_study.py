"""benchmarks/stage2_study.py and stage2_dit.py: the stage-2 study's bookkeeping on debug models, a tiny
image folder and a stand-in Inception (the real runs are in docs/results.md)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from safetensors.torch import load_file

from aligntok.data.latents import same_latent_space
from aligntok.recipes.tokenizer import VAVAE_VF_WEIGHT
from aligntok.train.common import read_log
from conftest import load_benchmark, make_image_folder

rep = load_benchmark("reproduce")
st2 = load_benchmark("stage2_study")
load_benchmark("decoder_share")
s2d = load_benchmark("stage2_dit")


def _log(values: list[float]) -> list[dict[str, float]]:
    return [{"step": 100 * (i + 1), "val_psnr": v} for i, v in enumerate(values)]


def test_plateau_is_where_the_rest_of_the_run_gains_less_than_the_margin() -> None:
    kept = (300, 600, 1200)
    # Flat from step 200 but for +-0.3 dB of log-to-log noise: the best later log is always 0.6 dB up,
    # the windowed mean is not.
    noisy_flat = _log([10.0] + [16.3, 15.7] * 5 + [16.3])
    assert st2.plateau(noisy_flat, kept) == (600, True)
    rising = _log([10.0 + 0.5 * i for i in range(12)])
    assert st2.plateau(rising, kept) == (1200, False)  # no plateau seen: the last export, flagged


def test_every_variant_gets_the_same_refinement_and_the_ranking_holds_both_measures(
    tmp_path, stub_inception, monkeypatch
) -> None:
    data = str(make_image_folder(tmp_path / "shapes", per_class=20))
    s = st2.Settings(data, 4, 4, (), (), "l2_norm", eval_num=16, base="debug")
    refine, budget = s2d.Refine(steps=3, lr=1e-4, ema_decay=0.5), rep.BUDGETS["debug"]
    ledger = rep.Ledger({}, save=lambda: None, commit=None)
    names = ["elr0.0001-wsp0", "stage1", "vavae"]
    for name in names:
        s2d.study_variant(name, s, refine, budget, 1, tmp_path / "out", ledger)
    work = s2d.work_dir(s, tmp_path / "out", refine)
    for name in names:
        tok = work / name / "tokenizer"
        cfg = json.loads((tok / "config.json").read_text())
        last = cfg["stages"][-1]
        assert (last["train"], last["steps"], last["lr"], last["ema_decay"]) == (["decoder"], 3, 1e-4, 0.5)
        # The refinement moved the decoder only.
        source = tok / f"stage-{cfg['stages'][-2]['name']}" / "export"
        before, after = (load_file(p / "model.safetensors") for p in (source, tok / "export"))
        assert same_latent_space(source, tok / "export", statistics=False)
        assert any(not before[k].equal(after[k]) for k in before if k.startswith("decoder."))
    # Equal steps: stage 1 alone and the baselines train as long as stage 1 + stage 2.
    alone = st2.stage1_dir(dataclasses.replace(s, stage1_steps=8), tmp_path / "out")
    assert read_log(alone / "stage-1" / "log.jsonl")[-1]["step"] == 8
    vavae = json.loads((tmp_path / "out" / "vavae-8" / "config.json").read_text())["stages"][0]
    assert (vavae["steps"], vavae["vf_weight_mode"]) == (8, "adaptive")
    assert vavae["vf_weight"] == VAVAE_VF_WEIGHT

    rows = s2d.ranking(names, ledger, budget)
    assert [r["tokenizer"] for r in rows] == names
    # Stage 3's check: the stage-2 variant's seed-0 samples also went through the decoder stage 2 left.
    assert [r["gfid_unrefined"] is not None for r in rows] == [True, False, False]
    refined, unrefined = (
        load_file(work / names[0] / d / "model.safetensors") for d in ("tokenizer/export", "unrefined")
    )
    stage2 = load_file(
        tmp_path / "out" / "from4-elr0.0001-wsp0-4" / "stage-2" / "export" / "model.safetensors"
    )
    assert unrefined.keys() == refined.keys()
    for k in unrefined:
        assert unrefined[k].equal(stage2[k] if k.startswith("decoder.") else refined[k])
    for measure in ("gfid", "dit_share"):
        assert sorted(r[f"rank_{measure}"] for r in rows) == [1, 2, 3]
        best = min(rows, key=lambda r: r[measure])
        assert best[f"rank_{measure}"] == 1
    for r in rows:
        assert r["dit_share"] == pytest.approx(math.sqrt(r["gfid"]) - math.sqrt(r["recon_floor"]))
        assert r["gfid_seeds"] == [ledger.get(s2d.gfid_key(r["tokenizer"], 0, budget.cfg))]
    table = s2d.markdown(rows, budget).splitlines()
    assert [line.split(" | ")[0].strip("| ") for line in table[2:5]] == [
        r["tokenizer"] for r in sorted(rows, key=lambda r: r["gfid"])
    ]

    # Measured already: a rerun trains nothing.
    monkeypatch.setattr(s2d, "source", lambda *a: pytest.fail("retrained a measured tokenizer"))
    s2d.study_variant("stage1", s, refine, budget, 1, tmp_path / "out", ledger)
    assert json.dumps(ledger.measured)  # the record stays serialisable
