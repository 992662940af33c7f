"""The package's layout is its data path: imports point down the stages only.

base (errors, states, filters, stages, compat) <- kernel <- sockets <- outputs <- the
application (tracer, session, cli, ...). A module may import its own layer and
those below, never one above (lazy imports inside functions included).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tcptrace"
BASE = {
    "tcptrace.errors",
    "tcptrace.states",
    "tcptrace.filters",
    "tcptrace.stages",
    "tcptrace.compat",
}
LAYERS = {"base": 0, "kernel": 1, "sockets": 2, "outputs": 3, "app": 4}


def layer_of(module: str) -> int:
    if module in BASE or module == "tcptrace":
        return LAYERS["base"]
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return LAYERS["app"]


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tcptrace"):
            if node.module in (
                "tcptrace",
                "tcptrace.kernel",
                "tcptrace.sockets",
                "tcptrace.outputs",
            ):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("tcptrace"))
    return names


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_imports_point_down_only() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for name in imported(path):
            if name == "tcptrace.__version__":
                continue
            if layer_of(name) > layer_of(here):
                upward.append(f"{here} imports {name}")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_the_layers_are_where_the_readme_says() -> None:
    for package in ("kernel", "sockets", "outputs"):
        assert (PACKAGE / package / "__init__.py").is_file()
    # a flat package again would defeat the point: new modules go in a stage
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert len(top) <= 14, sorted(top)
