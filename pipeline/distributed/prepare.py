"""Everything before a run's workers start, cheap checks first, so bad input fails fast and leaves nothing behind
(no MLflow run, no directory): the request (:class:`RunRequest`), the name and resume checks, the data made ready
and the evaluator shared, then the MLflow run created or found again."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline import PROJECT_ROOT
from pipeline.core import checkpoint
from pipeline.core.claims import claim, is_stale, read_claim, release
from pipeline.core.errors import ConfigError, first_line
from pipeline.core.uris import resolve_tracking_uri, run_name_problem
from pipeline.data.kinds import source_of
from pipeline.data.source import check_counts
from pipeline.distributed.prepare_tasks import shard_maker
from pipeline.distributed.storage import (
    check_storage,
    exists,
    fall_back_to_previous_checkpoint,
    local_dir,
    resume_checkpoint_file,
    run_location,
)
from pipeline.distributed.worker import TrialPart
from pipeline.eval.metrics import METRICS, Metric, champion_metric, check_measured
from pipeline.gan.models import SHAPE_KEYS
from pipeline.tracking.store import check_tracking_uri, find_run, start_run
from pipeline.tracking.tracker import tracker_for

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


CHECKPOINT_LOCATION = "checkpoint_location"  # the MLflow tag: where the run's Ray Train checkpoints are
RUN_CLAIM = ".gan-pipeline-run"  # a new run's claim on its name, in its directory (pipeline.core.claims)
TRAINING_CLAIM = ".gan-pipeline-training"  # held while a `train` command trains the run (new or resumed)


@dataclass(frozen=True)
class RunRequest:
    """One tracked training run as its caller asks for it: `train` (a name, perhaps ``resume``) or a sweep's
    trial (its parent run, tags, a PBT start, an elastic share, the sweep's evaluator: ``trial``)."""

    name: str  # the run's name under train.storage_path (same name = the same run)
    resume: bool = False
    parent_run_id: str | None = None  # a sweep's parent run: the run is its child
    extra_tags: dict[str, str] = field(default_factory=dict)
    progress: Callable[[str], None] = print  # the driver's lines
    verbose: bool = False  # Ray's own lines too
    mlflow_run_id: str | None = None  # go on in this MLflow run (a PBT trial's new Train run), tagged with name
    trial: TrialPart = field(default_factory=TrialPart)  # what a sweep's trial adds, handed to its workers
    started_at: float | None = None  # wall clock: when this start began (default: this process loading our code)
    evaluator: dict[str, Any] | None = None  # the sweep's evaluator payload (a trial's: scored like the others)


def prepare_inputs(
    cfg: PipelineConfig,
    progress: Callable[[str], None] = print,
    evaluator: dict[str, Any] | None = None,
    uri: str | None = None,
    ranked: Metric | None = None,
    verbose: bool = False,
) -> dict[str, Any] | None:
    """Data and (if evaluating) the evaluator, made ready on this node before any worker starts; returns the
    evaluator's payload for the workers: the one every run on the tracking store ``uri`` shares (None: this
    host's own, for tools without a store). A sweep's trial is handed the sweep's ``evaluator``: every trial, on
    any node, is scored by the same network, and none trains one on a node that has none cached. A sweep's
    ``ranked`` metric, and the champion's, must be ones the data's evaluator computes (refused before it is
    trained)."""
    source = source_of(cfg.data)
    maker = shard_maker(source, verbose=verbose)  # None but for a folder of images: a kind's own prepare() as it was
    check_counts(cfg, source.prepare(progress) if maker is None else source.prepare(progress, maker))
    source.scored_by()  # a classifier asked of data without classes: refused here, scored or not, not after training
    if cfg.model.conditional and source.spec().num_classes < 2:
        raise ConfigError(
            f"model.conditional: true, but {source.describe()} has no classes to condition on (a folder needs one "
            "subfolder per class); set model.conditional=false"
        )
    if not cfg.eval.every_epochs:
        return None
    unavailable = source.scores_unavailable()
    if unavailable:
        progress(
            f"[eval] scores ({', '.join(m.label for m in METRICS.values())}): not available ({unavailable}); "
            "everything else is logged"
        )
        return None
    for entry, key in ((champion_metric(cfg), "tracking.champion_metric"), (ranked, "tune.metric")):
        if entry is not None:
            check_measured(entry, key, source.scored_by() == "classifier", source.describe())
    if evaluator is not None:
        return evaluator
    from pipeline.eval.evaluator import get_evaluator
    from pipeline.tracking.evaluators import shared_evaluator, shared_inception

    own = shared_evaluator(cfg.data, uri, progress) if uri else get_evaluator(cfg.data, progress)
    return {**own.payload(), "inception": shared_inception(cfg, uri, progress)}


def existing_run(cfg: PipelineConfig, name: str) -> str | None:
    """The MLflow run of the training run ``name``, if one was started before."""
    uri = resolve_tracking_uri(cfg.tracking.uri, PROJECT_ROOT)
    return find_run(uri, cfg.tracking.experiment, {"ray_train_run": name})


def prepare_run(
    cfg: PipelineConfig, request: RunRequest, check_resume: Callable[[PipelineConfig, str, Callable[[str], None]], None]
) -> tuple[str, str, dict[str, Any] | None]:
    """Check everything, prepare data and evaluator, then create the MLflow run (or find the one a resumed run
    had, or take ``request.mlflow_run_id``, tagged now with this run's name): (tracking URI, MLflow run id,
    evaluator payload). ``check_resume`` refuses a damaged checkpoint of a resumed run (given the run's Ray Train
    location) before anything starts."""
    name = request.name
    problem = run_name_problem(name, "--resume" if request.resume else "--name")
    if problem:
        raise ConfigError(problem)
    location = run_location(cfg, name)
    champion_metric(cfg)  # a name that is no metric: refused before any work
    source_of(cfg.data).check_early()
    uri = resolve_tracking_uri(cfg.tracking.uri, PROJECT_ROOT)
    check_tracking_uri(uri, cfg.tracking.experiment)
    check_storage(cfg)
    previous = find_run(uri, cfg.tracking.experiment, {"ray_train_run": name})
    if request.resume and previous is None:
        raise ConfigError(
            f"--resume {name}: nothing to resume, no run {name!r} in the MLflow store {uri}; check the name "
            "(the MLflow run name) and tracking.uri, or drop --resume to start a new run"
        )
    # Ray Train silently restores a run whose directory exists: a *new* run must not find one.
    if not request.resume and (previous is not None or (exists(location) and not _abandoned(location))):
        raise ConfigError(
            f"run {name!r} already exists ({location}); pass --resume {name} to continue it, or choose another --name"
        )
    if request.resume:
        tags = tracker_for(uri, previous).tags()
        check_recorded_location(tags, location, name)
        if _trains_alone(request):
            hold(location, name)  # before its checkpoint is checked (and perhaps fallen back from)
        check_resume(cfg, location, request.progress)
        # Before preparing the data again could replace what the run began with.
        source_of(cfg.data).check_resume(tags, name)
    if previous is None and request.mlflow_run_id is None and not request.parent_run_id:  # a new `train` run
        return uri, *_start_claimed(cfg, request, location, uri)
    evaluator = prepare_inputs(cfg, request.progress, request.evaluator, uri, verbose=request.verbose)
    if previous is not None:
        return uri, previous, evaluator
    if request.mlflow_run_id is not None:
        tracker_for(uri, request.mlflow_run_id).set_tags({"ray_train_run": name, CHECKPOINT_LOCATION: location})
        return uri, request.mlflow_run_id, evaluator
    tags = {"ray_train_run": name, CHECKPOINT_LOCATION: location, "mlflow.parentRunId": request.parent_run_id}
    return uri, start_run(uri, cfg.tracking.experiment, name, {**tags, **request.extra_tags}), evaluator


def _abandoned(location: str) -> bool:
    """Whether the run directory ``location`` holds the claim of a start killed before its MLflow run existed."""
    return is_stale(read_claim(location, RUN_CLAIM))


def _start_claimed(
    cfg: PipelineConfig, request: RunRequest, location: str, uri: str
) -> tuple[str, dict[str, Any] | None]:
    """A new `train` run's MLflow run (id, evaluator payload), made once its name is claimed: the claim, a file in
    its directory created atomically, stays for the run's life, so two commands given one name at once cannot both
    start it. A start that fails before its MLflow run exists gives the name back."""
    name = request.name
    if not claim(location, RUN_CLAIM):
        found = read_claim(location, RUN_CLAIM)
        raise ConfigError(
            f"run {name!r} was just started by another command ({found.get('host', '?')}, process "
            f"{found.get('pid', '?')}, at {found.get('since', '?')}); choose another --name (if that command is "
            f"gone, delete {location.rstrip('/')}/{RUN_CLAIM})"
        )
    try:
        hold(location, name)
        evaluator = prepare_inputs(cfg, request.progress, request.evaluator, uri, verbose=request.verbose)
        tags = {"ray_train_run": name, CHECKPOINT_LOCATION: location, **request.extra_tags}
        return start_run(uri, cfg.tracking.experiment, name, tags), evaluator
    except BaseException:
        let_go(location)
        release(location, RUN_CLAIM)
        directory = local_dir(location)
        if directory is not None:
            with contextlib.suppress(OSError):
                directory.rmdir()  # made by the claim, empty again
        raise


def _trains_alone(request: RunRequest) -> bool:
    """A `train` command's run (not a sweep trial's, which its sweep alone runs)."""
    return request.mlflow_run_id is None and not request.parent_run_id


_held: set[str] = set()  # the runs this process claimed (hold) and has not given back (let_go)


def hold(location: str, name: str) -> None:
    """Claim the run at ``location`` for this command while it trains: a second `train` of it at once (a resume
    while it runs, two resumes) is refused, naming the holder."""
    if claim(location, TRAINING_CLAIM):
        _held.add(location)
    else:
        found = read_claim(location, TRAINING_CLAIM)
        raise ConfigError(
            f"run {name!r} is being trained by another command ({found.get('host', '?')}, process "
            f"{found.get('pid', '?')}, since {found.get('since', '?')}); wait for it to end (if it is gone, delete "
            f"{location.rstrip('/')}/{TRAINING_CLAIM})"
        )


def let_go(location: str) -> None:
    """Give back this process's claim on training the run at ``location``: nothing where this process took none
    (a run stopped by its checks before, or held by another). A storage that fails to answer now leaves the claim,
    said in one line, without hiding the error that ended the run."""
    if location not in _held:
        return
    _held.discard(location)
    try:
        found = read_claim(location, TRAINING_CLAIM) if exists(location) else {}
        if found and found.get("pid") == os.getpid() and found.get("host") == socket.gethostname():
            release(location, TRAINING_CLAIM)
    except OSError as exc:
        print(
            f"[train] could not give back the claim {location.rstrip('/')}/{TRAINING_CLAIM} ({first_line(exc)}); "
            "delete it before training this run again",
            flush=True,
        )


def check_recorded_location(tags: dict[str, str], location: str, name: str) -> None:
    """A resumed run's checkpoints are where it recorded them (its MLflow tag, from runs that record it): another
    ``train.storage_path`` would start it over elsewhere, so it is refused, naming the one to set."""
    recorded = tags.get(CHECKPOINT_LOCATION)
    if recorded and recorded.rstrip("/") != location.rstrip("/"):
        root = recorded.rstrip("/").rsplit("/", 1)[0]
        raise ConfigError(
            f"--resume {name}: the run keeps its checkpoints in {recorded} (its MLflow tag {CHECKPOINT_LOCATION}), "
            f"not in {location}; set train.storage_path={root} to continue it"
        )


# What a run cannot change when it resumes: the data's order and size and the networks' shapes, which its
# checkpoint holds (and the keys its kind of data fixes: DataSource.fixed); its loss, whose figures and Adam
# moments it continues; and how it is scored, which its FIDs (and the checkpoint Ray Train keeps) compare by.
RESUME_FIXED = (
    ("data.dataset", "data.limit", "train.batch_size")
    + tuple(f"model.{key}" for key in SHAPE_KEYS)
    + ("model.loss", "data.evaluator", "eval.num_samples")
)


def check_resume_config(cfg: PipelineConfig, saved: dict[str, Any], source: str) -> None:
    """Refuse a resume whose config changes a key in :data:`RESUME_FIXED`, or one its data source fixes, from the
    checkpoint's (``saved``, its config as a dict), naming the key, both values and the fix."""
    given = cfg.to_dict()
    for key in RESUME_FIXED + tuple(f"data.{key}" for key in source_of(cfg.data).fixed):
        section, name = key.split(".")
        if name not in saved.get(section, {}):  # a checkpoint from before the key existed
            continue
        was, now = saved[section][name], given[section][name]
        if was != now:
            raise ConfigError(
                f"{key}: {now!r} differs from the checkpoint's {was!r} ({source}); a resumed run keeps it: "
                f"set {key}={'null' if was is None else was}, or start a new run (another --name) to change it"
            )


def verify_latest_checkpoint(cfg: PipelineConfig, location: str, progress: Callable[[str], None] = print) -> None:
    """The checkpoint a resumed Train run starts from must load (on S3 too) and fit ``cfg``, checked here, not in
    a retrying worker: a damaged or missing latest one gives way to the one Ray Train kept before it (said, and
    nothing deleted); with none left, it is refused, as is a config that changed the data or the shapes."""
    while True:
        with resume_checkpoint_file(location, checkpoint.FILENAME) as latest:
            if latest is None:
                return
            try:
                state = checkpoint.load(latest[0], source=latest[1])
            except (checkpoint.DamagedCheckpoint, checkpoint.MissingCheckpoint) as exc:
                unusable = exc
            else:
                check_resume_config(cfg, state.get("config", {}), latest[1])
                return
        previous = fall_back_to_previous_checkpoint(location)
        if previous is None:
            raise unusable
        progress(
            f"[train] {str(unusable).split('; ')[0]}: resuming from the checkpoint kept before it, {previous} (the "
            "unusable one, and Ray Train's record as it was, are left where they are)"
        )
