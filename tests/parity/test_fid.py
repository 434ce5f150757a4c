"""The FID stack: FID/KID/IS/precision-recall maths against closed forms and independent references, the
Inception wrapper on a few real forwards, the reference cache, ADM .npz reading and `evaluate`."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from aligntok import assets
from aligntok import evaluate as evaluate_module
from aligntok.evaluate import evaluate, fid_floor
from aligntok.files import to_uint8
from aligntok.metrics import fid as F
from aligntok.metrics import inception, reference
from aligntok.models.tokenizer import Tokenizer
from conftest import make_image_folder

# ---------------------------------------------------------------------------------------------------------
# FID maths
# ---------------------------------------------------------------------------------------------------------


def _features(n: int, d: int, *, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated dimensions
    return rng.normal(size=(n, d)) @ mix + shift


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_fid_of_a_set_with_itself_is_zero(method):
    s = F.stats_from_features(_features(200, 16, seed=0))
    assert F.fid_from_stats(s, s, method=method) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_fid_closed_form_for_commuting_covariances(method):
    rng = np.random.default_rng(1)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # shared eigenvectors -> S1, S2 commute
    e1, e2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    for a, b in ((np.diag(e1), np.diag(e2)), (q @ np.diag(e1) @ q.T, q @ np.diag(e2) @ q.T)):
        expected = np.sum((mu1 - mu2) ** 2) + np.sum(e1 + e2 - 2 * np.sqrt(e1 * e2))
        got = F.fid_from_stats(F.Stats(mu1, a), F.Stats(mu2, b), method=method)
        assert got == pytest.approx(expected, rel=1e-10)


def test_fid_matches_a_direct_scipy_computation_and_both_solvers_agree():
    x, y = _features(300, 24, seed=2), _features(250, 24, seed=3, shift=0.3)

    # Independent reference: the textbook formula with scipy's sqrtm, written out here.
    def reference(x: np.ndarray, y: np.ndarray) -> float:
        m1, m2 = x.mean(0), y.mean(0)
        c1 = (x - m1).T @ (x - m1) / (len(x) - 1)
        c2 = (y - m2).T @ (y - m2) / (len(y) - 1)
        covmean = scipy.linalg.sqrtm(c1 @ c2).real
        return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))

    expected = reference(x, y)
    assert expected > 0.1
    fx, fy = inception.Features(x), inception.Features(y)
    assert F.fid(fx, fy, method="eigh") == pytest.approx(expected, rel=1e-8)
    assert F.fid(fx, fy, method="sqrtm") == pytest.approx(expected, rel=1e-8)
    assert F.fid(fy, fx) == pytest.approx(F.fid(fx, fy), rel=1e-9)


@pytest.mark.parametrize(("n1", "n2", "d"), [(7, 9, 40), (120, 90, 16)])
def test_gram_route_agrees_with_the_covariance_solvers(n1, n2, d):
    x, y = _features(n1, d, seed=10), _features(n2, d, seed=11, shift=0.2)
    sx, sy = F.stats_from_features(x), F.stats_from_features(y)
    gram = F.fid(x, y, method="gram")
    assert gram > 0.1
    assert gram == pytest.approx(F.fid_from_stats(sx, sy, method="eigh"), rel=1e-10)
    assert gram == pytest.approx(F.fid_from_stats(sx, sy, method="sqrtm"), rel=1e-6)
    assert F.fid(x, y) == pytest.approx(gram, rel=1e-12)  # the automatic choice


def test_sqrtm_fallback_engages_on_singular_covariance(monkeypatch):
    # N < D: both covariances are singular. scipy >= 1.15 square-roots such products well, older scipy
    # returned non-finite results; emulate that so the eps * I fallback is exercised.
    x, y = _features(10, 32, seed=4), _features(12, 32, seed=5, shift=0.2)
    sx, sy = F.stats_from_features(x), F.stats_from_features(y)
    assert np.linalg.matrix_rank(sx.sigma) < 32
    real_sqrtm = scipy.linalg.sqrtm

    def old_sqrtm(a):
        if np.linalg.matrix_rank(a) < len(a):
            return np.full_like(a, np.inf)
        return real_sqrtm(a)

    monkeypatch.setattr(F.scipy.linalg, "sqrtm", old_sqrtm)
    with pytest.warns(RuntimeWarning, match="added"):
        value = F.fid_from_stats(sx, sy, method="sqrtm")
    assert np.isfinite(value) and value >= 0
    # eigh needs no fallback; eps = 1e-6 moves the value by O(D * sqrt(eps)) at most.
    assert value == pytest.approx(F.fid_from_stats(sx, sy, method="eigh"), abs=32 * 2e-3)


def test_fid_rejects_mismatched_dimensions_and_unknown_method():
    a, b = F.Stats(np.zeros(3), np.eye(3)), F.Stats(np.zeros(4), np.eye(4))
    with pytest.raises(inception.FIDError, match="dimensions"):
        F.fid_from_stats(a, b)
    with pytest.raises(inception.FIDError, match="method"):
        F.fid_from_stats(a, a, method="svd")


def test_stats_save_load_round_trip(tmp_path):
    s = F.stats_from_features(_features(50, 8, seed=6))
    s.save(tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz") as f:
        assert {"mu", "sigma"} <= set(f.files)  # the ADM reference-batch keys
    t = F.Stats.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(s.mu, t.mu)
    np.testing.assert_array_equal(s.sigma, t.sigma)
    assert t.num == 50


# ---------------------------------------------------------------------------------------------------------
# KID, IS, precision/recall
# ---------------------------------------------------------------------------------------------------------


def test_kid_matches_the_unbiased_mmd_formula_and_orders_sets():
    x, y = _features(40, 6, seed=7), _features(30, 6, seed=8, shift=0.5)

    def k(a, b):
        return (a @ b / len(a) + 1) ** 3

    m = 30  # subset_size = min(n_x, n_y): y is used whole, x's subset depends on the rng
    rng = np.random.default_rng(0)
    xs, ys = x[rng.choice(40, m, replace=False)], y[rng.choice(30, m, replace=False)]
    within = sum(k(xs[i], xs[j]) + k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(xs[i], ys[j]) for i in range(m) for j in range(m))
    expected = within / (m * (m - 1)) - 2 * cross / m**2
    mean, std = F.kid(x, y, subsets=1, subset_size=100, seed=0)
    assert mean == pytest.approx(expected, rel=1e-9) and std == 0.0

    same, _ = F.kid(x, x, subsets=50, subset_size=20)
    shifted, _ = F.kid(x, x + 1.0, subsets=50, subset_size=20)
    assert shifted > 0 and abs(same) < 0.05 * shifted


def test_inception_score_uniform_and_confident():
    assert F.inception_score(np.zeros((100, 1008)), splits=10) == pytest.approx((1.0, 0.0), abs=1e-9)
    k = 10
    labels = np.arange(1000) % k  # every split holds every class equally
    logits = np.zeros((1000, 1008))
    logits[np.arange(1000), labels] = 30.0
    mean, std = F.inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6


def test_precision_recall_identical_disjoint_and_half(monkeypatch):
    real = _features(60, 5, seed=9)
    assert F.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert F.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # Half the fakes are copies of reals, half far away: precision 1/2 exactly.
    fake = np.concatenate([real[:30], real[:30] + 100.0])
    precision, recall = F.precision_recall(real, fake, k=3)
    assert precision == 0.5 and 0.0 < recall < 1.0
    # Row blocks of a few rows give the same answer as one block.
    monkeypatch.setattr(F, "_BLOCK_BYTES", 4 * 60 * 7)  # 7 rows per block
    assert F.precision_recall(real, fake, k=3) == (precision, recall)


# ---------------------------------------------------------------------------------------------------------
# The real network (a few forwards)
# ---------------------------------------------------------------------------------------------------------

needs_inception = pytest.mark.skipif(
    not assets.is_present(inception.INCEPTION_ASSET), reason="run `aligntok assets fetch fid-inception`"
)


def test_preprocess_is_the_tf_graph_input():
    x = torch.tensor([0.0, 128 / 255, 1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    y = inception.InceptionFeatures.preprocess(x)
    assert y.shape == (1, 3, 299, 299)
    torch.testing.assert_close(y[0, :, 100, 100], torch.tensor([-1.0, 0.0, 0.9921875]))


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine, OpenMP barriers between two threads make each of the
    network's ~400 small-batch ops wait for a time slice (batch 1: ~5 s instead of ~0.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_inception
@pytest.mark.slow
def test_features_do_not_depend_on_batch_size_or_input_form(one_thread):
    g = torch.Generator().manual_seed(0)
    u8 = (torch.rand(6, 3, 8, 8, generator=g) * 255).round().to(torch.uint8)  # (B, 3, H, W)
    u8 = torch.nn.functional.interpolate(u8.float(), size=32, mode="bilinear").round().to(torch.uint8)
    model = inception.InceptionFeatures.from_assets(device="cpu")
    kw = {"model": model, "progress": False}
    f6 = inception.extract_features(u8.float() / 255, batch_size=6, **kw)  # float tensor
    f1 = inception.extract_features(u8.permute(0, 2, 3, 1).numpy(), batch_size=1, **kw)  # uint8 NHWC array
    f2 = inception.extract_features([{"image": u8[i : i + 2]} for i in range(0, 6, 2)], **kw)  # batches
    assert f6.pool.shape == (6, 2048) and f6.logits is None
    assert np.ptp(f6.pool, axis=0).max() > 0.1  # the images give different features
    np.testing.assert_allclose(f1.pool, f6.pool, atol=1e-5)
    np.testing.assert_allclose(f2.pool, f6.pool, atol=1e-5)
    # FID against a fixed, different reference does not move either.
    ref = inception.Features(f6.pool + 0.05 * np.random.default_rng(0).normal(size=f6.pool.shape))
    fids = [F.fid(f, ref) for f in (f1, f2, f6)]
    assert fids[0] > 1.0
    assert fids == pytest.approx([fids[2]] * 3, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Cache, ADM files, evaluate: with a tiny stand-in network (no Inception forwards)
# ---------------------------------------------------------------------------------------------------------


class _CountingNet(nn.Module):
    """(B, 3, 299, 299) -> (B, 64) from a 4x4 average pool; counts the images it has seen. (64-d keeps
    the FID maths cheap; nothing downstream assumes 2048.)"""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(48, 64)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299) and x.min() >= -1 and x.max() <= 0.9921875 + 1e-6
        self.seen += len(x)
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def _stub(sha: str = "stub-1") -> inception.InceptionFeatures:
    return inception.InceptionFeatures(_CountingNet(), sha256=sha)


def _write_images(folder, n: int, size: int, *, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")


@pytest.fixture
def stub_network(tmp_path, monkeypatch):
    """ALIGNTOK_HOME in tmp; `from_assets` returns a counting stub; the 'file hash' is settable."""
    monkeypatch.setenv("ALIGNTOK_HOME", str(tmp_path / "home"))
    state = {"sha": "hash-a", "models": []}

    def from_assets(cls, *, device=None):
        model = _stub(state["sha"])
        state["models"].append(model)
        return model

    monkeypatch.setattr(inception.InceptionFeatures, "from_assets", classmethod(from_assets))
    monkeypatch.setattr(reference, "inception_sha256", lambda: state["sha"])
    return state


def test_reference_cache_is_reused_and_keyed_by_the_inception_hash(tmp_path, stub_network):
    folder = tmp_path / "ref"
    _write_images(folder, 5, 8, seed=0)
    seen = lambda: sum(m.net.seen for m in stub_network["models"])  # noqa: E731
    a = reference.reference_features(folder, resolution=8, progress=False)
    assert len(a) == 5 and seen() == 5
    b = reference.reference_features(folder, resolution=8, progress=False)
    assert seen() == 5  # second call: from the cache, the network did not run
    np.testing.assert_allclose(a.pool, b.pool, rtol=1e-6)  # cached as float32
    assert len(list(reference.cache_dir().glob("*.npz"))) == 1
    stub_network["sha"] = "hash-b"  # a changed network file
    reference.reference_features(folder, resolution=8, progress=False)
    assert seen() == 10
    reference.reference_features(folder, resolution=8, num=3, progress=False)  # another key: a subset
    assert seen() == 13
    _write_images(tmp_path / "ref" / "part0", 1, 8, seed=1)  # the folder changed
    reference.reference_features(folder, resolution=8, progress=False)
    assert seen() == 19
    assert len(list(reference.cache_dir().glob("*.npz"))) == 4


def test_adm_npz_references(tmp_path, stub_network):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    s = F.stats_from_features(_features(20, 64, seed=1))
    np.savez(tmp_path / "stats_only.npz", mu=s.mu, sigma=s.sigma)
    np.savez(tmp_path / "images_only.npz", arr_0=images)
    np.savez(tmp_path / "both.npz", mu=s.mu, sigma=s.sigma, arr_0=images)

    ref = reference.load_reference(tmp_path / "stats_only.npz", progress=False)
    assert ref.features is None and ref.image_size is None
    np.testing.assert_array_equal(ref.stats.mu, s.mu)

    ref = reference.load_reference(tmp_path / "images_only.npz", progress=False)
    assert ref.stats is None and len(ref.features) == 6 and ref.image_size == (16, 16)
    direct = inception.extract_features(images, model=_stub(), progress=False)
    np.testing.assert_allclose(ref.features.pool, direct.pool, rtol=1e-6)

    ref = reference.load_reference(tmp_path / "both.npz", progress=False)
    np.testing.assert_array_equal(ref.stats.sigma, s.sigma)
    np.testing.assert_allclose(ref.features.pool, direct.pool, rtol=1e-6)

    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(inception.FIDError, match="neither mu/sigma nor arr_0"):
        reference.load_reference(tmp_path / "bad.npz")
    with pytest.raises(inception.FIDError, match="resolution"):
        reference.load_reference("emoji")


def test_float_images_are_quantised_like_saved_samples():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _stub()
    from_float = inception.extract_features(x, model=model, progress=False)
    saved = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # as a PNG would hold them
    from_u8 = inception.extract_features(saved, model=model, progress=False)
    np.testing.assert_array_equal(from_float.pool, from_u8.pool)
    with pytest.raises(inception.FIDError, match="uint8"):
        inception.extract_features(np.zeros((2, 8, 8, 3), np.float32), model=model, progress=False)


def test_evaluate_folder_and_npz(tmp_path, stub_network, capsys):
    _write_images(tmp_path / "samples", 8, 16, seed=0)
    _write_images(tmp_path / "ref", 10, 24, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warnings from the pipeline
        result = evaluate(tmp_path / "samples", str(tmp_path / "ref"), progress=False)
    saved = json.loads((tmp_path / "samples" / "metrics.json").read_text())
    assert saved == result
    assert result["num_samples"] == 8 and result["ref_num"] == 10
    assert result["sample_sizes"] == {"16x16": 8} and result["ref_size"] == "16x16"
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert result["kid"] is not None and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["inception_score"] is None
    assert "| FID |" in capsys.readouterr().out

    arr = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "samples").rglob("*.png"))])
    np.savez(tmp_path / "samples.npz", arr_0=arr)
    stats = F.stats_from_features(inception.extract_features(arr, model=_stub(), progress=False))
    stats.save(tmp_path / "st.npz")
    out = tmp_path / "m.json"
    result = evaluate(tmp_path / "samples.npz", str(tmp_path / "st.npz"), num=5, out=out, progress=False)
    assert out.is_file() and result["num_samples"] == 5
    assert (
        result["kid"] is None and result["precision"] is None and result["ref_fid_stats"] == "stored mu/sigma"
    )
    assert result["fid"] > 0  # first 5 samples vs the stats of all 8
    with pytest.raises(inception.FIDError, match="--num"):
        evaluate(tmp_path / "samples.npz", str(tmp_path / "st.npz"), num=9, out=out, progress=False)


def test_evaluate_reads_a_sample_run_through_its_npz(tmp_path, stub_network):
    run = tmp_path / "run"
    _write_images(run / "images", 6, 8, seed=2)
    arr = np.stack([np.asarray(Image.open(p)) for p in sorted((run / "images").rglob("*.png"))])
    np.savez(run / "samples.npz", arr_0=arr)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(run / "grid.png")  # must not count as a sample
    (run / "sampling.json").write_text("{}")
    _write_images(tmp_path / "ref", 6, 8, seed=3)
    result = evaluate(run, str(tmp_path / "ref"), progress=False)
    assert result["samples"].endswith("samples.npz") and result["sample_sizes"] == {"8x8": 6}
    assert (run / "metrics.json").is_file()
    with pytest.raises(inception.FIDError, match="does not exist"):
        evaluate(tmp_path / "missing", str(tmp_path / "ref"), progress=False)


def test_reconstruction_floor_is_the_floor_of_the_same_images_through_the_tokenizer(
    tmp_path, stub_network, debug_tokenizer, monkeypatch
):
    data = str(make_image_folder(tmp_path / "shapes", per_class=10))
    size = Tokenizer.from_pretrained(debug_tokenizer).config.image_size
    kw = {"num": 6, "resolution": size, "ref_num": 8}
    real = fid_floor(data, **kw)
    recon = fid_floor(data, **kw, tokenizer_dir=debug_tokenizer)
    same = ("num", "split", "num_ref")
    assert {k: recon[k] for k in same} == {k: real[k] for k in same}
    assert recon["fid"] > real["fid"]  # an untrained decoder's reconstructions are far from the images
    with pytest.raises(ValueError, match="px"):
        fid_floor(data, **(kw | {"resolution": 2 * size}), tokenizer_dir=debug_tokenizer)

    # A tokenizer that reconstructed perfectly would sit exactly on the real-vs-real floor: same images,
    # same reference.
    def perfect(tokenizer, images, **_):
        for batch in torch.utils.data.DataLoader(images, batch_size=4):
            yield batch["image"], to_uint8(batch["image"])

    monkeypatch.setattr(evaluate_module, "reconstructed", perfect)
    assert fid_floor(data, **kw, tokenizer_dir=debug_tokenizer)["fid"] == pytest.approx(real["fid"], abs=1e-6)
