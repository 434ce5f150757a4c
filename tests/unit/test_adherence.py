"""Adherence models on synthetic features: the category classifier (separable classes, chance on shuffled
labels, save/load), the contrastive image-text model (aligned pairs, chance on shuffled pairs, duplicate
captions as positives, save/load), retrieval ranks by hand; image features of real emoji when present."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aligntok import assets
from aligntok.data import is_prepared
from aligntok.metrics import adherence
from aligntok.metrics.adherence import CategoryClassifier, image_features
from aligntok.metrics.contrastive import (
    ContrastiveAdherence,
    contrastive_loss,
    fit_contrastive,
    retrieval_ranks,
    retrieval_scores,
)
from aligntok.metrics.semantics import fit_linear_probe

K = 4
CLASSES = ["a", "b", "c", "d"]


def _clusters(n: int, *, seed: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """n points around K well-separated class means (the means do not depend on `seed`)."""
    means = torch.randn(K, dim, generator=torch.Generator().manual_seed(123)) * 4
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    return means[y] + torch.randn(n, dim, generator=g), y


def _classifier(x: torch.Tensor, y: torch.Tensor) -> CategoryClassifier:
    return CategoryClassifier(
        probe=fit_linear_probe(x, y, num_classes=K), classes=CLASSES, record={"seed": 0}
    )


def _shuffled(t: torch.Tensor, seed: int = 9) -> torch.Tensor:
    return t[torch.randperm(len(t), generator=torch.Generator().manual_seed(seed))]


def test_classifier_separable_classes_score_one_and_shuffled_labels_chance() -> None:
    xa, ya = _clusters(400, seed=0)
    xb, yb = _clusters(800, seed=1)
    good = _classifier(xa, ya).accuracy_of_features(xb, yb)
    assert good["overall"] == 1.0 and good["balanced"] == 1.0
    assert good["per_class"] == {name: 1.0 for name in CLASSES} and good["num"] == 800
    chance = _classifier(xa, _shuffled(ya)).accuracy_of_features(xb, yb)
    assert abs(chance["balanced"] - 1 / K) < 0.08
    # Per-class recall covers only the classes present in the labels.
    part = _classifier(xa, ya).accuracy_of_features(xb[yb < 2], yb[yb < 2])
    assert set(part["per_class"]) == {"a", "b"}


def test_classifier_rejects_bad_labels() -> None:
    xa, ya = _clusters(100, seed=0)
    clf = _classifier(xa, ya)
    with pytest.raises(ValueError, match="labels must lie"):
        clf.accuracy_of_features(xa, torch.full((100,), K))
    with pytest.raises(ValueError, match="one label per image"):
        clf.accuracy_of_features(xa, ya[:10])


def test_classifier_save_load_round_trip(tmp_path) -> None:
    xa, ya = _clusters(200, seed=0)
    xb, _ = _clusters(300, seed=1)
    clf = _classifier(xa, ya)
    clf.save(tmp_path / "clf")
    back = CategoryClassifier.load(tmp_path / "clf")
    assert back.classes == CLASSES and back.record["seed"] == 0 and len(back.record["weights_sha256"]) == 64
    assert torch.equal(back.predict_features(xb), clf.predict_features(xb))
    assert torch.equal(back.probe.logits(xb), clf.probe.logits(xb))
    # A changed weights file no longer matches its record.
    (tmp_path / "clf" / adherence.WEIGHTS_NAME).write_bytes(b"junk")
    with pytest.raises(ValueError, match="sha256"):
        CategoryClassifier.load(tmp_path / "clf")
    with pytest.raises(ValueError, match="no saved"):
        CategoryClassifier.load(tmp_path / "missing")


def test_category_classifier_cache_fits_once_and_refits_for_other_encoder_weights_or_precision(
    tmp_path, monkeypatch
) -> None:
    xa, ya = _clusters(200, seed=0)
    calls = []
    extractor = {"name": "stub", "input_size": 64, "weights_sha256": "a"}

    def fit(dataset, *, resolution, seed, num, input_size, bf16, features):
        calls.append((dataset, resolution, seed, num, input_size, bf16))
        return CategoryClassifier(
            probe=fit_linear_probe(xa, ya, num_classes=K),
            classes=CLASSES,
            record={"dataset": dataset, "feature_extractor": dict(extractor), "bf16": bf16},
        )

    monkeypatch.setattr(adherence, "fit_category_classifier", fit)
    monkeypatch.setattr(adherence, "feature_extractor", lambda input_size: dict(extractor))
    first = adherence.category_classifier("emoji", 32, cache_dir=tmp_path, input_size=64)
    second = adherence.category_classifier("emoji", 32, cache_dir=tmp_path, input_size=64)
    assert calls == [("emoji", 32, 0, None, 64, adherence.CATEGORY_BF16)]  # the second call read the cache
    assert torch.equal(first.predict_features(xa), second.predict_features(xa))
    assert first.bf16 == adherence.CATEGORY_BF16  # and scores in the precision it was fitted in
    assert [p.name for p in tmp_path.iterdir()] == ["category-emoji-32px-in64-seed0"]  # no temporary left
    extractor["weights_sha256"] = "b"  # other encoder weights: the cached classifier is stale
    adherence.category_classifier("emoji", 32, cache_dir=tmp_path, input_size=64)
    assert len(calls) == 2
    other = not adherence.CATEGORY_BF16  # features of the other precision: fitted again
    assert (
        adherence.category_classifier("emoji", 32, cache_dir=tmp_path, input_size=64, bf16=other).bf16
        == other
    )
    assert len(calls) == 3


def test_retrieval_ranks_by_hand() -> None:
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.3],  # true 0: best -> rank 1
            [0.5, 0.2, 0.7],  # true 1: two score higher -> rank 3
            [0.4, 0.4, 0.1],  # true 1: tied with column 0 -> the tie counts against it: rank 2
            [0.2, 0.2, 0.2],  # true 2: a constant row ranks last, not first
        ]
    )
    true = torch.tensor([0, 1, 1, 2])
    assert retrieval_ranks(sim, true).tolist() == [1, 3, 2, 3]
    out = retrieval_scores(sim, true)
    assert out["top1"] == 0.25 and out["top5"] == 1.0 and out["mean_rank"] == 2.25
    assert out["num_candidates"] == 3 and out["chance_mean_rank"] == 2.0
    with pytest.raises(ValueError, match="true_index"):
        retrieval_ranks(sim, torch.tensor([0, 1, 1, 3]))


def test_contrastive_loss_without_duplicates_is_clip_loss() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    logits = 10.0 * img @ txt.T
    target = torch.arange(6)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(contrastive_loss(img, txt, torch.arange(6), torch.tensor(10.0)), clip)


def _logit_grad(loss_of_logits, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.detach().requires_grad_(True)
    loss_of_logits(logits).backward()
    return logits.grad


def test_duplicate_captions_are_not_negatives() -> None:
    # Pairs 0 and 1 share a caption (so the same text features); every image matches its caption exactly.
    g = torch.Generator().manual_seed(0)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    txt[1] = txt[0]
    img, ids, scale = txt.clone(), torch.tensor([7, 7, 1, 2, 3]), torch.tensor(20.0)
    logits = scale * img @ txt.T
    # contrastive_loss as a function of the logits (unit vectors whose product gives them: scale = 1).
    ours = _logit_grad(lambda lg: contrastive_loss(torch.eye(5), lg.T, ids, torch.tensor(1.0)), logits)
    target = torch.arange(5)
    clip = _logit_grad(lambda lg: (F.cross_entropy(lg, target) + F.cross_entropy(lg.T, target)) / 2, logits)
    # CLIP's one-hot targets push image 0 away from the other copy of its own caption (positive gradient on
    # that logit); ours leaves the pair alone at this optimum, in both directions.
    assert clip[0, 1] > 1e-3 and clip[1, 0] > 1e-3
    assert abs(float(ours[0, 1])) < 1e-6 and abs(float(ours[1, 0])) < 1e-6
    # The loss is the floor of two equal positives: log 2 on their 2 of 5 rows (each direction), ~0 elsewhere.
    loss = contrastive_loss(img, txt, ids, scale)
    assert abs(loss.item() - 2 * math.log(2) / 5) < 1e-3


def _pairs(
    n: int, *, seed: int, captions: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic (image, text) pairs: `captions` latent concepts, text features a fixed map of the concept,
    image features another fixed map plus noise; returns image feats, text feats, caption ids, text table."""
    g = torch.Generator().manual_seed(seed)
    concepts = torch.randn(captions, 16, generator=torch.Generator().manual_seed(1))
    to_text = torch.randn(16, 24, generator=torch.Generator().manual_seed(2))
    to_image = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, captions, (n,), generator=g)
    table = concepts @ to_text  # (captions, 24)
    images = concepts[ids] @ to_image + 0.3 * torch.randn(n, 40, generator=g)
    return images, table[ids], ids, table


def test_contrastive_learns_aligned_pairs_and_is_chance_on_shuffled(tmp_path) -> None:
    xi, xt, ids, table = _pairs(2000, seed=0, captions=100)
    model = fit_contrastive(xi, xt, ids, steps=300, lr=3e-3, batch_size=128, dim=32, data={"what": "toy"})
    vi, _, vids, _ = _pairs(500, seed=1, captions=100)
    good = model.retrieval(vi, table, vids)
    assert good["top1"] > 0.9 and good["top5"] > 0.97 and good["num_candidates"] == 100
    # Trained on shuffled pairs, image and text carry no information about each other: chance retrieval.
    bad = fit_contrastive(xi, _shuffled(xt), _shuffled(ids), steps=300, lr=3e-3, batch_size=128, dim=32)
    chance = bad.retrieval(vi, table, vids)
    assert chance["top1"] < 0.05 and abs(chance["mean_rank"] - 50.5) < 12
    # The trained model on shuffled images is at chance as well.
    assert model.retrieval(_shuffled(vi), table, vids)["top1"] < 0.05
    # Save / load: same record, same similarities.
    model.save(tmp_path / "clip")
    back = ContrastiveAdherence.load(tmp_path / "clip")
    assert back.record["data"] == {"what": "toy"} and back.record["steps"] == 300
    assert back.record["num_captions"] == 100 and len(back.record["weights_sha256"]) == 64
    assert torch.equal(back.similarity(vi, table), model.similarity(vi, table))


def test_contrastive_is_a_function_of_its_seed() -> None:
    xi, xt, ids, _ = _pairs(300, seed=0, captions=20)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = fit_contrastive(xi, xt, ids, steps=20, lr=1e-3, batch_size=64, dim=8)
    assert torch.equal(torch.rand(1), before)  # the global RNG is untouched
    b = fit_contrastive(xi, xt, ids, steps=20, lr=1e-3, batch_size=64, dim=8)
    c = fit_contrastive(xi, xt, ids, steps=20, lr=1e-3, batch_size=64, dim=8, seed=1)
    assert torch.equal(a.image_proj.weight, b.image_proj.weight)
    assert not torch.equal(a.image_proj.weight, c.image_proj.weight)


def test_bad_inputs_raise_value_errors() -> None:
    xi, xt, ids, _ = _pairs(50, seed=0, captions=5)
    with pytest.raises(ValueError, match="caption ids"):
        fit_contrastive(xi, xt[:40], ids, steps=1, lr=1e-3, batch_size=8)
    with pytest.raises(ValueError, match="steps"):
        fit_contrastive(xi, xt, ids, steps=0, lr=1e-3, batch_size=8)
    model = fit_contrastive(xi, xt, ids, steps=1, lr=1e-3, batch_size=8)
    with pytest.raises(ValueError, match="text features"):
        model.similarity(xi, xi)
    with pytest.raises(ValueError, match="uint8"):
        image_features(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="N, 3, H, W"):
        image_features(torch.zeros(2, 4, 8, 8))


needs_real = pytest.mark.skipif(
    not (assets.is_present(adherence.FEATURE_ENCODER) and is_prepared("emoji")),
    reason="run `aligntok assets fetch efficientnet-lite0` and `aligntok data fetch emoji`",
)


@needs_real
def test_image_features_of_real_emoji_shape_and_determinism() -> None:
    real = adherence.real_images("emoji", split="val", resolution=32, num=6, seed=0)
    assert real.images.dtype == torch.uint8 and real.images.shape == (6, 3, 32, 32)
    a = image_features(real.images, batch_size=4, input_size=64)
    assert a.shape == (6, adherence.FEATURE_DIM) and a.dtype == torch.float32 and torch.isfinite(a).all()
    # Same features again, from floats in [0, 1] and from a uint8 NHWC array: the same pixels.
    assert torch.equal(image_features(real.images.float() / 255, batch_size=4, input_size=64), a)
    assert torch.equal(
        image_features(real.images.permute(0, 2, 3, 1).numpy(), batch_size=4, input_size=64), a
    )
    # Batching does not change a row beyond float rounding.
    assert torch.allclose(image_features(real.images, batch_size=6, input_size=64), a, atol=1e-4, rtol=1e-4)
