"""No secrets in records or on the console (pipeline.core.secrets): a sweep whose tracking URI carries a password,
with AWS keys and MLflow credentials in its environment, leaves none of them in any file it writes (checkpoints,
Ray's and Tune's records, the MLflow server's store and artifacts) or any line it prints."""

import io
from pathlib import Path

import pytest

from pipeline.core.secrets import Redacting, environment_secrets, masked_uri, redact
from tests.conftest import run_cli
from tests.servers import MLflowServer


def test_a_uri_shows_its_password_masked():
    assert masked_uri("postgresql://mlflow:s3cr3t-pw@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert masked_uri("http://u:p%40ss@h:5000") == "http://u:***@h:5000"
    assert masked_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"  # a port is no password
    assert masked_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db" and masked_uri(None) is None


def test_the_console_masks_uri_passwords_and_the_environments_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # too short to mask safely: left
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://gan:p%40ssword99@127.0.0.1:5000")
    secrets = environment_secrets()
    assert "wJalrXUtnFEMI/K7MDENG" in secrets and "p@ssword99" in secrets and "testing" not in secrets
    out = io.StringIO()
    stream = Redacting(out, secrets)
    stream.write("key wJalrXUtn")  # a secret split over two writes of one line
    stream.write("FEMI/K7MDENG and postgresql://u:hunter2@db/x, testing\nthe password p@ssword99 alone\n")
    assert out.getvalue() == "key *** and postgresql://u:***@db/x, testing\nthe password *** alone\n"
    stream.write("no newline yet")
    stream.flush()
    assert out.getvalue().endswith("no newline yet")
    assert redact("http://a:b@c", []) == "http://a:***@c"


def test_the_console_keeps_every_line_whole_when_threads_print_at_once():
    import sys
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: an unguarded buffer loses and garbles lines

    out = io.StringIO()
    stream = Redacting(out, ["wJalrXUtnFEMI/K7MDENG"])
    assert stream.writable()

    def lines(n: int) -> None:
        for i in range(5000):
            stream.write(f"thread {n} line {i} wJalrXUtnFEMI/K7MDENG\n")

    threads = [threading.Thread(target=lines, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sys.setswitchinterval(interval)
    written = out.getvalue().splitlines()
    assert len(written) == 20000 and all(line.endswith(" line " + line.split(" line ")[1]) for line in written)
    assert all(line.split(" line ")[1].split(" ")[1] == "***" for line in written)


def test_a_sweep_keeps_the_drivers_aws_keys_out_of_its_trials_runtime_environment(monkeypatch):
    """Ray Tune would copy them into each trial actor's runtime environment, which Ray's runtime_env_agent.log
    writes out in full (found by the canary sweep below); other variables it copies still go."""
    from ray.tune.execution import class_cache

    from pipeline.sweep.tune_internals import credentials_out_of_runtime_env

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", class_cache.ENV_VARS_TO_PROPAGATE)  # restored after
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARIES["aws"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-session-token")
    monkeypatch.setenv("TUNE_DISABLE_AUTO_INIT", "1")

    def trial_env(trainable: type) -> dict:
        return class_cache._ActorClassCache().get(trainable)._default_options["runtime_env"]["env_vars"]

    class Before:
        pass

    class After:
        pass

    assert trial_env(Before)["AWS_SECRET_ACCESS_KEY"] == CANARIES["aws"]  # what Ray does on its own
    credentials_out_of_runtime_env()
    env = trial_env(After)
    assert not any(name.startswith("AWS_") for name in env) and env["PL_DISABLE_FORK"] == "1", env


CANARIES = {
    "uri": "CanaryUriPassword7391",
    "aws": "CanaryAwsSecretKey4826",
    "mlflow": "CanaryMlflowPassword5173",
}


@pytest.mark.slow
def test_a_sweeps_records_and_console_hold_no_credential(tmp_path):
    """A sweep's trial of 2 Ray Train workers, checkpoints on S3 (moto, which takes the canary AWS key), MLflow over
    HTTP with a password in its URI and MLflow credentials in the environment: no canary in what it prints, in any
    file under its directories, in Ray's session logs, or in any object in the bucket."""
    import shutil
    import tempfile

    from tests.servers import S3Server

    s3 = S3Server(tmp_path)
    s3.make_bucket("canary")
    server = MLflowServer(tmp_path, str(tmp_path / "artifacts"))  # no auth: it ignores the credentials sent
    ray_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # Ray's session and its logs (a short path: its sockets)
    try:
        uri = server.uri.replace("http://", f"http://gan:{CANARIES['uri']}@")
        env = {
            **s3.env,
            "AWS_SECRET_ACCESS_KEY": CANARIES["aws"],
            "AWS_EC2_METADATA_DISABLED": "true",
            "MLFLOW_TRACKING_USERNAME": "gan",
            "MLFLOW_TRACKING_PASSWORD": CANARIES["mlflow"],
            "RAY_ADDRESS": "",
            "RAY_TMPDIR": ray_dir,
        }
        args = [
            "tune", "-c", "configs/smoke.yaml", "--name", "canary",
            "--set", "train.storage_path=s3://canary/runs", "--set", f"tracking.uri={uri}",
            "--set", "train.epochs=1", "--set", "tune.search_space={optim.lr_g: {grid: [2.0e-4]}}",
            "--set", "tune.num_samples=1", "--set", "scaling.num_workers=2", "--set", "scaling.cpus_per_worker=1",
        ]  # fmt: skip
        done = run_cli(*args, env=env, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "gan:***@127.0.0.1" in done.stdout  # the URI is shown, masked
        client = s3.client()
        stored = [
            (f"s3://canary/{key}", client.get_object(Bucket="canary", Key=key)["Body"].read())
            for key in s3.keys("canary")
        ]
    finally:
        server.stop()
        s3.stop()
    written = [p for root in (tmp_path, Path(ray_dir)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    try:
        assert any(key.endswith("checkpoint.pt") for key, _ in stored) and any(p.name == "server.db" for p in written)
        assert any(p.suffix in (".out", ".err", ".log") and "worker" in p.name for p in written)  # Ray's logs read
        leaks = [
            f"{name} in {where}"
            for name, canary in CANARIES.items()
            for where, blob in [("stdout", done.stdout.encode()), ("stderr", done.stderr.encode()), *stored]
            + [(str(p), p.read_bytes()) for p in written]
            if canary.encode() in blob
        ]
        assert leaks == []
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_the_canary_search_finds_a_planted_one(tmp_path):
    """The search above would see a leak: a checkpoint holding the raw URI is found."""
    from pipeline.core import checkpoint

    path = checkpoint.save(
        tmp_path / "checkpoint.pt", {"config": {"tracking": {"uri": f"http://a:{CANARIES['uri']}@h"}}}
    )
    assert CANARIES["uri"].encode() in Path(path).read_bytes()
