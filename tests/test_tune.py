"""Ray Tune sweeps on a real local Ray with a real sqlite MLflow store. Slow: every trial starts a Train run."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def _sweep_args(tmp_path, *extra):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, [
        "tune",
        "-c",
        "configs/smoke.yaml",
        "--set",
        f"train.storage_path={tmp_path / 'runs'}",
        "--set",
        f"tracking.uri={uri}",
        "--set",
        "train.epochs=3",
        *extra,
    ]


def _children(client, parent_id):
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_sweep_with_asha_parent_child_runs_and_best_entries(tmp_path):
    # Sequential trials, the good learning rate first: ASHA must stop the hopeless ones at a rung. Epochs
    # must last a few seconds (8,192 images, wider nets), or a trial ends before Tune acts on its result.
    uri, args = _sweep_args(
        tmp_path,
        "--set",
        "tune.search_space={optim.lr_g: {grid: [1.0e-3, 1.0e-7, 1.0e-7]}}",
        "--set",
        "train.epochs=4",
        "--set",
        "data.limit=8192",
        "--set",
        "model.g_channels=16",
        "--set",
        "model.d_channels=16",
        "--set",
        "tune.max_concurrent_trials=1",
        "--set",
        "tune.num_samples=1",
        "--name",
        "asha",
    )
    result = run_cli(*args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| trial | optim.lr_g | epochs | FID | IS | status |" in result.stdout
    assert "early_stopped" in result.stdout

    client = MlflowClient(uri)
    parent_id = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("MLflow parent run id"))
    parent = client.get_run(parent_id)
    assert parent.data.tags["sweep"] == "asha" and "optim.lr_g" in parent.data.tags["search_space"]
    children = _children(client, parent_id)
    assert len(children) == 3
    statuses = sorted(c.data.tags.get("status") for c in children)
    assert statuses.count("early_stopped") >= 1 and "finished" in statuses
    for child in children:
        assert {"lr_g", "lr_d", "latent_dim", "epochs"} <= set(child.data.params)
        assert child.data.tags["sweep"] == "asha"
    best = min(children, key=lambda c: c.data.metrics["fid"])
    assert parent.data.metrics["best_fid"] == pytest.approx(best.data.metrics["fid"])
    assert "best_inception_score" in parent.data.metrics
    assert float(parent.data.params["best_lr_g"]) == pytest.approx(1.0e-3)
    assert parent.data.tags["best_run_id"] == best.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert "best_trial_samples.png" in artifacts
    plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert {"plots/fid_curves.png", "plots/fid_vs_optim_lr_g.png"} <= plots


def test_concurrent_trials_lose_no_write_and_a_killed_sweep_resumes(tmp_path):
    """Two trials at once on one sqlite store; the sweep's driver is killed mid-way, then --resume finishes it."""
    uri, args = _sweep_args(
        tmp_path,
        "--set",
        "tune.search_space={train.seed: {grid: [1, 2]}}",
        "--set",
        "tune.max_concurrent_trials=2",
        "--set",
        "tune.num_samples=1",
        "--set",
        "tune.grace_period=3",  # nobody is stopped: every history must be complete
        "--name",
        "killed",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = tmp_path / "mlflow.db"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:  # wait until some trial has finished an epoch and its evaluation
            time.sleep(2)
            assert proc.poll() is None, "the sweep ended before it could be killed"
            if db.exists():
                try:
                    with sqlite3.connect(db) as conn:
                        if conn.execute("select count(*) from metrics where key = 'fid'").fetchone()[0] >= 1:
                            break
                except sqlite3.OperationalError:
                    pass
        else:
            pytest.fail("no trial finished an epoch within 10 minutes")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"], capture_output=True)

    resumed = run_cli(*args[:-2], "--name", "killed", "--resume", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client = MlflowClient(uri)
    parents = [
        r
        for r in client.search_runs([client.get_experiment_by_name("gan-pipeline").experiment_id])
        if r.data.tags.get("kind") == "sweep"
    ]
    assert len(parents) == 1  # the parent run was reused
    children = _children(client, parents[0].info.run_id)
    assert len(children) == 2  # exactly one child run per trial
    for child in children:
        # smoke: 8 steps per epoch, log_every 2, 3 epochs -> every even step once, no duplicates
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss_d")]
        assert steps == list(range(2, 25, 2)), steps
        assert [m.step for m in client.get_metric_history(child.info.run_id, "fid")] == [8, 16, 24]
        assert child.info.status == "FINISHED"


def test_resume_with_nothing_to_resume_is_a_clean_error(tmp_path):
    _, args = _sweep_args(
        tmp_path, "--set", "tune.search_space={train.seed: {grid: [1, 2]}}", "--name", "nope", "--resume"
    )
    result = run_cli(*args)
    assert result.returncode == 2 and "nothing to resume" in result.stderr and "Traceback" not in result.stderr
