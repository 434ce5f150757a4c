"""`evaluate_tokenizer` and `score_tokenizer` end to end on a debug tokenizer and a tiny image folder."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.models.encoders import EncoderConfig
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.tokenizer import tokenizer_preset
from aligntok.score import SCORE_BUDGETS, score_tokenizer
from aligntok.tokenizer_eval import (
    evaluate_tokenizer,
    format_table,
    reference_encoder,
    reference_encoder_config,
    tokenizer_metrics,
)

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def _folder(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(np.array(colour) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tokeval")
    torch.manual_seed(0)
    tokenizer = Tokenizer(tokenizer_preset("debug"))
    with torch.no_grad():  # stands in for a stage-2 fine-tune: the tokenizer's encoder is not the original
        for p in tokenizer.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {"tok": tokenizer.save_pretrained(tmp / "run" / "export"), "data": _folder(tmp / "data")}


# Every test here uses the stand-in Inception network (test_recon_metrics.py runs the real one).
pytestmark = pytest.mark.usefixtures("stub_inception")


def test_reference_encoder_is_the_original_not_the_fine_tuned_one(setup) -> None:
    tokenizer = Tokenizer.from_pretrained(setup["tok"])
    reference = reference_encoder(tokenizer.config)
    pristine = Tokenizer(tokenizer_preset("debug")).encoder
    for (name, a), b, c in zip(
        reference.state_dict().items(),
        pristine.state_dict().values(),
        tokenizer.encoder.state_dict().values(),
    ):
        assert torch.equal(a, b), name
        if a.is_floating_point() and a.numel() > 1 and "running" not in name:
            assert not torch.equal(a, c), name
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())


def test_a_tokenizer_without_foundation_encoder_gets_the_default_reference() -> None:
    config = dataclasses.replace(tokenizer_preset("debug"), encoder=EncoderConfig(name="cnn"))
    ref = reference_encoder_config(config)
    assert (ref.name, ref.block, ref.input_size, ref.pretrained) == ("efficientnet-lite0", 10, 128, True)
    assert (
        reference_encoder_config(tokenizer_preset("debug")).block == tokenizer_preset("debug").encoder.block
    )


def test_evaluate_tokenizer_end_to_end(setup, capsys) -> None:
    result = evaluate_tokenizer(setup["tok"], str(setup["data"]), batch_size=5)
    keys = ("rfid", "psnr", "ssim", "lpips", "probe_accuracy", "probe_balanced", "knn_accuracy",
            "knn_balanced", "cknna", "cknna_centered_mask")  # fmt: skip
    for key in keys:
        assert math.isfinite(result[key]), key
    assert result["num_images"] == 12 and result["num_test_images"] == 12 and result["cknna_k"] == 10
    # Huh et al.'s CKNNA has no [-1, 1] bound when k is close to N (here 10 of 12; docs/metrics.md).
    assert 0 <= result["probe_balanced"] <= 1 and -1 <= result["cknna_centered_mask"] <= 1
    path = setup["tok"].parent / "report" / "tokenizer_eval.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    assert "rfid" in printed and str(path) in printed


def test_evaluate_tokenizer_caps_images_and_skips_the_probe(setup, tmp_path) -> None:
    out = tmp_path / "eval.json"
    result = evaluate_tokenizer(setup["tok"], str(setup["data"]), num=6, probe=False, out=out)
    assert result["num_images"] == 6 and "probe_balanced" not in result and "cknna" not in result
    assert json.loads(out.read_text())["num_images"] == 6


def test_tokenizer_metrics_measures_a_record_of_the_earlier_cknna_again(setup, tmp_path) -> None:
    out = tmp_path / "tokenizer_eval.json"
    out.write_text(json.dumps({"psnr": 1.0, "cknna": 0.5}))  # before issue 31: "cknna" was the earlier one
    with pytest.warns(UserWarning, match="earlier CKNNA"):
        fresh = tokenizer_metrics(setup["tok"], str(setup["data"]), num=6, bf16=False, out=out)
    assert fresh["psnr"] != 1.0 and "cknna_centered_mask" in fresh
    assert tokenizer_metrics(setup["tok"], str(setup["data"]), num=6, bf16=False, out=out) == fresh


def test_format_table_aligns_and_rounds() -> None:
    lines = format_table({"gfid": 12.345678, "num_samples": 8}).splitlines()
    assert lines == ["gfid         12.35", "num_samples  8"]


def test_score_refuses_an_unknown_budget(setup, tmp_path) -> None:
    with pytest.raises(ValueError, match="debug"):
        score_tokenizer(setup["tok"], str(setup["data"]), out=tmp_path, budget="huge")


@pytest.mark.slow
def test_score_tokenizer_debug_end_to_end_and_resumes(setup, tmp_path) -> None:
    out = tmp_path / "score"
    first = score_tokenizer(setup["tok"], str(setup["data"]), out=out, budget="debug")
    plan = SCORE_BUDGETS["debug"]
    for key in ("probe_balanced", "cknna", "gfid"):
        assert math.isfinite(first[key]), key
    assert first["dit_steps"] == plan.dit_steps and first["num_samples"] == plan.num_samples
    assert json.loads((out / "score.json").read_text()) == json.loads(json.dumps(first))
    assert (out / "latents" / "meta.json").is_file() and (out / "dit" / "export").is_dir()
    with np.load(out / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (plan.num_samples, 32, 32, 3)
    assert json.loads((out / "latents" / "meta.json").read_text())["flip"] is True
    # A rerun finds every piece done: no new training steps, the same samples, the same score.
    log_lines = (out / "dit" / "log.jsonl").read_text().count("\n")
    samples_mtime = (out / "samples" / "samples.npz").stat().st_mtime_ns
    again = score_tokenizer(setup["tok"], str(setup["data"]), out=out, budget="debug")
    assert (out / "dit" / "log.jsonl").read_text().count("\n") == log_lines
    assert (out / "samples" / "samples.npz").stat().st_mtime_ns == samples_mtime
    assert again["gfid"] == pytest.approx(first["gfid"])
    assert again["probe_balanced"] == pytest.approx(first["probe_balanced"])
