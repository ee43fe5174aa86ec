"""The library's import graph has no circles (read from the source with `ast`, so a lazy import
inside a function counts too), and the model core imports no Lightning, callbacks or evaluation."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lit_moe", "callbacks", "evaluation")
# The plain-torch model core (docs: ARCHITECTURE): no Lightning, MLflow or lm-eval below these.
CORE = ("lit_moe.model", "lit_moe.moe", "lit_moe.lapsum", "lit_moe.budget", "lit_moe.kappa", "lit_moe.losses")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    """Every absolute module name `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def graph() -> dict[str, set[str]]:
    """Module → the library modules it imports (a name resolves to the longest module it names)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for name, path in mods.items():
        targets = {resolve(imported) for imported in imports(path)} - {None, name}
        # A package's own __init__ re-exporting its submodules is not a circle with them.
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_library_has_no_import_circles():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " → ".join(cycle)


def test_model_core_imports_no_lightning_callbacks_or_evaluation():
    mods = modules()
    for name, path in mods.items():
        if name.startswith(CORE):
            bad = {i for i in imports(path) if i.split(".")[0] in ("lightning", "callbacks", "evaluation",
                                                                    "mlflow", "lm_eval", "pytorch_lightning")}
            assert not bad, f"{name} imports {sorted(bad)}"
