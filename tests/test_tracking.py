import os
import time

import pytest
import torch

from pipeline import PROJECT_ROOT
from pipeline.config.schema import PipelineConfig
from pipeline.core.uris import resolve_tracking_uri
from pipeline.distributed.lifecycle import flat_params
from pipeline.tracking.store import TrackingError, check_tracking_uri, mlflow_client, start_run
from pipeline.tracking.tracker import MLflowTracker
from tests.conftest import run_together


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, PROJECT_ROOT) == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000", PROJECT_ROOT) == "http://127.0.0.1:5000"
    monkeypatch.chdir(tmp_path)
    # Relative sqlite paths are made absolute at once: a job's working directory is temporary.
    assert resolve_tracking_uri("sqlite:///rel.db", PROJECT_ROOT) == f"sqlite:///{tmp_path / 'rel.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    assert resolve_tracking_uri("sqlite:///x.db", PROJECT_ROOT) == "http://10.0.0.1:5000"


def test_params_are_flat_unique_and_free_of_tracking_settings():
    params = flat_params(PipelineConfig())
    assert {"lr_g", "lr_d", "latent_dim", "batch_size", "num_workers", "epochs", "dataset", "seed"} <= set(params)
    assert {"g_channels", "d_channels", "beta1", "beta2", "use_gpu"} <= set(params)
    assert "uri" not in params and "experiment" not in params  # a URI may carry credentials
    leaves = [
        k
        for section in ("data", "model", "optim", "train", "eval", "scaling")
        for k in getattr(PipelineConfig(), section).__dict__
    ]
    assert len(leaves) == len(set(leaves)), "two sections share a key name: flat params would collide"


def test_unreachable_server_fails_fast_with_a_hint():
    started = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable.*mlflow server"):
        check_tracking_uri("http://127.0.0.1:9/", timeout_s=3)
    assert time.monotonic() - started < 10


def test_a_deleted_experiment_is_refused_by_name_and_an_unmade_store_stays_unmade(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_tracking_uri(uri, "gan-pipeline")
    assert not (tmp_path / "mlflow.db").exists()  # the check made no store
    start_run(uri, "gan-pipeline", "r1")
    check_tracking_uri(uri, "gan-pipeline")  # a live experiment passes
    client = mlflow_client(uri)
    client.delete_experiment(client.get_experiment_by_name("gan-pipeline").experiment_id)
    with pytest.raises(
        TrackingError, match="tracking.experiment: 'gan-pipeline' was deleted in .*mlflow experiments restore"
    ):
        check_tracking_uri(uri, "gan-pipeline")
    check_tracking_uri(uri, "another")


def test_buffered_metrics_reach_the_run_only_on_flush(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "unit", "r1")
    tracker = MLflowTracker(uri, run_id)
    tracker.log_params({"lr_g": 0.001, "epochs": 2})
    tracker.log_metrics({"loss_d": 1.5, "loss_g": 0.5}, step=10)
    assert tracker.metric_history("loss_d") == []  # not yet: the epoch's checkpoint is not safe
    tracker.flush()
    assert tracker.metric_history("loss_d") == [(10, 1.5)]
    tracker.log_params({"lr_g": 0.001, "epochs": 3})  # as on resume with more epochs
    run = tracker.client.get_run(run_id)
    assert run.data.params["epochs"] == "2" and run.data.tags["resumed_with.epochs"] == "3"
    tracker.log_params({"lr_g": 0.002, "epochs": 3}, untagged={"lr_g"})  # PBT's: later values are metrics
    run = tracker.client.get_run(run_id)
    assert run.data.params["lr_g"] == "0.001" and "resumed_with.lr_g" not in run.data.tags
    tracker.log_image_grid(torch.zeros(4, 28, 28, dtype=torch.uint8), "samples/epoch_001.png")
    assert [a.path for a in tracker.client.list_artifacts(run_id, "samples")] == ["samples/epoch_001.png"]
    # Artifacts live beside the store, at an absolute path, whatever the working directory.
    assert (tmp_path / "mlartifacts").is_dir()


def test_a_step_already_logged_is_not_written_again(tmp_path):
    """A restart from an older checkpoint recomputes logged steps: the history must not hold them twice."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "unit", "r2")
    first = MLflowTracker(uri, run_id)
    for step in (2, 4, 6):
        first.log_metrics({"loss_d": float(step)}, step=step)
    first.flush()
    restarted = MLflowTracker(uri, run_id)  # a new worker, resumed from the checkpoint at step 2
    for step in (4, 6, 8):
        restarted.log_metrics({"loss_d": float(step)}, step=step)
    assert "replayed_steps" not in first.tags()  # nothing computed twice so far
    restarted.flush()
    assert restarted.metric_history("loss_d") == [(2, 2.0), (4, 4.0), (6, 6.0), (8, 8.0)]
    # The store holds each step once; the run says how many points it dropped as recomputed.
    assert restarted.tags()["replayed_steps"] == "2"


def test_two_runs_logging_the_same_new_dataset_at_once_both_get_it(tmp_path):
    """MLflow's sqlite store checks for a dataset, then inserts it: runs logging one new dataset at once (a
    sweep's trials starting together) raced into a UNIQUE failure that failed a trial."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = [MLflowTracker(uri, start_run(uri, "race", f"run{i}")) for i in range(6)]
    for round_ in range(3):  # a new dataset each round: each round is a fresh race
        dataset = ("mnist", f"{round_:036d}", "/data/train", {"limit": round_})
        errors = run_together(lambda run, d=dataset: run.log_dataset(*d), [(run,) for run in runs])
        assert not errors, errors
    for run in runs:
        inputs = run.client.get_run(run.run_id).inputs.dataset_inputs
        assert sorted(i.dataset.digest for i in inputs) == [f"{r:036d}" for r in range(3)]


def test_a_store_that_goes_away_costs_a_training_run_no_record(tmp_path, monkeypatch, capsys):
    """Rank 0's tracker (keep_while_away) against a real MLflow server that is stopped and started again: while it
    is away, metrics, a grid and a tag are kept with one line; once it is back, the next flush sends them, each step
    once, with one line. Any other tracker raises at once; a run's end past its patience fails naming what is lost."""
    from pipeline.tracking import store
    from pipeline.tracking.outage import HTTP_LIMITS, KEEPING_LIMITS, StoreUnreachable
    from tests.servers import MLflowServer

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this test's speed: the limits are checked below
    monkeypatch.delenv(store.DEFAULTED_ENV, raising=False)
    for key in HTTP_LIMITS:
        if key != "MLFLOW_HTTP_REQUEST_MAX_RETRIES":
            monkeypatch.delenv(key, raising=False)
    server = MLflowServer(tmp_path, str(tmp_path / "artifacts"))
    try:
        run_id = start_run(server.uri, "gan-pipeline", "outage")
        # MLflow's HTTP client is bounded where the environment does not say otherwise, patient in a driver...
        assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == HTTP_LIMITS["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]
        tracker = MLflowTracker(server.uri, run_id, keep_while_away=True)
        # ... and sooner done at a training run's rank 0, which keeps what the store does not take
        assert all(os.environ[key] == KEEPING_LIMITS[key] for key in KEEPING_LIMITS if "RETRIES" not in key)
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # what the environment says stays
        tracker.log_metrics({"loss_d": 1.0}, step=1)
        tracker.flush()
        server.stop()
        tracker.log_metrics({"loss_d": 2.0}, step=2)
        tracker.log_metrics({"loss_d": 3.0, "loss_g": 0.5}, step=3)
        tracker.flush()  # the store is away: nothing raised
        tracker.log_image_grid(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "samples/epoch_002.png")
        tracker.set_tags({"after": "outage"})
        tracker.flush()
        said = capsys.readouterr().out
        assert said.count("does not answer") == 1 and "records are kept" in said
        with pytest.raises(Exception, match="API request to"):  # a tracker that keeps nothing raises
            MLflowTracker(server.uri, run_id).set_tags({"x": "y"})
        with pytest.raises(StoreUnreachable, match=r"3 metric point\(s\) and 2 other record"):
            tracker.finish(patience_s=0)
        server.start()
        tracker.log_metrics({"loss_d": 4.0}, step=4)
        tracker.finish(patience_s=60, every_s=1)
        assert "answers again" in capsys.readouterr().out
        client = mlflow_client(server.uri)
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss_d"))
        assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        assert [m.step for m in client.get_metric_history(run_id, "loss_g")] == [3]
        assert client.get_run(run_id).data.tags["after"] == "outage"
        assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/epoch_002.png"]
        assert tracker.kept.folder is None  # the kept copies are gone once sent
    finally:
        server.stop()


def test_a_worker_that_inherits_the_drivers_http_defaults_may_still_shorten_them(monkeypatch):
    """A local Ray's workers inherit the driver's environment, the pipeline's defaults included: rank 0 still makes
    them its own (shorter), while a value the user set stays."""
    import subprocess
    import sys

    from pipeline.tracking import store
    from pipeline.tracking.outage import HTTP_LIMITS, KEEPING_LIMITS

    for key in HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv(store.DEFAULTED_ENV, raising=False)
    store.bound_http_client(HTTP_LIMITS)  # the driver
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's own
    worker = subprocess.run(
        [sys.executable, "-c", "import os; from pipeline.tracking import store, outage; "
         "store.bound_http_client(outage.KEEPING_LIMITS); "
         "print(os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'], os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT'])"],
        capture_output=True, text=True, env=dict(os.environ),
    )  # fmt: skip
    assert worker.stdout.split() == [KEEPING_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], "7"], worker.stderr


def test_a_store_away_is_told_from_a_store_that_says_no():
    """Kept and sent later: no answer, a timeout, retries used up, a "not now" status. Raised at once: a login
    refused, a permission, a bad value, a server error (waiting would not change them)."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    from pipeline.tracking.outage import unreachable

    def api(tail: str) -> MlflowException:
        return MlflowException(f"API request to endpoint /api/2.0/mlflow/runs/log-batch failed with {tail}")

    away = [
        requests.exceptions.ConnectionError("refused"),
        api("exception HTTPConnectionPool(host='h', port=5000): Max retries exceeded"),
        api("timeout exception Read timed out."),
        api("error code 503 != 200. Response body: 'Service Unavailable'"),
        api("error code 429 != 200. Response body: ''"),
        MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE),
    ]
    no = [
        api("error code 401 != 200. Response body: 'You are not authenticated.'"),
        api("error code 403 != 200. Response body: 'Permission denied'"),
        MlflowException("bad metric", error_code=INVALID_PARAMETER_VALUE),
        MlflowException("constraint failed", error_code=INTERNAL_ERROR),
        ValueError("not MLflow's"),
    ]
    assert [unreachable(exc) for exc in away] == [True] * len(away)
    assert [unreachable(exc) for exc in no] == [False] * len(no)
    looped = RuntimeError("a cycle")
    looped.__context__ = RuntimeError("back")
    looped.__context__.__context__ = looped
    assert unreachable(looped) is False  # a cycle of causes ends


def test_the_points_a_checkpoint_carries_are_sent_once_after_a_restart(tmp_path):
    """Rank 0 saves a checkpoint, then would send its steps, but dies in between (or the store is away): the
    checkpoint carries the points (unsent), and the restarted run sends each one the store does not hold, once,
    none counted as replayed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "gan-pipeline", "carried")
    before = MLflowTracker(uri, run_id, keep_while_away=True)
    before.log_metrics({"loss_d": 1.0}, step=2)
    before.flush()
    before.log_metrics({"loss_d": 2.0, "loss_g": 0.5}, step=4)
    carried = before.unsent()  # what the checkpoint at step 4 holds; then the process dies before its flush
    assert sorted((k, s) for k, _, _, s in carried) == [("loss_d", 4), ("loss_g", 4)]
    for _ in range(2):  # restarted twice from that checkpoint: the second finds the points there already
        after = MLflowTracker(uri, run_id, keep_while_away=True)
        after.carry(carried)
        after.log_metrics({"loss_d": 3.0}, step=6)
        after.flush()
    client = mlflow_client(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss_d")] == [(2, 1.0), (4, 2.0), (6, 3.0)]
    assert [m.step for m in client.get_metric_history(run_id, "loss_g")] == [4]
    assert "replayed_steps" in client.get_run(run_id).data.tags  # step 6 computed twice: that one is counted
    assert client.get_run(run_id).data.tags["replayed_steps"] == "1"
