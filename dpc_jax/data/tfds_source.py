"""The benchmarks from TensorFlow Datasets, read with `tfds.data_source` (array_record, no TF).

TFDS has no CoOp split files, so the splits are formed like this (registry `TfdsPlan`):
- train/val/test are TFDS splits where TFDS has them (Flowers102, DTD: train/validation/test);
- where TFDS has no validation split, 20% of each class of the TFDS train split becomes val
  (CoOp's `split_trainval`), with a fixed shuffle seed (`base.SPLIT_SEED`), independent of the run
  seed, as a split file would be; EuroSAT (one TFDS split) is divided 50/20/30 per class (CoOp's
  `read_and_split_data`); Food101's test set is TFDS 'validation'; ImageNet's val is its test
  set (TFDS 'validation'), as in CoOp;
- the few-shot subset is then drawn by the Dassl algorithm (`base.dassl_fewshot_indices`) with
  the run seed, over the TFDS record order. The images and splits differ from CoOp's, so the
  subsets (and accuracies) are not those of the CoOp files, only the protocol is.

Labels follow CoOp's numbering and names: TFDS label names are mapped with CoOp's renaming
rules (registry), and for datasets where CoOp numbers sorted folder names the TFDS order is
re-sorted (Food101 differs: TFDS lists 'cheesecake' before 'cheese_plate'). Caltech101's
BACKGROUND_Google and Faces_easy, which CoOp drops, are removed. ImageNet names come from CoOp's
classnames.txt (TFDS only has wnids).

Images are read with TFDS's image decoding skipped (`decode='bytes'`, the default) and decoded by
PIL like the CoOp files; `decode='tfds'` lets TFDS decode (needed under
`tfds.testing.mock_data`, which without TensorFlow cannot serve undecoded images).
Reading labels means reading every record once; they are cached as .npy under `cache_dir`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from typing import Any, Optional

import numpy as np
from PIL import Image

from dpc_jax.data import base, coop, registry
from dpc_jax.data.registry import DatasetInfo, TfdsPlan
from dpc_jax.data.transforms import ImageLoadError, clip_test_transform, decode_image_bytes

DECODE_MODES = ("bytes", "tfds")


class TfdsDatasetError(RuntimeError):
    """A TFDS dataset that is not prepared as needed, or whose labels do not fit CoOp's."""


def default_cache_dir() -> str:
    return os.environ.get("DPC_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                        "dpc_jax"))


def _tfds():
    import tensorflow_datasets as tfds  # heavy import; only the TFDS source needs it

    return tfds


def open_source(tfds_name: str, split: str, data_dir: Optional[str], decode: str = "bytes"):
    """`tfds.data_source` for one split, never downloading; errors say how to prepare it."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}; expected one of {DECODE_MODES}")
    tfds = _tfds()
    decoders = {"image": tfds.decode.SkipDecoding()} if decode == "bytes" else None
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False,
                                decoders=decoders)
    except Exception as e:  # TFDS raises several types; all mean "not usable as prepared"
        where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        reason = f"{type(e).__name__}: {e}"
        try:  # TFDS reports an unprepared dataset as a file-format problem; say it plainly
            expected = os.path.join(str(tfds.builder(tfds_name, data_dir=data_dir).data_dir),
                                    "dataset_info.json")
            if not os.path.isfile(expected):
                reason = f"the dataset is not prepared there (no {expected})"
        except Exception:  # the original error is still the best we have
            pass
        raise TfdsDatasetError(
            f"cannot open TFDS '{tfds_name}' split '{split}' in {where}: {reason}\n"
            f"Prepare it in the array_record format (building needs TensorFlow): `tfds build "
            f"{tfds_name} --data_dir <dir> --file_format=array_record` (a TFRecord copy converts "
            f"with `tfds convert_format`)."
        ) from e


def _as_pil(image: Any, where: str) -> Image.Image:
    if isinstance(image, (bytes, bytearray, np.bytes_)):
        return decode_image_bytes(bytes(image), where)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ImageLoadError(where, f"unexpected decoded image {arr.dtype} {arr.shape}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


class TfdsSplit(base.ImageSplit):
    """Some records of one TFDS split, with CoOp labels."""

    def __init__(self, source: Any, split: str, tfds_name: str, records: np.ndarray,
                 labels: np.ndarray):
        self.source = source
        self.split = split
        self.tfds_name = tfds_name
        self.records = np.asarray(records, np.int64)  # record numbers in the TFDS split
        self._labels = np.asarray(labels, np.int32)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def record_name(self, index: int) -> str:
        return f"{self.split}[{int(self.records[index])}]"

    def describe(self, index: int) -> str:
        return f"tfds {self.tfds_name} {self.record_name(index)}"

    def load_image(self, index: int, size: int) -> np.ndarray:
        where = self.describe(index)
        try:
            record = self.source[int(self.records[index])]
        except Exception as e:
            raise ImageLoadError(where, f"{type(e).__name__}: {e}") from e
        return clip_test_transform(_as_pil(record["image"], where), size)


def read_labels(source: Any, num_threads: int = 8, chunk: int = 512) -> np.ndarray:
    """The TFDS label of every record of `source` (reads each record once)."""
    n = len(source)

    def read(start: int) -> list:
        # Record by record: tfds 4.9.10's mock_data breaks `__getitems__` (unbound partial).
        return [int(source[i]["label"]) for i in range(start, min(n, start + chunk))]

    out = np.empty((n,), np.int64)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for start, labels in zip(range(0, n, chunk), pool.map(read, range(0, n, chunk))):
            out[start:start + len(labels)] = labels
    return out


def cached_labels(source: Any, tfds_name: str, split: str, data_dir: Optional[str],
                  cache_dir: Optional[str]) -> np.ndarray:
    """`read_labels`, cached per (dataset, version, split, data_dir, size) when cache_dir is set."""
    if cache_dir is None:
        return read_labels(source)
    info = source.dataset_info
    key = hashlib.sha1(f"{os.path.abspath(data_dir or '')}|{info.full_name}|{split}|"
                       f"{len(source)}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, "tfds_labels", f"{tfds_name.replace('/', '_')}-{split}-"
                                                  f"{key}.npy")
    if os.path.isfile(path):
        labels = np.load(path)
        if labels.shape == (len(source),):
            return labels
    labels = read_labels(source)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, labels)
    os.replace(tmp, path)
    return labels


def _restore_caltech_case(name: str) -> str:
    for folder in registry.CALTECH101_CAPITALISED:
        if folder.lower() == name:
            return folder
    return name


def coop_label_map(info: DatasetInfo, tfds_names: list,
                   imagenet_classnames: Optional[dict] = None) -> tuple:
    """(CoOp class names in label order, int64 [num TFDS labels] TFDS -> CoOp label, -1 = drop)."""
    plan = info.tfds
    if info.name == "caltech101":
        folders = [_restore_caltech_case(n) for n in tfds_names]
        fix = registry.caltech101_classname
        dropped = set(registry.CALTECH101_IGNORED)
    else:
        folders, fix, dropped = list(tfds_names), plan.classname, set()
    if imagenet_classnames is not None:
        unknown = [f for f in folders if f not in imagenet_classnames]
        if unknown:
            raise TfdsDatasetError(f"{info.name}: TFDS classes {unknown[:5]} are not in "
                                   f"classnames.txt")
        fix = imagenet_classnames.__getitem__
    kept = [f for f in folders if f not in dropped]
    order = sorted(kept) if plan.label_order == "sorted" else kept
    rank = {f: i for i, f in enumerate(order)}
    mapping = np.asarray([rank.get(f, -1) for f in folders], np.int64)
    classnames = [fix(f) if fix else f for f in order]
    return classnames, mapping


def find_classnames_file(data_dir: Optional[str], classnames_file: Optional[str]) -> str:
    candidates = ([classnames_file] if classnames_file else
                  [os.path.join(data_dir, "imagenet", "classnames.txt"),
                   os.path.join(data_dir, "classnames.txt")] if data_dir else [])
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    raise coop.DatasetNotFoundError(
        f"ImageNet class names (CoOp's classnames.txt, '<wnid> <name>' per line) not found; "
        f"looked at {candidates or 'nothing: pass classnames_file'}. TFDS only has wnids. Get "
        f"it as described in {registry.COOP_DATASETS_MD}#imagenet")


def load(info: DatasetInfo, data_dir: Optional[str], shots: int, seed: int,
         cache_dir: Optional[str] = None, decode: str = "bytes",
         classnames_file: Optional[str] = None):
    """(BaseToNewData with the few-shot train/val and all classes, provenance dict)."""
    plan: Optional[TfdsPlan] = info.tfds
    if plan is None:
        raise TfdsDatasetError(f"{info.name} has no TFDS source here; use source='coop'")
    imagenet_names = None
    if info.layout in ("imagenet", "imagenet_variant"):
        imagenet_names = coop.read_classnames_txt(find_classnames_file(data_dir,
                                                                       classnames_file))
    names_needed = [s for s in (plan.train, plan.val, plan.test) if s]
    sources = {s: open_source(plan.name, s, data_dir, decode) for s in dict.fromkeys(names_needed)}
    any_source = next(iter(sources.values()))
    tfds_names = list(any_source.dataset_info.features["label"].names)
    classnames, mapping = coop_label_map(info, tfds_names, imagenet_names)
    if len(classnames) != info.num_classes:
        raise TfdsDatasetError(f"TFDS {plan.name} gives {len(classnames)} classes after CoOp's "
                               f"rules; {info.name} has {info.num_classes}")

    def read_split(split: str) -> tuple:
        """(record indices kept, CoOp labels) of a TFDS split."""
        tf_labels = cached_labels(sources[split], plan.name, split, data_dir, cache_dir)
        if tf_labels.size and (tf_labels.min() < 0 or tf_labels.max() >= len(mapping)):
            raise TfdsDatasetError(f"TFDS {plan.name} {split}: labels outside 0..{len(mapping)-1}")
        labels = mapping[tf_labels]
        keep = np.flatnonzero(labels >= 0)
        return keep, labels[keep]

    def make(split: str, idx: np.ndarray, labels: np.ndarray) -> TfdsSplit:
        return TfdsSplit(sources[split], split, plan.name, idx, labels)

    train_idx, train_y = read_split(plan.train)
    parts = {}
    if plan.val is None:
        tr, va, te = base.carve(train_y, plan.val_fraction, plan.test_fraction)
        parts["train"] = make(plan.train, train_idx[tr], train_y[tr])
        if not plan.val_is_test:
            parts["val"] = make(plan.train, train_idx[va], train_y[va])
        if plan.test is None:
            parts["test"] = make(plan.train, train_idx[te], train_y[te])
    else:
        parts["train"] = make(plan.train, train_idx, train_y)
        val_idx, val_y = read_split(plan.val)
        parts["val"] = make(plan.val, val_idx, val_y)
    if plan.test is not None:
        test_idx, test_y = read_split(plan.test)
        parts["test"] = make(plan.test, test_idx, test_y)
    if plan.val_is_test:
        parts["val"] = parts["test"]
    data = base.BaseToNewData(info.name, classnames, info.templates, parts["train"],
                              parts["val"], parts["test"])
    prov = {"source": "tfds", "tfds_name": plan.name,
            "version": str(any_source.dataset_info.version), "fewshot": "none",
            "splits": {"train": plan.train, "val": plan.val or (
                "test" if plan.val_is_test else f"{plan.train} (carved {plan.val_fraction:.0%} "
                                                f"per class)"),
                       "test": plan.test or f"{plan.train} (carved {plan.test_fraction:.0%} "
                                            f"per class)"}}
    if shots >= 1:
        tr_idx, va_idx = coop.fewshot_indices(info, data.train.labels, data.val.labels, shots,
                                              seed)
        data = dataclasses.replace(
            data, train=data.train.subset(tr_idx),
            val=data.val if va_idx is None else data.val.subset(va_idx))
        prov["fewshot"] = "dassl"
    return data, prov
