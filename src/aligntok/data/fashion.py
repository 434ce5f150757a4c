"""Fashion-MNIST: 70k 28x28 gray photos of clothing in 10 classes (60k train, 10k test).

Source: the Debian package dataset-fashion-mnist, whose data member holds the gzip idx files under
usr/share/datasets/fashion-mnist/. The .deb is read without installing it: an ar archive parsed here,
its data.tar.* opened with tarfile (`dpkg-deb -x` only where the member is zstd and Python cannot read it).

Prepared layout (`home()/data/fashion-mnist/`): {train,val}_images.npy uint8 (N, 28, 28),
{train,val}_labels.npy uint8 (N,), meta.json. The val split is the official 10k test set.

To the model every image is RGB at the requested resolution: the 28x28 picture is padded with 2 black
pixels a side to 32x32 (the background of Fashion-MNIST is black, so the pad is invisible; 32 = 2^5
divides by every patch/stride size the tokenizers use), then resized with PIL, and the gray channel is
repeated three times (the foundation encoders expect RGB).
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.assets import AssetError, Package
from aligntok.data.images import ArrayImageDataset, check_split, resize_stack

NAME = "fashion-mnist"
FORMAT = 1
PACKAGES = (
    Package(
        client="apt",
        name="dataset-fashion-mnist",
        version="0.0~git20200523.55506a9-1",
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    ),
)
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
PAD = 2  # 28 + 2 * 2 = 32
_DIR = "usr/share/datasets/fashion-mnist/"
_FILES = {  # split -> (images, labels) in the package
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each member of a Unix `ar` archive (the container format of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise AssetError("not an ar archive (a .deb starts with '!<arch>')")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        if header[58:60] != b"`\n":
            raise AssetError(f"corrupt ar member header at byte {pos}")
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even offset


def _data_tar_files(deb: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """The files `wanted` (paths without a leading './') from the data member of `deb`."""
    member = next(((n, b) for n, b in ar_members(deb.read_bytes()) if n.startswith("data.tar")), None)
    if member is None:
        raise AssetError(f"{deb} has no data.tar member; is it a Debian package?")
    name, blob = member
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
            for info in tar:
                path = info.name.removeprefix("./")
                if info.isfile() and path in wanted:
                    found[path] = tar.extractfile(info).read()
    except (tarfile.CompressionError, tarfile.ReadError):
        # tarfile reads gz/bz2/xz everywhere but zstd only from Python 3.14; dpkg-deb reads them all.
        if not name.endswith(".zst"):
            raise
        if shutil.which("dpkg-deb") is None:
            raise AssetError(f"{deb} holds {name}, which needs `dpkg-deb` (not on PATH) to unpack") from None
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, capture_output=True)
            found = {p: (Path(tmp) / p).read_bytes() for p in wanted if (Path(tmp) / p).is_file()}
    lost = sorted(set(wanted) - set(found))
    if lost:
        raise AssetError(f"{deb} lacks {', '.join(lost)}")
    return found


def parse_idx(data: bytes) -> np.ndarray:
    """A uint8 array from (gzip) idx bytes: magic 0x0000 08 <ndim>, big-endian uint32 dims, then data."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise AssetError(f"not a uint8 idx file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise AssetError(f"idx file holds {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def prepare(archives: Sequence[Path], out: Path) -> None:
    """Write the idx contents of the .deb in `archives` as .npy arrays plus meta.json into `out`."""
    (deb,) = archives
    files = _data_tar_files(Path(deb), [_DIR + f for pair in _FILES.values() for f in pair])
    counts = {}
    for split, (img_name, lab_name) in _FILES.items():
        images, labels = parse_idx(files[_DIR + img_name]), parse_idx(files[_DIR + lab_name])
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
            raise AssetError(f"unexpected Fashion-MNIST shapes {images.shape}, {labels.shape} in {deb}")
        if labels.max() >= len(CLASSES):
            raise AssetError(f"label {labels.max()} out of range in {deb}")
        np.save(out / f"{split}_images.npy", images)
        np.save(out / f"{split}_labels.npy", labels)
        per_class = np.bincount(labels, minlength=len(CLASSES))
        counts[split] = {CLASSES[c]: int(n) for c, n in enumerate(per_class)}
    meta = {
        "format": FORMAT,
        "name": NAME,
        "source": [p.spec for p in PACKAGES],
        "classes": list(CLASSES),
        "counts": counts,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def read_meta(root: Path) -> dict[str, Any]:
    return json.loads((root / "meta.json").read_text())


@functools.lru_cache(maxsize=4)
def _split_images(root: str, stamp: float, split: str, resolution: int) -> torch.Tensor:
    # Resized once per (split, resolution) and process; `stamp` (meta.json mtime) drops stale entries.
    native = np.load(Path(root) / f"{split}_images.npy")  # (N, 28, 28)
    padded = np.pad(native, ((0, 0), (PAD, PAD), (PAD, PAD)))[:, None]  # (N, 1, 32, 32), black border
    return resize_stack(padded, resolution)


def load(root: Path, *, split: str, resolution: int, base_only: bool = False) -> ArrayImageDataset:
    """The prepared Fashion-MNIST split under `root` at `resolution` (`base_only` has no meaning here)."""
    check_split(split)
    images = _split_images(str(root), (root / "meta.json").stat().st_mtime, split, resolution)
    labels = torch.from_numpy(np.load(root / f"{split}_labels.npy").astype(np.int64))
    classes = read_meta(root)["classes"]
    return ArrayImageDataset(
        name=NAME,
        images=images,
        labels=labels,
        classes=classes,
        captions=[classes[c].lower() for c in labels.tolist()],
    )
