"""LPIPS v0.1 with VGG16 / AlexNet trunks loaded from the offline assets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aligntok import assets
from aligntok.models.lpips import (
    LPIPS,
    LPIPS_SCALE,
    LPIPS_SHIFT,
    VGG_MEAN,
    VGG_STD,
    AlexNetFeatures,
    VGG16Features,
    load_vgg16_trunk,
    lpips_normalize,
)


@pytest.fixture(scope="module", params=["vgg", "alex"])
def lpips(request) -> LPIPS:
    assets.fetch({"vgg": "lpips-vgg16", "alex": "lpips-alexnet"}[request.param])
    return LPIPS.from_assets(request.param)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """scikit-learn's two bundled photos, (2, 3, 128, 128) in [0, 1]."""
    from sklearn.datasets import load_sample_image

    imgs = [torch.tensor(load_sample_image(n)).permute(2, 0, 1) for n in ("china.jpg", "flower.jpg")]
    x = torch.stack(imgs).float() / 255
    return F.interpolate(x, size=(128, 128), mode="bilinear", antialias=True).clamp(0, 1)


def _box_blur(x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.full((3, 1, 3, 3), 1 / 9), groups=3)


def test_normalisation_constants_are_imagenet_statistics():
    x = torch.rand(2, 3, 4, 4)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert pytest.approx((0.485, 0.456, 0.406)) == VGG_MEAN
    assert pytest.approx((0.229, 0.224, 0.225)) == VGG_STD
    torch.testing.assert_close(lpips_normalize(x), (x - mean) / std)
    shift = torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1)
    torch.testing.assert_close(lpips_normalize(x), (2 * x - 1 - shift) / scale)


def test_trunk_tap_shapes():
    with torch.no_grad():
        vgg = VGG16Features()(torch.randn(1, 3, 32, 32))
        alex = AlexNetFeatures()(torch.randn(1, 3, 64, 64))
        first_two = VGG16Features()(torch.randn(1, 3, 32, 32), stages=2)
    assert [tuple(f.shape[1:]) for f in vgg] == [
        (64, 32, 32),
        (128, 16, 16),
        (256, 8, 8),
        (512, 4, 4),
        (512, 2, 2),
    ]
    # AlexNet: 11x11 stride-4 conv (64 -> 15), 3x3/2 pools (15 -> 7 -> 3).
    assert [tuple(f.shape[1:]) for f in alex] == [
        (64, 15, 15),
        (192, 7, 7),
        (384, 3, 3),
        (256, 3, 3),
        (256, 3, 3),
    ]
    assert [f.shape[1] for f in first_two] == [64, 128]
    assert all((f >= 0).all() for f in vgg + alex)  # taps sit after ReLUs
    with pytest.raises(ValueError, match="stages"):
        VGG16Features()(torch.randn(1, 3, 8, 8), stages=6)


def test_frozen_eval_module(lpips):
    assert not lpips.training
    assert all(not p.requires_grad for p in lpips.parameters())
    # LPIPS v0.1 heads are non-negative, so every tap adds a non-negative term.
    assert all((head.weight >= 0).all() for head in lpips.heads)


def test_identity_is_exactly_zero(lpips, photos):
    with torch.no_grad():
        d = lpips(photos, photos.clone())
    assert d.shape == (2,)
    assert torch.equal(d, torch.zeros(2))


def test_blur_is_closer_than_noise(lpips, photos):
    gen = torch.Generator().manual_seed(0)
    noisy = (photos + 0.1 * torch.randn(photos.shape, generator=gen)).clamp(0, 1)
    with torch.no_grad():
        d_blur = lpips(photos, _box_blur(photos))
        d_noise = lpips(photos, noisy)
    assert (d_blur < d_noise).all(), (d_blur, d_noise)
    # Measured on these two photos (see the report): blur 0.10-0.23, noise 0.33-0.49 for both nets.
    assert ((d_blur > 0.02) & (d_blur < 0.35)).all(), d_blur
    assert ((d_noise > 0.2) & (d_noise < 0.7)).all(), d_noise
    # Symmetric by construction.
    with torch.no_grad():
        torch.testing.assert_close(lpips(noisy, photos), d_noise)


def test_gradients_reach_the_input_only(lpips, photos):
    x = photos[:1, :, :64, :64].clone().requires_grad_(True)
    target = _box_blur(photos[:1, :, :64, :64])
    lpips(x, target).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_vgg16_trunk_matches_lpips_trunk(photos):
    trunk = load_vgg16_trunk()
    assert all(p.requires_grad for p in trunk.parameters())
    reference = LPIPS.from_assets("vgg").trunk
    x = lpips_normalize(photos[:, :, :32, :32])
    with torch.no_grad():
        for a, b in zip(trunk(x), reference(x)):
            assert torch.equal(a, b)


def test_bad_inputs():
    with pytest.raises(ValueError, match="'vgg' or 'alex'"):
        LPIPS("resnet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="equal shape"):
        LPIPS("alex")(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 32, 32))
