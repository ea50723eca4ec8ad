"""A sweep's trial: the trainable Ray Tune runs for each point of the search space (`_trial_driver`).

A one-worker trial trains in the trial's own process (:class:`InTrial`): the worker's code reports each epoch
with its checkpoint straight to Tune, which keeps the checkpoints and restarts the trial after a failure. Any
other trial is a *trial driver*: it runs a Ray Train run named ``<sweep>-<trial id>`` (so a restored sweep
continues the same Train run) whose reports reach the driver (pipeline.distributed.train_run.RayTrainRun) and
are handed to Tune in lock-step (:class:`TuneHandOff`). A
scheduler that needs checkpoints (PBT) gets a Tune checkpoint with every report, carrying its lineage; a trial
restarted from another trial's checkpoint goes on in a new Train run that begins there, logging into the
trial's one MLflow run. An elastic trial continues the same Train run with another worker count whenever its
run stops to change size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline import PROJECT_ROOT
from pipeline.config.load import with_overrides
from pipeline.core.checkpoint import FILENAME as CHECKPOINT_FILE
from pipeline.core.secrets import redact_console
from pipeline.core.uris import resolve_tracking_uri
from pipeline.distributed.elastic import ask_allotment
from pipeline.distributed.lifecycle import RunDiverged
from pipeline.distributed.prepare import RunRequest, existing_run
from pipeline.distributed.results import Reports, report_kind
from pipeline.distributed.run import run_training
from pipeline.distributed.storage import run_location
from pipeline.distributed.train_run import RayTrainRun
from pipeline.distributed.worker import ElasticJob, StartFrom, TrialPart, WorkerJob, WorkerPlace, run_worker
from pipeline.gan.reports import Pause
from pipeline.gan.steps import Runtime
from pipeline.sweep.schedulers import scheduler_of
from pipeline.sweep.search_space import flat_point, trial_config
from pipeline.tracking.store import find_run

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig

LINEAGE_FILE = "lineage.json"  # in each Tune checkpoint: whose Train run and MLflow run it came from


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep receives from the sweep's driver (through Ray's object store)."""

    base: PipelineConfig  # the sweep's config; a trial applies its point to it
    sweep: str
    parent_run_id: str
    evaluators: dict[str, dict[str, Any]]  # dataset -> the evaluator payload every trial on it is scored by
    allotment: Any = None  # an elastic sweep's pipeline.distributed.elastic.Allotment actor
    verbose: bool = False


def trains_in_trial(cfg: PipelineConfig) -> bool:
    """A trial of one worker, not elastic, trains in its trial's own process (Tune keeps its checkpoints and
    restarts it after a failure): no Ray Train controller and worker group to start, tens of seconds each."""
    return cfg.scaling.num_workers == 1 and not cfg.scaling.max_workers


def _trial_driver(point: dict[str, Any], *, setup: TrialSetup) -> None:
    """One trial (the trainable's name is what Tune checks when a sweep resumes: it stays ``_trial_driver``).
    Every trial is scored by the sweep's evaluator of its dataset."""
    redact_console()  # what the trial's process prints shows no credential
    import ray.tune

    cfg = trial_config(setup.base, flat_point(point))
    trial_id = ray.tune.get_context().get_trial_id()
    given = ray.tune.get_checkpoint()
    name, start_from = continuation(setup.sweep, trial_id, given)
    note = CheckpointNote(
        resolve_tracking_uri(cfg.tracking.uri, PROJECT_ROOT), cfg.tracking.experiment, setup.sweep, trial_id, name
    )
    scheduler = scheduler_of(setup.base)
    request = RunRequest(
        name,
        # A restored (or paused) trial finds its Train run, and the MLflow child run, by name.
        resume=existing_run(cfg, name) is not None,
        parent_run_id=setup.parent_run_id,
        extra_tags={"sweep": setup.sweep, "trial_id": trial_id},
        progress=lambda msg: print(f"[{trial_id}] {msg}"),
        verbose=setup.verbose,
        mlflow_run_id=note.child_run(),
        trial=TrialPart(label=trial_id, start_from=start_from, live_keys=tuple(scheduler.live_keys(setup.base))),
        evaluator=setup.evaluators.get(cfg.data.dataset),
    )
    try:
        if trains_in_trial(setup.base):  # as the sweep decided when it reserved the trial's resources
            location = (
                f"{run_location(setup.base, setup.sweep)}/{os.path.basename(ray.tune.get_context().get_trial_dir())}"
            )
            # Thread-elastic (an allotment counted in threads): the trial's torch threads follow its share.
            threads = ElasticJob(setup.allotment, trial_id, 0.0, threads=True) if setup.allotment is not None else None
            restored = given if start_from is None else None
            request = dataclasses.replace(request, trial=dataclasses.replace(request.trial, elastic=threads))
            run_training(cfg, request, InTrial(restored, note, location), Reports(tune_report))
        else:
            train_runs(cfg, request, trial_id, setup.allotment, note if scheduler.needs_checkpoints else None)
    except RunDiverged as exc:
        # Tune already has its last result (the worst score); the rest of the sweep goes on.
        print(f"[{trial_id}] {exc}")


def tune_report(result: dict[str, Any], checkpoint: Any) -> None:
    """A report handed to Tune (with its Tune checkpoint, if any); returns once Tune lets the trial go on (when Tune
    stops or pauses the trial, it ends this thread)."""
    import ray.tune

    if checkpoint is None:
        ray.tune.report(result)
    else:
        ray.tune.report(result, checkpoint=checkpoint)


@dataclass
class CheckpointNote:
    """What a trial's Tune checkpoint says about itself: whose it is, from which Train run and MLflow run, where."""

    uri: str
    experiment: str
    sweep: str
    trial_id: str
    train_run: str
    child: str | None = None  # the trial's MLflow run, once it exists

    def child_run(self) -> str | None:
        self.child = self.child or find_run(self.uri, self.experiment, {"sweep": self.sweep, "trial_id": self.trial_id})
        return self.child

    def __call__(self, metrics: dict[str, Any]) -> dict[str, Any]:
        where = {"step": int(metrics["step"]), "progress": metrics.get("progress", metrics.get("epoch"))}
        return {"trial_id": self.trial_id, "train_run": self.train_run, "mlflow_run_id": self.child_run(), **where}


def continuation(sweep: str, trial_id: str, given: Any) -> tuple[str, StartFrom | None]:
    """The Train run a trial (re)starts with: its first one; the one its own Tune checkpoint came from (a
    paused or restored trial); or, given another trial's checkpoint (PBT's exploit), a new one named after
    that checkpoint, so a restart before its first report finds it again."""
    if given is None:
        return f"{sweep}-{trial_id}", None
    with given.as_directory() as directory:
        lineage = json.loads((Path(directory) / LINEAGE_FILE).read_text())
    if lineage["trial_id"] == trial_id:
        return lineage["train_run"], None
    record = {
        "donor_trial": lineage["trial_id"],
        "donor_run_id": lineage["mlflow_run_id"],
        "donor_train_run": lineage["train_run"],
        "donor_epoch": lineage["progress"],
    }
    return f"{sweep}-{trial_id}-from-{lineage['trial_id']}-{lineage['step']}", StartFrom(given, record)


@dataclass
class InTrial:
    """The executor of a one-worker trial trained in the trial's own process, without a Ray Train run: the worker's
    code resumes from ``restored`` (the trial's own Tune checkpoint, or None) and hands each report to Tune with a
    checkpoint that carries its lineage (``note``); Tune's report returns once Tune lets the trial go on, and Tune keeps
    the checkpoints under ``where``."""

    restored: Any
    note: Callable[[dict[str, Any]], dict[str, Any]]
    where: str
    trained_in: ClassVar[str] = "trial process"

    def location(self, cfg: PipelineConfig, name: str) -> str:
        return self.where

    def check_resume(self, cfg: PipelineConfig, location: str, progress: Callable[[str], None]) -> None:
        """Nothing: the worker loads Tune's checkpoint itself (a damaged one fails the trial, which Tune retries)."""

    def describe(self, cfg: PipelineConfig, gpu: bool) -> str:
        return f"in the trial's own process on {'GPU' if gpu else 'CPU'}"

    def fit(self, job: WorkerJob, name: str, gpu: bool, verbose: bool, reports: Reports) -> Any:
        import ray
        import ray.tune
        import torch

        entered = time.time()
        last: dict[str, Any] = {}

        def report(result: dict[str, Any], directory: str | None) -> None:
            last.clear()
            last.update(result)
            if directory is None:
                reports(result, None)
                return
            (Path(directory) / LINEAGE_FILE).write_text(json.dumps(self.note(result)))
            reports(result, ray.tune.Checkpoint.from_directory(directory))

        device = torch.device("cuda", 0) if gpu else torch.device("cpu")  # Ray shows the trial its GPU as 0
        place = WorkerPlace(
            Runtime(0, 1, device),
            local_rank=0,
            restored=self.restored,
            report=report,
            node_ids=lambda: [ray.get_runtime_context().get_node_id()],
            report_waits=True,
        )
        run_worker(job, place, entered)
        # Tune's session holds the latest checkpoint persisted (or the one the trial restarted from).
        return types.SimpleNamespace(metrics=dict(last), checkpoint=ray.tune.get_checkpoint())


def train_runs(
    cfg: PipelineConfig,
    request: RunRequest,
    trial_id: str,
    allotment: Any,
    note: Callable[[dict[str, Any]], dict] | None,
) -> None:
    """A trial as Ray Train runs, each report handed to Tune as it comes (with a Tune checkpoint that ``note``
    describes, when given), the run waiting for Tune's verdict after each. An elastic trial (``allotment``) starts
    with the worker count the allotment gives it and, each time its run stops to change size, continues the same
    Train run from that checkpoint with the new count."""
    elastic, workers = None, cfg.scaling.num_workers
    if allotment is not None:
        elastic = ElasticJob(allotment, trial_id, cfg.scaling.elastic_grow_min_s)
        workers = ask_allotment(allotment, trial_id, workers, say=request.progress)()
    request = dataclasses.replace(request, trial=dataclasses.replace(request.trial, elastic=elastic))
    carried: dict[str, float] = {}
    while True:
        # An elastic trial's run has one size; the trial changes it between runs.
        sized = with_overrides(cfg, {"scaling.num_workers": workers, "scaling.max_workers": None}) if elastic else cfg
        handoff = TuneHandOff(note, carried)
        outcome = run_training(sized, request, RayTrainRun(verdicts=True), Reports(handoff.hand))
        if outcome.resize_to is None:
            return
        # The run stopped at a checkpoint to change size: the same Train run (and MLflow run) goes on.
        workers, carried = outcome.resize_to, handoff.carried
        request = dataclasses.replace(
            request, resume=True, trial=dataclasses.replace(request.trial, start_from=None), started_at=time.time()
        )


# What a report that Tune does not see (an elastic trial's pause to change size) hands on to the next one it
# does, so that the sweep's accounting counts those steps and seconds.
CARRIED_KEYS = ("train_s", "worker_s", "checkpoint_s")


@dataclass
class TuneHandOff:
    """Each report of a trial's Train run, handed to Tune: the accounting's seconds put right, a Tune checkpoint
    made from the Train checkpoint (with ``note``: its lineage), a pause's seconds carried to the next report."""

    note: Callable[[dict[str, Any]], dict[str, Any]] | None
    carried: dict[str, float]
    copying_s: float = 0.0  # the previous Tune checkpoint's copy, counted with the next report's checkpoint
    reported: bool = False

    def hand(self, result: dict[str, Any], train_checkpoint: Any) -> None:
        import ray.tune

        # A worker group Train restarted after a failure says when it started too, but only this driver's first
        # start counts.
        result = {**result, "checkpoint_s": result.get("checkpoint_s", 0.0) + self.copying_s}
        if self.reported:
            result = {k: v for k, v in result.items() if not k.startswith("start_")}
        self.reported = True
        self.copying_s = 0.0
        if report_kind(result) is Pause:
            for key in CARRIED_KEYS:
                self.carried[key] = self.carried.get(key, 0.0) + result.get(key, 0.0)
            return
        result = {**result, **{key: result.get(key, 0.0) + self.carried.pop(key) for key in list(self.carried)}}
        # tune_report returns once Tune lets the trial go on (it ends this thread otherwise).
        if self.note is None or train_checkpoint is None:
            tune_report(result, None)
            return
        with tempfile.TemporaryDirectory() as tmp, train_checkpoint.as_directory() as source:
            copying = time.perf_counter()
            shutil.copy(Path(source) / CHECKPOINT_FILE, Path(tmp) / CHECKPOINT_FILE)
            (Path(tmp) / LINEAGE_FILE).write_text(json.dumps(self.note(result)))
            # (Tune's own copy into the sweep's storage, inside report, is not told apart from its verdict.)
            self.copying_s = time.perf_counter() - copying
            tune_report(result, ray.tune.Checkpoint.from_directory(tmp))
