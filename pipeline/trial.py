"""A sweep's trial: the trainable Ray Tune runs for each point of the search space (`_trial_driver`).

A one-worker trial trains in the trial's own process (:class:`InTrial`): the worker's code reports each epoch
with its checkpoint straight to Tune, which keeps the checkpoints and restarts the trial after a failure. Any
other trial is a *trial driver*: it runs a Ray Train run named ``<sweep>-<trial id>`` (so a restored sweep
continues the same Train run) and hands each of its reports to Tune in lock-step (:func:`fit_reporting`). A
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
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline import PROJECT_ROOT
from pipeline.checkpoint import FILENAME as CHECKPOINT_FILE
from pipeline.config import PipelineConfig, trial_config, with_overrides
from pipeline.distributed import RayTrainRun, forward_reports, run_training
from pipeline.elastic import ask_allotment
from pipeline.runs import RunDiverged, RunRequest, TrainOutcome, existing_run
from pipeline.schedulers import scheduler_of
from pipeline.search_space import flat_point
from pipeline.storage import run_location
from pipeline.tracking import find_run
from pipeline.train import Pause, result_kind
from pipeline.uris import resolve_tracking_uri
from pipeline.worker import ElasticJob, StartFrom, WorkerJob, WorkerPlace, run_worker

LINEAGE_FILE = "lineage.json"  # in each Tune checkpoint: whose Train run and MLflow run it came from


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep receives from the sweep's driver (through Ray's object store)."""

    base: PipelineConfig  # the sweep's config; a trial applies its point to it
    sweep: str
    parent_run_id: str
    evaluators: dict[str, dict[str, Any]]  # dataset -> the evaluator payload every trial on it is scored by
    allotment: Any = None  # an elastic sweep's pipeline.elastic.Allotment actor
    verbose: bool = False


def trains_in_trial(cfg: PipelineConfig) -> bool:
    """A trial of one worker, not elastic, trains in its trial's own process (Tune keeps its checkpoints and
    restarts it after a failure): no Ray Train controller and worker group to start, tens of seconds each."""
    return cfg.scaling.num_workers == 1 and not cfg.scaling.max_workers


def _trial_driver(point: dict[str, Any], *, setup: TrialSetup) -> None:
    """One trial (the trainable's name is what Tune checks when a sweep resumes: it stays ``_trial_driver``).
    Every trial is scored by the sweep's evaluator of its dataset."""
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
        label=trial_id,
        mlflow_run_id=note.child_run(),
        start_from=start_from,
        live_keys=tuple(scheduler.live_keys(setup.base)),
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
            run_training(cfg, dataclasses.replace(request, elastic=threads), InTrial(restored, note, location))
        else:
            train_runs(cfg, request, trial_id, setup.allotment, note if scheduler.needs_checkpoints else None)
    except RunDiverged as exc:
        # Tune already has its last result (the worst score); the rest of the sweep goes on.
        print(f"[{trial_id}] {exc}")


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

    def check_resume(self, cfg: PipelineConfig, location: str) -> None:
        """Nothing: the worker loads Tune's checkpoint itself (a damaged one fails the trial, which Tune retries)."""

    def describe(self, cfg: PipelineConfig, gpu: bool) -> str:
        return f"in the trial's own process on {'GPU' if gpu else 'CPU'}"

    def fit(self, job: WorkerJob, name: str, gpu: bool, verbose: bool) -> Any:
        import ray
        import ray.tune
        import torch

        entered = time.time()
        last: dict[str, Any] = {}

        def report(result: dict[str, Any], directory: str | None) -> None:
            last.clear()
            last.update(result)
            if directory is None:
                ray.tune.report(result)
                return
            (Path(directory) / LINEAGE_FILE).write_text(json.dumps(self.note(result)))
            ray.tune.report(result, checkpoint=ray.tune.Checkpoint.from_directory(directory))

        place = WorkerPlace(
            rank=0,
            world=1,
            local_rank=0,
            device=torch.device("cuda", 0) if gpu else torch.device("cpu"),  # Ray shows the trial its GPU as 0
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
    describes, when given). An elastic trial (``allotment``) starts with the worker count the allotment gives it
    and, each time its run stops to change size, continues the same Train run from that checkpoint with the new
    count."""
    elastic, workers = None, cfg.scaling.num_workers
    if allotment is not None:
        elastic = ElasticJob(allotment, trial_id, cfg.scaling.elastic_grow_min_s)
        workers = ask_allotment(allotment, trial_id, workers, say=request.progress)()
    request = dataclasses.replace(request, elastic=elastic)
    carried: dict[str, float] = {}
    while True:
        # An elastic trial's run has one size; the trial changes it between runs.
        sized = with_overrides(cfg, {"scaling.num_workers": workers, "scaling.max_workers": None}) if elastic else cfg
        outcome, carried = fit_reporting(
            lambda executor, c=sized, r=request: run_training(c, r, executor), note, carried
        )
        if outcome is None or outcome.resize_to is None:
            return
        # The run stopped at a checkpoint to change size: the same Train run (and MLflow run) goes on.
        workers = outcome.resize_to
        request = dataclasses.replace(request, resume=True, start_from=None, started_at=time.time())


# What a report that Tune does not see (an elastic trial's pause to change size) hands on to the next one it
# does, so that the sweep's accounting counts those steps and seconds.
CARRIED_KEYS = ("train_s", "worker_s", "checkpoint_s")


def fit_reporting(
    fit: Callable[[RayTrainRun], TrainOutcome],
    note: Callable[[dict[str, Any]], dict[str, Any]] | None,
    carried: dict[str, float] | None = None,
) -> tuple[TrainOutcome | None, dict[str, float]]:
    """Run ``fit`` (run_training given its executor) in a thread and hand each of its reports to Tune from this
    one, the trial's, in lock-step: the run waits after each report until Tune lets it go on, so a stopped or
    paused trial trains and logs nothing past the report Tune decided on. With ``note`` (PBT) each report
    carries a Tune checkpoint: the Train checkpoint's file and what it says about whose it is. A pause (an
    elastic trial stopping to change size) is not Tune's: its seconds are ``carried`` into the next report Tune
    gets. Ends when ``fit`` does (returning what it returned and what is still carried; raising what it raised)
    or when Tune stops the trial (Ray ends this thread then)."""
    from ray.util.queue import Queue

    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    verdicts = Queue(actor_options={"num_cpus": 0})
    failure: list[BaseException] = []
    returned: list[Any] = []

    def target() -> None:
        try:
            returned.append(fit(RayTrainRun(callbacks=[forward_reports(reports)], verdicts=verdicts)))
        except BaseException as exc:  # noqa: BLE001 - raised again in the trial's thread below
            failure.append(exc)

    runner = threading.Thread(target=target, name="train-run", daemon=True)
    runner.start()
    # When Tune stops or pauses the trial, ray.tune.report ends this thread (SystemExit) and Ray then ends the
    # process, the Train run with it: the queues stay up till then, or the run would fail first (and mark its
    # MLflow run FAILED) while the trial was only stopped.
    carried = TuneHandOff(note, dict(carried or {})).drain(runner, reports, verdicts)
    reports.shutdown()
    verdicts.shutdown()
    runner.join()
    if failure:
        raise failure[0]
    return (returned[0] if returned else None), carried


@dataclass
class TuneHandOff:
    """Each report of a trial's Train run, handed to Tune: the accounting's seconds put right, a Tune checkpoint
    made from the Train checkpoint (with ``note``: its lineage), a pause's seconds carried to the next report."""

    note: Callable[[dict[str, Any]], dict[str, Any]] | None
    carried: dict[str, float]
    copying_s: float = 0.0  # the previous Tune checkpoint's copy, counted with the next report's checkpoint
    reported: bool = False

    def drain(self, runner: threading.Thread, reports: Any, verdicts: Any) -> dict[str, float]:
        """Until the run ends and every report is handed on; returns the seconds still carried."""
        from ray.util.queue import Empty

        while runner.is_alive() or not reports.empty():
            try:
                result, train_checkpoint = reports.get(timeout=0.5)
            except Empty:
                continue
            self.hand(result, train_checkpoint)
            verdicts.put(True)
        return self.carried

    def hand(self, result: dict[str, Any], train_checkpoint: Any) -> None:
        import ray.tune

        # A worker group Train restarted after a failure says when it started too, but only this driver's first
        # start counts.
        result = {**result, "checkpoint_s": result.get("checkpoint_s", 0.0) + self.copying_s}
        if self.reported:
            result = {k: v for k, v in result.items() if not k.startswith("start_")}
        self.reported = True
        self.copying_s = 0.0
        if result_kind(result) == Pause.kind:
            for key in CARRIED_KEYS:
                self.carried[key] = self.carried.get(key, 0.0) + result.get(key, 0.0)
            return
        result = {**result, **{key: result.get(key, 0.0) + self.carried.pop(key) for key in list(self.carried)}}
        # ray.tune.report returns once Tune lets the trial go on (it ends this thread otherwise).
        if self.note is None or train_checkpoint is None:
            ray.tune.report(result)
            return
        with tempfile.TemporaryDirectory() as tmp, train_checkpoint.as_directory() as source:
            copying = time.perf_counter()
            shutil.copy(Path(source) / CHECKPOINT_FILE, Path(tmp) / CHECKPOINT_FILE)
            (Path(tmp) / LINEAGE_FILE).write_text(json.dumps(self.note(result)))
            # (Tune's own copy into the sweep's storage, inside report, is not told apart from its verdict.)
            self.copying_s = time.perf_counter() - copying
            ray.tune.report(result, checkpoint=ray.tune.Checkpoint.from_directory(tmp))
