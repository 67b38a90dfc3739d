"""The package's layering: no import cycles, and built-in passes import what they use from the
modules that define it, never from the ``qcompile`` facade (which imports them back)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"qcompile": ROOT / "qcompile", "qcompile.passes": ROOT / "passes"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def top_level_imports(path: Path, known: set[str]) -> set[str]:
    """qcompile modules imported when ``path`` is imported: module-level statements only (an
    import inside a function or under ``if TYPE_CHECKING`` runs later, or never)."""
    edges = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            edges |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & known
            edges |= submodules
            if len(submodules) < len(node.names):  # names from the module itself (a facade's)
                edges.add(node.module)
    return edges


def test_module_level_imports_form_no_cycle():
    found = modules()
    graph = {name: top_level_imports(path, set(found)) - {name} for name, path in found.items()}
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_built_in_passes_never_import_the_facade():
    offenders = [path.name for path in (ROOT / "passes").glob("*.py")
                 if any(isinstance(n, ast.ImportFrom) and n.module == "qcompile" for n in ast.walk(ast.parse(path.read_text())))]
    assert offenders == []


@pytest.mark.parametrize("module", ["qcompile.pipeline", "qcompile.pass_manager", "qcompile.instruments",
                                    "qcompile.passes.annotate", "qcompile.api", "qcompile.targets"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
