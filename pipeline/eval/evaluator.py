"""The evaluator of a dataset: the network whose features score generated images, and the test split's features.
Data with classes gets its classifier (pipeline.eval.classifier), data without a feature extractor trained without
labels (pipeline.eval.extractor). It is trained the first time it is needed, held to its gate on held-out images
and cached under the data root with its checksums. Its scores are the metric registry's (pipeline.eval.metrics);
they are *not* comparable with Inception-FIDs (pipeline.eval.inception). pipeline.tracking.evaluators shares one
evaluator per dataset through a store.
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
from torch import nn

from pipeline.core.errors import UserError
from pipeline.core.files import file_sha256
from pipeline.data.kinds import source_of
from pipeline.data.source import data_root
from pipeline.data.specs import DatasetSpec
from pipeline.data.split import Split, to_model_range
from pipeline.eval.classifier import EVAL_BATCH, Classifier, train_classifier
from pipeline.eval.extractor import Extractor, train_extractor
from pipeline.eval.metrics import Features, computed_by
from pipeline.eval.scores import manifold_radii, statistics

if TYPE_CHECKING:
    from pipeline.config.schema import DataConfig
    from pipeline.data.source import DataSource

EVALUATOR_VERSION = 2  # 2: the test split's features are kept (KID, precision/recall); extractors for unlabelled data
EVALUATOR_FILES = ("evaluator.pt", "test_stats.npz", "meta.json")  # meta.json last: it marks a cache valid
CLASSIFIER = "classifier"
EXTRACTOR = "rotation"  # the objective of the extractor of data without classes: chosen by docs/scores.md's table
EXTRACTOR_STEPS = 400  # batches of 64 it trains for, once per folder
# The held-out rotation accuracy it must reach: 0.25 is chance, and 0.35 is over 3 standard errors above it with
# the fewest held-out images scored (50, four turns each). Symmetric content (circles, squares, textures) keeps
# it low though its features still score well, so the gate asks only that it learned something.
EXTRACTOR_GATE = 0.35
REFERENCE_MOST = 10_000  # the most test features kept as the reference


class EvaluatorError(UserError):
    """The evaluator could not be trained to its accuracy gate, or its cache is unusable."""


def evaluator_kind(source: DataSource) -> str:
    """Which network scores ``source``'s images (``data.evaluator``): by default its classifier where it has
    classes (and held-out images of each), else a feature extractor trained without labels (pipeline.eval.extractor)."""
    return source.scored_by()


def sample_count(setting: int | None, reference_rows: int) -> int:
    """How many generated images an evaluation scores: ``eval.num_samples``, or with null as many as the reference
    holds (``reference_rows``: the held-out images' features, at most :data:`REFERENCE_MOST`)."""
    return setting or reference_rows


def network(kind: str, shape: tuple[int, int, int]) -> nn.Module:
    """An untrained evaluator network of ``kind`` for images of ``shape`` (channels, side, classes)."""
    channels, side, classes = shape
    if kind == CLASSIFIER:
        return Classifier(DatasetSpec("", "", side, channels, classes, 0, 0.0))
    return Extractor(channels, side, kind)


@dataclass
class Evaluator:
    model: nn.Module  # a Classifier or an Extractor: (features, outputs) for images in [-1, 1]
    dataset: str
    test_accuracy: float  # on held-out images: class accuracy, or the extractor's objective (see its kind)
    reference: np.ndarray  # (M, D) float32: the test split's features, in a fixed random order
    # SHA-256 of the cached weights: scores are comparable only between runs scored by the same evaluator.
    checksum: str = ""
    kind: str = CLASSIFIER
    classes: int = 0

    def __post_init__(self) -> None:
        self.test_mu, self.test_sigma = statistics(self.reference)
        self._radii: dict[int, np.ndarray] = {}

    def sample_count(self, setting: int | None) -> int:
        """How many generated images an evaluation scores (:func:`sample_count`)."""
        return sample_count(setting, len(self.reference))

    def radii(self, m: int) -> np.ndarray:
        """The k=3 manifold radii of the first ``m`` reference features (computed once per count)."""
        if m not in self._radii:
            self._radii[m] = manifold_radii(self.reference[:m], 3)
        return self._radii[m]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> Features:
        """uint8 images (N, H, W) or (N, C, H, W) -> float64 features (N, D: a classifier's 128, an extractor's
        two per channel of each block) and, from a classifier, class probabilities."""
        self.model.eval()
        feats, probs = [], []
        for start in range(0, len(images), EVAL_BATCH):
            f, logits = self.model(to_model_range(images[start : start + EVAL_BATCH].cpu()))
            feats.append(f.double())
            probs.append(F.softmax(logits.double(), dim=1))
        classes = torch.cat(probs).numpy() if self.kind == CLASSIFIER else None
        return Features(torch.cat(feats).numpy(), classes, self.reference, self.test_mu, self.test_sigma, self.radii)

    def referenced(self, images: torch.Tensor) -> Evaluator:
        """This evaluator with ``images`` (uint8) as its reference: an extractor first calibrated on them."""
        if isinstance(self.model, Extractor):
            self.model.calibrate(images)
        return replace(self, reference=self.features(images).features.astype(np.float32))

    def payload(self) -> dict[str, Any]:
        """Everything needed to rebuild this evaluator elsewhere (shipped to every worker of a run, so all
        trials on all nodes are scored by the very same network)."""
        return {
            "weights": self.model.state_dict(),
            "dataset": self.dataset,
            "kind": self.kind,
            "shape": list(self.shape),
            "test_accuracy": self.test_accuracy,
            "reference": self.reference,
            "checksum": self.checksum,
        }

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.shape[0], self.model.shape[1], self.classes

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Evaluator:
        shape = tuple(payload["shape"])
        model = network(payload["kind"], shape)
        model.load_state_dict(payload["weights"])
        return cls(
            model.eval(),
            payload["dataset"],
            payload["test_accuracy"],
            payload["reference"],
            payload["checksum"],
            payload["kind"],
            shape[2],
        )

    def score(self, images: torch.Tensor, asked: torch.Tensor | None = None) -> dict[str, float]:
        """Every metric it computes (pipeline.eval.metrics), of uint8 images (generated as the classes ``asked``, by
        a conditional generator)."""
        if len(images) < 4:
            raise EvaluatorError(f"need at least 4 images to score, got {len(images)}")
        features = self.features(images)
        features.asked = asked.numpy() if asked is not None else None
        metrics = computed_by(classes=self.kind == CLASSIFIER)
        return {key: value for metric in metrics for key, value in metric.compute(features).items()}

    def describe(self) -> str:
        """Its network and how it did on held-out images, for a console line."""
        if self.kind == CLASSIFIER:
            return f"classifier, test accuracy {self.test_accuracy:.4f}"
        return f"{self.kind} extractor, held-out {self.kind} accuracy {self.test_accuracy:.4f}"


def cache_dir(data: DataConfig, spec: DatasetSpec) -> Path:
    """Where the evaluator of ``spec`` is cached: under the data root, by the data's key (and its kind, where
    ``data.evaluator`` chose another than the default's)."""
    kind = evaluator_kind(source_of(replace(data, limit=None)))
    default = evaluator_kind(source_of(replace(data, limit=None, evaluator="auto")))
    return data_root(data) / "evaluators" / (spec.key if kind == default else f"{spec.key}-{kind}")


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
        evaluator = _train(evaluator_kind(source), spec, splits, directory, progress, source.evaluator_fix())
        _save(evaluator, directory)
        return evaluator


def _train(
    kind: str,
    spec: DatasetSpec,
    splits: tuple[Split, Split],
    directory: Path,
    progress: Callable[[str], None],
    fix: str,
) -> Evaluator:
    """A new evaluator of ``kind`` for ``spec``, trained on ``splits`` and held to its gate."""
    train, test = splits
    progress(f"[eval] training the {spec.key} evaluator, a {kind} network (once; cached in {directory})")
    if kind == CLASSIFIER:
        model, figure = train_classifier(spec, train, test, progress=progress)
        gate, what = spec.evaluator_min_accuracy, "test accuracy"
    else:
        model, figure = train_extractor(train, test, kind, EXTRACTOR_STEPS, 0, progress)
        gate, what = EXTRACTOR_GATE, f"held-out {kind} accuracy"
        fix = (
            "Its images look alike turned by a quarter (textures, symmetric shapes), so the extractor learns nothing "
            "from turning them: train without scores (eval.every_epochs=0)"
        )
    if figure < gate:
        raise EvaluatorError(
            f"the {spec.key} evaluator reached only {figure:.4f} {what} (< {gate}); scores from it would mislead, "
            f"so nothing was cached. {fix}"
        )
    classes = spec.num_classes if kind == CLASSIFIER else 0
    unreferenced = Evaluator(model, spec.key, figure, np.eye(2, 4, dtype=np.float32), "", kind, classes)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:REFERENCE_MOST]
    return unreferenced.referenced(test.images[order])


def _save(evaluator: Evaluator, directory: Path) -> None:
    """Its files into ``directory``, meta.json last (it marks the cache valid); sets its checksum."""
    weights = directory / "evaluator.pt"
    tmp = weights.with_suffix(".tmp")
    torch.save(evaluator.model.state_dict(), tmp)
    tmp.replace(weights)
    np.savez(directory / "test_stats.npz", reference=evaluator.reference)
    evaluator.checksum = file_sha256(weights)
    meta = {
        "version": EVALUATOR_VERSION,
        "dataset": evaluator.dataset,
        "kind": evaluator.kind,
        "shape": list(evaluator.shape),
        "test_accuracy": evaluator.test_accuracy,
        "weights_sha256": evaluator.checksum,
        "stats_sha256": file_sha256(directory / "test_stats.npz"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


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
        shape = tuple(meta["shape"])
        model = network(meta["kind"], shape)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        with np.load(stats, allow_pickle=False) as arrays:
            reference = arrays["reference"]
    except (OSError, KeyError, ValueError, json.JSONDecodeError, RuntimeError):
        return None
    accuracy = float(meta["test_accuracy"])
    return Evaluator(model.eval(), spec.key, accuracy, reference, meta["weights_sha256"], meta["kind"], shape[2])


def real_reference(
    data: DataConfig, evaluator: Evaluator, num: int = 10_000, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """The real-data yardstick, scored by ``evaluator``: the scores of ``num`` training images against the test
    split (``train``), and of the test split itself (``test``)."""
    source = source_of(replace(data, limit=None))
    train, test = source.load(True, progress, num), source.load(False, progress, REFERENCE_MOST)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:num]
    return {
        "train": evaluator.score(train.images[pick]),
        "test": evaluator.score(test.images),
        "evaluator_test_accuracy": evaluator.test_accuracy,
    }
