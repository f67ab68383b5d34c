"""Exact work elimination in DPC's stage-2 step (`config.dpc.dedupe_text`,
`config.dpc.compact_negatives`, with either `config.dpc.chunk_tail`): the step's loss and
gradients against the step without them,
on a tiny CLIP with repeated anchor labels, invalid negative slots, and class counts below and
above the B*(K+1) slots. The helpers' own outputs: tests/test_row_skipping.py.
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax.data.train_sets import build_class_table
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.models.clip import get_config
from dpc_jax.models.tokenizer import Tokenizer
from dpc_jax.prompts import IVLP, CoOp, DualPrompt
from dpc_jax.training import dhno, objectives, row_skipping

from helpers import random_clip_params

B, K = 3, 3  # M = B*(K+1) = 12 slots
# Anchors 0 and 1 are both class 0 (images 0 and 1): a repeated label, and with it fewer
# negatives for anchor 1 (its candidates are largely taken by anchor 0).
INDEX = np.array([0, 1, 4], np.int32)
WORDS = ["red", "blue", "pink", "green", "orange", "cyan"]
SHAPES = ["circle", "star", "ring", "cross"]


@pytest.fixture(scope="module")
def setup():
    cfg = get_config("tiny", vision_layers=1, transformer_layers=1)
    tok = Tokenizer.from_pretrained(asset_dir(), context_length=77)
    return cfg, random_clip_params(cfg, seed=0), tok


def perturbed(tree, scale, seed):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def coop(cfg, tok):
    return CoOp(cfg, tok, ml_collections.ConfigDict(CoOp.default_config().to_dict()))


def dual_prompt(learner):
    return DualPrompt(ml_collections.ConfigDict(dict(mode="reference", w_base=0.5, w_new=0.0)),
                      learner.dual_rules())


def loss_and_grads(setup, name, num_classes, policy, variants):
    """{(dedupe_text, compact_negatives, chunk_tail): (loss, grads, valid, negatives)} of one
    step.

    One jitted function builds the prompts and the scorer and runs every variant: eager ops
    would compile one by one, and XLA merges the variants' common parts (selection,
    augmentation, scoring), which keeps the compilation short."""
    cfg, clip_params, tok = setup
    if name == "coop":
        learner = coop(cfg, tok)
    else:  # IVLP with visual prompts: the negatives' image features carry gradients
        learner = IVLP(cfg, tok, ml_collections.ConfigDict(
            {**IVLP.default_config().to_dict(), "depth_text": 1, "depth_vision": 1}))
    names = [f"{w} {s}" for s in SHAPES for w in WORDS][:num_classes]
    texts = learner.prepare(clip_params, names)
    dual = dual_prompt(learner)
    res = cfg.image_resolution
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), 2)
    table, counts = build_class_table(labels, num_classes)
    images = np.random.RandomState(0).randint(0, 256, (len(labels), res, res, 3))
    train = {"images": jnp.asarray(images, jnp.uint8), "labels": jnp.asarray(labels),
             "class_table": jnp.asarray(table), "class_counts": jnp.asarray(counts)}

    def one(flags, params, consts):
        objective = objectives.dpc_objective(learner, dual, res, K, policy,
                                             dedupe_text=flags[0], compact_negatives=flags[1],
                                             chunk_tail=flags[2])

        def loss(params):
            out = objective.forward(params, {}, consts, {"index": jnp.asarray(INDEX)},
                                    jax.random.key(3, impl="rbg"))
            return out["loss"], out

        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, grads, out["valid"], out["negatives"]

    def run(clip_params, texts, train):
        p = perturbed(learner.init(jax.random.key(0), clip_params), 0.1, 1)
        params = {"backbone": p, "parallel": perturbed(p, 0.3, 2)}
        consts = {"clip": clip_params, "train": train, "class_texts": texts, "learner": {},
                  "scorer": learner.classifier(clip_params, p, texts, jnp.arange(num_classes))}
        return [one(f, params, consts) for f in variants]

    results = jax.jit(run)(clip_params, texts, train)
    return dict(zip(variants, jax.tree_util.tree_map(np.asarray, results)))


# (learner, C, policy, variants), each against (False, False): CoOp, whose image features carry
# no gradient, C = 16 > M = 12 (the distinct labels of the valid slots, encoded in chunks of B),
# each switch alone, then both with the 'padded' tail (the rows past the last full chunk of B
# run as a whole chunk instead of one by one). The IVLP test below has both switches at once,
# gradients through both towers and C = 5 <= M (all classes once, then gathered). Few variants:
# compiling a step is most of these tests' time.
FF, TF, FT = (False, False, "single"), (True, False, "single"), (False, True, "single")
TTP = (True, True, "padded")
SCENARIOS = [("coop", 16, "reference", (TF, FT, TTP))]
# float32 rounding of a reordered computation: towers on other batch shapes, gradient sums of
# repeated labels taken before the text tower's backward pass instead of after it. The loss
# agrees to a few ulps. The contrastive gradient is a sum of per-slot terms that nearly cancel
# (logit scale 100), so rounding shows at ~1e-5 of a leaf's largest entry (measured: up to
# 2e-5); compact_negatives alone on CoOp, whose image features carry no gradient, moves the
# text gradient as much through ulp-level changes of the features.
RTOL = 1e-6  # loss, relative
GRAD_TOL = 1e-4  # gradients: max |difference| / max |gradient| per leaf


def assert_same_gradients(grads, base_grads, what):
    """Within GRAD_TOL per leaf; returns the worst max |difference| / max |gradient|."""
    base = dict(jax.tree_util.tree_flatten_with_path(base_grads)[0])
    worst = 0.0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        scale = float(np.max(np.abs(base[path])))
        np.testing.assert_allclose(g, base[path], rtol=0, atol=GRAD_TOL * scale,
                                   err_msg=f"{what} {path}")
        if scale:
            worst = max(worst, float(np.max(np.abs(g - base[path]))) / scale)
    return worst


@pytest.mark.parametrize("name, num_classes, policy, variants", SCENARIOS)
def test_eliminated_step_gives_the_same_loss_and_gradients(setup, name, num_classes, policy,
                                                           variants):
    t0 = time.perf_counter()
    results = loss_and_grads(setup, name, num_classes, policy, (FF,) + variants)
    base_loss, base_grads, valid, negatives = results[FF]
    # The case is the one described: repeated anchor labels and invalid negative slots.
    assert len(set((INDEX // 2).tolist())) < B
    assert not valid.all() and valid.any(), valid
    parallel = jax.tree_util.tree_leaves(base_grads["parallel"])
    assert all(np.abs(g).max() > 0 for g in parallel)  # the gradients really are exercised
    for flags in variants:
        loss, grads, valid_new, negatives_new = results[flags]
        np.testing.assert_array_equal(valid_new, valid)
        np.testing.assert_array_equal(negatives_new, negatives)
        np.testing.assert_allclose(loss, base_loss, rtol=RTOL)
        worst = assert_same_gradients(grads, base_grads, flags)
        print(f"{name} C={num_classes} {policy} (dedupe_text, compact_negatives, tail)={flags}: "
              f"loss {float(loss):.9g} vs {float(base_loss):.9g}, max |dg|/max|g| "
              f"{worst:.2g}, valid negatives {int(valid.sum())}/{valid.size}")
    print(f"  {time.perf_counter() - t0:.1f} s")


def test_ivlp_gradients_through_both_eliminated_encodings(setup):
    """The two encodings the step calls (`row_skipping.encode_valid_rows`,
    `row_skipping.encode_labels`) with IVLP's prompted towers, gradients through both (the
    visual prompt included), inside the slot loss, with C = 5 <= M classes (all encoded once,
    then gathered)."""
    cfg, clip_params, tok = setup
    learner = IVLP(cfg, tok, ml_collections.ConfigDict(
        {**IVLP.default_config().to_dict(), "depth_text": 1, "depth_vision": 1}))
    c, res = 5, cfg.image_resolution
    texts = learner.prepare(clip_params, [f"{w} {s}" for s in SHAPES for w in WORDS][:c])
    images = jnp.asarray(np.random.RandomState(1).normal(size=(B * (K + 1), res, res, 3)),
                         jnp.float32)
    # Slots [anchor_i, negatives_i]: repeated labels, 5 invalid slots (negatives only); the 7
    # valid ones run as 2 chunks of B = 3 and 1 row alone ('single' tail) or 3 chunks ('padded').
    labels = jnp.array([2, 3, 1, 0, 2, 4, 0, 0, 3, 1, 0, 0], jnp.int32)
    valid = jnp.array([1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0], bool)

    def run(clip_params, texts):
        def images_of(p, x):
            return learner.image_features(clip_params, p, x)

        def texts_of(p, ids):
            return learner.classifier(clip_params, p, texts, ids)

        def loss(p, how):
            if how.startswith("prompt as diff"):  # the objective's way: the chunks' custom VJP
                tail = "padded" if how.endswith("padded tail") else "single"
                img = row_skipping.encode_valid_rows(images_of, images, valid, B, diff=p,
                                                     tail=tail)
                txt = row_skipping.encode_labels(texts_of, labels, valid, c, B, diff=p, tail=tail)
            elif how == "closed over":  # the plain scan, differentiated through
                img = row_skipping.encode_valid_rows(lambda x: images_of(p, x), images, valid, B)
                txt = row_skipping.encode_labels(lambda i: texts_of(p, i), labels, valid, c, B)
            else:
                img, txt = images_of(p, images), texts_of(p, labels)
            return dhno.symmetric_infonce(learner.pair_logits(clip_params, p, img, txt), valid)

        p = perturbed(learner.init(jax.random.key(0), clip_params), 0.1, 1)
        return [jax.value_and_grad(loss)(p, how) for how in HOWS]

    HOWS = ("every slot", "prompt as diff", "prompt as diff, padded tail", "closed over")
    (base_loss, base_grads), *eliminated = jax.tree_util.tree_map(
        np.asarray, jax.jit(run)(clip_params, texts))
    assert sorted(base_grads) == ["ctx", "vision_ctx"]
    assert all(np.abs(g).max() > 0 for g in base_grads.values())
    for how, (loss, grads) in zip(HOWS[1:], eliminated):
        np.testing.assert_allclose(loss, base_loss, rtol=RTOL)
        worst = assert_same_gradients(grads, base_grads, f"ivlp, {how}")
        print(f"ivlp C={c}, {how}: loss {float(loss):.9g} vs {float(base_loss):.9g}, "
              f"max |dg|/max|g| {worst:.2g}")


def test_switches_must_be_bools(setup):
    cfg, _, tok = setup
    learner = coop(cfg, tok)
    with pytest.raises(ValueError, match=r"config\.dpc\.dedupe_text='yes'"):
        objectives.dpc_objective(learner, dual_prompt(learner), 32, K, "reference",
                                 dedupe_text="yes")
    with pytest.raises(ValueError, match=r"config\.dpc\.chunk_tail='whole'; expected one of "
                                         r"single, padded"):
        objectives.dpc_objective(learner, dual_prompt(learner), 32, K, "reference",
                                 chunk_tail="whole")
