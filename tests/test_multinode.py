"""The cluster path, on one machine but with nothing faked: a Ray cluster of several real nodes (token
authentication on), checkpoints on an S3 endpoint (moto's server), MLflow as a team server that proxies
its artifacts into the same bucket, and a node that dies mid-run. Slow."""

from __future__ import annotations

import gzip
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.distributed.ray_runtime import TRAIN_RECORD as RAY_TRAIN_RECORD
from tests.conftest import REPO, run_cli
from tests.servers import BIN, MLflowServer, RayCluster, S3Server, free_port

pytestmark = pytest.mark.slow

BUCKET = "gan-team"
# Epochs of a few seconds each on two 1-CPU workers.
RUN_ARGS = [
    "-c",
    "configs/smoke.yaml",
    "--set",
    "data.limit=4096",
    "--set",
    "train.epochs=3",
    "--set",
    "eval.num_samples=1000",
    "--set",
    "scaling.num_workers=2",
    "--set",
    "scaling.cpus_per_worker=1",
    "--set",
    "scaling.placement_strategy=STRICT_SPREAD",
    "--set",
    f"train.storage_path=s3://{BUCKET}/runs",
]
# The node-loss tests kill a node once Ray Train has recorded a checkpoint. That record shows up seconds after
# its epoch ends (the controller's poll, the S3 listing), by when the next epoch may be done too: five epochs
# leave the loss landing in some middle epoch, and the run resumes from whichever checkpoint was last recorded.
NODE_LOSS_EPOCHS = 5
NODE_LOSS_ARGS = [*RUN_ARGS, "--set", f"train.epochs={NODE_LOSS_EPOCHS}"]
RESUMED = re.compile(r"resuming from epoch (\d+) ")
# No instance-metadata lookups (a non-loopback address) when credentials are missing.
NO_IMDS = {"AWS_EC2_METADATA_DISABLED": "true"}


def node_data_root(path: Path) -> Path:
    """A worker node's own data root, holding only the .gz copies it prepares MNIST from (nothing the head wrote
    is read there)."""
    from pipeline.data.idx import prepare
    from pipeline.data.source import default_root
    from pipeline.data.specs import MNIST

    source = prepare("mnist", default_root())
    raw = path / MNIST.folder / "raw"
    raw.mkdir(parents=True)
    for name in MNIST.files:
        with open(source / name, "rb") as plain, gzip.open(raw / f"{name}.gz", "wb", compresslevel=1) as packed:
            shutil.copyfileobj(plain, packed)
    return path


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.make_bucket(BUCKET)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def team(tmp_path_factory, s3):
    """An MLflow server storing artifacts in the bucket, and a 2-node Ray cluster whose nodes see the S3 variables."""
    base = tmp_path_factory.mktemp("team")
    data_root = node_data_root(base / "node-data")
    node_env = {"PIPELINE_DATA_ROOT": str(data_root)}
    mlflow = MLflowServer(base, f"s3://{BUCKET}/mlflow", env={**s3.env, **NO_IMDS})
    try:
        cluster = RayCluster(head_cpus=1, env={**s3.env, **NO_IMDS})
        try:
            cluster.add_node(num_cpus=1, env=node_env)
            cluster.wait_for_nodes(2, 120)
            yield {"mlflow": mlflow, "cluster": cluster, "node_env": node_env, "base": base}
        finally:
            cluster.stop()
    finally:
        mlflow.stop()


def driver_env(team) -> dict[str, str]:
    """What a user exports on the head before `python -m pipeline ...`."""
    return {
        **team["cluster"].env,
        "RAY_ADDRESS": team["cluster"].address,
        "MLFLOW_TRACKING_URI": team["mlflow"].uri,
    }


class Driver:
    """`python -m pipeline ARGS` in the background, its output read line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [f"{BIN}/python", "-m", "pipeline", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, seconds: float) -> float:
        """Read output until a line holds ``text``; the time it appeared."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"driver ended before {text!r}:\n" + "".join(self.lines[-60:]))
            self.lines.append(line)
            if text in line:
                return time.monotonic()
        raise AssertionError(f"no {text!r} within {seconds:.0f}s:\n" + "".join(self.lines[-60:]))

    def finish(self, seconds: float) -> tuple[int, str]:
        code = self.proc.wait(timeout=seconds)
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)
        return code, "".join(self.lines)


def wait_for_recorded_checkpoint(s3: S3Server, prefix: str, seconds: float) -> None:
    """Until Ray Train's record of a run under ``prefix`` names a checkpoint: a resume starts from it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key in (k for k in s3.keys(BUCKET, prefix) if k.endswith(RAY_TRAIN_RECORD)):
            if b'"checkpoint_dir_name"' in s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read():
                return
        time.sleep(0.5)
    raise AssertionError(f"no recorded checkpoint under s3://{BUCKET}/{prefix} within {seconds:.0f}s")


def wait_for_tune_checkpoint(s3: S3Server, prefix: str, seconds: float) -> None:
    """Until a trial that trains in its own process has handed Tune a checkpoint under ``prefix`` (the sweep's
    directory): each holds our lineage.json beside the checkpoint."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(key.endswith("/lineage.json") for key in s3.keys(BUCKET, prefix)):
            return
        time.sleep(0.5)
    raise AssertionError(f"no Tune checkpoint under s3://{BUCKET}/{prefix} within {seconds:.0f}s")


def run_of(team, name: str):
    client = MlflowClient(team["mlflow"].uri)
    experiment = client.get_experiment_by_name("gan-pipeline")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.ray_train_run = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_ray_job_submit_of_a_sweep_over_two_nodes_with_s3_and_the_team_server(team, s3):
    cluster, server = team["cluster"], team["mlflow"]
    cluster.wait_for_nodes(2, 60)
    cluster.wait_for_job_api(120)
    # Without the token, the head refuses: authentication stays on.
    refused = subprocess.run(
        [f"{BIN}/ray", "job", "list", "--address", cluster.dashboard],
        env={k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    # The nodes already have the S3 variables; the job gets only the tracking server's address.
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": server.uri}}
    job = cluster.submit_job(
        [
            "python",
            "-m",
            "pipeline",
            "tune",
            *RUN_ARGS[:2],
            "--name",
            "team-sweep",
            *RUN_ARGS[2:],
            "--set",
            "data.limit=512",
            "--set",
            "train.epochs=2",
            "--set",
            "tune.search_space={optim.lr_g: {grid: [2.0e-4, 1.0e-3]}}",
            "--set",
            "tune.num_samples=1",
            "--set",
            "tune.grace_period=3",  # no early stop: both trials train every epoch
        ],
        runtime_env,
        timeout=1500,
    )
    (team["base"] / "job.log").write_text(job.stdout + job.stderr)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-5000:] + job.stderr[-2000:]
    # The job's own log says where everything went.
    assert f"trials and sweep state in s3://{BUCKET}/runs/team-sweep" in job.stdout
    assert f"at {server.uri}" in job.stdout and "MLflow parent run id" in job.stdout
    # A console a person can follow: each trial's every epoch line once, none folded into another's by Ray's
    # deduplication, and none of MLflow's own notices.
    output = job.stdout + job.stderr
    for epoch in (1, 2):
        lines = re.findall(rf"\[(\w+)\] epoch {epoch}/2 ", output)
        assert len(lines) == 2 and len(set(lines)) == 2, (epoch, lines, output[-5000:])
    for noise in ("repeated", "View run", "system_metrics", "INFO mlflow"):
        assert noise not in output, (noise, output[-5000:])

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("gan-pipeline")
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.sweep = 'team-sweep' and tags.kind = 'sweep'"
    )
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    keys = s3.keys(BUCKET)
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["num_train_nodes"] == "2"
        train_run = child.data.tags["ray_train_run"]
        assert any(k.startswith(f"runs/{train_run}/checkpoint_") for k in keys), train_run
        assert any(k.startswith("mlflow/") and child.info.run_id in k and k.endswith("epoch_002.png") for k in keys)
        # 512 images, a global batch of 64: 8 steps an epoch, a FID at the end of each
        assert [m.step for m in client.get_metric_history(child.info.run_id, "fid")] == [8, 16]
    assert any(k.startswith("runs/team-sweep/") for k in keys)  # Tune's experiment state
    scored_by_the_sweeps_evaluator(team, children)
    assert "best_fid" in client.get_run(parent.info.run_id).data.metrics


def test_a_lost_node_is_replaced_and_the_run_finishes_from_its_s3_checkpoint(team, s3):
    cluster = team["cluster"]
    cluster.wait_for_nodes(2, 60)
    worker_node = cluster.nodes[-1]
    driver = Driver(["train", *NODE_LOSS_ARGS, "--name", "spot"], driver_env(team))
    driver.wait_for("2 worker(s) on 2 node(s)", 600)
    # A checkpoint is on S3 and in Ray Train's record: now the worker node vanishes, mid-run.
    wait_for_recorded_checkpoint(s3, "runs/spot/", 600)
    cluster.kill_node(worker_node)
    lost = time.monotonic()
    cluster.wait_for_nodes(1, 120)  # Ray has seen it go: the replacement joins as a new node
    cluster.add_node(num_cpus=1, env=team["node_env"])
    resumed = driver.wait_for("resuming from epoch", 600)
    code, output = driver.finish(900)
    (team["base"] / "spot.log").write_text(output)
    print(f"driver output: {team['base'] / 'spot.log'}")
    assert code == 0, output[-5000:]
    epoch = int(RESUMED.search(output).group(1))
    assert 1 <= epoch < NODE_LOSS_EPOCHS, epoch  # from a checkpoint, with epochs still to train
    print(f"node lost -> training resumed from the S3 checkpoint of epoch {epoch}: {resumed - lost:.0f} s")
    # A console a person can follow: one line for the loss (which rank, from which checkpoint), no tracebacks.
    # The lost node held one of the two ranks (which one, Ray Train's placement decides): that rank alone is named.
    (said,) = re.findall(r"\[train\] lost worker\(s\) rank [01] \([^)]*\); .*", output)
    assert f"training resumes from epoch {epoch} " in said, said
    assert "Traceback" not in output and "marked dead" not in output, output[-5000:]

    client, run = run_of(team, "spot")
    assert run.info.status == "FINISHED" and run.data.tags["num_train_nodes"] == "2"
    epochs = client.get_metric_history(run.info.run_id, "fid")
    assert len(epochs) == NODE_LOSS_EPOCHS
    steps_once(client, run.info.run_id)
    # Checkpoints on S3 (Ray), and the run's artifacts in the bucket through the server (the driver and the
    # workers never got S3 credentials for MLflow: they only spoke HTTP to it).
    keys = s3.keys(BUCKET)
    assert any(k.startswith("runs/spot/checkpoint_") and k.endswith("checkpoint.pt") for k in keys)
    artifacts = [k for k in keys if k.startswith("mlflow/") and run.info.run_id in k]
    assert any(k.endswith(f"samples/epoch_{NODE_LOSS_EPOCHS:03d}.png") for k in artifacts)
    assert any(k.endswith("checkpoints/checkpoint.pt") for k in artifacts)
    assert any("generator" in k or "/models/" in k for k in keys if k.startswith("mlflow/")), keys


def test_a_node_that_never_comes_back_fails_the_run_after_the_configured_wait(team, s3):
    cluster = team["cluster"]
    two_nodes(team)
    worker_node = cluster.nodes[-1]
    args = ["train", *NODE_LOSS_ARGS, "--set", "scaling.resource_wait_s=20", "--name", "gone"]
    driver = Driver(args, driver_env(team))
    wait_for_recorded_checkpoint(s3, "runs/gone/", 600)
    cluster.kill_node(worker_node)
    lost = time.monotonic()
    code, output = driver.finish(600)
    waited = time.monotonic() - lost
    assert code == 1, output[-5000:]
    error = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "scaling.resource_wait_s=20 s" in error[0] and "--resume gone" in error[0]
    assert waited < 20 + 240, waited  # the configured wait plus detection and teardown, not a hang
    _, run = run_of(team, "gone")
    assert run.info.status == "FAILED"

    # The fix the error names: a node back, then --resume continues the run from its S3 checkpoint, in the
    # same MLflow run, each step once.
    two_nodes(team)
    resumed = run_cli(*args[:-2], "--resume", "gone", env=driver_env(team), timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-3000:]
    epoch = int(RESUMED.search(resumed.stdout + resumed.stderr).group(1))
    assert 1 <= epoch < NODE_LOSS_EPOCHS, epoch
    client, run = run_of(team, "gone")
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "fid")) == NODE_LOSS_EPOCHS
    steps_once(client, run.info.run_id)


def two_nodes(team) -> None:
    cluster = team["cluster"]
    if len(cluster.alive_nodes()) < 2:
        cluster.add_node(num_cpus=1, env=team["node_env"])
    cluster.wait_for_nodes(2, 120)


def steps_once(client, run_id: str, keys=("loss_d", "fid", "images_per_s")) -> None:
    """The store holds each logged step once (the tracker drops a point recomputed after a restart from an older
    checkpoint, and counts it in the run's tag ``replayed_steps``), and no logged step is missing: the losses
    every tracking.log_every-th step, from the first to the last."""
    for key in keys:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has a step twice: {steps}"
    losses = sorted(m.step for m in client.get_metric_history(run_id, "loss_d"))
    assert losses == list(range(losses[0], losses[-1] + 1, losses[0])), f"loss_d lost a step: {losses}"
    replayed = client.get_run(run_id).data.tags.get("replayed_steps", 0)
    print(f"run {run_id}: recomputed points not written again: {replayed}")


def test_tune_resume_from_s3_after_the_driver_was_killed(team, s3):
    two_nodes(team)
    args = [
        "tune",
        "-c",
        "configs/smoke.yaml",
        "--name",
        "cut-sweep",
        "--set",
        "data.limit=512",
        "--set",
        "train.epochs=2",
        "--set",
        "eval.num_samples=1000",
        "--set",
        "scaling.num_workers=1",
        "--set",
        "scaling.cpus_per_worker=1",
        "--set",
        f"train.storage_path=s3://{BUCKET}/runs",
        "--set",
        "tune.search_space={train.seed: {grid: [1, 2]}}",
        "--set",
        "tune.num_samples=1",
        "--set",
        "tune.grace_period=3",
    ]
    driver = Driver(args, driver_env(team))
    # One-worker trials train in their own processes, their checkpoints in the sweep's directory.
    wait_for_tune_checkpoint(s3, "runs/cut-sweep/", 600)  # some trial finished epoch 1
    driver.proc.kill()
    driver.proc.wait()
    resumed = run_cli(*args, "--resume", env=driver_env(team), timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-3000:]
    client = MlflowClient(team["mlflow"].uri)
    experiment = client.get_experiment_by_name("gan-pipeline")
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.sweep = 'cut-sweep' and tags.kind = 'sweep'"
    )
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    # One child per trial, none started twice.
    assert len(children) == 2, ([c.data.tags for c in children], resumed.stdout[-5000:], resumed.stderr[-3000:])
    for child in children:
        assert child.info.status == "FINISHED"
        assert len(client.get_metric_history(child.info.run_id, "fid")) == 2
        steps_once(client, child.info.run_id)
    scored_by_the_sweeps_evaluator(team, children)


def scored_by_the_sweeps_evaluator(team, children) -> None:
    """Every trial of a sweep is scored by the evaluator the sweep's driver prepared on the head (Ray's object
    store carries it to the trials): the same checksum on every child, and none trained on the worker node,
    whose data root holds no evaluator cache (training one there takes minutes on one CPU)."""
    checksums = {c.data.tags["evaluator_sha256"] for c in children}
    assert len(checksums) == 1, checksums
    assert not (Path(team["node_env"]["PIPELINE_DATA_ROOT"]) / "evaluators").exists()


def test_strict_spread_needs_as_many_nodes_as_workers(team):
    result = run_cli(
        "train", *RUN_ARGS, "--set", "scaling.num_workers=4", "--name", "too-wide", env=driver_env(team), timeout=300
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "STRICT_SPREAD" in result.stderr and "start more nodes" in result.stderr


def test_a_folder_is_prepared_as_ray_tasks_on_both_nodes_into_the_bucket(team, s3, tmp_path):
    """`data prepare` of a folder in the bucket with RAY_ADDRESS set: the images are decoded and the shards written
    by tasks on both nodes, straight into the bucket, the manifest last; the same shards, byte for byte, as the
    folder prepared in local processes."""
    from tests.image_folders import make_folder

    folder = make_folder(tmp_path / "shapes", 60, broken=False)  # 180 images: 3 decoding tasks a shard
    client = s3.client()
    for path in folder.rglob("*.*"):
        client.put_object(Bucket=BUCKET, Key=f"photos/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    source, out = f"s3://{BUCKET}/photos", f"s3://{BUCKET}/prepared/shapes"
    args = ["data", "prepare", "--dataset", "images", "--path", source, "--image-size", "32"]
    result = run_cli(*args, "--out", out, env=driver_env(team), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Ray tasks on 2 node(s)" in result.stdout, result.stdout[-2000:]
    local = run_cli(*args, "--out", str(tmp_path / "local"), "--on", "local", env=driver_env(team), timeout=300)
    assert local.returncode == 0 and "local process(es)" in local.stdout, local.stdout[-2000:] + local.stderr[-2000:]
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key="prepared/shapes/manifest.json")["Body"].read())
    expected = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert manifest["digest"] == expected["digest"] and manifest["shards"] == expected["shards"]
    assert sum(s["rows"] for split in manifest["shards"].values() for s in split) == 180
    keys = s3.keys(BUCKET, "prepared/shapes/")
    assert all(f"prepared/shapes/{s['file']}" in keys for split in manifest["shards"].values() for s in split)


# ---------------------------------------------------------------------------------------------- bad S3 input


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory):
    """A second S3 endpoint that checks credentials and knows none: every key is refused."""
    server = S3Server(tmp_path_factory.mktemp("strict-s3"), check_credentials=True)
    try:
        yield server
    finally:
        server.stop()


def local_args(tmp_path, storage: str) -> list[str]:
    return [
        "train",
        "-c",
        "configs/smoke.yaml",
        "--set",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "--set",
        f"train.storage_path={storage}",
    ]


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing bucket", "bucket 'no-such-bucket' does not exist; create it or fix train.storage_path"),
        ("unreachable", "the S3 endpoint is unreachable; check AWS_ENDPOINT_URL"),
        ("no credentials", "no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ("refused credentials", "refused these credentials"),
    ],
)
def test_bad_s3_storage_stops_before_ray_with_exit_2(s3, strict_s3, tmp_path, case, words):
    env = {**os.environ, **s3.env, **NO_IMDS, "RAY_ADDRESS": ""}
    bucket = BUCKET
    if case == "missing bucket":
        bucket = "no-such-bucket"
    elif case == "unreachable":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    elif case == "no credentials":
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(key)
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    else:
        env.update(strict_s3.env)
    result = run_cli(*local_args(tmp_path, f"s3://{bucket}/runs"), env=env, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.storage_path: 's3://") and words in lines[0]
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was created


def test_a_damaged_checkpoint_on_s3_is_refused_before_ray(s3, tmp_path):
    """`train --resume` reads the checkpoint Ray will resume from (the latest its record names) from S3 before Ray
    starts: a damaged one is exit 2, named by its s3:// path, and left where it is."""
    from pipeline.tracking.store import start_run

    args = local_args(tmp_path, f"s3://{BUCKET}/damaged")
    start_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "gan-pipeline", "torn", {"ray_train_run": "torn"})
    older, newer = (f"damaged/torn/checkpoint_2026-11-28_10-00-0{i}.000000/checkpoint.pt" for i in (1, 2))
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key=older, Body=b"an older checkpoint, never read")
    client.put_object(Bucket=BUCKET, Key=newer, Body=b"\x00" * 1000)  # torn
    record = {"latest_checkpoint_result": {"checkpoint_dir_name": newer.split("/")[2]}}
    client.put_object(Bucket=BUCKET, Key=f"damaged/torn/{RAY_TRAIN_RECORD}", Body=json.dumps(record).encode())
    env = {**os.environ, **s3.env, **NO_IMDS, "RAY_ADDRESS": ""}
    result = run_cli(*args, "--resume", "torn", env=env, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"'s3://{BUCKET}/{newer}' is damaged: corrupted or truncated" in result.stderr, result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert client.get_object(Bucket=BUCKET, Key=newer)["ContentLength"] == 1000
