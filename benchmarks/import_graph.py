"""The import graph of dpc_jax against its layers: `python benchmarks/import_graph.py
[--root DIR] [--pyproject FILE]`.

Prints, from grimp's graph (imports at module level and inside functions alike):
- per subpackage or top module of dpc_jax, the other ones it imports (`~` marks a dependency
  made only of deferred imports: indented, inside a function or a block);
- every import cycle between modules (the strongly connected components of the module graph,
  with the imports inside each);
- every import that runs up the layers of the `layers` contract in pyproject.toml
  ([tool.importlinter]), or between `|` siblings of one layer; the contract's ignore_imports
  are listed apart.

--root is the directory that holds the dpc_jax package to read (default: this checkout), so the
graph of another commit can be printed against this checkout's layers, e.g.
`git archive BASE | tar -x -C /tmp/base && python benchmarks/import_graph.py --root /tmp/base`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PACKAGE = "dpc_jax"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_contract(pyproject: str):
    """(layers, ignored imports) of the `layers` contract: layers top first, each a
    (modules, independent) pair; ignored imports as (importer, imported) pairs."""
    with open(pyproject, "rb") as f:
        config = tomllib.load(f)
    contracts = config.get("tool", {}).get("importlinter", {}).get("contracts", [])
    contract = next((c for c in contracts if c.get("type") == "layers"), None)
    if contract is None:
        raise SystemExit(f"{pyproject} has no [tool.importlinter] layers contract")
    layers = []
    for text in contract["layers"]:
        sep = "|" if "|" in text else ":"
        layers.append(([m.strip().strip("()") for m in text.split(sep)], sep == "|"))
    ignored = [tuple(s.strip() for s in line.split("->"))
               for line in contract.get("ignore_imports", [])]
    return layers, ignored


def unit(module: str) -> str:
    """The subpackage or top module of dpc_jax that holds `module`."""
    return ".".join(module.split(".")[:2])


def short(module: str) -> str:
    return module[len(PACKAGE) + 1:] if module.startswith(PACKAGE + ".") else module


def source_lines(root: str, module: str) -> list:
    path = os.path.join(root, *module.split("."))
    path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def find_cycles(edges: dict) -> list:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=REPO, help="directory holding the dpc_jax package")
    p.add_argument("--pyproject", default=os.path.join(REPO, "pyproject.toml"),
                   help="pyproject.toml with the [tool.importlinter] layers contract")
    args = p.parse_args(argv)
    root = os.path.abspath(args.root)
    sys.path.insert(0, root)
    import grimp

    layers, ignored = read_contract(args.pyproject)
    graph = grimp.build_graph(PACKAGE, cache_dir=None)

    imports = []  # (importer, imported, line number, function-level)
    for importer in sorted(graph.modules):
        lines = source_lines(root, importer)
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            for d in graph.get_import_details(importer=importer, imported=imported):
                line = lines[d["line_number"] - 1]
                imports.append((importer, imported, d["line_number"],
                                line[:1].isspace()))
    print(f"{PACKAGE} import graph (grimp {grimp.__version__}): {len(graph.modules)} modules, "
          f"{len(imports)} imports")

    print("\nimports between subpackages and top modules (~: only deferred imports):")
    eager, lazy = defaultdict(set), defaultdict(set)
    for importer, imported, _, is_lazy in imports:
        a, b = unit(importer), unit(imported)
        if a != b and a != PACKAGE and b != PACKAGE:
            (lazy if is_lazy else eager)[a].add(b)
    units = sorted({unit(m) for m in graph.modules} - {PACKAGE})
    width = max(len(short(u)) for u in units)
    for u in units:
        deps = [short(b) if b in eager[u] else "~" + short(b)
                for b in sorted(eager[u] | lazy[u])]
        print(f"  {short(u):<{width}} -> {' '.join(deps) or '-'}")

    print("\ncycles between modules:")
    edges = defaultdict(set)
    for importer, imported, _, _ in imports:
        edges[importer].add(imported)
    cycles = find_cycles(edges)
    for component in cycles:
        print(f"  {' <-> '.join(short(m) for m in component)}")
        for importer, imported, line, is_lazy in imports:
            if importer in component and imported in component:
                print(f"      {short(importer)}:{line} -> {short(imported)}"
                      f"{' (deferred)' if is_lazy else ''}")
    if not cycles:
        print("  none")

    shown = args.pyproject
    if os.path.abspath(shown) == os.path.join(REPO, "pyproject.toml"):
        shown = "pyproject.toml"
    print(f"\nimports up the layers of {shown} (top first: "
          f"{' / '.join(' '.join(short(m) for m in ms) for ms, _ in layers)}):")
    position = {}
    for i, (modules, independent) in enumerate(layers):
        for m in modules:
            position[m] = (i, independent)

    def place(module):
        parts = module.split(".")
        for n in range(len(parts), 0, -1):
            name = ".".join(parts[:n])
            if name in position:
                return name, position[name]
        return None, (None, False)

    found, skipped = [], []
    for importer, imported, line, is_lazy in imports:
        top_a, (layer_a, _) = place(importer)
        top_b, (layer_b, independent) = place(imported)
        if layer_a is None or layer_b is None:
            continue
        if layer_a > layer_b or (layer_a == layer_b and independent and top_a != top_b):
            text = (f"  {short(importer)}:{line} -> {short(imported)}"
                    f"{' (deferred)' if is_lazy else ''}")
            (skipped if (importer, imported) in ignored else found).append(text)
    print("\n".join(found) if found else "  none")
    if skipped:
        print("ignored by the contract (ignore_imports):")
        print("\n".join(skipped))
    outside = sorted({short(u) for u in units if place(u)[0] is None})
    if outside:
        print(f"in no layer: {' '.join(outside)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
