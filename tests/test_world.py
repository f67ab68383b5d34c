"""The embedded world: determinism, the CoOp/Dassl protocol, the tokenizer, pretraining pieces."""

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpc_jax import pretrain
from dpc_jax.data import base, world
from dpc_jax.models import checkpoint
from dpc_jax.models.clip import CLIP, get_config, init_params
from dpc_jax.models.tokenizer import END_TOKEN, START_TOKEN, Tokenizer

ASSETS = checkpoint.asset_dir()

# Eager Flax init compiles op by op (slow on 2 shared cores); one jitted program is faster.
fast_init = jax.jit(init_params, static_argnums=(0, 1))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(ASSETS)


# -- world ---------------------------------------------------------------------------------------


def test_classes_are_colour_shape_compositions_and_new_ones_combine_base_attributes():
    assert world.NUM_CLASSES == 64 and len(set(world.CLASSNAMES)) == 64
    half = world.NUM_CLASSES // 2
    base_names, new_names = world.CLASSNAMES[:half], world.CLASSNAMES[half:]
    attrs = {name: name.split() for name in world.CLASSNAMES}
    # Every shape is in both halves, 4 times each.
    for names in (base_names, new_names):
        shapes = [attrs[n][1] for n in names]
        assert all(shapes.count(s) == 4 for s in world.SHAPES)
    # Base holds every colour; every new class is an unseen combination of a colour and a
    # shape that base classes show.
    assert {attrs[n][0] for n in base_names} == set(world.COLOURS)
    assert not set(base_names) & set(new_names)
    # The two colours the old-photo convention swaps: all 16 of their compositions are base,
    # so the swap confuses base classes (red X with orange X) and no new class.
    swapped = {c for pair in world.OLD_PAINT for c in pair}
    assert swapped == {"red", "orange"}
    assert sum(attrs[n][0] in swapped for n in base_names) == 16
    assert not any(attrs[n][0] in swapped for n in new_names)
    assert [world.parse_classname(n) for n in world.CLASSNAMES] == world.CLASS_ATTRIBUTES


def test_images_are_deterministic_by_world_seed():
    a, b, c = (world.WorldSplit("test", s) for s in (0, 0, 1))
    for i in (0, 77, len(a) - 1):
        assert np.array_equal(a.load_image(i, 32), b.load_image(i, 32))
        assert not np.array_equal(a.load_image(i, 32), c.load_image(i, 32))
    # Items differ from each other, and splits differ at the same index.
    assert not np.array_equal(a.load_image(0, 32), a.load_image(1, 32))
    assert not np.array_equal(a.load_image(0, 32), world.WorldSplit("train").load_image(0, 32))
    x1, c1 = world.pretrain_example(0, 5, 3)
    x2, c2 = world.pretrain_example(0, 5, 3)
    x3, _ = world.pretrain_example(1, 5, 3)
    assert np.array_equal(x1, x2) and c1 == c2 and not np.array_equal(x1, x3)


def test_load_image_shape_dtype_and_resize():
    split = world.WorldSplit("val")
    for size in (32, 48, 24):
        img = split.load_image(3, size)
        assert img.dtype == np.uint8 and img.shape == (size, size, 3)
    with pytest.raises(IndexError, match="out of range"):
        split.load_image(len(split), 32)


def test_pretrain_captions_name_the_class():
    table = world.caption_table()
    for index in range(40):
        composition = index % world.NUM_CLASSES
        _, cap = world.pretrain_example(0, index, composition)
        colour, shape = world.CLASSNAMES[world.composition_label(composition)].split()
        words = world._words(table[cap])
        assert colour in words or shape in words
    balanced = pretrain.batch_labels(0, 3, 128)
    assert np.array_equal(np.sort(balanced[:64]), np.arange(64))
    assert np.array_equal(np.sort(balanced[64:]), np.arange(64))


def _corner_std(img):
    return img[:3, :3].reshape(-1, 3).astype(int).std(0).mean()


def test_styles_differ_between_pretraining_and_downstream():
    # Part of the pretraining stream has plain backgrounds (corner pixels share one colour), the
    # rest is "wild"; downstream backgrounds are all textured and noisy.
    pre = [_corner_std(world.pretrain_example(0, i, i % 64)[0]) for i in range(40)]
    down = [_corner_std(world.WorldSplit("test").load_image(i, 32)) for i in range(40)]
    assert 0.25 < np.mean(np.asarray(pre) < 1.5) < 0.75
    assert min(down) > 1.5


def _paint_votes(img):
    """(pixels near red paint, pixels near orange paint)."""
    img = img.reshape(-1, 3).astype(float)
    near = [np.sum(np.linalg.norm(img - np.asarray(world.COLOURS[c], float), axis=1) < 50)
            for c in ("red", "orange")]
    return tuple(near)


def test_old_photo_convention_swaps_red_and_orange_paint():
    red, orange, blue = (world.CLASSNAMES.index(n) for n in
                         ("red circle", "orange circle", "blue circle"))
    colour = {k: world.CLASS_ATTRIBUTES[k][0] for k in (red, orange, blue)}
    spec = world.get_domain(world.DEFAULT_DOMAIN)
    assert spec.paint == world.OLD_PAINT and spec.paint_prob == 1.0
    rng = np.random.default_rng(0)
    assert spec.shown_colour(colour[red], rng) == colour[orange]
    assert spec.shown_colour(colour[orange], rng) == colour[red]
    assert spec.shown_colour(colour[blue], rng) == colour[blue]
    # A swapped red circle is pixel for pixel an unswapped orange one.
    swap = world.Domain("swap", world.PRETRAIN_STYLE, paint=world.OLD_PAINT)
    keep = world.Domain("keep", world.PRETRAIN_STYLE, paint=world.OLD_PAINT, paint_prob=0.0)
    for seed in range(3):
        a = world.render(np.random.default_rng(seed), red, world.PRETRAIN_STYLE, 32, swap)
        b = world.render(np.random.default_rng(seed), orange, world.PRETRAIN_STYLE, 32, keep)
        assert np.array_equal(a, b)
    # Pretraining: the images captioned "old" are the ones that show a red object orange.
    table = world.caption_table()
    n_old = 0
    for index in range(120):
        img, cap = world.pretrain_example(0, index, 0)  # composition 0: red circle
        if _corner_std(img) > 1.5:
            continue  # judge paint on plain backgrounds only
        old = "old" in world._words(table[cap])
        n_old += old
        votes = _paint_votes(img)
        assert (votes[1] > votes[0]) == old, (index, table[cap], votes)
    assert n_old > 5


def test_domains_are_registry_entries():
    with pytest.raises(ValueError, match="unknown world domain"):
        world.get_domain("mars")
    with pytest.raises(ValueError, match="already registered"):
        world.register_domain(world.get_domain(world.DEFAULT_DOMAIN))
    with pytest.raises(ValueError, match="paint pair"):
        world.Domain("bad", world.DOWNSTREAM_STYLE, paint=(("red", "teal"),))
    plain = world.Domain("test_plain", world.PRETRAIN_STYLE, templates=("a {}.",), stream=7)
    world.register_domain(plain)
    try:
        data = world.load_world(seed=1, shots=4, subsample="base", domain="test_plain")
        assert data.templates == ["a {}."] and data.name == "world_test_plain"
        a = data.test.load_image(0, 32)
        b = world.load_world(seed=1, shots=4, subsample="base").test.load_image(0, 32)
        assert not np.array_equal(a, b) and _corner_std(a) < 1.5
    finally:
        del world.DOMAINS["test_plain"]


def test_splits_and_fewshot_follow_the_coop_protocol():
    full = world.load_world_full()
    sizes = world.SPLIT_SIZES
    assert [len(full.train), len(full.val), len(full.test)] == [64 * sizes[s] for s in
                                                                 ("train", "val", "test")]
    seed = 2
    data = world.load_world(seed=seed, shots=16, subsample="all")
    rng = random.Random(seed)
    want_train = base.dassl_fewshot_indices(full.train.labels, 16, rng)
    want_val = base.dassl_fewshot_indices(full.val.labels, 4, rng)
    assert list(data.train.indices) == want_train and list(data.val.indices) == want_val
    assert np.array_equal(np.bincount(data.train.labels), np.full(64, 16))
    assert np.array_equal(np.bincount(data.val.labels), np.full(64, 4))
    assert len(data.test) == len(full.test)  # the test split is never subsampled
    other = world.load_world(seed=3, shots=16)
    assert list(other.train.indices) != want_train


@pytest.mark.parametrize("half", ["base", "new"])
def test_base_new_halves_relabel(half):
    full = world.load_world_full()
    data = world.load_world(seed=1, shots=16, subsample=half)
    offset = 0 if half == "base" else 32
    assert data.classnames == world.CLASSNAMES[offset:offset + 32]
    per_test = world.SPLIT_SIZES["test"]
    assert len(data.test) == 32 * per_test and len(data.train) == 32 * 16
    assert len(data.val) == 32 * 4
    for split in (data.train, data.val, data.test):
        assert np.array_equal(np.unique(split.labels), np.arange(32))
    # Label 0 of the new half is original class 32: same pixels as the full split.
    assert np.array_equal(data.test.load_image(0, 32),
                          full.test.load_image(offset * per_test, 32))
    assert world.CLASSNAMES[offset] in data.test.describe(0)
    # Few-shot sampling happens before halving: the half's train items are a subset of 'all'.
    all_train = set(world.load_world(seed=1, shots=16).train.indices.tolist())
    assert set(data.train.parent.indices[data.train.indices].tolist()) <= all_train


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="subsample"):
        world.load_world(subsample="novel")
    with pytest.raises(ValueError, match="shots"):
        world.load_world(shots=64)
    with pytest.raises(ValueError, match="world split"):
        world.WorldSplit("dev")
    with pytest.raises(ValueError, match="label"):
        world.render(np.random.default_rng(0), 64, world.DOWNSTREAM_STYLE)


# -- tokenizer ------------------------------------------------------------------------------------


def test_shipped_tokenizer_is_the_built_one(tmp_path):
    world.build_tokenizer_files(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        with open(tmp_path / name, "rb") as f, open(os.path.join(ASSETS, name), "rb") as g:
            assert f.read() == g.read(), f"{name} differs from build_tokenizer_files()"


def test_tokenizer_round_trips_and_fits(tok):
    vocab = tok.hf.get_vocab()
    assert vocab[START_TOKEN] == len(vocab) - 2 and vocab[END_TOKEN] == len(vocab) - 1
    config, _ = checkpoint.load_clip_checkpoint(ASSETS)
    assert config.vocab_size == tok.vocab_size == len(vocab)
    for name in world.CLASSNAMES:
        ids = tok.encode(name)
        assert tok.decode(ids) == name
        assert len(ids) == 2  # every world word is one token
    prompts = [t.format(c) for t in world.TEMPLATES for c in world.CLASSNAMES]
    ids, eot = tok(prompts + world.caption_table())
    assert ids.shape[1] == 77 and np.all(eot < 77)
    assert np.array_equal(eot, np.argmax(ids, axis=1))
    # Text outside the world still tokenises (byte-level fallback).
    assert tok.decode(tok.encode("zebra crossing")) == "zebra crossing"


def test_learn_bpe_merges_builds_whole_words():
    merges = world.learn_bpe_merges(["abab abc", "abc"])
    tokens = {"".join(m) for m in merges}
    assert {"abab</w>", "abc</w>"} <= tokens


# -- pretraining ---------------------------------------------------------------------------------


def test_short_text_context_equals_full_context():
    """The pretraining shortcut: encoding the first L positions gives the 77-token feature."""
    config = get_config("tiny")
    params = fast_init(config, 0)
    ids = np.zeros((3, 77), np.int32)
    for row, n in enumerate((3, 6, 9)):
        ids[row, :n] = np.arange(1, n + 1) * 7
        ids[row, n - 1] = 999  # EOT: the largest id
    full = jax.jit(lambda p, t: CLIP(config).apply({"params": p}, t, method="encode_text"))(
        params, ids)
    short = CLIP(config.replace(context_length=12))

    @jax.jit
    def encode_short(params, ids):
        p = dict(params, positional_embedding=params["positional_embedding"][:12])
        emb = short.apply({"params": p}, ids[:, :12], method="embed_tokens")
        return short.apply({"params": p}, emb, jnp.argmax(ids, 1),
                           method="encode_text_embeddings")

    out = encode_short(params, ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_pretrain_two_steps_writes_a_loadable_checkpoint(tmp_path):
    cfg = pretrain.PretrainConfig(
        out=str(tmp_path), steps=2, batch_size=16, embed_dim=16, vision_width=32,
        vision_layers=1, vision_patch_size=8, vision_head_width=16, text_width=32, text_heads=2,
        text_layers=1, text_context=12, warmup_steps=1)
    card = pretrain.pretrain(cfg, command="test")
    config, params = checkpoint.load_clip_checkpoint(str(tmp_path))
    assert config.vocab_size == Tokenizer.from_pretrained(str(tmp_path)).vocab_size
    assert config.context_length == 77 and config.vision_layers == 1
    with open(tmp_path / "model_card.json") as f:
        assert json.load(f) == card
    for key in ("base", "new"):
        assert 0.0 <= card["zeroshot_test_accuracy"][key] <= 100.0
    init = fast_init(config, cfg.seed)
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                   params, init)
    assert moved["visual"]["conv1"]["kernel"] and moved["text_projection"]
