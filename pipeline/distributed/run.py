"""One tracked, data-parallel training run: :func:`run_training`.

Checks and the MLflow run first (pipeline.distributed.prepare), then the workers through an executor (by default a
Ray Train run, pipeline.distributed.train_run; a sweep's one-worker trial passes one that trains in its own
process), every report arriving at the driver's :class:`~pipeline.distributed.results.Reports`, then the run's end
as its last report says: diverged (FAILED), paused to change its worker count, or finished (the final artifacts,
the generator model, registration).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pipeline import STARTED_AT
from pipeline.data.kinds import source_of
from pipeline.distributed.hooks import FaultDrill
from pipeline.distributed.lifecycle import RunDiverged, TrainOutcome, WorkersUnavailable, fail_run, finish_run, open_run
from pipeline.distributed.prepare import RunRequest, let_go, prepare_run
from pipeline.distributed.ray_runtime import init_ray, startup_failed, startup_timed_out
from pipeline.distributed.registration import register_best
from pipeline.distributed.resources import check_resources, resolve_scaling, use_gpu, world_size
from pipeline.distributed.results import Reports, result_resize_to
from pipeline.distributed.train_run import RayTrainRun
from pipeline.distributed.worker import WorkerJob
from pipeline.eval.evaluator import sample_count
from pipeline.gan.reports import DIVERGENCE_HINT
from pipeline.tracking.tracker import MLflowTracker, tracker_for

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


class Executor(Protocol):
    """How a run's workers run: where its checkpoints live, how a resumed one is checked, what its first line
    says, and the training itself: each report handed to ``reports`` as it comes, returning an object with the
    last checkpointed ``metrics`` and the latest ``checkpoint``."""

    trained_in: str  # the run's tag

    def location(self, cfg: PipelineConfig, name: str) -> str: ...
    def check_resume(self, cfg: PipelineConfig, location: str, progress: Callable[[str], None]) -> None: ...
    def describe(self, cfg: PipelineConfig, gpu: bool) -> str: ...
    def fit(self, job: WorkerJob, name: str, gpu: bool, verbose: bool, reports: Reports) -> Any: ...


def run_training(
    cfg: PipelineConfig, request: RunRequest, executor: Executor | None = None, reports: Reports | None = None
) -> TrainOutcome:
    """One tracked, data-parallel training run: checks and the MLflow run, the workers (``executor``; by default
    a Ray Train run), the final artifacts and model. ``reports`` receives each report on the driver (a sweep's
    trial hands them to Tune). A run that stops to change its worker count (an elastic trial's) returns with
    ``TrainOutcome.resize_to`` set and its MLflow run still open; a diverged one raises RunDiverged; one whose
    workers cannot start raises WorkersUnavailable."""
    executor, reports = executor or RayTrainRun(), reports or Reports()
    cfg = resolve_scaling(cfg)
    check_resources(cfg)
    location = executor.location(cfg, request.name)
    try:
        return _run(cfg, request, executor, reports, location)
    finally:
        let_go(location)  # the run's claim on its directory, where this process holds it (a `train` run's)


def _run(cfg: PipelineConfig, request: RunRequest, executor: Executor, reports: Reports, location: str) -> TrainOutcome:
    uri, run_id, evaluator = prepare_run(cfg, request, executor.check_resume)
    init_ray(request.verbose)
    gpu = use_gpu(cfg)
    tracker = tracker_for(uri, run_id)
    tags = {"world_size": world_size(cfg), "device": "cuda" if gpu else "cpu", "trained_in": executor.trained_in}
    if evaluator and evaluator.get("checksum"):
        tags["evaluator_sha256"] = evaluator["checksum"]
        # What an evaluation scores: the registry compares only equal counts.
        tags["eval_num_samples"] = sample_count(cfg.eval.num_samples, len(evaluator["reference"]))
    if evaluator and evaluator.get("inception"):  # the standard FID: figures compare only with the same weights
        tags |= {
            "inception_sha256": evaluator["inception"]["sha256"],
            "inception_resize": evaluator["inception"]["resize"],
        }
    open_run(cfg, tracker, request.resume, request.trial.live_keys, tags)
    request.progress(
        f"[train] run {request.name!r}: {executor.describe(cfg, gpu)}; checkpoints in {location}; "
        f"MLflow run {run_id} at {uri}"
    )
    job = WorkerJob(
        cfg,
        source_of(cfg.data).pinned(),  # each worker checks it reads the preparation the run began with
        run_id,
        uri,
        evaluator,
        hooks=tuple(hook for hook in (FaultDrill.from_env(),) if hook is not None),
        # A bar inside each epoch only where a person watches a terminal: not in CI logs, files or trials.
        show_progress=sys.stderr.isatty() and not os.environ.get("CI"),
        trial=request.trial,
        started_at=request.started_at or STARTED_AT,
        fit_at=time.time(),
    )
    try:
        result = fit_again_after_failed_starts(cfg, request, executor, job, gpu, reports)
    except Exception as exc:
        fail_run(tracker)
        if startup_timed_out(exc):
            raise WorkersUnavailable(
                f"run {request.name!r}: its {cfg.scaling.num_workers} worker(s) ({cfg.scaling.placement_strategy}, "
                f"{cfg.scaling.cpus_per_worker} CPU each) could not be started within scaling.resource_wait_s="
                f"{cfg.scaling.resource_wait_s:g} s (a node lost and not replaced?); add nodes or lower "
                f"scaling.num_workers, then continue with `train --resume {request.name}`"
            ) from None
        raise
    return conclude(cfg, request, tracker, location, result, reports)


def fit_again_after_failed_starts(  # noqa: PLR0913 - the run's pieces, once
    cfg: PipelineConfig, request: RunRequest, executor: Executor, job: WorkerJob, gpu: bool, reports: Reports
) -> Any:
    """The executor's fit; fitted again (the Train run of the same name resumes from its recorded checkpoint) when a
    worker died while the group started, up to ``train.max_failures`` times in all."""
    for attempt in range(cfg.train.max_failures + 1):
        try:
            return executor.fit(job, request.name, gpu, request.verbose, reports)
        except Exception as exc:
            if not startup_failed(exc) or attempt == cfg.train.max_failures:
                raise
            request.progress(
                f"[train] a worker died while the worker group started; starting it again from the recorded "
                f"checkpoint ({attempt + 1} of train.max_failures={cfg.train.max_failures})"
            )
    raise AssertionError("unreachable")


def conclude(  # noqa: PLR0913 - a run's end, once
    cfg: PipelineConfig, request: RunRequest, tracker: MLflowTracker, location: str, result: Any, reports: Reports
) -> TrainOutcome:
    """A run's end as its last report tells it: diverged (FAILED), paused to resize (left open for the next run), or
    finished (final artifacts and, outside a sweep, registered)."""
    if reports.diverged:
        epoch = reports.last.get("epoch", "?")
        tracker.set_tags({"diverged_epoch": str(epoch)})
        fail_run(tracker, status="diverged")
        raise RunDiverged(
            f"run {request.name!r} diverged at epoch {epoch} (NaN or infinite loss) and was stopped; {DIVERGENCE_HINT}"
        )
    resize_to = result_resize_to(result.metrics or {})
    if resize_to is not None:  # an elastic trial's pause: the next Train run continues this MLflow run
        checkpoint_dir = result.checkpoint.path if result.checkpoint is not None else None
        return TrainOutcome(
            request.name,
            location,
            tracker.run_id,
            tracker.uri,
            dict(result.metrics),
            checkpoint_dir,
            resize_to=resize_to,
        )
    outcome = finish_run(cfg, tracker, request.name, location, result)
    if request.parent_run_id is None:  # a sweep registers its best trial only, once it has them all
        outcome.registration = register_best(cfg, tracker.uri, tracker.run_id, outcome.model_uri, request.progress)
    return outcome
