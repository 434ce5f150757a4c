"""Property-based tests (hypothesis) of what reads untrusted input: image decoding across PIL modes and
sizes, the `--set` parser, the latent cache reader and the shard reader. Each test is capped at a few
dozen examples so that the file runs in seconds on one core."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tarfile
import tempfile
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from aligntok.assets import atomic_file
from aligntok.config import apply_overrides
from aligntok.data import ShardDataset
from aligntok.data.images import load_image, pil_to_uint8, to_rgb
from aligntok.data.latents import LatentCache
from aligntok.data.shards import FORMAT
from aligntok.data.shards import META as SHARD_META
from aligntok.recipes.dit import dit_train_recipe
from aligntok.recipes.tokenizer import tokenizer_train_recipe

# A few dozen examples per test; ALIGNTOK_HYPOTHESIS_EXAMPLES=2000 searches longer. No example database.
EXAMPLES = int(os.environ.get("ALIGNTOK_HYPOTHESIS_EXAMPLES", "40"))
FAST = settings(max_examples=EXAMPLES, deadline=None, database=None)

# -------------------------------------------------------------------------------------- image decoding

# mode -> (bands, numpy sample type) of the raw bytes `Image.frombytes` takes
RAW = {
    "L": (1, "u1"),
    "LA": (2, "u1"),
    "La": (2, "u1"),
    "P": (1, "u1"),
    "PA": (2, "u1"),
    "RGB": (3, "u1"),
    "RGBA": (4, "u1"),
    "RGBa": (4, "u1"),
    "RGBX": (4, "u1"),
    "CMYK": (4, "u1"),
    "YCbCr": (3, "u1"),
    "LAB": (3, "u1"),
    "HSV": (3, "u1"),
    "I": (1, "=i4"),
    "I;16": (1, "<u2"),
    "I;16L": (1, "<u2"),
    "I;16B": (1, ">u2"),
    "I;16N": (1, "=u2"),
    "F": (1, "=f4"),
}
MODES = ["1", *RAW]
WIDE = ["I", "I;16", "I;16L", "I;16B", "I;16N", "F"]


def _values(rng: np.random.Generator, mode: str, shape: tuple[int, ...], scale: int) -> np.ndarray:
    """Random samples for `mode`; `scale` picks a value range (e.g. F in [0, 1], 0..255 or wide)."""
    _, dtype = RAW[mode]
    if mode == "F":
        hi = (1.0, 255.0, 1e6)[scale % 3]
        arr = rng.uniform(-hi if scale % 3 == 2 else 0.0, hi, shape)
        if scale >= 3:  # sprinkle non-finite values
            arr.flat[rng.integers(0, arr.size, 3)] = rng.choice([np.nan, np.inf, -np.inf], 3)
        return arr.astype(dtype)
    if mode == "I":
        lo, hi = ((0, 65535), (-(2**31), 2**31 - 1), (0, 255))[scale % 3]
        return rng.integers(lo, hi, shape, endpoint=True).astype(dtype)
    top = 65535 if dtype.endswith("u2") else 255
    return rng.integers(0, top, shape, endpoint=True).astype(dtype)


def _palette(rng: np.random.Generator, gray: bool) -> bytes:
    colors = rng.integers(0, 256, (256, 1 if gray else 3)).repeat(3 if gray else 1, axis=1)
    return colors.astype(np.uint8).tobytes()


@st.composite
def images(draw, modes=MODES, gray: bool = False) -> Image.Image:
    """An image of a random mode and size holding random samples; with `gray`, a neutral one (every
    pixel's colour has R = G = B, whatever the mode encodes that as)."""
    mode = draw(st.sampled_from(modes))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.integers(0, 5))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    bands, _ = RAW[mode]
    arr = _values(rng, mode, (h, w, bands), scale)
    if gray and bands >= 3:
        if mode in ("RGB", "RGBA", "RGBa", "RGBX") or mode == "CMYK":
            arr[..., 1] = arr[..., 2] = arr[..., 0]
        elif mode == "YCbCr":
            arr[..., 1:] = 128
        elif mode == "LAB":
            arr[..., 1:] = 0
        elif mode == "HSV":
            arr[..., 1] = 0
    if mode in ("La", "RGBa"):  # premultiplied: colour <= alpha
        arr[..., :-1] = (arr[..., :-1].astype(np.int64) * arr[..., -1:] // 255).astype(np.uint8)
    img = Image.frombytes(mode, (w, h), np.ascontiguousarray(arr[..., 0] if bands == 1 else arr).tobytes())
    if mode in ("P", "PA"):
        img.putpalette(_palette(rng, gray))
        if mode == "P" and scale == 1:
            img.info["transparency"] = bytes(rng.integers(0, 256, 256).astype(np.uint8))
        elif mode == "P" and scale == 2:
            img.info["transparency"] = int(rng.integers(0, 256))
    return img


@FAST
@given(images())
def test_any_mode_and_size_decodes_to_uint8_rgb_of_that_size(img: Image.Image) -> None:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    arr = np.asarray(out)
    assert arr.dtype == np.uint8 and arr.shape == (img.height, img.width, 3)
    tensor = pil_to_uint8(img)
    channels = 1 if img.mode == "L" else 3
    assert tensor.dtype == torch.uint8 and tensor.shape == (channels, img.height, img.width)
    if channels == 3:
        assert torch.equal(tensor, torch.from_numpy(arr.transpose(2, 0, 1).copy()))


@FAST
@given(images(gray=True))
def test_a_gray_image_stays_gray(img: Image.Image) -> None:
    arr = np.asarray(to_rgb(img))
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all(), img.mode


@FAST
@given(images(modes=WIDE))
def test_wide_samples_keep_their_order(img: Image.Image) -> None:
    """16/32-bit and float samples map to 8 bits monotonically: a brighter sample is never darker."""
    values = np.asarray(img).astype(np.float64).ravel()
    gray = np.asarray(to_rgb(img))[..., 0].ravel().astype(np.int64)
    finite = np.isfinite(values)
    order = np.argsort(values[finite], kind="stable")
    assert (np.diff(gray[finite][order]) >= 0).all()
    assert (gray[values == np.inf] == 255).all() and (gray[np.isnan(values) | (values == -np.inf)] == 0).all()
    if img.mode.startswith("I;16") or (img.mode == "I" and values.min() >= 0 and values.max() <= 65535):
        np.testing.assert_array_equal(gray, (values.astype(np.int64) * 255 + 32767) // 65535)


@FAST
@given(images(modes=["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]))
def test_a_png_file_decodes_as_the_image_in_memory(img: Image.Image) -> None:
    buf = io.BytesIO()
    transparency = img.info.get("transparency")
    img.save(buf, "PNG", **({"transparency": transparency} if transparency is not None else {}))
    np.testing.assert_array_equal(np.asarray(load_image(buf.getvalue())), np.asarray(to_rgb(img)))


# ----------------------------------------------------------------------------------- the --set parser


@dataclass(kw_only=True)
class Section:
    lr: float = 1e-4
    name: str | None = None
    kind: Literal["a", "b"] = "a"
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass(kw_only=True)
class Root:
    steps: int = 10
    flag: bool = False
    title: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    section: Section = field(default_factory=Section)
    stages: tuple[Section, ...] = (Section(), Section(lr=2.0))


def _conforms(value: Any, tp: Any) -> bool:
    """Whether `value` has the annotated type `tp` (the types configs use)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if args and args[-1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict or tp is Any:
        return True
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp) and _well_typed(value)
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _well_typed(cfg: Any) -> bool:
    hints = typing.get_type_hints(type(cfg))
    return all(_conforms(getattr(cfg, f.name), hints[f.name]) for f in dataclasses.fields(cfg))


def _leaves(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every settable leaf field of a config, sections and their items included."""
    out = []
    for f in dataclasses.fields(cfg):
        value, path = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out += _leaves(value, path + ".")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            out += [leaf for i, item in enumerate(value) for leaf in _leaves(item, f"{path}.{i}.")]
        else:
            out.append((path, value))
    return out


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, tuple) else getattr(cfg, part)
    return cfg


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
TEXT = st.one_of(JSON.map(json.dumps), st.text(max_size=12))
CONFIGS = {"root": Root(), "dit": dit_train_recipe("debug"), "tokenizer": tokenizer_train_recipe("debug")}
KEYS = {name: [p for p, _ in _leaves(cfg)] for name, cfg in CONFIGS.items()}


@FAST
@given(
    st.sampled_from(sorted(CONFIGS)),
    st.data(),
    TEXT,
)
def test_an_override_either_sets_a_well_typed_value_or_is_a_value_error(name: str, data, raw: str) -> None:
    cfg = CONFIGS[name]
    some_key = st.sampled_from(KEYS[name]) | st.text(alphabet="abcdefgs_.0123456789", max_size=12)
    key = data.draw(st.sampled_from(KEYS[name]) | some_key)
    try:
        new = apply_overrides(cfg, [f"{key}={raw}"])
    except ValueError:
        return
    assert type(new) is type(cfg) and _well_typed(new)
    # What was set is what was written (the JSON value, or the bare text), coerced to the field's type.
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        parsed = raw
    got = _get(new, key)
    if isinstance(got, tuple):
        parsed = tuple(parsed)
    if isinstance(got, float) and isinstance(parsed, int):
        parsed = float(parsed)
    if not dataclasses.is_dataclass(got) and not (
        isinstance(got, tuple) and got and dataclasses.is_dataclass(got[0])
    ):
        assert _same(got, parsed) or got == parsed, (key, raw, got)


@FAST
@given(st.sampled_from(sorted(CONFIGS)), st.data())
def test_every_field_round_trips_its_own_value(name: str, data) -> None:
    cfg = CONFIGS[name]
    key, value = data.draw(st.sampled_from(_leaves(cfg)))
    text = json.dumps(list(value) if isinstance(value, tuple) else value)
    assert apply_overrides(cfg, [f"{key}={text}"]) == cfg


VALID = {
    "steps": st.integers().map(lambda n: (str(n), n)),
    "flag": st.booleans().map(lambda b: (json.dumps(b), b)),
    "title": st.text(max_size=10).map(lambda s: (json.dumps(s), s)),
    "sizes": st.lists(st.integers(), max_size=4).map(lambda v: (json.dumps(v), tuple(v))),
    "section.lr": st.floats(allow_nan=False, allow_infinity=False).map(lambda x: (repr(x), x)),
    "section.name": st.none() | st.text(max_size=6),
    "section.kind": st.sampled_from(["a", "b"]).map(lambda k: (k, k)),
    "section.betas": st.tuples(st.floats(0, 1), st.floats(0, 1)).map(lambda t: (json.dumps(list(t)), t)),
    "stages.1.kind": st.sampled_from(["a", "b"]).map(lambda k: (json.dumps(k), k)),
}
INVALID = {
    "steps": ["1.5", "true", '"3"', "[1]", "null", "abc"],
    "flag": ["1", "yes", "0", "null"],
    "title": ["1", "[]", "null", "{}"],
    "sizes": ["[1.5]", "1", '["a"]', "[true]"],
    "section.lr": ["true", "abc", "[1]", "null"],
    "section.kind": ["c", '"A"', "1", "null"],
    "section.betas": ["[0.9]", "[0.9, 0.9, 0.9]", "0.9", '["a", 1]'],
    "section": ['{"lrr": 1}', '{"lr": "x"}', "[]", "1"],
    "stages.2.lr": ["1"],
    "stages.x.lr": ["1"],
    "stages.0": ["1"],
    "steps.x": ["1"],
    "nothing": ["1"],
}


@FAST
@given(st.data())
def test_a_valid_override_round_trips_to_the_typed_field(data) -> None:
    key = data.draw(st.sampled_from(sorted(VALID)))
    drawn = data.draw(VALID[key])
    if key == "section.name":  # None or a string, written as JSON
        drawn = (json.dumps(drawn), drawn)
    text, want = drawn
    got = _get(apply_overrides(Root(), [f"{key}={text}"]), key)
    assert _same(got, want) or (isinstance(want, tuple) and got == tuple(float(x) for x in want)), (key, text)


@FAST
@given(st.data())
def test_an_invalid_override_is_a_value_error(data) -> None:
    key = data.draw(st.sampled_from(sorted(INVALID)))
    text = data.draw(st.sampled_from(INVALID[key]))
    with pytest.raises(ValueError):
        apply_overrides(Root(), [f"{key}={text}"])


# ------------------------------------------------------------------------------------ the latent cache


@FAST
@given(
    sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4).filter(lambda s: sum(s) > 0),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_latent_shards_read_back_as_written(sizes, shape, seed, data) -> None:
    g = torch.Generator().manual_seed(seed)
    shards = [
        {
            "latents": torch.randn(n, *shape, generator=g),
            "labels": torch.randint(0, 5, (n,), generator=g),
            "indices": torch.randint(0, 1000, (n,), generator=g),
            "flipped": torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8),
        }
        for n in sizes
    ]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for i, shard in enumerate(shards):
            with atomic_file(out / f"shard-{i:05d}.safetensors") as t:
                save_file(shard, str(t))
        mean, std = [0.5] * shape[0], [2.0] * shape[0]
        meta = {"num_shards": len(sizes), "latent_shape": list(shape), "classes": list("abcde")}
        meta |= {"mean": mean, "std": std, "tokenizer": {"path": "t", "hash": "h"}}
        (out / "meta.json").write_text(json.dumps(meta))
        cache = LatentCache.load(out)
        every = torch.cat([s["latents"] for s in shards])
        assert len(cache) == sum(sizes) and cache.num_classes == 5
        assert torch.equal(cache.labels, torch.cat([s["labels"] for s in shards]))
        assert torch.equal(cache.indices, torch.cat([s["indices"] for s in shards]))
        assert torch.equal(cache.latents, every)
        idx = torch.tensor(data.draw(st.lists(st.integers(0, sum(sizes) - 1), min_size=1, max_size=8)))
        assert torch.equal(cache.rows(idx), every[idx])
        torch.testing.assert_close(cache.normalized(), (every - 0.5) / 2.0)


# ------------------------------------------------------------------------------------ the shard reader


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


GOOD = _png(128)
# Each kind of bad sample: how it changes a good sample's files ({ext: bytes}, None removes one).
CORRUPTIONS = {
    "key": None,  # a non-numeric key
    "label": {"cls": b"x"},
    "range": {"cls": b"9"},
    "nolabel": {"cls": None},
    "caption": {"txt": b"\xff\xfe"},
    "image": {"png": GOOD[: len(GOOD) // 2]},
    "garbage": {"png": b"not an image"},
    "noimage": {"png": None},
}


@FAST
@given(
    st.lists(st.lists(st.sampled_from(["good", "good", *CORRUPTIONS]), max_size=5), min_size=1, max_size=3)
)
def test_shards_with_bad_samples_yield_exactly_the_good_ones(layout: list[list[str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, names, good, n = Path(tmp), [], [], 0
        for s, kinds in enumerate(layout):
            name = f"all-{s:06d}.tar"
            with tarfile.open(root / name, "w") as tar:
                for kind in kinds:
                    key = f"k{n}" if kind == "key" else f"{n:09d}"
                    files = {"png": GOOD, "cls": str(n % 2).encode(), "txt": f"caption {n}".encode()}
                    if CORRUPTIONS.get(kind):
                        files |= CORRUPTIONS[kind]
                    for ext, payload in files.items():
                        if payload is not None:
                            info = tarfile.TarInfo(f"{key}.{ext}")
                            info.size = len(payload)
                            tar.addfile(info, io.BytesIO(payload))
                    good += [n] if kind == "good" else []
                    n += 1
            names.append([name, len(kinds)])
        meta = {"format": FORMAT, "source": "test", "classes": ["a", "b"], "splits": {"all": names}}
        (root / SHARD_META).write_text(json.dumps(meta))
        ds = ShardDataset(root, resolution=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            items = list(ds)
            assert [it["index"] for it in items] == good
            assert [it["label"] for it in items] == [i % 2 for i in good]
            assert [it["caption"] for it in items] == [f"caption {i}" for i in good]
            assert ds.num_skipped == n - len(good)
            if good:
                batches = list(ds.loader(batch=1, seed=0, start=0, stop=len(good)))
                assert sorted(int(b["index"]) for b in batches) == good  # one epoch: each good one once
            else:
                with pytest.raises(ValueError, match="no sample"):
                    next(iter(ds.loader(batch=1, seed=0, start=0, stop=1)))
