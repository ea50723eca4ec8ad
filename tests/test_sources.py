"""A kind of data is one DataSource and one entry in pipeline.data.kinds.KINDS. Here a folder of .npy arrays,
defined in this test and registered for it alone, passes config validation (its keys; the keys it does not read
refused), and a real run on it (Ray Train, a sqlite MLflow store) trains, is scored by an evaluator trained on it
and shared through the store, and is registered, with nothing else in the package changed
(tests/test_design.py: nothing outside pipeline/data tells kinds of data apart)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config.load import load_config
from pipeline.core.errors import ConfigError
from pipeline.data import kinds
from pipeline.data.source import DataSource
from pipeline.data.specs import DatasetSpec
from pipeline.data.split import Split
from tests.conftest import CONFIGS

SIDE, CLASSES = 16, 4
FILES = ("train_x", "train_y", "test_x", "test_y")


class NpyFolder(DataSource):
    """A folder (``data.path``) holding train_x.npy and test_x.npy (uint8 grey images, N x side x side) and
    train_y.npy and test_y.npy (their int64 classes)."""

    reads = ("path",)

    def array(self, name: str) -> np.ndarray:
        return np.load(Path(self.data.path) / f"{name}.npy")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 1, *self.array("train_x").shape[1:]

    def read(self, train: bool, progress, most: int | None) -> Split:
        split = "train" if train else "test"
        return Split(torch.from_numpy(self.array(f"{split}_x")), torch.from_numpy(self.array(f"{split}_y")))

    def spec(self) -> DatasetSpec:
        digest = hashlib.sha256(b"".join(self.array(name).tobytes() for name in FILES)).hexdigest()
        return DatasetSpec(
            name=self.name,
            folder=self.data.path,
            image_size=self.image_shape[1],
            channels=1,
            num_classes=int(self.array("train_y").max()) + 1,
            train_images=len(self.array("train_y")),
            evaluator_min_accuracy=0.9,
            content_digest=digest,
            evaluator_min_steps=200,
            test_images=len(self.array("test_y")),
        )


def write_arrays(folder: Path, train: int = 512, test: int = 128) -> Path:
    """Four classes told apart by which quadrant is bright, with noise: a classifier learns them in seconds."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, count in (("train", train), ("test", test)):
        labels = rng.integers(0, CLASSES, count)
        images = rng.integers(0, 60, (count, SIDE, SIDE))
        half = SIDE // 2
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 2)
            images[i, row * half : (row + 1) * half, col * half : (col + 1) * half] += 180
        np.save(folder / f"{split}_x.npy", images.astype(np.uint8))
        np.save(folder / f"{split}_y.npy", labels.astype(np.int64))
    return folder


@pytest.fixture
def npy(tmp_path, monkeypatch):
    """The kind ``npy``, registered for this test only, and a folder of its arrays."""
    monkeypatch.setitem(kinds.KINDS, "npy", NpyFolder)
    return write_arrays(tmp_path / "arrays")


def test_a_kind_of_data_defined_here_is_a_valid_data_dataset_with_its_own_keys(npy):
    cfg = load_config(CONFIGS / "smoke.yaml", ["data.dataset=npy", f"data.path={npy}", "data.limit=null"])
    source = kinds.source_of(cfg.data)
    assert isinstance(source, NpyFolder) and source.image_shape == (1, SIDE, SIDE)
    assert kinds.load(cfg.data).images.shape == (512, SIDE, SIDE) and source.prepare() == 512
    assert source.scores_unavailable() is None and source.spec().key.startswith("npy-")
    with pytest.raises(ConfigError, match="data.image_size: set for data.dataset='npy', which does not read it"):
        load_config(CONFIGS / "smoke.yaml", ["data.dataset=npy", f"data.path={npy}", "data.image_size=64"])
    with pytest.raises(ConfigError, match="data.path: set for data.dataset='mnist', which does not read it; it is for"):
        load_config(CONFIGS / "smoke.yaml", [f"data.path={npy}"])


@pytest.mark.slow  # a real local Ray and MLflow store
def test_a_run_on_a_kind_defined_here_trains_is_scored_and_registered(npy, tmp_path):
    """The run goes through everything that asks the data source: the driver's checks and preparation, the shared
    evaluator (trained on these arrays, registered in the store by their content), the run's data record, the Ray
    Train worker's batches (the source travels in the job), the generator's shape, the registry's dataset tag."""
    import sys

    import ray
    import ray.cloudpickle
    from mlflow.tracking import MlflowClient

    from pipeline.distributed.prepare import RunRequest
    from pipeline.distributed.run import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        "data.dataset=npy",
        f"data.path={npy}",
        "data.limit=null",
        "train.epochs=1",
        "eval.num_samples=256",
        f"tracking.uri={uri}",
        f"train.storage_path={tmp_path / 'runs'}",
        "tracking.registered_model=gan-npy",
    ]
    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    # The source travels to the workers in the job: this test module is not importable there, so by value.
    here = sys.modules[NpyFolder.__module__]
    ray.cloudpickle.register_pickle_by_value(here)
    try:
        outcome = run_training(cfg, RunRequest("npy-run", progress=lambda _: None))
    finally:
        ray.cloudpickle.unregister_pickle_by_value(here)
        ray.shutdown()
    assert outcome.metrics["epoch"] == 1 and outcome.registration is not None
    client = MlflowClient(uri)
    version = client.get_model_version("gan-npy", outcome.registration.version)
    key = kinds.source_of(cfg.data).spec().key
    assert version.tags["dataset"] == key and float(version.tags["fid"]) > 0
    run = client.get_run(outcome.mlflow_run_id)
    assert run.data.tags["dataset"] == "npy" and run.data.tags["data_sha256"].startswith(key.removeprefix("npy-"))
    evaluator = client.search_model_versions(f"name = 'evaluator-{key}'")
    assert evaluator and evaluator[0].tags["weights_sha256"] == run.data.tags["evaluator_sha256"]
    assert client.get_logged_model(outcome.model_uri.split("/")[-1]).name == "generator"
