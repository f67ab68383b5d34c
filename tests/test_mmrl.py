"""MMRL: its initialisation, the head each class list gets, the DPC hooks (token-level mixing,
the per-branch stage-2 loss, new classes at w_n = 0), its PyTorch files both ways, and a world
run through both stages keeping MMRL's new accuracy."""

import collections
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax import tree as tree_lib
from dpc_jax.prompts import DualPrompt, LearnerContext, get_learner
from dpc_jax.prompts.mmrl import MMRL
from dpc_jax.training import dhno, train_lib
from helpers import REPO

NAMES = ["red circle", "blue star", "pink ring", "green cross"]


def learner_for(tiny_config, tok, **changes):
    return MMRL(tiny_config, tok, ml_collections.ConfigDict(
        {**MMRL.default_config().to_dict(), "n_rep_tokens": 3, "rep_dim": 8, "first_layer": 1,
         **changes}))


def trained_like(prompt, seed):
    """`prompt` moved by noise on every leaf (a stand-in for a trained prompt)."""
    leaves, tree = jax.tree_util.tree_flatten(prompt)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                               for x, k in zip(leaves, keys)])


def test_registered_with_its_own_metadata():
    assert get_learner("mmrl") is MMRL
    assert MMRL.info.display_name == "MMRL"
    d = MMRL.default_config()
    assert (d.n_rep_tokens, d.rep_dim, d.first_layer, d.alpha) == (5, 512, 6, 0.7)


def test_init_follows_the_released_code(tiny_config, tiny_params, tok):
    learner = learner_for(tiny_config, tok)
    p = learner.init(jax.random.key(0), tiny_params)
    assert {k: tuple(np.shape(v)) for k, v in tree_lib.flatten(p).items()} \
        == learner.expected_shapes()
    # One map drawn and copied to every block; bounded as torch's nn.Linear.
    for tower in ("text_maps", "vision_maps"):
        k = np.asarray(p[tower]["kernel"])
        assert k.shape[0] == 2 and np.array_equal(k[0], k[1])
        assert np.abs(k).max() <= 8 ** -0.5
    # proj_rep random (the released model never loads CLIP's proj into it), or CLIP's on demand.
    assert not np.allclose(np.asarray(p["proj_rep"]), np.asarray(tiny_params["visual"]["proj"]))
    q = learner_for(tiny_config, tok, proj_rep_init="clip").init(jax.random.key(0), tiny_params)
    np.testing.assert_array_equal(np.asarray(q["proj_rep"]),
                                  np.asarray(tiny_params["visual"]["proj"]))


def test_base_classes_get_the_fused_head_and_new_classes_the_cls_head(tiny_config, tiny_params,
                                                                       tok):
    learner = learner_for(tiny_config, tok)
    p = trained_like(learner.init(jax.random.key(0), tiny_params), 1)
    res = tiny_config.image_resolution
    images = jax.random.normal(jax.random.key(2), (3, res, res, 3))
    feats = learner.image_features(tiny_params, p, images)
    e = tiny_config.embed_dim
    ids = jnp.arange(len(NAMES))
    t = np.asarray(learner.classifier(tiny_params, p, learner.prepare(tiny_params, NAMES),
                                      ids))[:, :e]
    v_c = np.asarray(feats[:, :e]) / np.linalg.norm(feats[:, :e], axis=-1, keepdims=True)
    v_r = np.asarray(feats[:, e:]) / np.linalg.norm(feats[:, e:], axis=-1, keepdims=True)
    cls, rep = 100 * v_c @ t.T, 100 * v_r @ t.T
    for new, want in ((False, 0.7 * cls + 0.3 * rep), (True, cls)):
        texts = learner.prepare(tiny_params, NAMES, new_classes=new)
        w = learner.classifier(tiny_params, p, texts, ids)
        got = learner.classify(tiny_params, p, w, feats)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    assert np.abs(cls - rep).max() > 1.0  # the two heads differ, so the check decides


def test_fields_are_checked(tiny_config, tok):
    cases = {"first_layer": (0, r"first_layer=0; expected an integer in \[1, 2\]"),
             "alpha": (1.5, r"alpha=1.5; expected a number in \[0.0, 1.0\]"),
             "template": ("a photo", r"template='a photo'; expected a string with exactly one"),
             "dpc_mix": ("both", r"dpc_mix='both'; allowed values"),
             "proj_rep_init": ("zeros", r"proj_rep_init='zeros'; allowed values")}
    for field, (value, message) in cases.items():
        with pytest.raises(ValueError, match=r"config\.backbone\." + message):
            learner_for(tiny_config, tok, **{field: value})


# -- DPC -------------------------------------------------------------------------------------------


def dual_for(learner, mode="paper", w_base=0.3, w_new=0.0):
    return DualPrompt(ml_collections.ConfigDict({"mode": mode, "w_base": w_base,
                                                 "w_new": w_new}), learner.dual_rules())


def test_dpc_mixes_the_tokens_entering_the_towers(tiny_config, tiny_params, tok):
    learner = learner_for(tiny_config, tok)
    p = learner.init(jax.random.key(0), tiny_params)
    dual = dual_for(learner, w_base=0.3, w_new=0.0)
    params = dual.init(p)
    params["parallel"] = trained_like(params["parallel"], 5)
    # New classes at w_n = 0: P itself (so MMRL's new accuracy, bit for bit).
    assert dual.eval_prompt(params, "new") is params["backbone"]
    base = dual.eval_prompt(params, "base")
    tb, tp = learner.towers(params["backbone"]), learner.towers(params["parallel"])
    for leaf in ("text_tokens", "vision_tokens", "proj_rep"):
        np.testing.assert_allclose(np.asarray(base[leaf]),
                                   0.3 * np.asarray(tp[leaf]) + 0.7 * np.asarray(tb[leaf]),
                                   rtol=1e-5, atol=1e-6)
    # Parameter-level mixing differs by the cross term w(1-w)(W'-W)(R'-R).
    plain = dual_for(learner_for(tiny_config, tok, dpc_mix="parameters"), w_base=0.3)
    mixed = learner.towers(plain.eval_prompt(params, "base"))
    assert np.abs(np.asarray(mixed["text_tokens"]) - np.asarray(base["text_tokens"])).max() > 1e-3
    # Reference mode's converse map acts on R only.
    ref = dual_for(learner, mode="reference", w_base=0.5)
    q = ref.train_prompt(params)
    np.testing.assert_allclose(np.asarray(q["rep_tokens"]), (np.asarray(
        params["parallel"]["rep_tokens"]) - 0.5 * np.asarray(p["rep_tokens"])) * 2.0, rtol=1e-6)
    assert q["proj_rep"] is params["parallel"]["proj_rep"]


def test_stage2_loss_is_one_infonce_per_branch(tiny_config, tiny_params, tok):
    rng = np.random.RandomState(0)
    m, e = 6, tiny_config.embed_dim
    feats = jnp.asarray(rng.standard_normal((m, 2 * e)), jnp.float32)
    t = rng.standard_normal((m, e))
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    slot = jnp.asarray(np.concatenate([t, np.full((m, 1), 0.7)], -1), jnp.float32)
    valid = jnp.asarray([True, True, False, True, True, True])
    v = np.asarray(feats)
    cos = lambda a: 100 * (a / np.linalg.norm(a, axis=-1, keepdims=True)) @ t.T  # noqa: E731
    cls, rep = jnp.asarray(cos(v[:, :e])), jnp.asarray(cos(v[:, e:]))
    for option, want in (
            ("branches", 0.7 * dhno.symmetric_infonce(cls, valid)
             + 0.3 * dhno.symmetric_infonce(rep, valid)),
            ("fused", dhno.symmetric_infonce(0.7 * cls + 0.3 * rep, valid))):
        learner = learner_for(tiny_config, tok, dpc_loss=option)
        got = learner.pair_loss(tiny_params, {}, feats, slot, valid, {},
                                dhno.symmetric_infonce)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_constants_are_the_templates_frozen_features(tiny_config, tiny_params, tok):
    learner = learner_for(tiny_config, tok, template="a drawing of a {}.")
    g = np.asarray(learner.constants(tiny_params, LearnerContext(
        "world", tuple(NAMES), ("a photo of a {}.",)))["text_target"])
    ids, _ = tok([f"a drawing of a {NAMES[2]}."])
    f = np.asarray(learner.model.apply({"params": tiny_params}, jnp.asarray(ids),
                                       method="encode_text"))[0]
    np.testing.assert_allclose(g[2], f / np.linalg.norm(f), rtol=1e-5, atol=1e-6)


# -- PyTorch files ---------------------------------------------------------------------------------


def released_state_dict(torch, learner, prompt):
    """What the released trainer saves: the whole CustomCLIP (here a few frozen CLIP keys and
    the template embeddings stand for it) with the representation learner and proj_rep."""
    rl = "representation_learner."
    state = collections.OrderedDict()
    state["prompt_embeddings"] = torch.randn(4, 77, learner.text_width)
    state[rl + "compound_rep_tokens"] = torch.from_numpy(np.array(prompt["rep_tokens"]))
    for tower, letter in (("text_maps", "t"), ("vision_maps", "v")):
        for i in range(learner.rep_layers):
            key = f"{rl}compound_rep_tokens_r2{letter}proj.{i}."
            state[key + "weight"] = torch.from_numpy(
                np.asarray(prompt[tower]["kernel"][i]).T.copy())
            state[key + "bias"] = torch.from_numpy(np.array(prompt[tower]["bias"][i]))
    state["image_encoder.proj_rep"] = torch.from_numpy(np.array(prompt["proj_rep"]))
    state["image_encoder.proj"] = torch.randn(learner.vision_width, learner.embed_dim)
    state["image_encoder.conv1.weight"] = torch.randn(learner.vision_width, 3, 8, 8)
    state["text_encoder.text_projection"] = torch.randn(learner.text_width, learner.embed_dim)
    return state


def test_reads_and_writes_the_released_checkpoint_layout(tiny_config, tiny_params, tok,
                                                         tmp_path):
    torch = pytest.importorskip("torch")
    learner = learner_for(tiny_config, tok)
    prompt = jax.tree_util.tree_map(np.asarray, trained_like(
        learner.init(jax.random.key(0), tiny_params), 3))
    path = tmp_path / "run" / "MultiModalRepresentationLearner" / "model.pth.tar-10"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": released_state_dict(torch, learner, prompt), "epoch": 10,
                "optimizer": None, "scheduler": None, "val_result": None}, str(path))
    loaded = learner.load_torch_prompt(str(path))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                           loaded, prompt)
    # Ours -> torch: the released keys and [out, in] weights, read back by torch itself.
    out = learner.export_torch_prompt(loaded, str(tmp_path / "out"), 10)
    assert out.endswith(os.path.join("MultiModalRepresentationLearner", "model.pth.tar-10"))
    written = torch.load(out, weights_only=True)["state_dict"]
    want = released_state_dict(torch, learner, prompt)
    keys = [k for k in want if k.startswith("representation_learner.")
            or k == "image_encoder.proj_rep"]
    assert sorted(written) == sorted(keys)
    for k in keys:
        assert written[k].dtype == torch.float32
        np.testing.assert_array_equal(written[k].numpy(), want[k].numpy())
    again = learner.load_torch_prompt(out)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                           again, prompt)


def test_a_checkpoint_of_another_config_is_refused_with_its_keys(tiny_config, tiny_params, tok,
                                                                 tmp_path):
    torch = pytest.importorskip("torch")
    learner = learner_for(tiny_config, tok)
    prompt = learner.init(jax.random.key(0), tiny_params)
    state = released_state_dict(torch, learner, prompt)
    path = str(tmp_path / "model.pth.tar-10")
    torch.save({"state_dict": state, "epoch": 10}, path)
    with pytest.raises(ValueError) as info:
        learner_for(tiny_config, tok, rep_dim=16).load_torch_prompt(path)
    message = str(info.value)
    assert "rep_dim=16" in message and "mis-shaped keys" in message
    assert "representation_learner.compound_rep_tokens: file (3, 8), expected (3, 16)" in message
    with pytest.raises(ValueError, match=r"missing keys: \[.*r2tproj\.1\.weight"):
        learner_for(tiny_config, tok, first_layer=1, n_rep_tokens=3).load_torch_prompt(
            _without(torch, state, "representation_learner.compound_rep_tokens_r2tproj.1.",
                     tmp_path))


def _without(torch, state, prefix, tmp_path):
    path = str(tmp_path / "cut.pth.tar-1")
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith(prefix)},
                "epoch": 1}, path)
    return path


# -- a world run through both stages -------------------------------------------------------------


def test_world_run_dpc_keeps_mmrls_new_accuracy(tmp_path):
    c = train_lib.load_config(os.path.join(REPO, "configs", "dpc_mmrl.py"))
    c.shots, c.progress = 2, False
    c.backbone.epochs, c.backbone.batch_size = 2, 16
    c.batch_size, c.dhno.top_k, c.dpc.epochs, c.dpc.lr = 4, 4, 2, 0.05
    c.optim.warmup_epochs = 0
    results = train_lib.train_and_evaluate(c, str(tmp_path))
    assert results["dpc"]["new"] == results["backbone"]["new"]
    assert results["backbone"]["base"] != results["zeroshot"]["base"]
    assert results["dpc"]["base"] != results["backbone"]["base"]
    # Stage 1 to PyTorch (config.mode=export) and back as backbone.init_from: the same accuracy.
    paths = train_lib.export_backbone(c, str(tmp_path))
    assert len(paths) == 1 and "MultiModalRepresentationLearner" in paths[0]
    c.backbone.init_from, c.stages = paths[0], "backbone"
    imported = train_lib.train_and_evaluate(c, str(tmp_path / "imported"))
    assert imported["backbone"] == results["backbone"]
