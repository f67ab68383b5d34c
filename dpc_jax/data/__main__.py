"""`python -m dpc_jax.data check|list|synth|diagnose`: the data tools.

Validate benchmark data on disk, list the registry, write a world stand-in of a dataset, measure
the world's headroom (dpc_jax.diagnose_world).

  python -m dpc_jax.data check --dataset oxford_pets --root $DATA [--shots 16] [--seed 1]
      [--subsample base|new|all] [--source coop|tfds] [--json] [--list-files] [--verify-images]
  python -m dpc_jax.data check --dataset folder --root DIR [...]   (your own images,
      DIR/train/<class>/<image> and DIR/test/<class>/<image>, or DIR/split.json: docs/data.md)
  python -m dpc_jax.data list [--json]
  python -m dpc_jax.data synth --dataset oxford_pets --root DIR [--train 8 --val 2 --test 4]
  python -m dpc_jax.data diagnose [--clip DIR] [--domain NAME] [--seed 1] [--prompt TEMPLATE]
      [--json]

`check` exits 0 when the layout is complete, 1 when something is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from dpc_jax.data import base, folder, registry, sources


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpc_jax.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{check,synth,list,diagnose}",
                           help="the tool (`python -m dpc_jax.data TOOL --help` for its options)")
    c = sub.add_parser("check", help="validate one dataset and print its splits and classes")
    c.add_argument("--dataset", required=True,
                   help=f"one of {sorted(registry.DATASETS)}, or folder (your own images)")
    c.add_argument("--root", default=None,
                   help="CoOp data folder ($DATA), the TFDS data_dir with --source tfds, or "
                        "the folder of --dataset folder")
    c.add_argument("--shots", type=int, default=16, help="few-shot k (< 1: full train split)")
    c.add_argument("--seed", type=int, default=1, help="seed of the few-shot sample (default 1)")
    c.add_argument("--subsample", choices=base.SUBSAMPLES, default="all",
                   help="the classes to check: base half, new half or all (default all)")
    c.add_argument("--source", choices=sources.SOURCES, default="coop",
                   help="how the dataset is read: the CoOp layout or TFDS (default coop)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--list-files", action="store_true",
                   help="include the few-shot train files ([path, label]) in the report")
    c.add_argument("--verify-images", action="store_true",
                   help="decode every image of the selected splits (slow on large test sets)")
    c.add_argument("--no-fewshot-pickle", action="store_true",
                   help="ignore split_fewshot/*.pkl and use the Dassl algorithm")
    c.add_argument("--classnames-file", default=None,
                   help="CoOp's ImageNet classnames.txt (TFDS ImageNet)")
    c.add_argument("--threads", type=int, default=8,
                   help="image decoding threads for --verify-images (default 8)")
    sy = sub.add_parser("synth", help="write a stand-in of a dataset in the CoOp layout, with "
                                      "world images (offline end-to-end checks)")
    sy.add_argument("--dataset", required=True, help="a split-file dataset, e.g. oxford_pets")
    sy.add_argument("--root", required=True, help="the CoOp data folder to write into")
    sy.add_argument("--train", type=int, default=8, help="train images per class")
    sy.add_argument("--val", type=int, default=2, help="val images per class")
    sy.add_argument("--test", type=int, default=4, help="test images per class")
    sy.add_argument("--image-size", type=int, default=32, help="pixels (square JPEGs)")
    ls = sub.add_parser("list", help="list the registered datasets")
    ls.add_argument("--json", action="store_true", help="print one JSON list")
    # Its arguments are parsed by dpc_jax.diagnose_world (main below hands them over).
    sub.add_parser("diagnose", help="the world's headroom: zero-shot, hand-written prompts and a "
                                    "linear-probe ceiling (diagnose --help)", add_help=False)
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
    print(f"{registry.FOLDER.name:16s} your own images: {folder.describe_layout()}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["diagnose"]:
        # The diagnostics classify zero-shot (evaluation, prompts): an entry-point tool above
        # the data layer, imported only for this command.
        from dpc_jax.diagnose_world import main as diagnose

        return diagnose(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "list":
        return _list(args.json)
    if args.command == "synth":
        from dpc_jax import cli
        from dpc_jax.data import synth

        try:
            folder = synth.write_coop_layout(args.dataset, args.root, train=args.train,
                                             val=args.val, test=args.test,
                                             image_size=args.image_size)
        except cli.USER_ERRORS as e:  # one line, no traceback (DPC_JAX_TRACEBACK=1 shows it)
            if cli.show_tracebacks():
                raise
            return cli.print_error(cli.message(e))
        print(synth.describe(folder, args.dataset))
        return 0
    from dpc_jax import cli
    from dpc_jax.data.check import check_dataset, format_report

    # A name that is no dataset is a mistake in the command, not a dataset that fails its
    # check (exit 1): one Error line, exit 2, as every command answers a bad argument.
    try:
        registry.get(args.dataset)
    except KeyError as e:
        return cli.print_error(f"--dataset: {e.args[0] if e.args else e}")

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
