"""Deep-prompt parity with PyTorch: dpc_jax's prompt hooks against IVLP/MaPLe's forward.

The reference (tests/torch_deep_prompts.py) runs OpenAI's clip/model.py block by block and
inserts the prompts as the upstream IVLP and MaPLe code does. Random OpenAI models are saved
as .pt state dicts and read through `load_openai_checkpoint`, the loader users call; the same
prompt arrays go to both sides. Image and text features must agree to a max relative error
(max|a - b| / max|b|) of 1e-5 in float32 with matmul precision 'highest'. Run with `pytest -s`
to see the achieved figures.

That the no-prompt paths are bitwise plain CLIP is tested in test_clip.py; here the reference
itself is checked against OpenAI's own forward, and every case asserts that its deep prompts
change the features (by far more than the tolerance), so a hook that dropped or misplaced them
would fail.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dpc_jax.models.clip import CLIP  # noqa: E402
from dpc_jax.prompts.base import insert_context  # noqa: E402
from helpers import max_rel_err  # noqa: E402
from torch_deep_prompts import (TINY, converted, encode_image_prompted,  # noqa: E402
                                encode_text_prompted, prompted_token_ids)

TOLERANCE = 1e-5
# Changing the deep prompts (dropping them, reversing their block order) must move the
# reference features by at least this much, or the parity figures would prove nothing.
MIN_EFFECT = 1e-3

# Widths are multiples of 64: OpenAI's heads = width // 64 rule then holds on both towers.
# Four blocks per tower, so depth-3 prompts leave the last block untouched.
VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
               vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
               transformer_heads=8, transformer_layers=12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return converted(TINY, seed=1, directory=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    return converted(VIT_B16, seed=2, directory=tmp_path_factory.mktemp("vit_b16"))


@functools.lru_cache(maxsize=None)
def jax_encoders(config):
    model = CLIP(config)

    @jax.jit
    def encode(params, images, ids, ctx, text_deep, visual, visual_deep):
        variables = {"params": params}
        image = model.apply(variables, images, visual, visual_deep, method="encode_image")
        emb = insert_context(model.apply(variables, ids, method="embed_tokens"), ctx)
        text = model.apply(variables, emb, jnp.argmax(ids, axis=-1), text_deep,
                           method="encode_text_embeddings")
        return image, text

    return encode


def check_case(name, setup, prompts, n_images, n_texts, seed, changes=("none", "reversed")):
    """Parity of image and text features for one prompt set, plus the effect on the reference
    of each of `changes` to its deep prompts: 'none' drops them, 'reversed' reverses their
    block order."""
    model, config, params = setup
    rng = np.random.RandomState(seed)
    res = config.image_resolution
    images = rng.standard_normal((n_images, res, res, 3)).astype(np.float32)
    ids = prompted_token_ids(n_texts, prompts["ctx"].shape[0], config.vocab_size, rng)
    nchw = images.transpose(0, 3, 1, 2).copy()

    def reference(text_deep, visual_deep):
        return (encode_image_prompted(model, nchw, prompts["visual"], visual_deep),
                encode_text_prompted(model, ids, prompts["ctx"], text_deep))

    ref_img, ref_txt = reference(prompts["text_deep"], prompts["visual_deep"])
    img, txt = jax_encoders(config)(params, images, ids.astype(np.int32), prompts["ctx"],
                                    prompts["text_deep"], prompts["visual"],
                                    prompts["visual_deep"])
    errors = dict(image=max_rel_err(img, ref_img), text=max_rel_err(txt, ref_txt))

    changed = {"none": ((), ()),
               "reversed": (prompts["text_deep"][::-1], prompts["visual_deep"][::-1])}
    effects = {}
    for change in changes:
        other_img, other_txt = reference(*changed[change])
        effects[f"image/{change}"] = max_rel_err(other_img, ref_img)
        effects[f"text/{change}"] = max_rel_err(other_txt, ref_txt)
    print(f"\n[deep-prompt parity {name}] max relative error: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
          + "; reference moved by changed deep prompts: "
          + ", ".join(f"{k} {v:.2e}" for k, v in effects.items()))
    assert all(e <= TOLERANCE for e in errors.values()), errors
    assert all(e >= MIN_EFFECT for e in effects.values()), effects


def ivlp_prompts(config, n_text, n_visual, depth_text, depth_visual, rng):
    """IVLP's leaves: ctx (here random, upstream the phrase's embeddings) and N(0, 0.02) for
    the text deep, visual and visual deep prompts."""
    tw, vw = config.transformer_width, config.vision_width
    draw = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    return dict(ctx=draw(n_text, tw), text_deep=draw(depth_text - 1, n_text, tw),
                visual=draw(n_visual, vw), visual_deep=draw(depth_visual - 1, n_visual, vw))


def test_reference_without_prompts_is_openai_forward(tiny):
    """The hand-written block loop, given no prompts, is OpenAI's forward bit for bit."""
    model = tiny[0]
    rng = np.random.RandomState(0)
    images = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = prompted_token_ids(3, 2, TINY["vocab_size"], rng)
    with torch.no_grad():
        np.testing.assert_array_equal(encode_image_prompted(model, images),
                                      model.encode_image(torch.from_numpy(images)).numpy())
        np.testing.assert_array_equal(encode_text_prompted(model, ids),
                                      model.encode_text(torch.from_numpy(ids)).numpy())


@pytest.mark.parametrize("n_text,n_visual", [(2, 2), (4, 4), (2, 4)])
def test_deep_prompt_parity_tiny(tiny, n_text, n_visual):
    rng = np.random.RandomState(10 * n_text + n_visual)
    prompts = ivlp_prompts(tiny[1], n_text, n_visual, 3, 3, rng)
    check_case(f"tiny n={n_text}+{n_visual} depth 3/3", tiny, prompts, n_images=3, n_texts=4,
               seed=n_text + n_visual)


def test_ivlp_parity_vit_b16(vit_b16):
    """IVLP 4+4, depth 9/9 (the PromptSRC/DPC setting)."""
    prompts = ivlp_prompts(vit_b16[1], 4, 4, 9, 9, np.random.RandomState(1))
    check_case("ViT-B/16 IVLP 4+4 depth 9/9", vit_b16, prompts, n_images=2, n_texts=3, seed=1,
               changes=("none",))  # the block order is checked at the tiny size


def test_maple_parity_vit_b16(vit_b16):
    """MaPLe n=2, depth 9: the visual prompts are affine images of the text prompts
    (V_0 = F_0(ctx), V_i = F_i(T_i)), computed outside CLIP and passed as 768-wide arrays."""
    config = vit_b16[1]
    tw, vw = config.transformer_width, config.vision_width
    rng = np.random.RandomState(2)
    ctx = (0.02 * rng.standard_normal((2, tw))).astype(np.float32)
    text_deep = (0.02 * rng.standard_normal((8, 2, tw))).astype(np.float32)
    bound = tw ** -0.5  # PyTorch's nn.Linear default init
    kernels = rng.uniform(-bound, bound, (9, tw, vw)).astype(np.float32)
    biases = rng.uniform(-bound, bound, (9, 1, vw)).astype(np.float32)
    visual = ctx @ kernels[0] + biases[0]
    visual_deep = np.einsum("knt,ktv->knv", text_deep, kernels[1:]) + biases[1:]
    prompts = dict(ctx=ctx, text_deep=text_deep, visual=visual.astype(np.float32),
                   visual_deep=visual_deep.astype(np.float32))
    check_case("ViT-B/16 MaPLe n=2 depth 9", vit_b16, prompts, n_images=2, n_texts=3, seed=2,
               changes=("none",))
