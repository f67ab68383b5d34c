"""The results runner: a grid of configs x datasets x seeds into one ROOT, and its report.

    python -m dpc_jax.benchmark run ROOT --configs dpc_coop,dpc_maple,dept:backbone=coop
        [--datasets world,dtd] [--seeds 1,2,3] [--args root=/data] [--stages ...]
        [--set backbone.epochs=2 ...] [--grid grid.json] [--shard i/n] [--dry-run] [--progress]
    python -m dpc_jax.benchmark report ROOT

Layout: one run directory per (dataset, config), ROOT/<dataset>/<run name>/, holding every seed
of that config on that dataset as `python -m dpc_jax.train` writes them (seed_N/<stage>/...,
results.json, config.json) plus run.json (the config spec and overrides it was started with).
The run name is the config file's stem followed by its own arguments' values
(`dept:backbone=maple` -> dept_maple), as `python -m dpc_jax.compare` names its runs.

A grid point is one (config, dataset, seed); `--shard i/n` (0 <= i < n) takes every n-th point
of the sorted grid from the i-th, so n machines or job-array tasks sharing ROOT run disjoint
parts of it. A point is skipped when its run's results hold the requested stages for its seed,
and otherwise trained by `train_lib.train_and_evaluate`, which resumes from the checkpoints the
run directory holds. After each point the run's results.json is rebuilt from the per-seed stage
results (seed_N/<stage>/results.json), so seeds trained by different tasks end up in one file.

`report` writes ROOT/table.md and table.csv (every run, the paper's layout), ROOT/summary.md (one
compact table per dataset) and ROOT/plots/*.png; the plots need matplotlib (pip install -e
".[plot]"): without it the tables are written and one line says so.

A grid file (JSON) may give any of: configs, datasets, seeds (lists), args, stages (strings),
set (an object of field: value); flags given on the command line replace its entries.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs")


class UsageError(ValueError):
    """Bad user input: reported as one `Error: ...` line and exit status 2."""


# ---------------------------------------------------------------- reuse of finished runs

def has_seeds(results: dict, stages: Sequence[str], seeds: Sequence[int],
              exact: bool = True) -> bool:
    """Whether `results` (a results.json summary of any protocol) holds every stage of
    `stages` for `seeds` (exactly those when `exact`, at least those otherwise)."""
    from dpc_jax.evaluation import protocols

    want = {str(s) for s in seeds}
    protocol = protocols.get({"protocol": results.get("protocol", "base_to_new")})
    for stage in stages:
        have = protocol.seeds(results, stage)
        if have is None:
            return False
        if (have != want) if exact else not want <= have:
            return False
    return True


def run_or_reuse(spec: str, workdir: str, seeds: Sequence[int], stages: Sequence[str],
                 progress: bool) -> dict:
    """The run's results: reused when `results.json` holds `stages` for exactly `seeds`."""
    path = os.path.join(workdir, "results.json")
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
        if has_seeds(results, stages, seeds):
            print(f"reusing {workdir} ({spec})", flush=True)
            return results
    from dpc_jax.training import train_lib

    config = train_lib.load_config(spec)
    config.seeds = ",".join(str(s) for s in seeds)
    config.progress = progress
    return train_lib.train_and_evaluate(config, workdir)


def merge_seed_results(workdir: str, config, write: bool = True) -> dict:
    """The summary over seeds (as train_and_evaluate writes it for `config`'s protocol) of
    every seed_N/<stage>/results.json the run holds ({} when none); `write`: also rewrite
    workdir/results.json with it."""
    from dpc_jax.evaluation import protocols

    results = protocols.get(config).summarize_workdir(workdir)
    if results and write:
        from dpc_jax.files import write_json

        write_json(os.path.join(workdir, "results.json"), results)
    return results


# ---------------------------------------------------------------- the grid

@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: a config (file stem and its own arguments) on a dataset for a seed."""
    config: str  # as given: 'dpc_coop' or 'dept:backbone=maple'
    dataset: str
    seed: int
    args: str = ""  # config arguments shared by the grid (root=..., source=...)

    @property
    def stem(self) -> str:
        return self.config.split(":", 1)[0]

    @property
    def own_args(self) -> str:
        return self.config.split(":", 1)[1] if ":" in self.config else ""

    @property
    def name(self) -> str:
        values = [kv.split("=", 1)[1] for kv in self.own_args.split(",") if "=" in kv]
        return "_".join([self.stem] + values)

    @property
    def spec(self) -> str:
        args = ",".join(a for a in (self.own_args, f"dataset={self.dataset}", self.args) if a)
        return os.path.join(REPO_CONFIGS, f"{self.stem}.py") + f":{args}"

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.dataset, self.name)

    @property
    def key(self) -> tuple:
        return (self.dataset, self.name, self.seed)


def config_names() -> List[str]:
    return sorted(f[:-3] for f in os.listdir(REPO_CONFIGS)
                  if f.endswith(".py") and not f.startswith("_"))


def _split(value) -> List[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in str(value).split(",") if s.strip()]


def _split_configs(value) -> List[str]:
    """'dpc_coop,dept:backbone=maple,source=tfds' -> ['dpc_coop', 'dept:backbone=maple,...']:
    a comma-separated item without ':' that holds '=' continues the previous config's
    arguments."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    out: List[str] = []
    for item in _split(value):
        if "=" in item and ":" not in item and out and ":" in out[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def build_grid(configs, datasets, seeds, args: str = "") -> List[Point]:
    """The sorted, duplicate-free grid; unknown config names, datasets or seeds are
    UsageErrors naming the entry and what was expected."""
    configs, datasets = _split_configs(configs), _split(datasets)
    known = config_names()
    for c in configs:
        stem = c.split(":", 1)[0]
        if stem not in known:
            raise UsageError(f"unknown config {stem!r} (in --configs); expected one of "
                             f"{', '.join(known)} (files in {REPO_CONFIGS})")
    if not configs:
        raise UsageError("--configs is empty; expected config names such as dpc_coop")
    if not datasets:
        raise UsageError("--datasets is empty; expected dataset names such as world")
    from dpc_jax.configs import common

    keys = []
    for d in datasets:
        try:
            keys.append(common.dataset_key(d))
        except KeyError as e:
            raise UsageError(f"--datasets: {e.args[0]}, or world") from None
    try:
        seed_list = [int(s) for s in _split(seeds)]
    except ValueError:
        raise UsageError(f"--seeds={seeds!r}: expected comma-separated integers") from None
    if not seed_list:
        raise UsageError("--seeds is empty; expected comma-separated integers")
    points = {Point(c, d, s, args) for c in configs for d in keys for s in seed_list}
    return sorted(points, key=lambda p: (p.key, p.config))


def parse_shard(value: Optional[str]) -> tuple:
    """'i/n' -> (i, n) with 0 <= i < n."""
    if value is None:
        return 0, 1
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise UsageError(f"--shard={value!r}: expected i/n with integers 0 <= i < n "
                         f"(e.g. 0/4)") from None
    if not 0 <= i < n:
        raise UsageError(f"--shard={value!r}: expected i/n with 0 <= i < n (e.g. 0/4)")
    return i, n


def shard(points: Sequence[Point], i: int, n: int) -> List[Point]:
    """Shard i of n: points i, i+n, i+2n, ... of the sorted grid (disjoint, and together the
    grid, for every n)."""
    return list(points[i::n])


def parse_overrides(items: Sequence[str]) -> Dict[str, object]:
    """['backbone.epochs=2', 'dpc.mode=paper'] -> {'backbone.epochs': 2, 'dpc.mode': 'paper'}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected field=value (e.g. backbone.epochs=2)")
        field, value = item.split("=", 1)
        try:
            out[field.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[field.strip()] = value
    return out


# ---------------------------------------------------------------- running

def point_config(point: Point, stages: str = "", overrides: Optional[dict] = None,
                 progress: bool = False):
    """The ml_collections config one point trains with."""
    from dpc_jax.training import train_lib

    try:
        config = train_lib.load_config(point.spec)
    except (ValueError, KeyError) as e:
        raise UsageError(f"config {point.config!r} on dataset {point.dataset!r}: "
                         f"{e.args[0] if e.args else e}") from None
    for field, value in (overrides or {}).items():
        node, parts = config, field.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(parts[:i]) or "the config"
                choices = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                raise UsageError(f"--set {field}={value!r}: {where} has no field {part!r}; "
                                 f"expected one of {choices}")
            node = node[part]
        try:
            config.update_from_flattened_dict({field: value})
        except (KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"--set {field}={value!r}: {e}") from None
    if stages:
        config.stages = stages
    config.seeds = str(point.seed)
    config.progress = progress
    return config


def _stages(config) -> List[str]:
    return [s.strip() for s in config.stages.split(",") if s.strip()]


def status(point: Point, root: str, config, write: bool = True) -> str:
    """'finished', 'partial' (something saved: training resumes) or 'new'. `write`: rebuild
    the run's results.json on the way (it then holds seeds other tasks finished)."""
    workdir = point.workdir(root)
    merged = merge_seed_results(workdir, config, write)
    if has_seeds(merged, _stages(config), [point.seed], exact=False):
        return "finished"
    return "partial" if os.path.isdir(os.path.join(workdir, f"seed_{point.seed}")) else "new"


def check_run_record(point: Point, root: str, overrides: dict, write: bool = False) -> None:
    """run.json records the spec and overrides a run directory was started with; a different
    request into the same directory is refused (its checkpoints and results belong to the
    first). `write`: record this request when the directory has no run.json yet."""
    path = os.path.join(point.workdir(root), "run.json")
    want = {"config": point.config, "dataset": point.dataset, "spec_args": point.spec.split(
        ":", 1)[1], "set": overrides}
    if os.path.isfile(path):
        with open(path) as f:
            have = json.load(f)
        if have != want:
            raise UsageError(f"{point.workdir(root)} was started with {json.dumps(have)}; this "
                             f"request is {json.dumps(want)}: use another ROOT")
        return
    if not write:
        return
    os.makedirs(point.workdir(root), exist_ok=True)
    from dpc_jax.files import write_json

    write_json(path, want)


def run_grid(points: Sequence[Point], root: str, stages: str = "",
             overrides: Optional[dict] = None, progress: bool = False,
             dry_run: bool = False) -> List[tuple]:
    """Train every unfinished point (resuming partial ones); returns [(point, status before)]."""
    overrides = overrides or {}
    from dpc_jax.training import train_lib

    plan = []
    for p in points:
        config = point_config(p, stages, overrides, progress)
        check_run_record(p, root, overrides)
        plan.append((p, config, status(p, root, config, write=not dry_run)))
    for p, config, state in plan:
        print(f"{state:8} {p.workdir(root)} seed {p.seed}  ({p.spec})", flush=True)
    if dry_run:
        return [(p, state) for p, _, state in plan]
    for p, config, state in plan:
        if state == "finished":
            continue
        check_run_record(p, root, overrides, write=True)
        print(f"training {p.workdir(root)} seed {p.seed}", flush=True)
        train_lib.train_and_evaluate(config, p.workdir(root))
        merge_seed_results(p.workdir(root), config)
    return [(p, state) for p, _, state in plan]


# ---------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _grid_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"--grid {path!r}: no such file; expected a JSON grid file")
    try:
        with open(path) as f:
            grid = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"--grid {path!r}: not valid JSON ({e.msg} at line {e.lineno})") from None
    allowed = {"configs", "datasets", "seeds", "args", "stages", "set"}
    if not isinstance(grid, dict) or set(grid) - allowed:
        raise UsageError(f"--grid {path!r}: expected a JSON object with keys among "
                         f"{', '.join(sorted(allowed))}")
    return grid


def main(argv: Optional[List[str]] = None):
    p = _Parser(prog="python -m dpc_jax.benchmark", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", parser_class=_Parser,
                           help="the command (`python -m dpc_jax.benchmark COMMAND --help` for "
                                "its options)")
    r = sub.add_parser("run", help="train the grid into ROOT (skipping finished runs)")
    r.add_argument("root", help="folder the runs are written to (ROOT/<dataset>/<run>)")
    r.add_argument("--grid", help="a JSON grid file (configs, datasets, seeds, args, stages, "
                                  "set)")
    r.add_argument("--configs", help="config names, e.g. dpc_coop,dpc_maple,dept:backbone=coop")
    r.add_argument("--datasets", help="dataset names (default world)")
    r.add_argument("--seeds", help="comma-separated seeds (default 1,2,3)")
    r.add_argument("--args", help="config arguments for every run, e.g. root=/data")
    r.add_argument("--stages", help="config.stages for every run (default: each config's own)")
    r.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                   help="a config field for every run (repeatable), e.g. backbone.epochs=2")
    r.add_argument("--shard", help="i/n: run the i-th of n disjoint parts of the grid")
    r.add_argument("--dry-run", action="store_true", help="list the runs and their state only")
    r.add_argument("--progress", action="store_true", help="progress bars while training")
    rep = sub.add_parser("report", help="ROOT/table.md, table.csv, summary.md and plots/ from "
                                        "ROOT's runs (plots need matplotlib: .[plot])")
    rep.add_argument("root", help="the folder `run` wrote (every run under it is read)")
    a = p.parse_args(argv)
    if a.command is None:
        raise UsageError("expected a command: run or report")
    if a.command == "report":
        from dpc_jax.evaluation import report

        return report.write_report(a.root)
    grid = _grid_file(a.grid) if a.grid else {}
    configs = a.configs if a.configs is not None else grid.get("configs")
    if configs is None:
        raise UsageError("no configs: give --configs (e.g. dpc_coop) or a --grid file")
    points = build_grid(configs,
                        a.datasets if a.datasets is not None else grid.get("datasets", "world"),
                        a.seeds if a.seeds is not None else grid.get("seeds", "1,2,3"),
                        a.args if a.args is not None else grid.get("args", ""))
    overrides = dict(grid.get("set", {}))
    overrides.update(parse_overrides(a.set or []))
    i, n = parse_shard(a.shard)
    mine = shard(points, i, n)
    print(f"grid: {len(points)} points; shard {i}/{n}: {len(mine)}", flush=True)
    return run_grid(mine, a.root, a.stages if a.stages is not None else grid.get("stages", ""),
                    overrides, a.progress, a.dry_run)


def cli(argv: Optional[List[str]] = None) -> int:
    """`main` with a user error reported as one `Error:` line and exit status 2
    (`dpc_jax.cli`)."""
    from dpc_jax import cli as cli_lib

    return cli_lib.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
