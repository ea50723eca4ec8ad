"""Ray start-up, the console's filter for Ray's own lines, and every private API of Ray's core and Train the project
touches (Tune's are pipeline.sweep.tune_internals').

Each private API sits behind one function here, and :data:`PRIVATE_APIS` names a probe for each that fails with
a message naming the API when a Ray upgrade moves or changes it (tests/test_private_apis.py runs them all).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pipeline.core.errors import ConfigError, PrivateApiChanged
from pipeline.distributed.console import RAY_LOST_PEER, RAY_NOISE, RAY_NOISY_ACTORS, NoiseFilter

# A local Ray says that it turned token authentication on (as it should): hidden unless --verbose. Its
# warning that authentication is *off* is always shown.
RAY_AUTH_ON_NOTICE = "Token authentication is enabled for this Ray cluster"
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"

# Ray Train's record of a run's checkpoints, next to them; the one it names as latest is where a resumed run
# starts (a checkpoint uploaded but not yet recorded when the driver died is not used).
TRAIN_RECORD = "checkpoint_manager_snapshot.json"
# Ray Train's own variables (read by its controller and workers; Train propagates them from the driver).
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Where Ray's state API (which Train's actors ask whether the controller lives) finds the dashboard.
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


def init_ray(verbose: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a fresh local Ray (never a stale one)."""
    # Ray folds log lines that differ only in their numbers into one: that would hide every worker's and
    # trial's epoch line but the first. It reads the variable when it is imported: set it first.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    if ray.is_initialized():
        return
    _log_dedup_as_set()
    address = os.environ.get("RAY_ADDRESS") or "local"
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        logging.getLogger(AUTH_LOGGER).addFilter(_auth_on_notice)
    if address == "local":
        with _state_api_pinned() as dashboard_port:
            ray.init(address="local", log_to_driver=True, logging_level=level, dashboard_port=dashboard_port)
    else:
        ray.init(address=address, log_to_driver=True, logging_level=level)
    if not verbose:
        hide_worker_lines(RAY_NOISE, RAY_NOISY_ACTORS, RAY_LOST_PEER)


def check_ray_address() -> None:
    """Refuse Ray Client (``RAY_ADDRESS=ray://...``) before any work: its driver runs Tune in an actor on the
    cluster, where this process's care (the AWS keys kept out of trials' runtime environments, the console's
    masking) does not reach, and reads local paths the cluster does not have."""
    if os.environ.get("RAY_ADDRESS", "").startswith("ray://"):
        raise ConfigError(
            f"RAY_ADDRESS={os.environ['RAY_ADDRESS']!r} is a Ray Client address, which this pipeline does not use: "
            "run the command on a node of the cluster (RAY_ADDRESS=HEAD_IP:6379) or submit it with `ray job "
            "submit` (docs/clusters.md)"
        )


def _log_dedup_as_set() -> None:
    """Ray's log deduplication as $RAY_DEDUP_LOGS says now, also where Ray was imported before it was set (a
    `ray job submit` entrypoint, a script that imported ray first): Ray keeps the value it read at import."""
    from ray._private import ray_logging

    ray_logging.RAY_DEDUP_LOGS = os.environ.get("RAY_DEDUP_LOGS", "1").lower() not in ("0", "false")


def _auth_on_notice(record: Any) -> bool:
    """A logging filter (adding it twice keeps one): drops Ray's notice that authentication is on."""
    return not record.getMessage().startswith(RAY_AUTH_ON_NOTICE)


@contextlib.contextmanager
def _state_api_pinned() -> Iterator[int | None]:
    """Yield a free port for the local Ray's dashboard, with RAY_API_SERVER_ADDRESS naming it in the
    environment that the processes Ray starts inherit (restored in this one afterwards).

    Ray Train's actors ask Ray's state API whether the controller is alive without an address; with no
    address Ray looks for *the* Ray on this machine, and with a second local Ray running (two runs at once)
    it raises 'Found multiple active Ray instances' in every run's PlacementGroupCleaner."""
    if os.environ.get(STATE_API_ENV):  # the user's choice stands
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ[STATE_API_ENV] = f"http://127.0.0.1:{port}"
    try:
        yield port
    finally:
        del os.environ[STATE_API_ENV]


def hide_worker_lines(patterns: Sequence[str], actors: Sequence[str] = (), consequences: Sequence[str] = ()) -> None:
    """Put a `NoiseFilter` in front of Ray's printer of forwarded output: the workers' lines (through the
    printer the log dispatcher holds) and the raylet's messages (printed through the module's function). Ray
    has no public hook for this: if its internals moved, everything is printed as before."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    if (
        len(printers) != 1
        or not isinstance(printers[0], functools.partial)
        or not callable(getattr(ray_worker, "print_to_stdstream", None))
    ):
        return
    original = getattr(ray_worker.print_to_stdstream, "unfiltered", ray_worker.print_to_stdstream)
    noise = NoiseFilter(patterns, actors, consequences)

    def filtered(data: dict, ignore_prefix: bool) -> None:
        lines = noise(data.get("pid"), data.get("lines", []), data.get("actor_name") or "")
        if lines:
            original({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    filtered.unfiltered = original  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", functools.partial(filtered, **printers[0].keywords))


# --------------------------------------------------------------------------------------------------
# Ray Train


def startup_timed_out(exc: BaseException) -> bool:
    """Whether a Train run failed because its worker group could not start in time (a node lost for good)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(getattr(exc, "controller_failure", None), WorkerGroupStartupTimeoutError)


def startup_failed(exc: BaseException) -> bool:
    """Whether a Train run failed because a worker died while its group started (killed, its node lost): Ray Train
    counts that against its controller's failures, which a run allows none of (a startup that times out must end it)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError

    return isinstance(getattr(exc, "controller_failure", None), WorkerGroupStartupFailedError)


def lost_ranks(worker_exceptions: dict[int, Exception]) -> dict[int, str]:
    """The ranks of a Train worker group whose worker is gone (its process or node died, or it stopped
    answering), each with the cause in a few words; not the ranks that raised an error of their own, nor a health
    check that failed otherwise (a result that would not serialise)."""
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    lost = {}
    for rank, exc in sorted(worker_exceptions.items()):
        if isinstance(exc, WorkerHealthCheckTimeoutError):
            lost[rank] = "stopped answering"
        elif isinstance(exc, WorkerHealthCheckFailedError) and isinstance(exc.health_check_failure, RayActorError):
            node = re.search(r"node_ip='([^']+)'", str(exc))  # the worker's description in the error
            lost[rank] = type(exc.health_check_failure).__name__ + (f" on node {node.group(1)}" if node else "")
    return lost


def set_worker_group_start_timeout(seconds: float) -> None:
    """How long Train waits for a worker group's CPUs/GPUs (Ray's default, 60 s, is retried for ever: a lost node
    that never comes back would hang the run). Train propagates the driver's value to its controller."""
    os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(seconds)


def train_worker_env() -> dict[str, str]:
    """The environment of Train's workers: Train's print patch off (it tees each line to stdout *and* its logger
    when stdout is wrapped: every line twice), unbuffered output."""
    return {PRINT_PATCH_ENV: "0", "PYTHONUNBUFFERED": "1"}


def latest_recorded_result(record: bytes | str) -> dict[str, Any]:
    """What Ray Train's record (the contents of :data:`TRAIN_RECORD`) says of its latest checkpoint:
    ``checkpoint_dir_name`` and the ``metrics`` reported with it; empty when it names none, or cannot be read
    (damaged: not JSON, not text)."""
    try:
        latest = json.loads(record).get("latest_checkpoint_result") or {}
    except (ValueError, AttributeError):  # UnicodeDecodeError is a ValueError
        return {}
    return latest if isinstance(latest, dict) else {}


def record_without_latest(record: bytes) -> tuple[bytes, str] | None:
    """Ray Train's record with its latest checkpoint dropped and the one it kept before made the latest (by their
    report order): (the new record, that checkpoint's directory name); None when the record keeps no other. Every
    other field is left as Ray wrote it (the dropped one's name leaves the validation lists too)."""
    state = json.loads(record)
    dropped = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    results = zip(state.get("checkpoint_report_indices", []), state.get("checkpoint_results", []), strict=True)
    kept = [(index, result) for index, result in results if result["checkpoint_dir_name"] != dropped]
    if dropped is None or not kept:
        return None
    previous = max(kept, key=lambda pair: pair[0])[1]
    state["checkpoint_report_indices"] = [index for index, _ in kept]
    state["checkpoint_results"] = [result for _, result in kept]
    state["latest_checkpoint_result"] = previous
    pending = zip(state.get("pending_training_results", []), state.get("pending_validation_specs", []), strict=True)
    pending = [(result, spec) for result, spec in pending if result["checkpoint_dir_name"] != dropped]
    state["pending_training_results"] = [result for result, _ in pending]
    state["pending_validation_specs"] = [spec for _, spec in pending]
    for key in [k for k in state if k.endswith("_checkpoint_dir_names")]:
        state[key] = [name for name in state[key] if name != dropped]
    return json.dumps(state).encode(), previous["checkpoint_dir_name"]


def recorded_before(record: bytes | str, name: str) -> str | None:
    """The directory name of the checkpoint Ray Train's record kept reported last before ``name`` (by report
    order); None when the record does not keep ``name`` or keeps none before it (or cannot be read)."""
    try:
        state = json.loads(record)
        order = dict(zip(state.get("checkpoint_report_indices", []), state.get("checkpoint_results", []), strict=True))
    except (ValueError, AttributeError, TypeError):
        return None
    index = next((i for i, result in order.items() if result.get("checkpoint_dir_name") == name), None)
    before = [i for i in order if index is not None and i < index]
    return order[max(before)]["checkpoint_dir_name"] if before else None


def latest_recorded_checkpoint(record: bytes | str) -> str | None:
    """The directory name of the checkpoint Ray Train's record names as latest; None when it names none."""
    return latest_recorded_result(record).get("checkpoint_dir_name") or None


# --------------------------------------------------------------------------------------------------
# Probes: each private API above, checked against the installed Ray


def _expect(ok: bool, api: str, what: str) -> None:
    if not ok:
        raise PrivateApiChanged(f"{api}: {what}; update the function that wraps it")


def _probe_worker_printer() -> None:
    from ray._private import ray_logging
    from ray._private import worker as ray_worker

    api = "ray._private.worker.print_to_stdstream / ray_logging.global_worker_stdstream_dispatcher"
    _expect(callable(getattr(ray_worker, "print_to_stdstream", None)), api, "print_to_stdstream is gone")
    parameters = list(inspect.signature(ray_worker.print_to_stdstream).parameters)
    _expect(parameters[:2] == ["data", "ignore_prefix"], api, f"print_to_stdstream takes {parameters}")
    dispatcher = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    _expect(
        all(hasattr(dispatcher, name) for name in ("handlers", "add_handler", "remove_handler")),
        api,
        "the dispatcher has no handlers/add_handler/remove_handler",
    )
    # hide_worker_lines replaces the handler ray.init registers: a partial of print_to_stdstream, named so.
    registered = inspect.getsource(ray_worker.connect)
    _expect(
        '"ray_print_logs"' in registered and "functools.partial(print_to_stdstream" in registered,
        api,
        "ray.init no longer registers functools.partial(print_to_stdstream) as the handler 'ray_print_logs'",
    )


def _probe_log_dedup() -> None:
    from ray._private import ray_logging

    api = "ray._private.ray_logging.RAY_DEDUP_LOGS"
    _expect(isinstance(getattr(ray_logging, "RAY_DEDUP_LOGS", None), bool), api, "the module has no such flag")
    source = inspect.getsource(ray_logging.LogDeduplicator.deduplicate)
    _expect("if not RAY_DEDUP_LOGS" in source, api, "LogDeduplicator.deduplicate no longer reads it")


def _probe_state_api_address() -> None:
    from ray._private import ray_constants
    from ray.dashboard import utils

    api = f"ray._private.ray_constants.RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE ({STATE_API_ENV})"
    name = getattr(ray_constants, "RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE", None)
    _expect(name == STATE_API_ENV, api, f"the variable is {name!r}")
    _expect("RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE" in inspect.getsource(utils), api, "the state API ignores it")


def _probe_auth_logger() -> None:
    import importlib

    try:
        source = inspect.getsource(importlib.import_module(AUTH_LOGGER))
    except ImportError:
        source = ""
    _expect(RAY_AUTH_ON_NOTICE in source, AUTH_LOGGER, f"no longer logs {RAY_AUTH_ON_NOTICE!r}")


def _probe_startup_timeout() -> None:
    from ray.train.v2.api.exceptions import ControllerError

    api = "ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError"
    try:
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

        failure = WorkerGroupStartupTimeoutError(1)
    except (ImportError, TypeError) as exc:
        raise PrivateApiChanged(f"{api}: {exc}; update startup_timed_out") from None
    _expect(startup_timed_out(ControllerError(failure)), api, "ControllerError.controller_failure no longer holds it")
    api = "ray.train.v2._internal.exceptions.WorkerGroupStartupFailedError"
    try:
        from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError

        failed = WorkerGroupStartupFailedError("At least one of the worker actors failed to initialize.")
    except (ImportError, TypeError) as exc:
        raise PrivateApiChanged(f"{api}: {exc}; update startup_failed") from None
    _expect(startup_failed(ControllerError(failed)), api, "ControllerError.controller_failure no longer holds it")


def _probe_lost_ranks() -> None:
    api = "ray.train.v2._internal.exceptions.WorkerHealthCheckFailedError / WorkerHealthCheckTimeoutError"
    try:
        from ray.exceptions import ActorDiedError
        from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

        died = WorkerHealthCheckFailedError("Worker(metadata=(node_ip='10.0.0.7'))", failure=ActorDiedError())
        unserialisable = WorkerHealthCheckFailedError("Worker(...)", failure=TypeError("cannot pickle"))
        silent = WorkerHealthCheckTimeoutError("no answer")
    except (ImportError, TypeError) as exc:
        raise PrivateApiChanged(f"{api}: {exc}; update lost_ranks") from None
    found = lost_ranks({0: died, 1: silent, 2: ValueError("its own"), 3: unserialisable})
    _expect(found == {0: "ActorDiedError on node 10.0.0.7", 1: "stopped answering"}, api, f"lost_ranks saw {found}")


def _probe_train_constants() -> None:
    from ray.train.v2._internal import constants

    api = "ray.train.v2._internal.constants"
    _expect(
        constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == TRAIN_RECORD, api, f"Train's record is not {TRAIN_RECORD}"
    )
    _expect(
        constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR == WORKER_GROUP_START_TIMEOUT_ENV
        and WORKER_GROUP_START_TIMEOUT_ENV in constants.ENV_VARS_TO_PROPAGATE,
        api,
        f"{WORKER_GROUP_START_TIMEOUT_ENV} is no longer read and propagated",
    )
    _expect(constants.ENABLE_PRINT_PATCH_ENV_VAR == PRINT_PATCH_ENV, api, f"{PRINT_PATCH_ENV} is no longer read")
    # pipeline.distributed.preemption waits two of its polls for a signalled worker's last report to be taken
    _expect(
        constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
        and constants.DEFAULT_HEALTH_CHECK_INTERVAL_S <= 2.0,
        api,
        "the workers' poll interval is no longer RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, at most 2 s by default",
    )


def _probe_train_record() -> None:
    from ray.train.v2._internal.execution.checkpoint import checkpoint_manager

    api = "ray.train.v2 checkpoint manager snapshot (latest_checkpoint_result.checkpoint_dir_name)"

    def fields(name: str) -> set[str]:
        model = getattr(checkpoint_manager, name, None)
        return set(getattr(model, "model_fields", None) or getattr(model, "__fields__", None) or ())

    _expect("latest_checkpoint_result" in fields("_CheckpointManagerState"), api, "the record's layout changed")
    _expect("checkpoint_dir_name" in fields("_TrainingResultState"), api, "the record's layout changed")


PRIVATE_APIS: dict[str, Callable[[], None]] = {
    "worker output printer": _probe_worker_printer,
    "log deduplication flag": _probe_log_dedup,
    "state API address": _probe_state_api_address,
    "token authentication notice": _probe_auth_logger,
    "Train worker-group start timeout": _probe_startup_timeout,
    "Train worker health-check errors": _probe_lost_ranks,
    "Train constants and variables": _probe_train_constants,
    "Train checkpoint record": _probe_train_record,
}
