"""Datasets: ADM crop, image folders, emoji and Fashion-MNIST (real if fetched, synthetic archives always)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.data import (
    build_dataset,
    center_crop_adm,
    dataset_dir,
    emoji,
    fashion,
    fetch_dataset,
    is_prepared,
)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ---------------------------------------------------------------------------------------- ADM center crop


def test_center_crop_adm_takes_the_middle_band_after_halving():
    # 1200x400 in three vertical bands; at 100 px the rule halves twice (400 -> 200 -> 100), needs no
    # bicubic step, and the central 100x100 of the 300x100 result lies inside the middle (green) band.
    arr = np.zeros((400, 1200, 3), np.uint8)
    arr[:, :400, 0] = arr[:, 400:800, 1] = arr[:, 800:, 2] = 255
    out = center_crop_adm(Image.fromarray(arr), 100)
    assert out.size == (100, 100)
    got = np.asarray(out)
    assert (got[..., 1] == 255).all() and (got[..., [0, 2]] == 0).all()
    # Portrait: the crop is vertical.
    out = center_crop_adm(Image.fromarray(arr.transpose(1, 0, 2).copy()), 100)
    assert out.size == (100, 100) and (np.asarray(out)[..., 1] == 255).all()


@pytest.mark.parametrize("size", [(400, 200), (257, 131), (64, 64), (20, 30)])
def test_center_crop_adm_keeps_a_centered_mark_centered(size):
    w, h = size
    res = 32
    arr = np.full((h, w, 3), 255, np.uint8)
    s = min(w, h) // 4
    arr[h // 2 - s // 2 : h // 2 + (s + 1) // 2, w // 2 - s // 2 : w // 2 + (s + 1) // 2] = 0
    out = np.asarray(center_crop_adm(Image.fromarray(arr), res)).astype(float).mean(-1)
    assert out.shape == (res, res)
    dark = 255.0 - out
    ys, xs = np.mgrid[:res, :res]
    cy, cx = (dark * ys).sum() / dark.sum(), (dark * xs).sum() / dark.sum()
    assert abs(cy - (res - 1) / 2) < 1.0 and abs(cx - (res - 1) / 2) < 1.0
    assert out[0, 0] > 240 and out[-1, -1] > 240


# --------------------------------------------------------------------------------------------- folders


def _make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    _png(root / "cats" / "a.png", np.full((40, 60, 3), (255, 0, 0), np.uint8))
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent -> white
    _png(root / "cats" / "sub" / "b.png", rgba)
    _png(root / "dogs" / "c.jpg", np.full((30, 30, 3), (0, 0, 255), np.uint8))
    (root / "dogs" / "bad.png").write_bytes(b"this is not a png")
    (root / "dogs" / "notes.txt").write_text("ignored: not an image suffix")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (root / "dogs" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rows = [{"file": "cats/a.png", "caption": "a red\tsquare"}, {"file": "nope.png", "caption": "x"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_image_folder_classes_captions_and_bad_files(tmp_path):
    _make_folder(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\), first: .*bad\.png"):
        ds = build_dataset(str(tmp_path), resolution=16)
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    names = [p.relative_to(tmp_path).as_posix() for p in ds.files]
    assert names == ["cats/a.png", "cats/sub/b.png", "dogs/c.jpg", "dogs/truncated.png"]
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.labels.dtype == torch.long
    assert ds.num_skipped == 1
    assert ds.captions == ["a red\tsquare", "cats", "dogs", "dogs"]
    red, white, blue = ds[0], ds[1], ds[2]
    for item in (red, white, blue):
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
        assert item["style"] == 0
    assert red["image"][0].min() > 0.95 and red["image"][1:].max() < 0.05
    assert white["image"].min() > 0.99  # transparency composited on white
    assert blue["image"][2].min() > 0.9 and blue["label"] == 1 and blue["index"] == 2
    # The truncated file passes the header check, fails to decode, is counted and replaced.
    with pytest.warns(UserWarning, match="truncated.png"):
        item = ds[3]
    assert ds.num_skipped == 2 and item["index"] == 0 and item["caption"] == "a red\tsquare"


def test_image_folder_flat_and_split_layouts(tmp_path):
    _png(tmp_path / "flat" / "x.png", np.zeros((8, 8, 3), np.uint8))
    ds = build_dataset(tmp_path / "flat", resolution=8)
    assert ds.classes == ["flat"] and len(ds) == 1 and ds[0]["caption"] == ""
    _png(tmp_path / "split" / "train" / "a" / "1.png", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "split" / "train" / "b" / "2.png", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "split" / "val" / "a" / "3.png", np.zeros((8, 8, 3), np.uint8))
    train = build_dataset(tmp_path / "split", split="train", resolution=8)
    val = build_dataset(tmp_path / "split", split="val", resolution=8)
    assert train.classes == ["a", "b"] and len(train) == 2
    assert val.classes == ["a"] and [p.name for p in val.files] == ["3.png"]


def test_bad_specs_raise_one_line_value_errors(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere.*neither a dataset name"):
        build_dataset(str(tmp_path / "nowhere"), resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no images; a folder must hold image files"):
        build_dataset(tmp_path / "empty", resolution=8)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of its 1 image files can be read"), pytest.warns(UserWarning):
        build_dataset(tmp_path / "junk", resolution=8)
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset(tmp_path / "junk", split="test", resolution=8)
    with pytest.raises(ValueError, match="resolution"):
        build_dataset(tmp_path / "junk", resolution=0)
    with pytest.raises(ValueError, match="known: emoji, fashion-mnist"):
        fetch_dataset("imagenet")
    (tmp_path / "caps").mkdir()
    _png(tmp_path / "caps" / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "caps" / "captions.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:1"):
        build_dataset(tmp_path / "caps", resolution=8)


# ------------------------------------------------------------------ synthetic archives (no network needed)


def _emoji_archive(path: Path, vendor: str, entries: list[dict], images: dict[str, np.ndarray]) -> Path:
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("package/emoji.json", json.dumps(entries).encode())
        for name, arr in images.items():
            buf = io.BytesIO()
            Image.fromarray(arr, "RGBA").save(buf, format="PNG")
            add(f"package/img/{vendor}/64/{name}", buf.getvalue())
    return path


def _fake_emoji(tmp: Path) -> list[Path]:
    def entry(unified, category, name, order, **extra):
        return {
            "unified": unified,
            "image": unified.lower() + ".png",
            "category": category,
            "subcategory": "sub",
            "name": name,
            "sort_order": order,
            "has_img_twitter": True,
            "has_img_google": True,
            **extra,
        }

    wave = entry(
        "1F44B",
        "People & Body",
        "WAVING HAND SIGN",
        2,
        skin_variations={
            "1F3FB": {
                "unified": "1F44B-1F3FB",
                "image": "1f44b-1f3fb.png",
                "has_img_twitter": False,
                "has_img_google": True,
            },
            "1F3FF": {
                "unified": "1F44B-1F3FF",
                "image": "1f44b-1f3ff.png",
                "has_img_twitter": True,
                "has_img_google": True,
            },
        },
    )
    entries = [
        entry("1F600", "Smileys & Emotion", "GRINNING FACE", 1),
        wave,
        entry("1F3FB", "Component", "EMOJI MODIFIER FITZPATRICK TYPE-1-2", 3),
        entry("1F680", "Travel & Places", "ROCKET", 4),
    ]
    dot = np.zeros((64, 64, 4), np.uint8)  # transparent, one opaque pixel in the middle
    dot[32, 32] = (0, 0, 0, 255)
    paths = []
    for vendor, shade in (("twitter", 10), ("google", 200)):
        images = {}
        for i, name in enumerate(
            ["1f600.png", "1f44b.png", "1f44b-1f3fb.png", "1f44b-1f3ff.png", "1f3fb.png", "1f680.png"]
        ):
            arr = dot.copy()
            arr[0, i] = (shade, shade, shade, 255)  # every drawing distinct
            images[name] = arr
        if vendor == "twitter":
            del images["1f680.png"]  # flagged as present, yet missing from the archive
        paths.append(_emoji_archive(tmp / f"{vendor}.tgz", vendor, entries, images))
    return paths


def test_emoji_prepare_on_a_synthetic_package(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    emoji.prepare(_fake_emoji(tmp_path), out)
    meta = json.loads((out / "meta.json").read_text())
    items = meta["items"]
    assert meta["classes"] == ["Smileys & Emotion", "People & Body", "Travel & Places"]
    # twitter: grin, wave, wave dark (wave light has no twitter image; rocket missing from the archive)
    # google: grin, wave, wave light, wave dark, rocket
    assert meta["missing_images"] == {"twitter": 2, "google": 0}
    assert items["style"] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert items["unified"][:3] == ["1F600", "1F44B", "1F44B-1F3FF"]
    assert items["is_base"] == [True, True, False, True, True, False, False, True]
    assert items["base"][2] == "1F44B" and items["label"][2] == 1
    assert items["caption"][5] == "waving hand sign: light skin tone"
    images = np.load(out / "images.npy")
    assert images.shape == (8, 3, 64, 64) and images.dtype == np.uint8
    assert (images[:, :, 5, 5] == 255).all() and (images[:, :, 32, 32] == 0).all()
    # One emoji, both vendors and all variants: one group, hence one side of the split.
    groups = {u: g for u, g in zip(items["base"], items["group"])}
    sides = {}
    for base, split in zip(items["base"], items["split"]):
        sides.setdefault(base, set()).add(split)
    assert all(len(s) == 1 for s in sides.values()) and groups["1F44B"] == "1F44B"


def _idx(array: np.ndarray) -> bytes:
    return gzip.compress(
        struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def _fake_deb(path: Path, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], Path]:
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(7, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.array([9, 0, 5], np.uint8),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, arr in arrays.items():
            data = _idx(arr)
            info = tarfile.TarInfo(f"./usr/share/datasets/fashion-mnist/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(
        _ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b"odd"), ("data.tar.xz", buf.getvalue())])
    )
    return arrays, path


def test_fetch_is_atomic_idempotent_and_reads_a_deb(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNTOK_HOME", str(tmp_path / "home"))
    arrays, deb = _fake_deb(tmp_path / "fake.deb", np.random.default_rng(1))
    fetched = []
    monkeypatch.setattr("aligntok.data.download", lambda pkg: fetched.append(pkg) or deb)
    assert not is_prepared("fashion-mnist")
    with pytest.raises(ValueError, match="run `aligntok data fetch fashion-mnist`"):
        build_dataset("fashion-mnist", resolution=32)
    root = fetch_dataset("fashion-mnist")
    assert root == dataset_dir("fashion-mnist") and is_prepared("fashion-mnist")
    assert fetched == list(fashion.PACKAGES)
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    assert (np.load(root / "train_images.npy") == arrays["train-images-idx3-ubyte.gz"]).all()
    assert (np.load(root / "val_labels.npy") == [9, 0, 5]).all()
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert fetch_dataset("fashion-mnist") == root and (root / "meta.json").stat().st_mtime_ns == stamp
    assert len(fetched) == 1  # prepared once: nothing fetched again
    assert fetch_dataset("fashion-mnist", force=True) == root and len(fetched) == 2
    val = build_dataset("fashion-mnist", split="val", resolution=32)
    assert len(val) == 3 and val.labels.tolist() == [9, 0, 5] and val[0]["caption"] == "ankle boot"
    # The 28x28 picture sits inside a black 2-px border, identical in the three channels.
    img = val[1]["image"]
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte.gz"][1]).float() / 255
    assert torch.equal(img[0, 2:30, 2:30], expected) and img[:, :2].abs().max() == 0
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_stable_fraction_ignores_python_hash_seed():
    code = "from aligntok.data.emoji import stable_fraction as f; print(repr(f('1F44B')))"
    # This process runs with a random hash seed; the child with a fixed one.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout == repr(emoji.stable_fraction("1F44B")) + "\n"
    x, y = emoji.stable_fraction("x"), emoji.stable_fraction("y")
    assert 0.0 <= x < 1.0 and 0.0 <= y < 1.0 and x != y


# ------------------------------------------------------------------------------- the real, fetched data


def _need(name: str) -> None:
    if not is_prepared(name):
        pytest.skip(f"{name} not prepared; run `aligntok data fetch {name}`")


@pytest.fixture(scope="module")
def emoji_splits():
    _need("emoji")
    return {s: build_dataset("emoji", split=s, resolution=64) for s in ("train", "val")}


def test_emoji_counts_classes_and_styles(emoji_splits):
    train, val = emoji_splits["train"], emoji_splits["val"]
    # 3,786 drawings per vendor, less the 5 bare skin-tone swatches of "Component".
    assert len(train) + len(val) == 2 * (3786 - 5)
    assert train.num_classes == 9 and "Component" not in train.classes and val.classes == train.classes
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.16
    for ds in (train, val):
        assert set(ds.labels.tolist()) == set(range(9))  # every category on both sides
        assert ds.labels.shape == (len(ds),) and ds.labels.dtype == torch.long
        assert torch.bincount(ds.styles).tolist() == [len(ds) // 2] * 2
        assert ds.style_names == ["twitter", "google"]
    people = train.classes.index("People & Body")
    assert (~train.is_base[train.labels == people]).float().mean() > 0.5  # mostly skin-tone variants


def test_emoji_split_is_disjoint_by_identity_and_pixels(emoji_splits):
    train, val = emoji_splits["train"], emoji_splits["val"]
    assert not set(train.unified) & set(val.unified)
    assert not set(train.groups) & set(val.groups)

    def pixels(ds):
        return {hashlib.sha256(ds.images[i].numpy().tobytes()).digest() for i in range(len(ds))}

    assert not pixels(train) & pixels(val)  # no drawing, of either vendor, on both sides
    again = build_dataset("emoji", split="val", resolution=64)
    assert again.unified == val.unified and torch.equal(again.images, val.images)


def test_emoji_items_base_only_and_white_background(emoji_splits):
    val = emoji_splits["val"]
    item = val[len(val) - 1]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["index"] == len(val) - 1 and item["caption"] == val.captions[-1] and item["style"] in (0, 1)
    assert val.images.dtype == torch.uint8 and val.images.max() == 255
    corners = val.images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].float() / 255  # (N, 3, 4)
    assert corners.median() == 1.0 and (corners.amin((1, 2)) > 0.95).float().mean() > 0.8
    base = build_dataset("emoji", split="val", resolution=16, base_only=True)
    assert len(base) == int(val.is_base.sum()) and base.is_base.all()
    assert not any("skin tone" in c for c in base.captions)
    assert base[0]["image"].shape == (3, 16, 16)
    assert base.unified == [u for u, b in zip(val.unified, val.is_base.tolist()) if b]


def test_fashion_mnist_real():
    _need("fashion-mnist")
    train = build_dataset("fashion-mnist", split="train", resolution=32)
    val = build_dataset("fashion-mnist", split="val", resolution=32)
    assert (len(train), len(val)) == (60_000, 10_000)
    assert train.num_classes == 10 and train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert torch.bincount(train.labels).tolist() == [6000] * 10  # the dataset is balanced
    assert torch.bincount(val.labels).tolist() == [1000] * 10
    item = val[123]
    assert item["image"].shape == (3, 32, 32) and item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    assert torch.equal(item["image"][0], item["image"][2]) and item["image"][:, :, :2].max() == 0
