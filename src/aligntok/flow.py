"""Flow matching: the one home of the path, its target, time sampling, time shift and conversions.

Convention (docs/design.md section 5, docs/method.md): noise at t = 1, data at t = 0,

    z_t = (1 - t) z_0 + t eps,    eps ~ N(0, I),    v = dz_t/dt = eps - z_0,

the rectified-flow / conditional-OT path (Lipman et al. 2023, "Flow Matching for Generative Modeling";
Liu et al. 2023, "Flow Straight and Fast"). Samplers integrate from t = 1 to t = 0. LightningDiT / SiT
use the opposite direction (data at t = 1); docs/flow.md maps their settings onto ours.

Time `t` is a tensor of shape (B,) (one time per sample) or a Python float; it is broadcast over the
non-batch dimensions of the other arguments.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

# Conversions that divide by t or by 1 - t clamp the divisor to at least this, so that a grid point at
# exactly t = 0 or t = 1 gives a finite (if inaccurate there) answer instead of inf/nan.
TIME_EPS = 1e-5


def _per_sample(t: Tensor | float, like: Tensor) -> Tensor | float:
    """t of shape (B,) (or a scalar) reshaped to (B, 1, ..., 1) so that it broadcasts against `like`."""
    if not isinstance(t, Tensor) or t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"time must have shape (B,) = ({like.shape[0]},), got {tuple(t.shape)}")
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def interpolate(z0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """The point on the path: z_t = (1 - t) z0 + t eps."""
    tt = _per_sample(t, z0)
    return (1 - tt) * z0 + tt * eps


def velocity_target(z0: Tensor, eps: Tensor) -> Tensor:
    """The regression target of the velocity model: v = eps - z0 (constant along each straight path)."""
    return eps - z0


def x0_from_v(v: Tensor, z_t: Tensor, t: Tensor | float) -> Tensor:
    """Data prediction from a velocity prediction: x0 = z_t - t v."""
    return z_t - _per_sample(t, z_t) * v


def eps_from_v(v: Tensor, z_t: Tensor, t: Tensor | float) -> Tensor:
    """Noise prediction from a velocity prediction: eps = z_t + (1 - t) v."""
    return z_t + (1 - _per_sample(t, z_t)) * v


def v_from_x0(x0: Tensor, z_t: Tensor, t: Tensor | float) -> Tensor:
    """Velocity from a data prediction: v = (z_t - x0) / t, with t clamped to at least TIME_EPS."""
    tt = _per_sample(t, z_t)
    tt = tt.clamp(min=TIME_EPS) if isinstance(tt, Tensor) else max(tt, TIME_EPS)
    return (z_t - x0) / tt


def v_from_eps(eps: Tensor, z_t: Tensor, t: Tensor | float) -> Tensor:
    """Velocity from a noise prediction: v = (eps - z_t) / (1 - t), 1 - t clamped to at least TIME_EPS."""
    tt = _per_sample(t, z_t)
    one_minus = (1 - tt).clamp(min=TIME_EPS) if isinstance(tt, Tensor) else max(1 - tt, TIME_EPS)
    return (eps - z_t) / one_minus


def score_from_v(v: Tensor, z_t: Tensor, t: Tensor | float) -> Tensor:
    """Score of the marginal, grad log p_t(z_t) = -E[eps | z_t] / t (z_t | z0 is N((1 - t) z0, t^2 I)).

    t is clamped to at least TIME_EPS; the score itself is unbounded as t -> 0.
    """
    tt = _per_sample(t, z_t)
    tt = tt.clamp(min=TIME_EPS) if isinstance(tt, Tensor) else max(tt, TIME_EPS)
    return -eps_from_v(v, z_t, t) / tt


def sample_t(
    n: int,
    *,
    kind: Literal["logit_normal", "uniform"] = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times, shape (n,), float32 in [0, 1].

    "logit_normal": t = sigmoid(mean + std * N(0, 1)) (Esser et al. 2024, SD3 sec. 3.1); with noise at t = 1,
    mean > 0 puts more weight near noise. "uniform": t ~ U(0, 1). `generator` must live on `device`.
    """
    if kind == "logit_normal":
        if std <= 0:
            raise ValueError(f"sample_t: std must be > 0 for logit-normal times, got {std}")
        u = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        return torch.sigmoid(mean + std * u)
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    raise ValueError(f"sample_t: unknown kind {kind!r}; use 'logit_normal' or 'uniform'")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Time shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, SD3 section 5.3.2).

    Fixes 0 and 1, is monotone, and adds log(s) to logit(t), i.e. divides the signal-to-noise ratio
    ((1 - t) / t)^2 by s^2. With noise at t = 1, s > 1 moves times toward noise: a uniform sampler grid
    spends more of its steps at high noise (SD3 uses s = 3 at 1024 px). s = 1 is the identity.
    LightningDiT's `timestep_shift` (data at t = 1) of value r equals our s = 1 / r (docs/flow.md).
    """
    if not shift > 0:
        raise ValueError(f"time shift must be > 0 (1 = no shift), got {shift}")
    if shift == 1.0:
        return t
    # s t / (s t + 1 - t) is the same map; this form gives exactly 1 at t = 1 in floating point.
    return shift * t / (shift * t + (1 - t))


def resolution_shift(tokens: int, base_tokens: int) -> float:
    """Resolution-dependent shift s = sqrt(tokens / base_tokens) (SD3 section 5.3.2).

    Going from `base_tokens` latent positions (the resolution the schedule was tuned at) to `tokens`,
    shift_time(t, s) keeps the noise level at which a per-image mean can be recovered unchanged: the
    uncertainty t / ((1 - t) sqrt(n)) of the mean estimated from n noisy positions is matched.
    """
    if tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"token counts must be positive, got tokens={tokens}, base_tokens={base_tokens}")
    return math.sqrt(tokens / base_tokens)


def timesteps(
    steps: int,
    *,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sampler grid, shape (steps + 1,): uniform from 1 (noise) to 0 (data), then `shift_time` applied."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    grid = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return shift_time(grid, shift).to(dtype)


def flow_loss(pred_v: Tensor, target_v: Tensor, *, cosine_weight: float = 0.0) -> Tensor:
    """Per-sample flow-matching loss, shape (B,).

    Mean squared error over all non-batch dimensions, plus `cosine_weight` times the mean over positions of
    1 - cos(pred, target) taken over the channel dimension (dim 1, latents are (B, C, ...)); LightningDiT
    trains with weight 1 on this velocity-direction term.
    """
    if pred_v.shape != target_v.shape:
        raise ValueError(
            f"flow_loss: prediction {tuple(pred_v.shape)} and target {tuple(target_v.shape)} differ"
        )
    if cosine_weight < 0:
        raise ValueError(f"flow_loss: cosine_weight must be >= 0, got {cosine_weight}")
    loss = (pred_v - target_v).square().flatten(1).mean(dim=1)
    if cosine_weight > 0:
        if pred_v.ndim < 2:
            raise ValueError("flow_loss: the cosine term needs a channel dimension (B, C, ...)")
        cos = torch.nn.functional.cosine_similarity(pred_v, target_v, dim=1)  # (B, ...)
        loss = loss + cosine_weight * (1 - cos).reshape(cos.shape[0], -1).mean(dim=1)
    return loss
