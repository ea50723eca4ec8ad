"""The design docs/design.md describes, checked on the code: packages in layers (a package imports only those
below it, lazy imports inside functions included), who may touch MLflow and Ray's libraries and their private
APIs, one owner for each kind of fact (dataset facts, metric names, scheduler names), one way to make a tracker,
and functions of a readable size."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, run_python

PACKAGE = REPO / "pipeline"
# The packages, bottom to top: each may import only the ones before it.
LAYERS = ["core", "data", "config", "gan", "eval", "tracking", "distributed", "sweep", "tools"]
ENTRY = {"pipeline", "pipeline.__main__", "pipeline.cli", "pipeline.legacy"}  # on top: they may import any
MODULES = {
    ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
    for path in sorted(PACKAGE.rglob("*.py"))
}
SOURCES = sorted([*MODULES.values(), *(REPO / "scripts").glob("*.py")])


def package_of(module: str) -> str | None:
    """``pipeline.gan.loop`` -> ``gan``; None for the entry modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for annotations, never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module of the package) for every import of the package that runs in ``path``, at any depth; a name
    imported from a package that is itself a module counts as that module."""
    found = []
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("pipeline")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((node.lineno, full if full in MODULES else node.module))
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: {target for _, target in imported_modules(p)} - {m} for m, p in MODULES.items()}


def test_every_module_lives_in_a_package_of_the_layers():
    loose = [m for m in MODULES if m not in ENTRY and package_of(m) is None]
    assert not loose, f"put these in one of the packages {LAYERS} (or add a layer to docs/design.md): {loose}"


def declared_imports(package: str) -> list[str]:
    """What a package's docstring says it may import: its line ``Imports: a, b`` (or ``Imports: nothing``)."""
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    line = next((x for x in doc.splitlines() if x.startswith("Imports:")), None)
    assert line is not None, f"pipeline/{package}/__init__.py: its docstring needs a line 'Imports: ...'"
    names = re.findall(r"\b[a-z]+\b", line.split(":", 1)[1])
    return [] if names == ["nothing"] else names


@pytest.mark.parametrize("package", LAYERS)
def test_each_package_says_what_it_owns_and_imports_what_the_layers_allow(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    assert doc.startswith("Owns"), f"pipeline/{package}/__init__.py: begin its docstring with what it owns"
    assert declared_imports(package) == LAYERS[: LAYERS.index(package)], (
        f"pipeline/{package}: its docstring's Imports line must name the packages below it, {LAYERS}"
    )


def test_a_package_imports_only_packages_below_it():
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = []
    for module, path in MODULES.items():
        mine = package_of(module)
        if mine is None:
            continue
        for line, target in imported_modules(path):
            theirs = package_of(target)
            if target in ENTRY - {"pipeline"} or (theirs is not None and rank[theirs] > rank[mine]):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target} ({theirs or 'an entry'} above {mine})")
    assert not wrong, "\n".join(wrong)


COMPARES_OLD_LAYOUTS = {"scripts/loop_equivalence.py"}  # runs another checkout's loop, whatever its layout


def test_every_import_of_the_package_names_a_module_that_is_there():
    """The flat layout's module names still import (pipeline.legacy: saved sweeps name them), so nothing here may
    lean on them: every import of the package, in the package, the scripts and the tests, names today's module."""
    paths = [*SOURCES, *sorted((REPO / "tests").glob("*.py"))]
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {target}"
        for path in paths
        if str(path.relative_to(REPO)) not in COMPARES_OLD_LAYOUTS
        for line, target in imported_modules(path)
        if target not in MODULES
    ]
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_checks_see_lazy_imports_and_skip_type_checking_ones(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.sweep.tune import run_sweep\n"
        "def f():\n    from pipeline.gan import loop\n    from pipeline.core.errors import UserError\n"
    )
    assert imported_modules(source) == [(5, "pipeline.gan.loop"), (6, "pipeline.core.errors")]


# --------------------------------------------------------------------------------------------------
# Libraries: who may touch MLflow and Ray


def imports_of(path: Path) -> set[str]:
    """Every dotted name ``path`` imports or reads off an imported package (``ray.train`` from ``ray.train.X``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute):
            parts = []
            while isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name):
                names.add(".".join([node.id, *reversed(parts)]))
    return names


def uses(path: Path, library: str) -> bool:
    return any(name == library or name.startswith(library + ".") for name in imports_of(path))


def users_of(library: str) -> set[str]:
    """The packages (or entry modules) whose code uses ``library``; scripts count as tools."""
    found = set()
    for path in SOURCES:
        if uses(path, library):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found.add("tools" if module.startswith("scripts.") else package_of(module) or module)
    return found


@pytest.mark.parametrize(
    "library, allowed",
    [
        ("mlflow", {"tracking"}),
        ("ray.tune", {"sweep"}),
        ("ray.train", {"distributed"}),
        ("ray", {"distributed", "sweep", "tools"}),
    ],
)
def test_each_library_is_reached_from_its_packages_only(library, allowed):
    found = users_of(library)
    assert found <= allowed, f"{library} is used in {sorted(found - allowed)}; only {sorted(allowed)} may"
    assert found & allowed, f"no package uses {library} any more: update this test and docs/design.md"


def test_the_loop_s_package_imports_no_ray_mlflow_or_the_runtime():
    """Statically: no module of pipeline/gan imports ray or mlflow, at its top or inside a function (the layers
    keep the Ray runtime, distributed, and tracking above it). tests/test_train.py runs a step with both blocked."""
    offenders = {
        str(path.relative_to(REPO)): sorted(n for n in imports_of(path) if n.split(".")[0] in ("ray", "mlflow"))
        for module, path in MODULES.items()
        if package_of(module) == "gan"
    }
    assert not any(offenders.values()), offenders


def client_lines(path: Path) -> list[int]:
    """Lines where ``path`` reads a ``.client`` attribute (a tracker's raw MLflow client; ``boto3.client``, the
    AWS SDK's constructor, is not one)."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr == "client"
        and not (isinstance(node.value, ast.Name) and node.value.id == "boto3")
    ]


def constructions(path: Path, name: str) -> list[int]:
    """Lines where ``path`` calls ``name(...)`` (or ``x.name(...)``)."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name
    ]


def test_mlflow_is_reached_through_one_tracker_factory():
    """Nothing outside pipeline/tracking reaches a tracker's raw MLflow client or builds an MLflowTracker itself:
    every run's tracker comes from tracking.tracker_for (one factory)."""
    outside = [p for m, p in MODULES.items() if package_of(m) != "tracking"] + list((REPO / "scripts").glob("*.py"))
    raw = [f"{p.relative_to(REPO)}:{line}" for p in outside for line in client_lines(p)]
    built = [f"{p.relative_to(REPO)}:{line}" for p in SOURCES for line in constructions(p, "MLflowTracker")]
    factory = PACKAGE / "tracking" / "tracker.py"
    assert not raw, f"a raw MLflow client outside pipeline/tracking: {raw}"
    assert built == [f"{factory.relative_to(REPO)}:{line}" for line in constructions(factory, "MLflowTracker")], built
    assert len(built) == 1, f"MLflowTracker(...) is built in {built}; build it in tracking.tracker_for only"


def test_the_checks_see_lazy_and_attribute_uses(tmp_path):
    """The walkers above find imports inside functions, `ray.train.X` used off a bare `import ray`, clients and
    constructions."""
    source = tmp_path / "m.py"
    source.write_text(
        "import ray\n\ndef f():\n    from pipeline.gan.loop import train_gan\n    ray.train.report({})\n"
        "    s3 = boto3.client('s3')\n    t = tracking.MLflowTracker(uri, run)\n    return t.client\n"
    )
    assert {t for _, t in imported_modules(source)} == {"pipeline.gan.loop"}
    assert uses(source, "ray.train") and not uses(source, "ray.tune")
    assert client_lines(source) == [8] and constructions(source, "MLflowTracker") == [7]


def test_importing_the_package_or_its_config_imports_no_heavy_library():
    code = (
        "import sys, pipeline, pipeline.config, pipeline.core.errors; "
        "print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))"
    )
    done = run_python("-c", code)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


# --------------------------------------------------------------------------------------------------
# Private APIs of Ray, MLflow and torch: behind one function each, in three modules

PRIVATE_API_MODULES = {
    "pipeline.distributed.ray_runtime",  # Ray core and Train
    "pipeline.sweep.tune_internals",  # Tune
    "pipeline.tracking.store",  # MLflow
}
LIBRARIES = ("ray", "mlflow", "torch")


def _is_private_name(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_private_path(dotted: str) -> bool:
    parts = dotted.split(".")
    return " " not in dotted and parts[0] in LIBRARIES and any(_is_private_name(p) for p in parts[1:])


def private_api_uses(path: Path) -> list[str]:
    """Every private Ray/MLflow/torch name ``path`` reaches: an import of a private module, an attribute with a
    leading underscore off an imported library name (aliases followed), ``getattr`` of a private name, or a
    string naming a private module (a logger's name, say)."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[(alias.asname or alias.name).split(".")[0]] = (
                    alias.asname and alias.name or alias.name.split(".")[0]
                )
                if _is_private_path(alias.name):
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                aliases[alias.asname or alias.name] = full
                if _is_private_path(full):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, root = [], node
            while isinstance(root, ast.Attribute):
                parts.append(root.attr)
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases:
                dotted = ".".join([aliases[root.id], *reversed(parts)])
                if _is_private_path(dotted):
                    found.append(f"{node.lineno}: {dotted}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _is_private_name(name.value):
                found.append(f"{node.lineno}: getattr(..., {name.value!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _is_private_path(node.value):
            found.append(f"{node.lineno}: {node.value!r}")
    return sorted(set(found))


def test_private_apis_of_ray_mlflow_and_torch_are_used_in_three_modules_only():
    """Every private API the project touches sits in one module per library (Ray core and Train, Tune, MLflow),
    behind a function of its own with a probe (tests/test_private_apis.py): an upgrade that changes one breaks
    there."""
    paths = {MODULES[m] for m in PRIVATE_API_MODULES}
    offenders = {
        str(path.relative_to(REPO)): found
        for path in SOURCES
        if path not in paths and (found := private_api_uses(path))
    }
    assert not offenders, offenders
    assert all(private_api_uses(path) for path in paths), "a module listed here uses no private API: update it"


def test_the_private_api_finder_finds_each_form(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import torch\nimport torch.nn.functional as F\nfrom ray._private import worker\n"
        "from mlflow.tracking import _tracking_service\n\n"
        "def f(scheduler):\n    torch._foreach_lerp_([], [], 1.0)\n    F._private_thing()\n"
        "    getattr(scheduler, '_num_perturbations', 0)\n    self._mine = 1\n"
        "    logging.getLogger('ray._private.authentication')\n    getattr(scheduler, '__dict__')\n"
    )
    assert private_api_uses(source) == [
        "11: 'ray._private.authentication'",
        "3: from ray._private import worker",
        "4: from mlflow.tracking import _tracking_service",
        "7: torch._foreach_lerp_",
        "8: torch.nn.functional._private_thing",
        "9: getattr(..., '_num_perturbations')",
    ]


# --------------------------------------------------------------------------------------------------
# One owner per kind of fact: the kinds of data, the metrics, the schedulers


DATASET_NUMBERS = {28, 784, 60_000}  # MNIST's side, pixels and training images


def literals(path: Path, values: set) -> list[str]:
    """String or number literals in ``path`` equal to one of ``values`` (booleans aside)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        literal = isinstance(node, ast.Constant) and not isinstance(node.value, bool)
        if literal and isinstance(node.value, str | int) and node.value in values:
            found.append(f"{node.lineno}: {node.value!r}")
    return found


def dataset_facts(path: Path) -> list[str]:
    """Where ``path`` tells kinds of data apart (``.dataset`` or a data source's name in a comparison, a condition
    or a mapping's key), and MNIST's numbers anywhere."""
    from pipeline.data.kinds import source_names

    return sorted(set(branches(path, "dataset", set(source_names())) + literals(path, DATASET_NUMBERS)))


def outside(package: str) -> list[Path]:
    return [p for m, p in MODULES.items() if package_of(m) != package] + sorted((REPO / "scripts").glob("*.py"))


def test_no_branch_on_the_kind_of_data_outside_the_data_package():
    """Only pipeline/data tells kinds of data apart: everything else asks the source
    (pipeline.data.kinds.source_of) what it needs, so a new kind of data is one class and one entry there."""
    offenders = {str(p.relative_to(REPO)): facts for p in outside("data") if (facts := dataset_facts(p))}
    assert not offenders, f"dataset facts outside pipeline/data: {offenders}"
    assert dataset_facts(PACKAGE / "data" / "kinds.py"), "the check finds nothing where the kinds are told apart"
    assert dataset_facts(PACKAGE / "data" / "specs.py"), "the check finds nothing where the numbers are"


def test_metric_names_appear_only_in_the_metric_registry():
    """Sweeps, schedulers, checkpoint ranking, reports and the model registry ask pipeline.eval.metrics for a
    metric's name, direction and role; no other module spells one."""
    from pipeline.eval.metrics import METRICS

    names = set(METRICS)
    registry = PACKAGE / "eval" / "metrics.py"
    offenders = {str(p.relative_to(REPO)): f for p in SOURCES if p != registry and (f := literals(p, names))}
    assert not offenders, f"metric names outside pipeline/eval/metrics.py: {offenders}"
    assert literals(registry, names), "the check finds nothing where the registry is"


def branches(path: Path, attr: str, names: set) -> list[str]:
    """Where ``path`` decides by ``.<attr>`` (in a comparison, a condition or a subscript) or by one of ``names`` (a
    literal compared with, matched or used as a mapping's key)."""

    def named(node: ast.AST | None) -> list[ast.Constant]:
        return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in names] if node else []

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        deciding = {
            ast.Compare: lambda n: [n],
            ast.If: lambda n: [n.test],
            ast.IfExp: lambda n: [n.test],
            ast.While: lambda n: [n.test],
            ast.Match: lambda n: [n.subject, *(case.pattern for case in n.cases)],
            ast.Subscript: lambda n: [n.slice],
            ast.Dict: lambda n: [k for k in n.keys if k is not None],
        }.get(type(node), lambda n: [])(node)
        for part in deciding:
            reads = [n for n in ast.walk(part) if isinstance(n, ast.Attribute) and n.attr == attr]
            found += [f"{n.lineno}: .{attr} in a {type(node).__name__}" for n in reads]
            if not isinstance(node, ast.Subscript):
                found += [f"{n.lineno}: {n.value!r} in a {type(node).__name__}" for n in named(part)]
    return sorted(set(found))


def scheduler_branches(path: Path) -> list[str]:
    """Where ``path`` tells schedulers apart (:func:`branches` on ``.scheduler`` and the schedulers' names)."""
    from pipeline.sweep.schedulers import SCHEDULERS

    return branches(path, "scheduler", set(SCHEDULERS))


def test_only_the_scheduler_registry_branches_on_tune_scheduler():
    """Adding a scheduler is one entry in pipeline/sweep/schedulers.py: nothing else names a scheduler or chooses
    by ``tune.scheduler``."""
    registry = PACKAGE / "sweep" / "schedulers.py"
    offenders = {
        str(p.relative_to(REPO)): found for p in MODULES.values() if p != registry and (found := scheduler_branches(p))
    }
    assert not offenders, offenders
    assert scheduler_branches(registry), "the check finds nothing where the registry is"


def test_the_fact_finders_find_each_form(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "def f(cfg, name):\n    if cfg.tune.scheduler == 'x':\n        pass\n    pbt = name == 'pbt'\n"
        "    y = TABLE[cfg.tune.scheduler]\n    tags = {'scheduler': cfg.tune.scheduler, 'asha': 1}\n"
        "    if cfg.tune.search_space:\n        tags['sched'] = cfg.tune.scheduler\n"
        "    chosen = {'tune.scheduler': 'none'}\n    side = 28 if cfg.data.dataset == 'images' else 'fid'\n"
    )
    assert scheduler_branches(source) == [
        "2: .scheduler in a Compare",
        "2: .scheduler in a If",
        "4: 'pbt' in a Compare",
        "5: .scheduler in a Subscript",
        "6: 'asha' in a Dict",
    ]
    assert dataset_facts(source) == [
        "10: 'images' in a Compare",
        "10: 'images' in a IfExp",
        "10: .dataset in a Compare",
        "10: .dataset in a IfExp",
        "10: 28",
    ]
    assert literals(source, {"fid"}) == ["10: 'fid'"]


# --------------------------------------------------------------------------------------------------
# Sizes a reader can hold


MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = {"train_gan": 100}  # the loop reads top to bottom in one place
DEFAULT_MAX_FUNCTION_LINES = 80


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(REPO)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules by concern: {long}"


def test_no_function_is_too_long():
    """Functions of the package and scripts: at most 80 lines (train_gan 100); ruff checks branches (12) and
    parameters (6) with PLR0912 and PLR0913 (pyproject.toml)."""
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES.get(node.name, DEFAULT_MAX_FUNCTION_LINES):
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
