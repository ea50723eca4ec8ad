"""An MLflow run's lifecycle around a training run: the checks and inputs before it, the run opened (or found
again), what it is tagged with, its end (loss curve, last checkpoint, the generator model), its registration,
and the ways it can fail.

Everything before the run happens before Ray starts, cheap checks first, so bad input fails fast and leaves
nothing behind (no MLflow run, no directory).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from pipeline import PROJECT_ROOT, checkpoint
from pipeline.config import PipelineConfig, registered_model_name
from pipeline.datasets import IMAGES, dataset_spec, spec_of
from pipeline.errors import ConfigError, UserError
from pipeline.models import SHAPE_KEYS, network_shape
from pipeline.registry import Registration, Rescore, load_generator, register_generator
from pipeline.shards import folder_spec
from pipeline.storage import check_storage, exists, resume_checkpoint_file, run_location
from pipeline.tracking import MLflowTracker, check_tracking_uri, find_run, start_run
from pipeline.train_state import TrainState
from pipeline.uris import resolve_tracking_uri
from pipeline.worker import ElasticJob, StartFrom


class RunFailed(UserError):
    """The run stopped without finishing (exit code 1: not bad input, a training outcome); the message says why."""


class RunDiverged(RunFailed):
    """The run stopped because its losses diverged."""


class WorkersUnavailable(RunFailed):
    """The run's workers could not be (re)started within ``scaling.resource_wait_s``: a node lost for good."""


@dataclass(frozen=True)
class RunRequest:
    """One tracked training run as its caller asks for it: `train` (a name, perhaps ``resume``) or a sweep's
    trial (its parent run, tags, label, a PBT start, an elastic share, the sweep's evaluator)."""

    name: str  # the run's name under train.storage_path (same name = the same run)
    resume: bool = False
    parent_run_id: str | None = None  # a sweep's parent run: the run is its child
    extra_tags: dict[str, str] = field(default_factory=dict)
    progress: Callable[[str], None] = print  # the driver's lines
    verbose: bool = False  # Ray's own lines too
    label: str = ""  # what the workers' lines start with (a sweep's trial id)
    mlflow_run_id: str | None = None  # go on in this MLflow run (a PBT trial's new Train run), tagged with name
    start_from: StartFrom | None = None  # another run's checkpoint to begin from (PBT)
    live_keys: tuple[str, ...] = ()  # config keys logged as metrics at each report (PBT's mutated ones)
    started_at: float | None = None  # wall clock: when this start began (default: this process loading our code)
    elastic: ElasticJob | None = None  # an elastic trial's share of its sweep
    evaluator: dict[str, Any] | None = None  # the sweep's evaluator payload (a trial's: scored like the others)


def prepare_inputs(
    cfg: PipelineConfig,
    progress: Callable[[str], None] = print,
    evaluator: dict[str, Any] | None = None,
    uri: str | None = None,
) -> dict[str, Any] | None:
    """Data and (if evaluating) the evaluator, made ready on this node before any worker starts; returns the
    evaluator's payload for the workers: the one every run on the tracking store ``uri`` shares (None: this
    host's own, for tools without a store). A sweep's trial is handed the sweep's ``evaluator``: every trial, on
    any node, is scored by the same network, and none trains one on a node that has none cached."""
    from pipeline.data import prepare_data
    from pipeline.validation import check_counts

    check_counts(cfg, prepare_data(cfg.data, progress))
    if not cfg.eval.every_epochs:
        return None
    unavailable = scores_unavailable(cfg)
    if unavailable:
        progress(f"[eval] FID and IS: not available ({unavailable}); everything else is logged")
        return None
    if evaluator is not None:
        return evaluator
    from pipeline.metrics import get_evaluator, shared_evaluator

    own = shared_evaluator(cfg.data, uri, progress) if uri else get_evaluator(cfg.data, progress)
    return own.payload()


def scores_unavailable(cfg: PipelineConfig) -> str | None:
    """Why FID and IS cannot be measured for the run's data (None when they can): they need an evaluator
    trained on the data's classes."""
    if cfg.data.dataset != IMAGES:
        return None
    spec = folder_spec(cfg.data)
    if spec.num_classes < 2:
        return (
            f"the image folder {cfg.data.path} has no classes (one subfolder per class): FID and IS need a "
            "classifier of them"
        )
    if spec.test_images < 2 * spec.num_classes:
        return (
            f"the image folder {cfg.data.path} holds out {spec.test_images} image(s) for {spec.num_classes} classes: "
            "too few to test an evaluator or to compare with; raise data.test_fraction or add images"
        )
    return None


def existing_run(cfg: PipelineConfig, name: str) -> str | None:
    """The MLflow run of the training run ``name``, if one was started before."""
    uri = resolve_tracking_uri(cfg.tracking.uri, PROJECT_ROOT)
    return find_run(uri, cfg.tracking.experiment, {"ray_train_run": name})


def prepare_run(
    cfg: PipelineConfig, request: RunRequest, check_resume: Callable[[str], None]
) -> tuple[str, str, dict[str, Any] | None]:
    """Check everything, prepare data and evaluator, then create the MLflow run (or find the one a resumed run
    had, or take ``request.mlflow_run_id``, tagged now with this run's name): (tracking URI, MLflow run id,
    evaluator payload). ``check_resume`` refuses a damaged checkpoint of a resumed run (given the run's Ray Train
    location) before anything starts."""
    from pipeline.data import check_root

    name = request.name
    location = run_location(cfg, name)
    check_root(cfg.data)
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
    if not request.resume and (previous is not None or exists(location)):
        raise ConfigError(
            f"run {name!r} already exists ({location}); pass --resume {name} to continue it, or choose another --name"
        )
    if request.resume:
        check_resume(cfg, location)
        check_same_images(cfg, uri, previous, name)
    evaluator = prepare_inputs(cfg, request.progress, request.evaluator, uri)
    if previous is not None:
        return uri, previous, evaluator
    if request.mlflow_run_id is not None:
        MLflowTracker(uri, request.mlflow_run_id).set_tags({"ray_train_run": name})
        return uri, request.mlflow_run_id, evaluator
    tags = {"ray_train_run": name, **request.extra_tags}
    if request.parent_run_id:
        tags["mlflow.parentRunId"] = request.parent_run_id
    return uri, start_run(uri, cfg.tracking.experiment, name, tags), evaluator


# What a run cannot change when it resumes: the data's order and size and the networks' shapes, which its
# checkpoint holds.
RESUME_FIXED = ("data.dataset", "data.limit", "data.image_size", "data.channels", "train.batch_size") + tuple(
    f"model.{key}" for key in SHAPE_KEYS
)


DATA_TAG = "data_sha256"  # an image folder's prepared content, recorded when its run starts


def check_same_images(cfg: PipelineConfig, uri: str, run_id: str, name: str) -> None:
    """A resumed run on an image folder trains on the images it began with: a folder whose files changed since,
    or whose preparation is another, is refused here, before preparing it again would replace its shards."""
    if cfg.data.dataset != IMAGES:
        return
    began = MLflowTracker(uri, run_id).tags().get(DATA_TAG)
    if began is None:  # a run from before the tag
        return
    from pipeline.images import list_folder
    from pipeline.shards import prepared_of, read_manifest

    job = prepared_of(cfg.data)
    manifest = read_manifest(job.location) or {}
    if manifest.get("digest") == began and manifest.get("source_digest") == list_folder(job.path).digest:
        return
    raise ConfigError(
        f"data.path: {job.path!r} no longer holds the images run {name!r} began with (prepared content "
        f"{began[:12]}, in {job.location}); a resumed run would train on others: put the folder back as it was, "
        "or start a new run (another --name)"
    )


def check_resume_config(cfg: PipelineConfig, saved: dict[str, Any], source: str) -> None:
    """Refuse a resume whose config changes a key in :data:`RESUME_FIXED` from the checkpoint's (``saved``, its
    config as a dict), naming the key, both values and the fix."""
    given = cfg.to_dict()
    for key in RESUME_FIXED:
        section, name = key.split(".")
        if name not in saved.get(section, {}):  # a checkpoint from before the key existed
            continue
        was, now = saved[section][name], given[section][name]
        if was != now:
            raise ConfigError(
                f"{key}: {now!r} differs from the checkpoint's {was!r} ({source}); a resumed run keeps it: "
                f"set {key}={'null' if was is None else was}, or start a new run (another --name) to change it"
            )


def verify_latest_checkpoint(cfg: PipelineConfig, location: str) -> None:
    """The checkpoint a resumed Train run starts from must load (on S3 too) and fit ``cfg``: refuse a damaged one,
    or a config that changed its data or shapes, here, not in a retrying worker."""
    with resume_checkpoint_file(location, checkpoint.FILENAME) as latest:
        if latest is not None:
            state = checkpoint.load(latest[0], source=latest[1])
            check_resume_config(cfg, state.get("config", {}), latest[1])


# Config sections whose keys become run parameters; `tracking` is left out (its URI may hold credentials).
PARAM_SECTIONS = ("data", "model", "optim", "train", "eval", "scaling")


def flat_params(cfg: PipelineConfig) -> dict[str, Any]:
    """Config leaves under their bare key (``lr_g``, ``latent_dim``, ...): the MLflow compare view lines up."""
    params = {}
    for section in PARAM_SECTIONS:
        for key, value in getattr(cfg, section).__dict__.items():
            params[key] = "null" if value is None else value
    return params


def environment_tags() -> dict[str, str]:
    """The code and libraries a run trained with."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"git_commit": commit or "unknown", "torch_version": torch.__version__, "ray_version": version("ray")}


def config_digest(cfg: PipelineConfig) -> str:
    """SHA-256 of the resolved config: equal digests, equal training setups."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def open_run(cfg: PipelineConfig, tracker: MLflowTracker, request: RunRequest, tags: dict[str, str]) -> None:
    """What a run records before its workers start: params (a PBT trial's mutated keys keep their starting
    values; their later values are metrics and exploit records, not ``resumed_with.*`` tags), tags and its
    training data as a dataset input."""
    if request.resume:
        tracker.reopen()
    tracker.log_params(flat_params(cfg), untagged={key.split(".")[1] for key in request.live_keys})
    tracker.set_tags(
        {
            **environment_tags(),
            "status": "running",
            "dataset": cfg.data.dataset,
            "config_digest": config_digest(cfg),
            **tags,
        }
    )
    log_dataset(cfg, tracker)


def log_dataset(cfg: PipelineConfig, tracker: MLflowTracker) -> None:
    """The training split as the run's MLflow dataset input: its pinned SHA-256, split and ``data.limit``."""
    from pipeline.data import TRAIN_IMAGES_FILE, resolve_root

    if cfg.data.dataset == IMAGES:
        from pipeline.shards import load_prepared

        prepared = load_prepared(cfg.data)
        count = prepared.count("train")
        tracker.set_tags({DATA_TAG: prepared.manifest["digest"]})
        tracker.log_dataset(
            name=f"images:{cfg.data.path}",
            digest=prepared.manifest["digest"],
            source=prepared.location,
            profile={
                "sha256": prepared.manifest["digest"],
                "split": "train",
                "limit": cfg.data.limit,
                "num_images": min(count, cfg.data.limit or count),
                "classes": len(prepared.manifest["classes"]),
            },
        )
        return
    spec = dataset_spec(cfg.data.dataset)
    sha256 = spec.files[TRAIN_IMAGES_FILE].sha256
    tracker.log_dataset(
        name=cfg.data.dataset,
        digest=sha256,
        source=str(resolve_root(cfg.data) / spec.folder / "raw" / TRAIN_IMAGES_FILE),
        profile={
            "sha256": sha256,
            "split": "train",
            "limit": cfg.data.limit,
            "num_images": min(spec.train_images, cfg.data.limit or spec.train_images),
        },
    )


def register_best(
    cfg: PipelineConfig, uri: str, run_id: str, model_uri: str | None, progress: Callable[[str], None] = print
) -> Registration | None:
    """Register the run's logged generator in the Model Registry (``tracking.registered_model``) with its FID,
    IS, run id, config digest, evaluator checksum and sample count; the alias ``champion`` moves only on a better
    FID by the same evaluator at the same sample count (a champion scored otherwise is re-scored first)."""
    name = registered_model_name(cfg)
    if not name or model_uri is None:
        return None
    tracker = MLflowTracker(uri, run_id)
    scores = {key: max(tracker.metric_history(key), default=None) for key in ("fid", "inception_score")}
    if scores["fid"] is None:
        why = scores_unavailable(cfg) or f"eval.every_epochs={cfg.eval.every_epochs}"
        progress(f"[registry] run {run_id} not registered in {name!r}: it has no FID ({why})")
        return None
    tags = tracker.tags()
    version_tags = {
        "fid": repr(scores["fid"][1]),
        "inception_score": repr(scores["inception_score"][1]) if scores["inception_score"] else "nan",
        "run_id": run_id,
        # An image folder by its prepared content: a champion is compared (or re-scored) only on the same data.
        "dataset": folder_spec(cfg.data).key if cfg.data.dataset == IMAGES else cfg.data.dataset,
        "config_digest": tags.get("config_digest") or config_digest(cfg),
        "evaluator_sha256": tags.get("evaluator_sha256", "unknown"),
        "eval_num_samples": str(cfg.eval.num_samples),
    }
    registration = register_generator(uri, name, model_uri, version_tags, rescorer(cfg, uri, progress))
    progress(f"[registry] {registration.message}")
    return registration


def rescorer(cfg: PipelineConfig, uri: str, progress: Callable[[str], None]) -> Rescore:
    """How a registered generator is scored again as ``cfg``'s runs are: by the store's shared evaluator of
    ``cfg.data.dataset``, ``cfg.eval.num_samples`` images from the noise of ``cfg.train.seed``."""

    def rescore(model_uri: str) -> dict[str, str]:
        from pipeline.metrics import shared_evaluator
        from pipeline.sampling import generate_images

        evaluator = shared_evaluator(cfg.data, uri, progress)
        generator, facts = load_generator(uri, model_uri)
        images = generate_images(
            generator, cfg.eval.num_samples, facts["latent_dim"], cfg.train.seed, torch.device("cpu")
        )
        scores = evaluator.score(images)
        return {
            "fid": repr(scores["fid"]),
            "inception_score": repr(scores["inception_score"]),
            "evaluator_sha256": evaluator.checksum,
            "eval_num_samples": str(cfg.eval.num_samples),
        }

    return rescore


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


def generator_facts(cfg: PipelineConfig) -> dict[str, Any]:
    """What the logged generator carries about itself (MLflow model metadata): the noise it takes, the images it
    makes and the networks' shape. ``sample``, ``evaluate`` and the registry read these, not the run's params,
    which keep a run's starting values (a PBT trial may continue with another trial's network)."""
    return {
        "latent_dim": cfg.model.latent_dim,
        "image_shape": list(spec_of(cfg.data).image_shape),
        "dataset": cfg.data.dataset,
        "network": network_shape(cfg.model),
    }


def finish_run(cfg: PipelineConfig, tracker: MLflowTracker, name: str, run_dir: str, result: Any) -> TrainOutcome:
    """Loss curve, last checkpoint and the generator model into the MLflow run; close it. ``result`` has the
    last report's ``metrics`` and the run's latest ``checkpoint`` (a Ray Checkpoint or None)."""
    from pipeline.models import build_generator

    checkpoint_dir = model_uri = None
    with tracker.log_figure("loss_curve.png", "global step", "BCE loss") as ax:
        for key in ("loss_d", "loss_g"):
            points = sorted(tracker.metric_history(key))
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=key)
        ax.legend()
    if result.checkpoint is not None:
        checkpoint_dir = result.checkpoint.path
        with result.checkpoint.as_directory() as local:
            state = checkpoint.load(Path(local) / checkpoint.FILENAME)
            tracker.log_artifact(str(Path(local) / checkpoint.FILENAME), "checkpoints")
        generator = build_generator(cfg.model, spec_of(cfg.data).image_shape)
        generator.load_state_dict(TrainState.sampling_weights(state))
        model_uri = tracker.log_generator(generator, generator_facts(cfg), scores=("fid", "inception_score"))
        tracker.set_tags({"generator_model": model_uri})
    fids = [value for _, value in tracker.metric_history("fid")]
    if fids:
        tracker.log_metrics({"best_fid": min(fids)}, step=int((result.metrics or {}).get("step", 0)))
    tracker.set_tags({"status": "finished"})
    tracker.end("FINISHED")
    return TrainOutcome(
        name, run_dir, tracker.run_id, tracker.uri, dict(result.metrics or {}), checkpoint_dir, model_uri
    )


# MLflow's UI shows an experiment as GenAI (an overview of traces) or as model training after a switch it keeps
# in the browser, GenAI until changed: the experiment tag mlflow.experimentKind does not decide. A link with this
# query opens the experiment's runs in the model-training view, as charts of every metric.
UI_RUNS_VIEW = "runs?workflowType=machine_learning&compareRunsMode=CHART"


def ui_command(uri: str, run_id: str | None = None) -> str:
    """How to open the MLflow UI on this store (bound to 127.0.0.1), and the runs of ``run_id``'s experiment."""
    experiment_id = MLflowTracker(uri, run_id).experiment_id() if run_id else None
    server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    link = f"{server}/#/experiments/{experiment_id}/{UI_RUNS_VIEW}" if experiment_id else server
    if uri.startswith(("http://", "https://")):
        return f"open {link}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open {link}"


def fail_run(tracker: MLflowTracker) -> None:
    """End a run whose training raised, FAILED, unless a sweep already ended it (a trial Tune stopped may see its
    training fail on the way out, after the sweep ended its run KILLED: that verdict stands)."""
    if tracker.status() == "RUNNING":
        tracker.set_tags({"status": "failed"})
        tracker.end("FAILED")
