"""DiT training on CUDA: FSDP2 + bf16 checked against one fp32 device, then throughput (images/s) and MFU.

    torchrun --standalone --nproc-per-node N benchmarks/dit_throughput.py [--check] [--rows XL/1:fsdp ...]

Run by benchmarks/gpu_check.sh. Every row times the training loop's own step (aligntok.train.dit:
`parallelize`, `draw_step_noise`, `flow_matching_loss`, clipping, AdamW, EMA) on synthetic latents of the
paper's shape (32 x 16 x 16: f16d32 at 256 px, 256 tokens at patch 1), after warm-up steps.
FLOPs per image are counted once by torch.utils.flop_counter (forward + backward of one unwrapped model);
MFU = FLOPs per image x images/s / (GPUs x the GPU's dense bf16 peak, or $PEAK_TFLOPS).
A row is "<DiT preset>:<none|ddp|fsdp>[+ac][+compile]". Writes JSON (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from aligntok import distributed
from aligntok.parallelize import ParallelConfig, full_state, parallelize
from aligntok.train.common import EMA
from aligntok.train.dit import DiTTrainConfig, build_dit, draw_step_noise, flow_matching_loss

LATENT = (32, 16, 16)
NUM_CLASSES = 1000
# Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_flops(name: str) -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def step_fn(cfg: DiTTrainConfig, model, train_model, opt, ema, gen, world):
    """One training step as train_dit takes it, on this rank's slice of a synthetic global batch."""
    device = world.device
    shape = (cfg.batch_size, *LATENT)

    def step() -> float:
        z0 = torch.randn(shape, device=device).chunk(world.world_size)[world.rank]
        y = torch.randint(0, NUM_CLASSES, (cfg.batch_size,), device=device).chunk(world.world_size)[
            world.rank
        ]
        noise = tuple(a.chunk(world.world_size)[world.rank] for a in draw_step_noise(gen, cfg, shape, device))
        loss = flow_matching_loss(train_model, z0, y, noise, cfg, null_class=NUM_CLASSES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model)
        return loss.detach()

    return step


def check(world, size: str = "B/2", batch_per_rank: int = 8) -> dict:
    """Gradients of one step: FSDP2 fp32 must equal one unwrapped fp32 model (TF32 off); FSDP2 + bf16
    (MixedPrecisionPolicy + autocast) must stay within bf16 error of it."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device, n = world.device, batch_per_rank * world.world_size
    torch.manual_seed(0)
    ref = build_dit(DiTTrainConfig(model=size), latent_shape=list(LATENT), num_classes=NUM_CLASSES).to(device)
    torch.nn.init.normal_(ref.final_layer.linear.weight, std=0.02)  # a non-zero output and gradients
    g = torch.Generator(device).manual_seed(1)
    z0 = torch.randn((n, *LATENT), generator=g, device=device)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g, device=device)
    result: dict = {"model": size, "global_batch": n}
    grads = {}
    for name, bf16, mode in (
        ("fp32_one_device", False, "none"),
        ("fp32_fsdp", False, "fsdp"),
        ("bf16_fsdp", True, "fsdp"),
    ):
        cfg = DiTTrainConfig(model=size, bf16=bf16, batch_size=n, parallel=ParallelConfig(mode=mode))
        model = copy.deepcopy(ref)
        sl = (
            slice(None)
            if mode == "none"
            else slice(world.rank * batch_per_rank, (world.rank + 1) * batch_per_rank)
        )
        train_model = model if mode == "none" else parallelize(model, cfg.parallel, bf16=bf16)
        noise = draw_step_noise(torch.Generator(device).manual_seed(2), cfg, tuple(z0.shape), device)
        loss = flow_matching_loss(
            train_model, z0[sl], y[sl], tuple(a[sl] for a in noise), cfg, null_class=NUM_CLASSES
        )
        loss.backward()
        loss = distributed.all_reduce_mean(loss) if mode != "none" else loss
        grads[name] = torch.cat(
            [
                v.flatten().float()
                for v in full_state({k: p.grad for k, p in model.named_parameters()}).values()
            ]
        )
        result[f"loss_{name}"] = loss.item()
    base = grads["fp32_one_device"]
    for name in ("fp32_fsdp", "bf16_fsdp"):
        result[f"grad_rel_err_{name}"] = ((grads[name] - base).norm() / base.norm()).item()
    result["ok"] = result["grad_rel_err_fp32_fsdp"] < 1e-5 and result["grad_rel_err_bf16_fsdp"] < 5e-2
    return result


def measure(row: str, world, *, batch_per_rank: int, steps: int, warmup: int) -> dict:
    size, _, flags = row.partition(":")
    mode, *extras = flags.split("+")
    par = ParallelConfig(mode=mode, activation_checkpointing="ac" in extras, compile="compile" in extras)
    cfg = DiTTrainConfig(
        model=size, qk_norm=True, bf16=True, batch_size=batch_per_rank * world.world_size, parallel=par
    )
    torch.manual_seed(0)
    model = build_dit(cfg, latent_shape=list(LATENT), num_classes=NUM_CLASSES).to(world.device)
    params = sum(p.numel() for p in model.parameters())
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        x, t = torch.randn(2, *LATENT, device=world.device), torch.rand(2, device=world.device)
        model(x, t, torch.zeros(2, dtype=torch.long, device=world.device)).float().square().mean().backward()
    flops_per_image = counter.get_total_flops() / 2
    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    train_model = parallelize(model, cfg.parallel, bf16=cfg.bf16)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    step = step_fn(cfg, model, train_model, opt, ema, torch.Generator(world.device).manual_seed(0), world)
    t0 = time.time()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    t0 = time.time()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.time() - t0
    images_per_s = cfg.batch_size * steps / elapsed
    peak = peak_flops(torch.cuda.get_device_name())
    return {
        "row": row,
        "params": params,
        "batch_per_gpu": batch_per_rank,
        "gpus": world.world_size,
        "images_per_s": images_per_s,
        "step_s": elapsed / steps,
        "warmup_s": warm_s,
        "tflops_per_image": flops_per_image / 1e12,
        "mfu": flops_per_image * images_per_s / (peak * world.world_size) if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="first check FSDP2 (+ bf16) gradients")
    parser.add_argument(
        "--rows", nargs="*", default=["B/1:fsdp", "B/1:fsdp+compile", "XL/1:fsdp", "XL/1:fsdp+ac", "XL/1:ddp"]
    )
    parser.add_argument("--batch", type=int, default=64, help="images per GPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    world = distributed.init()
    if world.device.type != "cuda":
        raise SystemExit("dit_throughput.py measures CUDA training; this machine has no CUDA device")
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "gpus": world.world_size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if args.check:
        result["check"] = check(world)
        distributed.print0(json.dumps(result["check"], indent=2))
    result["rows"] = []
    for row in args.rows:
        try:
            result["rows"].append(
                measure(row, world, batch_per_rank=args.batch, steps=args.steps, warmup=args.warmup)
            )
        except Exception as e:  # one failing row (e.g. torch.compile on this stack) must not hide the others
            result["rows"].append({"row": row, "error": f"{type(e).__name__}: {e}"[:2000]})
        torch.cuda.empty_cache()
    if world.is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"\n{result['device']} x {world.world_size}, torch {result['torch']}, "
            f"batch {args.batch} per GPU, bf16"
        )
        print("row                | params      | images/s | step s | TFLOP/img | MFU    | peak GiB")
        for r in result["rows"]:
            if "error" in r:
                print(f"{r['row']:18s} | failed: {r['error'][:200]}")
                continue
            mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "     -"
            print(
                f"{r['row']:18s} | {r['params']:11,d} | {r['images_per_s']:8.1f} | {r['step_s']:6.3f} | "
                f"{r['tflops_per_image']:9.3f} | {mfu} | {r['peak_mem_gib']:8.1f}"
            )
        print(f"written to {args.out}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
