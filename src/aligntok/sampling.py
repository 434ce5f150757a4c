"""Samplers as pure functions of a velocity function, and guidance that builds such functions.

A velocity function is `v_fn(z, t) -> v` with z of shape (B, ...) and t of shape (B,); a guided model is
`model_fn(z, t, y) -> v` with a condition y (class labels (B,), text embeddings, or a tuple/dict of
tensors). Every sampler integrates from t = 1 (noise) to t = 0 (data) along a given strictly decreasing
grid (`aligntok.flow.timesteps`) and returns z at the grid's last time, optionally with the trajectory.
Nothing here touches gradients: wrap calls in `torch.inference_mode()` when sampling.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from aligntok import flow

VelocityFn = Callable[[Tensor, Tensor], Tensor]
ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
# step(z, t, t_next, last) -> z at t_next; `last` marks the final step of the grid.
_Step = Callable[[Tensor, float, float, bool], Tensor]


def _grid(ts: Tensor | Sequence[float]) -> list[float]:
    grid = [float(t) for t in (ts.tolist() if isinstance(ts, Tensor) else ts)]
    if len(grid) < 2:
        raise ValueError(f"a sampler grid needs at least 2 times (1 step), got {len(grid)}")
    if any(b >= a for a, b in itertools.pairwise(grid)):
        raise ValueError(
            "a sampler grid must decrease strictly from noise (t=1) to data (t=0); "
            "build it with aligntok.flow.timesteps"
        )
    if grid[0] > 1.0 or grid[-1] < 0.0:
        raise ValueError(f"sampler times must lie in [0, 1], got {grid[0]} .. {grid[-1]}")
    return grid


def _integrate(
    step: _Step, z1: Tensor, ts: Tensor | Sequence[float], return_trajectory: bool
) -> Tensor | tuple[Tensor, Tensor]:
    grid = _grid(ts)
    z, traj = z1, [z1]
    for i in range(len(grid) - 1):
        z = step(z, grid[i], grid[i + 1], i == len(grid) - 2)
        if return_trajectory:
            traj.append(z)
    if return_trajectory:
        return z, torch.stack(traj)  # (steps + 1, B, ...)
    return z


def _time(t: float, z: Tensor) -> Tensor:
    return torch.full((z.shape[0],), t, device=z.device, dtype=torch.float32)  # (B,)


def euler(
    v_fn: VelocityFn, z1: Tensor, ts: Tensor | Sequence[float], *, return_trajectory: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """First-order Euler ODE sampler, one v_fn call per step; returns z0 (and the (S+1, B, ...) path)."""

    def step(z: Tensor, t: float, t_next: float, last: bool) -> Tensor:
        return z + (t_next - t) * v_fn(z, _time(t, z))

    return _integrate(step, z1, ts, return_trajectory)


def heun(
    v_fn: VelocityFn, z1: Tensor, ts: Tensor | Sequence[float], *, return_trajectory: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Heun's second-order ODE sampler (Karras et al. 2022, EDM Algorithm 1): two v_fn calls per step.

    A step that ends at t = 0 is a plain Euler step, as in EDM, so the model is never asked for v at t = 0.
    """

    def step(z: Tensor, t: float, t_next: float, last: bool) -> Tensor:
        h = t_next - t
        v = v_fn(z, _time(t, z))
        z_euler = z + h * v
        if t_next <= 0.0:
            return z_euler
        v_next = v_fn(z_euler, _time(t_next, z))
        return z + 0.5 * h * (v + v_next)

    return _integrate(step, z1, ts, return_trajectory)


def euler_maruyama(
    v_fn: VelocityFn,
    z1: Tensor,
    ts: Tensor | Sequence[float],
    *,
    diffusion: float = 1.0,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Euler-Maruyama on the reverse SDE with the same marginals as the flow; one v_fn call per step.

    Going from t to t_next < t (h = t - t_next > 0):
        z <- z + (t_next - t) (v - g^2/2 * score) + g sqrt(h) xi,   score = -eps_hat / t (flow.score_from_v),
    with g(t)^2 = diffusion * t: the injected noise vanishes toward the data end and g^2 * score stays
    bounded (it equals -diffusion * eps_hat). diffusion = 0 is the Euler ODE sampler. The last step is the
    deterministic Euler ODE step (no noise added at the final time). `generator` must live on z1's device.
    """
    if diffusion < 0:
        raise ValueError(f"euler_maruyama: diffusion must be >= 0, got {diffusion}")

    def step(z: Tensor, t: float, t_next: float, last: bool) -> Tensor:
        tt = _time(t, z)
        v = v_fn(z, tt)
        if last or diffusion == 0:
            return z + (t_next - t) * v
        g2 = diffusion * t
        drift = v - 0.5 * g2 * flow.score_from_v(v, z, tt)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return z + (t_next - t) * drift + (g2 * (t - t_next)) ** 0.5 * noise

    return _integrate(step, z1, ts, return_trajectory)


def _check_interval(interval: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(x) for x in interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval}")
    return lo, hi


def _active(t: Tensor, lo: float, hi: float) -> Tensor:
    return (t >= lo) & (t <= hi)  # (B,) bool; inclusive at both ends


def _select(active: Tensor, guided: Tensor, plain: Tensor) -> Tensor:
    return torch.where(active.view(-1, *([1] * (guided.ndim - 1))), guided, plain)


def _cat_cond(cond: Any, null_cond: Any) -> Any:
    """Concatenate a condition and its null along the batch dimension (tensors, tuples/lists, dicts)."""
    if isinstance(cond, Tensor):
        null = (
            null_cond.to(cond.device, cond.dtype).expand_as(cond)
            if isinstance(null_cond, Tensor)
            else torch.full_like(cond, null_cond)
        )
        return torch.cat([cond, null])
    if isinstance(cond, Mapping):
        return {k: _cat_cond(cond[k], null_cond[k]) for k in cond}
    if isinstance(cond, (tuple, list)):
        return type(cond)(_cat_cond(c, n) for c, n in zip(cond, null_cond, strict=True))
    raise ValueError(
        f"cfg_velocity: a condition must be a tensor, tuple, list or dict, got {type(cond).__name__}"
    )


def cfg_velocity(
    model_fn: ModelFn, *, cond: Any, null_cond: Any, scale: float, interval: tuple[float, float] = (0.0, 1.0)
) -> VelocityFn:
    """Classifier-free guidance as a velocity function: v = v_u + w (v_c - v_u) on all channels.

    cond and uncond are evaluated in ONE batched model call (cond first, then null), and guidance applies
    only where t_lo <= t <= t_hi (Kynkaanniemi et al. 2024); elsewhere the result is the conditional
    velocity and the call is made on the conditional half alone. scale = 1 is exactly the conditional model.
    `null_cond` is a tensor broadcastable to `cond` (e.g. the null class index) or a Python number filled
    in; for tuple/dict conditions, the same structure. LightningDiT's `cfg_interval_start` r (data at t = 1)
    is interval = (0, 1 - r) in our time (docs/flow.md).
    """
    lo, hi = _check_interval(interval)
    scale = float(scale)

    def v_fn(z: Tensor, t: Tensor) -> Tensor:
        active = _active(t, lo, hi)
        if scale == 1.0 or not bool(active.any()):
            return model_fn(z, t, cond)
        v_c, v_u = model_fn(torch.cat([z, z]), torch.cat([t, t]), _cat_cond(cond, null_cond)).chunk(2)
        # v_c + (w - 1)(v_c - v_u) is v_u + w (v_c - v_u), written so that w = 1 is exactly v_c.
        return _select(active, v_c + (scale - 1.0) * (v_c - v_u), v_c)

    return v_fn


def autoguidance_velocity(
    main_fn: VelocityFn, guide_fn: VelocityFn, *, scale: float, interval: tuple[float, float] = (0.0, 1.0)
) -> VelocityFn:
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself").

    v = v_guide + w (v_main - v_guide), where the guide is a weaker (smaller, less trained) model with the
    same conditioning, bound into both velocity functions. Outside [t_lo, t_hi] (or at w = 1) only the main
    model is called and its velocity returned.
    """
    lo, hi = _check_interval(interval)
    scale = float(scale)

    def v_fn(z: Tensor, t: Tensor) -> Tensor:
        active = _active(t, lo, hi)
        v_main = main_fn(z, t)
        if scale == 1.0 or not bool(active.any()):
            return v_main
        v_guide = guide_fn(z, t)
        return _select(active, v_main + (scale - 1.0) * (v_main - v_guide), v_main)

    return v_fn


def balanced_labels(
    num: int,
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Class labels (num,) for sampling: each class num // num_classes or one more times, shuffled.

    Which classes get the extra label is random too. Class-balanced labels move FID by about 0.1 against
    i.i.d. labels (docs/method.md, evaluation pitfalls), so evaluations use these. `generator` is a CPU
    generator.
    """
    if num < 0 or num_classes < 1:
        raise ValueError(f"balanced_labels: need num >= 0 and num_classes >= 1, got {num}, {num_classes}")
    per_class, extra = divmod(num, num_classes)
    labels = torch.cat(
        [
            torch.arange(num_classes).repeat(per_class),
            torch.randperm(num_classes, generator=generator)[:extra],
        ]
    )
    return labels[torch.randperm(num, generator=generator)].to(device)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": euler, "heun": heun, "sde": euler_maruyama}


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """How images are drawn from a trained DiT: the ONE set of sampling settings that the CLI, `generate`,
    `generation_fid`, the demo and the benchmarks pass around whole.

    `steps` integration steps on `flow.timesteps(steps, shift=shift)` (shift > 1 puts more steps near the
    noise), with the `sampler` of `SAMPLERS`; `cfg_scale` is the guidance scale (1 = none), active for t in
    `interval`; `seed` fixes the noise; `bf16` runs the DiT (and, in `generation_fid`, the Inception) under
    bf16 autocast.
    """

    steps: int = 30
    sampler: Literal["euler", "heun", "sde"] = "euler"
    cfg_scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    shift: float = 1.0
    seed: int = 0
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.cfg_scale}")
        if not self.shift > 0:
            raise ValueError(f"timestep shift must be > 0, got {self.shift}")
        object.__setattr__(self, "interval", _check_interval(self.interval))

    def cli_args(self) -> list[str]:
        """These settings as `aligntok sample` flags."""
        lo, hi = self.interval
        args = [f"--steps {self.steps}", f"--sampler {self.sampler}", f"--cfg {self.cfg_scale:g}"]
        args += [f"--interval {lo:g} {hi:g}", f"--shift {self.shift:g}", f"--seed {self.seed}"]
        return args + (["--bf16"] if self.bf16 else [])

    def record(self) -> dict[str, Any]:
        """The settings as they are recorded beside samples (sampling.json, fid.json)."""
        return {
            "steps": self.steps,
            "cfg": self.cfg_scale,
            "interval": list(self.interval),
            "sampler": self.sampler,
            "shift": self.shift,
            "seed": self.seed,
            "bf16": self.bf16,
        }
