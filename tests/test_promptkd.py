"""PromptKD: the KD loss and BatchNorm against PyTorch, the student/teacher learner at tiny
shapes (constants, classifier, loss, gradients), BatchNorm statistics averaged over devices,
and DPC's released-defect options, each changing exactly what it names."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import random_clip_params
from dpc_jax import tree as tree_lib
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.models.clip import get_config, normalize
from dpc_jax.prompts import DualPrompt, LearnerContext, PromptKD, PromptSRC
from dpc_jax.prompts.promptkd import RELEASED_OPTIONS, batch_norm, kd_loss, project
from dpc_jax.training import masks, optim
from dpc_jax.training.step import make_per_device_step

NAMES = ["red circle", "blue star", "pink ring", "green cross", "orange dot", "gray square"]
# A teacher wider than the student (E 48 vs 32), as L/14 (768) is to B/16 (512).
TEACHER = get_config("tiny", embed_dim=48, vision_width=96, vision_head_width=16)


@pytest.fixture(scope="module")
def kd(tok, tiny_config, tiny_params):
    """(learner, student CLIP params, consts) with a random teacher prompt."""
    tcfg = ml_collections.ConfigDict({**PromptSRC.default_config().to_dict(), "depth_text": 2,
                                      "depth_vision": 2})
    teacher = PromptSRC(TEACHER.replace(vocab_size=tiny_config.vocab_size), tok, tcfg)
    tparams = random_clip_params(teacher.clip_config, seed=1)
    tprompt = teacher.init(jax.random.key(1), tparams)
    tprompt = jax.tree_util.tree_map(lambda x: x + 0.05, tprompt)  # not the init phrase
    cfg = PromptKD.default_config()
    cfg.depth_vision = 2
    learner = PromptKD(tiny_config, tok, cfg, teacher=teacher)
    consts = learner.constants(tiny_params, LearnerContext(
        dataset="world", classnames=tuple(NAMES), teacher={"clip": tparams, "prompt": tprompt}))
    return learner, tiny_params, consts


def images(n, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(n, 32, 32, 3).astype(np.float32))


def test_kd_loss_equals_a_torch_transcription():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.RandomState(0)
    s, r = (100 * rng.uniform(-1, 1, (5, 9)).astype(np.float32) for _ in range(2))
    for weight, t in ((1000.0, 1.0), (200.0, 2.0)):
        ts, tr = torch.from_numpy(s), torch.from_numpy(r)
        want = weight * F.kl_div(F.log_softmax(ts / t, dim=1), F.softmax(tr / t, dim=1),
                                 reduction="sum") * t * t / ts.numel()
        got = float(kd_loss(jnp.asarray(s), jnp.asarray(r), weight, t))
        assert got == pytest.approx(float(want), rel=1e-6)
    assert float(kd_loss(jnp.asarray(r), jnp.asarray(r), 1000.0)) == pytest.approx(0, abs=1e-6)


def test_batch_norm_matches_torch_batchnorm1d():
    torch = pytest.importorskip("torch")
    rng = np.random.RandomState(1)
    x = rng.randn(6, 5).astype(np.float32) * 3 + 1
    bn = torch.nn.BatchNorm1d(5, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(rng.rand(5).astype(np.float32) + 0.5))
        bn.bias.copy_(torch.from_numpy(rng.randn(5).astype(np.float32)))
        bn.running_mean.copy_(torch.from_numpy(rng.randn(5).astype(np.float32)))
        bn.running_var.copy_(torch.from_numpy(rng.rand(5).astype(np.float32) + 0.5))
    scale, bias = bn.weight.detach().numpy().copy(), bn.bias.detach().numpy().copy()
    mean, var = bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()
    bn.train()
    want = bn(torch.from_numpy(x)).detach().numpy()
    y, (m, v) = batch_norm(jnp.asarray(x), scale, bias, mean, var, train=True)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m, bn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v, bn.running_var.numpy(), rtol=1e-6, atol=1e-6)
    # Inference: the running statistics, returned unchanged.
    bn.eval()
    want = bn(torch.from_numpy(x)).detach().numpy()
    y, (m2, v2) = batch_norm(jnp.asarray(x), scale, bias, m, v, train=False)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert m2 is m and v2 is v
    # Valid rows only: the statistics (and their update) are torch's on those rows alone.
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    bn2 = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        bn2.weight.copy_(torch.from_numpy(scale)), bn2.bias.copy_(torch.from_numpy(bias))
        bn2.running_mean.copy_(torch.from_numpy(mean)), bn2.running_var.copy_(
            torch.from_numpy(var))
    want = bn2(torch.from_numpy(x[mask])).detach().numpy()
    y, (m, v) = batch_norm(jnp.asarray(x), scale, bias, mean, var, train=True,
                           mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(y)[mask], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m, bn2.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v, bn2.running_var.numpy(), rtol=1e-6, atol=1e-6)


def test_constants_are_the_teachers_normalised_text_over_all_classes(kd):
    learner, params, consts = kd
    t = learner.teacher
    h = consts["teacher_text"]
    assert h.shape == (len(NAMES), TEACHER.embed_dim)
    texts = t.prepare(consts["teacher_clip"], NAMES)
    want = normalize(t.text_features(consts["teacher_clip"], consts["teacher_prompt"], texts,
                                     jnp.arange(len(NAMES))))
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-6)
    # The classifier of a class list gives the same rows (base half, new half).
    tokens = learner.prepare(params, NAMES[3:])
    w = learner.classifier(params, {}, tokens, jnp.arange(3), consts)
    np.testing.assert_allclose(w, h[3:], rtol=1e-5, atol=1e-6)
    # The phrase embedding: the class text's context positions ("a photo of a").
    emb = t.model.apply({"params": consts["teacher_clip"]}, tokens.ids[:1], method="embed_tokens")
    np.testing.assert_array_equal(consts["phrase_ctx"], emb[0, 1:5])


def test_student_shapes_state_and_label_free_loss(kd):
    learner, params, consts = kd
    prompt = learner.init(jax.random.key(0), params)
    shapes = {k: tuple(np.shape(v)) for k, v in tree_lib.flatten(prompt).items()}
    assert shapes == learner.expected_shapes()
    assert shapes["projector/dense0/kernel"] == (32, 48)  # E_s -> E_t
    state = learner.init_state(params)
    x = images(4)
    feats = learner.image_features(params, prompt, x, state)
    assert feats.shape == (4, 48)
    tokens = learner.prepare(params, NAMES)

    def loss_fn(p, labels):
        return learner.loss(params, p, state, consts, tokens, x, labels, jax.random.key(0))

    (loss, (metrics, new_state)), grads = jax.value_and_grad(
        lambda p, y: (lambda o: (o[0], (o[1], o[2])))(loss_fn(p, y)), has_aux=True)(
        prompt, jnp.zeros(4, jnp.int32))
    assert float(loss) > 0 and set(metrics) == {"kd", "agree"}
    # Labels are not used.
    loss2, _, _ = loss_fn(prompt, jnp.full((4,), 5, jnp.int32))
    assert float(loss2) == float(loss)
    # Every student leaf gets a gradient; the running statistics moved by momentum 0.1.
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))
    student = learner.student_features(params, prompt, x)
    h = jnp.dot(student, prompt["projector"]["dense0"]["kernel"],
                precision="highest") + prompt["projector"]["dense0"]["bias"]
    np.testing.assert_allclose(new_state["bn"]["mean"], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    # Inference uses the running statistics: a different state gives different features.
    other = learner.image_features(params, prompt, x, new_state)
    assert not np.allclose(other, feats)


def test_batchnorm_statistics_are_averaged_over_devices(kd):
    """Two emulated devices with different halves of the batch: the new statistics are the
    mean of each device's update (the step's pmean), gradients averaged as usual."""
    learner, params, consts = kd
    prompt = learner.init(jax.random.key(0), params)
    state = learner.init_state(params)
    tokens = learner.prepare(params, NAMES)
    x = images(8, seed=3)

    def objective(p, s, c, batch, key):
        loss, metrics, s = learner.loss(params, p, s, consts, tokens, c["x"][batch["index"]],
                                        batch["index"], key)
        return loss, (metrics, s)

    mask = masks.trainable_mask(prompt, [(".*", True)])
    opt = optim.make_optimizer(0.01, 1, 10, mask=mask)
    step = make_per_device_step(objective, opt, mask, under_shard_map=False)
    train_state = {"params": prompt, "opt_state": opt.init(prompt), "state": state}
    out, _, _ = jax.vmap(step, in_axes=(None, None, 0, None), axis_name="data")(
        train_state, {"x": x}, {"index": jnp.arange(8).reshape(2, 4)}, jax.random.key(0))
    per_device = [learner.loss(params, prompt, state, consts, tokens, x[i * 4:(i + 1) * 4],
                               None, None)[2]["bn"] for i in range(2)]
    for k in ("mean", "var"):
        want = (per_device[0][k] + per_device[1][k]) / 2
        np.testing.assert_allclose(out["state"]["bn"][k][0], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["state"]["bn"][k][0], out["state"]["bn"][k][1])


def released(**on):
    c = ml_collections.ConfigDict({"mode": "reference", "w_base": 0.2, "w_new": 0.0})
    c.released = ml_collections.ConfigDict({k: on.get(k, False) for k in RELEASED_OPTIONS})
    return c


def test_dpc_backbone_adds_the_teachers_text_branch_and_new_classes_stay_promptkd(kd):
    learner, params, consts = kd
    prompt = jax.tree_util.tree_map(np.asarray, learner.init(jax.random.key(0), params))
    backbone = learner.dpc_backbone(prompt, consts)
    assert set(backbone) == set(prompt) | {"ctx", "text_deep"}
    for k in ("ctx", "text_deep"):
        np.testing.assert_array_equal(backbone[k], consts["teacher_prompt"][k])
    dual = DualPrompt(released(), learner.dual_rules())
    dpc = learner.dpc_init(dual.init(backbone), released(), jax.random.key(2))
    tokens = learner.prepare(params, NAMES)
    ids = jnp.arange(len(NAMES))
    stage1 = learner.classifier(params, prompt, tokens, ids, consts)
    new = learner.classifier(params, dual.eval_prompt(dpc, "new"), tokens, ids, consts)
    np.testing.assert_array_equal(new, stage1)  # w_n = 0: the teacher's text exactly
    # The text branch is trainable: the loss reaches ctx and text_deep through the teacher tower.
    g = jax.grad(lambda p: jnp.sum(learner.classifier(params, dual.train_prompt(p), tokens, ids,
                                                      consts)[:, 0]))(dpc)
    assert float(jnp.abs(g["parallel"]["ctx"]).sum()) > 0
    assert float(jnp.abs(g["parallel"]["text_deep"]).sum()) > 0


def test_new_classes_at_w_new_mix_the_prompts_and_restore_the_projector(kd):
    """Reference mode, w_n = 0.3: for new classes the prompt leaves are w_n-mixed (ctx through
    the released converse arithmetic), while the projector, not a prompt, is stage 1's
    (docs/reference/backbones.md#dpc-on-each-backbone); base classes use the trained projector."""
    learner, params, consts = kd
    prompt = jax.tree_util.tree_map(np.asarray, learner.init(jax.random.key(0), params))
    backbone = learner.dpc_backbone(prompt, consts)
    c = released()
    c.w_new = 0.3
    dual = DualPrompt(c, learner.dual_rules())
    dpc = dual.init(backbone)
    dpc["parallel"] = jax.tree_util.tree_map(lambda x: x + 0.5, dpc["parallel"])  # trained
    new, base = dual.eval_prompt(dpc, "new"), dual.eval_prompt(dpc, "base")
    for leaf in jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), new["projector"],
            backbone["projector"])):
        assert leaf == 0
    assert not np.array_equal(base["projector"]["dense0"]["kernel"],
                              backbone["projector"]["dense0"]["kernel"])
    np.testing.assert_allclose(new["vision_ctx"], 0.3 * (backbone["vision_ctx"] + 0.5)
                               + 0.7 * backbone["vision_ctx"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("option", RELEASED_OPTIONS)
def test_each_released_defect_changes_exactly_what_it_names(kd, option):
    learner, params, consts = kd
    prompt = jax.tree_util.tree_map(np.asarray, learner.init(jax.random.key(0), params))
    backbone = learner.dpc_backbone(prompt, consts)
    dual = DualPrompt(released(), learner.dual_rules())
    fixed = learner.dpc_init(dual.init(backbone), released(), jax.random.key(2))
    repro = learner.dpc_init(dual.init(backbone), released(**{option: True}), jax.random.key(2))
    changed = {k for k, v in tree_lib.flatten(repro).items()
               if not np.array_equal(v, tree_lib.flatten(fixed)[k])}
    for k, v in tree_lib.flatten(fixed["parallel"]).items():  # fixed: P's clone
        np.testing.assert_array_equal(v, tree_lib.flatten(backbone)[k])
    scorer_fixed = learner.scorer_prompt(backbone, released(), consts)
    scorer_repro = learner.scorer_prompt(backbone, released(**{option: True}), consts)
    scorer_changed = {k for k in scorer_fixed
                      if not np.array_equal(scorer_fixed[k], scorer_repro[k])}
    if option == "random_vision_deep":
        assert changed == {"parallel/vision_deep"} and not scorer_changed
        assert float(np.std(repro["parallel"]["vision_deep"])) == pytest.approx(0.02, rel=0.3)
    elif option == "random_text_deep":
        assert changed == {"parallel/text_deep"} and not scorer_changed
    else:
        assert not changed and scorer_changed == {"ctx"}
        np.testing.assert_array_equal(scorer_repro["ctx"], consts["phrase_ctx"])
    assert scorer_fixed is backbone


def test_bad_inputs_name_the_field(kd, tok, tiny_config):
    learner, params, consts = kd
    with pytest.raises(ValueError, match="needs its teacher"):
        PromptKD(tiny_config, tok, PromptKD.default_config())
    cfg = PromptKD.default_config()
    cfg.depth_vision, cfg.kd_weight = 2, 0.0
    with pytest.raises(ValueError, match="config.backbone.kd_weight=0.0"):
        PromptKD(tiny_config, tok, cfg, teacher=learner.teacher)
    cfg.kd_weight, cfg.depth_vision = 1000.0, 0
    with pytest.raises(ValueError, match="config.backbone.depth_vision=0"):
        PromptKD(tiny_config, tok, cfg, teacher=learner.teacher)
    bad = released()
    bad.released.random_ctx = True
    with pytest.raises(ValueError, match=r"config.dpc.released has unknown options \['random_ctx'\]"):
        learner.dpc_init({"backbone": {}, "parallel": {}}, bad, jax.random.key(0))
    with pytest.raises(ValueError, match="need its state"):
        learner.image_features(params, learner.init(jax.random.key(0), params), images(1), {})
