"""The FID/IS evaluator of a dataset: its classifier (pipeline.eval.classifier) and the test split's feature
statistics, trained the first time it is needed, checked against the dataset's accuracy gate and cached under the
data root with its checksums. Its scores are the metric registry's (pipeline.eval.metrics); they are *not*
comparable with Inception-FIDs. pipeline.tracking.evaluators shares one evaluator per dataset through a store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from pipeline.core.errors import UserError
from pipeline.core.files import file_sha256
from pipeline.data.kinds import source_of
from pipeline.data.source import data_root
from pipeline.data.specs import DatasetSpec, dataset_spec
from pipeline.data.split import Split, to_model_range
from pipeline.eval.classifier import EVAL_BATCH, FEATURE_DIM, Classifier, train_classifier
from pipeline.eval.metrics import Features, computed_by
from pipeline.eval.scores import statistics

if TYPE_CHECKING:
    from pipeline.config.schema import DataConfig

EVALUATOR_VERSION = 1
EVALUATOR_FILES = ("evaluator.pt", "test_stats.npz", "meta.json")  # meta.json last: it marks a cache valid


class EvaluatorError(UserError):
    """The evaluator could not be trained to its accuracy gate, or its cache is unusable."""


@dataclass
class Evaluator:
    model: Classifier
    dataset: str
    test_accuracy: float
    test_mu: np.ndarray
    test_sigma: np.ndarray
    # SHA-256 of the cached weights: FIDs are comparable only between runs scored by the same evaluator.
    checksum: str = ""

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> Features:
        """uint8 images (N, H, W) or (N, C, H, W) -> float64 features (N, 128) and class probabilities."""
        self.model.eval()
        feats, probs = [], []
        for start in range(0, len(images), EVAL_BATCH):
            f, logits = self.model(to_model_range(images[start : start + EVAL_BATCH].cpu()))
            feats.append(f.double())
            probs.append(F.softmax(logits.double(), dim=1))
        return Features(torch.cat(feats).numpy(), torch.cat(probs).numpy(), self.test_mu, self.test_sigma)

    def payload(self) -> dict[str, Any]:
        """Everything needed to rebuild this evaluator elsewhere (shipped to every worker of a run, so all
        trials on all nodes are scored by the very same network)."""
        return {
            "weights": self.model.state_dict(),
            "dataset": self.dataset,
            "shape": list(self.model.shape),
            "test_accuracy": self.test_accuracy,
            "test_mu": self.test_mu,
            "test_sigma": self.test_sigma,
            "checksum": self.checksum,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Evaluator:
        model = Classifier(_payload_spec(payload))
        model.load_state_dict(payload["weights"])
        return cls(
            model.eval(),
            payload["dataset"],
            payload["test_accuracy"],
            payload["test_mu"],
            payload["test_sigma"],
            payload.get("checksum", ""),
        )

    def score(self, images: torch.Tensor) -> dict[str, float]:
        """Every metric its classifier computes (pipeline.eval.metrics), of uint8 images."""
        if len(images) < 2:
            raise EvaluatorError(f"need at least 2 images to score, got {len(images)}")
        features = self.features(images)
        return {key: value for metric in computed_by("classifier") for key, value in metric.compute(features).items()}


def _payload_spec(payload: dict[str, Any]) -> DatasetSpec:
    """The spec a shipped evaluator's network is built for: its recorded shape, or its dataset's entry."""
    if "shape" not in payload:
        return dataset_spec(payload["dataset"])
    channels, side, classes = payload["shape"]
    return DatasetSpec(payload["dataset"], "", side, channels, classes, 0, 0.0)


def cache_dir(data: DataConfig, spec: DatasetSpec) -> Path:
    """Where the evaluator of ``spec`` is cached: under the data root, by the data's key."""
    return data_root(data) / "evaluators" / spec.key


def get_evaluator(
    data: DataConfig, progress: Callable[[str], None] = print, splits: tuple[Split, Split] | None = None
) -> Evaluator:
    """The cached evaluator of ``data``'s dataset; trained (under a file lock) the first time.

    ``splits`` (train, test) replaces the dataset's own (tests use tiny fabricated ones).
    """
    source = source_of(replace(data, limit=None))
    spec = source.spec()
    directory = cache_dir(data, spec)
    cached = load_cached(directory, spec)
    if cached is not None:
        return cached
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / ".lock"), timeout=3600):
        cached = load_cached(directory, spec)
        if cached is not None:
            return cached
        if splits is None:
            most = spec.evaluator_images or (None, None)  # a large folder's evaluator: its first images
            splits = source.load(True, progress, most[0]), source.load(False, progress, most[1])
        train, test = splits
        progress(f"[eval] training the {spec.key} evaluator (once; cached in {directory})")
        model, accuracy = train_classifier(spec, train, test, progress=progress)
        gate = spec.evaluator_min_accuracy
        if accuracy < gate:
            raise EvaluatorError(
                f"the {spec.key} evaluator reached only {accuracy:.4f} test accuracy (< {gate}); "
                f"FID/IS from it would mislead, so nothing was cached. {source.evaluator_fix()}"
            )
        evaluator = Evaluator(model, spec.key, accuracy, np.zeros(FEATURE_DIM), np.eye(FEATURE_DIM))
        evaluator.test_mu, evaluator.test_sigma = statistics(evaluator.features(test.images).features)
        weights = directory / "evaluator.pt"
        tmp = weights.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(weights)
        np.savez(directory / "test_stats.npz", mu=evaluator.test_mu, sigma=evaluator.test_sigma)
        evaluator.checksum = file_sha256(weights)
        meta = {
            "version": EVALUATOR_VERSION,
            "dataset": spec.key,
            "test_accuracy": accuracy,
            "weights_sha256": evaluator.checksum,
            "stats_sha256": file_sha256(directory / "test_stats.npz"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks the cache valid
        return evaluator


def load_cached(directory: Path, spec: DatasetSpec) -> Evaluator | None:
    """The cached evaluator if complete and intact (checksums match); None means (re)train it."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        weights, stats = directory / "evaluator.pt", directory / "test_stats.npz"
        if (
            meta.get("version") != EVALUATOR_VERSION
            or meta.get("dataset") != spec.key
            or file_sha256(weights) != meta["weights_sha256"]
            or file_sha256(stats) != meta["stats_sha256"]
        ):
            return None
        model = Classifier(spec)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        with np.load(stats, allow_pickle=False) as arrays:
            mu, sigma = arrays["mu"], arrays["sigma"]
    except (OSError, KeyError, ValueError, json.JSONDecodeError, RuntimeError):
        return None
    return Evaluator(model.eval(), spec.key, float(meta["test_accuracy"]), mu, sigma, meta["weights_sha256"])


def real_reference(
    data: DataConfig, evaluator: Evaluator, num: int = 10_000, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """The real-data yardstick, scored by ``evaluator``: the scores of ``num`` training images against the test
    split (``train``), and of the test split itself (``test``)."""
    source = source_of(replace(data, limit=None))
    train, test = source.load(True, progress), source.load(False, progress)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:num]
    return {
        "train": evaluator.score(train.images[pick]),
        "test": evaluator.score(test.images),
        "evaluator_test_accuracy": evaluator.test_accuracy,
    }
