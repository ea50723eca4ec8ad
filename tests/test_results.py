"""The report path's encoding and its driver end (pipeline.distributed.results): a typed report survives Ray's
dict, a diverged run's result ranks last on every metric, and the driver ends a run from its last report alone
(a divergence is one typed report end to end, not a tag read back from the store)."""

import types

import pytest

from pipeline.distributed.results import FIRST_KEYS, Reports, report_kind, result_resize_to, to_result
from pipeline.eval.metrics import METRICS
from pipeline.gan.reports import Diverged, EpochEnd, Interval, Pause


@pytest.mark.parametrize(
    "report",
    [
        EpochEnd({"epoch": 1, "step": 4, "loss_d": 1.0, "fid": 9.0}, None),
        Interval({"step": 3, "loss_d": 1.0}, None),
        Pause({"step": 6}, None, resize_to=2),
        Diverged.at(2),
    ],
)
def test_a_report_survives_rays_dict(report):
    result = to_result(report)
    assert report_kind(result) is type(report)
    assert result_resize_to(result) == (2 if isinstance(report, Pause) else None)
    present = [key for key in FIRST_KEYS if key in result]
    assert list(result)[: len(present)] == present  # Tune's status table shows a result's first keys


def test_a_diverged_result_ranks_last_on_every_metric_and_old_states_still_say_so():
    result = to_result(Diverged.at(3))
    for metric in METRICS.values():
        assert all(not metric.better(result[metric.name], value) for value in (0.0, 1.0, 1e9))
    assert report_kind({"diverged": 1, "epoch": 1}) is Diverged  # a result saved before the typed reports
    assert report_kind({"epoch": 1}) is EpochEnd  # one without the key


def test_the_driver_keeps_the_last_report_and_hands_each_on():
    handed = []
    reports = Reports(then=lambda result, checkpoint: handed.append((result.get("step"), checkpoint)))
    reports(to_result(EpochEnd({"step": 4}, None)), "ckpt")
    assert not reports.diverged and handed == [(4, "ckpt")]
    reports(to_result(Diverged.at(2)), None)
    assert reports.diverged and reports.last["epoch"] == 2 and len(handed) == 2


def test_a_run_whose_last_report_diverged_ends_failed_from_that_report(tmp_path, smoke_cfg):
    """conclude reads the driver's last report: no worker wrote a tag for it to read back."""
    from mlflow.tracking import MlflowClient

    from pipeline.distributed.lifecycle import RunDiverged
    from pipeline.distributed.prepare import RunRequest
    from pipeline.distributed.run import conclude
    from pipeline.tracking.store import start_run
    from pipeline.tracking.tracker import tracker_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "gan-pipeline", "r", {})
    reports = Reports()
    reports(to_result(EpochEnd({"epoch": 1, "step": 8}, None)), None)
    reports(to_result(Diverged.at(2)), None)
    result = types.SimpleNamespace(metrics={"epoch": 1, "step": 8}, checkpoint=None)  # Train's: the last checkpoint
    with pytest.raises(RunDiverged, match="diverged at epoch 2"):
        conclude(smoke_cfg, RunRequest("r"), tracker_for(uri, run_id), str(tmp_path), result, reports)
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "diverged"
    assert run.data.tags["diverged_epoch"] == "2"


def test_a_diverged_trial_that_tune_stops_at_that_report_is_ended_failed_by_the_sweep(tmp_path):
    """Tune may stop a diverged trial at its last report (its FID ranks last), before the trial's driver ends the
    run: the sweep's callback ends it from Tune's last result, with the same tags a driver writes."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from pipeline.sweep.report import close_child_runs
    from pipeline.tracking.store import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "gan-pipeline", "t1", {"sweep": "s", "trial_id": "t1"})
    closing = close_child_runs(uri, "gan-pipeline", "s", 3)
    closing.on_trial_complete(1, [], SimpleNamespace(trial_id="t1", last_result=to_result(Diverged.at(2))))
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "diverged"
    assert run.data.tags["diverged_epoch"] == "2"
