"""The package's import graph: no cycle, and no import from a lower layer to
a higher one. Every import statement counts, those under ``TYPE_CHECKING``
and inside functions too. The layers are the README's (section Layout)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "emq_green"

#: lowest first; a module may import modules of its own layer or below
LAYERS: list[set[str]] = [
    {"__init__", "protocol", "lifecycle", "pages"},             # wire values, state, pages
    {"callables", "settings", "jobs", "curve"},                 # policy, settings, a job, keys
    {"records", "connection", "child", "zap"},                  # shared types, one socket
    {"extensions"},                                             # the contract for extensions
    {"subprocess_pool", "monitor", "lifeline", "offload", "metrics",  # the extensions
     "worker_page"},
    {"defaults"},                                               # the default extension list
    {"slots", "session"},                                       # the manager's parts
    {"routing", "results", "router_sockets", "router_workers"},  # the router's parts
    {"jobmanager", "router"},                                   # the job manager, the router
    {"client", "submit", "client_results", "dashboard"},        # clients, the dashboard
    {"cli", "demo"},                                            # command lines
]


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return i
    raise AssertionError(f"emq_green.{module} is in no layer: add it to LAYERS and to "
                         "the README's layout table")


def internal_imports(path: Path) -> set[str]:
    """``emq_green`` modules that ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "emq_green":
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "emq_green" and len(parts) > 1:
                    found.add(parts[1])
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    edges = {p.stem: internal_imports(p) & modules for p in PACKAGE.glob("*.py")}
    for module, targets in edges.items():
        targets.discard(module)
    return edges


def test_every_module_has_a_layer():
    for module in graph():
        layer_of(module)


def test_no_import_goes_up_a_layer():
    upward = sorted(f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
                    for m, targets in graph().items() for t in targets
                    if layer_of(t) > layer_of(m))
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_sees_function_level_and_type_checking_imports(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from .jobmanager import JobManager\n"
                      "def f():\n    from . import router\n    import emq_green.client\n")
    assert internal_imports(source) == {"jobmanager", "router", "client"}


#: the largest a class may grow before it is split (issue 12)
MAX_CLASS_LINES = 400


def test_no_class_is_over_the_limit():
    too_big = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    too_big.append(f"{path.stem}.{node.name}: {lines} lines")
    assert not too_big, "\n".join(too_big)
