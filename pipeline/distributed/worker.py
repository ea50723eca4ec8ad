"""What one worker of a run receives (:class:`WorkerJob`) and does (:func:`run_worker`).

A worker is a Ray Train worker (pipeline.distributed.train_run) or a one-worker sweep trial's own process
(pipeline.sweep.trial); a :class:`WorkerPlace` tells it which: its runtime (rank, device, DDP), the checkpoint it
resumes from and how its reports leave. The worker asks the run's data source for its batches, resumes, and runs
`train_gan` with the hooks of pipeline.distributed.hooks (its report to Ray, the tracker, the console, the progress
bar, a PBT copy's record, an elastic trial's threads or resize poll) and the job's own (a tool's step timing, a
fault drill).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.core import checkpoint
from pipeline.core.secrets import redact_console
from pipeline.distributed.hooks import (
    UNSENT_METRICS,
    Console,
    EpochProgress,
    ExploitRecord,
    Reporter,
    StartTiming,
    Tracking,
    resize_poll,
    thread_share,
)
from pipeline.gan.hooks import Hook
from pipeline.gan.models import identity, network_shape
from pipeline.gan.reports import Diverged, DivergedError
from pipeline.gan.steps import Runtime, uses_bf16
from pipeline.tracking.store import system_metrics
from pipeline.tracking.tracker import Tracker, tracker_for

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig
    from pipeline.data.source import DataSource


@dataclass(frozen=True)
class StartFrom:
    """Another run's checkpoint that a new run begins from (a PBT exploit): ``checkpoint`` is a Ray Checkpoint
    holding checkpoint.FILENAME; ``record`` is what the run's MLflow tags keep about it."""

    checkpoint: Any
    record: dict[str, Any]


@dataclass(frozen=True)
class ElasticJob:
    """An elastic trial's side of its sweep's allotment (pipeline.distributed.elastic): the actor's handle, the
    trial's id, and how much training must be left for growing to pay (``scaling.elastic_grow_min_s``)."""

    allotment: Any
    trial_id: str
    grow_min_s: float
    threads: bool = False  # a one-worker trial in its own process: the allotment counts its torch threads


@dataclass(frozen=True)
class TrialPart:
    """What a sweep's trial adds to a run, passed from its request to its workers as it is."""

    label: str = ""  # what the workers' lines start with, e.g. the trial id: "[3f2a1_00002] epoch 1/4 ..."
    start_from: StartFrom | None = None  # another run's checkpoint, used when the run has none of its own
    live_keys: tuple[str, ...] = ()  # config keys whose values are logged as metrics at each report (PBT's)
    elastic: ElasticJob | None = None  # an elastic trial: whom rank 0 asks for its size


@dataclass(frozen=True)
class WorkerJob:
    """What every worker of one run receives (Ray Train passes it as ``train_loop_config["job"]``)."""

    config: PipelineConfig
    source: DataSource  # the run's data, as the driver resolved it (pipeline.data.kinds.source_of)
    mlflow_run_id: str | None = None  # rank 0 logs into this run; no tracking without one
    tracking_uri: str | None = None
    evaluator: dict[str, Any] | None = None  # Evaluator.payload(), prepared once by the driver
    hooks: tuple[Hook, ...] = ()  # every worker's own copy: a tool's step timing, a fault drill
    sync_gradients: bool = True  # False: no DDP all-reduce (a bench diagnostic: what communication costs)
    show_progress: bool = False  # the driver's terminal shows a progress bar inside each epoch
    trial: TrialPart = field(default_factory=TrialPart)
    started_at: float | None = None  # wall clock: when this (re)start began (the driver loading pipeline code)
    fit_at: float | None = None  # wall clock: when the driver handed the run to its workers
    # A sweep's trial: a ray.util.queue.Queue that receives an item once Tune has let a report's trial go on.
    # Rank 0 waits for it after each report, so a trial that Tune stops or pauses there (PBT: to copy another
    # trial into it) trains and logs nothing past that report.
    verdicts: Any = None


@dataclass(frozen=True)
class WorkerPlace:
    """Where one worker of a run trains and how it reaches the other workers and the run's storage: a Ray Train
    worker or a one-worker sweep trial's own process."""

    runtime: Runtime  # rank, world, device, DDP wrapping, mean over workers
    local_rank: int
    restored: Any  # the run's own latest checkpoint (a Ray Checkpoint holding checkpoint.FILENAME), or None
    # (Ray's result dict, directory holding the checkpoint or None): every worker, in step; returns when the run
    # goes on
    report: Callable[[dict[str, Any], str | None], None]
    node_ids: Callable[[], list[str]]  # every rank's Ray node id (a collective)
    report_waits: bool = False  # report returns only once a sweep lets the run go on (a trial's own process)
    preemption: Hook | None = None  # hears a preemption notice (pipeline.distributed.preemption); a Train worker's
    # The checkpoint kept before a damaged one Ray restored (a Train worker's; None: no such fallback)
    earlier: Callable[[Any], Any] | None = None

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main


def run_worker(job: WorkerJob, place: WorkerPlace, entered: float) -> None:
    """One worker's whole run: load data, resume from the run's checkpoint (or the trial's start), train, report
    through ``place``; ``entered`` (wall clock) is when this worker's code began."""
    from pipeline.eval.scoring import Scorer
    from pipeline.gan.loop import train_gan

    redact_console()  # what this worker prints (Ray keeps it in its logs too) shows no credential
    cfg, rt = job.config, place.runtime
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    data = job.source.batches(rt.device, print if place.local_rank == 0 else (lambda _: None))
    timing = StartTiming.of(job, entered)
    resume, exploit = restored_state(job, place)
    # Rank 0's writes wait out a tracking store that does not answer (kept, sent when it is back).
    tracker = tracker_for(job.tracking_uri, job.mlflow_run_id if place.is_main else None, keep_while_away=True)
    carried = resume.pop(UNSENT_METRICS, None) if resume else None
    if carried and exploit is None:  # the run's own checkpoint: its points are this run's (a PBT donor's are not)
        tracker.carry(carried)
    # The run's worker count from its first step on: an elastic run's curve of sizes in MLflow.
    tracker.log_metrics({"world_size": rt.world_size}, step=int(resume["step"]) if resume else 0)
    scorer = Scorer.of(job.evaluator, cfg) if place.is_main and cfg.eval.every_epochs and job.evaluator else None
    nodes = place.node_ids()
    console = Console(job.trial.label)
    if place.is_main:
        announce(cfg, rt, tracker, nodes, console)
    reporter = Reporter(job, place, tracker)
    hooks: list[Hook] = [*job.hooks, *thread_share(job, place, tracker, nodes, console, resume)]
    if place.is_main:
        hooks += [console, timing] + ([EpochProgress(cfg.train)] if job.show_progress else [])
    if place.is_main and exploit:
        hooks.append(ExploitRecord({**exploit, "network": network_shape(cfg.model)}, tracker, console))
    # The report out first, then the tracker's steps written: a restart resumes after them, never before.
    hooks += [*resize_poll(job, place, console), reporter, Tracking(tracker)]
    hooks += [place.preemption] if place.preemption is not None else []  # last: a signalled worker exits there
    runtime = rt if job.sync_gradients else dataclasses.replace(rt, wrap_model=identity)
    monitor = (
        system_metrics(job.tracking_uri, job.mlflow_run_id, cfg.tracking.system_metrics_s)
        if place.is_main and job.mlflow_run_id and cfg.tracking.system_metrics_s > 0
        else contextlib.nullcontext()
    )
    with monitor:
        try:
            train_gan(cfg, data, runtime, hooks, resume, scorer)
        except DivergedError as exc:
            # Not a crash to retry from the checkpoint: the same steps would diverge again. Every worker
            # reports it as the run's last report, on the report path (the driver ends the run on it), and returns.
            if place.is_main:
                console.on_line(f"[train] {exc}")
            reporter.on_report(Diverged.at(exc.epoch))
        tracker.finish()  # what a store away kept is sent before the run is called done (or the run fails, naming it)


def restored_state(job: WorkerJob, place: WorkerPlace) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The checkpoint dict the worker resumes from (the run's own latest, else the trial's start's) and, for a
    PBT exploit, the record of where it came from."""
    restored, exploit = place.restored, None
    if restored is None and job.trial.start_from is not None:
        restored, exploit = job.trial.start_from.checkpoint, job.trial.start_from.record
    if restored is None:
        return None, None
    tried = restored
    while True:  # a damaged checkpoint gives way to the one kept before it, as often as it takes
        with tried.as_directory() as directory:
            try:
                return checkpoint.load(Path(directory) / checkpoint.FILENAME, source=tried.path), exploit
            except (checkpoint.DamagedCheckpoint, checkpoint.MissingCheckpoint) as exc:
                earlier = place.earlier(tried) if exploit is None and place.earlier is not None else None
                if earlier is None:
                    raise
                damage = exc
        if place.is_main:
            print(
                f"[train] {str(damage).split('; ')[0]}: the restart resumes from "
                f"{Path(earlier.path).name}, the checkpoint kept before it",
                flush=True,
            )
        tried = earlier


def announce(cfg: PipelineConfig, rt: Runtime, tracker: Tracker, nodes: list[str], console: Console) -> None:
    """Rank 0's first line (workers, nodes, precision) and the same as the run's tags."""
    precision = "bf16" if uses_bf16(cfg.train.precision, rt.device) else "fp32"
    console.on_line(f"[train] {rt.world_size} worker(s) on {len(set(nodes))} node(s), {precision}")
    tracker.set_tags(
        {
            "train_nodes": ",".join(sorted(set(nodes))),
            "num_train_nodes": str(len(set(nodes))),
            "numeric_precision": precision,
        }
    )
