"""A Ray Tune sweep (`run_sweep`): one trial per point of ``tune.search_space``, one MLflow parent run with a child
run per trial, the scheduler its registry entry makes (pipeline.sweep.schedulers).

The sweep's driver checks everything, prepares the evaluator of each dataset its trials may train on (handed to
every trial through Ray's object store), opens the parent run, sizes the sweep to the cluster, wires elastic
trials to their allotment, and runs Tune; each trial is pipeline.sweep.trial's `_trial_driver`; the live table and
the end-of-sweep summary are pipeline.sweep.report's.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline import PROJECT_ROOT
from pipeline.config.load import with_overrides
from pipeline.config.schema import PipelineConfig
from pipeline.core.errors import ConfigError
from pipeline.core.uris import resolve_tracking_uri, run_name_problem
from pipeline.data.kinds import source_of
from pipeline.distributed.elastic import Allotment
from pipeline.distributed.prepare import prepare_inputs
from pipeline.distributed.ray_runtime import init_ray
from pipeline.distributed.resources import check_resources, resolve_scaling, use_gpu, worker_resources
from pipeline.distributed.storage import check_storage, exists, run_location, storage_root
from pipeline.sweep.checks import check_sweep
from pipeline.sweep.report import (
    SweepClock,
    SweepOutcome,
    SweepStoreFailed,
    close_child_runs,
    print_line,
    summarise,
    sweep_status,
)
from pipeline.sweep.schedulers import ranking, scheduler_of
from pipeline.sweep.search_space import spec_kind, trial_count, tune_space
from pipeline.sweep.trial import TrialSetup, _trial_driver, trains_in_trial
from pipeline.sweep.tune_internals import credentials_out_of_runtime_env
from pipeline.tracking.store import check_tracking_uri, find_run, start_run
from pipeline.tracking.tracker import MLflowTracker, tracker_for

SWEEP_STATE_SYNC_S = 10


def run_sweep(
    cfg: PipelineConfig, name: str, *, resume: bool = False, progress=None, verbose: bool = False
) -> SweepOutcome:
    """Run (or, with ``resume``, finish) the sweep ``name``; return its trials table. ``progress`` gets each line
    for the console (default: stdout)."""
    problem = run_name_problem(name, "--name")
    if problem:
        raise ConfigError(problem.replace("cannot name a run", "cannot name a sweep"))
    import ray
    import ray.tune

    progress = progress or print_line
    check_sweep(cfg)
    uri = resolve_tracking_uri(cfg.tracking.uri, PROJECT_ROOT)
    parent_run_id = _check_name(cfg, name, uri, resume)
    # Trials run on other nodes, whose environment may not hold $MLFLOW_TRACKING_URI: they get the store the
    # driver resolved, or their runs would land in a local store on their node, not under the parent.
    cfg = with_overrides(resolve_scaling(cfg, sweep=True), {"tracking.uri": uri})
    check_resources(cfg)
    evaluators = sweep_evaluators(cfg, uri, progress, verbose)
    parent = _parent_run(cfg, name, uri, parent_run_id, resume)

    init_ray(verbose)
    credentials_out_of_runtime_env()
    gpu = use_gpu(cfg)
    concurrency = cfg.tune.max_concurrent_trials or _default_concurrency(cfg, gpu)
    sweep_dir = run_location(cfg, name)
    progress(
        f"[tune] sweep {name!r}: {cfg.tune.num_samples} sample(s) of {len(cfg.tune.search_space)} searched key(s), "
        f"up to {concurrency} at once, {scheduler_of(cfg).describe(cfg)}; trials and sweep state in {sweep_dir}; "
        f"MLflow parent run {parent.run_id} at {uri}"
    )
    callbacks = [close_child_runs(uri, cfg.tracking.experiment, name, cfg.train.epochs), sweep_status(cfg, progress)]
    in_trial = trains_in_trial(cfg)
    allotment = _elastic_allotment(cfg, name, gpu, callbacks, progress)
    # Through Ray's object store (the evaluator is megabytes), to a trainable still named _trial_driver (the
    # name a sweep's resume must find again).
    setup = TrialSetup(cfg, name, parent.run_id, evaluators, allotment, verbose)
    driver = ray.tune.with_parameters(_trial_driver, setup=setup)
    # A trial that trains in its own process holds what its one worker would; a Train run's driver only waits
    # on fit(): it reserves no CPU, or it would starve its own workers.
    trainable = ray.tune.with_resources(driver, worker_resources(cfg, gpu) if in_trial else {"CPU": 0, "memory": 1})
    if resume:
        tuner = ray.tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(cfg, name, trainable, concurrency, callbacks, verbose)
    fit_started = time.time()
    try:
        results = tuner.fit()
    except Exception as exc:
        stopped = _cause(exc, SweepStoreFailed)
        if stopped is None:
            raise
        raise SweepStoreFailed(f"{stopped}; {_fail_runs(uri, cfg.tracking.experiment, name, parent)}") from None
    capacity = ray.cluster_resources().get("GPU" if gpu else "CPU", 0.0)
    per_worker = cfg.scaling.gpus_per_worker if gpu else cfg.scaling.cpus_per_worker
    clock = SweepClock(fit_started, time.time() - fit_started, capacity, per_worker)
    return summarise(cfg, name, parent, results, clock)


def _cause(exc: BaseException | None, kind: type[Exception]) -> Exception | None:
    """The first exception of type ``kind`` in ``exc``'s chain (Tune wraps what its callbacks raise)."""
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__cause__ or exc.__context__
    return exc


def _fail_runs(uri: str, experiment: str, name: str, parent: MLflowTracker) -> str:
    """The sweep's parent run and its running child runs ended FAILED, where the store still answers; what to do."""
    resume = f"once it works, finish the sweep with --name {name} --resume"
    try:
        for child in parent.children():
            if child.status == "RUNNING":
                parent.run(child.run_id).end("FAILED")
        parent.set_tags({"status": "failed"})
        parent.end("FAILED")
    except Exception:  # noqa: BLE001 - the store that failed may still be down
        return f"its MLflow runs could not be marked FAILED (the store is down); {resume}"
    return f"its MLflow runs are marked FAILED; {resume}"


def _check_name(cfg: PipelineConfig, name: str, uri: str, resume: bool) -> str | None:
    """The sweep's storage and tracking store are usable, and ``name`` is a sweep to resume (``resume``) or a
    new one; returns the parent run a resumed sweep has."""
    import ray.tune

    sweep_dir = run_location(cfg, name)
    check_tracking_uri(uri, cfg.tracking.experiment)
    check_storage(cfg)
    parent_run_id = find_run(uri, cfg.tracking.experiment, {"kind": "sweep", "sweep": name})
    if resume and (parent_run_id is None or not ray.tune.Tuner.can_restore(sweep_dir)):
        raise ConfigError(
            f"--resume {name}: nothing to resume, no sweep {name!r} in {sweep_dir} and the MLflow store {uri}; "
            "check the name and tracking.uri, or drop --resume"
        )
    if not resume and (parent_run_id is not None or exists(sweep_dir)):
        raise ConfigError(f"sweep {name!r} already exists ({sweep_dir}); pass --resume {name} or choose a new name")
    return parent_run_id


def _parent_run(cfg: PipelineConfig, name: str, uri: str, parent_run_id: str | None, resume: bool) -> MLflowTracker:
    """The sweep's MLflow parent run: started now, or the one a resumed sweep had (running again)."""
    if parent_run_id is None:
        tags = {
            "sweep": name,
            "search_space": json.dumps(cfg.tune.search_space, sort_keys=True),
            "kind": "sweep",
            "scheduler": cfg.tune.scheduler,
        }
        parent_run_id = start_run(uri, cfg.tracking.experiment, name, tags)
    parent = tracker_for(uri, parent_run_id)
    if resume:
        parent.reopen()
    return parent


def _new_tuner(
    cfg: PipelineConfig, name: str, trainable: Any, concurrency: int, callbacks: list[Any], verbose: bool
) -> Any:
    """A new sweep's Tuner: the search space, seeded search and scheduler, storage, kept checkpoints, retries."""
    import ray.tune

    search_alg = make_search_alg(cfg)
    ranked, mode = ranking(cfg)
    random.seed(cfg.train.seed)  # PBT's donor and perturbation choices
    # A function trainable cannot take a new config in place: PBT restarts a copied trial (as it must).
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
    return ray.tune.Tuner(
        trainable,
        param_space=tune_space(cfg.tune.search_space),
        tune_config=ray.tune.TuneConfig(
            metric=ranked.name,
            mode=mode,
            scheduler=scheduler_of(cfg).make(cfg),
            search_alg=search_alg,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=concurrency,
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=storage_root(cfg),
            # The sweep's state (a few kB) reaches remote storage every 10 s, not Ray's default 5 min: a driver
            # killed before then would leave a state without its trials to --resume from.
            sync_config=ray.tune.SyncConfig(sync_period=SWEEP_STATE_SYNC_S),
            # The best by the sweep's metric and, always, the latest (PBT copies a trial's latest checkpoint; Ray
            # warns about deleting too early at 2 or fewer), as a Train run keeps its own.
            checkpoint_config=ray.tune.CheckpointConfig(
                num_to_keep=max(3, cfg.train.keep_checkpoints),
                checkpoint_score_attribute=ranked.name,
                checkpoint_score_order=mode,
            ),
            # A trial trained in its own process is retried from its latest checkpoint by Tune (a Train run
            # retries its worker group itself).
            failure_config=ray.tune.FailureConfig(max_failures=cfg.train.max_failures if trains_in_trial(cfg) else 0),
            callbacks=callbacks,
            # Ray's own status table reprints every 30 s, changed or not (not configurable): ours prints when a
            # trial starts, reports or ends; --verbose brings Ray's back as well.
            verbose=1 if verbose else 0,
        ),
    )


def sweep_evaluators(
    cfg: PipelineConfig, uri: str, progress: Callable[[str], None], verbose: bool = False
) -> dict[str, dict[str, Any]]:
    """The data and evaluator of each dataset the sweep's trials may train on (``data.dataset`` may be
    searched), prepared once, here: each trial gets its dataset's evaluator through Ray's object store, so a
    trial on a node without a cached evaluator starts training at once, scored like every other trial."""
    spec = cfg.tune.search_space.get("data.dataset")
    datasets = [cfg.data.dataset] if spec is None else sorted(set(spec_kind(spec)[1]))
    evaluators = {}
    for dataset in datasets:
        trial = with_overrides(cfg, {"data.dataset": dataset})
        payload = prepare_inputs(trial, progress, uri=uri, ranked=ranking(cfg)[0], verbose=verbose)
        if payload is not None:
            evaluators[dataset] = payload
        elif unavailable := source_of(trial.data).scores_unavailable():
            raise ConfigError(
                f"tune.metric: {ranking(cfg)[0].name} cannot be measured: {unavailable}; a sweep compares trials by "
                "it (train single runs on this data instead)"
            )
    return evaluators


def make_search_alg(cfg: PipelineConfig) -> Any:
    """The sweep's search algorithm (None: Tune's own random search), its draws seeded by ``train.seed``: the
    same seed draws the same trials. Tune's random search draws from numpy's global generator (``random.seed``
    does not reach it), seeded here; PBT's resampling draws from it too."""
    np.random.seed(cfg.train.seed)
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.train.seed)
    return None


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


def _elastic_allotment(
    cfg: PipelineConfig, name: str, gpu: bool, callbacks: list[Any], progress: Callable[[str], None]
) -> Any:
    """An elastic sweep's allotment (pipeline.distributed.elastic), owned by this driver: it holds each running
    trial's worker (or thread) count, and a callback added to ``callbacks`` keeps it told which trials run and how
    many wait. None for a sweep of fixed sizes."""
    import ray

    threads = bool(cfg.scaling.max_cpus_per_worker) and trains_in_trial(cfg) and not gpu
    if not (cfg.scaling.max_workers or threads):
        if cfg.scaling.max_cpus_per_worker:  # the config allows it for one-worker trials only: these are on GPUs
            progress(f"[tune] GPU trials keep {cfg.scaling.cpus_per_worker} CPU(s) each (max_cpus_per_worker: unused)")
        return None
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
    callbacks.append(elastic_shares(actor_name, trial_count(cfg.tune.num_samples, cfg.tune.search_space)))
    progress(
        f"[tune] elastic trials: {low} to {high} {unit} each, {capacity} in all; a trial grows when no trial "
        "waits to start and shrinks when one does"
    )
    return allotment


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
            self.lost = False  # said once that the actor is gone

        def __getstate__(self) -> dict[str, Any]:
            return {"told": None, "actor": None, "lost": False}

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            import ray

            running = tuple(t.trial_id for t in trials if t.status == "RUNNING")
            waiting = sum(t.status in ("PENDING", "PAUSED") for t in trials) + max(0, expected - len(trials))
            if (running, waiting) != self.told:
                self.told = (running, waiting)
                try:
                    self.actor = self.actor or ray.get_actor(actor_name)
                    self.actor.update.remote(list(running), waiting)
                except Exception as exc:  # noqa: BLE001 - the trials go on with what they hold
                    self.actor = None
                    if not getattr(self, "lost", False):  # (a sweep state pickled before it was kept)
                        self.lost = True
                        print(
                            f"[elastic] the sweep's allotment {actor_name!r} is gone ({type(exc).__name__}); "
                            "trials go on with what they hold"
                        )

    return ElasticShares()


def default_sweep_name(cfg: PipelineConfig) -> str:
    return cfg.tune.name or f"{cfg.data.dataset}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
