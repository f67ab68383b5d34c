"""Accelerator options (`config.clip.attention`, `config.clip.remat`) against the default path.

Measured on CPU (jax 0.10.2, the tiny CLIP, float32, 'highest'): attention='dot_product' gives
the einsum path's unprompted features bitwise, prompted ones to <= 2.4e-7 and prompt gradients to
<= 4e-7 (max |difference| / max |value|, 2 and 4 blocks per tower); remat=True is bitwise equal.
The tests allow 1e-5 and bitwise."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import is_highest, precisions, random_clip_params
from dpc_jax.models.clip import CLIP, CLIPConfig, get_config, normalize
from dpc_jax.prompts.base import insert_context


def max_relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def setup():
    """The tiny CLIP (2 blocks per tower), a shallow text context, deep text prompts, visual
    prompts and deep visual prompts for block 1; texts of 7, 12 and 77 tokens."""
    config = get_config("tiny")
    params = random_clip_params(config, seed=1)
    rng = np.random.RandomState(0)
    images = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
    ids = np.zeros((3, config.context_length), np.int32)
    for i, length in enumerate([7, 12, 77]):
        ids[i, 0], ids[i, length - 1] = config.vocab_size - 2, config.vocab_size - 1
        ids[i, 1:length - 1] = rng.randint(1, config.vocab_size - 2, size=length - 2)
    w, v = config.transformer_width, config.vision_width
    prompts = tuple(jnp.asarray(0.1 * rng.randn(*shape), jnp.float32)
                    for shape in ((3, w), (1, 3, w), (2, v), (1, 2, v)))
    target = jnp.asarray(rng.randn(3, config.embed_dim), jnp.float32)

    def run(cfg):
        """(plain text and image features, prompted ones, gradients w.r.t. every prompt)."""
        model = CLIP(cfg)
        variables = {"params": params}

        def loss(prompts):
            ctx, text_deep, vis, vis_deep = prompts
            emb = model.apply(variables, ids, method="embed_tokens")
            txt = model.apply(variables, insert_context(emb, ctx), np.argmax(ids, -1), text_deep,
                              method="encode_text_embeddings")
            img = model.apply(variables, images, vis, vis_deep, method="encode_image")
            return (jnp.sum(normalize(txt) * target) + jnp.sum(normalize(img) * normalize(txt)),
                    (txt, img))

        @jax.jit
        def everything(prompts):
            plain = (model.apply(variables, ids, method="encode_text"),
                     model.apply(variables, images, method="encode_image"))
            (_, prompted), grads = jax.value_and_grad(loss, has_aux=True)(prompts)
            return plain, prompted, grads

        return everything(prompts)

    return config, run, run(config)


def test_dot_product_attention_gives_the_einsum_features_and_gradients(setup):
    config, run, (plain, prompted, grads) = setup
    plain_d, prompted_d, grads_d = run(config.replace(attention="dot_product"))
    for a, b in zip(plain_d + prompted_d, plain + prompted):  # causal text, unmasked images
        assert a.shape == b.shape and max_relative(a, b) < 1e-5
    for a, b in zip(grads_d, grads):
        assert max_relative(a, b) < 1e-5
    assert all(float(jnp.abs(g).sum()) > 0 for g in grads)  # every prompt reaches the loss


def test_remat_gives_bitwise_the_same_features_and_gradients(setup):
    config, run, reference = setup
    for a, b in zip(jax.tree_util.tree_leaves(run(config.replace(remat=True))),
                    jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(a, b)


def test_remat_keeps_the_parameter_tree_and_is_in_the_backward_pass(setup):
    from dpc_jax.models.clip import abstract_params

    config = setup[0]
    shapes = lambda c: jax.tree_util.tree_map(lambda x: x.shape, abstract_params(c))  # noqa: E731
    assert shapes(config.replace(remat=True)) == shapes(config)
    params = random_clip_params(config)
    ids = jnp.zeros((1, 8), jnp.int32).at[0, 3].set(config.vocab_size - 1)

    def grad_jaxpr(cfg):
        f = lambda p: CLIP(cfg).apply({"params": p}, ids, method="encode_text").sum()  # noqa
        return str(jax.make_jaxpr(jax.grad(f))(params))

    assert "remat" not in grad_jaxpr(config) and "remat" in grad_jaxpr(config.replace(remat=True))


def test_the_config_fields_reach_the_model_and_bad_values_are_refused(tmp_path):
    from dpc_jax.configs.base_to_new import get_config as run_config
    from dpc_jax.convert.load import load_clip_from_config
    from dpc_jax.models import checkpoint

    tiny = get_config("tiny")
    defaults = run_config().clip
    assert (defaults.attention, defaults.remat) == (tiny.attention, tiny.remat) == ("einsum",
                                                                                    False)
    checkpoint.save_clip_checkpoint(str(tmp_path / "ckpt"), tiny, random_clip_params(tiny))
    clip = ml_collections.ConfigDict({"source": str(tmp_path / "ckpt"), "dtype": "float32",
                                      "precision": "highest", "attention": "dot_product",
                                      "remat": True})
    loaded, _ = load_clip_from_config(clip)
    assert (loaded.attention, loaded.remat) == ("dot_product", True)
    clip.attention = "flash"
    with pytest.raises(ValueError, match=r"config\.clip\.attention='flash'; expected one of "
                                         r"\['cudnn', 'dot_product', 'einsum'\]"):
        load_clip_from_config(clip)
    with pytest.raises(ValueError, match=r"CLIPConfig\.attention='flash'; expected one of"):
        tiny.replace(attention="flash")
    with pytest.raises(ValueError, match=r"CLIPConfig\.remat='yes'; expected True or False"):
        CLIPConfig.from_dict({**tiny.to_dict(), "remat": "yes"})


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_dot_product_attention_matmuls_follow_the_configured_precision(precision):
    """jax's XLA attention einsums take no precision argument; ours is set around them."""
    config = get_config("tiny", attention="dot_product", precision=precision)
    params = random_clip_params(config)
    ids = jnp.zeros((1, 8), jnp.int32).at[0, 3].set(config.vocab_size - 1)
    images = jnp.zeros((1, 32, 32, 3), jnp.float32)

    def f(p):
        model = CLIP(config)
        return (model.apply({"params": p}, ids, method="encode_text").sum()
                + model.apply({"params": p}, images, method="encode_image").sum())

    found = precisions(jax.make_jaxpr(jax.grad(f))(params))
    assert len(found) >= 40  # forward and backward of both towers, attention included
    assert all(is_highest(p) == (precision == "highest") for _, p in found), found
