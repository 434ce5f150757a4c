"""`aligntok demo` end to end on the debug preset (a tiny image folder, a stand-in Inception): every
report piece is written, a rerun resumes instead of redoing, and a run directory keeps one preset."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from aligntok import demo, dit_eval
from aligntok.assets import is_present
from aligntok.cli import main
from conftest import make_image_folder


@pytest.fixture
def debug_preset(tmp_path, monkeypatch, stub_inception) -> demo.DemoPreset:
    folder = make_image_folder(tmp_path / "shapes", per_class=20)
    preset = dataclasses.replace(demo.PRESETS["debug"], data=str(folder), ref_num=24)
    monkeypatch.setitem(demo.PRESETS, "debug", preset)
    monkeypatch.setattr(dit_eval, "adherence_dir", lambda: tmp_path / "adherence")
    return preset


@pytest.mark.slow
def test_demo_writes_the_report_and_resumes(tmp_path, debug_preset) -> None:
    out = tmp_path / "demo"
    index = demo.run_demo("debug", out)
    html = index.read_text()
    report = out / "report"
    for name in re.findall(r"src='([^']+)'", html):  # every image the page shows exists
        assert (report / name).is_file(), name
    classes = json.loads((out / "latents" / "meta.json").read_text())["classes"]
    assert len(classes) == 2 and all(c in html for c in classes)
    assert {"recon-stage-1.png", "recon-stage-2.png", "recon-stage-3.png"} <= {
        p.name for p in report.iterdir()
    }
    assert {"tokenizer-loss.png", "tokenizer-psnr.png", "dit-loss.png"} <= {p.name for p in report.iterdir()}
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["gfid"]) == {"cfg1", f"cfg{debug_preset.cfg_scale:g}"}
    assert metrics["num_ref"] == debug_preset.ref_num and metrics["fid_floor"] > 0
    # Class adherence of each sample set per class, beside the same classifier on real val images.
    assert set(metrics["adherence"]) == set(metrics["gfid"])
    for per_class in [*metrics["adherence"].values(), metrics["adherence_ceiling"]]:
        assert set(per_class) == {*classes, "balanced"} and all(0 <= v <= 1 for v in per_class.values())
    assert metrics["adherence_ceiling"]["balanced"] > 0.5  # two separable shapes: the classifier learned them
    assert "of real)" in html and "class adherence (balanced), real images" in html
    assert "aligntok tokenizer train --recipe debug" in html and "aligntok dit train" in html
    # A rerun finds everything done: no training step and no sample is redone.
    dit_log = (out / "dit" / "log.jsonl").read_text()
    npz = out / "samples" / "cfg1" / "samples.npz"
    mtime = npz.stat().st_mtime_ns
    demo.run_demo("debug", out)
    assert (out / "dit" / "log.jsonl").read_text() == dit_log
    assert npz.stat().st_mtime_ns == mtime
    assert json.loads((report / "metrics.json").read_text())["gfid"] == metrics["gfid"]


def test_demo_refuses_a_run_directory_of_another_preset(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"preset": "full"}))
    with pytest.raises(SystemExit) as e:
        main(["demo", "--preset", "quick", "--out", str(out)])
    assert e.value.code == 1
    assert "holds a demo with other settings (preset 'full')" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not is_present("minilm"), reason="needs the minilm asset")
def test_t2i_demo_writes_prompt_tables(tmp_path, monkeypatch, stub_inception) -> None:
    """The text preset: held-out and training prompts with their images, FID and adherence beside the
    real images' in metrics.json, and every image the page shows exists."""
    folder = make_image_folder(tmp_path / "shapes", per_class=20)
    preset = dataclasses.replace(demo.PRESETS["t2i-debug"], data=str(folder), ref_num=24)
    monkeypatch.setitem(demo.PRESETS, "t2i-debug", preset)
    monkeypatch.setattr(dit_eval, "adherence_dir", lambda: tmp_path / "adherence")
    monkeypatch.setattr(dit_eval, "CONTRASTIVE", {**dit_eval.CONTRASTIVE, "steps": 50})
    index = demo.run_demo("t2i-debug", tmp_path / "demo")
    html, report = index.read_text(), index.parent
    for name in re.findall(r"src='([^']+)'", html):
        assert (report / name).is_file(), name
    assert "held-out prompt" in html and "training prompt" in html
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["t2i"]) == {"cfg1", f"cfg{preset.cfg_scale:g}"}
    for scores in metrics["t2i"].values():
        assert {"fid", "retrieval_top1", "category_accuracy"} <= set(scores)
    assert metrics["ceilings"]["category_accuracy"] == 1.0
