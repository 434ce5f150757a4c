"""Pieces both training loops share: EMA, learning-rate schedules, RNG state, the JSONL log, progress."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from aligntok import distributed
from aligntok.assets import atomic_file
from aligntok.checkpoint import STATE_JSON, TrainingState, latest_checkpoint, save_training_state
from aligntok.config import differences, to_dict


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied as they are).

    The decay warms up as min(decay, (1 + step) / (10 + step)) (the schedule of TensorFlow's
    ExponentialMovingAverage with num_updates): with a constant 0.999 the average of a 600-step run would
    still hold 0.999**600 = 55% of the random initialisation, which made early checkpoints of short runs
    meaningless. The trainer passes its own step, so a resumed run continues the same schedule."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average in `model` after optimiser step `step` (0-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model (keys differ: {sorted(missing)[:5]} ...)")
        self.shadow = {k: v.clone().float() for k, v in state.items()}


class SpikeGuard:
    """Detects NaN/inf losses and gradients, and (with a `factor`) spikes: a loss above `factor` times its
    running mean. The trainers skip such a step (no optimizer, EMA or discriminator update) and count it;
    more than `max_skips` in a row stop the run."""

    def __init__(self, factor: float | None, max_skips: int) -> None:
        self.factor, self.max_skips = factor, max_skips
        self.mean: float | None = None
        self.skips = 0
        self.total_skips = 0

    def is_bad(self, loss: float, grad_norm: float = 0.0) -> bool:
        spike = self.factor is not None and self.mean is not None and loss > self.factor * self.mean
        bad = not math.isfinite(loss) or not math.isfinite(grad_norm) or spike
        if bad:
            self.skips += 1
            self.total_skips += 1
        else:
            self.skips = 0
            self.mean = loss if self.mean is None else 0.99 * self.mean + 0.01 * loss
        return bad

    @property
    def exhausted(self) -> bool:
        """More bad steps in a row than allowed: the run must stop."""
        return self.skips > self.max_skips

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "skips": self.skips, "total_skips": self.total_skips}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.mean, self.skips, self.total_skips = s["mean"], s["skips"], s["total_skips"]


def last_good(ckpt_dir: Path) -> str:
    """How an error message names the checkpoint a stopped run can resume from."""
    last = latest_checkpoint(ckpt_dir)
    return (
        f"its last good checkpoint is {last}"
        if last is not None
        else f"no checkpoint was saved yet in {ckpt_dir}"
    )


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warm-up, then constant or cosine decay to zero."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; use 'constant' or 'cosine'")


def batch_indices(step: int, *, n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's slice of the global batch at `step`, a pure function of the step (exact resume).

    Each epoch is a fresh permutation seeded by (seed, epoch); the last incomplete batch is dropped.
    """
    per_epoch = n // batch
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch} exceeds the {n} training items; lower --set batch_size")
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch : (pos + 1) * batch].chunk(world)[rank]


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches for steps [start, stop) from `batch_indices`, for a DataLoader(batch_sampler=...)."""

    def __init__(
        self, *, n: int, batch: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1
    ):
        self.kw = {"n": n, "batch": batch, "seed": seed, "rank": rank, "world": world}
        self.start, self.stop = start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield batch_indices(step, **self.kw).tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def check_resume_config(
    saved: dict[str, Any], cfg: Any, path: Path, may_differ: frozenset[str] = frozenset()
) -> None:
    """Refuse to resume a run made with another config; `parallel` (how it runs, not what) and the dotted
    paths in `may_differ` (a trainer's own exceptions), with all below them, may differ."""
    now = {k: v for k, v in to_dict(cfg).items() if k != "parallel"}
    differs = differences({k: v for k, v in saved.items() if k != "parallel"}, now)
    differs = [d for d in differs if not any(d == m or d.startswith(f"{m}.") for m in may_differ)]
    if differs:
        raise ValueError(
            f"{path} was made with another config (differs in: {', '.join(differs[:6])}); resume with the "
            "same recipe/--set, or start a new --out"
        )


def save_checkpoint(
    ckpt_dir: Path, step: int, *, cfg: Any, tensors: dict[str, Any], generator: torch.Generator, **extra: Any
) -> None:
    """A trainer's exact-resume state at `step`: its `tensors` (models, optimizers, EMA) and the scalars
    (config, step, RNG states, the shared noise generator, world size, `extra`). A collective."""
    state = {
        "config": to_dict(cfg),
        **extra,
        "step": step,
        "rng": rng_state(),
        "generator": generator.get_state(),
    }
    state["world_size"] = distributed.world().world_size
    save_training_state(ckpt_dir, step, tensors=tensors, state=state)


def load_checkpoint(
    path: Path,
    *,
    cfg: Any,
    tensors: dict[str, Any],
    generator: torch.Generator,
    may_differ: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Resume from the state `save_checkpoint` wrote at `path`: refuse another config (but the paths in
    `may_differ`), fill `tensors` in place, restore the RNG states and `generator`; returns the scalars (e.g.
    `state["step"]`). The state is verified once, before anything in it is read (`TrainingState`)."""
    saved = TrainingState(path)
    state = saved.scalars()
    missing = sorted({"config", "step", "rng", "generator", "world_size"} - set(state))
    if missing or not isinstance(state["config"], dict):
        raise ValueError(f"{path}: {STATE_JSON} is not a trainer's state; delete {path.parent} to restart")
    check_resume_config(state["config"], cfg, path, may_differ)
    saved.load_tensors(tensors)
    try:
        set_rng_state(state["rng"])
        generator.set_state(state["generator"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path}: its RNG states cannot be restored ({type(e).__name__}); delete {path.parent} to restart"
        ) from None
    return state


def seed_everything(seed: int) -> None:
    """Identical parameter init on every rank; per-rank streams come from explicit generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state: numbers (state.json) and tensors (state.safetensors), no pickled object.
    numpy's keys (an ndarray) become an int64 tensor; Python's state is numbers (tuples, saved as lists)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` gave, also after a trip through JSON (lists for tuples)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class JsonlLog:
    """Appends one JSON object per line (rank 0 only); every record gets the wall time since the run began."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.time()

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step`: a run resumed from its checkpoint at `step` redoes them,
        and each step is logged once."""
        if not distributed.world().is_main or not self.path.exists():
            return
        rows = read_log(self.path)
        kept = [r for r in rows if r.get("step", 0) <= step]
        if len(kept) != len(rows):
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, **record: Any) -> None:
        if not distributed.world().is_main:
            return
        record = {
            k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in record.items()
        }
        record["time"] = round(time.time() - self.start, 3)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress(total: int, initial: int, desc: str) -> tqdm:
    """A tqdm bar on rank 0 only; silent elsewhere."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not distributed.world().is_main,
        dynamic_ncols=True,
        smoothing=0.1,
    )
