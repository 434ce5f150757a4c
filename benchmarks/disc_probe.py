"""Can a tokenizer run's GAN discriminator tell its reconstructions from real images at all?

    python benchmarks/disc_probe.py --run RUN --data fashion-mnist [--steps 800] [--images 2560]
                                    [--disc-lr 1e-4] [--norm group] [--json J]

During tokenizer training a hinge discriminator's loss d at 1.0 (chance, `log.jsonl`) means one of two
things: the discriminator cannot see the difference (too weak, too slow, a wrong input), or the generator,
pushed by the adaptive GAN weight, moves away from whatever it learns faster than it learns. This separates
the two: it trains a fresh discriminator, built as the run's `config.json` builds it (width, layers, norm,
lr, betas, grad clip, bf16; `--disc-lr` / `--norm` override), for `--steps` steps on `--images` training
images against the exported tokenizer's reconstructions, the tokenizer frozen (a generator that does not
fight back), and reports its hinge loss on the training batch and its accuracy on held-out pairs (the
sign of its mean patch logit, real > 0 > reconstruction) every `--every` steps. A discriminator that
separates frozen reconstructions within a few hundred steps but sits at chance in training is outrun by
the generator, not blind. Writes `--json` (default: `<run>/disc_probe.json`) and prints one line per report.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aligntok import distributed
from aligntok.config import load_json
from aligntok.data import build_dataset
from aligntok.exports import load_tokenizer
from aligntok.files import write_json
from aligntok.models.discriminator import PatchDiscriminator
from aligntok.train.tokenizer_config import TokenizerTrainConfig
from aligntok.train.tokenizer_stage import discriminator_optimizer, discriminator_step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="a tokenizer training run (config.json, export/)")
    parser.add_argument("--data", default=None, help="dataset (default: the run's)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--images", type=int, default=2560, help="training images, a fifth held out")
    parser.add_argument("--every", type=int, default=200, help="report every this many steps")
    parser.add_argument("--disc-lr", type=float, default=None, help="default: the run's disc_lr")
    parser.add_argument("--norm", choices=["group", "batch", "none"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    run = Path(args.run)
    cfg = load_json(TokenizerTrainConfig, run / "config.json")
    if args.disc_lr is not None:
        cfg = dataclasses.replace(cfg, disc_lr=args.disc_lr)
    if args.norm is not None:
        cfg = dataclasses.replace(cfg, disc=dataclasses.replace(cfg.disc, norm=args.norm))
    data = args.data or cfg.data
    real, recon = reconstructions(run / "export", data, args.images, seed=args.seed, bf16=cfg.bf16)
    t0 = time.time()
    reports = probe(cfg, real, recon, steps=args.steps, every=args.every, seed=args.seed)
    result = {
        "run": str(run.resolve()),
        "data": data,
        "images": args.images,
        "disc": dataclasses.asdict(cfg.disc),
        "disc_lr": cfg.disc_lr,
        "reports": reports,
        "wall_s": round(time.time() - t0, 1),
    }
    write_json(result, Path(args.json) if args.json else run / "disc_probe.json")


def reconstructions(export: Path, data: str, num: int, *, seed: int, bf16: bool) -> tuple[Tensor, Tensor]:
    """`num` seeded training images of `data` (N, 3, H, W) in [0, 1] and the tokenizer's reconstructions of
    them, unclamped and under the run's autocast as the discriminator sees them in training, on this
    process's device."""
    tok = load_tokenizer(export)
    dataset = build_dataset(data, split="train", resolution=tok.config.image_size)
    if num > len(dataset):
        raise ValueError(f"--images {num}: {data} has {len(dataset)} training images")
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num]
    real = torch.stack([dataset[int(i)]["image"] for i in pick]).to(distributed.device())
    with torch.no_grad(), distributed.autocast(bf16):
        recon = torch.cat([tok(chunk)[0].float() for chunk in real.split(256)])
    return real, recon


def probe(
    cfg: TokenizerTrainConfig, real: Tensor, recon: Tensor, *, steps: int, every: int, seed: int
) -> list[dict[str, Any]]:
    """Train a fresh discriminator of `cfg` on (real, recon) pairs, the last fifth held out; a report (step,
    hinge loss d of the last batch, held-out accuracy) every `every` steps."""
    held = len(real) // 5
    if held == 0 or len(real) - held < cfg.batch_size:
        raise ValueError(f"{len(real)} images: too few for batches of {cfg.batch_size} and a held-out fifth")
    torch.manual_seed(seed)
    disc = PatchDiscriminator(cfg.disc).to(real.device)
    opt = discriminator_optimizer(cfg, disc)
    gen = torch.Generator().manual_seed(seed)
    train = len(real) - held
    reports = []
    for step in range(1, steps + 1):
        pick = torch.randint(0, train, (cfg.batch_size,), generator=gen).to(real.device)
        loss = discriminator_step(cfg, disc, opt, real[pick], recon[pick])
        if step % every == 0 or step == steps:
            with torch.no_grad():
                right_real = (disc(real[train:]).mean((1, 2, 3)) > 0).float().mean()
                right_recon = (disc(recon[train:]).mean((1, 2, 3)) < 0).float().mean()
            accuracy = (right_real + right_recon).item() / 2
            reports.append({"step": step, "d": round(loss.item(), 4), "heldout_accuracy": round(accuracy, 4)})
            print(f"step {step}: d {loss.item():.3f}, held-out accuracy {accuracy:.3f}", flush=True)
    return reports


if __name__ == "__main__":
    main()
