"""Validate a dataset on disk and report what the training code would get.

`check_dataset` loads a benchmark through `sources.load_dataset` (so it fails exactly where
training would, with the same messages), then checks that every file of the selected splits
exists (CoOp source, your own folder), optionally decodes every image, and returns a JSON-able
report: `ok`, `classnames` (label order after subsampling), `counts` {train, val, test}, the
few-shot provenance (with its `warnings`: classes with fewer training images than `shots`),
missing / unreadable files, and with `list_files` the few-shot `train_files` ([path relative to
the dataset's image folder, label]; TFDS: '<split>[<record>]').
"""

from __future__ import annotations

import os
import pickle
from typing import Optional

from dpc_jax.data import base, registry, sources
from dpc_jax.data.transforms import FileImageSplit, iterate_batches, unwrap

MAX_EXAMPLES = 10  # how many missing / unreadable items a report lists


def _item_name(split: base.ImageSplit, index: int) -> str:
    inner, i = unwrap(split, index)
    if isinstance(inner, FileImageSplit):
        return inner.relpaths[i]
    if hasattr(inner, "record_name"):
        return inner.record_name(i)
    return inner.describe(i)


def missing_files(split: base.ImageSplit) -> list:
    """The paths of a split's items whose file does not exist (no decoding; none for splits
    that are not files)."""
    out = []
    for i in range(len(split)):
        inner, j = unwrap(split, i)
        if isinstance(inner, FileImageSplit) and not os.path.isfile(inner.path(j)):
            out.append(inner.path(j))
    return out


def check_dataset(name: str, root: Optional[str], source: str = "coop", shots: int = 16,
                  seed: int = 1, subsample: str = "all", list_files: bool = False,
                  verify_images: bool = False, num_threads: int = 8, **load_kwargs) -> dict:
    """A report dict; `ok` is False (with `error` or missing/unreadable files) on problems."""
    report = {"ok": False, "dataset": name, "source": source, "root": root, "shots": shots,
              "seed": seed, "subsample": subsample}
    try:
        info = registry.get(name)
        report["dataset"] = info.name
        data, prov = sources.load_dataset(info.name, root, source, shots, seed, subsample,
                                          **load_kwargs)
    except (KeyError, ValueError, FileNotFoundError, OSError, RuntimeError,
            pickle.UnpicklingError) as e:
        report["error"] = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        return report
    splits = {"train": data.train, "val": data.val, "test": data.test}
    report.update(
        coop_name=info.coop_name, num_classes=data.num_classes, classnames=list(data.classnames),
        templates=list(data.templates), counts={k: len(s) for k, s in splits.items()},
        provenance=prov)
    problems = []
    # ImageNet's val is its test set: check those files once.
    checked = {k: s for k, s in splits.items() if not (k == "val" and info.val_is_test)}
    missing = {k: missing_files(s) for k, s in checked.items()}
    report["missing_files"] = {k: len(v) for k, v in missing.items()}
    examples = [p for v in missing.values() for p in v][:MAX_EXAMPLES]
    if examples:
        report["missing_examples"] = examples
        problems.append(f"{sum(map(len, missing.values()))} image files are missing")
    if verify_images:
        unreadable = {}
        for k, s in checked.items():
            it = iterate_batches(s, 32, 64, num_threads=num_threads, progress=True,
                                 skip_bad=True, desc=f"decoding {k}")
            for _ in it:
                pass
            unreadable[k] = it.skipped
        report["unreadable"] = {k: len(v) for k, v in unreadable.items()}
        bad = [f"{d}: {r}" for v in unreadable.values() for _, d, r in v]
        if bad:
            report["unreadable_examples"] = bad[:MAX_EXAMPLES]
            problems.append(f"{len(bad)} images cannot be decoded")
    if list_files:
        report["train_files"] = [[_item_name(data.train, i), int(data.train.labels[i])]
                                 for i in range(len(data.train))]
    report["problems"] = problems
    report["ok"] = not problems
    return report


def format_report(report: dict) -> str:
    """Human-readable text of a `check_dataset` report."""
    lines = []
    if "error" in report:
        lines.append(f"{report['dataset']}: FAILED")
        lines.append(report["error"])
        return "\n".join(lines)
    prov = report["provenance"]
    if prov["source"] == "folder":
        lines.append(f"dataset: folder (your own images), root {prov['root']}")
        lines.append(f"layout: {prov['layout']}; val: {prov['val']}")
        lines.append(f"class names: {prov['classnames']}; templates: {prov['templates']} "
                     f"({' | '.join(report['templates'])})")
    else:
        lines.append(f"dataset: {report['dataset']} ({report['coop_name']}), source "
                     f"{report['source']}, root {report['root']}")
    if prov["source"] == "coop":
        lines.append(f"image folder: {prov['image_root']}")
    elif prov["source"] == "tfds":
        lines.append(f"TFDS: {prov['tfds_name']} {prov['version']}; splits: {prov['splits']}")
    fs = prov.get("fewshot")
    if fs == "pickle":
        agree = "yes" if prov.get("fewshot_matches_dassl") else "no (the pickle is used)"
        lines.append(f"few-shot: {report['shots']} shots, seed {report['seed']}, from "
                     f"{prov['fewshot_path']} (same as the Dassl algorithm: {agree})")
    elif fs == "dassl":
        lines.append(f"few-shot: {report['shots']} shots, seed {report['seed']}, Dassl algorithm "
                     f"(no pickle used)")
    else:
        lines.append("few-shot: none (full training split)")
    names = report["classnames"]
    lines.append(f"classes ({len(names)}, subsample {report['subsample']}): " + ", ".join(names))
    c = report["counts"]
    lines.append(f"counts: train {c['train']}, val {c['val']}, test {c['test']}")
    for w in prov.get("warnings", ()):
        lines.append(f"warning: {w}")
    miss = report.get("missing_files", {})
    lines.append("missing files: " + (", ".join(f"{k} {v}" for k, v in miss.items() if v)
                                      or "none"))
    for p in report.get("missing_examples", []):
        lines.append(f"  missing: {p}")
    if "unreadable" in report:
        lines.append("unreadable images: " + (", ".join(
            f"{k} {v}" for k, v in report["unreadable"].items() if v) or "none"))
        for p in report.get("unreadable_examples", []):
            lines.append(f"  unreadable: {p}")
    lines.append("OK" if report["ok"] else "PROBLEMS: " + "; ".join(report["problems"]))
    return "\n".join(lines)
