"""The FID InceptionV3 and the features it gives: (B, 3, H, W) images -> pool3 features (B, 2048).

The network is the standard FID InceptionV3 (the TF `inception-2015-12-05` graph ported to TorchScript,
asset `fid-inception`). Reading its TorchScript code shows what the file does and does not do: it
asserts 3 channels, runs the conv stack to `mixed_10` (8x8x2048 at 299 px), average-pools 8x8 and
reshapes to (B, 2048): the pool3 features. It does not resize and does not normalise, and it carries no
softmax layer (21,802,784 parameters: the convolutions only; the TF graph's 2048 -> 1008 FC would add
2,065,392). Our wrapper therefore does the TF graph's preprocessing itself:

    uint8 image -> x / 255 in [0, 1] -> bilinear resize to 299x299 (align_corners=False, no antialias)
    -> x * 1.9921875 - 1, i.e. (255 x - 128) / 128 in [-1, 0.9921875], the TF graph's Sub/Mul.

Images enter as uint8: the canonical form of samples is the uint8 PNG / ADM `.npz` a sampler writes, so a
float tensor in [0, 1] is first rounded to uint8 exactly as `files.to_uint8` does when samples are saved.
Features of in-memory samples and of the same samples read back from disk are then identical. Without a
softmax layer the Inception Score cannot be computed from this file; `InceptionFeatures` takes an optional
1008-way head (weight (1008, 2048), bias (1008,)) for when one is available, and `metrics.fid.inception_score`
works on any logits.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from aligntok import assets, distributed
from aligntok.files import to_uint8

INCEPTION_ASSET = "fid-inception"
INCEPTION_FILE = "inception.pt"
INCEPTION_SIZE = 299
POOL_DIM = 2048
LOGITS_DIM = 1008
# The TF graph maps a uint8 value v to (v - 128) / 128; on x = v / 255 that is x * 255/128 - 1.
_INPUT_SCALE = 255.0 / 128.0  # = 1.9921875


class FIDError(ValueError):
    """Bad input to a generation metric (wrong image shape, mismatched features, unreadable file)."""


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return assets.sha256_file(Path(path))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) so repeated cache look-ups hash it once."""
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def load_torchscript(path: str | Path, map_location: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """`torch.jit.load` with its deprecation warning (torch >= 2.13) silenced for this call only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=map_location)


class InceptionFeatures(nn.Module):
    """The FID InceptionV3 with the TF graph's preprocessing: (B, 3, H, W) in [0, 1] -> pool3 (B, 2048).

    `head`, when given, maps pool features to the TF graph's 1008 logits (for the Inception Score); the
    stock asset has none (see the module docstring). `sha256` identifies the network file: cached
    reference statistics are keyed by it.
    """

    def __init__(self, net: nn.Module, *, sha256: str, head: nn.Linear | None = None) -> None:
        super().__init__()
        self.net = net
        self.sha256 = sha256
        if head is not None and (head.in_features, head.out_features) != (POOL_DIM, LOGITS_DIM):
            raise FIDError(f"Inception head must map {POOL_DIM} -> {LOGITS_DIM}, got {head}")
        self.head = head
        self.eval()

    @classmethod
    def from_assets(cls, *, device: torch.device | str | None = None) -> InceptionFeatures:
        """The network from the `fid-inception` asset (AssetError with the fetch command if missing)."""
        path = assets.require(INCEPTION_ASSET) / INCEPTION_FILE
        device = torch.device(device) if device is not None else distributed.device()
        return cls(load_torchscript(path, map_location=device), sha256=file_sha256(path))

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 0.9921875], float32 (the TF graph's input)."""
        x = images.float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return x * _INPUT_SCALE - 1.0

    def forward(
        self, images: torch.Tensor, *, bf16: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pool features (B, 2048) and logits (B, 1008) or None, float32; bf16 autocasts the network only."""
        x = self.preprocess(images)
        with distributed.autocast(bf16, device_type=x.device.type):
            pool = self.net(x).float()
        logits = self.head(pool) if self.head is not None else None
        return pool, logits


def inception_sha256() -> str:
    """sha256 of the fetched Inception file (AssetError with the fetch command when it is missing)."""
    return file_sha256(assets.require(INCEPTION_ASSET) / INCEPTION_FILE)


# ---------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Features:
    """Inception features of N images: pool (N, 2048) float64 and logits (N, 1008) float64 or None."""

    pool: np.ndarray
    logits: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.pool = np.asarray(self.pool, dtype=np.float64)
        if self.pool.ndim != 2:
            raise FIDError(f"pool features must be (N, D), got shape {self.pool.shape}")
        if self.logits is not None:
            self.logits = np.asarray(self.logits, dtype=np.float64)
            if len(self.logits) != len(self.pool):
                raise FIDError(f"{len(self.logits)} logits for {len(self.pool)} pool features")

    def __len__(self) -> int:
        return len(self.pool)

    def subset(self, index: np.ndarray | slice) -> Features:
        """The features of the selected images."""
        return Features(self.pool[index], None if self.logits is None else self.logits[index])


def _as_uint8_nchw(batch: object) -> torch.Tensor:
    """One batch of images, in any accepted form, as a uint8 tensor (B, 3, H, W)."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise FIDError(f"a dict batch needs an 'image' entry, got keys {sorted(batch)}")
        batch = batch["image"]
    if isinstance(batch, np.ndarray):
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise FIDError(
                f"numpy images must be uint8 (N, H, W, 3) as in ADM .npz files, "
                f"got {batch.dtype} {batch.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    if isinstance(batch, torch.Tensor):
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise FIDError(f"image tensors must be (N, 3, H, W), got shape {tuple(batch.shape)}")
        if batch.dtype == torch.uint8:
            return batch
        if not batch.is_floating_point():
            raise FIDError(f"image tensors must be uint8 or float in [0, 1], got {batch.dtype}")
        # Quantise as samples are saved (files.to_uint8), so in-memory and on-disk samples agree.
        return torch.from_numpy(to_uint8(batch)).permute(0, 3, 1, 2)
    raise FIDError(f"cannot read images from a {type(batch).__name__}; pass a tensor, an array or batches")


def _batches(source: object, batch_size: int) -> Iterable[object]:
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return (source[i : i + batch_size] for i in range(0, len(source), batch_size))
    return source  # an iterable of batches (a DataLoader, a generator, a list)


@torch.no_grad()
def extract_features(
    source: torch.Tensor | np.ndarray | Iterable,
    *,
    batch_size: int = 50,
    bf16: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    model: InceptionFeatures | None = None,
) -> Features:
    """Inception features of images.

    `source`: a float tensor (N, 3, H, W) in [0, 1] (rounded to uint8 first, see the module docstring), a
    uint8 tensor (N, 3, H, W), a uint8 array (N, H, W, 3), or an iterable of such batches (also dicts with
    an "image" entry, as a DataLoader over our datasets yields; they keep their own batch size). Any H, W:
    images go to 299 px.
    `model` defaults to `InceptionFeatures.from_assets(device=device)`.
    """
    if batch_size < 1:
        raise FIDError(f"batch_size must be >= 1, got {batch_size}")
    model = model if model is not None else InceptionFeatures.from_assets(device=device)
    dev = next(model.net.parameters()).device
    total = len(source) if isinstance(source, (torch.Tensor, np.ndarray)) else None
    pools, logits = [], []
    with tqdm(total=total, desc="inception", unit="img", disable=not progress) as bar:
        for batch in _batches(source, batch_size):
            x = _as_uint8_nchw(batch)
            if len(x) == 0:
                continue
            pool, logit = model(x.to(dev).float().div_(255.0), bf16=bf16)
            pools.append(pool.double().cpu().numpy())
            if logit is not None:
                logits.append(logit.double().cpu().numpy())
            bar.update(len(x))
    if not pools:
        raise FIDError("no images to extract features from")
    return Features(np.concatenate(pools), np.concatenate(logits) if logits else None)
