"""Shared fixtures: tiny image folders and a debug tokenizer export, made in temporary directories.

The suite's layers, one folder each: unit/ (pure functions and small pieces), models/ (model contracts:
shapes, presets, save/load), parity/ (agreement with reference formulas and implementations),
distributed/ (2 gloo ranks against one process), e2e/ (commands and pipelines end to end on debug
recipes). Tests that train for seconds, and every test that uses a fixture made with `slow_fixture`, carry
the `slow` marker: `pytest -m "not slow"` is the quick layer.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.distributed import TCPStore

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """benchmarks/<name>.py as module `name` (registered in sys.modules, where the benchmarks' own imports
    of each other find it: load a script's dependencies first)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def make_image_folder(root: Path, *, per_class: int = 6, size: int = 32, seed: int = 0) -> Path:
    """Two visually distinct classes: red squares and blue discs at random places on white."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for cls, color in (("blue", (30, 30, 220)), ("red", (220, 30, 30))):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            img = np.full((size, size, 3), 255, np.uint8)
            y, x = rng.integers(size // 8, size - size // 8 - size // 3, size=2)
            r = size // 6
            if cls == "red":
                mask = (abs(yy - y - r) < r) & (abs(xx - x - r) < r)
            else:
                mask = (yy - y - r) ** 2 + (xx - x - r) ** 2 < r * r
            img[mask] = color
            Image.fromarray(img).save(root / cls / f"{i}.png")
    return root


_SLOW_FIXTURES: set[tuple[str, str]] = set()


def slow_fixture(*args, **kwargs):
    """`pytest.fixture` for a fixture that trains or runs a real network for seconds: every test that uses
    it, directly or through another fixture, is marked `slow`."""

    def wrap(fn):
        _SLOW_FIXTURES.add((fn.__module__, fn.__name__))
        return pytest.fixture(*args, **kwargs)(fn)

    return wrap


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        funcs = [d.func for ds in (defs.name2fixturedefs.values() if defs else ()) for d in ds]
        if any((getattr(f, "__module__", ""), getattr(f, "__name__", "")) in _SLOW_FIXTURES for f in funcs):
            item.add_marker(pytest.mark.slow)


def failing_on_call(real, n: int, exc: type[BaseException] = KeyboardInterrupt):
    """`real` wrapped to raise `exc` on its n-th call: a process killed at a known point (e.g. patched onto
    `SpikeGuard.is_bad`, called once per training step)."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)

    return wrapper


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "shapes")


@pytest.fixture(scope="session")
def debug_tokenizer(tmp_path_factory) -> Path:
    """A debug-preset tokenizer export (pretrained EfficientNet-Lite0 block, random adapter/decoder)."""
    from aligntok.models.tokenizer import Tokenizer
    from aligntok.recipes.tokenizer import tokenizer_preset

    torch.manual_seed(0)
    return Tokenizer(tokenizer_preset("debug")).save_pretrained(tmp_path_factory.mktemp("tok") / "export")


@pytest.fixture
def stub_inception(tmp_path, monkeypatch) -> None:
    """A tiny stand-in for the FID Inception network (64-d features of a 4x4 pool), for speed, with a
    private reference cache: features of temporary folders must not land in the user's cache."""
    from torch import nn

    from aligntok.metrics import inception, reference

    def from_assets(cls, *, device=None):
        torch.manual_seed(0)
        net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 64))
        return inception.InceptionFeatures(net, sha256="stub")

    monkeypatch.setattr(inception.InceptionFeatures, "from_assets", classmethod(from_assets))
    monkeypatch.setattr(reference, "inception_sha256", lambda: "stub")
    monkeypatch.setattr(reference, "cache_dir", lambda: tmp_path / "fid_refs")


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    from aligntok import distributed

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",  # every rank is a client of the launcher's store
        ALIGNTOK_DEVICE="cpu",
    )
    torch.set_num_threads(1)
    distributed.init()
    fn(*args)
    distributed.barrier()
    distributed.shutdown()


def spawn_ranks(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run fn(*args) on `world` gloo ranks in fresh processes, as torchrun starts them: the rendezvous store
    lives in this, the launching, process (torchrun's agent store), so no rank that finishes first can take
    it down under another rank's teardown (rank 0 hosting it aborted the other rank now and then)."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    torch.multiprocessing.spawn(_rank_main, args=(world, store.port, fn, args), nprocs=world, join=True)
