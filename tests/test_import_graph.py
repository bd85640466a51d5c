"""The import graph of ``src/mlpmem``: no cycle between modules and no module importing a higher layer
(shared/DESIGN.md §4: core -> data -> lm -> system packages -> systems -> inference -> evaluate/bench/export ->
stages/cli). Every ``import`` counts, those inside functions too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import mlpmem

SRC = Path(mlpmem.__file__).parent

# lowest first; a module belongs to the layer of the longest prefix that names it
LAYERS: list[tuple[str, ...]] = [
    (  # core
        "mlpmem",
        "mlpmem.errors",
        "mlpmem.hf_auto",
        "mlpmem.hf_cache",
        "mlpmem.hub",
        "mlpmem.progress",
        "mlpmem.devices",
        "mlpmem.measure",
        "mlpmem.config",
        "mlpmem.artifacts",
        "mlpmem.manifests",
        "mlpmem.checkpoints",
        "mlpmem.training",
        "mlpmem.distributed",
        "mlpmem.presets",
        "mlpmem.memory_system",
    ),
    ("mlpmem.data",),
    ("mlpmem.lm",),
    ("mlpmem.knn", "mlpmem.memory", "mlpmem.explicit"),  # the system packages
    ("mlpmem.systems",),
    ("mlpmem.inference",),
    ("mlpmem.evaluate", "mlpmem.bench", "mlpmem.export"),
    ("mlpmem.stages", "mlpmem.summary", "mlpmem.cli", "mlpmem.__main__"),
]

CORE = 0  # its modules import one another freely (acyclically)
SAME = {(entry, entry) for layer in LAYERS for entry in layer}
# Edges between packages of one layer that are allowed (all others are refused, cycles always are):
SAME_LAYER = {
    # the MLP memory is trained to imitate kNN targets: it reads the targets stage and searches like kNN-LM
    ("mlpmem.memory", "mlpmem.knn"),
    # the model card quotes the evaluate table
    ("mlpmem.export", "mlpmem.evaluate"),
    # bench scores real keys with evaluate's forward core
    ("mlpmem.bench", "mlpmem.evaluate"),
    # the end-of-run summary prints the stage table's stages
    ("mlpmem.summary", "mlpmem.stages"),
    ("mlpmem.cli", "mlpmem.stages"),
    ("mlpmem.cli", "mlpmem.summary"),
    ("mlpmem.__main__", "mlpmem.cli"),
}


def module_names() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` is (a function or class imported from a module: that module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str, package: str, modules: dict[str, Path]) -> set[str]:
    """Every mlpmem module that ``module`` (of ``package``) imports, anywhere in its source, inside functions too
    (``from x import y`` of a submodule y: x.y)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        found |= {resolve(n, modules) for n in names if n == "mlpmem" or n.startswith("mlpmem.")}
    return found - {module, None}


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {m: imports_of(m, p.read_text(), _package(m, p), modules) for m, p in modules.items()}


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def owner(module: str) -> tuple[int, str]:
    """(layer index, the layer entry naming the module)."""
    best = max(
        ((i, prefix) for i, layer in enumerate(LAYERS) for prefix in layer if _within(module, prefix)),
        key=lambda x: len(x[1]),
        default=None,
    )
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def _within(module: str, prefix: str) -> bool:
    return module == prefix or (prefix != "mlpmem" and module.startswith(prefix + "."))


def test_every_module_has_a_layer():
    for module in graph():
        owner(module)


def test_no_upward_import():
    bad = []
    for module, targets in graph().items():
        layer, entry = owner(module)
        for target in targets:
            target_layer, target_entry = owner(target)
            if target_layer > layer:
                bad.append(f"{module} -> {target}")
            elif layer != CORE and target_layer == layer and (entry, target_entry) not in SAME_LAYER | SAME:
                bad.append(f"{module} -> {target} (same layer)")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None: depth-first search, three colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_inside_functions_and_relative_imports_count():
    """A lazy import is an edge of the graph (the test would miss most cycles otherwise)."""
    modules = module_names()
    source = (
        "import numpy\n"
        "from mlpmem.errors import UsageError\n"
        "def f():\n"
        "    from mlpmem.knn.retriever import KnnRetriever\n"
        "    from . import corpus\n"
        "    import mlpmem.lm.keys\n"
    )
    found = imports_of("mlpmem.data.x", source, "mlpmem.data", modules)
    assert found == {"mlpmem.errors", "mlpmem.knn.retriever", "mlpmem.data.corpus", "mlpmem.lm.keys"}


# System packages that plug in through the registry (``mlpmem.systems``) alone: no shared package imports them.
PLUGGED_IN = ("mlpmem.explicit", "mlpmem.knn", "mlpmem.memory")
# Who else may: the MLP memory imitates kNN-LM (its targets, its search); the stage table names each stage's
# function; the package root's lazy names and the Auto-class registration name the classes they expose.
ALSO_ALLOWED = {
    ("mlpmem.memory", "mlpmem.knn"),
    ("mlpmem.stages", "mlpmem.knn"),
    ("mlpmem.stages", "mlpmem.memory"),
}


def test_plugged_in_systems_are_reached_only_through_the_registry():
    bad = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target in targets
        for package in PLUGGED_IN
        if _within(target, package)
        and not _within(module, package)
        and module != "mlpmem.systems"
        and not any(_within(module, a) and _within(target, b) for a, b in ALSO_ALLOWED)
    ]
    assert not bad, "shared code importing a system package:\n" + "\n".join(sorted(bad))
