"""Faults and bad input (issue "Reliability and security"): every refused request is one line with no
traceback and leaves the last good state as it was; no run mixes two sources; one writer per run
directory; a kill -9 at any moment resumes to the same bytes. docs/reliability.md lists every case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aligntok import rundir
from aligntok.cli import main
from aligntok.config import apply_overrides
from aligntok.data.latents import build_cache
from aligntok.exports import load_dit
from aligntok.generate import generate
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.tokenizer import tokenizer_preset, tokenizer_train_recipe
from aligntok.sampling import SampleConfig
from aligntok.train.common import SpikeGuard, read_log
from aligntok.train.dit import DiTTrainConfig, train_dit
from aligntok.train.tokenizer import train_tokenizer
from conftest import failing_on_call, slow_fixture


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 1 and one line on stderr with no traceback; return the line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1, err
    assert err.startswith("aligntok: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _dit_cfg(**kw) -> DiTTrainConfig:
    return DiTTrainConfig(model="debug/1", batch_size=8, lr=1e-3, ema_decay=0.9, **{"steps": 6, **kw})


@slow_fixture(scope="module")
def caches(tmp_path_factory, image_folder) -> dict[str, Path]:
    """Latent caches of the same images under two tokenizers (A and B, different random decoders)."""
    root = tmp_path_factory.mktemp("faults")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        tok = Tokenizer(tokenizer_preset("debug")).save_pretrained(root / f"tok-{name}")
        out[f"tok_{name}"] = tok
        out[name] = build_cache(
            tokenizer_dir=tok, data=str(image_folder), out=root / f"cache-{name}", flip=True
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line each, nothing written


BAD_SETS = [
    ("lr=-0.5", "must be >= 0"),
    ("steps=0", "must be > 0"),
    ("steps=-3", "must be > 0"),
    ("batch_size=-4", "must be > 0"),
    ("batch_size=0", "must be > 0"),
    ("ckpt_every=0", "must be > 0"),
    ("log_every=0", "must be > 0"),
    ("label_dropout=1.5", "within [0, 1]"),
    ("ema_decay=2", "within [0, 1]"),
    ("betas=[0.9,1.5]", "[0, 1)"),
    ("stepz=3", "no field"),
    ("lr=fast", "expected float"),
    ("batch_size=4096", "exceeds the"),
]


@pytest.mark.parametrize(("override", "message"), BAD_SETS)
def test_dit_train_refuses_out_of_range_settings_before_writing(capsys, caches, tmp_path, override, message):
    out = tmp_path / "run"
    argv = ["dit", "train", "--recipe", "debug", "--latents", str(caches["a"]), "--out", str(out)]
    assert message in _one_line_error(capsys, [*argv, "--set", override])
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.0.lr=-1e-4", "must be >= 0"),
        ("stages.1.steps=0", "must be > 0"),
        ("stages.1.sp_weight=-1", "must be >= 0"),
        ("stages.1.ema_decay=1.5", "within [0, 1]"),
        ("batch_size=0", "must be > 0"),
        ("val_every=0", "must be > 0"),
        ("data=/no/such/folder", "neither a dataset name"),
    ],
)
def test_tokenizer_train_refuses_bad_settings_before_writing(capsys, tmp_path, override, message):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--recipe", "debug", "--out", str(out), "--set", override]
    assert message in _one_line_error(capsys, argv)
    assert not out.exists()  # a refused command leaves no empty run folder


def test_ordinary_mistakes_are_one_line(capsys, caches, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    latents = ["--latents", str(caches["a"])]
    assert "existing file" in _one_line_error(
        capsys, ["dit", "train", "--recipe", "debug", *latents, "--out", str(a_file)]
    )
    assert "cannot create" in _one_line_error(
        capsys, ["dit", "train", "--recipe", "debug", *latents, "--out", str(a_file / "run")]
    )
    assert "must be >= 1" in _one_line_error(
        capsys, ["sample", "--dit", str(caches["a"]), "--num", "0", "--out", str(tmp_path / "s")]
    )
    not_zip = tmp_path / "samples.npz"
    not_zip.write_bytes(b"\x80\x04K\x01.")  # a pickle, not an .npz
    err = _one_line_error(capsys, ["eval", "--samples", str(not_zip), "--ref", str(not_zip)])
    assert "not an .npz file" in err and "pickle" not in err


def test_an_unwritable_run_directory_is_one_line(capsys, caches, tmp_path, monkeypatch):
    # As root a chmod does not stop writes, so the refusal of the OS is what is simulated here.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(Path, "mkdir", refuse)
    argv = ["dit", "train", "--recipe", "debug", "--latents", str(caches["a"]), "--out", str(tmp_path / "ro")]
    assert "Permission denied" in _one_line_error(capsys, argv)


def test_debug_shows_the_traceback(caches, tmp_path):
    with pytest.raises(ValueError, match="must be > 0"):
        argv = [
            "dit",
            "train",
            "--recipe",
            "debug",
            "--latents",
            str(caches["a"]),
            "--out",
            str(tmp_path / "r"),
        ]
        main([*argv, "--set", "steps=0", "--debug"])


# ---------------------------------------------------------------------------------------------------------
# No run mixes two sources; config.json is written only once a run is accepted


def test_a_refused_resume_keeps_the_config_and_the_checkpoint(capsys, caches, tmp_path):
    out = tmp_path / "dit"
    argv = ["dit", "train", "--recipe", "debug", "--latents", str(caches["a"]), "--out", str(out)]
    argv += ["--set", "steps=4", "--set", "ckpt_every=2", "--set", "batch_size=8"]
    main(argv)
    capsys.readouterr()
    config = (out / "config.json").read_text()
    latest = (out / "checkpoints" / "latest").read_text()
    err = _one_line_error(capsys, [*argv, "--resume", "--set", "lr=0.5"])
    assert "another config (differs in: lr)" in err
    assert (out / "config.json").read_text() == config
    assert (out / "checkpoints" / "latest").read_text() == latest


def test_dit_resume_on_another_cache_is_refused(caches, tmp_path, monkeypatch):
    out = tmp_path / "dit"
    real = SpikeGuard.is_bad
    monkeypatch.setattr(SpikeGuard, "is_bad", failing_on_call(real, 4))  # killed during step 4
    with pytest.raises(KeyboardInterrupt):
        train_dit(_dit_cfg(ckpt_every=2), latents=caches["a"], out=out)
    monkeypatch.setattr(SpikeGuard, "is_bad", real)
    with pytest.raises(ValueError, match=r"other latents .*differs in: tokenizer_hash"):
        train_dit(_dit_cfg(ckpt_every=2), latents=caches["b"], out=out, resume=True)
    export = train_dit(_dit_cfg(ckpt_every=2), latents=caches["a"], out=out, resume=True)
    assert (
        load_dit(export).tokenizer_hash
        == json.loads((caches["a"] / "meta.json").read_text())["tokenizer"]["hash"]
    )
    steps = [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r and "event" not in r]
    assert steps == sorted(set(steps)), "a resumed run logs each step once"


def test_an_interrupted_cache_refuses_another_tokenizer_and_other_data(
    caches, image_folder, tmp_path, monkeypatch
):
    out = tmp_path / "cache"
    import aligntok.data.latents as latents

    real, calls = latents.save_file, {"n": 0}

    def die_after_first_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(latents, "save_file", die_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tokenizer_dir=caches["tok_a"], data=str(image_folder), out=out, shard_size=5)
    monkeypatch.setattr(latents, "save_file", real)
    assert (out / "shard-00000.safetensors").exists() and not (out / "meta.json").exists()
    with pytest.raises(ValueError, match="differs in: tokenizer_hash"):
        build_cache(tokenizer_dir=caches["tok_b"], data=str(image_folder), out=out, shard_size=5)
    with pytest.raises(ValueError, match="differs in: flip"):
        build_cache(tokenizer_dir=caches["tok_a"], data=str(image_folder), out=out, shard_size=5, flip=True)
    build_cache(tokenizer_dir=caches["tok_a"], data=str(image_folder), out=out, shard_size=5)
    # Finished: another split, flip or dataset is refused too, not reported "complete".
    with pytest.raises(ValueError, match="differs in: split"):
        build_cache(tokenizer_dir=caches["tok_a"], data=str(image_folder), out=out, shard_size=5, split="val")
    assert len(load_file(str(out / "shard-00000.safetensors"))["latents"]) == 5


def test_fewer_samples_into_a_used_folder_leave_only_theirs(caches, tmp_path):
    export = train_dit(_dit_cfg(steps=2), latents=caches["a"], out=tmp_path / "dit")
    out = tmp_path / "samples"
    generate(dit_dir=export, num=7, out=out, sample=SampleConfig(steps=2), batch_size=4)
    generate(dit_dir=export, num=3, out=out, sample=SampleConfig(steps=2), batch_size=4)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(3)]
    assert len(np.load(out / "samples.npz")["arr_0"]) == 3


@slow_fixture(scope="module")
def debug_run(tmp_path_factory, image_folder) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("tokrun") / "run"
    sets = ["--set", f"data={image_folder}"]
    main(["tokenizer", "train", "--recipe", "debug", "--out", str(out), *sets])
    return out, sets


def test_another_recipe_on_a_finished_run_is_refused(capsys, debug_run):
    out, sets = debug_run
    config = (out / "config.json").read_text()
    err = _one_line_error(capsys, ["tokenizer", "train", "--recipe", "emoji32", "--out", str(out), *sets])
    assert "stage 1" in err and "trained with other settings" in err
    assert (out / "config.json").read_text() == config


def test_stage_2_on_another_configs_stage_1_is_refused(capsys, debug_run):
    out, sets = debug_run
    argv = ["tokenizer", "train", "--recipe", "debug", "--out", str(out), "--stage", "2", *sets]
    err = _one_line_error(capsys, [*argv, "--set", "stages.0.lr=3e-4"])
    assert "differs in: stages.0.lr" in err
    main([*argv, "--set", "stages.2.steps=5"])  # stage 3's settings are not stage 2's inputs: accepted


def test_a_non_finite_tokenizer_loss_is_skipped_then_stops(image_folder, tmp_path, monkeypatch):
    import aligntok.train.tokenizer_stage as stage_module

    cfg = apply_overrides(
        tokenizer_train_recipe("debug"), [f"data={image_folder}", "stages.0.max_consecutive_skips=1"]
    )
    real, calls = stage_module.stage_losses, {"n": 0, "bad": {2}}

    def nan_at(*args, **kwargs):
        calls["n"] += 1
        total, recon, losses = real(*args, **kwargs)
        return (total * float("nan"), recon, losses) if calls["n"] in calls["bad"] else (total, recon, losses)

    monkeypatch.setattr(stage_module, "stage_losses", nan_at)
    monkeypatch.setattr("aligntok.train.tokenizer.stage_losses", nan_at)
    train_tokenizer(cfg, out=tmp_path / "skip", stage="1")
    events = [
        r for r in read_log(tmp_path / "skip" / "stage-1" / "log.jsonl") if r.get("event") == "skipped_step"
    ]
    assert [e["step"] for e in events] == [1]
    calls.update(n=0, bad={2, 3, 4})
    with pytest.raises(RuntimeError, match=r"non-finite .*2 steps in a row.*(checkpoint|no checkpoint)"):
        train_tokenizer(cfg, out=tmp_path / "stop", stage="1")


# ---------------------------------------------------------------------------------------------------------
# One writer per run directory


def test_a_second_process_on_a_run_directory_is_refused(capsys, caches, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom aligntok.rundir import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["dit", "train", "--recipe", "debug", "--latents", str(caches["a"]), "--out", str(out)]
        err = _one_line_error(capsys, argv)
        assert f"pid {holder.pid}" in err and "in use by another aligntok process" in err
        assert not (out / "config.json").exists() and not (out / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing anything by hand: the next command takes the lock over.
    export = train_dit(_dit_cfg(steps=2), latents=caches["a"], out=out)
    assert "taking over the lock" in capsys.readouterr().out and export.is_dir()
    assert not (out / rundir.LOCK_NAME).exists()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with (
        rundir.run_lock(tmp_path / "r"),
        pytest.raises(rundir.RunDirectoryBusy),
        rundir.run_lock(tmp_path / "r"),
    ):
        pass


# ---------------------------------------------------------------------------------------------------------
# kill -9 at random points and inside checkpoint writes


KILL_STEPS = 60


def _train_cmd(latents: Path, out: Path, resume: bool) -> list[str]:
    sets = [
        "--set",
        f"steps={KILL_STEPS}",
        "--set",
        "ckpt_every=2",
        "--set",
        "log_every=1",
        "--set",
        "batch_size=8",
    ]
    return [sys.executable, "-m", "aligntok", "dit", "train", "--recipe", "debug", "--latents", str(latents),
            "--out", str(out), *sets] + (["--resume"] if resume else [])  # fmt: skip


@pytest.mark.slow
def test_kill_9_at_random_points_and_inside_checkpoint_writes_resumes_bit_identical(caches, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_train_cmd(caches["a"], full, False), check=True, env=env, capture_output=True)
    cut = tmp_path / "cut"
    rng = np.random.default_rng(0)
    log = cut / "log.jsonl"
    for attempt in range(4):
        proc = subprocess.Popen(
            _train_cmd(caches["a"], cut, attempt > 0),
            env=env,
            stderr=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        if attempt % 2 == 0:  # inside a checkpoint write: the moment its temporary directory exists

            def due() -> bool:
                return bool(list((cut / "checkpoints").glob(".step-*")))
        else:  # at a random step of the run
            target = len(read_log(log)) + int(rng.integers(2, 9))

            def due(target: int = target) -> bool:
                return len(read_log(log)) >= target

        while proc.poll() is None and time.time() < deadline and not due():
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (cut / "export").exists()
    subprocess.run(_train_cmd(caches["a"], cut, True), check=True, env=env, capture_output=True)
    a, b = load_dit(full / "export").model.state_dict(), load_dit(cut / "export").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_log(cut / "log.jsonl") if "loss" in r]
    assert steps == list(range(1, KILL_STEPS + 1)), "every step is logged exactly once"
