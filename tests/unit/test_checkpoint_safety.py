"""No file of a training state can run code (issue #29). A pickle with a payload planted in any file that a
resume or a stage start reads does not run and the load is refused with one line, also when the manifest
was forged to match; a damaged state is refused with one line; a round trip keeps every value exactly.
docs/reliability.md, "Trust model"."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from aligntok import checkpoint
from aligntok.checkpoint import (
    MANIFEST,
    TrainingState,
    latest_checkpoint,
    module_state,
    read_training_state,
    set_module_state,
)
from aligntok.cli import main
from aligntok.train import tokenizer as tok_train
from aligntok.train.common import EMA, load_checkpoint, save_checkpoint, seed_everything
from conftest import slow_fixture

STATE_FILES = (".metadata", "__0_0.distcp", "state.json", "state.safetensors")


@dataclass(frozen=True)
class _Cfg:
    seed: int = 0
    lr: float = 1e-3


class _Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _parts(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, EMA, torch.Generator]:
    """A small model with AdamW state, an EMA and a noise generator, as the trainers hold them."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    ema = EMA(model, 0.9)
    ema.update(model, 0)
    return model, opt, ema, torch.Generator().manual_seed(seed + 5)


def _tensors(model: nn.Module, opt: torch.optim.Optimizer, ema: EMA) -> dict[str, Any]:
    return {"model": module_state(model, opt), "ema": ema.shadow}


GUARD = {"mean": 1 / 3, "skips": 1, "total_skips": 2}


@pytest.fixture
def saved(tmp_path) -> Path:
    """A training state as a trainer writes it; returns its step directory."""
    model, opt, ema, gen = _parts()
    save_checkpoint(
        tmp_path / "checkpoints", 7, cfg=_Cfg(), tensors=_tensors(model, opt, ema), generator=gen, guard=GUARD
    )
    path = latest_checkpoint(tmp_path / "checkpoints")
    assert path is not None
    return path


def _resume(path: Path) -> dict[str, Any]:
    """What `--resume` reads: every file of the state."""
    model, opt, ema, gen = _parts(seed=1)
    return load_checkpoint(path, cfg=_Cfg(), tensors=_tensors(model, opt, ema), generator=gen)


def _stage_start(path: Path) -> None:
    """What a tokenizer stage reads of the previous stage's state: the DCP index and tensors."""
    saved = TrainingState(path)
    assert "model" in tok_train._saved_parts(saved)
    model, _, _, _ = _parts(seed=1)
    saved.load_tensors({"model": module_state(model)})


def _forge_manifest(path: Path) -> None:
    """Rewrite the manifest to match whatever the directory now holds, as an attacker could."""
    document = json.loads((path / MANIFEST).read_text())
    names = sorted(n for n in os.listdir(path) if n != MANIFEST)
    document["files"] = {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in names}
    (path / MANIFEST).write_text(json.dumps(document))


def _plant(target: Path, marker: Path) -> None:
    """A working exploit in `target`: a torch.save file for the torch formats, a bare pickle elsewhere."""
    if target.suffix in (".pt", ".distcp"):
        torch.save(_Payload(marker), target)
    else:
        target.write_bytes(pickle.dumps(_Payload(marker)))


def _refused(read: Any, path: Path, capfd: pytest.CaptureFixture[str]) -> str:
    """`read()` raises one ValueError line naming `path`, and nothing prints a traceback."""
    with pytest.raises(ValueError) as info:
        read()
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert "weights_only=False" not in message and "weights_only" not in message, message
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    return message


def test_round_trip_keeps_tensors_and_scalars_exactly(saved) -> None:
    assert sorted(os.listdir(saved)) == sorted((MANIFEST, *STATE_FILES))
    manifest = json.loads((saved / MANIFEST).read_text())
    assert set(manifest["files"]) == set(STATE_FILES) and manifest["version"] == checkpoint.STATE_VERSION
    model, opt, ema, gen = _parts()
    seed_everything(3)
    save_checkpoint(
        saved.parent, 8, cfg=_Cfg(), tensors=_tensors(model, opt, ema), generator=gen, guard=GUARD
    )
    after = (random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=gen))
    seed_everything(4)
    fresh, fresh_opt, fresh_ema, fresh_gen = _parts(seed=1)
    tensors = _tensors(fresh, fresh_opt, fresh_ema)
    state = load_checkpoint(latest_checkpoint(saved.parent), cfg=_Cfg(), tensors=tensors, generator=fresh_gen)
    set_module_state(fresh, fresh_opt, tensors["model"])
    assert state["step"] == 8 and state["guard"] == GUARD and state["world_size"] == 1
    assert state["config"] == {"seed": 0, "lr": 1e-3}
    # The RNG streams (Python, numpy, torch, the shared noise generator) continue where they were.
    again = (random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=fresh_gen))
    assert again[:2] == after[:2] and torch.equal(again[2], after[2]) and torch.equal(again[3], after[3])
    for a, b in ((model.state_dict(), fresh.state_dict()), (ema.shadow, tensors["ema"])):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert want["param_groups"] == got["param_groups"]  # the non-tensor items, loaded weights_only
    for k, s in want["state"].items():
        assert all(torch.equal(v, got["state"][k][n]) for n, v in s.items())


def test_the_allow_list_covers_what_a_save_needs(saved) -> None:
    """Every global of a fresh save's DCP index is allowed (a newer torch that needs more fails here)."""
    found = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found.add((module, name))
            return super().find_class(module, name)

    with open(saved / ".metadata", "rb") as f:
        Recorder(f).load()  # our own file, just written: trusted here
    allowed = checkpoint._METADATA_GLOBALS | {("torch", n) for n in checkpoint._TORCH_DTYPES}
    assert found and found <= allowed, found - allowed


def test_the_planted_payload_is_live(saved, tmp_path) -> None:
    """The exploit used below works against the stock readers: DCP's metadata reader runs it."""
    from torch.distributed.checkpoint import FileSystemReader

    marker = tmp_path / "ran"
    _plant(saved / ".metadata", marker)
    with pytest.raises(AttributeError):  # after running, the payload returns None, not a Metadata
        FileSystemReader(saved).read_metadata()
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("forged", [False, True], ids=["manifest-kept", "manifest-forged"])
@pytest.mark.parametrize("target", [*STATE_FILES, MANIFEST, "train_state.pt"])
def test_a_pickle_planted_in_any_file_does_not_run(saved, tmp_path, capfd, target, forged) -> None:
    marker = tmp_path / "ran"
    _plant(saved / target, marker)
    if forged and target != MANIFEST:
        _forge_manifest(saved)  # lists the planted file with its hash (train_state.pt too)
    _refused(lambda: _resume(saved), saved, capfd)
    if forged and target in ("state.json", "state.safetensors"):
        _stage_start(saved)  # it reads neither file, so it has nothing to refuse
    else:
        _refused(lambda: _stage_start(saved), saved, capfd)
    assert not marker.exists()


def _point_item_at(path: Path, payload: bytes, kind: type) -> None:
    """Append `payload` to the data file and point one saved item of class `kind` (a tensor, or a
    non-tensor such as an optimizer hyperparameter) at it, in a rewritten index; forge the manifest."""
    index = pickle.loads((path / ".metadata").read_bytes())  # our own file: trusted here
    data = path / "__0_0.distcp"
    offset = data.stat().st_size
    data.write_bytes(data.read_bytes() + payload)
    key = next(k for k in index.storage_data if isinstance(index.state_dict_metadata[k.fqn], kind))
    index.storage_data[key] = dataclasses.replace(index.storage_data[key], offset=offset, length=len(payload))
    (path / ".metadata").write_bytes(pickle.dumps(index))
    _forge_manifest(path)


@pytest.mark.parametrize("kind", ["tensor", "bytes"])
def test_a_pickle_inside_a_saved_item_is_loaded_weights_only(saved, tmp_path, capfd, kind) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    _point_item_at(
        saved, buffer.getvalue(), TensorStorageMetadata if kind == "tensor" else BytesStorageMetadata
    )
    message = _refused(lambda: _resume(saved), saved, capfd)
    assert "could run code" in message
    assert not marker.exists()


def test_a_payload_inside_a_real_index_is_refused_by_the_unpickler(saved, tmp_path, capfd) -> None:
    marker = tmp_path / "ran"
    index = pickle.loads((saved / ".metadata").read_bytes())
    index.planner_data = _Payload(marker)
    (saved / ".metadata").write_bytes(pickle.dumps(index))
    _forge_manifest(saved)
    for read in (lambda: _resume(saved), lambda: _stage_start(saved)):
        assert "builtins.exec is not allowed" in _refused(read, saved, capfd)
    assert not marker.exists()


def test_a_state_of_the_old_format_is_refused(saved, tmp_path, capfd) -> None:
    marker = tmp_path / "ran"
    for name in (MANIFEST, "state.json", "state.safetensors"):
        (saved / name).unlink()
    _plant(saved / "train_state.pt", marker)
    for read in (lambda: _resume(saved), lambda: _stage_start(saved), lambda: read_training_state(saved)):
        assert "older aligntok" in _refused(read, saved, capfd)
    assert not marker.exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated-distcp": lambda p: _truncate(p / "__0_0.distcp"),
    "truncated-distcp-forged": lambda p: (_truncate(p / "__0_0.distcp"), _forge_manifest(p)),
    "garbage-metadata-forged": lambda p: ((p / ".metadata").write_bytes(os.urandom(300)), _forge_manifest(p)),
    "truncated-metadata-forged": lambda p: (_truncate(p / ".metadata"), _forge_manifest(p)),
    "garbage-state-json-forged": lambda p: ((p / "state.json").write_text("{"), _forge_manifest(p)),
    "garbage-safetensors-forged": lambda p: (
        (p / "state.safetensors").write_bytes(b"\x00" * 9),
        _forge_manifest(p),
    ),
    "missing-distcp": lambda p: (p / "__0_0.distcp").unlink(),
    "missing-state-json": lambda p: (p / "state.json").unlink(),
    "garbage-manifest": lambda p: (p / MANIFEST).write_bytes(os.urandom(50)),
    "manifest-of-another-version": lambda p: (p / MANIFEST).write_text(
        json.dumps({**json.loads((p / MANIFEST).read_text()), "version": 99})
    ),
    "unlisted-file": lambda p: (p / "__1_0.distcp").write_bytes(b"x"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_state_is_refused_with_one_line(saved, capfd, damage) -> None:
    DAMAGE[damage](saved)
    _refused(lambda: _resume(saved), saved, capfd)


def test_latest_must_name_a_state(saved, capfd) -> None:
    pointer = saved.parent / "latest"
    for text in ("step-0000099\n", "../../elsewhere\n", "\xff"):
        pointer.write_text(text, encoding="latin-1")
        with pytest.raises(ValueError, match="delete") as info:
            latest_checkpoint(saved.parent)
        assert "\n" not in str(info.value)


@slow_fixture(scope="module")
def stage_1_run(tmp_path_factory, image_folder) -> Path:
    out = tmp_path_factory.mktemp("safety") / "run"
    main(
        [
            *["tokenizer", "train", "--recipe", "debug", "--stage", "1", "--out"],
            str(out),
            "--set",
            f"data={image_folder}",
        ]
    )
    return out


@pytest.mark.parametrize("forged", [False, True], ids=["manifest-kept", "manifest-forged"])
def test_stage_2_does_not_run_a_pickle_planted_in_stage_1(stage_1_run, image_folder, tmp_path, capfd, forged):
    """`tokenizer train --stage 2` reads stage 1's state to carry its discriminator over, without --resume."""
    out = tmp_path / "run"
    shutil.copytree(stage_1_run, out)
    state = latest_checkpoint(out / "stage-1" / "checkpoints")
    assert state is not None and "disc" in tok_train._saved_parts(TrainingState(state))
    marker = tmp_path / "ran"
    _plant(state / ".metadata", marker)
    if forged:
        _forge_manifest(state)
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        main(
            [
                *["tokenizer", "train", "--recipe", "debug", "--stage", "2", "--out"],
                str(out),
                "--set",
                f"data={image_folder}",
            ]
        )
    err = capfd.readouterr().err
    assert info.value.code == 1 and not marker.exists()
    assert "Traceback" not in err and "weights_only" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("aligntok: error: ") and str(state) in last
    assert not (out / "stage-2" / "export").exists()
