"""What the class-adherence classifier costs and what cheaper features lose. Writes JSON, prints markdown.

    python benchmarks/adherence_cost.py [--data emoji] [--resolution 32]
        [--settings 224:bf16,128:bf16,128:fp32] [--json benchmarks/results/adherence-cost-emoji.json]

The demo and `aligntok eval` fit the category classifier of `metrics.adherence` on every real training image
of the dataset, once per `$ALIGNTOK_HOME`: on emoji, 6,692 images through EfficientNet-Lite0, which on 2 CPU
cores takes minutes of a 20-minute demo. For each `input_size:precision` setting this measures the features'
images/s on the training split (the cost), then fits the classifier on them as `category_classifier` does
and scores the real validation images with features of the same setting (the ceiling that generated samples
are read against): overall and balanced accuracy, and each class's recall. A setting only matters through
these numbers: if a cheaper one keeps the ceiling, the demo can take it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from aligntok.files import write_json
from aligntok.metrics.adherence import (
    CategoryClassifier,
    feature_extractor,
    fit_category_classifier,
    image_features,
    real_images,
)
from reproduce import provenance

ROOT = Path(__file__).resolve().parents[1]


def measure(data: str, resolution: int, input_size: int, bf16: bool) -> dict[str, Any]:
    train = real_images(data, split="train", resolution=resolution)
    val = real_images(data, split="val", resolution=resolution)
    kw = {"input_size": input_size, "bf16": bf16}
    image_features(train.images[:64], progress=False, **kw)  # warm-up: first-call allocations
    t0 = time.perf_counter()
    feats = image_features(train.images, **kw)
    seconds = time.perf_counter() - t0
    clf: CategoryClassifier = fit_category_classifier(data, resolution=resolution, features=feats, **kw)
    acc = clf.accuracy(val.images, val.labels, bf16=bf16)  # at the input size it was fitted with
    return {
        "input_size": input_size,
        "precision": "bf16" if bf16 else "fp32",
        "train_images": len(train.labels),
        "train_features_s": round(seconds, 1),
        "img_per_s": len(train.labels) / seconds,
        "val_accuracy": acc["overall"],
        "val_balanced": acc["balanced"],
        "val_per_class": acc["per_class"],
        "train_accuracy": clf.record["train_accuracy"],
        "feature_extractor": feature_extractor(input_size),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| input | precision | train features, s | img/s | val accuracy | val balanced |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['input_size']} px | {r['precision']} | {r['train_features_s']:.0f} | "
            f"{r['img_per_s']:.1f} | {100 * r['val_accuracy']:.1f}% | {100 * r['val_balanced']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="emoji")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--settings", default="224:bf16,128:bf16,128:fp32", help="input_size:fp32|bf16, ...")
    p.add_argument("--json", default=None, help="default benchmarks/results/adherence-cost-<data>.json")
    a = p.parse_args()
    t0 = time.time()
    rows = []
    for setting in a.settings.split(","):
        size, precision = setting.split(":")
        if precision not in ("fp32", "bf16"):
            raise SystemExit(f"--settings: precision must be fp32 or bf16, got {precision!r}")
        rows.append(measure(a.data, a.resolution, int(size), precision == "bf16"))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    record = {
        **provenance(t0),
        "data": a.data,
        "resolution": a.resolution,
        "rows": rows,
    }
    out = Path(a.json or ROOT / "benchmarks" / "results" / f"adherence-cost-{a.data}.json")
    write_json(record, out)
    print(table(rows))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
