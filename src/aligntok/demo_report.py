"""The HTML report of `aligntok demo`: metrics, reconstructions after each stage, sample grids per class,
training curves, timings and the commands that reproduce each step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from aligntok.files import make_grid, save_image, write_json
from aligntok.report import Raw, html_page, html_table, plot_curves
from aligntok.train.common import read_log


def _class_rows(npz: Path, classes: list[str], per_class: int, folder: Path, prefix: str) -> list[str]:
    """One PNG per class (its first `per_class` samples in a row); returns the file names."""
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
    plots = {  # name -> (series, file, title, y label, stage boundaries)
        "tokenizer loss": (loss, "tokenizer-loss.png", "tokenizer training loss", "loss", boundaries),
        "tokenizer val PSNR": (
            psnr,
            "tokenizer-psnr.png",
            "reconstruction PSNR, fixed val batch (EMA weights)",
            "PSNR (dB)",
            boundaries,
        ),
        "DiT loss": (
            {"flow-matching loss": [(r["step"], r["loss"]) for r in dit_rows if "loss" in r]},
            "dit-loss.png",
            "DiT training loss",
            "velocity MSE",
            None,
        ),
    }
    files = {
        name: plot_curves(series, report / file, title=title, xlabel="step", ylabel=ylabel, vlines=vlines)
        for name, (series, file, title, ylabel, vlines) in plots.items()
    }
    return {name: path.name for name, path in files.items()}


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _guidance(g: dict[str, Any], *, interval: bool = False) -> str:
    """How a sample set was guided, from its fid.json record."""
    if g["cfg"] == 1.0:
        return "no guidance"
    return f"guidance {g['cfg']:g}" + (f" on t in {g['interval']}" if interval else "")


def _tokenizer_rows(tokenizer_metrics: dict[str, Any], eval_num: int) -> list[list[object]]:
    tm = tokenizer_metrics
    rows: list[list[object]] = [
        [
            "reconstruction PSNR (dB)",
            _fmt(tm.get("psnr")),
            f"val split, {tm.get('num_images', eval_num)} images",
        ],
        ["SSIM", _fmt(tm.get("ssim")), ""],
        ["LPIPS", _fmt(tm.get("lpips")), "VGG16 LPIPS v0.1"],
        ["rFID", _fmt(tm.get("rfid")), "reconstructions vs originals"],
        ["linear probe on latents (class-balanced acc.)", _fmt(tm.get("probe_balanced")), "train -> val"],
        ["k-NN on latents (class-balanced acc.)", _fmt(tm.get("knn_balanced")), ""],
        ["CKNNA latent vs frozen encoder", _fmt(tm.get("cknna")), "alignment with the foundation encoder"],
    ]
    return rows


def _gfid_rows(gfid: dict[str, dict[str, Any]], floor: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    for g in gfid.values():
        how = f"{g['num_samples']} samples vs {g['num_ref']} training images"
        rows.append([f"gFID, {_guidance(g, interval=True)}", _fmt(g["fid"]), how])
    how = f"{floor['num']} real {floor['split']} images vs the same reference"
    rows.append(["real-vs-real FID floor", _fmt(floor["fid"]), how])
    return rows


def _recon_rows(out: Path, report: Path) -> list[list[object]]:
    """The last reconstruction grid of each tokenizer stage, copied next to the page."""
    rows: list[list[object]] = []
    for stage_dir in sorted((out / "tokenizer").glob("stage-*")):
        pngs = sorted(stage_dir.glob("recon-*.png"))
        if pngs:
            target = f"recon-{stage_dir.name}.png"
            shutil.copyfile(pngs[-1], report / target)
            rows.append([f"after {stage_dir.name.replace('-', ' ')}", Raw(f"<img src='{target}'>")])
    return rows


ADHERENCE_GOAL = 0.8  # a class counts as recognisable at 80% of the classifier's accuracy on real images


def _adherence_cell(adherence: dict[str, Any], ceiling: dict[str, Any], name: str) -> str:
    got, real = adherence["category_per_class"].get(name), ceiling["category_per_class"].get(name)
    if got is None or not real:
        return "-"
    return f"{got:.0%} ({got / real:.0%} of real)"


def recognisable(per_class: dict[str, float], ceiling: dict[str, float]) -> list[str]:
    """The classes whose adherence reaches ADHERENCE_GOAL of their (non-zero) real-image ceiling."""
    return [c for c, v in per_class.items() if ceiling.get(c) and v >= ADHERENCE_GOAL * ceiling[c]]


def _adherence_rows(
    gfid: dict[str, dict[str, Any]], adherence: dict[str, Any], ceiling: dict[str, Any]
) -> list[list[object]]:
    """Balanced class adherence of each sample set, and how many classes reach ADHERENCE_GOAL of the
    ceiling; the ceiling itself."""
    rows: list[list[object]] = []
    for key, g in gfid.items():
        per, real = adherence[key]["category_per_class"], ceiling["category_per_class"]
        met = len(recognisable(per, real))
        how = f"{met} of {len(per)} classes at >= {ADHERENCE_GOAL:.0%} of the real images'"
        rows.append(
            [f"class adherence (balanced), {_guidance(g)}", _fmt(adherence[key]["category_balanced"]), how]
        )
    how = f"the same classifier on {ceiling['num']} real val images (the ceiling)"
    rows.append(["class adherence (balanced), real images", _fmt(ceiling["category_balanced"]), how])
    return rows


def class_part(
    out: Path,
    report: Path,
    *,
    gfid: dict[str, dict[str, Any]],
    floor: dict[str, Any],
    adherence: dict[str, Any],
    ceiling: dict[str, Any],
    per_class: int,
) -> tuple[dict[str, Any], list[list[object]], tuple[str, str]]:
    """The class DiT's part of the report: its metrics (JSON and table rows) and the per-class grids, each
    row with its class adherence beside the real images' (`adherence`: per sample set; `ceiling`: real)."""
    classes = json.loads((out / "latents" / "meta.json").read_text())["classes"]
    metrics = {"gfid": {k: v["fid"] for k, v in gfid.items()}, "fid_floor": floor["fid"]}
    metrics["num_ref"] = floor["num_ref"]
    metrics["adherence"] = {
        k: v["category_per_class"] | {"balanced": v["category_balanced"]} for k, v in adherence.items()
    }
    metrics["adherence_ceiling"] = ceiling["category_per_class"] | {"balanced": ceiling["category_balanced"]}
    grids = {
        key: _class_rows(out / "samples" / key / "samples.npz", classes, per_class, report, f"samples-{key}")
        for key in gfid
    }
    rows = [
        [c]
        + [Raw(f"<img src='{grids[k][i]}'>") for k in gfid]
        + [_adherence_cell(adherence[k], ceiling, c) for k in gfid]
        + [_fmt(ceiling["category_per_class"].get(c, "-"))]
        for i, c in enumerate(classes)
    ]
    head = ["class"] + [_guidance(gfid[k]) for k in gfid]
    head += [f"adherence, {_guidance(gfid[k])}" for k in gfid] + ["adherence, real images"]
    table_rows = _gfid_rows(gfid, floor) + _adherence_rows(gfid, adherence, ceiling)
    return metrics, table_rows, ("Samples of every class, with class adherence", html_table(head, rows))


def _prompt_images(samples: Path, report: Path, prefix: str, num: int) -> list[tuple[str, str]]:
    """The first `num` (prompt, image file) pairs of a text sample set, each image copied beside the page."""
    images = np.load(samples / "samples.npz")["arr_0"]
    prompts = [json.loads(x)["prompt"] for x in (samples / "prompts.jsonl").read_text().splitlines()]
    pairs = []
    for i, (prompt, img) in enumerate(zip(prompts[:num], images[:num], strict=True)):
        save_image(img, report / f"{prefix}-{i:03d}.png", scale=3)
        pairs.append((prompt, f"{prefix}-{i:03d}.png"))
    return pairs


def text_part(
    out: Path, report: Path, *, scores: dict[str, dict[str, Any]], ceilings: dict[str, Any], num: int
) -> tuple[dict[str, Any], list[list[object]], tuple[str, str]]:
    """The text DiT's part: FID and adherence beside the real validation images', and prompt -> image
    tables for held-out prompts (validation captions, every guidance setting) and training captions."""
    metrics = {"t2i": scores, "ceilings": ceilings}
    rows: list[list[object]] = []
    for r in scores.values():
        how = _guidance(r["sampling"])
        rows.append(
            [f"FID, held-out prompts, {how}", _fmt(r["fid"]), f"{r['num']} images vs training images"]
        )
        for k in ("retrieval_top1", "retrieval_top5", "category_accuracy"):
            rows.append(
                [f"{k.replace('_', ' ')}, {how}", _fmt(r[k]), f"real val images: {_fmt(ceilings[k])}"]
            )
    rows.append(["real-vs-real FID floor", _fmt(ceilings["fid_floor"]), f"{ceilings['num']} real val images"])
    held = {k: _prompt_images(out / "samples" / k, report, f"held-{k}", num) for k in scores}
    table = [
        [p] + [Raw(f"<img src='{held[k][i][1]}'>") for k in scores]
        for i, (p, _) in enumerate(held[next(iter(scores))])
    ]
    heads = ["held-out prompt"] + [_guidance(r["sampling"]) for r in scores.values()]
    train = _prompt_images(out / "samples" / "train-prompts", report, "train", num)
    body = "<p>Prompts of the validation split: names that no training image has.</p>" + html_table(
        heads, table
    )
    body += "<h3>Training captions</h3>" + html_table(
        ["training prompt", "sample"], [[p, Raw(f"<img src='{f}'>")] for p, f in train]
    )
    return metrics, rows, ("Text to image", body)


def write_report(
    out: Path,
    *,
    title: str,
    eval_num: int,
    tokenizer_metrics: dict[str, Any],
    generation: tuple[dict[str, Any], list[list[object]], tuple[str, str]],
    timings: dict[str, float],
    commands: list[str],
) -> Path:
    """`out/report/index.html` (+ metrics.json and PNGs beside it) from the finished run under `out`;
    `generation` is the DiT's part (`class_part` or `text_part`)."""
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    keys = ("psnr", "ssim", "lpips", "rfid", "probe_balanced", "knn_balanced", "cknna")
    gen_metrics, gen_rows, samples_section = generation
    metrics = {"tokenizer": {k: tokenizer_metrics.get(k) for k in keys}, **gen_metrics, "timings_s": timings}
    write_json(metrics, report / "metrics.json")
    curves = _curves(out, report)
    time_rows = [[k, f"{v:.0f}"] for k, v in timings.items()]
    metric_rows = _tokenizer_rows(tokenizer_metrics, eval_num) + gen_rows
    sections = [
        ("Metrics", html_table(["metric", "value", "how"], metric_rows)),
        (
            "Reconstructions after each stage",
            "<p>Top row: originals; bottom row: reconstructions (fixed val batch).</p>"
            + html_table(["stage", "originals / reconstructions"], _recon_rows(out, report)),
        ),
        samples_section,
        ("Curves", "".join(f"<p><img src='{f}' alt='{n}'></p>" for n, f in curves.items())),
        (
            "Time",
            html_table(["step", "seconds"], time_rows)
            + f"<p>{sum(timings.values()) / 60:.1f} minutes of work in all.</p>",
        ),
        ("Commands to reproduce", "<pre>{}</pre>".format("\n".join(commands))),
    ]
    index = report / "index.html"
    index.write_text(html_page(title, sections))
    return index
