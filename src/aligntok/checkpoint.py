"""Exported weights (a directory with `model.safetensors` + `config.json`, never pickle) and resumable
training states (torch.distributed.checkpoint, so that a run saved on N ranks resumes on M).

The JSON document is the caller's `config` mapping (by convention `{"kind": ..., "config": ...}`) plus a
`"meta"` entry (the aligntok version and any `extra_meta`). Each file is written to a temporary name and
moved into place with `os.replace`, so a reader never sees a half-written file. `export_hash` names one
exact export (weights + config); latent caches record it to refuse a tokenizer they were not made with.

A training state is a directory `checkpoints/step-NNNNNNN/`: the tensors (models, optimizers, EMA) as a
torch.distributed.checkpoint (DCP) save, `.metadata` + `__<rank>_0.distcp` (each rank writes its own
shards, nothing is gathered); the small state of rank 0 (step, config, counters, RNG states) as
`state.json`, its tensors (RNG states) in `state.safetensors`; and last `manifest.json`, the sha256 of each
of these files, written by rank 0 once all of them are complete. The directory is written under a temporary
name and renamed when complete; then `checkpoints/latest` (one line, the directory's name) is replaced
atomically and older states removed. A crash at any moment leaves `latest` naming a complete state. Model
and optimizer state dicts go through `torch.distributed.checkpoint.state_dict` (parameter names as keys,
full shapes in the metadata), so DCP reshards them on load: a state saved under FSDP on 2 ranks loads into
one process, and back.

Reading a training state never executes code (docs/reliability.md, "Trust model"): `TrainingState` checks
the manifest and every hash before any other read, then parses JSON and safetensors, unpickles DCP's
metadata with an allow-list of classes, and loads DCP's items with `weights_only=True`. Anything wrong is
refused with one ValueError line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
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
from aligntok.assets import atomic_file, sha256_file

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
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).is_file():
            raise _bad_export(directory, f"{name} is missing")
    return sha256_file(directory / WEIGHTS_NAME, directory / CONFIG_NAME)


# ---------------------------------------------------------------------------------------------------------
# Training states. What is verified, and how, is the trust model of docs/reliability.md.

LATEST = "latest"
MANIFEST = "manifest.json"
METADATA = ".metadata"  # DCP's index of the saved items (a pickle, read with _MetadataUnpickler only)
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
STATE_FORMAT, STATE_VERSION = "aligntok-training-state", 1
_DATA_FILE = re.compile(r"__\d+_\d+\.distcp")  # DCP's data files, one per writing rank
_STEP_DIR = re.compile(r"step-\d+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TENSOR = "__tensor__"  # {"__tensor__": key} in state.json stands for state.safetensors[key]

# Every global that the DCP metadata of our training states holds, listed by unpickling real saves (torch
# 2.13, tokenizer stages with discriminator, DiT, AdamW, EMA; one process, DDP and FSDP2 on 2 ranks);
# tests/unit/test_checkpoint_safety.py checks that a fresh save needs nothing more. Each is a record
# class, an enum, torch.Size, a path or the table lookup torch uses for layouts: called with forged
# arguments it builds data or fails, it never runs code. Dtypes (torch.float32, ...) are inert values; all
# of them are allowed so that a state with bf16 or int32 tensors stays readable.
_METADATA_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id, the directory the save was written to
        ("pathlib._local", "PosixPath"),  # the same class, as Python 3.13 names it
    }
)
_TORCH_DTYPES = frozenset(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of `_METADATA_GLOBALS` and torch dtypes: a pickle that
    names any other callable (os.system, builtins.exec, ...) fails before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and name in _TORCH_DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


def _step_dir(step: int) -> str:
    return f"step-{step:07d}"


def _state_file(name: str) -> bool:
    """Whether `name` is one of the files a training state consists of (besides its manifest)."""
    return name in (METADATA, STATE_JSON, STATE_TENSORS) or _DATA_FILE.fullmatch(name) is not None


def _reason(e: BaseException) -> str:
    """Why a file could not be read, in one line, and never torch's advice to retry with
    weights_only=False: a checkpoint that needs it is refused."""
    failures = getattr(e, "failures", None)  # a CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    text = " ".join(str(e).split())
    if "weights_only" in text.lower() or "weights only" in text.lower():
        return "it holds pickled objects other than tensors and plain numbers, which could run code"
    return f"{type(e).__name__}: {text[:240]}" if text else type(e).__name__


def _refused(path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path}: {what}; this training state is not loaded: delete {path.parent} to restart from step 0, "
        "or put back a copy you trust"
    )


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete training state under `ckpt_dir` (as `latest` names it), or None. Nothing in it
    is read here: `TrainingState` verifies it."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not _STEP_DIR.fullmatch(name) or not (ckpt_dir / name).is_dir():
        raise ValueError(f"{pointer} does not name a training state in {ckpt_dir}; delete {pointer}")
    return ckpt_dir / name


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
    """Load what `module_state` gave (once `TrainingState.load_tensors` filled it) into model/optimizer."""
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


def _to_json(value: Any, tensors: dict[str, Tensor], where: str = "state") -> Any:
    """`value` as JSON data, each tensor replaced by {"__tensor__": key} and stored in `tensors[key]`."""
    if isinstance(value, Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu").contiguous().clone()  # no shared storage: safetensors
        return {_TENSOR: key}
    if isinstance(value, dict):
        if _TENSOR in value or not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: a training state's keys are strings other than {_TENSOR!r}")
        return {k: _to_json(v, tensors, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, tensors, f"{where}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: a {type(value).__name__} is neither JSON data nor a tensor")


def _from_json(value: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of `_to_json` (tuples come back as lists)."""
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _from_json(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    return value


def _write_manifest(directory: Path, step: int) -> None:
    """Hash every file of a finished save into manifest.json, written last and atomically: a state without
    a valid manifest is one whose save did not finish (or that was not written by this code)."""
    names = sorted(os.listdir(directory))
    unexpected = [n for n in names if not _state_file(n)]
    if unexpected:
        raise RuntimeError(f"{directory}: unexpected files in a training state: {unexpected}")
    document = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "aligntok_version": __version__,
        "step": step,
        "files": {name: sha256_file(directory / name) for name in names},
    }
    with atomic_file(directory / MANIFEST) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")


def save_training_state(
    ckpt_dir: str | Path, step: int, *, tensors: dict[str, Any], state: dict[str, Any]
) -> Path:
    """Write a training state (see the module docstring). A collective: every rank calls it.

    `tensors` is a nested dict of tensors (`module_state` results, EMA shadows), saved with DCP; `state` is
    rank 0's small state: JSON data (tuples become lists) and CPU tensors (RNG states), which go to
    state.json and state.safetensors.
    """
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / _step_dir(step)
    tmp = ckpt_dir / f".{final.name}.tmp"
    is_main = distributed.world().is_main
    small: dict[str, Tensor] = {}
    if is_main:
        document = json.dumps(_to_json(state, small), indent=1) + "\n"  # fails here, before any write
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save interrupted earlier
    distributed.barrier()
    try:
        with _quiet_single_process():
            dcp.save(tensors, checkpoint_id=tmp, no_dist=not torch.distributed.is_initialized())
    except (dcp.CheckpointException, OSError) as e:  # CheckpointException derives from BaseException
        raise ValueError(
            f"{tmp}: writing the training state of step {step} failed ({_reason(e)}); "
            f"{ckpt_dir / LATEST} still names the last complete one"
        ) from None
    if is_main:
        save_file(small, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(document)
        _write_manifest(tmp, step)  # after every file of the state, DCP's of all ranks included
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with atomic_file(ckpt_dir / LATEST) as tmp_latest:
            tmp_latest.write_text(final.name + "\n")
        for old in ckpt_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old)
    distributed.barrier()
    return final


def _verified_files(path: Path) -> dict[str, str]:
    """The manifest's {file: sha256} once every check holds: the manifest is valid, it lists the files
    of a training state and only those, the directory holds exactly these files, each with its hash."""
    if not path.is_dir():
        raise _refused(path, "no such directory")
    if not (path / MANIFEST).is_file():
        raise ValueError(
            f"{path} has no {MANIFEST}: it was written by an older aligntok (before training states were "
            f"verified) or its save did not finish, so it cannot be verified and is not loaded; delete "
            f"{path.parent} to restart from step 0"
        )
    try:
        document = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _refused(path, f"{MANIFEST} is not valid JSON ({_reason(e)})") from None
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, dict) or document.get("format") != STATE_FORMAT:
        raise _refused(path, f"{MANIFEST} is not an aligntok training-state manifest")
    if document.get("version") != STATE_VERSION:
        version = document.get("version")
        raise _refused(path, f"{MANIFEST} has version {version!r}; this aligntok reads {STATE_VERSION}")
    for name, digest in files.items():
        if not _state_file(name) or not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise _refused(path, f"{MANIFEST} lists {name!r}, which is not a file of a training state")
    missing = sorted({METADATA, STATE_JSON, STATE_TENSORS} - set(files))
    if missing:
        raise _refused(path, f"{MANIFEST} does not list {', '.join(missing)}")
    unlisted = sorted(set(os.listdir(path)) - set(files) - {MANIFEST})
    if unlisted:
        shown = ", ".join(repr(n) for n in unlisted[:5])
        raise _refused(path, f"it holds files that its {MANIFEST} does not list ({shown})")
    for name, digest in sorted(files.items()):
        if not (path / name).is_file():
            raise _refused(path, f"{name} is missing")
        if sha256_file(path / name) != digest:
            raise _refused(path, f"{name} is not the file that was saved (its sha256 is not the manifest's)")
    return files


def _read_metadata(path: Path, files: dict[str, str]) -> Any:
    """The DCP metadata of a verified state, through `_MetadataUnpickler`; it may point only to the data
    files of the manifest."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path / METADATA, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:  # whatever a damaged or forged pickle raises
        raise _refused(path, f"{METADATA} is not a checkpoint index ({_reason(e)})") from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, Metadata) or not isinstance(storage, dict):
        raise _refused(path, f"{METADATA} is not a checkpoint index")
    if not isinstance(metadata.state_dict_metadata, dict):
        raise _refused(path, f"{METADATA} is not a checkpoint index")
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not (isinstance(name, str) and _DATA_FILE.fullmatch(name) and name in files):
            raise _refused(path, f"{METADATA} points to {name!r}, which is not a data file of {MANIFEST}")
    return metadata


@functools.cache
def _safe_dcp() -> tuple[type, type]:
    """DCP's FileSystemReader and DefaultLoadPlanner, changed only where they unpickle: the metadata with
    `_MetadataUnpickler`, the non-tensor items (optimizer hyperparameters) with weights_only=True. Built
    on first use, as torch.distributed.checkpoint is imported lazily throughout this module."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class VerifiedReader(FileSystemReader):
        def __init__(self, path: Path, files: dict[str, str]) -> None:
            super().__init__(str(path))
            self.files = files

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise ValueError("an aligntok training state has no per-rank metadata")
            metadata = _read_metadata(Path(self.path), self.files)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            obj = torch.load(value, map_location="cpu", weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return VerifiedReader, WeightsOnlyPlanner


class TrainingState:
    """A training-state directory, verified when it is opened (`_verified_files`: the manifest and the
    sha256 of every file). Its readers parse only JSON, safetensors, DCP's metadata through an allow-list
    unpickler and DCP's items with weights_only loads, so that even a state whose manifest was forged
    together with its files cannot run code; anything wrong is one ValueError line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = _verified_files(self.path)

    def scalars(self) -> dict[str, Any]:
        """The `state` given to `save_training_state`, its tuples as lists."""
        try:
            document = json.loads((self.path / STATE_JSON).read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise _refused(self.path, f"{STATE_JSON} is not valid JSON ({_reason(e)})") from None
        try:
            tensors = load_file(str(self.path / STATE_TENSORS))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise _refused(self.path, f"{STATE_TENSORS} is not a safetensors file ({_reason(e)})") from None
        try:
            state = _from_json(document, tensors)
        except (KeyError, TypeError):
            state = None
        if not isinstance(state, dict):
            raise _refused(self.path, f"{STATE_JSON} does not fit {STATE_TENSORS}")
        return state

    def saved_keys(self) -> set[str]:
        """The flattened keys of the DCP save ("model.decoder.conv_in.weight", "optimizer.state. ...")."""
        return set(_read_metadata(self.path, self.files).state_dict_metadata)

    def load_tensors(self, tensors: dict[str, Any]) -> None:
        """Fill `tensors` (built like the saved ones, e.g. from `module_state` of fresh models) in place,
        resharding to this world. Keys of the save that `tensors` lacks are skipped."""
        import torch.distributed.checkpoint as dcp

        reader, planner = _safe_dcp()
        _read_metadata(self.path, self.files)  # a bad index is refused here, not logged by DCP's fallback
        try:
            with _quiet_single_process():
                dcp.load(
                    tensors,
                    storage_reader=reader(self.path, self.files),
                    planner=planner(),
                    no_dist=not torch.distributed.is_initialized(),
                )
        except (Exception, dcp.CheckpointException) as e:  # CheckpointException derives from BaseException
            raise _refused(self.path, f"its tensors cannot be loaded ({_reason(e)})") from None


def read_training_state(path: str | Path) -> dict[str, Any]:
    """The small state (config, step, RNG states, ...) of a training-state directory, verified first."""
    return TrainingState(path).scalars()


def load_training_tensors(path: str | Path, tensors: dict[str, Any]) -> None:
    """`TrainingState(path).load_tensors(tensors)`: verify the state, then fill `tensors` in place."""
    TrainingState(path).load_tensors(tensors)
