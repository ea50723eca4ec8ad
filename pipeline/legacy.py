"""Module names of earlier versions that saved sweeps still refer to.

A sweep's saved state (Tune's ``tuner.pkl``: its scheduler and callbacks, pickled by value) names the functions
they call by the module they lived in when the sweep began, e.g. ``pipeline.tune.best_first``. So that every
sweep started before the package's split into subpackages still resumes (``--resume``), each old module here
is importable again as the names it held; ``pipeline.config`` and ``pipeline.tracking`` need no entry (the
packages of those names export what the states use).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

# old module -> {name it held: the module that holds it today}
RENAMED: dict[str, dict[str, str]] = {
    "pipeline.tune": {
        "WithoutFailedTrials": "pipeline.sweep.tune_internals",
        "best_first": "pipeline.sweep.report",
        "ended_status": "pipeline.sweep.report",
        "format_rows": "pipeline.sweep.report",
        "live_row": "pipeline.sweep.report",
        "print_line": "pipeline.sweep.report",
    },
}


class OldModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the modules of :data:`RENAMED` (after every other finder has not) and fills each with its names."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name in RENAMED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        for attr, source in RENAMED[module.__name__].items():
            setattr(module, attr, getattr(importlib.import_module(source), attr))


def install() -> None:
    """Put the finder last on ``sys.meta_path`` (once): today's modules are always found first."""
    if not any(isinstance(finder, OldModules) for finder in sys.meta_path):
        sys.meta_path.append(OldModules())
