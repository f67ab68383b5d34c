"""The layers of dpc_jax hold (the import-linter contract in pyproject.toml), and no two modules
import each other, directly or through others (imports inside functions count)."""

import os
import subprocess
import sys

import grimp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_import_contract_of_pyproject_is_kept():
    script = ("import sys; from importlinter.cli import lint_imports; "
              f"sys.exit(lint_imports(config_filename={os.path.join(REPO, 'pyproject.toml')!r}, "
              "no_cache=True, no_logo=True))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    status, report = proc.returncode, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert status == 0, report


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph("dpc_jax", cache_dir=None)
    cycles = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                cycles.add(" -> ".join((importer,) + back))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))
