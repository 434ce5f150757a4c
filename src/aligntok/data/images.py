"""Shared image utilities and the dataset base classes.

Every dataset yields the same item: {"image": float32 (3, H, W) in [0, 1], "label": int, "caption": str,
"style": int, "index": int}. Transparent images are composited on white (emoji are drawn for a white
page); resizing is PIL's, LANCZOS when shrinking and BICUBIC when enlarging.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "val")


def check_split(split: str) -> str:
    """`split` itself, or a ValueError naming the allowed splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def check_resolution(resolution: int) -> int:
    """`resolution` itself, or a ValueError when it is not a positive int."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int (pixels), got {resolution!r}")
    return resolution


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB; any transparency (RGBA, LA, palette with a transparent index) over white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode a file (or its bytes) fully into RGB, transparency on white; PIL errors pass through."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        img.load()
        return to_rgb(img)


def resize_square(img: Image.Image, resolution: int) -> Image.Image:
    """Resize to resolution x resolution: LANCZOS when shrinking (antialiased), BICUBIC when enlarging."""
    if img.size == (resolution, resolution):
        return img
    shrink = min(img.size) > resolution
    method = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
    return img.resize((resolution, resolution), method)


def center_crop_adm(img: Image.Image, resolution: int) -> Image.Image:
    """The ADM (guided-diffusion) center crop to resolution x resolution.

    While the short side is at least twice the target, halve the image with a BOX filter (cheap and
    alias-free); then one BICUBIC resize brings the short side to `resolution`; then the central square
    is cut out. This is the preprocessing behind the ImageNet FID reference batches, so generated and
    reference images must go through the same rule for FIDs to be comparable.
    """
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB or L PIL image as a uint8 tensor (C, H, W)."""
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def resize_stack(images: np.ndarray, resolution: int) -> torch.Tensor:
    """Resize a stack (N, C, H, W) uint8, C in {1, 3}, to (N, C, resolution, resolution) with PIL.

    Chunks run on a thread pool: PIL releases the GIL while resampling, so this scales with cores.
    """
    n, c, h, w = images.shape
    assert c in (1, 3), images.shape
    if (h, w) == (resolution, resolution):
        return torch.from_numpy(np.ascontiguousarray(images))
    out = torch.empty((n, c, resolution, resolution), dtype=torch.uint8)  # (N, C, H, W)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            hwc = images[i, 0] if c == 1 else images[i].transpose(1, 2, 0)
            out[i] = pil_to_uint8(resize_square(Image.fromarray(np.ascontiguousarray(hwc)), resolution))

    workers = max(1, min(os.cpu_count() or 1, 16))
    chunk = max(1, -(-n // (4 * workers)))
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(work, lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]:
            f.result()
    return out


class ImageDataset(Dataset):
    """Base of every image dataset: items as described in the module docstring, plus metadata.

    Attributes: `name`, `classes` (label -> name), `labels` (LongTensor of every item's label, for
    class-balanced sampling and metrics), `resolution`, `num_skipped` (unreadable files left out).
    """

    name: str
    classes: list[str]
    labels: torch.Tensor
    resolution: int
    num_skipped: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, classes={self.num_classes}, "
            f"resolution={self.resolution})"
        )


class ArrayImageDataset(ImageDataset):
    """A dataset held in memory as one uint8 tensor (N, 1 or 3, H, W), already at its resolution.

    Gray images stay one channel in memory (a third of the size) and are repeated to RGB per item.
    """

    def __init__(
        self,
        *,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        captions: Sequence[str],
        styles: torch.Tensor | None = None,
    ) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] in (1, 3), images.shape
        assert images.shape[2] == images.shape[3], images.shape
        assert len(images) == len(labels) == len(captions), (len(images), len(labels), len(captions))
        self.name = name
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.captions = list(captions)
        self.styles = torch.zeros(len(images), dtype=torch.long) if styles is None else styles.long()
        self.resolution = int(images.shape[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image = self.images[index].float().div_(255.0)  # (C, H, W)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1).contiguous()
        return {
            "image": image,
            "label": int(self.labels[index]),
            "caption": self.captions[index],
            "style": int(self.styles[index]),
            "index": index,
        }
