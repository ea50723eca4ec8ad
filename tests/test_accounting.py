"""The sweep's accounting (pipeline.sweep.accounting): sums over reports, busy_fraction, start medians."""

import math

import pytest

from pipeline.sweep.accounting import TrialTime, sweep_time


def test_a_trial_sums_its_reports_and_keeps_each_start():
    reports = [
        {
            "worker_s": 10.0,
            "eval_time_s": 2.0,
            "checkpoint_s": 0.0,
            "start_s": 20.0,
            "start_driver_s": 4.0,
            "start_workers_s": 8.0,
            "start_data_s": 3.0,
            "start_setup_s": 5.0,
        },
        {"worker_s": 10.0, "checkpoint_s": 0.5, "eval_time_s": float("nan")},  # a report without scores
        {"worker_s": 8.0, "eval_time_s": 2.0, "checkpoint_s": 0.5, "start_s": 14.0},  # restarted (PBT pause)
        {"epoch": 3},  # a report without the keys (a diverged run's last one)
    ]
    t = TrialTime.of(reports)
    assert (t.worker_s, t.eval_s, t.checkpoint_s) == (28.0, 4.0, 1.0)
    assert t.starts == (20.0, 14.0) and t.start_median_s == 17.0
    assert t.phases == ((4.0, 8.0, 3.0, 5.0), (0.0, 0.0, 0.0, 0.0))


def test_busy_fraction_is_resource_seconds_in_steps_over_the_hardware_held():
    a = TrialTime(worker_s=300.0, eval_s=10.0, checkpoint_s=2.0, starts=(20.0, 30.0), phases=((4, 6, 5, 5),) * 2)
    b = TrialTime(worker_s=100.0, eval_s=5.0, checkpoint_s=1.0, starts=(40.0,), phases=((10, 20, 5, 5),))
    spent = sweep_time([a, b], wall_s=250.0, capacity=2.0, per_worker=1.0)
    assert spent.busy_fraction == pytest.approx(400.0 / 500.0)
    assert (spent.eval_s, spent.checkpoint_s, spent.trial_starts) == (15.0, 3.0, 3)
    assert (spent.start_median_s, spent.start_max_s, spent.start_workers_median_s) == (30.0, 40.0, 6)
    assert spent.start_driver_median_s == 4
    # Workers that hold two CPUs each use twice the hardware per worker-second.
    assert sweep_time([a, b], 250.0, 4.0, 2.0).busy_fraction == pytest.approx(0.8)
    assert "busy_fraction 0.80" in spent.line() and "median 30.0 s" in spent.line()
    assert spent.metrics()["busy_fraction"] == pytest.approx(0.8)
    # A thread-elastic trial's CPU-seconds beyond its reservation count too.
    grown = TrialTime.of([{"worker_s": 100.0, "grown_cpu_s": 50.0}])
    assert sweep_time([a, grown], 250.0, 2.0, 1.0).busy_fraction == pytest.approx(450.0 / 500.0)


def test_a_sweep_without_reports_has_no_start_figures():
    spent = sweep_time([TrialTime.of([])], wall_s=10.0, capacity=2.0, per_worker=1.0)
    assert spent.busy_fraction == 0.0 and math.isnan(spent.start_median_s)
    assert "start_median_s" not in spent.metrics() and "trial start" not in spent.line()
