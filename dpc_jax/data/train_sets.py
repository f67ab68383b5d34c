"""The benchmark of one seed, and its few-shot training set resident on every device."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Tuple

import numpy as np
from tqdm import tqdm

from dpc_jax.data import transforms
from dpc_jax.data.base import BaseToNewData, ImageSplit, subsample_classes


def load_named(config, name: str, seed: int, shots: int, subsample: str = "all") -> BaseToNewData:
    """Dataset `name` (a world dataset, 'world' or 'world_<domain>', or a registry dataset read
    from `config.root` by `config.source`), few-shot sampled for `seed` (`shots` < 1: the full
    splits)."""
    from dpc_jax.data import world

    domain = world.world_dataset_domain(name)
    if domain is not None:
        return world.load_world(seed=seed, shots=shots, subsample=subsample, domain=domain)
    from dpc_jax.data import sources

    return sources.build_dataset(name, config.root, source=config.source, shots=shots,
                                 seed=seed, subsample=subsample)


def load_benchmark(config, seed: int) -> Tuple[BaseToNewData, BaseToNewData]:
    """The (base, new) halves of the few-shot benchmark for one seed: the dataset is read and
    few-shot sampled once over all classes, then halved (Dassl's order)."""
    data = load_named(config, config.dataset, seed, config.shots)
    return subsample_classes(data, "base"), subsample_classes(data, "new")


def load_unlabeled(config, seed: int) -> ImageSplit:
    """The whole training split of ALL classes, for transductive learners (PromptKD's stage 1;
    labels are kept only for bookkeeping). Labels are the all-class ones: base classes
    [0, C_b), then new ones."""
    return load_named(config, config.dataset, seed, 0).train


def decode_split(split: ImageSplit, size: int, config, desc: str):
    """Decode a whole (few-shot) split once: (uint8 [N, size, size, 3], labels [N]); with
    `config.skip_bad_images` unreadable images are dropped (and reported), else they raise."""
    batches = transforms.iterate_batches(split, size, 64, num_threads=config.num_workers,
                                         progress=config.progress,
                                         skip_bad=config.skip_bad_images, desc=desc)
    images, labels, valid = zip(*list(batches))
    valid = np.concatenate(valid)[:len(split)]
    if batches.num_skipped:
        tqdm.write(f"{desc}: dropped {batches.num_skipped} unreadable image(s), e.g. "
                   f"{batches.skipped[0][1]} ({batches.skipped[0][2]})")
    images = np.concatenate(images)[:len(split)][valid]
    labels = np.asarray(split.labels, np.int32)[valid]
    return images, labels


@dataclasses.dataclass
class TrainSet:
    """A training set on device: images, labels and DHNO's per-class index table. A streamed
    set (`stream` set, `images` None) keeps its images on the host split and decodes each
    step's batch by index (`stream_batches`)."""

    images: Any  # uint8 [N, S, S, 3], or None when streamed
    labels: Any  # int32 [N]
    class_table: Any  # int32 [C, M]
    class_counts: Any  # int32 [C]
    stream: Optional["StreamSource"] = None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def as_consts(self) -> dict:
        return {"images": self.images, "labels": self.labels, "class_table": self.class_table,
                "class_counts": self.class_counts}


@dataclasses.dataclass
class StreamSource:
    """Decodes training images from the host split by index, in the order the loop asks."""

    split: ImageSplit
    size: int
    num_threads: int
    skip_bad: bool

    def batches(self, indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 [batch_size, S, S, 3] batches of the images `indices` (a multiple of
        batch_size long), decoded ahead by a thread pool. With skip_bad an unreadable image
        is an all-zero image (reported on stderr); otherwise it raises."""
        it = transforms.iterate_batches(self.split.subset(indices), self.size, batch_size,
                                        num_threads=self.num_threads, progress=False,
                                        skip_bad=self.skip_bad, desc="stream train")
        reported = 0
        for images, _, _ in it:
            if it.num_skipped > reported:
                tqdm.write(f"stream train: skipped unreadable image(s), e.g. "
                           f"{it.skipped[reported][1]} ({it.skipped[reported][2]})")
                reported = it.num_skipped
            yield images


def build_class_table(labels: np.ndarray, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Host-side index of the training set by class, for DHNO's `sample_negative_images`.

    Returns table int32 [C, M] (row c: the indices of class c in increasing order, padded to
    M = the largest class size by repeating its first index, so padding is never a wrong class)
    and counts int32 [C].
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array; got {labels.dtype} "
                         f"{labels.shape}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes={num_classes!r}; expected >= 1")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"labels contain {sorted(set(bad.tolist()))[:10]} outside "
                         f"[0, {num_classes})")
    counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ValueError(
            f"classes {missing.tolist()[:20]} have no training image; every class must have "
            f"one to serve as a hard negative")
    table = np.empty((num_classes, int(counts.max())), np.int32)
    for cls in range(num_classes):
        idx = np.flatnonzero(labels == cls)
        table[cls, :idx.size] = idx
        table[cls, idx.size:] = idx[0]
    return table, counts


def make_train_set(split: ImageSplit, num_classes: int, size: int, put, config,
                   desc: str = "decode few-shot train", stream: bool = False) -> TrainSet:
    """Decode `split` at `size` and place it with `put` (e.g. replicate on the mesh); with
    `stream`, keep only its labels on device and decode images per step from the host."""
    if stream:
        labels = np.asarray(split.labels, np.int32)
        table, counts = build_class_table(labels, num_classes)
        source = StreamSource(split, size, config.num_workers, config.skip_bad_images)
        return TrainSet(None, *put((labels, table, counts)), stream=source)
    images, labels = decode_split(split, size, config, desc)
    table, counts = build_class_table(labels, num_classes)
    return TrainSet(*put((images, labels, table, counts)))


def resident_megabytes(n: int, size: int) -> float:
    """Device memory of n decoded uint8 images at size x size, in MB."""
    return n * size * size * 3 / 2 ** 20
