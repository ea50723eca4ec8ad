"""Module names of the flat layout that sweeps saved by earlier versions still refer to.

A sweep's saved state (Tune's ``tuner.pkl``: its scheduler and callbacks, pickled by value) names the functions
they call by the module they lived in when the sweep began, e.g. ``pipeline.sweep_report.best_first`` or
``pipeline.ray_runtime.WithoutFailedTrials``. So that every sweep started before the package's split into
subpackages still resumes (``--resume``), each module of the flat layout is importable again under its old name:
a name asked of it is found in the modules that hold that module's code today, in the order given. The old
``pipeline.config`` and ``pipeline.tracking`` are the packages of those names, which export what states use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

# old module -> the modules that hold its code today
MOVED: dict[str, tuple[str, ...]] = {
    "pipeline.errors": ("pipeline.core.errors",),
    "pipeline.uris": ("pipeline.core.uris",),
    "pipeline.checkpoint": ("pipeline.core.checkpoint",),
    "pipeline.pictures": ("pipeline.core.pictures",),
    "pipeline.datasets": ("pipeline.data.specs", "pipeline.data.folder", "pipeline.data.kinds"),
    "pipeline.batches": ("pipeline.data.batches",),
    "pipeline.images": ("pipeline.data.images",),
    "pipeline.shards": ("pipeline.data.shards",),
    "pipeline.validation": ("pipeline.config.checks", "pipeline.sweep.checks"),
    "pipeline.models": ("pipeline.gan.models",),
    "pipeline.steps": ("pipeline.gan.steps",),
    "pipeline.train_state": ("pipeline.gan.state",),
    "pipeline.train": ("pipeline.gan.loop", "pipeline.gan.reports", "pipeline.distributed.results"),
    "pipeline.sampling": ("pipeline.gan.sampling",),
    "pipeline.metrics": ("pipeline.eval.evaluator", "pipeline.eval.classifier", "pipeline.eval.scores"),
    "pipeline.registry": ("pipeline.tracking.registry", "pipeline.tracking.evaluators"),
    "pipeline.ray_runtime": ("pipeline.distributed.ray_runtime", "pipeline.sweep.tune_internals"),
    "pipeline.console": ("pipeline.distributed.console",),
    "pipeline.storage": ("pipeline.distributed.storage",),
    "pipeline.elastic": ("pipeline.distributed.elastic",),
    "pipeline.worker": ("pipeline.distributed.worker", "pipeline.distributed.hooks"),
    "pipeline.runs": (
        "pipeline.distributed.prepare",
        "pipeline.distributed.lifecycle",
        "pipeline.distributed.registration",
        "pipeline.distributed.run",
    ),
    "pipeline.accounting": ("pipeline.sweep.accounting",),
    "pipeline.search_space": ("pipeline.sweep.search_space",),
    "pipeline.schedulers": ("pipeline.sweep.schedulers", "pipeline.sweep.tune_internals"),
    "pipeline.sweep_report": ("pipeline.sweep.report",),
    "pipeline.trial": ("pipeline.sweep.trial",),
    # before pipeline/tune.py was split (1d135d6), the sweep's report and Tune's internals were in it too
    "pipeline.tune": ("pipeline.sweep.tune", "pipeline.sweep.report", "pipeline.sweep.tune_internals"),
    "pipeline.bench": ("pipeline.tools.bench",),
    "pipeline.scaling": ("pipeline.tools.scaling",),
}


def _attribute(old: str, name: str) -> Any:
    for module in MOVED[old]:
        found = importlib.import_module(module)
        if hasattr(found, name):
            return getattr(found, name)
    raise AttributeError(f"{old}.{name} is not in {', '.join(MOVED[old])}")


class OldModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the modules of :data:`MOVED` (after every other finder has not); each answers a name it is asked for
    from its new homes."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        module.__getattr__ = lambda name, old=module.__name__: _attribute(old, name)  # PEP 562


def install() -> None:
    """Put the finder last on ``sys.meta_path`` (once): today's modules are always found first."""
    if not any(isinstance(finder, OldModules) for finder in sys.meta_path):
        sys.meta_path.append(OldModules())
