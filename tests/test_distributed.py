"""Ray Train runs on a real local Ray, recorded in a real (sqlite) MLflow store. Slow: each run starts Ray."""

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config.load import load_config
from pipeline.core import checkpoint
from pipeline.data.kinds import load
from pipeline.gan.loop import train_gan
from tests.conftest import CONFIGS, run_cli, run_python

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path):
    """An isolated storage path and sqlite MLflow store, passed as config overrides."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["--set", f"train.storage_path={tmp_path / 'runs'}", "--set", f"tracking.uri={uri}"]
    return {"uri": uri, "overrides": overrides, "dir": tmp_path}


def _run_id(stdout: str) -> str:
    return next(line.split()[-1] for line in stdout.splitlines() if line.startswith("MLflow run id:"))


def test_two_workers_then_resume_then_sample(store, tmp_path):
    first = run_cli(
        "train",
        "-c",
        "configs/smoke.yaml",
        "--set",
        "scaling.num_workers=2",
        *store["overrides"],
        "--name",
        "two",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "epoch 2/2" in first.stdout + first.stderr
    for quiet in ("Traceback", "Reporting training result", "TrainingReport(", "Token authentication is enabled"):
        assert quiet not in first.stdout + first.stderr, quiet
    assert "mlflow ui --backend-store-uri" in first.stdout
    experiment = MlflowClient(store["uri"]).get_run(_run_id(first.stdout)).info.experiment_id
    assert (
        f"then open http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning" in first.stdout
    )
    run_id = _run_id(first.stdout)

    client = MlflowClient(store["uri"])
    run = client.get_run(run_id)
    params = run.data.params
    assert (params["lr_g"], params["latent_dim"], params["num_workers"], params["epochs"]) == (
        "0.0002",
        "16",
        "2",
        "2",
    )
    assert {"dataset", "batch_size", "g_channels", "d_channels", "seed", "lr_d"} <= set(params)
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["device"] == "cpu"
    assert tags["torch_version"] == torch.__version__ and "ray_version" in tags and "git_commit" in tags
    assert run.info.status == "FINISHED"
    # smoke: 512 images / batch 64 = 8 steps per epoch, log_every 2 -> steps 2, 4, ..., 16
    for key in ("loss_d", "loss_g", "d_real", "d_fake"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(2, 17, 2)), key
    assert [m.step for m in client.get_metric_history(run_id, "images_per_s")] == [8, 16]
    fids = [m.value for m in client.get_metric_history(run_id, "fid")]
    assert len(fids) == 2 and all(f > 0 for f in fids)
    assert [m.step for m in client.get_metric_history(run_id, "inception_score")] == [8, 16]
    assert client.get_metric_history(run_id, "best_fid")[-1].value == min(fids)
    assert len(client.get_metric_history(run_id, "epoch_time_s")) == 2
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"loss_curve.png", "samples", "checkpoints"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "samples")} == {
        "samples/epoch_001.png",
        "samples/epoch_002.png",
        "samples/nearest_training.png",  # the memorisation check at the run's end
    }

    import os

    import mlflow

    from pipeline.tracking.store import using_tracking_uri

    with using_tracking_uri(store["uri"]):
        generator = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # nothing leaks into later subprocesses
    out = generator(torch.randn(3, 16))
    assert out.shape == (3, 1, 28, 28) and out.abs().max() <= 1

    # Resume with one more epoch: the epoch count continues, the MLflow run is the same one.
    again = run_cli(
        "train",
        "-c",
        "configs/smoke.yaml",
        "--set",
        "scaling.num_workers=2",
        "--set",
        "train.epochs=3",
        *store["overrides"],
        "--resume",
        "two",
        "--verbose",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from epoch 2" in again.stdout + again.stderr
    assert "Reporting training result" in again.stdout + again.stderr  # --verbose shows Ray's own lines
    assert _run_id(again.stdout) == run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss_d")] == list(range(2, 25, 2))
    assert client.get_run(run_id).data.tags["resumed_with.epochs"] == "3"
    assert len(client.search_runs([run.info.experiment_id])) == 1

    out_file = tmp_path / "samples.npz"
    sampled = run_cli(
        "sample",
        "--run-id",
        run_id,
        "--num",
        "10",
        "--out",
        str(out_file),
        "--grid",
        str(tmp_path / "g.png"),
        "--tracking-uri",
        store["uri"],
    )
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    images = np.load(out_file)["images"]
    assert images.shape == (10, 28, 28) and images.dtype == np.uint8
    assert (tmp_path / "g.png").stat().st_size > 0

    unknown = run_cli("sample", "--run-id", "0" * 32, "--out", str(tmp_path / "x.npz"), "--tracking-uri", store["uri"])
    assert unknown.returncode == 2 and "no MLflow run" in unknown.stderr and "Traceback" not in unknown.stderr


def test_ray_train_workers_train_what_one_process_trains(tmp_path):
    """Two Ray Train workers (Ray's process group and prepare_model) with model.sync_batchnorm take the steps one
    process takes over the same global batches. Four float32 steps: tests/test_ddp.py proves the loop's data
    parallelism over 20 steps in float64, where GAN training's sensitivity to float rounding cannot hide a bug.
    """
    import ray

    from pipeline.data.kinds import source_of
    from pipeline.distributed.prepare import prepare_inputs
    from pipeline.distributed.ray_runtime import init_ray
    from pipeline.distributed.train_run import build_trainer
    from pipeline.distributed.worker import WorkerJob

    cfg = load_config(
        CONFIGS / "smoke.yaml",
        [
            "data.limit=256",
            "train.batch_size=64",
            "train.epochs=1",
            "scaling.num_workers=2",
            "model.sync_batchnorm=true",
            f"train.storage_path={tmp_path}",
        ],
    )
    init_ray()
    try:
        job = WorkerJob(cfg, source_of(cfg.data), evaluator=prepare_inputs(cfg))
        result = build_trainer(job, "dp-step").fit()
    finally:
        ray.shutdown()
    trained = checkpoint.load(f"{result.checkpoint.path}/{checkpoint.FILENAME}")
    assert trained["step"] == 4
    # Quality metrics travel in Ray Train's reported results (what Tune optimises).
    assert result.metrics["fid"] > 0 and 1 <= result.metrics["inception_score"] <= 10

    alone = train_gan(cfg, load(cfg.data)).state
    expected = {f"generator.{k}": v for k, v in alone.generator.state_dict().items()}
    expected |= {f"discriminator.{k}": v for k, v in alone.discriminator.state_dict().items()}
    for name, optimizer in (("opt_g", alone.opt_g), ("opt_d", alone.opt_d)):
        for index, moments in optimizer.state_dict()["state"].items():
            expected |= {f"{name}.{index}.{k}": v for k, v in moments.items()}
    for key, want in expected.items():
        first, *rest = key.split(".")
        got = (
            trained[first]["state"][int(rest[0])][rest[1]]
            if first.startswith("opt")
            else trained[first][".".join(rest)]
        )
        # float32 sums in another order: within 1e-5 of the tensor's largest value after four steps.
        scale = want.abs().max().float().clamp_min(1e-30)
        assert (got.float() - want.float()).abs().max() <= 1e-5 * scale, key


def test_ray_actors_ask_their_own_ray_with_another_ray_started_after_it(capsys):
    """Ray Train's actors ask Ray's state API, without an address, whether the controller lives. With a
    second local Ray on the machine (another run started after this one) Ray could not tell which to ask
    and every run printed 'Found multiple active Ray instances' from its PlacementGroupCleaner."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    import ray

    from pipeline.distributed.ray_runtime import init_ray

    init_ray()
    # The raylet's messages reach the console through Ray's print_to_stdstream, the workers' lines through
    # the log dispatcher: the noise filter sits in front of both.
    from ray._private import worker as ray_worker

    raylet = "WARNING: 8 PYTHON worker processes have been started on node: 1ead7 with address: 192.0.2.2"
    ray_worker.print_to_stdstream({"lines": [raylet, "a line to keep"], "pid": "raylet", "is_err": False}, False)
    printed = capsys.readouterr().out
    assert "a line to keep" in printed and "PYTHON worker processes" not in printed

    with tempfile.TemporaryFile(mode="w+") as log:
        other = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import ray, time; ray.init(address='local', num_cpus=1); print('up', flush=True); time.sleep(300)",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        try:
            if other.stdout.readline().strip() != "up":
                log.seek(0)
                pytest.fail(f"the second Ray did not start: {log.read()[-3000:]}")

            @ray.remote(num_cpus=0)
            class Probe:
                def state_of(self, actor_id: str) -> str:
                    from ray._private.services import find_gcs_addresses
                    from ray.util.state import get_actor

                    assert len(find_gcs_addresses()) >= 2  # the situation that failed is there
                    return get_actor(actor_id, timeout=20).state

            probe = Probe.remote()
            assert ray.get(probe.state_of.remote(probe._actor_id.hex()), timeout=120) == "ALIVE"
        finally:
            os.killpg(other.pid, signal.SIGTERM)
            other.wait(timeout=60)
            ray.shutdown()
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # nothing leaks into later runs of this process


def test_rays_log_folding_is_off_even_where_ray_was_imported_first():
    """Ray folds lines that differ only in their numbers (one trial's epoch line into another's) unless
    RAY_DEDUP_LOGS=0, which it reads once, at import: a `ray job submit` entrypoint or a script may import ray
    before our code can set it."""
    script = (
        "import os; os.environ.pop('RAY_DEDUP_LOGS', None)\n"
        "import ray\n"
        "from ray._private import ray_logging\n"
        "before = ray_logging.RAY_DEDUP_LOGS\n"
        "from pipeline.distributed.ray_runtime import init_ray\n"
        "init_ray()\n"
        "print(before, ray_logging.RAY_DEDUP_LOGS)\n"
        "ray.shutdown()\n"
    )
    done = run_python("-c", script, env={"RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", "False"], done.stdout
