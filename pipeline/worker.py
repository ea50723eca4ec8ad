"""What one worker of a run receives (:class:`WorkerJob`) and does (:func:`run_worker`).

A worker is a Ray Train worker (pipeline.distributed) or a one-worker sweep trial's own process
(pipeline.trial); a :class:`WorkerPlace` tells it which: its rank, device, the checkpoint it resumes from and how
its reports leave. The worker loads its data, resumes, and runs `train_gan` with hooks built here: the report
(accounting figures, the checkpoint, a sweep's verdict), the PBT exploit record, the progress bar, an elastic
trial's threads or resize poll. Tools that need a worker's steps (the bench, fault drills) reach it through
:class:`WorkerHook`\\ s in the job, not fields of their own.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline import checkpoint
from pipeline.config import PipelineConfig
from pipeline.elastic import ResizePoll, ThreadShare, ask_allotment
from pipeline.models import identity, network_shape
from pipeline.schedulers import EXPLOIT_TAG
from pipeline.steps import Runtime, uses_bf16
from pipeline.tracking import MLflowTracker, NullTracker, Tracker, system_metrics
from pipeline.train import Diverged, DivergedError, LoopHooks, Report, to_result, train_gan
from pipeline.train_state import TrainState


class WorkerHook(Protocol):
    """A tool's way into every worker of a run (pickled with the job): it may change how the worker is placed,
    sees every step, and adds figures to every report."""

    def place(self, place: WorkerPlace) -> WorkerPlace: ...
    def on_step(self, rank: int, step: int) -> None: ...
    def figures(self, rank: int) -> dict[str, float]: ...


@dataclass(frozen=True)
class StartFrom:
    """Another run's checkpoint that a new run begins from (a PBT exploit): ``checkpoint`` is a Ray Checkpoint
    holding checkpoint.FILENAME; ``record`` is what the run's MLflow tags keep about it."""

    checkpoint: Any
    record: dict[str, Any]


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
    """What every worker of one run receives (Ray Train passes it as ``train_loop_config["job"]``)."""

    config: PipelineConfig
    mlflow_run_id: str | None = None  # rank 0 logs into this run; no tracking without one
    tracking_uri: str | None = None
    evaluator: dict[str, Any] | None = None  # Evaluator.payload(), prepared once by the driver
    hooks: tuple[WorkerHook, ...] = ()  # the bench's timing, a fault drill
    show_progress: bool = False  # the driver's terminal shows a progress bar inside each epoch
    label: str = ""  # what the workers' lines start with, e.g. a sweep's trial id: "[3f2a1_00002] epoch 1/4 ..."
    start_from: StartFrom | None = None  # another run's checkpoint, used when the run has none of its own
    live_keys: tuple[str, ...] = ()  # config keys whose values are logged as metrics at each report (PBT's)
    started_at: float | None = None  # wall clock: when this (re)start began (the driver loading pipeline code)
    fit_at: float | None = None  # wall clock: when the driver handed the run to its workers
    elastic: ElasticJob | None = None  # an elastic sweep's trial: whom rank 0 asks for its size
    # A sweep's trial: a ray.util.queue.Queue that receives an item once Tune has let a report's trial go on.
    # Rank 0 waits for it after each report, so a trial that Tune stops or pauses there (PBT: to copy another
    # trial into it) trains and logs nothing past that report.
    verdicts: Any = None


@dataclass(frozen=True)
class WorkerPlace:
    """Where one worker of a run trains and how it reaches the other workers and the run's storage: a Ray Train
    worker or a one-worker sweep trial's own process."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    restored: Any  # the run's own latest checkpoint (a Ray Checkpoint holding checkpoint.FILENAME), or None
    # (Ray's result dict, directory holding the checkpoint or None): every worker, in step; returns when the run
    # goes on
    report: Callable[[dict[str, Any], str | None], None]
    node_ids: Callable[[], list[str]]  # every rank's Ray node id (a collective)
    wrap_model: Callable[[Any], Any] = identity
    mean_over_workers: Callable[[torch.Tensor], torch.Tensor] = identity
    report_waits: bool = False  # report returns only once a sweep lets the run go on (a trial's own process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def run_worker(job: WorkerJob, place: WorkerPlace, entered: float) -> None:
    """One worker's whole run: load data, resume from the run's checkpoint (or ``job.start_from``), train,
    report through ``place``; ``entered`` (wall clock) is when this worker's code began."""
    from pipeline.data import training_batches
    from pipeline.metrics import Evaluator

    for hook in job.hooks:
        place = hook.place(place)
    cfg = job.config
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    data = training_batches(cfg.data, place.device, print if place.local_rank == 0 else (lambda _: None))
    timing = StartTiming.of(job, entered)
    resume, exploit = restored_state(job, place)
    tracker: Tracker = (
        MLflowTracker(job.tracking_uri, job.mlflow_run_id) if place.is_main and job.mlflow_run_id else NullTracker()
    )
    # The run's worker count from its first step on: an elastic run's curve of sizes in MLflow.
    tracker.log_metrics({"world_size": place.world}, step=int(resume["step"]) if resume else 0)
    evaluator = (
        Evaluator.from_payload(job.evaluator) if place.is_main and cfg.eval.every_epochs and job.evaluator else None
    )
    nodes = place.node_ids()
    say = labelled(job.label)
    if place.is_main:
        announce(cfg, place, tracker, nodes, say)
    hooks = [*job.hooks, *thread_share(job, place, tracker, nodes, say, resume)]
    bar = EpochProgress(cfg.train.epochs, cfg.train.batch_size) if job.show_progress else None
    loop = LoopHooks(
        tracker=tracker,
        evaluator=evaluator,
        report=Reporter(job, place, tracker, hooks, timing),
        log=say,
        on_step=steps_to(hooks, place.rank) if hooks else None,
        on_resume=exploit_record({**exploit, "network": network_shape(cfg.model)}, tracker, say)
        if place.is_main and exploit
        else None,
        progress=timing.progress(bar) if place.is_main else None,
        resize=resize_poll(job, place, say),
    )
    runtime = Runtime(place.rank, place.world, place.device, place.wrap_model, place.mean_over_workers)
    monitor = (
        system_metrics(job.tracking_uri, job.mlflow_run_id, cfg.tracking.system_metrics_s)
        if place.is_main and job.mlflow_run_id and cfg.tracking.system_metrics_s > 0
        else contextlib.nullcontext()
    )
    with monitor:
        try:
            train_gan(cfg, data, runtime, loop, resume)
        except DivergedError as exc:
            # Not a crash to retry from the checkpoint: the same steps would diverge again. Every worker
            # reports it as the run's last result and returns.
            if place.is_main:
                say(f"[train] {exc}")
                tracker.flush()
                tracker.set_tags({"status": "diverged", "diverged_epoch": str(exc.epoch)})
            place.report(to_result(Diverged.at(exc.epoch)), None)


def labelled(label: str) -> Callable[[str], None]:
    """A worker's way to print a line: with its trial's label in front, when it has one."""

    def say(line: str) -> None:
        print(f"[{label}] {line}" if label else line, flush=True)

    return say


def restored_state(job: WorkerJob, place: WorkerPlace) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The checkpoint dict the worker resumes from (the run's own latest, else ``job.start_from``'s) and, for a
    PBT exploit, the record of where it came from."""
    restored, exploit = place.restored, None
    if restored is None and job.start_from is not None:
        restored, exploit = job.start_from.checkpoint, job.start_from.record
    if restored is None:
        return None, None
    with restored.as_directory() as directory:
        return checkpoint.load(Path(directory) / checkpoint.FILENAME), exploit


def announce(cfg: PipelineConfig, place: WorkerPlace, tracker: Tracker, nodes: list[str], say: Callable) -> None:
    """Rank 0's first line (workers, nodes, precision) and the same as the run's tags."""
    precision = "bf16" if uses_bf16(cfg.train.precision, place.device) else "fp32"
    say(f"[train] {place.world} worker(s) on {len(set(nodes))} node(s), {precision}")
    tracker.set_tags(
        {"train_nodes": ",".join(sorted(set(nodes))), "num_train_nodes": str(len(set(nodes))), "precision": precision}
    )


SAME_EXPLOIT = ("donor_trial", "donor_epoch", "weights_sha256", "lr_g", "lr_d")  # a replayed copy has these


def exploit_record(
    exploit: dict[str, Any], tracker: Tracker, say: Callable[[str], None]
) -> Callable[[TrainState], None]:
    """What rank 0 records when a PBT trial continues from its donor's checkpoint: the tag
    ``pbt.exploit.step_<step>`` with the donor, the network it continues with (``network``: the donor's shape,
    which may not be the one the run's params started with), the networks' fingerprint and the learning rates
    the optimizers now hold (the perturbed ones), and a line."""

    def record(state: TrainState) -> None:
        entry = {**exploit, "step": state.step, "weights_sha256": state.fingerprint(), **state.learning_rates}
        # A donor's checkpoint can be older than this trial's own last report (PBT copies the donor's latest):
        # the steps in between stay in the run's history as this trial trained them before the copy (a step
        # is never logged twice); the record says up to where.
        entry["logged_through"] = max((step for step, _ in tracker.metric_history("loss_d")), default=0)
        line = (
            f"[pbt] continues from trial {exploit['donor_trial']}'s checkpoint at step {state.step} (epoch "
            f"{exploit['donor_epoch']:g}), weights {entry['weights_sha256'][:12]}"
        )
        key = f"{EXPLOIT_TAG}{state.step}"
        before = tracker.tags().get(key)
        if before and all(json.loads(before).get(k) == entry[k] for k in SAME_EXPLOIT):
            # The same copy again (a resumed sweep restarts the trial from it): the record stays the first one,
            # whose logged_through says where the copy's own steps begin.
            say(f"{line}, as recorded before")
            return
        tracker.set_tags({key: json.dumps(entry, sort_keys=True)})
        say(line)

    return record


def steps_to(hooks: list[WorkerHook], rank: int) -> Callable[[int, dict[str, float]], None]:
    """The loop's step callback: every hook sees every step."""

    def on_step(step: int, metrics: dict[str, float]) -> None:
        for hook in hooks:
            hook.on_step(rank, step)

    return on_step


class ThreadHook:
    """A thread-elastic trial's :class:`~pipeline.elastic.ThreadShare` as a worker hook: asked after every step,
    its changes said and logged (``threads``); each report counts the CPU-seconds it grew by (``grown_cpu_s``)."""

    def __init__(self, share: ThreadShare, tracker: Tracker, say: Callable[[str], None]):
        self.share, self.tracker, self.say = share, tracker, say

    def place(self, place: WorkerPlace) -> WorkerPlace:
        return place

    def on_step(self, rank: int, step: int) -> None:
        changed = self.share()
        if changed is not None:
            self.say(f"[elastic] step {step}: {changed[0]} -> {changed[1]} thread(s)")
            self.tracker.log_metrics({"threads": changed[1]}, step=step)

    def figures(self, rank: int) -> dict[str, float]:
        grown = self.share.take()
        self.share.pause()  # a report is not a step: its seconds until the next step are not grown training
        return {"grown_cpu_s": grown}


def thread_share(
    job: WorkerJob, place: WorkerPlace, tracker: Tracker, nodes: list[str], say: Callable, resume: dict | None
) -> list[WorkerHook]:
    """A thread-elastic trial's hook (its torch threads follow the sweep's allotment); none for other runs."""
    if job.elastic is None or not job.elastic.threads:
        return []
    low = job.config.scaling.cpus_per_worker
    ask = ask_allotment(job.elastic.allotment, job.elastic.trial_id, low, nodes[place.rank], say)
    share = ThreadShare(ask, low, torch.set_num_threads)
    tracker.log_metrics({"threads": share.threads}, step=int(resume["step"]) if resume else 0)
    return [ThreadHook(share, tracker, say)]


def resize_poll(job: WorkerJob, place: WorkerPlace, say: Callable[[str], None]) -> ResizePoll | None:
    """An elastic trial's poll of its worker count (rank 0 asks the allotment; every rank learns the answer
    through one broadcast); None for other runs."""
    if job.elastic is None or job.elastic.threads:
        return None

    def broadcast(value: int) -> int:
        carrier = torch.tensor([value], dtype=torch.int64, device=place.device)
        torch.distributed.broadcast(carrier, src=0)
        return int(carrier.item())

    ask = ask_allotment(job.elastic.allotment, job.elastic.trial_id, place.world, say=say) if place.is_main else None
    return ResizePoll(ask, place.world, broadcast, job.elastic.grow_min_s)


@dataclass
class StartTiming:
    """Where this (re)start's time went, for the sweep's accounting (pipeline.accounting): the driver's part, the
    workers' start, the data, the set-up to the first step; told in the run's first report only."""

    started_at: float | None  # when the driver began (None: no accounting)
    phases: dict[str, float] = field(default_factory=dict)
    entered: float = 0.0
    data_loaded: float = 0.0
    first_step: float | None = None

    @classmethod
    def of(cls, job: WorkerJob, entered: float) -> StartTiming:
        """Called once the data is loaded."""
        timing = cls(job.started_at, entered=entered, data_loaded=time.time())
        if job.started_at is not None:
            fit_at = job.fit_at or job.started_at
            timing.phases = {"start_driver_s": fit_at - job.started_at, "start_workers_s": entered - fit_at}
        return timing

    def progress(self, bar: EpochProgress | None) -> Callable[[int, int, int], None]:
        """The loop's progress callback on rank 0: notes the first step's time, draws the bar if there is one."""

        def on_progress(epoch: int, step: int, steps: int) -> None:
            if self.first_step is None:
                self.first_step = time.time()
            if bar is not None:
                bar(epoch, step, steps)

        return on_progress

    def take(self) -> dict[str, float]:
        """The start's figures for the first report (then nothing)."""
        figures = dict(self.phases)
        if self.phases and self.first_step is not None:
            figures.update(
                start_s=self.first_step - self.started_at,
                start_data_s=self.data_loaded - self.entered,
                start_setup_s=self.first_step - self.data_loaded,
            )
        self.phases = {}
        return figures


class Reporter:
    """A worker's side of each report: Ray's result (the report, the accounting's figures, the hooks'), the
    checkpoint saved and handed on through the place, and in a sweep's trial the wait for Tune's verdict."""

    def __init__(
        self, job: WorkerJob, place: WorkerPlace, tracker: Tracker, hooks: list[WorkerHook], timing: StartTiming
    ):
        self.job, self.place, self.tracker, self.hooks, self.timing = job, place, tracker, hooks, timing
        flat = job.config.flat()
        # PBT's mutated keys other than the learning rates (those are logged as the optimizers hold them)
        self.live = {key.split(".")[1]: flat[key] for key in job.live_keys if key not in ("optim.lr_g", "optim.lr_d")}
        self.checkpoint_s = 0.0  # the previous report's checkpoint: saved and persisted

    def __call__(self, report: Report) -> None:
        place = self.place
        if self.live:
            self.tracker.log_metrics(self.live, step=int(report.metrics["step"]))
        result = to_result(report)
        if place.is_main:
            worker_s = report.metrics.get("train_s", 0.0) * place.world
            result.update(checkpoint_s=self.checkpoint_s, worker_s=worker_s, **self.timing.take())
            self.tracker.flush()  # the steps up to this report belong to the run whatever a sweep decides there
        for hook in self.hooks:
            result.update(hook.figures(place.rank))
        saving = time.perf_counter()
        saved = self.hand_on(result, report.checkpoint)
        # Saved and persisted, told in the next report; where the report also waits for the sweep's verdict,
        # saved (the copy into storage is not told apart from that wait).
        self.checkpoint_s = (
            saved if report.checkpoint is not None and place.report_waits else time.perf_counter()
        ) - saving
        if place.is_main and self.job.verdicts is not None:
            self.job.verdicts.get()

    def hand_on(self, result: dict[str, Any], state: dict[str, Any] | None) -> float:
        """``result`` and, with ``state``, its checkpoint through the place; returns when the checkpoint was saved."""
        if state is None:
            self.place.report(result, None)
            return time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(Path(tmp) / checkpoint.FILENAME, state)
            saved = time.perf_counter()
            self.place.report(result, tmp)
        return saved
