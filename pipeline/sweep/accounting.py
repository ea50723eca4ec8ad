"""Where a sweep's hardware time went: ``busy_fraction`` and the seconds around the training steps.

Every report of a Train run (pipeline.distributed.train_run) carries, from rank 0: ``worker_s``, the
worker-seconds its training steps took since the previous report (step seconds x world size); ``eval_time_s``
when it scored; ``checkpoint_s``, the seconds the previous report's checkpoint took to save and persist;
``grown_cpu_s`` from a thread-elastic trial (pipeline.distributed.elastic), the CPU-seconds its steps used beyond
its reservation; and in a trial's first report after each (re)start, ``start_s``, from its driver process
loading our code to the first training step, split into ``start_driver_s`` (the trial's driver: MLflow run,
evaluator, checks, up to Ray Train's fit), ``start_workers_s`` (Train controller and worker group, up to our
code on the workers), ``start_data_s`` (dataset into memory) and ``start_setup_s`` (networks, evaluator, resume:
up to the first step).

    busy_fraction = (worker-seconds in training steps x each worker's CPUs (GPUs on a GPU sweep)
                     + grown CPU-seconds) / (sweep wall seconds x the CPUs (GPUs) of the cluster)

Idle hardware, trial starts, evaluation, checkpoints and Tune's decisions all count against it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

START_PHASES = ("start_driver_s", "start_workers_s", "start_data_s", "start_setup_s")


def _number(report: Mapping[str, object], key: str) -> float | None:
    value = report.get(key)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


@dataclass(frozen=True)
class TrialTime:
    """One trial's reports, summed."""

    worker_s: float  # worker-seconds in training steps
    eval_s: float
    checkpoint_s: float
    starts: tuple[float, ...]  # start-to-first-step of each (re)start, seconds
    phases: tuple[tuple[float, ...], ...]  # per start: START_PHASES
    grown_s: float = 0.0  # CPU-seconds in training steps beyond the worker's reservation (thread-elastic)

    @classmethod
    def of(cls, reports: Iterable[Mapping[str, object]]) -> TrialTime:
        worker_s = grown_s = eval_s = checkpoint_s = 0.0
        starts, phases = [], []
        for report in reports:
            worker_s += _number(report, "worker_s") or 0.0
            grown_s += _number(report, "grown_cpu_s") or 0.0
            eval_s += _number(report, "eval_time_s") or 0.0
            checkpoint_s += _number(report, "checkpoint_s") or 0.0
            start = _number(report, "start_s")
            if start is not None:
                starts.append(start)
                phases.append(tuple(_number(report, key) or 0.0 for key in START_PHASES))
        return cls(worker_s, eval_s, checkpoint_s, tuple(starts), tuple(phases), grown_s)

    @property
    def start_median_s(self) -> float:
        return _median(self.starts)


@dataclass(frozen=True)
class SweepTime:
    """The sweep's figures: what it printed and logged on its MLflow parent run."""

    busy_fraction: float
    wall_s: float
    capacity: float  # CPUs (or GPUs) of the cluster: the hardware the sweep held
    train_s: float  # resource-seconds in training steps
    eval_s: float  # trial-seconds spent scoring (FID/IS)
    checkpoint_s: float  # trial-seconds spent saving checkpoints
    trial_starts: int
    start_median_s: float
    start_max_s: float
    start_driver_median_s: float  # where a median start went (each phase's median)
    start_workers_median_s: float
    start_data_median_s: float
    start_setup_median_s: float

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if not math.isnan(v)}

    def line(self) -> str:
        line = (
            f"busy_fraction {self.busy_fraction:.2f} ({self.train_s:.0f} of {self.wall_s * self.capacity:.0f} "
            f"CPU/GPU-seconds of {self.wall_s:.0f} s x {self.capacity:g} in training steps); evaluation "
            f"{self.eval_s:.0f} s, checkpoints {self.checkpoint_s:.0f} s (trial-seconds)"
        )
        if self.trial_starts:
            line += (
                f"; {self.trial_starts} trial start(s), start to first step median {self.start_median_s:.1f} s "
                f"(driver {self.start_driver_median_s:.1f} s, workers {self.start_workers_median_s:.1f} s, data "
                f"{self.start_data_median_s:.1f} s, setup {self.start_setup_median_s:.1f} s), max "
                f"{self.start_max_s:.1f} s"
            )
        return line


def sweep_time(trials: Iterable[TrialTime], wall_s: float, capacity: float, per_worker: float) -> SweepTime:
    """The sweep's figures from its trials' reports; ``per_worker`` = each worker's CPUs (or GPUs)."""
    trials = list(trials)
    starts = [s for t in trials for s in t.starts]
    phases = [p for t in trials for p in t.phases]
    train_s = sum(t.worker_s for t in trials) * per_worker + sum(t.grown_s for t in trials)
    return SweepTime(
        busy_fraction=train_s / (wall_s * capacity) if wall_s > 0 and capacity > 0 else math.nan,
        wall_s=wall_s,
        capacity=capacity,
        train_s=train_s,
        eval_s=sum(t.eval_s for t in trials),
        checkpoint_s=sum(t.checkpoint_s for t in trials),
        trial_starts=len(starts),
        start_median_s=_median(starts),
        start_max_s=max(starts, default=math.nan),
        start_driver_median_s=_median(p[0] for p in phases),
        start_workers_median_s=_median(p[1] for p in phases),
        start_data_median_s=_median(p[2] for p in phases),
        start_setup_median_s=_median(p[3] for p in phases),
    )
