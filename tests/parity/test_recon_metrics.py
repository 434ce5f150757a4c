"""Reconstruction metrics: PSNR and SSIM against hand computations, LPIPS, rFID, the tokenizer pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aligntok.data import ArrayImageDataset
from aligntok.metrics.reconstruction import (
    SSIM_K1,
    SSIM_K2,
    eval_indices,
    lpips,
    psnr,
    reconstruction_metrics,
    rfid,
    ssim,
)
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.tokenizer import tokenizer_preset


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_psnr_of_a_constant_offset() -> None:
    x = 0.2 + 0.6 * _images(3, 16)
    # An offset of 0.1 everywhere: MSE = 0.01, so PSNR = 10 log10(1 / 0.01) = 20 dB exactly.
    assert torch.allclose(psnr(x, x + 0.1), torch.full((3,), 20.0, dtype=torch.float64), atol=1e-9)
    # Same in 0..255 units.
    assert torch.allclose(psnr(255 * x, 255 * x + 25.5, data_range=255.0), torch.tensor(20.0).double())
    # Offset 0.05: MSE 0.0025, PSNR = 10 log10(400).
    assert torch.allclose(psnr(x, x - 0.05), torch.tensor(10 * math.log10(400)).double())


def test_psnr_clamps_to_the_range_and_is_per_image() -> None:
    x = torch.full((2, 3, 8, 8), 0.9)
    y = torch.stack([torch.full((3, 8, 8), 1.7), torch.full((3, 8, 8), 0.7)])
    # The first y is clamped to 1.0 -> error 0.1 (20 dB); the second is 0.2 off (10 log10(25) dB).
    expected = torch.tensor([20.0, 10 * math.log10(25)], dtype=torch.float64)
    assert torch.allclose(psnr(x, y), expected)
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_of_identical_images_is_one() -> None:
    x = _images(2, 24)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert (ssim(x, (x + 0.2 * _images(2, 24, seed=1)).clamp(0, 1)) < 0.99).all()


def test_ssim_of_constant_images_by_hand() -> None:
    a, b = 0.3, 0.6
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    # No variance anywhere: SSIM = (2ab + C1) / (a^2 + b^2 + C1) * (C2 / C2).
    c1 = SSIM_K1**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-6)


def test_ssim_matches_a_direct_sum_over_windows() -> None:
    # Independent implementation: the 11x11 Gaussian window as an explicit 2D array, summed at each position
    # where it fits (13x12 image -> 3x2 positions), channel by channel.
    rng = np.random.default_rng(0)
    x, y = rng.random((3, 13, 12)), rng.random((3, 13, 12))
    r = np.arange(11) - 5
    g = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    values = []
    for c in range(3):
        for i in range(13 - 10):
            for j in range(12 - 10):
                px, py = x[c, i : i + 11, j : j + 11], y[c, i : i + 11, j : j + 11]
                mx, my = (g * px).sum(), (g * py).sum()
                vx, vy = (g * (px - mx) ** 2).sum(), (g * (py - my) ** 2).sum()
                cov = (g * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    got = ssim(torch.from_numpy(x)[None].float(), torch.from_numpy(y)[None].float()).item()
    assert got == pytest.approx(float(np.mean(values)), abs=1e-6)


def test_ssim_refuses_images_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="11 px"):
        ssim(_images(1, 8), _images(1, 8))
    with pytest.raises(ValueError, match="equal shape"):
        psnr(_images(1, 8), _images(2, 8))


def test_lpips_is_zero_for_identical_images_and_grows_with_noise() -> None:
    x = _images(2, 32)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert (lpips(x, noisy) > 0.01).all()


def test_eval_indices_are_a_seeded_sorted_subset() -> None:
    assert eval_indices(5, None) == [0, 1, 2, 3, 4]
    assert eval_indices(5, 9) == [0, 1, 2, 3, 4]
    a = eval_indices(100, 10, seed=3)
    assert a == eval_indices(100, 10, seed=3) and a == sorted(set(a)) and len(a) == 10
    assert a != eval_indices(100, 10, seed=4)
    with pytest.raises(ValueError, match="positive"):
        eval_indices(10, 0)


@pytest.mark.slow
def test_rfid_through_the_real_inception_network() -> None:
    # The real FID network on 3 images a side (it is slow on a CPU): our batches go through it.
    value = rfid(_images(3, 32), _images(3, 32, seed=7), progress=False)
    assert math.isfinite(value) and value > 1.0


def test_rfid_is_zero_for_the_same_images_and_positive_otherwise(stub_inception) -> None:
    x = _images(6, 32)
    same = rfid(x, x.clone(), progress=False)
    assert same == pytest.approx(0.0, abs=1e-6)
    assert rfid(x, _images(6, 32, seed=7), progress=False) > same + 1e-3


def test_reconstruction_metrics_measure_saved_uint8_reconstructions(stub_inception) -> None:
    torch.manual_seed(0)
    tokenizer = Tokenizer(tokenizer_preset("debug")).eval()
    images = (_images(5, 32) * 255).round().to(torch.uint8)
    ds = ArrayImageDataset(
        name="tiny", images=images, labels=torch.zeros(5), classes=["a"], captions=[""] * 5
    )
    out = reconstruction_metrics(tokenizer, ds, num=4, batch_size=3, progress=False)
    assert out["num_images"] == 4
    assert all(math.isfinite(out[k]) for k in ("psnr", "ssim", "lpips", "rfid"))
    # The same numbers by hand: reconstruct, clamp, round to uint8, compare with the originals.
    idx = eval_indices(5, 4)
    x = images[idx].float() / 255
    with torch.no_grad():
        r = (tokenizer.decode(tokenizer.encode(x)).clamp(0, 1) * 255).round() / 255
    assert out["psnr"] == pytest.approx(psnr(r, x).mean().item(), abs=1e-3)
    assert out["ssim"] == pytest.approx(ssim(r, x).mean().item(), abs=1e-4)
    assert out["lpips"] == pytest.approx(lpips(r, x).mean().item(), abs=1e-3)
