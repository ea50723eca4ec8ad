"""Faults and bad input: the pipeline keeps going, loses nothing, and says clearly what is wrong."""

import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config.load import load_config
from pipeline.gan.loop import train_gan
from pipeline.gan.reports import DivergedError
from tests.conftest import CONFIGS, run_cli


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, ["--set", f"train.storage_path={tmp_path / 'runs'}", "--set", f"tracking.uri={uri}"]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["--set", "train.batch_size=100000", "--set", "data.limit=null"],
            "train.batch_size: 100000 is larger than the 60000 training images",
        ),
        (["--set", "scaling.num_workers=64"], "need 64 CPUs but this machine has"),
        pytest.param(
            ["--set", "scaling.use_gpu=true"],
            "scaling.use_gpu: true with 1 workers needs that many GPUs",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU"),
        ),
        (
            ["--set", "scaling.num_workers=2", "--set", "scaling.placement_strategy=STRICT_SPREAD"],
            "STRICT_SPREAD puts each of 2 workers on a node of its own, but without RAY_ADDRESS",
        ),
        (["--set", "data.root=/proc/version/data"], "is not writable"),
        (
            ["--set", "train.storage_path=/proc/version/runs"],
            "train.storage_path: '/proc/version/runs' is not writable",
        ),
        (
            ["--set", "tracking.uri=sqlite:////proc/version/m.db"],
            "MLflow store directory '/proc/version' is not writable",
        ),
        (["--set", "tracking.uri=http://127.0.0.1:9"], "MLflow tracking server http://127.0.0.1:9 is unreachable"),
        (["--resume", "never-was"], "nothing to resume"),
        (["--name", "team/run-1"], "--name: 'team/run-1' cannot name a run: use up to 128 letters, digits"),
        (["--resume", "it's"], '--resume: "it\'s" cannot name a run'),
        (
            ["--set", "tracking.uri=127.0.0.1:5000"],
            "tracking.uri: '127.0.0.1:5000' has no scheme, so MLflow would make a local folder of that name; "
            "use http://127.0.0.1:5000",
        ),
        (["--set", "tracking.uri=htp://127.0.0.1:5000"], "tracking.uri: 'htp://127.0.0.1:5000' has the unknown scheme"),
        (
            ["--set", "train.storage_path=s3:/bucket/runs"],
            "train.storage_path: 's3:/bucket/runs' looks like a s3: URI without '//' and would be a local "
            "directory; use s3://bucket/runs",
        ),
        (
            ["--set", "train.storage_path=s3://AKIAKEY:CanarySecret@bucket/runs"],
            "train.storage_path: 's3://***@bucket/runs' holds credentials before '@', which would be kept in the "
            "run's params, tags and logs; give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and use "
            "s3://bucket/runs",
        ),
    ],
)
def test_bad_input_stops_before_ray_with_exit_2(tmp_path, args, words):
    _, store = _store(tmp_path)
    result = run_cli("train", "-c", "configs/smoke.yaml", *store, *args, env={"RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    assert words in result.stderr and "CanarySecret" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written


def test_a_ray_client_address_is_refused_before_any_work(tmp_path):
    _, store = _store(tmp_path)
    result = run_cli("train", "-c", "configs/smoke.yaml", *store, env={"RAY_ADDRESS": "ray://10.0.0.1:10001"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "RAY_ADDRESS='ray://10.0.0.1:10001' is a Ray Client address" in result.stderr
    assert "ray job" in result.stderr and not (tmp_path / "runs").exists()


def test_a_bad_tracking_uri_in_the_environment_is_named(tmp_path):
    _, store = _store(tmp_path)
    result = run_cli("train", "-c", "configs/smoke.yaml", *store, env={"MLFLOW_TRACKING_URI": "localhost:5000"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: $MLFLOW_TRACKING_URI: 'localhost:5000' has no scheme" in result.stderr
    assert "use http://localhost:5000" in result.stderr
    assert not (tmp_path / "localhost:5000").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_changed_or_moved_resume_is_refused_before_ray_and_a_damaged_checkpoint_gives_way_to_the_one_before(
    tmp_path,
):
    """`--resume` with settings the checkpoint was not trained with, or another train.storage_path, stops before Ray
    with one line and writes nothing. The newest checkpoint torn (a crash of the disk, not of the run): `--resume`
    says so and goes on from the one Ray Train kept before it, leaving the torn one and Ray's former record where they
    were. (With no checkpoint before it, the resume is refused: tests/test_multinode.py, on S3.)"""
    import json

    from pipeline.core import checkpoint
    from pipeline.distributed.ray_runtime import TRAIN_RECORD, latest_recorded_result

    uri, store = _store(tmp_path)
    first = run_cli("train", "-c", "configs/smoke.yaml", "--set", "train.epochs=2", *store, "--name", "c")
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "runs" / "c"
    written = sorted(p.name for p in run.iterdir())
    for key, value in (("train.batch_size", "32"), ("data.limit", "1024"), ("model.latent_dim", "32")):
        smoke = load_config(CONFIGS / "smoke.yaml")
        was = smoke.to_dict()[key.split(".")[0]][key.split(".")[1]]
        changed = run_cli("train", "-c", "configs/smoke.yaml", "--set", f"{key}={value}", *store, "--resume", "c")
        assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-2000:]
        assert changed.stderr.startswith(f"error: {key}: {value} differs from the checkpoint's {was} ("), changed.stderr
        assert f"set {key}={was}, or start a new run" in changed.stderr
        assert len(changed.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == written  # nothing written
    (finished,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("gan-pipeline").experiment_id]
    )
    assert finished.info.status == "FINISHED"
    earlier, latest = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    per_epoch = latest_recorded_result((run / TRAIN_RECORD).read_bytes())["metrics"]["step"] // 2
    before = checkpoint.load(earlier)
    torn = latest / checkpoint.FILENAME
    torn.write_bytes(torn.read_bytes()[:1000])
    elsewhere = ["--set", f"train.storage_path={tmp_path / 'other'}"]
    moved = run_cli("train", "-c", "configs/smoke.yaml", *store, *elsewhere, "--resume", "c")
    assert moved.returncode == 2 and len(moved.stderr.strip().splitlines()) == 1, moved.stderr[-2000:]
    assert f"--resume c: the run keeps its checkpoints in {run} (its MLflow tag checkpoint_location), not in " in (
        moved.stderr
    )
    assert f"set train.storage_path={tmp_path / 'runs'} to continue it" in moved.stderr
    again = run_cli("train", "-c", "configs/smoke.yaml", "--set", "train.epochs=3", *store, "--resume", "c")
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert f"[train] checkpoint {str(torn)!r} is damaged: corrupted or truncated" in said, said[-3000:]
    assert f"resuming from the checkpoint kept before it, {earlier.name}" in said
    (kept,) = run.glob(f"{TRAIN_RECORD}.before-fallback-*")  # Ray's former record, beside the new one
    assert torn.stat().st_size == 1000 and b'"checkpoint_dir_name"' in kept.read_bytes()
    resumed = checkpoint.load(run / json.loads((run / TRAIN_RECORD).read_text())["latest_checkpoint_result"]
                              ["checkpoint_dir_name"])  # fmt: skip
    assert resumed["epoch"] == 3 and resumed["step"] == 3 * per_epoch
    assert f"resuming from epoch {before['epoch']} (step {before['step']})" in said  # not from the start


# ---------------------------------------------------------------------------------------------- preemption


def test_a_preemption_notice_checkpoints_once_at_the_next_check_and_training_goes_on(fake_split):
    """Ray's notice (a node drained for preemption, as ray.train.get_preemption_info gives it) from step 5 on: the
    check at step 6 (every 2 steps) says it once and the loop reports a checkpoint there, inside the epoch, then
    trains on to the end (Ray restarts the run at the drain's deadline); a SIGTERM'd worker's report ends it."""
    from types import SimpleNamespace

    from pipeline.distributed.preemption import PreemptionWatch
    from pipeline.gan.hooks import On
    from pipeline.gan.reports import Interval

    cfg = load_config(CONFIGS / "smoke.yaml", ["train.epochs=1", "train.batch_size=32"])  # 8 steps
    lines, reports, exits, steps = [], [], [], []
    info = SimpleNamespace(deadline_ms=None, preempted_node_ids=["0123456789abcdef"])
    watch = PreemptionWatch(
        2, lambda: info if steps and steps[-1] >= 5 else None, lambda flag: flag, True, lines.append, exit=exits.append
    )
    train_gan(cfg, fake_split, hooks=[On(report=reports.append, step=lambda s: steps.append(s.number)), watch])
    assert lines == ["[preempt] Ray drains node(s) 01234567 for preemption: checkpoint at step 6"]
    assert [(r.kind, r.metrics["step"]) for r in reports] == [("interval", 6), ("epoch", 8)]
    assert isinstance(reports[0], Interval) and reports[0].checkpoint["step"] == 6 and exits == []
    signalled = PreemptionWatch(2, None, lambda flag: flag, True, lines.append, received=lambda: True, take_s=0)
    signalled.exit = exits.append
    reports.clear()
    train_gan(cfg, fake_split, hooks=[On(report=reports.append), signalled])
    assert lines[-1] == "[preempt] a worker got SIGTERM: checkpoint at step 2" and exits == [1, 1]
    assert reports[0].metrics["step"] == 2  # then every report exits (here: returns, so the loop went on)


def test_a_worker_dying_while_the_group_starts_is_fitted_again_up_to_max_failures():
    """Ray Train ends a run whose worker died during the group's start (a controller error it is told not to retry,
    so that a start that times out ends the run): the driver fits the run again, which resumes from its recorded
    checkpoint, up to train.max_failures times; a start that timed out is not retried."""
    from types import SimpleNamespace

    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    from pipeline.distributed.run import fit_again_after_failed_starts

    cfg = load_config(CONFIGS / "smoke.yaml", ["train.max_failures=2"])
    lines = []
    request = SimpleNamespace(name="r", verbose=False, progress=lines.append)

    def executor(*failures):
        left = list(failures)

        def fit(*_):
            if left:
                raise left.pop(0)
            return "trained"

        return SimpleNamespace(fit=fit, left=left)

    died = ControllerError(WorkerGroupStartupFailedError("At least one of the worker actors failed to initialize."))
    assert fit_again_after_failed_starts(cfg, request, executor(died, died), None, False, None) == "trained"
    assert lines == [
        f"[train] a worker died while the worker group started; starting it again from the recorded checkpoint "
        f"({n} of train.max_failures=2)"
        for n in (1, 2)
    ]
    with pytest.raises(ControllerError):
        fit_again_after_failed_starts(cfg, request, executor(died, died, died), None, False, None)
    timed_out = executor(ControllerError(WorkerGroupStartupTimeoutError(1)))
    with pytest.raises(ControllerError):
        fit_again_after_failed_starts(cfg, request, timed_out, None, False, None)
    assert timed_out.left == []  # raised at the first try


# ---------------------------------------------------------------------------------------------- divergence


def test_nan_loss_raises_diverged(fake_split):
    cfg = load_config(CONFIGS / "smoke.yaml", ["optim.lr_d=1.0e+30", "optim.lr_g=1.0e+30", "train.epochs=2"])
    with pytest.raises(DivergedError, match="diverged at epoch 1"):
        train_gan(cfg, fake_split)


@pytest.mark.slow
def test_a_diverging_run_is_tagged_and_stops_cleanly(tmp_path):
    uri, store = _store(tmp_path)
    result = run_cli(
        "train",
        "-c",
        "configs/smoke.yaml",
        "--set",
        "optim.lr_d=1.0e+30",
        "--set",
        "optim.lr_g=1.0e+30",
        *store,
        "--name",
        "nan",
    )
    assert result.returncode == 1
    assert "diverged" in result.stderr and "lower optim.lr_g / optim.lr_d" in result.stderr
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("gan-pipeline").experiment_id])
    assert run.data.tags["status"] == "diverged" and run.info.status == "FAILED"


# ---------------------------------------------------------------------------------------------- a worker dies


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_restarts_from_the_checkpoint(tmp_path):
    """Rank 1 exits at step 120 (late in epoch 2 of 3): Ray restarts the group from the epoch-1 checkpoint.

    Ray Train's controller registers a reported checkpoint when it next polls the workers (every 2 s by
    default): the test polls every 0.2 s so that a 4,096-image epoch leaves time to register it.
    """
    uri, store = _store(tmp_path)
    env = {
        "PIPELINE_FAULT_AT_STEP": "120",
        "PIPELINE_FAULT_RANK": "1",
        "PIPELINE_FAULT_ONCE": str(tmp_path / "fault"),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }
    secret = "s3cr3t-do-not-log"
    result = run_cli(
        "train",
        "-c",
        "configs/smoke.yaml",
        "--set",
        "scaling.num_workers=2",
        "--set",
        "train.epochs=3",
        "--set",
        "data.limit=4096",
        "--set",
        "tracking.log_every=8",
        *store,
        "--name",
        "fault",
        env={**env, "AWS_SECRET_ACCESS_KEY": secret},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fault").exists()  # the fault really fired
    # From the checkpoint Ray Train had recorded when the worker died: epoch 1's (step 64), the only one before
    # step 120, unless its controller had not registered it yet, and then from the start.
    output = result.stdout + result.stderr
    resumed = re.search(r"resuming from epoch (\d+) \(step (\d+)\)", output)
    assert resumed is None or resumed.groups() == ("1", "64"), resumed
    # One line says what happened and what follows; Ray's tracebacks of it only with --verbose.
    (lost,) = re.findall(r"\[train\] lost worker\(s\) rank 1 \(.*", output)
    assert ("resumes from epoch 1 (step 64)" if resumed else "starts over") in lost, lost
    assert "Traceback" not in output, output[-5000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("gan-pipeline").experiment_id])
    assert len(runs) == 1  # exactly one MLflow run
    run_id = runs[0].info.run_id
    # Steps are logged only once the report (and checkpoint) they follow is out: a restart from that checkpoint
    # recomputes none that are logged. The tracker drops a recomputed point and counts it: from epoch 1's
    # checkpoint none may be counted; a restart from the start recomputes epoch 1's logged steps.
    replayed = client.get_run(run_id).data.tags.get("replayed_steps")
    assert replayed is None if resumed else int(replayed) > 0, (resumed, replayed)
    # 4,096 images / batch 64 = 64 steps per epoch; losses every 8 steps; 3 epochs, counted right
    assert [m.step for m in client.get_metric_history(run_id, "loss_d")] == list(range(8, 193, 8))
    assert [m.step for m in client.get_metric_history(run_id, "fid")] == [64, 128, 192]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    logged = [*run.data.params.values(), *run.data.tags.values()]
    assert not any(secret in value for value in logged)  # no environment variable reaches MLflow


def test_a_sigterm_to_a_worker_checkpoints_at_that_step_and_the_run_resumes_there(tmp_path):
    """A spot notice as a SIGTERM to rank 1 at step 44 (inside epoch 2 of 2, 32 steps each): at the next check (every
    tracking.log_every=4 steps) the run checkpoints, the signalled worker exits, and Ray Train restarts the group from
    that step, not from epoch 1's checkpoint (step 32); every step is logged once."""
    uri, store = _store(tmp_path)
    env = {
        "PIPELINE_FAULT_AT_STEP": "44",
        "PIPELINE_FAULT_RANK": "1",
        "PIPELINE_FAULT": "sigterm",
        "PIPELINE_FAULT_ONCE": str(tmp_path / "fault"),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }
    result = run_cli(
        "train",
        "-c",
        "configs/smoke.yaml",
        "--set",
        "scaling.num_workers=2",
        "--set",
        "train.epochs=2",
        "--set",
        "data.limit=2048",
        "--set",
        "tracking.log_every=4",
        *store,
        "--name",
        "preempted",
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    (noticed,) = re.findall(r"\[preempt\] a worker got SIGTERM: checkpoint at step (\d+)", output)
    assert 44 <= int(noticed) <= 52, noticed  # the first checks after the signal (its handler runs within a poll)
    assert "[preempt] checkpoint reported; this worker exits (SIGTERM)" in output
    assert re.search(rf"resuming from epoch 1 \(step {noticed}\)", output), output[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gan-pipeline").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_d")] == list(range(4, 65, 4))
    assert "replayed_steps" not in run.data.tags  # nothing trained twice: the restart began at the checkpoint


def test_every_torch_load_is_weights_only():
    """Security: a checkpoint or cached evaluator cannot run code when loaded."""
    import re
    from pathlib import Path

    sources = (Path(__file__).resolve().parent.parent / "pipeline").rglob("*.py")
    calls = [(p.name, m.group(0)) for p in sources for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())]
    assert calls and all("weights_only=True" in call for _, call in calls), calls
