"""Builders and checks shared by several test files.

Test files import them from here (`from helpers import ...`: tests/ is on sys.path under
pytest's default import mode, as for conftest.py), never from another test file. Nothing here
imports torch: the shared builders that need torch at import are in torch_helpers.py.
"""

import json
import os

import jax
import numpy as np

from dpc_jax.training import checkpoints, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPC_COOP = os.path.join(REPO, "configs", "dpc_coop.py")


# -- training runs ---------------------------------------------------------------------------------


class Interrupted(RuntimeError):
    """Raised by `interrupt_after` (simulates a crash)."""


def interrupt_after(steps):
    """A training hook that stops a stage after `steps` steps of this run, as if killed."""
    def hook(name, step, start, total):
        if step - start >= steps and step < total:
            raise Interrupted(f"{name}: interrupted after step {step}")
    return hook


def small_config(config_file=DPC_COOP, **changes):
    c = train_lib.load_config(config_file)
    c.shots = 2
    c.progress = False
    c.backbone.epochs = 2
    c.backbone.batch_size = 16
    c.batch_size = 4
    c.dhno.top_k = 4
    c.dpc.epochs = 1
    c.optim.warmup_epochs = 0  # one-epoch stages (config checks refuse an all-warm-up stage)
    c.log_every_steps = 1
    c.checkpoint_every_steps = 4
    c.update_from_flattened_dict(changes)
    return c


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
