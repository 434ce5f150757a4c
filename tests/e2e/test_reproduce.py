"""benchmarks/reproduce.py, decoder_share.py and disc_probe.py: the studies' bookkeeping on debug models,
a tiny image folder and a stand-in Inception (the real runs are in docs/results.md)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from aligntok import dit_eval
from aligntok.assets import is_present
from aligntok.config import save_json
from aligntok.data.latents import same_latent_space
from aligntok.models.discriminator import DiscriminatorConfig
from aligntok.recipes.tokenizer import tokenizer_train_recipe
from conftest import load_benchmark, make_image_folder

ROOT = Path(__file__).resolve().parents[2]


rep = load_benchmark("reproduce")
share = load_benchmark("decoder_share")  # imports reproduce, found in sys.modules
probe = load_benchmark("disc_probe")


def test_steps_to_reach_interpolates_between_checkpoints() -> None:
    curve = {100: 200.0, 200: 150.0, 400: 100.0}
    assert rep.steps_to_reach(curve, 250.0) == 100.0  # reached at the first checkpoint
    assert rep.steps_to_reach(curve, 125.0) == pytest.approx(300.0)  # halfway from 150 to 100
    assert rep.steps_to_reach(curve, 150.0) == 200.0
    assert rep.steps_to_reach(curve, 99.0) is None


def test_reference_is_a_subset_only_when_the_split_is_larger(tmp_path) -> None:
    data = str(make_image_folder(tmp_path / "shapes", per_class=20))  # 40 training images
    budget = rep.BUDGETS["debug"]
    assert rep.reference_size(data, budget) == budget.ref_num < 40
    assert rep.reference_size(data, dataclasses.replace(budget, ref_num=40)) is None  # all: same cache key
    assert rep.reference_size(data, dataclasses.replace(budget, ref_num=None)) is None


def test_recipes_share_the_budget_and_blur_trains_less() -> None:
    budget = rep.BUDGETS["short"]
    total = sum(budget.stage_steps)
    steps = {
        name: [s.steps for s in rep.tokenizer_recipe(name, "emoji", budget).stages] for name in rep.TOKENIZERS
    }
    assert steps["aligntok"] == steps["aligntok_wsp0"] == list(budget.stage_steps)
    assert steps["aligntok_stage1"] == steps["vae"] == steps["vavae"] == [total]
    assert steps["vae_blur"] == [round(total * budget.blur_fraction)] and steps["vae_blur"][0] < total
    models = {name: rep.tokenizer_recipe(name, "emoji", budget).model for name in rep.TOKENIZERS}
    assert len({(m.latent_channels, m.image_size, str(m.decoder)) for m in models.values()}) == 1
    assert rep.tokenizer_recipe("vae", "fashion-mnist", budget).data == "fashion-mnist"


def test_markdown_tables_hold_every_tokenizer_checkpoint_seed_and_sweep() -> None:
    def tok(base: float, seeds: list[float], swept: bool = True) -> dict:
        t = {
            "psnr": 20.0, "lpips": 0.2, "rfid": 100.0, "probe": 0.5, "cknna": 0.9, "recon_floor": 40.0,
            "gfid": {"600": base + 10, "1200": sum(seeds) / len(seeds)},
            "gfid_nocfg": {"600": base + 20, "1200": base + 5},
            "gfid_seeds": {"600": [base + 10] * len(seeds), "1200": seeds},
            "cfg_sweep": {"1.5": base + 3, "3": seeds[0]},
            "sampling_steps_sweep": {"10": base + 9, "30": base + 5},
        }  # fmt: skip
        return t if swept else t | {"cfg_sweep": {}, "sampling_steps_sweep": {}}

    result = {
        "tokenizers": {
            "aligntok": tok(100, [101.0, 99.0]),
            "vae": tok(120, [120.0]),
            "vae_blur": tok(130, [130.0], swept=False),
        }
    }
    result["steps_to_target"] = {"aligntok": 450.0, "vae": 1200.0, "vae_blur": None}
    main, sweeps = rep.markdown(result).split("\n\n")
    rows = main.splitlines()
    assert rows[0].count("gFID@") == 4 and rows[0].endswith("steps to VAE |") and len(rows) == 5
    assert rows[2].startswith("| aligntok | 20.00 | 0.200 | 100.0 | 50.0% | 0.900 | 40.0 | 110.0 | 100.0 |")
    assert rows[2].endswith("| 120.0 | 105.0 | 450 |")
    assert rows[4].endswith("| 135.0 | - |")
    head, _, a, v, blur = sweeps.splitlines()
    assert head == (
        "| tokenizer | gFID@1200 per seed | guidance 1.5 | guidance 3 | 10 Euler steps, no CFG "
        "| 30 Euler steps, no CFG |"
    )
    assert a == "| aligntok | 101.0 / 99.0 | 103.0 | 101.0 | 109.0 | 105.0 |"
    assert v == "| vae | 120.0 | 123.0 | 120.0 | 129.0 | 125.0 |"
    assert blur == "| vae_blur | 130.0 | - | - | - | - |"  # outside SWEPT: no sweeps measured


@pytest.mark.slow
def test_study_reuses_stage1_and_reports_every_checkpoint(tmp_path, stub_inception) -> None:
    data = str(make_image_folder(tmp_path / "shapes", per_class=20))
    budget = rep.BUDGETS["debug"]
    out = tmp_path / "study"
    ledger = rep.Ledger({}, save=lambda: None, commit=None)
    first = rep.study_tokenizer("aligntok", data, budget, out, ledger)
    wsp0 = rep.study_tokenizer("aligntok_wsp0", data, budget, out, ledger)
    stage1 = [
        out / n / "tokenizer" / "stage-1" / "export" / "model.safetensors"
        for n in ("aligntok", "aligntok_wsp0")
    ]
    a, b = load_file(stage1[0]), load_file(stage1[1])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # one stage 1, two stage 2s
    # Each tokenizer's reconstruction floor: the floor's real images through that tokenizer.
    names = ("aligntok", "aligntok_wsp0")
    floors = {n: json.loads((out / n / "recon_floor.json").read_text()) for n in names}
    for n, floor in floors.items():
        assert floor["num"] == budget.num_samples and floor["tokenizer"].startswith(str((out / n).resolve()))
    assert first["recon_floor"] == floors["aligntok"]["fid"] != wsp0["recon_floor"] > 0
    for result in (first, wsp0):
        assert set(result["gfid"]) == set(result["gfid_nocfg"]) == {str(c) for c in budget.checkpoints}
        assert all(math.isfinite(v) for v in result["gfid"].values())
    # Only the paper's three-way comparison is swept.
    assert set(first["cfg_sweep"]) == {f"{w:g}" for w in budget.cfg_sweep}
    assert set(first["sampling_steps_sweep"]) == {str(s) for s in budget.steps_sweep}
    assert wsp0["cfg_sweep"] == wsp0["sampling_steps_sweep"] == {}
    # aligntok is trained with budget.seeds DiT seeds; the mean is what "gfid" reports.
    seeds = first["gfid_seeds"][str(budget.checkpoints[-1])]
    assert len(seeds) == budget.seeds and len(wsp0["gfid_seeds"][str(budget.checkpoints[-1])]) == 1
    assert first["gfid"][str(budget.checkpoints[-1])] == pytest.approx(sum(seeds) / len(seeds))
    # The sweeps reuse what the checkpoints measured (the same samples) instead of sampling again.
    assert first["cfg_sweep"][f"{budget.cfg:g}"] == seeds[0]
    assert (
        first["sampling_steps_sweep"][str(budget.sample_steps)]
        == first["gfid_nocfg_seeds"][str(budget.checkpoints[-1])][0]
    )
    # A rerun on a new record finds every piece in the work directory and returns the same numbers.
    again = rep.study_tokenizer("aligntok", data, budget, out, rep.Ledger({}, save=lambda: None, commit=None))
    assert again == first


def _filled_ledger(budget, gfids: dict[str, dict[int, float]]) -> object:
    """A ledger holding every number of the tokenizers in `gfids` ({name: {checkpoint: gFID}}, each piece
    of a checkpoint given that value)."""
    ledger = rep.Ledger({}, save=lambda: None, commit=None)
    for name, curve in gfids.items():
        ledger.value(
            f"{name}/metrics", lambda: {"rfid": 1.0, "psnr": 2.0, "lpips": 0.1, "probe": 0.5, "cknna": 0.9}
        )
        ledger.value(f"{name}/recon_floor", lambda: 3.0)
        for seed, todo in rep.study_pieces(name, budget).items():
            for step, cfg, euler in todo:
                ledger.value(rep.piece_key(name, seed, step, cfg, euler), lambda v=curve[step]: v)
    return ledger


def test_summary_marks_pending_work_and_targets_the_vae() -> None:
    budget = rep.BUDGETS["debug"]

    def summary(ledger) -> dict:
        return rep.summarize("emoji", "debug", budget, "fp", ledger, t0=0.0)

    ledger = _filled_ledger(budget, {"aligntok": {3: 50.0, 6: 30.0}})
    partial = summary(ledger)
    assert partial["complete"] is False and partial["pending"] == list(rep.TOKENIZERS)[1:]
    assert partial["target"] is None and partial["steps_to_target"] == {}
    assert partial["tokenizers"]["aligntok"]["gfid"] == {"3": 50.0, "6": 30.0}
    # One missing piece (the VAE's second DiT seed, last checkpoint, no guidance) keeps the VAE pending.
    ledger = _filled_ledger(budget, {"aligntok": {3: 50.0, 6: 30.0}, "vae": {3: 60.0, 6: 40.0}})
    del ledger.measured[rep.piece_key("vae", 1, 6, 1.0, budget.sample_steps)]
    assert summary(ledger)["pending"] == list(rep.TOKENIZERS)[1:] and summary(ledger)["target"] is None
    ledger.value(rep.piece_key("vae", 1, 6, 1.0, budget.sample_steps), lambda: 40.0)
    pair = summary(ledger)
    assert pair["complete"] is False and "vavae" in pair["pending"] and "vae" not in pair["pending"]
    fill = {name: {3: 50.0, 6: 30.0} for name in rep.TOKENIZERS} | {"vae": {3: 60.0, 6: 40.0}}
    done = summary(_filled_ledger(budget, fill))
    assert done["complete"] is True and done["pending"] == [] and done["target"]["gfid"] == 40.0
    assert done["steps_to_target"]["vae"] == 6.0
    assert done["steps_to_target"]["aligntok"] == pytest.approx(3 + 3 * (50 - 40) / (50 - 30))


def test_progress_table_shows_every_measured_number_and_dashes_the_rest() -> None:
    budget = rep.BUDGETS["debug"]
    ledger = _filled_ledger(budget, {"vae": {3: 60.0, 6: 40.0}})
    del ledger.measured[rep.piece_key("vae", 1, 6, budget.cfg, budget.sample_steps)]
    ledger.value(rep.piece_key("vavae", 0, 3, budget.cfg, budget.sample_steps), lambda: 70.0)
    lines = rep.progress_markdown(rep.summarize("emoji", "debug", budget, "fp", ledger, t0=0.0)).splitlines()
    assert "| vae | 2.00 | 0.100 | 1.0 | 50.0 | 0.900 | 3.0 |" in lines
    assert "| vavae | - | - | - | - | - | - |" in lines  # a gFID, no metrics yet
    # Columns: cfg 3 at 3 and 6 steps, none at 3 and 6, the sweep's cfg 2, its 2 Euler steps.
    assert "| vae | 0 | 60.0 | 40.0 | 60.0 | 40.0 | 40.0 | 40.0 |" in lines
    assert "| vae | 1 | 60.0 | - | 60.0 | 40.0 |  |  |" in lines  # sweeps are seed 0's
    assert "| vavae | 0 | 70.0 | - | - | - | - | - |" in lines
    ledger.value(rep.piece_key("vae_blur", 0, 3, budget.cfg, budget.sample_steps), lambda: 80.0)
    lines = rep.progress_markdown(rep.summarize("emoji", "debug", budget, "fp", ledger, t0=0.0)).splitlines()
    assert "| vae_blur | 0 | 80.0 | - | - | - |  |  |" in lines  # not swept


def test_a_record_belongs_to_one_study(tmp_path) -> None:
    path = tmp_path / "reproduce-emoji.json"
    budget = rep.BUDGETS["debug"]
    fp = rep.fingerprint("emoji", budget)
    assert fp == rep.fingerprint("emoji", budget) != rep.fingerprint("fashion-mnist", budget)
    assert fp != rep.fingerprint("emoji", dataclasses.replace(budget, dit_steps=7))
    # Another control (vae_blur stopped elsewhere) is another study, under another name.
    assert fp != rep.fingerprint("emoji", dataclasses.replace(budget, blur_fraction=0.3))
    assert rep.result_stem("emoji", "full") == "reproduce-emoji"
    assert rep.result_stem("emoji", "short", 0.5) == "reproduce-emoji-short-blur0.5"
    # ... and in its own work directory, where the main study's finished vae_blur would be reused.
    assert rep.default_out("emoji", "full") == Path("runs/reproduce-emoji-full")
    assert rep.default_out("emoji", "full", 0.5) == Path("runs/reproduce-emoji-full-blur0.5")

    def save() -> None:
        rep.write_json(rep.summarize("emoji", "debug", budget, fp, ledger, t0=0.0), path)

    ledger = rep.open_ledger(path, fp, fresh=False, save=save, commit="abc1234")
    ledger.value("fid_floor", lambda: {"fid": 5.0, "num": 12, "split": "val"})
    entry = json.loads(path.read_text())["measured"]["fid_floor"]  # written at once, with its provenance
    assert entry["value"]["fid"] == 5.0 and entry["commit"] == "abc1234" and entry["wall_s"] >= 0
    reopened = rep.open_ledger(path, fp, fresh=False, save=save, commit=None)
    assert reopened.get("fid_floor") == {"fid": 5.0, "num": 12, "split": "val"}
    with pytest.raises(SystemExit, match="holds another study"):
        rep.open_ledger(path, "another", fresh=False, save=save, commit=None)
    assert not rep.open_ledger(path, "another", fresh=True, save=save, commit=None).measured


def test_two_runs_of_one_study_share_its_record(tmp_path) -> None:
    """Two processes measuring different pieces of one study (one per core) open the same record: each
    save takes in the other's numbers, so neither overwrites what the other measured."""
    path = tmp_path / "study.json"

    def opened() -> rep.Ledger:
        ledger = rep.open_ledger(path, "fp", fresh=False, save=lambda: write(), commit=None)

        def write() -> None:
            rep.write_json({"fingerprint": "fp", "measured": ledger.measured}, path)

        return ledger

    a, b = opened(), opened()
    a.value("a/metrics", lambda: 1.0)
    b.value("b/metrics", lambda: 2.0)  # b opened before a measured anything
    a.value("a/gfid", lambda: 3.0)
    on_disk = json.loads(path.read_text())["measured"]
    assert {k: v["value"] for k, v in on_disk.items()} == {"a/metrics": 1.0, "b/metrics": 2.0, "a/gfid": 3.0}
    # An export both measured on: the hashes each saw are kept (a second one says the retrain differed).
    a.record_export("t", "h1")
    b.record_export("t", "h2")
    a.record_export("t", "h1")  # nothing new for a: no save
    b.save()
    assert json.loads(path.read_text())["measured"]["t/exports"]["value"] == ["h2", "h1"]
    assert not rep.open_ledger(path, "fp", fresh=True, save=lambda: None, commit=None).measured
    assert not path.exists()  # --fresh: the old numbers cannot come back in through a merge


@pytest.mark.slow
def test_a_study_resumes_from_its_record_alone_and_retrains_only_for_what_is_missing(
    tmp_path, stub_inception, monkeypatch
) -> None:
    data = str(make_image_folder(tmp_path / "shapes", per_class=20))
    budget = rep.BUDGETS["debug"]
    measured: dict = {}
    first = rep.study_tokenizer(
        "vavae", data, budget, tmp_path / "a", rep.Ledger(measured, lambda: None, None)
    )
    # Another machine: the record, no work directory. Nothing is trained or sampled again.
    calls = []
    ledger = rep.Ledger(json.loads(json.dumps(measured)), save=lambda: None, commit=None)
    with monkeypatch.context() as m:  # (the context keeps stub_inception's patches)
        m.setattr(rep, "train_one_tokenizer", lambda *a: calls.append(a))
        assert rep.study_tokenizer("vavae", data, budget, tmp_path / "b", ledger) == first and not calls
    # One gFID lost: the tokenizer and that DiT seed are trained again, to the same weights (training is
    # deterministic), and the piece is measured again to the same number; the rest is not remeasured.
    last = budget.checkpoints[-1]
    lost = rep.piece_key("vavae", 0, last, 1.0, budget.sample_steps)
    del ledger.measured[lost]
    assert rep.study_tokenizer("vavae", data, budget, tmp_path / "b", ledger) == first
    assert ledger.get("vavae/exports") == measured["vavae/exports"]["value"]  # one export, the same one
    samples = tmp_path / "b" / "vavae" / "samples"
    assert sorted(p.parent.name for p in samples.rglob("fid.json")) == ["cfg1"]


def test_a_longer_decoder_lengthens_a_decoder_only_stage_or_appends_one() -> None:
    budget = rep.BUDGETS["full"]
    aligntok = share.longer_decoder(rep.tokenizer_recipe("aligntok", "emoji", budget), 2000)
    study = rep.tokenizer_recipe("aligntok", "emoji", budget)
    assert aligntok.stages[:2] == study.stages[:2]  # the latent space's stages, untouched
    assert aligntok.stages[2] == dataclasses.replace(study.stages[2], steps=1000)
    vae = share.longer_decoder(rep.tokenizer_recipe("vae", "emoji", budget), 2000)
    assert vae.stages[0] == rep.tokenizer_recipe("vae", "emoji", budget).stages[0]
    added = vae.stages[1]
    assert (added.train, added.steps, added.lr) == (("decoder",), 800, vae.stages[0].lr)  # the last stage's
    assert (added.gan_weight, added.gan_start) == (study.stages[2].gan_weight, study.stages[2].gan_start)
    with pytest.raises(ValueError, match="adds nothing"):
        share.longer_decoder(study, 1200)
    # --gan-weight sets the decoder-only stage's GAN weight, and nothing else; its runs are kept apart.
    other = share.longer_decoder(study, 2000, gan_weight=0.25)
    assert other.stages[:2] == study.stages[:2] and other.stages[2] == dataclasses.replace(
        aligntok.stages[2], gan_weight=0.25
    )
    vae_other = share.longer_decoder(rep.tokenizer_recipe("vae", "emoji", budget), 2000, gan_weight=0.25)
    assert vae_other.stages[1] == dataclasses.replace(added, gan_weight=0.25)
    assert share.run_key(2000, None) == "2000" and share.run_key(2000, 0.0) == "2000-gan0"


@pytest.mark.slow
def test_a_longer_decoder_keeps_the_latent_space_and_remeasures_its_dit(tmp_path, stub_inception) -> None:
    data = str(make_image_folder(tmp_path / "shapes", per_class=20))
    budget = rep.BUDGETS["debug"]
    out = tmp_path / "study"
    with pytest.raises(FileNotFoundError, match="has not measured aligntok"):
        share.refine_decoder(out, "aligntok", data, budget, 9)
    study = rep.study_tokenizer("aligntok", data, budget, out, rep.Ledger({}, save=lambda: None, commit=None))
    baseline, entry = share.refine_decoder(out, "aligntok", data, budget, 9)
    last = str(budget.checkpoints[-1])
    # The baseline is what the study measured: its seed-0 DiT at the last checkpoint, its own decoder.
    assert baseline["gfid"] == {
        f"{budget.cfg:g}": study["gfid_seeds"][last][0],
        "1": study["gfid_nocfg_seeds"][last][0],
    }
    assert baseline["recon_floor"] == study["recon_floor"] and baseline["psnr"] == study["psnr"]
    assert (baseline["decoder_steps"], baseline["decoder_only_steps"]) == (sum(budget.stage_steps), 2)
    assert (entry["decoder_steps"], entry["decoder_only_steps"]) == (9, 4)
    # Same encoder and latent statistics, another decoder: the same DiT's latents decode differently.
    run = out / "aligntok-decoder-9" / "tokenizer"
    assert same_latent_space(out / "aligntok" / "tokenizer" / "export", run / "export")
    assert not same_latent_space(out / "aligntok" / "tokenizer" / "export", run / "stage-2" / "export")
    # ... only by its latent statistics: a stage's export has none yet (the final export measures them)
    assert same_latent_space(
        out / "aligntok" / "tokenizer" / "export", run / "stage-2" / "export", statistics=False
    )
    assert set(entry["gfid"]) == set(baseline["gfid"]) and entry["gfid"] != baseline["gfid"]
    record = json.loads(
        (out / "aligntok-decoder-9" / "samples" / f"seed0-step{last}" / "cfg1" / "sampling.json").read_text()
    )
    assert record["tokenizer"] == str((run / "export").resolve()) and record["dit"] == entry["dit"]
    # A rerun trains and samples nothing again.
    assert share.refine_decoder(out, "aligntok", data, budget, 9)[1]["gfid"] == entry["gfid"]
    table = share.markdown({"fid_floor": 5.0, "tokenizers": {"aligntok": {"7": baseline, "9": entry}}})
    rows = table.splitlines()
    gan = f"{rep.tokenizer_recipe('aligntok', data, budget).stages[2].gan_weight:g}"
    assert rows[2].startswith(f"| aligntok | 7 (2) | {gan} |") and rows[3].startswith(
        f"| aligntok | 9 (4) | {gan} |"
    )
    assert rows[-1].endswith("5.0")


def test_disc_probe_learns_a_visible_difference_and_stays_at_chance_on_none() -> None:
    cfg = tokenizer_train_recipe("debug")
    cfg = dataclasses.replace(cfg, batch_size=16, disc=DiscriminatorConfig(ch=8, num_layers=2), disc_lr=1e-3)
    real = torch.rand(80, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = F.interpolate(F.avg_pool2d(real, 4), scale_factor=4.0)  # no detail finer than 4 px
    seen = probe.probe(cfg, real, blurred, steps=60, every=30, seed=0)
    assert [r["step"] for r in seen] == [30, 60] and seen[-1]["heldout_accuracy"] >= 0.9
    assert seen[-1]["d"] < seen[0]["d"] < 1.0
    # Identical "reconstructions": the two hinge gradients cancel, D cannot move off chance.
    same = probe.probe(cfg, real, real.clone(), steps=30, every=30, seed=0)
    assert same[-1]["heldout_accuracy"] == 0.5 and same[-1]["d"] == pytest.approx(1.0, abs=1e-3)


def test_disc_probe_reads_the_run_and_writes_its_reports(tmp_path, debug_tokenizer, monkeypatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(debug_tokenizer, run / "export")
    data = make_image_folder(tmp_path / "shapes", per_class=20)  # 40 training images
    save_json(dataclasses.replace(tokenizer_train_recipe("debug"), data=str(data)), run / "config.json")
    argv = ["disc_probe.py", "--run", str(run), "--images", "40", "--steps", "4", "--every", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--disc-lr", "3e-4", "--norm", "none"])
    probe.main()
    result = json.loads((run / "disc_probe.json").read_text())
    assert result["disc_lr"] == 3e-4 and result["disc"]["norm"] == "none" and result["data"] == str(data)
    assert [r["step"] for r in result["reports"]] == [2, 4]
    assert all(0.0 <= r["heldout_accuracy"] <= 1.0 and math.isfinite(r["d"]) for r in result["reports"])
    monkeypatch.setattr(sys, "argv", [*argv, "--images", "41"])
    with pytest.raises(ValueError, match="40 training images"):
        probe.main()


@pytest.mark.skipif(not is_present("minilm"), reason="needs the minilm asset")
def test_t2i_study_measures_every_piece_per_seed_and_trained_only_trains_nothing(
    tmp_path, stub_inception, monkeypatch
) -> None:
    t2i = load_benchmark("reproduce_t2i")
    monkeypatch.setattr(t2i, "DATASET", str(make_image_folder(tmp_path / "shapes", per_class=10)))
    monkeypatch.setattr(dit_eval, "adherence_dir", lambda: tmp_path / "adherence")
    monkeypatch.setattr(dit_eval, "CONTRASTIVE", {**dit_eval.CONTRASTIVE, "steps": 50})
    budget, out = t2i.BUDGETS["debug"], tmp_path / "study"
    ledger = rep.Ledger({}, save=lambda: None, commit=None)
    t2i.study("vae", budget, out, ledger, trained_only=True)  # nothing trained yet: nothing measured
    assert ledger.measured == {} and not (out / "vae").exists()
    t2i.study("aligntok", budget, out, ledger)
    pieces = t2i.pieces(budget)
    assert pieces[-1] == (budget.checkpoints[-1], 1.0) and len(pieces) == len(budget.checkpoints) + 1
    assert set(ledger.measured) == {t2i.key("aligntok", s, *p) for s in range(budget.seeds) for p in pieces}
    rows = t2i.table(budget, ledger)
    last = rows[f"aligntok/step{budget.checkpoints[-1]}/cfg{budget.cfg:g}"]
    assert len(last["seeds"]) == budget.seeds
    assert last["fid"] == pytest.approx(sum(s["fid"] for s in last["seeds"]) / budget.seeds)
    assert all(0 <= last[m] <= 1 for m in ("retrieval_top1", "retrieval_top5", "category_balanced"))
