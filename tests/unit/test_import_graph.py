"""The dependency rules of docs/architecture.md, read from the source with `ast`.

Every import counts, including ones inside functions and under TYPE_CHECKING: a lazy import
is still a design tie, and a cycle hidden in a function body is still a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("local_agent", "cloud")

# Cycles another branch removes; each entry must still exist here (a stale entry fails), so
# whoever merges that branch deletes the line and the test then demands no cycle at all.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imported(module: str, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            keep = len(parts) - node.level + (mods[module].name == "__init__.py")
            base = ".".join(parts[:keep] + ([base] if base else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports, package `__init__`s included: some hold
    code (`cloud.integrations.channels`, `local_agent.serve`), and importing a package runs
    its `__init__`."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                deps |= _imported(module, node, mods)
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_cycle_and_a_clean_graph() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
    assert cycles({"a": {"b"}, "b": set()}) == set()


def test_the_graph_is_read_from_the_real_source() -> None:
    graph = import_graph()
    # a module-level import, and one made inside a function body
    assert "cloud.contracts.destination" in graph["local_agent.mirror.run"]
    assert "local_agent.cli.doctor" in graph["local_agent.cli.main"]


def test_a_package_whose_init_holds_code_is_an_import_target() -> None:
    # channels/__init__ holds build_channels, serve/__init__ the serve extra's hint: an
    # import of either is a tie like any other (cloud.logic importing the channels package,
    # or cloud importing `from local_agent import __version__`, must break a rule).
    graph = import_graph()
    assert "cloud.integrations.channels" in graph["local_agent.events.pipeline"]
    assert "local_agent.serve" in graph["local_agent.cli.main"]


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == KNOWN_CYCLES


def test_cloud_never_imports_local_agent() -> None:
    forbidden = sorted(
        f"{a} -> {b}"
        for a, deps in import_graph().items()
        if a.startswith("cloud")
        for b in deps
        if b.startswith("local_agent")
    )
    assert forbidden == []


# Which layers of cloud/ a layer may import (docs/architecture.md, "Dependency rules").
LAYER_RULES = {
    "cloud.contracts": {"cloud.contracts"},
    "cloud.logic": {"cloud.logic", "cloud.contracts"},
    "cloud.integrations": {"cloud.integrations", "cloud.logic", "cloud.contracts"},
    "cloud.app": {"cloud.app", "cloud.logic", "cloud.contracts"},
}


def _layer(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_cloud_layers_import_only_what_is_below_them() -> None:
    broken = sorted(
        f"{a} -> {b}"
        for a, deps in import_graph().items()
        if _layer(a) in LAYER_RULES
        for b in deps
        if _layer(b) not in LAYER_RULES[_layer(a)]
    )
    assert broken == []


def _mapped_modules() -> set[str]:
    """The modules docs/architecture.md's local_agent table names (its second column)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("\n## local_agent\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")]
    named: set[str] = set()
    for row in rows[1:]:  # after the header
        named.update(re.findall(r"`([^`]+)`", row[2]))
    return named


def test_the_architecture_map_names_every_local_agent_module_and_no_other() -> None:
    on_disk = {
        path.relative_to(ROOT / "local_agent").with_suffix("").as_posix()
        for path in (ROOT / "local_agent").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    mapped = _mapped_modules()
    assert sorted(mapped - on_disk) == [], "named in docs/architecture.md, not in local_agent/"
    assert sorted(on_disk - mapped) == [], "in local_agent/, missing from docs/architecture.md"
