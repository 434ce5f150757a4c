"""`aligntok sample`: DiT export + its tokenizer -> images (PNGs, a grid, an ADM-format .npz)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from aligntok import distributed, flow, sampling
from aligntok.assets import atomic_file
from aligntok.checkpoint import export_hash
from aligntok.data.latents import check_tokenizer
from aligntok.report import make_grid, save_image, save_npz, to_uint8, write_json
from aligntok.train.dit import TrainedDiT, load_dit

SAMPLERS = {"euler": sampling.euler, "heun": sampling.heun, "sde": sampling.euler_maruyama}


@torch.no_grad()
def sample_latents(
    dit: TrainedDiT,
    labels: torch.Tensor,
    *,
    steps: int,
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    sampler: Literal["euler", "heun", "sde"] = "euler",
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    bf16: bool = False,
    guide: TrainedDiT | None = None,
) -> torch.Tensor:
    """Raw (de-normalised) latents for `labels`; guidance is classifier-free, or autoguidance with `guide`."""
    device = next(dit.model.parameters()).device
    c, h, w = dit.model.config.in_channels, dit.model.config.input_size, dit.model.config.input_size
    z1 = torch.randn((len(labels), c, h, w), generator=generator, device=device)
    null = torch.full_like(labels, dit.model.config.num_classes)

    def model_fn(net: torch.nn.Module):
        def fn(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with distributed.autocast(bf16):
                return net(z, t, y).float()

        return fn

    if guide is not None:
        main_fn, guide_fn = model_fn(dit.model), model_fn(guide.model)
        v_fn = sampling.autoguidance_velocity(
            lambda z, t: main_fn(z, t, labels),
            lambda z, t: guide_fn(z, t, labels),
            scale=cfg_scale,
            interval=interval,
        )
    elif cfg_scale != 1.0:
        v_fn = sampling.cfg_velocity(
            model_fn(dit.model), cond=labels, null_cond=null, scale=cfg_scale, interval=interval
        )
    else:
        fn = model_fn(dit.model)
        v_fn = lambda z, t: fn(z, t, labels)  # noqa: E731
    ts = flow.timesteps(steps, shift=shift).to(device)
    kwargs = {"generator": generator} if sampler == "sde" else {}
    z0 = SAMPLERS[sampler](v_fn, z1, ts, **kwargs)
    return z0 * dit.std.to(device).view(1, -1, 1, 1) + dit.mean.to(device).view(1, -1, 1, 1)


def _partial_dir(out: Path, record: dict, world: distributed.World) -> Path:
    """`out/partial`: the batches an interrupted run of the same settings finished (emptied otherwise)."""
    partial = out / "partial"
    if world.is_main:
        try:
            same = json.loads((partial / "settings.json").read_text()) == record
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(partial, ignore_errors=True)
            write_json(record, partial / "settings.json")
    distributed.barrier()
    return partial


@torch.no_grad()
def generate(
    *,
    dit_dir: str | Path,
    num: int,
    out: str | Path,
    steps: int = 30,
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    class_id: int | None = None,
    tokenizer_dir: str | Path | None = None,
    sampler: Literal["euler", "heun", "sde"] = "euler",
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    bf16: bool = False,
    save_pngs: bool = True,
    guide_dir: str | Path | None = None,
) -> Path:
    """Sample `num` images (class-balanced unless `class_id`) and write them under `out`."""
    from aligntok.models.tokenizer import Tokenizer

    world = distributed.init()
    out = Path(out)
    dit = load_dit(dit_dir, map_location=world.device)
    tokenizer_dir = Path(tokenizer_dir or dit.tokenizer_path)
    check_tokenizer(dit.tokenizer_hash, tokenizer_dir, what=f"DiT {dit_dir}", encoded_by=dit.tokenizer_path)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir).to(world.device).eval()
    guide = load_dit(guide_dir, map_location=world.device) if guide_dir else None
    if guide is not None and guide.tokenizer_hash != dit.tokenizer_hash:
        raise ValueError(
            f"--guide {guide_dir} was trained on another tokenizer's latents than --dit {dit_dir}"
        )
    num_classes = dit.model.config.num_classes
    if class_id is not None and not 0 <= class_id < num_classes:
        raise ValueError(f"--class {class_id} is out of range: this DiT has classes 0..{num_classes - 1}")
    gen = torch.Generator().manual_seed(seed)
    labels = (
        torch.full((num,), class_id, dtype=torch.long)
        if class_id is not None
        else sampling.balanced_labels(num, num_classes, generator=gen)
    )
    record = {  # sampling.json: what these samples are
        "dit": str(Path(dit_dir).resolve()),
        "dit_hash": export_hash(dit_dir),  # which weights: a retrained run at the same path differs
        "tokenizer": str(tokenizer_dir.resolve()),
        "num": num,
        "steps": steps,
        "cfg": cfg_scale,
        "interval": list(interval),
        "sampler": sampler,
        "shift": shift,
        "seed": seed,
        "class": class_id,
        "guide": str(guide_dir) if guide_dir else None,
        "guide_hash": export_hash(guide_dir) if guide_dir else None,
        "batch_size": batch_size,
        "bf16": bf16,
    }
    partial = _partial_dir(out, record, world)
    # Batch b draws its noise from seed + b: results do not depend on how batches are spread over ranks, nor
    # on whether a batch was sampled before an interruption (its images are kept in `partial`).
    batches = list(torch.arange(num).split(batch_size))
    mine = range(world.rank, len(batches), world.world_size)
    images, kept = [], []
    for b in tqdm(mine, desc="sampling", disable=not world.is_main):
        idx, done = batches[b], partial / f"batch-{b:06d}.npy"
        if done.is_file():
            images.append(np.load(done))
            kept.append(idx)
            continue
        g = torch.Generator(world.device).manual_seed(seed * 1_000_003 + b)
        z = sample_latents(
            dit,
            labels[idx].to(world.device),
            steps=steps,
            cfg_scale=cfg_scale,
            interval=interval,
            sampler=sampler,
            shift=shift,
            generator=g,
            bf16=bf16,
            guide=guide,
        )
        images.append(to_uint8(tokenizer.decode(z)))
        kept.append(idx)
        with atomic_file(done) as tmp, tmp.open("wb") as f:
            np.save(f, images[-1])
    if world.world_size > 1:
        gathered: list = [None] * world.world_size
        torch.distributed.all_gather_object(gathered, (images, kept))
        images = [a for part in gathered for a in part[0]]
        kept = [a for part in gathered for a in part[1]]
    if not world.is_main:
        return out
    order = torch.cat(kept).argsort()
    arr = np.concatenate(images)[order.numpy()]
    if save_pngs:
        for i, img in enumerate(arr):
            save_image(img, out / "images" / f"{i:06d}.png")
    save_image(make_grid(arr[: min(len(arr), 64)]), out / "grid.png", scale=2)
    save_npz(arr, out / "samples.npz", labels=labels.numpy())
    write_json(record, out / "sampling.json")
    shutil.rmtree(partial)
    print(f"{num} samples written to {out} (grid.png, samples.npz{', images/' if save_pngs else ''})")
    return out
