"""Memory per GPU of the two big training jobs, from parameter counts and MEASURED activation bytes.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/memory_estimate.py    # ~2 min, ~6 GB RAM, CPU only

Jobs: the `paper` DiT recipe (LightningDiT-XL/1 on 32 x 16 x 16 latents, global batch 1024) and the `paper`
tokenizer's stage 2 (DINOv2-L/14 fine-tuned + adapter + decoder, discriminator, frozen stage-1 reference and
VGG LPIPS; global batch 256). Per GPU, sharded over N GPUs by FSDP2 (docs/scaling.md has the reasoning):

    trained state = P x (4 fp32 weights + 4 fp32 grads + 8 AdamW moments [+ 4 EMA]) / N
    frozen        = P_frozen x 4 (fp32, replicated on every GPU, never sharded)
    activations   = A x (global batch / N), A = bytes autograd saves for backward per image

A is measured here: forwards at batch 1 and 3 under CPU bf16 autocast, summing the distinct storages that
autograd saves (saved-tensor hooks), parameters left out; A is the difference over 2 (what grows with the
batch: the bf16 weight copies autocast saves are per step, not per image). GPU kernels may save other
tensors than the CPU ones (e.g. flash attention keeps only a log-sum-exp). Left out: all-gathered block
weights (two bf16 blocks in flight), allocator fragmentation, the CUDA context (~0.5-1 GB), temporaries of
the backward. Treat the totals as estimates, and gpu_check.sh's measured peak as the truth.
With activation checkpointing (DiT only) a block keeps just its fp32 input, and one block's activations
live at a time during the backward: A_ac = depth x tokens x width x 4 + A / depth (arithmetic, not measured).
Writes benchmarks/results/memory_estimate.json and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn

from aligntok.models.discriminator import PatchDiscriminator
from aligntok.models.dit import DiT, dit_preset
from aligntok.models.lpips import LPIPS
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.dit import dit_train_recipe
from aligntok.recipes.tokenizer import tokenizer_train_recipe

GIB = 2**30
GPUS = (1, 8, 64)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def saved_bytes_per_image(run, modules: list[nn.Module]) -> int:
    """Bytes autograd saves for backward per image during `run(batch)` under bf16 autocast (see above)."""
    weights = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}

    def saved(batch: int) -> int:
        seen: dict[int, int] = {}
        alive = []  # every saved tensor outlives the measurement: no address is reused by another storage

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
                alive.append(t)
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, torch.autocast("cpu", torch.bfloat16):
            run(batch)
        return sum(seen.values())

    return (saved(3) - saved(1)) // 2


def dit_job() -> dict:
    recipe = dit_train_recipe("paper")
    cfg = dit_preset(recipe.model, in_channels=32, input_size=16, num_classes=1000, qk_norm=recipe.qk_norm)
    torch.manual_seed(0)
    model = DiT(cfg)

    def run(b: int) -> None:
        x, t, y = torch.randn(b, 32, 16, 16), torch.rand(b), torch.randint(0, 1000, (b,))
        model(x, t, y).float().square().mean()  # the velocity loss's shape of work

    act = saved_bytes_per_image(run, [model])
    tokens = cfg.grid_size**2
    return {
        "job": "DiT-XL/1 (paper recipe), 256 px: 32x16x16 latents",
        "trained_params": count(model),
        "ema": True,
        "frozen_params": 0,
        "activation_bytes_per_image": act,
        "activation_bytes_per_image_ac": cfg.depth * tokens * cfg.hidden_size * 4 + act // cfg.depth,
        "global_batch": recipe.batch_size,
    }


def tokenizer_stage2_job() -> dict:
    recipe = tokenizer_train_recipe("paper")
    model_cfg = recipe.model
    model_cfg = dataclasses.replace(
        model_cfg, encoder=dataclasses.replace(model_cfg.encoder, pretrained=False)
    )
    torch.manual_seed(0)
    tokenizer = Tokenizer(model_cfg)
    disc = PatchDiscriminator(recipe.disc)
    lpips = LPIPS(recipe.lpips_net).requires_grad_(False)  # architecture only; the weights do not matter
    reference = Tokenizer(model_cfg).requires_grad_(False)  # the frozen stage-1 tokenizer (L_sp target)
    stage = recipe.stages[1]
    trained_params = sum(p.numel() for g in stage.train for p in tokenizer.param_groups()[g])
    s = model_cfg.image_size

    def run(b: int) -> None:  # the forward passes of one stage-2 step (train/tokenizer.py)
        images = torch.rand(b, 3, s, s)
        recon, z = tokenizer(images)
        with torch.no_grad():
            z_ref = reference.encode(images)
        (recon.float() - images).abs().mean() + lpips(recon.float(), images).mean()
        (z.float() - z_ref.float()).square().mean()
        disc(recon).float().mean()
        disc(torch.cat([images, recon.detach()])).float().mean()

    return {
        "job": "paper tokenizer, stage 2 (DINOv2-L/14 + adapter + decoder trained), 256 px",
        "trained_params": trained_params,
        "disc_params": count(disc),
        "ema": stage.ema_decay is not None,
        "frozen_params": count(reference) + count(lpips),
        "activation_bytes_per_image": saved_bytes_per_image(run, [tokenizer, disc, lpips, reference]),
        "global_batch": recipe.batch_size,
    }


def per_gpu(job: dict, gpus: int) -> dict:
    p = job["trained_params"] + job.get("disc_params", 0)
    ema = 4 * job["trained_params"] if job["ema"] else 0
    state = (16 * p + ema) / gpus
    frozen = 4 * job["frozen_params"]
    per_gpu_batch = job["global_batch"] // gpus
    act = job["activation_bytes_per_image"] * per_gpu_batch
    row = {
        "gpus": gpus,
        "per_gpu_batch": per_gpu_batch,
        "state_gib": state / GIB,
        "frozen_gib": frozen / GIB,
        "activations_gib": act / GIB,
        "total_gib": (state + frozen + act) / GIB,
    }
    if "activation_bytes_per_image_ac" in job:
        act_ac = job["activation_bytes_per_image_ac"] * per_gpu_batch
        row["total_gib_ac"] = (state + frozen + act_ac) / GIB
    return row


def main() -> None:
    torch.set_grad_enabled(True)
    t0 = time.time()
    jobs = [dit_job(), tokenizer_stage2_job()]
    for job in jobs:
        job["per_gpu"] = [per_gpu(job, n) for n in GPUS]
    out = Path(__file__).parent / "results" / "memory_estimate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"torch": torch.__version__, "wall_s": round(time.time() - t0, 1), "jobs": jobs}
    out.write_text(json.dumps(result, indent=2) + "\n")
    for job in jobs:
        mib = job["activation_bytes_per_image"] / 2**20
        disc = f" + discriminator {job['disc_params']:,}" if "disc_params" in job else ""
        print(f"\n{job['job']}")
        print(f"  trained params {job['trained_params']:,}{disc}; frozen {job['frozen_params']:,}")
        print(f"  activations {mib:.1f} MiB per image (bf16 autocast, measured)")
        print("  GPUs | batch/GPU | state GiB | frozen GiB | activations GiB | total GiB | total, AC")
        for r in job["per_gpu"]:
            ac = f"{r['total_gib_ac']:9.1f}" if "total_gib_ac" in r else "        -"
            cells = [f"{r['gpus']:4d}", f"{r['per_gpu_batch']:9d}", f"{r['state_gib']:9.1f}"]
            cells += [
                f"{r['frozen_gib']:10.1f}",
                f"{r['activations_gib']:15.1f}",
                f"{r['total_gib']:9.1f}",
                ac,
            ]
            print("  " + " | ".join(cells))
    print(f"\nwritten to {out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
