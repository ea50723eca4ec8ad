"""The hooks a worker gives the loop (pipeline.gan.hooks.Hook): its report to Ray (:class:`Reporter`, the report
path's second hop), the tracker's logging (:class:`Tracking`), the console (:class:`Console`), where a start's
time went (:class:`StartTiming`) and the progress bar (:class:`EpochProgress`), a PBT copy's record
(:class:`ExploitRecord`), an elastic trial's threads or resize poll, and a fault drill (:class:`FaultDrill`)."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.core import checkpoint
from pipeline.distributed.elastic import ResizePoll, ThreadShare, ask_allotment
from pipeline.distributed.results import to_result
from pipeline.gan.hooks import Hook, Step
from pipeline.gan.reports import Report
from pipeline.tracking.tracker import Tracker

if TYPE_CHECKING:
    from pipeline.config.schema import TrainConfig
    from pipeline.distributed.worker import WorkerJob, WorkerPlace
    from pipeline.gan.state import TrainState

UNSENT_METRICS = "unsent_metrics"  # a checkpoint's metric points the store did not hold yet (MLflowTracker.unsent)
EXPLOIT_TAG = "pbt.exploit.step_"  # + the step: a trial's run records each copy into it (pipeline.sweep reads it)
SAME_EXPLOIT = ("donor_trial", "donor_epoch", "weights_sha256", "lr_g", "lr_d")  # a replayed copy has these


class Console(Hook):
    """Rank 0's lines, printed with the trial's label in front when it has one."""

    def __init__(self, label: str = ""):
        self.label = label

    def on_line(self, line: str) -> None:
        print(f"[{self.label}] {line}" if self.label else line, flush=True)


class Tracking(Hook):
    """The loop's figures and sample grids into the run's tracker (rank 0's MLflow run; a NullTracker elsewhere),
    its buffered steps written once each report and its checkpoint are out (it follows the :class:`Reporter`)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step=step)

    def on_samples(self, images: torch.Tensor, name: str) -> None:
        self.tracker.log_image_grid(images, name)

    def on_report(self, report: Report) -> None:
        self.tracker.flush()


class Reporter(Hook):
    """A worker's side of each report: Ray's result (the report, the checkpoint's seconds, on rank 0 its worker
    seconds), the checkpoint saved and handed on through the place, and in a sweep's trial the wait for Tune's
    verdict."""

    def __init__(self, job: WorkerJob, place: WorkerPlace, tracker: Tracker):
        self.job, self.place, self.tracker = job, place, tracker
        flat = job.config.flat()
        # PBT's mutated keys other than the learning rates (those are logged as the optimizers hold them)
        live = job.trial.live_keys
        self.live = {key.split(".")[1]: flat[key] for key in live if key not in ("optim.lr_g", "optim.lr_d")}
        self.checkpoint_s = 0.0  # the previous report's checkpoint: saved and persisted

    def on_report(self, report: Report) -> None:
        place = self.place
        if self.live and "step" in report.metrics:  # a divergence's report has no step
            self.tracker.log_metrics(self.live, step=int(report.metrics["step"]))
        result = to_result(report)
        if place.is_main:
            result.update(checkpoint_s=self.checkpoint_s, worker_s=report.metrics.get("train_s", 0.0) * self.world)
            if self.job.verdicts is not None or place.report_waits:
                # A sweep's trial: Tune may end it at this report, and the steps up to it belong to the run whatever
                # Tune decides. Elsewhere the checkpoint goes first (Tracking flushes after it). A store that does not
                # answer costs neither: the tracker keeps the steps (pipeline.tracking.outage).
                self.tracker.flush()
        saving = time.perf_counter()
        state = report.checkpoint
        if state is not None and (unsent := self.tracker.unsent()):
            # The steps the store does not hold yet travel with the checkpoint: a restart from it sends them.
            state = {**state, UNSENT_METRICS: unsent}
        saved = self.hand_on(result, state)
        # Saved and persisted, told in the next report; where the report also waits for the sweep's verdict,
        # saved (the copy into storage is not told apart from that wait).
        self.checkpoint_s = (
            saved if report.checkpoint is not None and place.report_waits else time.perf_counter()
        ) - saving
        if place.is_main and self.job.verdicts is not None:
            self.job.verdicts.get()

    @property
    def world(self) -> int:
        return self.place.runtime.world_size

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


@dataclass
class StartTiming(Hook):
    """Where this (re)start's time went, for the sweep's accounting (pipeline.sweep.accounting): the driver's part,
    the workers' start, the data, the set-up to the first step; told in the run's first report only (rank 0)."""

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

    def on_step(self, step: Step) -> None:
        if self.first_step is None:
            self.first_step = time.time()

    def figures(self) -> dict[str, float]:
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


class EpochProgress(Hook):
    """Rank 0's progress inside an epoch (step, images/s, ETA) as a bar the driver renders: Ray's ``tqdm_ray``
    sends the bar's state from the worker (at most a few times a second), and the driver draws it."""

    def __init__(self, train: TrainConfig):
        self.epochs, self.batch_size = train.epochs, train.batch_size
        self.bar: Any = None

    def on_step(self, step: Step) -> None:
        from ray.experimental.tqdm_ray import tqdm

        if self.bar is None:
            self.bar = tqdm(total=step.per_epoch * self.batch_size, unit="img")
        self.bar.set_description(f"epoch {step.epoch}/{self.epochs} step {step.index}/{step.per_epoch}")
        self.bar.update(self.batch_size)
        if step.index == step.per_epoch:
            self.bar.close()
            self.bar = None


class ExploitRecord(Hook):
    """What rank 0 records when a PBT trial continues from its donor's checkpoint: the tag
    ``pbt.exploit.step_<step>`` with the donor, the network it continues with (``network``: the donor's shape,
    which may not be the one the run's params started with), the networks' fingerprint and the learning rates
    the optimizers now hold (the perturbed ones), and a line."""

    def __init__(self, exploit: dict[str, Any], tracker: Tracker, console: Hook):
        self.exploit, self.tracker, self.console = exploit, tracker, console

    def on_resume(self, state: TrainState) -> None:
        exploit, tracker = self.exploit, self.tracker
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
            self.console.on_line(f"{line}, as recorded before")
            return
        tracker.set_tags({key: json.dumps(entry, sort_keys=True)})
        self.console.on_line(line)


class ThreadHook(Hook):
    """A thread-elastic trial's :class:`~pipeline.distributed.elastic.ThreadShare`: asked after every step, its
    changes said and logged (``threads``); each report counts the CPU-seconds it grew by (``grown_cpu_s``)."""

    def __init__(self, share: ThreadShare, tracker: Tracker, console: Hook):
        self.share, self.tracker, self.console = share, tracker, console

    def on_step(self, step: Step) -> None:
        changed = self.share()
        if changed is not None:
            self.console.on_line(f"[elastic] step {step.number}: {changed[0]} -> {changed[1]} thread(s)")
            self.tracker.log_metrics({"threads": changed[1]}, step=step.number)

    def figures(self) -> dict[str, float]:
        grown = self.share.take()
        self.share.pause()  # a report is not a step: its seconds until the next step are not grown training
        return {"grown_cpu_s": grown}


def thread_share(  # noqa: PLR0913 - a worker's pieces, once
    job: WorkerJob, place: WorkerPlace, tracker: Tracker, nodes: list[str], console: Hook, resume: dict | None
) -> list[Hook]:
    """A thread-elastic trial's hook (its torch threads follow the sweep's allotment); none for other runs."""
    elastic = job.trial.elastic
    if elastic is None or not elastic.threads:
        return []
    low = job.config.scaling.cpus_per_worker
    ask = ask_allotment(elastic.allotment, elastic.trial_id, low, nodes[place.runtime.rank], console.on_line)
    share = ThreadShare(ask, low, torch.set_num_threads)
    tracker.log_metrics({"threads": share.threads}, step=int(resume["step"]) if resume else 0)
    return [ThreadHook(share, tracker, console)]


def resize_poll(job: WorkerJob, place: WorkerPlace, console: Hook) -> list[Hook]:
    """An elastic trial's poll of its worker count (rank 0 asks the allotment; every rank learns the answer
    through one broadcast); none for other runs."""
    elastic, rt = job.trial.elastic, place.runtime
    if elastic is None or elastic.threads:
        return []

    def broadcast(value: int) -> int:
        carrier = torch.tensor([value], dtype=torch.int64, device=rt.device)
        torch.distributed.broadcast(carrier, src=0)
        return int(carrier.item())

    ask = ask_allotment(elastic.allotment, elastic.trial_id, rt.world_size, say=console.on_line) if rt.is_main else None
    return [ResizePoll(ask, rt.world_size, broadcast, elastic.grow_min_s)]


@dataclass(frozen=True)
class FaultDrill(Hook):
    """A hook for drills and fault-tolerance tests: rank ``rank`` exits at step ``step``, once (the file ``once``
    marks that it happened), as a crashed process would; or, with ``sigterm``, is sent SIGTERM there, as a node
    being shut down would be (pipeline.distributed.preemption)."""

    step: int
    rank: int
    once: str
    sigterm: bool = False

    @classmethod
    def from_env(cls) -> FaultDrill | None:
        """PIPELINE_FAULT_AT_STEP=N [PIPELINE_FAULT_RANK=R] [PIPELINE_FAULT_ONCE=FILE] [PIPELINE_FAULT=sigterm];
        None when not set."""
        step = os.environ.get("PIPELINE_FAULT_AT_STEP")
        if not step:
            return None
        once = os.environ.get("PIPELINE_FAULT_ONCE") or os.path.join(tempfile.gettempdir(), f"pipeline-fault-{step}")
        sigterm = os.environ.get("PIPELINE_FAULT", "exit") == "sigterm"
        return cls(int(step), int(os.environ.get("PIPELINE_FAULT_RANK", "0")), once, sigterm)

    def on_step(self, step: Step) -> None:
        if step.rank == self.rank and step.number == self.step and not os.path.exists(self.once):
            Path(self.once).touch()
            if self.sigterm:
                print(f"[fault] rank {step.rank} is sent SIGTERM at step {step.number}", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            print(f"[fault] rank {step.rank} exits at step {step.number} (PIPELINE_FAULT_AT_STEP)", flush=True)
            os._exit(1)  # no cleanup, no exception for anyone to catch
