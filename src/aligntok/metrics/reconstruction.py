"""Reconstruction quality of a tokenizer: PSNR, SSIM, LPIPS and rFID on a dataset's images.

docs/method.md, "Evaluation protocol": rFID on the validation set (AlignTok: rFID 0.26, PSNR 25.8 on
ImageNet 256).
Reconstructions are measured as they would be saved: clamped to [0, 1] and rounded to uint8
(`files.to_uint8`) before any metric, so the numbers are those of the PNGs a user would look at and
rFID sees the same kind of input as gFID. The originals come from 8-bit files and are exact in uint8.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from aligntok import distributed
from aligntok.files import to_uint8
from aligntok.models.lpips import LPIPS

if TYPE_CHECKING:
    from aligntok.metrics.inception import InceptionFeatures
    from aligntok.models.tokenizer import Tokenizer

# Wang et al. 2004 ("Image quality assessment: from error visibility to structural similarity", sec. III-C):
# an 11x11 circular-symmetric Gaussian window with standard deviation 1.5 and K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: Tensor, y: Tensor, what: str) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"{what} needs two (B, C, H, W) batches of equal shape, got {x.shape} and {y.shape}")


def psnr(x: Tensor, y: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image (B,): 10 log10(range^2 / MSE) over all pixels and channels.

    Both batches are clamped to [0, data_range] first; identical images give +inf.
    """
    _check_pair(x, y, "psnr")
    x, y = x.double().clamp(0, data_range), y.double().clamp(0, data_range)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(device: torch.device) -> Tensor:
    r = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(r**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()  # (11,); the 2D window is its outer product (separable)


def ssim(x: Tensor, y: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Structural similarity per image (B,) (Wang et al. 2004, eq. 13), in float64.

    Local means, variances and covariance come from the Gaussian window (11, sigma 1.5) over the positions
    where it fits inside the image (no padding, as in the authors' reference code); the SSIM map is averaged
    over those positions and over the channels (each RGB channel on its own, no colour conversion, no
    downsampling). C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = data_range; inputs clamped to [0, L].
    """
    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} px, got {tuple(x.shape)}"
        )
    x, y = x.double().clamp(0, data_range), y.double().clamp(0, data_range)
    b, c = x.shape[:2]
    g = _gaussian_window(x.device)

    def blur(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H - 10, W - 10), per channel
        t = t.reshape(b * c, 1, *t.shape[-2:])
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        t = F.conv2d(t, g.view(1, 1, -1, 1))
        return t.reshape(b, c, *t.shape[-2:])

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def lpips(x: Tensor, y: Tensor, *, net: LPIPS | None = None) -> Tensor:
    """LPIPS v0.1 (VGG) distance per image (B,) between images in [0, 1]; `net` reuses a loaded model."""
    _check_pair(x, y, "lpips")
    net = net if net is not None else LPIPS.from_assets("vgg").to(x.device)
    with torch.no_grad():
        return net(x.float(), y.float())


def rfid(
    originals: Any,
    reconstructions: Any,
    *,
    batch_size: int = 50,
    bf16: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
    model: InceptionFeatures | None = None,
) -> float:
    """FID between originals and reconstructions, both through the FID stack's Inception features.

    Each argument is anything `metrics.inception.extract_features` takes: a (N, 3, H, W) tensor in [0, 1], a
    uint8 NHWC array, or an iterable of such batches. The Inception network is loaded once for both (or
    `model`).
    """
    from aligntok.metrics.fid import fid_from_stats, stats_from_features
    from aligntok.metrics.inception import InceptionFeatures, extract_features

    model = model if model is not None else InceptionFeatures.from_assets(device=device)
    kw: dict[str, Any] = {"batch_size": batch_size, "bf16": bf16, "progress": progress, "model": model}
    real = stats_from_features(extract_features(originals, **kw))
    fake = stats_from_features(extract_features(reconstructions, **kw))
    return float(fid_from_stats(real, fake))


def eval_indices(n: int, num: int | None, *, seed: int = 0) -> list[int]:
    """The dataset items an evaluation uses: all n, or `num` drawn without replacement with `seed`, sorted.

    A seeded random subset rather than the first `num`: datasets are often stored class by class.
    """
    if num is None or num >= n:
        return list(range(n))
    if num < 1:
        raise ValueError(f"num must be a positive number of images, got {num}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:num].tolist())


def _uint8_to_float(images: np.ndarray, device: torch.device) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1] on `device`."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def reconstructed(
    tokenizer: Tokenizer, images: Dataset, *, batch_size: int = 64, bf16: bool = False, progress: bool = True
) -> Iterator[tuple[Tensor, np.ndarray]]:
    """Batch by batch, `images`' "image"s (B, 3, H, W) in [0, 1] on the tokenizer's device and their
    reconstructions as saved (uint8 (B, H, W, 3), module docstring); the tokenizer runs under bf16
    autocast when `bf16`."""
    device = next(tokenizer.parameters()).device
    for batch in tqdm(DataLoader(images, batch_size=batch_size), desc="reconstructing", disable=not progress):
        x = batch["image"].to(device)
        with distributed.autocast(bf16):
            recon = tokenizer.decode(tokenizer.encode(x))
        yield x, to_uint8(recon.float())


@torch.no_grad()
def reconstruction_metrics(
    tokenizer: Tokenizer,
    dataset: Dataset,
    *,
    num: int | None = None,
    batch_size: int = 64,
    bf16: bool = False,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """PSNR, SSIM, LPIPS (means of per-image values) and rFID of `tokenizer` on `dataset`'s "image"s.

    Uses `indices` if given, else `eval_indices(len(dataset), num, seed=seed)`. Reconstructions are
    clamped and rounded to uint8 before every metric (module docstring). The tokenizer pass runs under
    bf16 autocast when `bf16`; LPIPS, PSNR and SSIM are computed in float32/float64. The tokenizer runs
    once: its reconstructions are measured while the FID stack reads them; the originals are read again
    from the dataset for their Inception features. Keys: psnr, ssim, lpips, rfid, num_images, wall_s.
    """
    t0 = time.time()
    device = next(tokenizer.parameters()).device
    idx = list(indices) if indices is not None else eval_indices(len(dataset), num, seed=seed)
    if not idx:
        raise ValueError("reconstruction_metrics got no images to evaluate; pass a non-empty dataset")
    subset = Subset(dataset, idx)
    net = LPIPS.from_assets("vgg").to(device)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    count = 0

    def reconstructions() -> Iterator[np.ndarray]:
        nonlocal count
        for x, saved in reconstructed(tokenizer, subset, batch_size=batch_size, bf16=bf16, progress=progress):
            r = _uint8_to_float(saved, device)
            sums["psnr"] += float(psnr(r, x).sum())
            sums["ssim"] += float(ssim(r, x).sum())
            sums["lpips"] += float(lpips(r, x, net=net).sum())
            count += len(x)
            yield saved

    def originals() -> Iterator[np.ndarray]:
        for batch in DataLoader(subset, batch_size=batch_size):
            yield to_uint8(batch["image"])

    fid = rfid(
        originals(), reconstructions(), batch_size=batch_size, bf16=bf16, device=device, progress=progress
    )
    assert count == len(idx), (count, len(idx))
    out: dict[str, Any] = {k: v / count for k, v in sums.items()}
    out.update(rfid=fid, num_images=count, wall_s=round(time.time() - t0, 2))
    return out


__all__ = [
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "eval_indices",
    "lpips",
    "psnr",
    "reconstructed",
    "reconstruction_metrics",
    "rfid",
    "ssim",
]
