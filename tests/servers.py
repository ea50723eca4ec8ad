"""Real servers for the slow tests, each started on 127.0.0.1 in a process group of its own and stopped by that
group's id (never by name): an MLflow server, an S3 endpoint (moto), a Ray cluster of several real nodes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def stop(*procs: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 60) -> None:
    """Stop processes we started and everything in their process groups: ``sig`` to all at once, then SIGKILL for
    whatever of a group is still there after ``grace_s`` or outlived its leader."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(args, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, env=env)


# ------------------------------------------------------------------------------------------- S3 (moto)

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """moto's standalone S3 server: ``env`` holds the AWS SDK's standard variables that point at it."""

    def __init__(self, directory: Path, check_credentials: bool = False):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        # moto accepts any key unless told to authenticate; then it knows none, and refuses every request.
        server_env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_credentials else {})}
        self.proc = start(
            [f"{BIN}/python", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=server_env,
            log=directory / "moto.log",
        )
        wait_http(f"{self.endpoint}/moto-api/", 60)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials())

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        stop(self.proc)


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    }


# ------------------------------------------------------------------------------------------- MLflow


class MLflowServer:
    """``mlflow server`` with a sqlite store; artifacts proxied to ``artifacts`` (a directory or s3:// URI)."""

    def __init__(self, directory: Path, artifacts: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.directory, self.artifacts = directory, artifacts
        self.env = {**os.environ, **(env or {})}
        if env and "AWS_ENDPOINT_URL" in env:
            self.env["MLFLOW_S3_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]
        self.start()

    def start(self) -> None:
        """(Again) on the same port, store and artifacts."""
        directory, artifacts = self.directory, self.artifacts
        self.proc = start(
            [
                f"{BIN}/mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{directory / 'server.db'}",
                "--artifacts-destination",
                artifacts,
            ],
            env=self.env,
            log=directory / "mlflow-server.log",
        )
        wait_http(f"{self.uri}/health", 120)

    def stop(self) -> None:
        stop(self.proc, grace_s=10)  # its job consumers linger on SIGTERM; the sqlite store is safe to kill


# ------------------------------------------------------------------------------------------- Ray


class RayCluster:
    """A Ray cluster of real nodes on this machine: ``ray start --head`` and ``ray start --address`` processes
    (token authentication on), each node a process group of its own, so a node can be killed whole (its
    raylet and every worker under it) while the others go on."""

    def __init__(self, head_cpus: int = 1, env: dict[str, str] | None = None):
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # Ray's unix sockets live under --temp-dir; pytest's tmp_path is too long for a socket path.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        # The job's `python` is whatever the head's PATH finds first: make that this interpreter.
        self.env = {
            **os.environ,
            **(env or {}),
            "RAY_AUTH_MODE": "token",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.nodes: list[subprocess.Popen] = []
        self.head = self._start(
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--num-cpus",
                str(head_cpus),
            ],
            self.env,
            self.temp_dir,
        )
        try:
            self.wait_for_nodes(1, 120)
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str], env: dict[str, str], temp_dir: str) -> subprocess.Popen:
        proc = start(
            [f"{BIN}/ray", "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir, *args],
            env=env,
            log=Path(self.temp_dir) / f"node-{len(self.nodes)}.log",
        )
        self.nodes.append(proc)
        return proc

    def add_node(self, num_cpus: int = 1, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start one more node (its own raylet) that joins the head; ``env`` reaches its workers.

        Each node gets a temp dir of its own, as a machine of its own would have: nodes sharing one would also
        share the unpacked runtime environments, and one node's clean-up would delete another's working dir.
        """
        node_dir = tempfile.mkdtemp(prefix="node-", dir=self.temp_dir)
        args = ["--address", self.address, "--num-cpus", str(num_cpus)]
        return self._start(args, {**self.env, **(env or {})}, node_dir)

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILL the node's whole process group, as a vanished machine would go: no goodbye to the head."""
        stop(node, sig=signal.SIGKILL)

    def alive_nodes(self) -> list[dict]:
        done = subprocess.run(
            [f"{BIN}/ray", "list", "nodes", "--address", self.dashboard, "--format", "json", "--limit", "100"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        start = done.stdout.find("[")  # the CLI may print a notice before the JSON
        if done.returncode != 0 or start < 0:
            return []
        return [n for n in json.loads(done.stdout[start:]) if n.get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if len(self.alive_nodes()) == count:
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {count} alive node(s) in {seconds:.0f}s")

    def wait_for_job_api(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            listed = subprocess.run(
                [f"{BIN}/ray", "job", "list", "--address", self.dashboard], env=self.env, capture_output=True
            )
            if listed.returncode == 0:
                return
            time.sleep(2)
        raise TimeoutError(f"the Ray head's job API did not come up in {seconds:.0f}s")

    def submit_job(self, entrypoint: list[str], runtime_env: dict, timeout: float) -> subprocess.CompletedProcess:
        """`ray job submit` of ``entrypoint`` with this checkout as the working dir, as a user runs it. The head
        answers "No available agent to submit job, please try again later" while its agent is still starting
        (seconds after the job API is up, longer on a loaded machine): that answer is retried for a minute."""
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run(
                [
                    f"{BIN}/ray",
                    "job",
                    "submit",
                    "--address",
                    self.dashboard,
                    "--working-dir",
                    str(Path(__file__).resolve().parent.parent),
                    "--runtime-env-json",
                    json.dumps(runtime_env),
                    "--",
                    *entrypoint,
                ],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if "No available agent to submit job" not in done.stdout + done.stderr or time.monotonic() > deadline:
                return done
            time.sleep(3)

    def stop(self) -> None:
        stop(*self.nodes)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
