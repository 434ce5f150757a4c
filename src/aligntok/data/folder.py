"""A folder of images as a dataset, decoded lazily, each image ADM center-cropped to the resolution.

Layout (a `train/` subfolder marks a split layout: then `root/<split>/` is used, else `root` serves
every split):

    root/[<split>/]<class>/.../*.png|jpg|...   one subfolder per class (sorted names -> labels 0, 1, ...),
                                                searched recursively; loose files beside class folders are
                                                ignored (with a warning)
    root/[<split>/]*.png|jpg|...                or no subfolders at all: one class, named after the folder
    root/[<split>/]captions.jsonl               optional; one JSON object a line,
                                                {"file": "<path relative to this folder>", "caption": "..."}

JSON lines, rather than tab-separated text, so captions may hold any character. An image without a
caption gets its class name (underscores as spaces), or "" in a folder without classes.

Files whose header PIL cannot read are skipped when the folder is listed, counted in `num_skipped`, and
reported in one warning. A file that passes that check but fails to decode later (e.g. truncated data)
is counted too and replaced by the next readable image, so a long run never dies on one bad file; its
label in `labels` is then, for that item only, not the label of the image returned. (In DataLoader
worker processes those later counts stay in the worker.)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from aligntok.data.images import (
    ImageDataset,
    center_crop_adm,
    check_resolution,
    check_split,
    load_image,
    pil_to_uint8,
)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTIONS = "captions.jsonl"
_LAYOUT = (
    "a folder must hold image files ("
    + ", ".join(sorted(IMAGE_SUFFIXES))
    + "), directly or in one subfolder per class"
)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def images_under(folder: Path) -> list[Path]:
    found = (p for p in folder.rglob("*") if _is_image(p))
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _header_ok(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            return img.width > 0 and img.height > 0
    except Exception:  # PIL raises many types on garbage (UnidentifiedImageError, OSError, SyntaxError...)
        return False


def read_captions(path: Path) -> dict[str, str]:
    """{relative path: caption} from a captions.jsonl file; a malformed line is a ValueError naming it."""
    captions: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[Path(row["file"]).as_posix()] = str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{path}:{n}: expected {{"file": ..., "caption": ...}} ({e})') from None
    return captions


class ImageFolderDataset(ImageDataset):
    """Images under `root` (see the module docstring for the layout) at `resolution` x `resolution`."""

    def __init__(self, root: str | Path, *, resolution: int, split: str = "train") -> None:
        check_split(split)
        check_resolution(resolution)
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder; {_LAYOUT}")
        folder = root / split if (root / "train").is_dir() else root
        if not folder.is_dir():
            raise ValueError(
                f"{root} has a train/ subfolder but no {split}/; add {folder} or pass that "
                "split's folder as its own dataset"
            )
        self.root = folder
        self.name = str(folder)
        self.resolution = resolution
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        per_class = [(d.name, images_under(d)) for d in class_dirs]
        per_class = [(name, files) for name, files in per_class if files]
        loose = sorted(p for p in folder.iterdir() if _is_image(p))
        has_classes = bool(per_class)
        if has_classes:
            if loose:
                warnings.warn(
                    f"{folder}: ignored {len(loose)} image(s) beside the class folders, e.g. "
                    f"{loose[0].name}; move them into a class folder",
                    stacklevel=2,
                )
            self.classes = [name for name, _ in per_class]
        else:
            per_class = [(folder.name, loose)]
            self.classes = [folder.name]
        candidates = [(path, label) for label, (_, files) in enumerate(per_class) for path in files]
        if not candidates:
            raise ValueError(f"{folder} holds no images; {_LAYOUT}")
        readable = [_header_ok(p) for p, _ in candidates]
        good = [c for c, ok in zip(candidates, readable) if ok]
        bad = [p for (p, _), ok in zip(candidates, readable) if not ok]
        self.num_skipped = len(bad)
        if bad:
            msg = f"{folder}: skipped {len(bad)} unreadable image file(s), first: {bad[0]}"
            warnings.warn(msg, stacklevel=2)
        if not good:
            raise ValueError(f"{folder}: none of its {len(candidates)} image files can be read; {_LAYOUT}")
        self.files = [p for p, _ in good]
        self.labels = torch.tensor([lab for _, lab in good], dtype=torch.long)
        captions = read_captions(folder / CAPTIONS) if (folder / CAPTIONS).is_file() else {}
        default = [name.replace("_", " ") if has_classes else "" for name in self.classes]
        self.captions = [captions.get(p.relative_to(folder).as_posix(), default[lab]) for p, lab in good]
        self._failed: set[int] = set()

    def _decode(self, index: int) -> torch.Tensor:
        img = center_crop_adm(load_image(self.files[index]), self.resolution)
        return pil_to_uint8(img).float().div_(255.0)  # (3, H, W)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        for step in range(len(self.files)):
            i = (index + step) % len(self.files)
            if i in self._failed:
                continue
            try:
                image = self._decode(i)
            except Exception as e:  # a file that passed the header check but does not decode
                self._failed.add(i)
                self.num_skipped += 1
                msg = f"{self.files[i]}: cannot decode ({e}); using the next image instead"
                warnings.warn(msg, stacklevel=2)
                continue
            return {
                "image": image,
                "label": int(self.labels[i]),
                "caption": self.captions[i],
                "style": 0,
                "index": i,
            }
        raise ValueError(f"{self.root}: no image in the folder can be decoded")
