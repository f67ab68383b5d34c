"""The layering of tests/: shared builders live in helper modules (helpers.py, torch_helpers.py,
torch_deep_prompts.py) and fixtures in conftest.py; no file imports a test module or conftest."""

import ast
import glob
import os

TESTS = os.path.dirname(os.path.abspath(__file__))


def imported_modules(tree):
    """(line, top-level module name) of every import statement, function-level ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_no_file_in_tests_imports_a_test_module_or_conftest():
    files = sorted(glob.glob(os.path.join(TESTS, "*.py")))
    assert os.path.join(TESTS, "test_layers_tests.py") in files
    bad = []
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for line, module in imported_modules(tree):
            if module.startswith("test_") or module == "conftest":
                bad.append(f"{os.path.basename(path)}:{line} imports {module}")
    assert bad == [], "import shared helpers from helpers.py (or use a conftest fixture):\n" + \
        "\n".join(bad)


def test_the_scan_sees_function_level_and_from_imports():
    tree = ast.parse("import os\nfrom test_x import a\n\ndef f():\n    import test_y.z\n"
                     "    from conftest import b\n    from . import c\n")
    assert sorted(imported_modules(tree)) == [(1, "os"), (2, "test_x"), (5, "test_y"),
                                              (6, "conftest")]
