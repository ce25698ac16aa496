"""The import graph of mmzoo and mmzoo_kernels: no cycles, and every import points down the layers.

Imports inside functions count (a local import only hides a cycle); imports under
``if TYPE_CHECKING:`` do not (they never run). docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"mmzoo": REPO / "core" / "mmzoo", "mmzoo_kernels": REPO / "kernels" / "mmzoo_kernels"}

# Bottom first. A module belongs to the first layer whose prefix it has (longest prefix wins).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("mmzoo_kernels",)),
    (
        "base",
        ("mmzoo.errors", "mmzoo.files", "mmzoo.version", "mmzoo.config", "mmzoo.hookspecs"),
    ),
    ("nn", ("mmzoo.nn", "mmzoo.loss", "mmzoo.model")),
    (
        "registry",
        ("mmzoo.protocols", "mmzoo.plugins", "mmzoo_kernels.plugin", "mmzoo.registry", "mmzoo.build"),
    ),
    ("convert", ("mmzoo.convert",)),
    ("checkpoint", ("mmzoo.checkpoint", "mmzoo.lora", "mmzoo.api")),
    ("work", ("mmzoo.data", "mmzoo.distributed", "mmzoo.train", "mmzoo.infer", "mmzoo.eval")),
    ("interface", ("mmzoo.commands", "mmzoo.cli", "mmzoo.__main__", "mmzoo.testing")),
]
FACADE = "mmzoo"  # the package's __init__: the public names, above everything it re-exports
GLUE = "mmzoo_kernels.plugin"  # the one kernels module that imports mmzoo (to register through the hook)


def modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def imported_names(tree: ast.AST) -> Iterator[str]:
    """Dotted names a module imports, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, "mmzoo uses absolute imports"
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    found = modules()

    def resolve(name: str) -> str | None:
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name or None

    return {
        module: {r for n in imported_names(ast.parse(path.read_text())) if (r := resolve(n)) and r != module}
        for module, path in found.items()
    }


def layer_of(module: str) -> int:
    if module == FACADE:
        return len(LAYERS) - 1  # with the interface: only the CLI and commands may use it
    best = max(
        (
            (i, prefix)
            for i, (_, prefixes) in enumerate(LAYERS)
            for prefix in prefixes
            if module == prefix or module.startswith(prefix + ".")
        ),
        key=lambda found: len(found[1]),
        default=None,
    )
    assert best is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_imports_point_down_the_layers(graph):
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_kernels_import_mmzoo_only_in_their_glue(graph):
    reaching = sorted(
        m
        for m, targets in graph.items()
        if m.startswith("mmzoo_kernels") and m != GLUE
        for t in targets
        if not t.startswith("mmzoo_kernels")
    )
    assert reaching == []
    assert any(t.startswith("mmzoo.") for t in graph[GLUE])  # the glue is what the test exempts


def test_the_core_imports_no_plugin():
    for module, path in modules().items():
        foreign = [
            name
            for name in imported_names(ast.parse(path.read_text()))
            if name.split(".")[0].startswith("mmzoo_") and name.split(".")[0] != "mmzoo_kernels"
        ]
        assert foreign == [], f"{module} imports a plugin: {foreign}"


def test_the_checks_can_fail():
    """A planted cycle and an upward import are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("mmzoo.errors") < layer_of("mmzoo.train.loop") < layer_of("mmzoo.cli")
    tree = ast.parse("import x\nif TYPE_CHECKING:\n    import y\ndef f():\n    from z import w\n")
    assert sorted(imported_names(tree)) == ["x", "z.w"]


def test_the_core_names_no_family_part():
    """Media grids, merge sizes and a family's token ids belong to plugins: the core only passes a
    family's media batch along (docs/architecture.md, "Composition")."""
    family_names = ("grid_thw", "second_per_grid_ts", "spatial_merge_size", "vision_end_token_id")
    found = [
        f"{path.relative_to(REPO)}: {name}"
        for root in ROOTS.values()
        for path in root.rglob("*.py")
        for name in family_names
        if name in path.read_text()
    ]
    assert not found
