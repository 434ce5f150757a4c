"""2 gloo ranks on CPU against one process: the same losses and gradients (DiT; tokenizer stages 1, 2, 3;
DDP and FSDP2), a state saved on 2 ranks resumed on 1, the latent cache and the sampler under 2 ranks, and
`torchrun ... -m aligntok dit train` end to end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import aligntok
from aligntok import assets, distributed
from aligntok.checkpoint import latest_checkpoint, read_training_state
from aligntok.config import apply_overrides
from aligntok.data.latents import LatentCache, build_cache
from aligntok.exports import load_dit
from aligntok.generate import generate
from aligntok.models.tokenizer import Tokenizer
from aligntok.parallelize import full_state
from aligntok.recipes.dit import dit_train_recipe
from aligntok.recipes.tokenizer import tokenizer_train_recipe
from aligntok.sampling import SampleConfig
from aligntok.train.common import SpikeGuard, read_log
from aligntok.train.dit import train_dit
from aligntok.train.tokenizer import train_tokenizer
from conftest import failing_on_call, spawn_ranks

pytestmark = pytest.mark.distributed
MODES = ("ddp", "fsdp")


class _RecordGrads:
    """Records the gradients every AdamW step receives (full tensors, also under FSDP), in order."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self._real = torch.optim.AdamW.step

    def __enter__(self) -> _RecordGrads:
        record, real = self.grads, self._real

        def step(opt, *args, **kwargs):
            params = [p for g in opt.param_groups for p in g["params"]]
            full = full_state({str(i): p.grad for i, p in enumerate(params) if p.grad is not None})
            record.append(list(full.values()))
            return real(opt, *args, **kwargs)

        torch.optim.AdamW.step = step
        return self

    def __exit__(self, *exc: object) -> None:
        torch.optim.AdamW.step = self._real


def _assert_same_grads(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b) and a
    for step_a, step_b in zip(a, b):
        assert len(step_a) == len(step_b)
        for x, y in zip(step_a, step_b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


_needs_minilm = pytest.mark.skipif(not assets.is_present("minilm"), reason="needs the minilm asset")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, image_folder, debug_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("dist") / "cache"
    data = str(image_folder)
    return build_cache(tokenizer_dir=debug_tokenizer, data=data, out=out, flip=True, shard_size=5)


def _dit_cfg(mode: str, recipe: str = "debug", **kw: Any):
    sets = {"batch_size": 8, "log_every": 1, "parallel.mode": mode, **kw}
    return apply_overrides(dit_train_recipe(recipe), [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def _dit_one_step(cache: Path, out: Path, recipe: str) -> None:
    for mode, bf16 in [(m, False) for m in MODES] + [("fsdp", True)]:
        run = out / f"{mode}-bf16" if bf16 else out / mode
        with _RecordGrads() as rec:
            train_dit(_dit_cfg(mode, recipe, steps=1, bf16=bf16), latents=cache, out=run)
        if distributed.world().is_main:
            torch.save(rec.grads, run / "grads.pt")


# The class DiT, and the text MMDiT on caption features (the captions of the image folder are its class names;
# the caption cache is made on first use, here by the one-process run, and read by both ranks).
@pytest.mark.parametrize("recipe", ["debug", pytest.param("t2i-debug", marks=_needs_minilm)])
def test_dit_step_on_2_ranks_equals_one_process(cache, tmp_path, recipe) -> None:
    with _RecordGrads() as ref:
        train_dit(_dit_cfg("none", recipe, steps=1), latents=cache, out=tmp_path / "one")
    spawn_ranks(_dit_one_step, cache, tmp_path, recipe)
    ref_loss = read_log(tmp_path / "one" / "log.jsonl")[0]["loss"]
    for mode in MODES:
        _assert_same_grads(ref.grads, torch.load(tmp_path / mode / "grads.pt"))
        assert read_log(tmp_path / mode / "log.jsonl")[0]["loss"] == pytest.approx(ref_loss, rel=1e-6)
    # FSDP2 + bf16 (blocks' weights all-gathered in bf16, autocast): within bf16 error of fp32.
    (want,), (got,) = ref.grads, torch.load(tmp_path / "fsdp-bf16" / "grads.pt")
    want, got = torch.cat([g.flatten() for g in want]), torch.cat([g.flatten() for g in got])
    assert 0 < (got - want).norm() / want.norm() < 2e-2
    assert read_log(tmp_path / "fsdp-bf16" / "log.jsonl")[0]["loss"] == pytest.approx(ref_loss, rel=1e-2)


def _tok_cfg(mode: str):
    # One step per stage with the GAN on from the start, so that every loss term and both optimizers act;
    # FSDP2 with activation checkpointing (of the trained encoder blocks and decoder levels).
    sets = ["stages.0.gan_start=0", "lpips_net=alex", f"parallel.mode={mode}"]
    sets += [f"parallel.activation_checkpointing={json.dumps(mode == 'fsdp')}"]
    return apply_overrides(tokenizer_train_recipe("debug"), sets + [f"stages.{i}.steps=1" for i in range(3)])


def _tokenizer_stages(ref: Path, out: Path, data: str) -> None:
    """Each stage k on 2 ranks, starting from the one-process run's stage k-1 (export, discriminator)."""
    for mode in MODES:
        for k in "123":
            run = out / mode / k
            if distributed.world().is_main:
                run.mkdir(parents=True)
                for j in range(1, int(k)):
                    shutil.copytree(ref / f"stage-{j}", run / f"stage-{j}")
            distributed.barrier()
            cfg = apply_overrides(_tok_cfg(mode), [f"data={data}"])
            with _RecordGrads() as rec:
                train_tokenizer(cfg, out=run, stage=k)
            if distributed.world().is_main:
                torch.save(rec.grads, run / "grads.pt")


@pytest.mark.slow
def test_tokenizer_step_of_each_stage_on_2_ranks_equals_one_process(image_folder, tmp_path) -> None:
    ref = tmp_path / "one"
    with _RecordGrads() as rec:
        train_tokenizer(apply_overrides(_tok_cfg("none"), [f"data={image_folder}"]), out=ref)
    # Per stage: the generator's step, then the discriminator's.
    ref_grads = {k: rec.grads[2 * i : 2 * i + 2] for i, k in enumerate("123")}
    spawn_ranks(_tokenizer_stages, ref, tmp_path, str(image_folder))
    for mode in MODES:
        for k in "123":
            _assert_same_grads(ref_grads[k], torch.load(tmp_path / mode / k / "grads.pt"))
            got = read_log(tmp_path / mode / k / f"stage-{k}" / "log.jsonl")[0]
            want = read_log(ref / f"stage-{k}" / "log.jsonl")[0]
            for key in ("loss", "l1", "lpips", "g", "d", "gan_weight") + (("sp",) if k == "2" else ()):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (mode, k, key)
        # After the last stage both ranks encode half the training set for the latent statistics; stage 3
        # leaves encoder and adapter as stage 2 made them, so the statistics are the one process's.
        a, b = (
            Tokenizer.from_pretrained(ref / "export"),
            Tokenizer.from_pretrained(tmp_path / mode / "3" / "export"),
        )
        torch.testing.assert_close(a.latent_mean, b.latent_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.latent_std, b.latent_std, rtol=1e-5, atol=1e-6)


class _Interrupt(Exception):
    pass


def _dit_interrupted(cfg, cache: Path, out: Path) -> None:
    """Train on 2 ranks and die during step 5 (the state of step 3 is on disk)."""
    real = SpikeGuard.is_bad
    SpikeGuard.is_bad = failing_on_call(real, 5, _Interrupt)  # dies during step 5
    with contextlib.suppress(_Interrupt):
        train_dit(cfg, latents=cache, out=out)


def test_dit_state_saved_on_2_ranks_resumes_on_1(cache, tmp_path) -> None:
    cfg = _dit_cfg("fsdp", steps=6, ckpt_every=3)
    full = train_dit(cfg, latents=cache, out=tmp_path / "full")
    spawn_ranks(_dit_interrupted, cfg, cache, tmp_path / "cut")
    saved = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert saved is not None and saved.name == "step-0000003"
    assert sorted(p.name for p in saved.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert read_training_state(saved)["world_size"] == 2
    resumed = train_dit(cfg, latents=cache, out=tmp_path / "cut", resume=True)  # one process
    a, b = load_dit(full).model.state_dict(), load_dit(resumed).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    losses = [r["loss"] for r in read_log(tmp_path / "full" / "log.jsonl")]
    cut = [r["loss"] for r in read_log(tmp_path / "cut" / "log.jsonl")]
    assert len(losses) == 6 and cut[:4] == pytest.approx(losses[:4], rel=1e-5)
    assert cut[-3:] == pytest.approx(losses[-3:], rel=1e-4)


def _cache_and_sample(tokenizer: Path, data: str, dit: Path, out: Path) -> None:
    build_cache(tokenizer_dir=tokenizer, data=data, out=out / "cache", flip=True, shard_size=5)
    generate(
        dit_dir=dit, num=6, out=out / "samples", sample=SampleConfig(steps=2, cfg_scale=2.0), batch_size=2
    )


def test_latent_cache_and_sampler_on_2_ranks_equal_one_process(
    cache, debug_tokenizer, image_folder, tmp_path
) -> None:
    dit = train_dit(_dit_cfg("none", steps=2), latents=cache, out=tmp_path / "dit")
    one = generate(
        dit_dir=dit, num=6, out=tmp_path / "one", sample=SampleConfig(steps=2, cfg_scale=2.0), batch_size=2
    )
    spawn_ranks(_cache_and_sample, debug_tokenizer, str(image_folder), dit, tmp_path / "two")
    a, b = LatentCache.load(cache), LatentCache.load(tmp_path / "two" / "cache")

    def rest(meta: dict) -> dict:
        return {k: v for k, v in meta.items() if k not in ("mean", "std")}

    # Encoding in batches of another size may round differently (the latents agree to float tolerance, not
    # bit for bit), so the statistics computed from them are compared to the same tolerance.
    assert rest(a.meta) == rest(b.meta)
    torch.testing.assert_close((a.mean, a.std), (b.mean, b.std))
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.latents, b.latents)
    npz_one, npz_two = np.load(one / "samples.npz"), np.load(tmp_path / "two" / "samples" / "samples.npz")
    assert np.array_equal(npz_one["arr_0"], npz_two["arr_0"])
    assert np.array_equal(npz_one["labels"], npz_two["labels"])


def test_torchrun_dit_train_cli(cache, tmp_path) -> None:
    src = str(Path(aligntok.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNTOK_DEVICE": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "aligntok", "dit", "train", "--recipe", "debug", "--latents", str(cache), "--out", str(out)]
    cmd += ["--set", "steps=4", "--set", "batch_size=8", "--set", "ckpt_every=2", "--set", "log_every=2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"export at {out / 'export'}" in result.stdout
    assert result.stdout.count("DiT trained for 4 steps") == 1  # rank 0 speaks, rank 1 is quiet
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [2, 4]  # one log, written by rank 0
    assert read_training_state(latest_checkpoint(out / "checkpoints"))["world_size"] == 2
    assert load_dit(out / "export").model.config.depth == 2


def test_modes_resolve_and_activation_checkpointing_keeps_keys_and_grads() -> None:
    from aligntok.models.dit import DiT, dit_preset
    from aligntok.parallelize import ParallelConfig, parallelize, resolve_mode

    modes = ("auto", "none", "ddp", "fsdp")
    assert [resolve_mode(m, 1, process_group=False) for m in modes] == ["none"] * 4
    assert [resolve_mode(m, 1, process_group=True) for m in modes] == ["none", "none", "ddp", "fsdp"]
    assert [resolve_mode(m, 2, process_group=True) for m in modes] == ["ddp", "none", "ddp", "fsdp"]
    with pytest.raises(ValueError, match=r"parallel\.mode"):
        ParallelConfig(mode="zero3")

    def grads(checkpointing: bool) -> tuple[list[str], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = DiT(dit_preset("debug/1", in_channels=4, input_size=4, num_classes=2))
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # a non-zero output
        wrapped = parallelize(model, ParallelConfig(activation_checkpointing=checkpointing))
        wrappers = [m for m in model.modules() if type(m).__name__ == "CheckpointWrapper"]
        assert len(wrappers) == (2 if checkpointing else 0)  # one per block of the debug DiT
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(4, 4, 4, 4, generator=g), torch.rand(4, generator=g)
        wrapped(x, t, torch.tensor([0, 1, 2, 0])).square().mean().backward()
        return list(model.state_dict()), [p.grad for p in model.parameters()]

    (keys, plain), (ac_keys, ac) = grads(False), grads(True)
    assert keys == ac_keys
    assert all(torch.equal(a, b) for a, b in zip(plain, ac)) and any(a.abs().sum() > 0 for a in plain)
