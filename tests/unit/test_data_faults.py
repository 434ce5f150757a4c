"""Bad inputs to the data layer (issue 29): bad shard samples are skipped, counted and reported; a class
folder whose name is not UTF-8 is named in one line; files written atomically get the usual umask mode."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from aligntok.assets import atomic_dir, atomic_file
from aligntok.checkpoint import save_export
from aligntok.cli import main
from aligntok.data import ShardDataset, write_shards
from aligntok.data.shards import FORMAT, META


def png(value: int = 200, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def sample(
    key: str, *, image: bytes | None = None, cls: bytes | None = b"1", txt: bytes | None = b"ok"
) -> dict:
    """The files of one shard sample (`<key>.png`, `.cls`, `.txt`), each left out when None."""
    files = {"png": png() if image is None else image, "cls": cls, "txt": txt}
    return {"__key__": key, **{ext: data for ext, data in files.items() if data is not None}}


def write_shard_folder(root: Path, shards: list[list[dict]], classes: tuple[str, ...] = ("a", "b")) -> Path:
    """A shard folder as `write_shards` makes one, holding exactly the given samples (written with tarfile,
    so that keys and contents can be anything)."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for n, samples in enumerate(shards):
        name = f"all-{n:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for s in samples:
                for ext, data in s.items():
                    if ext != "__key__":
                        info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        names.append([name, len(samples)])
    meta = {"format": FORMAT, "source": "test", "classes": list(classes), "splits": {"all": names}}
    (root / META).write_text(json.dumps(meta))
    return root


BAD = {
    "non-numeric key": (dict(key="abc"), "its key is not a number"),
    "non-integer label": (dict(cls=b"one"), r"its label b'one' is not a non-negative integer"),
    "fractional label": (dict(cls=b"1.5"), "is not a non-negative integer"),
    "negative label": (dict(cls=b"-1"), "is not a non-negative integer"),
    "label outside the classes": (dict(cls=b"7"), r"its label 7 is not a class \(0\.\.1\)"),
    "missing .cls": (dict(cls=None), r"it has no \.cls label"),
    "non-UTF-8 caption": (dict(txt=b"caf\xe9"), r"its caption \(\.txt\) is not UTF-8"),
    "undecodable image": (dict(image=b"\x89PNG\r\n\x1a\n garbage"), r"its \.png image does not decode"),
    "truncated image": (dict(image=png()[:-30]), r"its \.png image does not decode"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_kind_of_bad_shard_sample_is_skipped_counted_and_warned(tmp_path, kind) -> None:
    change, reason = BAD[kind]
    key = change.pop("key", "000000001")
    bad = sample(key, **change)
    root = write_shard_folder(tmp_path / "s", [[sample("000000000"), bad, sample("000000002", cls=b"0")]])
    ds = ShardDataset(root, resolution=8)
    with pytest.warns(UserWarning) as record:
        items = list(ds)
    assert [it["index"] for it in items] == [0, 2] and [it["label"] for it in items] == [1, 0]
    assert items[0]["caption"] == "ok" and items[0]["image"].shape == (3, 8, 8)
    messages = [str(w.message) for w in record]
    shown = key if key.isdigit() else "abc"
    per_shard = [m for m in messages if "all-000000.tar: skipped 1 bad sample(s); first: sample" in m]
    assert len(per_shard) == 1, messages
    assert f"sample {shown}: " in per_shard[0]
    assert re.search(reason, per_shard[0]), per_shard[0]
    assert any("1 bad sample(s) skipped in a pass over 1 shard(s)" in m for m in messages), messages
    assert ds.num_skipped == 1 and ds.skipped == {"all-000000.tar": (1, per_shard[0].split("first: ")[1])}
    assert "1 bad sample(s) skipped" in ds.skip_report() and "all-000000.tar: 1" in ds.skip_report()
    # The training stream skips it too, and reports the epoch's total when the epoch ends.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        batches = list(ds.loader(batch=1, seed=0, start=0, stop=3))
        seen = [i for b in batches for i in b["index"].tolist()]
        del batches  # the stream ends inside epoch 1's shard, which warns of what it saw so far
    messages = [str(w.message) for w in record]
    assert any("epoch 0: 1 bad sample(s) skipped in 1 shard(s) of rank 0, worker 0" in m for m in messages)
    assert any(re.search(reason, m) for m in messages), messages
    assert sorted(seen[:2]) == [0, 2] and seen[2] in (0, 2)  # epoch 1 began


def test_a_shard_of_many_bad_samples_warns_once_with_the_count_and_the_first_reason(tmp_path) -> None:
    samples = [sample("000000000")]
    samples += [
        sample(f"{i:09d}", **{k: v for k, v in BAD[kind][0].items() if k != "key"})
        for i, kind in enumerate(
            ["non-integer label", "missing .cls", "non-UTF-8 caption", "undecodable image"], 1
        )
    ]
    root = write_shard_folder(tmp_path / "s", [samples, [sample("000000009")]])
    ds = ShardDataset(root, resolution=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        items = list(ds)
    messages = [str(w.message) for w in record]
    assert [it["index"] for it in items] == [0, 9]
    assert messages == [
        f"{root / 'all-000000.tar'}: skipped 4 bad sample(s); first: sample 000000001: its label b'one' is "
        "not a non-negative integer",
        f"{root}: 4 bad sample(s) skipped in a pass over 2 shard(s)",
    ]
    assert ds.num_skipped == 4 and list(ds.skipped) == ["all-000000.tar"]


def test_a_damaged_or_short_tar_file_loses_only_its_tail(tmp_path) -> None:
    root = write_shard_folder(
        tmp_path / "s", [[sample(f"{i:09d}", image=png(size=64)) for i in range(3)]] * 2
    )
    with tarfile.open(root / "all-000000.tar") as tar:
        cut = tar.getmember("000000001.png").offset_data + 10  # inside the second sample's image
    data = (root / "all-000000.tar").read_bytes()
    (root / "all-000000.tar").write_bytes(data[:cut])
    meta = json.loads((root / META).read_text())
    meta["splits"]["all"][1][1] = 5  # meta.json promises 5 samples; the tar holds 3
    (root / META).write_text(json.dumps(meta))
    ds = ShardDataset(root, resolution=8)
    with pytest.warns(UserWarning) as record:
        items = list(ds)
    assert len(items) == 4 and ds.num_skipped == 2 + 2
    messages = " | ".join(str(w.message) for w in record)
    assert (
        "all-000000.tar: skipped 2 bad sample(s); first: the tar file is damaged after 1 samples" in messages
    )
    assert (
        "all-000001.tar: skipped 2 bad sample(s); first: the tar file ends after 3 of its 5 samples"
        in messages
    )


def test_a_stream_of_shards_with_no_readable_sample_stops_with_one_line(tmp_path) -> None:
    root = write_shard_folder(
        tmp_path / "s", [[sample("000000000", cls=None)], [sample("000000001", txt=b"\xff")]]
    )
    ds = ShardDataset(root, resolution=8)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no sample in shards"):
        next(iter(ds.loader(batch=1, seed=0, start=0, stop=1)))


def test_a_class_folder_name_that_is_not_utf8_is_named_in_one_line(tmp_path, capsys) -> None:
    images = tmp_path / "images"
    (images / "good").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "good" / "0.png")
    bad = os.path.join(os.fsencode(images), b"caf\xe9")
    os.mkdir(bad)
    Image.new("RGB", (8, 8)).save(os.fsdecode(os.path.join(bad, b"0.png")))
    with pytest.raises(ValueError) as info:
        write_shards(images, tmp_path / "out")
    assert type(info.value) is ValueError  # not a UnicodeEncodeError from deep inside the tar writer
    assert str(info.value).startswith(f"{images}/caf\\xe9: the folder name is not valid UTF-8")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["data", "shards", "--images", str(images), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "caf\\xe9: the folder name is not valid UTF-8" in err[0], err


# ------------------------------------------------------------------------------------------ file modes


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_get_the_mode_open_would_give_even_from_safetensors(tmp_path, umask) -> None:
    with atomic_file(tmp_path / "latents-000000.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))  # safetensors itself writes 0600
    with atomic_file(tmp_path / "plain.json") as tmp:
        tmp.write_text("{}")
    assert mode(tmp_path / "latents-000000.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "plain.json") == 0o666 & ~umask


def test_exports_and_atomic_directories_get_the_usual_modes(tmp_path, umask) -> None:
    out = save_export(tmp_path / "export", torch.nn.Linear(2, 2), {"kind": "test"})
    assert {p.name: mode(p) for p in out.iterdir()} == {
        "model.safetensors": 0o666 & ~umask,
        "config.json": 0o666 & ~umask,
    }
    with atomic_dir(tmp_path / "asset") as tmp:
        (tmp / "sub").mkdir()
        save_file({"x": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
    assert mode(tmp_path / "asset") == mode(tmp_path / "asset" / "sub") == 0o777 & ~umask
    assert mode(tmp_path / "asset" / "sub" / "w.safetensors") == 0o666 & ~umask
