"""`python -m pipeline bench`: a real (quick) run on the smoke model gives every documented key, consistently."""

import json

import pytest

from tests.conftest import run_cli

KEYS = (
    "plain_img_s",
    "ray1_img_s",
    "rayn_img_s",
    "num_workers_n",
    "flops_per_img",
    "peak_gflops",
    "fraction_of_peak",
    "eval_s_per_10k",
    "epoch_s",
    "start_to_first_step_s",
)


@pytest.mark.slow
def test_bench_quick_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench",
        "--quick",
        "-c",
        "configs/smoke.yaml",
        "--set",
        f"train.storage_path={tmp_path / 'runs'}",
        "--out",
        str(out),
        "--sweep",
        env={"RAY_ADDRESS": ""},
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert all(r[k] > 0 for k in KEYS), {k: r.get(k) for k in KEYS}
    assert r["num_workers_n"] == r["cpus"]
    assert r["rounds"] == len(r["per_round"]) == 1  # --quick: one round
    for label in ("plain", "ray1", "rayn", "rayn_nosync"):
        assert r[f"{label}_img_s_min"] <= r[f"{label}_img_s"] <= r[f"{label}_img_s_max"]
    assert r["peak_gflops"] >= r["peak_mm_gflops"] > 0
    assert r["fraction_of_peak"] == pytest.approx(r["plain_img_s"] * r["flops_per_img"] / 1e9 / r["peak_gflops"])
    assert r["epoch_s"] == pytest.approx(60_000 / r["rayn_img_s"])
    assert r["rayn_nosync_vs_ray1"] == pytest.approx(r["rayn_nosync_img_s"] / r["ray1_img_s"])
    assert "| Ray Train, 1 worker |" in result.stdout and "| plain loop, no Ray |" in result.stdout
    # --sweep: a real sweep, one trial per CPU with --quick, each started once; where its hardware's time went.
    assert r["sweep_trials"] == r["cpus"] == r["sweep_trial_starts"]
    assert 0 < r["sweep_busy_fraction"] <= 1 and r["sweep_capacity"] == r["cpus"]
    assert 0 < r["sweep_start_median_s"] <= r["sweep_start_max_s"] < r["sweep_wall_s"]
    assert r["sweep_train_s"] <= r["sweep_wall_s"] * r["sweep_capacity"] and r["sweep_eval_s"] > 0
    assert "sweep: trial start to first step" in result.stdout


@pytest.mark.parametrize(("flag", "value"), [("--rounds", "0"), ("--workers", "0")])
def test_bench_refuses_a_bad_count_before_measuring(flag, value):
    result = run_cli("bench", "--quick", flag, value, timeout=120)
    assert result.returncode != 0
    assert f"{flag}: {value} must be >= 1" in result.stderr
    assert "[bench]" not in result.stdout  # nothing was measured


def test_bench_without_a_config_plans_the_mnist_one():
    from pipeline.tools.bench import BenchOptions, plan

    run = plan(BenchOptions())  # a tool or script that names no config: configs/mnist.yaml, from the project root
    assert run.cfg.data.dataset == "mnist" and run.rounds == 3 and run.steps == 10 + 20 * 5 + 1
