"""The benchmark of one seed, and its few-shot training set resident on every device."""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import numpy as np
from tqdm import tqdm

from dpc_jax.data import transforms
from dpc_jax.data.base import BaseToNewData, ImageSplit, subsample_classes


def load_benchmark(config, seed: int) -> Tuple[BaseToNewData, BaseToNewData]:
    """The (base, new) halves of the few-shot benchmark for one seed: the dataset is read and
    few-shot sampled once over all classes, then halved (Dassl's order)."""
    if config.dataset == "world":
        from dpc_jax.data import world

        data = world.load_world(seed=seed, shots=config.shots, subsample="all")
    else:
        from dpc_jax.data import sources

        data = sources.build_dataset(config.dataset, config.root, source=config.source,
                                     shots=config.shots, seed=seed, subsample="all")
    return subsample_classes(data, "base"), subsample_classes(data, "new")


def load_unlabeled(config, seed: int) -> ImageSplit:
    """The whole training split of ALL classes, for transductive learners (PromptKD's stage 1;
    labels are kept only for bookkeeping). Labels are the all-class ones: base classes
    [0, C_b), then new ones."""
    if config.dataset == "world":
        from dpc_jax.data import world

        return world.load_world(seed=seed, shots=0, subsample="all").train
    from dpc_jax.data import sources

    return sources.build_dataset(config.dataset, config.root, source=config.source, shots=0,
                                 seed=seed, subsample="all").train


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
    """The few-shot training set on device: images, labels and DHNO's per-class index table."""

    images: Any  # uint8 [N, S, S, 3]
    labels: Any  # int32 [N]
    class_table: Any  # int32 [C, M]
    class_counts: Any  # int32 [C]

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def as_consts(self) -> dict:
        return dataclasses.asdict(self)


def make_train_set(split: ImageSplit, num_classes: int, size: int, put, config,
                   desc: str = "decode few-shot train") -> TrainSet:
    """Decode `split` at `size` and place it with `put` (e.g. replicate on the mesh)."""
    from dpc_jax.training import dhno

    images, labels = decode_split(split, size, config, desc)
    table, counts = dhno.build_class_table(labels, num_classes)
    return TrainSet(*put((images, labels, table, counts)))
