"""KgCoOp: the hand-crafted target, the loss against a numpy transcription of the released
formula, the term's pull, its PyTorch file, and DPC on it keeping KgCoOp's new accuracy."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax.models.clip import CLIP
from dpc_jax.prompts import CoOp, LearnerContext, get_learner
from dpc_jax.prompts.kgcoop import TEMPLATE_OVERRIDES, KgCoOp
from dpc_jax.training import train_lib
from helpers import REPO

NAMES = ["red circle", "blue star", "pink ring", "green cross"]


def learner_for(tiny_config, tok, **changes):
    return KgCoOp(tiny_config, tok, ml_collections.ConfigDict(
        {**KgCoOp.default_config().to_dict(), **changes}))


def frozen_feature(tiny_config, tiny_params, tok, text):
    ids, _ = tok([text])
    f = np.asarray(CLIP(tiny_config).apply({"params": tiny_params}, jnp.asarray(ids),
                                           method="encode_text"), np.float64)[0]
    return f / np.linalg.norm(f)


def test_registered_with_its_own_metadata():
    assert get_learner("kgcoop") is KgCoOp
    assert KgCoOp.info.display_name == "KgCoOp"
    assert KgCoOp.default_config().kg_weight == 8.0


def test_target_is_the_hand_crafted_prompts_frozen_feature(tiny_config, tiny_params, tok):
    learner = learner_for(tiny_config, tok)
    g = np.asarray(learner.constants(tiny_params, LearnerContext(
        "oxford_pets", tuple(NAMES), ("a photo of a {}, a type of pet.",)))["text_target"])
    assert g.shape == (len(NAMES), tiny_config.embed_dim)
    for c, name in enumerate(NAMES):
        want = frozen_feature(tiny_config, tiny_params, tok, f"a photo of a {name}, a type of pet.")
        np.testing.assert_allclose(g[c], want, rtol=1e-5, atol=1e-6)
    # DTD: the released code's own template, not the dataset's zero-shot one.
    g_dtd = np.asarray(learner.constants(tiny_params, LearnerContext(
        "dtd", tuple(NAMES), ("{} texture.",)))["text_target"])
    want = frozen_feature(tiny_config, tiny_params, tok, TEMPLATE_OVERRIDES["dtd"].format(NAMES[1]))
    np.testing.assert_allclose(g_dtd[1], want, rtol=1e-5, atol=1e-6)


def test_loss_is_ce_plus_weighted_cosine_gap(tiny_config, tiny_params, tok):
    learner = learner_for(tiny_config, tok, kg_weight=3.0)
    consts = learner.constants(tiny_params, LearnerContext("world", tuple(NAMES),
                                                           ("a photo of a {}.",)))
    prompt = learner.init(jax.random.key(0), tiny_params)
    prompt = {"ctx": prompt["ctx"] + 0.1 * jax.random.normal(jax.random.key(1),
                                                             prompt["ctx"].shape)}
    texts = learner.prepare(tiny_params, NAMES)
    res = tiny_config.image_resolution
    images = jax.random.normal(jax.random.key(2), (3, res, res, 3))
    labels = jnp.array([0, 3, 1])
    loss, metrics, _ = learner.loss(tiny_params, prompt, {}, consts, texts, images, labels,
                                    jax.random.key(3))
    # numpy transcription: CE(100 cos) + w * (1 - mean_c cos(t_c, g_c))
    t = np.asarray(learner.text_features(tiny_params, prompt, texts, jnp.arange(4)), np.float64)
    v = np.asarray(learner.image_features(tiny_params, prompt, images), np.float64)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    logits = np.exp(float(tiny_params["logit_scale"])) * v @ t.T
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -logp[np.arange(3), np.asarray(labels)].mean()
    g = np.asarray(consts["text_target"], np.float64)
    kg = 1.0 - np.mean(np.sum(t * g, -1))
    np.testing.assert_allclose(float(metrics["ce"]), ce, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["kg"]), kg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(loss), ce + 3.0 * kg, rtol=1e-4)
    assert kg > 1e-3  # the check above compares a term that is not zero
    # Weight 0 is CoOp's loss, bit for bit.
    coop = CoOp(tiny_config, tok, CoOp.default_config())
    plain = learner_for(tiny_config, tok, kg_weight=0.0)
    a = plain.loss(tiny_params, prompt, {}, consts, texts, images, labels, jax.random.key(3))[0]
    b = coop.loss(tiny_params, prompt, {}, consts, texts, images, labels, jax.random.key(3))[0]
    assert float(a) == float(b)


def test_the_term_pulls_the_context_toward_the_hand_crafted_features(tiny_config, tiny_params,
                                                                     tok):
    learner = learner_for(tiny_config, tok, kg_weight=1.0, ctx_init="")
    consts = learner.constants(tiny_params, LearnerContext("world", tuple(NAMES),
                                                           ("a photo of a {}.",)))
    texts = learner.prepare(tiny_params, NAMES)
    res = tiny_config.image_resolution
    images = jnp.zeros((1, res, res, 3))

    def kg(prompt):
        return learner.loss(tiny_params, prompt, {}, consts, texts, images, jnp.array([0]),
                            None)[1]["kg"]

    prompt = learner.init(jax.random.key(0), tiny_params)
    before = float(kg(prompt))
    grad = jax.jit(jax.grad(kg))
    for _ in range(20):
        prompt = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, prompt, grad(prompt))
    assert float(kg(prompt)) < 0.9 * before


def test_kg_weight_is_checked(tiny_config, tok):
    for bad in (-1.0, float("nan"), True, "8"):
        with pytest.raises(ValueError, match=r"config\.backbone\.kg_weight=.*expected a finite "
                                             r"number >= 0"):
            learner_for(tiny_config, tok, kg_weight=bad)


def test_reads_the_released_checkpoint_layout(tiny_config, tok, tmp_path):
    """The released trainer saves 'ctx' (fp16) beside the unused bias_vectors and meta-net."""
    torch = pytest.importorskip("torch")
    width = tiny_config.transformer_width
    ctx = torch.randn(4, width).half()
    state_dict = {"ctx": ctx, "bias_vectors": torch.randn(1, 512).half(),
                  "meta_net.linear1.weight": torch.randn(512, 512),
                  "meta_net.linear1.bias": torch.randn(512)}
    path = tmp_path / "prompt_learner" / "model.pth.tar-100"
    path.parent.mkdir()
    torch.save({"state_dict": state_dict, "epoch": 100, "optimizer": None, "scheduler": None},
               str(path))
    learner = learner_for(tiny_config, tok)
    prompt = learner.load_torch_prompt(str(path))
    np.testing.assert_array_equal(np.asarray(prompt["ctx"]), ctx.float().numpy())
    out = learner.export_torch_prompt(prompt, str(tmp_path / "out"), 100)
    again = learner.load_torch_prompt(out)
    np.testing.assert_array_equal(np.asarray(again["ctx"]), ctx.float().numpy())


def test_world_run_dpc_keeps_kgcoops_new_accuracy(tmp_path):
    c = train_lib.load_config(os.path.join(REPO, "configs", "dpc_kgcoop.py"))
    c.shots, c.progress = 2, False
    c.backbone.epochs, c.backbone.batch_size, c.backbone.lr = 2, 16, 0.05
    c.batch_size, c.dhno.top_k, c.dpc.epochs, c.dpc.lr = 4, 4, 2, 0.05
    c.optim.warmup_epochs = 0
    results = train_lib.train_and_evaluate(c, str(tmp_path))
    assert results["dpc"]["new"] == results["backbone"]["new"]
    # Both stages trained (so the equality above is not that of untouched prompts).
    assert results["backbone"]["base"] != results["zeroshot"]["base"]
    assert results["dpc"]["base"] != results["backbone"]["base"]
    with open(tmp_path / "seed_1" / "backbone" / "log.jsonl") as f:
        record = json.loads(f.readline())
    assert {"ce", "kg", "acc"} <= set(record)
