"""Class-chunked text encoding (`config.clip.text_chunk`, `prompts.base.encode_class_texts`):
the stage-1 loss and its gradients with the class texts encoded a few at a time under
`jax.checkpoint` equal the plain program's, for every learner family, with a class count
that is not a multiple of the chunk (the last chunk is padded and cut)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import random_clip_params, small_config
from dpc_jax.data.world import CLASSNAMES
from dpc_jax.models.clip import get_config
from dpc_jax.prompts import LearnerContext, PromptKD, PromptSRC, capabilities, get_learner
from dpc_jax.prompts.base import encode_class_texts, insert_context

NAMES = tuple(CLASSNAMES[:7])  # 7 classes, chunks of 3: 3 + 3 + 1 (padded)
CHUNK = 3
# Each text is encoded on its own, so chunking changes only which texts share a matmul, and
# the gradient adds the chunks' contributions in another order: float32 rounding, which an
# element that is a sum of cancelling terms shows relatively large. So the tolerance is on each
# leaf's scale: max |chunked - plain| <= REL x max |plain|, and the loss within REL relative.
# Seen on the 2-core CPU: gradients at most 1.1e-5 of their scale (IVLP's vision_deep), losses
# within 1.1e-6; a chunking that mixes up rows is off by O(1).
REL = 5e-5
LEARNERS = ["coop", "cocoop", "kgcoop", "ivlp", "maple", "promptsrc", "mmrl", "dept"]


def world_config(name: str) -> ml_collections.ConfigDict:
    """The learner's default config with its world depths, at most the tiny CLIP's 2 blocks."""
    cfg = get_learner(name).default_config()
    for field, value in get_learner(name).info.world.items():
        parts = field.split(".")
        if parts[0] == "backbone" and parts[-1] not in ("epochs", "lr", "batch_size"):
            node = cfg
            for p in parts[1:-1]:
                node = node[p]
            node[parts[-1]] = value
    for field in ("depth", "depth_text", "depth_vision"):  # the tiny CLIP has 2 blocks a tower
        if field in cfg:
            cfg[field] = min(cfg[field], 2)
    return cfg


def build(name, tiny_config, tok, chunk):
    return get_learner(name)(tiny_config.replace(text_chunk=chunk), tok, world_config(name))


def perturbed(prompt, seed=0):
    """The initial prompt moved off its init (so every leaf's gradient is non-trivial)."""
    leaves, treedef = jax.tree_util.tree_flatten(prompt)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                              for x, k in zip(leaves, keys)])


def loss_and_grads(learner, params, prompt, state, consts, texts, images, labels):
    def f(p):
        loss, _, _ = learner.loss(params, p, state, consts, texts, images, labels,
                                  jax.random.key(3))
        return loss

    return jax.jit(jax.value_and_grad(f))(prompt)


def assert_close(chunked, plain):
    """Every leaf non-trivial and within REL of its scale (see REL); returns the worst ratio."""
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(chunked),
                            jax.tree_util.tree_leaves(plain)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.max(np.abs(b))
        assert np.all(np.isfinite(a)) and scale > 0, jax.tree_util.keystr(path)
        ratio = np.max(np.abs(a - b)) / scale
        assert ratio <= REL, f"{jax.tree_util.keystr(path)}: {ratio:.2e} of the leaf's scale"
        worst = max(worst, ratio)
    return worst


@pytest.mark.parametrize("name", LEARNERS)
def test_chunked_loss_and_gradients_equal_the_plain_program(name, tiny_config, tiny_params,
                                                            tok):
    plain, chunked = (build(name, tiny_config, tok, c) for c in (0, CHUNK))
    context = LearnerContext(dataset="world", classnames=NAMES, templates=("a photo of a {}.",))
    consts = plain.constants(tiny_params, context)
    texts = plain.prepare(tiny_params, list(NAMES))
    prompt = perturbed(plain.init(jax.random.key(0), tiny_params, len(NAMES)))
    state = capabilities.init_state(plain, tiny_params)
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randn(5, 32, 32, 3).astype(np.float32))
    labels = jnp.asarray([0, 6, 3, 4, 6], jnp.int32)
    loss_p, grads_p = loss_and_grads(plain, tiny_params, prompt, state, consts, texts, images,
                                     labels)
    loss_c, grads_c = loss_and_grads(chunked, tiny_params, prompt, state, consts, texts, images,
                                     labels)
    np.testing.assert_allclose(float(loss_c), float(loss_p), rtol=REL)
    assert_close(grads_c, grads_p)


def test_promptkd_teacher_text_branch_chunked_equals_plain(tiny_config, tiny_params, tok):
    """PromptKD's class texts go through the teacher's text tower (DPC's stage 2 trains its
    text branch): the teacher CLIP's own text_chunk applies."""
    teacher_clip = get_config("tiny", embed_dim=48, vision_width=96, vision_head_width=16,
                              vocab_size=tiny_config.vocab_size)
    tcfg = ml_collections.ConfigDict({**PromptSRC.default_config().to_dict(), "depth_text": 2,
                                      "depth_vision": 2})
    tparams = random_clip_params(teacher_clip, seed=1)
    out = {}
    for chunk in (0, CHUNK):
        teacher = PromptSRC(teacher_clip.replace(text_chunk=chunk), tok, tcfg)
        cfg = PromptKD.default_config()
        cfg.depth_vision = 2
        learner = PromptKD(tiny_config.replace(text_chunk=chunk), tok, cfg, teacher=teacher)
        tprompt = perturbed(teacher.init(jax.random.key(1), tparams), seed=1)
        consts = learner.constants(tiny_params, LearnerContext(
            dataset="world", classnames=NAMES, teacher={"clip": tparams, "prompt": tprompt}))
        texts = learner.prepare(tiny_params, list(NAMES))
        branch = {k: tprompt[k] for k in ("ctx", "text_deep")}
        ids = jnp.arange(len(NAMES))

        def f(p):
            w = learner.classifier(tiny_params, p, texts, ids, consts)
            return jnp.sum(jnp.sin(3.0 * w))

        out[chunk] = jax.jit(jax.value_and_grad(f))(branch)
    np.testing.assert_allclose(float(out[CHUNK][0]), float(out[0][0]), rtol=REL)
    assert_close(out[CHUNK][1], out[0][1])


def test_encode_class_texts_chunks_rows_in_order(tiny_config, tiny_params, tok):
    """The features of every text, chunked or not, in the input order (the padded rows cut)."""
    learner = build("coop", tiny_config, tok, 0)
    texts = learner.prepare(tiny_params, list(NAMES))
    emb = insert_context(texts.embeddings, learner.init(jax.random.key(0), tiny_params)["ctx"])
    plain = np.asarray(encode_class_texts(learner.model, tiny_params, emb, texts.eot_indices))
    for chunk in (1, 2, CHUNK, 6, 7, 8):
        model = build("coop", tiny_config, tok, chunk).model
        got = np.asarray(encode_class_texts(model, tiny_params, emb, texts.eot_indices))
        assert got.shape == plain.shape
        assert assert_close(got, plain) <= REL, f"chunk {chunk}"


def test_text_chunk_must_be_a_non_negative_integer(tiny_config):
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="text_chunk"):
            tiny_config.replace(text_chunk=bad)


def test_a_stage_resumes_with_another_text_chunk(tmp_path):
    """text_chunk changes memory only: it is not a recorded setting, so a stage trained with
    one chunk resumes with another (say, on a smaller GPU)."""
    from dpc_jax.training import checkpoints

    config = small_config()
    path = str(tmp_path / "stage")
    checkpoints.check_stage_settings(path, 1, config)
    config.clip.text_chunk = 0
    assert checkpoints.compare_stage_settings(path, 1, config)
    config.clip.remat = True  # a recorded field still refuses
    with pytest.raises(ValueError, match=r"config\.clip\.remat"):
        checkpoints.compare_stage_settings(path, 1, config)


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_chunked_gradient_stores_a_fraction_of_the_activations(name, tiny_config, tiny_params,
                                                               tok):
    """What the option is for: XLA's temporaries of the stage-1 gradient with 40 classes in
    chunks of 4 are under a quarter of the unchunked program's (seen: 1/7 for CoOp, 1/9 for
    CoCoOp, whose B x C texts are streamed over the images)."""
    names = list(CLASSNAMES[:40])
    temps = {}
    for chunk in (0, 4):
        learner = build(name, tiny_config, tok, chunk)
        texts = learner.prepare(tiny_params, names)
        prompt = learner.init(jax.random.key(0), tiny_params, len(names))
        images, labels = jnp.zeros((8, 32, 32, 3)), jnp.zeros((8,), jnp.int32)

        def f(p):
            return learner.loss(tiny_params, p, {}, {}, texts, images, labels,
                                jax.random.key(0))[0]

        compiled = jax.jit(jax.grad(f)).lower(prompt).compile()
        temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[4] < temps[0] / 4, temps


def test_memory_benchmark_writes_each_parts_peak_and_sees_the_chunking(tmp_path):
    """benchmarks/memory.py on the tiny CLIP: per learner and part, peak_bytes = arguments +
    outputs - aliased + temporaries, and the unchunked stage-1 step needs more."""
    import json

    from helpers import load_benchmark

    bench = load_benchmark("memory")
    temps = {}
    for chunk in (0, 16):
        out = str(tmp_path / f"chunk{chunk}.json")
        assert bench.main(["--arch", "tiny", "--learners", "coop", "--dtype", "float32",
                           "--parts", "stage1,eval_features", "--text-chunk", str(chunk),
                           "--json", out]) == 0
        rows = {r["part"]: r for r in json.load(open(out))["results"]}
        assert set(rows) == {"stage1", "eval_features"}
        for r in rows.values():
            assert r["peak_bytes"] == (r["argument_bytes"] + r["output_bytes"]
                                       - r["alias_bytes"] + r["temp_bytes"]) > 0
        temps[chunk] = rows["stage1"]["temp_bytes"]
    assert temps[16] < temps[0], temps
    assert bench.main(["--learners", "coop", "--dtype", "float16"]) == 2
