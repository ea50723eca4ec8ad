"""cluster.yaml: valid for `ray up` (Ray's own schema), a GPU worker type, the project's pinned versions."""

import re
import tomllib

import yaml

from tests.conftest import REPO


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


def test_mlflow_server_listens_on_the_private_address_only():
    start = " ".join(_cluster()["head_start_ray_commands"])
    assert "mlflow server" in start and "--host 0.0.0.0" not in start
    assert "hostname -I" in start  # the head's private address, reachable inside the cluster's security group


def test_the_head_gets_boto3_for_an_s3_artifact_store():
    """`pip install -e` of the project is what installs boto3 (the MLflow server's S3 client) on the head."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"boto3\b", dep) for dep in dependencies)
    assert "pip install -e /home/ubuntu/gan-pipeline" in " ".join(_cluster()["setup_commands"])
