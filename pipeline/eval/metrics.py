"""The metrics runs are scored by: one :class:`Metric` entry per metric, and the only place their names are spelt.

An entry says what the metric is called (its key in reports, MLflow, Tune's results and the Model Registry's tags),
which way is better, which evaluator's features it is computed from and how, and what it may decide: whether a
sweep may rank trials by it (``tune.metric``), and which one picks the registry's champion and the checkpoints
Ray Train keeps. Sweeps, schedulers, checkpoint ranking, reports and the registry ask here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.eval.scores import (
    frechet_distance,
    frechet_distance_of_sets,
    inception_score,
    kernel_inception_distance,
    precision_recall,
    statistics,
)

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig

PR_SAMPLES = 5000  # precision/recall compare at most this many generated and real images (their k-NN manifolds)
PER_CLASS_MOST = 16  # classes whose class accuracy is recorded one by one


@dataclass
class Features:
    """What an evaluator makes of a batch of images, and its reference: the test split's features (in a fixed
    random order) and their statistics."""

    features: np.ndarray  # (N, D) float64
    probs: np.ndarray | None  # (N, classes) class probabilities: a classifier's; None for an extractor's features
    reference: np.ndarray  # (M, D) the test split's features
    reference_mu: np.ndarray
    reference_sigma: np.ndarray
    radii: Callable[[int], np.ndarray] | None = None  # the first m reference features' k=3 radii (cached by m)
    asked: np.ndarray | None = None  # (N,) the class each sample was generated as (a conditional generator's)

    def frechet(self) -> float:
        """The Fréchet distance of the features to the reference: from the sets themselves where either has fewer
        rows than features have dimensions (the smaller problem), else (or with only the reference's statistics
        kept, as the Inception FID keeps them) from their statistics."""
        if len(self.reference) and min(len(self.features), len(self.reference)) < self.features.shape[1]:
            return frechet_distance_of_sets(self.features, self.reference)
        mu, sigma = statistics(self.features)
        return frechet_distance(mu, sigma, self.reference_mu, self.reference_sigma)

    @cached_property
    def precision_recall(self) -> tuple[float, float]:
        """Precision and recall with k=3 on the first ``min(N, M, PR_SAMPLES)`` of each (equal counts: both
        depend on how many images make a manifold)."""
        m = min(len(self.features), len(self.reference), PR_SAMPLES)
        radii = self.radii(m) if self.radii is not None else None
        return precision_recall(self.features[:m], self.reference[:m], k=3, reference_radii=radii)


@dataclass(frozen=True)
class Metric:
    name: str  # its key everywhere: reports, MLflow metrics, Tune results, registry tags
    label: str  # how a console line shows it
    mode: Literal["min", "max"]  # which way is better
    needs: Literal["features", "classes", "inception"]  # what it is computed from: the evaluator's features (any
    # evaluator), its class probabilities (a classifier only), or the Inception network's features
    compute: Callable[[Features], dict[str, float]]  # its value (and companions, e.g. a spread) for the samples
    worst: float  # what a run that diverged reports: ranked after every real value
    ranks: bool  # a sweep may rank trials by it (tune.metric)
    compares: bool  # it compares the samples with the test split (0 for the test split itself), or judges them alone
    doc: str
    more_digits: int = 0  # shown with this many more decimals than the others (KID's values are ~1e-3)

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` beats ``b`` strictly."""
        return a < b if self.mode == "min" else a > b

    def best(self, values: Iterable[float]) -> float:
        return (min if self.mode == "min" else max)(values)

    def sort_key(self, value: float) -> float:
        """Sorting by this key puts the best first."""
        return value if self.mode == "min" else -value


def _fid(features: Features) -> dict[str, float]:
    return {FID.name: features.frechet()}


def _inception_score(features: Features) -> dict[str, float]:
    mean, spread = inception_score(features.probs, splits=min(10, len(features.probs)))
    return {INCEPTION_SCORE.name: mean, f"{INCEPTION_SCORE.name}_std": spread}


def _inception_fid(features: Features) -> dict[str, float]:
    return {INCEPTION_FID.name: features.frechet()}


def _kid(features: Features) -> dict[str, float]:
    mean, spread = kernel_inception_distance(features.features, features.reference)
    return {KID.name: mean, f"{KID.name}_std": spread}


def _class_accuracy(features: Features) -> dict[str, float]:
    """The share of a conditional generator's samples the classifier puts in the class they were asked as, overall
    and per class (``class_accuracy_K``, of the first :data:`PER_CLASS_MOST` classes); nothing for samples of an
    unconditional one."""
    if features.asked is None or features.probs is None:
        return {}
    hits = features.probs.argmax(axis=1) == features.asked
    scores = {CLASS_ACCURACY.name: float(hits.mean())}
    for k in range(min(features.probs.shape[1], PER_CLASS_MOST)):
        mine = features.asked == k
        if mine.any():
            scores[f"{CLASS_ACCURACY.name}_{k}"] = float(hits[mine].mean())
    return scores


def _precision(features: Features) -> dict[str, float]:
    return {PRECISION.name: features.precision_recall[0]}


def _recall(features: Features) -> dict[str, float]:
    return {RECALL.name: features.precision_recall[1]}


FID = Metric(
    "fid",
    "FID",
    "min",
    "features",
    _fid,
    worst=math.inf,
    ranks=True,
    compares=True,
    doc="Fréchet distance between the samples' and the test split's features (the dataset's evaluator)",
)
KID = Metric(
    "kid",
    "KID",
    "min",
    "features",
    _kid,
    worst=math.inf,
    ranks=True,
    compares=True,
    doc="unbiased MMD² (cubic kernel) between the samples' and the test split's features, over 50 subsets of "
    "up to 1000 (with its std); unbiased at small counts",
    more_digits=2,
)
PRECISION = Metric(
    "precision",
    "precision",
    "max",
    "features",
    _precision,
    worst=0.0,
    ranks=True,
    compares=True,
    doc="share of samples inside the test split's k-NN manifold (k=3): fidelity",
)
RECALL = Metric(
    "recall",
    "recall",
    "max",
    "features",
    _recall,
    worst=0.0,
    ranks=True,
    compares=True,
    doc="share of test images inside the samples' k-NN manifold (k=3): diversity",
)
INCEPTION_SCORE = Metric(
    "inception_score",
    "IS",
    "max",
    "classes",
    _inception_score,
    worst=0.0,
    ranks=True,
    compares=False,
    doc="exp(E KL(p(y|x) || p(y))) of the classifier's class probabilities, over 10 splits (with its std)",
)

CLASS_ACCURACY = Metric(
    "class_accuracy",
    "class acc",
    "max",
    "classes",
    _class_accuracy,
    worst=0.0,
    ranks=False,  # only a conditional generator has one
    compares=False,
    doc="a conditional generator's (model.conditional): the share of its samples the classifier puts in the class "
    "each was generated as, overall and per class (class_accuracy_K); the real test split's is the classifier's "
    "accuracy",
)

INCEPTION_FID = Metric(
    "fid_inception",
    "FID(Inception)",
    "min",
    "inception",
    _inception_fid,
    worst=math.inf,
    ranks=False,  # its figures need the same weights and sample count to compare, which the registry does not track
    compares=True,
    doc="the standard FID: TF-FID Inception-v3 pool3 features of eval.inception_samples samples against the test "
    "split's, where eval.inception_weights gives the weights (pipeline.eval.inception)",
)

METRICS: dict[str, Metric] = {
    entry.name: entry for entry in (FID, INCEPTION_SCORE, KID, PRECISION, RECALL, CLASS_ACCURACY, INCEPTION_FID)
}
DEFAULT_RANKING = FID  # what a sweep ranks by when tune.metric is null
CHAMPION_METRIC = FID  # what picks the registry's champion and the checkpoints Ray Train keeps, by default


def metric(name: str, key: str = "tune.metric") -> Metric:
    """The entry ``name`` (given as ``key``) that can rank trials; a ConfigError naming those that can otherwise."""
    entry = METRICS.get(name)
    if entry is None or not entry.ranks:
        ranking = ", ".join(m.name for m in METRICS.values() if m.ranks)
        raise ConfigError(f"{key}: {name!r} is not a metric that can rank trials; use one of {ranking}")
    return entry


def check_measured(entry: Metric, key: str, classes: bool, data: str) -> None:
    """``entry`` (given as ``key``) is one the data's evaluator computes: a ConfigError before training if not (a
    classifier's IS on data without classes)."""
    if entry not in computed_by(classes):
        kinds = "a classifier's class probabilities; this data is scored by a feature extractor (data.evaluator)"
        raise ConfigError(
            f"{key}: {entry.name} needs {kinds} ({data}); use one of "
            f"{', '.join(m.name for m in computed_by(classes) if m.ranks)}"
        )


def champion_metric(cfg: PipelineConfig) -> Metric:
    """What picks ``cfg``'s registry champion and the checkpoints Ray Train keeps (``tracking.champion_metric``)."""
    return metric(cfg.tracking.champion_metric or CHAMPION_METRIC.name, "tracking.champion_metric")


def computed_by(classes: bool) -> list[Metric]:
    """The metrics an evaluator computes: from its features, and, for a classifier (``classes``), from its class
    probabilities."""
    return [m for m in METRICS.values() if m.needs == "features" or (classes and m.needs == "classes")]


def metrics_needing(what: str) -> list[Metric]:
    """The metrics computed from ``what`` (a Metric's ``needs``)."""
    return [m for m in METRICS.values() if m.needs == what]


def scores_line(metrics: Mapping[str, float], digits: int = 2, spread: bool = False) -> str:
    """The scores among ``metrics`` as a console line shows them: ``FID=12.34  IS=2.10`` (with ``spread``, a
    metric's std where it has one: ``IS=2.10 +- 0.03``)."""
    shown = []
    for metric in (m for m in METRICS.values() if metrics.get(m.name) is not None):
        std = metrics.get(f"{metric.name}_std") if spread else None
        places = digits + metric.more_digits
        shown.append(f"{metric.label}={metrics[metric.name]:.{places}f}" + (f" +- {std:.{places}f}" if std else ""))
    return "  ".join(shown)


def comparing(scores: Mapping[str, float], compares: bool = True) -> dict[str, float]:
    """The scores of the metrics that compare with the test split (or, ``compares=False``, of those that do not),
    with their companions (a std)."""
    names = [m.name for m in METRICS.values() if m.compares == compares]
    return {key: value for key, value in scores.items() if any(key == n or key.startswith(f"{n}_") for n in names)}


def worst_scores() -> dict[str, float]:
    """Every metric at its worst: what a diverged run's last result carries (Tune needs the sweep's metric in
    every result, and must rank such a trial last)."""
    return {m.name: m.worst for m in METRICS.values()}
