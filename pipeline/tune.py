"""Ray Tune sweep: search space from YAML, ASHA early stopping, one MLflow child run per trial.

A one-worker trial trains in the trial's own process (``trains_in_trial``): the worker's code reports each
epoch with its checkpoint straight to Tune, which keeps the checkpoints and restarts the trial after a failure.
Any other trial is a *trial driver function* (the Ray 2.60 way): it builds a TorchTrainer for its point of
the search space, named ``<sweep>-<trial id>`` so that a restored sweep continues the same Train run, and
hands each report of its ``fit()`` to Tune. The sweep has one
MLflow parent run; when it ends the parent gets the best trial's figures, parameters and samples.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import PROJECT_ROOT
from pipeline.accounting import SweepTime, TrialTime, sweep_time
from pipeline.checkpoint import FILENAME as CHECKPOINT_FILE
from pipeline.config import ConfigError, PipelineConfig, pbt_mutated_keys, with_overrides
from pipeline.distributed import (
    ElasticJob,
    InTrial,
    RunDiverged,
    StartFrom,
    WorkerJob,
    WorkerPlace,
    check_resources,
    existing_run,
    finish_from_storage,
    forward_reports,
    init_ray,
    prepare_inputs,
    register_best,
    resolve_scaling,
    run_training,
    run_worker,
    use_gpu,
    worker_resources,
)
from pipeline.elastic import Allotment, ask_allotment
from pipeline.storage import check_storage, exists, run_location
from pipeline.tracking import (
    MLflowTracker,
    Registration,
    RunRecord,
    check_tracking_uri,
    figure,
    find_run,
    resolve_tracking_uri,
    start_run,
)


def search_space(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """``tune.search_space`` as a nested Ray Tune param space: {"optim": {"lr_g": tune.loguniform(...)}}."""
    from ray import tune

    makers: dict[str, Callable[[list[Any]], Any]] = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),  # inclusive high, like the YAML reads
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    space: dict[str, dict[str, Any]] = {}
    for dotted, spec in cfg.tune.search_space.items():
        section, key = dotted.split(".")
        kind, args = next(iter(spec.items()))
        space.setdefault(section, {})[key] = makers[kind](args)
    return space


def trial_config(base: PipelineConfig, point: dict[str, Any]) -> PipelineConfig:
    """The base config with one point of the search space (dotted keys) applied, validated again."""
    return with_overrides(base, {**point, "tune.search_space": {}})


def flat_point(point: dict[str, Any]) -> dict[str, Any]:
    """Tune's nested point {"optim": {"lr_g": ...}} as dotted keys; anything else Tune adds is left out."""
    return {
        f"{section}.{key}": value
        for section, values in point.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


LINEAGE_FILE = "lineage.json"  # in each Tune checkpoint: whose Train run and MLflow run it came from


def _trial_driver(
    point: dict[str, Any],
    *,
    base: PipelineConfig,
    sweep: str,
    parent_run_id: str,
    verbose: bool = False,
    evaluators: dict[str, dict[str, Any]],
    allotment: Any = None,
) -> None:
    """One trial: a one-worker trial trains in this process (``trains_in_trial``), every report handed to Tune
    with its checkpoint; any other is a Ray Train run (data-parallel, checkpointed) whose reports Tune
    receives as they come. Every trial is scored by the sweep's evaluator of its dataset (``evaluators``:
    dataset -> payload, prepared by the sweep's driver).

    Under PBT each report also hands Tune a checkpoint (the Train checkpoint and its lineage), and a trial
    that Tune restarts from another trial's checkpoint (an exploit) goes on in a new Train run that begins
    there, logging into the trial's one MLflow run. An elastic trial (``allotment``: the sweep's
    pipeline.elastic.Allotment actor) starts with the worker count the allotment gives it and, each time its
    run stops to change size, continues the same Train run from that checkpoint with the new count."""
    import ray.tune

    cfg = trial_config(base, flat_point(point))
    trial_id = ray.tune.get_context().get_trial_id()
    uri = resolve_tracking_uri(cfg.tracking.uri, PROJECT_ROOT)
    child = find_run(uri, cfg.tracking.experiment, {"sweep": sweep, "trial_id": trial_id})
    given = ray.tune.get_checkpoint()
    name, start_from = _continuation(sweep, trial_id, given)
    # A restored (or paused) trial finds its Train run, and the MLflow child run, by name.
    resume = existing_run(cfg, name) is not None
    pbt = base.tune.scheduler == "pbt"

    def note(metrics: dict[str, Any]) -> dict[str, Any]:
        """What a Tune checkpoint says about itself: whose it is, from which Train run and MLflow run, where."""
        nonlocal child
        child = child or find_run(uri, cfg.tracking.experiment, {"sweep": sweep, "trial_id": trial_id})
        where = {"step": int(metrics["step"]), "progress": metrics.get("progress", metrics.get("epoch"))}
        return {"trial_id": trial_id, "train_run": name, "mlflow_run_id": child, **where}

    run = functools.partial(
        run_training,
        name=name,
        resume=resume,
        parent_run_id=parent_run_id,
        extra_tags={"sweep": sweep, "trial_id": trial_id},
        progress=lambda msg: print(f"[{trial_id}] {msg}"),
        verbose=verbose,
        label=trial_id,
        mlflow_run_id=child,
        start_from=start_from,
        live_keys=pbt_mutated_keys(base) if pbt else (),
        evaluator=evaluators.get(cfg.data.dataset),
    )
    try:
        if trains_in_trial(base):  # as the sweep decided when it reserved the trial's resources
            location = f"{run_location(base, sweep)}/{os.path.basename(ray.tune.get_context().get_trial_dir())}"
            # Thread-elastic (an allotment counted in threads): the trial's torch threads follow its share.
            threads = ElasticJob(allotment, trial_id, 0.0, threads=True) if allotment is not None else None
            run(cfg, in_trial=_in_trial(given if start_from is None else None, note, location), elastic=threads)
            return
        elastic, workers = None, cfg.scaling.num_workers
        if allotment is not None:
            elastic = ElasticJob(allotment, trial_id, cfg.scaling.elastic_grow_min_s)
            workers = ask_allotment(allotment, trial_id, workers)()
        started_at, carried = None, {}
        while True:
            outcome, carried = _fit_reporting(
                functools.partial(
                    run,
                    # An elastic trial's run has one size; the trial changes it between runs.
                    with_overrides(cfg, {"scaling.num_workers": workers, "scaling.max_workers": None})
                    if elastic
                    else cfg,
                    started_at=started_at,
                    elastic=elastic,
                ),
                note if pbt else None,
                carried,
            )
            if outcome is None or outcome.resize_to is None:
                break
            # The run stopped at a checkpoint to change size: the same Train run (and MLflow run) goes on.
            workers, started_at = outcome.resize_to, time.time()
            run = functools.partial(run, resume=True, start_from=None)
    except RunDiverged as exc:
        # Tune already has its last result (the worst score); the rest of the sweep goes on.
        print(f"[{trial_id}] {exc}")


def sweep_evaluators(cfg: PipelineConfig, progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The data and FID/IS evaluator of each dataset the sweep's trials may train on (``data.dataset`` may be
    searched), prepared once, here: each trial gets its dataset's evaluator through Ray's object store, so a
    trial on a node without a cached evaluator starts training at once, scored like every other trial."""
    spec = cfg.tune.search_space.get("data.dataset")
    datasets = [cfg.data.dataset] if spec is None else sorted(set(next(iter(spec.values()))))
    evaluators = {}
    for dataset in datasets:
        payload = prepare_inputs(with_overrides(cfg, {"data.dataset": dataset}), progress)
        if payload is not None:
            evaluators[dataset] = payload
    return evaluators


def trains_in_trial(cfg: PipelineConfig) -> bool:
    """A trial of one worker, not elastic, trains in its trial's own process (Tune keeps its checkpoints and
    restarts it after a failure): no Ray Train controller and worker group to start, tens of seconds each."""
    return cfg.scaling.num_workers == 1 and not cfg.scaling.max_workers


def _in_trial(restored: Any, note: Callable[[dict[str, Any]], dict[str, Any]], location: str) -> InTrial:
    """Training in this process, the trial's: :func:`run_worker` as the one worker, resuming from ``restored``
    (the trial's own Tune checkpoint, or None), each report handed to Tune with a checkpoint that carries its
    lineage (``note``); Tune's report returns once Tune lets the trial go on."""
    import ray
    import ray.tune
    import torch

    last: dict[str, Any] = {}

    def report(metrics: dict[str, Any], directory: str | None) -> None:
        last.clear()
        last.update(metrics)
        if directory is None:
            ray.tune.report(metrics)
            return
        (Path(directory) / LINEAGE_FILE).write_text(json.dumps(note(metrics)))
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory))

    def train(job: WorkerJob, gpu: bool) -> Any:
        entered = time.time()
        place = WorkerPlace(
            rank=0,
            world=1,
            local_rank=0,
            device=torch.device("cuda", 0) if gpu else torch.device("cpu"),  # Ray shows the trial its GPU as 0
            restored=restored,
            report=report,
            node_ids=lambda: [ray.get_runtime_context().get_node_id()],
            report_waits=True,
        )
        run_worker(job, place, entered)
        # Tune's session holds the latest checkpoint persisted (or the one the trial restarted from).
        return types.SimpleNamespace(metrics=dict(last), checkpoint=ray.tune.get_checkpoint())

    return InTrial(train, location)


def _continuation(sweep: str, trial_id: str, given: Any) -> tuple[str, StartFrom | None]:
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


# What a report that Tune does not see (an elastic trial's pause to change size) hands on to the next one it
# does, so that the sweep's accounting counts those steps and seconds.
CARRIED_KEYS = ("train_s", "worker_s", "checkpoint_s")


def _fit_reporting(
    fit: Callable[..., Any],
    note: Callable[[dict[str, Any]], dict[str, Any]] | None,
    carried: dict[str, float] | None = None,
) -> tuple[Any, dict[str, float]]:
    """Run ``fit`` (run_training without its callbacks and verdicts) in a thread and hand each of its reports
    to Tune from this one, the trial's, in lock-step: the run waits after each report until Tune lets it go on,
    so a stopped or paused trial trains and logs nothing past the report Tune decided on. With ``note``
    (PBT) each report carries a Tune checkpoint: the Train checkpoint's file and ``note(metrics)``, what it
    says about whose it is. A report with ``resize_to`` (an elastic trial stopping to change size) is not
    Tune's: its seconds are ``carried`` into the next report Tune gets. Ends when ``fit`` does (returning
    what it returned and what is still carried; raising what it raised) or when Tune stops the trial (Ray
    ends this thread then)."""
    import threading

    import ray.tune
    from ray.util.queue import Empty, Queue

    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    verdicts = Queue(actor_options={"num_cpus": 0})
    failure: list[BaseException] = []
    returned: list[Any] = []
    carried = dict(carried or {})

    def target() -> None:
        try:
            returned.append(fit(callbacks=[forward_reports(reports)], verdicts=verdicts))
        except BaseException as exc:  # noqa: BLE001 - raised again in the trial's thread below
            failure.append(exc)

    runner = threading.Thread(target=target, name="train-run", daemon=True)
    runner.start()
    # When Tune stops or pauses the trial, ray.tune.report ends this thread (SystemExit) and Ray then ends the
    # process, the Train run with it: the queues stay up till then, or the run would fail first (and mark its
    # MLflow run FAILED) while the trial was only stopped.
    copying_s, reported = 0.0, False
    while runner.is_alive() or not reports.empty():
        try:
            metrics, train_checkpoint = reports.get(timeout=0.5)
        except Empty:
            continue
        # The accounting's: the previous Tune checkpoint's seconds join the Train checkpoint's; a worker group
        # Train restarted after a failure says when it started too, but only this driver's first start counts.
        metrics = {**metrics, "checkpoint_s": metrics.get("checkpoint_s", 0.0) + copying_s}
        if reported:
            metrics = {k: v for k, v in metrics.items() if not k.startswith("start_")}
        reported = True
        if "resize_to" in metrics:
            for key in CARRIED_KEYS:
                carried[key] = carried.get(key, 0.0) + metrics.get(key, 0.0)
            copying_s = 0.0
            verdicts.put(True)
            continue
        metrics = {**metrics, **{key: metrics.get(key, 0.0) + carried.pop(key) for key in list(carried)}}
        # ray.tune.report returns once Tune lets the trial go on (it ends this thread otherwise).
        if note is None or train_checkpoint is None:
            ray.tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as tmp, train_checkpoint.as_directory() as source:
                copying = time.perf_counter()
                shutil.copy(Path(source) / CHECKPOINT_FILE, Path(tmp) / CHECKPOINT_FILE)
                (Path(tmp) / LINEAGE_FILE).write_text(json.dumps(note(metrics)))
                # (Tune's own copy into the sweep's storage, inside report, is not told apart from its verdict.)
                copying_s = time.perf_counter() - copying
                ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp))
        verdicts.put(True)
    reports.shutdown()
    verdicts.shutdown()
    runner.join()
    if failure:
        raise failure[0]
    return (returned[0] if returned else None), carried


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    rows: list[dict[str, Any]]  # one per trial, best first
    best: dict[str, Any] | None
    registration: Registration | None = None  # the best trial's generator in the Model Registry
    schedule: str | None = None  # PBT: the best trial's hyperparameter schedule along its lineage, a table
    exploits: int = 0  # PBT: how many times a trial continued from another's checkpoint
    time: SweepTime | None = None  # where the hardware's time went (this invocation's part of the sweep)


@dataclass(frozen=True)
class SweepClock:
    """What the accounting needs besides the trials' reports: when this invocation's fit began and how long it
    ran, the cluster's CPUs (or GPUs) and each worker's share of them."""

    started_at: float
    wall_s: float
    capacity: float
    per_worker: float

    def trial(self, result: Any) -> TrialTime:
        """A trial's reports from this invocation (a resumed sweep counts the part it ran)."""
        frame = result.metrics_dataframe
        if frame is None or "timestamp" not in frame:
            return TrialTime.of([])
        return TrialTime.of(frame[frame["timestamp"] >= int(self.started_at)].to_dict("records"))


def _workers_that_fit(cfg: PipelineConfig, gpu: bool) -> int:
    """How many workers the cluster holds at once: its CPUs (and GPUs) over each worker's share."""
    import ray

    resources = ray.cluster_resources()
    workers = int(resources.get("CPU", 0) // cfg.scaling.cpus_per_worker)
    if gpu:
        workers = min(workers, int(resources.get("GPU", 0) / cfg.scaling.gpus_per_worker + 1e-9))  # 1 / 0.25: 4
    return workers


def _default_concurrency(cfg: PipelineConfig, gpu: bool) -> int:
    return max(1, _workers_that_fit(cfg, gpu) // cfg.scaling.num_workers)


def _expected_trials(cfg: PipelineConfig) -> int:
    """Trials the sweep will run: num_samples, times every grid axis's length."""
    grids = [len(spec["grid"]) for spec in cfg.tune.search_space.values() if "grid" in spec]
    return cfg.tune.num_samples * math.prod(grids)


def elastic_shares(actor_name: str, expected: int) -> Any:
    """A Tune callback that tells the sweep's allotment (the actor named ``actor_name``), whenever it changes,
    which trials run (oldest first) and how many wait for a start (pending or paused ones, and those the search
    has not drawn yet). It keeps the actor's name, not its handle: Tune pickles callbacks into the sweep's
    state, and a resumed sweep's driver starts a new actor under the same name."""
    from ray.tune import Callback

    class ElasticShares(Callback):
        def __init__(self) -> None:
            self.told: tuple[tuple[str, ...], int] | None = None
            self.actor: Any = None

        def __getstate__(self) -> dict[str, Any]:
            return {"told": None, "actor": None}

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            import ray

            running = tuple(t.trial_id for t in trials if t.status == "RUNNING")
            waiting = sum(t.status in ("PENDING", "PAUSED") for t in trials) + max(0, expected - len(trials))
            if (running, waiting) != self.told:
                self.told = (running, waiting)
                self.actor = self.actor or ray.get_actor(actor_name)
                self.actor.update.remote(list(running), waiting)

    return ElasticShares()


def _check_sweep(cfg: PipelineConfig) -> None:
    if not cfg.tune.search_space:
        raise ConfigError(
            "tune.search_space: empty; give at least one key, e.g. optim.lr_g: {loguniform: [1.0e-5, 1.0e-2]}"
        )
    if cfg.eval.every_epochs != 1:
        raise ConfigError(
            f"eval.every_epochs: {cfg.eval.every_epochs}; a sweep on {cfg.tune.metric} needs it every epoch "
            "(ASHA compares trials at each epoch); set eval.every_epochs=1"
        )
    if cfg.tune.scheduler == "pbt" and cfg.tune.num_samples < 2:
        raise ConfigError(
            f"tune.num_samples: {cfg.tune.num_samples} with tune.scheduler=pbt; PBT evolves a population: use at "
            "least 2 trials (4 or more lets a quarter copy the best quarter)"
        )
    expected_mode = "min" if cfg.tune.metric == "fid" else "max"
    if cfg.tune.mode != expected_mode:
        raise ConfigError(f"tune.mode: {cfg.tune.mode} with tune.metric={cfg.tune.metric}; use {expected_mode}")


SWEEP_STATE_SYNC_S = 10


def print_line(line: str) -> None:
    """A line to stdout. Tune pickles the callbacks that print, and pickling ``print`` itself fails once Ray's
    tqdm_ray has replaced builtins.print (it does on the first worker line the driver shows): a sweep under
    `ray job submit` failed with "Can't pickle <built-in function print>"; a module's function pickles by name."""
    print(line, flush=True)


def run_sweep(
    cfg: PipelineConfig, name: str, *, resume: bool = False, progress=None, verbose: bool = False
) -> SweepOutcome:
    """Run (or, with ``resume``, finish) the sweep ``name``; return its trials table. ``progress`` gets each line
    for the console (default: stdout)."""
    import ray.tune

    progress = progress or print_line

    _check_sweep(cfg)
    sweep_dir = run_location(cfg, name)
    uri = resolve_tracking_uri(cfg.tracking.uri, PROJECT_ROOT)
    check_tracking_uri(uri)
    check_storage(cfg)
    parent_run_id = find_run(uri, cfg.tracking.experiment, {"kind": "sweep", "sweep": name})
    if resume and (parent_run_id is None or not ray.tune.Tuner.can_restore(sweep_dir)):
        raise ConfigError(
            f"--resume {name}: nothing to resume, no sweep {name!r} in {sweep_dir} and the MLflow store {uri}; "
            "check the name and tracking.uri, or drop --resume"
        )
    if not resume and (parent_run_id is not None or exists(sweep_dir)):
        raise ConfigError(f"sweep {name!r} already exists ({sweep_dir}); pass --resume {name} or choose a new name")
    # Trials run on other nodes, whose environment may not hold $MLFLOW_TRACKING_URI: they get the store the
    # driver resolved, or their runs would land in a local store on their node, not under the parent.
    cfg = with_overrides(resolve_scaling(cfg, sweep=True), {"tracking.uri": uri})
    check_resources(cfg)
    evaluators = sweep_evaluators(cfg, progress)

    if parent_run_id is None:
        parent_run_id = start_run(
            uri,
            cfg.tracking.experiment,
            name,
            {
                "sweep": name,
                "search_space": json.dumps(cfg.tune.search_space, sort_keys=True),
                "kind": "sweep",
                "scheduler": cfg.tune.scheduler,
            },
        )
    parent = MLflowTracker(uri, parent_run_id)
    if resume:
        parent.reopen()

    init_ray(verbose)
    gpu = use_gpu(cfg)
    concurrency = cfg.tune.max_concurrent_trials or _default_concurrency(cfg, gpu)
    stopping = _describe_scheduler(cfg)
    progress(
        f"[tune] sweep {name!r}: {cfg.tune.num_samples} sample(s) of {len(cfg.tune.search_space)} searched key(s), "
        f"up to {concurrency} at once, {stopping}; trials and sweep state in {sweep_dir}; MLflow parent run "
        f"{parent_run_id} at {uri}"
    )
    callbacks = [close_child_runs(uri, cfg.tracking.experiment, name, cfg.train.epochs), sweep_status(cfg, progress)]
    in_trial = trains_in_trial(cfg)
    threads = bool(cfg.scaling.max_cpus_per_worker) and in_trial and not gpu
    allotment = None
    if cfg.scaling.max_workers or threads:
        # Elastic trials (pipeline.elastic): the allotment, owned by this driver, holds each running trial's
        # worker (or thread) count; Tune's side keeps it told which trials run and how many wait.
        import ray

        if threads:
            low, high = cfg.scaling.cpus_per_worker, cfg.scaling.max_cpus_per_worker
            node_cpus = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]}
            capacity, unit = sum(node_cpus.values()), "thread(s) (CPUs of its node)"
        else:
            low, high, node_cpus = cfg.scaling.num_workers, cfg.scaling.max_workers, None
            capacity, unit = max(_workers_that_fit(cfg, gpu), cfg.scaling.num_workers), "worker(s)"
        # Named: a resumed sweep's restored callback (Tune restores callbacks, not only trials) finds the new one.
        actor_name = f"pipeline-allotment-{name}"
        allotment = ray.remote(num_cpus=0)(Allotment).options(name=actor_name).remote(capacity, low, high, node_cpus)
        callbacks.append(elastic_shares(actor_name, _expected_trials(cfg)))
        progress(
            f"[tune] elastic trials: {low} to {high} {unit} each, {capacity} in all; a trial grows when no trial "
            "waits to start and shrinks when one does"
        )
    elif cfg.scaling.max_cpus_per_worker:  # the config allows it for one-worker trials only: these are on GPUs
        progress(f"[tune] GPU trials keep {cfg.scaling.cpus_per_worker} CPU(s) each (max_cpus_per_worker: unused)")
    # Through Ray's object store (the evaluator is megabytes), to a trainable still named _trial_driver (the
    # name a sweep's resume must find again).
    driver = ray.tune.with_parameters(
        _trial_driver,
        base=cfg,
        sweep=name,
        parent_run_id=parent_run_id,
        verbose=verbose,
        allotment=allotment,
        evaluators=evaluators,
    )
    # A trial that trains in its own process holds what its one worker would; a Train run's driver only waits
    # on fit(): it reserves no CPU, or it would starve its own workers.
    resources = worker_resources(cfg, gpu) if in_trial else {"CPU": 0, "memory": 1}
    trainable = ray.tune.with_resources(driver, resources)
    if resume:
        tuner = ray.tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        search_alg = make_search_alg(cfg)
        random.seed(cfg.train.seed)  # PBT's donor and perturbation choices
        # A function trainable cannot take a new config in place: PBT restarts a copied trial (as it must).
        warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
        tuner = ray.tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=ray.tune.TuneConfig(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                scheduler=make_scheduler(cfg),
                search_alg=search_alg,
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=concurrency,
            ),
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=sweep_dir.rsplit("/", 1)[0],
                # The sweep's state (a few kB) reaches remote storage every 10 s, not Ray's default 5 min: a
                # driver killed before then would leave a state without its trials to --resume from.
                sync_config=ray.tune.SyncConfig(sync_period=SWEEP_STATE_SYNC_S),
                # The best by FID and, always, the latest (PBT copies a trial's latest checkpoint; Ray warns about
                # deleting too early at 2 or fewer), as a Train run keeps its own.
                checkpoint_config=ray.tune.CheckpointConfig(
                    num_to_keep=max(3, cfg.train.keep_checkpoints),
                    checkpoint_score_attribute=cfg.tune.metric,
                    checkpoint_score_order=cfg.tune.mode,
                ),
                # A trial trained in its own process is retried from its latest checkpoint by Tune (a Train run
                # retries its worker group itself).
                failure_config=ray.tune.FailureConfig(max_failures=cfg.train.max_failures if in_trial else 0),
                callbacks=callbacks,
                # Ray's own status table reprints every 30 s, changed or not (not configurable): ours below
                # prints when a trial starts, reports or ends; --verbose brings Ray's back as well.
                verbose=1 if verbose else 0,
            ),
        )
    fit_started = time.time()
    results = tuner.fit()
    capacity = ray.cluster_resources().get("GPU" if gpu else "CPU", 0.0)
    per_worker = cfg.scaling.gpus_per_worker if gpu else cfg.scaling.cpus_per_worker
    clock = SweepClock(fit_started, time.time() - fit_started, capacity, per_worker)
    return summarise(cfg, name, parent, results, clock)


def make_search_alg(cfg: PipelineConfig) -> Any:
    """The sweep's search algorithm (None: Tune's own random search), its draws seeded by ``train.seed``: the
    same seed draws the same trials. Tune's random search draws from numpy's global generator (``random.seed``
    does not reach it), seeded here; PBT's resampling draws from it too."""
    np.random.seed(cfg.train.seed)
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.train.seed)
    return None


def _describe_scheduler(cfg: PipelineConfig) -> str:
    tune = cfg.tune
    if tune.scheduler == "pbt":
        return (
            f"PBT on {tune.metric} ({tune.mode}) every {tune.pbt_interval:g} epoch(s), the bottom "
            f"{tune.pbt_quantile:g} copying the top and perturbing {', '.join(pbt_mutated_keys(cfg))}"
        )
    if tune.scheduler == "asha" and tune.grace_period < cfg.train.epochs:
        return f"ASHA on {tune.metric} ({tune.mode}) from epoch {tune.grace_period}"
    if tune.scheduler == "asha":
        return f"no early stopping (tune.grace_period {tune.grace_period} >= train.epochs {cfg.train.epochs})"
    return "no early stopping (tune.scheduler none)"


def close_child_runs(uri: str, experiment: str, sweep: str, final_epoch: int) -> Any:
    """A Tune callback that ends each trial's MLflow child run when the trial ends, so its duration is the
    trial's: an early-stopped trial's run ends KILLED (tag ``status=early_stopped``), an errored one FAILED, a
    completed one is ended by its own driver. The end time is also kept as the tag ``trial_end_ms``, which the
    summary at the end of the sweep reuses whenever it ends a run again."""
    from ray.tune import Callback

    class CloseChildRuns(Callback):
        def _close(self, trial: Any, status: str | None, tag: str | None) -> None:
            run_id = find_run(uri, experiment, {"sweep": sweep, "trial_id": trial.trial_id})
            if run_id is None:
                return
            now = int(time.time() * 1000)
            run = MLflowTracker(uri, run_id)
            run.set_tags({"trial_end_ms": str(now), **({"status": tag} if tag else {})})
            if status is not None:
                run.end(status, end_time_ms=now)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if ended_status(trial.last_result or {}, final_epoch) == "early_stopped":
                self._close(trial, "KILLED", "early_stopped")
            else:
                self._close(trial, None, None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._close(trial, "FAILED", "failed")

    return CloseChildRuns()


STATUS_MIN_GAP_S = 15.0


def sweep_status(cfg: PipelineConfig, progress: Callable[[str], None]) -> Any:
    """A Tune callback that prints the sweep's trials table (the final table's columns) when a trial starts,
    reports an epoch or ends, at most once every STATUS_MIN_GAP_S seconds (changes in between are printed
    together), and says where a failed trial's error is."""
    from ray.tune import Callback

    searched, metric = list(cfg.tune.search_space), cfg.tune.metric

    class SweepStatus(Callback):
        def __init__(self) -> None:
            self.started = time.monotonic()
            self.last_print = float("-inf")
            self.changed = False

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.changed = True

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.changed = True

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.changed = True

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.changed = True
            progress(f"[tune] trial {trial.trial_id} failed; its error: {trial.error_file}")

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if self.changed and time.monotonic() - self.last_print >= STATUS_MIN_GAP_S:
                self.changed, self.last_print = False, time.monotonic()
                rows = best_first(cfg, [live_row(cfg, trial, searched) for trial in trials])
                elapsed = int(time.monotonic() - self.started)
                counts = collections.Counter(r["status"] for r in rows)
                line = f"[tune] {elapsed // 60} min {elapsed % 60:02d} s: " + ", ".join(
                    f"{n} {status}" for status, n in sorted(counts.items())
                )
                if rows and rows[0][metric] is not None:
                    line += f"; best {metric} {rows[0][metric]:.3f} ({rows[0]['trial_id']})"
                progress(line)
                progress(format_rows(rows, searched))

    return SweepStatus()


def best_first(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials table rows, the best score first and those without a score last."""
    sign = 1 if cfg.tune.mode == "min" else -1
    metric = cfg.tune.metric
    scored = sorted((r for r in rows if r[metric] is not None), key=lambda r: sign * r[metric])
    return scored + [r for r in rows if r[metric] is None]


def ended_status(last: dict[str, Any], final_epoch: int) -> str:
    """How a trial that ended without an error ended, from its last result."""
    if last.get("diverged"):
        return "diverged"
    return "finished" if int(last.get("epoch", 0)) >= final_epoch else "early_stopped"


def trial_row(
    trial_id: str | None, status: str, last: dict[str, Any], config: dict[str, Any], searched: list[str]
) -> dict[str, Any]:
    """One line of the trials table: the trial, how it stands, its last scores and its (current) point."""
    point = flat_point(config or {})
    return {
        "trial_id": trial_id,
        "status": status,
        "epochs": int(last.get("epoch", 0)),
        "fid": last.get("fid"),
        "inception_score": last.get("inception_score"),
        **{key: point.get(key) for key in searched},
    }


def live_row(cfg: PipelineConfig, trial: Any, searched: list[str]) -> dict[str, Any]:
    """A running sweep's trial as a row of the trials table."""
    last = trial.last_result or {}
    status = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "ERROR": "failed"}.get(trial.status)
    return trial_row(trial.trial_id, status or ended_status(last, cfg.train.epochs), last, trial.config, searched)


def make_scheduler(cfg: PipelineConfig) -> Any:
    """``tune.scheduler`` as a Tune scheduler on our ``progress`` (epochs trained, a fraction between the
    reports inside an epoch; it survives a restored trial), never stopping or pausing a trial at its final
    report: None for ``none`` (Tune's FIFO), else ASHA or PBT.

    Plain ASHA stops a trial at ``max_t`` and may have a rung on the last epoch (grace_period 3 of 3 epochs,
    say); PBT may pause a trial there to copy another into it. Either saves no compute, the training is
    done, but would end the trial's driver in the middle of the final logging (generator model, last
    checkpoint). So results of the final epoch always pass; ``on_trial_complete`` still records them. A
    grace period at or past the last epoch means no early stopping at all (ASHA itself refuses
    ``grace_period > max_t``).
    """
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining, TrialScheduler

    if cfg.tune.scheduler == "none":
        return None
    final_epoch = cfg.train.epochs
    base = PopulationBasedTraining if cfg.tune.scheduler == "pbt" else ASHAScheduler

    class FinalReportPasses(base):  # type: ignore[valid-type, misc]
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            if result.get("progress", 0) >= final_epoch:
                return TrialScheduler.CONTINUE
            exploits = getattr(self, "_num_perturbations", 0)
            decision = super().on_trial_result(WithoutFailedTrials(tune_controller), trial, result)
            if getattr(self, "_num_perturbations", 0) != exploits:
                # PBT gave a trial another's checkpoint and config: into the sweep's state now, not at Tune's
                # next periodic save, so a driver killed in between resumes the copy it began.
                tune_controller.checkpoint(force=True, wait=True)
            return decision

    if cfg.tune.scheduler == "pbt":
        return FinalReportPasses(**pbt_options(cfg))
    return FinalReportPasses(
        time_attr="progress",
        max_t=final_epoch,
        grace_period=min(cfg.tune.grace_period, final_epoch),
        reduction_factor=cfg.tune.reduction_factor,
    )


class WithoutFailedTrials:
    """Tune's controller as a scheduler sees it, minus the trials that failed. Ray 2.60 keeps a failed trial
    among the "live" ones, and synchronous PBT waits for every live trial to reach the next decision point:
    one failed trial would hang the sweep (every other trial paused, none chosen to run)."""

    def __init__(self, controller: Any):
        self._controller = controller

    def get_live_trials(self) -> set[Any]:
        return {t for t in self._controller.get_live_trials() if t.status != "ERROR"}

    def get_trials(self) -> list[Any]:
        return [t for t in self._controller.get_trials() if t.status != "ERROR"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._controller, name)


def pbt_options(cfg: PipelineConfig) -> dict[str, Any]:
    """Ray's PopulationBasedTraining, synchronous: every trial reaches a decision point before the bottom
    quantile copies the top one, so a copy continues at the step its trial left (no MLflow step twice, no
    step skipped). A perturbed number is multiplied by one of ``tune.pbt_factors`` and clipped to its search
    range, or (``tune.pbt_resample_probability``) drawn afresh from it; a choice moves to a neighbour."""
    space = search_space(cfg)
    mutations: dict[str, dict[str, Any]] = {}
    bounds: dict[tuple[str, str], tuple[float, float]] = {}
    for dotted in pbt_mutated_keys(cfg):
        section, key = dotted.split(".")
        kind, args = next(iter(cfg.tune.search_space[dotted].items()))
        mutations.setdefault(section, {})[key] = list(args) if kind in ("choice", "grid") else space[section][key]
        if kind not in ("choice", "grid"):
            bounds[(section, key)] = (args[0], args[1])

    def clip(config: dict[str, Any]) -> dict[str, Any]:
        for (section, key), (low, high) in bounds.items():
            config[section][key] = type(config[section][key])(min(max(config[section][key], low), high))
        return config

    return {
        "time_attr": "progress",
        "perturbation_interval": cfg.tune.pbt_interval,
        "hyperparam_mutations": mutations,
        "quantile_fraction": cfg.tune.pbt_quantile,
        "resample_probability": cfg.tune.pbt_resample_probability,
        "perturbation_factors": tuple(cfg.tune.pbt_factors),
        "custom_explore_fn": clip,
        "synch": True,
    }


def summarise(cfg: PipelineConfig, name: str, parent: MLflowTracker, results: Any, clock: SweepClock) -> SweepOutcome:
    """Close each child run as its trial ended; give the parent the best trial's figures and plots, and
    where the hardware's time went."""
    children = {child.tags.get("trial_id"): child for child in parent.children()}
    searched = list(cfg.tune.search_space)
    rows, times = [], []
    for result in results:
        child = children.get(_trial_id(result))
        times.append(clock.trial(result))
        row = _trial_row(cfg, result, child, searched)
        row.update(train_s=times[-1].worker_s, start_s=times[-1].start_median_s)
        rows.append(row)
        if child is not None:
            _close_child(cfg, result, child, row["status"], parent.uri)
    spent = sweep_time(times, clock.wall_s, clock.capacity, clock.per_worker)
    parent.log_metrics(spent.metrics(), step=0)
    parent.flush()
    rows = best_first(cfg, rows)
    scored = [r for r in rows if r[cfg.tune.metric] is not None]
    best = scored[0] if scored else None
    if best is not None:
        _log_best(cfg, parent, best, rows, searched)
    schedule, exploits = None, 0
    if cfg.tune.scheduler == "pbt":
        exploits = sum(len(_exploits(child.tags)) for child in children.values() if child is not None)
        parent.log_metrics({"pbt_exploits": exploits}, step=0)
        parent.flush()
        if best is not None and best["run_id"]:
            schedule = _log_pbt_schedule(cfg, parent, best)
    registration = _register_best_generator(cfg, parent.uri, scored, searched)
    parent.set_tags({"status": "finished"})
    parent.end("FINISHED")
    return SweepOutcome(name, parent.run_id, parent.uri, rows, best, registration, schedule, exploits, spent)


@dataclass(frozen=True)
class Segment:
    """A stretch of training in one trial's run: steps after ``after`` up to ``until`` (None: the run's end)."""

    trial_id: str
    run_id: str
    after: int
    until: int | None

    def within(self, history: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """The (step, value) points of a metric's history that fall in this stretch, in order."""
        return [
            (step, value)
            for step, value in sorted(history)
            if step > self.after and (self.until is None or step <= self.until)
        ]


def _exploits(tags: dict[str, str]) -> list[dict[str, Any]]:
    """A trial's exploits as its run's tags record them (pbt.exploit.step_<step>), oldest first."""
    records = [json.loads(value) for key, value in tags.items() if key.startswith("pbt.exploit.step_")]
    return sorted(records, key=lambda record: record["step"])


def lineage(uri: str, trial_id: str, run_id: str, until: int | None = None) -> list[Segment]:
    """The runs whose training made ``run_id``'s weights at step ``until`` (None: its last), oldest first:
    before its last exploit up to then they are its donor's, and so on back to a trial's first step."""
    earlier = [r for r in _exploits(MLflowTracker(uri, run_id).tags()) if until is None or r["step"] <= until]
    if not earlier:
        return [Segment(trial_id, run_id, 0, until)]
    last = earlier[-1]
    before = lineage(uri, last["donor_trial"], last["donor_run_id"], last["step"])
    if until is not None and last["step"] >= until:
        return before
    return [*before, Segment(trial_id, run_id, last["step"], until)]


def _log_pbt_schedule(cfg: PipelineConfig, parent: MLflowTracker, best: dict[str, Any]) -> str:
    """The best trial's hyperparameters along its lineage, as ``plots/pbt_schedule.png`` and the table
    ``pbt_schedule.md`` on the parent run; returns the table."""
    keys = [dotted.split(".")[1] for dotted in pbt_mutated_keys(cfg)]
    segments = lineage(parent.uri, best["trial_id"], best["run_id"])
    lines = [
        "| steps | trial | " + " | ".join(keys) + f" | {cfg.tune.metric} at the end |",
        "|" + "---|" * (len(keys) + 3),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pbt_schedule.png")
        with figure(path, "global step", "value (log scale)") as ax:
            for n, seg in enumerate(segments):
                run = MLflowTracker(parent.uri, seg.run_id)
                firsts = []
                for key in keys:
                    points = seg.within(run.metric_history(key))
                    firsts.append(f"{points[0][1]:.3g}" if points else "-")
                    if points:
                        ax.plot(
                            *zip(*points, strict=True),
                            marker="o",
                            color=f"C{keys.index(key)}",
                            label=key if n == 0 else None,
                        )
                if n:
                    ax.axvline(seg.after, color="grey", linestyle="--")
                    ax.annotate(
                        f"from {seg.trial_id}",
                        (seg.after, 1),
                        xycoords=("data", "axes fraction"),
                        fontsize=7,
                        rotation=90,
                        va="top",
                    )
                scores = seg.within(run.metric_history(cfg.tune.metric))
                end = f"{scores[-1][1]:.3f}" if scores else "-"
                span = f"{seg.after}-{seg.until if seg.until is not None else 'end'}"
                lines.append(f"| {span} | {seg.trial_id} | " + " | ".join(firsts) + f" | {end} |")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        table = "\n".join(lines)
        Path(tmp, "pbt_schedule.md").write_text(table + "\n")
        parent.log_artifact(path, "plots")
        parent.log_artifact(os.path.join(tmp, "pbt_schedule.md"))
    return table


def _register_best_generator(
    cfg: PipelineConfig, uri: str, scored: list[dict[str, Any]], searched: list[str]
) -> Registration | None:
    """Register the generator of the best trial that logged one (a trial stopped early logged none)."""
    for row in scored:
        model_uri = MLflowTracker(uri, row["run_id"]).tags().get("generator_model") if row["run_id"] else None
        if model_uri:
            return register_best(trial_config(cfg, {key: row[key] for key in searched}), uri, row["run_id"], model_uri)
    return None


def _trial_id(result: Any) -> str | None:
    """The trial's id: from its last metrics, else from its directory's name (a trial that never reported)."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename(result.path or ""))
    return (result.metrics or {}).get("trial_id") or (found.group(1) if found else None)


def _trial_row(cfg: PipelineConfig, result: Any, child: RunRecord | None, searched: list[str]) -> dict[str, Any]:
    """A finished sweep's trial as a row of the trials table, with its MLflow run."""
    metrics = result.metrics or {}
    if child is not None and child.tags.get("status") == "diverged":
        status = "diverged"
    elif result.error is not None:
        status = "failed"
    else:
        status = ended_status(metrics, cfg.train.epochs)
    row = trial_row(_trial_id(result), status, metrics, result.config, searched)
    return {"run_id": child.run_id if child else None, **row}


def _close_child(cfg: PipelineConfig, result: Any, child: RunRecord, status: str, uri: str) -> None:
    """End a trial's MLflow run with the status Tune gave the trial.

    Tune's verdict is the one that counts: a driver that Tune stopped may have seen its fit() fail on the way
    out and marked its run FAILED; the trial itself did not fail.
    """
    run = MLflowTracker(uri, child.run_id)
    ended = int(child.tags["trial_end_ms"]) if child.tags.get("trial_end_ms", "").isdigit() else None
    if status == "finished" and child.status != "FINISHED":
        # Training complete, final logging not (its driver ended first): do that logging here.
        train_run = child.tags.get("ray_train_run", "")
        in_trial = result if child.tags.get("trained_in") == "trial process" else None  # Tune's checkpoint
        finish_from_storage(trial_config(cfg, flat_point(result.config or {})), train_run, uri, run.run_id, in_trial)
        if ended is not None:
            run.end("FINISHED", end_time_ms=ended)  # when the trial ended, not now
    elif status == "early_stopped":
        run.set_tags({"status": status})
        if child.status != "KILLED":
            run.end("KILLED", end_time_ms=ended)
    elif status == "failed":
        run.set_tags({"status": status})
        if child.status == "RUNNING":
            run.end("FAILED", end_time_ms=ended)


def _log_best(
    cfg: PipelineConfig, parent: MLflowTracker, best: dict[str, Any], rows: list[dict[str, Any]], searched: list[str]
) -> None:
    parent.log_metrics(
        {"best_fid": best["fid"] or float("nan"), "best_inception_score": best["inception_score"] or float("nan")},
        step=0,
    )
    parent.flush()
    parent.log_params({f"best_{key.split('.')[1]}": best[key] for key in searched})
    parent.set_tags({"best_run_id": best["run_id"] or "", "best_trial_id": best["trial_id"] or ""})
    with tempfile.TemporaryDirectory() as tmp:
        best_run = MLflowTracker(parent.uri, best["run_id"]) if best["run_id"] else None
        grid = best_run.download_last_artifact("samples", tmp) if best_run else None
        if grid is not None:
            final = os.path.join(tmp, "best_trial_samples.png")
            os.replace(grid, final)
            parent.log_artifact(final)
        _plot_sweep(parent.uri, rows, searched, cfg.tune.metric, tmp)
        for plot in sorted(Path(tmp).glob("*.png")):
            if plot.name != "best_trial_samples.png":
                parent.log_artifact(str(plot), "plots")


def _plot_sweep(uri: str, rows: list[dict[str, Any]], searched: list[str], metric: str, out: str) -> None:
    """The final metric against each searched key, and every trial's metric curve, as PNGs in ``out``."""
    for key in searched:
        points = [(r[key], r[metric]) for r in rows if r[metric] is not None and r[key] is not None]
        path = os.path.join(out, f"{metric}_vs_{key.replace('.', '_')}.png")
        with figure(path, key, f"final {metric}", size=(6, 4)) as ax:
            ax.scatter([p[0] for p in points], [p[1] for p in points])
            if key.startswith("optim.lr") and all(isinstance(p[0], int | float) and p[0] > 0 for p in points):
                ax.set_xscale("log")
    with figure(os.path.join(out, f"{metric}_curves.png"), "global step", metric) as ax:
        for r in rows:
            history = sorted(MLflowTracker(uri, r["run_id"]).metric_history(metric)) if r["run_id"] else []
            if history:
                steps, values = zip(*history, strict=True)
                ax.plot(steps, values, marker="o", label=f"{r['trial_id']} ({r['status']})")
        ax.legend(fontsize=7)


def format_table(outcome: SweepOutcome, searched: list[str]) -> str:
    """The trials as a markdown table, best first."""
    return format_rows(outcome.rows, searched)


def format_rows(rows: list[dict[str, Any]], searched: list[str]) -> str:
    """Trials table rows as a markdown table."""
    timed = any("train_s" in r for r in rows)  # a finished sweep's table: where each trial's time went
    head = ["trial", *searched, "epochs", "FID", "IS", "status", *(["train s", "start s"] if timed else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.3f}"
        return str(value)

    for r in rows:
        cells = [
            r["trial_id"],
            *(fmt(r[k]) for k in searched),
            str(r["epochs"]),
            fmt(r["fid"]),
            fmt(r["inception_score"]),
            r["status"],
            *([f"{r['train_s']:.0f}", fmt(r["start_s"])] if timed else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_sweep_name(cfg: PipelineConfig) -> str:
    return cfg.tune.name or f"{cfg.data.dataset}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
