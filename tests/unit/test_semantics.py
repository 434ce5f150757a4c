"""Semantic metrics: linear probe and k-NN on toy data, balanced accuracy, unbiased HSIC, CKNNA (Huh et al.)
and our earlier masked-centred variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligntok.metrics.semantics import (
    balanced_accuracy,
    cknna,
    cknna_centered_mask,
    hsic_unbiased,
    knn_accuracy,
    linear_probe,
)

K = 4


def _clusters(n: int, *, seed: int, dim: int = 16, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """n points around K fixed class means (the means depend only on `spread`, not on `seed`)."""
    means = torch.randn(K, dim, generator=torch.Generator().manual_seed(123)) * spread
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    return means[y] + torch.randn(n, dim, generator=g), y


def _shuffled(y: torch.Tensor) -> torch.Tensor:
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(9))]


def test_balanced_accuracy_by_hand() -> None:
    # Class 0: 2 of 2 right; class 1: 1 of 2 right -> (1 + 0.5) / 2; plain accuracy would be 3/4 too.
    assert balanced_accuracy(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1])) == 0.75
    # Always answering the majority class: 9/10 plain, but 1/2 balanced.
    assert balanced_accuracy(torch.zeros(10, dtype=torch.long), torch.tensor([0] * 9 + [1])) == 0.5


def test_probe_separates_clusters_and_is_at_chance_on_shuffled_labels() -> None:
    xa, ya = _clusters(400, seed=0)
    xb, yb = _clusters(1200, seed=1)
    good = linear_probe(xa, ya, xb, yb, num_classes=K)
    assert good["accuracy"] > 0.95 and good["balanced_accuracy"] > 0.95
    assert (good["num_train"], good["num_test"]) == (400, 1200)
    chance = linear_probe(xa, _shuffled(ya), xb, yb, num_classes=K)
    assert abs(chance["balanced_accuracy"] - 1 / K) < 0.08


def test_probe_balanced_accuracy_exposes_a_majority_class() -> None:
    # Uninformative features, 85% of items in class 0: the probe leans to class 0, so plain accuracy is
    # high while the balanced accuracy stays near chance.
    g = torch.Generator().manual_seed(0)
    y_train = (torch.rand(600, generator=g) > 0.85).long()
    y_test = (torch.rand(600, generator=g) > 0.85).long()
    out = linear_probe(torch.randn(600, 8, generator=g), y_train, torch.randn(600, 8, generator=g), y_test,
                       num_classes=2)  # fmt: skip
    assert out["accuracy"] > 0.75
    assert abs(out["balanced_accuracy"] - 0.5) < 0.1


def test_probe_ignores_per_feature_scale_and_checks_labels() -> None:
    xa, ya = _clusters(200, seed=0)
    xb, yb = _clusters(200, seed=1)
    scale = torch.logspace(-3, 3, xa.shape[1])  # standardisation with train statistics undoes this
    a = linear_probe(xa, ya, xb, yb, num_classes=K)
    b = linear_probe(xa * scale + 5, ya, xb * scale + 5, yb, num_classes=K)
    assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.01)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(xa, ya, xb, yb, num_classes=2)
    with pytest.raises(ValueError, match="same model"):
        linear_probe(xa, ya, xb[:, :3], yb, num_classes=K)


def test_knn_separates_clusters_and_is_at_chance_on_shuffled_labels() -> None:
    xa, ya = _clusters(400, seed=0)
    xb, yb = _clusters(1200, seed=1)
    good = knn_accuracy(xa.view(400, 4, 2, 2), ya, xb.view(1200, 4, 2, 2), yb)  # (N, ...) is flattened
    assert good["accuracy"] > 0.95 and good["balanced_accuracy"] > 0.95 and good["k"] == 20
    chance = knn_accuracy(xa, _shuffled(ya), xb, yb)
    assert abs(chance["balanced_accuracy"] - 1 / K) < 0.08
    assert knn_accuracy(xa[:5], ya[:5], xb, yb)["k"] == 5


def test_knn_vote_is_majority_then_similarity() -> None:
    # Features after standardisation are the four diagonal directions; the query is nearest to (1, 1).
    train = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    query = torch.tensor([[1.0, 0.8]])
    # k=2: neighbours (1, 1) [class 1] and (1, -1) or (-1, 1)... one vote each: the closer one wins.
    assert knn_accuracy(train, torch.tensor([1, 0, 0, 0]), query, torch.tensor([1]), k=2)["accuracy"] == 1.0
    # k=3: two votes for class 0 beat one more similar vote for class 1.
    assert knn_accuracy(train, torch.tensor([1, 0, 0, 2]), query, torch.tensor([0]), k=3)["accuracy"] == 1.0


def _noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def _hsic_by_loops(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. 2012 eq. 5 with every sum written over indices (the diagonal never enters)."""
    n = len(K)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    trace = sum(K[i, j] * L[j, i] for i, j in pairs)  # tr(K~ L~)
    sum_k, sum_l = sum(K[i, j] for i, j in pairs), sum(L[i, j] for i, j in pairs)
    cross = sum(K[i, j] * L[j, q] for i, j in pairs for q in range(n) if q != j)  # 1^T K~ L~ 1
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def test_hsic_unbiased_matches_the_formula_written_with_loops() -> None:
    rng = np.random.default_rng(0)
    K, L = rng.normal(size=(9, 9)), rng.normal(size=(9, 9))  # not symmetric, as masked kernels are not
    got = float(hsic_unbiased(torch.from_numpy(K), torch.from_numpy(L)))
    assert got == pytest.approx(_hsic_by_loops(K, L), rel=1e-12)
    K2 = K + np.diag(rng.normal(size=9) * 100)  # the diagonal is ignored
    assert float(hsic_unbiased(torch.from_numpy(K2), torch.from_numpy(L))) == pytest.approx(got, rel=1e-12)


def test_hsic_unbiased_is_the_u_statistic_for_symmetric_kernels() -> None:
    # Song et al. 2012: HSIC_u = 1 / (n)_4 * sum over distinct (i, j, q, r) of
    # K_ij L_ij + K_ij L_qr - 2 K_ij L_iq (summing over all orderings symmetrises h).
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 4))
    K, L = a @ a.T, b @ b.T + (a @ a.T) ** 2
    n = len(K)
    total = 0.0
    for i in range(n):
        for j in range(n):
            for q in range(n):
                for r in range(n):
                    if len({i, j, q, r}) == 4:
                        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
    expected = total / (n * (n - 1) * (n - 2) * (n - 3))
    got = float(hsic_unbiased(torch.from_numpy(K), torch.from_numpy(L)))
    assert got == pytest.approx(expected, rel=1e-10)
    # A U-statistic of centred quantities: a constant added to a kernel changes nothing.
    assert float(hsic_unbiased(torch.from_numpy(K + 3.0), torch.from_numpy(L))) == pytest.approx(
        got, rel=1e-10
    )


def _cknna_numpy(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Huh et al.'s CKNNA written out again: unit rows, linear kernels, mutual k-NN mask (self excluded),
    unbiased HSIC of the masked kernels, each self-term with its own kernel's neighbourhoods."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    K, L = a @ a.T, b @ b.T
    n = len(K)

    def knn(S: np.ndarray) -> np.ndarray:
        S = S.copy()
        np.fill_diagonal(S, -np.inf)
        mask = np.zeros_like(S)
        np.put_along_axis(mask, np.argsort(-S, axis=1, kind="stable")[:, :k], 1.0, axis=1)
        return mask

    def hsic(P: np.ndarray, Q: np.ndarray) -> float:
        P, Q, one = P - np.diag(np.diag(P)), Q - np.diag(np.diag(Q)), np.ones(n)
        return (
            np.trace(P @ Q) + P.sum() * Q.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ P @ Q @ one
        ) / (n * (n - 3))

    mk, ml = knn(K), knn(L)
    m = mk * ml
    return hsic(m * K, m * L) / np.sqrt(hsic(mk * K, mk * K) * hsic(ml * L, ml * L))


def test_cknna_matches_huh_et_al_written_out_in_numpy() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(60, 8))
    b = np.concatenate([a[:, :5], rng.normal(size=(60, 3))], axis=1) + 0.5 * rng.normal(size=(60, 8))
    for k in (2, 5, 10):
        assert cknna(torch.from_numpy(a), torch.from_numpy(b), k=k) == pytest.approx(
            _cknna_numpy(a, b, k), abs=1e-10
        )


def test_cknna_of_a_representation_with_itself_is_one() -> None:
    x = torch.randn(120, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert cknna(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cknna_centered_mask(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cknna_ignores_rotation_and_isotropic_scaling_of_either_side() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 24, generator=g, dtype=torch.float64)
    y = _noisy(x, 0.7, seed=1)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    base = cknna(x, y)
    assert 0.2 < base < 0.9
    for xa, ya in ((x, 7.5 * y), (0.01 * x, y), (x, y @ q), (x @ q, y), (3.0 * x @ q, 0.2 * y @ q.T)):
        assert cknna(xa, ya) == pytest.approx(base, abs=1e-9)
    # Not exactly symmetric: the masked kernels are not symmetric matrices, and the 1^T K~ L~ 1 term of the
    # unbiased HSIC then depends on the order (so does the reference's). The gap is small.
    assert cknna(x, y) != cknna(y, x)
    assert cknna(x, y) == pytest.approx(cknna(y, x), abs=1e-3)


def test_cknna_is_near_zero_for_independent_features_and_higher_for_a_noisy_copy() -> None:
    # The mutual-neighbour mask keeps pairs that are similar in both spaces, so unrelated features read a
    # little above 0; the bias shrinks with N (about 0.03 at N = 300, under 0.01 at N = 1000, k = 10).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 32, generator=g)
    unrelated = cknna(x, torch.randn(1000, 64, generator=g))
    assert abs(unrelated) < 0.02
    noisy, noisier = cknna(x, _noisy(x, 0.5, 2)), cknna(x, _noisy(x, 1.0, 3))
    assert noisy > noisier > unrelated + 0.05


def _unbiased_cka_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA with the unbiased HSIC as an inner product of U-centred kernels (Szekely & Rizzo 2014)."""

    def u_centre(f: np.ndarray) -> np.ndarray:
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        K = f @ f.T
        np.fill_diagonal(K, 0.0)
        n = len(K)
        U = (
            K
            - K.sum(0, keepdims=True) / (n - 2)
            - K.sum(1, keepdims=True) / (n - 2)
            + K.sum() / ((n - 1) * (n - 2))
        )
        np.fill_diagonal(U, 0.0)
        return U

    ku, lu = u_centre(a), u_centre(b)
    return (ku * lu).sum() / np.sqrt((ku * ku).sum() * (lu * lu).sum())


def test_cknna_with_all_neighbours_is_unbiased_cka() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 5))
    b[:, :3] += a[:, :3]
    expected = _unbiased_cka_numpy(a, b)
    assert cknna(torch.from_numpy(a), torch.from_numpy(b), k=39) == pytest.approx(expected, abs=1e-10)


def test_cknna_centered_mask_with_all_neighbours_is_cka_without_the_diagonal() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 5))
    b[:, :3] += a[:, :3]

    def centred_kernel(f: np.ndarray) -> np.ndarray:
        f = f - f.mean(0)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        h = np.eye(len(f)) - np.ones((len(f), len(f))) / len(f)
        return h @ (f @ f.T) @ h

    kc, lc = centred_kernel(a), centred_kernel(b)
    off = ~np.eye(40, dtype=bool)
    expected = (kc * lc)[off].sum() / np.sqrt((kc**2)[off].sum() * (lc**2)[off].sum())
    got = cknna_centered_mask(torch.from_numpy(a), torch.from_numpy(b), k=39)
    assert got == pytest.approx(expected, abs=1e-9)


NEW_CLUSTERED, OLD_CLUSTERED = 0.3594, 0.4602  # measured: cknna, cknna_centered_mask on the case below


def test_the_masked_centred_variant_reads_above_huh_et_al_on_clustered_data() -> None:
    # Why `cknna` changed (issue 31): masking an already double-centred full kernel is not the unbiased
    # HSIC of the masked kernels. On clustered features and a noisy linear view of them the earlier
    # estimator reads 28% higher; on Gaussian noisy copies the gap is smaller (0.493 vs 0.478, 3%).
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(5, 32, generator=g)
    x = means[torch.randint(0, 5, (300,), generator=g)] + torch.randn(300, 32, generator=g)
    y = x @ torch.randn(32, 16, generator=g) + 0.8 * torch.randn(300, 16, generator=g)
    new, old = cknna(x, y), cknna_centered_mask(x, y)
    assert new == pytest.approx(NEW_CLUSTERED, abs=1e-3)
    assert old == pytest.approx(OLD_CLUSTERED, abs=1e-3)
    assert old / new > 1.2
    # The change is the estimator, not the mean-centring of the features the earlier variant also did.
    assert cknna(x - x.mean(0), y - y.mean(0)) == pytest.approx(new, abs=0.01)


def test_cknna_checks_its_inputs() -> None:
    x = torch.randn(12, 3)
    for fn in (cknna, cknna_centered_mask):
        with pytest.raises(ValueError, match="same items"):
            fn(x, x[:10])
        with pytest.raises(ValueError, match="k <= N - 1"):
            fn(x, x, k=12)
        with pytest.raises(ValueError, match="N >= 4"):
            fn(x[:3], x[:3], k=2)
