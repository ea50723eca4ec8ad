"""Ray Train adapter: runs `train_gan` data-parallel on N workers and ties the run to one MLflow run.

The per-worker code (`run_worker`) also runs a one-worker sweep trial in the trial's own process
(pipeline.tune hands it a `WorkerPlace` that reports to Tune): a `train` run always goes through Ray Train.

The driver creates (or, on resume, reuses) the MLflow run and passes its id down; rank 0 logs into it,
every other worker gets a no-op tracker. Each epoch every worker calls ``ray.train.report`` (a barrier);
rank 0 attaches the checkpoint. After a worker failure Ray restarts the group from the last checkpoint
and logging continues in the same MLflow run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import PROJECT_ROOT, STARTED_AT, checkpoint
from pipeline.config import ConfigError, PipelineConfig, UserError, registered_model_name
from pipeline.elastic import ResizePoll, ThreadShare, ask_allotment
from pipeline.models import identity
from pipeline.storage import check_storage, exists, resume_checkpoint_file, run_location, storage_root
from pipeline.tracking import (
    MLflowTracker,
    NullTracker,
    Registration,
    check_tracking_uri,
    environment_tags,
    find_run,
    flat_params,
    register_generator,
    resolve_tracking_uri,
    start_run,
    system_metrics,
)
from pipeline.train import (
    DIVERGENCE_HINT,
    DivergedError,
    Runtime,
    TrainState,
    all_reduce_mean,
    train_gan,
    uses_bf16,
)


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

    workers = cfg.scaling.num_workers
    # A cluster: RAY_ADDRESS names one, or this process already runs inside Ray (a sweep's trial; a trial
    # process does not inherit RAY_ADDRESS).
    on_cluster = bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
    if cfg.scaling.placement_strategy == "STRICT_SPREAD" and workers > 1:
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
    if on_cluster:
        return
    want_cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    have_cpus = os.cpu_count() or 1
    if want_cpus > have_cpus:
        raise ConfigError(
            f"scaling.num_workers: {cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPU need "
            f"{want_cpus} CPUs but this machine has {have_cpus}; lower scaling.num_workers or "
            "scaling.cpus_per_worker, or set RAY_ADDRESS to a cluster"
        )
    if cfg.scaling.use_gpu == "true" and torch.cuda.device_count() < cfg.scaling.num_workers:
        raise ConfigError(
            f"scaling.use_gpu: true with {cfg.scaling.num_workers} workers needs that many GPUs; this machine "
            f"has {torch.cuda.device_count()}; set scaling.use_gpu=auto or false, or RAY_ADDRESS to a cluster"
        )


# Lines of Ray's own processes that tell a user nothing they can act on, hidden unless --verbose (with the
# traceback that follows one, if any): the C++ core worker's complaint about Ray's own PreemptionWatcher actor
# (ray-project/ray#53727) and its kin, each worker's full TrainingReport(...) (the epoch line above it says the
# same, readably), and Train's controller's warning that a resource request to Ray's autoscaling coordinator
# took over 5 s (on a busy machine: it is retried every 20 s and says itself that it is safe to ignore).
RAY_NOISE = (
    "core_worker.cc",
    "PreemptionWatcher",
    "Reporting training result",
    "Failed to send resource request",
    "worker processes have been started on node",  # the raylet's note on its own worker start-up rate
    "Checkpoint successfully created at",  # Tune, each time a trial hands it a checkpoint (PBT: every report)
    "from checkpoint: Checkpoint(",  # Tune restoring a paused or copied trial: our [pbt] line says which
)
# Ray's internal actors whose every line is for Ray's developers: the placement-group janitor of each Train
# run ("Detected that the Ray Train controller actor ... is dead. Cleaning up placement group" after every
# early-stopped trial).
RAY_NOISY_ACTORS = ("PlacementGroupCleaner",)
# A local Ray says that it turned token authentication on (as it should): hidden unless --verbose. Its
# warning that authentication is *off* is always shown.
RAY_AUTH_ON_NOTICE = "Token authentication is enabled for this Ray cluster"


def init_ray(verbose: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a fresh local Ray (never a stale one)."""
    import logging

    import ray

    if ray.is_initialized():
        return
    # Ray folds log lines that differ only in their numbers into one: that would hide every worker's
    # and trial's epoch line but the first.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    address = os.environ.get("RAY_ADDRESS") or "local"
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_auth_on_notice)
    if address == "local":
        with _state_api_pinned() as dashboard_port:
            ray.init(address="local", log_to_driver=True, logging_level=level, dashboard_port=dashboard_port)
    else:
        ray.init(address=address, log_to_driver=True, logging_level=level)
    if not verbose:
        _hide_worker_lines(RAY_NOISE, RAY_NOISY_ACTORS)


def _auth_on_notice(record: Any) -> bool:
    """A logging filter (adding it twice keeps one): drops Ray's notice that authentication is on."""
    return not record.getMessage().startswith(RAY_AUTH_ON_NOTICE)


@contextlib.contextmanager
def _state_api_pinned():
    """Yield a free port for the local Ray's dashboard, with RAY_API_SERVER_ADDRESS naming it in the
    environment that the processes Ray starts inherit (restored in this one afterwards).

    Ray Train's actors ask Ray's state API whether the controller is alive without an address; with no
    address Ray looks for *the* Ray on this machine, and with a second local Ray running (two runs at once)
    it raised 'Found multiple active Ray instances' in every run's PlacementGroupCleaner."""
    import socket

    if os.environ.get("RAY_API_SERVER_ADDRESS"):  # the user's choice stands
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        yield port
    finally:
        del os.environ["RAY_API_SERVER_ADDRESS"]


def _hide_worker_lines(patterns: Sequence[str], actors: Sequence[str] = ()) -> None:
    """Put a `NoiseFilter` in front of Ray's printer of forwarded output: the workers' lines (through the
    printer the log dispatcher holds) and the raylet's messages (printed through the module's function). Ray
    has no public hook for this: if its internals moved, everything is printed as before."""
    import functools

    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    if (
        len(printers) != 1
        or not isinstance(printers[0], functools.partial)
        or not callable(getattr(ray_worker, "print_to_stdstream", None))
    ):
        return
    original = getattr(ray_worker.print_to_stdstream, "unfiltered", ray_worker.print_to_stdstream)
    noise = NoiseFilter(patterns, actors)

    def filtered(data: dict, ignore_prefix: bool) -> None:
        lines = noise(data.get("pid"), data.get("lines", []), data.get("actor_name") or "")
        if lines:
            original({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    filtered.unfiltered = original  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", functools.partial(filtered, **printers[0].keywords))


class NoiseFilter:
    """Drops the lines containing any of ``patterns`` and the Python traceback right after such a line,
    following each process's output across batches, and every line of the actors named in ``actors``."""

    def __init__(self, patterns: Sequence[str], actors: Sequence[str] = ()):
        self.patterns, self.actors = tuple(patterns), tuple(actors)
        self.state: dict[Any, str] = {}  # per process: "noise" after a hidden line, "traceback" inside its traceback

    def __call__(self, source: Any, lines: Sequence[str], actor: str = "") -> list[str]:
        if actor and any(name in actor for name in self.actors):
            return []
        kept = []
        for line in lines:
            now = self.state.get(source, "")
            if any(p in line for p in self.patterns):
                self.state[source] = "noise"
            elif now and line.startswith("Traceback (most recent call last)"):
                self.state[source] = "traceback"
            elif now == "traceback" and (line.startswith(" ") or not line.strip()):
                pass
            elif now == "traceback" and _ends_traceback(line):
                self.state[source] = ""
            else:
                self.state[source] = ""
                kept.append(line)
        return kept


def _ends_traceback(line: str) -> bool:
    """The last line of a Python traceback: ``module.ExceptionName: message`` (or just the name)."""
    head = line.split(":", 1)[0]
    return bool(head) and head.replace(".", "").replace("_", "").isalnum() and head.rsplit(".", 1)[-1][:1].isupper()


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


# --------------------------------------------------------------------------------------------------
# The per-worker function


class StepClock:
    """Wall-clock time of every optimizer step; throughput = median over windows after warm-up."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.times.append(time.time())

    def window_rates(self, images_per_step: int, warmup: int, window: int) -> list[float]:
        """Images/s of each window of ``window`` steps after the first ``warmup`` steps."""
        times = self.times[warmup:]
        rates = [
            images_per_step * window / (times[i + window] - times[i]) for i in range(0, len(times) - window, window)
        ]
        if not rates:
            raise ValueError(f"too few steps ({len(self.times)}) for warm-up {warmup} and windows of {window}")
        return rates

    def summary(self, images_per_step: int, warmup: int, window: int) -> dict[str, float]:
        """Median images/s over the windows, and the slowest and fastest window (how noisy the machine is)."""
        rates = self.window_rates(images_per_step, warmup, window)
        return {"img_s": statistics.median(rates), "img_s_min": min(rates), "img_s_max": max(rates)}


@dataclass(frozen=True)
class BenchOptions:
    """`pipeline bench`: each worker times its own steps and reports ``bench_*`` figures with its metrics."""

    warmup: int  # steps left out of the timing
    window: int  # steps per timed window
    sync_gradients: bool = True  # False: no DDP all-reduce (a diagnostic: what communication costs)


@dataclass(frozen=True)
class FaultInjection:
    """Rank ``rank`` exits at step ``step``, once (the file ``once`` marks that it happened): a drill."""

    step: int
    rank: int
    once: str

    def fire_if_due(self, rank: int, step: int) -> None:
        if rank == self.rank and step == self.step and not os.path.exists(self.once):
            Path(self.once).touch()
            print(f"[fault] rank {rank} exits at step {step} (PIPELINE_FAULT_AT_STEP)", flush=True)
            os._exit(1)  # as a crashed process would: no cleanup, no exception for anyone to catch


@dataclass(frozen=True)
class StartFrom:
    """Another run's checkpoint that a new run begins from (a PBT exploit): ``checkpoint`` is a
    ray.train.Checkpoint holding checkpoint.FILENAME; ``record`` is what the run's MLflow tags keep about it."""

    checkpoint: Any
    record: dict[str, Any]


UNSCORED_FID = 1.0e30  # what an elastic trial's pause checkpoint (taken between evaluations) tells Ray Train


@dataclass(frozen=True)
class ElasticJob:
    """An elastic trial's side of its sweep's allotment (pipeline.elastic): the actor's handle, the trial's id,
    and how much training must be left for growing to pay (``scaling.elastic_grow_min_s``)."""

    allotment: Any
    trial_id: str
    grow_min_s: float
    threads: bool = False  # a one-worker trial in its own process: the allotment counts its torch threads


@dataclass(frozen=True)
class WorkerJob:
    """What every worker of one Train run receives (Ray passes it as ``train_loop_config["job"]``)."""

    config: PipelineConfig
    mlflow_run_id: str | None = None  # rank 0 logs into this run; no tracking without one
    tracking_uri: str | None = None
    evaluator: dict[str, Any] | None = None  # Evaluator.payload(), prepared once by the driver
    bench: BenchOptions | None = None
    fault: FaultInjection | None = None
    show_progress: bool = False  # the driver's terminal shows a progress bar inside each epoch
    label: str = ""  # what the workers' lines start with, e.g. a sweep's trial id: "[3f2a1_00002] epoch 1/4 ..."
    start_from: StartFrom | None = None  # another run's checkpoint, used when Ray has none of this run's own
    live_keys: tuple[str, ...] = ()  # config keys whose values are logged as metrics at each report (PBT's mutated)
    started_at: float | None = None  # wall clock: when this (re)start began (the driver loading pipeline code)
    fit_at: float | None = None  # wall clock: when the driver handed the run to Ray Train
    elastic: ElasticJob | None = None  # an elastic sweep's trial: whom rank 0 asks for its worker count
    # A sweep's trial: a ray.util.queue.Queue that receives an item once Tune has let a report's trial go on.
    # Rank 0 waits for it after each report, so a trial that Tune stops or pauses there (PBT: to copy another
    # trial into it) trains and logs nothing past that report.
    verdicts: Any = None


class EpochProgress:
    """Rank 0's progress inside an epoch (step, images/s, ETA) as a bar the driver renders: Ray's ``tqdm_ray``
    sends the bar's state from the worker (at most a few times a second), and the driver draws it."""

    def __init__(self, epochs: int, batch_size: int):
        self.epochs, self.batch_size = epochs, batch_size
        self.bar: Any = None

    def __call__(self, epoch: int, step: int, steps: int) -> None:
        from ray.experimental.tqdm_ray import tqdm

        if self.bar is None:
            self.bar = tqdm(total=steps * self.batch_size, unit="img")
        self.bar.set_description(f"epoch {epoch}/{self.epochs} step {step}/{steps}")
        self.bar.update(self.batch_size)
        if step == steps:
            self.bar.close()
            self.bar = None


def _node_ids_of_all_workers(world: int) -> list[str]:
    """The Ray node id of every rank (a collective: all workers call it)."""
    import ray
    import torch.distributed as dist

    ids: list[Any] = [None] * world
    dist.all_gather_object(ids, ray.get_runtime_context().get_node_id())
    return ids


@dataclass(frozen=True)
class WorkerPlace:
    """Where one worker of a run trains and how it reaches the other workers and the run's storage: a Ray Train
    worker (`train_loop_per_worker`) or a one-worker sweep trial's own process (pipeline.tune)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    restored: Any  # the run's own latest checkpoint (a Ray Checkpoint holding checkpoint.FILENAME), or None
    # (metrics, directory holding the checkpoint or None): every worker, in step; returns when the run goes on
    report: Callable[[dict[str, Any], str | None], None]
    node_ids: Callable[[], list[str]]  # every rank's Ray node id (a collective)
    wrap_model: Callable[[Any], Any] = identity
    mean_over_workers: Callable[[torch.Tensor], torch.Tensor] = identity
    report_waits: bool = False  # report returns only once a sweep lets the run go on (a trial's own process)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: :func:`run_worker` with Ray Train's checkpoint, reports and DDP."""
    import ray.train
    import ray.train.torch

    entered = time.time()
    job: WorkerJob = loop_config["job"]
    context = ray.train.get_context()
    world = context.get_world_size()
    device = ray.train.torch.get_device()
    sync = job.bench is None or job.bench.sync_gradients

    def report(metrics: dict[str, Any], directory: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)

    place = WorkerPlace(
        rank=context.get_world_rank(),
        world=world,
        local_rank=context.get_local_rank(),
        device=device,
        restored=ray.train.get_checkpoint(),
        report=report,
        node_ids=lambda: _node_ids_of_all_workers(world),
        wrap_model=(lambda m: ray.train.torch.prepare_model(m, move_to_device=device)) if sync else identity,
        mean_over_workers=all_reduce_mean,  # Ray Train sets up a process group even for one worker
    )
    run_worker(job, place, entered)


def run_worker(job: WorkerJob, place: WorkerPlace, entered: float) -> None:
    """One worker's whole run: load data, resume from the run's checkpoint (or ``job.start_from``), train,
    report each epoch through ``place``; ``entered`` (wall clock) is when this worker's code began."""
    from pipeline.data import load
    from pipeline.metrics import Evaluator

    cfg = job.config
    rank, world, device = place.rank, place.world, place.device
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    is_main = rank == 0

    data = load(cfg.data, progress=print if place.local_rank == 0 else (lambda _: None))
    data_loaded = time.time()
    resume = None
    restored, exploit = place.restored, None
    if restored is None and job.start_from is not None:
        restored, exploit = job.start_from.checkpoint, job.start_from.record
    if restored is not None:
        with restored.as_directory() as directory:
            resume = checkpoint.load(Path(directory) / checkpoint.FILENAME)
    tracker = MLflowTracker(job.tracking_uri, job.mlflow_run_id) if is_main and job.mlflow_run_id else NullTracker()
    # The run's worker count from its first step on: an elastic run's curve of sizes in MLflow.
    tracker.log_metrics({"world_size": world}, step=int(resume["step"]) if resume else 0)
    evaluator = None
    if is_main and cfg.eval.every_epochs and job.evaluator is not None:
        evaluator = Evaluator.from_payload(job.evaluator)
    clock = StepClock() if job.bench else None
    nodes = place.node_ids()

    def say(line: str) -> None:
        print(f"[{job.label}] {line}" if job.label else line, flush=True)

    if is_main:
        precision = "bf16" if uses_bf16(cfg.train.precision, device) else "fp32"
        say(f"[train] {world} worker(s) on {len(set(nodes))} node(s), {precision}")
        tracker.set_tags(
            {
                "train_nodes": ",".join(sorted(set(nodes))),
                "num_train_nodes": str(len(set(nodes))),
                "precision": precision,
            }
        )

    def on_resume(state: TrainState) -> None:
        # Where the weights came from, checked against the donor's checkpoint: the networks' fingerprint and
        # the learning rates the optimizers now hold (the perturbed ones).
        if is_main and exploit is not None:
            record = {**exploit, "step": state.step, "weights_sha256": state.fingerprint(), **state.learning_rates}
            # A donor's checkpoint can be older than this trial's own last report (PBT copies the donor's latest):
            # the steps in between stay in the run's history as this trial trained them before the copy (a step
            # is never logged twice); the record says up to where.
            record["logged_through"] = max((step for step, _ in tracker.metric_history("loss_d")), default=0)
            tracker.set_tags({f"pbt.exploit.step_{state.step}": json.dumps(record, sort_keys=True)})
            say(
                f"[pbt] continues from trial {exploit['donor_trial']}'s checkpoint at step {state.step} (epoch "
                f"{exploit['donor_epoch']:g}), weights {record['weights_sha256'][:12]}"
            )

    live = {key.split(".")[1]: cfg.flat()[key] for key in job.live_keys if key not in ("optim.lr_g", "optim.lr_d")}

    share = None  # a thread-elastic trial's torch threads (pipeline.elastic)
    if job.elastic is not None and job.elastic.threads:
        ask = ask_allotment(job.elastic.allotment, job.elastic.trial_id, cfg.scaling.cpus_per_worker, nodes[rank])
        share = ThreadShare(ask, cfg.scaling.cpus_per_worker, torch.set_num_threads)
        tracker.log_metrics({"threads": share.threads}, step=int(resume["step"]) if resume else 0)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if clock is not None:
            clock(step, metrics)
        if job.fault is not None:
            job.fault.fire_if_due(rank, step)
        if share is not None:
            changed = share()
            if changed is not None:
                say(f"[elastic] step {step}: {changed[0]} -> {changed[1]} thread(s)")
                tracker.log_metrics({"threads": changed[1]}, step=step)

    bar = EpochProgress(cfg.train.epochs, cfg.train.batch_size) if is_main and job.show_progress else None
    first_step: list[float] = []

    def on_progress(epoch: int, step: int, steps: int) -> None:
        if not first_step:
            first_step.append(time.time())
        if bar is not None:
            bar(epoch, step, steps)

    # What the sweep's accounting (pipeline.accounting) needs from each report: worker-seconds in training
    # steps, the previous report's checkpoint seconds and, in this run's first report, where its start went.
    timing = {"checkpoint_s": 0.0}
    if job.started_at is not None:
        fit_at = job.fit_at or job.started_at
        timing.update(start_driver_s=fit_at - job.started_at, start_workers_s=entered - fit_at)

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if live:
            tracker.log_metrics(live, step=int(metrics["step"]))
        if "resize_to" in metrics and ranks_by_fid(cfg):
            # Ray Train ranks checkpoints by FID (checkpoint_config): an unscored pause must rank last. Without
            # the key Ray logs an error and ranks it first; inf reaches its controller as None (a crash).
            metrics = {**metrics, "fid": UNSCORED_FID}
        if is_main:
            metrics = {**metrics, **timing, "worker_s": metrics.get("train_s", 0.0) * world}
            if share is not None:
                metrics["grown_cpu_s"] = share.take()
                share.pause()
            if "start_workers_s" in timing and first_step:
                metrics.update(
                    start_s=first_step[0] - job.started_at,
                    start_data_s=data_loaded - entered,
                    start_setup_s=first_step[0] - data_loaded,
                )
            timing.clear()
            tracker.flush()  # the steps up to this report belong to the run whatever a sweep decides there
            saving = time.perf_counter()
        if clock is not None:  # `pipeline bench`: this worker's own step timing
            summary = clock.summary(cfg.train.batch_size, job.bench.warmup, job.bench.window)
            metrics = {
                **metrics,
                **{f"bench_{k}": v for k, v in summary.items()},
                "bench_first_step_time": clock.times[0],
            }
        if state is None:
            place.report(metrics, None)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint.save(Path(tmp) / checkpoint.FILENAME, state)
                saved = time.perf_counter()
                place.report(metrics, tmp)
        if is_main:
            # Saved and persisted, in the next report; where the report also waits for the sweep's verdict,
            # saved (the copy into storage is not told apart from that wait).
            done = saved if state is not None and place.report_waits else time.perf_counter()
            timing["checkpoint_s"] = done - saving
        if is_main and job.verdicts is not None:
            job.verdicts.get()

    resize = None
    if job.elastic is not None and not job.elastic.threads:

        def broadcast(value: int) -> int:
            carrier = torch.tensor([value], dtype=torch.int64, device=device)
            torch.distributed.broadcast(carrier, src=0)
            return int(carrier.item())

        ask = ask_allotment(job.elastic.allotment, job.elastic.trial_id, world) if is_main else None
        resize = ResizePoll(ask, world, broadcast, job.elastic.grow_min_s)

    runtime = Runtime(
        rank=rank,
        world_size=world,
        device=device,
        wrap_model=place.wrap_model,
        mean_over_workers=place.mean_over_workers,
    )
    monitor = (
        system_metrics(job.tracking_uri, job.mlflow_run_id, cfg.tracking.system_metrics_s)
        if is_main and job.mlflow_run_id and cfg.tracking.system_metrics_s > 0 and job.bench is None
        else contextlib.nullcontext()
    )
    with monitor:
        try:
            train_gan(
                cfg,
                data,
                runtime=runtime,
                tracker=tracker,
                report=report,
                on_step=on_step if clock is not None or job.fault or share is not None else None,
                resume=resume,
                on_resume=on_resume,
                evaluator=evaluator,
                log=say,
                progress=on_progress if is_main else None,
                resize=resize,
            )
        except DivergedError as exc:
            # Not a crash to retry from the checkpoint: the same steps would diverge again. Every worker
            # reports it as the run's last result (the worst score, so Tune ranks it last) and returns.
            if is_main:
                say(f"[train] {exc}")
                tracker.flush()
                tracker.set_tags({"status": "diverged", "diverged_epoch": str(exc.epoch)})
            place.report(
                {"diverged": 1, "epoch": exc.epoch, "progress": exc.epoch, "fid": float("inf"), "inception_score": 0.0},
                None,
            )


# --------------------------------------------------------------------------------------------------
# The driver side


@dataclass(frozen=True)
class InTrial:
    """A one-worker sweep trial trained in the trial's own process, without a Ray Train run (pipeline.tune
    builds it): ``train(job, gpu)`` runs :func:`run_worker` there and returns what :func:`finish_run` reads (the
    last ``metrics`` and ``checkpoint``); ``location`` is where Tune keeps the trial's checkpoints."""

    train: Callable[[WorkerJob, bool], Any]
    location: str


@dataclass
class TrainOutcome:
    name: str
    run_dir: str  # <storage_path>/<name>: Ray's run directory (a path or a URI)
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, Any]  # the last reported epoch's
    checkpoint_dir: str | None
    model_uri: str | None = None  # the logged generator (models:/m-...)
    registration: Registration | None = None
    resize_to: int | None = None  # an elastic trial's run that stopped to continue with this many workers


def build_trainer(
    job: WorkerJob, name: str, callbacks: Sequence[Any] = (), gpu: bool = False, verbose: bool = False
) -> Any:
    """A TorchTrainer running ``job`` on every worker, named ``name`` under the storage path (same name =
    restore). Ray Train's own INFO lines (each report, each checkpoint, worker-group start) only with ``verbose``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = resolve_scaling(job.config)
    job = dataclasses.replace(job, config=cfg)
    # The wait for a worker group's CPUs/GPUs (Ray's default is 60 s, retried forever: a lost node that
    # never comes back would hang the run). The driver's value reaches Train's controller through Ray's
    # own list of variables it propagates; one timed-out start then fails the run.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.scaling.resource_wait_s)
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
            checkpoint_config=checkpoint_config(cfg, CheckpointConfig),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=0),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            # Ray Train's print patch tees to stdout *and* its logger when stdout is wrapped: lines twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONUNBUFFERED": "1"}},
        ),
    )


def worker_resources(cfg: PipelineConfig, gpu: bool) -> dict[str, float]:
    """What one worker reserves: its CPUs and, on GPUs, its share of one."""
    return {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": cfg.scaling.gpus_per_worker} if gpu else {})}


def forward_reports(queue: Any) -> Any:
    """A Ray Train callback that puts each report, as ``(rank 0's metrics, checkpoint or None)``, on ``queue``
    (a ray.util.queue.Queue that the driver reads). Ray's TuneReportCallback forwards the metrics alone (the
    checkpoint only as a path among them): a sweep's trial needs the checkpoint to hand to Tune (PBT)."""
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            queue.put((dict(metrics[0]), checkpoint))

    return ForwardReports()


def ranks_by_fid(cfg: PipelineConfig) -> bool:
    """Ray Train keeps the best checkpoints by FID (beside the latest) when every epoch is evaluated."""
    return cfg.eval.every_epochs == 1


def checkpoint_config(cfg: PipelineConfig, cls: type) -> Any:
    """Keep the latest checkpoint and, when every epoch is evaluated, the best ones by FID beside it."""
    if ranks_by_fid(cfg):
        return cls(
            num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute="fid", checkpoint_score_order="min"
        )
    return cls(num_to_keep=cfg.train.keep_checkpoints)


def prepare_inputs(
    cfg: PipelineConfig, progress: Callable[[str], None] = print, evaluator: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Data and (if evaluating) the evaluator, made ready on this node before any worker starts; returns the
    evaluator's payload for the workers. A sweep's trial is handed the sweep's ``evaluator``: every trial, on
    any node, is scored by the same network, and none trains one on a node that has none cached."""
    from pipeline.data import prepare, resolve_root

    prepare(cfg.data.dataset, resolve_root(cfg.data), progress)
    if not cfg.eval.every_epochs:
        return None
    if evaluator is not None:
        return evaluator
    from pipeline.metrics import get_evaluator

    return get_evaluator(cfg.data, progress).payload()


def existing_run(cfg: PipelineConfig, name: str) -> str | None:
    """The MLflow run of the training run ``name``, if one was started before."""
    uri = resolve_tracking_uri(cfg.tracking.uri, PROJECT_ROOT)
    return find_run(uri, cfg.tracking.experiment, {"ray_train_run": name})


def prepare_run(
    cfg: PipelineConfig,
    name: str,
    resume: bool,
    *,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    progress: Callable[[str], None] = print,
    mlflow_run_id: str | None = None,
    train_run: bool = True,
    evaluator: dict[str, Any] | None = None,
) -> tuple[str, str, str, dict[str, Any] | None]:
    """Check everything, prepare data and evaluator (a sweep's trial gets the sweep's ``evaluator``), then
    create the MLflow run (or find the one a resumed run had, or take ``mlflow_run_id``, tagged now with this
    Train run's name): (run location, tracking URI, MLflow run id, evaluator payload).

    Everything here happens before Ray starts, cheap checks first, so bad input fails fast and leaves
    nothing behind (no MLflow run, no directory).
    """
    from pipeline.data import check_root

    check_root(cfg.data)
    uri = resolve_tracking_uri(cfg.tracking.uri, PROJECT_ROOT)
    check_tracking_uri(uri)
    check_storage(cfg)
    location = run_location(cfg, name)
    previous = find_run(uri, cfg.tracking.experiment, {"ray_train_run": name})
    if resume and previous is None:
        raise ConfigError(
            f"--resume {name}: nothing to resume, no run {name!r} in the MLflow store {uri}; check the name "
            "(the MLflow run name) and tracking.uri, or drop --resume to start a new run"
        )
    # Ray Train silently restores a run whose directory exists: a *new* run must not find one.
    if not resume and (previous is not None or exists(location)):
        raise ConfigError(
            f"run {name!r} already exists ({location}); pass --resume {name} to continue it, or choose another --name"
        )
    if resume and train_run:  # (a trial trained in its own process resumes from Tune's checkpoint)
        verify_latest_checkpoint(location)
    evaluator = prepare_inputs(cfg, progress, evaluator)
    if previous is not None:
        return location, uri, previous, evaluator
    if mlflow_run_id is not None:
        MLflowTracker(uri, mlflow_run_id).set_tags({"ray_train_run": name})
        return location, uri, mlflow_run_id, evaluator
    tags = {"ray_train_run": name, **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return location, uri, start_run(uri, cfg.tracking.experiment, name, tags), evaluator


def verify_latest_checkpoint(location: str) -> None:
    """The checkpoint a resumed run starts from must load (on S3 too): refuse a damaged one here, not in a
    retrying worker."""
    with resume_checkpoint_file(location, checkpoint.FILENAME) as latest:
        if latest is not None:
            checkpoint.load(latest[0], source=latest[1])


def fault_from_env() -> FaultInjection | None:
    """PIPELINE_FAULT_AT_STEP=N [PIPELINE_FAULT_RANK=R] [PIPELINE_FAULT_ONCE=FILE]: rank R dies at step N,
    once (FILE marks that it happened). For fault-tolerance tests and drills."""
    step = os.environ.get("PIPELINE_FAULT_AT_STEP")
    if not step:
        return None
    once = os.environ.get("PIPELINE_FAULT_ONCE") or os.path.join(tempfile.gettempdir(), f"pipeline-fault-{step}")
    return FaultInjection(int(step), int(os.environ.get("PIPELINE_FAULT_RANK", "0")), once)


class RunFailed(UserError):
    """The run stopped without finishing (exit code 1: not bad input, a training outcome); the message says why."""


class RunDiverged(RunFailed):
    """The run stopped because its losses diverged."""


class WorkersUnavailable(RunFailed):
    """The run's workers could not be (re)started within ``scaling.resource_wait_s``: a node lost for good."""


def _startup_timed_out(exc: BaseException) -> bool:
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(getattr(exc, "controller_failure", None), WorkerGroupStartupTimeoutError)


def run_training(
    cfg: PipelineConfig,
    name: str,
    *,
    resume: bool = False,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: Sequence[Any] = (),
    progress: Callable[[str], None] = print,
    verbose: bool = False,
    label: str = "",
    mlflow_run_id: str | None = None,
    start_from: StartFrom | None = None,
    live_keys: Sequence[str] = (),
    verdicts: Any = None,
    started_at: float | None = None,
    elastic: ElasticJob | None = None,
    in_trial: InTrial | None = None,
    evaluator: dict[str, Any] | None = None,
) -> TrainOutcome:
    """One tracked, data-parallel training run: MLflow run, Ray Train fit, final artifacts and model. The
    workers' lines start with ``[label]`` when one is given (a sweep's trial id). A sweep's PBT trial goes on
    in its MLflow run ``mlflow_run_id`` with a new Train run that begins ``start_from`` another trial's
    checkpoint, and logs the values of ``live_keys`` at each report; a trial's rank 0 waits after each report
    for an item on ``verdicts`` (Tune let the trial go on). An ``elastic`` trial's run may end early, at a
    checkpoint, for its driver to continue it with another worker count: the MLflow run then stays open and
    ``TrainOutcome.resize_to`` says how many. ``started_at`` (wall clock) is when this start began, for the
    sweep's accounting (default: when this process began loading pipeline code). A one-worker sweep trial
    trains ``in_trial``: in this process, its checkpoints kept by Tune, without a Ray Train run. A sweep's
    trials are scored by the sweep's ``evaluator`` (its payload), not one of their node's."""
    cfg = resolve_scaling(cfg)
    check_resources(cfg)
    run_dir, uri, run_id, evaluator = prepare_run(
        cfg,
        name,
        resume,
        parent_run_id=parent_run_id,
        extra_tags=extra_tags,
        progress=progress,
        mlflow_run_id=mlflow_run_id,
        train_run=in_trial is None,
        evaluator=evaluator,
    )
    if in_trial is not None:
        run_dir = in_trial.location
    init_ray(verbose)
    gpu = use_gpu(cfg)
    tracker = MLflowTracker(uri, run_id)
    if resume:
        tracker.reopen()
    # A PBT trial's mutated keys keep their starting values as params; their later values are metrics (and
    # the exploit records), not resumed_with.* tags.
    tracker.log_params(flat_params(cfg), untagged={key.split(".")[1] for key in live_keys})
    # An elastic run's size changes: its range here (and in the console), each size as the world_size metric.
    size = (
        f"{cfg.scaling.num_workers}-{cfg.scaling.max_workers}"
        if cfg.scaling.max_workers
        else str(cfg.scaling.num_workers)
    )
    tracker.set_tags(
        {
            **environment_tags(),
            "world_size": size,
            "device": "cuda" if gpu else "cpu",
            "status": "running",
            "dataset": cfg.data.dataset,
            "config_digest": config_digest(cfg),
            "trained_in": "trial process" if in_trial else "ray train",
            **({"evaluator_sha256": evaluator["checksum"]} if evaluator and evaluator.get("checksum") else {}),
        }
    )
    log_dataset(cfg, tracker)
    if in_trial:
        how = "in the trial's own process"
    else:
        elastic_note = ", elastic (Ray Train sizes the group)" if cfg.scaling.max_workers else ""
        how = f"{size} worker(s){elastic_note}"
    where = "" if in_trial else f" ({cfg.scaling.placement_strategy})"
    progress(
        f"[train] run {name!r}: {how} on {'GPU' if gpu else 'CPU'}{where}; checkpoints in {run_dir}; "
        f"MLflow run {run_id} at {uri}"
    )
    # A bar inside each epoch only where a person watches a terminal: not in CI logs, files or a sweep's trials.
    bar = sys.stderr.isatty() and not os.environ.get("CI")
    job = WorkerJob(
        cfg,
        run_id,
        uri,
        evaluator,
        fault=fault_from_env(),
        show_progress=bar,
        label=label,
        start_from=start_from,
        live_keys=tuple(live_keys),
        verdicts=verdicts,
        started_at=started_at or STARTED_AT,
        fit_at=time.time(),
        elastic=elastic,
    )
    try:
        result = in_trial.train(job, gpu) if in_trial else build_trainer(job, name, callbacks, gpu, verbose).fit()
    except Exception as exc:
        # A sweep's trial that Tune stopped may see its fit() fail on the way out, after the sweep ended its
        # run KILLED (early stopped): that verdict stands.
        if tracker.status() == "RUNNING":
            tracker.set_tags({"status": "failed"})
            tracker.end("FAILED")
        if _startup_timed_out(exc):
            raise WorkersUnavailable(
                f"run {name!r}: its {cfg.scaling.num_workers} worker(s) ({cfg.scaling.placement_strategy}, "
                f"{cfg.scaling.cpus_per_worker} CPU each) could not be started within scaling.resource_wait_s="
                f"{cfg.scaling.resource_wait_s:g} s (a node lost and not replaced?); add nodes or lower "
                f"scaling.num_workers, then continue with `train --resume {name}`"
            ) from None
        raise
    # Rank 0 tags a diverged run itself: Ray's result keeps the metrics of the last *checkpointed*
    # report, and a diverged epoch has no checkpoint.
    tags = tracker.tags()
    if tags.get("status") == "diverged":
        tracker.end("FAILED")
        raise RunDiverged(
            f"run {name!r} diverged at epoch {tags.get('diverged_epoch', '?')} (NaN or infinite loss) and was "
            f"stopped; {DIVERGENCE_HINT}"
        )
    resize_to = (result.metrics or {}).get("resize_to")
    if resize_to is not None:  # an elastic trial's pause: the next Train run continues this MLflow run
        checkpoint_dir = result.checkpoint.path if result.checkpoint is not None else None
        return TrainOutcome(name, run_dir, run_id, uri, dict(result.metrics), checkpoint_dir, resize_to=int(resize_to))
    outcome = finish_run(cfg, tracker, name, run_dir, result)
    if parent_run_id is None:  # a sweep registers its best trial only, once it has them all
        outcome.registration = register_best(cfg, uri, run_id, outcome.model_uri, progress)
    return outcome


def config_digest(cfg: PipelineConfig) -> str:
    """SHA-256 of the resolved config: equal digests, equal training setups."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def log_dataset(cfg: PipelineConfig, tracker: MLflowTracker) -> None:
    """The training split as the run's MLflow dataset input: its pinned SHA-256, split and ``data.limit``."""
    from pipeline.data import SPECS, TRAIN_IMAGES_FILE, resolve_root

    spec = SPECS[cfg.data.dataset]
    size, sha256 = spec.files[TRAIN_IMAGES_FILE]
    images = (size - 16) // (28 * 28)
    tracker.log_dataset(
        name=cfg.data.dataset,
        digest=sha256,
        source=str(resolve_root(cfg.data) / spec.folder / "raw" / TRAIN_IMAGES_FILE),
        profile={
            "sha256": sha256,
            "split": "train",
            "limit": cfg.data.limit,
            "num_images": min(images, cfg.data.limit or images),
        },
    )


def register_best(
    cfg: PipelineConfig, uri: str, run_id: str, model_uri: str | None, progress: Callable[[str], None] = print
) -> Registration | None:
    """Register the run's logged generator in the Model Registry (``tracking.registered_model``) with its FID,
    IS, run id, config digest and evaluator checksum; the alias ``champion`` moves only on a better FID."""
    name = registered_model_name(cfg)
    if not name or model_uri is None:
        return None
    tracker = MLflowTracker(uri, run_id)
    scores = {key: max(tracker.metric_history(key), default=None) for key in ("fid", "inception_score")}
    if scores["fid"] is None:
        progress(f"[registry] run {run_id} not registered in {name!r}: it has no FID (eval.every_epochs=0)")
        return None
    tags = tracker.tags()
    version_tags = {
        "fid": repr(scores["fid"][1]),
        "inception_score": repr(scores["inception_score"][1]) if scores["inception_score"] else "nan",
        "run_id": run_id,
        "dataset": cfg.data.dataset,
        "config_digest": tags.get("config_digest") or config_digest(cfg),
        "evaluator_sha256": tags.get("evaluator_sha256", "unknown"),
    }
    registration = register_generator(uri, name, model_uri, version_tags)
    progress(f"[registry] {registration.message}")
    return registration


def finish_run(cfg: PipelineConfig, tracker: MLflowTracker, name: str, run_dir: str, result: Any) -> TrainOutcome:
    """Loss curve, last checkpoint and the generator model into the MLflow run; close it."""
    from pipeline.models import build_generator

    checkpoint_dir = model_uri = None
    with tempfile.TemporaryDirectory() as tmp:
        curve = os.path.join(tmp, "loss_curve.png")
        tracker.save_loss_curve(curve)
        tracker.log_artifact(curve)
        if result.checkpoint is not None:
            checkpoint_dir = result.checkpoint.path
            with result.checkpoint.as_directory() as local:
                state = checkpoint.load(Path(local) / checkpoint.FILENAME)
                tracker.log_artifact(str(Path(local) / checkpoint.FILENAME), "checkpoints")
            generator = build_generator(cfg.model)
            generator.load_state_dict(TrainState.sampling_weights(state))
            model_uri = tracker.log_generator(generator, cfg.model.latent_dim, scores=("fid", "inception_score"))
            tracker.set_tags({"generator_model": model_uri})
    fids = [value for _, value in tracker.metric_history("fid")]
    if fids:
        tracker.log_metrics({"best_fid": min(fids)}, step=int((result.metrics or {}).get("step", 0)))
    tracker.set_tags({"status": "finished"})
    tracker.end("FINISHED")
    return TrainOutcome(
        name, run_dir, tracker.run_id, tracker.uri, dict(result.metrics or {}), checkpoint_dir, model_uri
    )


def finish_from_storage(cfg: PipelineConfig, name: str, uri: str, run_id: str, result: Any = None) -> TrainOutcome:
    """:func:`finish_run` for a run whose training completed but whose driver ended before its final logging
    (a sweep's trial): the result is read back from the Train run's storage, or is ``result`` (Tune's, for a
    trial trained in its own process)."""
    from ray.train import Result

    location = run_location(cfg, name)
    if result is None:
        result = Result.from_path(location)
    return finish_run(cfg, MLflowTracker(uri, run_id), name, location, result)


# MLflow 3.17's UI shows an experiment as GenAI (an overview of traces) or as model training after a switch
# it keeps in the browser, GenAI until changed: the experiment tag mlflow.experimentKind no longer decides.
# A link with this query opens the experiment's runs in the model-training view, as charts of every metric.
UI_RUNS_VIEW = "runs?workflowType=machine_learning&compareRunsMode=CHART"


def ui_command(uri: str, run_id: str | None = None) -> str:
    """How to open the MLflow UI on this store (bound to 127.0.0.1), and the runs of ``run_id``'s experiment."""
    experiment_id = MLflowTracker(uri, run_id).experiment_id() if run_id else None
    server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    link = f"{server}/#/experiments/{experiment_id}/{UI_RUNS_VIEW}" if experiment_id else server
    if uri.startswith(("http://", "https://")):
        return f"open {link}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open {link}"
