"""scripts/run_local.sh from a clean checkout: the first of the three ways in (the other two, `ray job
submit` to a real cluster and a cluster's nodes, are in tests/test_multinode.py). Slow."""

import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO

pytestmark = pytest.mark.slow


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
