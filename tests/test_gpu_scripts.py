"""The two scripts that run on a borrowed GPU machine, run here on the CPU so they cannot rot unnoticed."""

import json

import pytest
import torch

from tests.conftest import run_python


@pytest.mark.slow  # real MNIST and the evaluator
def test_gpu_curve_writes_fid_and_is_per_epoch(tmp_path):
    out = tmp_path / "curve.json"
    done = run_python("scripts/gpu_curve.py", "-c", "configs/smoke.yaml", "--set", "train.epochs=2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    curve = json.loads(out.read_text())
    assert [row["epoch"] for row in curve["epochs"]] == [1, 2]
    for row in curve["epochs"]:
        assert row["fid"] > 0 and 1.0 <= row["inception_score"] <= 10.0
        assert row["wall_s"] > 0
    assert "best FID" in done.stdout


@pytest.mark.slow
def test_gpu_check_runs_every_variant_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    # Two variants here (the whole table runs on a GPU; CI has none): the per-tensor Adam and bf16 at batch 1024.
    only = "fp32 per-tensor Adam,bf16 batch 1024"
    done = run_python(
        "scripts/gpu_check.py", "--allow-cpu", "--limit", "1024", "--epochs", "1", "--only", only, "--out", str(out)
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert report["all_reduce_ok"] is True
    labels = [row["variant"] for row in report["variants"]]
    assert "fp32 per-tensor Adam" in labels and "bf16 batch 1024" in labels
    assert all(row["finite"] and row["img_s_last_epoch"] > 0 for row in report["variants"])
    assert report["cpu_vs_device_max_abs_diff"] < 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_check_refuses_a_machine_without_a_gpu_unless_told():
    done = run_python("scripts/gpu_check.py")
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--allow-cpu" in done.stderr


@pytest.mark.slow  # real MNIST
def test_gpu_share_times_concurrent_processes(tmp_path):
    out = tmp_path / "share.json"
    done = run_python(
        "scripts/gpu_share.py",
        "--allow-cpu",
        "--counts",
        "1,2",
        "--epochs",
        "1",
        "--out",
        str(out),
        "--",
        "data.limit=512",
        "train.batch_size=64",
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["processes"] for row in rows] == [1, 2]
    assert len(rows[1]["img_s_each"]) == 2 and all(v > 0 for row in rows for v in row["img_s_each"])
    assert rows[1]["img_s_total"] == pytest.approx(sum(rows[1]["img_s_each"]))
    assert "| 2 |" in done.stdout
