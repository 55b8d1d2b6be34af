"""Print what each module of src/anyfork imports from its siblings, by floor; fail on a cycle.

Run: ``python tools/import_floors.py``. A module's floor is the length of its longest chain
of sibling imports (0: imports no sibling). Function-level imports count too. It also fails
if the Future reaches, through any chain, a module about threads, pools or runners, or if
a module other than ``_loops`` imports anyio's private modules (``anyio._core``...).
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "anyfork"

# The Future knows nothing of where work runs: these modules, and what they import, never
# import any of the places below (CONTRIBUTING.md, "Modules by floor").
FUTURE_MODULES = ("_future", "_state", "_then")
PLACES = (
    "_pool",
    "_sync_job",
    "_groups",
    "_background",
    "_coroutine_fork",
    "_remote",
    "_process",
    "_process_pool",
    "_process_link",
    "_fork",
)


def sibling_imports() -> dict[str, list[str]]:
    graph: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        deps = set(re.findall(r"^\s*from \.(\w+) import", text, re.MULTILINE))
        for names in re.findall(r"^\s*from \. import ([\w, ]+)", text, re.MULTILINE):
            deps |= {name.strip() for name in names.split(",")}
        graph[path.stem] = sorted(deps - {path.stem})
    return graph


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in graph.get(module, []):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[module] = 2
        return None

    for module in graph:
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def reachable(graph: dict[str, list[str]], module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in graph.get(todo.pop(), []):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def below_anyio() -> list[str]:
    """The modules other than ``_loops`` that import from anyio's private modules."""
    return [
        path.stem
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem != "_loops"
        and re.search(r"^\s*(from|import) anyio\._", path.read_text(), re.MULTILINE)
    ]


def main() -> int:
    graph = sibling_imports()
    if wrong := below_anyio():
        print(f"{', '.join(wrong)} import anyio's private modules: only _loops may")
        return 1
    cycle = find_cycle(graph)
    if cycle:
        print("import cycle:", " -> ".join(cycle))
        return 1

    for module in FUTURE_MODULES:
        reached = reachable(graph, module)
        if wrong := sorted(reached & set(PLACES)):
            print(f"{module} reaches {', '.join(wrong)}: the Future must know nothing of places")
            return 1

    @functools.cache
    def floor(module: str) -> int:
        deps = [dep for dep in graph[module] if dep in graph]
        return 1 + max(map(floor, deps)) if deps else 0

    for level in sorted(set(map(floor, graph))):
        for module in (m for m in graph if floor(m) == level):
            print(f"{level}  {module}: {', '.join(graph[module]) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
