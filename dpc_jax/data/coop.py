"""The CoOp/Dassl folder layout: split files, few-shot pickles, ImageNet and its variants.

Reads `root/<dataset_dir>/` exactly as CoOp's dataset readers do
(docs/reference/method.md#data-protocol):
- `split_zhou_<Name>.json`: {"train"|"val"|"test": [[path relative to the image folder, label,
  class name], ...]}, validated (one name per label, labels 0..n-1, the registry's class count);
- ImageNet: `preprocessed.pkl` (CoOp's cache of Datum lists) or classnames.txt + the
  `images/train` and `images/val` class folders; FGVC-Aircraft: variants.txt +
  images_variant_{train,val,test}.txt; the ImageNet variants as CoOp reads them;
- Dassl few-shot caches `split_fewshot/shot_{k}-seed_{seed}.pkl` ({'train': [Datum], 'val':
  [Datum]}, absolute paths of the machine that wrote them) without dassl installed: a restricted
  unpickler maps `dassl...Datum` to the local `Datum`, and paths are re-rooted under this root.
  Without a pickle the subset is drawn by Dassl's algorithm (`base.fewshot`), which gives the
  same subset as the pickle Dassl would have written for that split file and seed.

Deviation from CoOp, on purpose: where CoOp lists folders with `os.listdir` (ImageNet, the
variants) the order depends on the file system, so the few-shot subset of one machine cannot be
reproduced on another; we sort file names. A `preprocessed.pkl` / few-shot pickle, when present,
is used as is, so runs that share those files share the exact subset.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import random
from typing import Optional

from dpc_jax.data import base, registry
from dpc_jax.data.registry import DatasetInfo
from dpc_jax.data.transforms import FileImageSplit


class DatasetNotFoundError(FileNotFoundError):
    """A file or folder of the CoOp layout is missing; the message says where and why."""


class SplitFileError(ValueError):
    """A split / class / few-shot file has content that does not fit the dataset."""


def _missing(info: DatasetInfo, what: str, path: str, extra: str = "") -> DatasetNotFoundError:
    msg = (f"{info.name}: {what} not found at {path}. {extra}".rstrip() +
           f"\nExpected the CoOp layout under <root>/{info.dataset_dir}/; get the data: "
           f"{info.download}")
    return DatasetNotFoundError(msg)


def dataset_dir(info: DatasetInfo, root: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(root)), info.dataset_dir)


def image_root(info: DatasetInfo, root: str) -> str:
    d = dataset_dir(info, root)
    return os.path.join(d, info.image_dir) if info.image_dir else d


def fewshot_pickle_path(info: DatasetInfo, root: str, shots: int, seed: int) -> str:
    return os.path.join(dataset_dir(info, root), "split_fewshot", f"shot_{shots}-seed_{seed}.pkl")


def check_root(info: DatasetInfo, root: str) -> None:
    """Raise DatasetNotFoundError unless root/ and root/<dataset_dir>/ exist."""
    root_abs = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root_abs):
        raise _missing(info, "data root", root_abs)
    d = dataset_dir(info, root)
    if not os.path.isdir(d):
        present = sorted(os.listdir(root_abs))[:20]
        raise _missing(info, f"dataset folder '{info.dataset_dir}'", d,
                       f"The root holds: {present}.")


# --- Dassl pickles ---------------------------------------------------------------------------

class Datum:
    """Stand-in for dassl.data.datasets.base_dataset.Datum (same attribute names, so pickles
    written by Dassl restore into it; its __init__ is never called by pickle)."""

    def __init__(self, impath: str = "", label: int = 0, domain: int = 0, classname: str = ""):
        self._impath = impath
        self._label = label
        self._domain = domain
        self._classname = classname

    impath = property(lambda self: self._impath)
    label = property(lambda self: self._label)
    domain = property(lambda self: self._domain)
    classname = property(lambda self: self._classname)

    def __repr__(self) -> str:
        return f"Datum({self._impath!r}, {self._label}, {self._classname!r})"


_SAFE_MODULES = ("builtins", "collections", "copyreg", "_codecs")


class DasslUnpickler(pickle.Unpickler):
    """Unpickles Dassl's Datum lists without dassl, and refuses any other class (a few-shot
    pickle only holds lists, dicts, Datum objects and numbers)."""

    def find_class(self, module: str, name: str):
        if name == "Datum" and module.split(".")[0] == "dassl":
            return Datum
        if module in _SAFE_MODULES or module.split(".")[0] == "numpy":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a Dassl data pickle only holds Datum objects")


def read_dassl_pickle(path: str) -> dict:
    """The dict stored in a Dassl/CoOp data pickle (few-shot cache or preprocessed.pkl)."""
    try:
        with open(path, "rb") as f:
            data = DasslUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise SplitFileError(f"cannot read Dassl pickle {path}: {e}") from e
    if not isinstance(data, dict):
        raise SplitFileError(f"{path}: expected a dict of Datum lists, got {type(data).__name__}")
    for key, items in data.items():
        if not isinstance(items, list) or not all(isinstance(x, Datum) for x in items):
            raise SplitFileError(f"{path}: '{key}' is not a list of Datum objects")
    return data


def reroot(impath: str, info: DatasetInfo, local_image_root: str) -> str:
    """The path of `impath` relative to the image folder, for a path written on any machine.

    Dassl stores absolute paths (`/their/root/oxford_pets/images/x.jpg`); we keep what follows
    the last '<dataset_dir>/<image_dir>/' and join it with the local image folder.
    """
    p = str(impath).replace("\\", "/")
    local = local_image_root.replace("\\", "/").rstrip("/") + "/"
    if p.startswith(local):
        return p[len(local):]
    marker = "/" + "/".join(x for x in (info.dataset_dir, info.image_dir) if x) + "/"
    k = ("/" + p).rfind(marker)
    if k < 0:
        raise SplitFileError(
            f"image path {impath!r} does not contain '{marker.strip('/')}/', so it cannot be "
            f"mapped to {local_image_root}")
    return ("/" + p)[k + len(marker):]


# --- split files ----------------------------------------------------------------------------

@dataclasses.dataclass
class Items:
    """One split as parallel lists (paths relative to the image folder)."""

    relpaths: list
    labels: list
    classnames: list

    def __len__(self) -> int:
        return len(self.relpaths)


def class_list(info: DatasetInfo, splits: dict, source: str) -> list:
    """Class names in label order from items of all splits, checked for consistency."""
    names: dict = {}
    first_seen: dict = {}
    for split, items in splits.items():
        for k, (label, name) in enumerate(zip(items.labels, items.classnames)):
            if label in names and names[label] != name:
                raise SplitFileError(
                    f"{source}: label {label} is '{names[label]}' at {first_seen[label]} but "
                    f"'{name}' at {split}[{k}]")
            if label not in names:
                names[label] = name
                first_seen[label] = f"{split}[{k}]"
    n = len(names)
    if sorted(names) != list(range(n)):
        gaps = sorted(set(range(max(names) + 1)) - set(names))[:10] if names else []
        raise SplitFileError(f"{source}: labels are not 0..{n - 1} (missing: {gaps})")
    if info.num_classes and n != info.num_classes:
        raise SplitFileError(f"{source}: {n} classes, but {info.name} has {info.num_classes}")
    classnames = [names[y] for y in range(n)]
    bad = [c for c in classnames if c in info.forbidden_classnames]
    if bad:
        raise SplitFileError(
            f"{source}: raw class names {bad} that CoOp renames or drops; this file was not made "
            f"by CoOp's {info.coop_name} reader")
    if info.known_classnames is not None:
        unknown = [c for c in classnames if c not in info.known_classnames]
        if unknown:
            raise SplitFileError(
                f"{source}: unknown {info.name} classes {unknown}; expected CoOp's names "
                f"{list(info.known_classnames)}")
    return classnames


def read_split_file(info: DatasetInfo, path: str) -> dict:
    """{'train'|'val'|'test': Items} from a CoOp split_zhou_*.json file."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise SplitFileError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise SplitFileError(f"{path}: expected an object with train/val/test lists")
    out = {}
    for split in ("train", "val", "test"):
        entries = raw.get(split)
        if not isinstance(entries, list) or not entries:
            raise SplitFileError(f"{path}: missing or empty '{split}' list")
        items = Items([], [], [])
        for k, entry in enumerate(entries):
            ok = (isinstance(entry, (list, tuple)) and len(entry) == 3
                  and isinstance(entry[0], str) and isinstance(entry[2], str))
            try:
                label = int(entry[1]) if ok else None
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise SplitFileError(
                    f"{path}: {split}[{k}] = {entry!r}; expected [relative path, label, class]")
            items.relpaths.append(entry[0].lstrip("/"))
            items.labels.append(label)
            items.classnames.append(entry[2])
        out[split] = items
    class_list(info, out, path)  # validate
    return out


# --- per-layout readers -----------------------------------------------------------------------

def read_classnames_txt(path: str) -> "collections.OrderedDict":
    """CoOp's ImageNet classnames.txt: '<wnid> <class name>' per line."""
    out = collections.OrderedDict()
    with open(path) as f:
        for k, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            folder, _, name = line.partition(" ")
            if not name:
                raise SplitFileError(f"{path}:{k + 1}: expected '<folder> <class name>'")
            out[folder] = name.strip()
    return out


def _imagenet_classnames(info: DatasetInfo, root: str) -> "collections.OrderedDict":
    candidates = [os.path.join(dataset_dir(info, root), "classnames.txt")]
    if info.name != "imagenet":  # CoOp asks to copy it; accept ImageNet's own copy too
        candidates.append(os.path.join(dataset_dir(registry.get("imagenet"), root),
                                       "classnames.txt"))
    for path in candidates:
        if os.path.isfile(path):
            return read_classnames_txt(path)
    raise _missing(info, "classnames.txt", " or ".join(candidates),
                   "It maps ImageNet folder names (wnids) to CLIP's class names.")


def _list_class_folders(info: DatasetInfo, path: str) -> list:
    if not os.path.isdir(path):
        raise _missing(info, "image folder", path)
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _list_images(folder: str) -> list:
    # Dassl's listdir_nohidden, sorted (see the module docstring).
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))


def _read_class_folders(info: DatasetInfo, split_dir: str, classnames: dict, relbase: str,
                        folders: Optional[list] = None) -> Items:
    folders = _list_class_folders(info, split_dir) if folders is None else folders
    items = Items([], [], [])
    for label, folder in enumerate(folders):
        if folder not in classnames:
            raise SplitFileError(f"{split_dir}/{folder}: folder not listed in classnames.txt")
        for name in _list_images(os.path.join(split_dir, folder)):
            items.relpaths.append(os.path.join(relbase, folder, name) if relbase
                                  else os.path.join(folder, name))
            items.labels.append(label)
            items.classnames.append(classnames[folder])
    return items


def _items_from_datums(info: DatasetInfo, datums: list, img_root: str, source: str) -> Items:
    items = Items([], [], [])
    for k, d in enumerate(datums):
        try:
            items.relpaths.append(reroot(d.impath, info, img_root))
        except SplitFileError as e:
            raise SplitFileError(f"{source} item {k}: {e}") from None
        items.labels.append(int(d.label))
        items.classnames.append(str(d.classname))
    return items


def read_imagenet(info: DatasetInfo, root: str) -> dict:
    """{'train', 'test'} Items for ImageNet (val = test, as in CoOp)."""
    d, img_root = dataset_dir(info, root), image_root(info, root)
    pre = os.path.join(d, "preprocessed.pkl")
    if os.path.isfile(pre):
        data = read_dassl_pickle(pre)
        if "train" not in data or "test" not in data:
            raise SplitFileError(f"{pre}: expected 'train' and 'test' lists")
        return {k: _items_from_datums(info, data[k], img_root, f"{pre} '{k}'")
                for k in ("train", "test")}
    classnames = _imagenet_classnames(info, root)
    out = {}
    for split, folder in (("train", "train"), ("test", "val")):
        split_dir = os.path.join(img_root, folder)
        folders = _list_class_folders(info, split_dir)
        if not folders:
            raise _missing(info, f"class folders in {folder}/", split_dir,
                           "CoOp needs val/ organised in class folders like train/.")
        out[split] = _read_class_folders(info, split_dir, classnames, folder, folders)
    return out


def read_aircraft(info: DatasetInfo, root: str) -> dict:
    d = dataset_dir(info, root)
    variants = os.path.join(d, "variants.txt")
    if not os.path.isfile(variants):
        raise _missing(info, "variants.txt", variants)
    with open(variants) as f:
        classnames = [line.strip() for line in f if line.strip()]
    cname2lab = {c: i for i, c in enumerate(classnames)}
    out = {}
    for split in ("train", "val", "test"):
        path = os.path.join(d, f"images_variant_{split}.txt")
        if not os.path.isfile(path):
            raise _missing(info, f"images_variant_{split}.txt", path)
        items = Items([], [], [])
        with open(path) as f:
            for k, line in enumerate(f):
                parts = line.strip().split(" ")
                if len(parts) < 2:
                    continue
                name = " ".join(parts[1:])
                if name not in cname2lab:
                    raise SplitFileError(f"{path}:{k + 1}: variant {name!r} is not in "
                                         f"variants.txt")
                items.relpaths.append(parts[0] + ".jpg")
                items.labels.append(cname2lab[name])
                items.classnames.append(name)
        out[split] = items
    class_list(info, out, variants)
    return out


def read_imagenet_variant(info: DatasetInfo, root: str) -> dict:
    classnames = _imagenet_classnames(info, root)
    img_root = image_root(info, root)
    if info.name == "imagenetv2":
        # Folders 0..999 are ImageNet labels; names follow classnames.txt order.
        names = list(classnames.values())
        items = Items([], [], [])
        for label in range(len(names)):
            folder = os.path.join(img_root, str(label))
            if not os.path.isdir(folder):
                raise _missing(info, f"class folder {label}", folder)
            for name in _list_images(folder):
                items.relpaths.append(os.path.join(str(label), name))
                items.labels.append(label)
                items.classnames.append(names[label])
    else:
        items = _read_class_folders(info, img_root, classnames, "")
    out = {"test": items}
    class_list(info, out, img_root)
    return out


def read_items(info: DatasetInfo, root: str) -> dict:
    """The full splits of a dataset (no few-shot, no class subsampling) as Items."""
    check_root(info, root)
    if info.layout == "split_json":
        path = os.path.join(dataset_dir(info, root), info.split_file)
        if not os.path.isfile(path):
            raise _missing(info, f"split file {info.split_file}", path,
                           "CoOp's fixed train/val/test split is required.")
        img_root = image_root(info, root)
        if not os.path.isdir(img_root):
            raise _missing(info, f"image folder '{info.image_dir or info.dataset_dir}'", img_root)
        return read_split_file(info, path)
    if info.layout == "imagenet":
        return read_imagenet(info, root)
    if info.layout == "aircraft":
        return read_aircraft(info, root)
    if info.layout == "imagenet_variant":
        return read_imagenet_variant(info, root)
    raise ValueError(f"{info.name}: unknown layout {info.layout!r}")


# --- the dataset -----------------------------------------------------------------------------

def fewshot_indices(info: DatasetInfo, train_labels, val_labels, shots: int, seed: int) -> tuple:
    """(train indices, val indices or None) of Dassl's few-shot subset for `seed`.

    As CoOp's readers call `generate_fewshot_dataset` after `random.seed(seed)`: train with
    `shots` per class, then val with min(shots, 4) from the same random stream (base.fewshot).
    ImageNet samples train only; its val is the test set (None).
    """
    rng = random.Random(seed)
    train_idx = base.dassl_fewshot_indices(train_labels, shots, rng)
    if info.val_is_test:
        return train_idx, None
    return train_idx, base.dassl_fewshot_indices(val_labels, min(shots, 4), rng)


def _split(img_root: str, items: Items) -> FileImageSplit:
    return FileImageSplit(img_root, items.relpaths, items.labels)


def _check_against(info: DatasetInfo, items: Items, classnames: list, source: str) -> None:
    for k, (y, c) in enumerate(zip(items.labels, items.classnames)):
        if not 0 <= y < len(classnames) or classnames[y] != c:
            expected = classnames[y] if 0 <= y < len(classnames) else "no such label"
            raise SplitFileError(f"{source} item {k}: label {y} class {c!r}, but the split "
                                 f"says {expected!r}; the pickle belongs to another split")


def load(info: DatasetInfo, root: str, shots: int, seed: int, use_pickle: bool = True):
    """(BaseToNewData with the few-shot train/val and all classes, provenance dict)."""
    full = read_items(info, root)
    img_root = image_root(info, root)
    classnames = class_list(info, full, info.split_file or info.dataset_dir)
    test = _split(img_root, full["test"])
    empty = FileImageSplit(img_root, [], [])
    if info.test_only:
        train = val = empty
    else:
        train = _split(img_root, full["train"])
        val = test if info.val_is_test else _split(img_root, full["val"])
    data = base.BaseToNewData(info.name, classnames, info.templates, train, val, test)
    prov = {"source": "coop", "image_root": img_root, "fewshot": "none"}
    if shots < 1 or info.test_only:
        return data, prov

    pkl = fewshot_pickle_path(info, root, shots, seed)
    train_idx, val_idx = fewshot_indices(info, train.labels, val.labels, shots, seed)
    if use_pickle and os.path.isfile(pkl):
        stored = read_dassl_pickle(pkl)
        keys = ("train",) if info.val_is_test else ("train", "val")
        missing = [k for k in keys if k not in stored]
        if missing:
            raise SplitFileError(f"{pkl}: missing {missing}")
        fs = {k: _items_from_datums(info, stored[k], img_root, f"{pkl} '{k}'") for k in keys}
        for k in keys:
            _check_against(info, fs[k], classnames, f"{pkl} '{k}'")
        train_fs = _split(img_root, fs["train"])
        val_fs = val if info.val_is_test else _split(img_root, fs["val"])
        agrees = [full["train"].relpaths[i] for i in train_idx] == fs["train"].relpaths
        if val_idx is not None:
            agrees = agrees and [full["val"].relpaths[i] for i in val_idx] == fs["val"].relpaths
        prov.update(fewshot="pickle", fewshot_path=pkl, fewshot_matches_dassl=bool(agrees))
    else:
        train_fs = train.subset(train_idx)
        val_fs = val if val_idx is None else val.subset(val_idx)
        prov.update(fewshot="dassl", fewshot_path=None)
    return dataclasses.replace(data, train=train_fs, val=val_fs), prov
