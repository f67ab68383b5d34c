"""DPC against DePT on the same backbones: the paper's plug-and-play comparison as one command.

    python -m dpc_jax.compare --workdir W [--backbones coop,maple,promptsrc] [--seeds 1,2,3]
                              [--args dataset=NAME,root=DIR] [--progress]

For each backbone B it needs two runs: W/B (`configs/dpc_B.py`: zero-shot, B, B+DPC) and
W/dept_B (`configs/dept.py:backbone=B`: B+DePT). A run whose `results.json` already holds the
requested seeds is reused as it is; otherwise it is trained (resuming whatever it saved). Then it
writes W/comparison.json (the numbers), W/comparison.md (the table) and W/comparison.png (bars
of the harmonic mean H per backbone, mean and population std over seeds, in the style of the
paper's plug-and-play figure, the dataset named in its title).

The chart needs matplotlib (pip install -e ".[plot]"): without it the command stops with one line
saying so, before training anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Sequence

from dpc_jax.benchmark import REPO_CONFIGS
from dpc_jax.benchmark import has_seeds, run_or_reuse  # noqa: F401 (the shared reuse rule)
from dpc_jax.configs import common
from dpc_jax.evaluation.report import PAPER_NAMES, bar_chart as _bar_chart, row as _row
from dpc_jax.prompts import capabilities, display_name, get_learner, learner_names

# The learners both methods plug into: DePT wraps them and DPC's stage 2 runs on them.
BACKBONES = tuple(n for n in learner_names() if get_learner(n).info.dept_inner
                  and not capabilities.dpc_unsupported(get_learner(n)))
METHODS = ("backbone", "+DePT", "+DPC")


def run_specs(backbone: str, args: str = "") -> Dict[str, str]:
    """{run name: config spec} of one backbone's two runs."""
    extra = f",{args}" if args else ""
    return {backbone: os.path.join(REPO_CONFIGS, f"dpc_{backbone}.py") + (f":{args}" if args
                                                                           else ""),
            f"dept_{backbone}": os.path.join(REPO_CONFIGS, "dept.py") + f":backbone={backbone}"
            + extra}


def comparison(runs: Dict[str, dict], backbones: Sequence[str]) -> dict:
    """{backbone: {method: row}} from the runs' results."""
    out = {}
    for b in backbones:
        plain, dept = runs[b], runs[f"dept_{b}"]
        out[b] = {"backbone": _row(plain["backbone"]), "+DePT": _row(dept["backbone"]),
                  "+DPC": _row(plain["dpc"])}
    return out


def bar_chart(table: dict, path: str, title: str = "") -> None:
    """Grouped bars of H per backbone (backbone, +DePT, +DPC), std as error bars."""
    _bar_chart(table, path, title or "Plug-and-play: backbone, +DePT, +DPC", METHODS)


def markdown(table: dict) -> str:
    lines = ["| backbone | method | base | new | H |", "|---|---|---|---|---|"]
    for b, rows in table.items():
        for m in METHODS:
            r = rows[m]
            name = display_name(b) if m == "backbone" else f"{display_name(b)}{m}"
            lines.append(f"| {display_name(b)} | {name} | {r['base']:.2f} ± {r['base_std']:.2f} | "
                         f"{r['new']:.2f} ± {r['new_std']:.2f} | {r['hm']:.2f} ± "
                         f"{r['hm_std']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: List[str] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m dpc_jax.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="folder of the runs and of comparison.json, .md and .png")
    p.add_argument("--backbones", default="coop,maple,promptsrc",
                   help=f"comma list among {','.join(BACKBONES)} (default coop,maple,promptsrc)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--args", default="", help="config arguments for every run, e.g. "
                                               "dataset=dtd,root=/data (default: the world)")
    p.add_argument("--progress", action="store_true", help="progress bars while training")
    a = p.parse_args(argv)
    backbones = [b.strip() for b in a.backbones.split(",") if b.strip()]
    bad = [b for b in backbones if b not in BACKBONES]
    if bad or not backbones:
        p.error(f"--backbones={a.backbones!r}: expected some of {', '.join(BACKBONES)}")
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds={a.seeds!r}: expected comma-separated integers")
    if not seeds:
        p.error("--seeds is empty")
    from dpc_jax import cli

    cli.require_extra("matplotlib", "the chart of python -m dpc_jax.compare")  # before training

    runs = {}
    for b in backbones:
        for name, spec in run_specs(b, a.args).items():
            stages = ("backbone",) if name.startswith("dept_") else ("backbone", "dpc")
            runs[name] = run_or_reuse(spec, os.path.join(a.workdir, name), seeds, stages,
                                      a.progress)
    table = comparison(runs, backbones)
    os.makedirs(a.workdir, exist_ok=True)
    from dpc_jax.files import write_json

    write_json(os.path.join(a.workdir, "comparison.json"), table)
    text = markdown(table)
    with open(os.path.join(a.workdir, "comparison.md"), "w") as f:
        f.write(text)
    dataset = common.dataset_key(common.parse_arguments(a.args).get("dataset", "world"))
    bar_chart(table, os.path.join(a.workdir, "comparison.png"),
              f"{PAPER_NAMES.get(dataset, dataset)}: H of each learner alone, with DePT and "
              f"with DPC")
    print(text, flush=True)
    return table


if __name__ == "__main__":
    from dpc_jax.cli import run_cli

    sys.exit(run_cli(main))
