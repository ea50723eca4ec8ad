"""The design README's Design section describes, checked on the code: the import order, with no cycle and
no import upward (lazy imports inside functions included), and who may touch MLflow and Ray's libraries."""

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


@pytest.mark.parametrize(
    "package, allowed",
    [("mlflow", {"tracking.py"}), ("ray.train", {"distributed.py"}), ("ray.tune", {"tune.py"})],
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
