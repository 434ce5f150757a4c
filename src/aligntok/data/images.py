"""Shared image utilities and the dataset base classes.

Every dataset yields the same item: {"image": float32 (3, H, W) in [0, 1], "label": int, "caption": str,
"style": int, "index": int}. Every decoded image, whatever its PIL mode, becomes 8-bit RGB in one place,
`to_rgb` (its docstring has the rule per mode); transparent images are composited on white (emoji are
drawn for a white page); resizing is PIL's, LANCZOS when shrinking and BICUBIC when enlarging.
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


# Modes whose samples are wider than 8 bits, read with numpy and rescaled (see `to_rgb`).
_WIDE = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Modes with an alpha channel, composited on white; RGBa and La hold premultiplied colour.
_ALPHA = frozenset({"RGBA", "LA", "PA"})
_PREMULTIPLIED = frozenset({"RGBa", "La"})
# CIE XYZ (D50, the white point of PIL's LAB, as of ICC profiles) to linear sRGB, Bradford-adapted to D65.
_D50 = (0.96422, 1.0, 0.82521)
_XYZ50_TO_SRGB = np.array(
    [
        [3.1338561, -1.6168667, -0.4906146],
        [-0.9787684, 1.9161415, 0.0334540],
        [0.0719453, -0.2289914, 1.4052427],
    ]
)


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """Values on the 0..255 scale, rounded half up and clipped, as uint8."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _wide_to_uint8(img: Image.Image) -> np.ndarray:
    """A one-channel image of mode I, I;16* or F as uint8 (H, W), by the rule in `to_rgb`'s docstring."""
    arr = np.asarray(img)
    data = arr.astype(np.float64)
    finite = np.isfinite(data)
    values = data[finite]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    else:
        top = 255.0 if img.mode == "F" else 65535.0
        lo, hi = min(lo, 0.0), max(hi, top)
    out = _round_uint8((np.where(finite, data, lo) - lo) * (255.0 / (hi - lo)))
    out[data == np.inf] = 255
    key = img.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):  # a tRNS colour key: that value is clear
        out[arr == key] = 255
    return out


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """PIL LAB pixels (H, W, 3) uint8 (L* scaled to 0..255; a*, b* signed bytes) as sRGB uint8 (H, W, 3).

    CIE formulas rather than PIL's LittleCMS transform, which turns a neutral gray slightly coloured
    (L*=0 gives (1, 0, 1)): here a* = b* = 0 gives R = G = B exactly."""
    lightness = lab[..., 0].astype(np.float64) * (100.0 / 255.0)
    a = lab[..., 1].view(np.int8).astype(np.float64)
    b = lab[..., 2].view(np.int8).astype(np.float64)
    fy = (lightness + 16.0) / 116.0

    def inverse(f: np.ndarray) -> np.ndarray:
        return np.where(f > 6.0 / 29.0, f**3, 3.0 * (6.0 / 29.0) ** 2 * (f - 4.0 / 29.0))

    y = inverse(fy)
    # Linear RGB as gray Y plus the matrix times the offset from the neutral colour of the same Y: the
    # offset is exactly zero for a* = b* = 0, so grays come out with three equal channels.
    dx = _D50[0] * inverse(fy + a / 500.0) - _D50[0] * y
    dz = _D50[2] * inverse(fy - b / 200.0) - _D50[2] * y
    linear = y[..., None] + dx[..., None] * _XYZ50_TO_SRGB[:, 0] + dz[..., None] * _XYZ50_TO_SRGB[:, 2]
    linear = np.clip(linear, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1.0 / 2.4) - 0.055)
    return _round_uint8(srgb * 255.0)


def _premultiplied_on_white(img: Image.Image) -> Image.Image:
    """An RGBa or La image (colour already multiplied by alpha) over white: colour + 255 - alpha."""
    arr = np.asarray(img).astype(np.int32)
    out = np.clip(arr[..., :-1] + 255 - arr[..., -1:], 0, 255).astype(np.uint8)  # (H, W, 3) or (H, W, 1)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(out, (*out.shape[:2], 3))), "RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """`img`, of any PIL mode, as 8-bit RGB (the same size). The rule per mode:

    - RGB, L, 1 (0 or 255), P without transparency, CMYK, YCbCr, HSV, RGBX: PIL's own conversion.
    - RGBA, LA, PA, and P, L, RGB or 1 with transparency (a tRNS key or an RGBA palette): composited on
      white by PIL's alpha_composite, colour * a + 255 * (1 - a) rounded to nearest; RGBa and La
      (premultiplied) likewise, as colour + 255 - alpha.
    - I;16, I;16L, I;16B, I;16N (16-bit): v / 257, rounded (0 -> 0, 65535 -> 255); with I and F, a
      transparency key (a PNG tRNS value) makes the pixels of that value white.
    - I (32-bit signed): the 16-bit scale (v / 257) when every value lies in 0..65535 (16-bit PNGs and
      TIFFs decode to it); otherwise the range [min(0, lowest), max(65535, highest)] maps linearly to 0..255.
    - F (32-bit float): read as 0..1 when every finite value lies in [0, 1] (v * 255, rounded), otherwise
      on PIL's 0..255 scale, widened as for I to [min(0, lowest), max(255, highest)]; NaN is black,
      +inf white, -inf black.
    - LAB: CIE L*a*b* (D50, as PIL's LAB) to sRGB by the CIE formulas; a* = b* = 0 stays exactly gray.
    A gray image (one channel, or a neutral colour) gives R = G = B. Anything else PIL can convert is
    converted by PIL; a mode it cannot convert is a ValueError naming it.
    """
    mode, info = img.mode, img.info
    if mode in _WIDE:
        return Image.fromarray(_wide_to_uint8(img), "L").convert("RGB")
    if mode == "LAB":
        return Image.fromarray(_lab_to_rgb(np.asarray(img)), "RGB")
    if mode in _PREMULTIPLIED:
        return _premultiplied_on_white(img)
    palette_alpha = mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    if mode in _ALPHA or palette_alpha or ("transparency" in info and mode in ("P", "L", "RGB", "1")):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert an image of PIL mode {mode!r} to RGB ({e})") from None


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode a file (or its bytes) fully into 8-bit RGB by `to_rgb`; PIL errors pass through."""
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
    """A PIL image as a uint8 tensor (C, H, W): an L image (without transparency) as one channel, any
    other mode as RGB by `to_rgb`."""
    if img.mode != "L" or "transparency" in img.info:
        img = to_rgb(img)
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
