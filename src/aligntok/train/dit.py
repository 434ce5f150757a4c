"""The ONE flow-matching training loop for DiTs on a latent cache (docs/method.md, 'Diffusion model'), class-
conditional (the LightningDiT) or text-conditioned (the MMDiT on cached caption features, docs/text.md).

Reads top to bottom: build from the cache -> parallelize (DDP/FSDP2 under torchrun) -> resume if asked ->
steps (label / caption dropout, logit-normal t, velocity loss, clipping, spike/NaN guard, EMA) ->
checkpoints -> export of the EMA weights. Exact resume, on any number of ranks: the data order is a pure
function of (seed, epoch), the noise comes from one generator shared by all ranks whose state is saved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from aligntok import distributed, flow
from aligntok.checkpoint import latest_checkpoint, module_state, set_module_state
from aligntok.config import check_ranges, save_json
from aligntok.data.captions import CaptionCache, build_caption_cache
from aligntok.data.latents import LatentCache
from aligntok.exports import save_dit
from aligntok.models.dit import DiT, dit_preset
from aligntok.models.mmdit import MMDiT, drop_text, mmdit_preset
from aligntok.parallelize import ParallelConfig, full_grad_norm, full_state, parallelize
from aligntok.rundir import run_lock
from aligntok.train.common import (
    EMA,
    JsonlLog,
    SpikeGuard,
    batch_indices,
    last_good,
    load_checkpoint,
    lr_factor,
    progress,
    save_checkpoint,
    seed_everything,
)


@dataclass(kw_only=True)
class DiTTrainConfig:
    # "class": the LightningDiT on class labels; "text": the MMDiT on caption features (docs/text.md)
    conditioning: Literal["class", "text"] = "class"
    model: str = "debug"  # size preset and patch of DIT_PRESETS ("XL/1", "B/2") or, for text, MMDIT_PRESETS
    text_encoder: str = "minilm"  # text: the caption features' encoder, "minilm" or a local folder
    text_max_length: int | None = None  # text: token limit of the captions (None: the encoder's own)
    qk_norm: bool = False  # docs/method.md: needed for long runs (diverged at 140-180K steps without)
    steps: int = 200
    batch_size: int = 32  # global, split over ranks
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    label_dropout: float = 0.1  # probability a label or caption is replaced by the null one (for guidance)
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    cosine_weight: float = 0.0  # LightningDiT's cosine-similarity velocity term
    bf16: bool = False
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 500
    keep_checkpoints: tuple[int, ...] = ()  # steps whose EMA export is also kept (convergence studies)
    spike_factor: float = 10.0  # a loss this many times its running mean is a spike
    on_spike: Literal["skip", "stop"] = "skip"
    max_consecutive_skips: int = 20
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive=("steps", "batch_size", "grad_clip", "t_std", "log_every", "ckpt_every", "spike_factor"),
            non_negative=("lr", "weight_decay", "warmup_steps", "cosine_weight", "max_consecutive_skips"),
            probability=("ema_decay", "label_dropout"),
        )
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"DiTTrainConfig.betas={self.betas} must lie in [0, 1)")
        if self.conditioning not in ("class", "text"):
            raise ValueError(f"DiTTrainConfig.conditioning={self.conditioning!r}; use 'class' or 'text'")
        if self.text_max_length is not None and self.text_max_length < 1:
            raise ValueError(f"DiTTrainConfig.text_max_length={self.text_max_length} must be >= 1 (or None)")


def build_dit(
    cfg: DiTTrainConfig, *, latent_shape: list[int], num_classes: int, text_dim: int | None = None
) -> DiT | MMDiT:
    """The DiT of `cfg` for latents of `latent_shape` (C, h, w): on `num_classes` labels, or, for text
    conditioning, on caption features of width `text_dim`."""
    c, h, _ = latent_shape
    if cfg.conditioning == "text":
        if text_dim is None:
            raise ValueError("build_dit: text conditioning needs text_dim, the caption features' width")
        return MMDiT(
            mmdit_preset(cfg.model, in_channels=c, input_size=h, text_dim=text_dim, qk_norm=cfg.qk_norm)
        )
    config = dit_preset(cfg.model, in_channels=c, input_size=h, num_classes=num_classes, qk_norm=cfg.qk_norm)
    return DiT(config)


def drop_condition(cond: Any, drop: torch.Tensor, *, null_class: int) -> Any:
    """`cond` with the rows where `drop` is True replaced by the null condition that guidance contrasts
    with: the null class for labels (B,), the learned null text for caption features (a dict)."""
    if isinstance(cond, torch.Tensor):
        return torch.where(drop, torch.full_like(cond, null_class), cond)
    return drop_text(cond, drop)


def draw_step_noise(
    gen: torch.Generator, cfg: DiTTrainConfig, shape: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label-dropout mask (B,), times t (B,) and noise eps (B, C, h, w) for a whole global batch of shape
    `shape`.

    Every rank draws the whole global batch's randomness from one shared generator and keeps its slice
    (`.chunk(world)[rank]`, as `batch_indices` slices the data): sample i gets the same draw whichever rank
    holds it, so a run is one function of its seed on any number of ranks (tested against one process, and
    what lets a run saved on N ranks resume exactly on M). Drawing B rather than B / world latents of noise
    costs nothing next to the model.
    """
    n = shape[0]
    drop = torch.rand(n, generator=gen, device=device) < cfg.label_dropout
    t = flow.sample_t(n, kind=cfg.t_sampling, mean=cfg.t_mean, std=cfg.t_std, generator=gen, device=device)
    eps = torch.randn(shape, generator=gen, device=device)
    return drop, t, eps


def flow_matching_loss(
    model: torch.nn.Module,
    z0: torch.Tensor,
    cond: Any,
    noise: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: DiTTrainConfig,
    *,
    null_class: int,
) -> torch.Tensor:
    """This rank's mean velocity loss on latents z0 (b, C, h, w) with their condition (labels (b,) or
    caption features, see `Conditions`) and this rank's slice of `draw_step_noise`; `model` is the module
    `parallelize` returned."""
    drop, t, eps = noise
    cond = drop_condition(cond, drop, null_class=null_class)
    with distributed.autocast(cfg.bf16):
        pred = model(flow.interpolate(z0, eps, t), t, cond)
    return flow.flow_loss(pred.float(), flow.velocity_target(z0, eps), cosine_weight=cfg.cosine_weight).mean()


def _optimizer_step(
    model: DiT,
    opt: torch.optim.Optimizer,
    ema: EMA,
    guard: SpikeGuard,
    loss: torch.Tensor,
    step: int,
    cfg: DiTTrainConfig,
    ckpt_dir: Path,
) -> tuple[float, torch.Tensor, bool]:
    """Backward, clipping, and the optimizer and EMA step unless the spike guard rejects the global batch's
    loss or a non-finite gradient; returns (loss, grad norm, skipped). Every rank takes the same decision."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = full_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    loss_value = distributed.all_reduce_mean(loss).item()
    if guard.is_bad(loss_value, grad_norm.item()):
        if cfg.on_spike == "stop" or guard.exhausted:
            raise RuntimeError(
                f"step {step}: loss {loss_value:.4g} or its gradient is NaN/inf, or the loss is above "
                f"{cfg.spike_factor}x its running mean {guard.mean} ({guard.skips} in a row); training "
                f"stopped, {last_good(ckpt_dir)}: resume it with a lower lr, --set qk_norm=true or bf16=false"
            )
        opt.zero_grad(set_to_none=True)
        return loss_value, grad_norm, True
    opt.step()
    ema.update(model, step)
    return loss_value, grad_norm, False


def cache_identity(cache: LatentCache) -> dict[str, Any]:
    """What a DiT run records of its latents, and what a resume must find again."""
    meta = cache.meta
    keys = ("data", "split", "flip", "num_shards", "latent_shape")
    return {"tokenizer_hash": meta["tokenizer"]["hash"], **{k: meta[k] for k in keys}, "items": len(cache)}


class Conditions:
    """What a DiT run conditions on: the latent cache's class labels or, for text conditioning, the caption
    features cached beside it (`aligntok.data.captions`, made on first use, a collective under torchrun).
    `batch(idx, device)` is the condition of latent rows `idx`, before dropout."""

    def __init__(self, cfg: DiTTrainConfig, cache: LatentCache) -> None:
        self.cache = cache
        self.captions: CaptionCache | None = None
        if cfg.conditioning == "text":
            kw = {"text_encoder": cfg.text_encoder, "max_length": cfg.text_max_length}
            self.captions = CaptionCache.load(build_caption_cache(cache.path, **kw))

    def batch(self, idx: torch.Tensor, device: torch.device) -> Any:
        if self.captions is None:
            return self.cache.labels[idx].to(device)
        return {k: v.to(device) for k, v in self.captions.rows(idx).items()}

    @property
    def text_dim(self) -> int | None:
        return None if self.captions is None else self.captions.dim

    def identity(self) -> dict[str, Any]:
        """What the run records of its data, and what a resume must find again."""
        ident = cache_identity(self.cache)
        if self.captions is not None:
            ident["captions"] = self.captions.identity
        return ident

    def export_meta(self, cfg: DiTTrainConfig) -> dict[str, Any]:
        """What sampling needs to encode prompts as the run's captions were: the encoder and its identity."""
        if self.captions is None:
            return {}
        ident = self.captions.identity
        return {
            "text": {
                "encoder": cfg.text_encoder,
                "identity": ident["text_encoder"],
                "length": ident["length"],
            }
        }


def _check_same_data(saved: dict[str, Any] | None, conditions: Conditions, last: Path) -> None:
    now = conditions.identity()
    if saved != now:
        differs = sorted(k for k in now if (saved or {}).get(k) != now[k])
        raise ValueError(
            f"{last} was trained on other latents or captions than {conditions.cache.path} (differs in: "
            f"{', '.join(differs)}); resume with the --latents and text encoder it was started with, or "
            "start a new --out"
        )


def train_dit(cfg: DiTTrainConfig, *, latents: str | Path, out: str | Path, resume: bool = False) -> Path:
    """Train a DiT on a latent cache; returns the export directory. Under torchrun each rank trains on its
    slice of every global batch (see `draw_step_noise`). Everything is checked before the run directory is
    written: the cache, the resume state (same config, same latents), then `config.json`."""
    world = distributed.init()
    if cfg.batch_size % world.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must divide by the {world.world_size} ranks")
    cache = LatentCache.load(latents)
    if cfg.batch_size > len(cache):
        raise ValueError(
            f"batch_size {cfg.batch_size} exceeds the {len(cache)} latents of {latents}; lower it"
        )
    conditions = Conditions(cfg, cache)
    with run_lock(out) as out:
        return _train_dit(cfg, conditions, out, resume=resume)


def _train_dit(cfg: DiTTrainConfig, conditions: Conditions, out: Path, *, resume: bool) -> Path:
    world = distributed.world()
    ckpt_dir = out / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    if last is not None and not resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    device, cache = world.device, conditions.cache
    seed_everything(cfg.seed)
    shape, num_classes, text_dim = cache.meta["latent_shape"], cache.num_classes, conditions.text_dim
    model = build_dit(cfg, latent_shape=shape, num_classes=num_classes, text_dim=text_dim).to(device)
    train_model = parallelize(model, cfg.parallel, bf16=cfg.bf16)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    guard = SpikeGuard(cfg.spike_factor, cfg.max_consecutive_skips)
    gen = torch.Generator(device).manual_seed(cfg.seed * 7919)  # the same on every rank: draw_step_noise
    step = 0
    if resume and last is not None:
        tensors = {"dit": module_state(model, opt), "ema": ema.shadow}
        state = load_checkpoint(last, cfg=cfg, tensors=tensors, generator=gen)
        _check_same_data(state.get("latents"), conditions, last)
        set_module_state(model, opt, tensors["dit"])
        guard.load_state_dict(state["guard"])
        step = state["step"]
        distributed.print0(
            f"resumed {out} at step {step} ({last.name}, saved on {state['world_size']} ranks)"
        )
    if world.is_main:
        save_json(cfg, out / "config.json")  # the run is accepted: its config is the one on disk
    log = JsonlLog(out / "log.jsonl")
    log.truncate_after(step)
    bar = progress(cfg.steps, step, "dit")
    model.train()
    t0, seen = time.time(), 0
    while step < cfg.steps:
        idx = batch_indices(
            step, n=len(cache), batch=cfg.batch_size, seed=cfg.seed, rank=world.rank, world=world.world_size
        )
        z0 = cache.normalize(cache.rows(idx)).to(device)  # this rank's rows only are read
        cond = conditions.batch(idx, device)
        shape = (cfg.batch_size, *z0.shape[1:])
        noise = tuple(a.chunk(world.world_size)[world.rank] for a in draw_step_noise(gen, cfg, shape, device))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(
                step, warmup=cfg.warmup_steps, total=cfg.steps, schedule=cfg.schedule
            )
        loss = flow_matching_loss(train_model, z0, cond, noise, cfg, null_class=cache.num_classes)
        loss_value, grad_norm, skipped = _optimizer_step(model, opt, ema, guard, loss, step, cfg, ckpt_dir)
        if skipped:
            log.write(step=step, event="skipped_step", loss=loss_value)
        step += 1
        seen += cfg.batch_size
        bar.update()
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.write(
                step=step,
                loss=loss_value,
                grad_norm=grad_norm.item(),
                lr=opt.param_groups[0]["lr"],
                samples_per_s=seen / max(time.time() - t0, 1e-9),
                skipped=guard.total_skips,
            )
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            tensors = {"dit": module_state(model, opt), "ema": ema.shadow}
            extra = {"guard": guard.state_dict(), "latents": conditions.identity()}
            save_checkpoint(ckpt_dir, step, cfg=cfg, tensors=tensors, generator=gen, **extra)
        if step in cfg.keep_checkpoints:
            export_dit(model, ema, cfg, conditions, kept_export(out, step))
    bar.close()
    export = out / "export"
    export_dit(model, ema, cfg, conditions, export)
    distributed.barrier()
    distributed.print0(f"DiT trained for {step} steps; export at {export}")
    return export


def kept_export(out: str | Path, step: int) -> Path:
    """Where a DiT run in `out` keeps the export of step `step` (one of `keep_checkpoints`)."""
    return Path(out) / "exports" / f"step-{step:07d}"


def export_dit(model: DiT | MMDiT, ema: EMA, cfg: DiTTrainConfig, conditions: Conditions, out: Path) -> None:
    """The EMA weights as a DiT export (`aligntok.exports`). A collective under FSDP (the EMA shards are
    gathered); rank 0 writes."""
    weights = full_state(ema.state_dict())
    if not distributed.world().is_main:
        return
    cache, keys = conditions.cache, ("mean", "std", "classes", "tokenizer")
    latents = {"path": str(cache.path.resolve()), **{k: cache.meta[k] for k in keys}}
    latents |= conditions.export_meta(cfg)
    save_dit(out, weights, config=model.config, train=cfg, latents=latents)
