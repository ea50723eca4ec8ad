"""Every private API of Ray Tune the sweep touches, each behind one function, with a probe in :data:`PRIVATE_APIS`
that fails with a message naming the API when a Ray upgrade moves or changes it (tests/test_private_apis.py)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from pipeline.core.errors import PrivateApiChanged


def perturbations(scheduler: Any) -> int:
    """How many times Ray's PopulationBasedTraining has copied a trial into another so far (0 for others)."""
    return getattr(scheduler, "_num_perturbations", 0)


def save_sweep_state(controller: Any) -> None:
    """Write the sweep's state now (Tune's controller otherwise saves it every few seconds)."""
    controller.checkpoint(force=True, wait=True)


class WithoutFailedTrials:
    """Tune's controller as a scheduler sees it, minus the trials that failed. Ray keeps a failed trial among
    the "live" ones, and synchronous PBT waits for every live trial to reach the next decision point: one failed
    trial would hang the sweep (every other trial paused, none chosen to run)."""

    def __init__(self, controller: Any):
        self._controller = controller

    def get_live_trials(self) -> set[Any]:
        return {t for t in self._controller.get_live_trials() if t.status != "ERROR"}

    def get_trials(self) -> list[Any]:
        return [t for t in self._controller.get_trials() if t.status != "ERROR"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._controller, name)


# Ray Tune copies these from the driver's environment into each trial actor's runtime environment, and Ray's
# runtime_env_agent.log on every node writes a runtime environment out in full at INFO level.
CREDENTIAL_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})


def credentials_out_of_runtime_env() -> None:
    """Stop Ray Tune from copying the driver's AWS credentials into trial actors' runtime environments (so into
    Ray's logs). A local Ray's trials inherit them from the driver anyway; a cluster's nodes hold their own (the
    same AWS_* exported on each node, or an instance profile), as docs/clusters.md says."""
    _probe_propagated_env()  # a Ray that moved it: PrivateApiChanged, not a sweep that quietly copies them again
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - CREDENTIAL_ENV


# --------------------------------------------------------------------------------------------------
# Probes: each private API above, checked against the installed Ray


def _expect(ok: bool, api: str, what: str) -> None:
    if not ok:
        raise PrivateApiChanged(f"{api}: {what}; update the function that wraps it")


def _probe_pbt_perturbations() -> None:
    from ray.tune.schedulers import PopulationBasedTraining

    scheduler = PopulationBasedTraining(time_attr="progress", hyperparam_mutations={"x": [1, 2]})
    _expect(
        isinstance(getattr(scheduler, "_num_perturbations", None), int),
        "ray.tune.schedulers.PopulationBasedTraining._num_perturbations",
        "the counter of exploits is gone",
    )


def _probe_tune_controller() -> None:
    from ray.tune.execution.tune_controller import TuneController

    api = "ray.tune.execution.tune_controller.TuneController"
    _expect({"force", "wait"} <= set(inspect.signature(TuneController.checkpoint).parameters), api, "checkpoint()")
    _expect(all(hasattr(TuneController, n) for n in ("get_live_trials", "get_trials")), api, "get_(live_)trials()")


def _probe_propagated_env() -> None:
    api = "ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE"
    try:
        from ray.tune.execution import class_cache
    except ImportError:
        _expect(False, api, "its module is gone")
    _expect(isinstance(getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None), set | frozenset), api, "not a set")
    reads = re.search(r"(?<![\w.])ENV_VARS_TO_PROPAGATE\b", inspect.getsource(class_cache._ActorClassCache.get))
    _expect(reads is not None, api, "no longer read where trial actors are made")


PRIVATE_APIS: dict[str, Callable[[], None]] = {
    "Tune's environment copied to trials": _probe_propagated_env,
    "PBT exploit counter": _probe_pbt_perturbations,
    "Tune controller": _probe_tune_controller,
}
