"""Images of every PIL mode become correct 8-bit RGB (data/images.py `to_rgb`, used by `load_image` and
`pil_to_uint8`): one test per mode, each checking the exact 8-bit values of a ramp."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
from PIL import Image

from aligntok.data.images import load_image, pil_to_uint8, to_rgb

V = np.arange(256)  # an 8-bit ramp
V16 = np.append(np.arange(0, 65536, 7), 65535)  # a 16-bit ramp with both ends


def _image(mode: str, arr: np.ndarray) -> Image.Image:
    """An image of `mode` holding `arr` (H, W[, bands]) of the mode's raw sample type."""
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())


def _rgb(img: Image.Image) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out).astype(np.int64)


def _gray(values: np.ndarray) -> np.ndarray:
    """Expected RGB of gray levels `values` (ints 0..255): three equal channels."""
    return np.repeat(np.asarray(values, np.int64)[..., None], 3, axis=-1)


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """color * a + white * (1 - a), rounded to nearest (no ties occur with integer inputs)."""
    c, a = color.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.rint(c * a / 255 + 255 - a).astype(np.int64)


def _by_257(v: np.ndarray) -> np.ndarray:
    """16-bit to 8-bit: round(v / 257), in integers."""
    return (v.astype(np.int64) * 255 + 32767) // 65535


# ----------------------------------------------------------------------------------- 8-bit and bilevel


def test_mode_1_is_black_or_white() -> None:
    bits = (V % 3 == 0)[None]
    img = Image.fromarray(bits)
    assert img.mode == "1"
    np.testing.assert_array_equal(_rgb(img), _gray(np.where(bits, 255, 0)))
    assert pil_to_uint8(img).unique().tolist() == [0, 255]  # not 0/1, as it was


def test_mode_l_is_repeated_to_three_channels() -> None:
    np.testing.assert_array_equal(_rgb(_image("L", V[None].astype(np.uint8))), _gray(V[None]))


def test_mode_la_is_composited_on_white() -> None:
    c, a = np.meshgrid(V, V)  # every (value, alpha) pair
    img = _image("LA", np.stack([c, a], -1).astype(np.uint8))
    np.testing.assert_array_equal(_rgb(img), _over_white(np.repeat(c[..., None], 3, -1), a))


def test_mode_la_premultiplied_is_composited_on_white() -> None:
    c, a = np.meshgrid(V, V)
    c = c * a // 255  # premultiplied: colour <= alpha
    img = _image("La", np.stack([c, a], -1).astype(np.uint8))
    np.testing.assert_array_equal(_rgb(img), _gray(c + 255 - a))


def _palette_image(mode: str, arr: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    palette = np.stack([V, 255 - V, (3 * V) % 256], -1).astype(np.uint8)
    img = _image(mode, arr.astype(np.uint8))
    img.putpalette(palette.tobytes())
    return img, palette.astype(np.int64)


def test_mode_p_without_transparency_takes_the_palette_colours() -> None:
    img, palette = _palette_image("P", V[None])
    np.testing.assert_array_equal(_rgb(img), palette[None])


def test_mode_p_with_per_index_alpha_is_composited_on_white() -> None:
    img, palette = _palette_image("P", V[None])
    img.info["transparency"] = bytes(V.astype(np.uint8))  # index i has alpha i (a PNG tRNS chunk)
    np.testing.assert_array_equal(_rgb(img), _over_white(palette, V)[None])


def test_mode_p_with_one_transparent_index_makes_it_white() -> None:
    img, palette = _palette_image("P", V[None])
    img.info["transparency"] = 7
    want = palette.copy()
    want[7] = 255
    np.testing.assert_array_equal(_rgb(img), want[None])


def test_mode_p_with_an_rgba_palette_is_composited_on_white() -> None:
    img = _image("P", V[None].astype(np.uint8))
    colors = np.stack([V, 255 - V, (3 * V) % 256], -1)
    img.putpalette(np.concatenate([colors, V[:, None]], -1).astype(np.uint8).tobytes(), rawmode="RGBA")
    np.testing.assert_array_equal(_rgb(img), _over_white(colors, V)[None])


def test_mode_pa_is_the_palette_colour_composited_on_white() -> None:
    img, palette = _palette_image("PA", np.stack([V, 255 - V], -1)[None])
    np.testing.assert_array_equal(_rgb(img), _over_white(palette, 255 - V)[None])


def test_mode_rgb_is_unchanged() -> None:
    arr = np.stack([V, 255 - V, (7 * V) % 256], -1)[None]
    np.testing.assert_array_equal(_rgb(_image("RGB", arr.astype(np.uint8))), arr)


def test_mode_rgbx_drops_the_padding_band() -> None:
    arr = np.stack([V, 255 - V, (7 * V) % 256, (11 * V) % 256], -1)[None]
    np.testing.assert_array_equal(_rgb(_image("RGBX", arr.astype(np.uint8))), arr[..., :3])


def test_mode_rgba_is_composited_on_white() -> None:
    c, a = np.meshgrid(V, V)
    color = np.stack([c, 255 - c, (5 * c) % 256], -1)
    img = _image("RGBA", np.concatenate([color, a[..., None]], -1).astype(np.uint8))
    np.testing.assert_array_equal(_rgb(img), _over_white(color, a))


def test_mode_rgba_premultiplied_is_composited_on_white() -> None:
    c, a = np.meshgrid(V, V)
    color = np.stack([c, 255 - c, (5 * c) % 256], -1) * a[..., None] // 255
    img = _image("RGBa", np.concatenate([color, a[..., None]], -1).astype(np.uint8))
    np.testing.assert_array_equal(_rgb(img), color + 255 - a[..., None])


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_transparency_key_on_l_or_rgb_makes_that_colour_white(mode: str) -> None:
    arr = V[None].astype(np.uint8) if mode == "L" else np.stack([V, V, V], -1)[None].astype(np.uint8)
    img = _image(mode, arr)
    img.info["transparency"] = 9 if mode == "L" else (9, 9, 9)
    want = _gray(V[None])
    want[0, 9] = 255
    np.testing.assert_array_equal(_rgb(img), want)


# ------------------------------------------------------------------------------------ other colour spaces


def test_mode_cmyk_is_the_naive_ink_formula() -> None:
    c, k = np.meshgrid(V, V)
    m, y = (3 * c) % 256, 255 - c
    img = _image("CMYK", np.stack([c, m, y, k], -1).astype(np.uint8))
    want = np.rint(np.stack([255 - c, 255 - m, 255 - y], -1) * (255 - k[..., None]) / 255)
    np.testing.assert_array_equal(_rgb(img), want)


def test_mode_ycbcr_keeps_grays_and_follows_jfif() -> None:
    mid = np.full(256, 128)
    gray = _image("YCbCr", np.stack([V, mid, mid], -1)[None].astype(np.uint8))
    np.testing.assert_array_equal(_rgb(gray), _gray(V[None]))
    red = _image("YCbCr", np.stack([mid, mid, V], -1)[None].astype(np.uint8))  # a Cr ramp
    cr = V - 128.0
    jfif = np.clip(np.rint(np.stack([128 + 1.402 * cr, 128 - 0.714136 * cr, mid], -1)), 0, 255)
    assert np.abs(_rgb(red)[0] - jfif).max() <= 1  # PIL's fixed-point JPEG arithmetic


def test_mode_hsv_is_the_hexcone() -> None:
    full = np.full(256, 255)
    gray = _image("HSV", np.stack([V, np.zeros(256), V], -1)[None].astype(np.uint8))  # S = 0
    np.testing.assert_array_equal(_rgb(gray), _gray(V[None]))
    hues = _image("HSV", np.stack([V, full, full], -1)[None].astype(np.uint8))
    want = np.rint([[255 * np.array(colorsys.hsv_to_rgb(h / 255, 1, 1)) for h in V]])
    np.testing.assert_array_equal(_rgb(hues), want)


def _srgb(linear: np.ndarray) -> np.ndarray:
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def test_mode_lab_gray_ramp_is_exactly_gray_at_the_cie_lightness() -> None:
    zero = np.zeros(256)
    img = _image("LAB", np.stack([V, zero, zero], -1)[None].astype(np.uint8))  # a* = b* = 0
    lightness = V * 100 / 255
    fy = (lightness + 16) / 116
    y = np.where(fy > 6 / 29, fy**3, lightness / (24389 / 27))  # CIE: L* <= 8 is linear
    np.testing.assert_array_equal(_rgb(img), _gray(np.floor(255 * _srgb(y) + 0.5))[None])
    assert _rgb(img)[0, 0].tolist() == [0, 0, 0] and _rgb(img)[0, 255].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    ("lab", "rgb"),
    [((54.29, 80.80, 69.89), (255, 0, 0)), ((29.57, 68.30, -112.03), (0, 0, 255)), ((100, 0, 0), (255,) * 3)],
)
def test_mode_lab_primaries_come_back(lab, rgb) -> None:
    """sRGB primaries in D50 L*a*b* (Bradford), as PIL's LAB stores them: L* in 0..255, a*, b* signed."""
    lightness, a, b = lab
    raw = [
        round(lightness * 2.55),
        np.int8(max(-128, round(a))).view(np.uint8),
        np.int8(round(b)).view(np.uint8),
    ]
    got = _rgb(_image("LAB", np.array([[raw]], np.uint8)))[0, 0]
    assert np.abs(got - np.array(rgb)).max() <= 2, got


# ------------------------------------------------------------------------------------- 16 and 32 bits


@pytest.mark.parametrize(
    ("mode", "dtype"), [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2")]
)
def test_mode_i16_is_divided_by_257(mode: str, dtype: str) -> None:
    img = _image(mode, V16[None].astype(dtype))
    assert np.asarray(img).astype(np.int64).tolist() == [V16.tolist()]  # the bytes say what we think
    np.testing.assert_array_equal(_rgb(img), _gray(_by_257(V16))[None])
    assert (_rgb(img) == 255).mean() < 0.01  # it was 99.6% white


def test_mode_i16_with_a_transparency_key_makes_that_value_white() -> None:
    img = _image("I;16", V16[None].astype("<u2"))
    img.info["transparency"] = int(V16[3])
    want = _gray(_by_257(V16))[None]
    want[0, 3] = 255
    np.testing.assert_array_equal(_rgb(img), want)


def test_mode_i_within_16_bits_is_divided_by_257() -> None:
    img = _image("I", V16[None].astype(np.int32))
    np.testing.assert_array_equal(_rgb(img), _gray(_by_257(V16))[None])


def test_mode_i_beyond_16_bits_spans_its_range() -> None:
    values = np.linspace(-1000, 100_000, 300).astype(np.int32)
    img = _image("I", values[None])
    want = np.floor((values.astype(np.float64) + 1000) * 255 / 101_000 + 0.5)
    np.testing.assert_array_equal(_rgb(img), _gray(want)[None])


def test_mode_f_in_0_1_is_scaled_by_255() -> None:
    values = np.append(V / 255, np.linspace(0, 1, 1001)).astype(np.float32)
    img = _image("F", values[None])
    want = np.floor(values.astype(np.float64) * 255 + 0.5)
    np.testing.assert_array_equal(_rgb(img), _gray(want)[None])
    np.testing.assert_array_equal(_rgb(img)[0, :256], _gray(V))


def test_mode_f_beyond_1_is_on_the_0_255_scale() -> None:
    np.testing.assert_array_equal(_rgb(_image("F", V[None].astype(np.float32))), _gray(V[None]))
    values = np.array([-10.0, 0.0, 100.0, 500.0], np.float32)  # widened to [-10, 500]
    want = np.floor((values.astype(np.float64) + 10) * 255 / 510 + 0.5)
    np.testing.assert_array_equal(_rgb(_image("F", values[None])), _gray(want)[None])


def test_mode_f_non_finite_values_are_black_or_white() -> None:
    values = np.array([np.nan, -np.inf, np.inf, 0.5, 1.0], np.float32)
    np.testing.assert_array_equal(_rgb(_image("F", values[None])), _gray([0, 0, 255, 128, 255])[None])


# --------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_file_loads_as_its_8_bit_ramp(fmt: str) -> None:
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, fmt)
    got = np.asarray(load_image(buf.getvalue())).astype(np.int64)
    np.testing.assert_array_equal(got, _gray(_by_257(ramp)))
    tensor = pil_to_uint8(Image.open(io.BytesIO(buf.getvalue())))
    assert tensor.shape == (3, 256, 256) and tensor[0].tolist() == _by_257(ramp).tolist()


def test_a_float_tiff_loads_on_the_0_1_scale() -> None:
    values = (np.arange(256 * 4).reshape(4, 256) % 256 / 255).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "TIFF")
    np.testing.assert_array_equal(
        np.asarray(load_image(buf.getvalue())).astype(np.int64), _gray(np.broadcast_to(V, (4, 256)))
    )
