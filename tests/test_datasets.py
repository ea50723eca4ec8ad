"""An IDX dataset is one DatasetSpec (pipeline/data/specs.py): registered inside this test, a new one passes config
validation, is found ready by the preparation (its checksums), reaches the loader and trains, with networks and
an evaluator shaped by its spec. No other module needs an edit (tests/test_design.py: no dataset fact elsewhere)."""

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from pipeline.config.load import load_config
from pipeline.core.errors import ConfigError
from pipeline.data import idx as data
from pipeline.data import specs as datasets
from pipeline.data.kinds import load
from pipeline.data.specs import MNIST, RawFile
from pipeline.eval.classifier import Classifier
from pipeline.gan.hooks import On
from pipeline.gan.loop import train_gan
from tests.conftest import CONFIGS


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """'tiny': 96 training and 32 test images of 12 x 12 pixels, 4 classes, registered for this test only."""
    rng = np.random.default_rng(0)
    splits = {"train": 96, "t10k": 32}
    contents = {}
    for split, count in splits.items():
        contents[f"{split}-images-idx3-ubyte"] = _idx(rng.integers(0, 256, (count, 12, 12)))
        contents[f"{split}-labels-idx1-ubyte"] = _idx(rng.integers(0, 4, count))
    spec = dataclasses.replace(
        MNIST,
        name="tiny",
        folder="Tiny",
        image_size=12,
        num_classes=4,
        train_images=splits["train"],
        files={name: RawFile(len(blob), hashlib.sha256(blob).hexdigest()) for name, blob in contents.items()},
    )
    raw = tmp_path / spec.folder / "raw"
    raw.mkdir(parents=True)
    for name, blob in contents.items():
        (raw / name).write_bytes(blob)
    monkeypatch.setitem(datasets.DATASETS, spec.name, spec)
    return spec, tmp_path


def test_a_registered_spec_is_all_a_new_dataset_needs(tiny):
    spec, root = tiny
    del datasets.DATASETS[spec.name]  # unregistered, the name is refused with the ones there are
    with pytest.raises(ConfigError, match="data.dataset: 'tiny' is not valid; expected one of mnist, fashion_mnist"):
        load_config(CONFIGS / "smoke.yaml", ["data.dataset=tiny"])
    datasets.DATASETS[spec.name] = spec
    cfg = load_config(
        CONFIGS / "smoke.yaml",
        ["data.dataset=tiny", f"data.root={root}", "data.limit=null", "train.batch_size=32", "train.epochs=1"],
    )
    # Validation knows its size ...
    with pytest.raises(ConfigError, match="data.limit: 97 exceeds the 96 training images"):
        load_config(CONFIGS / "smoke.yaml", ["data.dataset=tiny", "data.limit=97", "train.batch_size=32"])
    # ... the preparation finds its files ready by their checksums, the loader reads them ...
    assert data.prepare(spec.name, root, progress=print) == root / spec.folder / "raw"
    train, test = load(cfg.data), load(cfg.data, train=False)
    assert train.images.shape == (96, 12, 12) and len(test) == 32 and int(train.labels.max()) < 4
    # ... and the loop trains on it with networks of its shape; the evaluator is sized by it too.
    reports = []
    result = train_gan(cfg, train, hooks=[On(report=reports.append)])
    assert result.step == 3 and np.isfinite(reports[-1].metrics["loss_d"])
    fakes = result.generator.eval()(torch.randn(2, cfg.model.latent_dim))
    assert fakes.shape == (2, 1, 12, 12)
    _, logits = Classifier(spec)(torch.zeros(2, 1, 12, 12))
    assert logits.shape == (2, 4)
