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
    RUN/export/                          the final tokenizer with latent statistics of the training data
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from aligntok import distributed
from aligntok.checkpoint import latest_checkpoint, load_training_tensors, module_state, set_module_state
from aligntok.config import save_json
from aligntok.data import build_dataset
from aligntok.data.latents import ChannelMoments
from aligntok.data.shards import ShardDataset
from aligntok.files import make_grid, save_image, to_uint8
from aligntok.losses import (
    VF_MARGINS,
    PerceptualLoss,
    VFLoss,
    adaptive_gan_weight,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    semantic_preservation_loss,
)
from aligntok.metrics.reconstruction import psnr
from aligntok.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from aligntok.models.encoders import EncoderConfig, build_encoder
from aligntok.models.tokenizer import Tokenizer, TokenizerConfig
from aligntok.parallelize import ParallelConfig, full_grad_norm, full_state, parallelize
from aligntok.train.common import (
    EMA,
    JsonlLog,
    StepBatchSampler,
    load_checkpoint,
    lr_factor,
    progress,
    save_checkpoint,
    seed_everything,
)

GROUPS = ("encoder", "adapter", "decoder")


@dataclass(kw_only=True)
class StageConfig:
    """One stage: trained parameter groups, losses, length, learning rates, EMA."""

    name: str  # "1", "2", "3" for AlignTok; e.g. "vae" for a one-stage baseline
    steps: int
    train: tuple[str, ...]  # parameter groups that train: subset of encoder, adapter, decoder
    lr: float = 1e-4
    encoder_lr: float | None = None  # stage 2 fine-tunes the encoder with a lower lr (None: same as lr)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    gan_weight: float = 0.5  # base weight of the adaptive GAN term (taming/LDM rule); 0 disables the GAN
    gan_start: int = 0  # stage step at which the discriminator and the GAN term start
    sp_weight: float = 0.0  # w_sp of L_sp (stage 2 only in AlignTok)
    sp_kind: Literal["l2", "cosine"] = "l2"
    kl_weight: float = 0.0  # vanilla VAE baselines: 1e-6
    vf_weight: float = 0.0  # VA-VAE baseline: vision-foundation alignment loss
    ema_decay: float | None = None  # keep an EMA and export it (stage 2)

    def __post_init__(self) -> None:
        self.train = tuple(self.train)
        unknown = set(self.train) - set(GROUPS)
        if unknown or not self.train:
            raise ValueError(f"stage {self.name}: train={self.train} must be a non-empty subset of {GROUPS}")


@dataclass(kw_only=True)
class TokenizerTrainConfig:
    model: TokenizerConfig
    data: str = "emoji"
    stages: tuple[StageConfig, ...]
    batch_size: int = 32  # global
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lpips_net: Literal["vgg", "alex"] = "vgg"  # AlexNet LPIPS is ~50x cheaper: the CPU recipes' choice
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    disc_lr: float = 1e-4
    vf_encoder: EncoderConfig | None = None  # VA-VAE: the frozen foundation encoder the latent aligns to
    vf_margins: tuple[float, float] = VF_MARGINS  # VA-VAE's cosine and distance-matrix margins
    bf16: bool = False
    seed: int = 0
    num_workers: int = 0
    log_every: int = 25
    val_every: int = 250
    num_val: int = 16
    ckpt_every: int = 500
    stats_batches: int | None = None  # batches of training data for latent statistics (None: all)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"stages need distinct names, got {names}")
        if any(s.vf_weight > 0 for s in self.stages) and self.vf_encoder is None:
            raise ValueError("a stage has vf_weight > 0 but vf_encoder is not set")


def stage_dir(out: Path, stage: StageConfig) -> Path:
    """Where a stage of a tokenizer trained into `out` keeps its checkpoints, log and export."""
    return out / f"stage-{stage.name}"


def _export_done(path: Path) -> bool:
    return (path / "model.safetensors").exists() and (path / "config.json").exists()


def train_tokenizer(
    cfg: TokenizerTrainConfig, *, out: str | Path, stage: str = "all", resume: bool = False
) -> Path:
    """Run one stage (`stage` = its name) or all of them; returns the final export directory."""
    out = Path(out)
    if not cfg.data:
        raise ValueError("this recipe has no dataset: --set data=/path/to/images (one subfolder per class)")
    names = [s.name for s in cfg.stages]
    if stage != "all" and stage not in names:
        raise ValueError(f"--stage {stage!r} is not in this recipe; its stages: {', '.join(names)} or all")
    world = distributed.init()
    if cfg.batch_size % world.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must divide by the {world.world_size} ranks")
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg, out / "config.json")
    todo = cfg.stages if stage == "all" else tuple(s for s in cfg.stages if s.name == stage)
    for s in todo:
        sdir = stage_dir(out, s)
        if _export_done(sdir / "export"):
            distributed.print0(f"stage {s.name}: done already ({sdir / 'export'})")
            continue
        if latest_checkpoint(sdir / "checkpoints") is not None and not resume:
            raise ValueError(
                f"{sdir} holds an interrupted stage; pass --resume to continue it or a new --out"
            )
        _train_stage(cfg, s, out=out)
    last = stage_dir(out, cfg.stages[-1]) / "export"
    if stage != "all" and stage != names[-1]:
        return stage_dir(out, todo[0]) / "export"
    final = out / "export"
    if not _export_done(final):  # every rank sees the same: rank 0 writes only after the collective below
        tokenizer = Tokenizer.from_pretrained(last).to(world.device)
        mean, std = latent_statistics(tokenizer, cfg)
        if world.is_main:
            tokenizer.set_latent_stats(mean, std)
            meta = {"trained": {"recipe_stages": names, "data": cfg.data}}
            tokenizer.save_pretrained(final, extra_meta=meta)
    distributed.barrier()
    distributed.print0(f"tokenizer trained; export at {final}")
    return final


def _initial_tokenizer(cfg: TokenizerTrainConfig, stage: StageConfig, out: Path) -> Tokenizer:
    """Stage k starts from stage k-1's export; the first stage builds the model (pretrained encoder)."""
    index = [s.name for s in cfg.stages].index(stage.name)
    if index == 0:
        return Tokenizer(cfg.model)
    prev = stage_dir(out, cfg.stages[index - 1]) / "export"
    if not _export_done(prev):
        raise ValueError(
            f"stage {stage.name} starts from stage {cfg.stages[index - 1].name}, not trained yet "
            f"({prev}); run --stage {cfg.stages[index - 1].name} first or --stage all"
        )
    return Tokenizer.from_pretrained(prev)


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


class Autoencoder(nn.Module):
    """What the generator's optimizer trains, run as ONE module call per step so that DDP/FSDP2 hooks see
    it: images (+ posterior noise) -> latent, reconstruction, and the VF terms (VA-VAE's projection trains).
    """

    def __init__(self, tokenizer: Tokenizer, vf: VFLoss | None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.vf = vf

    def forward(self, images: Tensor, noise: Tensor | None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.tokenizer.config.posterior == "gaussian":
            mean, logvar = self.tokenizer.encode_posterior(images)
            z = mean + noise * (0.5 * logvar).exp()
            out["mean"], out["logvar"] = mean, logvar
        else:
            z = self.tokenizer.encode(images)
        out["z"], out["recon"] = z, self.tokenizer.decode(z)
        if self.vf is not None:
            out["vf_cos"], out["vf_dm"] = self.vf(z.float(), images)
        return out


@dataclass
class _Stage:
    """Everything one stage trains and measures with, built in a fixed order (the order fixes the RNG draws
    of the initialisations, so a resumed run rebuilds the very same modules)."""

    config: StageConfig
    tokenizer: Tokenizer
    autoencoder: Autoencoder  # tokenizer + VF projection: what the generator's optimizer trains
    train_ae: nn.Module  # `autoencoder` as `parallelize` wrapped it
    opt: torch.optim.Optimizer
    base_lrs: list[float]
    trained: list[nn.Parameter]
    perceptual: PerceptualLoss | None
    disc: PatchDiscriminator | None
    train_disc: nn.Module | None
    opt_d: torch.optim.Optimizer | None
    ema: EMA | None
    reference: Tokenizer | None  # the frozen stage-1 tokenizer of L_sp
    generator: torch.Generator  # the same on every rank (see `_posterior_noise`)

    def tensors(self) -> dict[str, dict]:
        """What a checkpoint of this stage holds."""
        parts = {"autoencoder": module_state(self.autoencoder, self.opt)}
        if self.disc is not None:
            parts["disc"] = module_state(self.disc, self.opt_d)
        if self.ema is not None:
            parts["ema"] = self.ema.shadow
        return parts


def _build_stage(cfg: TokenizerTrainConfig, stage: StageConfig, out: Path) -> _Stage:
    device = distributed.device()
    seed_everything(cfg.seed)
    tokenizer = _initial_tokenizer(cfg, stage, out).to(device)
    tokenizer.set_trainable(**{g: g in stage.train for g in GROUPS})
    vf = None
    if stage.vf_weight > 0:
        assert cfg.vf_encoder is not None
        vf_encoder = build_encoder(cfg.vf_encoder).to(device).eval().requires_grad_(False)
        vf = VFLoss(tokenizer.config.latent_channels, vf_encoder, margins=cfg.vf_margins).to(device)
    autoencoder = Autoencoder(tokenizer, vf)
    train_ae = parallelize(autoencoder, cfg.parallel, bf16=cfg.bf16)
    groups = tokenizer.param_groups()  # after parallelize: FSDP2 has replaced them by shards
    param_groups = [
        {"params": groups[g], "lr": (stage.encoder_lr or stage.lr) if g == "encoder" else stage.lr, "name": g}
        for g in stage.train
    ]
    if vf is not None:
        param_groups.append({"params": list(vf.projection.parameters()), "lr": stage.lr, "name": "vf"})
    opt = torch.optim.AdamW(param_groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
    perceptual = PerceptualLoss(net=cfg.lpips_net).to(device) if stage.lpips_weight > 0 else None
    disc = PatchDiscriminator(cfg.disc).to(device) if stage.gan_weight > 0 else None
    return _Stage(
        config=stage,
        tokenizer=tokenizer,
        autoencoder=autoencoder,
        train_ae=train_ae,
        opt=opt,
        base_lrs=[g["lr"] for g in param_groups],
        trained=[p for g in param_groups for p in g["params"]],
        perceptual=perceptual,
        disc=disc,
        train_disc=parallelize(disc, cfg.parallel, bf16=cfg.bf16) if disc is not None else None,
        opt_d=discriminator_optimizer(cfg, disc) if disc is not None else None,
        ema=EMA(tokenizer, stage.ema_decay) if stage.ema_decay else None,
        # Frozen target networks (L_sp reference, LPIPS, the VF encoder) are replicated, never wrapped.
        reference=_semantic_reference(cfg, out).to(device) if stage.sp_weight > 0 else None,
        generator=torch.Generator(device).manual_seed(cfg.seed * 7919),
    )


def _posterior_noise(parts: _Stage, cfg: TokenizerTrainConfig) -> Tensor | None:
    """This rank's slice of the global batch's posterior noise (VAE baselines), None for AlignTok's
    deterministic latent. Every rank draws the whole batch from the shared generator and keeps its slice, so
    a run is one function of its seed on any number of ranks (as in train/dit.py, draw_step_noise)."""
    if parts.tokenizer.config.posterior != "gaussian":
        return None
    world = distributed.world()
    shape = (cfg.batch_size, *parts.tokenizer.latent_shape)
    return torch.randn(shape, generator=parts.generator, device=world.device).chunk(world.world_size)[
        world.rank
    ]


def _stage_losses(
    parts: _Stage, cfg: TokenizerTrainConfig, images: Tensor, noise: Tensor | None, *, gan_on: bool
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The generator's total loss, the reconstruction (its GAN-free part) and every term on its own."""
    stage = parts.config
    losses: dict[str, Tensor] = {}
    with distributed.autocast(cfg.bf16):
        outputs = parts.train_ae(images, noise)
        z, recon = outputs["z"], outputs["recon"]
        if stage.kl_weight > 0:
            # Per image pixel value: LDM's KL weight (1e-6) is relative to a reconstruction loss SUMMED over
            # pixels, ours are means: divide by 3 * H * W to keep its meaning.
            kl = kl_loss(outputs["mean"].float(), outputs["logvar"].float())
            losses["kl"] = kl / images[0].numel()
        losses["l1"] = (recon.float() - images).abs().mean()
        if parts.perceptual is not None:
            losses["lpips"] = parts.perceptual(recon.float(), images)
        if parts.reference is not None:
            with torch.no_grad():
                z_ref = parts.reference.encode(images)
            losses["sp"] = semantic_preservation_loss(z.float(), z_ref.float(), kind=stage.sp_kind)
        if "vf_cos" in outputs:
            losses["vf_cos"], losses["vf_dm"] = outputs["vf_cos"], outputs["vf_dm"]
    rec = stage.l1_weight * losses["l1"] + stage.lpips_weight * losses.get("lpips", 0.0)
    total = rec + stage.sp_weight * losses.get("sp", 0.0) + stage.kl_weight * losses.get("kl", 0.0)
    total = total + stage.vf_weight * (losses.get("vf_cos", 0.0) + losses.get("vf_dm", 0.0))
    if gan_on:
        assert parts.train_disc is not None
        # D's parameters get gradients here too (one code path for every parallel mode: a frozen flag would
        # not reach FSDP2's unsharded copies); they are cleared before D's own step.
        with distributed.autocast(cfg.bf16):
            losses["g"] = generator_loss(parts.train_disc(recon).float())
        # Under FSDP2 the root group (decoder.conv_out is in it) stays unsharded from forward to backward,
        # so this is the very parameter the graph used.
        weight = adaptive_gan_weight(
            rec, losses["g"], parts.tokenizer.decoder.last_layer, base=stage.gan_weight
        )
        losses["gan_weight"] = weight
        total = total + weight * losses["g"]
    return total, recon, losses


def _stage_loader(cfg: TokenizerTrainConfig, stage: StageConfig, start: int) -> Iterable[dict[str, Tensor]]:
    """The training batches of steps [start, stage.steps), a pure function of (seed, stage, step)."""
    world = distributed.world()
    dataset = build_dataset(cfg.data, split="train", resolution=cfg.model.image_size)
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
    parts = _build_stage(cfg, stage, out)
    step = 0
    if last is not None:
        loaded = parts.tensors()
        step = load_checkpoint(last, cfg=cfg, tensors=loaded, generator=parts.generator)["step"]
        set_module_state(parts.autoencoder, parts.opt, loaded["autoencoder"])
        if parts.disc is not None:
            set_module_state(parts.disc, parts.opt_d, loaded["disc"])
        distributed.print0(f"stage {stage.name}: resumed at step {step} ({last})")
    elif parts.disc is not None:
        _carry_discriminator(cfg, stage, out, parts.disc)
    loader = _stage_loader(cfg, stage, step)
    val_images = _validation_batch(cfg).to(world.device) if world.is_main else None
    log = JsonlLog(sdir / "log.jsonl")
    if world.is_main:
        sdir.mkdir(parents=True, exist_ok=True)
    bar = progress(stage.steps, step, f"tokenizer stage {stage.name}")
    parts.autoencoder.train()
    t0 = time.time()
    for batch in loader:
        images = batch["image"].to(world.device, non_blocking=True)
        noise = _posterior_noise(parts, cfg)
        for g, base in zip(parts.opt.param_groups, parts.base_lrs):
            g["lr"] = base * lr_factor(
                step, warmup=stage.warmup_steps, total=stage.steps, schedule=stage.schedule
            )
        gan_on = parts.disc is not None and step >= stage.gan_start
        total, recon, losses = _stage_losses(parts, cfg, images, noise, gan_on=gan_on)
        parts.opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = full_grad_norm(torch.nn.utils.clip_grad_norm_(parts.trained, cfg.grad_clip))
        loss_value = distributed.all_reduce_mean(total).item()  # the global batch's: one decision for all
        if not math.isfinite(loss_value):
            raise RuntimeError(
                f"stage {stage.name}: loss is {loss_value} at step {step}; resume from "
                f"{ckpt_dir} with a lower lr or bf16=false"
            )
        parts.opt.step()
        if gan_on:
            losses["d"] = discriminator_step(cfg, parts.train_disc, parts.opt_d, images, recon.detach())
        if parts.ema is not None:
            parts.ema.update(parts.tokenizer, step)
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
            copy = _gathered_copy(parts.tokenizer, parts.ema)
            if world.is_main:
                log.write(step=step, val_psnr=_validate(copy, val_images, sdir / f"recon-{step:07d}.png"))
        if step % cfg.ckpt_every == 0 or step == stage.steps:
            save_checkpoint(
                ckpt_dir, step, cfg=cfg, tensors=parts.tensors(), generator=parts.generator, stage=stage.name
            )
    bar.close()
    copy = _gathered_copy(parts.tokenizer, parts.ema)
    if world.is_main:
        copy.save_pretrained(sdir / "export", extra_meta={"stage": stage.name, "steps": stage.steps})
    distributed.barrier()


def discriminator_optimizer(cfg: TokenizerTrainConfig, disc: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=cfg.betas)


def discriminator_step(
    cfg: TokenizerTrainConfig, disc: nn.Module, opt_d: torch.optim.Optimizer, real: Tensor, fake: Tensor
) -> Tensor:
    """One hinge-loss update of the discriminator `disc` (the module or its parallel wrapper, which yields
    the same parameters) on a batch of real and (detached) fake images; returns the loss."""
    with distributed.autocast(cfg.bf16):
        # Real and fake in one call (GroupNorm: each sample is normalised alone), one forward per backward
        # as DDP expects.
        logits = disc(torch.cat([real, fake])).float()
        loss = hinge_d_loss(*logits.chunk(2))
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
    opt_d.step()
    return loss


def _index(cfg: TokenizerTrainConfig, stage: StageConfig) -> int:
    return [s.name for s in cfg.stages].index(stage.name)


def _carry_discriminator(cfg: TokenizerTrainConfig, stage: StageConfig, out: Path, disc: nn.Module) -> None:
    """A later stage keeps training the previous stage's discriminator instead of a fresh one."""
    index = _index(cfg, stage)
    if index == 0:
        return
    prev = latest_checkpoint(stage_dir(out, cfg.stages[index - 1]) / "checkpoints")
    if prev is not None and "disc" in _saved_parts(prev):
        loaded = {"disc": module_state(disc)}
        load_training_tensors(prev, loaded)
        set_module_state(disc, None, loaded["disc"])


def _saved_parts(path: Path) -> set[str]:
    """Top-level names in a DCP save (e.g. "autoencoder", "disc", "ema")."""
    from torch.distributed.checkpoint import FileSystemReader

    return {key.split(".")[0] for key in FileSystemReader(path).read_metadata().state_dict_metadata}


def _gathered_copy(tokenizer: Tokenizer, ema: EMA | None) -> Tokenizer | None:
    """On rank 0, a plain (unsharded, unwrapped) copy of the tokenizer with the EMA weights where a stage
    keeps them; None elsewhere. A collective under FSDP: every rank calls it."""
    state = full_state(ema.state_dict() if ema is not None else tokenizer.state_dict())
    if not distributed.world().is_main:
        return None
    copy = Tokenizer(tokenizer.export_config())  # no weights folder read
    copy.load_state_dict(state)
    return copy.to(distributed.device())


@torch.no_grad()
def _validate(model: Tokenizer, images: Tensor, path: Path) -> float:
    """PSNR on the fixed validation batch, and a grid of originals over reconstructions."""
    model.eval()
    recon = model.decode(model.encode(images)).clamp(0, 1)
    grid = make_grid(to_uint8(torch.cat([images, recon])), nrow=len(images))
    save_image(grid, path, scale=max(1, 128 // images.shape[-1]))
    return psnr(recon, images).mean().item()  # clamped; +inf only for a perfect reconstruction


@torch.no_grad()
def latent_statistics(tokenizer: Tokenizer, cfg: TokenizerTrainConfig) -> tuple[Tensor, Tensor]:
    """Per-channel mean/std of the latents of the training data (float64 accumulation): the first
    `stats_batches` batches of 64 images (all by default). Under torchrun rank r encodes batches r,
    r + world, ... (shards r, r + world, ... of a shard folder) and the moments are summed: a collective."""
    world = distributed.world()
    device = next(tokenizer.parameters()).device
    tokenizer.eval()
    dataset = build_dataset(cfg.data, split="train", resolution=cfg.model.image_size)
    limit = len(dataset) if cfg.stats_batches is None else min(len(dataset), 64 * cfg.stats_batches)
    if isinstance(dataset, ShardDataset):  # streamed: this rank's shards, its share of `limit` images
        part = dataset.subset(list(range(world.rank, dataset.num_shards, world.world_size)))
        cap = -(-limit // world.world_size)
    else:
        batches = range(world.rank, -(-limit // 64), world.world_size)
        mine = [i for b in batches for i in range(64 * b, min(64 * b + 64, limit))]
        part, cap = torch.utils.data.Subset(dataset, mine), len(mine)
    moments = ChannelMoments(tokenizer.config.latent_channels)
    seen = 0
    for batch in DataLoader(part, batch_size=64, num_workers=cfg.num_workers):
        images = batch["image"][: cap - seen]
        if not len(images):
            break
        seen += len(images)
        with distributed.autocast(cfg.bf16):
            moments.update(tokenizer.encode(images.to(device)))
    moments.all_reduce()
    mean, std = moments.mean_std()
    return mean.float(), std.float()
