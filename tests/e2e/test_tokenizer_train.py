"""The one tokenizer training loop: stages move the right parameters, resume is exact, baselines run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aligntok.cli import main
from aligntok.config import apply_overrides, from_dict, to_dict
from aligntok.models.encoders import build_encoder
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.tokenizer import tokenizer_train_recipe, tokenizer_train_recipes
from aligntok.train import tokenizer_stage as tok_train
from aligntok.train.common import read_log
from aligntok.train.tokenizer import train_tokenizer
from aligntok.train.tokenizer_config import TokenizerTrainConfig
from conftest import slow_fixture


def _part(tok: Tokenizer, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tok.state_dict().items() if k.startswith(prefix)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _used_encoder_keys(tok: Tokenizer) -> set[str]:
    used = {id(p) for p in tok.encoder.feature_parameters()}
    return {f"encoder.{k}" for k, p in tok.encoder.named_parameters() if id(p) in used}


@slow_fixture(scope="module")
def run(tmp_path_factory, image_folder) -> Path:
    out = tmp_path_factory.mktemp("tok") / "run"
    main(
        [
            "tokenizer",
            "train",
            "--recipe",
            "debug",
            "--stage",
            "all",
            "--out",
            str(out),
            "--set",
            f"data={image_folder}",
        ]
    )
    return out


def test_stages_move_the_right_parameters(run: Path) -> None:
    cfg = tokenizer_train_recipe("debug")
    original = {f"encoder.{k}": v for k, v in build_encoder(cfg.model.encoder).state_dict().items()}
    s1, s2, s3 = (Tokenizer.from_pretrained(run / f"stage-{k}" / "export") for k in "123")
    # Stage 1: the foundation encoder is frozen (weights and BatchNorm statistics).
    assert _same(_part(s1, "encoder."), original)
    # Stage 2: every part moves (the encoder's used blocks; blocks past the feature block cannot).
    used = _used_encoder_keys(s2)
    assert used and all(not torch.equal(s1.state_dict()[k], s2.state_dict()[k]) for k in used)
    unused = set(_part(s2, "encoder.")) - used
    assert all(torch.equal(s1.state_dict()[k], s2.state_dict()[k]) for k in unused)
    assert not _same(_part(s1, "adapter."), _part(s2, "adapter."))
    assert not _same(_part(s1, "decoder."), _part(s2, "decoder."))
    # Stage 3: encoder and adapter frozen, decoder refined.
    assert _same(_part(s2, "encoder."), _part(s3, "encoder."))
    assert _same(_part(s2, "adapter."), _part(s3, "adapter."))
    assert not _same(_part(s2, "decoder."), _part(s3, "decoder."))


def test_sp_is_zero_at_the_first_step_of_stage_2_and_losses_are_logged(run: Path) -> None:
    log2 = read_log(run / "stage-2" / "log.jsonl")
    first = next(r for r in log2 if "sp" in r)
    assert first["step"] == 1 and first["sp"] == 0.0
    assert any(r.get("sp", 0.0) > 0 for r in log2)
    keys = set().union(*[r.keys() for r in log2])
    assert {"l1", "lpips", "g", "d", "gan_weight", "sp", "val_psnr"} <= keys
    assert "sp" not in set().union(*[r.keys() for r in read_log(run / "stage-1" / "log.jsonl")])
    assert list((run / "stage-1").glob("recon-*.png"))


def test_final_export_carries_latent_statistics(run: Path) -> None:
    tok = Tokenizer.from_pretrained(run / "export")
    assert _same(
        _part(tok, "decoder."), _part(Tokenizer.from_pretrained(run / "stage-3" / "export"), "decoder.")
    )
    assert not torch.equal(tok.latent_mean, torch.zeros_like(tok.latent_mean))
    assert (tok.latent_std > 0).all() and not torch.equal(tok.latent_std, torch.ones_like(tok.latent_std))


@pytest.mark.slow
def test_interrupted_run_resumes_bit_identical(tmp_path, image_folder, monkeypatch, run) -> None:
    cfg = apply_overrides(tokenizer_train_recipe("debug"), [f"data={image_folder}"])
    calls = {"n": 0}
    real = tok_train.semantic_preservation_loss

    def crash_in_stage_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # stage 2, step 3: after the checkpoint at step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tok_train, "semantic_preservation_loss", crash_in_stage_2)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(cfg, out=tmp_path / "cut")
    monkeypatch.setattr(tok_train, "semantic_preservation_loss", real)
    with pytest.raises(ValueError, match="--resume"):
        train_tokenizer(cfg, out=tmp_path / "cut")
    train_tokenizer(cfg, out=tmp_path / "cut", resume=True)
    a = Tokenizer.from_pretrained(run / "export").state_dict()
    b = Tokenizer.from_pretrained(tmp_path / "cut" / "export").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", ["vae", "vavae"])
def test_baselines_train_and_export(tmp_path, image_folder, variant) -> None:
    cfg = apply_overrides(
        tokenizer_train_recipe(f"debug-{variant}"), [f"data={image_folder}", "stages.0.steps=3"]
    )
    export = train_tokenizer(cfg, out=tmp_path / variant)
    tok = Tokenizer.from_pretrained(export)
    assert tok.config.posterior == "gaussian" and tok.config.encoder.name == "cnn"
    log = read_log(tmp_path / variant / "stage-all" / "log.jsonl")
    keys = set().union(*[r.keys() for r in log])
    assert "kl" in keys and (("vf_cos" in keys and "vf_dm" in keys) == (variant == "vavae"))
    assert tuple(tok.latent_shape) == tuple(Tokenizer(tokenizer_train_recipe("debug").model).latent_shape)


def test_every_recipe_builds_and_stage_selection_is_checked(tmp_path) -> None:
    for name in tokenizer_train_recipes():
        cfg = tokenizer_train_recipe(name)
        # What config.json holds builds the same recipe back (resume compares the two).
        assert cfg.stages and from_dict(TokenizerTrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    stage1 = tokenizer_train_recipe("emoji-stage1")
    assert len(stage1.stages) == 1 and stage1.stages[0].steps == sum(
        s.steps for s in tokenizer_train_recipe("emoji").stages
    )
    assert all(s.sp_weight == 0 for s in tokenizer_train_recipe("emoji-wsp0").stages)
    # The budget's GAN weight reaches every stage of every variant: none at 32 px, on elsewhere.
    for name in tokenizer_train_recipes():
        weights = {s.gan_weight for s in tokenizer_train_recipe(name).stages}
        assert weights == ({0.0} if name.split("-")[0] in ("emoji32", "fashion") else {0.5}), name
    with pytest.raises(ValueError, match="not in this recipe"):
        train_tokenizer(tokenizer_train_recipe("debug"), out=tmp_path / "x", stage="4")
    with pytest.raises(ValueError, match="unknown tokenizer recipe"):
        tokenizer_train_recipe("emoji-lora")
    with pytest.raises(ValueError, match="--set data="):
        train_tokenizer(tokenizer_train_recipe("paper"), out=tmp_path / "p")
