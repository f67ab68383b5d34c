"""Builders and checks shared by several test files.

Test files import them from here (`from helpers import ...`: tests/ is on sys.path under
pytest's default import mode, as for conftest.py), never from another test file. Nothing here
imports torch: the shared builders that need torch at import are in torch_helpers.py.
"""

import io
import json
import os
import random
import re
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from dpc_jax import cli
from dpc_jax.data import registry
from dpc_jax.models.clip import abstract_params
from dpc_jax.models.tokenizer import END_TOKEN, START_TOKEN, bytes_to_unicode
from dpc_jax.training import checkpoints, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"{name}_benchmark", os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
DPC_COOP = os.path.join(REPO, "configs", "dpc_coop.py")


# -- tiny CLIPs ------------------------------------------------------------------------------------


def random_clip_params(config, seed=0):
    """Random float32 parameters shaped like `init_params(config)`.

    Drawn with numpy from the abstract tree: Flax's eager `init` costs tens of seconds on a
    loaded 2-core machine; LayerNorm scales sit near 1 and biases are non-zero so that a swapped
    or dropped parameter changes the outputs.
    """
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "logit_scale":
            return np.asarray(np.log(1 / 0.07), np.float32)
        x = rng.standard_normal(leaf.shape)
        x = 1.0 + 0.1 * x if name == "scale" else 0.05 * x
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


def write_tiny_vocab(out_dir, merged_words):
    """A CLIP-style BPE vocabulary (< 1000 tokens): byte symbols, one merge chain per word."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in merged_words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            if (current, part) not in merges:
                merges.append((current, part))
            if current + part not in vocab:
                vocab.append(current + part)
            current += part
    vocab += [START_TOKEN, END_TOKEN]
    with open(out_dir / "vocab.json", "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(out_dir / "merges.txt", "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir


# -- training runs ---------------------------------------------------------------------------------


def train_cli(tmp_path, *args, env=None):
    """`python -m dpc_jax.train --workdir tmp_path/w *args` from the repository (the traceback of
    a user error not requested): the CompletedProcess."""
    base = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    env = dict(base, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env or {}))
    return subprocess.run([sys.executable, "-m", "dpc_jax.train", "--workdir",
                           str(tmp_path / "w"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


class Interrupted(RuntimeError):
    """Raised by `interrupt_after` (simulates a crash)."""


def interrupt_after(steps):
    """A training hook that stops a stage after `steps` steps of this run, as if killed."""
    def hook(name, step, start, total):
        if step - start >= steps and step < total:
            raise Interrupted(f"{name}: interrupted after step {step}")
    return hook


# A short schedule on the world: seconds per run.
SMALL = {"shots": 2, "progress": False, "backbone.epochs": 2, "backbone.batch_size": 16,
         "batch_size": 4, "dhno.top_k": 4, "dpc.epochs": 1,
         "optim.warmup_epochs": 0,  # one-epoch stages (config checks refuse all-warm-up ones)
         "log_every_steps": 1, "checkpoint_every_steps": 4}


def small_config(config_file=DPC_COOP, **changes):
    c = train_lib.load_config(config_file)
    c.update_from_flattened_dict({**SMALL, **changes})
    return c


def small_flags(**changes):
    """`SMALL` (and `changes`) as --config.field=value flags of the training command line."""
    return [f"--config.{k}={v}" for k, v in {**SMALL, **changes}.items()]


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _restore(stage_dir):
    import orbax.checkpoint as ocp

    meta = checkpoints.read_stage_meta(stage_dir)
    mngr = checkpoints.checkpoint_manager(os.path.join(stage_dir, "checkpoints"))
    return mngr.restore(meta["final_step"], args=ocp.args.Composite(
        params=ocp.args.StandardRestore()))["params"]


# -- datasets --------------------------------------------------------------------------------------


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 10, 3), value % 256, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_split_tree(root, name, classnames, counts, write_images=True):
    """A CoOp tree for `name` with a split file; counts[split] = per-class list of sizes."""
    info = registry.get(name)
    ds = root / info.dataset_dir
    img_root = ds / info.image_dir if info.image_dir else ds
    split = {}
    value = 0
    for part in ("train", "val", "test"):
        entries = []
        for label, cname in enumerate(classnames):
            for k in range(counts[part][label] if isinstance(counts[part], list)
                           else counts[part]):
                rel = f"{cname.replace(' ', '_')}/{part}_{k}.jpg"
                entries.append([rel, label, cname])
                if write_images:
                    path = img_root / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(_jpeg(value))
                value += 1
        # Dassl keeps the split file's order; shuffle so that classes interleave (the few-shot
        # groups follow first appearance, not label order).
        random.Random(len(entries)).shuffle(entries)
        split[part] = entries
    img_root.mkdir(parents=True, exist_ok=True)
    (ds / info.split_file).write_text(json.dumps(split))
    return split


def _imagenet_tree(root, n_train=2):
    wnids = [f"n{i:08d}" for i in range(1000)]
    d = root / "imagenet"
    (d / "images").mkdir(parents=True)
    (d / "classnames.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    data = _jpeg(7)
    for w in wnids[::-1]:  # creation order must not matter
        for part, n in (("train", n_train), ("val", 1)):
            folder = d / "images" / part / w
            folder.mkdir(parents=True)
            for k in range(n)[::-1]:
                (folder / f"{w}_{k}.JPEG").write_bytes(data)
    return wnids


# -- jaxprs and numbers ----------------------------------------------------------------------------


PRECISION_PRIMITIVES = ("dot_general", "conv_general_dilated")


def precisions(jaxpr) -> list:
    """(primitive, precision) of every matmul-like equation, sub-jaxprs included."""
    found = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name in PRECISION_PRIMITIVES:
                found.append((eqn.primitive.name, eqn.params.get("precision")))
            for value in eqn.params.values():
                for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return found


def is_highest(precision) -> bool:
    p = precision if isinstance(precision, tuple) else (precision, precision)
    return all(x == jax.lax.Precision.HIGHEST for x in p)


def max_rel_err(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


# -- torch-written checkpoints (no torch needed here) ----------------------------------------------


# Set when an UpstreamScheduler is unpickled: the loader must never build one.
RAN = []


class UpstreamScheduler:
    """Stands for Dassl's pickled LR scheduler: a class the restricted unpickler must not load."""

    def __init__(self):
        self.last_epoch = 4
        self.base_lrs = [0.0025]

    def __setstate__(self, state):
        RAN.append(state)
        self.__dict__.update(state)


def _listed(message, label):
    """The keys of one 'label: [...]' line of an error message."""
    match = re.search(rf"{label}: (\[.*?\])\n?", message)
    assert match, (label, message)
    return eval(match.group(1))  # noqa: S307 -- a repr of a list of strings written by us


def assert_tree_equal(actual, expected, where=""):
    assert isinstance(actual, dict) and sorted(actual) == sorted(expected), (where, actual)
    for name, value in expected.items():
        if isinstance(value, dict):
            assert_tree_equal(actual[name], value, f"{where}{name}/")
        else:
            got = np.asarray(actual[name])
            assert got.dtype == np.float32, f"{where}{name}"
            assert got.shape == value.shape, f"{where}{name}"
            np.testing.assert_array_equal(got, value, err_msg=f"{where}{name}")


def assert_refused(proc, *words):
    """Exit status 2 and one line on stderr, `Error: ...`, holding every one of `words`."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# Class folders in an order that differs from the sorted one (labels follow sorted order).
FOLDERS = ["golden_retriever", "ant", "Zebra", "cat", "tabby_cat"]


def write_class_image(path, value):
    """A 32x32 image, JPEG or PNG by its extension, one colour per class and item."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.full((32, 32, 3), (value * 37 % 256, value * 11 % 256, 200), np.uint8)
    Image.fromarray(rgb).save(path)


def make_folder(root, counts=None, classes=FOLDERS):
    """DIR/<split>/<class>/<k>.jpg|png; counts[split] = images per class (int or {class: n})."""
    counts = counts or {"train": 5, "test": 2}
    for split, n in counts.items():
        for label, c in enumerate(classes):
            for k in range(n[c] if isinstance(n, dict) else n):
                ext = "png" if k % 2 else "jpg"
                write_class_image(root / split / c / f"{k:02d}.{ext}", 10 * label + k)
    return root
