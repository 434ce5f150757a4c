"""Generation metrics on Inception features (`metrics.inception`): FID, KID, Inception Score,
precision/recall.

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

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
import torch

from aligntok.metrics.inception import Features, FIDError

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
    """Frechet distance between the Gaussians `a` and `b` (float64); method "eigh" (default) or "sqrtm"."""
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
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN-ball manifolds.

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
