"""The one tokenizer training loop: stages move the right parameters, resume is exact, baselines run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from aligntok.cli import main
from aligntok.config import apply_overrides, from_dict, to_dict
from aligntok.data import build_dataset
from aligntok.models.encoders import build_encoder
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.tokenizer import tokenizer_train_recipe, tokenizer_train_recipes
from aligntok.train import frozen
from aligntok.train import tokenizer_stage as tok_train
from aligntok.train.common import read_log
from aligntok.train.tokenizer import kept_stage_export, train_tokenizer
from aligntok.train.tokenizer_config import StageConfig, TokenizerTrainConfig
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
    """... also with frozen outputs kept (`run` computed them per step: the same values, fp32 on a CPU)."""
    cfg = apply_overrides(tokenizer_train_recipe("debug"), [f"data={image_folder}"])
    monkeypatch.setattr(frozen, "READS_TO_PAY", 1)  # every stage keeps what is frozen
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


def test_l2_norm_variance_is_the_stage_1_latents_and_draws_no_random_number(run: Path, image_folder) -> None:
    cfg = apply_overrides(tokenizer_train_recipe("debug"), [f"data={image_folder}"])
    reference = Tokenizer.from_pretrained(run / "stage-1" / "export")
    rng = torch.get_rng_state()
    moments = tok_train.channel_moments(reference, cfg, cfg.sp_stats_batches)
    assert torch.equal(torch.get_rng_state(), rng)
    ds = build_dataset(image_folder, split="train", resolution=cfg.model.image_size)
    with torch.no_grad():
        z = reference.encode(torch.stack([ds[i]["image"] for i in range(len(ds))])).double()
    assert moments.count == z.shape[0] * z.shape[2] * z.shape[3]
    torch.testing.assert_close(moments.mean_std()[1] ** 2, z.var(dim=(0, 2, 3), unbiased=False))


def _stage_2_on_run(run: Path, out: Path, image_folder, *sets: str) -> tuple[TokenizerTrainConfig, Path]:
    """Stage 2 of the debug recipe (with `sets`) in `out`, on the `run` fixture's stage 1."""
    shutil.copytree(run / "stage-1", out / "stage-1")
    cfg = apply_overrides(tokenizer_train_recipe("debug"), [f"data={image_folder}", *sets])
    return cfg, train_tokenizer(cfg, out=out, stage="2")


@pytest.mark.slow
def test_l2_norm_stage_trains_and_keeps_exports(tmp_path, run: Path, image_folder) -> None:
    sets = ("stages.1.sp_kind=l2_norm", "stages.1.keep_exports=[2,4]")
    cfg, export = _stage_2_on_run(run, tmp_path / "l2norm", image_folder, *sets)
    log = [r for r in read_log(tmp_path / "l2norm" / "stage-2" / "log.jsonl") if "sp" in r]
    assert log[0]["step"] == 1 and log[0]["sp"] == 0.0
    assert all(0 < r["sp"] < float("inf") for r in log[1:])
    # Step 1 is the default run's step 1 (L_sp and its gradient are 0 there): nothing else moved.
    default = [r for r in read_log(run / "stage-2" / "log.jsonl") if "sp" in r]
    assert log[0]["loss"] == default[0]["loss"] and log[1]["l1"] == default[1]["l1"]
    final = json.loads((export / "config.json").read_text())["meta"]
    assert "keep_exports" not in final["inputs"]["stages"][1]  # where a stage keeps exports changes nothing
    for step in (2, 4):
        kept = kept_stage_export(tmp_path / "l2norm", cfg.stages[1], step)
        assert kept == tmp_path / "l2norm" / "stage-2" / "exports" / f"step-{step:07d}"
        meta = json.loads((kept / "config.json").read_text())["meta"]
        assert (meta["step"], meta["steps"], meta["stage"]) == (step, 4, "2")
        # Constant lr: the inputs of the same stage `step` steps long.
        want = json.loads(json.dumps(final["inputs"]))
        want["stages"][1]["steps"] = step
        assert meta["inputs"] == want
        # The last step's kept export is the stage's export (the EMA of stage 2); an earlier one is not.
        assert _same(_weights(kept), _weights(export)) == (step == 4)
    assert [p.name for p in sorted((tmp_path / "l2norm" / "stage-2" / "exports").iterdir())] == [
        "step-0000002",
        "step-0000004",
    ]
    # ... and it is: a 2-step stage 2 ends with the very weights kept at step 2 of the 4-step one.
    _, short = _stage_2_on_run(
        run, tmp_path / "short", image_folder, "stages.1.sp_kind=l2_norm", "stages.1.steps=2"
    )
    assert _same(_weights(short), _weights(kept_stage_export(tmp_path / "l2norm", cfg.stages[1], 2)))
    # So a run asking for that shorter stage takes the kept export as its stage 2 and trains nothing.
    reuse = tmp_path / "reuse" / "stage-2"
    shutil.copytree(kept_stage_export(tmp_path / "l2norm", cfg.stages[1], 2), reuse / "export")
    _stage_2_on_run(run, tmp_path / "reuse", image_folder, "stages.1.sp_kind=l2_norm", "stages.1.steps=2")
    assert not (reuse / "log.jsonl").exists()


def _stage_parts(cfg: TokenizerTrainConfig, index: int, run: Path) -> tok_train.Stage:
    """Stage `index` of `cfg` built on the `run` fixture's exports (stage 2 and 3 start from them)."""
    start = (
        Tokenizer(cfg.model) if index == 0 else Tokenizer.from_pretrained(run / f"stage-{index}" / "export")
    )
    reference = lambda: Tokenizer.from_pretrained(run / "stage-1" / "export")  # noqa: E731
    return tok_train.build_stage(cfg, cfg.stages[index], lambda: start, reference)


@pytest.mark.parametrize(("index", "kept"), [(0, {"features"}), (1, {"z_ref"}), (2, {"adapter"})])
def test_frozen_outputs_are_kept_once_and_give_the_losses_of_computing_them(
    run: Path, image_folder, index: int, kept: set[str]
) -> None:
    """Stage 1 keeps its frozen encoder's features, stage 2 the L_sp reference's z_ref, stage 3 its frozen
    encoder + adapter's latent; the losses are the ones computed from the images."""
    cfg = apply_overrides(tokenizer_train_recipe("debug"), [f"data={image_folder}", "bf16=false"])
    ds = build_dataset(image_folder, split="train", resolution=cfg.model.image_size)
    parts = _stage_parts(cfg, index, run)
    reads = frozen.READS_TO_PAY * len(ds)
    tok_train.keep_frozen_outputs(parts, cfg, ds, images_read=reads - 1)  # reads the split too few times
    assert parts.frozen == {}
    tok_train.keep_frozen_outputs(parts, cfg, ds, images_read=reads)
    assert set(parts.frozen) == kept and all(len(v.values) == len(ds) for v in parts.frozen.values())
    index_ = torch.tensor([5, 0, 11, 3])
    batch = {"image": torch.stack([ds[i]["image"] for i in index_.tolist()]), "index": index_}
    noise = tok_train.posterior_noise(parts, cfg)
    kw = {"gan_on": False}
    total, recon, _ = tok_train.stage_losses(
        parts, cfg, batch["image"], noise, frozen=parts.frozen_batch(batch), **kw
    )
    again, recon_again, _ = tok_train.stage_losses(parts, cfg, batch["image"], noise, **kw)
    torch.testing.assert_close(recon, recon_again, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, again, atol=1e-5, rtol=1e-5)


def test_frozen_vf_targets_give_the_vf_terms_of_computing_them(image_folder) -> None:
    cfg = apply_overrides(tokenizer_train_recipe("debug-vavae"), [f"data={image_folder}", "bf16=false"])
    parts = tok_train.build_stage(cfg, cfg.stages[0], lambda: Tokenizer(cfg.model), lambda: None)
    ds = build_dataset(image_folder, split="train", resolution=cfg.model.image_size)
    tok_train.keep_frozen_outputs(parts, cfg, ds, images_read=10**6)
    assert set(parts.frozen) == {"vf"}  # the baseline's encoder trains: only the VF target is frozen
    batch = {"image": torch.stack([ds[i]["image"] for i in (7, 2)]), "index": torch.tensor([7, 2])}
    noise = tok_train.posterior_noise(parts, cfg)[:2]
    kept = parts.autoencoder(batch["image"], noise, parts.frozen_batch(batch))
    computed = parts.autoencoder(batch["image"], noise)
    for term in ("vf_cos", "vf_dm"):
        torch.testing.assert_close(kept[term], computed[term], atol=1e-5, rtol=1e-5)


def _weights(export: Path) -> dict[str, torch.Tensor]:
    return Tokenizer.from_pretrained(export).state_dict()


def _adaptive_vavae(image_folder, *sets: str) -> TokenizerTrainConfig:
    sets = (f"data={image_folder}", "stages.0.vf_weight_mode=adaptive", *sets)
    return apply_overrides(tokenizer_train_recipe("debug-vavae"), list(sets))


def test_adaptive_vf_weight_is_the_gradient_norm_ratio_at_the_adapter(image_folder) -> None:
    cfg = _adaptive_vavae(image_folder)
    stage = cfg.stages[0]
    parts = tok_train.build_stage(cfg, stage, lambda: Tokenizer(cfg.model), lambda: None)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = tok_train.posterior_noise(parts, cfg)[:4]
    total, _, terms = tok_train.stage_losses(parts, cfg, images, noise, gan_on=False)
    # By hand, from a second forward pass (no dropout, GroupNorm: the same outputs).
    out = parts.autoencoder(images, noise)
    rec = (out["recon"] - images).abs().mean() + stage.lpips_weight * parts.perceptual(out["recon"], images)
    vf = out["vf_cos"] + out["vf_dm"]
    layer = parts.tokenizer.adapter.fc2.weight
    (d_rec,), (d_vf,) = (torch.autograd.grad(x, layer, retain_graph=True) for x in (rec, vf))
    weight = stage.vf_weight * d_rec.norm() / (d_vf.norm() + 1e-4)
    torch.testing.assert_close(terms["vf_weight"], weight)
    kl = stage.kl_weight * terms["kl"]
    torch.testing.assert_close(total, rec + kl + weight * vf)


@pytest.mark.slow
def test_adaptive_vf_weight_is_logged_and_varies(tmp_path, image_folder) -> None:
    cfg = _adaptive_vavae(image_folder, "stages.0.steps=4")
    train_tokenizer(cfg, out=tmp_path / "vavae")
    weights = [
        r["vf_weight"] for r in read_log(tmp_path / "vavae" / "stage-all" / "log.jsonl") if "loss" in r
    ]
    assert len(weights) == 4 and all(w > 0 for w in weights) and len(set(weights)) > 1


def test_new_stage_options_are_range_checked() -> None:
    base = {"name": "2", "steps": 4, "train": ("encoder", "adapter", "decoder")}
    assert StageConfig(**base, sp_kind="l2_norm", keep_exports=[1, 4]).keep_exports == (1, 4)
    for bad, match in (
        ({"sp_kind": "l1"}, "sp_kind='l1'"),
        ({"vf_weight_mode": "auto"}, "vf_weight_mode='auto'"),
        ({"keep_exports": (0,)}, "keep_exports"),
        ({"keep_exports": (5,)}, "1..4"),
    ):
        with pytest.raises(ValueError, match=match):
            StageConfig(**base, **bad)
    with pytest.raises(ValueError, match="adapter"):
        StageConfig(**{**base, "train": ("decoder",)}, vf_weight=0.1, vf_weight_mode="adaptive")
    cfg = tokenizer_train_recipe("debug")
    with pytest.raises(ValueError, match="sp_stats_batches=0"):
        apply_overrides(cfg, ["sp_stats_batches=0"])
    with pytest.raises(ValueError, match="sp_kind"):
        apply_overrides(cfg, ["stages.1.sp_kind=l3"])
    assert apply_overrides(cfg, ["stages.1.sp_kind=l2_norm"]).stages[1].sp_kind == "l2_norm"


def test_an_export_from_before_an_option_existed_is_reused(tmp_path, run: Path, image_folder) -> None:
    out = tmp_path / "older"
    shutil.copytree(run / "stage-1", out / "stage-1")
    document = json.loads((out / "stage-1" / "export" / "config.json").read_text())
    inputs = document["meta"]["inputs"]
    del inputs["sp_stats_batches"], inputs["stages"][0]["vf_weight_mode"]  # as an older aligntok wrote it
    (out / "stage-1" / "export" / "config.json").write_text(json.dumps(document))
    cfg = apply_overrides(tokenizer_train_recipe("debug"), [f"data={image_folder}"])
    log = (out / "stage-1" / "log.jsonl").read_text()
    train_tokenizer(cfg, out=out, stage="1")  # the new options at their defaults: the same stage
    assert (out / "stage-1" / "log.jsonl").read_text() == log  # reused, not trained again
    changed = apply_overrides(cfg, ["stages.0.vf_weight_mode=adaptive"])
    with pytest.raises(ValueError, match=r"stages\.0\.vf_weight_mode"):
        train_tokenizer(changed, out=out, stage="1")


def test_a_finished_stage_lengthened_equals_the_longer_run_and_a_cosine_one_is_refused(
    tmp_path, image_folder, capsys
) -> None:
    recipe = tokenizer_train_recipe("debug-vae")
    cfg = lambda *sets: apply_overrides(recipe, [f"data={image_folder}", *sets])  # noqa: E731
    train_tokenizer(cfg("stages.0.steps=2"), out=tmp_path / "short")
    with pytest.raises(ValueError, match="--resume"):
        train_tokenizer(cfg("stages.0.steps=4"), out=tmp_path / "short")
    capsys.readouterr()
    longer = train_tokenizer(cfg("stages.0.steps=4"), out=tmp_path / "short", resume=True)
    said = capsys.readouterr().out
    assert "lengthened from 2 to 4 steps" in said and "resumed at step 2" in said
    fresh = train_tokenizer(cfg("stages.0.steps=4"), out=tmp_path / "fresh")
    a, b = Tokenizer.from_pretrained(longer).state_dict(), Tokenizer.from_pretrained(fresh).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(tmp_path / "short" / "stage-all" / "log.jsonl")] == [
        r["step"] for r in read_log(tmp_path / "fresh" / "stage-all" / "log.jsonl")
    ]
    # Under a cosine schedule every step's lr depends on the length: a longer stage is another run.
    cosine = ("stages.0.schedule=cosine",)
    train_tokenizer(cfg(*cosine, "stages.0.steps=2"), out=tmp_path / "cos")
    with pytest.raises(ValueError, match=r"other settings \(differs in: stages\.0\.steps"):
        train_tokenizer(cfg(*cosine, "stages.0.steps=4"), out=tmp_path / "cos", resume=True)
