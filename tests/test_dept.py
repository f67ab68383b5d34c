"""DePT: fused base logits and new logits against the formulas, the loss, the head's learning
rate, the new-class path that never touches the head, and the trainer (DPC refused)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpc_jax import tree as tree_lib
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.models.clip import normalize
from dpc_jax.models.tokenizer import Tokenizer
from dpc_jax.prompts.dept import DePT
from dpc_jax.training import masks, optim, train_lib
from helpers import REPO
from helpers import small_config as train_small_config

NAMES = ["red circle", "blue star", "pink ring", "green cross", "orange dot"]
CONFIG = REPO + "/configs/dept.py"


@pytest.fixture(scope="module")
def dept(tiny_config, tiny_params):
    tok = Tokenizer.from_pretrained(asset_dir(), context_length=77)
    learner = DePT(tiny_config, tok, DePT.default_config())
    prompt = learner.init(jax.random.key(0), tiny_params, len(NAMES))
    # A head away from its (1, 0) init, so that the FiLM terms matter.
    head = jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                                  prompt["head"])
    return learner, tiny_params, {"inner": prompt["inner"], "head": head}


def images(n, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(n, 32, 32, 3).astype(np.float32))


def test_fused_base_logits_and_new_logits_follow_the_formulas(dept):
    learner, params, prompt = dept
    x = images(3)
    base = learner.prepare(params, NAMES)
    new = learner.prepare(params, NAMES[:3], new_classes=True)
    v = np.asarray(learner.image_features(params, prompt, x))
    t = np.asarray(learner.text_features(params, prompt, base, jnp.arange(5)))
    scale = float(np.exp(params["logit_scale"]))
    cos = scale * (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (
        t / np.linalg.norm(t, axis=1, keepdims=True)).T
    h = prompt["head"]
    film_v = v * np.asarray(h["film_img"]["scale"]) + np.asarray(h["film_img"]["bias"])
    head = film_v @ np.asarray(h["linear"]["kernel"]) + np.asarray(h["linear"]["bias"])
    w = learner.classifier(params, prompt, base, jnp.arange(5))
    got = learner.classify(params, prompt, w, jnp.asarray(v))
    np.testing.assert_allclose(got, 0.3 * cos + 0.7 * head, rtol=1e-4, atol=1e-4)
    # New classes: the cosine logits alone; their classifier carries no head, so a broken head
    # (NaN) cannot reach them, while it does reach base classes.
    broken = {"inner": prompt["inner"],
              "head": jax.tree_util.tree_map(lambda a: a * jnp.nan, prompt["head"])}
    wn = learner.classifier(params, broken, new, jnp.arange(3))
    assert set(wn) == {"w"}
    got_new = learner.classify(params, broken, wn, jnp.asarray(v))
    tn = np.asarray(learner.text_features(params, prompt, new, jnp.arange(3)))
    want_new = scale * (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (
        tn / np.linalg.norm(tn, axis=1, keepdims=True)).T
    np.testing.assert_allclose(got_new, want_new, rtol=1e-5, atol=1e-4)
    assert np.isnan(np.asarray(learner.classify(params, broken, learner.classifier(
        params, broken, base, jnp.arange(5)), jnp.asarray(v)))).all()


def test_loss_is_03_inner_ce_plus_07_head_ce_on_text_and_image_rows(dept):
    learner, params, prompt = dept
    x, y = images(4, seed=1), jnp.asarray([0, 3, 3, 1])
    texts = learner.prepare(params, NAMES)
    loss, metrics, _ = learner.loss(params, prompt, {}, {}, texts, x, y, jax.random.key(0))
    v = learner.image_features(params, prompt, x)
    t = learner.text_features(params, prompt, texts, jnp.arange(5))
    cos = float(np.exp(params["logit_scale"])) * normalize(v) @ normalize(t).T
    ce = lambda logits, labels: float(jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
    h = prompt["head"]
    rows = jnp.concatenate([t[y] * h["film_text"]["scale"] + h["film_text"]["bias"],
                            v * h["film_img"]["scale"] + h["film_img"]["bias"]])
    head = rows @ h["linear"]["kernel"] + h["linear"]["bias"]
    want = 0.3 * ce(cos, y) + 0.7 * ce(head, jnp.concatenate([y, y]))
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert float(metrics["head_loss"]) == pytest.approx(ce(head, jnp.concatenate([y, y])),
                                                        rel=1e-4)
    # The head covers the base classes only (5 columns here).
    assert h["linear"]["kernel"].shape == (params["text_projection"].shape[1], len(NAMES))


def test_cocoop_inner_heads_each_images_label_text_under_its_own_context(tiny_config,
                                                                          tiny_params):
    """DePT over CoCoOp (ExtrasLinearProbeCoCoOp): the cos logits are CoCoOp's per-image ones,
    and the head's text row of image i is its label's text under ctx + meta_net(v_i)."""
    tok = Tokenizer.from_pretrained(asset_dir(), context_length=77)
    config = DePT.default_config()
    from dpc_jax.prompts.cocoop import CoCoOp
    config.inner = CoCoOp.default_config()
    learner = DePT(tiny_config, tok, config)
    assert learner.text_needs_image
    params = tiny_params
    prompt = learner.init(jax.random.key(1), params, len(NAMES))
    prompt["head"] = jax.tree_util.tree_map(
        lambda x: x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), prompt["head"])
    x, y = images(3, seed=2), jnp.asarray([4, 0, 4])
    texts = learner.prepare(params, NAMES)
    loss, metrics, _ = learner.loss(params, prompt, {}, {}, texts, x, y, jax.random.key(0))
    inner = learner.inner
    v = inner.image_features(params, prompt["inner"], x)
    scale = float(np.exp(params["logit_scale"]))
    cos_rows, label_rows = [], []
    for i in range(3):  # CoCoOp by hand: image i's own context, every class text under it
        shift = inner.context_shift(prompt["inner"], normalize(v[i:i + 1]))[0]
        t = inner.text_features(params, {"ctx": prompt["inner"]["ctx"] + shift},
                                texts.texts, jnp.arange(5))
        cos_rows.append(scale * normalize(v[i:i + 1]) @ normalize(t).T)
        label_rows.append(t[int(y[i])])
    cos = jnp.concatenate(cos_rows)
    h = prompt["head"]
    rows = jnp.concatenate([jnp.stack(label_rows) * h["film_text"]["scale"]
                            + h["film_text"]["bias"],
                            v * h["film_img"]["scale"] + h["film_img"]["bias"]])
    head = rows @ h["linear"]["kernel"] + h["linear"]["bias"]
    ce = lambda logits, labels: float(jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
    assert float(metrics["inner_loss"]) == pytest.approx(ce(cos, y), rel=1e-4)
    assert float(metrics["head_loss"]) == pytest.approx(ce(head, jnp.concatenate([y, y])),
                                                        rel=1e-4)
    assert float(loss) == pytest.approx(0.3 * ce(cos, y) + 0.7 * ce(head, jnp.concatenate(
        [y, y])), rel=1e-4)
    # Inference on base classes fuses CoCoOp's per-image cos logits with the head.
    w = learner.classifier(params, prompt, texts, jnp.arange(5))
    film_v = v * h["film_img"]["scale"] + h["film_img"]["bias"]
    np.testing.assert_allclose(learner.classify(params, prompt, w, v),
                               0.3 * cos + 0.7 * (film_v @ h["linear"]["kernel"]
                                                  + h["linear"]["bias"]), rtol=1e-4, atol=1e-4)
    # The meta-net gets gradient through both terms.
    grads = jax.grad(lambda p: learner.loss(params, p, {}, {}, texts, x, y,
                                            jax.random.key(0))[0])(prompt)
    assert float(jnp.abs(grads["inner"]["meta_net"]["linear1"]["kernel"]).sum()) > 0


def test_head_learning_rate_is_65_times_the_prompts(dept):
    learner, _, prompt = dept
    mask = masks.trainable_mask(prompt, [(".*", True)])
    scales = masks.rule_values(prompt, learner.lr_multipliers(), float)
    grads = jax.tree_util.tree_map(jnp.ones_like, prompt)
    plain = optim.make_optimizer(0.01, 2, 5, mask=mask, warmup_epochs=0)
    scaled = optim.make_optimizer(0.01, 2, 5, mask=mask, warmup_epochs=0, lr_scales=scales)
    u0, _ = plain.update(grads, plain.init(prompt), prompt)
    u1, _ = scaled.update(grads, scaled.init(prompt), prompt)
    f0, f1 = tree_lib.flatten(u0), tree_lib.flatten(u1)
    assert any(k.startswith("head/") for k in f0) and any(k.startswith("inner/") for k in f0)
    for k, a in f0.items():
        factor = 6.5 if k.startswith("head/") else 1.0
        np.testing.assert_allclose(f1[k], factor * np.asarray(a), rtol=1e-6)
    with pytest.raises(ValueError, match=r"expected a \(regex string, float\) pair"):
        masks.rule_values(prompt, [(".*", True)], float)


def test_trainer_runs_dept_and_refuses_dpc_on_it(tmp_path):
    c = train_small_config(CONFIG, stages="zeroshot,backbone")
    c.backbone.epochs = 1
    results = train_lib.train_and_evaluate(c, str(tmp_path / "w"))
    assert set(results) == {"zeroshot", "backbone"}
    assert 0 < results["backbone"]["base"] <= 100 and 0 < results["backbone"]["new"] <= 100
    bad = train_small_config(CONFIG, stages="backbone,dpc")
    with pytest.raises(ValueError, match="which the 'dept' learner does not support"):
        train_lib.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_config_wraps_each_backbone_with_its_settings():
    for name, depth_key in (("coop", None), ("maple", "depth"), ("promptsrc", "depth_text")):
        c = train_lib.load_config(CONFIG + f":backbone={name}")
        assert c.backbone.name == "dept" and c.backbone.inner.name == name
        baseline = train_lib.load_config(f"{REPO}/configs/dpc_{name}.py")
        assert (c.backbone.epochs, c.backbone.lr, c.backbone.batch_size) == (
            baseline.backbone.epochs, baseline.backbone.lr, baseline.backbone.batch_size)
        if depth_key:
            assert c.backbone.inner[depth_key] == baseline.backbone[depth_key]
    real = train_lib.load_config(CONFIG + ":backbone=coop,dataset=dtd,root=/d")
    assert (real.backbone.epochs, real.backbone.batch_size, real.backbone.lr,
            real.backbone.inner.n_ctx, real.backbone.inner.ctx_init) == (10, 4, 0.0035, 16, "")
    cocoop = train_lib.load_config(CONFIG + ":backbone=cocoop")
    baseline = train_lib.load_config(f"{REPO}/configs/cocoop.py")
    assert cocoop.backbone.inner.name == "cocoop" and cocoop.stages == "zeroshot,backbone"
    assert (cocoop.backbone.epochs, cocoop.backbone.lr, cocoop.backbone.batch_size) == (
        baseline.backbone.epochs, baseline.backbone.lr, baseline.backbone.batch_size)
    real = train_lib.load_config(CONFIG + ":backbone=cocoop,dataset=dtd,root=/d")
    assert (real.backbone.epochs, real.backbone.batch_size, real.backbone.lr) == (10, 1, 0.002)
    with pytest.raises(ValueError, match="backbone='kgcoop'; DePT wraps one of"):
        train_lib.load_config(CONFIG + ":backbone=kgcoop")
    with pytest.raises(ValueError, match="only configs/dept.py takes a backbone"):
        train_lib.load_config(f"{REPO}/configs/dpc_coop.py:backbone=maple")
