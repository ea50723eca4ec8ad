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
from typing import Literal

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.eval.scores import frechet_distance, inception_score, statistics


@dataclass(frozen=True)
class Features:
    """What an evaluator makes of a batch of images, and its reference: the test split's feature statistics."""

    features: np.ndarray  # (N, D) float64
    probs: np.ndarray  # (N, classes) class probabilities
    reference_mu: np.ndarray
    reference_sigma: np.ndarray


@dataclass(frozen=True)
class Metric:
    name: str  # its key everywhere: reports, MLflow metrics, Tune results, registry tags
    label: str  # how a console line shows it
    mode: Literal["min", "max"]  # which way is better
    evaluator: str  # whose features it is computed from: "classifier", the dataset's own (pipeline.eval.classifier)
    compute: Callable[[Features], dict[str, float]]  # its value (and companions, e.g. a spread) for the samples
    worst: float  # what a run that diverged reports: ranked after every real value
    ranks: bool  # a sweep may rank trials by it (tune.metric)
    compares: bool  # it compares the samples with the test split (0 for the test split itself), or judges them alone
    doc: str

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` beats ``b`` strictly."""
        return a < b if self.mode == "min" else a > b

    def best(self, values: Iterable[float]) -> float:
        return (min if self.mode == "min" else max)(values)

    def sort_key(self, value: float) -> float:
        """Sorting by this key puts the best first."""
        return value if self.mode == "min" else -value


def _fid(features: Features) -> dict[str, float]:
    mu, sigma = statistics(features.features)
    return {FID.name: frechet_distance(mu, sigma, features.reference_mu, features.reference_sigma)}


def _inception_score(features: Features) -> dict[str, float]:
    mean, spread = inception_score(features.probs, splits=min(10, len(features.probs)))
    return {INCEPTION_SCORE.name: mean, f"{INCEPTION_SCORE.name}_std": spread}


FID = Metric(
    "fid",
    "FID",
    "min",
    "classifier",
    _fid,
    worst=math.inf,
    ranks=True,
    compares=True,
    doc="Fréchet distance between the samples' and the test split's features (the dataset's classifier)",
)
INCEPTION_SCORE = Metric(
    "inception_score",
    "IS",
    "max",
    "classifier",
    _inception_score,
    worst=0.0,
    ranks=True,
    compares=False,
    doc="exp(E KL(p(y|x) || p(y))) of the classifier's class probabilities, over 10 splits (with its std)",
)

METRICS: dict[str, Metric] = {entry.name: entry for entry in (FID, INCEPTION_SCORE)}
DEFAULT_RANKING = FID  # what a sweep ranks by when tune.metric is null
CHAMPION_METRIC = FID  # what picks the Model Registry's champion and the checkpoints Ray Train keeps besides the latest


def metric(name: str, key: str = "tune.metric") -> Metric:
    """The entry ``name`` (given as ``key``) that can rank trials; a ConfigError naming those that can otherwise."""
    entry = METRICS.get(name)
    if entry is None or not entry.ranks:
        ranking = ", ".join(m.name for m in METRICS.values() if m.ranks)
        raise ConfigError(f"{key}: {name!r} is not a metric that can rank trials; use one of {ranking}")
    return entry


def computed_by(evaluator: str) -> list[Metric]:
    """The metrics ``evaluator``'s features compute."""
    return [m for m in METRICS.values() if m.evaluator == evaluator]


def scores_line(metrics: Mapping[str, float], digits: int = 2, spread: bool = False) -> str:
    """The scores among ``metrics`` as a console line shows them: ``FID=12.34  IS=2.10`` (with ``spread``, a
    metric's std where it has one: ``IS=2.10 +- 0.03``)."""
    shown = []
    for metric in (m for m in METRICS.values() if m.name in metrics):
        std = metrics.get(f"{metric.name}_std") if spread else None
        shown.append(f"{metric.label}={metrics[metric.name]:.{digits}f}" + (f" +- {std:.{digits}f}" if std else ""))
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
