"""Tokenizer losses and the PatchGAN discriminator: hand-computed values, gradients, shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from aligntok import assets, losses
from aligntok.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from aligntok.models.encoders import EncoderConfig, build_encoder
from aligntok.models.tokenizer import Adapter


def test_hinge_and_generator_losses_on_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 2.5 / 3
    fake = torch.tensor([[-2.0, 0.0], [1.0, -0.5]])  # relu(1 + fake) = 0, 1, 2, 0.5 -> mean 3.5 / 4
    expected = 0.5 * (2.5 / 3 + 3.5 / 4)
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(expected)
    assert losses.generator_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.0 - 0.5) / 4)
    # A perfect discriminator (margins met) has zero loss.
    assert losses.hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.5)).item() == 0.0


def test_adaptive_weight_is_the_detached_gradient_norm_ratio():
    torch.manual_seed(0)
    decoder = nn.Linear(3, 2)  # stands in for the decoder; its weight is the "last layer"
    z = torch.randn(5, 3)
    out = decoder(z)
    target = torch.randn(5, 2)
    rec = (out - target).abs().mean()
    g = -(out * torch.tensor([0.3, -2.0])).mean()  # a generator loss that depends on the same output
    base = 0.5

    weight = losses.adaptive_weight(rec, g, decoder.weight, base=base)

    # By hand: d rec / dW = sign(out - t)^T z / (5 * 2); d g / dW = -c^T z / (5 * 2) with c per column.
    d_rec = torch.sign(out - target).detach().T @ z / 10
    d_g = -(torch.tensor([0.3, -2.0]).expand(5, 2)).T @ z / 10
    expected = base * d_rec.norm() / (d_g.norm() + 1e-4)
    torch.testing.assert_close(weight, expected)
    assert not weight.requires_grad
    # retain_graph: the graph is still there for the loop's backward, which also fills .grad as usual.
    (rec + weight * g).backward()
    torch.testing.assert_close(decoder.weight.grad, d_rec + expected * d_g)


def test_adaptive_weight_is_clamped():
    w = nn.Parameter(torch.ones(2))
    rec = (w * 5.0).sum()
    g = (w * 0.0).sum()  # no gradient: the raw ratio would be 5 * sqrt(2) / 1e-4, about 7e4
    assert losses.adaptive_weight(rec, g, w, base=2.0).item() == pytest.approx(2.0 * 1e4)
    assert losses.adaptive_weight(rec, g, w, base=2.0, max_weight=3.0).item() == pytest.approx(6.0)


def test_semantic_preservation_loss():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    for kind in ("l2", "cosine"):
        assert losses.semantic_preservation_loss(z, z.detach().clone(), kind=kind).item() == pytest.approx(
            0, abs=1e-6
        )
    other = torch.randn(2, 4, 3, 3, generator=g)
    l2 = losses.semantic_preservation_loss(z, other, kind="l2")
    assert l2.item() == pytest.approx(((z - other) ** 2).mean().item()) and l2.item() > 0
    # Cosine: blind to each token's length, and 1 - cos by hand on one flipped token.
    scale = torch.rand(2, 1, 3, 3, generator=g) + 0.5
    assert losses.semantic_preservation_loss(z * scale, z.detach(), kind="cosine").item() == pytest.approx(
        0, abs=1e-6
    )
    flipped = z.detach().clone()
    flipped[0, :, 1, 2] *= -1  # one of the 18 tokens points the other way: 1 - cos = 2
    assert losses.semantic_preservation_loss(z, flipped, kind="cosine").item() == pytest.approx(
        2 / 18, abs=1e-6
    )
    # Gradients reach z only.
    l2.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kind='l1'"):
        losses.semantic_preservation_loss(z, other, kind="l1")
    with pytest.raises(ValueError, match="one shape"):
        losses.semantic_preservation_loss(z, other[:, :2])


def test_adaptive_vf_weight_at_the_adapter_is_the_gradient_norm_ratio():
    # VA-VAE's rule on a tiny tokenizer: adapter -> latent z -> a linear "decoder"; the VF-like term pulls z
    # towards target features. The weight is base * ||d rec / dW|| / (||d vf / dW|| + 1e-4) at the layer
    # that outputs z.
    torch.manual_seed(0)
    adapter = Adapter(dim=5, hidden=6, out=3, act="gelu")
    assert adapter.last_layer is adapter.fc2.weight
    feats, images = torch.randn(2, 5, 4, 4), torch.randn(2, 2, 4, 4)
    z = adapter(feats)  # (2, 3, 4, 4)
    decoder = nn.Conv2d(3, 2, 1)
    rec = (decoder(z) - images).abs().mean()
    vf = (1 - torch.nn.functional.cosine_similarity(z, torch.randn(2, 3, 4, 4), dim=1)).mean()
    weight = losses.adaptive_weight(rec, vf, adapter.last_layer, base=0.1)
    (d_rec,) = torch.autograd.grad(rec, adapter.fc2.weight, retain_graph=True)
    (d_vf,) = torch.autograd.grad(vf, adapter.fc2.weight, retain_graph=True)
    torch.testing.assert_close(weight, 0.1 * d_rec.norm() / (d_vf.norm() + 1e-4))
    # The balance it strikes: the weighted VF gradient at that layer is base times the reconstruction's.
    assert (weight * d_vf).norm().item() == pytest.approx(0.1 * d_rec.norm().item(), rel=1e-3)


def test_semantic_preservation_l2_norm_divides_each_channel_by_its_variance():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    z_ref = torch.randn(2, 3, 4, 4, generator=g) * torch.tensor([0.1, 1.0, 5.0])[:, None, None]
    var = torch.tensor([0.01, 1.0, 25.0])
    loss = losses.semantic_preservation_loss(z, z_ref, kind="l2_norm", variance=var)
    # By hand: each channel's mean squared error over its variance, then the mean over the channels.
    by_hand = sum(((z[:, c] - z_ref[:, c]) ** 2).mean() / var[c] for c in range(3)) / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    # Unit variance: the raw L2.
    ones = losses.semantic_preservation_loss(z, z_ref, kind="l2_norm", variance=torch.ones(3))
    assert ones.item() == pytest.approx(losses.semantic_preservation_loss(z, z_ref).item(), rel=1e-6)
    # Scale-free: latents scaled by s (so their variance by s^2) give the same loss; the raw L2 scales s^2.
    for s in (1e-3, 7.0):
        scaled = losses.semantic_preservation_loss(s * z, s * z_ref, kind="l2_norm", variance=s * s * var)
        assert scaled.item() == pytest.approx(loss.item(), rel=1e-5)
        raw = losses.semantic_preservation_loss(s * z, s * z_ref, kind="l2")
        assert raw.item() == pytest.approx(
            s * s * losses.semantic_preservation_loss(z, z_ref).item(), rel=1e-5
        )
    assert losses.semantic_preservation_loss(z, z.detach(), kind="l2_norm", variance=var).item() == 0.0
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="variance of shape \\(3,\\), got None"):
        losses.semantic_preservation_loss(z, z_ref, kind="l2_norm")
    with pytest.raises(ValueError, match="got \\(2,\\)"):
        losses.semantic_preservation_loss(z, z_ref, kind="l2_norm", variance=var[:2])


def test_kl_loss_closed_form():
    zeros = torch.zeros(3, 4, 2, 2)
    assert losses.kl_loss(zeros, zeros).item() == 0.0
    # One scalar latent: KL(N(mu, s^2) || N(0, 1)) = log(1 / s) + (s^2 + mu^2) / 2 - 1 / 2.
    mu, s = 0.7, 0.4
    expected = math.log(1 / s) + (s**2 + mu**2) / 2 - 0.5
    got = losses.kl_loss(torch.full((1, 1, 1, 1), mu), torch.full((1, 1, 1, 1), 2 * math.log(s)))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Summed over latent dims, averaged over the batch: 2 images of 3 such dims each give 3x.
    many = losses.kl_loss(torch.full((2, 3, 1, 1), mu), torch.full((2, 3, 1, 1), 2 * math.log(s)))
    assert many.item() == pytest.approx(3 * expected, rel=1e-5)


class FixedFeatures(nn.Module):
    """A stand-in foundation encoder whose features are a given tensor, whatever the images."""

    def __init__(self, feats: Tensor) -> None:
        super().__init__()
        self.dim = feats.shape[1]
        self.register_buffer("feats", feats)

    def features(self, images: Tensor) -> Tensor:
        return self.feats.expand(len(images), -1, -1, -1)


def _identity_vf(feats: Tensor, margins: tuple[float, float]) -> losses.VFLoss:
    vf = losses.VFLoss(feats.shape[1], FixedFeatures(feats), margins=margins)
    with torch.no_grad():
        vf.projection.weight.copy_(torch.eye(feats.shape[1])[:, :, None, None])
    return vf


def _unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def test_vf_loss_is_zero_when_the_projected_latent_equals_the_features():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 6, 3, 3, generator=g)
    vf = _identity_vf(feats, margins=(0.0, 0.0))
    l_mcos, l_mdms = vf(feats.clone(), torch.rand(1, 3, 8, 8))
    assert l_mcos.item() == pytest.approx(0, abs=1e-6) and l_mdms.item() == pytest.approx(0, abs=1e-6)
    l_mcos, l_mdms = vf(torch.randn(1, 6, 3, 3, generator=g), torch.rand(1, 3, 8, 8))
    assert l_mcos.item() > 0.1 and l_mdms.item() > 0.05


def test_vf_loss_margins_on_hand_values():
    # Two positions. Features: e1 and e2 (cos 0). Latent: e1, and a unit vector at cos 0.6 to e2 and
    # cos 0.8 to e1. Per position cos(z', f) = 1 and 0.6; between positions cos = 0.8 vs 0 for the features.
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    z = torch.tensor([[1.0, 0.0], _unit(math.acos(0.8))]).T.reshape(1, 2, 1, 2)
    images = torch.rand(1, 3, 4, 4)
    # m1 = 0.5: a cos of 0.6 is above 1 - m1, so no loss; m2 = 0.25: |0.8 - 0| - 0.25 on 2 of 4 pairs.
    l_mcos, l_mdms = _identity_vf(feats, margins=(0.5, 0.25))(z, images)
    assert l_mcos.item() == pytest.approx(0.0, abs=1e-6)
    assert l_mdms.item() == pytest.approx(2 * 0.55 / 4, abs=1e-6)
    # m1 = 0.2: the threshold 0.8 exceeds 0.6 by 0.2 at one position of two; m2 = 0.9 covers the 0.8 gap.
    l_mcos, l_mdms = _identity_vf(feats, margins=(0.2, 0.9))(z, images)
    assert l_mcos.item() == pytest.approx(0.2 / 2, abs=1e-6)
    assert l_mdms.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="margins"):
        losses.VFLoss(2, FixedFeatures(feats), margins=(-0.1, 0.25))


def test_vf_loss_with_an_encoder_resizes_features_and_trains_only_the_projection():
    torch.manual_seed(0)
    arch = {"ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "out_dim": 8}
    encoder = build_encoder(EncoderConfig(name="cnn", arch=arch, pretrained=False))  # stride 2: 8x8 at 16 px
    vf = losses.VFLoss(4, encoder).train()
    assert not encoder.training and vf.margins == (0.5, 0.25)
    z = torch.randn(2, 4, 4, 4, requires_grad=True)  # a 4x4 latent grid: features are pooled onto it
    l_mcos, l_mdms = vf(z, torch.rand(2, 3, 16, 16))
    (l_mcos + l_mdms).backward()
    assert vf.projection.weight.grad is not None and vf.projection.weight.grad.abs().sum() > 0
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize(("size", "side"), [(32, 2), (64, 6)])
def test_discriminator_output_shape(size, side):
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig(ch=16))
    logits = disc(torch.rand(3, 3, size, size))
    # pix2pix arithmetic: three 4x4/2 convs halve (32 -> 4), two 4x4/1 convs take one off each.
    assert logits.shape == (3, 1, side, side) and disc.output_size(size) == side
    assert torch.isfinite(logits).all()


def test_discriminator_layers_norm_and_init():
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig())
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    norms = [m for m in disc.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())
    assert all(n.num_groups == 32 for n in norms)
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002
    # Normed convs carry no bias (the norm shifts); per-sample norm: a sample's logits ignore its batch.
    assert convs[1].bias is None and convs[0].bias is not None
    disc.train()
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(disc(x)[:1], disc(x[:1]))
    batch = PatchDiscriminator(DiscriminatorConfig(norm="batch", ch=16))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in batch.modules()) == 3
    with pytest.raises(ValueError, match="norm='layer'"):
        DiscriminatorConfig(norm="layer")
    with pytest.raises(ValueError, match="too small"):
        PatchDiscriminator(DiscriminatorConfig(ch=8, num_layers=4))(torch.rand(1, 3, 32, 32))


def test_discriminator_maps_unit_images_to_signed_range():
    disc = PatchDiscriminator(DiscriminatorConfig(ch=8, norm="none"))
    seen = []
    disc.net[0].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    x = torch.rand(1, 3, 32, 32)
    disc(x)
    torch.testing.assert_close(seen[0], x * 2 - 1)


def test_perceptual_loss_mean_of_lpips_and_gradients():
    if not assets.is_present("lpips-vgg16"):
        pytest.skip("asset lpips-vgg16 not fetched; run `aligntok assets fetch lpips-vgg16`")
    from aligntok.models.lpips import LPIPS

    loss = losses.PerceptualLoss().train()
    assert not loss.lpips.training and not any(p.requires_grad for p in loss.parameters())
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 3, 32, 32, generator=g)
    x = (y + 0.1 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1).requires_grad_(True)
    value = loss(x, y)
    assert isinstance(loss.lpips, LPIPS) and loss.lpips.net == "vgg"
    torch.testing.assert_close(value, loss.lpips(x, y).mean())
    assert value.ndim == 0 and value.item() > 0
    assert loss(y, y).item() == 0.0
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
