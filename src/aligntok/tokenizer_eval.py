"""`aligntok tokenizer eval`: how good a tokenizer is.

`evaluate_tokenizer` measures reconstruction (rFID, PSNR, SSIM, LPIPS) and semantics (linear probe, k-NN,
CKNNA to the original foundation encoder), docs/method.md "Evaluation protocol", in one process (not under
torchrun). How diffusable a tokenizer is, is `aligntok.score`. The protocols are stated in docs/metrics.md,
"Tokenizer metrics".
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from aligntok import distributed
from aligntok.config import to_dict
from aligntok.data import build_dataset
from aligntok.data.images import ImageDataset
from aligntok.exports import load_tokenizer
from aligntok.files import write_json
from aligntok.metrics.reconstruction import eval_indices, reconstruction_metrics
from aligntok.metrics.semantics import CKNNA_MIN_ITEMS, cknna, cknna_centered_mask, knn_accuracy, linear_probe
from aligntok.models.encoders import Encoder, EncoderConfig, build_encoder
from aligntok.models.tokenizer import Tokenizer, TokenizerConfig

CKNNA_K = 10  # neighbours per item: a fixed protocol choice (small k measures local structure)
KNN_K = 20


def reference_encoder_config(config: TokenizerConfig) -> EncoderConfig:
    """The encoder CKNNA compares a tokenizer's latents with: its ORIGINAL foundation encoder.

    Not the encoder inside the tokenizer: stage 2 fine-tunes that one, and CKNNA asks how much of the
    foundation model's structure the latents keep, so the yardstick is the untouched pretrained model. A
    tokenizer whose encoder is trained from scratch (`cnn`, the VAE baselines) has no foundation model: it
    gets the default one, EfficientNet-Lite0 block 10 fed at max(128, image_size) px, which is what the
    emoji and Fashion-MNIST presets use, so that baselines and AlignTok tokenizers share one yardstick.
    """
    if config.encoder.name == "cnn":
        return EncoderConfig(name="efficientnet-lite0", block=10, input_size=max(128, config.image_size))
    return dataclasses.replace(config.encoder, pretrained=True)


def reference_encoder(config: TokenizerConfig, reference: EncoderConfig | None = None) -> Encoder:
    """`reference` (default `reference_encoder_config(config)`) built with its weights, frozen, eval mode."""
    enc = reference if reference is not None else reference_encoder_config(config)
    if enc.path is None and enc.hf_config is not None:
        warnings.warn(
            f"reference encoder {enc.name!r} has an architecture (hf_config) but no weights (path): CKNNA "
            "compares against a randomly initialised encoder; set encoder.path to the real model",
            stacklevel=2,
        )
    return build_encoder(enc).requires_grad_(False).eval()


@torch.no_grad()
def _encode(
    tokenizer: Tokenizer,
    dataset: Dataset,
    indices: list[int],
    *,
    reference: Encoder | None,
    batch_size: int,
    bf16: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Normalised latents (N, C, h, w), reference features (N, D, h, w) or None, labels (N,), on the CPU."""
    device = next(tokenizer.parameters()).device
    latents, feats, labels = [], [], []
    for batch in tqdm(DataLoader(Subset(dataset, indices), batch_size=batch_size), desc=desc):
        x = batch["image"].to(device)
        with distributed.autocast(bf16):
            latents.append(tokenizer.normalize(tokenizer.encode(x).float()).cpu())
            if reference is not None:
                feats.append(reference.features(x).float().cpu())
        labels.append(batch["label"].long())
    return torch.cat(latents), (torch.cat(feats) if reference is not None else None), torch.cat(labels)


def semantic_metrics(
    tokenizer: Tokenizer,
    train: ImageDataset,
    test: ImageDataset,
    *,
    num: int | None = None,
    batch_size: int = 64,
    bf16: bool = False,
    seed: int = 0,
    reference: EncoderConfig | None = None,
) -> dict[str, Any]:
    """Linear probe and k-NN (trained on `train` latents, scored on `test`), CKNNA on `test`: `cknna` (Huh et
    al.'s) and, beside it, `cknna_centered_mask` (our earlier estimator, docs/metrics.md).

    Latents are the normalised ones the DiT sees; CKNNA compares them, flattened, with the flattened
    features of `reference_encoder(config, reference)` on the same `test` images, at k = 10 (capped at
    N - 1). `num` caps the images per split (a seeded subset). Runs on the tokenizer's device.
    """
    device = next(tokenizer.parameters()).device
    ref_cfg = reference if reference is not None else reference_encoder_config(tokenizer.config)
    ref_net = reference_encoder(tokenizer.config, ref_cfg).to(device)
    num_classes = len(train.classes)
    tr_idx = eval_indices(len(train), num, seed=seed)
    te_idx = eval_indices(len(test), num, seed=seed)
    kw: dict[str, Any] = {"batch_size": batch_size, "bf16": bf16}
    z_tr, _, y_tr = _encode(tokenizer, train, tr_idx, reference=None, desc="latents (train)", **kw)
    z_te, f_te, y_te = _encode(tokenizer, test, te_idx, reference=ref_net, desc="latents (test)", **kw)
    assert f_te is not None
    z_tr, y_tr, z_te, y_te = z_tr.to(device), y_tr.to(device), z_te.to(device), y_te.to(device)
    probe = linear_probe(z_tr, y_tr, z_te, y_te, num_classes=num_classes, seed=seed)
    knn = knn_accuracy(z_tr, y_tr, z_te, y_te, k=KNN_K)
    k = min(CKNNA_K, len(te_idx) - 1)
    ok = len(te_idx) >= CKNNA_MIN_ITEMS
    f_te = f_te.to(device)
    return {
        "probe_accuracy": probe["accuracy"],
        "probe_balanced": probe["balanced_accuracy"],
        "probe_train_accuracy": probe["train_accuracy"],
        "knn_accuracy": knn["accuracy"],
        "knn_balanced": knn["balanced_accuracy"],
        "knn_k": knn["k"],
        # Huh et al.'s CKNNA, and beside it our earlier estimator (the "cknna" of records made before it).
        "cknna": cknna(z_te, f_te, k=k) if ok else float("nan"),
        "cknna_centered_mask": cknna_centered_mask(z_te, f_te, k=k) if ok else float("nan"),
        "cknna_k": k,
        "num_train_images": len(tr_idx),
        "num_test_images": len(te_idx),
        "reference_encoder": to_dict(ref_cfg),
    }


def tokenizer_metrics(
    tokenizer_dir: str | Path, data: str | Path, *, num: int | None, bf16: bool, out: Path
) -> dict[str, Any]:
    """`evaluate_tokenizer`'s result at `out`, computed (and written there by it) only when `out` is missing:
    the resumable step of the demo and the reproduction study. A record whose "cknna" is the earlier
    masked-centred estimator (it has no "cknna_centered_mask") is measured again, not mixed with new ones."""
    if out.is_file():
        record = json.loads(out.read_text())
        if "cknna" not in record or "cknna_centered_mask" in record:
            return record
        warnings.warn(f"{out} holds the earlier CKNNA estimator under 'cknna': measuring again", stacklevel=2)
    return evaluate_tokenizer(tokenizer_dir, data, num=num, bf16=bf16, out=out)


def format_table(result: dict[str, Any]) -> str:
    """Two aligned columns, metric and value; floats to 4 significant digits, dicts as k=v (None left out)."""
    width = max(len(k) for k in result)
    rows = []
    for key, value in result.items():
        if isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, dict):
            text = " ".join(f"{k}={v}" for k, v in value.items() if v is not None)
        else:
            text = str(value)
        rows.append(f"{key:<{width}}  {text}")
    return "\n".join(rows)


def evaluate_tokenizer(
    tokenizer_dir: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    num: int | None = None,
    probe: bool = True,
    batch_size: int = 64,
    bf16: bool = False,
    out: str | Path | None = None,
    reference: EncoderConfig | None = None,
) -> dict[str, Any]:
    """rFID, PSNR, SSIM, LPIPS on `split`; probe, k-NN (train split -> `split`) and CKNNA unless not `probe`.

    `num` caps the images of each split (a seeded subset, the same for every tokenizer); `reference` is the
    encoder CKNNA compares with (default: `reference_encoder_config`). Writes JSON to
    `out` (default `<tokenizer_dir>/../report/tokenizer_eval.json`), prints a table, returns the dict.
    """
    t0 = time.time()
    tokenizer = load_tokenizer(tokenizer_dir)
    resolution = tokenizer.config.image_size
    test = build_dataset(data, split=split, resolution=resolution)
    if isinstance(test, torch.utils.data.IterableDataset):
        raise ValueError(
            f"tokenizer eval draws seeded subsets, which {data} (streamed shards) cannot give; "
            "pass its image folder"
        )
    result: dict[str, Any] = {
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "data": str(data),
        "split": split,
    }
    recon = reconstruction_metrics(tokenizer, test, num=num, batch_size=batch_size, bf16=bf16)
    result.update({k: v for k, v in recon.items() if k != "wall_s"})
    if probe:
        train = build_dataset(data, split="train", resolution=resolution)
        kw: dict[str, Any] = {"batch_size": batch_size, "bf16": bf16, "reference": reference}
        result.update(semantic_metrics(tokenizer, train, test, num=num, **kw))
    result["wall_s"] = round(time.time() - t0, 2)
    path = (
        Path(out)
        if out is not None
        else Path(tokenizer_dir).resolve().parent / "report" / "tokenizer_eval.json"
    )
    write_json(result, path)
    print(format_table(result))
    print(f"tokenizer metrics written to {path}")
    return result


__all__ = [
    "evaluate_tokenizer",
    "format_table",
    "reference_encoder",
    "semantic_metrics",
]
