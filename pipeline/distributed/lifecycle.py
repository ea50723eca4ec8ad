"""A run's MLflow record from start to end: what it records before its workers start (params, tags, the data), its
end (loss curve, last checkpoint, the generator model and the facts it carries), how to open it in the UI, and the
ways a run can fail. Its registration in the Model Registry is pipeline.distributed.registration's."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline import PROJECT_ROOT
from pipeline.core import checkpoint
from pipeline.core.errors import UserError
from pipeline.data.kinds import source_of
from pipeline.eval.metrics import METRICS, champion_metric
from pipeline.gan.models import build_generator, network_shape
from pipeline.gan.state import TrainState
from pipeline.tracking.registry import Registration
from pipeline.tracking.tracker import MLflowTracker, tracker_for

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


class RunFailed(UserError):
    """The run stopped without finishing (exit code 1: not bad input, a training outcome); the message says why."""


class RunDiverged(RunFailed):
    """The run stopped because its losses diverged."""


class WorkersUnavailable(RunFailed):
    """The run's workers could not be (re)started within ``scaling.resource_wait_s``: a node lost for good."""


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


def open_run(cfg: PipelineConfig, tracker: MLflowTracker, resume: bool, live_keys: tuple[str, ...], tags: dict) -> None:
    """What a run records before its workers start: params (a PBT trial's mutated keys, ``live_keys``, keep their
    starting values; their later values are metrics and exploit records, not ``resumed_with.*`` tags), tags and
    its training data (the MLflow dataset input and its tag)."""
    if resume:
        tracker.reopen()
    tracker.log_params(flat_params(cfg), untagged={key.split(".")[1] for key in live_keys})
    record = source_of(cfg.data).record()
    tracker.set_tags(
        {
            **environment_tags(),
            "status": "running",
            "dataset": cfg.data.dataset,
            "config_digest": config_digest(cfg),
            **record.tags,
            **tags,
        }
    )
    tracker.log_dataset(record.name, record.digest, record.source, record.profile)


def generator_facts(cfg: PipelineConfig) -> dict[str, Any]:
    """What the logged generator carries about itself (MLflow model metadata): the noise it takes, the images it
    makes and the networks' shape. ``sample``, ``evaluate`` and the registry read these, not the run's params,
    which keep a run's starting values (a PBT trial may continue with another trial's network)."""
    return {
        "latent_dim": cfg.model.latent_dim,
        "image_shape": list(source_of(cfg.data).image_shape),
        "dataset": cfg.data.dataset,
        "network": network_shape(cfg.model),
    }


def finish_run(cfg: PipelineConfig, tracker: MLflowTracker, name: str, run_dir: str, result: Any) -> TrainOutcome:
    """Loss curve, last checkpoint and the generator model into the MLflow run; close it. ``result`` has the
    last report's ``metrics`` and the run's latest ``checkpoint`` (a Ray Checkpoint or None)."""
    checkpoint_dir = model_uri = None
    with tracker.log_figure("loss_curve.png", "global step", f"{cfg.model.loss} loss") as ax:
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
        weights = TrainState.sampling_weights(state)
        generator = build_generator(cfg.model, source_of(cfg.data).image_shape, weights.get("class_weights"))
        generator.load_state_dict(weights)
        facts = generator_facts(cfg)
        if generator.classes:  # what a conditional sample draws its classes from
            facts["class_weights"] = generator.class_weights.tolist()
        model_uri = tracker.log_generator(generator, facts, scores=tuple(METRICS))
        tracker.set_tags({"generator_model": model_uri})
    champion = champion_metric(cfg)
    ranked = [value for _, value in tracker.metric_history(champion.name)]
    if ranked:
        step = int((result.metrics or {}).get("step", 0))
        tracker.log_metrics({f"best_{champion.name}": champion.best(ranked)}, step=step)
    tracker.set_tags({"status": "finished"})
    tracker.end("FINISHED")
    return TrainOutcome(
        name, run_dir, tracker.run_id, tracker.uri, dict(result.metrics or {}), checkpoint_dir, model_uri
    )


def finish_from_storage(cfg: PipelineConfig, name: str, uri: str, run_id: str, result: Any = None) -> TrainOutcome:
    """:func:`finish_run` for a run whose training completed but whose driver ended before its final logging (a
    sweep's trial): the result is read back from the Train run's storage, or is ``result`` (Tune's, for a trial
    trained in its own process)."""
    from ray.train import Result

    from pipeline.distributed.storage import run_location

    location = run_location(cfg, name)
    if result is None:
        result = Result.from_path(location)
    return finish_run(cfg, tracker_for(uri, run_id), name, location, result)


def fail_run(tracker: MLflowTracker, status: str = "failed") -> None:
    """End a run whose training raised (or diverged: ``status``) FAILED, unless a sweep already ended it (a trial
    Tune stopped may see its training fail on the way out, after the sweep ended its run KILLED: that verdict
    stands)."""
    if tracker.status() == "RUNNING":
        tracker.set_tags({"status": status})
        tracker.end("FAILED")


# MLflow's UI shows an experiment as GenAI (an overview of traces) or as model training after a switch it keeps
# in the browser, GenAI until changed: the experiment tag mlflow.experimentKind does not decide. A link with this
# query opens the experiment's runs in the model-training view, as charts of every metric.
UI_RUNS_VIEW = "runs?workflowType=machine_learning&compareRunsMode=CHART"


def ui_command(uri: str, run_id: str | None = None) -> str:
    """How to open the MLflow UI on this store (bound to 127.0.0.1), and the runs of ``run_id``'s experiment."""
    experiment_id = tracker_for(uri, run_id).experiment_id() if run_id else None
    server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    link = f"{server}/#/experiments/{experiment_id}/{UI_RUNS_VIEW}" if experiment_id else server
    if uri.startswith(("http://", "https://")):
        return f"open {link}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open {link}"
