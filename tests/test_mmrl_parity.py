"""MMRL parity with PyTorch: the learner's features of both branches and its stage-1 loss against
a transcription of the released forward and loss (tests/torch_mmrl.py) on OpenAI's clip/model.py,
with the same random weights read through `load_openai_checkpoint`.

Features must agree to a max relative error of 1e-5 (float32, matmul precision 'highest'); the
loss to 1e-5 relative. Every trainable leaf (R, each block's text and vision map, proj_rep) is
perturbed once on the reference side and must move its features by far more than the tolerance,
so a leaf the learner dropped or misplaced would fail the comparison.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dpc_jax.prompts.mmrl import MMRL, RepTexts  # noqa: E402
from helpers import max_rel_err  # noqa: E402
from torch_deep_prompts import TINY, converted, prompted_token_ids  # noqa: E402
import torch_mmrl  # noqa: E402

TOLERANCE = 1e-5
MIN_EFFECT = 1e-3
FIRST_LAYER = 2  # of 4 blocks: one insertion and two overwrites
N_REP, REP_DIM, ALPHA, LAM = 3, 16, 0.7, 1.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    model, config, params = converted(TINY, seed=3, directory=tmp_path_factory.mktemp("mmrl"))
    learner = MMRL(config, tok, ml_collections.ConfigDict({
        **MMRL.default_config().to_dict(), "n_rep_tokens": N_REP, "rep_dim": REP_DIM,
        "first_layer": FIRST_LAYER, "alpha": ALPHA, "reg_weight": LAM}))
    rng = np.random.RandomState(5)
    n_layers = learner.rep_layers
    draw = lambda scale, *shape: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa
    tw, vw, e = config.transformer_width, config.vision_width, config.embed_dim
    # Distinct maps per block (the released init copies one; distinct ones show a block mix-up).
    prompt = {"rep_tokens": draw(0.5, N_REP, REP_DIM),
              "text_maps": {"kernel": draw(0.3, n_layers, REP_DIM, tw),
                            "bias": draw(0.3, n_layers, tw)},
              "vision_maps": {"kernel": draw(0.3, n_layers, REP_DIM, vw),
                              "bias": draw(0.3, n_layers, vw)},
              "proj_rep": draw(vw ** -0.5, vw, e)}
    return model, config, params, learner, prompt


def torch_side(prompt):
    """The released RepresentationLearner holding `prompt`, and proj_rep as a tensor."""
    n_layers, d, _ = prompt["text_maps"]["kernel"].shape
    rl = torch_mmrl.RepresentationLearner(prompt["rep_tokens"].shape[0], d,
                                          prompt["text_maps"]["kernel"].shape[2],
                                          prompt["vision_maps"]["kernel"].shape[2], n_layers)
    with torch.no_grad():
        rl.compound_rep_tokens.copy_(torch.from_numpy(prompt["rep_tokens"]))
        for tower, mods in (("text_maps", rl.compound_rep_tokens_r2tproj),
                            ("vision_maps", rl.compound_rep_tokens_r2vproj)):
            for i, lin in enumerate(mods):
                lin.weight.copy_(torch.from_numpy(prompt[tower]["kernel"][i].T.copy()))
                lin.bias.copy_(torch.from_numpy(prompt[tower]["bias"][i]))
    return rl, torch.from_numpy(prompt["proj_rep"])


def reference(model, prompt, images, ids):
    rl, proj_rep = torch_side(prompt)
    rep_layers = list(range(FIRST_LAYER, TINY["transformer_layers"] + 1))
    with torch.no_grad():
        out = torch_mmrl.forward(model, rl, proj_rep, torch.from_numpy(
            images.transpose(0, 3, 1, 2).copy()), ids, rep_layers, ALPHA)
    return [o.numpy() for o in out]


def inputs(config, params, learner, seed, n_images=3, n_texts=4):
    rng = np.random.RandomState(seed)
    res = config.image_resolution
    images = rng.standard_normal((n_images, res, res, 3)).astype(np.float32)
    ids = prompted_token_ids(n_texts, 2, config.vocab_size, rng)
    emb = learner.model.apply({"params": params}, jnp.asarray(ids), method="embed_tokens")
    texts = RepTexts(embeddings=emb, eot_indices=jnp.asarray(ids.argmax(-1), jnp.int32),
                     fusion=jnp.full((n_texts,), ALPHA, jnp.float32))
    return images, ids, texts


def ours(learner, params, prompt, images, texts):
    v_c, v_r = learner.branch_features(params, prompt, jnp.asarray(images))
    t = learner.text_features(params, prompt, texts, jnp.arange(texts.num_classes))
    return [np.asarray(x) for x in (v_c, v_r, t)]


def perturbed(prompt, path, index=None):
    out = jax.tree_util.tree_map(np.array, prompt)
    node = out
    for key in path[:-1]:
        node = node[key]
    leaf = node[path[-1]]
    target = leaf[index] if index is not None else leaf
    # Random, not a constant shift: a token moved along (1, ..., 1) is invisible behind the
    # LayerNorms.
    noise = np.random.RandomState(len(path)).standard_normal(target.shape)
    target += (0.5 * np.abs(target).mean() + 0.1) * noise.astype(np.float32)
    return out


def test_features_of_both_branches_match_the_released_forward(setup):
    model, config, params, learner, prompt = setup
    images, ids, texts = inputs(config, params, learner, seed=1)
    v_c, v_r, t = ours(learner, params, prompt, images, texts)
    ref = reference(model, prompt, images, ids)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    errors = {"v_c": max_rel_err(norm(v_c), ref[3]), "t": max_rel_err(norm(t), ref[4]),
              "v_r": max_rel_err(norm(v_r), ref[5])}
    # The heads as the evaluator forms them: fused for the base classes.
    w = learner.classifier(params, prompt, texts, jnp.arange(texts.num_classes))
    fused = np.asarray(learner.classify(params, prompt, w, jnp.concatenate(
        [jnp.asarray(v_c), jnp.asarray(v_r)], -1)))
    errors["fused logits"] = max_rel_err(fused, ref[2])
    effects = {}
    n_layers = learner.rep_layers
    cases = [(("rep_tokens",), None), (("proj_rep",), None)] + [
        ((tower, part), i) for tower in ("text_maps", "vision_maps")
        for part in ("kernel", "bias") for i in range(n_layers)]
    for path, index in cases:
        other = reference(model, perturbed(prompt, path, index), images, ids)
        effects["/".join(path) + ("" if index is None else f"[{index}]")] = max(
            max_rel_err(other[k], ref[k]) for k in (3, 4, 5))
    print("\n[MMRL parity] max relative error: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
          + "; smallest move of the reference by a perturbed leaf: "
          + f"{min(effects.values()):.2e}")
    assert all(e <= TOLERANCE for e in errors.values()), errors
    assert all(e >= MIN_EFFECT for e in effects.values()), effects


def test_trimmed_texts_give_the_full_length_features(setup, tok):
    """Class texts cut after their last EOT (`trim_context`) encode as the 77-token ones with
    the K tokens inserted (the causal mask hides everything after the EOT)."""
    _, config, params, learner, prompt = setup
    names = ["red circle", "blue star"]
    full = MMRL(config.replace(trim_text=False), tok, learner.config)
    a = full.text_features(params, prompt, full.prepare(params, names), jnp.arange(2))
    b = learner.text_features(params, prompt, learner.prepare(params, names), jnp.arange(2))
    assert learner.prepare(params, names).embeddings.shape[1] < 77
    assert max_rel_err(b, a) <= TOLERANCE


def test_loss_matches_the_released_forward_backward(setup):
    model, config, params, learner, prompt = setup
    images, ids, texts = inputs(config, params, learner, seed=2, n_images=4)
    labels = np.array([0, 3, 1, 3])
    with torch.no_grad():
        nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        z = model.encode_image(nchw)
        z = z / z.norm(dim=-1, keepdim=True)
        g = model.encode_text(torch.from_numpy(ids))
        g = g / g.norm(dim=-1, keepdim=True)
        logits, logits_rep, _, v, t, _ = (torch.from_numpy(x) for x in
                                          reference(model, prompt, images, ids))
        want = float(torch_mmrl.mmrl_loss(logits, logits_rep, v, t, z, g,
                                          torch.from_numpy(labels), LAM, ALPHA))
    consts = {"text_target": jnp.asarray(g.numpy())}
    got, terms, _ = learner.loss(params, prompt, {}, consts, texts, jnp.asarray(images),
                                 jnp.asarray(labels), jax.random.key(0))
    print(f"\n[MMRL loss parity] ours {float(got):.7f} released {want:.7f}")
    assert abs(float(got) - want) <= 1e-5 * abs(want)
    # Both regularisers are live (the image one is small: few blocks take the tokens here).
    assert float(terms["reg_image"]) > 1e-6 and float(terms["reg_text"]) > 1e-3
