"""WebDataset shards: written from an image folder, read back item for item, split over ranks and workers,
resumed exactly; the training loops and the latent cache stream them. And the map-style sampler's split."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from aligntok.cli import main
from aligntok.config import apply_overrides
from aligntok.data import ImageFolderDataset, ShardDataset, build_dataset, write_shards
from aligntok.data.latents import LatentCache, build_cache
from aligntok.recipes.tokenizer import tokenizer_train_recipe
from aligntok.train.common import StepBatchSampler, read_log
from aligntok.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory, image_folder) -> Path:
    """The shared two-class folder plus captions for some images."""
    root = tmp_path_factory.mktemp("captioned") / "shapes"
    shutil.copytree(image_folder, root)
    rows = [{"file": "red/0.png", "caption": "a red square, ünïcode"}, {"file": "blue/3.png", "caption": "x"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory, folder) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shapes"
    main(["data", "shards", "--images", str(folder), "--out", str(out), "--shard-size", "3"])
    return out


def test_shards_hold_image_bytes_label_caption_and_read_back_item_for_item(folder, shards) -> None:
    tars = sorted(p.name for p in shards.glob("*.tar"))
    assert tars == [f"all-{i:06d}.tar" for i in range(4)]  # 12 images, 3 per shard
    with tarfile.open(shards / tars[0]) as tar:
        assert sorted(tar.getnames()) == [f"{i:09d}.{e}" for i in range(3) for e in ("cls", "png", "txt")]
        assert tar.extractfile("000000000.png").read() == (folder / "blue" / "0.png").read_bytes()
    ref = ImageFolderDataset(folder, resolution=16)
    ds = build_dataset(str(shards), split="val", resolution=16)  # a flat folder serves both splits
    assert isinstance(ds, ShardDataset) and len(ds) == 12 and ds.classes == ["blue", "red"]
    items = list(ds)
    assert [it["index"] for it in items] == list(range(12))
    for it in items:
        want = ref[it["index"]]
        assert torch.equal(it["image"], want["image"]) and it["image"].shape == (3, 16, 16)
        assert (it["label"], it["caption"]) == (want["label"], want["caption"])
    assert {it["caption"] for it in items} >= {"a red square, ünïcode", "x", "red"}
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(folder, shards)


def test_split_layout_gives_one_shard_set_per_split(tmp_path, folder) -> None:
    for split in ("train", "val"):
        shutil.copytree(folder / "red", tmp_path / "src" / split / "red")
    write_shards(tmp_path / "src", tmp_path / "out", shard_size=4)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
        "val-000001.tar",
    ]
    assert len(ShardDataset(tmp_path / "out", resolution=8, split="val")) == 6


def _indices(batches) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def test_stream_splits_shards_over_ranks_and_resumes_exactly(shards) -> None:
    ds = ShardDataset(shards, resolution=8)
    # One epoch: 12 images = 3 steps of a global batch of 4 (2 per rank); every image read once.
    per_rank = [_indices(ds.loader(batch=2, seed=5, start=0, stop=3, rank=r, world=2)) for r in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(12))
    # Each rank reads whole shards (3 images each), its own.
    assert {i // 3 for i in per_rank[0]}.isdisjoint({i // 3 for i in per_rank[1]})
    # Epochs reshuffle; a stream resumed at step s continues the uninterrupted one exactly.
    full = _indices(ds.loader(batch=2, seed=5, start=0, stop=8, num_workers=2))
    assert sorted(full[:12]) == list(range(12)) and full[12:] != full[:4]
    assert _indices(ds.loader(batch=2, seed=5, start=3, stop=8, num_workers=2)) == full[6:]
    with pytest.raises(ValueError, match="cannot feed 2 ranks x 3 workers"):
        ds.loader(batch=2, seed=0, start=0, stop=1, world=2, num_workers=3)


def test_stream_skips_an_undecodable_sample_with_a_warning(tmp_path, folder) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    png = broken / "red" / "0.png"
    png.write_bytes(png.read_bytes()[:-30])  # the header reads (so it is listed), the pixels do not
    out = tmp_path / "shards"
    write_shards(broken, out, shard_size=3)
    ds = ShardDataset(out, resolution=8)
    bad = ImageFolderDataset(broken, resolution=8).files.index(png)
    want = rf"skipped 1 bad sample.*first: sample {bad:09d}: its \.png image does not decode"
    with pytest.warns(UserWarning, match=want):
        seen = _indices(ds.loader(batch=1, seed=0, start=0, stop=11))
    assert sorted(seen) == sorted(set(range(12)) - {bad})  # one epoch: every other image, once


def test_step_batch_sampler_covers_every_index_once_per_epoch() -> None:
    # 26 items, global batch 8 over 2 ranks: an epoch is 3 steps; 2 items dropped, every other seen once.
    seen = [
        i
        for r in (0, 1)
        for b in StepBatchSampler(n=26, batch=8, seed=3, start=0, stop=3, rank=r, world=2)
        for i in b
    ]
    assert len(seen) == 24 == len(set(seen)) and set(seen) <= set(range(26))
    one = [i for b in StepBatchSampler(n=26, batch=8, seed=3, start=0, stop=3) for i in b]
    assert sorted(one) == sorted(seen)  # the same images as one process, split between the ranks


def test_latent_cache_and_tokenizer_training_stream_shards(tmp_path, shards, folder, debug_tokenizer) -> None:
    from_shards = build_cache(tokenizer_dir=debug_tokenizer, data=str(shards), out=tmp_path / "a")
    from_folder = build_cache(tokenizer_dir=debug_tokenizer, data=str(folder), out=tmp_path / "b")
    a, b = LatentCache.load(from_shards), LatentCache.load(from_folder)
    assert a.meta["num_shards"] == 4 and torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.latents, b.latents)
    assert a.captions == b.captions and "a red square, ünïcode" in a.captions  # shards keep captions (.txt)
    cfg = apply_overrides(
        tokenizer_train_recipe("debug-stage1"), [f"data={shards}", "stages.0.steps=2", "lpips_net=alex"]
    )
    train_tokenizer(cfg, out=tmp_path / "tok")
    log = read_log(tmp_path / "tok" / "stage-1" / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and (tmp_path / "tok" / "export").is_dir()
