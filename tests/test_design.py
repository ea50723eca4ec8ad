"""The design README's Design section describes, checked on the code: the import order, with no cycle and
no import upward (lazy imports inside functions included), who may touch MLflow and Ray's libraries and their
private APIs, one owner for dataset facts and for scheduler choices, and functions of a readable size."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO, run_python

PACKAGE = REPO / "pipeline"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def declared_levels() -> list[list[str]]:
    """README's import-order line, top level first: [["__main__"], ["cli"], ["tune", "bench"], ...]."""
    design = (REPO / "README.md").read_text().split("## Design", 1)[1]
    line = next(x for x in design.splitlines() if x.startswith("`__main__ →"))
    return [[name.strip() for name in level.split(",")] for level in line.strip("`").split("→")]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, package module) for every import of the package in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pipeline":  # `from pipeline import checkpoint, PROJECT_ROOT`
                names = [f"pipeline.{a.name}" if a.name in MODULES else "pipeline" for a in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            if name == "pipeline":
                found.append((node.lineno, "__init__"))
            elif name.startswith("pipeline."):
                found.append((node.lineno, name.split(".")[1]))
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: {target for _, target in imported_modules(PACKAGE / f"{m}.py")} - {m} for m in MODULES}


def test_readme_places_every_module_once():
    placed = [name for level in declared_levels() for name in level]
    assert sorted(placed) == MODULES, "README's import-order line must name every module in pipeline/ exactly once"


def test_no_module_imports_one_above_it_or_beside_it():
    level_of = {name: i for i, level in enumerate(declared_levels()) for name in level}
    wrong = [
        f"pipeline/{module}.py:{line} imports {target}, which README places "
        + ("on the same level" if level_of[target] == level_of[module] else "above it")
        for module in MODULES
        for line, target in imported_modules(PACKAGE / f"{module}.py")
        if target != module and level_of[target] <= level_of[module]
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


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def imports_of(path: Path) -> set[str]:
    """Every dotted name ``path`` imports or reads off an imported package (``ray.train`` from ``ray.train.X``)."""
    names = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
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


def uses(path: Path, package: str) -> bool:
    return any(name == package or name.startswith(package + ".") for name in imports_of(path))


SOURCES = sorted([*PACKAGE.glob("*.py"), *(REPO / "scripts").glob("*.py")])


SWEEP_MODULES = {"tune.py", "trial.py", "sweep_report.py", "schedulers.py", "search_space.py"}


@pytest.mark.parametrize(
    "package, allowed",
    [
        ("mlflow", {"tracking.py", "registry.py"}),
        ("ray.train", {"distributed.py", "ray_runtime.py"}),
        ("ray.tune", SWEEP_MODULES | {"ray_runtime.py"}),
    ],
)
def test_each_library_is_reached_from_one_module(package, allowed):
    users = {path.name for path in SOURCES if uses(path, package)}
    assert users <= allowed, f"{package} is used in {sorted(users - allowed)}; only {sorted(allowed)} may"
    assert users == allowed, f"{sorted(allowed)} no longer uses {package}: update this test and README"


def test_tracking_imports_no_ray():
    assert not uses(PACKAGE / "tracking.py", "ray")


def client_lines(path: Path) -> list[int]:
    """Lines where ``path`` reads a ``.client`` attribute (a tracker's raw MLflow client; ``boto3.client``, the
    AWS SDK's constructor, is not one)."""
    tree = ast.parse(path.read_text())
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "client"
        and not (isinstance(node.value, ast.Name) and node.value.id == "boto3")
    ]


def test_no_mlflow_client_outside_tracking():
    """Nothing reaches past a tracker into its raw MLflow client (`tracker.client`, `.client.get_run`)."""
    offenders = [
        f"{path.relative_to(REPO)}:{line}"
        for path in SOURCES
        if path.name != "tracking.py"
        for line in client_lines(path)
    ]
    assert not offenders, offenders


def test_the_checks_see_lazy_and_attribute_uses(tmp_path):
    """The walkers above find imports inside functions and `ray.train.X` used off a bare `import ray`."""
    source = tmp_path / "m.py"
    source.write_text(
        "import ray\n\ndef f():\n    from pipeline.train import train_gan\n    ray.train.report({})\n"
        "    from pipeline import checkpoint, PROJECT_ROOT\n    s3 = boto3.client('s3')\n    return tracker.client\n"
    )
    assert {t for _, t in imported_modules(source)} == {"train", "checkpoint", "__init__"}
    assert uses(source, "ray.train") and not uses(source, "ray.tune")
    assert client_lines(source) == [8]


def test_importing_the_package_imports_no_heavy_library():
    done = run_python("-c", "import sys, pipeline; print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


# --------------------------------------------------------------------------------------------------
# Private APIs of Ray, MLflow and torch: behind one function each, in two modules


PRIVATE_API_MODULES = {"ray_runtime.py", "tracking.py"}
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


def test_private_apis_of_ray_mlflow_and_torch_are_used_in_two_modules_only():
    """Every private API the project touches sits in ray_runtime.py (Ray) or tracking.py (MLflow), behind a
    function of its own with a probe (tests/test_private_apis.py): an upgrade that changes one breaks there."""
    offenders = {
        str(path.relative_to(REPO)): uses
        for path in SOURCES
        if path.name not in PRIVATE_API_MODULES and (uses := private_api_uses(path))
    }
    assert not offenders, offenders
    assert private_api_uses(PACKAGE / "ray_runtime.py") and private_api_uses(PACKAGE / "tracking.py")


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
# One owner per concern: dataset facts, scheduler choices


DATASET_NUMBERS = {28, 784, 60_000}  # MNIST's side, pixels and training images


def dataset_facts(path: Path) -> list[str]:
    """Literals in ``path`` that are a dataset's fact: a registered dataset's name, or one of its numbers."""
    from pipeline.datasets import DATASETS

    names = set(DATASETS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        literal = isinstance(node, ast.Constant) and not isinstance(node.value, bool)
        if literal and (node.value in names or (isinstance(node.value, int) and node.value in DATASET_NUMBERS)):
            found.append(f"{node.lineno}: {node.value!r}")
    return found


def test_only_datasets_py_holds_a_dataset_fact():
    offenders = {
        str(path.relative_to(REPO)): facts
        for path in SOURCES
        if path.name != "datasets.py" and (facts := dataset_facts(path))
    }
    assert not offenders, f"dataset facts outside pipeline/datasets.py: {offenders}"
    assert dataset_facts(PACKAGE / "datasets.py"), "the check finds nothing where the facts are"


def scheduler_branches(path: Path) -> list[str]:
    """Where ``path`` tells schedulers apart: ``.scheduler`` in a comparison, a condition or a subscript, or a
    scheduler's name compared with, matched or used as a key."""
    from pipeline.schedulers import SCHEDULERS

    def names(node: ast.AST | None) -> list[ast.Constant]:
        return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in SCHEDULERS] if node else []

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        deciding = {
            ast.Compare: lambda n: [n],
            ast.BoolOp: lambda n: [n],
            ast.If: lambda n: [n.test],
            ast.IfExp: lambda n: [n.test],
            ast.While: lambda n: [n.test],
            ast.Match: lambda n: [n.subject, *(case.pattern for case in n.cases)],
            ast.Subscript: lambda n: [n.slice],
            ast.Dict: lambda n: [k for k in n.keys if k is not None],
        }.get(type(node), lambda n: [])(node)
        for part in deciding:
            reads = [n for n in ast.walk(part) if isinstance(n, ast.Attribute) and n.attr == "scheduler"]
            found += [f"{n.lineno}: .scheduler in a {type(node).__name__}" for n in reads]
            if not isinstance(node, ast.Subscript | ast.BoolOp):
                found += [f"{n.lineno}: {n.value!r} in a {type(node).__name__}" for n in names(part)]
    return sorted(set(found))


def test_only_the_scheduler_registry_branches_on_tune_scheduler():
    """Adding a scheduler is one entry in pipeline/schedulers.py (plus its config values): nothing else in the
    package names a scheduler or chooses by ``tune.scheduler``."""
    offenders = {
        path.name: found
        for path in PACKAGE.glob("*.py")
        if path.name != "schedulers.py" and (found := scheduler_branches(path))
    }
    assert not offenders, offenders
    assert scheduler_branches(PACKAGE / "schedulers.py"), "the check finds nothing where the registry is"


def test_the_scheduler_branch_finder_finds_each_form(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "def f(cfg, name):\n    if cfg.tune.scheduler == 'x':\n        pass\n    pbt = name == 'pbt'\n"
        "    y = TABLE[cfg.tune.scheduler]\n    tags = {'scheduler': cfg.tune.scheduler, 'asha': 1}\n"
        "    if cfg.tune.search_space:\n        tags['sched'] = cfg.tune.scheduler\n"
        "    chosen = {'tune.scheduler': 'none'}\n"
    )
    assert scheduler_branches(source) == [
        "2: .scheduler in a Compare",
        "2: .scheduler in a If",
        "4: 'pbt' in a Compare",
        "5: .scheduler in a Subscript",
        "6: 'asha' in a Dict",
    ]


# --------------------------------------------------------------------------------------------------
# Sizes a reader can hold


MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = {"train_gan": 100}  # the loop reads top to bottom in one place
DEFAULT_MAX_FUNCTION_LINES = 80


def test_no_module_is_over_450_lines():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
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
