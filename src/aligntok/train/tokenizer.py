"""The ONE tokenizer training loop, for every stage of AlignTok and for the baselines (docs/method.md,
"The three stages"). A stage is data (`StageConfig`): which parameter groups train, the loss weights, its
length and learning rates, and whether an EMA of the weights is exported. `--stage all` runs a recipe's
stages in order, each starting from the previous stage's export, then writes one export with latent
statistics.

Run directory:
    RUN/config.json                      resolved training config
    RUN/stage-<name>/log.jsonl           losses (each on its own), lr, grad norms, validation PSNR
    RUN/stage-<name>/checkpoints/        exact-resume state (tokenizer, EMA, discriminator, optimizers, RNG;
                                         aligntok.checkpoint's layout: resumes on any number of ranks)
    RUN/stage-<name>/recon-<step>.png    originals (top) over reconstructions of a fixed validation batch
    RUN/stage-<name>/export/             the stage's result (EMA weights where the stage keeps an EMA)
    RUN/stage-<name>/exports/step-NNNNNNN/  the same at the steps in the stage's `keep_exports`
    RUN/export/                          the final tokenizer with latent statistics of the training data
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from aligntok import distributed
from aligntok.checkpoint import TrainingState, latest_checkpoint, module_state, set_module_state
from aligntok.config import differences, from_dict, save_json, to_dict
from aligntok.data import build_dataset, check_dataset
from aligntok.data.shards import ShardDataset
from aligntok.models.tokenizer import Tokenizer
from aligntok.rundir import run_lock
from aligntok.train.common import (
    JsonlLog,
    SpikeGuard,
    StepBatchSampler,
    load_checkpoint,
    lr_factor,
    progress,
    save_checkpoint,
)
from aligntok.train.tokenizer_config import StageConfig, TokenizerTrainConfig
from aligntok.train.tokenizer_stage import (
    Stage,
    build_stage,
    channel_moments,
    discriminator_step,
    gathered_copy,
    keep_frozen_outputs,
    optimizer_step,
    posterior_noise,
    stage_losses,
    validate,
)


def stage_dir(out: Path, stage: StageConfig) -> Path:
    """Where a stage of a tokenizer trained into `out` keeps its checkpoints, log and export."""
    return out / f"stage-{stage.name}"


def kept_stage_export(out: str | Path, stage: StageConfig, step: int) -> Path:
    """Where a stage of a tokenizer trained into `out` keeps the export of step `step` (`keep_exports`)."""
    return stage_dir(Path(out), stage) / "exports" / f"step-{step:07d}"


def _export_done(path: Path) -> bool:
    return (path / "model.safetensors").exists() and (path / "config.json").exists()


# Fields that change how a run is carried out or reported, not what it computes.
_NOT_INPUTS = ("parallel", "log_every", "val_every", "num_val", "ckpt_every", "num_workers")
_NOT_STAGE_INPUTS = ("keep_exports",)


def stage_inputs(cfg: TokenizerTrainConfig, index: int | None) -> dict[str, Any]:
    """What the export of stage `index` (None: the final export) is a function of: the config up to and
    including that stage. Recorded in the export; a stage is reused, or a later one started on top of it,
    only when the current config asks for the same."""
    inputs = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_INPUTS}
    inputs["stages"] = [{k: v for k, v in s.items() if k not in _NOT_STAGE_INPUTS} for s in inputs["stages"]]
    if index is not None:
        inputs["stages"] = inputs["stages"][: index + 1]
        del inputs["stats_batches"]  # the final export's latent statistics only
    return inputs


def _finished(export: Path, wanted: dict[str, Any], what: str) -> bool:
    """Whether `export` holds a finished stage made from `wanted`; one made from other inputs is refused."""
    if not _export_done(export):
        return False
    recorded = json.loads((export / "config.json").read_text()).get("meta", {}).get("inputs")
    if recorded is None:
        warnings.warn(
            f"{export} records no inputs (an older aligntok wrote it); reused unchecked", stacklevel=3
        )
        return True
    differs = differences(_with_defaults(recorded, wanted), wanted)
    if differs:
        raise ValueError(
            f"{what} in {export} was trained with other settings (differs in: {', '.join(differs[:6])}); "
            "rerun with the recipe and --set it was made with, or choose a new --out"
        )
    return True


def _lengthened(export: Path, cfg: TokenizerTrainConfig, k: int) -> int | None:
    """The steps stage `k`'s finished `export` ran, if it is that stage asked to run longer: made from the
    same inputs but fewer steps, of a stage whose steps do not depend on its length
    (`StageConfig.length_free`), so resuming its last checkpoint continues the longer run; else None."""
    stage = cfg.stages[k]
    if not _export_done(export) or not stage.length_free:
        return None
    meta = json.loads((export / "config.json").read_text()).get("meta", {})
    done, recorded = meta.get("step"), meta.get("inputs")
    if recorded is None or not isinstance(done, int) or done >= stage.steps:
        return None
    stages = list(cfg.stages)
    kept = tuple(step for step in stage.keep_exports if step <= done)  # not an input: only valid ones
    stages[k] = dataclasses.replace(stage, steps=done, keep_exports=kept)
    shorter = stage_inputs(dataclasses.replace(cfg, stages=stages), k)
    return None if differences(_with_defaults(recorded, shorter), shorter) else done


def _with_defaults(recorded: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """`recorded` inputs with the config fields added since they were written at their defaults, so that an
    option left at its default does not refuse an older export (as written if they no longer build)."""
    try:
        full = to_dict(from_dict(TokenizerTrainConfig, recorded))
    except (TypeError, ValueError):
        return recorded

    def like(value: Any, shape: Any) -> Any:  # the keys `shape` has (stage_inputs leaves some out)
        if isinstance(value, dict) and isinstance(shape, dict):
            return {k: like(v, shape[k]) for k, v in value.items() if k in shape}
        if isinstance(value, list) and isinstance(shape, list) and len(value) == len(shape):
            return [like(v, w) for v, w in zip(value, shape)]
        return value

    return like(full, wanted)


def _plan(cfg: TokenizerTrainConfig, out: Path, stage: str, resume: bool) -> list[int]:
    """The indices of the stages to train, after checking every export and checkpoint they touch."""
    names = [s.name for s in cfg.stages]
    last = len(names) - 1 if stage == "all" else names.index(stage)
    todo = []
    for k in range(last + 1):
        sdir = stage_dir(out, cfg.stages[k])
        done = _lengthened(sdir / "export", cfg, k)
        if done is not None:
            if not resume:
                raise ValueError(f"{sdir} finished {done} steps of {cfg.stages[k].steps}: pass --resume")
            distributed.print0(
                f"stage {names[k]}: lengthened from {done} to {cfg.stages[k].steps} steps (constant lr: the "
                "run it continues is the first steps of one this long)"
            )
            todo.append(k)
            continue
        if _finished(sdir / "export", stage_inputs(cfg, k), f"stage {names[k]}"):
            distributed.print0(f"stage {names[k]}: done already ({sdir / 'export'})")
            continue
        if stage != "all" and k < last:
            raise ValueError(
                f"stage {names[last]} starts from stage {names[k]}, not trained yet ({sdir / 'export'}); "
                f"run --stage {names[k]} first or --stage all"
            )
        if latest_checkpoint(sdir / "checkpoints") is not None and not resume:
            raise ValueError(
                f"{sdir} holds an interrupted stage; pass --resume to continue it or a new --out"
            )
        todo.append(k)
    return todo


def train_tokenizer(
    cfg: TokenizerTrainConfig, *, out: str | Path, stage: str = "all", resume: bool = False
) -> Path:
    """Run one stage (`stage` = its name) or all of them; returns the export directory of the last stage
    run (the final export for `all`). Every stage export it reuses or builds on, and every checkpoint it
    resumes, is checked against this config before the run directory is written."""
    if not cfg.data:
        raise ValueError("this recipe has no dataset: --set data=/path/to/images (one subfolder per class)")
    names = [s.name for s in cfg.stages]
    if stage != "all" and stage not in names:
        raise ValueError(f"--stage {stage!r} is not in this recipe; its stages: {', '.join(names)} or all")
    check_dataset(cfg.data)
    world = distributed.init()
    if cfg.batch_size % world.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must divide by the {world.world_size} ranks")
    with run_lock(out) as out:
        todo = _plan(cfg, out, stage, resume)
        final = out / "export"
        whole = stage in ("all", names[-1])  # the last stage also writes the final export
        final_done = whole and not todo and _finished(final, stage_inputs(cfg, None), "the final export")
        if world.is_main:
            save_json(cfg, out / "config.json")  # the run is accepted: its config is the one on disk
        for k in todo:
            _train_stage(cfg, cfg.stages[k], out=out)
        if not whole:
            return stage_dir(out, cfg.stages[names.index(stage)]) / "export"
        if not final_done:  # every rank sees the same: rank 0 writes only after the collective below
            tokenizer = Tokenizer.from_pretrained(stage_dir(out, cfg.stages[-1]) / "export").to(world.device)
            mean, std = latent_statistics(tokenizer, cfg)
            if world.is_main:
                tokenizer.set_latent_stats(mean, std)
                meta = {
                    "trained": {"recipe_stages": names, "data": cfg.data},
                    "inputs": stage_inputs(cfg, None),
                }
                tokenizer.save_pretrained(final, extra_meta=meta)
        distributed.barrier()
    distributed.print0(f"tokenizer trained; export at {final}")
    return final


def _initial_tokenizer(cfg: TokenizerTrainConfig, stage: StageConfig, out: Path) -> Tokenizer:
    """Stage k starts from stage k-1's export; the first stage builds the model (pretrained encoder)."""
    index = [s.name for s in cfg.stages].index(stage.name)
    if index == 0:
        return Tokenizer(cfg.model)
    return Tokenizer.from_pretrained(stage_dir(out, cfg.stages[index - 1]) / "export")


def _semantic_reference(cfg: TokenizerTrainConfig, out: Path) -> Tokenizer:
    """The FROZEN stage-1 tokenizer (original encoder + stage-1 adapter) that L_sp compares against."""
    ref = Tokenizer.from_pretrained(stage_dir(out, cfg.stages[0]) / "export")
    ref.requires_grad_(False)
    return ref.eval()


def _validation_batch(cfg: TokenizerTrainConfig) -> Tensor:
    """`num_val` validation images spread evenly over the split, so that the reconstruction grids show every
    kind of image and not only the first class (train images if the dataset has no validation split; the
    first ones of a streamed shard set, which has no random access)."""
    try:
        ds = build_dataset(cfg.data, split="val", resolution=cfg.model.image_size)
    except ValueError:
        ds = build_dataset(cfg.data, split="train", resolution=cfg.model.image_size)
    n = min(cfg.num_val, len(ds))
    if isinstance(ds, ShardDataset):
        items = itertools.islice(ds, n)
    else:
        items = (ds[i * len(ds) // n] for i in range(n))
    return torch.stack([item["image"] for item in items])


def _stage_loader(
    cfg: TokenizerTrainConfig, stage: StageConfig, start: int, dataset: Dataset
) -> Iterable[dict[str, Tensor]]:
    """The batches of the training split `dataset` for steps [start, stage.steps), a pure function of
    (seed, stage, step)."""
    world = distributed.world()
    order = {"seed": cfg.seed + 1000 * _index(cfg, stage), "start": start, "stop": stage.steps}
    order |= {"rank": world.rank, "world": world.world_size}
    if isinstance(dataset, ShardDataset):  # streamed: each rank reads its own shards
        batch_size = cfg.batch_size // world.world_size
        return dataset.loader(batch=batch_size, num_workers=cfg.num_workers, **order)
    sampler = StepBatchSampler(n=len(dataset), batch=cfg.batch_size, **order)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers)


def _train_stage(cfg: TokenizerTrainConfig, stage: StageConfig, *, out: Path) -> None:
    world = distributed.init()
    sdir = stage_dir(out, stage)
    ckpt_dir = sdir / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    parts = build_stage(
        cfg, stage, lambda: _initial_tokenizer(cfg, stage, out), lambda: _semantic_reference(cfg, out)
    )
    step = 0
    guard = SpikeGuard(None, stage.max_consecutive_skips)  # non-finite losses and gradients only
    if last is not None:
        loaded = parts.tensors()
        k = _index(cfg, stage)
        longer = frozenset({f"stages.{k}.steps", f"stages.{k}.keep_exports"} if stage.length_free else ())
        state = load_checkpoint(last, cfg=cfg, tensors=loaded, generator=parts.generator, may_differ=longer)
        step = state["step"]
        if step > stage.steps:
            raise ValueError(f"{last} is past this stage's {stage.steps} steps: a stage cannot be shortened")
        guard.load_state_dict(state["guard"])
        set_module_state(parts.autoencoder, parts.opt, loaded["autoencoder"])
        if parts.disc is not None:
            set_module_state(parts.disc, parts.opt_d, loaded["disc"])
        distributed.print0(f"stage {stage.name}: resumed at step {step} ({last})")
    elif parts.disc is not None:
        _carry_discriminator(cfg, stage, out, parts.disc)
    dataset = build_dataset(cfg.data, split="train", resolution=cfg.model.image_size)
    keep_frozen_outputs(parts, cfg, dataset, images_read=(stage.steps - step) * cfg.batch_size)
    loader = _stage_loader(cfg, stage, step, dataset)
    val_images = _validation_batch(cfg).to(world.device) if world.is_main else None
    log = JsonlLog(sdir / "log.jsonl")
    if world.is_main:
        sdir.mkdir(parents=True, exist_ok=True)
    log.truncate_after(step)
    bar = progress(stage.steps, step, f"tokenizer stage {stage.name}")
    parts.autoencoder.train()
    t0 = time.time()
    for batch in loader:
        images = batch["image"].to(world.device, non_blocking=True)
        noise = posterior_noise(parts, cfg)
        for g, base in zip(parts.opt.param_groups, parts.base_lrs):
            g["lr"] = base * lr_factor(
                step, warmup=stage.warmup_steps, total=stage.steps, schedule=stage.schedule
            )
        gan_on = parts.disc is not None and step >= stage.gan_start
        frozen = parts.frozen_batch(batch)
        total, recon, losses = stage_losses(parts, cfg, images, noise, gan_on=gan_on, frozen=frozen)
        loss_value, grad_norm, skipped = optimizer_step(
            parts, cfg, guard, total, step=step, ckpt_dir=ckpt_dir
        )
        if skipped:
            log.write(step=step, event="skipped_step", loss=loss_value)
        elif gan_on:
            losses["d"] = discriminator_step(cfg, parts.train_disc, parts.opt_d, images, recon.detach())
        step += 1
        bar.update()
        if step % cfg.log_every == 0 or step == stage.steps:
            log.write(
                step=step,
                loss=loss_value,
                grad_norm=grad_norm.item(),
                lr=parts.opt.param_groups[0]["lr"],
                images_per_s=step * cfg.batch_size / max(time.time() - t0, 1e-9) if step else 0.0,
                **{k: distributed.all_reduce_mean(v).item() for k, v in losses.items()},
            )
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % cfg.val_every == 0 or step == stage.steps:
            copy = gathered_copy(parts.tokenizer, parts.ema)
            if world.is_main:
                log.write(step=step, val_psnr=validate(copy, val_images, sdir / f"recon-{step:07d}.png"))
        if step in stage.keep_exports:  # before the checkpoint: a resume past it has written it
            _export_stage(cfg, parts, kept_stage_export(out, stage, step), step)
        if step % cfg.ckpt_every == 0 or step == stage.steps:
            extra = {"stage": stage.name, "guard": guard.state_dict()}
            save_checkpoint(
                ckpt_dir, step, cfg=cfg, tensors=parts.tensors(), generator=parts.generator, **extra
            )
    bar.close()
    _export_stage(cfg, parts, sdir / "export", step)
    distributed.barrier()


def _export_stage(cfg: TokenizerTrainConfig, parts: Stage, path: Path, step: int) -> None:
    """The stage's export at `step` (the EMA weights where it keeps an EMA), with what it was made from. A
    collective under FSDP (the weights are gathered); rank 0 writes.

    Of a `length_free` stage an export kept at `step` records the inputs of the same stage `step` steps long:
    it is that stage's export, and a later stage may start from it."""
    copy = gathered_copy(parts.tokenizer, parts.ema)
    if copy is not None:
        stage, index = parts.config, _index(cfg, parts.config)
        inputs = stage_inputs(cfg, index)
        if stage.length_free:
            inputs["stages"][index]["steps"] = step
        meta = {"stage": stage.name, "steps": stage.steps, "step": step, "inputs": inputs}
        copy.save_pretrained(path, extra_meta=meta)


def _index(cfg: TokenizerTrainConfig, stage: StageConfig) -> int:
    return [s.name for s in cfg.stages].index(stage.name)


def _carry_discriminator(cfg: TokenizerTrainConfig, stage: StageConfig, out: Path, disc: nn.Module) -> None:
    """A later stage keeps training the previous stage's discriminator instead of a fresh one."""
    index = _index(cfg, stage)
    if index == 0:
        return
    prev = latest_checkpoint(stage_dir(out, cfg.stages[index - 1]) / "checkpoints")
    if prev is None:
        return
    saved = TrainingState(prev)  # verified (manifest hashes) before anything in it is read
    if "disc" in _saved_parts(saved):
        loaded = {"disc": module_state(disc)}
        saved.load_tensors(loaded)
        set_module_state(disc, None, loaded["disc"])


def _saved_parts(saved: TrainingState) -> set[str]:
    """Top-level names in a training state's DCP save (e.g. "autoencoder", "disc", "ema")."""
    return {key.split(".")[0] for key in saved.saved_keys()}


def latent_statistics(tokenizer: Tokenizer, cfg: TokenizerTrainConfig) -> tuple[Tensor, Tensor]:
    """Per-channel mean/std of the latents of the training data: `stats_batches` batches of 64 images spread
    evenly over it, or all of it (the default; `channel_moments`). A collective under torchrun."""
    mean, std = channel_moments(tokenizer, cfg, cfg.stats_batches).mean_std()
    return mean.float(), std.float()
