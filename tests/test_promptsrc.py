"""PromptSRC: its loss against a PyTorch transcription of the released formula, the weight of
each term, the frozen text target, and Gaussian prompt aggregation (exact, and exact across a
resume)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax import tree as tree_lib
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.models.clip import CLIP, normalize
from dpc_jax.prompts import LearnerContext, PromptSRC, register_learner, unregister_learner
from dpc_jax.prompts.promptsrc import gpa_weights, promptsrc_loss, read_templates
from dpc_jax.training import train_lib
from helpers import REPO, Interrupted, interrupt_after
from helpers import small_config as train_small_config

NAMES = ["red circle", "blue star", "pink ring", "green cross", "orange dot"]
CONFIG = os.path.join(REPO, "configs", "dpc_promptsrc.py")


def learner_for(cfg, tok, **changes):
    c = {**PromptSRC.default_config().to_dict(), "depth_text": 2, "depth_vision": 2, **changes}
    return PromptSRC(cfg, tok, ml_collections.ConfigDict(c))


def test_templates_are_the_60_shipped():
    templates = read_templates()
    assert len(templates) == 60 and len(set(templates)) == 60
    assert templates[0] == "a photo of a {}." and templates[-1] == "itap of the {}."


def test_gpa_weights_match_the_published_values():
    w = gpa_weights(20, 15, 1)
    assert w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w[12:17], [0.054, 0.242, 0.399, 0.242, 0.054], atol=1e-3)
    assert w[:10].sum() < 1e-5 and int(np.argmax(w)) == 14  # epoch 15 (1-based)
    with pytest.raises(ValueError, match="no weight"):
        gpa_weights(5, 1000.0, 1.0)


def test_loss_equals_a_torch_transcription_of_the_released_formula():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.RandomState(0)
    b, c, e = 4, 7, 16

    def unit(*shape):
        x = rng.randn(*shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    v, z, t, g = unit(b, e), unit(b, e), unit(c, e), unit(c, e)
    labels = rng.randint(0, c, b)
    logits, zs_logits = 100 * v @ t.T, 100 * z @ g.T
    loss, terms = promptsrc_loss(jnp.asarray(logits), jnp.asarray(zs_logits), jnp.asarray(t),
                                 jnp.asarray(g), jnp.asarray(v), jnp.asarray(z),
                                 jnp.asarray(labels), 25.0, 10.0)
    # PromptSRC's trainer (forward_backward), transcribed with torch on the same arrays.
    T = lambda x: torch.from_numpy(np.asarray(x, np.float64))  # noqa: E731
    ce = F.cross_entropy(T(logits), torch.from_numpy(labels))
    text = F.l1_loss(T(t), T(g), reduction="mean") * 25
    image = F.l1_loss(T(v), T(z), reduction="mean") * 10
    kl = F.kl_div(F.log_softmax(T(logits) / 1, dim=1), F.log_softmax(T(zs_logits) / 1, dim=1),
                  reduction="sum", log_target=True) * (1 * 1) / T(logits).numel()
    want = {"ce": ce, "scl_text": text, "scl_image": image, "scl_kl": kl}
    for k, w in want.items():
        assert float(terms[k]) == pytest.approx(float(w), rel=1e-6), k
    assert float(loss) == pytest.approx(float(ce + text + image + kl), rel=1e-6)
    assert all(float(v_) > 1e-4 for v_ in want.values())  # every term is present


def images(cfg, n=4, seed=0):
    res = cfg.image_resolution
    return jnp.asarray(np.random.RandomState(seed).randn(n, res, res, 3), jnp.float32)


def test_frozen_text_target_is_the_unnormalised_template_mean(tiny_config, tiny_params, tok):
    learner = learner_for(tiny_config, tok)
    g = learner.constants(tiny_params, LearnerContext("world", tuple(NAMES[:2])))["text_target"]
    assert g.shape == (2, tiny_config.embed_dim)
    ids, _ = tok([t.format("blue star") for t in read_templates()])
    feats = CLIP(tiny_config).apply({"params": tiny_params}, jnp.asarray(ids),
                                    method="encode_text")
    np.testing.assert_allclose(np.asarray(g[1]), np.asarray(normalize(feats.mean(0))),
                               rtol=1e-5, atol=1e-6)
    # Not the zero-shot recipe (normalise each template, then average).
    other = normalize(normalize(feats).mean(0))
    assert not np.allclose(np.asarray(other), np.asarray(g[1]), atol=1e-6)


def test_each_weight_moves_the_gradient_by_its_own_term(tiny_config, tiny_params, tok):
    base = learner_for(tiny_config, tok)
    prompt = base.init(jax.random.key(0), tiny_params)
    prompt = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(
        jax.random.key(3), x.shape), prompt)
    texts = base.prepare(tiny_params, NAMES)
    consts = base.constants(tiny_params, LearnerContext("world", tuple(NAMES)))
    x, y = images(tiny_config), jnp.array([0, 1, 2, 3])

    def grads(**weights):
        lrn = learner_for(tiny_config, tok, **weights)
        return jax.grad(lambda p: lrn.loss(tiny_params, p, {}, consts, texts, x, y,
                                           jax.random.key(0))[0])(prompt)

    def term_grad(term):
        return jax.grad(lambda p: base.loss(tiny_params, p, {}, consts, texts, x, y,
                                            jax.random.key(0))[1][term])(prompt)

    full = grads()
    for field, term, leaves in (("text_loss_weight", "scl_text", ("ctx", "text_deep")),
                                ("image_loss_weight", "scl_image", ("vision_ctx",
                                                                    "vision_deep"))):
        without = grads(**{field: 0.0})
        diff = jax.tree_util.tree_map(lambda a, b: a - b, full, without)
        want = term_grad(term)
        for k, d in tree_lib.flatten(diff).items():
            np.testing.assert_allclose(np.asarray(d), np.asarray(tree_lib.flatten(want)[k]),
                                       rtol=1e-3, atol=1e-6)
        # The text term reaches only text prompts, the image term only visual prompts.
        for k, w in tree_lib.flatten(want).items():
            assert (float(jnp.max(jnp.abs(w))) > 0) == (k in leaves), (term, k)


class Recording(PromptSRC):
    """PromptSRC that records the prompt it aggregates after every epoch."""

    name = "promptsrc_recording"
    snapshots = []

    def on_epoch_end(self, epoch, epochs, prompt, extra):
        Recording.snapshots.append((epoch, jax.tree_util.tree_map(np.array, prompt)))
        return super().on_epoch_end(epoch, epochs, prompt, extra)


@pytest.fixture(scope="module")
def recording():
    register_learner(Recording)
    yield
    unregister_learner(Recording.name)


def gpa_config(**changes):
    # 32 base classes x 2 shots at B 16: 4 steps per epoch, 5 epochs; GPA centred on epoch 3.
    return train_small_config(CONFIG, stages="backbone", **{
        "backbone.name": Recording.name, "backbone.epochs": 5, "backbone.gpa_mean": 3.0,
        "backbone.gpa_std": 1.0, "checkpoint_every_steps": 3, **changes})


def test_gpa_is_the_weighted_sum_of_epoch_snapshots_and_survives_a_resume(recording, tmp_path):
    Recording.snapshots.clear()
    straight = str(tmp_path / "straight")
    train_lib.train_and_evaluate(gpa_config(), straight)
    snaps = list(Recording.snapshots)
    assert [e for e, _ in snaps] == [0, 1, 2, 3, 4]
    w = gpa_weights(5, 3.0, 1.0)
    final, aux = _restore_final(straight)
    want = jax.tree_util.tree_map(lambda x: np.zeros_like(x, np.float32), snaps[0][1])
    for e, p in snaps:
        want = jax.tree_util.tree_map(lambda s, x: s + np.float32(w[e]) * x, want, p)
    for k, v in tree_lib.flatten(want).items():
        np.testing.assert_array_equal(np.asarray(tree_lib.flatten(aux)[k]), v)
    # P is the aggregate, not the last epoch's prompt.
    assert not np.allclose(np.asarray(tree_lib.flatten(aux)["ctx"]),
                           np.asarray(tree_lib.flatten(final)["ctx"]))
    # Stopped after step 5 (in epoch 2, after the step-3 checkpoint), resumed: the same sum.
    resumed = str(tmp_path / "resumed")
    with pytest.raises(Interrupted):
        train_lib.train_and_evaluate(gpa_config(), resumed, hooks=[interrupt_after(5)])
    train_lib.train_and_evaluate(gpa_config(), resumed)
    _, aux2 = _restore_final(resumed)
    for k, v in tree_lib.flatten(aux).items():
        np.testing.assert_array_equal(np.asarray(tree_lib.flatten(aux2)[k]), np.asarray(v))


def _restore_final(workdir):
    """(last parameters, GPA sum) of the finished backbone stage."""
    import orbax.checkpoint as ocp

    from dpc_jax.training import checkpoints

    stage = os.path.join(workdir, "seed_1", "backbone")
    meta = checkpoints.read_stage_meta(stage)
    mngr = checkpoints.checkpoint_manager(os.path.join(stage, "checkpoints"))
    out = mngr.restore(meta["final_step"], args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), aux=ocp.args.StandardRestore()))
    return out["params"], out["aux"]["extra"]["gpa_sum"]
