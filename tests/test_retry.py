"""A passing fault is not damage (pipeline.core.retry): reads of a manifest, a checkpoint and Ray Train's record
are retried, and a fault that lasts says "unavailable, retry", never "not prepared", "start over" or "delete it".
The faults come from a filesystem that fails on purpose."""

import io
import json
import time
from pathlib import Path

import pytest
import torch

from pipeline.core import checkpoint
from pipeline.core.retry import Unavailable, retried
from pipeline.data import shards
from pipeline.distributed import storage


def train_record(newest_first: list[tuple[str, int]], report_indices: list[int]) -> str:
    """Ray Train's record (its own pydantic model) of checkpoints (directory name, step), the newest first and
    latest, reported at ``report_indices``."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    results = [{"checkpoint_dir_name": name, "metrics": {"step": step}} for name, step in newest_first]
    return _CheckpointManagerState(
        checkpoint_results=results,
        checkpoint_report_indices=report_indices,
        latest_checkpoint_result=results[0],
        pending_training_results=[],
        pending_validation_specs=[],
        current_report_index=max(report_indices) + 1,
        validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    ).model_dump_json()


def test_retried_waits_doubling_then_says_unavailable():
    calls, started = [], time.perf_counter()

    def flaky():
        calls.append(time.perf_counter())
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "read"

    assert retried(flaky, "x", first_wait_s=0.05) == "read" and len(calls) == 3
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # 0.05, then 0.1
    with pytest.raises(Unavailable, match=r"^thing is unavailable: 4 reads failed \(TimeoutError: slow\); nothing"):
        retried(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "thing", first_wait_s=0.001)
    with pytest.raises(FileNotFoundError):  # an answer, not a fault: not retried
        retried(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "x", final=(FileNotFoundError,))
    assert time.perf_counter() - started < 5


class Failing:
    """A pyarrow-like filesystem holding ``files``; each read of a path in ``faults`` fails while its count lasts."""

    def __init__(self, files: dict[str, bytes], faults: dict[str, int]):
        self.files, self.faults = files, dict(faults)

    def open_input_stream(self, path: str):
        if self.faults.get(path, 0) > 0:
            self.faults[path] -= 1
            raise OSError("When reading information for key: AWS Error SLOW_DOWN")
        if path not in self.files:
            raise FileNotFoundError(path)
        return io.BytesIO(self.files[path])


MANIFEST = json.dumps({"format": 3, "shards": {}, "image_size": 32, "channels": 3}).encode()


def test_a_manifest_read_through_a_passing_fault_or_said_unavailable(monkeypatch):
    fs = Failing({"/p/manifest.json": MANIFEST}, {"/p/manifest.json": 2})
    monkeypatch.setattr(shards, "filesystem", lambda location: (fs, "/p"))
    assert shards.read_manifest("s3://b/p")["image_size"] == 32  # the third read: not "not prepared"
    fs.faults["/p/manifest.json"] = 99
    with pytest.raises(Unavailable, match=r"the manifest s3://b/p/manifest.json is unavailable: 4 reads failed"):
        shards.read_manifest("s3://b/p")
    fs.files.clear(), fs.faults.clear()
    assert shards.read_manifest("s3://b/p") is None  # truly absent: not prepared


def test_ray_trains_record_read_through_a_fault_or_said_unavailable(monkeypatch):
    record = json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_1"}}).encode()
    fs = Failing({"/runs/a/checkpoint_manager_snapshot.json": record}, {"/runs/a/checkpoint_manager_snapshot.json": 1})
    monkeypatch.setattr(storage, "filesystem", lambda location: (fs, "/runs/a"))
    assert storage._train_record("s3://b/runs/a") == record
    fs.faults["/runs/a/checkpoint_manager_snapshot.json"] = 99
    with pytest.raises(Unavailable, match="Ray Train's record s3://b/runs/a/checkpoint_manager_snapshot.json is un"):
        storage._train_record("s3://b/runs/a")  # not b"": the run would start over
    fs.files.clear(), fs.faults.clear()
    assert storage._train_record("s3://b/runs/a") == b""


def test_a_checkpoint_that_cannot_be_read_is_unavailable_and_a_torn_one_damaged(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path / "checkpoint.pt", {"step": 3, "w": torch.ones(2)})
    reads = {"left": 2}
    real = type(path).read_bytes

    def read_bytes(self):
        if reads["left"] > 0:
            reads["left"] -= 1
            raise OSError(116, "Stale file handle")
        return real(self)

    monkeypatch.setattr(type(path), "read_bytes", read_bytes)
    assert checkpoint.load(path)["step"] == 3
    reads["left"] = 99
    with pytest.raises(Unavailable, match=r"checkpoint '.*checkpoint.pt' is unavailable: .*retry when it is reach"):
        checkpoint.load(path)
    reads["left"] = 0
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoint.DamagedCheckpoint, match="is damaged: corrupted or truncated") as caught:
        checkpoint.load(path)
    assert "delete" not in str(caught.value) and path.stat().st_size == 100  # left as it was


def test_ray_trains_record_falls_back_to_the_checkpoint_kept_before_its_latest():
    """The record rewritten is one Ray's own model reads, naming the earlier checkpoint as the latest."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    from pipeline.distributed.ray_runtime import latest_recorded_checkpoint, record_without_latest

    def result(name: str, step: int) -> dict:
        return {"checkpoint_dir_name": name, "metrics": {"step": step}}

    state = _CheckpointManagerState(
        checkpoint_results=[result("checkpoint_b", 20), result("checkpoint_a", 10)],  # kept by score, not by time
        checkpoint_report_indices=[3, 1],
        latest_checkpoint_result=result("checkpoint_b", 20),
        pending_training_results=[],
        pending_validation_specs=[],
        current_report_index=4,
        validated_checkpoint_dir_names=["checkpoint_b"],
        timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    )
    new, previous = record_without_latest(state.json().encode())
    assert previous == "checkpoint_a" == latest_recorded_checkpoint(new)
    read = _CheckpointManagerState.parse_raw(new)
    assert [r.checkpoint_dir_name for r in read.checkpoint_results] == ["checkpoint_a"]
    assert read.checkpoint_report_indices == [1] and read.validated_checkpoint_dir_names == []
    assert record_without_latest(new) is None  # nothing kept before it


def test_each_fallback_keeps_the_record_it_replaced(tmp_path):
    """Two fallbacks in a row (two damaged checkpoints): each former record is kept beside the new one, none
    overwritten."""

    from pipeline.distributed.ray_runtime import TRAIN_RECORD, latest_recorded_checkpoint
    from pipeline.distributed.storage import fall_back_to_previous_checkpoint

    record = train_record([("checkpoint_c", 30), ("checkpoint_b", 20), ("checkpoint_a", 10)], [5, 3, 1])
    (tmp_path / TRAIN_RECORD).write_text(record)
    assert fall_back_to_previous_checkpoint(str(tmp_path)) == "checkpoint_b"
    assert fall_back_to_previous_checkpoint(str(tmp_path)) == "checkpoint_a"
    assert fall_back_to_previous_checkpoint(str(tmp_path)) is None  # nothing before it: the caller refuses
    kept = sorted(tmp_path.glob(f"{TRAIN_RECORD}.before-fallback-*"))
    assert [latest_recorded_checkpoint(p.read_bytes()) for p in kept] == ["checkpoint_c", "checkpoint_b"]


@pytest.fixture(params=["disk", "s3"])
def run_place(request, tmp_path, monkeypatch):
    """A run's directory as a Ray Checkpoint sees it: (pyarrow filesystem, path on it), on disk or on S3."""
    from pipeline.core.files import filesystem

    if request.param == "disk":
        (tmp_path / "run").mkdir()
        yield filesystem(str(tmp_path / "run"))
        return
    from tests.servers import S3Server

    server = S3Server(tmp_path)
    try:
        server.make_bucket("runs")
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        yield filesystem("s3://runs/sweep/run")
    finally:
        server.stop()


def test_a_restart_inside_ray_train_walks_back_past_damaged_checkpoints_to_one_that_loads(run_place, tmp_path, capsys):
    """Ray Train restores a restarted group from its latest checkpoint, whatever state it is in: a damaged one gives
    way to the one its record kept before, as often as it takes (said by rank 0, naming each); with none left that
    loads, or for a PBT copy, the damage is raised as before. Through the worker's own lookup, beside the
    checkpoint on its filesystem (disk and S3)."""
    from types import SimpleNamespace

    from ray.train import Checkpoint

    from pipeline.distributed.ray_runtime import TRAIN_RECORD
    from pipeline.distributed.train_run import _kept_before
    from pipeline.distributed.worker import restored_state

    fs, run = run_place
    steps = {"checkpoint_a": 10, "checkpoint_b": 20, "checkpoint_c": 30}
    for name, step in steps.items():
        blob = Path(checkpoint.save(tmp_path / name / checkpoint.FILENAME, {"step": step})).read_bytes()
        fs.create_dir(f"{run}/{name}")
        with fs.open_output_stream(f"{run}/{name}/{checkpoint.FILENAME}") as out:
            out.write(blob if name == "checkpoint_a" else blob[:100])  # b and c torn
    with fs.open_output_stream(f"{run}/{TRAIN_RECORD}") as out:
        out.write(train_record(list(steps.items())[::-1], [3, 2, 1]).encode())

    job = SimpleNamespace(trial=SimpleNamespace(start_from=None))
    latest = Checkpoint(f"{run}/checkpoint_c", filesystem=fs)
    place = SimpleNamespace(restored=latest, earlier=_kept_before, is_main=True)
    resumed, exploit = restored_state(job, place)
    assert resumed["step"] == 10 and exploit is None
    said = [line for line in capsys.readouterr().out.splitlines() if "is damaged" in line]
    assert len(said) == 2, said
    assert f"{run}/checkpoint_c' is damaged" in said[0] and "resumes from checkpoint_b," in said[0], said
    assert f"{run}/checkpoint_b' is damaged" in said[1] and "resumes from checkpoint_a," in said[1], said
    assert _kept_before(Checkpoint(f"{run}/checkpoint_a", filesystem=fs)) is None  # nothing before the first
    with fs.open_output_stream(f"{run}/checkpoint_a/{checkpoint.FILENAME}") as out:
        out.write(b"torn")
    with pytest.raises(checkpoint.DamagedCheckpoint, match="checkpoint_a"):  # none left that loads
        restored_state(job, place)
    place.earlier = None  # no fallback offered (a trial in its own process): the damage is raised
    with pytest.raises(checkpoint.DamagedCheckpoint, match="checkpoint_c"):
        restored_state(job, place)
    start_from = SimpleNamespace(checkpoint=latest, record={"from": "another trial"})  # a PBT copy: no fallback
    place = SimpleNamespace(restored=None, earlier=_kept_before, is_main=True)
    with pytest.raises(checkpoint.DamagedCheckpoint, match="checkpoint_c"):
        restored_state(SimpleNamespace(trial=SimpleNamespace(start_from=start_from)), place)
