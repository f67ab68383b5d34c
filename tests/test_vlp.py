"""IVLP and MaPLe: prompt shapes and init, insertion points, coupling, and DPC on both.

The tiny CLIP (text width 48, vision width 64: a swapped axis shows) with the world tokenizer.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax import tree as tree_lib
from dpc_jax.mesh import make_mesh, replicate, shard_batch
from dpc_jax.models.clip import CLIP
from dpc_jax.prompts import IVLP, DualPrompt, MaPLe
from dpc_jax.prompts.base import insert_context
from dpc_jax.training import masks, objectives, optim
from dpc_jax.training.step import make_per_device_step, map_step
from helpers import random_clip_params

NAMES = ["red circle", "blue star", "pink ring", "green cross", "orange dot"]


def ivlp(cfg, tok, **changes):
    c = {**IVLP.default_config().to_dict(), "depth_text": 2, "depth_vision": 2, **changes}
    return IVLP(cfg, tok, ml_collections.ConfigDict(c))


def maple(cfg, tok, **changes):
    c = {**MaPLe.default_config().to_dict(), "depth": 2, **changes}
    return MaPLe(cfg, tok, ml_collections.ConfigDict(c))


def images(cfg, n=3, seed=0):
    res = cfg.image_resolution
    return jnp.asarray(np.random.RandomState(seed).randn(n, res, res, 3), jnp.float32)


def perturbed(prompt, scale=0.3, seed=1):
    leaves, treedef = jax.tree_util.tree_flatten(prompt)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_ivlp_init_shapes_and_phrase_context(tiny_config, tiny_params, tok):
    learner = ivlp(tiny_config, tok)
    p = learner.init(jax.random.key(0), tiny_params)
    shapes = {k: v.shape for k, v in tree_lib.flatten(p).items()}
    assert shapes == {"ctx": (4, 48), "text_deep": (1, 4, 48), "vision_ctx": (4, 64),
                      "vision_deep": (1, 4, 64)}
    assert shapes == learner.expected_shapes()
    ids, _ = tok("a photo of a")
    emb = np.asarray(tiny_params["token_embedding"]["embedding"])[np.asarray(ids)[0, 1:5]]
    np.testing.assert_array_equal(np.asarray(p["ctx"]), emb)
    for leaf in ("text_deep", "vision_ctx", "vision_deep"):
        assert 0.01 < float(jnp.std(p[leaf])) < 0.04  # N(0, 0.02)
    # Depth 1: no deep leaves; depth_vision 0: no visual prompts at all (CoOp's image tower).
    shallow = ivlp(tiny_config, tok, depth_text=1, depth_vision=0)
    assert sorted(shallow.init(jax.random.key(0), tiny_params)) == ["ctx"]
    assert sorted(ivlp(tiny_config, tok, depth_vision=1).init(
        jax.random.key(0), tiny_params)) == ["ctx", "text_deep", "vision_ctx"]


def test_ivlp_features_are_the_deep_prompted_towers(tiny_config, tiny_params, tok):
    learner = ivlp(tiny_config, tok)
    p = perturbed(learner.init(jax.random.key(0), tiny_params))
    model, variables = CLIP(tiny_config), {"params": tiny_params}
    texts = learner.prepare(tiny_params, NAMES)
    ids = jnp.array([3, 0])
    got = learner.text_features(tiny_params, p, texts, ids)
    emb = insert_context(texts.embeddings[ids], p["ctx"])
    want = model.apply(variables, emb, texts.eot_indices[ids], p["text_deep"],
                       method="encode_text_embeddings")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    x = images(tiny_config)
    image = learner.image_features(tiny_params, p, x)
    np.testing.assert_array_equal(
        np.asarray(image), np.asarray(model.apply(variables, x, p["vision_ctx"],
                                                  p["vision_deep"], method="encode_image")))
    # Each leaf matters: changing any one changes the features it feeds. (A random change: a
    # constant shift of a token vector is removed by the LayerNorm that reads it.)
    for leaf, side in (("ctx", "text"), ("text_deep", "text"), ("vision_ctx", "image"),
                       ("vision_deep", "image")):
        q = dict(p, **{leaf: perturbed(p[leaf], scale=0.5, seed=4)})
        if side == "text":
            other = learner.text_features(tiny_params, q, texts, ids)
            assert not np.allclose(np.asarray(other), np.asarray(got)), leaf
        else:
            other = learner.image_features(tiny_params, q, x)
            assert not np.allclose(np.asarray(other), np.asarray(image)), leaf


def test_maple_keeps_of_a_as_word_embeddings(tiny_config, tiny_params, tok):
    learner = maple(tiny_config, tok)
    texts = learner.prepare(tiny_params, NAMES)
    ids, eot = tok([f"a photo of a {n}." for n in NAMES])
    ids = ids[:, :texts.embeddings.shape[1]]  # trim_context: every EOT inside, zeros cut
    assert texts.embeddings.shape[1] == 16 and int(np.max(eot)) < 16
    want = np.asarray(tiny_params["token_embedding"]["embedding"])[np.asarray(ids)]
    np.testing.assert_array_equal(np.asarray(texts.embeddings), want)
    np.testing.assert_array_equal(np.asarray(texts.eot_indices), np.asarray(eot))
    p = learner.init(jax.random.key(0), tiny_params)
    np.testing.assert_array_equal(np.asarray(p["ctx"]), want[0, 1:3])  # "a photo"


def test_maple_coupling_init_and_vision_prompts(tiny_config, tiny_params, tok):
    learner = maple(tiny_config, tok, depth=2)
    p = learner.init(jax.random.key(0), tiny_params)
    shapes = {k: v.shape for k, v in tree_lib.flatten(p).items()}
    assert shapes == learner.expected_shapes() == {
        "ctx": (2, 48), "text_deep": (1, 2, 48), "couple0/kernel": (48, 64),
        "couple0/bias": (64,), "couple_deep/kernel": (1, 48, 64), "couple_deep/bias": (1, 64)}
    bound = 48 ** -0.5
    for leaf in jax.tree_util.tree_leaves({k: p[k] for k in ("couple0", "couple_deep")}):
        assert float(jnp.max(jnp.abs(leaf))) <= bound
    # The deep maps start as copies of one draw (upstream clones one layer).
    deeper = maple(tiny_config, tok, depth=2)
    p = perturbed(p)
    towers = deeper.towers(p)
    np.testing.assert_allclose(np.asarray(towers["vision_ctx"]),
                               np.asarray(p["ctx"]) @ np.asarray(p["couple0"]["kernel"])
                               + np.asarray(p["couple0"]["bias"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(towers["vision_deep"][0]),
        np.asarray(p["text_deep"][0]) @ np.asarray(p["couple_deep"]["kernel"][0])
        + np.asarray(p["couple_deep"]["bias"][0]), rtol=1e-5, atol=1e-6)
    model = CLIP(tiny_config)
    x = images(tiny_config)
    want = model.apply({"params": tiny_params}, x, towers["vision_ctx"], towers["vision_deep"],
                       method="encode_image")
    np.testing.assert_array_equal(np.asarray(learner.image_features(tiny_params, p, x)),
                                  np.asarray(want))
    # The tower form is accepted as it is.
    np.testing.assert_array_equal(np.asarray(learner.image_features(tiny_params, towers, x)),
                                  np.asarray(want))


def test_deep_maps_start_equal(tiny_config, tiny_params, tok):
    cfg = tiny_config.replace(transformer_layers=3, vision_layers=3)
    params = random_clip_params(cfg)
    p = maple(cfg, tok, depth=3).init(jax.random.key(0), params)
    k = np.asarray(p["couple_deep"]["kernel"])
    assert k.shape == (2, 48, 64) and np.array_equal(k[0], k[1])
    assert not np.array_equal(k[0], np.asarray(p["couple0"]["kernel"]))


@pytest.mark.parametrize("changes, match", [
    ({"depth_text": 3}, r"depth_text=3; expected an integer in \[1, 2\] \(the text tower has 2"),
    ({"depth_vision": 5}, r"depth_vision=5; expected an integer in \[0, 2\]"),
    ({"n_ctx_text": 5}, r"5 context tokens but ctx_init='a photo of a' has 4 tokens"),
    ({"n_ctx_vision": 0}, r"n_ctx_vision=0; expected an integer >= 1"),
    ({"ctx_init": 3}, r"ctx_init=3; expected a string"),
])
def test_ivlp_config_errors_name_the_field(tiny_config, tok, changes, match):
    with pytest.raises(ValueError, match=match):
        ivlp(tiny_config, tok, **changes)


def test_maple_depth_limited_by_the_smaller_tower(tiny_config, tok):
    with pytest.raises(ValueError, match=r"config.backbone.depth=9; expected an integer in "
                                         r"\[1, 2\] \(the text tower has 2 blocks"):
        maple(tiny_config, tok, depth=9)


def test_wrong_prompt_shapes_fail_naming_the_leaf(tiny_config, tiny_params, tok):
    learner = maple(tiny_config, tok)
    p = learner.init(jax.random.key(0), tiny_params)
    bad = dict(p, couple0={"kernel": p["couple0"]["kernel"].T, "bias": p["couple0"]["bias"]})
    with pytest.raises(ValueError, match=r"prompt\['kernel'\] of shape \(64, 48\); expected "
                                         r"\(48, 64\) \(couple0: text width, vision width\)"):
        learner.image_features(tiny_params, bad, images(tiny_config))
    il = ivlp(tiny_config, tok)
    q = il.init(jax.random.key(0), tiny_params)
    with pytest.raises(ValueError, match=r"no 'vision_deep' leaf"):
        il.image_features(tiny_params, {k: v for k, v in q.items() if k != "vision_deep"},
                          images(tiny_config))


# -- DPC on both learners ---------------------------------------------------------------------


def learners(cfg, tok):
    return {"ivlp": ivlp(cfg, tok), "maple": maple(cfg, tok)}


def dpc_cfg(mode="reference", w_base=0.5, w_new=0.0):
    return ml_collections.ConfigDict({"mode": mode, "w_base": w_base, "w_new": w_new})


@pytest.mark.parametrize("name", ["ivlp", "maple"])
def test_dpc_doubles_every_leaf_and_new_prompt_is_stage1(tiny_config, tiny_params, tok, name):
    learner = learners(tiny_config, tok)[name]
    p = learner.init(jax.random.key(0), tiny_params)
    for mode in ("reference", "paper"):
        dual = DualPrompt(dpc_cfg(mode), learner.dual_rules())
        params = dual.init(p)
        assert tree_lib.leaf_paths(params["parallel"]) == tree_lib.leaf_paths(p)
        params = {"backbone": p, "parallel": perturbed(params["parallel"])}
        new = dual.eval_prompt(params, "new")
        assert new is p  # w_n = 0: the stage-1 prompt itself, so new accuracy is stage 1's
        # The converse map acts on ctx only (reference mode); the other leaves train as
        # themselves.
        train = dual.train_prompt(params)
        for k, v in tree_lib.flatten(train).items():
            theta = tree_lib.flatten(params["parallel"])[k]
            if mode == "paper" or k != "ctx":
                assert v is theta, (mode, k)
            else:
                np.testing.assert_allclose(np.asarray(v), np.asarray(
                    (theta - 0.5 * p["ctx"]) * 2.0), rtol=1e-6)


def test_maple_mixes_after_coupling(tiny_config, tiny_params, tok):
    learner = maple(tiny_config, tok)
    p = perturbed(learner.init(jax.random.key(0), tiny_params), seed=2)
    dual = DualPrompt(dpc_cfg("paper", w_base=0.3, w_new=0.1), learner.dual_rules())
    params = {"backbone": p, "parallel": perturbed(p, seed=3)}
    for split, w in (("base", 0.3), ("new", 0.1)):
        mixed = dual.eval_prompt(params, split)
        assert sorted(mixed) == ["ctx", "text_deep", "vision_ctx", "vision_deep"]
        t_new, t_old = learner.towers(params["parallel"]), learner.towers(p)
        for leaf in mixed:
            np.testing.assert_allclose(np.asarray(mixed[leaf]),
                                       w * np.asarray(t_new[leaf])
                                       + (1 - w) * np.asarray(t_old[leaf]), rtol=1e-5, atol=1e-6)
        # Not the coupling of mixed maps: F_mix(T_mix) differs (it is bilinear in the two).
        leafwise = jax.tree_util.tree_map(lambda a, b: w * a + (1 - w) * b,
                                          params["parallel"], p)
        assert not np.allclose(np.asarray(learner.towers(leafwise)["vision_ctx"]),
                               np.asarray(mixed["vision_ctx"]), atol=1e-6)
    # Reference mode: base = Q (ctx through the converse map), new at w_n > 0 also after
    # coupling.
    ref = DualPrompt(dpc_cfg("reference", w_base=0.5, w_new=0.25), learner.dual_rules())
    mixed = ref.eval_prompt(params, "new")
    t_q, t_p = learner.towers(ref.train_prompt(params)), learner.towers(p)
    np.testing.assert_allclose(np.asarray(mixed["vision_deep"]),
                               0.25 * np.asarray(t_q["vision_deep"])
                               + 0.75 * np.asarray(t_p["vision_deep"]), rtol=1e-5, atol=1e-6)


def world_consts(cfg, params, learner, n_per_class=3, seed=0):
    rng = np.random.RandomState(seed)
    c = len(NAMES)
    res = cfg.image_resolution
    labels = np.repeat(np.arange(c), n_per_class).astype(np.int32)
    table = np.arange(c * n_per_class, dtype=np.int32).reshape(c, n_per_class)
    train = {"images": jnp.asarray(rng.randint(0, 256, (len(labels), res, res, 3)), jnp.uint8),
             "labels": jnp.asarray(labels), "class_table": jnp.asarray(table),
             "class_counts": jnp.full((c,), n_per_class, jnp.int32)}
    texts = learner.prepare(params, NAMES)
    return {"clip": params, "train": train, "class_texts": texts, "learner": {}}


@pytest.mark.parametrize("name", ["ivlp", "maple"])
def test_scorer_uses_the_stage1_prompts(tiny_config, tiny_params, tok, name):
    learner = learners(tiny_config, tok)[name]
    p = perturbed(learner.init(jax.random.key(0), tiny_params), scale=0.1)
    dual = DualPrompt(dpc_cfg(), learner.dual_rules())
    consts = world_consts(tiny_config, tiny_params, learner)
    consts["scorer"] = learner.classifier(tiny_params, p, consts["class_texts"],
                                          jnp.arange(len(NAMES)))
    forward = jax.jit(objectives.dpc_objective(learner, dual, tiny_config.image_resolution, 3,
                                               "reference").forward)
    batch = {"index": jnp.array([0, 4, 8, 12], jnp.int32)}
    key = jax.random.key(5)
    start = dual.init(p)
    moved = {"backbone": p, "parallel": perturbed(start["parallel"], scale=1.0, seed=9)}
    a = forward(start, {}, consts, batch, key)
    b = forward(moved, {}, consts, batch, key)
    np.testing.assert_array_equal(np.asarray(a["scores"]), np.asarray(b["scores"]))
    np.testing.assert_array_equal(np.asarray(a["negatives"]), np.asarray(b["negatives"]))
    assert float(a["loss"]) != float(b["loss"])  # the trainable prompt does enter the loss
    # ... and the scores are the stage-1 model's: image features with P's visual prompts.
    res = tiny_config.image_resolution
    from dpc_jax.data import augment

    k_aug = jax.random.split(key, 4)[0]
    anchors = augment.random_resized_crop_flip(k_aug, consts["train"]["images"][batch["index"]],
                                               res, (0.08, 1.0))
    feats = learner.image_features(tiny_params, p, anchors)
    want = jax.nn.softmax(learner.classify(tiny_params, p, consts["scorer"], feats), -1)
    np.testing.assert_allclose(np.asarray(a["scores"]), np.asarray(want), rtol=1e-5, atol=1e-7)
    # A scorer with the unprompted image tower would rank differently here.
    plain = jax.nn.softmax(learner.classify(
        tiny_params, p, consts["scorer"], CLIP(tiny_config).apply(
            {"params": tiny_params}, anchors, method="encode_image")), -1)
    assert not np.allclose(np.asarray(plain), np.asarray(want), atol=1e-4)


@pytest.mark.parametrize("name", ["ivlp", "maple"])
def test_stage2_step_keeps_backbone_bitwise(tiny_config, tiny_params, tok, name):
    learner = learners(tiny_config, tok)[name]
    p = learner.init(jax.random.key(0), tiny_params)
    dual = DualPrompt(dpc_cfg(), learner.dual_rules())
    params = dual.init(p)
    consts = world_consts(tiny_config, tiny_params, learner)
    consts["scorer"] = learner.classifier(tiny_params, p, consts["class_texts"],
                                          jnp.arange(len(NAMES)))
    mask = masks.trainable_mask(params, DualPrompt.trainable_rules())
    tx = optim.make_optimizer(0.05, 2, 2, mask=mask, warmup_epochs=0)
    objective = objectives.dpc_objective(learner, dual, tiny_config.image_resolution, 3,
                                         "reference")
    mesh = make_mesh()
    step = map_step(make_per_device_step(objective, tx, mask), mesh, donate=False)
    state = replicate({"params": params, "opt_state": tx.init(params), "state": {}}, mesh)
    consts = replicate(consts, mesh)
    before = jax.tree_util.tree_map(np.asarray, params)
    for i in range(2):
        index = shard_batch(np.array([i, 5 + i, 10 + i], np.int32), mesh)
        state, _, _ = step(state, consts, {"index": index}, jax.random.key(i))
    after = state["params"]
    for k, v in tree_lib.flatten(before["backbone"]).items():
        assert np.array_equal(v, np.asarray(tree_lib.flatten(after["backbone"])[k])), k
    moved = [k for k, v in tree_lib.flatten(before["parallel"]).items()
             if not np.array_equal(v, np.asarray(tree_lib.flatten(after["parallel"])[k]))]
    assert moved == tree_lib.leaf_paths(before["parallel"])  # every parallel leaf trains
