"""File helpers every layer may use: uint8 conversion, PNGs, grids, the ADM-format .npz, atomic JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aligntok.assets import atomic_file


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), rounded as the ADM evaluator expects of saved samples."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, *, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 (B, H, W, 3) images into one (rows*H', cols*W', 3) image on a white background."""
    b, h, w, c = images.shape
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = (
            img
        )
    return grid


def save_image(array: np.ndarray, path: str | Path, *, scale: int = 1) -> None:
    """Save a uint8 (H, W, 3) array; `scale` enlarges small images with nearest-neighbour for viewing."""
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_npz(images: np.ndarray, path: str | Path, **extra: np.ndarray) -> None:
    """ADM reference-batch format: uint8 NHWC images under `arr_0` (plus optional arrays, e.g. labels)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"ADM .npz needs uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    np.savez(path, arr_0=images, **extra)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write `result` as indented JSON atomically (temp file + rename): a reader never sees half a file."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")


def cached_json(path: str | Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The JSON at `path`, or `compute()` written there: a finished step is not redone on a rerun."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_json(result, path)
    return result
