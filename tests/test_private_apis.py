"""Every private Ray and MLflow API the project touches has a probe (the PRIVATE_APIS of
pipeline.distributed.ray_runtime, pipeline.sweep.tune_internals and pipeline.tracking.store): each passes against the
installed versions, and each fails with a message that names its API when that API moves (here: broken on purpose,
one at a time)."""

import pytest

from pipeline.core.errors import PrivateApiChanged
from pipeline.distributed import ray_runtime
from pipeline.sweep import tune_internals
from pipeline.tracking import store as tracking

PROBES = {**ray_runtime.PRIVATE_APIS, **tune_internals.PRIVATE_APIS, **tracking.PRIVATE_APIS}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_each_private_api_is_where_the_code_expects_it(name):
    PROBES[name]()


def _break_printer(monkeypatch):
    from ray._private import worker

    monkeypatch.delattr(worker, "print_to_stdstream")


def _break_printer_registration(monkeypatch):
    from ray._private import worker

    def connect(*args, **kwargs):
        dispatcher.add_handler("ray_print_logs", print_logs)  # noqa: F821 - never run: only its source is read

    monkeypatch.setattr(worker, "connect", connect)


def _break_state_api_address(monkeypatch):
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE", "RAY_STATE_API_ADDRESS")


def _break_auth_notice(monkeypatch):
    monkeypatch.setattr(ray_runtime, "RAY_AUTH_ON_NOTICE", "Token authentication is now announced otherwise")


def _break_startup_timeout(monkeypatch):
    from ray.train.v2._internal import exceptions

    monkeypatch.delattr(exceptions, "WorkerGroupStartupTimeoutError")


def _break_log_dedup(monkeypatch):
    from ray._private import ray_logging

    monkeypatch.delattr(ray_logging, "RAY_DEDUP_LOGS")


def _break_health_check_errors(monkeypatch):
    from ray.train.v2._internal import exceptions

    class Renamed(exceptions.WorkerHealthCheckFailedError):
        def __init__(self, message, failure):
            super().__init__("no worker description", failure)

    monkeypatch.setattr(exceptions, "WorkerHealthCheckFailedError", Renamed)


def _break_train_constants(monkeypatch):
    from ray.train.v2._internal import constants

    monkeypatch.setattr(constants, "CHECKPOINT_MANAGER_SNAPSHOT_FILENAME", "checkpoints.json")


def _break_train_record(monkeypatch):
    from ray.train.v2._internal.execution.checkpoint import checkpoint_manager

    monkeypatch.delattr(checkpoint_manager, "_CheckpointManagerState")


def _break_pbt_counter(monkeypatch):
    from ray.tune import schedulers

    class Renamed(schedulers.PopulationBasedTraining):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            del self._num_perturbations

    monkeypatch.setattr(schedulers, "PopulationBasedTraining", Renamed)


def _break_tune_controller(monkeypatch):
    from ray.tune.execution.tune_controller import TuneController

    monkeypatch.setattr(TuneController, "checkpoint", lambda self, force=False: None)


def _break_propagated_env(monkeypatch):
    from ray.tune.execution import class_cache

    def get(self, trainable_cls):  # a Ray that takes the variables to copy from elsewhere
        return trainable_cls

    monkeypatch.setattr(class_cache._ActorClassCache, "get", get)


def _break_tracking_uri(monkeypatch):
    from mlflow.tracking._tracking_service import utils

    monkeypatch.delattr(utils, "_tracking_uri")


def _break_system_metrics(monkeypatch):
    from mlflow.system_metrics import system_metrics_monitor

    class Monitor:
        def __init__(self, run_id, sampling_interval=10):
            pass

    monkeypatch.setattr(system_metrics_monitor, "SystemMetricsMonitor", Monitor)


BREAKS = {
    "worker output printer": (_break_printer, "print_to_stdstream"),
    "state API address": (_break_state_api_address, "RAY_API_SERVER_ADDRESS"),
    "token authentication notice": (_break_auth_notice, ray_runtime.AUTH_LOGGER),
    "Train worker-group start timeout": (_break_startup_timeout, "WorkerGroupStartupTimeoutError"),
    "log deduplication flag": (_break_log_dedup, "ray_logging.RAY_DEDUP_LOGS"),
    "Train worker health-check errors": (_break_health_check_errors, "WorkerHealthCheckFailedError"),
    "Train constants and variables": (_break_train_constants, "ray.train.v2._internal.constants"),
    "Train checkpoint record": (_break_train_record, "latest_checkpoint_result.checkpoint_dir_name"),
    "PBT exploit counter": (_break_pbt_counter, "PopulationBasedTraining._num_perturbations"),
    "Tune controller": (_break_tune_controller, "TuneController"),
    "Tune's environment copied to trials": (_break_propagated_env, "class_cache.ENV_VARS_TO_PROPAGATE"),
    "MLflow's global tracking URI": (_break_tracking_uri, "_tracking_service.utils._tracking_uri"),
    "MLflow's system-metrics monitor": (_break_system_metrics, "SystemMetricsMonitor"),
}


def test_every_probe_has_a_break_below():
    assert sorted(BREAKS) == sorted(PROBES)


def test_the_printer_probe_also_sees_the_handler_registration_change(monkeypatch):
    _break_printer_registration(monkeypatch)
    with pytest.raises(PrivateApiChanged, match="ray_print_logs"):
        PROBES["worker output printer"]()


def test_a_damaged_train_record_names_no_checkpoint():
    """Ray Train's record of a run's checkpoints, read for the check before a resume: a torn or binary one is
    treated as no record (Ray would not resume from it either), never a crash."""
    assert (
        ray_runtime.latest_recorded_checkpoint(b'{"latest_checkpoint_result": {"checkpoint_dir_name": "c_1"}}') == "c_1"
    )
    assert ray_runtime.latest_recorded_checkpoint(b"\xff\xfe not json") is None
    assert ray_runtime.latest_recorded_checkpoint('{"latest_checkpoint_result": null}') is None
    assert ray_runtime.latest_recorded_checkpoint("[1, 2]") is None


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_a_moved_private_api_fails_its_probe_with_its_name(monkeypatch, name):
    breaks, named = BREAKS[name]
    breaks(monkeypatch)
    with pytest.raises(PrivateApiChanged, match=named.replace(".", r"\.")):
        PROBES[name]()
