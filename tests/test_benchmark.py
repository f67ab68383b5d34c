"""The results runner (`python -m dpc_jax.benchmark`) and its report: the grid and its shards,
skip-finished and resume on a tiny real world run, the table's numbers on synthetic results
with known values, the paper's numbers as shipped, the plots, and one-line errors."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpc_jax import benchmark
from dpc_jax.evaluation import report
from dpc_jax.evaluation.results import harmonic_mean, scores, summarize
from helpers import REPO, Interrupted

PAPER_MD = os.path.join(REPO, "docs", "reference", "paper_results.md")


# ---------------------------------------------------------------- synthetic runs

def write_run(workdir, dataset, backbone, stages, inner=None, protocol=None):
    """A finished run as train_and_evaluate leaves it: results.json (summarize of per-seed
    scores) and config.json. `stages`: {stage: {seed: (base, new)}}."""
    os.makedirs(workdir)
    per_seed = {st: {s: scores(*bn) for s, bn in by_seed.items()} for st, by_seed in
                stages.items()}
    results = summarize(per_seed)
    if protocol:
        results["protocol"] = protocol
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)
    config = {"dataset": dataset, "backbone": {"name": backbone}}
    if inner:
        config["backbone"]["inner"] = {"name": inner}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)


# CoOp on dtd, seeds 1 and 2: the mean of per-seed H (57.06) differs from the H of the means
# (56.84), so the test tells the two conventions apart.
COOP_DTD = {"zeroshot": {1: (50.0, 60.0), 2: (50.0, 60.0)},
            "backbone": {1: (80.0, 40.0), 2: (60.0, 50.0)},
            "dpc": {1: (84.0, 40.0), 2: (66.0, 50.0)}}
COOP_WORLD = {"zeroshot": {1: (37.0, 62.0)}, "backbone": {1: (61.0, 59.0)},
              "dpc": {1: (64.0, 59.0)}}


@pytest.fixture
def synthetic_root(tmp_path):
    root = str(tmp_path / "root")
    # dtd's CoOp seeds in two directories (as two shards might leave them): pooled.
    write_run(os.path.join(root, "dtd", "dpc_coop"), "dtd", "coop",
              {st: {1: v[1]} for st, v in COOP_DTD.items()})
    write_run(os.path.join(root, "dtd", "dpc_coop_more"), "dtd", "coop",
              {st: {2: v[2]} for st, v in COOP_DTD.items()})
    write_run(os.path.join(root, "world", "dpc_coop"), "world", "coop", COOP_WORLD)
    write_run(os.path.join(root, "world", "dpc_maple"), "world", "maple",
              {"zeroshot": {1: (37.0, 62.0)}, "backbone": {1: (45.0, 56.0)},
               "dpc": {1: (58.0, 56.0)}})
    write_run(os.path.join(root, "world", "dept_coop"), "world", "dept",
              {"zeroshot": {1: (37.0, 62.0)}, "backbone": {1: (36.0, 61.0)}}, inner="coop")
    return root


def test_table_numbers_are_h_of_seed_means_and_the_dataset_average(synthetic_root):
    table = report.build_table(report.collect(synthetic_root, notice=lambda s: None))
    coop = table["families"]["coop"]
    assert table["datasets"] == ["dtd", "world"]
    assert coop["columns"] == ["zeroshot", "backbone", "+DePT", "+DPC"]
    dtd = coop["rows"]["dtd"]
    assert dtd["backbone"]["base"] == 70.0 and dtd["backbone"]["new"] == 45.0
    assert dtd["backbone"]["hm"] == pytest.approx(2 * 70 * 45 / 115)  # 54.78: H of the means
    mean_of_h = np.mean([harmonic_mean(80, 40), harmonic_mean(60, 50)])
    assert abs(dtd["backbone"]["hm"] - mean_of_h) > 0.5  # 54.78 against 54.04
    assert dtd["backbone"]["base_std"] == pytest.approx(10.0)
    assert dtd["+DPC"]["base"] == 75.0
    assert dtd["delta"]["base"] == pytest.approx(5.0) and dtd["delta"]["new"] == 0.0
    assert dtd["delta"]["hm"] == pytest.approx(harmonic_mean(75, 45) - harmonic_mean(70, 45))
    # +DePT was run on the world only: the average is over the datasets with every column.
    assert coop["average_over"] == ["world"] and "average" not in coop["rows"]
    assert coop["rows"]["world"]["+DePT"]["base"] == 36.0


def summary_table(text, heading):
    """The rows under `heading` in summary.md: [[cell, ...], ...] without the header."""
    block = text.split(heading + "\n", 1)[1].lstrip("\n").split("\n\n", 1)[0]
    lines = [l for l in block.splitlines() if l.startswith("|")]
    assert lines[0] == ("| learner | zero-shot B/N/H | learner B/N/H | +DPC B/N/H | ΔH DPC | "
                        "seeds |")
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]


def bnh(base, new):
    return f"{base:.2f}/{new:.2f}/{harmonic_mean(base, new):.2f}"


def test_summary_md_has_a_row_per_learner_in_registry_order_and_dept_rows(synthetic_root):
    """summary.md (the README's results table): per dataset, the seed means and the H of the
    means of zero-shot, the learner and +DPC, ΔH, the seeds; learners in registry order
    (CoOp before CoCoOp, which sorts first by name), DePT runs after them as 'DePT (CoOp)'
    without +DPC."""
    write_run(os.path.join(synthetic_root, "world", "cocoop"), "world", "cocoop",
              {"zeroshot": {3: (37.0, 62.0)}, "backbone": {3: (50.0, 60.0)}})
    report.write_report(synthetic_root, notice=lambda s: None)
    text = open(os.path.join(synthetic_root, "summary.md")).read()
    assert summary_table(text, "**DTD**, seeds 1,2") == [
        ["CoOp", bnh(50, 60), bnh(70, 45), bnh(75, 45),
         f"{harmonic_mean(75, 45) - harmonic_mean(70, 45):+.2f}", "1,2"]]
    assert summary_table(text, "**world**, seeds 1,3") == [
        ["CoOp", bnh(37, 62), bnh(61, 59), bnh(64, 59),
         f"{harmonic_mean(64, 59) - harmonic_mean(61, 59):+.2f}", "1"],
        ["CoCoOp", bnh(37, 62), bnh(50, 60), "–", "–", "3"],
        ["MaPLe", bnh(37, 62), bnh(45, 56), bnh(58, 56),
         f"{harmonic_mean(58, 56) - harmonic_mean(45, 56):+.2f}", "1"],
        ["DePT (CoOp)", bnh(37, 62), bnh(36, 61), "–", "–", "1"]]


def test_average_row_over_datasets(tmp_path):
    root = str(tmp_path)
    write_run(os.path.join(root, "dtd", "dpc_coop"), "dtd", "coop", COOP_DTD)
    write_run(os.path.join(root, "world", "dpc_coop"), "world", "coop", COOP_WORLD)
    table = report.build_table(report.collect(root, notice=lambda s: None))
    avg = table["families"]["coop"]["rows"]["average"]
    # B and N: means over the datasets of the seed means; H of those two means.
    assert avg["backbone"]["base"] == pytest.approx((70.0 + 61.0) / 2)
    assert avg["backbone"]["new"] == pytest.approx((45.0 + 59.0) / 2)
    assert avg["backbone"]["hm"] == pytest.approx(harmonic_mean(65.5, 52.0))
    assert avg["+DPC"]["base"] == pytest.approx((75.0 + 64.0) / 2)
    assert avg["delta"]["base"] == pytest.approx(4.0)
    assert avg["delta"]["hm"] == pytest.approx(harmonic_mean(69.5, 52.0)
                                               - harmonic_mean(65.5, 52.0))
    text = report.markdown(table)
    assert ("| Average (2) |  | 43.50/61.00/50.78 | 65.50/52.00/57.97 | 69.50/52.00/59.49 | "
            "+4.00/+0.00/+1.52 |") in text


def test_paper_columns_for_a_paper_dataset_only(synthetic_root):
    table = report.build_table(report.collect(synthetic_root, notice=lambda s: None))
    text = report.markdown(table)
    # DTD is in the paper: CoOp 80.09/49.88/61.47, +DPC 84.61/49.88/62.76.
    h70, h75 = harmonic_mean(70, 45), harmonic_mean(75, 45)
    assert (f"| DTD | 1,2 | 50.00/60.00/54.55 | 70.00/45.00/{h70:.2f} | – | 75.00/45.00/{h75:.2f}"
            f" | +5.00/+0.00/{h75 - h70:+.2f} | 80.09/49.88/61.47 | 84.61/49.88/62.76 | "
            f"-10.09/-4.88/{h70 - 61.47:+.2f} | -9.61/-4.88/{h75 - 62.76:+.2f} |") in text
    world = [line for line in text.splitlines() if line.startswith("| world |")][0]
    assert world.endswith("| – | – | – | – |")  # the world is not one of the paper's
    assert "## MaPLe" in text and "## CoOp" in text
    rows = report.csv_rows(table)
    dpc_dtd = [r for r in rows if r["dataset"] == "dtd" and r["method"] == "CoOp+DPC"][0]
    assert dpc_dtd["paper_base"] == 84.61 and dpc_dtd["diff_base"] == pytest.approx(-9.61)
    assert dpc_dtd["seeds_or_datasets"] == 2


def test_same_seed_with_different_numbers_in_two_runs_is_an_error(tmp_path):
    root = str(tmp_path)
    write_run(os.path.join(root, "a"), "dtd", "coop", {"backbone": {1: (70.0, 40.0)}})
    write_run(os.path.join(root, "b"), "dtd", "coop", {"backbone": {1: (71.0, 40.0)}})
    with pytest.raises(ValueError, match="seed 1 of coop backbone on dtd differs between"):
        report.build_table(report.collect(root, notice=lambda s: None))


def test_unknown_protocol_is_skipped_with_a_notice(tmp_path):
    root = str(tmp_path)
    write_run(os.path.join(root, "a"), "dtd", "coop", {"backbone": {1: (70.0, 40.0)}})
    write_run(os.path.join(root, "b"), "imagenet", "coop", {"backbone": {1: (70.0, 40.0)}},
              protocol="open_vocabulary")
    notes = []
    runs = report.collect(root, notice=notes.append)
    assert [r.dataset for r in runs] == ["dtd"]
    assert len(notes) == 1 and "protocol 'open_vocabulary' is not reported" in notes[0]


def write_protocol_run(workdir, protocol, method, accuracy, source="world",
                       targets=("world_a", "world_r"), shots=16):
    """A run of another protocol as `Protocol.summarize` writes it. `accuracy`:
    {stage: {set: {seed: %}}}."""
    os.makedirs(workdir)
    stages = {st: {"accuracy": {s: {"mean": float(np.mean(list(v.values()))),
                                    "std": float(np.std(list(v.values()))),
                                    "per_seed": {str(k): x for k, x in v.items()}}
                                for s, v in sets.items()}} for st, sets in accuracy.items()}
    results = {"protocol": protocol, "source": source, "targets": list(targets),
               "shots": shots, "transfer_prompt": "new", "stages": stages}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"dataset": source, "backbone": {"name": method}}, f)


def test_protocol_runs_get_their_own_tables(tmp_path):
    root = str(tmp_path / "root")
    dg = {"backbone": {"world": {1: 60.0, 2: 62.0}, "world_a": {1: 30.0, 2: 34.0},
                       "world_r": {1: 50.0, 2: 50.0}},
          "zeroshot": {"world": {1: 40.0, 2: 40.0}, "world_a": {1: 20.0, 2: 20.0},
                       "world_r": {1: 45.0, 2: 45.0}}}
    # Seeds 1 and 2 in two directories (two shards): pooled.
    for seed in (1, 2):
        write_protocol_run(os.path.join(root, f"dg{seed}"), "domain_generalisation", "coop",
                           {st: {s: {seed: v[seed]} for s, v in sets.items()}
                            for st, sets in dg.items()})
    write_protocol_run(os.path.join(root, "fs"), "few_shot", "coop",
                       {"backbone": {"world": {1: 55.5}}}, targets=(), shots=4)
    out = report.write_report(root, notice=lambda s: None)
    assert out["table"] is None  # no base-to-new run
    assert set(out["files"]) == {"table_domain_generalisation.md",
                                 "table_domain_generalisation.csv", "table_few_shot.md",
                                 "table_few_shot.csv"}
    (table,) = out["protocols"]["domain_generalisation"]
    assert table["sets"] == ["world", "world_a", "world_r"]
    zs, coop = table["rows"]
    assert (zs["label"], coop["label"]) == ("zero-shot CLIP", "CoOp")
    assert coop["cells"]["world_a"] == (32.0, 2.0, 2)
    assert coop["average"] == pytest.approx((32.0 + 50.0) / 2)  # targets only, not the source
    md = open(os.path.join(root, "table_domain_generalisation.md")).read()
    assert "| CoOp | 61.00 ± 1.00 | 32.00 ± 2.00 | 50.00 ± 0.00 | 41.00 |" in md
    assert "## domain_generalisation: source world, 16 shots" in md
    few = open(os.path.join(root, "table_few_shot.md")).read()
    assert "| CoOp | 55.50 ± 0.00 |" in few and "target average" not in few
    with open(os.path.join(root, "table_domain_generalisation.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["set"] for r in rows} == {"world", "world_a", "world_r"}
    # The same seed with other numbers in two runs is an error naming both.
    write_protocol_run(os.path.join(root, "dg_clash"), "domain_generalisation", "coop",
                       {"backbone": {"world": {1: 99.0}, "world_a": {1: 30.0},
                                     "world_r": {1: 50.0}}})
    with pytest.raises(ValueError, match="seed 1 of coop backbone on world"):
        report.write_report(root, notice=lambda s: None)


def test_report_writes_table_csv_and_plots(synthetic_root, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    assert benchmark.cli(["report", synthetic_root]) == 0
    md = open(os.path.join(synthetic_root, "table.md")).read()
    assert "## CoOp" in md and "![bars_dtd.png](plots/bars_dtd.png)" in md
    with open(os.path.join(synthetic_root, "table.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {(r["dataset"], r["method"]) for r in rows} >= {
        ("dtd", "CoOp"), ("dtd", "CoOp+DPC"), ("dtd", "CoOp+DPC − CoOp"), ("world", "MaPLe+DPC"),
        ("world", "CoOp+DePT"), ("world", "zero-shot CLIP")}
    plots = sorted(os.listdir(os.path.join(synthetic_root, "plots")))
    # world has CoOp and MaPLe with +DPC: a plug-and-play chart; dtd has CoOp only.
    assert plots == ["bars_dtd.png", "bars_world.png", "plug_and_play_world.png"]
    for name in plots:
        image = matplotlib.image.imread(os.path.join(synthetic_root, "plots", name))
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


def test_shipped_paper_numbers_reproduce_its_average_row():
    paper = report.load_paper()
    datasets = [d for d in paper if d != "average"]
    assert sorted(datasets) == sorted(report.PAPER_ORDER)
    for learner in ("coop", "maple", "promptsrc", "promptkd"):
        for stage in ("backbone", "dpc"):
            avg = report.average([dict(zip(("base", "new", "hm"), paper[d][learner][stage]))
                                  for d in datasets])
            published = paper["average"][learner][stage]
            assert avg["base"] == pytest.approx(published[0], abs=0.006)
            assert avg["new"] == pytest.approx(published[1], abs=0.006)
            assert avg["hm"] == pytest.approx(published[2], abs=0.011)


PAPER_ROWS = {"Average (11)": "average", "ImageNet": "imagenet", "Caltech101": "caltech101",
              "OxfordPets": "oxford_pets", "StanfordCars": "stanford_cars",
              "Flowers102": "oxford_flowers", "Food101": "food101",
              "FGVCAircraft": "fgvc_aircraft", "SUN397": "sun397", "DTD": "dtd",
              "EuroSAT": "eurosat", "UCF101": "ucf101"}


def test_shipped_paper_numbers_equal_the_paper_table_in_the_docs():
    """paper_results.json (what the report prints) equals docs/reference/paper_results.md."""
    lines = [l for l in open(PAPER_MD).read().splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "Dataset"
    columns = []
    for c in header[1:]:
        columns.append((columns[-1][0], "dpc") if c == "+DPC"
                       else (c.split()[0].lower(), "backbone"))
    parsed = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for (learner, stage), cell in zip(columns, cells[1:]):
            parsed.setdefault(PAPER_ROWS[cells[0]], {}).setdefault(learner, {})[stage] = [
                float(x) for x in cell.split("/")]
    assert len(parsed) == 12 and report.load_paper() == parsed


# ---------------------------------------------------------------- the grid and its shards

def test_shards_partition_the_grid():
    grid = benchmark.build_grid("dpc_coop,dpc_maple,dept:backbone=maple", "world,dtd", "1,2,3")
    assert len(grid) == 18 and len(set(grid)) == 18
    assert {p.name for p in grid} == {"dpc_coop", "dpc_maple", "dept_maple"}
    again = benchmark.build_grid("dept:backbone=maple,dpc_maple,dpc_coop", "dtd,world", "3,1,2")
    assert again == grid  # the order given does not matter: every task sees one grid
    for n in (1, 2, 3, 4, 7, 18, 25):
        parts = [benchmark.shard(grid, i, n) for i in range(n)]
        flat = [p for part in parts for p in part]
        assert sorted(flat, key=lambda p: p.key) == grid and len(set(flat)) == len(grid)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert benchmark.parse_shard("2/5") == (2, 5)


def test_dry_run_lists_a_shard(tmp_path, capsys):
    assert benchmark.cli(["run", str(tmp_path), "--configs", "dpc_coop,dept:backbone=coop",
                          "--seeds", "1,2,3", "--shard", "1/2", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "grid: 6 points; shard 1/2: 3"
    listed = [l.split()[1:4:2] for l in out[1:]]
    assert listed == [[os.path.join(str(tmp_path), "world", "dept_coop"), "2"],
                      [os.path.join(str(tmp_path), "world", "dpc_coop"), "1"],
                      [os.path.join(str(tmp_path), "world", "dpc_coop"), "3"]]
    assert all(l.startswith("new ") for l in out[1:])
    assert not os.listdir(tmp_path)  # a dry run writes nothing


@pytest.mark.parametrize("argv, message", [
    (["run", "@R", "--configs", "dpc_cop"], "Error: unknown config 'dpc_cop' (in --configs); "
                                              "expected one of cocoop, dept, dpc_coop"),
    (["run", "@R", "--configs", "dpc_coop", "--shard", "2/2"],
     "Error: --shard='2/2': expected i/n with 0 <= i < n"),
    (["run", "@R", "--configs", "dpc_coop", "--shard", "half"],
     "Error: --shard='half': expected i/n with integers"),
    (["run", "@R", "--configs", "dpc_coop", "--datasets", "dtdd"],
     "Error: --datasets: unknown dataset 'dtdd'"),
    (["run", "@R", "--configs", "dpc_coop", "--seeds", "1,x"],
     "Error: --seeds='1,x': expected comma-separated integers"),
    (["run", "@R", "--configs", "dpc_coop", "--set", "backbone.epoch=2"],
     "Error: --set backbone.epoch=2: backbone has no field 'epoch'; expected one of "),
    (["report", "@R/missing"], "Error: ROOT '@R/missing' is not a directory"),
    (["report", "@R"], "Error: ROOT '@R' holds no runs"),
    (["run", "@R"], "Error: no configs: give --configs"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, argv, message):
    root = str(tmp_path / "empty")
    os.makedirs(root)
    argv = [a.replace("@R", root) for a in argv]
    assert benchmark.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.replace("@R", root)) and err.count("\n") == 1, err


def test_command_line_error_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "dpc_jax.benchmark", "report",
                           str(tmp_path / "nothing")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"Error: ROOT {str(tmp_path / 'nothing')!r} is not a directory; expected the directory "
        f"`python -m dpc_jax.benchmark run` wrote"]


# ---------------------------------------------------------------- a tiny real run

TINY = ["--set", "shots=2", "--set", "backbone.epochs=2", "--set", "backbone.batch_size=16",
        "--set", "batch_size=4", "--set", "dhno.top_k=4", "--set", "dpc.epochs=1",
        "--set", "optim.warmup_epochs=0", "--set", "log_every_steps=1", "--set", "checkpoint_every_steps=4"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """One tiny world run (dpc_coop, seed 1) through the runner: interrupted in stage 1 after
    5 steps (a checkpoint at step 4), rerun (resumes), rerun (skipped)."""
    from dpc_jax.training import train_lib

    root = str(tmp_path_factory.mktemp("bench"))
    argv = ["run", root, "--configs", "dpc_coop", "--seeds", "1"] + TINY
    real = train_lib.train_and_evaluate
    starts, calls = [], []

    def hook(name, step, start, total):
        starts.append((name, start))
        if len(calls) == 1 and step - start >= 5 and step < total:
            raise Interrupted(name)

    def patched(config, workdir, hooks=()):
        calls.append(workdir)
        return real(config, workdir, hooks=(hook,))

    train_lib.train_and_evaluate = patched
    try:
        with pytest.raises(Interrupted):
            benchmark.main(argv)
        second = benchmark.main(argv)
        third = benchmark.main(argv)
    finally:
        train_lib.train_and_evaluate = real
    return {"root": root, "states": [second[0][1], third[0][1]], "calls": calls,
            "starts": starts}


def test_interrupted_run_resumes_and_finished_run_is_skipped(tiny_root):
    workdir = os.path.join(tiny_root["root"], "world", "dpc_coop")
    assert tiny_root["states"] == ["partial", "finished"]
    assert tiny_root["calls"] == [workdir, workdir]  # the third call trained nothing
    backbone_starts = {s for name, s in tiny_root["starts"] if " backbone " in name}
    assert backbone_starts == {0, 4}  # resumed from the step-4 checkpoint, not from 0
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert set(results) == {"zeroshot", "backbone", "dpc"}
    assert all(set(r["per_seed"]) == {"1"} for r in results.values())
    log = [json.loads(l) for l in open(os.path.join(workdir, "seed_1", "backbone", "log.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))  # each step logged once
    run = json.load(open(os.path.join(workdir, "run.json")))
    assert run["config"] == "dpc_coop" and run["set"]["backbone.epochs"] == 2


def test_rerun_with_other_settings_into_the_same_root_is_refused(tiny_root, capsys):
    argv = ["run", tiny_root["root"], "--configs", "dpc_coop", "--seeds", "2"] + TINY[:-2] + [
        "--set", "checkpoint_every_steps=8"]
    assert benchmark.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "was started with" in err and "use another ROOT" in err


def test_report_of_a_real_run_draws_its_training_curves(tiny_root):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out = report.write_report(tiny_root["root"], notice=lambda s: None)
    assert "plots/curves_world_coop.png" in out["files"]
    image = matplotlib.image.imread(os.path.join(tiny_root["root"], "plots",
                                                 "curves_world_coop.png"))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600
    results = json.load(open(os.path.join(tiny_root["root"], "world", "dpc_coop",
                                          "results.json")))
    text = open(os.path.join(tiny_root["root"], "table.md")).read()
    r = results["dpc"]
    assert f"{r['base']:.2f}/{r['new']:.2f}/{r['hm']:.2f}" in text


# ---------------------------------------------------------------- what the plots show

@pytest.fixture
def figures(monkeypatch):
    """The figures the report's plot functions draw, by file name, instead of PNG files (their
    texts and positions are then checked as drawn)."""
    pytest.importorskip("matplotlib")
    drawn = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: drawn.setdefault(
        os.path.basename(path), fig))
    yield drawn
    import matplotlib.pyplot as plt

    for fig in drawn.values():
        plt.close(fig)


def _extents(fig, artists):
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists]


def _visible_bars(fig, ax):
    """The drawn part of each bar: a bar below a cut y-axis is clipped at the axes."""
    from matplotlib.transforms import Bbox

    return [b for b in (Bbox.intersection(e, ax.bbox) for e in _extents(fig, ax.patches))
            if b is not None]


def _overlapping(boxes):
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            if boxes[i].overlaps(boxes[j])]


def write_logs(workdir, stage, steps, lr, extra=None, seed=1):
    os.makedirs(os.path.join(workdir, f"seed_{seed}", stage))
    with open(os.path.join(workdir, f"seed_{seed}", stage, "log.jsonl"), "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "loss": 1.0 + 1 / step, "lr": lr(step),
                                **(extra or {})}) + "\n")


def test_training_curves_name_every_stage_apart_and_show_the_warm_up(tmp_path, figures):
    """A short stage (PromptKD's teacher, 2 logged steps of 302) still gets its own readable
    name, apart from the next stage's; the learning rate is drawn on a log scale, so the
    constant warm-up (1e-5 against 2e-3) is visible, not flat on the axis."""
    w = str(tmp_path / "run")
    write_logs(w, "teacher", [1, 2], lambda s: 1e-3)
    write_logs(w, "backbone", range(10, 101, 10), lambda s: 2e-3)
    write_logs(w, "dpc", range(10, 201, 10), lambda s: 1e-5 if s <= 50 else 2e-3,
               {"valid_negatives": 16.0})
    assert report.training_curves(w, "curves.png", "title")
    fig = figures["curves.png"]
    fig.canvas.draw()
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_text()]
        assert [t.get_text() for t in labels] == ["teacher", "stage 1", "stage 2: DPC"]
        assert _overlapping(_extents(fig, labels)) == []
    lr = next(ax for ax in fig.axes if "learning rate" in ax.get_title())
    assert lr.get_yscale() == "log" and lr.get_ylim()[0] < 1e-5


def test_bar_charts_say_where_a_cut_axis_starts_and_keep_legends_off_the_bars(tmp_path,
                                                                              figures):
    row = lambda h: {"base": h, "new": h, "hm": h, "hm_std": 0.5,
                     "per_seed": {"1": {}, "2": {}}}
    report.bar_chart({"coop": {"backbone": row(60.4), "+DPC": row(61.5)},
                      "maple": {"backbone": row(50.3), "+DPC": row(59.0)}}, "cut.png",
                     "world", ("backbone", "+DPC"))
    report.bar_chart({"coop": {"backbone": row(4.0), "+DPC": row(6.0)}}, "whole.png", "world",
                     ("backbone", "+DPC"))
    cut, whole = figures["cut.png"].axes[0], figures["whole.png"].axes[0]
    assert cut.get_ylim()[0] == 45.0 and "y-axis starts at 45, not 0" in cut.get_ylabel()
    assert whole.get_ylim()[0] == 0.0 and "starts at" not in whole.get_ylabel()
    assert "mean of seeds 1,2; error bars: population std over seeds" in cut.get_title()
    for name in ("cut.png", "whole.png"):
        fig = figures[name]
        fig.canvas.draw()
        legend = _extents(fig, [fig.axes[0].get_legend()])[0]
        assert not any(legend.overlaps(b) for b in _visible_bars(fig, fig.axes[0]))


def test_dataset_bars_keep_legends_off_the_bars_and_name_the_dataset(synthetic_root, figures):
    table = report.build_table(report.collect(synthetic_root, notice=lambda s: None))
    report.dataset_bars(table, "world", "bars.png")
    fig = figures["bars.png"]
    fig.canvas.draw()
    assert fig._suptitle.get_text().startswith("world: base-to-new accuracy")
    for ax in fig.axes:
        legend = _extents(fig, [ax.get_legend()])[0]
        assert not any(legend.overlaps(b) for b in _visible_bars(fig, ax))


def test_a_few_shot_grid_point_is_summarised_by_its_own_protocol(tmp_path):
    """The grid's status rebuilds results.json from the per-seed files with the point's
    protocol: a few-shot run's seeds count as finished and its summary is the few-shot one
    (base_to_new's would look for a 'base' field those results do not have)."""
    point = benchmark.Point("dpc_coop", "world", 1, args="protocol=few_shot")
    config = benchmark.point_config(point, stages="zeroshot,backbone")
    assert config.protocol == "few_shot"
    root = str(tmp_path)
    for stage, acc in (("zeroshot", 41.0), ("backbone", 63.5)):
        stage_dir = os.path.join(point.workdir(root), "seed_1", stage)
        os.makedirs(stage_dir)
        with open(os.path.join(stage_dir, "results.json"), "w") as f:
            json.dump({"accuracy": {"world": acc}}, f)
    assert benchmark.status(point, root, config) == "finished"
    with open(os.path.join(point.workdir(root), "results.json")) as f:
        merged = json.load(f)
    assert merged["protocol"] == "few_shot" and merged["shots"] == config.shots
    assert merged["stages"]["backbone"]["accuracy"]["world"]["per_seed"] == {"1": 63.5}
    assert not benchmark.has_seeds(merged, ["zeroshot", "backbone"], [1, 2])
    assert benchmark.has_seeds(merged, ["zeroshot", "backbone"], [1])


def test_report_without_matplotlib_writes_its_tables_and_says_so(synthetic_root):
    """matplotlib is an extra: without it the report still writes table.md and table.csv, and
    one line says which extra draws the plots."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from dpc_jax import benchmark\n"
            f"sys.exit(benchmark.cli(['report', {synthetic_root!r}]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert 'no plots: matplotlib is not installed (pip install -e ".[plot]")' in out.stdout
    assert os.path.isfile(os.path.join(synthetic_root, "table.md"))
    assert os.path.isfile(os.path.join(synthetic_root, "table.csv"))
    assert not os.path.isdir(os.path.join(synthetic_root, "plots")) or not os.listdir(
        os.path.join(synthetic_root, "plots"))
