"""Closed-form checks of the flow-matching maths (noise at t = 1)."""

import math

import pytest
import torch

from aligntok import flow


def _path(seed: int = 0, shape: tuple[int, ...] = (4, 3, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)[: shape[0]]
    return z0, eps, t


def test_interpolate_endpoints_and_derivative() -> None:
    z0, eps, t = _path()
    zt = flow.interpolate(z0, eps, t)
    assert torch.equal(zt[0], z0[0]) and torch.equal(zt[-1], eps[-1])  # data at 0, noise at 1
    assert torch.allclose(zt[1], 0.7 * z0[1] + 0.3 * eps[1])
    # v is the time derivative of the path: a finite difference recovers it.
    h = 1e-6
    fd = (
        flow.interpolate(z0[1:3], eps[1:3], t[1:3] + h) - flow.interpolate(z0[1:3], eps[1:3], t[1:3] - h)
    ) / (2 * h)
    assert torch.allclose(fd, flow.velocity_target(z0, eps)[1:3], atol=1e-6)
    assert torch.allclose(flow.interpolate(z0, eps, 0.25), 0.75 * z0 + 0.25 * eps)  # scalar t


def test_conversions_round_trip() -> None:
    z0, eps, _ = _path()
    t = torch.tensor([0.1, 0.3, 0.7, 0.95], dtype=torch.float64)
    zt, v = flow.interpolate(z0, eps, t), flow.velocity_target(z0, eps)
    assert torch.allclose(flow.x0_from_v(v, zt, t), z0)
    assert torch.allclose(flow.eps_from_v(v, zt, t), eps)
    assert torch.allclose(flow.v_from_x0(z0, zt, t), v)
    assert torch.allclose(flow.v_from_eps(eps, zt, t), v)


def test_conversions_clamped_at_the_ends() -> None:
    z0, eps, _ = _path()
    t = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    zt = flow.interpolate(z0, eps, t)
    assert torch.isfinite(flow.v_from_x0(z0 + 0.1, zt, t)).all()
    assert torch.isfinite(flow.v_from_eps(eps + 0.1, zt, t)).all()
    assert torch.isfinite(flow.score_from_v(torch.ones_like(zt), zt, t)).all()


def test_bad_time_shape_is_a_value_error() -> None:
    z0, eps, _ = _path()
    with pytest.raises(ValueError, match="shape"):
        flow.interpolate(z0, eps, torch.rand(3))


def test_score_of_gaussian_data_is_exact() -> None:
    # z0 ~ N(mu, s^2): z_t ~ N((1-t) mu, (1-t)^2 s^2 + t^2), whose score is known; E[v | z_t] is linear.
    mu, s, t = 0.7, 0.4, 0.35
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    a, var = 1 - t, (1 - t) ** 2 * s**2 + t**2
    v = -mu + (t - a * s**2) / var * (z - a * mu)
    tt = torch.full_like(z, t)
    assert torch.allclose(flow.score_from_v(v, z, tt), -(z - a * mu) / var)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_times(mean: float, std: float) -> None:
    g = torch.Generator().manual_seed(1)
    t = flow.sample_t(20000, kind="logit_normal", mean=mean, std=std, generator=g)
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    logit = torch.log(t / (1 - t)).double()
    assert abs(logit.mean().item() - mean) < 0.05
    assert abs(logit.std().item() - std) < 0.05


def test_uniform_times_and_bad_kind() -> None:
    t = flow.sample_t(20000, kind="uniform", generator=torch.Generator().manual_seed(2))
    assert (t >= 0).all() and (t < 1).all() and abs(t.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown kind"):
        flow.sample_t(4, kind="beta")  # type: ignore[arg-type]


def test_generator_makes_times_reproducible() -> None:
    a = flow.sample_t(8, generator=torch.Generator().manual_seed(3))
    b = flow.sample_t(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("s", [0.3, 1.0, 3.0])
def test_shift_fixes_ends_and_is_monotone(s: float) -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    ts = flow.shift_time(t, s)
    assert ts[0] == 0 and ts[-1] == 1
    assert (ts.diff() > 0).all()
    if s == 1.0:
        assert torch.equal(ts, t)
    # Adds log(s) to logit(t): the SNR view of the shift.
    inner = t[1:-1]
    logit = lambda x: torch.log(x / (1 - x))  # noqa: E731
    assert torch.allclose(logit(flow.shift_time(inner, s)), logit(inner) + math.log(s))


def test_shift_above_one_spends_steps_near_noise() -> None:
    grid = flow.timesteps(20, shift=3.0)
    assert grid[0] == 1 and grid[-1] == 0 and (grid.diff() < 0).all()
    assert (grid > 0.5).sum() > (grid < 0.5).sum()
    inv = flow.timesteps(20, shift=1 / 3.0)
    assert (inv < 0.5).sum() > (inv > 0.5).sum()


def test_lightningdit_shift_is_our_inverse_shift() -> None:
    # LightningDiT (data at t=1) maps its grid u by r u / (1 + (r - 1) u); in our time t = 1 - u.
    r = 0.3
    u = torch.linspace(0, 1, 31, dtype=torch.float64)
    theirs = r * u / (1 + (r - 1) * u)
    assert torch.allclose(1 - theirs, flow.shift_time(1 - u, 1 / r))


def test_resolution_shift_matches_mean_uncertainty() -> None:
    # SD3 sec. 5.3.2: the std of a constant image's estimate from n positions, t / ((1 - t) sqrt(n)), is kept.
    n, m = 256, 1024
    s = flow.resolution_shift(m, n)
    assert s == pytest.approx(2.0)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    tm = flow.shift_time(t, s)
    assert torch.allclose(tm / ((1 - tm) * math.sqrt(m)), t / ((1 - t) * math.sqrt(n)))
    with pytest.raises(ValueError):
        flow.resolution_shift(0, 256)
    with pytest.raises(ValueError):
        flow.shift_time(t, 0.0)


def test_timesteps_grid() -> None:
    grid = flow.timesteps(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError):
        flow.timesteps(0)


def test_flow_loss_mse_and_cosine() -> None:
    g = torch.Generator().manual_seed(4)
    target = torch.randn(3, 4, 2, 2, generator=g)
    pred = torch.randn(3, 4, 2, 2, generator=g)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(flow.flow_loss(pred, target), mse)
    assert flow.flow_loss(pred, target).shape == (3,)
    assert torch.equal(flow.flow_loss(target, target), torch.zeros(3))
    # Same direction, twice the length: cosine term is 0, MSE is mean(target^2).
    assert torch.allclose(
        flow.flow_loss(2 * target, target, cosine_weight=1.0), (target**2).mean(dim=(1, 2, 3))
    )
    # Opposite direction: 1 - cos = 2 at every position.
    out = flow.flow_loss(-target, target, cosine_weight=0.5)
    assert torch.allclose(out, 4 * (target**2).mean(dim=(1, 2, 3)) + 0.5 * 2, atol=1e-6)
    # Cosine is over channels: rescaling one position's channel vector leaves the cosine term unchanged.
    scaled = target.clone()
    scaled[:, :, 0, 0] *= 3.0
    cos_only = flow.flow_loss(scaled, target, cosine_weight=1.0) - flow.flow_loss(scaled, target)
    assert torch.allclose(cos_only, torch.zeros(3), atol=1e-6)
    with pytest.raises(ValueError):
        flow.flow_loss(pred, target[:2])
