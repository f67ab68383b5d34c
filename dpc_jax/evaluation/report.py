"""The results report: every run under a ROOT as the paper's base-to-new table, and its plots.

`write_report(root)` (what `python -m dpc_jax.benchmark report ROOT` calls) writes ROOT/table.md,
ROOT/table.csv, ROOT/summary.md (one compact table per dataset: a row per learner and per DePT
run) and ROOT/plots/*.png; `collect`, `build_table`, `markdown`, `summary_markdown`, `csv_rows`
and the plot functions are the pieces, for notebooks.

A run is a directory holding results.json and config.json (what `train_and_evaluate` writes),
wherever it sits under ROOT: the dataset and the method come from config.json, so the runner's
ROOT/<dataset>/<run> directories and `python -m dpc_jax.compare`'s W/<run> read alike. Seeds of
one (dataset, method) found in several runs are pooled; the same seed with different numbers in
two runs is an error naming both.

Conventions (the paper's): a dataset's B and N are the means over seeds, its H the harmonic mean
of those means (not the mean of per-seed H); the average row is the mean over datasets of B and
of N and the H of those two means (this reproduces the paper's "Average (11)" row from its
per-dataset rows, see tests/test_benchmark.py).

results.json may carry a top-level 'protocol' (absent: 'base_to_new'); `READERS` maps a protocol
to the function that reads its stages. Runs of the other protocols (few_shot, cross_dataset,
domain_generalisation; `dpc_jax.evaluation.protocols`) go to ROOT/table_<protocol>.md and .csv
(`collect_protocol_runs`, `protocol_tables`): per (source, shots), one row per method and stage,
the accuracy on the source and on each target as mean ± population std over the pooled seeds,
and for the transfer protocols the mean over the targets (of the seed means). Runs of a protocol
nothing here reads are skipped with a one-line notice.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from dpc_jax.evaluation.protocols import PROTOCOLS, TRANSFER as TRANSFER_PROTOCOLS
from dpc_jax.evaluation.results import STAGE_NAMES, harmonic_mean, summarize
from dpc_jax.prompts import display_name, learner_names

PAPER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_results.json")
# The paper's dataset order (its table's rows); other datasets follow, sorted.
PAPER_ORDER = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
               "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
PAPER_NAMES = {"imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets",
               "stanford_cars": "StanfordCars", "oxford_flowers": "Flowers102",
               "food101": "Food101", "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397",
               "dtd": "DTD", "eurosat": "EuroSAT", "ucf101": "UCF101", "world": "world"}
# A family's columns: (column key, the method key's form, the stage read from that run).
COLUMNS = (("zeroshot", "{l}", "zeroshot"), ("backbone", "{l}", "backbone"),
           ("+DePT", "dept_{l}", "backbone"), ("+DPC", "{l}", "dpc"))


def label(learner: str, column: str) -> str:
    name = display_name(learner)
    return {"zeroshot": STAGE_NAMES["zeroshot"], "backbone": name}.get(column, name + column)


# ---------------------------------------------------------------- reading runs

@dataclasses.dataclass
class Run:
    workdir: str
    dataset: str
    method: str  # the learner ('coop'), or 'dept_<inner>' for DePT around it
    per_seed: Dict[str, Dict[str, dict]]  # stage -> seed -> {'base', 'new', 'hm'}


def method_key(config: dict) -> str:
    backbone = config.get("backbone", {})
    name = backbone.get("name", "")
    if name == "dept":
        return f"dept_{backbone.get('inner', {}).get('name', '')}"
    return name


def read_base_to_new(results: dict) -> Dict[str, Dict[str, dict]]:
    """stage -> seed -> scores, from a base-to-new results.json."""
    return {stage: dict(r["per_seed"]) for stage, r in results.items()
            if isinstance(r, dict) and "per_seed" in r}


READERS: Dict[str, Callable[[dict], Dict[str, Dict[str, dict]]]] = {
    "base_to_new": read_base_to_new}


def _walk_runs(root: str):
    """(directory, results, config) of every run under `root`."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ROOT {root!r} is not a directory; expected the directory "
                                f"`python -m dpc_jax.benchmark run` wrote")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if "results.json" not in filenames or "config.json" not in filenames:
            continue
        with open(os.path.join(dirpath, "results.json")) as f:
            results = json.load(f)
        with open(os.path.join(dirpath, "config.json")) as f:
            config = json.load(f)
        yield dirpath, results, config


def _no_runs(root: str) -> FileNotFoundError:
    return FileNotFoundError(f"ROOT {root!r} holds no runs; expected directories with "
                             f"results.json and config.json (from `python -m "
                             f"dpc_jax.benchmark run {root} ...`)")


def collect(root: str, notice: Callable[[str], None] = print, required: bool = True
            ) -> List[Run]:
    """Every base-to-new run under `root` (the other protocols: `collect_protocol_runs`;
    unknown ones: one notice each). `required`: no run at all is an error."""
    runs, others = [], 0
    for dirpath, results, config in _walk_runs(root):
        protocol = results.get("protocol", "base_to_new")
        if protocol not in READERS:
            others += 1
            if protocol not in PROTOCOL_TABLES:
                notice(f"skipping {dirpath}: protocol {protocol!r} is not reported (known: "
                       f"{', '.join([*READERS, *PROTOCOL_TABLES])})")
            continue
        runs.append(Run(dirpath, config["dataset"], method_key(config),
                        READERS[protocol](results)))
    if not runs and not others and required:
        raise _no_runs(root)
    return runs


# ---------------------------------------------------------------- the other protocols

PROTOCOL_TABLES = tuple(p for p in PROTOCOLS if p != "base_to_new")


@dataclasses.dataclass
class ProtocolRun:
    workdir: str
    protocol: str
    source: str
    shots: int
    method: str
    sets: List[str]  # the source, then the targets
    per_seed: Dict[str, Dict[str, Dict[str, float]]]  # stage -> set -> seed -> accuracy %


def collect_protocol_runs(root: str) -> List[ProtocolRun]:
    """Every run under `root` of few_shot, cross_dataset or domain_generalisation."""
    runs = []
    for dirpath, results, config in _walk_runs(root):
        protocol = results.get("protocol", "base_to_new")
        if protocol not in PROTOCOL_TABLES:
            continue
        source, targets = results["source"], list(results.get("targets", []))
        per_seed = {stage: {s: dict(v["per_seed"]) for s, v in r["accuracy"].items()}
                    for stage, r in results["stages"].items()}
        runs.append(ProtocolRun(dirpath, protocol, source, int(results["shots"]),
                                method_key(config), [source, *[t for t in targets
                                                               if t != source]], per_seed))
    return runs


def protocol_tables(runs: Sequence[ProtocolRun]) -> Dict[str, List[dict]]:
    """protocol -> its tables, one per (source, shots): {'protocol', 'source', 'shots',
    'sets', 'rows': [{'method', 'stage', 'label', 'cells': {set: (mean, std, n seeds)},
    'average': mean over the targets' means or None}]}. Seeds of one (protocol, source,
    shots, method) are pooled over runs; the same seed with different numbers is an error."""
    groups: dict = {}
    for run in runs:
        key = (run.protocol, run.source, run.shots)
        table = groups.setdefault(key, {"protocol": run.protocol, "source": run.source,
                                        "shots": run.shots, "sets": [], "values": {}})
        table["sets"] += [s for s in run.sets if s not in table["sets"]]
        for stage, by_set in run.per_seed.items():
            for name, by_seed in by_set.items():
                dest = table["values"].setdefault((run.method, stage), {}).setdefault(name, {})
                for seed, acc in by_seed.items():
                    if seed in dest and dest[seed][0] != acc:
                        raise ValueError(f"seed {seed} of {run.method} {stage} on {name} "
                                         f"({run.protocol}) differs between {dest[seed][1]} "
                                         f"and {run.workdir}")
                    dest[seed] = (acc, run.workdir)
    out: Dict[str, List[dict]] = {}
    stage_order = {"zeroshot": 0, "backbone": 1, "dpc": 2}
    for (protocol, _, _), table in sorted(groups.items()):
        rows = []
        for (method, stage), by_set in sorted(
                table["values"].items(), key=lambda kv: (method_sort(kv[0][0]),
                                                         stage_order.get(kv[0][1], 9))):
            cells = {name: (float(np.mean([v for v, _ in seeds.values()])),
                            float(np.std([v for v, _ in seeds.values()])), len(seeds))
                     for name, seeds in by_set.items()}
            targets = [s for s in table["sets"][1:] if s in cells]
            average = (float(np.mean([cells[t][0] for t in targets]))
                       if protocol in TRANSFER_PROTOCOLS and targets else None)
            column = {"zeroshot": "zeroshot", "backbone": "backbone", "dpc": "+DPC"}.get(
                stage, stage)
            learner = method[len("dept_"):] if method.startswith("dept_") else method
            name = label(learner, "+DePT" if method.startswith("dept_") else column)
            rows.append({"method": method, "stage": stage, "label": name, "cells": cells,
                         "average": average})
        out.setdefault(protocol, []).append({k: table[k] for k in ("protocol", "source",
                                                                   "shots", "sets")}
                                            | {"rows": rows})
    return out


def method_sort(method: str) -> tuple:
    learner = method[len("dept_"):] if method.startswith("dept_") else method
    known = learner_names()
    order = known.index(learner) if learner in known else len(known)
    return (order, learner, method.startswith("dept_"))


def protocol_markdown(tables: List[dict]) -> str:
    lines = []
    for t in tables:
        transfer = t["protocol"] in TRANSFER_PROTOCOLS
        lines += [f"## {t['protocol']}: source {t['source']}, {t['shots']} shots", ""]
        head = ["method", *(f"{s} (source)" if i == 0 else s for i, s in enumerate(t["sets"]))]
        head += ["target average"] if transfer else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in t["rows"]:
            cells = [f"{r['cells'][s][0]:.2f} ± {r['cells'][s][1]:.2f}" if s in r["cells"]
                     else "" for s in t["sets"]]
            if transfer:
                cells.append("" if r["average"] is None else f"{r['average']:.2f}")
            lines.append("| " + " | ".join([r["label"], *cells]) + " |")
        seeds = sorted({c[2] for r in t["rows"] for c in r["cells"].values()})
        lines += ["", f"Mean ± population std over {'/'.join(map(str, seeds))} seed(s).", ""]
    return "\n".join(lines)


def protocol_csv(tables: List[dict], path: str) -> None:
    fields = ["protocol", "source", "shots", "method", "stage", "set", "mean", "std", "seeds"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for t in tables:
            for r in t["rows"]:
                for s in t["sets"]:
                    if s in r["cells"]:
                        mean, std, n = r["cells"][s]
                        w.writerow({"protocol": t["protocol"], "source": t["source"],
                                    "shots": t["shots"], "method": r["method"],
                                    "stage": r["stage"], "set": s, "mean": f"{mean:.4f}",
                                    "std": f"{std:.4f}", "seeds": n})


def pool(runs: Sequence[Run]) -> Dict[str, Dict[str, Dict[str, Dict[str, dict]]]]:
    """dataset -> method -> stage -> seed -> scores, pooling the runs' seeds."""
    out: dict = {}
    where: dict = {}
    for run in runs:
        for stage, by_seed in run.per_seed.items():
            dest = out.setdefault(run.dataset, {}).setdefault(run.method, {}).setdefault(
                stage, {})
            for seed, scores in by_seed.items():
                key = (run.dataset, run.method, stage, seed)
                if seed in dest and (dest[seed]["base"], dest[seed]["new"]) != (
                        scores["base"], scores["new"]):
                    raise ValueError(f"seed {seed} of {run.method} {stage} on {run.dataset} "
                                     f"differs between {where[key]} and {run.workdir}")
                dest[seed] = scores
                where.setdefault(key, run.workdir)
    return out


def row(stage: dict) -> dict:
    """A summary row (summarize's fields) plus the population std of per-seed H and the seeds."""
    hm = [s["hm"] for s in stage["per_seed"].values()]
    return {"base": stage["base"], "base_std": stage["base_std"], "new": stage["new"],
            "new_std": stage["new_std"], "hm": stage["hm"], "hm_std": float(np.std(hm)),
            "n": len(hm), "per_seed": stage["per_seed"]}


def load_paper(path: str = PAPER_FILE) -> dict:
    """dataset -> learner -> {'backbone', 'dpc'} -> [B, N, H], the paper's published numbers."""
    with open(path) as f:
        return json.load(f)["results"]


# ---------------------------------------------------------------- the table

def dataset_order(datasets) -> List[str]:
    known = [d for d in PAPER_ORDER if d in datasets]
    return known + sorted(d for d in datasets if d not in PAPER_ORDER)


def build_table(runs: Sequence[Run], paper: Optional[dict] = None) -> dict:
    """{'datasets': [...], 'families': {learner: {'columns': [...], 'rows': {dataset or
    'average': {column: row}}, 'average_over': [...], 'paper': {dataset: {column: [B,N,H]}}}}}.

    One family per learner: zero-shot, the learner, +DePT (when run), +DPC; delta = +DPC minus
    the learner on B, N and H."""
    paper = load_paper() if paper is None else paper
    pooled = pool(runs)
    datasets = dataset_order(pooled)
    learners = {m[5:] if m.startswith("dept_") else m for d in pooled.values() for m in d}
    learners = [l for l in learner_names() if l in learners] + sorted(
        l for l in learners if l not in learner_names())
    families = {}
    for l in learners:
        rows: dict = {}
        for d in datasets:
            for column, form, stage in COLUMNS:
                methods = pooled[d]
                method = form.format(l=l)
                if column == "zeroshot" and method not in methods:
                    method = f"dept_{l}"  # a DePT run's zero-shot is the same CLIP's
                by_seed = methods.get(method, {}).get(stage)
                if by_seed:
                    rows.setdefault(d, {})[column] = row(summarize({stage: by_seed})[stage])
        if not rows:
            continue
        columns = [c for c, _, _ in COLUMNS if any(c in r for r in rows.values())]
        complete = [d for d in datasets if d in rows and all(c in rows[d] for c in columns)]
        if len(complete) >= 2:
            rows["average"] = {c: average([rows[d][c] for d in complete]) for c in columns}
        for r in rows.values():
            if "backbone" in r and "+DPC" in r:
                r["delta"] = {k: r["+DPC"][k] - r["backbone"][k] for k in ("base", "new", "hm")}
        published = {}
        for d in list(rows):
            key = d
            if d == "average" and sorted(complete) != sorted(PAPER_ORDER):
                continue  # the paper's average is over its 11 datasets only
            if key in paper and l in paper[key]:
                published[d] = {"backbone": paper[key][l]["backbone"],
                                "+DPC": paper[key][l]["dpc"]}
        families[l] = {"columns": columns, "rows": rows, "average_over": complete,
                       "paper": published}
    return {"datasets": datasets, "families": families}


def average(rows: Sequence[dict]) -> dict:
    """Mean over datasets of B and of N; H of those means (the paper's average row)."""
    base = float(np.mean([r["base"] for r in rows]))
    new = float(np.mean([r["new"] for r in rows]))
    return {"base": base, "new": new, "hm": harmonic_mean(base, new), "n": len(rows)}


def _cell(values) -> str:
    return "–" if values is None else "/".join(f"{v:.2f}" for v in values)


def _bnh(r: Optional[dict]):
    return None if r is None else (r["base"], r["new"], r["hm"])


def _signed(values) -> str:
    return "–" if values is None else "/".join(f"{v:+.2f}" for v in values)


def _diff(ours: Optional[dict], published) -> Optional[tuple]:
    if ours is None or published is None:
        return None
    return tuple(o - p for o, p in zip(_bnh(ours), published))


def markdown(table: dict, plots: Sequence[str] = ()) -> str:
    """One table per learner in the paper's layout (cells B/N/H), the average and delta rows,
    the paper's numbers and ours minus the paper's where the dataset is one of the paper's."""
    out = ["# Base-to-new results", "",
           "Cells are base/new/H (%), B and N the means over seeds and H the harmonic mean of "
           "those means; 'Average (n)' is the mean over n datasets of B and of N and the H of "
           "the two means; Δ DPC = +DPC minus the backbone. Paper: the DPC paper's published "
           "numbers (ViT-B/16); ours − paper where the dataset is one of its 11.", ""]
    for l, fam in table["families"].items():
        cols = fam["columns"]
        has_paper = bool(fam["paper"])
        head = ["dataset", "seeds"] + [label(l, c) for c in cols]
        if "backbone" in cols and "+DPC" in cols:
            head.append("Δ DPC")
        if has_paper:
            head += [f"paper {label(l, 'backbone')}", f"paper {label(l, '+DPC')}",
                     f"{label(l, 'backbone')} − paper", f"{label(l, '+DPC')} − paper"]
        out += [f"## {display_name(l)}", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        order = [d for d in table["datasets"] if d in fam["rows"]]
        if "average" in fam["rows"]:
            order.append("average")
        for d in order:
            r = fam["rows"][d]
            if d == "average":
                name, seeds = f"Average ({len(fam['average_over'])})", ""
            else:
                name = PAPER_NAMES.get(d, d)
                seeds = ",".join(sorted({s for c in cols if c in r for s in r[c]["per_seed"]},
                                        key=int))
            cells = [name, seeds] + [_cell(_bnh(r.get(c))) for c in cols]
            if "Δ DPC" in head:
                delta = r.get("delta")
                cells.append(_signed(None if delta is None else
                                     (delta["base"], delta["new"], delta["hm"])))
            if has_paper:
                pub = fam["paper"].get(d, {})
                cells += [_cell(pub.get("backbone")), _cell(pub.get("+DPC")),
                          _signed(_diff(r.get("backbone"), pub.get("backbone"))),
                          _signed(_diff(r.get("+DPC"), pub.get("+DPC")))]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{os.path.basename(p)}]({p})" for p in plots] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- the summary

def _seed_row(pooled: dict, dataset: str, method: str, stage: str) -> Optional[dict]:
    """The table row (seed means, H of the means) of one method's stage, or None."""
    by_seed = pooled.get(dataset, {}).get(method, {}).get(stage)
    return row(summarize({stage: by_seed})[stage]) if by_seed else None


def _seeds(*rows) -> List[str]:
    return sorted({s for r in rows if r for s in r["per_seed"]}, key=int)


def summary_rows(runs: Sequence[Run]) -> Dict[str, List[dict]]:
    """dataset -> one row per learner (registry order), then one per DePT run (as
    'DePT (CoOp)'): {'learner', 'zeroshot', 'backbone', '+DPC' (rows or None), 'delta_hm'
    (+DPC minus the learner's H, or None), 'seeds'}."""
    pooled = pool(runs)
    out = {}
    for d in dataset_order(pooled):
        methods = pooled[d]
        plain = [m for m in methods if not m.startswith("dept_")]
        dept = [m for m in methods if m.startswith("dept_")]
        order = sorted(plain, key=method_sort) + sorted(dept, key=method_sort)
        rows = []
        for m in order:
            is_dept = m.startswith("dept_")
            own_zs = zs = _seed_row(pooled, d, m, "zeroshot")
            if zs is None and is_dept:  # DePT's zero-shot is its CLIP's: the plain run's
                zs = _seed_row(pooled, d, m[len("dept_"):], "zeroshot")
            learner = _seed_row(pooled, d, m, "backbone")
            dpc = None if is_dept else _seed_row(pooled, d, m, "dpc")
            name = (f"{display_name('dept')} ({display_name(m[len('dept_'):])})" if is_dept
                    else display_name(m))
            rows.append({"learner": name, "method": m, "zeroshot": zs, "backbone": learner,
                         "+DPC": dpc,
                         "delta_hm": dpc["hm"] - learner["hm"] if dpc and learner else None,
                         "seeds": _seeds(own_zs, learner, dpc)})
        out[d] = rows
    return out


def summary_markdown(runs: Sequence[Run]) -> str:
    """ROOT/summary.md: one compact table per dataset of the base-to-new runs (the README
    embeds it)."""
    out = ["Cells are base/new/H accuracy (%): B and N the means over the seeds, H the harmonic "
           "mean of those means; ΔH = H of +DPC minus H of the learner. Written by `python -m "
           "dpc_jax.benchmark report ROOT`.", ""]
    for d, rows in summary_rows(runs).items():
        seeds = sorted({s for r in rows for s in r["seeds"]}, key=int)
        out += [f"**{PAPER_NAMES.get(d, d)}**, seeds {','.join(seeds)}", "",
                "| learner | zero-shot B/N/H | learner B/N/H | +DPC B/N/H | ΔH DPC | seeds |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            delta = "–" if r["delta_hm"] is None else f"{r['delta_hm']:+.2f}"
            out.append(f"| {r['learner']} | {_cell(_bnh(r['zeroshot']))} | "
                       f"{_cell(_bnh(r['backbone']))} | {_cell(_bnh(r['+DPC']))} | {delta} | "
                       f"{','.join(r['seeds'])} |")
        out.append("")
    return "\n".join(out)


CSV_FIELDS = ("dataset", "learner", "method", "seeds_or_datasets", "base", "new", "hm",
              "base_std", "new_std", "hm_std", "paper_base", "paper_new", "paper_hm",
              "diff_base", "diff_new", "diff_hm")


def csv_rows(table: dict) -> List[dict]:
    """The table in long form: one line per (dataset or 'average', learner, column), the delta
    as method '<name>+DPC − <name>'."""
    lines = []
    for l, fam in table["families"].items():
        for d, r in fam["rows"].items():
            for c in fam["columns"] + ["delta"]:
                if c not in r:
                    continue
                x = r[c]
                method = (f"{label(l, '+DPC')} − {label(l, 'backbone')}" if c == "delta"
                          else label(l, c))
                line = {"dataset": d, "learner": l, "method": method,
                        "seeds_or_datasets": x.get("n", ""),
                        **{k: round(x[k], 4) for k in ("base", "new", "hm")},
                        **{k: round(x[k], 4) if k in x else "" for k in
                           ("base_std", "new_std", "hm_std")}}
                pub = fam["paper"].get(d, {}).get(c)
                diff = _diff(x, pub) if c != "delta" else None
                for i, k in enumerate(("base", "new", "hm")):
                    line[f"paper_{k}"] = pub[i] if pub else ""
                    line[f"diff_{k}"] = round(diff[i], 4) if diff else ""
                lines.append(line)
    return lines


def write_csv(table: dict, path: str) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(csv_rows(table))
    with open(path, "w") as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    plt = _pyplot()
    tmp = path + ".tmp.png"
    # bbox 'tight': legends placed outside the axes (so that they cover no bar) stay in the file.
    fig.savefig(tmp, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    os.replace(tmp, path)


COLOURS = {"zeroshot": "#d9d9d9", "backbone": "#9e9e9e", "+DePT": "#6fa8dc", "+DPC": "#e06666"}
# The plug-and-play charts' legend: what each bar is, for a reader who has not read the paper.
METHOD_LEGEND = {"backbone": "learner alone", "+DePT": "learner + DePT", "+DPC": "learner + DPC"}


def method_label(method: str) -> str:
    """A run's method key as a reader names it: 'coop' -> 'CoOp', 'dept_coop' -> 'DePT (CoOp)'."""
    if method.startswith("dept_"):
        return f"{display_name('dept')} ({display_name(method[len('dept_'):])})"
    return display_name(method)


def seeds_note(rows: Sequence[dict]) -> str:
    """What the bars of `rows` are: the mean over which seeds, and what an error bar is."""
    seeds = sorted({s for r in rows for s in r.get("per_seed", {})}, key=int)
    if not seeds:  # an average row: means over datasets, no seed spread
        return "means over datasets"
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"mean of seeds {','.join(seeds)}; error bars: population std over seeds"


def bar_chart(table: dict, path: str, title: str = "",
              methods: Sequence[str] = ("backbone", "+DePT", "+DPC")) -> None:
    """Grouped bars of H per backbone ({backbone: {method: row}}), std as error bars: the
    paper's plug-and-play figure. The y-axis starts near the lowest bar so that the
    differences show; where it does not start at 0 the axis label says so."""
    plt = _pyplot()
    backbones = list(table)
    x = np.arange(len(backbones))
    width = 0.78 / len(methods)
    fig, ax = plt.subplots(figsize=(1.9 * len(backbones) + 2.0, 3.8), dpi=120)
    for i, m in enumerate(methods):
        h = [table[b][m]["hm"] for b in backbones]
        err = [table[b][m].get("hm_std", 0.0) for b in backbones]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, h, width, yerr=err, capsize=3,
                      label=METHOD_LEGEND.get(m, m), color=COLOURS.get(m, None),
                      edgecolor="black", linewidth=0.5)
        for bar, v, e in zip(bars, h, err):
            ax.text(bar.get_x() + bar.get_width() / 2, v + e + 0.3, f"{v:.1f}", ha="center",
                    va="bottom", fontsize=7)
    values = [(table[b][m]["hm"], table[b][m].get("hm_std", 0.0))
              for b in backbones for m in methods]
    bottom = max(0.0, 5.0 * np.floor((min(v - e for v, e in values) - 3) / 5))
    ax.set_ylim(bottom, max(v + e for v, e in values) + 4)
    ax.set_xticks(x, [display_name(b) for b in backbones])
    ax.set_ylabel("harmonic mean H (%)" + (f"\ny-axis starts at {bottom:.0f}, not 0" if bottom
                                           else ""))
    note = seeds_note([table[b][m] for b in backbones for m in methods])
    ax.set_title((title or "Plug-and-play: " + ", ".join(methods)) + f"\n({note})",
                 fontsize=10)
    ax.legend(frameon=False, fontsize=8, ncol=len(methods), loc="upper center",
              bbox_to_anchor=(0.5, -0.1))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    _save(fig, path)


def dataset_bars(table: dict, dataset: str, path: str) -> None:
    """Base, new and H of every learner's columns (zero-shot, backbone, +DePT, +DPC) on one
    dataset (or 'average'), seed std as error bars."""
    plt = _pyplot()
    fams = [(l, f) for l, f in table["families"].items() if dataset in f["rows"]]
    # At most four learners a row: one long row shrinks every panel past reading.
    ncols = min(4, len(fams))
    nrows = -(-len(fams) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 0.6, 3.9 * nrows), dpi=100,
                             squeeze=False)
    for ax in axes.flat[len(fams):]:
        ax.set_visible(False)
    shown = []
    for ax, (l, fam) in zip(axes.flat, fams):
        r = fam["rows"][dataset]
        cols = [c for c in fam["columns"] if c in r]
        shown += [r[c] for c in cols]
        width = 0.8 / len(cols)
        for i, c in enumerate(cols):
            vals = [r[c][k] for k in ("base", "new", "hm")]
            errs = [r[c].get(k, 0.0) for k in ("base_std", "new_std", "hm_std")]
            ax.bar(np.arange(3) + (i - (len(cols) - 1) / 2) * width, vals, width, yerr=errs,
                   capsize=2, label=label(l, c), color=COLOURS.get(c), edgecolor="black",
                   linewidth=0.5)
        ax.set_xticks(np.arange(3), ["base", "new", "H"])
        ax.set_ylim(0, 100)
        ax.set_title(display_name(l), fontsize=10)
        # Below the axes: inside, it would cover the bars.
        ax.legend(frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1),
                  ncol=2)
        ax.spines[["top", "right"]].set_visible(False)
    for row_axes in axes:
        row_axes[0].set_ylabel("test accuracy (%)")
    name = f"average over {len(fams[0][1]['average_over'])} datasets" if dataset == "average" \
        else PAPER_NAMES.get(dataset, dataset)
    fig.suptitle(f"{name}: base-to-new accuracy per learner (H: harmonic mean of base and "
                 f"new; {seeds_note(shown)})",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plug_and_play_table(table: dict, dataset: str) -> tuple:
    """({learner: {method: row}}, methods) for the learners with backbone and +DPC on
    `dataset`; +DePT is included when every one of them has it."""
    picked = {l: f["rows"][dataset] for l, f in table["families"].items()
              if dataset in f["rows"] and {"backbone", "+DPC"} <= set(f["rows"][dataset])}
    methods = ["backbone", "+DPC"]
    if picked and all("+DePT" in r for r in picked.values()):
        methods.insert(1, "+DePT")
    return {l: {m: r[m] for m in methods} for l, r in picked.items()}, methods


def read_logs(workdir: str) -> Dict[str, Dict[int, List[dict]]]:
    """stage -> seed -> the log.jsonl records of a run directory."""
    out: dict = {}
    for entry in sorted(os.listdir(workdir)):
        if not (entry.startswith("seed_") and entry[5:].isdigit()):
            continue
        for stage in sorted(os.listdir(os.path.join(workdir, entry))):
            path = os.path.join(workdir, entry, stage, "log.jsonl")
            if os.path.isfile(path):
                with open(path) as f:
                    out.setdefault(stage, {})[int(entry[5:])] = [json.loads(l) for l in f
                                                                  if l.strip()]
    return out


# (log field, panel title, y scale). The learning rate on a log scale: the constant warm-up
# (1e-5 against 2e-3) would otherwise lie flat on the axis.
CURVES = (("loss", "training loss", "linear"),
          ("lr", "learning rate (log scale)", "log"),
          ("valid_negatives", "valid negative slots per step (DPC)", "linear"))
STAGE_ORDER = ("teacher", "backbone", "dpc")
STAGE_LABELS = {"teacher": "teacher", "backbone": "stage 1", "dpc": "stage 2: DPC"}
STAGE_LABEL_GAP = 0.06


def training_curves(workdir: str, path: str, title: str = "") -> bool:
    """Loss, learning rate and valid negatives against the step of one run (stages one after
    the other, each named at its start, a dotted line where the next starts; one line per
    seed). False when the run has no logs."""
    logs = read_logs(workdir)
    if not logs:
        return False
    plt = _pyplot()
    # A panel per logged quantity: no empty valid-negatives panel for a run without DPC.
    curves = [c for c in CURVES if any(c[0] in r for by_seed in logs.values()
                                       for recs in by_seed.values() for r in recs)]
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4), dpi=100,
                             squeeze=False)
    axes = axes[0]
    stages = [s for s in STAGE_ORDER if s in logs] + sorted(s for s in logs
                                                            if s not in STAGE_ORDER)
    seeds = sorted({s for by_seed in logs.values() for s in by_seed})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lengths = [max(rec["step"] for recs in logs[stage].values() for rec in recs)
               for stage in stages]
    starts = [int(x) for x in np.cumsum([0] + lengths[:-1])]
    total = sum(lengths)
    for stage, offset in zip(stages, starts):
        for seed in seeds:
            recs = logs[stage].get(seed, [])
            for ax, (field, _, _) in zip(axes, curves):
                pts = [(offset + r["step"], r[field]) for r in recs if field in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, color=colours[seeds.index(seed) % len(colours)],
                            linewidth=1, marker=".", markersize=3,
                            label=f"seed {seed}" if stage == stages[0] else None)
    # Each stage is named upwards beside its start; a label closer than STAGE_LABEL_GAP (of
    # the axis width) to the previous one moves right, so a short stage's name never runs into
    # the next one's.
    where, last = [], -1.0
    for offset in starts:
        last = max(offset / max(total, 1), last + STAGE_LABEL_GAP)
        where.append(last)
    for ax in axes:
        for stage, offset, x in zip(stages, starts, where):
            if offset:
                ax.axvline(offset, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(STAGE_LABELS.get(stage, stage), (x, 0.98), xytext=(3, 0),
                        textcoords="offset points", rotation=90, xycoords="axes fraction",
                        fontsize=7, va="top", ha="left", color="dimgrey",
                        bbox=dict(facecolor="white", alpha=0.7, pad=0.5, edgecolor="none"))
    offset = total
    for ax, (field, name, scale) in zip(axes, curves):
        ax.set_xlim(0, offset)  # one step axis for every panel (valid negatives: DPC only)
        ax.set_yscale(scale)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step (stages one after another)", fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, frameon=False, fontsize=8, ncol=len(seeds),
               loc="lower center", bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(title or workdir, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


# ---------------------------------------------------------------- all of it

def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s)


def write_plots(table: dict, runs: Sequence[Run], root: str) -> List[str]:
    """ROOT/plots/: bars_<dataset>.png, plug_and_play_<dataset>.png (two or more learners),
    curves_<dataset>_<method>.png; returns their paths relative to ROOT."""
    out_dir = os.path.join(root, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    keys = table["datasets"] + (["average"] if any(
        "average" in f["rows"] for f in table["families"].values()) else [])
    for d in keys:
        name = f"bars_{_slug(d)}.png"
        dataset_bars(table, d, os.path.join(out_dir, name))
        written.append(name)
        pp, methods = plug_and_play_table(table, d)
        if len(pp) >= 2:
            name = f"plug_and_play_{_slug(d)}.png"
            bar_chart(pp, os.path.join(out_dir, name),
                      f"{PAPER_NAMES.get(d, d)}: H of each learner alone and with "
                      + " / ".join(m.lstrip("+") for m in methods[1:]), methods)
            written.append(name)
    for run in runs:
        name = f"curves_{_slug(run.dataset)}_{_slug(run.method)}.png"
        if name not in written and training_curves(
                run.workdir, os.path.join(out_dir, name),
                f"Training curves of {method_label(run.method)} on "
                f"{PAPER_NAMES.get(run.dataset, run.dataset)} (run "
                f"{os.path.relpath(run.workdir, root)})"):
            written.append(name)
    return [os.path.join("plots", n) for n in written]


def write_report(root: str, notice: Callable[[str], None] = print) -> dict:
    """ROOT/table.md, ROOT/table.csv, ROOT/plots/*.png from every run under ROOT; returns
    {'table': ..., 'files': [paths relative to ROOT]}."""
    runs = collect(root, notice)
    files, table = [], None
    if runs:
        table = build_table(runs)
        try:
            plots = write_plots(table, runs, root)
        except ModuleNotFoundError as e:  # the tables need no plotting library
            if e.name != "matplotlib":
                raise
            plots = []
            notice("no plots: matplotlib is not installed (pip install -e \".[plot]\")")
        text = markdown(table, plots)
        with open(os.path.join(root, "table.md"), "w") as f:
            f.write(text)
        with open(os.path.join(root, "summary.md"), "w") as f:
            f.write(summary_markdown(runs))
        write_csv(table, os.path.join(root, "table.csv"))
        notice(f"wrote {os.path.join(root, 'table.md')}, table.csv, summary.md and "
               f"{len(plots)} plots")
        files += ["table.md", "table.csv", "summary.md"] + plots
    others = protocol_tables(collect_protocol_runs(root))
    for protocol, tables in others.items():
        with open(os.path.join(root, f"table_{protocol}.md"), "w") as f:
            f.write(protocol_markdown(tables))
        protocol_csv(tables, os.path.join(root, f"table_{protocol}.csv"))
        files += [f"table_{protocol}.md", f"table_{protocol}.csv"]
        notice(f"wrote {os.path.join(root, f'table_{protocol}.md')} and .csv")
    return {"table": table, "protocols": others, "files": files}
