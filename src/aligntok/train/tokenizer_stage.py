"""One tokenizer stage's modules and losses, as the training loop in `aligntok.train.tokenizer` uses them:
the autoencoder the generator's optimizer trains, the discriminator and its hinge update, the frozen
targets (LPIPS, the L_sp reference and its latent variance, the VF encoder), the loss terms, the plain copy
that is validated and exported, and the per-channel moments of a tokenizer's latents over the training
data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from aligntok import distributed
from aligntok.checkpoint import module_state
from aligntok.data import build_dataset
from aligntok.data.latents import ChannelMoments
from aligntok.data.shards import ShardDataset
from aligntok.files import make_grid, save_image, to_uint8
from aligntok.losses import (
    PerceptualLoss,
    VFLoss,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    semantic_preservation_loss,
)
from aligntok.metrics.reconstruction import psnr
from aligntok.models.discriminator import PatchDiscriminator
from aligntok.models.encoders import build_encoder
from aligntok.models.tokenizer import Tokenizer
from aligntok.parallelize import full_grad_norm, full_state, parallelize, resolve_mode
from aligntok.train.common import EMA, SpikeGuard, last_good, seed_everything
from aligntok.train.frozen import FrozenOutputs, compute_frozen, worth_caching
from aligntok.train.tokenizer_config import GROUPS, StageConfig, TokenizerTrainConfig


class Autoencoder(nn.Module):
    """What the generator's optimizer trains, run as ONE module call per step so that DDP/FSDP2 hooks see
    it: images (+ posterior noise) -> latent, reconstruction, and the VF terms (VA-VAE's projection trains).
    """

    def __init__(self, tokenizer: Tokenizer, vf: VFLoss | None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.vf = vf

    def forward(
        self, images: Tensor, noise: Tensor | None, frozen: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """`frozen`: this batch's `Stage.frozen` outputs, where kept ("features" of a frozen encoder,
        "adapter" of a frozen encoder + adapter, "vf" the VF target); the rest is computed here."""
        frozen = frozen or {}
        tok = self.tokenizer
        raw = frozen.get("adapter")
        if raw is None:
            feats = frozen["features"] if "features" in frozen else tok.features(images)
            raw = tok.adapter(feats)
        out: dict[str, Tensor] = {}
        if tok.config.posterior == "gaussian":
            mean, logvar = tok.posterior(raw)
            z = mean + noise * (0.5 * logvar).exp()
            out["mean"], out["logvar"] = mean, logvar
        else:
            z = raw
        out["z"], out["recon"] = z, tok.decode(z)
        if self.vf is not None:
            out["vf_cos"], out["vf_dm"] = self.vf(z.float(), images, frozen.get("vf"))
        return out


@dataclass
class Stage:
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
    sp_variance: Tensor | None = None  # (C,) per-channel variance of the reference latents ("l2_norm")
    frozen: dict[str, FrozenOutputs] = field(default_factory=dict)  # `keep_frozen_outputs`

    def frozen_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The kept frozen outputs of a training batch's items (by their dataset `index`)."""
        return {name: values[batch["index"]] for name, values in self.frozen.items()}

    def tensors(self) -> dict[str, dict]:
        """What a checkpoint of this stage holds."""
        parts = {"autoencoder": module_state(self.autoencoder, self.opt)}
        if self.disc is not None:
            parts["disc"] = module_state(self.disc, self.opt_d)
        if self.ema is not None:
            parts["ema"] = self.ema.shadow
        return parts


def build_stage(
    cfg: TokenizerTrainConfig,
    stage: StageConfig,
    initial: Callable[[], Tokenizer],
    reference: Callable[[], Tokenizer],
) -> Stage:
    """The modules of `stage`, built after seeding in a fixed order: the tokenizer from `initial()`, ...,
    and last the frozen stage-1 tokenizer of L_sp from `reference()` when the stage has an L_sp; with
    sp_kind="l2_norm", then its latents' per-channel variance over `cfg.sp_stats_batches` batches of the
    training data (no random number drawn; a collective under torchrun)."""
    device = distributed.device()
    seed_everything(cfg.seed)
    tokenizer = initial().to(device)
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
    parts = Stage(
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
        reference=reference().to(device) if stage.sp_weight > 0 else None,
        generator=torch.Generator(device).manual_seed(cfg.seed * 7919),
    )
    if parts.reference is not None and stage.sp_kind == "l2_norm":
        _, std = channel_moments(parts.reference, cfg, cfg.sp_stats_batches).mean_std()
        parts.sp_variance = std.square().float().to(device)
    return parts


def keep_frozen_outputs(parts: Stage, cfg: TokenizerTrainConfig, dataset: Dataset, images_read: int) -> None:
    """Compute once what this stage's frozen networks output for every image of `dataset` (the training
    split; `aligntok.train.frozen`: where it pays and fits) and keep it in `parts.frozen`: the frozen front of
    the encode path (the encoder's features in stage 1; encoder + adapter in stage 3), the L_sp reference's
    z_ref, the VF loss's target features. Call it with the stage's weights final (after a resume has loaded
    them)."""
    stage, tok, world = parts.config, parts.tokenizer, distributed.world()
    mode = resolve_mode(cfg.parallel.mode, world.world_size, process_group=torch.distributed.is_initialized())
    if not worth_caching(dataset, images_read, sharded=mode == "fsdp"):
        return
    fns: dict[str, Callable[[Tensor], Tensor]] = {}
    if "encoder" not in stage.train:
        if "adapter" in stage.train:
            fns["features"] = tok.features
        else:
            fns["adapter"] = lambda images: tok.adapter(tok.features(images))
    if parts.autoencoder.vf is not None:
        fns["vf"] = parts.autoencoder.vf.encoder.features
    if parts.reference is not None:
        fns["z_ref"] = parts.reference.encode
    training = tok.training
    tok.eval()
    for name, fn in fns.items():
        values = compute_frozen(fn, dataset, bf16=cfg.bf16, desc=f"stage {stage.name}: frozen {name}")
        if values is not None:
            parts.frozen[name] = values
    tok.train(training)


def posterior_noise(parts: Stage, cfg: TokenizerTrainConfig) -> Tensor | None:
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


def stage_losses(
    parts: Stage,
    cfg: TokenizerTrainConfig,
    images: Tensor,
    noise: Tensor | None,
    *,
    gan_on: bool,
    frozen: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The generator's total loss, the reconstruction (its GAN-free part) and every term on its own;
    `frozen`: the batch's kept frozen outputs (`Stage.frozen_batch`)."""
    stage = parts.config
    frozen = frozen or {}
    losses: dict[str, Tensor] = {}
    with distributed.autocast(cfg.bf16):
        outputs = parts.train_ae(images, noise, {k: v for k, v in frozen.items() if k != "z_ref"})
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
            z_ref = frozen.get("z_ref")
            if z_ref is None:
                with torch.no_grad():
                    z_ref = parts.reference.encode(images)
            losses["sp"] = semantic_preservation_loss(
                z.float(), z_ref.float(), kind=stage.sp_kind, variance=parts.sp_variance
            )
        if "vf_cos" in outputs:
            losses["vf_cos"], losses["vf_dm"] = outputs["vf_cos"], outputs["vf_dm"]
    rec = stage.l1_weight * losses["l1"] + stage.lpips_weight * losses.get("lpips", 0.0)
    total = rec + stage.sp_weight * losses.get("sp", 0.0) + stage.kl_weight * losses.get("kl", 0.0)
    vf = losses.get("vf_cos", 0.0) + losses.get("vf_dm", 0.0)
    if stage.vf_weight_mode == "adaptive" and "vf_cos" in losses:
        # VA-VAE's rule, at the layer that outputs the latent (root FSDP2 group: unsharded, as below).
        weight = adaptive_weight(rec, vf, parts.tokenizer.adapter.last_layer, base=stage.vf_weight)
        losses["vf_weight"] = weight
        total = total + weight * vf
    else:
        total = total + stage.vf_weight * vf
    if gan_on:
        assert parts.train_disc is not None
        # D's parameters get gradients here too (one code path for every parallel mode: a frozen flag would
        # not reach FSDP2's unsharded copies); they are cleared before D's own step.
        with distributed.autocast(cfg.bf16):
            losses["g"] = generator_loss(parts.train_disc(recon).float())
        # Under FSDP2 the root group (decoder.conv_out is in it) stays unsharded from forward to backward,
        # so this is the very parameter the graph used.
        weight = adaptive_weight(rec, losses["g"], parts.tokenizer.decoder.last_layer, base=stage.gan_weight)
        losses["gan_weight"] = weight
        total = total + weight * losses["g"]
    return total, recon, losses


def optimizer_step(
    parts: Stage, cfg: TokenizerTrainConfig, guard: SpikeGuard, total: Tensor, *, step: int, ckpt_dir: Path
) -> tuple[float, Tensor, bool]:
    """Backward, clipping, and the generator's optimizer and EMA step, unless the global batch's loss or the
    gradient is non-finite: then the step is skipped (the caller skips the discriminator too) and counted,
    and too many in a row stop the run. Returns (loss, grad norm, skipped); every rank decides alike."""
    parts.opt.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = full_grad_norm(torch.nn.utils.clip_grad_norm_(parts.trained, cfg.grad_clip))
    loss_value = distributed.all_reduce_mean(total).item()  # the global batch's: one decision for all
    if guard.is_bad(loss_value, grad_norm.item()):
        if guard.exhausted:
            raise RuntimeError(
                f"stage {parts.config.name}: loss {loss_value} or its gradient is non-finite at step {step} "
                f"({guard.skips} steps in a row); {last_good(ckpt_dir)}: resume it with a lower lr or "
                "bf16=false"
            )
        parts.opt.zero_grad(set_to_none=True)
        return loss_value, grad_norm, True
    parts.opt.step()
    if parts.ema is not None:
        parts.ema.update(parts.tokenizer, step)
    return loss_value, grad_norm, False


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


def gathered_copy(tokenizer: Tokenizer, ema: EMA | None) -> Tokenizer | None:
    """On rank 0, a plain (unsharded, unwrapped) copy of the tokenizer with the EMA weights where a stage
    keeps them; None elsewhere. A collective under FSDP: every rank calls it."""
    state = full_state(ema.state_dict() if ema is not None else tokenizer.state_dict())
    if not distributed.world().is_main:
        return None
    copy = Tokenizer(tokenizer.export_config())  # no weights folder read
    copy.load_state_dict(state)
    return copy.to(distributed.device())


@torch.no_grad()
def validate(model: Tokenizer, images: Tensor, path: Path) -> float:
    """PSNR on the fixed validation batch, and a grid of originals over reconstructions."""
    model.eval()
    recon = model.decode(model.encode(images)).clamp(0, 1)
    grid = make_grid(to_uint8(torch.cat([images, recon])), nrow=len(images))
    save_image(grid, path, scale=max(1, 128 // images.shape[-1]))
    return psnr(recon, images).mean().item()  # clamped; +inf only for a perfect reconstruction


@torch.no_grad()
def channel_moments(tokenizer: Tokenizer, cfg: TokenizerTrainConfig, batches: int | None) -> ChannelMoments:
    """Per-channel moments of `tokenizer`'s latents of the training data (float64 accumulation): `batches`
    batches of 64 images spread evenly over the data (all of it for None; the first images of a shard
    folder, which has no random access). Under torchrun rank r encodes batches r, r + world, ... (shards r,
    r + world, ... of a shard folder) and the moments are summed: a collective. No random number is drawn
    (the loader has its own generator), so calling it leaves a run's RNG streams as they were."""
    world = distributed.world()
    device = next(tokenizer.parameters()).device
    tokenizer.eval()
    dataset = build_dataset(cfg.data, split="train", resolution=cfg.model.image_size)
    limit = len(dataset) if batches is None else min(len(dataset), 64 * batches)
    if isinstance(dataset, ShardDataset):  # streamed: this rank's shards, its share of `limit` images
        part = dataset.subset(list(range(world.rank, dataset.num_shards, world.world_size)))
        cap = -(-limit // world.world_size)
    else:
        picked = [j * len(dataset) // limit for j in range(limit)]  # range(limit) when all are used
        mine = [
            picked[i]
            for b in range(world.rank, -(-limit // 64), world.world_size)
            for i in range(64 * b, min(64 * b + 64, limit))
        ]
        part, cap = Subset(dataset, mine), len(mine)
    moments = ChannelMoments(tokenizer.config.latent_channels)
    seen = 0
    loader = DataLoader(part, batch_size=64, num_workers=cfg.num_workers, generator=torch.Generator())
    for batch in loader:
        images = batch["image"][: cap - seen]
        if not len(images):
            break
        seen += len(images)
        with distributed.autocast(cfg.bf16):
            moments.update(tokenizer.encode(images.to(device)))
    moments.all_reduce()
    return moments
