"""The DPC-vs-DePT comparison command: finished runs are reused (nothing retrained), and the
table, JSON and bar chart hold their numbers."""

import json
import os

import numpy as np
import pytest

from dpc_jax import compare
from dpc_jax.evaluation.results import scores, summarize


def write_run(workdir, stages):
    """A finished run's results.json, as train_and_evaluate writes it (summarize of per-seed
    scores)."""
    os.makedirs(workdir)
    per_seed = {stage: {seed: scores(*accs[i]) for i, seed in enumerate((1, 2, 3))}
                for stage, accs in stages.items()}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(summarize(per_seed), f)


def write_coop_runs(w):
    """CoOp (+DPC) and DePT around CoOp, 3 seeds each, as finished runs under `w`."""
    zs = [(37.0, 62.0)] * 3
    write_run(os.path.join(w, "coop"), {"zeroshot": zs, "backbone": [(60, 58), (62, 59), (61, 58)],
                                        "dpc": [(64, 58), (65, 59), (63, 58)]})
    write_run(os.path.join(w, "dept_coop"), {"zeroshot": zs,
                                             "backbone": [(40, 61), (41, 61), (39, 60)]})

def test_reuses_finished_runs_and_writes_table_json_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    w = str(tmp_path)
    write_coop_runs(w)
    table = compare.main(["--workdir", w, "--backbones", "coop"])
    rows = table["coop"]
    assert rows["backbone"]["base"] == pytest.approx(61.0)
    assert rows["+DPC"]["base"] == pytest.approx(64.0)
    assert rows["+DePT"]["new"] == pytest.approx(182 / 3)
    hm = [2 * b * n / (b + n) for b, n in [(40, 61), (41, 61), (39, 60)]]
    assert rows["+DePT"]["hm_std"] == pytest.approx(np.std(hm))
    text = open(os.path.join(w, "comparison.md")).read()
    assert "| CoOp | CoOp+DPC | 64.00 ± 0.82 | 58.33 ± 0.47 |" in text
    assert json.load(open(os.path.join(w, "comparison.json")))["coop"]["+DPC"]["base"] == 64.0
    import matplotlib.image

    image = matplotlib.image.imread(os.path.join(w, "comparison.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(["--workdir", str(tmp_path), "--backbones", "coop,cocoop"])
    assert e.value.code == 2
    assert "expected some of coop, ivlp, maple, promptsrc" in capsys.readouterr().err


def test_the_chart_names_the_dataset_and_says_where_its_axis_starts(tmp_path, monkeypatch):
    """comparison.png as drawn: its title names the dataset of --args (the world without
    it) and the seeds; its y-axis, cut to show the differences, says where it starts."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from dpc_jax.evaluation import report

    drawn = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: drawn.setdefault(path, fig))
    w = str(tmp_path)
    write_coop_runs(w)
    for args, name in (([], "world"), (["--args", "dataset=dtd"], "DTD")):
        drawn.clear()
        compare.main(["--workdir", w, "--backbones", "coop", *args])
        ax = drawn[os.path.join(w, "comparison.png")].axes[0]
        assert ax.get_title().startswith(f"{name}: H of each learner alone, with DePT and with "
                                         f"DPC\n(mean of seeds 1,2,3; error bars"), ax.get_title()
        bottom = ax.get_ylim()[0]
        assert bottom > 0 and f"y-axis starts at {bottom:.0f}, not 0" in ax.get_ylabel()
        plt.close("all")
