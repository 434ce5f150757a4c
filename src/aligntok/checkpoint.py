"""Exported weights (a directory with `model.safetensors` + `config.json`, never pickle) and resumable
training states (torch.distributed.checkpoint, so that a run saved on N ranks resumes on M).

The JSON document is the caller's `config` mapping (by convention `{"kind": ..., "config": ...}`) plus a
`"meta"` entry (the aligntok version and any `extra_meta`). Each file is written to a temporary name and
moved into place with `os.replace`, so a reader never sees a half-written file. `export_hash` names one
exact export (weights + config); latent caches record it to refuse a tokenizer they were not made with.

A training state is a directory `checkpoints/step-NNNNNNN/`: the tensors (models, optimizers, EMA) as a
torch.distributed.checkpoint (DCP) save, `.metadata` + `__<rank>_0.distcp` (each rank writes its own
shards, nothing is gathered), beside `train_state.pt` (step, config, RNG, counters: small, written by rank
0, read with `weights_only=True`). It is written under a temporary name and renamed when complete; then
`checkpoints/latest` (one line, the directory's name) is replaced atomically and older states removed. A
crash at any moment leaves `latest` naming a complete state. Model and optimizer state dicts go through
`torch.distributed.checkpoint.state_dict` (parameter names as keys, full shapes in the metadata), so DCP
reshards them on load: a state saved under FSDP on 2 ranks loads into one process, and back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from aligntok import __version__, distributed
from aligntok.assets import atomic_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _bad_export(path: Path, reason: str) -> ValueError:
    return ValueError(
        f"{path}: {reason}; an export directory must hold {WEIGHTS_NAME} + {CONFIG_NAME} "
        "as written by save_pretrained (or checkpoint.save_export)"
    )


def _state_for_saving(model: nn.Module) -> dict[str, Tensor]:
    """CPU, contiguous tensors; tensors sharing storage are copied because safetensors refuses aliases."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        state[name] = t
    return state


def save_export(
    directory: str | Path, model: nn.Module, config: dict[str, Any], extra_meta: dict[str, Any] | None = None
) -> Path:
    """Write `model`'s state dict and `config` (+ `"meta"`) to `directory`; returns the directory."""
    if "meta" in config:
        raise ValueError("save_export: `config` must not have a 'meta' key; pass it as extra_meta")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    document = {**config, "meta": {"aligntok_version": __version__, **(extra_meta or {})}}
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"  # fails here, before any file is touched
    state = _state_for_saving(model)
    with atomic_file(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with atomic_file(directory / CONFIG_NAME) as tmp:
        tmp.write_text(text)
    return directory


def load_export(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict and config document of an export; ValueError naming the path if it is not one."""
    directory = Path(directory)
    weights, cfg_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not directory.is_dir():
        raise _bad_export(directory, "no such directory")
    for p in (weights, cfg_path):
        if not p.is_file():
            raise _bad_export(directory, f"{p.name} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad_export(cfg_path, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _bad_export(cfg_path, "the JSON document is not a mapping")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise _bad_export(weights, f"not a readable safetensors file ({e})") from None
    return state, config


def load_state_strict(model: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """Load `state` into `model` requiring the same keys and shapes; ValueError listing what differs."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", shapes),
    ):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise ValueError(
            f"{source}: weights do not fit the model built from its config ({'; '.join(problems)}); "
            "re-export with the same aligntok version and config"
        )
    model.load_state_dict(state, strict=True)


def export_hash(directory: str | Path) -> str:
    """sha256 of the bytes of model.safetensors followed by config.json: the identity of one export."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        path = directory / name
        if not path.is_file():
            raise _bad_export(directory, f"{name} is missing")
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a training state with `weights_only=True`: loading never executes code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable aligntok training state ({e}); delete it to restart"
        ) from None


TRAIN_STATE = "train_state.pt"
LATEST = "latest"


def _step_dir(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete training state under `ckpt_dir` (as `latest` names it), or None."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    if not (path / TRAIN_STATE).is_file():
        raise ValueError(f"{pointer} names {path}, which is not a complete training state; delete {pointer}")
    return path


def module_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """`{"model": ..., "optimizer": ...}` keyed by parameter names (DTensor shards under FSDP), for DCP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def set_module_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]
) -> None:
    """Load what `module_state` gave (after `load_training_tensors` filled it) into the model/optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' whenever no process group exists: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield


def save_training_state(
    ckpt_dir: str | Path, step: int, *, tensors: dict[str, Any], state: dict[str, Any]
) -> Path:
    """Write a training state (see the module docstring). A collective: every rank calls it.

    `tensors` is a nested dict of tensors (`module_state` results, EMA shadows); `state` is rank 0's small
    picklable state (numbers, strings, RNG tensors).
    """
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / _step_dir(step)
    tmp = ckpt_dir / f".{final.name}.tmp"
    if distributed.world().is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save interrupted earlier
    distributed.barrier()
    with _quiet_single_process():
        dcp.save(tensors, checkpoint_id=tmp, no_dist=not torch.distributed.is_initialized())
    if distributed.world().is_main:
        torch.save(state, tmp / TRAIN_STATE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with atomic_file(ckpt_dir / LATEST) as tmp_latest:
            tmp_latest.write_text(final.name + "\n")
        for old in ckpt_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old)
    distributed.barrier()
    return final


def read_training_state(path: str | Path) -> dict[str, Any]:
    """The small state (`train_state.pt`) of a training state directory."""
    return load_state(Path(path) / TRAIN_STATE)


def load_training_tensors(path: str | Path, tensors: dict[str, Any]) -> None:
    """Fill `tensors` (built like the saved ones, e.g. from `module_state` of fresh models) in place from
    the DCP save at `path`, resharding to this world. Keys of the save that `tensors` lacks are skipped."""
    import torch.distributed.checkpoint as dcp

    try:
        with _quiet_single_process():
            dcp.load(tensors, checkpoint_id=Path(path), no_dist=not torch.distributed.is_initialized())
    except Exception as e:  # DCP wraps every reader failure in its own CheckpointException
        raise ValueError(f"{path}: cannot load this training state ({e}); delete it to restart") from None
