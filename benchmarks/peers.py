"""aligntok against diffusers at equal configuration, on this machine: time ratios, FLOPs, peak memory.

    .venv/bin/pip install -e '.[peers]'     # diffusers: a benchmark-only extra, never aligntok's dependency
    python benchmarks/peers.py [--repeats 7] [--rows dit_step,mmdit_step,...] [--json PATH]

Rows, each in fp32 and in bf16 autocast, ours and the peer called alternately `--repeats` times after a
warm-up (drift on a shared machine then hits both alike); a ratio is ours / peer per repeat, min, median, max:
- `dit_step`: one training step (forward, flow-matching loss, backward, AdamW) of a class DiT of the demo's
  size (the `emoji` recipe's T/1 on emoji32's 8x8x8 latent: 64 tokens, batch 64) against diffusers'
  `DiTTransformer2DModel` at the same width, depth, heads, patch and tokens, ours built from the same parts
  as the peer (LayerNorm, GELU MLP, absolute positions, no RoPE): the ratio measures the implementation;
- `lightningdit_step`: the same step of the demo's own DiT (LightningDiT's RMSNorm, SwiGLU and RoPE) against
  the same peer: what those parts cost (FLOPs are counted for each);
- `mmdit_step`: the same for `t2i-emoji`'s MMDiT (2 double + 2 single blocks) against
  `SD3Transformer2DModel` with 4 joint blocks (SD3 has no single-stream block), on 32 text tokens of
  MiniLM's width;
- `attention`: forward + backward of one block's attention, our `attend` against the plain SDPA call of
  diffusers' attention processor (the same tensors);
- `sample`: seconds per image of 30 Euler steps with guidance 3 (two forwards a step) for a batch of 64, our
  sampler against a plain Euler loop over the diffusers DiT;
- `decode`, `encode`: the demo tokenizer (emoji32) against `AutoencoderKL` with the same decoder (widths,
  res blocks, attention at 8x8, 8 latent channels) and its mirrored CNN encoder, batch 64 at 32 px;
- `inception`: FID Inception features, images/s (ours only: diffusers has none).
FLOPs of one call are counted by torch.utils.flop_counter; this CPU's matmul throughput is measured in the
same run (a 1024^3 GEMM, fp32 and bf16) and each row reports its FLOP rate as a fraction of it; the GEMMs
of the DiT step's own shapes are timed too, the most its matmuls can reach here. Peak memory:
the process's resident high-water mark (Linux VmHWM, reset before each measurement) above the baseline.
Writes JSON (default benchmarks/results/peers-cpu.json) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from aligntok.files import write_json
from aligntok.models.dit import DiT, dit_preset
from aligntok.recipes.dit import dit_train_recipe
from aligntok.recipes.tokenizer import tokenizer_preset
from aligntok.train.dit import build_dit, draw_step_noise, flow_matching_loss
from reproduce import provenance

ROOT = Path(__file__).resolve().parents[1]
LATENT = (8, 8, 8)  # emoji32: 8 channels on an 8x8 grid
NUM_CLASSES = 9
BATCH = 64
# DiT's own parts (Peebles & Xie 2023), as diffusers' DiTTransformer2DModel builds them.
DIT_PARTS = {"use_rmsnorm": False, "use_swiglu": False, "use_rope": False, "use_abs_pos": True}
TEXT_LEN, TEXT_DIM = 32, 384  # MiniLM's width; the emoji captions fit in 32 tokens
SAMPLE_STEPS, GUIDANCE = 30, 3.0
INCEPTION_BATCH = 16  # 299 px inputs: a batch of 64 takes seconds


Pair = tuple[Callable[[], Any], Callable[[], Any] | None]  # ours, and the peer's (None: no peer)


def precision(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def _call_memory(row: str, bf16: bool, who: str, queue: multiprocessing.Queue) -> None:
    """In a fresh process: build the row's models and inputs, then one call of `who`'s; its resident peak
    above the resident size before the call (activations, gradients, optimizer state, workspaces)."""
    ours, peer = ROWS[row](bf16)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    (ours if who == "ours" else peer)()
    queue.put((_status_kib("VmHWM") - before) / 1024)


def peak_memory_mib(row: str, bf16: bool, who: str) -> float | None:
    """`_call_memory` in a spawned process (Linux only: None elsewhere)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_call_memory, args=(row, bf16, who, queue))
    child.start()
    value = queue.get()
    child.join()
    return value


def matmul_peak(bf16: bool, n: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of an n^3 GEMM in the given precision: the best of `repeats` after warm-up."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def step_gemm_rate(bf16: bool, repeats: int = 10) -> float:
    """FLOP/s of the DiT step's own GEMMs (the `dit_step` row's linear layers on BATCH x 64 tokens: qkv,
    projection, MLP in and out, forward shapes), the ceiling its matmuls can reach on this CPU."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    m, width = BATCH * LATENT[1] * LATENT[2], 256
    shapes = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]
    pairs = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for k, n in shapes]
    for a, b in pairs:
        a @ b
    best = min(_seconds(lambda: [a @ b for a, b in pairs]) for _ in range(repeats))
    return sum(2 * m * k * n for k, n in shapes) / best


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(ours: Callable[[], Any], peer: Callable[[], Any] | None, repeats: int, warmup: int) -> dict:
    """Seconds per call of `ours` and `peer`, alternated after `warmup` calls of each; ratios per repeat."""
    for _ in range(warmup):
        ours()
        if peer is not None:
            peer()
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    for _ in range(repeats):
        times["ours"].append(_seconds(ours))
        if peer is not None:
            times["peer"].append(_seconds(peer))
    out: dict[str, Any] = {k: _spread(v) for k, v in times.items() if v}
    if peer is not None:
        out["ratio"] = _spread([o / p for o, p in zip(times["ours"], times["peer"], strict=True)])
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# ---- models at equal configuration -------------------------------------------------------------------


def our_dit(text: bool, *, plain: bool = False) -> tuple[torch.nn.Module, Any]:
    """The demo's DiT (the `emoji` recipe's LightningDiT T/1) or the text one; with `plain`, the same size
    built from DiT's own parts (LayerNorm, GELU MLP, absolute positions only), the peer's architecture."""
    cfg = dit_train_recipe("t2i-emoji" if text else "emoji")
    torch.manual_seed(0)
    if plain:
        dit_cfg = dit_preset(
            cfg.model, in_channels=LATENT[0], input_size=LATENT[1], num_classes=NUM_CLASSES, **DIT_PARTS
        )
        return DiT(dit_cfg), cfg
    model = build_dit(cfg, latent_shape=list(LATENT), num_classes=NUM_CLASSES, text_dim=TEXT_DIM)
    return model, cfg


def peer_dit(text: bool) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel

    width, heads = 256, 4  # the "T" size of both our DiTs
    torch.manual_seed(0)
    if text:
        return SD3Transformer2DModel(
            sample_size=LATENT[1],
            patch_size=1,
            in_channels=LATENT[0],
            out_channels=LATENT[0],
            num_layers=4,
            attention_head_dim=width // heads,
            num_attention_heads=heads,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=width,
            pooled_projection_dim=TEXT_DIM,
            pos_embed_max_size=LATENT[1],
            qk_norm="rms_norm",
        )
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=LATENT[0],
        out_channels=LATENT[0],
        num_layers=4,
        sample_size=LATENT[1],
        patch_size=1,
        num_embeds_ada_norm=NUM_CLASSES + 1,
    )


def text_condition(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "tokens": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g),
        "mask": torch.ones(n, TEXT_LEN, dtype=torch.bool),
        "pooled": torch.randn(n, TEXT_DIM, generator=g),
        "null": torch.zeros(n, dtype=torch.bool),
    }


def peer_forward(
    model: torch.nn.Module, text: bool, x: torch.Tensor, t: torch.Tensor, cond: Any
) -> torch.Tensor:
    """The diffusers model's velocity for our (x, t in [0, 1], condition)."""
    if text:
        return model(
            hidden_states=x,
            encoder_hidden_states=cond["tokens"],
            pooled_projections=cond["pooled"],
            timestep=t * 1000,
        ).sample
    return model(x, timestep=t * 1000, class_labels=cond).sample


def step_pair(text: bool, bf16: bool, *, plain: bool = False) -> Pair:
    """One training step of ours and of the peer on the same batch."""
    ours, cfg = our_dit(text, plain=plain)
    cfg.bf16 = bf16
    peer = peer_dit(text)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(BATCH, *LATENT, generator=g)
    cond = text_condition(BATCH) if text else torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    noise = draw_step_noise(g, cfg, tuple(z0.shape), torch.device("cpu"))
    opts = [torch.optim.AdamW(m.parameters(), lr=cfg.lr, betas=cfg.betas) for m in (ours, peer)]

    def ours_step() -> None:
        loss = flow_matching_loss(ours, z0, cond, noise, cfg, null_class=NUM_CLASSES)
        opts[0].zero_grad(set_to_none=True)
        loss.backward()
        opts[0].step()

    def peer_step() -> None:
        _, t, eps = noise
        x = (1 - t.view(-1, 1, 1, 1)) * z0 + t.view(-1, 1, 1, 1) * eps
        with precision(bf16):
            pred = peer_forward(peer, text, x, t, cond)
        loss = F.mse_loss(pred.float(), eps - z0)
        opts[1].zero_grad(set_to_none=True)
        loss.backward()
        opts[1].step()

    return ours_step, peer_step


def sample_pair(bf16: bool) -> Pair:
    """30 guided Euler steps for a batch: our sampler against a plain loop over the diffusers DiT."""
    from aligntok.sampling import cfg_velocity, euler

    ours, _ = our_dit(False)
    peer = peer_dit(False)
    ours.eval()
    peer.eval()
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(BATCH, *LATENT, generator=g)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    ts = torch.linspace(1.0, 0.0, SAMPLE_STEPS + 1)

    @torch.no_grad()
    def ours_sample() -> None:
        with precision(bf16):
            v = cfg_velocity(
                lambda z, t, c: ours(z, t, c).float(), cond=y, null_cond=NUM_CLASSES, scale=GUIDANCE
            )
            euler(v, z1, ts)

    @torch.no_grad()
    def peer_sample() -> None:
        z, labels = z1, torch.cat([y, torch.full_like(y, NUM_CLASSES)])
        with precision(bf16):
            for t, t_next in itertools.pairwise(ts):
                v_c, v_u = (
                    peer_forward(peer, False, torch.cat([z, z]), t.expand(2 * BATCH), labels).float().chunk(2)
                )
                z = z + (t_next - t) * (v_u + GUIDANCE * (v_c - v_u))

    return ours_sample, peer_sample


def autoencoder_pair(direction: str, bf16: bool) -> Pair:
    """Decode (or encode) a batch with the demo tokenizer and with AutoencoderKL of the same decoder."""
    from diffusers import AutoencoderKL

    from aligntok.models.tokenizer import Tokenizer

    cfg = tokenizer_preset("emoji32")
    torch.manual_seed(0)
    ours = Tokenizer(cfg).eval()
    dec = cfg.decoder
    widths = [dec.ch * m for m in dec.ch_mult]
    up = [
        "AttnUpDecoderBlock2D" if 8 * 2**i in dec.attn_resolutions else "UpDecoderBlock2D"
        for i in range(len(widths))
    ]
    peer = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=tuple(up),
        block_out_channels=tuple(widths),
        layers_per_block=dec.num_res_blocks,
        latent_channels=cfg.latent_channels,
        norm_num_groups=32,
        sample_size=cfg.image_size,
    ).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(BATCH, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    latents = torch.randn(BATCH, *LATENT, generator=g)

    @torch.no_grad()
    def ours_call() -> None:
        with precision(bf16):
            ours.decode(latents) if direction == "decode" else ours.encode(images)

    @torch.no_grad()
    def peer_call() -> None:
        with precision(bf16):
            peer.decode(latents) if direction == "decode" else peer.encode(images)

    return ours_call, peer_call


def attention_pair(bf16: bool) -> Pair:
    """Forward + backward of one DiT block's attention (BATCH x 4 heads x 64 tokens x 64 dims): our `attend`
    (which picks the unfused kernel for short bf16 training steps on a CPU) against the plain
    `F.scaled_dot_product_attention` call that diffusers' attention processor makes."""
    from aligntok.models.layers import attend

    dtype = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator().manual_seed(0)
    shape = (BATCH, 4, LATENT[1] * LATENT[2], 64)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(*shape, generator=g).to(dtype)

    def ours() -> None:
        attend(q, k, v).backward(grad)

    def peer() -> None:
        F.scaled_dot_product_attention(q, k, v).backward(grad)

    return ours, peer


def inception_call(bf16: bool) -> Pair:
    from aligntok.metrics.inception import InceptionFeatures

    net = InceptionFeatures.from_assets(device="cpu")
    images = torch.rand(INCEPTION_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def call() -> None:
        net(images, bf16=bf16)

    return call, None


ROWS: dict[str, Callable[[bool], Pair]] = {
    "dit_step": lambda bf16: step_pair(False, bf16, plain=True),
    "lightningdit_step": lambda bf16: step_pair(False, bf16),
    "mmdit_step": lambda bf16: step_pair(True, bf16),
    "attention": attention_pair,
    "sample": sample_pair,
    "decode": lambda bf16: autoencoder_pair("decode", bf16),
    "encode": lambda bf16: autoencoder_pair("encode", bf16),
    "inception": inception_call,
}
PER_IMAGE = {"sample", "decode", "encode", "inception"}  # reported as images/s too


def measure(row: str, bf16: bool, peak: float, repeats: int, warmup: int) -> dict[str, Any]:
    ours, peer = ROWS[row](bf16)
    counted = {"ours": flops(ours)} | ({} if peer is None else {"peer": flops(peer)})
    result: dict[str, Any] = {"row": row, "precision": "bf16" if bf16 else "fp32", "flops": counted}
    result.update(compare(ours, peer, repeats, warmup))
    result["fraction_of_matmul_peak"] = {
        who: counted[who] / result[who]["median"] / peak for who in counted if who in result
    }
    if row in PER_IMAGE:
        n = INCEPTION_BATCH if row == "inception" else BATCH
        result["images_per_s"] = {who: n / result[who]["median"] for who in counted if who in result}
    result["peak_memory_mib"] = {who: peak_memory_mib(row, bf16, who) for who in counted}
    return result


def table(results: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    head = (
        "| row | precision | ours s (median) | peer s (median) | ours / peer: min / median / max "
        "| ours, % of matmul peak | peak MiB ours / peer |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        ratio = r.get("ratio")
        peer = r.get("peer")
        mem = r["peak_memory_mib"]
        lines.append(
            f"| {r['row']} | {r['precision']} | {r['ours']['median']:.4f} | "
            f"{'-' if peer is None else format(peer['median'], '.4f')} | "
            f"{'-' if ratio is None else '{min:.2f} / {median:.2f} / {max:.2f}'.format(**ratio)} | "
            f"{100 * r['fraction_of_matmul_peak']['ours']:.1f}% | "
            f"{_mib(mem.get('ours'))} / {_mib(mem.get('peer'))} |"
        )
    rates = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
    return "\n".join(lines) + f"\n\nMatmul peak (1024^3 GEMM): {rates}."


def gemm_note(step_gemm: dict[str, float], peaks: dict[str, float]) -> str:
    rates = ", ".join(f"{k} {100 * v / peaks[k]:.0f}%" for k, v in step_gemm.items())
    return f"The DiT step's own GEMM shapes alone reach {rates} of that peak."


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "peers-cpu.json"))
    a = p.parse_args()
    import diffusers

    t0 = time.time()
    peaks = {name: matmul_peak(name == "bf16") for name in a.precisions.split(",")}
    step_gemm = {name: step_gemm_rate(name == "bf16") for name in a.precisions.split(",")}
    results = []
    for row in a.rows.split(","):
        for name in a.precisions.split(","):
            results.append(measure(row, name == "bf16", peaks[name], a.repeats, a.warmup))
            print(table(results[-1:], peaks).splitlines()[2], flush=True)
    record = {
        **provenance(t0),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "batch": BATCH,
        "matmul_peak_flops": peaks,
        "step_gemm_flops": step_gemm,
        "rows": results,
    }
    write_json(record, Path(a.json))
    print(table(results, peaks))
    print(gemm_note(step_gemm, peaks))
    print(f"written: {a.json}")


if __name__ == "__main__":
    main()
