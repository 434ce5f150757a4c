"""Samplers and guidance against closed-form answers."""

import math

import pytest
import torch

from aligntok import flow, sampling

# Data z0 ~ N(MU, SD^2) per channel (independent). z_t = (1-t) z0 + t eps is Gaussian with mean (1-t) MU and
# variance (1-t)^2 SD^2 + t^2; (v, z_t) are jointly Gaussian with Cov(v, z_t) = t - (1-t) SD^2, so the
# exact marginal velocity is E[v | z_t] = -MU + (t - (1-t) SD^2) / Var(z_t) * (z_t - (1-t) MU).
MU = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
SD = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


def gaussian_velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(z.dtype)[:, None]
    a = 1 - t
    var = a**2 * SD**2 + t**2
    return -MU + (t - a * SD**2) / var * (z - a * MU)


def standard_noise(n: int, seed: int) -> torch.Tensor:
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean(0)) / z.std(0)  # exact moments, so only the sampler's error is measured


@pytest.mark.parametrize(("name", "steps", "tol"), [("heun", 20, 0.01), ("euler", 200, 0.02)])
def test_ode_samplers_recover_gaussian_data(name: str, steps: int, tol: float) -> None:
    z1 = standard_noise(2000, seed=0)
    z0 = getattr(sampling, name)(gaussian_velocity, z1, flow.timesteps(steps, dtype=torch.float64))
    assert torch.allclose(z0.mean(0), MU, atol=tol * SD.max().item())
    assert torch.allclose(z0.std(0) / SD, torch.ones(3, dtype=torch.float64), atol=tol)
    # In 1-D the flow is the monotone affine map N(0,1) -> N(MU, SD^2), i.e. z -> MU + SD z.
    assert torch.allclose(z0, MU + SD * z1, atol=2 * tol * SD.max().item())


@pytest.mark.parametrize("diffusion", [1.0, 3.0])
def test_euler_maruyama_recovers_gaussian_data(diffusion: float) -> None:
    z1 = torch.randn(8000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts, gen = flow.timesteps(100, dtype=torch.float64), torch.Generator().manual_seed(2)
    z0 = sampling.euler_maruyama(gaussian_velocity, z1, ts, diffusion=diffusion, generator=gen)
    assert torch.allclose(z0.mean(0), MU, atol=0.05 * SD.max().item())
    assert torch.allclose(z0.std(0) / SD, torch.ones(3, dtype=torch.float64), atol=0.05)
    # It is a different map from the ODE's: the noise it injects makes samples leave z -> MU + SD z.
    assert (z0 - (MU + SD * z1)).abs().mean() > 0.05


def test_euler_maruyama_is_reproducible_and_zero_diffusion_is_euler() -> None:
    z1 = torch.randn(16, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = flow.timesteps(10, dtype=torch.float64)
    a = sampling.euler_maruyama(gaussian_velocity, z1, ts, generator=torch.Generator().manual_seed(4))
    b = sampling.euler_maruyama(gaussian_velocity, z1, ts, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    ode = sampling.euler(gaussian_velocity, z1, ts)
    assert torch.allclose(sampling.euler_maruyama(gaussian_velocity, z1, ts, diffusion=0.0), ode)
    assert not torch.allclose(a, ode)


@pytest.mark.parametrize("a", [-1.5, 1.0])
def test_convergence_orders_on_a_linear_ode(a: float) -> None:
    # dz/dt = a z from t = 1 to t = 0: z(0) = z(1) exp(-a).
    z1 = torch.ones(1, 1, dtype=torch.float64)
    exact = math.exp(-a)

    def err(name: str, steps: int) -> float:
        z = getattr(sampling, name)(lambda z, t: a * z, z1, flow.timesteps(steps, dtype=torch.float64))
        return abs(z.item() - exact)

    assert 1.8 <= err("euler", 32) / err("euler", 64) <= 2.2
    assert 3.5 <= err("heun", 32) / err("heun", 64) <= 4.5


def test_trajectory_and_call_counts() -> None:
    calls: list[float] = []

    def v_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (z.shape[0],)
        calls.append(t[0].item())
        return -z

    z1 = torch.ones(2, 3)
    ts = flow.timesteps(5)
    z0, traj = sampling.euler(v_fn, z1, ts, return_trajectory=True)
    assert traj.shape == (6, 2, 3) and torch.equal(traj[0], z1) and torch.equal(traj[-1], z0)
    assert len(calls) == 5 and 0.0 not in calls
    calls.clear()
    sampling.heun(v_fn, z1, ts)
    assert len(calls) == 2 * 5 - 1 and 0.0 not in calls  # the step onto t = 0 is an Euler step


def test_bad_grids_are_value_errors() -> None:
    z1 = torch.zeros(1, 1)
    for grid in ([1.0], [0.0, 1.0], [1.0, 0.5, 0.5, 0.0], [1.5, 0.0]):
        with pytest.raises(ValueError):
            sampling.euler(lambda z, t: z, z1, torch.tensor(grid))


class CountingModel:
    """model_fn(z, t, y) -> v with a class-dependent velocity; records the batch size of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.batches.append(z.shape[0])
        return -z + y.to(z.dtype).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


NULL = 10


def _cond_setup():
    z = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([1, 2, 3, 4])
    return z, y


def test_cfg_scale_one_is_the_conditional_model() -> None:
    model = CountingModel()
    z, y = _cond_setup()
    t = torch.full((4,), 0.5)
    v = sampling.cfg_velocity(model, cond=y, null_cond=NULL, scale=1.0)(z, t)
    assert torch.equal(v, CountingModel()(z, t, y))


def test_cfg_formula_and_interval() -> None:
    model = CountingModel()
    z, y = _cond_setup()
    w = 4.0
    v_fn = sampling.cfg_velocity(model, cond=y, null_cond=torch.tensor(NULL), scale=w, interval=(0.0, 0.9))
    cond = CountingModel()(z, torch.full((4,), 0.5), y)
    uncond = CountingModel()(z, torch.full((4,), 0.5), torch.full_like(y, NULL))
    inside = v_fn(z, torch.full((4,), 0.5))
    assert torch.allclose(inside, uncond + w * (cond - uncond), atol=1e-5)
    assert not torch.allclose(inside, cond)
    outside_t = torch.full((4,), 0.95)
    assert torch.equal(v_fn(z, outside_t), CountingModel()(z, outside_t, y))
    # Per-sample times: guidance follows each sample's own t.
    mixed = v_fn(z, torch.tensor([0.5, 0.95, 0.5, 0.95]))
    assert torch.allclose(mixed[0], inside[0]) and torch.equal(mixed[1], CountingModel()(z, outside_t, y)[1])


def test_cfg_makes_one_batched_call_per_step() -> None:
    model = CountingModel()
    z, y = _cond_setup()
    v_fn = sampling.cfg_velocity(model, cond=y, null_cond=NULL, scale=3.0, interval=(0.0, 0.9))
    steps = 10
    sampling.euler(v_fn, z, flow.timesteps(steps))
    assert len(model.batches) == steps
    # t = 1.0 lies outside (0, 0.9): conditional half only; every other step is one call on 2B.
    assert model.batches == [4] + [8] * (steps - 1)


def test_cfg_with_structured_condition() -> None:
    seen = {}

    def model_fn(z: torch.Tensor, t: torch.Tensor, y: dict) -> torch.Tensor:
        seen.update(y)
        return -z + y["emb"].mean(dim=(1, 2)).view(-1, 1)

    z = torch.zeros(2, 3)
    cond = {"emb": torch.ones(2, 5, 4), "mask": torch.ones(2, 5, dtype=torch.bool)}
    null = {"emb": torch.zeros(1, 5, 4), "mask": torch.ones(1, 5, dtype=torch.bool)}
    v = sampling.cfg_velocity(model_fn, cond=cond, null_cond=null, scale=2.0)(z, torch.full((2,), 0.5))
    assert seen["emb"].shape == (4, 5, 4) and seen["mask"].shape == (4, 5)
    assert torch.allclose(v, torch.full((2, 3), 2.0))  # 0 + 2 * (1 - 0)


def test_bad_interval_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="interval"):
        sampling.cfg_velocity(
            CountingModel(), cond=torch.zeros(1), null_cond=0, scale=2.0, interval=(0.9, 0.1)
        )


def test_autoguidance() -> None:
    z, _ = _cond_setup()

    def main(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -z

    guide_calls = []

    def guide(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guide_calls.append(1)
        return -0.5 * z

    t_in, t_out = torch.full((4,), 0.5), torch.full((4,), 0.95)
    v_fn = sampling.autoguidance_velocity(main, guide, scale=2.5, interval=(0.1, 0.9))
    assert torch.allclose(v_fn(z, t_in), -0.5 * z + 2.5 * (-z + 0.5 * z))
    assert len(guide_calls) == 1
    assert torch.equal(v_fn(z, t_out), -z) and len(guide_calls) == 1
    assert torch.equal(sampling.autoguidance_velocity(main, guide, scale=1.0)(z, t_in), -z)


@pytest.mark.parametrize(("num", "classes"), [(100, 10), (103, 10), (7, 10), (0, 3)])
def test_balanced_labels(num: int, classes: int) -> None:
    labels = sampling.balanced_labels(num, classes, generator=torch.Generator().manual_seed(6))
    assert labels.shape == (num,) and labels.dtype == torch.long
    counts = torch.bincount(labels, minlength=classes)
    assert counts.sum() == num and len(counts) == classes
    assert set(counts.tolist()) <= {num // classes, num // classes + 1}
    if num >= 2 * classes:
        assert not torch.equal(labels, labels.sort().values)  # shuffled


def test_sample_config_checks_and_records_every_setting() -> None:
    from aligntok.cli import build_parser
    from aligntok.sampling import SampleConfig

    cfg = SampleConfig(
        steps=12, sampler="heun", cfg_scale=4.0, interval=(0, 0.9), shift=2.5, seed=3, bf16=True
    )
    assert cfg.interval == (0.0, 0.9)
    assert cfg.record() == {
        "steps": 12, "cfg": 4.0, "interval": [0.0, 0.9], "sampler": "heun", "shift": 2.5, "seed": 3,
        "bf16": True,
    }  # fmt: skip
    # The flags it prints are the ones `aligntok sample` parses back into the same settings.
    args = build_parser().parse_args(
        ["sample", "--dit", "d", "--num", "1", "--out", "o", *" ".join(cfg.cli_args()).split()]
    )
    again = SampleConfig(
        steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg, interval=tuple(args.interval),
        shift=args.shift, seed=args.seed, bf16=args.bf16,
    )  # fmt: skip
    assert again == cfg
    for bad in (
        {"steps": 0},
        {"sampler": "ddim"},
        {"cfg_scale": -1.0},
        {"shift": 0.0},
        {"interval": (0.5, 0.2)},
    ):
        with pytest.raises(ValueError):
            SampleConfig(**bad)
