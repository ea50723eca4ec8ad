"""The MLflow store: its client, the check that it can be used, experiments, runs found by their tags or started,
MLflow's system-metrics monitor, and every private MLflow API the project touches, each behind one function with a
probe in :data:`PRIVATE_APIS` (tests/test_private_apis.py runs them). The rest of pipeline.tracking is built on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import PrivateApiChanged, UserError, make_writable_dir
from pipeline.core.secrets import masked_uri
from pipeline.core.uris import local_store_dir
from pipeline.tracking.outage import HTTP_LIMITS

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
        import urllib.parse
        import urllib.request

        parts = urllib.parse.urlsplit(uri)
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
        health = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
        try:  # /health answers without credentials; urllib would take a URI's user info for its host
            urllib.request.urlopen(health, timeout=timeout_s).read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {masked_uri(uri)} is unreachable ({reason}); start it (mlflow server --host "
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


# The key of a logged generator's own facts in its MLflow model metadata (pipeline.distributed.runs.generator_facts).
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
    """MLflow's client of the store at ``uri`` (pipeline.tracking.registry's way in too)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: URL" whenever a run on a server ends; the commands print their own link.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    bound_http_client(HTTP_LIMITS)
    # urllib3 says each of MLflow's retries ("Retrying (Retry(total=...")): a store away is said once, by the run.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# The MLflow variables this process (or the one that started it: Ray's workers inherit the driver's environment) set
# itself, as KEY=VALUE,...: a value found there is the pipeline's default, not the user's, and may be changed.
DEFAULTED_ENV = "GAN_PIPELINE_HTTP_DEFAULTS"


def bound_http_client(limits: dict[str, str]) -> None:
    """MLflow's HTTP timeouts and retries for this process (pipeline.tracking.outage), where the environment does not
    set them (a value the pipeline did not set itself stays)."""
    ours = dict(item.split("=", 1) for item in os.environ.get(DEFAULTED_ENV, "").split(",") if "=" in item)
    for key, value in limits.items():
        if key not in os.environ or os.environ[key] == ours.get(key):
            os.environ[key] = ours[key] = value
    os.environ[DEFAULTED_ENV] = ",".join(f"{k}={v}" for k, v in sorted(ours.items()))


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, interval_s: float = 10.0) -> Iterator[None]:
    """MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU where NVML finds one) logging into
    the run every ``interval_s`` while the block runs; a resumed run continues its steps."""
    # MLflow's public switch (mlflow.start_run(log_system_metrics=True)) needs the fluent API's active run;
    # the monitor itself logs into any run by id.
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its INFO lines (started, stopping, no GPU to log) say nothing a user acts on, nor its warning at each sample
    # while the store is away (the run says that once); errors still show.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
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
