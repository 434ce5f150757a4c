"""Semantic metrics: linear probe and k-NN on toy data, balanced accuracy, CKNNA properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligntok.metrics.semantics import balanced_accuracy, cknna, knn_accuracy, linear_probe

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


def test_cknna_of_a_representation_with_itself_is_one() -> None:
    x = torch.randn(120, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert cknna(x, x) == pytest.approx(1.0, abs=1e-9)


def test_cknna_ignores_rotation_and_isotropic_scaling_of_one_side() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 24, generator=g)
    y = _noisy(x, 0.7, seed=1)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    base = cknna(x, y)
    assert cknna(x, 7.5 * y) == pytest.approx(base, abs=1e-6)
    assert cknna(x, y.double() @ q) == pytest.approx(base, abs=1e-6)
    assert cknna(x, y) == pytest.approx(cknna(y, x), abs=1e-9)


def test_cknna_is_near_zero_for_independent_features_and_higher_for_a_noisy_copy() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, generator=g)
    unrelated = cknna(x, torch.randn(300, 64, generator=g))
    assert abs(unrelated) < 0.1
    noisy, noisier = cknna(x, _noisy(x, 0.5, 2)), cknna(x, _noisy(x, 1.5, 3))
    assert noisy > noisier > unrelated + 0.05


def test_cknna_with_all_neighbours_is_cka_without_the_diagonal() -> None:
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
    assert cknna(torch.from_numpy(a), torch.from_numpy(b), k=39) == pytest.approx(expected, abs=1e-9)


def test_cknna_checks_its_inputs() -> None:
    x = torch.randn(12, 3)
    with pytest.raises(ValueError, match="same items"):
        cknna(x, x[:10])
    with pytest.raises(ValueError, match="k <= N - 1"):
        cknna(x, x, k=12)
