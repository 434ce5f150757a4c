"""Semantic measures of a representation: linear probe, k-NN accuracy, CKNNA alignment.

docs/method.md, "Evaluation protocol": the linear-probe accuracy of the latents and their CKNNA to the
foundation encoder are the paper's semantic measures (AlignTok d32: probe 35.1%, CKNNA 0.282 to DINOv2).
The protocols here are fixed so that numbers compare across tokenizers and runs; docs/metrics.md
("Tokenizer metrics") states them in words. Every function takes features of shape (N, ...) and flattens
them to (N, D).

Accuracies come in two forms: plain accuracy, and class-balanced accuracy (the mean over classes of the
per-class recall), because the datasets here are unbalanced: "People & Body" is about 60% of the emoji,
so a probe that always answers it scores 60% plain and 1/9 balanced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# The probe's objective: mean cross-entropy + PROBE_L2 / 2 * |W|^2 (bias not penalised), on features
# standardised with the training statistics. A fixed weight keeps the objective, and so the optimum, the
# same for every representation; it also keeps the optimum finite when the classes are separable.
PROBE_L2 = 1e-3
PROBE_MAX_ITER = 500  # L-BFGS iterations (full batch); the objective is convex, so this is a budget only
_STD_EPS = 1e-6  # a feature constant over the training set is centred, not blown up
CKNNA_MIN_ITEMS = 4  # the unbiased HSIC divides by N (N - 3)


def _flat(x: Tensor, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).to(dtype)


def _labels(y: Tensor, n: int, name: str) -> Tensor:
    y = torch.as_tensor(y).long().flatten()
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels for {n} feature rows; pass one label per row")
    return y


def _split(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xa, xb = _flat(train_x, "train_x"), _flat(test_x, "test_x")
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(
            f"train and test features differ in size ({xa.shape[1]} vs {xb.shape[1]} per item); "
            "compute both with the same model"
        )
    ya, yb = _labels(train_y, len(xa), "train_y"), _labels(test_y, len(xb), "test_y")
    return xa, ya, xb.to(xa.device), yb.to(xa.device)


def _moments(train: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std (1, D) of the training set, as every protocol here standardises."""
    return train.mean(0, keepdim=True), train.std(0, unbiased=False, keepdim=True) + _STD_EPS


def _standardize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets standardised per dimension with the training set's mean and std (no test statistics)."""
    mean, std = _moments(train)
    return (train - mean) / std, (test - mean) / std


def balanced_accuracy(pred: Tensor, target: Tensor) -> float:
    """Mean over the classes present in `target` of the fraction of their items predicted right."""
    pred, target = torch.as_tensor(pred).flatten(), torch.as_tensor(target).flatten()
    recalls = [(pred[target == c] == c).float().mean() for c in target.unique()]
    return float(torch.stack(recalls).mean())


def _scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    return {
        "accuracy": float((pred == target).float().mean()),
        "balanced_accuracy": balanced_accuracy(pred, target),
    }


@dataclass(frozen=True)
class ProbeFit:
    """A fitted linear probe: features are flattened, standardised with the training `mean` / `std` (1, D),
    then scored as x @ weight + bias (weight (D, K), bias (K,))."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def standardize(self, x: Tensor) -> Tensor:
        return (_flat(x, "x").to(self.mean.device) - self.mean) / self.std

    def logits(self, x: Tensor) -> Tensor:
        """Class scores (N, K) of features (N, ...)."""
        return self.standardize(x) @ self.weight + self.bias


def fit_linear_probe(train_x: Tensor, train_y: Tensor, *, num_classes: int) -> ProbeFit:
    """The multinomial logistic regression of `linear_probe` (its protocol), returned as weights.

    Runs on the device of `train_x`; the result's tensors are detached and stay there.
    """
    xa = _flat(train_x, "train_x")
    ya = _labels(train_y, len(xa), "train_y").to(xa.device)
    if int(ya.min()) < 0 or int(ya.max()) >= num_classes:
        raise ValueError(f"train_y holds labels outside 0..{num_classes - 1}; check num_classes")
    mean, std = _moments(xa)
    xa = (xa - mean) / std
    w = torch.zeros(xa.shape[1], num_classes, device=xa.device, requires_grad=True)
    b = torch.zeros(num_classes, device=xa.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=PROBE_MAX_ITER,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xa @ w + b, ya) + 0.5 * PROBE_L2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return ProbeFit(mean=mean, std=std, weight=w.detach(), bias=b.detach())


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int,
    seed: int = 0,
) -> dict[str, float]:
    """Multinomial logistic regression on train features, scored on test features.

    Protocol: features flattened and standardised with the training mean/std; weights start at zero and
    full-batch L-BFGS (strong Wolfe line search, at most PROBE_MAX_ITER iterations) minimises mean
    cross-entropy + PROBE_L2 / 2 * |W|^2. The problem is convex and the start fixed, so the result does not
    depend on `seed` (kept so that every protocol has the same signature) beyond float rounding. Runs on
    the device of `train_x`. Returns accuracy, balanced_accuracy (mean per-class recall), train_accuracy.
    `fit_linear_probe` returns the fitted weights instead.
    """
    del seed  # deterministic by construction: zero init, full batch
    xa, ya, xb, yb = _split(train_x, train_y, test_x, test_y)
    for name, y in (("train_y", ya), ("test_y", yb)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}; check num_classes")
    probe = fit_linear_probe(xa, ya, num_classes=num_classes)
    with torch.no_grad():
        out = _scores(probe.logits(xb).argmax(1), yb)
        out["train_accuracy"] = float((probe.logits(xa).argmax(1) == ya).float().mean())
    return {**out, "num_train": len(xa), "num_test": len(xb)}


@torch.no_grad()
def knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    k: int = 20,
    chunk: int = 1024,
) -> dict[str, float]:
    """k-nearest-neighbour classification by cosine similarity, scored on test features.

    Protocol: features flattened and standardised with the training mean/std (as for the probe), then
    compared by cosine similarity; each test item takes the majority label of its k most similar training
    items, ties broken by the larger summed similarity. k is capped at the training set's size (the k
    used is returned). Returns accuracy, balanced_accuracy, k.
    """
    xa, ya, xb, yb = _split(train_x, train_y, test_x, test_y)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(xa))
    xa, xb = _standardize(xa, xb)
    xa, xb = F.normalize(xa, dim=1), F.normalize(xb, dim=1)
    num_classes = int(torch.cat([ya, yb]).max()) + 1
    preds = []
    for lo in range(0, len(xb), chunk):
        sim, idx = (xb[lo : lo + chunk] @ xa.T).topk(k, dim=1)  # (n, k)
        votes = torch.zeros(len(sim), num_classes, device=xa.device)
        votes.scatter_add_(1, ya[idx], torch.ones_like(sim))
        weight = torch.zeros_like(votes).scatter_add_(1, ya[idx], sim)
        # |summed similarity| <= k, so divided by 2k + 1 it stays under half a vote: it only breaks ties.
        preds.append((votes + weight / (2 * k + 1)).argmax(1))
    return {**_scores(torch.cat(preds), yb), "k": k}


def _knn_mask(K: Tensor, k: int) -> Tensor:
    """Boolean (N, N): [i, j] is True when j is among the k most similar items to i (j != i)."""
    n = K.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    idx = K.masked_fill(eye, float("-inf")).topk(k, dim=1).indices
    return torch.zeros(n, n, dtype=torch.bool, device=K.device).scatter_(1, idx, True)


def _pair(feats_a: Tensor, feats_b: Tensor, k: int, name: str) -> tuple[Tensor, Tensor]:
    """Both representations flattened to float64 (N, D) on a's device; N and k checked (N >= 4 for HSIC_u)."""
    a = _flat(feats_a, "feats_a", torch.float64)
    b = _flat(feats_b, "feats_b", torch.float64).to(a.device)
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"{name} needs two representations of the same items, got {n} and {b.shape[0]} rows")
    if n < CKNNA_MIN_ITEMS:
        raise ValueError(f"{name} needs N >= {CKNNA_MIN_ITEMS} items (unbiased HSIC), got {n}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"{name} needs 1 <= k <= N - 1 = {n - 1}, got k={k}; lower k or pass more items")
    return a, b


def hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """The unbiased HSIC estimator of Song et al. 2012 (JMLR 13, "Feature selection via dependence
    maximization", eq. 5) for two (N, N) kernel matrices, N >= 4:

        HSIC_u(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((N-1)(N-2)) - 2/(N-2) 1^T K~ L~ 1] / (N(N-3)),

    K~, L~ = K, L with their diagonals set to 0. For symmetric kernels it is the U-statistic of HSIC (so no
    centring matrix: adding a constant to every off-diagonal entry changes nothing). The formula is applied
    as written to non-symmetric matrices too (the masked kernels of `cknna`). A 0-d tensor of K's dtype.
    """
    n = K.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    Kt, Lt = K.masked_fill(eye, 0), L.masked_fill(eye, 0)
    trace = (Kt * Lt.T).sum()  # tr(K~ L~)
    sums = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    cross = Kt.sum(0) @ Lt.sum(1)  # 1^T K~ L~ 1
    return (trace + sums - 2 * cross / (n - 2)) / (n * (n - 3))


@torch.no_grad()
def cknna(feats_a: Tensor, feats_b: Tensor, *, k: int = 10) -> float:
    """Centered Kernel Nearest-Neighbor Alignment of two representations of the same N items.

    Huh et al. 2024 ("The Platonic Representation Hypothesis", ICML; appendix, and their released metric,
    github.com/minyoungg/platonic-rep metrics.py `cknna`, default `unbiased=True`): CKA restricted to pairs
    that are mutual k-nearest neighbours, each alignment an unbiased HSIC of the masked kernels,
        K = A A^T, L = B B^T,   A, B = the flattened features with each row scaled to unit L2 norm,
        a_ij = 1[j in knn_K(i)] * 1[j in knn_L(i)]   (knn_K(i): the k largest K_ij, j != i),
        align(K, L) = HSIC_u(a * K, a * L)           (`hsic_unbiased`, Song et al. 2012; * elementwise),
        CKNNA = align(K, L) / sqrt(align_K(K, K) align_L(L, L)),
    where in the self-terms the mask is each kernel's own neighbourhoods: align_K(K, K) =
    HSIC_u(m * K, m * K) with m_ij = 1[j in knn_K(i)]. The reference pipeline also normalises rows to unit
    norm before the kernel (measure_alignment.py); it clips outliers first (a 95% quantile of |x|), which
    is elementwise and so not rotation invariant: not done here. The value ignores a rotation or an
    isotropic scaling of either side, not a shift (there is no mean-centring: the kernel is the cosine
    similarity of the raw rows, as in the reference). 1 for a representation with itself; with
    k = N - 1 the mask is all ones and it is the unbiased linear CKA of the row-normalised features.
    Not exactly symmetric in (feats_a, feats_b): the masked kernels are not symmetric matrices, and the
    1^T K~ L~ 1 term then depends on the order (as in the reference; about 1e-4 apart in the tests).
    Not bounded by [-1, 1] when k is close to N (the masks then dominate: docs/metrics.md); use N well
    above k. NaN where a self-term is not positive (the reference gives NaN there too). Needs N >= 4
    items and 1 <= k <= N - 1; costs O(N^2) memory (float64): pass a few thousand items at most.
    """
    a, b = _pair(feats_a, feats_b, k, "cknna")
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    K, L = a @ a.T, b @ b.T
    mask_k, mask_l = _knn_mask(K, k), _knn_mask(L, k)
    both = mask_k & mask_l
    kl = hsic_unbiased(K * both, L * both)
    kk = hsic_unbiased(K * mask_k, K * mask_k)
    ll = hsic_unbiased(L * mask_l, L * mask_l)
    if not (kk > 0 and ll > 0):
        return float("nan")
    return float(kl / (kk * ll).sqrt())


def _cosine_kernel(x: Tensor) -> Tensor:
    """(N, N) cosine similarities of the mean-centred rows of x (N, D)."""
    x = F.normalize(x - x.mean(0, keepdim=True), dim=1)
    return x @ x.T


def _center(K: Tensor) -> Tensor:
    """H K H with H = I - 11^T / N (Gretton et al. 2005), in place."""
    K -= K.mean(0, keepdim=True)
    K -= K.mean(1, keepdim=True)
    return K


@torch.no_grad()
def cknna_centered_mask(feats_a: Tensor, feats_b: Tensor, *, k: int = 10) -> float:
    """OUR earlier CKNNA estimator, kept under its own name so that records made before `cknna` followed
    Huh et al. can be compared: NOT comparable with the paper's values (or with `cknna`).

    It masks the double-centred FULL kernels instead of taking the unbiased HSIC of the masked kernels:
        align(K, L) = sum_{i != j} a_ij Kc_ij Lc_ij,   Kc = H K H, H = I - 11^T / N,
        CKNNA_cm = align(K, L) / sqrt(align_K(K, K) align_L(L, L)),
    with the mask a_ij of `cknna` (own neighbourhoods in the self-terms) and K the cosine similarity of
    mean-centred, flattened features (so it also ignores a shift of either side). Centring the full kernel
    before masking subtracts means over all pairs, not over the neighbour pairs, and the biased sums carry
    no correction: it reads above `cknna` (docs/metrics.md, "Semantics", has measured gaps).
    With k = N - 1 it is biased linear CKA without the diagonal.
    """
    a, b = _pair(feats_a, feats_b, k, "cknna_centered_mask")
    K, L = _cosine_kernel(a), _cosine_kernel(b)
    mask_k, mask_l = _knn_mask(K, k), _knn_mask(L, k)
    K, L = _center(K), _center(L)
    kl = (K * L)[mask_k & mask_l].sum()
    kk = K.pow(2)[mask_k].sum()
    ll = L.pow(2)[mask_l].sum()
    denom = (kk * ll).sqrt()
    return float(kl / denom) if denom > 0 else 0.0


__all__ = [
    "CKNNA_MIN_ITEMS",
    "PROBE_L2",
    "PROBE_MAX_ITER",
    "ProbeFit",
    "balanced_accuracy",
    "cknna",
    "cknna_centered_mask",
    "fit_linear_probe",
    "hsic_unbiased",
    "knn_accuracy",
    "linear_probe",
]
