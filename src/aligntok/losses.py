"""Tokenizer losses (docs/method.md, "Losses"): LPIPS, hinge GAN with the adaptive weight, semantic
preservation, the KL of the Gaussian baselines, and VA-VAE's vision-foundation alignment loss.

Conventions: images are in [0, 1] (B, 3, H, W); latents are (B, C, h, w); every loss returns a scalar
tensor. The L1 term is one line in the training loop and has no helper here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aligntok import distributed
from aligntok.models.encoders import Encoder
from aligntok.models.lpips import LPIPS


class PerceptualLoss(nn.Module):
    """LPIPS v0.1 (frozen, pretrained; `net` "vgg" or "alex") averaged over the batch.

    Gradients flow to both inputs; the LPIPS weights never train and stay in eval mode.
    """

    def __init__(self, net: Literal["vgg", "alex"] = "vgg") -> None:
        super().__init__()
        self.lpips = LPIPS.from_assets(net)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean LPIPS distance between image batches x and y (B, 3, H, W) in [0, 1]."""
        return self.lpips(x, y).mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """Generator side of the hinge GAN: -E[D(x_hat)]."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: Tensor, loss: Tensor, last_layer: Tensor, *, base: float, max_weight: float = 1e4
) -> Tensor:
    """The weight of a loss term that balances its gradient against the reconstruction's at one layer L:

        lambda = base * clamp(||grad_L rec_loss|| / (||grad_L loss|| + 1e-4), 0, max_weight)

    So the term's gradient reaching L is `base` times the reconstruction gradient, whatever the two losses'
    scales. Two uses: the GAN term at the decoder's last layer (`tokenizer.decoder.last_layer`; the
    taming-transformers / LDM rule, Esser et al. 2021, eq. 7) and VA-VAE's vision-foundation terms at the
    layer that outputs the latent (`tokenizer.adapter.last_layer`; Yao et al. 2025, their
    `calculate_adaptive_weight_vf`, which clamps at 1e8 where we keep one clamp for both). Both gradients
    are taken with `retain_graph=True`, so the caller's later `backward()` still works; the weight is
    detached (a coefficient, not something to optimise). Under data parallelism each rank's losses are
    means over its slice of the batch, so the global batch's gradients are the means over ranks.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (grad,) = torch.autograd.grad(loss, last_layer, retain_graph=True)
    rec_grad, grad = distributed.all_reduce_mean(rec_grad), distributed.all_reduce_mean(grad)
    weight = rec_grad.float().norm() / (grad.float().norm() + 1e-4)
    return (weight.clamp(0.0, max_weight) * base).detach()


SP_KINDS = ("l2", "l2_norm", "cosine")


def semantic_preservation_loss(
    z: Tensor,
    z_ref: Tensor,
    *,
    kind: Literal["l2", "l2_norm", "cosine"] = "l2",
    variance: Tensor | None = None,
) -> Tensor:
    """L_sp of stage 2 (docs/method.md): distance of the latent z (after the adapter) to the frozen stage-1
    tokenizer's latent z_ref, both (B, C, h, w).

    - "l2": mean squared error over all elements (the paper's L2). Its scale is the latent's, which stage 1
      leaves wherever its adapter put it (there is no KL), so a given w_sp means different things for
      different tokenizers.
    - "l2_norm": the squared error of each channel divided by that channel's `variance` (C,) in the
      reference latents, then the mean: mean_c MSE_c / var_c. The same for latents scaled by any s (z, z_ref
      and the variance by s, s, s^2), so w_sp = 1 weighs one unit of the stage-1 latent's own variance.
    - "cosine": mean over the B*h*w tokens of 1 - cos(z, z_ref) along the channel dim (the paper reports it
      works about as well); it ignores each token's length.

    z_ref is a target: no gradient reaches it.
    """
    if z.shape != z_ref.shape:
        raise ValueError(
            f"semantic preservation needs latents of one shape, got {tuple(z.shape)} and "
            f"{tuple(z_ref.shape)}; the reference must be the stage-1 export of the same tokenizer"
        )
    z_ref = z_ref.detach()
    if kind == "l2":
        return F.mse_loss(z, z_ref)
    if kind == "l2_norm":
        if variance is None or variance.shape != z.shape[1:2]:
            got = None if variance is None else tuple(variance.shape)
            raise ValueError(
                "semantic preservation kind='l2_norm' needs the reference latents' (positive) per-channel "
                f"variance of shape ({z.shape[1]},), got {got}"
            )
        return ((z - z_ref).square() / variance.detach().to(z)[:, None, None]).mean()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(z, z_ref, dim=1)).mean()
    raise ValueError(f"semantic preservation kind={kind!r}; use one of {', '.join(map(repr, SP_KINDS))}")


def kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) of a diagonal Gaussian posterior (B, C, h, w).

    Normalisation as in LDM's AutoencoderKL: summed over the latent dims (C*h*w), averaged over the batch,
    so that the usual weight of 1e-6 means what it means there. Note that LDM also SUMS its reconstruction
    term over pixels, while our L1/LPIPS terms are means; relative to those, LDM's balance corresponds to a
    weight of 1e-6 / (3*H*W) on this sum.
    """
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


# VA-VAE's released f16d32 config uses cos_margin 0.5 and distmat_margin 0.25 (with vf_weight 0.1, weighted
# adaptively); the paper's section 3 names them m1 and m2.
VF_MARGINS = (0.5, 0.25)


class VFLoss(nn.Module):
    """VA-VAE's vision-foundation alignment loss (Yao et al. 2025, "Reconstruction vs. Generation: Taming
    Optimization Dilemma in Latent Diffusion Models", section 3).

    A learnable 1x1 projection (C -> D, no bias, as VA-VAE's) maps the latent z to the frozen foundation
    encoder's feature space: z' = W z, f = E(x). Then
      L_mcos = mean_ij relu(1 - m1 - cos(z'_ij, f_ij))                       (marginal cosine similarity)
      L_mdms = mean_{i,j} relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2)      (marginal distance matrix)
    with i, j over the h*w positions of one image (all N^2 ordered pairs, the diagonal included, as in the
    paper's 1/N^2 normalisation). The margins let the latent keep some freedom from the foundation features.
    `forward` returns both terms; the caller weights them.
    """

    def __init__(
        self, latent_channels: int, encoder: Encoder, *, margins: tuple[float, float] = VF_MARGINS
    ) -> None:
        super().__init__()
        m1, m2 = (float(m) for m in margins)
        if not (0.0 <= m1 <= 2.0 and 0.0 <= m2 <= 2.0):
            raise ValueError(f"VF margins must lie in [0, 2] (cosine distances), got {margins}")
        self.margins = (m1, m2)
        self.encoder = encoder.requires_grad_(False).eval()
        self.projection = nn.Conv2d(latent_channels, encoder.dim, kernel_size=1, bias=False)

    def train(self, mode: bool = True) -> VFLoss:
        super().train(mode)
        self.encoder.eval()  # frozen target network: no dropout, no statistics updates
        return self

    def forward(self, z: Tensor, images: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L_mcos, L_mdms) for latents z (B, C, h, w) of images (B, 3, H, W) in [0, 1]; `target`: the
        frozen encoder's features of these images (B, D, h_f, w_f) where already computed."""
        m1, m2 = self.margins
        f = target
        if f is None:
            with torch.no_grad():
                f = self.encoder.features(images)  # (B, D, h_f, w_f)
        if f.shape[-2:] != z.shape[-2:]:
            f = F.adaptive_avg_pool2d(f, z.shape[-2:])  # foundation grid onto the latent grid
        zp = F.normalize(self.projection(z).flatten(2), dim=1)  # (B, D, N), unit vectors per position
        fn = F.normalize(f.flatten(2).to(zp.dtype), dim=1)  # (B, D, N)
        l_mcos = F.relu(1.0 - m1 - (zp * fn).sum(1)).mean()
        sim_z = zp.transpose(1, 2) @ zp  # (B, N, N) cosine similarities between positions
        sim_f = fn.transpose(1, 2) @ fn
        l_mdms = F.relu((sim_z - sim_f).abs() - m2).mean()
        return l_mcos, l_mdms


__all__ = [
    "SP_KINDS",
    "VF_MARGINS",
    "PerceptualLoss",
    "VFLoss",
    "adaptive_weight",
    "generator_loss",
    "hinge_d_loss",
    "kl_loss",
    "semantic_preservation_loss",
]
