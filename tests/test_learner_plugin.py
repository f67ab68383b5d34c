"""A learner defined here, outside the package, trains through stages 1 and 2 with every hook
of the interface: its own loss, mutable state, frozen constants, epoch hooks with a carried
aggregate (checkpointed: a resumed run equals an uninterrupted one) and DPC doubling rules that
leave one prompt leaf shared. Nothing in dpc_jax/training knows about it."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax.prompts import CoOp, DualRules, register_learner, unregister_learner
from dpc_jax.prompts.base import classification_logits, cross_entropy
from dpc_jax.prompts.capabilities import EpochHooks, Stateful
from dpc_jax.training import checkpoints, train_lib
from helpers import REPO, Interrupted, interrupt_after



class BiasedCoOp(Stateful, EpochHooks, CoOp):
    """CoOp plus a learned bias added to every text feature.

    state: {'steps': number of stage-1 loss evaluations} (non-trainable, mutable);
    constants: {'margin': a per-seed constant subtracted from the true-class logit};
    extra: the running sum of end-of-epoch prompts; final_prompt: their mean (an aggregate);
    dual_rules: only `ctx` is doubled, `bias` stays P's (shared and frozen in stage 2)."""

    name = "coop_bias"

    def init(self, key, clip_params, num_classes=None):
        return {**super().init(key, clip_params, num_classes),
                "bias": jnp.zeros((self.clip_config.embed_dim,), jnp.float32)}

    def init_state(self, clip_params):
        return {"steps": jnp.zeros((), jnp.float32)}

    def constants(self, clip_params, context):
        return {"margin": jnp.asarray(0.1 * len(context.classnames) / 32, jnp.float32)}

    def text_features(self, clip_params, prompt, class_texts, class_ids):
        return super().text_features(clip_params, prompt, class_texts, class_ids) + prompt["bias"]

    def loss(self, clip_params, prompt, state, consts, class_texts, images, labels, key):
        logits = classification_logits(self, clip_params, prompt, class_texts, images, state,
                                       consts)
        logits = logits - consts["margin"] * jax.nn.one_hot(labels, logits.shape[-1])
        return cross_entropy(logits, labels), {"margin": consts["margin"]}, \
            {"steps": state["steps"] + 1.0}

    def init_extra(self, prompt):
        return {"sum": jax.tree_util.tree_map(jnp.zeros_like, prompt),
                "count": jnp.zeros((), jnp.float32)}

    def on_epoch_end(self, epoch, epochs, prompt, extra):
        return {"sum": jax.tree_util.tree_map(lambda s, p: s + p, extra["sum"], prompt),
                "count": extra["count"] + 1.0}

    def final_prompt(self, prompt, extra):
        return jax.tree_util.tree_map(lambda s: s / extra["count"], extra["sum"])

    def dual_rules(self):
        return DualRules(double=(("ctx", True), ("bias", False)),
                         converse=(("ctx", True), (".*", False)))


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Selectable as config.backbone.name='coop_bias' for this module's tests only."""
    register_learner(BiasedCoOp)
    yield
    unregister_learner(BiasedCoOp.name)


def config(**changes):
    c = train_lib.load_config(os.path.join(REPO, "configs", "dpc_coop.py"))
    c.backbone.name = "coop_bias"
    c.update_from_flattened_dict({"stages": "backbone,dpc", "shots": 2, "progress": False,
                                  "backbone.epochs": 3, "backbone.batch_size": 16,
                                  "batch_size": 8, "dhno.top_k": 3, "dpc.epochs": 1,
                                  "optim.warmup_epochs": 0,
                                  "checkpoint_every_steps": 5, **changes})
    return c


def restore(stage_dir):
    import orbax.checkpoint as ocp

    meta = checkpoints.read_stage_meta(stage_dir)
    mngr = checkpoints.checkpoint_manager(os.path.join(stage_dir, "checkpoints"))
    items = {"params": ocp.args.StandardRestore()}
    if os.path.isdir(os.path.join(mngr.directory, str(meta["final_step"]), "aux")):
        items["aux"] = ocp.args.StandardRestore()
    return meta, dict(mngr.restore(meta["final_step"], args=ocp.args.Composite(**items)))


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    return workdir, train_lib.train_and_evaluate(config(), workdir)


def test_a_new_learner_trains_through_both_stages(straight):
    workdir, results = straight
    assert results["dpc"]["new"] == results["backbone"]["new"]  # w_new = 0
    meta1, stage1 = restore(os.path.join(workdir, "seed_1", "backbone"))
    # 64 images / 16 per step = 4 steps per epoch, 3 epochs: the state counted every step and
    # the epoch hook ran after each epoch; both were checkpointed.
    assert meta1["final_step"] == 12
    assert float(stage1["aux"]["state"]["steps"]) == 12.0
    assert float(stage1["aux"]["extra"]["count"]) == 3.0
    assert np.any(stage1["params"]["bias"] != 0)  # the bias trained in stage 1
    _, stage2 = restore(os.path.join(workdir, "seed_1", "dpc"))
    # Only ctx is doubled; the shared bias is stage 1's aggregate, bitwise.
    assert set(stage2["params"]["parallel"]) == {"ctx"}
    p = stage1["aux"]["extra"]
    aggregate = jax.tree_util.tree_map(lambda s: np.asarray(s / p["count"]), p["sum"])
    np.testing.assert_array_equal(stage2["params"]["backbone"]["bias"], aggregate["bias"])
    np.testing.assert_array_equal(stage2["params"]["backbone"]["ctx"], aggregate["ctx"])
    assert not np.array_equal(stage2["params"]["parallel"]["ctx"], aggregate["ctx"])


def test_resumed_run_with_epoch_hooks_equals_uninterrupted(straight, tmp_path):
    reference, results = straight
    workdir = str(tmp_path)
    with pytest.raises(Interrupted):  # stops in stage 1 after step 6 (checkpoint at step 5)
        train_lib.train_and_evaluate(config(), workdir, hooks=[interrupt_after(6)])
    again = train_lib.train_and_evaluate(config(), workdir)
    for stage in ("backbone", "dpc"):
        _, a = restore(os.path.join(workdir, "seed_1", stage))
        _, b = restore(os.path.join(reference, "seed_1", stage))
        assert leaves_equal(a, b), stage
    assert again == results
