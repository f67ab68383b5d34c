"""The Colab notebooks: stored without outputs, and each runs top to bottom on CPU in its smoke
setting (papermill, offline; the data and checkpoints come from the notebook's smoke path)."""

import glob
import json
import os
import sys

import nbformat
import papermill
import pytest

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLAB, "*.ipynb")))


def test_at_least_three_notebooks_stored_without_outputs():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS
    for path in NOTEBOOKS:
        with open(path) as f:
            nb = nbformat.read(f, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code), path
        # It opens with what it does and how long it takes on CPU / GPU / TPU ...
        intro = nb.cells[0]
        assert intro.cell_type == "markdown" and "How long" in intro.source, path
        assert all(word in intro.source for word in ("CPU", "GPU", "TPU")), path
        # ... then a papermill parameters cell with the smoke switch.
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and "SMOKE = False" in params[0].source, path
        assert "WORKDIR" in params[0].source, path
        # No model or training code: the notebooks call the library.
        text = "\n".join(c.source for c in code)
        for forbidden in ("nn.Module", "jax.grad", "value_and_grad", "optax.", "def loss"):
            assert forbidden not in text, (path, forbidden)


@pytest.mark.parametrize("name", [os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs_in_its_smoke_setting(name, tmp_path, monkeypatch):
    # The kernel is this interpreter (the one that has dpc_jax installed), offline.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / name
    papermill.execute_notebook(os.path.join(COLAB, name), str(out), kernel_name="python3",
                               parameters={"SMOKE": True, "WORKDIR": str(tmp_path)},
                               cwd=str(tmp_path), progress_bar=False)
    with open(out) as f:
        executed = json.load(f)
    errors = [o for c in executed["cells"] for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    runs = tmp_path / "runs"
    assert any(runs.rglob("results.json")), "the notebook trained nothing"
