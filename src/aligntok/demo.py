"""`aligntok demo`: the main job end to end on the embedded default, with an HTML report.

emoji (32 px) and EfficientNet-Lite0: fetch what is missing -> tokenizer through the three alignment stages ->
its metrics on the val split -> latent cache -> class-conditional DiT -> samples of every class with and
without guidance, gFID against the training images beside the real-vs-real floor -> `report/index.html`.

Every step is resumable: the trainers continue from their checkpoints, finished exports, caches, samples
and metrics are found and kept, so rerunning the same command after an interruption continues.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aligntok import distributed
from aligntok.report import cached_json, write_json


@dataclass(frozen=True, kw_only=True)
class DemoPreset:
    """What the demo spends. Step counts override the named recipes; the rest of each recipe is kept."""

    data: str = "emoji"
    tokenizer_recipe: str = "emoji32"
    stage_steps: tuple[int, int, int]
    eval_num: int  # val images for the tokenizer metrics (and as many train images for the probe)
    dit_recipe: str = "emoji"
    dit_steps: int
    dit_ema_decay: float  # the EMA must average over a fraction of the run, not lag behind all of it
    num_samples: int  # class-balanced samples per guidance setting, for gFID
    ref_num: int | None  # training images in the gFID reference (a seeded subset); None = all
    sample_steps: int = 30
    # Scale 5: on the quick run's DiT, 3 left most classes as blobs; 5 and 8 made smileys, people, symbols and
    # flags recognisable (docs/demo.md). Sharper, less varied samples are what a demo should show.
    cfg_scale: float = 5.0
    cfg_interval: tuple[float, float] = (0.0, 0.9)  # LightningDiT's interval: no guidance near t = 0
    per_class: int = 12  # images per class in the report's grids
    bf16: bool = True  # autocast for the DiT, the latent cache and the Inception (docs/metrics.md)


PRESETS: dict[str, DemoPreset] = {
    # Within 20 minutes on 2 CPU cores once assets are fetched (docs/results.md has the measured run).
    "quick": DemoPreset(
        stage_steps=(500, 150, 100),
        eval_num=300,
        dit_steps=700,
        dit_ema_decay=0.99,
        num_samples=450,
        ref_num=1000,
    ),
    # About an hour: longer stages, a DiT 4x longer, 1,000 samples against every training image.
    "full": DemoPreset(
        stage_steps=(1500, 600, 400),
        eval_num=870,
        dit_steps=3000,
        dit_ema_decay=0.998,
        num_samples=1000,
        ref_num=None,
    ),
    # Seconds: the pipeline's shape for tests, not a result.
    "debug": DemoPreset(
        tokenizer_recipe="debug",
        stage_steps=(4, 4, 3),
        eval_num=24,
        dit_recipe="debug",
        dit_steps=20,
        dit_ema_decay=0.9,
        num_samples=18,
        ref_num=30,
        sample_steps=4,
        per_class=2,
        bf16=False,
    ),
}


def _overrides(p: DemoPreset) -> tuple[list[str], list[str]]:
    """The `--set` lists of the tokenizer and DiT recipes (also printed as the commands to reproduce)."""
    tok = [f"stages.{i}.steps={n}" for i, n in enumerate(p.stage_steps)]
    dit = [f"steps={p.dit_steps}", f"ema_decay={p.dit_ema_decay}", f"bf16={str(p.bf16).lower()}"]
    return tok, dit


def _commands(p: DemoPreset, out: Path) -> list[str]:
    tok_set, dit_set = _overrides(p)
    q = shlex.quote
    sets = lambda items: " ".join(f"--set {q(s)}" for s in items)  # noqa: E731
    bf16 = " --bf16" if p.bf16 else ""
    interval = " ".join(str(t) for t in p.cfg_interval)
    sample = f"aligntok sample --dit {out}/dit/export --num {p.num_samples} --steps {p.sample_steps}{bf16}"
    ref = f" --ref {p.data}"
    return [
        "aligntok assets fetch all",
        f"aligntok data fetch {p.data}",
        f"aligntok tokenizer train --recipe {p.tokenizer_recipe} --out {out}/tokenizer {sets(tok_set)}",
        f"aligntok tokenizer eval --tokenizer {out}/tokenizer/export --data {p.data} "
        f"--num {p.eval_num}{bf16}",
        f"aligntok latents cache --tokenizer {out}/tokenizer/export --data {p.data} "
        f"--out {out}/latents --flip{bf16}",
        f"aligntok dit train --recipe {p.dit_recipe} --latents {out}/latents --out {out}/dit {sets(dit_set)}",
        f"{sample} --out {out}/samples/cfg1",
        f"{sample} --cfg {p.cfg_scale} --interval {interval} --out {out}/samples/cfg{p.cfg_scale:g}",
        f"aligntok eval --samples {out}/samples/cfg1{ref}{bf16}",
        f"aligntok eval --samples {out}/samples/cfg{p.cfg_scale:g}{ref}{bf16}",
    ]


class _Steps:
    """Numbered step headers and the wall time of each step (kept across reruns in `timings.json`)."""

    def __init__(self, total: int, path: Path) -> None:
        self.total, self.path, self.index = total, path, 0
        self.times: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.index += 1
        distributed.print0(f"\n[{self.index}/{self.total}] {name}")
        t0 = time.time()
        result = fn()
        self.times[name] = round(self.times.get(name, 0.0) + time.time() - t0, 1)
        write_json(self.times, self.path)
        return result


def run_demo(preset: str = "quick", out: str | Path = "runs/demo") -> Path:
    """Run the demo `preset` into `out` (resuming what is there); returns the report's index.html."""
    from aligntok import assets
    from aligntok.config import apply_overrides
    from aligntok.data import DATASETS, fetch_dataset
    from aligntok.data.latents import build_cache
    from aligntok.evaluate import fid_floor, generation_fid
    from aligntok.recipes.dit import dit_train_recipe
    from aligntok.recipes.tokenizer import tokenizer_train_recipe
    from aligntok.tokenizer_eval import tokenizer_metrics
    from aligntok.train.dit import train_dit
    from aligntok.train.tokenizer import train_tokenizer

    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    report = out / "report"
    settings = {"preset": preset, **asdict(p)}
    _check_same_preset(out / "demo.json", settings)
    steps = _Steps(8, report / "timings.json")
    tok_set, dit_set = _overrides(p)
    tok_cfg = apply_overrides(tokenizer_train_recipe(p.tokenizer_recipe), tok_set)
    dit_cfg = apply_overrides(dit_train_recipe(p.dit_recipe), dit_set)

    def fetch() -> None:
        # The encoder, the FID network, LPIPS VGG (the metric) and AlexNet (the emoji recipes' loss).
        for name in ("efficientnet-lite0", "fid-inception", "lpips-vgg16", "lpips-alexnet"):
            assets.fetch(name)
        if p.data in DATASETS:  # an image folder needs no fetching
            fetch_dataset(p.data)

    steps.run("assets and data", fetch)
    tok = steps.run(
        "tokenizer: three alignment stages",
        lambda: train_tokenizer(tok_cfg, out=out / "tokenizer", resume=True),
    )
    tok_metrics = steps.run(
        "tokenizer metrics (val split)",
        lambda: tokenizer_metrics(tok, p.data, num=p.eval_num, bf16=p.bf16, out=report / "tokenizer.json"),
    )
    cache = steps.run(
        "latent cache (train split, with flips)",
        lambda: build_cache(tokenizer_dir=tok, data=p.data, out=out / "latents", flip=True, bf16=p.bf16),
    )
    dit = steps.run(
        "class-conditional DiT", lambda: train_dit(dit_cfg, latents=cache, out=out / "dit", resume=True)
    )
    guidance = {"cfg1": 1.0, f"cfg{p.cfg_scale:g}": p.cfg_scale}

    def sample_and_score() -> dict[str, Any]:
        return {
            name: generation_fid(
                dit,
                data=p.data,
                out=out / "samples" / name,
                num=p.num_samples,
                steps=p.sample_steps,
                cfg_scale=scale,
                interval=p.cfg_interval if scale != 1.0 else (0.0, 1.0),
                ref_num=p.ref_num,
                bf16=p.bf16,
            )
            for name, scale in guidance.items()
        }

    gfid = steps.run("samples of every class, gFID", sample_and_score)
    resolution = tok_cfg.model.image_size
    floor = steps.run(
        "real-vs-real FID floor",
        lambda: cached_json(
            report / "fid_floor.json",
            lambda: fid_floor(
                p.data, num=p.num_samples, resolution=resolution, ref_num=p.ref_num, bf16=p.bf16
            ),
        ),
    )
    index = steps.run(
        "report",
        lambda: write_report(
            out,
            preset=p,
            name=preset,
            tokenizer_metrics=tok_metrics,
            gfid=gfid,
            floor=floor,
            timings=steps.times,
        ),
    )
    distributed.print0(f"demo done in {sum(steps.times.values()) / 60:.1f} min of work; report at {index}")
    return index


def _check_same_preset(path: Path, settings: dict[str, Any]) -> None:
    """A run directory holds one preset: resuming with other settings would mix two runs."""
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from JSON
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            raise ValueError(
                f"{path.parent} holds a demo with other settings (preset {before.get('preset')!r}); "
                "rerun with that preset to continue it, or pass another --out"
            )
        return
    write_json(settings, path)


# ---------------------------------------------------------------------------------------------------------
# The report


def _class_rows(npz: Path, classes: list[str], per_class: int, folder: Path, prefix: str) -> list[str]:
    """One PNG per class (its first `per_class` samples in a row); returns the file names."""
    from aligntok.report import make_grid, save_image

    with np.load(npz) as f:
        images, labels = f["arr_0"], f["labels"]
    names = []
    for k in range(len(classes)):
        chosen = images[labels == k][:per_class]
        name = f"{prefix}-class{k}.png"
        save_image(make_grid(chosen, nrow=per_class), folder / name, scale=2)
        names.append(name)
    return names


def _curves(out: Path, report: Path) -> dict[str, str]:
    """Loss and validation curves of both trainers, as PNGs under `report`; name -> file name."""
    from aligntok.report import plot_curves
    from aligntok.train.common import read_log

    loss: dict[str, list[tuple[float, float]]] = {}
    psnr: dict[str, list[tuple[float, float]]] = {}
    boundaries: dict[str, float] = {}
    offset = 0
    for stage_dir in sorted((out / "tokenizer").glob("stage-*")):
        rows = read_log(stage_dir / "log.jsonl")
        stage = stage_dir.name.removeprefix("stage-")
        loss[f"stage {stage}"] = [(offset + r["step"], r["loss"]) for r in rows if "loss" in r]
        psnr[f"stage {stage}"] = [(offset + r["step"], r["val_psnr"]) for r in rows if "val_psnr" in r]
        last = max((r["step"] for r in rows), default=0)
        if offset:
            boundaries[f"stage {stage}"] = offset
        offset += last
    dit_rows = read_log(out / "dit" / "log.jsonl")
    files = {
        "tokenizer loss": plot_curves(
            loss,
            report / "tokenizer-loss.png",
            title="tokenizer training loss",
            xlabel="step",
            ylabel="loss",
            vlines=boundaries,
        ),
        "tokenizer val PSNR": plot_curves(
            psnr,
            report / "tokenizer-psnr.png",
            title="reconstruction PSNR, fixed val batch (EMA weights)",
            xlabel="step",
            ylabel="PSNR (dB)",
            vlines=boundaries,
        ),
        "DiT loss": plot_curves(
            {"flow-matching loss": [(r["step"], r["loss"]) for r in dit_rows if "loss" in r]},
            report / "dit-loss.png",
            title="DiT training loss",
            xlabel="step",
            ylabel="velocity MSE",
        ),
    }
    return {name: path.name for name, path in files.items()}


def write_report(
    out: Path,
    *,
    preset: DemoPreset,
    name: str,
    tokenizer_metrics: dict[str, Any],
    gfid: dict[str, dict[str, Any]],
    floor: dict[str, Any],
    timings: dict[str, float],
) -> Path:
    """`out/report/index.html` (+ metrics.json and PNGs beside it) from the finished run under `out`."""
    from aligntok.report import Raw, html_page, html_table

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    meta = json.loads((out / "latents" / "meta.json").read_text())
    classes = meta["classes"]
    metrics = {
        "tokenizer": {
            k: tokenizer_metrics.get(k)
            for k in ("psnr", "ssim", "lpips", "rfid", "probe_balanced", "knn_balanced", "cknna")
        },
        "gfid": {k: v["fid"] for k, v in gfid.items()},
        "fid_floor": floor["fid"],
        "num_samples": preset.num_samples,
        "num_ref": floor["num_ref"],
        "timings_s": timings,
    }
    write_json(metrics, report / "metrics.json")

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    tm = metrics["tokenizer"]
    metric_rows = [
        [
            "reconstruction PSNR (dB)",
            fmt(tm["psnr"]),
            f"val split, {tokenizer_metrics.get('num_images', preset.eval_num)} images",
        ],
        ["SSIM", fmt(tm["ssim"]), ""],
        ["LPIPS", fmt(tm["lpips"]), "VGG16 LPIPS v0.1"],
        ["rFID", fmt(tm["rfid"]), "reconstructions vs originals"],
        ["linear probe on latents (class-balanced acc.)", fmt(tm["probe_balanced"]), "train -> val"],
        ["k-NN on latents (class-balanced acc.)", fmt(tm["knn_balanced"]), ""],
        ["CKNNA latent vs frozen encoder", fmt(tm["cknna"]), "alignment with the foundation encoder"],
    ]

    def guidance(g: dict[str, Any], *, interval: bool = False) -> str:
        if g["cfg"] == 1.0:
            return "no guidance"
        return f"guidance {g['cfg']:g}" + (f" on t in {g['interval']}" if interval else "")

    for key, value in metrics["gfid"].items():
        g = gfid[key]
        how = guidance(g, interval=True)
        metric_rows.append(
            [f"gFID, {how}", fmt(value), f"{g['num_samples']} samples vs {g['num_ref']} training images"]
        )
    metric_rows.append(
        [
            "real-vs-real FID floor",
            fmt(floor["fid"]),
            f"{floor['num']} real {floor['split']} images vs the same reference",
        ]
    )

    recon_rows = []
    for stage_dir in sorted((out / "tokenizer").glob("stage-*")):
        pngs = sorted(stage_dir.glob("recon-*.png"))
        if pngs:
            target = f"recon-{stage_dir.name}.png"
            shutil.copyfile(pngs[-1], report / target)
            recon_rows.append([f"after {stage_dir.name.replace('-', ' ')}", Raw(f"<img src='{target}'>")])

    sample_cols = {
        key: _class_rows(
            out / "samples" / key / "samples.npz", classes, preset.per_class, report, f"samples-{key}"
        )
        for key in gfid
    }
    headers = ["class"] + [guidance(gfid[k]) for k in gfid]
    sample_rows = [
        [c] + [Raw(f"<img src='{sample_cols[k][i]}'>") for k in gfid] for i, c in enumerate(classes)
    ]

    curves = _curves(out, report)
    commands = "\n".join(_commands(preset, out))
    minutes = sum(timings.values()) / 60
    sections = [
        ("Metrics", html_table(["metric", "value", "how"], metric_rows)),
        (
            "Reconstructions after each stage",
            "<p>Top row: originals; bottom row: reconstructions (fixed val batch).</p>"
            + html_table(["stage", "originals / reconstructions"], recon_rows),
        ),
        ("Samples of every class", html_table(headers, sample_rows)),
        ("Curves", "".join(f"<p><img src='{f}' alt='{n}'></p>" for n, f in curves.items())),
        (
            "Time",
            html_table(["step", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()])
            + f"<p>{minutes:.1f} minutes of work in all.</p>",
        ),
        ("Commands to reproduce", f"<pre>{commands}</pre>"),
    ]
    index = report / "index.html"
    index.write_text(
        html_page(f"aligntok demo ({name}): {preset.data}, {preset.tokenizer_recipe} tokenizer", sections)
    )
    return index
