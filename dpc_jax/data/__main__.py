"""`python -m dpc_jax.data check|list`: validate benchmark data on disk, list the registry.

  python -m dpc_jax.data check --dataset oxford_pets --root $DATA [--shots 16] [--seed 1]
      [--subsample base|new|all] [--source coop|tfds] [--json] [--list-files] [--verify-images]
  python -m dpc_jax.data list [--json]

`check` exits 0 when the layout is complete, 1 when something is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from dpc_jax.data import base, registry, sources


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpc_jax.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate one dataset and print its splits and classes")
    c.add_argument("--dataset", required=True, help=f"one of {sorted(registry.DATASETS)}")
    c.add_argument("--root", default=None,
                   help="CoOp data folder ($DATA), or the TFDS data_dir with --source tfds")
    c.add_argument("--shots", type=int, default=16, help="few-shot k (< 1: full train split)")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--subsample", choices=base.SUBSAMPLES, default="all")
    c.add_argument("--source", choices=sources.SOURCES, default="coop")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--list-files", action="store_true",
                   help="include the few-shot train files ([path, label]) in the report")
    c.add_argument("--verify-images", action="store_true",
                   help="decode every image of the selected splits (slow on large test sets)")
    c.add_argument("--no-fewshot-pickle", action="store_true",
                   help="ignore split_fewshot/*.pkl and use the Dassl algorithm")
    c.add_argument("--classnames-file", default=None,
                   help="CoOp's ImageNet classnames.txt (TFDS ImageNet)")
    c.add_argument("--threads", type=int, default=8)
    ls = sub.add_parser("list", help="list the registered datasets")
    ls.add_argument("--json", action="store_true")
    return p


def _list(as_json: bool) -> int:
    rows = []
    for d in registry.DATASETS.values():
        rows.append({"name": d.name, "coop_name": d.coop_name, "dataset_dir": d.dataset_dir,
                     "num_classes": d.num_classes, "base": d.num_base, "new": d.num_new,
                     "template": d.template, "tfds": d.tfds.name if d.tfds else None,
                     "test_only": d.test_only})
    if as_json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        print(f"{r['name']:16s} {r['coop_name']:20s} {r['num_classes']:5d} classes "
              f"(base {r['base']}, new {r['new']})  dir {r['dataset_dir']:22s} "
              f"tfds {r['tfds'] or '-'}{'  [test only]' if r['test_only'] else ''}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        return _list(args.json)
    from dpc_jax.data.check import check_dataset, format_report

    kwargs = {"classnames_file": args.classnames_file} if args.source == "tfds" else {
        "use_fewshot_pickle": not args.no_fewshot_pickle}
    report = check_dataset(args.dataset, args.root, source=args.source, shots=args.shots,
                           seed=args.seed, subsample=args.subsample, list_files=args.list_files,
                           verify_images=args.verify_images, num_threads=args.threads, **kwargs)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report), file=sys.stdout if report["ok"] else sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
