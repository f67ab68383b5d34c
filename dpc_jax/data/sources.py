"""`build_dataset`: one benchmark of the base-to-new protocol, from CoOp folders or from TFDS,
or your own images (dataset 'folder', `folder.py`: the folder `root`, with source 'coop').

The order is CoOp's: full splits -> few-shot subset (Dassl, run seed; a Dassl few-shot pickle is
used when present) -> base/new class halving with re-labelling (`base.subsample_classes`).
"""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np

from dpc_jax.data import base, coop, folder, registry

SOURCES = ("coop", "tfds")
_KEEP_DEFAULT = object()


def load_dataset(name: str, root: Optional[str], source: str = "coop", shots: int = 16,
                 seed: int = 1, subsample: str = "all", *, use_fewshot_pickle: bool = True,
                 cache_dir=_KEEP_DEFAULT, decode: str = "bytes",
                 classnames_file: Optional[str] = None) -> tuple:
    """(BaseToNewData, provenance dict); see `build_dataset`."""
    info = registry.get(name)
    if source not in SOURCES:
        raise ValueError(f"source={source!r}; expected one of {SOURCES}")
    if subsample not in base.SUBSAMPLES:
        raise ValueError(f"subsample={subsample!r}; expected one of {base.SUBSAMPLES}")
    if isinstance(shots, bool) or not isinstance(shots, int):
        raise ValueError(f"shots={shots!r}; expected an int (< 1 = the full training split)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}; expected an int")
    if subsample != "all" and info.test_only and info.num_classes != 1000:
        raise ValueError(
            f"{info.name} has {info.num_classes} of ImageNet's classes; halving its own label "
            f"range would not give ImageNet's base/new classes, so only subsample='all' is "
            f"supported")
    if info.layout == "folder":
        if source != "coop":
            raise ValueError(f"dataset 'folder' is read from its folder (root); source={source!r}"
                             f" does not apply to it: leave config.source at 'coop'")
        if not root:
            raise ValueError("root is required for dataset 'folder' (the folder with train/ "
                             "and test/, or split.json)")
        data, prov = folder.load(root, shots, seed)
    elif source == "coop":
        if root is None:
            raise ValueError("root is required for source='coop' (the CoOp data folder)")
        data, prov = coop.load(info, root, shots, seed, use_pickle=use_fewshot_pickle)
    else:
        from dpc_jax.data import tfds_source

        if cache_dir is _KEEP_DEFAULT:
            cache_dir = tfds_source.default_cache_dir()
        data, prov = tfds_source.load(info, root, shots, seed, cache_dir=cache_dir,
                                      decode=decode, classnames_file=classnames_file)
    prov.update(shots=shots, seed=seed, subsample=subsample)
    short = short_classes(data, shots) if shots >= 1 else []
    if short:
        where = f"folder {prov['root']}" if info.layout == "folder" else info.name
        listed = ", ".join(f"{c!r} {n}" for c, n in short[:10])
        prov.setdefault("warnings", []).append(
            f"{where}: {len(short)} class(es) have fewer than {shots} training images "
            f"(shots); all of theirs are used: {listed}{', ...' if len(short) > 10 else ''}")
    return base.subsample_classes(data, subsample), prov


def short_classes(data: base.BaseToNewData, shots: int) -> list:
    """[(class name, training images)] of the classes of a few-shot sampled dataset that hold
    fewer than `shots`."""
    counts = np.bincount(np.asarray(data.train.labels), minlength=len(data.classnames))
    return [(data.classnames[y], int(n)) for y, n in enumerate(counts) if n < shots]


def shots_used(data: base.BaseToNewData, shots: int) -> Optional[dict]:
    """What a run records when some class of its few-shot training split holds fewer than
    `shots` images: {"requested", "min", "max" (images per class), "short_classes": {class
    name: images}}; None when every class has `shots` (or `shots` < 1, the full split)."""
    if shots < 1:
        return None
    short = short_classes(data, shots)
    if not short:
        return None
    counts = np.bincount(np.asarray(data.train.labels), minlength=len(data.classnames))
    return {"requested": int(shots), "min": int(counts.min()), "max": int(counts.max()),
            "short_classes": dict(short)}


def build_dataset(name: str, root: Optional[str], source: str = "coop", shots: int = 16,
                  seed: int = 1, subsample: str = "all", **kwargs) -> base.BaseToNewData:
    """A benchmark as the training code uses it.

    name: a registry key ('oxford_pets', ...), CoOp's class name ('OxfordPets'), or 'folder'.
    root: the CoOp data folder (source='coop'), the TFDS data_dir (source='tfds'; None = the
      TFDS default), or the folder of dataset 'folder'.
    shots, seed: Dassl few-shot sampling (< 1 keeps the full training split); train gets
      `shots` per class and val min(shots, 4); ImageNet's val is its test set.
    subsample: 'all' | 'base' | 'new' (Dassl's halving of the sorted labels, re-numbered).
    kwargs: use_fewshot_pickle (coop), cache_dir / decode / classnames_file (tfds).
    What the provenance warns about (classes with fewer training images than `shots`) is
    printed, one line each, once per process (a run reads its data once per seed); the run
    records it in its results (`shots_used`).
    """
    data, prov = load_dataset(name, root, source, shots, seed, subsample, **kwargs)
    for line in prov.get("warnings", ()):
        if (root, line) not in _SAID:  # a run reads its data once per seed: say it once
            _SAID.add((root, line))
            print(f"warning: {line}", file=sys.stderr)
    return data


_SAID: set = set()  # (root, warning) lines printed by this process
