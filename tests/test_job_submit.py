"""The three ways in, against the real thing: `ray job submit` to a real Ray head (token auth on) with a
real MLflow server, and scripts/run_local.sh from a clean checkout. Slow."""

import os
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.servers import BIN, MLflowServer, RayCluster

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    server = MLflowServer(tmp_path, str(tmp_path / "server-artifacts"))
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def ray_head():
    cluster = RayCluster(head_cpus=2)
    try:
        cluster.wait_for_job_api(120)
        yield cluster
    finally:
        cluster.stop()


def test_ray_job_submit_runs_a_sweep_into_the_mlflow_server(ray_head, mlflow_server, tmp_path):
    # Without the token, the head refuses: authentication stays on.
    refused = subprocess.run(
        [f"{BIN}/ray", "job", "list", "--address", ray_head.dashboard],
        env={k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0

    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}}
    started = time.monotonic()
    job = ray_head.submit_job(
        [
            "python",
            "-m",
            "pipeline",
            "tune",
            "-c",
            "configs/smoke.yaml",
            "--name",
            "job-sweep",
            "--set",
            f"train.storage_path={tmp_path / 'job-runs'}",
            "--set",
            "tune.search_space={optim.lr_g: {grid: [2.0e-4, 1.0e-3]}}",
            "--set",
            "tune.num_samples=1",
            "--set",
            "tune.grace_period=3",  # no early stop: with 2 trials ASHA may stop either after epoch 1
        ],
        runtime_env,
        timeout=1200,
    )
    elapsed = time.monotonic() - started
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout
    print(f"ray job submit of the smoke sweep: {elapsed:.0f}s")

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("gan-pipeline")
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.sweep = 'job-sweep' and tags.kind = 'sweep'"
    )
    assert len(parents) == 1
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    )
    assert len(children) == 2
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "fid")] == [8, 16]
        assert {a.path for a in client.list_artifacts(child.info.run_id, "samples")} == {
            "samples/epoch_001.png",
            "samples/epoch_002.png",
        }
    assert "best_fid" in client.get_run(parents[0].info.run_id).data.metrics


def test_run_local_from_a_clean_checkout(tmp_path):
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    # The clone's own code runs (python -m imports from the working directory); the virtual environment,
    # minutes to build, is borrowed from this checkout, refreshed for it first: were its install stamp out of
    # date, the clone's run_local.sh would reinstall this checkout's .venv as an editable install of the clone.
    subprocess.run(["bash", "-c", "source scripts/_venv.sh"], cwd=REPO, check=True, capture_output=True)
    os.symlink(REPO / ".venv", clone / ".venv")
    result = subprocess.run(
        [
            "bash",
            "scripts/run_local.sh",
            "--",
            "data.limit=512",
            "model.g_channels=8",
            "model.d_channels=8",
            "model.latent_dim=16",
            "train.epochs=2",
            "eval.num_samples=500",
            "tune.num_samples=1",
            "tune.search_space={optim.lr_g: {grid: [2.0e-4, 1.0e-3]}}",
            f"train.storage_path={tmp_path / 'runs'}",
        ],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| trial |" in result.stdout and "mlflow ui --backend-store-uri sqlite:///" in result.stdout
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gan-pipeline").experiment_id])
    assert sum(r.data.tags.get("kind") == "sweep" for r in runs) == 1 and len(runs) == 3
