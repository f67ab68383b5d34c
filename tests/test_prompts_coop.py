"""CoOp prompt learner: text equivalence, class subsets, gradients, CSC, config errors, and
loading PyTorch CoOp checkpoints."""

import collections
import re
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax.models import clip as clip_lib
from dpc_jax.models.tokenizer import Tokenizer, trim_context
from dpc_jax.prompts import CoOp, build_learner, get_learner, learner_names
from dpc_jax.prompts.base import classification_logits, cross_entropy
from dpc_jax.convert.coop_torch import load_coop_torch_checkpoint

from helpers import random_clip_params, write_tiny_vocab

CLASSNAMES = ["dog", "cat", "golden_retriever", "photo", "big cat"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # 'big' and 'retriever' stay unmerged: multi-token words.
    out = write_tiny_vocab(tmp_path_factory.mktemp("vocab"), ["photo", "of", "dog", "cat",
                                                              "golden"])
    return Tokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def clip_setup():
    # One block per tower keeps compilation short; CoOp's text path does not depend on depth.
    config = clip_lib.get_config("tiny", vision_layers=1, transformer_layers=1)
    return config, random_clip_params(config)


def coop_config(**changes):
    # A fresh ConfigDict, so fields may take values of other types (to test their errors).
    return ml_collections.ConfigDict({**CoOp.default_config().to_dict(), **changes})


def encode_plain_text(config, params, tokenizer, texts, trim=True):
    """CLIP's plain text features; `trim`: over the positions the learners encode
    (`trim_context`, which is exact: the bitwise checks then compare the same ops)."""
    ids, eot = tokenizer(texts)
    if trim:
        ids = trim_context(ids, eot)
    return clip_lib.CLIP(config).apply({"params": params}, jnp.asarray(ids), method="encode_text")


def test_trim_text_false_encodes_all_positions_with_the_same_features(tokenizer, clip_setup):
    config, params = clip_setup
    features = {}
    for trim in (True, False):
        learner = build_learner(config.replace(trim_text=trim), tokenizer, coop_config())
        texts = learner.prepare(params, CLASSNAMES)
        length = texts.embeddings.shape[1]
        if trim:  # the multiple of 8 just above the longest text's EOT
            assert length % 8 == 0 and length - 8 <= int(np.max(texts.eot_indices)) < length
        else:
            assert length == config.context_length
        prompt = learner.init(jax.random.key(0), params)
        features[trim] = np.asarray(learner.text_features(params, prompt, texts,
                                                          jnp.arange(len(CLASSNAMES))))
    np.testing.assert_allclose(features[True], features[False], rtol=1e-5, atol=1e-6)
    untrimmed = encode_plain_text(config, params, tokenizer,
                                  [f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES],
                                  trim=False)
    np.testing.assert_array_equal(features[False], np.asarray(untrimmed))  # bitwise, 77 tokens


def test_word_init_prompt_equals_plain_text(tokenizer, clip_setup):
    config, params = clip_setup
    learner = build_learner(config, tokenizer, coop_config())
    assert learner.n_ctx == 4 and not learner.uses_image_prompts
    prompt = learner.init(jax.random.key(0), params)
    class_texts = learner.prepare(params, CLASSNAMES)
    ids = jnp.arange(len(CLASSNAMES))
    plain = [f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES]
    expected = encode_plain_text(config, params, tokenizer, plain)
    got = learner.text_features(params, prompt, class_texts, ids)
    assert got.shape == (len(CLASSNAMES), config.embed_dim)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))  # same ops, bitwise
    jitted = jax.jit(learner.text_features)(params, prompt, class_texts, ids)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(expected), rtol=1e-5, atol=1e-6)
    # A different context gives different features (the prompt is really used). A random
    # perturbation: a constant shift of every token vector is removed by LayerNorm.
    noise = 0.1 * jax.random.normal(jax.random.key(9), prompt["ctx"].shape)
    other = jax.jit(learner.text_features)(params, {"ctx": prompt["ctx"] + noise}, class_texts, ids)
    assert np.abs(np.asarray(other) - np.asarray(expected)).max() > 1e-3


def test_ctx_init_counts_bpe_tokens(tokenizer, clip_setup):
    config, params = clip_setup
    # "a big photo": 'big' is three BPE tokens here, so n_ctx = 5.
    with pytest.raises(ValueError, match=r"config\.backbone\.n_ctx=3 .* has 5 tokens"):
        CoOp(config, tokenizer, coop_config(ctx_init="a big photo", n_ctx=3))
    learner = CoOp(config, tokenizer, coop_config(ctx_init="a big photo", n_ctx=5))
    prompt = learner.init(jax.random.key(0), params)
    class_texts = learner.prepare(params, ["dog"])
    got = jax.jit(learner.text_features)(params, prompt, class_texts, jnp.array([0]))
    expected = encode_plain_text(config, params, tokenizer, ["a big photo dog."])
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_random_init(tokenizer, clip_setup):
    config, params = clip_setup
    learner = CoOp(config, tokenizer, coop_config(ctx_init="", n_ctx=16))
    a = learner.init(jax.random.key(1), params)["ctx"]
    b = learner.init(jax.random.key(1), params)["ctx"]
    c = learner.init(jax.random.key(2), params)["ctx"]
    assert a.shape == (16, config.transformer_width) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert 0.017 < float(jnp.std(a)) < 0.023  # N(0, 0.02), 768 samples
    # Placeholder ids sit at positions 1..16; class tokens follow.
    texts = learner.prepare(params, ["dog"])
    ids, eot = tokenizer(["X " * 16 + "dog."])
    assert int(texts.eot_indices[0]) == int(eot[0]) == 1 + 16 + 2


def test_subset_of_classes_equals_rows(tokenizer, clip_setup):
    config, params = clip_setup
    learner = CoOp(config, tokenizer, coop_config(ctx_init=""))
    prompt = learner.init(jax.random.key(3), params)
    class_texts = learner.prepare(params, CLASSNAMES)
    full = np.asarray(jax.jit(learner.text_features)(params, prompt, class_texts,
                                            jnp.arange(len(CLASSNAMES))))
    subset = jnp.array([4, 0, 2, 2])
    got = np.asarray(jax.jit(learner.text_features)(params, prompt, class_texts, subset))
    np.testing.assert_allclose(got, full[np.asarray(subset)], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="class_ids must be a 1-D integer array"):
        learner.text_features(params, prompt, class_texts, jnp.zeros((2, 2), jnp.int32))


def test_gradients_reach_the_context_only(tokenizer, clip_setup):
    config, params = clip_setup
    learner = CoOp(config, tokenizer, coop_config())
    prompt = learner.init(jax.random.key(0), params)
    class_texts = learner.prepare(params, CLASSNAMES)
    images = jax.random.normal(jax.random.key(5), (3, 32, 32, 3))
    labels = jnp.array([0, 2, 4])

    def loss(prompt, class_texts):
        return cross_entropy(classification_logits(learner, params, prompt, class_texts, images),
                             labels)

    def loss_of_embeddings(prompt, embeddings):
        return loss(prompt, class_texts.replace(embeddings=embeddings))

    g_prompt, g_emb = jax.jit(jax.grad(loss_of_embeddings, argnums=(0, 1)))(
        prompt, class_texts.embeddings)
    g_ctx = np.asarray(g_prompt["ctx"])
    assert np.isfinite(g_ctx).all() and np.abs(g_ctx).min() > 0
    g_emb = np.asarray(g_emb)
    # Placeholder embeddings are replaced by ctx: no gradient flows to them...
    assert np.all(g_emb[:, 1:1 + learner.n_ctx] == 0)
    # ...while the class-name tokens do receive gradient (so the check above can fail).
    assert np.abs(g_emb[:, 1 + learner.n_ctx]).max() > 0
    # CoOp leaves the image encoder unprompted: image features do not depend on the prompt.
    g_img = jax.jit(jax.grad(lambda p: jnp.sum(learner.image_features(params, p, images))))(
        prompt)
    assert np.all(np.asarray(g_img["ctx"]) == 0)


def test_logits_and_loss(tokenizer, clip_setup):
    config, params = clip_setup
    params = dict(params, logit_scale=jnp.asarray(np.log(100.0), jnp.float32))
    learner = CoOp(config, tokenizer, coop_config())
    prompt = learner.init(jax.random.key(0), params)
    class_texts = learner.prepare(params, CLASSNAMES)
    images = jax.random.normal(jax.random.key(6), (2, 32, 32, 3))

    @jax.jit
    def forward(params):
        return (classification_logits(learner, params, prompt, class_texts, images),
                learner.image_features(params, prompt, images),
                learner.text_features(params, prompt, class_texts, jnp.arange(5)))

    logits, img, txt = (np.asarray(x) for x in forward(params))
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    np.testing.assert_allclose(logits, 100.0 * img @ txt.T, rtol=1e-4, atol=1e-4)
    labels = np.array([3, 1])
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -logp[np.arange(2), labels].mean()
    np.testing.assert_allclose(float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels))),
                               expected, rtol=1e-5)
    # A validity mask drops slots from the mean.
    masked = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(float(masked), -logp[0, 3], rtol=1e-5)


def test_class_specific_contexts(tokenizer, clip_setup):
    config, params = clip_setup
    learner = CoOp(config, tokenizer, coop_config(csc=True))
    with pytest.raises(ValueError, match="csc=True .* needs the number of training classes"):
        learner.init(jax.random.key(0), params)
    prompt = learner.init(jax.random.key(0), params, num_classes=len(CLASSNAMES))
    assert prompt["ctx"].shape == (len(CLASSNAMES), 4, config.transformer_width)
    class_texts = learner.prepare(params, CLASSNAMES)
    ids = jnp.arange(len(CLASSNAMES))
    base = np.asarray(jax.jit(learner.text_features)(params, prompt, class_texts, ids))
    # Every class starts from the words "a photo of a".
    plain = [f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES]
    np.testing.assert_allclose(base, np.asarray(encode_plain_text(config, params, tokenizer,
                                                                  plain)), rtol=1e-5, atol=1e-6)
    # Changing class 1's context changes only class 1's feature.
    noise = 0.1 * jax.random.normal(jax.random.key(9), prompt["ctx"].shape[1:])
    changed = {"ctx": prompt["ctx"].at[1].add(noise)}
    after = np.asarray(jax.jit(learner.text_features)(params, changed, class_texts, ids))
    assert np.abs(after[1] - base[1]).max() > 1e-3
    np.testing.assert_array_equal(np.delete(after, 1, 0), np.delete(base, 1, 0))
    # Subsets gather the matching contexts.
    np.testing.assert_allclose(
        np.asarray(jax.jit(learner.text_features)(params, changed, class_texts, jnp.array([1, 3]))),
        after[[1, 3]], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="csc=True: class-specific contexts .* new classes"):
        learner.prepare(params, ["cat", "dog"], new_classes=True)
    with pytest.raises(ValueError, match="does not fit 2 classes"):
        learner.text_features(params, prompt, learner.prepare(params, ["cat", "dog"]),
                              jnp.arange(2))
    # Random class-specific init.
    random_csc = CoOp(config, tokenizer, coop_config(csc=True, ctx_init=""))
    ctx = random_csc.init(jax.random.key(0), params, num_classes=3)["ctx"]
    assert ctx.shape == (3, 4, config.transformer_width)
    assert not np.array_equal(np.asarray(ctx[0]), np.asarray(ctx[1]))


@pytest.mark.parametrize("changes, match", [
    (dict(class_token_position="front"), r"config\.backbone\.class_token_position='front'"),
    (dict(csc="yes"), r"config\.backbone\.csc='yes'"),
    (dict(ctx_init="", n_ctx=0), r"config\.backbone\.n_ctx=0; expected a positive integer"),
    (dict(ctx_init="", n_ctx=80), r"config\.backbone\.n_ctx=80 leaves no room"),
    (dict(ctx_init=None), r"config\.backbone\.ctx_init=None"),
])
def test_bad_config_values_name_the_field(tokenizer, clip_setup, changes, match):
    config, _ = clip_setup
    with pytest.raises(ValueError, match=match):
        CoOp(config, tokenizer, coop_config(**changes))


def test_registry_and_missing_fields(tokenizer, clip_setup):
    config, _ = clip_setup
    assert get_learner("coop") is CoOp
    # Every learner module of the package is found, none listed by hand.
    shipped = {"cocoop", "coop", "dept", "ivlp", "maple", "promptkd", "promptsrc"}
    assert shipped <= set(learner_names())
    with pytest.raises(ValueError, match=re.escape(
            f"config.backbone.name='mapel'; allowed values: {sorted(learner_names())}")):
        get_learner("mapel")
    incomplete = ml_collections.ConfigDict({"name": "coop", "n_ctx": 4, "ctx_init": "",
                                            "class_token_position": "end"})
    with pytest.raises(ValueError, match=r"config\.backbone\.csc is missing"):
        build_learner(config, tokenizer, incomplete)
    with pytest.raises(ValueError, match="tokenizer context_length"):
        CoOp(config.replace(context_length=32), tokenizer, coop_config())


# ----------------------------------------------------------------------------------------------
# PyTorch checkpoints
# ----------------------------------------------------------------------------------------------


def save_dassl_checkpoint(path, ctx, **state):
    """A checkpoint shaped like Dassl's save_model: state dict, optimizer state and the pickled
    scheduler objects Dassl stores, plus an object of a class that will not be importable."""
    import torch

    param = torch.nn.Parameter(ctx.clone().float())
    optim = torch.optim.SGD([param], lr=0.002, momentum=0.9, weight_decay=5e-4)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 10.0)
    (param ** 2).sum().backward()
    optim.step()
    # A class from a module that exists only while saving: loading must neither import it nor
    # run its code.
    module = types.ModuleType("gone_module")
    ran = []

    class Gone:
        def __setstate__(self, s):
            ran.append(s)

    Gone.__module__, Gone.__qualname__ = "gone_module", "Gone"
    module.Gone = Gone
    sys.modules["gone_module"] = module
    try:
        state_dict = collections.OrderedDict(ctx=ctx, token_prefix=torch.randn(5, 1, 48),
                                             token_suffix=torch.randn(5, 72, 48))
        state_dict.update(state)
        torch.save({"state_dict": state_dict, "epoch": 50, "optimizer": optim.state_dict(),
                    "scheduler": {"successor": successor, "last_epoch": 49, "extra": Gone()},
                    "val_result": None}, path)
    finally:
        del sys.modules["gone_module"]
    return ran


def test_load_coop_torch_checkpoint(tmp_path, tokenizer, clip_setup):
    torch = pytest.importorskip("torch")
    ctx = torch.randn(4, 48, generator=torch.Generator().manual_seed(0)).half()
    path = tmp_path / "prompt_learner" / "model.pth.tar-50"
    path.parent.mkdir()
    ran = save_dassl_checkpoint(path, ctx)
    loaded = load_coop_torch_checkpoint(str(path), expected_shape=(4, 48))
    assert ran == []  # the foreign object's code did not run
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, ctx.float().numpy())
    config, _ = clip_setup
    learner = CoOp(config, tokenizer, coop_config())
    prompt = learner.load_torch_prompt(str(path))
    np.testing.assert_array_equal(np.asarray(prompt["ctx"]), ctx.float().numpy())
    # torch's pre-1.6 (non-zip) format reads the same way.
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": collections.OrderedDict(ctx=ctx)}, legacy,
               _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(load_coop_torch_checkpoint(str(legacy)), ctx.float().numpy())
    with pytest.raises(ValueError, match=r"model\.pth\.tar-50.*shape \(4, 48\); expected "
                                         r"\(5, 4, 48\)"):
        CoOp(config, tokenizer, coop_config(csc=True)).load_torch_prompt(str(path), 5)


def test_load_coop_torch_checkpoint_errors(tmp_path):
    torch = pytest.importorskip("torch")
    missing = tmp_path / "nope" / "model.pth.tar-1"
    with pytest.raises(FileNotFoundError, match=r"nope/model\.pth\.tar-1"):
        load_coop_torch_checkpoint(str(missing))
    no_ctx = tmp_path / "no_ctx.pth"
    torch.save({"state_dict": {"prompt_learner.ctx_x": torch.zeros(2)}}, no_ctx)
    with pytest.raises(ValueError, match=r"no_ctx\.pth.*no 'ctx'.*\['prompt_learner\.ctx_x'\]"):
        load_coop_torch_checkpoint(str(no_ctx))
    not_dassl = tmp_path / "plain.pth"
    torch.save({"ctx": torch.zeros(2)}, not_dassl)
    with pytest.raises(ValueError, match=r"plain\.pth.*expected a dict with 'state_dict'; found "
                                         r"\['ctx'\]"):
        load_coop_torch_checkpoint(str(not_dassl))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"could not read .*garbage\.pth"):
        load_coop_torch_checkpoint(str(garbage))


def test_export_coop_torch_prompt_round_trip(tmp_path, tokenizer, clip_setup):
    """A prompt exported in the upstream layout is read back exactly, by our reader and by
    plain torch.load as upstream's load_model reads it (state_dict['ctx'], epoch)."""
    torch = pytest.importorskip("torch")
    config, _ = clip_setup
    for csc, shape in ((False, (4, 48)), (True, (5, 4, 48))):
        learner = CoOp(config, tokenizer, coop_config(csc=csc))
        ctx = np.random.default_rng(int(csc)).normal(size=shape).astype(np.float32)
        path = learner.export_torch_prompt({"ctx": jnp.asarray(ctx)}, str(tmp_path / str(csc)), 7)
        assert path == str(tmp_path / str(csc) / "prompt_learner" / "model.pth.tar-7")
        raw = torch.load(path, weights_only=True)
        assert raw["epoch"] == 7 and list(raw["state_dict"]) == ["ctx"]
        np.testing.assert_array_equal(raw["state_dict"]["ctx"].numpy(), ctx)
        back = learner.load_torch_prompt(path, 5 if csc else None)
        np.testing.assert_array_equal(np.asarray(back["ctx"]), ctx)
