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

import torch
import torch.nn.functional as F
from torch import Tensor

# The probe's objective: mean cross-entropy + PROBE_L2 / 2 * |W|^2 (bias not penalised), on features
# standardised with the training statistics. A fixed weight keeps the objective, and so the optimum, the
# same for every representation; it also keeps the optimum finite when the classes are separable.
PROBE_L2 = 1e-3
PROBE_MAX_ITER = 500  # L-BFGS iterations (full batch); the objective is convex, so this is a budget only
_STD_EPS = 1e-6  # a feature constant over the training set is centred, not blown up


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


def _standardize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets standardised per dimension with the training set's mean and std (no test statistics)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, unbiased=False, keepdim=True) + _STD_EPS
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
    """
    del seed  # deterministic by construction: zero init, full batch
    xa, ya, xb, yb = _split(train_x, train_y, test_x, test_y)
    for name, y in (("train_y", ya), ("test_y", yb)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}; check num_classes")
    xa, xb = _standardize(xa, xb)
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
    with torch.no_grad():
        out = _scores((xb @ w + b).argmax(1), yb)
        out["train_accuracy"] = float(((xa @ w + b).argmax(1) == ya).float().mean())
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


def _cosine_kernel(x: Tensor) -> Tensor:
    """(N, N) cosine similarities of the mean-centred rows of x (N, D)."""
    x = F.normalize(x - x.mean(0, keepdim=True), dim=1)
    return x @ x.T


def _center(K: Tensor) -> Tensor:
    """H K H with H = I - 11^T / N (Gretton et al. 2005), in place."""
    K -= K.mean(0, keepdim=True)
    K -= K.mean(1, keepdim=True)
    return K


def _knn_mask(K: Tensor, k: int) -> Tensor:
    """Boolean (N, N): [i, j] is True when j is among the k most similar items to i (j != i)."""
    n = K.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    idx = K.masked_fill(eye, float("-inf")).topk(k, dim=1).indices
    return torch.zeros(n, n, dtype=torch.bool, device=K.device).scatter_(1, idx, True)


@torch.no_grad()
def cknna(feats_a: Tensor, feats_b: Tensor, *, k: int = 10) -> float:
    """Centered Kernel Nearest-Neighbor Alignment of two representations of the same N items.

    Huh et al. 2024 ("The Platonic Representation Hypothesis", appendix): CKA restricted to pairs that are
    mutual k-nearest neighbours in both spaces,
        align(K, L) = sum_{i != j} a_ij Kc_ij Lc_ij,   a_ij = 1[j in knn_K(i) and j in knn_L(i)],
        CKNNA = align(K, L) / sqrt(align(K, K) align(L, L)),
    with Kc = H K H the centred kernels; in align(K, K) the mask is K's own neighbourhoods. The kernel here
    is the cosine similarity of mean-centred, flattened features (neighbours are the k most similar
    items), so the value ignores a shift, a rotation or an isotropic scaling of either side. 1 for identical
    neighbourhoods and kernels, near 0 for unrelated ones; with k = N - 1 it is CKA without the diagonal.
    Costs O(N^2) memory (float64): pass a few thousand items at most.
    """
    a = _flat(feats_a, "feats_a", torch.float64)
    b = _flat(feats_b, "feats_b", torch.float64).to(a.device)
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"cknna needs two representations of the same items, got {n} and {b.shape[0]} rows")
    if not 1 <= k <= n - 1:
        raise ValueError(f"cknna needs 1 <= k <= N - 1 = {n - 1}, got k={k}; lower k or pass more items")
    K, L = _cosine_kernel(a), _cosine_kernel(b)
    mask_k, mask_l = _knn_mask(K, k), _knn_mask(L, k)
    K, L = _center(K), _center(L)
    kl = (K * L)[mask_k & mask_l].sum()
    kk = K.pow(2)[mask_k].sum()
    ll = L.pow(2)[mask_l].sum()
    denom = (kk * ll).sqrt()
    return float(kl / denom) if denom > 0 else 0.0


__all__ = [
    "PROBE_L2",
    "PROBE_MAX_ITER",
    "balanced_accuracy",
    "cknna",
    "knn_accuracy",
    "linear_probe",
]
