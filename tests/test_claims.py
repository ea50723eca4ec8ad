"""One of a thing at a time (pipeline.core.claims): a run's name and a folder's preparation are claimed by a file
created atomically, on local disk and on S3 (moto's server answers a conditional put as S3 does); names are checked
before anything is written."""

import json
import os
import threading

import pytest

from pipeline.core.claims import Claimed, create_exclusive, read_claim, release
from pipeline.core.errors import ConfigError
from pipeline.core.uris import run_name_problem
from pipeline.data.images import PREPARING, prepare_folder
from pipeline.data.shards import Preparation
from tests.servers import S3Server


def racing(location: str, contenders: int = 8) -> list[bool]:
    """``contenders`` threads creating one claim at once: what each was told."""
    start, results = threading.Barrier(contenders), []

    def contend(i: int) -> None:
        start.wait()
        results.append(create_exclusive(location, "claim", json.dumps({"pid": i}).encode()))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_of_many_at_once_one_claim_is_made_on_disk(tmp_path):
    assert sorted(racing(str(tmp_path / "runs" / "a"))) == [False] * 7 + [True]
    assert read_claim(str(tmp_path / "runs" / "a"), "claim")["pid"] in range(8)


@pytest.fixture(scope="module")
def s3(tmp_path_factory, monkeypatch_module):
    server = S3Server(tmp_path_factory.mktemp("claims-s3"))
    try:
        server.make_bucket("claims")
        for key, value in server.env.items():
            monkeypatch_module.setenv(key, value)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_of_many_at_once_one_claim_is_made_on_s3(s3):
    assert sorted(racing("s3://claims/runs/a")) == [False] * 7 + [True]
    assert s3.keys("claims") == ["runs/a/claim"]
    release("s3://claims/runs/a", "claim")
    assert s3.keys("claims") == []  # no folder marker left in its place


def test_a_place_being_prepared_is_not_prepared_again_at_once(tmp_path):
    from PIL import Image

    folder = tmp_path / "icons"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 90, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "prepared"
    out.mkdir()
    (out / PREPARING).write_text(json.dumps({"host": "node-1", "pid": 4242, "since": "2026-12-07 10:00:00"}))
    job = Preparation(str(folder), str(out), 32, 3, 0.0)
    with pytest.raises(Claimed, match=r"is being prepared by another command \(node-1, process 4242, since 2026"):
        prepare_folder(job, lambda _: None, workers=1)
    assert sorted(p.name for p in out.iterdir()) == [PREPARING]  # nothing written beside it
    (out / PREPARING).unlink()
    assert prepare_folder(job, lambda _: None, workers=1).count("train") == 3
    assert not (out / PREPARING).exists()  # released


@pytest.mark.parametrize("name", ["a/b", "../up", "x y", "it's", ".hidden", "-flag", "a" * 129, ""])
def test_names_that_cannot_name_a_run_are_refused(name):
    assert "cannot name a run" in run_name_problem(name, "--name")


@pytest.mark.parametrize("name", ["mnist-20261207-101500", "sweep_1.b", "A" * 128])
def test_names_that_can(name):
    assert run_name_problem(name, "--name") is None


def test_a_run_claimed_by_another_command_is_refused_and_a_failed_start_gives_its_name_back(tmp_path, monkeypatch):
    from pipeline.config.load import load_config
    from pipeline.distributed import prepare
    from tests.conftest import CONFIGS

    cfg = load_config(CONFIGS / "smoke.yaml", [f"train.storage_path={tmp_path / 'runs'}"])
    location = str(tmp_path / "runs" / "c")
    request = prepare.RunRequest("c")
    assert create_exclusive(location, prepare.RUN_CLAIM, json.dumps({"host": "h", "pid": 7, "since": "t"}).encode())
    with pytest.raises(ConfigError, match=r"run 'c' was just started by another command \(h, process 7, at t\)"):
        prepare._start_claimed(cfg, request, location, "sqlite://")
    (tmp_path / "runs" / "c" / prepare.RUN_CLAIM).unlink()

    def failing(*args, **kwargs):
        raise ConfigError("the data could not be prepared")

    monkeypatch.setattr(prepare, "prepare_inputs", failing)
    with pytest.raises(ConfigError, match="could not be prepared"):
        prepare._start_claimed(cfg, request, location, "sqlite://")
    assert not (tmp_path / "runs" / "c").exists()  # the name is free again, no "already exists"


def test_a_claim_left_by_a_process_of_this_host_that_ended_is_taken_over(tmp_path):
    """A command killed before it released its claim (SIGKILL, a lost terminal) does not block the name or the
    folder for good: its claim is stale once its process has ended; another host's is not judged."""
    import socket
    import subprocess
    import sys

    from pipeline.core.claims import claim, is_stale

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"host": socket.gethostname(), "pid": int(ended.stdout), "since": "then"}
    assert is_stale(dead) and not is_stale({**dead, "pid": os.getpid()}) and not is_stale({**dead, "host": "x"})
    assert create_exclusive(str(tmp_path / "a"), "claim", json.dumps(dead).encode())
    assert claim(str(tmp_path / "a"), "claim")  # taken over
    assert read_claim(str(tmp_path / "a"), "claim")["pid"] == os.getpid()
    assert not claim(str(tmp_path / "a"), "claim")  # held, by a process that runs


def test_a_run_being_trained_is_not_trained_by_a_second_command_at_once(tmp_path):
    """`train --resume c` while another command trains c (or resumes it) is refused before Ray, naming the holder;
    a command gives back only its own claim."""
    from pipeline.distributed import prepare
    from pipeline.distributed.prepare import CHECKPOINT_LOCATION, TRAINING_CLAIM, hold, let_go
    from pipeline.tracking.store import start_run
    from tests.conftest import run_cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    location = tmp_path / "runs" / "c"
    start_run(uri, "gan-pipeline", "c", {"ray_train_run": "c", CHECKPOINT_LOCATION: str(location)})
    other = {"host": "gpu-box-2", "pid": 4242, "since": "2026-12-07 10:00:00"}
    assert create_exclusive(str(location), TRAINING_CLAIM, json.dumps(other).encode())
    store = ["--set", f"train.storage_path={tmp_path / 'runs'}", "--set", f"tracking.uri={uri}"]
    second = run_cli("train", "-c", "configs/smoke.yaml", *store, "--resume", "c")
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr[-2000:]
    assert "run 'c' is being trained by another command (gpu-box-2, process 4242, since 2026-12-07 10:00:00)" in (
        second.stderr
    )
    let_go(str(location))  # not this process's: left alone
    assert read_claim(str(location), TRAINING_CLAIM) == other
    (location / TRAINING_CLAIM).unlink()
    hold(str(location), "c")
    with pytest.raises(ConfigError, match="is being trained by another command"):  # one hold per run, even here
        prepare.hold(str(location), "c")
    let_go(str(location))
    assert not (location / TRAINING_CLAIM).exists()
