"""Experiment tracking: a Tracker interface, a no-op implementation, and the MLflow backend.

Only rank 0 gets a real tracker; every other worker gets :class:`NullTracker`, so the training loop
calls the same methods everywhere without asking who it is. Everything else asks an :class:`MLflowTracker`
(one run) or the functions here (runs by tag); pipeline.registry, built on this module, is the only other
module that touches MLflow. The private MLflow APIs the project uses sit here, each behind one function, with a
probe in :data:`PRIVATE_APIS`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.errors import PrivateApiChanged, UserError, make_writable_dir
from pipeline.pictures import figure, save_image_grid
from pipeline.uris import local_store_dir


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image_grid(self, images: torch.Tensor, artifact_path: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_dir: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def flush(self) -> None: ...
    def metric_history(self, key: str) -> list[tuple[int, float]]: ...
    def tags(self) -> dict[str, str]: ...


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

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return []

    def tags(self) -> dict[str, str]:
        return {}


# --------------------------------------------------------------------------------------------------
# MLflow


def check_tracking_uri(uri: str, experiment: str | None = None, timeout_s: float = 5.0) -> None:
    """Fail fast, with a hint, when the tracking store cannot be reached or created, or when ``experiment`` is
    a deleted experiment (MLflow keeps its name until it is purged, and refuses runs in it)."""
    store = local_store_dir(uri)
    if store is not None:
        make_writable_dir(
            store,
            TrackingError,
            "MLflow store directory",
            "set tracking.uri or MLFLOW_TRACKING_URI to a writable location",
        )
        existing = Path(uri[len("sqlite:///") :]).is_file() if uri.startswith("sqlite:///") else True
    elif uri.startswith(("http://", "https://")):
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
        existing = True
    else:
        existing = True
    if experiment and existing:  # a store not made yet holds no experiment (and asking would make it)
        _check_not_deleted(mlflow_client(uri), experiment, uri)


def _check_not_deleted(client: Any, name: str, uri: str) -> None:
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking.experiment: {name!r} was deleted in {uri} (id {found.experiment_id}); restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}), purge it (mlflow gc), or set "
            "tracking.experiment to another name"
        )


class TrackingError(UserError):
    """The MLflow store or run cannot be used; the message says how to fix it."""


# The key of a logged generator's own facts in its MLflow model metadata (pipeline.runs.generator_facts).
GENERATOR_FACTS = "gan_pipeline"

# MLflow's UI opens an experiment of this kind on its training runs (not on the GenAI overview and traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if (
            "mlflow.experimentKind" not in exp.tags
        ):  # made without the tag (another tool, or this one's earlier versions)
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    store = local_store_dir(uri)
    location = (store / "mlartifacts").as_uri() if store is not None else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # another process created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(uri: str, experiment: str, tags: dict[str, str]) -> str | None:
    """The id of the run in ``experiment`` carrying all ``tags`` (how a resumed run finds its MLflow run)."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def start_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create an MLflow run and return its id (the driver does this; workers only log into it)."""
    client = mlflow_client(uri)
    experiment_id = get_or_create_experiment(client, experiment, uri)
    return client.create_run(experiment_id, run_name=run_name, tags=tags or {}).info.run_id


def mlflow_client(uri: str) -> Any:
    """MLflow's client of the store at ``uri`` (pipeline.registry's way in too)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: URL" whenever a run on a server ends; the commands print their own link.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as a search found it."""

    run_id: str
    status: str  # RUNNING, FINISHED, FAILED or KILLED
    tags: dict[str, str]


# A run's count of metric points computed again after a restart and not written twice (MLflowTracker.flush).
REPLAYED_TAG = "replayed_steps"


class MLflowTracker:
    """Logs into one existing MLflow run (by id).

    Step metrics are buffered and written by :meth:`flush`, which the trainer calls after each epoch's
    checkpoint is saved. A run restarted from an earlier checkpoint than the one its metrics reached
    (the driver killed between the two) recomputes steps that are already logged; resuming is exact, so
    their values are the same, and a step already in a metric's history is not written again (metric
    histories never hold a step twice), only counted in the tag ``replayed_steps``.
    """

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self.client = mlflow_client(uri)
        self._pending: list[Any] = []
        self._logged_through: dict[str, int] = {}  # metric key -> last step already in the run

    def log_params(self, params: dict[str, Any], untagged: Collection[str] = ()) -> None:
        """Log parameters; MLflow params are immutable, so a value changed on resume becomes a tag (except the
        ``untagged`` keys, whose later values the run records otherwise)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])
        changed = {
            f"resumed_with.{k}": str(v)
            for k, v in params.items()
            if k in existing and existing[k] != str(v) and k not in untagged
        }
        self.set_tags(changed)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        """Write the buffered metrics, each step once. Points at a step the run already holds (a restart from an
        earlier checkpoint than its metrics reached) are not written again; their count is added to the run's
        tag ``replayed_steps``, so a run (and a test) can see that it happened."""
        fresh, replayed = [], 0
        for metric in self._pending:
            if metric.key not in self._logged_through:
                history = self.client.get_metric_history(self.run_id, metric.key)
                self._logged_through[metric.key] = max((m.step for m in history), default=-1)
            if metric.step > self._logged_through[metric.key]:
                fresh.append(metric)
                self._logged_through[metric.key] = metric.step
            else:
                replayed += 1
        self._pending = []
        for i in range(0, len(fresh), 1000):
            self.client.log_batch(self.run_id, metrics=fresh[i : i + 1000])
        if replayed:
            before = int(self.client.get_run(self.run_id).data.tags.get(REPLAYED_TAG, "0"))
            self.set_tags({REPLAYED_TAG: str(before + replayed)})

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

    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def status(self) -> str:
        """RUNNING, FINISHED, FAILED or KILLED, as the store has it now."""
        return self.client.get_run(self.run_id).info.status

    def reopen(self) -> None:
        """Mark a finished or failed run RUNNING again (it is being resumed)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def children(self) -> list[RunRecord]:
        """The runs whose parent is this one (a sweep's trials), as they are now."""
        runs = self.client.search_runs(
            [self.experiment_id()], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'"
        )
        return [RunRecord(run.info.run_id, run.info.status, dict(run.data.tags)) for run in runs]

    def download_last_artifact(self, artifact_dir: str, dest: str) -> str | None:
        """The last (by name) artifact under ``artifact_dir``, downloaded into ``dest``; None if there is none."""
        paths = sorted(a.path for a in self.client.list_artifacts(self.run_id, artifact_dir))
        return self.client.download_artifacts(self.run_id, paths[-1], dest) if paths else None

    def log_generator(self, generator: torch.nn.Module, facts: dict[str, Any], scores: Sequence[str] = ()) -> str:
        """Log G as the MLflow PyTorch model ``generator`` (pt2 format: loads without unpickling code) carrying
        ``facts`` (its ``latent_dim``, image shape, dataset, network) as the model's metadata, and link the run's
        last value of each metric in ``scores`` to it, so the UI's model list shows and sorts them. Returns the
        model's URI (``models:/m-...``)."""
        import mlflow
        from mlflow.entities import Metric

        generator = generator.cpu().eval()
        example = np.random.default_rng(0).standard_normal((4, facts["latent_dim"])).astype(np.float32)
        with using_tracking_uri(self.uri), mlflow.start_run(run_id=self.run_id):
            # The requirements named, not inferred: MLflow would load the model in a new Python process to see
            # what it imports (seconds of each run's end) and find torch, which these pins say.
            info = mlflow.pytorch.log_model(
                generator,
                name="generator",
                input_example=example,
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                metadata={GENERATOR_FACTS: facts},
            )
        linked = []
        for key in scores:
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                last = max(history, key=lambda m: m.step)
                # The same key, value, step and time as in the run: MLflow keeps the run's history as it was
                # and records the point for the model too.
                linked.append(Metric(key, last.value, last.timestamp, last.step, model_id=info.model_id))
        if linked:
            self.client.log_batch(self.run_id, metrics=linked)
        return info.model_uri

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any]) -> None:
        """Record the run's training data as an MLflow dataset input (the UI's Dataset column)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest[:36],  # MLflow's limit; the full digest is in the profile
            source_type="s3" if source.startswith("s3://") else "local",
            source=json.dumps({"uri": source}),
            profile=json.dumps(profile, sort_keys=True),
        )
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception as exc:  # noqa: BLE001 - MLflow wraps the database's error in its own
            # Two runs logging the same new dataset at once (a sweep's trials): MLflow's sqlite store checks
            # for the dataset, then inserts it, and the second insert fails. The dataset exists now: again.
            if "UNIQUE constraint failed" not in str(exc):
                raise
            self.client.log_inputs(self.run_id, datasets=inputs)

    def run(self, run_id: str) -> MLflowTracker:
        """A tracker of another run in the same store."""
        return MLflowTracker(self.uri, run_id)

    @contextlib.contextmanager
    def log_figure(
        self, artifact_path: str, xlabel: str, ylabel: str, size: tuple[float, float] = (7, 4)
    ) -> Iterator[Any]:
        """A matplotlib axes to draw on, logged as the PNG ``artifact_path`` (e.g. ``plots/x.png``) when the
        block ends."""
        directory, _, name = artifact_path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            with figure(os.path.join(tmp, name), xlabel, ylabel, size) as ax:
                yield ax
            self.client.log_artifact(self.run_id, os.path.join(tmp, name), directory or None)

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` as the artifact ``artifact_file`` of the run."""
        self.client.log_text(self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED", end_time_ms: int | None = None) -> None:
        """Close the run with ``status`` at ``end_time_ms`` (default now)."""
        self.flush()
        self.client.set_terminated(self.run_id, status=status, end_time=end_time_ms)


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, interval_s: float = 10.0) -> Iterator[None]:
    """MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU where NVML finds one) logging into
    the run every ``interval_s`` while the block runs; a resumed run continues its steps."""
    # MLflow's public switch (mlflow.start_run(log_system_metrics=True)) needs the fluent API's active run;
    # the monitor itself logs into any run by id.
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its INFO lines (started, stopping, no GPU to log) say nothing a user acts on; warnings still show.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


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


# --------------------------------------------------------------------------------------------------
# Probes: each private MLflow API above, checked against the installed MLflow


def _probe_tracking_uri_global() -> None:
    from mlflow.tracking._tracking_service import utils as tracking_utils

    if not hasattr(tracking_utils, "_tracking_uri"):
        raise PrivateApiChanged(
            "mlflow.tracking._tracking_service.utils._tracking_uri: gone; update using_tracking_uri"
        )


def _probe_system_metrics_monitor() -> None:
    import inspect

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    wanted = {"run_id", "sampling_interval", "resume_logging", "tracking_uri"}
    taken = set(inspect.signature(SystemMetricsMonitor).parameters)
    if not wanted <= taken or not all(callable(getattr(SystemMetricsMonitor, m, None)) for m in ("start", "finish")):
        raise PrivateApiChanged(
            f"mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor: takes {sorted(taken)}, not "
            f"{sorted(wanted)} (or lost start/finish); update system_metrics"
        )


PRIVATE_APIS = {
    "MLflow's global tracking URI": _probe_tracking_uri_global,
    "MLflow's system-metrics monitor": _probe_system_metrics_monitor,
}
