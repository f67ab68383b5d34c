"""The Flax CLIP: every config builds, parameter counts, prompt hooks, input checks, bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_clip_params
from dpc_jax.models.clip import CLIP, CONFIGS, abstract_params, get_config, normalize

# OpenAI's ViT-B/16 (clip.load("ViT-B/16"): sum of p.numel() over model.parameters()).
VIT_B16_PARAMS = 149_620_737


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def layer_norm(x, ln):
    """OpenAI's LayerNorm (epsilon 1e-5) in numpy float64, as a reference."""
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * np.asarray(ln["scale"]) + np.asarray(ln["bias"])


def token_ids(lengths, config):
    """sot, ids, eot per row (eot = the largest id), zero padding."""
    rng = np.random.RandomState(0)
    ids = np.zeros((len(lengths), config.context_length), np.int32)
    for i, length in enumerate(lengths):
        ids[i, 0] = config.vocab_size - 2
        ids[i, 1:length - 1] = rng.randint(1, config.vocab_size - 2, size=length - 2)
        ids[i, length - 1] = config.vocab_size - 1
    return ids


@pytest.fixture(scope="module")
def deep_setup():
    """A tiny CLIP with 4 blocks per tower, so depth-3 prompts leave one block untouched."""
    config = get_config("tiny", vision_layers=4, transformer_layers=4)
    return config, random_clip_params(config, seed=1)


# ----------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_named_config_builds(name):
    cfg = get_config(name)
    shapes = abstract_params(cfg)
    visual = shapes["visual"]
    p, w = cfg.vision_patch_size, cfg.vision_width
    assert visual["conv1"]["kernel"].shape == (p, p, 3, w)
    assert visual["positional_embedding"].shape == (cfg.grid_size ** 2 + 1, w)
    assert visual["proj"].shape == (w, cfg.embed_dim)
    assert sorted(visual["transformer"]) == sorted(f"resblocks_{i}"
                                                   for i in range(cfg.vision_layers))
    tw = cfg.transformer_width
    assert shapes["token_embedding"]["embedding"].shape == (cfg.vocab_size, tw)
    assert shapes["positional_embedding"].shape == (cfg.context_length, tw)
    assert shapes["text_projection"].shape == (tw, cfg.embed_dim)
    block = shapes["transformer"]["resblocks_0"]
    assert block["attn"]["in_proj"]["kernel"].shape == (tw, 3 * tw)
    assert block["mlp"]["c_fc"]["kernel"].shape == (tw, 4 * tw)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))


def test_vit_b16_parameter_count_matches_openai():
    assert n_params(abstract_params(get_config("ViT-B/16"))) == VIT_B16_PARAMS


@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-B/16", "ViT-L/14@336px"])
def test_parameter_counts_match_transformers(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from dpc_jax.convert import huggingface_config

    with torch.device("meta"):  # shapes only
        model = transformers.CLIPModel(transformers.CLIPConfig(
            **huggingface_config(get_config(name))))
    assert n_params(abstract_params(get_config(name))) == sum(
        p.numel() for p in model.parameters())


def test_unknown_config_and_bad_fields_fail_naming_them():
    with pytest.raises(ValueError, match=r"unknown CLIP architecture 'ViT-H/14'.*ViT-B/16"):
        get_config("ViT-H/14")
    with pytest.raises(ValueError, match=r"CLIPConfig.dtype='fp8'"):
        get_config("tiny", dtype="fp8")
    with pytest.raises(ValueError, match=r"image_resolution=30 is not a multiple of "
                                         r"vision_patch_size=8"):
        get_config("tiny", image_resolution=30)


# ----------------------------------------------------------------------------------------------
# Prompt hooks
# ----------------------------------------------------------------------------------------------


def test_no_prompt_paths_are_bitwise_plain_clip(tiny_config, tiny_params):
    model = CLIP(tiny_config)
    variables = {"params": tiny_params}
    ids = token_ids([2, 9, 77], tiny_config)

    plain = jax.jit(lambda v, ids: model.apply(v, ids, method="encode_text"))(variables, ids)

    @jax.jit
    def hooked(v, ids, deep):
        emb = model.apply(v, ids, method="embed_tokens")
        return model.apply(v, emb, jnp.argmax(ids, axis=-1), deep,
                           method="encode_text_embeddings")

    no_deep = np.zeros((0, 4, tiny_config.transformer_width), np.float32)
    np.testing.assert_array_equal(np.asarray(hooked(variables, ids, None)), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(hooked(variables, ids, no_deep)), np.asarray(plain))

    images = np.random.RandomState(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    image_fn = jax.jit(lambda v, x, p, d: model.apply(v, x, p, d, method="encode_image"))
    plain_img = image_fn(variables, images, None, None)
    # Zero shallow prompt tokens and zero deep layers: the plain computation.
    empty = np.zeros((0, tiny_config.vision_width), np.float32)
    np.testing.assert_array_equal(np.asarray(image_fn(variables, images, empty, None)),
                                  np.asarray(plain_img))


def test_deep_text_prompts_replace_positions_1_to_n_of_blocks_1_to_depth(deep_setup):
    config, params = deep_setup
    model = CLIP(config)
    n, width = 3, config.transformer_width
    rng = np.random.RandomState(2)
    deep = rng.standard_normal((2, n, width)).astype(np.float32)  # blocks 1 and 2; 3 untouched
    ids = token_ids([12, 20], config)
    eot = np.argmax(ids, axis=-1)
    emb = np.asarray(model.apply({"params": params}, ids, method="embed_tokens"))
    _, state = model.apply({"params": params}, emb, eot, deep, method="encode_text_embeddings",
                           capture_intermediates=True, mutable=["intermediates"])
    captured = state["intermediates"]["transformer"]

    x = emb + np.asarray(params["positional_embedding"])
    for i in range(config.transformer_layers):
        if 1 <= i <= len(deep):
            x = x.copy()
            x[:, 1:1 + n] = deep[i - 1]
        block = f"resblocks_{i}"
        # ln_1 sees the block input: it must be the previous output with exactly those slots set.
        np.testing.assert_allclose(captured[block]["ln_1"]["__call__"][0],
                                   layer_norm(x, params["transformer"][block]["ln_1"]),
                                   rtol=1e-4, atol=1e-4, err_msg=block)
        x = np.asarray(captured[block]["__call__"][0])


def test_visual_prompts_append_and_deep_prompts_replace_the_last_n(deep_setup):
    config, params = deep_setup
    model = CLIP(config)
    n, width, batch = 2, config.vision_width, 3
    rng = np.random.RandomState(3)
    images = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
    shallow = rng.standard_normal((n, width)).astype(np.float32)
    deep = rng.standard_normal((2, batch, n, width)).astype(np.float32)  # per-sample prompts

    def run(*prompts):
        return model.apply({"params": params}, images, *prompts, method="encode_image",
                           capture_intermediates=True, mutable=["intermediates"])[1][
                               "intermediates"]["visual"]

    plain = run()
    prompted = run(shallow, deep)
    tokens = config.grid_size ** 2 + 1
    ln_pre = params["visual"]["ln_pre"]
    x = np.asarray(prompted["ln_pre"]["__call__"][0])
    assert x.shape == (batch, tokens + n, width)
    # Image tokens unchanged; prompts appended after them, without positional embedding.
    np.testing.assert_allclose(x[:, :tokens], plain["ln_pre"]["__call__"][0], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(x[:, tokens:], np.broadcast_to(layer_norm(shallow, ln_pre),
                                                              (batch, n, width)),
                               rtol=1e-4, atol=1e-4)
    captured = prompted["transformer"]
    for i in range(config.vision_layers):
        if 1 <= i <= len(deep):
            x = x.copy()
            x[:, -n:] = deep[i - 1]
        block = f"resblocks_{i}"
        np.testing.assert_allclose(
            captured[block]["ln_1"]["__call__"][0],
            layer_norm(x, params["visual"]["transformer"][block]["ln_1"]),
            rtol=1e-4, atol=1e-4, err_msg=block)
        x = np.asarray(captured[block]["__call__"][0])


def test_gradients_reach_every_prompt_and_stop_at_the_causal_mask(deep_setup):
    config, params = deep_setup
    model = CLIP(config)
    variables = {"params": params}
    n = 2
    rng = np.random.RandomState(4)
    ids = token_ids([10, 30], config)
    eot = np.argmax(ids, axis=-1)
    emb = np.asarray(model.apply(variables, ids, method="embed_tokens"))
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    prompts = dict(
        ctx=rng.standard_normal((n, config.transformer_width)).astype(np.float32),
        deep_text=rng.standard_normal((3, n, config.transformer_width)).astype(np.float32),
        visual=rng.standard_normal((n, config.vision_width)).astype(np.float32),
        deep_visual=rng.standard_normal((3, n, config.vision_width)).astype(np.float32))
    direction = rng.standard_normal((2, config.embed_dim)).astype(np.float32)

    @jax.jit
    def grads(prompts, emb):
        def loss(prompts, emb):
            # CoOp-style: the learnable context replaces the embeddings after sot.
            emb = emb.at[:, 1:1 + n].set(prompts["ctx"])
            text = model.apply(variables, emb, eot, prompts["deep_text"],
                               method="encode_text_embeddings")
            image = model.apply(variables, images, prompts["visual"], prompts["deep_visual"],
                                method="encode_image")
            return jnp.sum(normalize(text) * normalize(image) * direction)
        return jax.grad(loss, argnums=(0, 1))(prompts, emb)

    g_prompts, g_emb = grads(prompts, emb)
    for name, g in g_prompts.items():
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), name
        per_slot = np.abs(g).reshape((-1,) + g.shape[-2:]).sum(-1)  # [layers, n]
        assert np.all(per_slot > 0), (name, per_slot)  # every layer, every token
    g_emb = np.abs(np.asarray(g_emb)).sum(-1)  # [N, L]
    for row, e in enumerate(eot):
        assert np.all(g_emb[row, 1 + n:e + 1] > 0)  # the tokens the EOT feature attends to
        # Tokens after EOT are padding the causal mask hides: exactly zero gradient.
        assert np.all(g_emb[row, e + 1:] == 0)
        assert np.all(g_emb[row, 1:1 + n] == 0)  # overwritten by ctx before use


# ----------------------------------------------------------------------------------------------
# Input checks and dtypes
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_fail_with_the_expected_shape(deep_setup):
    config, params = deep_setup
    model = CLIP(config)
    variables = {"params": params}
    with pytest.raises(ValueError, match=r"images of shape \(2, 64, 64, 3\).*\[N, 32, 32, 3\]"):
        model.apply(variables, np.zeros((2, 64, 64, 3), np.float32), method="encode_image")
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):  # NCHW by mistake
        model.apply(variables, np.zeros((2, 3, 32, 32), np.float32), method="encode_image")
    with pytest.raises(ValueError, match=r"token ids of shape \(2, 80\); expected \[N, L <= 77\]"):
        model.apply(variables, np.zeros((2, 80), np.int32), method="encode_text")
    with pytest.raises(ValueError, match=r"text embeddings of shape \(2, 78, 48\); expected "
                                         r"\[N, L <= 77, 48\]"):
        model.apply(variables, np.zeros((2, 78, 48), np.float32), np.array([1, 2]),
                    method="encode_text_embeddings")
    emb = np.zeros((2, 77, config.transformer_width), np.float32)
    eot = np.array([3, 5])
    with pytest.raises(ValueError, match=r"4 deep prompt layers given.*at most 3"):
        model.apply(variables, emb, eot, np.zeros((4, 2, config.transformer_width)),
                    method="encode_text_embeddings")
    with pytest.raises(ValueError, match=r"expected \[n, 48\] or \[2, n, 48\]"):
        model.apply(variables, emb, eot, np.zeros((1, 2, 64)), method="encode_text_embeddings")
    images = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="deep visual prompts need shallow visual prompts"):
        model.apply(variables, images, None, np.zeros((1, 2, 64)), method="encode_image")
    with pytest.raises(ValueError, match=r"token count must equal the 2 shallow"):
        model.apply(variables, images, np.zeros((2, 64)), np.zeros((1, 3, 64)),
                    method="encode_image")


def test_trimmed_text_context_gives_the_full_context_features_and_gradients(deep_setup):
    """Encoding only the positions up to the last EOT (`trim_context`) is exact under the causal
    mask: same features and same gradients for a shallow context and deep text prompts."""
    from dpc_jax.models.tokenizer import trim_context
    from dpc_jax.prompts.base import insert_context

    config, params = deep_setup
    model = CLIP(config)
    ids = token_ids([7, 12, 10], config)
    eot = np.argmax(ids, axis=-1)
    short = trim_context(ids, eot)
    assert short.shape == (3, 16)  # longest text 12 tokens, rounded up to a multiple of 8
    np.testing.assert_array_equal(trim_context(ids, eot, multiple=1), ids[:, :12])
    full = model.apply({"params": params}, jnp.asarray(ids), method="encode_text")
    trimmed = model.apply({"params": params}, jnp.asarray(short), method="encode_text")
    np.testing.assert_allclose(trimmed, full, rtol=1e-5, atol=1e-6)

    rng = np.random.RandomState(3)
    ctx = jnp.asarray(0.1 * rng.randn(3, config.transformer_width), jnp.float32)
    deep = jnp.asarray(0.1 * rng.randn(2, 3, config.transformer_width), jnp.float32)
    target = jnp.asarray(rng.randn(3, config.embed_dim), jnp.float32)

    def loss(ctx, deep, token_ids):
        emb = model.apply({"params": params}, jnp.asarray(token_ids), method="embed_tokens")
        feats = model.apply({"params": params}, insert_context(emb, ctx), jnp.asarray(eot), deep,
                            method="encode_text_embeddings")
        return jnp.sum(normalize(feats) * target), feats

    (v_full, f_full), g_full = jax.value_and_grad(loss, (0, 1), has_aux=True)(ctx, deep, ids)
    (v_short, f_short), g_short = jax.value_and_grad(loss, (0, 1), has_aux=True)(ctx, deep,
                                                                                 short)
    np.testing.assert_allclose(f_short, f_full, rtol=1e-5, atol=1e-6)
    assert float(v_short) == pytest.approx(float(v_full), rel=1e-5)
    for a, b in zip(g_short, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_full[1]).sum()) > 0  # the deep prompts do reach the EOT features


def test_bfloat16_compute_runs_and_stays_close(tiny_config, tiny_params):
    images = np.random.RandomState(5).standard_normal((4, 32, 32, 3)).astype(np.float32)
    ids = token_ids([5, 9, 20, 77], tiny_config)

    def features(config):
        model = CLIP(config)
        run = jax.jit(lambda v: (model.apply(v, images, method="encode_image"),
                                 model.apply(v, ids, method="encode_text"),
                                 model.apply(v, images, ids)[0]))
        return run({"params": tiny_params})

    img32, txt32, logits32 = features(tiny_config)
    img16, txt16, logits16 = features(tiny_config.replace(dtype="bfloat16"))
    assert img16.dtype == jnp.bfloat16 and txt16.dtype == jnp.bfloat16
    assert logits16.dtype == jnp.float32  # normalisation and logits in float32
    for a, b in ((img16, img32), (txt16, txt32)):
        cos = np.sum(np.asarray(normalize(a)) * np.asarray(normalize(b)), -1)
        assert np.all(cos > 0.999), cos
    # Logits carry the scale exp(logit_scale) = 1/0.07 here.
    assert np.max(np.abs(np.asarray(logits16) - np.asarray(logits32))) < 0.5
