"""Ray Train adapter: runs `train_gan` data-parallel on N workers and ties the run to one MLflow run.

:func:`run_training` is one tracked run: checks, the MLflow run, the workers (by default a Ray Train run, built
by :func:`build_trainer`; a sweep's one-worker trial passes an executor that trains in its own process), and
the run's end. The driver creates (or, on resume, reuses) the MLflow run and passes its id down; rank 0 logs
into it. Every report every worker calls ``ray.train.report`` (a barrier); rank 0 attaches the checkpoint.
After a worker failure Ray restarts the group from the last checkpoint and logging continues in the same
MLflow run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from pipeline import STARTED_AT
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.ray_runtime import (
    init_ray,
    lost_ranks,
    set_worker_group_start_timeout,
    startup_timed_out,
    train_worker_env,
)
from pipeline.runs import (
    RunDiverged,
    RunRequest,
    TrainOutcome,
    WorkersUnavailable,
    fail_run,
    finish_run,
    open_run,
    prepare_run,
    register_best,
    scores_unavailable,
    verify_latest_checkpoint,
)
from pipeline.storage import recorded_progress, run_location, storage_root
from pipeline.tracking import MLflowTracker
from pipeline.train import DIVERGENCE_HINT, all_reduce_mean, result_resize_to
from pipeline.worker import WorkerJob, WorkerPlace, run_worker


def resolve_scaling(cfg: PipelineConfig, *, sweep: bool = False) -> PipelineConfig:
    """Fill in ``scaling.cpus_per_worker`` when null (the one place that does): this machine's CPUs shared by
    one run's workers; 1 per worker in a sweep (trials share the machine) and on a cluster."""
    if cfg.scaling.cpus_per_worker is not None:
        return cfg
    alone = not sweep and not os.environ.get("RAY_ADDRESS")
    most = cfg.scaling.max_workers or cfg.scaling.num_workers
    cpus = max(1, (os.cpu_count() or 1) // most) if alone else 1
    return dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, cpus_per_worker=cpus))


def check_resources(cfg: PipelineConfig) -> None:
    """Refuse a request the machine, or the Ray cluster, can never satisfy (Ray would wait for it)."""
    import ray

    # A cluster: RAY_ADDRESS names one, or this process already runs inside Ray (a sweep's trial; a trial
    # process does not inherit RAY_ADDRESS).
    on_cluster = bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
    _check_spread(cfg, on_cluster)
    if on_cluster:
        return
    workers, cpus = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    have_cpus = os.cpu_count() or 1
    if workers * cpus > have_cpus:
        raise ConfigError(
            f"scaling.num_workers: {workers} workers x {cpus} CPU need {workers * cpus} CPUs but this machine has "
            f"{have_cpus}; lower scaling.num_workers or scaling.cpus_per_worker, or set RAY_ADDRESS to a cluster"
        )
    if cfg.scaling.use_gpu == "true" and torch.cuda.device_count() < workers:
        raise ConfigError(
            f"scaling.use_gpu: true with {workers} workers needs that many GPUs; this machine "
            f"has {torch.cuda.device_count()}; set scaling.use_gpu=auto or false, or RAY_ADDRESS to a cluster"
        )


def _check_spread(cfg: PipelineConfig, on_cluster: bool) -> None:
    import ray

    workers = cfg.scaling.num_workers
    if cfg.scaling.placement_strategy != "STRICT_SPREAD" or workers <= 1:
        return
    if on_cluster:
        init_ray()  # joins the running cluster: nothing is started or written
        nodes, where = sum(1 for node in ray.nodes() if node["Alive"]), "the Ray cluster"
    else:
        nodes, where = 1, "without RAY_ADDRESS this machine"
    if nodes < workers:
        raise ConfigError(
            f"scaling.placement_strategy: STRICT_SPREAD puts each of {workers} workers on a node of its own, "
            f"but {where} has {nodes} node(s); start more nodes or set RAY_ADDRESS to a cluster that has "
            "them, lower scaling.num_workers, or use PACK or SPREAD"
        )


def use_gpu(cfg: PipelineConfig) -> bool:
    """``auto``: GPUs when the cluster has them (call after init_ray); ConfigError for CUDA graphs without one."""
    if cfg.scaling.use_gpu != "auto":
        return cfg.scaling.use_gpu == "true"
    import ray

    gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if cfg.train.cuda_graphs == "true" and not gpu:
        raise ConfigError(
            "train.cuda_graphs: true, but the Ray cluster has no GPU (scaling.use_gpu=auto found none); set "
            "train.cuda_graphs=false or run on a cluster with GPUs"
        )
    return gpu


@dataclass(frozen=True)
class FaultDrill:
    """A worker hook for drills and fault-tolerance tests: rank ``rank`` exits at step ``step``, once (the file
    ``once`` marks that it happened), as a crashed process would."""

    step: int
    rank: int
    once: str

    @classmethod
    def from_env(cls) -> FaultDrill | None:
        """PIPELINE_FAULT_AT_STEP=N [PIPELINE_FAULT_RANK=R] [PIPELINE_FAULT_ONCE=FILE]; None when not set."""
        step = os.environ.get("PIPELINE_FAULT_AT_STEP")
        if not step:
            return None
        once = os.environ.get("PIPELINE_FAULT_ONCE") or os.path.join(tempfile.gettempdir(), f"pipeline-fault-{step}")
        return cls(int(step), int(os.environ.get("PIPELINE_FAULT_RANK", "0")), once)

    def place(self, place: WorkerPlace) -> WorkerPlace:
        return place

    def on_step(self, rank: int, step: int) -> None:
        if rank == self.rank and step == self.step and not os.path.exists(self.once):
            Path(self.once).touch()
            print(f"[fault] rank {rank} exits at step {step} (PIPELINE_FAULT_AT_STEP)", flush=True)
            os._exit(1)  # no cleanup, no exception for anyone to catch

    def figures(self, rank: int) -> dict[str, float]:
        return {}


# --------------------------------------------------------------------------------------------------
# The workers as a Ray Train run


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: :func:`run_worker` with Ray Train's checkpoint, reports and DDP."""
    import ray.train
    import ray.train.torch

    entered = time.time()
    job: WorkerJob = loop_config["job"]
    context = ray.train.get_context()
    world = context.get_world_size()
    device = ray.train.torch.get_device()

    def report(result: dict[str, Any], directory: str | None) -> None:
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)

    place = WorkerPlace(
        rank=context.get_world_rank(),
        world=world,
        local_rank=context.get_local_rank(),
        device=device,
        restored=ray.train.get_checkpoint(),
        report=report,
        node_ids=lambda: _node_ids_of_all_workers(world),
        wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=device),
        mean_over_workers=all_reduce_mean,  # Ray Train sets up a process group even for one worker
    )
    run_worker(job, place, entered)


def _node_ids_of_all_workers(world: int) -> list[str]:
    """The Ray node id of every rank (a collective: all workers call it)."""
    import ray
    import torch.distributed as dist

    ids: list[Any] = [None] * world
    dist.all_gather_object(ids, ray.get_runtime_context().get_node_id())
    return ids


def build_trainer(
    job: WorkerJob, name: str, callbacks: Sequence[Any] = (), gpu: bool = False, verbose: bool = False
) -> Any:
    """A TorchTrainer running ``job`` on every worker, named ``name`` under the storage path (same name =
    restore). Ray Train's own INFO lines (each report, each checkpoint, worker-group start) only with ``verbose``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = resolve_scaling(job.config)
    job = dataclasses.replace(job, config=cfg)
    # One timed-out start then fails the run (with a message), rather than waiting for a lost node for ever.
    set_worker_group_start_timeout(cfg.scaling.resource_wait_s)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            # A range: Ray's ElasticScalingPolicy sizes the worker group from what the cluster has free, and
            # restarts it from the latest checkpoint when that changes (a sweep's trials get a fixed size each).
            num_workers=(cfg.scaling.num_workers, cfg.scaling.max_workers)
            if cfg.scaling.max_workers
            else cfg.scaling.num_workers,
            use_gpu=gpu,
            resources_per_worker=worker_resources(cfg, gpu),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_root(cfg)),
            checkpoint_config=checkpoint_config(job, CheckpointConfig),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=0),
            callbacks=[*callbacks, lost_workers(run_location(cfg, name), cfg.train.max_failures)],
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            worker_runtime_env={"env_vars": train_worker_env()},
        ),
    )


def worker_resources(cfg: PipelineConfig, gpu: bool) -> dict[str, float]:
    """What one worker reserves: its CPUs and, on GPUs, its share of one."""
    return {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": cfg.scaling.gpus_per_worker} if gpu else {})}


def ranks_by_fid(job: WorkerJob) -> bool:
    """Ray Train keeps the best checkpoints by FID (beside the latest) when every checkpoint is scored: every
    epoch is evaluated, and the run is not a worker-elastic trial's (its pauses to resize are not scored)."""
    resizes = job.elastic is not None and not job.elastic.threads
    return job.config.eval.every_epochs == 1 and not resizes and scores_unavailable(job.config) is None


def checkpoint_config(job: WorkerJob, cls: type) -> Any:
    """Keep the latest checkpoints and, where every checkpoint is scored, the best ones by FID beside them."""
    if ranks_by_fid(job):
        return cls(
            num_to_keep=job.config.train.keep_checkpoints,
            checkpoint_score_attribute="fid",
            checkpoint_score_order="min",
        )
    return cls(num_to_keep=job.config.train.keep_checkpoints)


def forward_reports(queue: Any) -> Any:
    """A Ray Train callback that puts each report, as ``(rank 0's result, checkpoint or None)``, on ``queue``
    (a ray.util.queue.Queue that the driver reads). Ray's TuneReportCallback forwards the metrics alone (the
    checkpoint only as a path among them): a sweep's trial needs the checkpoint to hand to Tune (PBT)."""
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            queue.put((dict(metrics[0]), checkpoint))

    return ForwardReports()


def lost_workers(location: str, max_failures: int) -> Any:
    """A Ray Train callback (it runs in Train's controller) that says in one line when workers are lost (their
    process or node died): which ranks, and the checkpoint the group restarts from. Ray's own tracebacks of
    it are hidden unless --verbose (console.RAY_NOISE)."""
    from ray.train import UserCallback

    class LostWorkers(UserCallback):
        def __init__(self) -> None:
            self.said: set[tuple[int, ...]] = set()

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            self.said.clear()  # training goes on: a later loss is a new one

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            lost = lost_ranks(worker_exceptions)
            if not lost or tuple(lost) in self.said:  # said once per loss, not at every poll that sees it
                return
            self.said.add(tuple(lost))
            ranks = ", ".join(f"rank {rank} ({cause})" for rank, cause in lost.items())
            progress = recorded_progress(location)
            where = (
                f"training resumes from epoch {progress[0]} (step {progress[1]}) of the recorded checkpoint"
                if progress
                else "training starts over: no checkpoint was recorded yet"
            )
            print(f"[train] lost worker(s) {ranks}; {where} (up to train.max_failures={max_failures} times)")

    return LostWorkers()


def finish_from_storage(cfg: PipelineConfig, name: str, uri: str, run_id: str, result: Any = None) -> TrainOutcome:
    """:func:`~pipeline.runs.finish_run` for a run whose training completed but whose driver ended before its
    final logging (a sweep's trial): the result is read back from the Train run's storage, or is ``result``
    (Tune's, for a trial trained in its own process)."""
    from ray.train import Result

    location = run_location(cfg, name)
    if result is None:
        result = Result.from_path(location)
    return finish_run(cfg, MLflowTracker(uri, run_id), name, location, result)


# --------------------------------------------------------------------------------------------------
# One tracked run


class Executor(Protocol):
    """How a run's workers run: where its checkpoints live, how a resumed one is checked, what its first line
    says, and the training itself (returning an object with the last ``metrics`` and the latest ``checkpoint``)."""

    trained_in: str  # the run's tag

    def location(self, cfg: PipelineConfig, name: str) -> str: ...
    def check_resume(self, cfg: PipelineConfig, location: str) -> None: ...
    def describe(self, cfg: PipelineConfig, gpu: bool) -> str: ...
    def fit(self, job: WorkerJob, name: str, gpu: bool, verbose: bool) -> Any: ...


@dataclass
class RayTrainRun:
    """The workers as a Ray Train run named after the run (the default executor). A sweep's trial driver passes
    ``callbacks`` (each report forwarded to it) and ``verdicts`` (the queue rank 0 waits on after each report)."""

    callbacks: Sequence[Any] = ()
    verdicts: Any = None
    trained_in: ClassVar[str] = "ray train"

    def location(self, cfg: PipelineConfig, name: str) -> str:
        return run_location(cfg, name)

    def check_resume(self, cfg: PipelineConfig, location: str) -> None:
        verify_latest_checkpoint(cfg, location)

    def describe(self, cfg: PipelineConfig, gpu: bool) -> str:
        elastic = ", elastic (Ray Train sizes the group)" if cfg.scaling.max_workers else ""
        return f"{world_size(cfg)} worker(s){elastic} on {'GPU' if gpu else 'CPU'} ({cfg.scaling.placement_strategy})"

    def fit(self, job: WorkerJob, name: str, gpu: bool, verbose: bool) -> Any:
        job = dataclasses.replace(job, verdicts=self.verdicts)
        return build_trainer(job, name, self.callbacks, gpu, verbose).fit()


def world_size(cfg: PipelineConfig) -> str:
    """A run's worker count as its tag says it: a number, or an elastic run's range."""
    if cfg.scaling.max_workers:
        return f"{cfg.scaling.num_workers}-{cfg.scaling.max_workers}"
    return str(cfg.scaling.num_workers)


def run_training(cfg: PipelineConfig, request: RunRequest, executor: Executor | None = None) -> TrainOutcome:
    """One tracked, data-parallel training run: checks and the MLflow run, the workers (``executor``; by default
    a Ray Train run), the final artifacts and model. A run that stops to change its worker count (an elastic
    trial's) returns with ``TrainOutcome.resize_to`` set and its MLflow run still open; a diverged one raises
    RunDiverged; one whose workers cannot start raises WorkersUnavailable."""
    executor = executor or RayTrainRun()
    cfg = resolve_scaling(cfg)
    check_resources(cfg)
    location = executor.location(cfg, request.name)
    uri, run_id, evaluator = prepare_run(cfg, request, executor.check_resume)
    init_ray(request.verbose)
    gpu = use_gpu(cfg)
    tracker = MLflowTracker(uri, run_id)
    tags = {"world_size": world_size(cfg), "device": "cuda" if gpu else "cpu", "trained_in": executor.trained_in}
    if evaluator and evaluator.get("checksum"):
        tags["evaluator_sha256"] = evaluator["checksum"]
    open_run(cfg, tracker, request, tags)
    request.progress(
        f"[train] run {request.name!r}: {executor.describe(cfg, gpu)}; checkpoints in {location}; "
        f"MLflow run {run_id} at {uri}"
    )
    job = WorkerJob(
        cfg,
        run_id,
        uri,
        evaluator,
        hooks=tuple(hook for hook in (FaultDrill.from_env(),) if hook is not None),
        # A bar inside each epoch only where a person watches a terminal: not in CI logs, files or trials.
        show_progress=sys.stderr.isatty() and not os.environ.get("CI"),
        label=request.label,
        start_from=request.start_from,
        live_keys=request.live_keys,
        started_at=request.started_at or STARTED_AT,
        fit_at=time.time(),
        elastic=request.elastic,
    )
    try:
        result = executor.fit(job, request.name, gpu, request.verbose)
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
    return conclude(cfg, request, tracker, location, result)


def conclude(
    cfg: PipelineConfig, request: RunRequest, tracker: MLflowTracker, location: str, result: Any
) -> TrainOutcome:
    """A run's end as its result and tags tell it: diverged (FAILED), paused to resize (left open for the next
    run), or finished (final artifacts and, outside a sweep, registered)."""
    # Rank 0 tags a diverged run itself: Ray's result keeps the metrics of the last *checkpointed* report, and a
    # diverged epoch has no checkpoint.
    tags = tracker.tags()
    if tags.get("status") == "diverged":
        tracker.end("FAILED")
        raise RunDiverged(
            f"run {request.name!r} diverged at epoch {tags.get('diverged_epoch', '?')} (NaN or infinite loss) and "
            f"was stopped; {DIVERGENCE_HINT}"
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
