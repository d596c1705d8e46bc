"""Import structure of cdlcodec: cycles and imports from a low layer to a high one (issue 12).

    python benchmarks/structure_check.py [-v]

Parses every module under cdlcodec/, formats/ (as cdlcodec.formats) and cli/ (as cdlcodec.cli) with
`ast`, without importing anything, and builds the graph of module-level AND function-level imports
(a function-level import is still a dependency, only a later one). Reports the import cycles
(strongly connected components of more than one module) and every import that runs from a lower
layer to a higher one. `cdlcodec/__init__.py`, the lazy facade, is exempt from both. Exit status 1
when anything is found.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"cdlcodec": ROOT / "cdlcodec", "cdlcodec.formats": ROOT / "formats", "cdlcodec.cli": ROOT / "cli"}
FACADE = "cdlcodec"

# Low to high; a module may import its own layer and the ones below it. Issue 12's order, plus the
# modules it does not name: models and data (leaves: torch modules, the bundled digits) and cdl_format
# (the CDL checkpoint format, numpy only) with the basic modules, verify (a codec client) with the
# tools, __main__ with the command line.
LAYERS = [
    ["formats"],
    ["errors", "dtypes", "records", "atomic", "jit", "progress", "optional", "models", "data", "cdl_format"],
    ["backends"],
    ["quantizers"],
    ["io"],
    ["codec"],
    ["fidelity", "cdl", "evaluation", "distributed", "search", "training", "demo", "verify"],
    ["api"],
    ["cli", "__main__"],
]
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            if ".venv" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """{imported cdlcodec module: first line} for every import statement anywhere in the module."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in known:  # `from pkg.mod import name`: name may be a function
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cdlcodec":
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "cdlcodec":
                continue
            for alias in node.names:  # `from cdlcodec.io import onnx_model` imports a submodule
                sub = f"{module}.{alias.name}"
                add(sub if sub in known else module, node.lineno)
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(argv: list[str]) -> int:
    found = modules()
    known = set(found)
    graph = {name: imports_of(name, path, known) for name, path in found.items() if name != FACADE}
    for edges in graph.values():
        edges.pop(FACADE, None)  # `from cdlcodec import __version__` and the like reach the facade only
    unlayered = sorted(m for m in graph if layer(m) is None)
    upward = sorted((src, dst, line) for src, edges in graph.items() for dst, line in edges.items()
                    if layer(src) is not None and layer(dst) is not None and layer(dst) > layer(src))
    circles = cycles(graph)
    edges = sum(len(e) for e in graph.values())
    print(f"{len(graph)} modules, {edges} import edges (module and function level; {FACADE}/__init__.py exempt)")
    if unlayered:
        print(f"modules in no layer: {', '.join(unlayered)}")
    print(f"import cycles: {len(circles)}")
    for component in circles:
        print("  " + " <-> ".join(component))
    print(f"imports from a low layer to a high one: {len(upward)}")
    for src, dst, line in upward:
        print(f"  {src} (layer {layer(src)}) -> {dst} (layer {layer(dst)})  {found[src].relative_to(ROOT)}:{line}")
    if "-v" in argv:
        for src in sorted(graph):
            print(f"{src}: {', '.join(sorted(graph[src]))}")
    return 1 if circles or upward or unlayered else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
