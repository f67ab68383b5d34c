"""Your own images as a dataset: `--config configs/<method>.py:dataset=folder,root=DIR`.

DIR holds either class folders,

    DIR/train/<class>/<image>     training images, one folder per class
    DIR/test/<class>/<image>      test images, the same class folders
    DIR/val/<class>/<image>       optional; without it 20% of each class's training images
                                  become the validation split (`base.carve`: CoOp's
                                  split_trainval, a fixed shuffle independent of the run seed)

or `DIR/split.json` in the schema of CoOp's split_zhou_*.json files ({"train"|"val"|"test":
[[path relative to DIR, label, class name], ...]}), which is then used instead of the folders and
names the classes itself.

Class folders: label = index in the sorted folder names of DIR/train (Python string order, so
'B' sorts before 'a'); a class is named by its folder with '_' read as a space, or by
DIR/classnames.txt (lines '<folder> <class name>'; the first whitespace-separated token is the
folder, folders it does not list keep their default name). Images are the files with an
extension of IMAGE_EXTENSIONS directly in a class folder, in sorted order; hidden files are
skipped. Zero-shot templates come from DIR/templates.txt (one per line, each with one '{}'),
by default CoOp's "a photo of a {}.".

Few-shot sampling and the base/new halving are those of the benchmarks (`base`, Dassl's rules):
train gets `shots` images per class (a class with fewer keeps all of them, with a warning in
the provenance), val min(shots, 4).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from dpc_jax.data import base, coop, registry
from dpc_jax.data.coop import DatasetNotFoundError, Items
from dpc_jax.data.transforms import FileImageSplit

SPLIT_FILE = "split.json"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
VAL_FRACTION = 0.2  # CoOp's split_trainval p_val
# round(0.2 * n) >= 1 needs n >= 3 (CoOp's split_trainval asserts a non-empty val per class).
MIN_TRAIN_TO_CARVE = 3
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class FolderDatasetError(ValueError):
    """The folder's content does not fit the layout; the message names the path."""


def expected_layout(root: str) -> str:
    def at(*parts):
        return os.path.join(root, *parts)

    return (f"expected {at('train', '<class>', '<image>')} and {at('test', '<class>', '<image>')}"
            f" (optionally {at('val', '<class>', '<image>')}), or {at(SPLIT_FILE)} (docs/data.md)")


def default_classname(folder: str) -> str:
    return folder.replace("_", " ")


def read_templates(path: str) -> list:
    """The zero-shot templates of DIR/templates.txt: one per non-empty line, each with one '{}'."""
    templates = []
    with open(path) as f:
        for k, line in enumerate(f):
            t = line.strip()
            if not t:
                continue
            try:
                ok = t.count("{}") == 1 and bool(t.format("x"))
            except (IndexError, KeyError, ValueError):
                ok = False
            if not ok:
                raise FolderDatasetError(
                    f"{path}:{k + 1}: template {t!r}; expected exactly one '{{}}' where the class "
                    f"name goes, and no other braces")
            templates.append(t)
    if not templates:
        raise FolderDatasetError(f"{path} holds no template; expected one per line with one "
                                 f"'{{}}', e.g. 'a photo of a {{}}.'")
    return templates


def read_classnames(path: str, folders: list, train_dir: str) -> dict:
    """{folder: class name} from DIR/classnames.txt for the class folders it lists."""
    out, known = {}, set(folders)
    with open(path) as f:
        for k, line in enumerate(f):
            parts = line.split(None, 1)
            if not parts:
                continue
            where = f"{path}:{k + 1}"
            if len(parts) < 2 or not parts[1].strip():
                raise FolderDatasetError(f"{where}: {line.strip()!r}; expected '<folder name> "
                                         f"<class name>'")
            folder, name = parts[0], " ".join(parts[1].split())
            if folder not in known:
                shown = ", ".join(folders[:10]) + (", ..." if len(folders) > 10 else "")
                raise FolderDatasetError(f"{where}: {folder!r} is not a class folder of "
                                         f"{train_dir} (its class folders: {shown})")
            if folder in out:
                raise FolderDatasetError(f"{where}: folder {folder!r} is listed twice")
            out[folder] = name
    return out


def _class_folders(split_dir: str) -> list:
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def _images(folder: str) -> list:
    return sorted(e.name for e in os.scandir(folder)
                  if e.is_file() and not e.name.startswith(".")
                  and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def _read_split_dir(root: str, split: str, folders: list, train_dir: str) -> Items:
    """Items of DIR/<split>, whose class folders must be exactly those of DIR/train."""
    split_dir = os.path.join(root, split)
    present = _class_folders(split_dir)
    extra = [c for c in present if c not in folders]
    if extra:
        raise FolderDatasetError(
            f"{os.path.join(split_dir, extra[0])}: class {extra[0]!r} has no folder in "
            f"{train_dir}; every class needs training images (expected "
            f"{os.path.join(train_dir, extra[0], '<image>')})")
    missing = [c for c in folders if c not in present]
    if missing:
        raise FolderDatasetError(
            f"{split_dir} has no folder for class {missing[0]!r} of {train_dir}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; expected "
            f"{os.path.join(split_dir, missing[0], '<image>')}")
    items = Items([], [], [])
    for label, c in enumerate(folders):
        names = _images(os.path.join(split_dir, c))
        if not names:
            raise FolderDatasetError(
                f"{os.path.join(split_dir, c)} has no images; expected image files "
                f"({', '.join(IMAGE_EXTENSIONS)}) directly in it")
        items.relpaths += [os.path.join(split, c, n) for n in names]
        items.labels += [label] * len(names)
        items.classnames += [c] * len(names)
    return items


def _subset(items: Items, indices: list) -> Items:
    return Items([items.relpaths[i] for i in indices], [items.labels[i] for i in indices],
                 [items.classnames[i] for i in indices])


def read_class_folders(root: str) -> tuple:
    """(class folders in label order, {'train'|'val'|'test': Items}, where val came from)."""
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    for path in (train_dir, test_dir):
        if not os.path.isdir(path):
            raise DatasetNotFoundError(f"{path} not found; {expected_layout(root)}")
    folders = _class_folders(train_dir)
    if not folders:
        raise FolderDatasetError(f"{train_dir} has no class folders; expected "
                                 f"{os.path.join(train_dir, '<class>', '<image>')}")
    splits = {"train": _read_split_dir(root, "train", folders, train_dir),
              "test": _read_split_dir(root, "test", folders, train_dir)}
    if os.path.isdir(os.path.join(root, "val")):
        splits["val"] = _read_split_dir(root, "val", folders, train_dir)
        return folders, splits, os.path.join(root, "val")
    counts = np.bincount(splits["train"].labels, minlength=len(folders))
    few = [(c, int(n)) for c, n in zip(folders, counts) if n < MIN_TRAIN_TO_CARVE]
    if few:
        c, n = few[0]
        raise FolderDatasetError(
            f"{os.path.join(train_dir, c)} has {n} image(s); carving the validation split "
            f"({VAL_FRACTION:.0%} of each class, as CoOp's split_trainval) needs at least "
            f"{MIN_TRAIN_TO_CARVE} per class"
            f"{f' ({len(few) - 1} more class(es) have fewer too)' if len(few) > 1 else ''}: "
            f"add images, or give {os.path.join(root, 'val', '<class>', '<image>')} folders")
    train_idx, val_idx, _ = base.carve(splits["train"].labels, VAL_FRACTION)
    full = splits["train"]
    splits["train"], splits["val"] = _subset(full, train_idx), _subset(full, val_idx)
    return folders, splits, f"carved from {train_dir} ({VAL_FRACTION:.0%} of each class)"


def read(root: str) -> tuple:
    """(class names in label order, templates, {'train'|'val'|'test': Items}, provenance)."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"folder dataset: {root} not found; {expected_layout(root)}")
    split_file = os.path.join(root, SPLIT_FILE)
    names_file = os.path.join(root, CLASSNAMES_FILE)
    prov = {"source": "folder", "root": root}
    if os.path.isfile(split_file):
        if os.path.isfile(names_file):
            raise FolderDatasetError(
                f"{root} holds both {SPLIT_FILE} and {CLASSNAMES_FILE}; {SPLIT_FILE} names the "
                f"classes itself (the third entry of each item): remove {names_file}")
        splits = coop.read_split_file(registry.FOLDER, split_file)
        classnames = coop.class_list(registry.FOLDER, splits, split_file)
        prov.update(layout=split_file, val=f"{split_file} 'val'", classnames=split_file)
    else:
        folders, splits, val_from = read_class_folders(root)
        given = (read_classnames(names_file, folders, os.path.join(root, "train"))
                 if os.path.isfile(names_file) else {})
        classnames = [given.get(c, default_classname(c)) for c in folders]
        seen = {}
        for folder, name in zip(folders, classnames):
            if name in seen:
                raise FolderDatasetError(
                    f"class folders {seen[name]!r} and {folder!r} of {os.path.join(root, 'train')}"
                    f" are both named {name!r}; class names must differ (rename a folder or set "
                    f"its name in {names_file})")
            seen[name] = folder
        for items in splits.values():
            items.classnames = [classnames[y] for y in items.labels]
        prov.update(layout="class folders", val=val_from,
                    classnames=names_file if given else "folder names ('_' read as a space)")
    templates_file = os.path.join(root, TEMPLATES_FILE)
    if os.path.isfile(templates_file):
        templates = read_templates(templates_file)
        prov["templates"] = templates_file
    else:
        templates = list(registry.FOLDER.templates)
        prov["templates"] = "default"
    return classnames, templates, splits, prov


def load(root: str, shots: int, seed: int) -> tuple:
    """(BaseToNewData with the few-shot train/val and all classes, provenance dict). A class
    with fewer training images than `shots` keeps all of them (`sources.load_dataset` says
    so)."""
    classnames, templates, splits, prov = read(root)
    root = prov["root"]
    train, val, test = (FileImageSplit(root, splits[k].relpaths, splits[k].labels)
                        for k in ("train", "val", "test"))
    data = base.BaseToNewData(registry.FOLDER.name, classnames, templates, train, val, test)
    prov.update(fewshot="none", fewshot_path=None)
    if shots < 1:
        return data, prov
    train_idx, val_idx = coop.fewshot_indices(registry.FOLDER, train.labels, val.labels, shots,
                                              seed)
    prov["fewshot"] = "dassl"
    return dataclasses.replace(data, train=train.subset(train_idx),
                               val=val.subset(val_idx)), prov


def describe_layout(root: Optional[str] = None) -> str:
    """One line on what a folder dataset holds (for `python -m dpc_jax.data list`)."""
    return expected_layout(root or "DIR").replace("expected ", "", 1)
