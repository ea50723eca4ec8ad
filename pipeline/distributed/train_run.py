"""A run's workers as a Ray Train run: what each worker runs (:func:`train_loop_per_worker`, DDP over gloo or
NCCL), the TorchTrainer (:func:`build_trainer`: scaling, storage, kept checkpoints, retries), and
:class:`RayTrainRun`, the executor that fits it and hands every report to the driver as it comes.

Every report every worker calls ``ray.train.report`` (a barrier); rank 0 attaches the checkpoint. A Train callback
in Ray's controller forwards each report (rank 0's result and its checkpoint) through a queue to the driver, which
hands it to the run's :class:`~pipeline.distributed.results.Reports` (and, in a sweep's trial, to Tune: then rank 0
waits for Tune's verdict after each report). After a worker failure Ray restarts the group from the last
checkpoint and logging continues in the same MLflow run.
"""

from __future__ import annotations

import dataclasses
import posixpath
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.core.retry import Unavailable
from pipeline.distributed.preemption import PreemptionWatch, any_worker, install_sigterm_notice, training
from pipeline.distributed.prepare import verify_latest_checkpoint
from pipeline.distributed.ray_runtime import lost_ranks, set_worker_group_start_timeout, train_worker_env
from pipeline.distributed.resources import resolve_scaling, worker_resources, world_size
from pipeline.distributed.results import Reports
from pipeline.distributed.storage import kept_before, recorded_progress, run_location, storage_root
from pipeline.distributed.worker import WorkerJob, WorkerPlace, run_worker
from pipeline.eval.metrics import champion_metric
from pipeline.gan.steps import Runtime, all_reduce_mean

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


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

    runtime = Runtime(
        context.get_world_rank(),
        world,
        device,
        wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=device),
        mean_over_workers=all_reduce_mean,  # Ray Train sets up a process group even for one worker
    )
    install_sigterm_notice()
    watch = PreemptionWatch(
        job.config.tracking.log_every, ray.train.get_preemption_info, any_worker(device), runtime.is_main, print
    )
    place = WorkerPlace(
        runtime,
        local_rank=context.get_local_rank(),
        restored=ray.train.get_checkpoint(),
        report=report,
        node_ids=lambda: _node_ids_of_all_workers(world),
        preemption=watch,
        earlier=_kept_before,
    )
    training(True)
    try:
        run_worker(job, place, entered)
    finally:
        training(False)


def _kept_before(damaged: Any) -> Any:
    """The checkpoint Ray Train kept before ``damaged`` (a Ray Checkpoint that does not load: the one it restored a
    restarted group from, or one tried after it), beside it on its filesystem; None when the record keeps none."""
    import ray.train

    run_dir, name = posixpath.split(damaged.path.rstrip("/"))
    previous = kept_before(damaged.filesystem, run_dir, name)
    return None if previous is None else ray.train.Checkpoint(f"{run_dir}/{previous}", filesystem=damaged.filesystem)


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


def ranks_checkpoints(job: WorkerJob) -> bool:
    """Ray Train keeps the best checkpoints by the champion metric (beside the latest) when every checkpoint is
    scored: every epoch is evaluated, the data can be scored, and the run is not a worker-elastic trial's (its
    pauses to resize are not scored)."""
    elastic = job.trial.elastic
    resizes = elastic is not None and not elastic.threads
    every = job.config.eval.every_epochs == 1
    return every and not resizes and job.source.scores_unavailable() is None


def checkpoint_config(job: WorkerJob, cls: type) -> Any:
    """Keep the latest checkpoints and, where every checkpoint is scored, the best ones beside them."""
    if ranks_checkpoints(job):
        return cls(
            num_to_keep=job.config.train.keep_checkpoints,
            checkpoint_score_attribute=champion_metric(job.config).name,
            checkpoint_score_order=champion_metric(job.config).mode,
        )
    return cls(num_to_keep=job.config.train.keep_checkpoints)


def forward_reports(queue: Any) -> Any:
    """A Ray Train callback that puts each report, as ``(rank 0's result, checkpoint or None)``, on ``queue`` (a
    ray.util.queue.Queue that the driver reads). Ray's TuneReportCallback forwards the metrics alone (the
    checkpoint only as a path among them), and Train's Result keeps only the last *checkpointed* report: the
    driver needs every report, and a trial the checkpoint to hand to Tune (PBT)."""
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            queue.put((dict(metrics[0]), checkpoint))

    return ForwardReports()


def lost_workers(location: str, max_failures: int) -> Any:
    """A Ray Train callback (it runs in Train's controller) that says in one line when workers are lost (their
    process or node died): which ranks, and the checkpoint the group restarts from. Ray's own tracebacks of
    it are hidden unless --verbose (pipeline.distributed.console.RAY_NOISE)."""
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
            try:
                progress = recorded_progress(location)
            except Unavailable:  # a line to the user is no reason to fail the run Train is about to restart
                where = "Train restarts it from its recorded checkpoint (the record cannot be read now)"
            else:
                where = (
                    f"training resumes from epoch {progress[0]} (step {progress[1]}) of the recorded checkpoint"
                    if progress
                    else "training starts over: no checkpoint was recorded yet"
                )
            print(f"[train] lost worker(s) {ranks}; {where} (up to train.max_failures={max_failures} times)")

    return LostWorkers()


@dataclass
class RayTrainRun:
    """The workers as a Ray Train run named after the run (the default executor). Its reports reach the driver's
    :class:`~pipeline.distributed.results.Reports` as they come; with ``verdicts`` (a sweep's trial) rank 0 waits
    after each report until the driver has handed it on (to Tune), so a trial that Tune stops or pauses there trains
    and logs nothing past it."""

    verdicts: bool = False
    trained_in: ClassVar[str] = "ray train"

    def location(self, cfg: PipelineConfig, name: str) -> str:
        return run_location(cfg, name)

    def check_resume(self, cfg: PipelineConfig, location: str, progress: Callable[[str], None]) -> None:
        verify_latest_checkpoint(cfg, location, progress)

    def describe(self, cfg: PipelineConfig, gpu: bool) -> str:
        elastic = ", elastic (Ray Train sizes the group)" if cfg.scaling.max_workers else ""
        return f"{world_size(cfg)} worker(s){elastic} on {'GPU' if gpu else 'CPU'} ({cfg.scaling.placement_strategy})"

    def fit(self, job: WorkerJob, name: str, gpu: bool, verbose: bool, reports: Reports) -> Any:
        """Fit the Train run and hand each of its reports to ``reports``, in order; return Train's result, or raise
        what fitting raised. A plain run fits in this thread (where Ray Train aborts the run gracefully on Ctrl-C)
        while another drains the reports. A sweep's trial (``verdicts``) fits in another thread and hands the
        reports to Tune from this one, the trial's: when Tune stops or pauses the trial there (it ends this thread),
        Ray ends the process, the Train run with it; the queues stay up till then, or the run would fail first (and
        mark its MLflow run FAILED) while the trial was only stopped."""
        queue = queue_here(maxsize=1)
        verdicts = queue_here() if self.verdicts else None
        job = dataclasses.replace(job, verdicts=verdicts)
        trainer = build_trainer(job, name, [forward_reports(queue)], gpu, verbose)
        if verdicts is None:
            return fit_while_draining(trainer, queue, reports)
        return drain_while_fitting(trainer, queue, reports, verdicts)


def fit_while_draining(trainer: Any, queue: Any, reports: Reports) -> Any:
    """Train's fit in this thread; a thread hands each report on to ``reports`` as it comes."""
    done = threading.Event()
    drainer = threading.Thread(target=drain, args=(queue, reports, lambda: not done.is_set()), daemon=True)
    drainer.start()
    try:
        return trainer.fit()
    finally:
        done.set()  # every report is on the queue once fit returns (the callback's put waits for room)
        drainer.join()
        queue.shutdown()


def drain_while_fitting(trainer: Any, queue: Any, reports: Reports, verdicts: Any) -> Any:
    """Train's fit in a thread; this thread hands each report on and then lets rank 0 go on (a verdict)."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - raised again in this thread below
            outcome["error"] = exc

    runner = threading.Thread(target=fit, name="train-run", daemon=True)
    runner.start()
    try:
        drain(queue, reports, runner.is_alive, verdicts)
    except Exception:
        # The hand-on failed (not Tune ending the trial): rank 0 must not wait for a verdict for ever.
        verdicts.shutdown()
        queue.shutdown()
        raise
    queue.shutdown()
    verdicts.shutdown()
    runner.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def drain(queue: Any, reports: Reports, running: Callable[[], bool], verdicts: Any = None) -> None:
    """Each (result, checkpoint) on ``queue`` to ``reports``, then a verdict if there is a queue for them, until
    nothing runs and the queue is empty."""
    from ray.util.queue import Empty

    while running() or not queue.empty():
        try:
            result, checkpoint = queue.get(timeout=0.5)
        except Empty:
            continue
        reports(result, checkpoint)
        if verdicts is not None:
            verdicts.put(True)


def queue_here(maxsize: int = 0) -> Any:
    """A ray.util.queue.Queue whose actor lives on this process's node (the driver's): a lost worker node, which Ray
    Train survives by restarting the group, must not take the report path with it."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(maxsize=maxsize, actor_options={"num_cpus": 0, "scheduling_strategy": here})
