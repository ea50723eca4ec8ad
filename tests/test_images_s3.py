"""Your own images on S3 (a real S3 endpoint on 127.0.0.1): prepared from the bucket into shards in the bucket,
bad buckets refused before anything is written, and a 2-worker data-parallel run that streams its shards from
S3, resumes, and samples 64x64 RGB images. Slow: real Ray and MLflow."""

import json
import re

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, sweep_runs
from tests.image_folders import make_folder
from tests.servers import S3Server

pytestmark = pytest.mark.slow

BUCKET = "photos"
SOURCE = f"s3://{BUCKET}/shapes"
PREPARED = f"s3://{BUCKET}/shapes.prepared/64px-3ch"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The S3 server with a labelled folder of shapes (60 a class, plus two broken files) under s3://photos/shapes."""
    base = tmp_path_factory.mktemp("images-s3")
    server = S3Server(base)
    try:
        server.make_bucket(BUCKET)
        folder = make_folder(base / "shapes", 60)
        client = server.client()
        for path in folder.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"shapes/{path.relative_to(folder).as_posix()}")
        yield server
    finally:
        server.stop()


def test_a_folder_on_s3_is_prepared_into_the_bucket_once_and_bad_buckets_are_refused(s3):
    args = ["data", "prepare", "--dataset", "images", "--path", SOURCE, "--image-size", "64", "--channels", "3"]
    first = run_cli(*args, env=s3.env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"images: ready in {PREPARED}" in first.stdout
    keys = s3.keys(BUCKET, "shapes.prepared/")
    manifest = json.loads(
        s3.client().get_object(Bucket=BUCKET, Key=f"{PREPARED[len('s3://photos/') :]}/manifest.json")["Body"].read()
    )
    assert manifest["classes"] == ["circle", "square", "triangle"] and manifest["skipped"] == 2
    shards = [s["file"] for split in manifest["shards"].values() for s in split]
    assert sorted(keys) == sorted(f"shapes.prepared/64px-3ch/{name}" for name in [*shards, "manifest.json"])
    again = run_cli(*args, env=s3.env)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    # A bucket that does not exist, a prefix with nothing in it: one line, exit 2, nothing written anywhere.
    before = s3.keys(BUCKET)
    for path, message in (
        ("s3://nobucket/shapes", "the bucket 'nobucket' does not exist"),
        (f"s3://{BUCKET}/nothing", "is not a folder"),
    ):
        bad = run_cli("data", "prepare", "--dataset", "images", "--path", path, "--image-size", "64", env=s3.env)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, bad.stderr
    assert s3.keys(BUCKET) == before


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One data root for the module: the folder's evaluator is trained once, then found in its cache."""
    return tmp_path_factory.mktemp("data-root")


def test_two_workers_stream_their_shards_from_s3_resume_and_sample_64px_rgb(s3, data_root, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        "-c",
        "configs/smoke.yaml",
        "--set",
        "data.dataset=images",
        "--set",
        f"data.path={SOURCE}",
        "--set",
        "data.image_size=64",
        "--set",
        "data.channels=3",
        "--set",
        "data.limit=null",
        "--set",
        "data.stream=true",
        "--set",
        f"data.root={data_root}",
        "--set",
        "scaling.num_workers=2",
        "--set",
        f"train.storage_path={tmp_path / 'runs'}",
        "--set",
        f"tracking.uri={uri}",
    ]
    first = run_cli("train", *common, "--set", "train.epochs=1", "--name", "rgb", env=s3.env, timeout=900)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output[-4000:]
    assert "streaming" in output and "2 worker(s)" in output
    run_id = re.search(r"MLflow run id: (\w+)", first.stdout).group(1)
    client = MlflowClient(uri)
    fids = client.get_metric_history(run_id, "fid")
    assert len(fids) == 1 and all(np.isfinite(f.value) for f in fids)  # the folder's own evaluator scored it
    again = run_cli("train", *common, "--set", "train.epochs=2", "--resume", "rgb", env=s3.env, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming from epoch 1" in again.stdout + again.stderr
    assert len(client.get_metric_history(run_id, "fid")) == 2

    out = tmp_path / "samples.npz"
    sampled = run_cli("sample", "--run-id", run_id, "--tracking-uri", uri, "--out", str(out), "--num", "16")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    with np.load(out) as saved:
        assert saved["images"].shape == (16, 3, 64, 64) and saved["images"].dtype == np.uint8


def test_a_sweep_of_two_data_parallel_trials_on_the_folder_in_s3(s3, data_root, tmp_path):
    """Each trial is a 2-worker Ray Train run streaming the S3 shards, scored by the folder's evaluator; the
    sweep is a parent run with one finished child per trial."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {
        "data.dataset": "images",
        "data.path": SOURCE,
        "data.image_size": "64",
        "data.channels": "3",
        "data.limit": "null",
        "data.stream": "true",
        "data.root": str(data_root),
        "scaling.num_workers": "2",
        "train.epochs": "1",
        "train.storage_path": str(tmp_path / "runs"),
        "tracking.uri": uri,
        "tune.num_samples": "2",
        "tune.scheduler": "none",
        "tune.search_space": "{optim.lr_g: {loguniform: [1.0e-4, 1.0e-3]}}",
    }
    args = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    done = run_cli("tune", "-c", "configs/smoke.yaml", *args, "--name", "rgb-sweep", env=s3.env, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    _, children = sweep_runs(uri)
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["world_size"] == "2", child.data.tags
        assert len(MlflowClient(uri).get_metric_history(child.info.run_id, "fid")) == 1
