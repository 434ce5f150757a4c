"""How precise and how fast is our FID stack? Writes benchmarks/results/fid_precision.json, prints markdown.

    python benchmarks/fid_precision.py [--train-num 4000 (0: all)] [--timing-num 100] [--timing-reps 2]
                                       [--floor-sizes 500 1000 2000] [--floor-seeds 3]

Measured, on emoji at 64 px (features cached under home()/fid_refs, so a rerun only redoes the maths):
  (a) Inception feature extraction time per 1,000 images, fp32 vs bf16 autocast (best of
      `--timing-reps` interleaved rounds on `--timing-num` images, extrapolated linearly to 1,000);
  (b) what bf16 does to FID: fp32 vs bf16 features of the same emoji val images against the same fp32
      reference (emoji train), and the FID between the two feature sets themselves;
  (c) FID of emoji val vs emoji train (a subset of val's size, and all `--train-num` train images);
      emoji vs Fashion-MNIST at the same count; the FID floor (two disjoint random subsets of emoji
      train) at several sizes; and the agreement of the FID solvers (eigh, sqrtm, gram) on real features.
Timings depend on the machine's load; the load average is recorded next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from aligntok.data import build_dataset
from aligntok.metrics import fid as F
from aligntok.metrics import inception, reference


def timing(num: int, resolution: int, batch_size: int, reps: int) -> dict:
    """Seconds per 1,000 images (best of `reps` interleaved fp32/bf16 rounds, so a burst of load on a
    shared machine hits both alike), after one warm-up batch each: the TorchScript profiling executor
    optimises on the first calls."""
    ds = build_dataset("emoji", split="val", resolution=resolution)
    images = torch.stack([ds[i]["image"] for i in range(num + batch_size)])
    model = inception.InceptionFeatures.from_assets(device="cpu")
    kw = {"batch_size": batch_size, "model": model, "progress": False}
    out: dict = {
        "num_images": num,
        "batch_size": batch_size,
        "reps": reps,
        "load_avg_before": os.getloadavg()[0],
    }
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for name in seconds:
        inception.extract_features(images[:batch_size], bf16=name == "bf16", **kw)
    for _ in range(reps):
        for name in seconds:
            t0 = time.perf_counter()
            inception.extract_features(images[batch_size:], bf16=name == "bf16", **kw)
            seconds[name].append(round(time.perf_counter() - t0, 2))
    for name, runs in seconds.items():
        best = min(runs)
        out[name] = {"seconds": runs, "s_per_1000": round(best / num * 1000, 1), "img_per_s": num / best}
    out["load_avg_after"] = os.getloadavg()[0]
    return out


def solvers(a: inception.Features, b: inception.Features) -> dict:
    """FID by each solver (eigh is the reported value) and its wall time."""
    sa, sb = F.stats_from_features(a), F.stats_from_features(b)
    res = {}
    for method in ("eigh", "sqrtm", "gram"):
        t0 = time.perf_counter()
        res[method] = (
            F.fid(a, b, method="gram") if method == "gram" else F.fid_from_stats(sa, sb, method=method)
        )
        res[f"{method}_s"] = round(time.perf_counter() - t0, 2)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--timing-num", type=int, default=100)
    p.add_argument("--timing-reps", type=int, default=2)
    p.add_argument("--train-num", type=int, default=4000, help="emoji train images to use; 0: all")
    p.add_argument("--floor-sizes", type=int, nargs="+", default=[500, 1000, 2000])
    p.add_argument("--floor-seeds", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "fid_precision.json"))
    args = p.parse_args()
    res_px, bs = args.resolution, args.batch_size
    t_start = time.time()
    results: dict = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "resolution": res_px,
        "inception_sha256": inception.inception_sha256(),
        "extract_wall_s": {},
    }

    def ref(spec: str, split: str, **kw) -> inception.Features:
        t0 = time.time()
        feats = reference.reference_features(spec, split=split, resolution=res_px, batch_size=bs, **kw)
        name = f"{spec}-{split}-{kw.get('num') or 'all'}{'-bf16' if kw.get('bf16') else ''}"
        results["extract_wall_s"][name] = round(time.time() - t0, 1)  # ~0 when it came from the cache
        return feats

    # (b) bf16 vs fp32 features of the same images; (a) timing.
    val = ref("emoji", "val")
    val_bf16 = ref("emoji", "val", bf16=True)
    results["timing"] = timing(args.timing_num, res_px, bs, args.timing_reps)

    # (c) real vs real.
    train = ref("emoji", "train", num=args.train_num or None)
    fashion = ref("fashion-mnist", "val", num=len(val))
    rng = np.random.default_rng(0)
    train_sub = train.subset(np.sort(rng.choice(len(train), len(val), replace=False)))
    results["emoji_val_vs_train_subset"] = {"n": [len(val), len(train_sub)], **solvers(val, train_sub)}
    results["emoji_val_vs_train"] = {"n": [len(val), len(train)], **solvers(val, train)}
    results["emoji_val_vs_fashion_val"] = {"n": [len(val), len(fashion)], **solvers(val, fashion)}
    kid = F.kid(val, train_sub, subsets=100, subset_size=500)
    prec, rec = F.precision_recall(train_sub, val)
    results["emoji_val_vs_train_subset"].update(kid=kid, precision=prec, recall=rec)

    floor = {}
    for n in args.floor_sizes:
        if 2 * n > len(train):
            continue
        vals = []
        for seed in range(args.floor_seeds):
            perm = np.random.default_rng(seed).permutation(len(train))
            vals.append(F.fid(train.subset(perm[:n]), train.subset(perm[n : 2 * n]), method="eigh"))
        floor[str(n)] = {"fids": vals, "mean": float(np.mean(vals)), "std": float(np.std(vals))}
    results["floor_emoji_train_disjoint"] = floor

    diff = np.linalg.norm(val.pool - val_bf16.pool, axis=1) / np.linalg.norm(val.pool, axis=1)
    fid32, fid16 = F.fid(val, train, method="eigh"), F.fid(val_bf16, train, method="eigh")
    results["bf16"] = {
        "n": len(val),
        "reference": f"emoji train ({len(train)} images, fp32 features)",
        "fid_fp32": fid32,
        "fid_bf16": fid16,
        "abs_change": abs(fid16 - fid32),
        "rel_change": abs(fid16 - fid32) / fid32,
        "fid_fp32_vs_bf16_features": F.fid(val, val_bf16, method="eigh"),
        "feature_rel_err_mean": float(diff.mean()),
        "feature_rel_err_max": float(diff.max()),
    }
    results["total_wall_s"] = round(time.time() - t_start, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"results written to {out}")


def markdown(r: dict) -> str:
    t, b = r["timing"], r["bf16"]
    lines = [
        f"Machine: {r['machine']}; emoji at {r['resolution']} px.",
        "",
        "| measurement | value |",
        "|---|---|",
        *(
            f"| Inception {p}, s / 1,000 images | {t[p]['s_per_1000']} ({t[p]['img_per_s']:.1f} img/s) |"
            for p in ("fp32", "bf16")
        ),
        f"| FID emoji val vs train, fp32 / bf16 features (n={b['n']}) | {b['fid_fp32']:.3f} / "
        f"{b['fid_bf16']:.3f} (change {b['abs_change']:.3f}, {100 * b['rel_change']:.2f}%) |",
        f"| FID fp32 vs bf16 features of the same images | {b['fid_fp32_vs_bf16_features']:.4f} |",
        f"| bf16 feature relative error, mean / max | {b['feature_rel_err_mean']:.4f} / "
        f"{b['feature_rel_err_max']:.4f} |",
    ]
    for key, label in (
        ("emoji_val_vs_train_subset", "FID emoji val vs train subset"),
        ("emoji_val_vs_train", "FID emoji val vs emoji train"),
        ("emoji_val_vs_fashion_val", "FID emoji val vs Fashion-MNIST val"),
    ):
        e = r[key]
        lines.append(
            f"| {label} (n={e['n'][0]} vs {e['n'][1]}) | {e['eigh']:.3f} (sqrtm {e['sqrtm']:.3f}, gram "
            f"{e['gram']:.3f}; {e['eigh_s']} / {e['sqrtm_s']} / {e['gram_s']} s) |"
        )
    e = r["emoji_val_vs_train_subset"]
    lines.append(
        f"| KID / precision / recall, emoji val vs train subset | {e['kid'][0]:.5f} +- {e['kid'][1]:.5f} / "
        f"{e['precision']:.3f} / {e['recall']:.3f} |"
    )
    for n, f in r["floor_emoji_train_disjoint"].items():
        lines.append(
            f"| FID floor, 2 disjoint emoji-train subsets of {n} | {f['mean']:.3f} +- {f['std']:.3f} "
            f"({len(f['fids'])} seeds) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
