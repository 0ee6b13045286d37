"""No import circles in ``rlad/``: the modules form a directed acyclic graph, so each can be
read after the ones it imports. Every import counts, at module level or inside a function
(a deferred import still ties the two modules together), and importing ``a.b.c`` from outside
the package ``a.b`` also runs ``a.b``'s ``__init__``.

Run this file as a script to print each module's imports within rlad, in reading order:

    PYTHONPATH=tests python tests/trainer/test_import_circles.py
"""

from __future__ import annotations

import sys

from helpers import ROOT, import_graph


def rlad_graph() -> dict[str, set[str]]:
    """module -> the rlad modules it imports (a submodule's package included, from outside it)."""
    graph = import_graph(ROOT / "rlad", ("rlad",))
    for src, deps in graph.items():
        for dep in list(deps):
            parent = dep.rsplit(".", 1)[0]
            if parent in graph and not (src == parent or src.startswith(parent + ".")):
                deps.add(parent)
    return {src: {d for d in deps if d in graph and d != src} for src, deps in graph.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reading_order(graph: dict[str, set[str]]) -> list[str]:
    """Every module after the modules it imports (ties by name)."""
    done, order = set(), []
    while len(order) < len(graph):
        ready = sorted(m for m in graph if m not in done and graph[m] <= done)
        if not ready:
            raise ValueError(f"import circles: {circles(graph)}")
        order += ready
        done.update(ready)
    return order


def test_rlad_has_no_import_circles():
    graph = rlad_graph()
    assert len(graph) > 20 and "rlad.train" in graph["rlad.launch"]
    assert circles(graph) == []


def test_the_checker_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    # a deferred import inside a function is an edge too, and a package's __init__ counts
    graph = rlad_graph()
    assert "rlad.batching" in graph["rlad.rollout"]
    assert "rlad.tasks" in graph["rlad.tasks.vocabulary"]


def test_the_basic_modules_import_nothing_of_rlad():
    """What every task and the data share (Example, the answer mark) sits below everything."""
    graph = rlad_graph()
    for module in ("rlad.tasks.example", "rlad.algorithms", "rlad.signals", "rlad.distributed"):
        assert graph[module] == set(), (module, graph[module])


if __name__ == "__main__":
    g = rlad_graph()
    found = circles(g)
    if found:
        print("import circles:", found)
        sys.exit(1)
    for m in reading_order(g):
        print(f"{m:28s} <- {', '.join(sorted(g[m])) or '(nothing of rlad)'}")
    sys.exit(0)
