"""Latent cache, DiT training loop and the sample command, end to end on the debug recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aligntok import flow
from aligntok import generate as generate_module
from aligntok.config import apply_overrides
from aligntok.data.latents import LatentCache, build_cache, same_latent_space
from aligntok.exports import load_dit
from aligntok.generate import generate
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.dit import dit_train_recipe
from aligntok.recipes.tokenizer import tokenizer_preset
from aligntok.sampling import SampleConfig
from aligntok.train import dit as dit_train
from aligntok.train.common import EMA, SpikeGuard, read_log
from aligntok.train.dit import train_dit
from conftest import failing_on_call, slow_fixture


@slow_fixture(scope="module")
def setup(tmp_path_factory, image_folder, debug_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit")
    tok_a = debug_tokenizer
    torch.manual_seed(1)
    tok_b = Tokenizer(tokenizer_preset("debug")).save_pretrained(root / "tok_b")
    data = image_folder
    cache = build_cache(tokenizer_dir=tok_a, data=str(data), out=root / "cache", flip=True, shard_size=5)
    return {"root": root, "tok_a": tok_a, "tok_b": tok_b, "data": data, "cache": cache}


def _cfg(**kw):
    return apply_overrides(dit_train_recipe("debug"), [f"{k}={json.dumps(v)}" for k, v in kw.items()])


def test_cache_layout_stats_and_flips(setup) -> None:
    cache = LatentCache.load(setup["cache"])
    tok = Tokenizer.from_pretrained(setup["tok_a"])
    assert len(cache) == 24 and cache.meta["num_shards"] == 3  # 12 images x (plain + mirrored), 5 per shard
    assert cache.meta["classes"] == ["blue", "red"]
    assert list(cache.latents.shape[1:]) == list(tok.latent_shape)
    z = cache.latents.double()
    torch.testing.assert_close(cache.mean.double(), z.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        cache.std.double(), z.transpose(0, 1).flatten(1).std(1, unbiased=False), rtol=1e-3, atol=1e-5
    )
    norm = cache.normalized()
    assert norm.mean().abs() < 1e-4 and (norm.std() - 1).abs() < 0.05
    # Training reads rows on demand, across shard boundaries, in the order asked.
    idx = torch.tensor([23, 0, 5, 4, 9, 10, 14, 15])
    assert torch.equal(cache.rows(idx), cache.latents[idx])
    # A cached latent is the tokenizer's encoding of its image (mirrored where flagged).
    from safetensors.torch import load_file

    from aligntok.data import build_dataset

    flipped = load_file(str(setup["cache"] / "shard-00001.safetensors"))["flipped"]
    dataset = build_dataset(str(setup["data"]), resolution=32)
    assert sorted(cache.indices.tolist()) == sorted(list(range(12)) * 2)
    for row in (0, 5, 7):
        image = dataset[int(cache.indices[row])]["image"][None]
        is_flipped = bool(
            torch.cat(
                [load_file(str(setup["cache"] / f"shard-0000{i}.safetensors"))["flipped"] for i in range(3)]
            )[row]
        )
        with torch.no_grad():
            expected = tok.encode(image.flip(-1) if is_flipped else image)[0]
        torch.testing.assert_close(cache.latents[row], expected, rtol=1e-4, atol=1e-4)
    assert flipped.sum() > 0


def test_cache_refuses_other_tokenizer_and_resumes(setup, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"another request .*tokenizer_hash"):
        build_cache(tokenizer_dir=setup["tok_b"], data=str(setup["data"]), out=setup["cache"])
    # An interrupted cache (meta missing, one shard missing) is completed, not redone.
    out = tmp_path / "cache"
    build_cache(tokenizer_dir=setup["tok_a"], data=str(setup["data"]), out=out, shard_size=5)
    (out / "meta.json").unlink()
    kept = (out / "shard-00000.safetensors").stat().st_mtime_ns
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="not a complete latent cache"):
        LatentCache.load(out)
    build_cache(tokenizer_dir=setup["tok_a"], data=str(setup["data"]), out=out, shard_size=5)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == kept
    assert len(LatentCache.load(out)) == 12


def test_train_resume_is_exact(setup, tmp_path, monkeypatch) -> None:
    cfg = _cfg(steps=8, ckpt_every=3, log_every=2, batch_size=8)
    full = train_dit(cfg, latents=setup["cache"], out=tmp_path / "full")
    real = SpikeGuard.is_bad
    monkeypatch.setattr(SpikeGuard, "is_bad", failing_on_call(real, 5))  # killed during step 5
    with pytest.raises(KeyboardInterrupt):
        train_dit(cfg, latents=setup["cache"], out=tmp_path / "cut")
    monkeypatch.setattr(SpikeGuard, "is_bad", real)
    with pytest.raises(ValueError, match="--resume"):
        train_dit(cfg, latents=setup["cache"], out=tmp_path / "cut")
    resumed = train_dit(cfg, latents=setup["cache"], out=tmp_path / "cut", resume=True)
    a, b = load_dit(full).model.state_dict(), load_dit(resumed).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another config"):
        train_dit(
            _cfg(steps=9, ckpt_every=3, batch_size=8),
            latents=setup["cache"],
            out=tmp_path / "cut",
            resume=True,
        )


def test_training_lowers_the_loss(setup, tmp_path) -> None:
    cfg = _cfg(steps=60, log_every=10, batch_size=8, lr=3e-3)
    train_dit(cfg, latents=setup["cache"], out=tmp_path / "run")
    losses = [r["loss"] for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert len(losses) == 6 and np.mean(losses[-2:]) < 0.8 * losses[0]


def test_nan_loss_is_skipped_or_stops(setup, tmp_path, monkeypatch) -> None:
    real = flow.flow_loss
    calls = {"n": 0}

    def nan_on_third(pred, target, **kw):
        calls["n"] += 1
        loss = real(pred, target, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(dit_train.flow, "flow_loss", nan_on_third)
    train_dit(_cfg(steps=5, batch_size=8), latents=setup["cache"], out=tmp_path / "skip")
    events = [r for r in read_log(tmp_path / "skip" / "log.jsonl") if r.get("event") == "skipped_step"]
    assert [e["step"] for e in events] == [2]
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="training stopped"):
        train_dit(_cfg(steps=5, batch_size=8, on_spike="stop"), latents=setup["cache"], out=tmp_path / "stop")


def test_ema_decay_warms_up_then_caps() -> None:
    model = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.99)
    torch.nn.init.ones_(model.weight)
    ema.update(model, step=0)  # decay min(0.99, 1/10): the first update takes 90% of the new weights
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 2), 0.9))
    torch.nn.init.zeros_(model.weight)
    ema.update(model, step=10_000)  # late in a run the decay is the configured 0.99
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 2), 0.9 * 0.99))


def test_spike_guard() -> None:
    g = SpikeGuard(factor=10.0, max_skips=3)
    assert not g.is_bad(1.0) and not g.is_bad(1.2)
    assert g.is_bad(50.0) and g.is_bad(float("inf")) and g.skips == 2
    assert not g.is_bad(1.1) and g.skips == 0 and g.total_skips == 2


GUIDED3 = SampleConfig(steps=3, cfg_scale=2.0)


def test_sample_writes_pngs_grid_npz_and_refuses_other_tokenizer(setup, tmp_path) -> None:
    export = train_dit(_cfg(steps=4, batch_size=8), latents=setup["cache"], out=tmp_path / "run")
    out = generate(dit_dir=export, num=6, out=tmp_path / "samples", sample=GUIDED3, batch_size=4)
    arr = np.load(out / "samples.npz")
    assert arr["arr_0"].dtype == np.uint8 and arr["arr_0"].shape == (6, 32, 32, 3)
    assert sorted(np.bincount(arr["labels"]).tolist()) == [3, 3]
    assert len(list((out / "images").glob("*.png"))) == 6 and (out / "grid.png").exists()
    # Each batch draws its noise from (seed, batch index): rerunning reproduces the images exactly.
    again = generate(dit_dir=export, num=6, out=tmp_path / "again", sample=GUIDED3, batch_size=4)
    assert np.array_equal(np.load(again / "samples.npz")["arr_0"], arr["arr_0"])
    with pytest.raises(ValueError, match="another latent space"):
        generate(
            dit_dir=export,
            num=2,
            out=tmp_path / "bad",
            sample=SampleConfig(steps=2),
            tokenizer_dir=setup["tok_b"],
        )
    # Another decoder for the same latent space (a longer stage 3) is accepted, and decodes differently.
    refined = Tokenizer.from_pretrained(setup["tok_a"])
    with torch.no_grad():
        next(refined.decoder.parameters()).mul_(1.5)
    refined_dir = refined.save_pretrained(tmp_path / "refined")
    assert same_latent_space(setup["tok_a"], refined_dir) and not same_latent_space(
        setup["tok_a"], setup["tok_b"]
    )
    other = generate(
        dit_dir=export, num=6, out=tmp_path / "refined-samples", sample=GUIDED3, batch_size=4,
        tokenizer_dir=refined_dir,
    )  # fmt: skip
    assert not np.array_equal(np.load(other / "samples.npz")["arr_0"], arr["arr_0"])
    with pytest.raises(ValueError, match="out of range"):
        generate(dit_dir=export, num=2, out=tmp_path / "bad", sample=SampleConfig(steps=2), class_id=7)


def test_interrupted_sampling_resumes_from_its_finished_batches(setup, tmp_path, monkeypatch) -> None:
    export = train_dit(_cfg(steps=4, batch_size=8), latents=setup["cache"], out=tmp_path / "run")
    kw = {
        "dit_dir": export,
        "num": 10,
        "sample": SampleConfig(steps=2, cfg_scale=2.0),
        "batch_size": 3,
        "save_pngs": False,
    }
    whole = np.load(generate(out=tmp_path / "whole", **kw) / "samples.npz")["arr_0"]  # 4 batches: 3+3+3+1

    class Interrupted(Exception):
        pass

    real, calls = generate_module.sample_latents, {"n": 0, "stop_at": 3}

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "sample_latents", counted)
    with pytest.raises(Interrupted):
        generate(out=tmp_path / "cut", **kw)
    partial = tmp_path / "cut" / "partial"
    assert sorted(p.name for p in partial.glob("*.npy")) == ["batch-000000.npy", "batch-000001.npy"]
    calls.update(n=0, stop_at=None)
    resumed = generate(out=tmp_path / "cut", **kw)
    assert calls["n"] == 2  # batches 2 and 3 only
    assert np.array_equal(np.load(resumed / "samples.npz")["arr_0"], whole)  # the same images, in order
    assert not partial.exists()
    # Batches of other settings are not mixed in: a different guidance scale samples every batch again.
    generate_module.write_json({"cfg": 2.0}, partial / "settings.json")
    np.save(partial / "batch-000000.npy", np.zeros((3, 32, 32, 3), np.uint8))
    calls["n"] = 0
    generate(out=tmp_path / "cut", **kw | {"sample": SampleConfig(steps=2, cfg_scale=3.0)})
    assert calls["n"] == 4
