"""A stand-in dataset in the CoOp layout, rendered from the embedded world.

    python -m dpc_jax.data synth --dataset oxford_pets --root /tmp/data [--train 8 --val 2 --test 4]


writes `<root>/<dataset_dir>/split_zhou_<Name>.json` and its JPEG images exactly as CoOp's
readers expect them for that dataset (its folder, image folder, split file name and class
count), with world images and world class names in place of the real ones. The files go
through the same reader, few-shot sampling, base/new halving and image pipeline as the real
dataset, so a notebook or a cluster job can run its real-dataset path end to end offline
before the data arrives. The accuracies mean nothing about the real dataset.
"""

from __future__ import annotations

import json
import os
import numpy as np

from dpc_jax.data import registry, world


def write_coop_layout(dataset: str, root: str, train: int = 8, val: int = 2, test: int = 4,
                      image_size: int = world.NATIVE_SIZE, world_seed: int = 0) -> str:
    """Write the stand-in for `dataset` (a registered split-file dataset with at most as many
    classes as the world) under `root`; returns the dataset folder. Items per class: `train`,
    `val`, `test`. A folder of an earlier call (it holds `MARKER`) is written again; a folder
    holding anything else is refused, since a stand-in would replace its split file and mix
    world images into its own."""
    info = registry.get(dataset)
    if info.layout != "split_json" or not info.split_file:
        usable = sorted(d.name for d in registry.DATASETS.values()
                        if d.layout == "split_json" and d.num_classes <= len(world.CLASSNAMES)
                        and d.known_classnames is None)
        raise ValueError(f"dataset {dataset!r}: a stand-in is written only for datasets read from "
                         f"a split_zhou_*.json file; expected one of {usable}")
    classes = world.load_world_full(world_seed).classnames
    if info.num_classes > len(classes):
        raise ValueError(f"dataset {dataset!r} has {info.num_classes} classes; the world has "
                         f"{len(classes)}, so no stand-in can be written for it")
    if info.known_classnames is not None:
        raise ValueError(f"dataset {dataset!r}: CoOp's reader fixes its class names "
                         f"({', '.join(info.known_classnames[:3])}, ...), which the world does "
                         f"not draw; pick another dataset for a stand-in")
    for name, count in (("train", train), ("val", val), ("test", test)):
        if int(count) < 1:
            raise ValueError(f"{name}={count}; expected at least 1 item per class")
    if int(image_size) < 8:
        raise ValueError(f"image_size={image_size}; expected at least 8 pixels")
    from PIL import Image

    folder = os.path.join(os.path.abspath(os.path.expanduser(root)), info.dataset_dir)
    check_writable(folder)
    images = os.path.join(folder, info.image_dir) if info.image_dir else folder
    split = {}
    for part, per_class in (("train", train), ("val", val), ("test", test)):
        # The world split's items are in class blocks: item i has label i // per_class.
        source = world.WorldSplit(part, world_seed, per_class=int(per_class))
        entries = []
        for label in range(info.num_classes):
            cname = classes[label]
            for k in range(int(per_class)):
                rel = f"{cname.replace(' ', '_')}/{part}_{k:03d}.jpg"
                image = source.load_image(label * int(per_class) + k, int(image_size))
                path = os.path.join(images, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(np.asarray(image, np.uint8)).save(path, "JPEG", quality=95)
                entries.append([rel, label, cname])
        # Real split files interleave classes; Dassl's few-shot groups follow first appearance.
        order = np.random.default_rng([world_seed, len(split)]).permutation(len(entries))
        split[part] = [entries[i] for i in order]
    from dpc_jax.files import write_json

    write_json(os.path.join(folder, info.split_file), split)
    write_json(os.path.join(folder, MARKER), {"dataset": dataset, "world_seed": world_seed})
    return folder


# Written into every stand-in folder: a later call may write there again, no other folder.
MARKER = ".dpc_jax_synth.json"


def check_writable(folder: str) -> None:
    """Refuse a folder that exists, is not empty and was not written by `write_coop_layout`."""
    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file; expected a folder to write the stand-in into")
    entries = sorted(os.listdir(folder))
    if entries and MARKER not in entries:
        raise ValueError(f"{folder} already holds files that `python -m dpc_jax.data synth` did "
                         f"not write (e.g. {entries[0]!r}); a stand-in would replace its split "
                         f"file and mix world images into it. Choose another --root")


def describe(folder: str, dataset: str) -> str:
    """One line: what `write_coop_layout` wrote at `folder`."""
    info = registry.get(dataset)
    with open(os.path.join(folder, info.split_file)) as f:
        split = json.load(f)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in split.items())
    return (f"wrote a world stand-in for {info.name} ({info.num_classes} classes; {sizes} "
            f"images) at {folder}")
