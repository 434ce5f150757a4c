"""The emoji dataset: two vendors' 64x64 drawings of every Unicode emoji, with category labels and names.

Source: the npm packages emoji-datasource-twitter and emoji-datasource-google (16.0.0). Their
`emoji.json` lists each emoji (category, subcategory, name, image file, per-vendor `has_img_*` flags)
and, under `skin_variations`, its skin-tone variants; `img/<vendor>/64/` holds the RGBA drawings.

Prepared layout (`home()/data/emoji/`):
    images.npy   uint8 (N, 3, 64, 64), RGBA composited on white
    meta.json    classes, styles, and one column per item field (label, subcategory, name, caption, style,
                 is_base, unified, base, group, split)

Labels are the 9 Unicode categories ("Component", the bare skin-tone swatches, is dropped); style is the
vendor (0 twitter, 1 google); skin-tone variants are items of their own (most of "People & Body") with
`is_base` false. The train/val split hashes a group identity with sha256, so it is identical on every
machine and Python run: a group is a base emoji with its skin-tone variants, in both vendors' drawings,
merged with any emoji drawn with identical pixels (e.g. flags of territories that use their country's
flag, families drawn alike) or linked by `obsoleted_by`, so no picture appears on both sides.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tarfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.assets import AssetError, Package
from aligntok.data.images import ArrayImageDataset, check_split, load_image, pil_to_uint8, resize_stack

NAME = "emoji"
FORMAT = 1
NATIVE = 64
VENDORS = ("twitter", "google")  # index = style
PACKAGES = (
    Package(
        client="npm",
        name="emoji-datasource-twitter",
        version="16.0.0",
        sha256="f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
    ),
    Package(
        client="npm",
        name="emoji-datasource-google",
        version="16.0.0",
        sha256="fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
    ),
)
VAL_FRACTION = 0.1
DROPPED_CATEGORIES = ("Component",)
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone (sha256; Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"aligntok-split:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _caption(name: str, tones: str | None) -> str:
    caption = name.lower()
    if tones is None:
        return caption
    parts = list(dict.fromkeys(SKIN_TONES.get(t, f"skin tone {t}") for t in tones.split("-")))
    return f"{caption}: {', '.join(parts)}"


def _read_package(archive: Path, vendor: str) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """emoji.json and the 64 px PNG bytes of one vendor package, in one sequential pass over the tgz."""
    prefix = f"package/img/{vendor}/{NATIVE}/"
    entries: list[dict[str, Any]] | None = None
    pngs: dict[str, bytes] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if member.name == "package/emoji.json":
                entries = json.load(tar.extractfile(member))
            elif member.name.startswith(prefix) and member.name.endswith(".png"):
                pngs[member.name[len(prefix) :]] = tar.extractfile(member).read()
    if entries is None:
        raise AssetError(f"{archive} has no package/emoji.json; is it an emoji-datasource package?")
    return entries, pngs


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller name is the root, so a group's name does not depend on visiting order
            self.parent[max(ra, rb)] = min(ra, rb)


def prepare(archives: Sequence[Path], out: Path) -> None:
    """Build `out/images.npy` and `out/meta.json` from the two vendor archives (twitter, google)."""
    assert len(archives) == len(VENDORS), archives
    images: list[torch.Tensor] = []
    cols: dict[str, list[Any]] = {
        k: [] for k in ("label", "subcategory", "name", "caption", "style", "is_base", "unified", "base")
    }
    classes: list[str] = []
    missing: dict[str, int] = {}
    linked: list[tuple[str, str]] = []
    for style, (vendor, archive) in enumerate(zip(VENDORS, archives)):
        entries, pngs = _read_package(Path(archive), vendor)
        entries = sorted(
            (e for e in entries if e["category"] not in DROPPED_CATEGORIES),
            key=lambda e: e.get("sort_order", 0),
        )
        missing[vendor] = 0
        for e in entries:
            if e["category"] not in classes:
                classes.append(e["category"])
            if e.get("obsoleted_by"):
                linked.append((e["unified"], e["obsoleted_by"]))
            variants = [(None, e), *sorted((e.get("skin_variations") or {}).items())]
            for tones, v in variants:
                data = pngs.get(v.get("image", ""))
                if not v.get(f"has_img_{vendor}", False) or data is None:
                    missing[vendor] += 1
                    continue
                images.append(pil_to_uint8(load_image(data)))
                cols["label"].append(classes.index(e["category"]))
                cols["subcategory"].append(e.get("subcategory") or "")
                cols["name"].append(e.get("name") or e.get("short_name") or v["unified"])
                cols["caption"].append(_caption(cols["name"][-1], tones))
                cols["style"].append(style)
                cols["is_base"].append(tones is None)
                cols["unified"].append(v["unified"])
                cols["base"].append(e["unified"])
    if not images:
        raise AssetError(f"no {NATIVE} px emoji images found in {', '.join(map(str, archives))}")
    stack = torch.stack(images)  # (N, 3, 64, 64)
    if stack.shape[1:] != (3, NATIVE, NATIVE):
        raise AssetError(f"emoji images are {tuple(stack.shape[2:])} px, expected {NATIVE}")

    groups = _UnionFind()
    bases = set(cols["base"])
    for base in bases:
        groups.find(base)
    for old, new in linked:
        if old in bases and new in bases:
            groups.union(old, new)
    by_pixels: dict[bytes, str] = {}
    for i, base in enumerate(cols["base"]):
        key = hashlib.sha256(stack[i].numpy().tobytes()).digest()
        groups.union(by_pixels.setdefault(key, base), base)
    cols["group"] = [groups.find(b) for b in cols["base"]]
    cols["split"] = ["val" if stable_fraction(g) < VAL_FRACTION else "train" for g in cols["group"]]

    np.save(out / "images.npy", stack.numpy())
    counts = {
        split: dict(Counter(classes[lab] for lab, s in zip(cols["label"], cols["split"]) if s == split))
        for split in ("train", "val")
    }
    meta = {
        "format": FORMAT,
        "name": NAME,
        "source": [p.spec for p in PACKAGES],
        "classes": classes,
        "styles": list(VENDORS),
        "missing_images": missing,
        "val_fraction": VAL_FRACTION,
        "counts": counts,
        "items": cols,
    }
    (out / "meta.json").write_text(json.dumps(meta) + "\n")


class EmojiDataset(ArrayImageDataset):
    """The prepared emoji split at one resolution. Extra per-item fields: `subcategories`, `is_base`
    (BoolTensor), `styles` (0 twitter, 1 google; names in `style_names`), `unified` (code points)."""

    def __init__(self, *, meta: dict[str, Any], images: torch.Tensor, rows: np.ndarray) -> None:
        items = meta["items"]
        pick = rows.tolist()
        super().__init__(
            name=NAME,
            images=images,
            labels=torch.tensor([items["label"][i] for i in pick], dtype=torch.long),
            classes=meta["classes"],
            captions=[items["caption"][i] for i in pick],
            styles=torch.tensor([items["style"][i] for i in pick], dtype=torch.long),
        )
        self.style_names: list[str] = list(meta["styles"])
        self.subcategories: list[str] = [items["subcategory"][i] for i in pick]
        self.is_base = torch.tensor([items["is_base"][i] for i in pick], dtype=torch.bool)
        self.unified: list[str] = [items["unified"][i] for i in pick]
        self.groups: list[str] = [items["group"][i] for i in pick]


def read_meta(root: Path) -> dict[str, Any]:
    return json.loads((root / "meta.json").read_text())


@functools.lru_cache(maxsize=4)
def _split_images(root: str, stamp: float, split: str, resolution: int) -> tuple[torch.Tensor, np.ndarray]:
    # Resized once per (split, resolution) and process; `stamp` (meta.json mtime) drops stale entries
    # after a re-fetch. Forked DataLoader workers share the tensor copy-on-write.
    meta = read_meta(Path(root))
    rows = np.flatnonzero(np.asarray(meta["items"]["split"]) == split)
    native = np.load(Path(root) / "images.npy", mmap_mode="r")
    return resize_stack(native[rows], resolution), rows


def load(root: Path, *, split: str, resolution: int, base_only: bool = False) -> EmojiDataset:
    """The prepared emoji dataset under `root` for `split` at `resolution`."""
    check_split(split)
    images, rows = _split_images(str(root), (root / "meta.json").stat().st_mtime, split, resolution)
    meta = read_meta(root)
    if base_only:
        keep = np.asarray(meta["items"]["is_base"], dtype=bool)[rows]
        images, rows = images[torch.from_numpy(keep)], rows[keep]
    return EmojiDataset(meta=meta, images=images, rows=rows)
