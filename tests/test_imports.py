"""Layers point down: no import cycle among moeforge's modules, counting imports inside functions (only
`if TYPE_CHECKING:` blocks are left out), and nothing below the commands imports them."""
import ast
from pathlib import Path

import moeforge

ROOT = Path(moeforge.__file__).parent
# The commands and the orchestrator: nothing else may import them.
TOP = {"moeforge.cli", "moeforge.builder", "moeforge.pipeline.build", "moeforge.edit", "moeforge.__main__"}


def _modules():
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = ("moeforge",) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _is_type_checking(node) -> bool:
    test = node.test
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree, mods, name):
    """Every moeforge module `name` imports at run time, at any depth of its code."""
    package = name if mods[name].name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base in mods:
                out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
        stack.extend(ast.iter_child_nodes(node))
    out.discard("moeforge")  # the root package: a lazy facade over build/dry_run, never a dependency
    out.discard(name)
    return out


def import_graph():
    mods = _modules()
    return {name: _imports(ast.parse(path.read_text(encoding="utf-8")), mods, name) for name, path in mods.items()}


def _strongly_connected(graph):
    """Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.add(member)
                    if member == node:
                        break
                comps.append(comp)
    return comps


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "moeforge.pipeline.build" in graph["moeforge.cli"]  # imported inside a command function
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100


def test_no_import_cycles():
    cycles = [sorted(c) for c in _strongly_connected(import_graph()) if len(c) > 1]
    assert not cycles, cycles


def test_nothing_imports_the_commands_or_the_orchestrator():
    graph = import_graph()
    allowed = TOP | {"moeforge"}  # the package's lazy `moeforge.build`
    bad = {(a, b) for a, deps in graph.items() if a not in allowed for b in deps if b in TOP}
    assert not bad, sorted(bad)
