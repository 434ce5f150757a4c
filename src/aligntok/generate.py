"""`aligntok sample`: DiT export + its tokenizer -> images (PNGs, a grid, an ADM-format .npz).

A class-conditional DiT draws class-balanced labels (or one `--class`); a text-conditioned one draws
`num` images for each prompt, encoded by the text encoder its captions were encoded with (checked by the
encoder's identity). The empty prompt is the unconditional model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from aligntok import distributed, flow, sampling
from aligntok.assets import atomic_file
from aligntok.checkpoint import export_hash
from aligntok.data.latents import check_tokenizer
from aligntok.exports import TrainedDiT, load_dit
from aligntok.files import make_grid, save_image, save_npz, to_uint8, write_json
from aligntok.models.text import build_text_encoder
from aligntok.models.tokenizer import Tokenizer
from aligntok.rundir import run_lock
from aligntok.sampling import SAMPLERS, SampleConfig

Condition = torch.Tensor | dict[str, torch.Tensor]  # class labels (B,), or text features (models/text.py)


def cond_rows(cond: Condition, idx: torch.Tensor | slice, device: torch.device | None = None) -> Condition:
    """Rows `idx` of a condition (labels or a dict of text features), optionally moved to `device`."""
    if isinstance(cond, torch.Tensor):
        return cond[idx].to(device)
    return {k: v[idx].to(device) for k, v in cond.items()}


def cond_len(cond: Condition) -> int:
    return len(cond) if isinstance(cond, torch.Tensor) else len(cond["null"])


def null_condition(dit: TrainedDiT, cond: Condition) -> Condition:
    """What classifier-free guidance contrasts `cond` with: the null class, or the learned null text."""
    if isinstance(cond, torch.Tensor):
        return torch.full_like(cond, dit.model.config.num_classes)
    return {**cond, "null": torch.ones_like(cond["null"])}


def encode_prompts(dit: TrainedDiT, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Text features of `prompts` from the encoder the DiT's captions were encoded with; another encoder
    (other weights or token limit) is refused, since the DiT only understands the features it learnt."""
    if dit.text is None:
        raise ValueError(
            "this DiT is class-conditional: sample it with --class or balanced labels, not prompts"
        )
    recorded = dit.text["identity"]
    encoder = build_text_encoder(dit.text["encoder"], max_length=recorded["max_length"])
    if encoder.identity() != recorded:
        raise ValueError(
            f"the text encoder {dit.text['encoder']!r} is not the one this DiT's captions were encoded with "
            f"(differs in: {', '.join(k for k in recorded if encoder.identity().get(k) != recorded[k])}); "
            "restore that encoder's files"
        )
    return {k: v.to(device) for k, v in encoder.encode(list(prompts)).items()}


@torch.no_grad()
def sample_latents(
    dit: TrainedDiT,
    cond: Condition,
    sample: SampleConfig,
    *,
    generator: torch.Generator | None = None,
    guide: TrainedDiT | None = None,
) -> torch.Tensor:
    """Raw (de-normalised) latents for the condition `cond` (class labels, or text features for a text DiT);
    guidance is classifier-free, or autoguidance with `guide`."""
    device = next(dit.model.parameters()).device
    c, h, w = dit.model.config.in_channels, dit.model.config.input_size, dit.model.config.input_size
    z1 = torch.randn((cond_len(cond), c, h, w), generator=generator, device=device)

    def model_fn(net: torch.nn.Module):
        def fn(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with distributed.autocast(sample.bf16):
                return net(z, t, y).float()

        return fn

    scale, interval = sample.cfg_scale, sample.interval
    if guide is not None:
        main_fn, guide_fn = model_fn(dit.model), model_fn(guide.model)
        v_fn = sampling.autoguidance_velocity(
            lambda z, t: main_fn(z, t, cond),
            lambda z, t: guide_fn(z, t, cond),
            scale=scale,
            interval=interval,
        )
    elif scale != 1.0:
        v_fn = sampling.cfg_velocity(
            model_fn(dit.model),
            cond=cond,
            null_cond=null_condition(dit, cond),
            scale=scale,
            interval=interval,
        )
    else:
        fn = model_fn(dit.model)
        v_fn = lambda z, t: fn(z, t, cond)  # noqa: E731
    ts = flow.timesteps(sample.steps, shift=sample.shift).to(device)
    kwargs = {"generator": generator} if sample.sampler == "sde" else {}
    z0 = SAMPLERS[sample.sampler](v_fn, z1, ts, **kwargs)
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


def _load_models(
    dit_dir: str | Path, tokenizer_dir: str | Path | None, guide_dir: str | Path | None, device: torch.device
) -> tuple[TrainedDiT, Tokenizer, Path, TrainedDiT | None]:
    """The DiT, the tokenizer whose latents it learnt (checked by hash) and the optional autoguidance DiT."""
    dit = load_dit(dit_dir, map_location=device)
    tokenizer_dir = Path(tokenizer_dir or dit.tokenizer_path)
    check_tokenizer(dit.tokenizer_hash, tokenizer_dir, what=f"DiT {dit_dir}", encoded_by=dit.tokenizer_path)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir).to(device).eval()
    guide = load_dit(guide_dir, map_location=device) if guide_dir else None
    if guide is not None and guide.tokenizer_hash != dit.tokenizer_hash:
        raise ValueError(
            f"--guide {guide_dir} was trained on another tokenizer's latents than --dit {dit_dir}"
        )
    return dit, tokenizer, tokenizer_dir, guide


def _sample_batches(
    dit: TrainedDiT,
    tokenizer: Tokenizer,
    guide: TrainedDiT | None,
    cond: Condition,
    sample: SampleConfig,
    *,
    batch_size: int,
    partial: Path,
    world: distributed.World,
) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """This rank's share of the batches as uint8 images, with the indices they hold.

    Batch b draws its noise from seed + b: results do not depend on how batches are spread over ranks, nor
    on whether a batch was sampled before an interruption (its images are kept in `partial`)."""
    batches = list(torch.arange(cond_len(cond)).split(batch_size))
    images, kept = [], []
    for b in tqdm(
        range(world.rank, len(batches), world.world_size), desc="sampling", disable=not world.is_main
    ):
        idx, done = batches[b], partial / f"batch-{b:06d}.npy"
        if done.is_file():
            images.append(np.load(done))
        else:
            g = torch.Generator(world.device).manual_seed(sample.seed * 1_000_003 + b)
            z = sample_latents(dit, cond_rows(cond, idx, world.device), sample, generator=g, guide=guide)
            images.append(to_uint8(tokenizer.decode(z)))
            with atomic_file(done) as tmp, tmp.open("wb") as f:
                np.save(f, images[-1])
        kept.append(idx)
    return images, kept


@torch.no_grad()
def generate(
    *,
    dit_dir: str | Path,
    num: int,
    out: str | Path,
    sample: SampleConfig | None = None,
    class_id: int | None = None,
    prompts: Sequence[str] | None = None,
    tokenizer_dir: str | Path | None = None,
    batch_size: int = 64,
    save_pngs: bool = True,
    guide_dir: str | Path | None = None,
) -> Path:
    """Sample with the settings `sample` and write the images under `out`: images/ (PNGs), grid.png,
    samples.npz (ADM format) and sampling.json. A class DiT draws `num` images, class-balanced unless
    `class_id` (the npz holds the labels); a text DiT draws `num` images for each of `prompts`, in prompt
    order (prompts.jsonl names each PNG's prompt)."""
    sample = sample or SampleConfig()
    if num < 1 or batch_size < 1:
        raise ValueError(f"--num ({num}) and --batch-size ({batch_size}) must be >= 1")
    world = distributed.init()
    dit, tokenizer, tokenizer_dir, guide = _load_models(dit_dir, tokenizer_dir, guide_dir, world.device)
    source = {  # which weights, by export hash: a retrained run at the same path differs
        "dit": str(Path(dit_dir).resolve()),
        "dit_hash": export_hash(dit_dir),
        "tokenizer": str(tokenizer_dir.resolve()),
        "guide": str(guide_dir) if guide_dir else None,
        "guide_hash": export_hash(guide_dir) if guide_dir else None,
    }
    cond, what = _conditions(dit, num=num, class_id=class_id, prompts=prompts, seed=sample.seed)
    with run_lock(out) as out:
        kw = {"sample": sample, "batch_size": batch_size, "save_pngs": save_pngs}
        return _generate(dit, tokenizer, guide, out, cond, record={**source, **what}, **kw)


def _conditions(
    dit: TrainedDiT, *, num: int, class_id: int | None, prompts: Sequence[str] | None, seed: int
) -> tuple[Condition, dict[str, Any]]:
    """The condition of every image to draw, and what sampling.json records of it."""
    if dit.text is not None:
        if prompts is None or not len(prompts):
            raise ValueError(
                "this DiT is text-conditioned: give --prompt TEXT (repeatable) or --prompts FILE"
            )
        if class_id is not None:
            raise ValueError("this DiT is text-conditioned: --class does not apply; give prompts")
        each = [p for p in prompts for _ in range(num)]
        return encode_prompts(dit, each, torch.device("cpu")), {"num": num, "prompts": list(prompts)}
    if prompts is not None:
        raise ValueError(
            "this DiT is class-conditional: --prompt does not apply; use --class or no condition"
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
    return labels, {"num": num, "class": class_id}


def _generate(
    dit: TrainedDiT,
    tokenizer: Tokenizer,
    guide: TrainedDiT | None,
    out: Path,
    cond: Condition,
    *,
    record: dict[str, Any],
    sample: SampleConfig,
    batch_size: int,
    save_pngs: bool,
) -> Path:
    world = distributed.world()
    record = {**record, **sample.record(), "batch_size": batch_size}
    partial = _partial_dir(out, record, world)
    kw = {"batch_size": batch_size, "partial": partial, "world": world}
    images, kept = _sample_batches(dit, tokenizer, guide, cond, sample, **kw)
    if world.world_size > 1:
        gathered: list = [None] * world.world_size
        torch.distributed.all_gather_object(gathered, (images, kept))
        images = [a for part in gathered for a in part[0]]
        kept = [a for part in gathered for a in part[1]]
    if not world.is_main:
        return out
    arr = np.concatenate(images)[torch.cat(kept).argsort().numpy()]
    shutil.rmtree(out / "images", ignore_errors=True)  # a folder of an earlier, larger --num keeps none of it
    if save_pngs:
        for i, img in enumerate(arr):
            save_image(img, out / "images" / f"{i:06d}.png")
    save_image(make_grid(arr[: min(len(arr), 64)]), out / "grid.png", scale=2)
    if isinstance(cond, torch.Tensor):
        save_npz(arr, out / "samples.npz", labels=cond.numpy())
    else:
        save_npz(arr, out / "samples.npz")
        each = [p for p in record["prompts"] for _ in range(record["num"])]
        lines = [json.dumps({"file": f"images/{i:06d}.png", "prompt": p}) for i, p in enumerate(each)]
        with atomic_file(out / "prompts.jsonl") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    write_json(record, out / "sampling.json")
    shutil.rmtree(partial)
    print(f"{len(arr)} samples written to {out} (grid.png, samples.npz{', images/' if save_pngs else ''})")
    return out
