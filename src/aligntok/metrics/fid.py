"""Generation metrics on Inception features: FID, KID, Inception Score, precision/recall.

The network is the standard FID InceptionV3 (the TF `inception-2015-12-05` graph ported to TorchScript,
asset `fid-inception`). Reading its TorchScript code shows what the file does and does not do: it
asserts 3 channels, runs the conv stack to `mixed_10` (8x8x2048 at 299 px), average-pools 8x8 and
reshapes to (B, 2048): the pool3 features. It does not resize and does not normalise, and it carries no
softmax layer (21,802,784 parameters: the convolutions only; the TF graph's 2048 -> 1008 FC would add
2,065,392). Our wrapper therefore does the TF graph's preprocessing itself:

    uint8 image -> x / 255 in [0, 1] -> bilinear resize to 299x299 (align_corners=False, no antialias)
    -> x * 1.9921875 - 1, i.e. (255 x - 128) / 128 in [-1, 0.9921875], the TF graph's Sub/Mul.

Images enter as uint8: the canonical form of samples is the uint8 PNG / ADM `.npz` a sampler writes, so a
float tensor in [0, 1] is first rounded to uint8 exactly as `report.to_uint8` does when samples are saved.
Features of in-memory samples and of the same samples read back from disk are then identical. Without a
softmax layer the Inception Score cannot be computed from this file; `InceptionFeatures` takes an optional
1008-way head (weight (1008, 2048), bias (1008,)) for when one is available, and `inception_score` works on
any logits.

FID (Heusel et al. 2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), all in float64. Three ways to
get Tr((S1 S2)^{1/2}) are implemented and tested to agree:
- "eigh" (the default for statistics): S1 S2 is similar to the symmetric PSD matrix sqrt(S1) S2 sqrt(S1),
  so the trace is the sum of square roots of that matrix's eigenvalues. Symmetric eigensolvers only, no
  complex arithmetic, no eps, accurate for singular covariances (N < 2048).
- "sqrtm": scipy.linalg.sqrtm of S1 S2, as the ADM and pytorch-fid evaluators do; when the result is not
  finite, has a significant imaginary part, or does not square back to S1 S2, eps * I is added to both
  covariances (the reference implementations' fix) and a warning says so.
- "gram" (features only; chosen by `fid` when both sets have at most D images): with S_i = A_i^T A_i
  (A_i the centred features / sqrt(N_i - 1)), the nonzero eigenvalues of S1 S2 are the squared singular
  values of A1 A2^T, so the trace is the nuclear norm of that N1 x N2 matrix; no D x D matrix is formed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from aligntok import assets, distributed
from aligntok.report import to_uint8

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
        # Quantise as samples are saved (report.to_uint8), so in-memory and on-disk samples agree.
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


# ---------------------------------------------------------------------------------------------------------
# Statistics and FID
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """Gaussian statistics of features: mean (D,), covariance (D, D), number of images."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int = 0

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64).reshape(-1)
        self.sigma = np.atleast_2d(np.asarray(self.sigma, dtype=np.float64))
        if self.sigma.shape != (len(self.mu), len(self.mu)):
            raise FIDError(f"sigma {self.sigma.shape} does not match mu ({len(self.mu)},)")

    def save(self, path: str | Path) -> None:
        """Write an .npz with keys `mu`, `sigma` (as the ADM reference batches) and `num`."""
        np.savez(path, mu=self.mu, sigma=self.sigma, num=np.int64(self.num))

    @classmethod
    def load(cls, path: str | Path) -> Stats:
        """Read `mu`, `sigma` (and `num` when present) from an .npz."""
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise FIDError(f"{path} has no mu/sigma arrays (keys: {', '.join(f.files)})")
            return cls(f["mu"], f["sigma"], int(f["num"]) if "num" in f else 0)


def _pool(x: Features | np.ndarray) -> np.ndarray:
    return x.pool if isinstance(x, Features) else np.asarray(x, dtype=np.float64)


def stats_from_features(features: Features | np.ndarray) -> Stats:
    """Mean and unbiased covariance (np.cov, N - 1) of pool features, in float64."""
    pool = _pool(features)
    if len(pool) < 2:
        raise FIDError(f"FID statistics need at least 2 images, got {len(pool)}")
    return Stats(pool.mean(axis=0), np.cov(pool, rowvar=False), len(pool))


def _drop_rounding(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those at rounding level (below D * eps * max, numpy's rank
    threshold) set to 0: their square roots, ~1e-8 each, would otherwise add up over a singular
    covariance's null space."""
    return np.where(w > len(w) * np.finfo(w.dtype).eps * max(w.max(), 0.0), w, 0.0)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigh."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(_drop_rounding(w))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) via eigenvalues of the symmetric sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2)."""
    r = _sym_sqrt(s1)
    m = r @ s2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_drop_rounding(ev)).sum())


def _sqrtm_checked(a: np.ndarray) -> tuple[np.ndarray, str | None]:
    """scipy's sqrtm of a and what is wrong with it (None when it is a good square root)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular input; we check the result ourselves
        root = scipy.linalg.sqrtm(a)
    if not np.isfinite(root).all():
        return root, "non-finite entries"
    scale = max(np.abs(np.diagonal(a)).max(), 1e-300)
    imag = np.abs(np.diagonal(root).imag).max() if np.iscomplexobj(root) else 0.0
    if imag > 1e-3 * math.sqrt(scale):
        return root, f"imaginary part {imag:.2e} on the diagonal"
    resid = np.linalg.norm(root @ root - a) / max(np.linalg.norm(a), 1e-300)
    if resid > 1e-4:
        return root, f"relative residual ||X^2 - S1 S2|| = {resid:.2e}"
    return root, None


def trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, *, eps: float = 1e-6) -> float:
    """Tr((S1 S2)^{1/2}) by scipy.linalg.sqrtm, with eps * I added to both covariances when it fails."""
    root, problem = _sqrtm_checked(s1 @ s2)
    if problem is not None:
        offset = np.eye(len(s1)) * eps
        root, still = _sqrtm_checked((s1 + offset) @ (s2 + offset))
        warnings.warn(
            f"FID: sqrtm(S1 S2) was inaccurate ({problem}); added {eps:g} * I to both covariances"
            + (f", still inaccurate ({still})" if still else ""),
            RuntimeWarning,
            stacklevel=3,
        )
    return float(np.trace(root).real)


def fid_from_stats(a: Stats, b: Stats, *, method: str = "eigh", eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians `a` and `b` (float64); method "eigh" (default) or "sqrtm"."""
    if a.mu.shape != b.mu.shape:
        raise FIDError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    if method == "eigh":
        tr_covmean = trace_sqrt_product(a.sigma, b.sigma)
    elif method == "sqrtm":
        tr_covmean = trace_sqrt_product_sqrtm(a.sigma, b.sigma, eps=eps)
    else:
        raise FIDError(f"unknown FID method {method!r} for statistics; use 'eigh' or 'sqrtm'")
    diff = a.mu - b.mu
    fid = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)
    # Rounding can leave a tiny negative value for identical statistics; a distance is never negative.
    return max(fid, 0.0)


def _gram_fid(a: np.ndarray, b: np.ndarray) -> float:
    ca = (a - a.mean(0)) / math.sqrt(len(a) - 1)  # S_a = ca^T ca
    cb = (b - b.mean(0)) / math.sqrt(len(b) - 1)
    tr_covmean = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    return max(float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2.0 * tr_covmean), 0.0)


def fid(a: Features | np.ndarray, b: Features | np.ndarray, *, method: str | None = None) -> float:
    """FID between two feature sets; `method` None picks "gram" when neither set has more images than
    feature dimensions (exact and cheaper there), else "eigh"."""
    pa, pb = _pool(a), _pool(b)
    if pa.shape[1] != pb.shape[1]:
        raise FIDError(f"feature dimensions differ: {pa.shape[1]} vs {pb.shape[1]}")
    if min(len(pa), len(pb)) < 2:
        raise FIDError(f"FID needs at least 2 images per set, got {len(pa)} and {len(pb)}")
    if method is None:
        method = "gram" if max(len(pa), len(pb)) <= pa.shape[1] else "eigh"
    if method == "gram":
        return _gram_fid(pa, pb)
    return fid_from_stats(stats_from_features(pa), stats_from_features(pb), method=method)


# ---------------------------------------------------------------------------------------------------------
# KID, Inception Score, precision/recall
# ---------------------------------------------------------------------------------------------------------


def kid(
    feats_a: Features | np.ndarray,
    feats_b: Features | np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std over subsets of the unbiased MMD^2
    with the polynomial kernel k(x, y) = (x.y / d + 1)^3. Subsets are capped at the smaller set's size."""
    a, b = _pool(feats_a), _pool(feats_b)
    if a.shape[1] != b.shape[1]:
        raise FIDError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise FIDError(f"KID needs at least 2 images per set, got {len(a)} and {len(b)}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        # Unbiased MMD^2 (Gretton et al. 2012, eq. 3): the within-set sums leave out the diagonal.
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[s] = within - 2 * kxy.sum() / (m * m)
    return float(values.mean()), float(values.std())


def inception_score(logits: Features | np.ndarray, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over `splits`."""
    if isinstance(logits, Features):
        if logits.logits is None:
            raise FIDError("these features carry no logits; the Inception network has no softmax head")
        logits = logits.logits
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or len(z) < splits:
        raise FIDError(f"need (N, K) logits with N >= splits={splits}, got shape {z.shape}")
    log_p = z - scipy.special.logsumexp(z, axis=1, keepdims=True)  # log p(y|x)
    scores = []
    for part in np.array_split(log_p, splits):
        log_py = scipy.special.logsumexp(part, axis=0) - math.log(len(part))  # log of the split's p(y)
        kl = (np.exp(part) * (part - log_py)).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# Distance blocks are (rows, N) float32; rows are chosen so one block stays near this many bytes.
_BLOCK_BYTES = 256 * 2**20


def _distance_blocks(queries: torch.Tensor, points: torch.Tensor) -> Iterable[tuple[int, torch.Tensor]]:
    """(start, Euclidean distances from queries[start : start + rows] to all points) in row blocks."""
    rows = max(1, _BLOCK_BYTES // (4 * len(points)))
    sq_points = points.pow(2).sum(1)
    for start in range(0, len(queries), rows):
        q = queries[start : start + rows]
        d2 = q.pow(2).sum(1, keepdim=True) + sq_points[None] - 2.0 * (q @ points.T)
        yield start, d2.clamp_min_(0.0).sqrt_()


def _knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour among the others (self counted at 0)."""
    radii = torch.empty(len(points), dtype=points.dtype, device=points.device)
    for start, d in _distance_blocks(points, points):
        radii[start : start + len(d)] = d.kthvalue(k + 1, dim=1).values
    return radii


def _coverage(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of queries inside at least one ball (points, radii)."""
    inside = 0
    for _, d in _distance_blocks(queries, points):
        inside += int((d <= radii[None]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(
    real: Features | np.ndarray,
    fake: Features | np.ndarray,
    *,
    k: int = 3,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN-ball manifolds.

    Precision: the fraction of fake samples inside the real manifold (the union of balls around real
    samples reaching their k-th nearest real neighbour); recall: the same with the roles swapped.
    Distances are float32 and computed in row blocks of ~256 MB, so 50k x 50k never materialises.
    """
    r = torch.as_tensor(_pool(real), dtype=torch.float32, device=device)
    f = torch.as_tensor(_pool(fake), dtype=torch.float32, device=device)
    if r.shape[1] != f.shape[1]:
        raise FIDError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
    if min(len(r), len(f)) <= k:
        raise FIDError(f"precision/recall with k={k} needs more than {k} images per set")
    precision = _coverage(f, r, _knn_radii(r, k))
    recall = _coverage(r, f, _knn_radii(f, k))
    return precision, recall


# ---------------------------------------------------------------------------------------------------------
# Reference features, cached
# ---------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where reference features are cached: `home()/fid_refs`."""
    return assets.home() / "fid_refs"


def inception_sha256() -> str:
    """sha256 of the fetched Inception file (AssetError with the fetch command when it is missing)."""
    return file_sha256(assets.require(INCEPTION_ASSET) / INCEPTION_FILE)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "x"


def _dataset_id(spec: str | Path) -> str:
    """A file-name-safe id of a dataset spec; a folder's id also hashes its path and its file listing, so
    added, removed or rewritten images give a new cache entry."""
    from aligntok.data import DATASETS
    from aligntok.data.folder import images_under

    name = str(spec)
    if name in DATASETS:
        return name
    folder = Path(name).expanduser().resolve()
    digest = hashlib.sha256(str(folder).encode())
    if folder.is_dir():
        for p in sorted(folder.glob("*.tar")) + images_under(folder):  # shards or images
            st = p.stat()
            digest.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{_safe(folder.name)}-{digest.hexdigest()[:12]}"


def _save_features(path: Path, features: Features, meta: dict) -> None:
    """Atomic write: pool as float32 (the network's own precision, half the bytes), logits, meta JSON."""
    arrays = {"pool": features.pool.astype(np.float32), "meta": np.array(json.dumps(meta))}
    if features.logits is not None:
        arrays["logits"] = features.logits.astype(np.float32)
    with assets.atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # a file object: np.savez would append .npz to a path


def _load_features(path: Path) -> Features:
    with np.load(path) as f:
        return Features(f["pool"], f.get("logits"))


def _cached(
    key: dict,
    compute: Callable[[InceptionFeatures | None], Features],
    *,
    model: InceptionFeatures | None,
    bf16: bool,
) -> Features:
    """Features for `key` from the cache, or computed by `compute(model)`, stored and returned.

    The key always holds the Inception file's sha256 and the precision, so a changed network or bf16
    features never stand in for others.
    """
    sha = model.sha256 if model is not None else inception_sha256()
    key = {**key, "bf16": bf16, "inception_sha256": sha}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{_safe(str(key['source']))}-{digest}.npz"
    if path.is_file():
        try:
            features = _load_features(path)
            if features.logits is not None or model is None or model.head is None:
                return features
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"ignoring unreadable cached features {path} ({e}); recomputing", stacklevel=3)
    features = compute(model)
    _save_features(path, features, key)
    return features


def reference_indices(n: int, num: int, *, seed: int) -> list[int]:
    """Which `num` of `n` dataset items `reference_features(num=num, seed=seed)` reads, in dataset order."""
    return np.sort(np.random.default_rng(seed).choice(n, num, replace=False)).tolist()


def reference_features(
    spec: str | Path,
    *,
    split: str = "train",
    resolution: int,
    num: int | None = None,
    seed: int = 0,
    batch_size: int = 50,
    bf16: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    model: InceptionFeatures | None = None,
) -> Features:
    """Inception features of a dataset (a name or an image folder), cached under `home()/fid_refs/`.

    `num` takes a random subset (drawn with `seed`, kept in dataset order) instead of the whole split.
    The cache key is (dataset, split, resolution, num, seed, bf16, Inception sha256): the network runs
    only the first time.
    """
    from aligntok.data import build_dataset

    key = {
        "source": _dataset_id(spec),
        "split": split,
        "resolution": resolution,
        "num": num,
        "seed": seed if num is not None else None,
    }

    def compute(model: InceptionFeatures | None) -> Features:
        ds = build_dataset(spec, split=split, resolution=resolution)
        if num is not None and isinstance(ds, torch.utils.data.IterableDataset):
            raise FIDError(f"{spec} is streamed (shards): use all of it (no --num) or its image folder")
        if num is not None and not 1 <= num <= len(ds):
            raise FIDError(f"num={num} images asked of {spec} {split}, which has {len(ds)}; lower num")
        items: object = ds
        if num is not None and num < len(ds):
            items = torch.utils.data.Subset(ds, reference_indices(len(ds), num, seed=seed))
        images = (b["image"] for b in torch.utils.data.DataLoader(items, batch_size=batch_size))
        return extract_features(
            images, batch_size=batch_size, bf16=bf16, device=device, progress=progress, model=model
        )

    return _cached(key, compute, model=model, bf16=bf16)


def npz_images(path: str | Path) -> np.ndarray | None:
    """The uint8 (N, H, W, 3) images under `arr_0` of an ADM-format .npz, or None when it has none."""
    with np.load(path) as f:
        if "arr_0" not in f:
            return None
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise FIDError(f"{path}: arr_0 must be uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    return images


def npz_features(
    path: str | Path,
    *,
    batch_size: int = 50,
    bf16: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    model: InceptionFeatures | None = None,
) -> Features:
    """Inception features of the `arr_0` images of an .npz, cached by the file's sha256."""
    path = Path(path)
    key = {"source": path.stem, "npz_sha256": file_sha256(path)}

    def compute(model: InceptionFeatures | None) -> Features:
        images = npz_images(path)
        if images is None:
            raise FIDError(f"{path} has no arr_0 images to extract features from")
        return extract_features(
            images, batch_size=batch_size, bf16=bf16, device=device, progress=progress, model=model
        )

    return _cached(key, compute, model=model, bf16=bf16)


@dataclass
class Reference:
    """What a reference provides: stored statistics (ADM `mu`/`sigma`), features of its images, or both.

    FID uses the features when present (one pipeline for both sides), else the stored statistics.
    `image_size` is (H, W) of its images, None when only statistics are known.
    """

    name: str
    features: Features | None
    stats: Stats | None
    image_size: tuple[int, int] | None


def load_reference(
    path_or_spec: str | Path,
    *,
    resolution: int | None = None,
    split: str = "train",
    num: int | None = None,
    seed: int = 0,
    batch_size: int = 50,
    bf16: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    model: InceptionFeatures | None = None,
) -> Reference:
    """A reference for the metrics: an ADM reference-batch .npz (keys `mu`, `sigma` and/or uint8 `arr_0`)
    or a dataset spec (a name or an image folder; then `resolution` is required).

    From an .npz with images, features are computed from `arr_0` (cached) with our preprocessing; stored
    `mu`/`sigma` are read too, but used for FID only when the file has no images.
    """
    kwargs = {"batch_size": batch_size, "bf16": bf16, "device": device, "progress": progress, "model": model}
    p = Path(path_or_spec).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise FIDError(f"reference {p} does not exist; pass an ADM .npz or a dataset name/folder")
        with np.load(p) as f:
            stats = Stats(f["mu"], f["sigma"]) if "mu" in f and "sigma" in f else None
            shape = f["arr_0"].shape if "arr_0" in f else None
        if stats is None and shape is None:
            raise FIDError(f"{p} has neither mu/sigma nor arr_0 images; it is not an ADM reference batch")
        features = npz_features(p, **kwargs) if shape is not None else None
        if features is not None and num is not None:
            if num > len(features):
                raise FIDError(f"num={num} but {p} holds {len(features)} images; lower num")
            features = features.subset(np.sort(np.random.default_rng(seed).choice(len(features), num, False)))
        size = (int(shape[1]), int(shape[2])) if shape is not None else None
        return Reference(name=str(p), features=features, stats=stats, image_size=size)
    if resolution is None:
        raise FIDError(f"reference dataset {path_or_spec!r} needs a resolution (pixels)")
    feats = reference_features(path_or_spec, split=split, resolution=resolution, num=num, seed=seed, **kwargs)
    return Reference(
        name=f"{path_or_spec} ({split})", features=feats, stats=None, image_size=(resolution, resolution)
    )
