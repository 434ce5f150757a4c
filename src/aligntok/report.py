"""Run reports: uint8 conversion, PNG files, grids, the ADM-format .npz, matplotlib plots, HTML pages."""

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


def plot_curves(
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    vlines: dict[str, float] | None = None,
    logy: bool = False,
) -> Path:
    """One PNG line plot of named (x, y) series; `vlines` marks named x positions (e.g. stage boundaries)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if len(series) > 10:  # the default cycle repeats after 10 colours
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="o" if len(points) < 12 else None, linewidth=1.4)
    for name, x in (vlines or {}).items():
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.annotate(name, (x, 1), xycoords=("data", "axes fraction"), fontsize=8, ha="right", va="top")
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def html_table(header: list[str], rows: list[list[object]]) -> str:
    """A plain HTML table; cells are escaped unless they are `Raw` (pre-built HTML such as an <img>)."""
    import html

    def cell(value: object, tag: str) -> str:
        text = value if isinstance(value, Raw) else html.escape(str(value))
        return f"<{tag}>{text}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class Raw(str):
    """HTML that `html_table` and `html_page` insert as it is."""


PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    "img{image-rendering:pixelated;max-width:100%}pre{background:#f5f5f5;padding:1em;overflow-x:auto}"
)


def html_page(title: str, sections: list[tuple[str, str]]) -> str:
    """A self-contained page: a title and (heading, HTML body) sections; images are relative links."""
    import html

    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


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
