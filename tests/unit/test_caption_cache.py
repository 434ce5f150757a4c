"""Captions through the caches: the latent cache records each row's caption (flipped copies too), and the
caption-feature cache encodes each distinct caption once, maps latent rows to it, is reused on a rerun and
refuses another text encoder or other captions."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aligntok.data import build_dataset
from aligntok.data.captions import (
    FEATURES,
    CaptionCache,
    build_caption_cache,
    caption_cache_dir,
    captions_sha256,
)
from aligntok.data.latents import LatentCache, build_cache
from aligntok.models.text import build_text_encoder, text_encoder_identity

# Two shards' rows: repeated captions (two vendors, flipped copies) and the empty caption.
SHARDS = [
    ["a red square", "a red square", "a blue disc", ""],
    ["a blue disc", "a red square on white, twice as long as the others", "a red square"],
]


def _tiny_bert(root: Path, *, seed: int = 0) -> Path:
    """A random 1-layer BERT with a letter-by-letter WordPiece tokenizer, as `save_pretrained` writes it."""
    import transformers as T

    root.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.punctuation]
    vocab += [f"##{c}" for c in string.ascii_lowercase]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = T.BertTokenizer(str(root / "vocab.txt"))  # positional: vocab_file in 4.x, vocab in 5.x
    torch.manual_seed(seed)
    cfg = T.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    T.BertModel(cfg).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _latent_cache(out: Path, shards: list[list[str]]) -> Path:
    """A complete latent cache whose shards record `shards`' captions (random latents)."""
    g = torch.Generator().manual_seed(0)
    for i, captions in enumerate(shards):
        n = len(captions)
        tensors = {
            "latents": torch.randn(n, 2, 2, 2, generator=g),
            "labels": torch.zeros(n, dtype=torch.long),
        }
        tensors |= {"indices": torch.arange(n), "flipped": torch.zeros(n, dtype=torch.uint8)}
        save_file(
            tensors, str(out / f"shard-{i:05d}.safetensors"), metadata={"captions": json.dumps(captions)}
        )
    meta = {"num_shards": len(shards), "latent_shape": [2, 2, 2], "classes": ["a"], "mean": [0.0] * 2}
    meta |= {"std": [1.0] * 2, "tokenizer": {"path": "t", "hash": "h"}}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("text") / "bert")


@pytest.fixture
def latents(tmp_path) -> Path:
    (tmp_path / "latents").mkdir()
    return _latent_cache(tmp_path / "latents", SHARDS)


# ---------------------------------------------------------------------------------------------------------
# The latent cache's captions


def test_latent_cache_records_captions_of_every_row_and_refuses_an_old_cache(
    tmp_path, image_folder, debug_tokenizer
) -> None:
    data = tmp_path / "shapes"
    shutil.copytree(image_folder, data)
    rows = [{"file": "red/1.png", "caption": "a red square, ünïcode"}, {"file": "blue/2.png", "caption": ""}]
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = build_cache(
        tokenizer_dir=debug_tokenizer, data=str(data), out=tmp_path / "cache", flip=True, shard_size=5
    )
    cache = LatentCache.load(out)
    truth = build_dataset(str(data), split="train", resolution=32).captions
    assert len(cache) == 2 * len(truth) == len(cache.captions)
    assert cache.captions == [truth[i] for i in cache.indices.tolist()]  # flipped copies: the same caption
    flipped = torch.cat([load_file(str(p))["flipped"] for p in sorted(out.glob("shard-*.safetensors"))])
    assert int(flipped.sum()) == len(truth) and bool(flipped[5:10].all())  # a batch, then its mirror
    assert {"a red square, ünïcode", "", "red", "blue"} <= set(cache.captions)
    # A cache written before captions were recorded: its shards carry no metadata.
    shard = out / "shard-00001.safetensors"
    save_file(load_file(str(shard)), str(shard))
    with pytest.raises(
        ValueError, match=r"predates captions \(shard-00001.safetensors has none\); rebuild it"
    ):
        _ = LatentCache.load(out).captions


# ---------------------------------------------------------------------------------------------------------
# The caption-feature cache


def test_caption_cache_dir_names_the_encoder(bert, tmp_path) -> None:
    assert caption_cache_dir(tmp_path, "minilm") == tmp_path / "text-minilm"
    named = caption_cache_dir(tmp_path, str(bert))
    assert (
        named.parent == tmp_path
        and named.name.startswith("text-bert-")
        and len(named.name) == len("text-bert-") + 8
    )
    other = tmp_path / "elsewhere" / "bert"
    shutil.copytree(bert, other)
    assert caption_cache_dir(tmp_path, str(other)) != named  # same folder name, another path
    with pytest.raises(ValueError, match="not a known name and no such folder"):
        caption_cache_dir(tmp_path, "t5-small")


def test_caption_cache_maps_rows_to_their_unique_captions(bert, latents) -> None:
    path = build_caption_cache(latents, text_encoder=str(bert), batch_size=2)
    assert path == caption_cache_dir(latents, str(bert))
    feats = CaptionCache.load(path)
    every = [c for shard in SHARDS for c in shard]
    unique = list(dict.fromkeys(every))
    stored = load_file(str(path / FEATURES))
    assert stored["tokens"].dtype == torch.float16 and stored["tokens"].shape[0] == len(unique) == 4
    assert feats.unique_captions == unique and len(feats) == len(every) == 7
    encoder = build_text_encoder(str(bert))
    lengths = [len(ids) for ids in encoder.token_ids(unique)[0]]
    assert feats.length == max(lengths) and feats.dim == 16
    assert feats.identity == {
        "text_encoder": encoder.identity(),
        "captions_sha256": captions_sha256(every),
        "rows": 7,
        "length": max(lengths),
    }
    cond = feats.rows(torch.arange(7))
    assert cond["tokens"].shape == (7, feats.length, 16) and cond["tokens"].dtype == torch.float32
    assert cond["mask"].dtype == torch.bool and cond["pooled"].dtype == torch.float32
    assert cond["null"].tolist() == [c == "" for c in every]
    for i, a in enumerate(every):
        for j, b in enumerate(every):
            same = all(torch.equal(cond[k][i], cond[k][j]) for k in cond)
            assert same == (a == b), (a, b)
    # Each row holds what the encoder gives its caption, padded to the cache's length (float16 tokens).
    want = encoder.encode(every, pad_to=feats.length)
    torch.testing.assert_close(cond["tokens"], want["tokens"], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cond["pooled"], want["pooled"], atol=1e-5, rtol=1e-5)
    assert torch.equal(cond["mask"], want["mask"])
    pick = torch.tensor([5, 0, 5])
    assert torch.equal(feats.rows(pick)["pooled"], cond["pooled"][pick])


def test_a_rerun_returns_the_cache_without_encoding(bert, latents, monkeypatch) -> None:
    path = build_caption_cache(latents, text_encoder=str(bert))
    before = (path / FEATURES).stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a complete caption cache was encoded again")

    monkeypatch.setattr("aligntok.data.captions.build_text_encoder", fail)
    assert build_caption_cache(latents, text_encoder=str(bert)) == path
    assert (path / FEATURES).stat().st_mtime_ns == before


def test_another_encoder_or_other_captions_are_refused(bert, latents, tmp_path) -> None:
    path = build_caption_cache(latents, text_encoder=str(bert))
    feats = CaptionCache.load(path)
    every = [c for shard in SHARDS for c in shard]
    feats.check(text_encoder_identity(str(bert)), every)  # the same: accepted
    with pytest.raises(ValueError, match=r"differs in: text_encoder\.max_length\); delete"):
        build_caption_cache(latents, text_encoder=str(bert), max_length=8)
    with pytest.raises(
        ValueError, match=r"another text encoder \(differs in: max_length\); rebuild them with "
    ):
        feats.check(text_encoder_identity(str(bert), max_length=8), every)
    # The same folder holding other weights (retrained in place).
    moved = tmp_path / "bert"
    shutil.copytree(bert, moved)
    build_caption_cache(latents, text_encoder=str(moved))
    retrained = _tiny_bert(tmp_path / "retrained", seed=1)
    shutil.copy(retrained / "model.safetensors", moved / "model.safetensors")
    with pytest.raises(ValueError, match=r"differs in: text_encoder\.weights\)"):
        build_caption_cache(latents, text_encoder=str(moved))
    with pytest.raises(ValueError, match=r"differs in: weights\)"):
        feats.check(text_encoder_identity(str(moved)), every)
    # Other captions: the latent cache rebuilt in place, or another cache's captions.
    with pytest.raises(ValueError, match=r"made for other captions \(7 rows, now 6\)"):
        feats.check(text_encoder_identity(str(bert)), every[:-1])
    with pytest.raises(ValueError, match=r"made for other captions \(7 rows, now 7\)"):
        feats.check(text_encoder_identity(str(bert)), every[::-1])
    _latent_cache(latents, [SHARDS[0], ["a green triangle"]])
    with pytest.raises(ValueError, match=r"differs in: captions_sha256\)"):
        build_caption_cache(latents, text_encoder=str(bert))


def test_a_latent_cache_without_captions_is_refused(bert, latents) -> None:
    shard = latents / "shard-00000.safetensors"
    save_file(load_file(str(shard)), str(shard))
    with pytest.raises(ValueError, match="predates captions"):
        build_caption_cache(latents, text_encoder=str(bert))
    assert not caption_cache_dir(latents, str(bert)).exists()
    with pytest.raises(ValueError, match="not a complete caption-feature cache"):
        CaptionCache.load(latents / "text-nothing")
