"""`aligntok demo`: the main job end to end on the embedded default, with an HTML report.

emoji (32 px) and EfficientNet-Lite0: fetch what is missing -> tokenizer through the three alignment stages ->
its metrics on the val split -> latent cache -> class-conditional DiT -> samples of every class with and
without guidance, gFID against the training images beside the real-vs-real floor -> `report/index.html`.
The `t2i` presets train the text-conditioned DiT on the same latents instead and draw images of held-out
prompts (validation captions) and of training captions, scored by FID and adherence (docs/text.md).

Every step is resumable: the trainers continue from their checkpoints, finished exports, caches, samples
and metrics are found and kept, so rerunning the same command after an interruption continues.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aligntok import assets, distributed
from aligntok.config import apply_overrides
from aligntok.data import DATASETS, build_dataset, fetch_dataset
from aligntok.data.latents import build_cache
from aligntok.demo_report import class_part, text_part, write_report
from aligntok.dit_eval import class_adherence, evaluate_t2i, real_scores, t2i_ceilings
from aligntok.evaluate import fid_floor, generation_fid
from aligntok.files import cached_json, write_json
from aligntok.generate import generate
from aligntok.recipes.dit import dit_train_recipe
from aligntok.recipes.tokenizer import tokenizer_train_recipe
from aligntok.rundir import run_lock
from aligntok.sampling import SampleConfig
from aligntok.tokenizer_eval import tokenizer_metrics
from aligntok.train.dit import train_dit
from aligntok.train.tokenizer import train_tokenizer


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
    text: bool = False  # a text-to-image DiT (dit_recipe a t2i one): num_samples validation captions

    def sample(self, cfg_scale: float) -> SampleConfig:
        """The sampling settings of the demo's samples at guidance `cfg_scale` (1: unguided)."""
        interval = self.cfg_interval if cfg_scale != 1.0 else (0.0, 1.0)
        return SampleConfig(steps=self.sample_steps, cfg_scale=cfg_scale, interval=interval, bf16=self.bf16)

    @property
    def guidance(self) -> dict[str, float]:
        """Sample-set name -> guidance scale: the unguided set and the guided one."""
        return {"cfg1": 1.0, f"cfg{self.cfg_scale:g}": self.cfg_scale}


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
    # The quick run's tokenizer and latents, a text DiT as long, 450 held-out prompts (docs/text.md).
    "t2i": DemoPreset(
        stage_steps=(500, 150, 100),
        eval_num=300,
        dit_recipe="t2i-emoji",
        dit_steps=700,
        dit_ema_decay=0.99,
        num_samples=450,
        ref_num=1000,
        cfg_scale=3.0,
        text=True,
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
PRESETS["t2i-debug"] = dataclasses.replace(PRESETS["debug"], dit_recipe="t2i-debug", cfg_scale=3.0, text=True)


def recipe_overrides(p: DemoPreset) -> tuple[list[str], list[str]]:
    """The `--set` lists of the tokenizer and DiT recipes (also printed as the commands to reproduce)."""
    # The tokenizer trains on the demo's data (the recipes' own is emoji, the default demo's too).
    tok = [f"data={p.data}", *(f"stages.{i}.steps={n}" for i, n in enumerate(p.stage_steps))]
    dit = [f"steps={p.dit_steps}", f"ema_decay={p.dit_ema_decay}", f"bf16={str(p.bf16).lower()}"]
    return tok, dit


def commands(p: DemoPreset, out: Path) -> list[str]:
    """The CLI commands that reproduce the demo's steps one by one (shown in the report)."""
    tok_set, dit_set = recipe_overrides(p)
    sets = lambda items: " ".join(f"--set {shlex.quote(s)}" for s in items)  # noqa: E731
    bf16 = " --bf16" if p.bf16 else ""
    tok = f"{out}/tokenizer/export"
    lines = [
        "aligntok assets fetch all",
        f"aligntok data fetch {p.data}",
        f"aligntok tokenizer train --recipe {p.tokenizer_recipe} --out {out}/tokenizer {sets(tok_set)}",
        f"aligntok tokenizer eval --tokenizer {tok} --data {p.data} --num {p.eval_num}{bf16}",
        f"aligntok latents cache --tokenizer {tok} --data {p.data} --out {out}/latents --flip{bf16}",
        f"aligntok dit train --recipe {p.dit_recipe} --latents {out}/latents --out {out}/dit {sets(dit_set)}",
    ]
    for name, scale in p.guidance.items():
        flags = " ".join(p.sample(scale).cli_args())
        head = f"--dit {out}/dit/export --num {p.num_samples} {flags}"
        if p.text:
            lines.append(f"aligntok dit eval {head} --data {p.data} --out {out}/eval/{name}")
        else:
            lines.append(f"aligntok sample {head} --out {out}/samples/{name}")
    if not p.text:
        lines += [f"aligntok eval --samples {out}/samples/{name} --ref {p.data}{bf16}" for name in p.guidance]
    return lines


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
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {sorted(PRESETS)}")
    with run_lock(out) as out:
        return _run(PRESETS[preset], preset, out)


def _run(p: DemoPreset, preset: str, out: Path) -> Path:
    report = out / "report"
    _check_same_preset(out / "demo.json", {"preset": preset, **asdict(p)})
    steps = _Steps(8, report / "timings.json")
    tok_set, dit_set = recipe_overrides(p)
    tok_cfg = apply_overrides(tokenizer_train_recipe(p.tokenizer_recipe), tok_set)
    dit_cfg = apply_overrides(dit_train_recipe(p.dit_recipe), dit_set)

    steps.run("assets and data", lambda: _fetch(p))
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
    kind = "text-conditioned" if p.text else "class-conditional"
    dit = steps.run(f"{kind} DiT", lambda: train_dit(dit_cfg, latents=cache, out=out / "dit", resume=True))
    resolution = tok_cfg.model.image_size
    part = _text_part if p.text else _class_part
    generation = part(p, steps, dit=dit, out=out, resolution=resolution)
    title = f"aligntok demo ({preset}): {p.data}, {p.tokenizer_recipe} tokenizer"
    shape = {"title": title, "eval_num": p.eval_num, "commands": commands(p, out)}
    index = steps.run(
        "report",
        lambda: write_report(
            out, tokenizer_metrics=tok_metrics, generation=generation, timings=steps.times, **shape
        ),
    )
    distributed.print0(f"demo done in {sum(steps.times.values()) / 60:.1f} min of work; report at {index}")
    return index


def _class_part(p: DemoPreset, steps: _Steps, *, dit: Path, out: Path, resolution: int) -> tuple:
    """Samples of every class with and without guidance, their gFID and class adherence; the real-vs-real
    floor and the adherence ceiling (the classifier on real validation images)."""
    kw = {"data": p.data, "num": p.num_samples, "ref_num": p.ref_num}

    def sample_sets() -> tuple[dict[str, Any], dict[str, Any]]:
        gfid = {
            name: generation_fid(dit, out=out / "samples" / name, sample=p.sample(scale), **kw)
            for name, scale in p.guidance.items()
        }
        adherence = {
            name: cached_json(
                out / "samples" / name / "adherence.json",
                functools.partial(
                    class_adherence, out / "samples" / name / "samples.npz", p.data, resolution
                ),
            )
            for name in gfid
        }
        return gfid, adherence

    gfid, adherence = steps.run("samples of every class: gFID, class adherence", sample_sets)
    floor_kw = {"num": p.num_samples, "resolution": resolution, "ref_num": p.ref_num, "bf16": p.bf16}
    floor, ceiling = steps.run(
        "real images: FID floor, class-adherence ceiling",
        lambda: (
            cached_json(out / "report" / "fid_floor.json", lambda: fid_floor(p.data, **floor_kw)),
            cached_json(
                out / "report" / "adherence_ceiling.json",
                lambda: real_scores(p.data, resolution, text=False),
            ),
        ),
    )
    return class_part(
        out,
        out / "report",
        gfid=gfid,
        floor=floor,
        adherence=adherence,
        ceiling=ceiling,
        per_class=p.per_class,
    )


def _text_part(p: DemoPreset, steps: _Steps, *, dit: Path, out: Path, resolution: int) -> tuple:
    """Images of `num_samples` held-out prompts with and without guidance (FID, adherence), the same measures
    on the real validation images, and images of training captions."""
    scores = steps.run(
        "held-out prompts: samples, FID, adherence",
        lambda: {
            name: evaluate_t2i(
                dit, p.data, out=out / "samples" / name, sample=p.sample(scale), num=p.num_samples
            )
            for name, scale in p.guidance.items()
        },
    )
    ceilings = steps.run(
        "real validation images: FID floor, adherence ceilings",
        lambda: cached_json(
            out / "report" / "ceilings.json", lambda: t2i_ceilings(p.data, resolution, num=p.num_samples)
        ),
    )
    captions = list(build_dataset(p.data, split="train", resolution=resolution).captions)
    prompts = sorted(set(captions))[:: max(1, len(set(captions)) // (2 * p.per_class))][: 2 * p.per_class]
    out_train = out / "samples" / "train-prompts"
    if not (out_train / "samples.npz").is_file():
        generate(dit_dir=dit, num=1, prompts=prompts, out=out_train, sample=p.sample(p.cfg_scale))
    return text_part(out, out / "report", scores=scores, ceilings=ceilings, num=2 * p.per_class)


def _fetch(p: DemoPreset) -> None:
    """The encoder, the FID network, LPIPS VGG (the metric) and AlexNet (the emoji recipes' loss), and the
    dataset where it is a named one (an image folder needs no fetching)."""
    for name in ("efficientnet-lite0", "fid-inception", "lpips-vgg16", "lpips-alexnet"):
        assets.fetch(name)
    if p.data in DATASETS:
        fetch_dataset(p.data)


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
