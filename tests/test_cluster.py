"""cluster.yaml: valid for `ray up` (Ray's own schema), a GPU worker type, the project's pinned versions."""

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import tomllib

import numpy as np
import pytest
import yaml

from tests.conftest import REPO
from tests.servers import BIN, free_port


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it launches anything: fill in the provider's defaults, then validate.
    validate_config(prepare_config(_cluster()))


def test_cluster_has_gpu_workers_that_autoscale_from_zero():
    cluster = _cluster()
    workers = {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    gpu = [v for v in workers.values() if re.match(r"(g5|g6|p4|p5)\.", v["node_config"]["InstanceType"])]
    assert gpu, "no GPU worker type"
    assert gpu[0]["min_workers"] == 0 and 1 <= gpu[0]["max_workers"] <= cluster["max_workers"]


def test_setup_commands_install_the_pinned_versions_of_pyproject():
    pins = {
        re.split(r"[\[=]", dep)[0]: dep.split("==")[1]
        for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if "==" in dep
    }
    setup = " ".join(_cluster()["setup_commands"])
    for name, version in pins.items():
        assert re.search(rf"{re.escape(name)}(\[[^\]]*\])?=={re.escape(version)}", setup), f"{name}=={version}"
    assert "pip install -e /home/ubuntu/gan-pipeline" in setup


def test_every_node_starts_through_the_script_that_keeps_mlflow_off_the_head():
    cluster = _cluster()
    assert "scripts/cluster_node.sh head" in " ".join(cluster["head_start_ray_commands"])
    assert "scripts/cluster_node.sh worker" in " ".join(cluster["worker_start_ray_commands"])
    assert cluster["file_mounts"]["/home/ubuntu/gan-pipeline.env"] == "./cluster/cluster.env"
    assert "/cluster/cluster.env" in (REPO / ".gitignore").read_text().splitlines()
    assert "psycopg2-binary==" in " ".join(cluster["head_setup_commands"])  # the server's PostgreSQL driver
    example = dict(
        line.split("=", 1) for line in (REPO / "cluster" / "env.example").read_text().splitlines() if "=" in line
    )
    # the stores outlive the head: a database and the bucket, never a path on the head's disk
    assert example["GAN_MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert example["GAN_MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql://")
    assert example["GAN_MLFLOW_ARTIFACTS"].startswith("s3://")


def test_each_node_gets_an_instance_profile_that_reaches_only_the_bucket():
    cluster = _cluster()
    for name, node in cluster["available_node_types"].items():
        profile = node["node_config"]["IamInstanceProfile"]["Arn"]
        role = "head" if name == cluster["head_node_type"] else "worker"
        assert profile.endswith(f":instance-profile/gan-pipeline-{role}"), (name, profile)
    bucket = {"arn:aws:s3:::YOUR-BUCKET", "arn:aws:s3:::YOUR-BUCKET/*"}
    worker = json.loads((REPO / "cluster" / "iam-worker-policy.json").read_text())["Statement"]
    assert (
        all(a.startswith("s3:") for st in worker for a in st["Action"]) and {st["Resource"] for st in worker} == bucket
    )
    head = json.loads((REPO / "cluster" / "iam-head-policy.json").read_text())["Statement"]
    s3 = [st for st in head if any(a.startswith("s3:") for a in st["Action"])]
    assert {st["Resource"] for st in s3} == bucket and all(a.startswith("s3:") for st in s3 for a in st["Action"])
    (ending,) = [st for st in head if "ec2:TerminateInstances" in np.atleast_1d(st["Action"])]
    assert ending["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == cluster["cluster_name"]
    # tagging only at launch: a head that could tag any instance as this cluster's could then end it
    (tagging,) = [st for st in head if "ec2:CreateTags" in np.atleast_1d(st["Action"])]
    assert tagging["Condition"]["StringEquals"]["ec2:CreateAction"] == "RunInstances"
    (passing,) = [st for st in head if st["Action"] == "iam:PassRole"]
    assert passing["Resource"].endswith(":role/gan-pipeline-worker")
    assert all(a.split(":")[0] in ("s3", "ec2", "iam") for st in head for a in np.atleast_1d(st["Action"]))


def _node_script(tmp_path, env_file, port):
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "GAN_ENV_FILE": str(env_file),
        "GAN_MLFLOW_HOST": "127.0.0.2",  # the head's private address, here another loopback address
        "GAN_MLFLOW_PORT": str(port),
        "GAN_MLFLOW_HOME": str(tmp_path / "mlflow"),
    }
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "cluster_node.sh"), "mlflow"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_the_heads_mlflow_server_asks_a_login_and_answers_on_the_private_address_and_the_tunnel(tmp_path):
    """scripts/cluster_node.sh's MLflow server, started here as on the head (sqlite and a folder stand in for the
    database and the bucket): basic-auth, on the private address and 127.0.0.1 (where `ray attach -p 5000`'s tunnel
    arrives), nowhere else; a missing or unfilled settings file stops it with one line."""
    import urllib.error
    import urllib.request

    from mlflow.tracking import MlflowClient

    port = free_port()
    missing = _node_script(tmp_path, tmp_path / "absent.env", port)
    assert missing.returncode == 2 and "absent.env is missing; make cluster/cluster.env from cluster/env.example" in (
        missing.stderr
    )
    placeholder = tmp_path / "placeholder.env"
    placeholder.write_text((REPO / "cluster" / "env.example").read_text())
    unfilled = _node_script(tmp_path, placeholder, port)
    assert unfilled.returncode == 2 and "still holds the example's placeholder" in unfilled.stderr
    settings = tmp_path / "cluster.env"
    # Values as a person writes them: a password with shell characters (read literally, never run), a quoted value,
    # a % in a database URI (the auth app's config file is read by configparser)
    password = "s3cret&$HOME`id`%40"
    settings.write_text(
        f"# the cluster's settings\nMLFLOW_TRACKING_USERNAME='gan-admin'\nMLFLOW_TRACKING_PASSWORD={password}\n"
        f"GAN_MLFLOW_BACKEND_STORE_URI=sqlite:///{tmp_path / 'runs.db'}\n"
        f"GAN_MLFLOW_AUTH_DATABASE_URI=sqlite:///{tmp_path / 'users%25.db'}\n"
        f"GAN_MLFLOW_ARTIFACTS={tmp_path / 'artifacts'}\n"
    )
    first = _node_script(tmp_path, settings, port)
    assert first.returncode == 0, first.stderr[-2000:]
    earlier = int((tmp_path / "mlflow" / "mlflow-server.pid").read_text())
    started = _node_script(tmp_path, settings, port)  # `ray up` again: the earlier server is stopped first
    pid = int((tmp_path / "mlflow" / "mlflow-server.pid").read_text())
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        assert "stopped the MLflow server this script started before" in started.stdout and pid != earlier
        with pytest.raises(ProcessLookupError):
            os.kill(earlier, 0)
        import psutil

        server = psutil.Process(pid)
        lines = [" ".join(p.cmdline()) for p in [server, *server.children(recursive=True)]]
        assert not any("runs.db" in line for line in lines), lines  # the database's URI is in no command line
        assert oct(settings.stat().st_mode & 0o777) == "0o600"
        for host in ("127.0.0.1", "127.0.0.2"):
            urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5).read()
        with pytest.raises(urllib.error.URLError):  # not on every address
            urllib.request.urlopen(f"http://127.0.0.3:{port}/health", timeout=5)
        api = f"http://127.0.0.2:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError, match="401"):  # no login, no runs
            urllib.request.urlopen(api, timeout=5)
        os.environ.update(MLFLOW_TRACKING_USERNAME="gan-admin", MLFLOW_TRACKING_PASSWORD=password)
        try:
            client = MlflowClient(f"http://127.0.0.2:{port}")
            client.create_experiment("through-the-login")
            os.environ["MLFLOW_TRACKING_PASSWORD"] = "wrong"
            with pytest.raises(Exception, match="401|Unauthorized|credentials"):
                MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME")
            os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_the_head_gets_boto3_for_an_s3_artifact_store():
    """`pip install -e` of the project is what installs boto3 (the MLflow server's S3 client) on the head."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"boto3\b", dep) for dep in dependencies)
    assert "pip install -e /home/ubuntu/gan-pipeline" in " ".join(_cluster()["setup_commands"])
