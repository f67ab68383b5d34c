"""The dataset interface every data source serves (the embedded world, CoOp folders, TFDS).

A `BaseToNewData` holds class names, zero-shot templates and three `ImageSplit`s. A split keeps
its labels in memory and loads images on demand as uint8 [size, size, 3] arrays produced by the
CLIP test transform (bicubic resize of the shorter side to `size`, centre crop); CLIP
normalisation is applied on device (`dpc_jax.data.transforms`). The training code decodes the
few-shot training split once at a stored resolution and augments it on device.

The protocol helpers here follow Dassl/CoOp exactly (docs/reference/method.md#data-protocol):
`dassl_fewshot_indices` reproduces `generate_fewshot_dataset`, `subsample_classes` the
base/new halving with re-labelling, and `carve` the per-class validation (and test) split CoOp's
readers make where a dataset has none (the TFDS source and your own folder use it).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import math
import random
from typing import Callable, Optional, Sequence

import numpy as np

SUBSAMPLES = ("all", "base", "new")
SPLIT_SEED = 0  # fixed shuffle of carved val/test splits (a split file, not a run choice)


class ImageSplit(abc.ABC):
    """One split: integer labels in memory, images loaded by index."""

    @property
    @abc.abstractmethod
    def labels(self) -> np.ndarray:
        """int32 [N] labels (after any class subsampling)."""

    @abc.abstractmethod
    def load_image(self, index: int, size: int) -> np.ndarray:
        """uint8 [size, size, 3]: the CLIP test transform of image `index` at `size`."""

    def describe(self, index: int) -> str:
        """A human-readable name of one item (a path for file datasets), for error messages."""
        return f"item {index}"

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int], relabel: Optional[dict] = None) -> "ImageSplit":
        return SubsetSplit(self, np.asarray(indices, dtype=np.int64), relabel)


class SubsetSplit(ImageSplit):
    """A view of some items of another split, optionally with labels mapped by `relabel`."""

    def __init__(self, parent: ImageSplit, indices: np.ndarray, relabel: Optional[dict] = None):
        self.parent = parent
        self.indices = indices
        labels = parent.labels[indices]
        if relabel is not None:
            labels = np.asarray([relabel[int(y)] for y in labels], dtype=np.int32)
        self._labels = labels.astype(np.int32)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def load_image(self, index: int, size: int) -> np.ndarray:
        return self.parent.load_image(int(self.indices[index]), size)

    def describe(self, index: int) -> str:
        return self.parent.describe(int(self.indices[index]))


@dataclasses.dataclass
class BaseToNewData:
    """A classification benchmark as the training and evaluation code sees it."""

    name: str
    classnames: list  # label order
    templates: list  # zero-shot templates with one '{}'
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def dassl_fewshot_indices(labels: Sequence[int], num_shots: int, rng: random.Random) -> list:
    """Indices of Dassl's `generate_fewshot_dataset(items, num_shots)` (repeat=False).

    Items are grouped by label in order of first appearance; each group of at least `num_shots`
    items gives `rng.sample(group, num_shots)`, a smaller group is kept whole. The same `rng` is
    used for train and then val, as Dassl does after `random.seed(seed)`.
    """
    if num_shots < 1:
        return list(range(len(labels)))
    groups = collections.OrderedDict()
    for i, y in enumerate(labels):
        groups.setdefault(int(y), []).append(i)
    out = []
    for items in groups.values():
        out.extend(rng.sample(items, num_shots) if len(items) >= num_shots else items)
    return out


def base_new_relabel(labels: Sequence[int], subsample: str) -> dict:
    """Dassl's base/new rule: sort the labels, base = first ceil(n/2), re-number from 0."""
    if subsample not in SUBSAMPLES:
        raise ValueError(f"subsample={subsample!r}; expected one of {SUBSAMPLES}")
    all_labels = sorted(set(int(y) for y in labels))
    if subsample == "all":
        return {y: y for y in all_labels}
    m = math.ceil(len(all_labels) / 2)
    selected = all_labels[:m] if subsample == "base" else all_labels[m:]
    return {y: i for i, y in enumerate(selected)}


def subsample_classes(data: BaseToNewData, subsample: str) -> BaseToNewData:
    """Keep the base or new half of the classes (labels from the training split, Dassl rule)."""
    if subsample == "all":
        return data
    relabel = base_new_relabel(range(data.num_classes), subsample)
    classnames = [data.classnames[y] for y in sorted(relabel, key=relabel.get)]

    def keep(split: ImageSplit) -> ImageSplit:
        idx = [i for i, y in enumerate(split.labels) if int(y) in relabel]
        return split.subset(idx, relabel)

    return dataclasses.replace(data, classnames=classnames, train=keep(data.train),
                               val=keep(data.val), test=keep(data.test))


def fewshot(data: BaseToNewData, num_shots: int, seed: int) -> BaseToNewData:
    """The Dassl few-shot subset: train with `num_shots`, val with min(num_shots, 4)."""
    if num_shots < 1:
        return data
    rng = random.Random(seed)
    train_idx = dassl_fewshot_indices(data.train.labels, num_shots, rng)
    val_idx = dassl_fewshot_indices(data.val.labels, min(num_shots, 4), rng)
    return dataclasses.replace(data, train=data.train.subset(train_idx),
                               val=data.val.subset(val_idx))


def carve(labels: Sequence[int], val_fraction: float, test_fraction: float = 0.0,
          seed: int = SPLIT_SEED) -> tuple:
    """Per-class (train, val, test) index lists, each in item order.

    With test_fraction == 0 (CoOp `split_trainval`): round(n * val_fraction) of each class go to
    val. Otherwise (CoOp `read_and_split_data`): round(n * (1 - val - test)) train, round(n * val)
    val, the rest test. Classes are shuffled in label order with one `random.Random(seed)`.
    """
    groups = collections.defaultdict(list)
    for i, y in enumerate(labels):
        groups[int(y)].append(i)
    rng = random.Random(seed)
    train, val, test = [], [], []
    for y in sorted(groups):
        idx = groups[y]
        rng.shuffle(idx)
        n = len(idx)
        if test_fraction:
            n_train = round(n * (1.0 - val_fraction - test_fraction))
            n_val = round(n * val_fraction)
            train += idx[:n_train]
            val += idx[n_train:n_train + n_val]
            test += idx[n_train + n_val:]
        else:
            n_val = round(n * val_fraction)
            val += idx[:n_val]
            train += idx[n_val:]
    return sorted(train), sorted(val), sorted(test)


def load_images(split: ImageSplit, indices: Sequence[int], size: int,
                progress: Optional[Callable] = None) -> np.ndarray:
    """uint8 [len(indices), size, size, 3] for the given items."""
    out = np.empty((len(indices), size, size, 3), np.uint8)
    it = progress(indices) if progress else indices
    for j, i in enumerate(it):
        out[j] = split.load_image(int(i), size)
    return out
