"""DPC dual prompts: initialisation, evaluation prompts, config errors, the reference mode's
learning-rate equivalence on a real CoOp loss, and frozen leaves under the optimiser."""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax.models import clip as clip_lib
from dpc_jax.models.tokenizer import Tokenizer
from dpc_jax.prompts import CoOp, DualPrompt
from dpc_jax.prompts.base import classification_logits, cross_entropy
from dpc_jax.prompts import dpc as dpc_lib
from dpc_jax.training import optim
from dpc_jax.training.masks import trainable_mask

from helpers import random_clip_params, write_tiny_vocab


def dpc_config(**changes):
    return ml_collections.ConfigDict({**dpc_lib.default_config().to_dict(), **changes})


def random_prompt(seed=0, shape=(4, 8)):
    rng = np.random.default_rng(seed)
    return {"ctx": jnp.asarray(rng.normal(0, 0.02, shape), jnp.float32),
            "deep": [jnp.asarray(rng.normal(0, 0.02, (2, 3)), jnp.float32)]}


def assert_tree_bitwise(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


def assert_tree_close(a, b, rtol, atol=0.0):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode, w_b", [("paper", 0.5), ("paper", 0.2), ("reference", 0.5),
                                       ("reference", 1.0), ("reference", 0.2)])
def test_init_training_prompt_is_backbone(mode, w_b):
    P = random_prompt()
    dpc = DualPrompt(dpc_config(mode=mode, w_base=w_b))
    params = dpc.init(P)
    assert set(params) == {"backbone", "parallel"}
    assert params["backbone"] is P
    # The parallel prompt is a copy with its own buffer (safe to donate).
    assert (params["parallel"]["ctx"].unsafe_buffer_pointer()
            != P["ctx"].unsafe_buffer_pointer())
    train = dpc.train_prompt(params)
    if mode == "paper" or w_b in (0.5, 1.0):  # exact: (P - 0.5P) * 2 == P in binary
        assert_tree_bitwise(train, P)
    else:  # (P - 0.8P) * 5 == P up to rounding, as in the released code
        assert_tree_close(train, P, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_new_prompt_is_exactly_backbone_when_w_new_is_zero(mode):
    P = {"ctx": jnp.array([[-0.0, 1.0, np.inf], [np.nan, -2.0, 3.0]], jnp.float32)}
    dpc = DualPrompt(dpc_config(mode=mode, w_base=0.2, w_new=0.0))
    params = dpc.init(P)
    params["parallel"] = {"ctx": params["parallel"]["ctx"] + 1.0}  # trained away from P
    new = dpc.eval_prompt(params, "new")
    assert new["ctx"] is P["ctx"]  # P itself: bitwise, -0.0, inf and nan included


def test_evaluation_prompts_follow_the_formulas():
    P = random_prompt(0)
    theta = random_prompt(1)
    w_b, w_n = 0.2, 0.3
    ref = DualPrompt(dpc_config(mode="reference", w_base=w_b, w_new=w_n))
    paper = DualPrompt(dpc_config(mode="paper", w_base=w_b, w_new=w_n))
    params = {"backbone": P, "parallel": theta}
    mix = lambda w, a, b: jax.tree_util.tree_map(lambda x, y: w * x + (1 - w) * y, a, b)  # noqa
    # paper: train P'; base w_b P' + (1-w_b) P; new w_n P' + (1-w_n) P.
    assert paper.train_prompt(params) is theta
    assert_tree_close(paper.eval_prompt(params, "base"), mix(w_b, theta, P), rtol=1e-6)
    assert_tree_close(paper.eval_prompt(params, "new"), mix(w_n, theta, P), rtol=1e-6)
    # reference: Q = (theta - (1-w_b) P) / w_b for training and base; new = w_n Q + (1-w_n) P.
    Q = jax.tree_util.tree_map(lambda t, p: (t - (1 - w_b) * p) / w_b, theta, P)
    assert_tree_close(ref.train_prompt(params), Q, rtol=1e-5, atol=1e-8)
    assert_tree_close(ref.eval_prompt(params, "base"), Q, rtol=1e-5, atol=1e-8)
    assert_tree_close(ref.eval_prompt(params, "new"), mix(w_n, Q, P), rtol=1e-5, atol=1e-8)
    # The stored theta is the paper's base prompt with P' = Q.
    assert_tree_close(mix(w_b, ref.train_prompt(params), P), theta, rtol=1e-5, atol=1e-8)
    # w_n = 1 gives the trained prompt itself.
    ref1 = DualPrompt(dpc_config(mode="reference", w_base=w_b, w_new=1.0))
    assert_tree_bitwise(ref1.eval_prompt(params, "new"), ref1.train_prompt(params))
    with pytest.raises(ValueError, match=r"eval split 'all'; allowed values: \['base', 'new'\]"):
        ref.eval_prompt(params, "all")
    with pytest.raises(ValueError,
                       match=r"keys \['backbone', 'parallel'\]; found \['ctx', 'deep'\]"):
        ref.train_prompt(P)


@pytest.mark.parametrize("changes, match", [
    (dict(mode="converse"), r"config\.dpc\.mode='converse'; allowed values: "
                            r"\['reference', 'paper'\]"),
    (dict(w_base=0.0), r"config\.dpc\.w_base=0\.0; expected a number in \(0, 1\] "
                            r"\(reference mode divides by it\)"),
    (dict(w_base=1.5), r"config\.dpc\.w_base=1\.5"),
    (dict(w_base="half"), r"config\.dpc\.w_base='half'"),
    (dict(w_new=-0.1), r"config\.dpc\.w_new=-0\.1; expected a number in \[0, 1\]"),
    (dict(w_new=float("nan")), r"config\.dpc\.w_new=nan"),
    (dict(mode="paper", w_base=1.01), r"config\.dpc\.w_base=1\.01; expected a number "
                                           r"in \[0, 1\]"),
])
def test_bad_config_values_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        DualPrompt(dpc_config(**changes))


def test_config_edge_values():
    DualPrompt(dpc_config(mode="paper", w_base=0.0))  # paper mode does not divide
    incomplete = dpc_config()
    del incomplete["w_new"]
    with pytest.raises(ValueError, match=r"config\.dpc\.w_new is missing"):
        DualPrompt(incomplete)


# ----------------------------------------------------------------------------------------------
# Optimisation on a real CoOp loss (tiny random CLIP)
# ----------------------------------------------------------------------------------------------

W_B = 0.2
LR_PAPER = 0.05  # learning rate for Q in paper mode; reference mode uses LR_PAPER * W_B**2
STEPS = 4


@pytest.fixture(scope="module")
def coop_problem(tmp_path_factory):
    vocab = write_tiny_vocab(tmp_path_factory.mktemp("vocab"), ["photo", "of", "dog", "cat"])
    tokenizer = Tokenizer.from_pretrained(str(vocab))
    # One block per tower keeps compilation short; depth plays no part in what is tested.
    config = clip_lib.get_config("tiny", vision_layers=1, transformer_layers=1)
    clip_params = random_clip_params(config)
    learner = CoOp(config, tokenizer, ml_collections.ConfigDict(
        {**CoOp.default_config().to_dict(), "ctx_init": ""}))
    P = learner.init(jax.random.key(0), clip_params)
    class_texts = learner.prepare(clip_params, ["dog", "cat", "bird", "fish", "frog"])
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    labels = jnp.array([0, 1, 2, 3])

    def loss(clip_params, prompt):
        return cross_entropy(classification_logits(learner, clip_params, prompt, class_texts,
                                                   images), labels)

    return clip_params, P, loss


def run_sgd(dpc, P, clip_params, loss, lr):
    """STEPS SGD steps (momentum 0.9, no weight decay, constant lr) on {'clip', 'prompt'} with
    gradients on every leaf (frozen ones included); returns the training prompt after every
    step, the final parameters and the first step's gradients."""
    params = {"clip": clip_params, "prompt": dpc.init(P)}
    rules = [("clip/.*", False)] + DualPrompt.trainable_rules("prompt/")
    mask = trainable_mask(params, rules)
    tx = optim.make_optimizer(lr, 1, 100, mask=mask, momentum=0.9, weight_decay=0.0,
                              warmup_epochs=0)
    grad_fn = jax.grad(lambda p: loss(p["clip"], dpc.train_prompt(p["prompt"])))

    @jax.jit
    def step(params, state):
        grads = grad_fn(params)
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates, mask), state, grads

    state = tx.init(params)
    trajectory, first_grads = [], None
    for _ in range(STEPS):
        params, state, grads = step(params, state)
        first_grads = grads if first_grads is None else first_grads
        trajectory.append(dpc.train_prompt(params["prompt"]))
    return trajectory, params, first_grads


@pytest.fixture(scope="module")
def reference_run(coop_problem):
    clip_params, P, loss = coop_problem
    dpc = DualPrompt(dpc_config(mode="reference", w_base=W_B))
    return run_sgd(dpc, P, clip_params, loss, LR_PAPER * W_B ** 2)


def test_reference_sgd_equals_paper_sgd_at_lr_over_wb_squared(coop_problem, reference_run):
    clip_params, P, loss = coop_problem
    ref_traj, _, _ = reference_run
    paper = DualPrompt(dpc_config(mode="paper", w_base=W_B))
    paper_traj, _, _ = run_sgd(paper, P, clip_params, loss, LR_PAPER)
    moved = float(jnp.abs(ref_traj[-1]["ctx"] - P["ctx"]).max())
    scale = float(jnp.abs(ref_traj[-1]["ctx"]).max())
    # Q really moved, far beyond the tolerance below: the first step moves Q by lr * gradient,
    # so any other learning rate would break the agreement.
    assert moved > 1e-2, moved
    print(f"Q moved by {moved:.4g} (max abs) over {STEPS} steps; max|Q| = {scale:.4g}")
    # Tolerance relative to the prompt's scale: the map theta -> Q multiplies theta's rounding
    # error by 1/w_b, which matters for elements near zero.
    worst = max(float(jnp.abs(a["ctx"] - b["ctx"]).max()) for a, b in zip(ref_traj, paper_traj))
    print(f"max |Q_reference - Q_paper| over the steps: {worst:.3g}")
    for q_ref, q_paper in zip(ref_traj, paper_traj):
        np.testing.assert_allclose(np.asarray(q_ref["ctx"]), np.asarray(q_paper["ctx"]),
                                   rtol=1e-5, atol=1e-5 * scale)


def test_frozen_leaves_unchanged_with_nonzero_gradients(coop_problem, reference_run):
    clip_params, P, _ = coop_problem
    _, final, grads = reference_run
    # Reference mode: Q depends on P, so the backbone prompt gets a nonzero gradient, and so
    # does CLIP; the mask alone keeps them fixed.
    assert float(jnp.abs(grads["prompt"]["backbone"]["ctx"]).max()) > 0
    assert float(jnp.abs(grads["clip"]["text_projection"]).max()) > 0
    assert float(jnp.abs(grads["clip"]["visual"]["proj"]).max()) > 0
    assert_tree_bitwise(final["prompt"]["backbone"], P)
    assert_tree_bitwise(final["clip"], clip_params)
    assert float(jnp.abs(final["prompt"]["parallel"]["ctx"] - P["ctx"]).max()) > 0
