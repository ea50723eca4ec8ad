"""Experiment tracking: a Tracker interface, a no-op implementation, and the MLflow backend.

Only rank 0 gets a real tracker; every other worker gets :class:`NullTracker`, so the training loop
calls the same methods everywhere without asking who it is. This module is the package's only door into
MLflow: everything else asks an :class:`MLflowTracker` (one run) or the functions here (runs by tag).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline import PROJECT_ROOT
from pipeline.config import PipelineConfig, UserError, make_writable_dir


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image_grid(self, images: torch.Tensor, artifact_path: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_dir: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def flush(self) -> None: ...


class NullTracker:
    """Accepts every call and records nothing (non-zero ranks, and runs without tracking)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image_grid(self, images: torch.Tensor, artifact_path: str) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_dir: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8) -> None:
    """uint8 (N, 28, 28) -> a PNG grid with ``nrow`` images per row."""
    from torchvision.utils import save_image

    save_image(images.unsqueeze(1).float().div(255.0), path, nrow=nrow, padding=2, pad_value=0.5)


# --------------------------------------------------------------------------------------------------
# MLflow

# Config sections whose keys become run parameters; `tracking` is left out (its URI may hold credentials).
PARAM_SECTIONS = ("data", "model", "optim", "train", "eval", "scaling")


def resolve_tracking_uri(cfg_uri: str | None, project_root: Path) -> str:
    """$MLFLOW_TRACKING_URI, else ``tracking.uri``, else an absolute sqlite store in the project directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg_uri
    if not uri:
        return f"sqlite:///{(project_root / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative sqlite path depends on the working directory (lost under `ray job submit`).
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    elif "://" not in uri:
        uri = Path(uri).resolve().as_uri()
    return uri


def _local_store_dir(uri: str) -> Path | None:
    """The directory of a local sqlite/file store, where its artifacts go too; None for servers."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    return None


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a hint, when the tracking store cannot be reached or created."""
    store = _local_store_dir(uri)
    if store is not None:
        make_writable_dir(
            store,
            TrackingError,
            "MLflow store directory",
            "set tracking.uri or MLFLOW_TRACKING_URI to a writable location",
        )
        return
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server --host "
                "127.0.0.1 --port 5000 ...) or fix tracking.uri / MLFLOW_TRACKING_URI"
            ) from None


class TrackingError(UserError):
    """The MLflow store or run cannot be used; the message says how to fix it."""


def flat_params(cfg: PipelineConfig) -> dict[str, Any]:
    """Config leaves under their bare key (``lr_g``, ``latent_dim``, ...): the MLflow compare view lines up."""
    params = {}
    for section in PARAM_SECTIONS:
        for key, value in getattr(cfg, section).__dict__.items():
            params[key] = "null" if value is None else value
    return params


def environment_tags() -> dict[str, str]:
    from importlib.metadata import version

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "git_commit": commit or "unknown",
        "torch_version": torch.__version__,
        "ray_version": version("ray"),
    }


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    store = _local_store_dir(uri)
    location = (store / "mlartifacts").as_uri() if store is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(uri: str, experiment: str, tags: dict[str, str]) -> str | None:
    """The id of the run in ``experiment`` carrying all ``tags`` (how a resumed run finds its MLflow run)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def start_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create an MLflow run and return its id (the driver does this; workers only log into it)."""
    client = _client(uri)
    experiment_id = get_or_create_experiment(client, experiment, uri)
    return client.create_run(experiment_id, run_name=run_name, tags=tags or {}).info.run_id


def _client(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as a search found it."""

    run_id: str
    status: str  # RUNNING, FINISHED, FAILED or KILLED
    tags: dict[str, str]


class MLflowTracker:
    """Logs into one existing MLflow run (by id).

    Step metrics are buffered and written by :meth:`flush`, which the trainer calls after each epoch's
    checkpoint is saved. A run restarted from an earlier checkpoint than the one its metrics reached
    (the driver killed between the two) recomputes steps that are already logged; resuming is exact, so
    their values are the same, and a step already in a metric's history is not written again: metric
    histories never hold a step twice.
    """

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self.client = _client(uri)
        self._pending: list[Any] = []
        self._logged_through: dict[str, int] = {}  # metric key -> last step already in the run

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters; MLflow params are immutable, so a value changed on resume becomes a tag."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])
        changed = {f"resumed_with.{k}": str(v) for k, v in params.items() if k in existing and existing[k] != str(v)}
        self.set_tags(changed)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        fresh = []
        for metric in self._pending:
            if metric.key not in self._logged_through:
                history = self.client.get_metric_history(self.run_id, metric.key)
                self._logged_through[metric.key] = max((m.step for m in history), default=-1)
            if metric.step > self._logged_through[metric.key]:
                fresh.append(metric)
                self._logged_through[metric.key] = metric.step
        self._pending = []
        for i in range(0, len(fresh), 1000):
            self.client.log_batch(self.run_id, metrics=fresh[i : i + 1000])

    def log_image_grid(self, images: torch.Tensor, artifact_path: str) -> None:
        directory, _, name = artifact_path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            save_image_grid(images, os.path.join(tmp, name))
            self.client.log_artifact(self.run_id, os.path.join(tmp, name), directory or None)

    def log_artifact(self, local_path: str, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_dir)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def reopen(self) -> None:
        """Mark a finished or failed run RUNNING again (it is being resumed)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def children(self) -> list[RunRecord]:
        """The runs whose parent is this one (a sweep's trials), as they are now."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'")
        return [RunRecord(run.info.run_id, run.info.status, dict(run.data.tags)) for run in runs]

    def download_last_artifact(self, artifact_dir: str, dest: str) -> str | None:
        """The last (by name) artifact under ``artifact_dir``, downloaded into ``dest``; None if there is none."""
        paths = sorted(a.path for a in self.client.list_artifacts(self.run_id, artifact_dir))
        return self.client.download_artifacts(self.run_id, paths[-1], dest) if paths else None

    def log_generator(self, generator: torch.nn.Module, latent_dim: int) -> str:
        """Log G as the MLflow PyTorch model ``generator`` (pt2 format: loads without unpickling code)."""
        import mlflow
        import numpy as np

        generator = generator.cpu().eval()
        example = np.random.default_rng(0).standard_normal((4, latent_dim)).astype(np.float32)
        with using_tracking_uri(self.uri), mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(generator, name="generator", input_example=example)
        return info.model_uri

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    def save_loss_curve(self, path: str) -> None:
        """Plot loss_d and loss_g over global steps from the run's own metric history."""
        with figure(path, "global step", "BCE loss") as ax:
            for key in ("loss_d", "loss_g"):
                points = sorted(self.metric_history(key))
                if points:
                    ax.plot([s for s, _ in points], [v for _, v in points], label=key)
            ax.legend()


@contextlib.contextmanager
def figure(path: str, xlabel: str, ylabel: str, size: tuple[float, float] = (7, 4)) -> Iterator[Any]:
    """A matplotlib axes to draw on; labelled, gridded and saved as a PNG at ``path`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for a block, then put back.

    ``mlflow.set_tracking_uri`` also writes $MLFLOW_TRACKING_URI, which every child process would inherit
    (and which beats ``tracking.uri``): it must not outlive the block.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    before = tracking_utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = before
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


def load_generator(uri: str, run_id: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """The ``generator`` model logged in run ``run_id`` and the run's params; a clear error if missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(
            f"no MLflow run {run_id!r} in {uri}; list runs with `mlflow ui --backend-store-uri {uri}` "
            "or check MLFLOW_TRACKING_URI"
        ) from None
    try:
        with using_tracking_uri(uri):
            model = mlflow.pytorch.load_model(f"runs:/{run_id}/generator", map_location="cpu")
    except (MlflowException, OSError) as exc:
        raise TrackingError(
            f"run {run_id} has no loadable 'generator' model ({str(exc).splitlines()[0]}); did that training finish?"
        ) from None
    return model, dict(run.data.params)
