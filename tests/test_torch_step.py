"""benchmarks/torch_step.py: its three PyTorch stage-2 steps compute dpc_jax's stage-2 loss.

On the same tiny random weights, data and anchors, with dpc_jax's own random draws fed to the
PyTorch steps (augmentation, fallback classes, negative images), the 'same_algorithm' step
(every slot through both towers) and the 'same_eliminated' step (only the valid negatives'
images, each distinct valid label's text once) must choose the same negatives and give the same
loss and gradient on theta as `objectives.dpc_objective` (its default path, both eliminations
on), and the 'released' step (compacted batch of variable size, text of all classes at 77
tokens, in one pass or in chunks) the same loss and gradient again. float32 on both sides: loss
to a relative 1e-5, gradient to a max relative error (max|a - b| / max|b|) of 5e-4 (the figures
reached are printed with `pytest -s`).
"""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax.data import augment
from dpc_jax.data.train_sets import build_class_table
from dpc_jax.prompts import get_learner
from dpc_jax.prompts.dpc import DualPrompt
from dpc_jax.training import dhno, objectives

from helpers import load_benchmark, max_rel_err, random_clip_params

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")

C, B, K = 8, 3, 4
LOSS_RTOL, GRAD_TOL = 1e-5, 5e-4



def nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


_augment = jax.jit(augment.random_resized_crop_flip, static_argnums=2)


class JaxDraws:
    """The PyTorch steps' random draws (torch_step.TorchDraws' methods), taken from the keys
    that dpc_objective's forward splits its key into."""

    def __init__(self, key, res, data, neg_idx, neg_pixels, valid):
        self.k_aug, self.k_sel, self.k_sample, self.k_neg_aug = jax.random.split(key, 4)
        self.res, self.data, self.b = res, data, valid.shape[0]
        # The released loop asks for negatives one at a time, anchors in order, valid slots
        # only; it draws an anchor's image paths first, then decodes and transforms them.
        valid = np.asarray(valid)
        self.choices = np.asarray(neg_idx)[valid].tolist()
        self.queue = list(zip(self.choices, np.asarray(neg_pixels).reshape(
            valid.shape + neg_pixels.shape[1:])[valid]))

    def augment_anchors(self, raw):
        return nchw(_augment(self.k_aug, jnp.asarray(raw.numpy()), self.res))

    def augment_negatives(self, raw):
        return nchw(_augment(self.k_neg_aug, jnp.asarray(raw.numpy()), self.res))

    def fallback_draws(self, b, c):
        return torch.from_numpy(np.asarray(dhno.fallback_draws(self.k_sel, b, c), np.int64))

    def negative_columns(self, counts):
        col = jax.random.randint(self.k_sample, tuple(counts.shape), 0,
                                 jnp.asarray(counts.numpy(), jnp.int32), dtype=jnp.int32)
        return torch.from_numpy(np.asarray(col, np.int64))

    def released_fallback(self, anchor, c):
        return iter(self.fallback_draws(self.b, c)[anchor].tolist())

    def released_choice(self, cls, paths):
        index = self.choices.pop(0)
        path = self.data.image_path(index)
        assert path in paths and int(self.data.labels[index]) == cls
        return path

    def augment_negative(self, raw_one):
        index, pixels = self.queue.pop(0)
        np.testing.assert_array_equal(raw_one.numpy(), self.data.images[index].numpy())
        return nchw(pixels[None])


def stage2_inputs(bench, shots=2, seed=0):
    """What `dpc_step.build_step` gives its step, for the tiny CLIP with one block per tower
    (random parameters drawn with numpy: Flax's eager init is slow here)."""
    cfg, tokenizer = bench.clip_config_and_tokenizer("tiny", 1)
    clip_params = random_clip_params(cfg, seed=seed)
    learner = get_learner("coop")(cfg, tokenizer, ml_collections.ConfigDict(
        dict(name="coop", n_ctx=4, ctx_init="a photo of a", csc=False)))
    class_texts = learner.prepare(clip_params, bench.classnames(C))
    prompt = learner.init(jax.random.key(seed + 1), clip_params)
    scorer = jax.jit(lambda p: learner.classifier(clip_params, p, class_texts,
                                                  jnp.arange(C)))(prompt)
    rng = np.random.default_rng(seed)
    res = cfg.image_resolution
    images = rng.integers(0, 256, (C * shots, res, res, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(C, dtype=np.int32), shots)
    table, counts = build_class_table(labels, C)
    consts = {"clip": clip_params, "class_texts": class_texts, "learner": {}, "scorer": scorer,
              "train": {"images": jnp.asarray(images), "labels": jnp.asarray(labels),
                        "class_table": jnp.asarray(table), "class_counts": jnp.asarray(counts)}}
    index = rng.choice(len(labels), B, replace=False).astype(np.int32)
    return cfg, tokenizer, learner, prompt, consts, {"index": jnp.asarray(index)}


def test_torch_steps_compute_dpc_jax_stage2_loss_and_gradient(tmp_path):
    bench = load_benchmark("torch_step")
    cfg, tokenizer, learner, prompt, consts, batch = stage2_inputs(bench)
    res = cfg.image_resolution
    dual = DualPrompt(ml_collections.ConfigDict(dict(mode="reference", w_base=0.5, w_new=0.0)))
    objective = objectives.dpc_objective(learner, dual, res, K, "reference")
    # theta away from P, so that Q = 2*theta - P differs from theta (the converse map shows).
    backbone = np.asarray(prompt["ctx"])
    noise = np.random.default_rng(1).standard_normal(backbone.shape).astype(np.float32)
    theta = backbone + 0.02 * noise
    params = {"backbone": {"ctx": jnp.asarray(backbone)}, "parallel": {"ctx": jnp.asarray(theta)}}
    key = jax.random.key(7)

    def loss_fn(p):
        out = objective.forward(p, {}, consts, batch, key)
        return out["loss"], out

    (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    grad = np.asarray(grads["parallel"]["ctx"])
    negatives, valid = np.asarray(out["negatives"]), np.asarray(out["valid"])
    # The case covers the fallback: some anchor got fewer than K-1 top-K negatives.
    assert valid.sum(axis=1).min() < K - 1, valid

    # dpc_objective's negative images and their augmentation, from its keys.
    _, _, k_sample, k_neg_aug = jax.random.split(key, 4)
    train = consts["train"]
    neg_idx = dhno.sample_negative_images(k_sample, train["class_table"], train["class_counts"],
                                          out["negatives"], out["valid"])
    neg_pixels = _augment(k_neg_aug, train["images"][neg_idx.reshape(-1)], res)
    slot_labels, slot_valid = dhno.assemble_batch(train["labels"][batch["index"]],
                                                  out["negatives"], out["valid"])
    released_labels = np.asarray(slot_labels)[np.asarray(slot_valid)]

    model = bench.torch_clip(cfg, consts["clip"])
    data = bench.FewShotSet(np.asarray(train["images"]), np.asarray(train["labels"]),
                            bench.classnames(C), str(tmp_path))
    index = torch.from_numpy(np.asarray(batch["index"], np.int64))

    def draws():
        return JaxDraws(key, res, data, neg_idx, neg_pixels, valid)

    errors = {}
    slot_count = B * (K + 1)
    distinct = len(set(released_labels.tolist()))
    # (step class, image tower rows, text tower rows): the anchors plus every negative slot and
    # one text per slot; the anchors plus the valid negatives and each distinct valid label.
    for name, cls, image_rows, text_rows in (
            ("same_algorithm", bench.SameAlgorithmStep, slot_count, slot_count),
            ("same_eliminated", bench.SameEliminatedStep, B + int(valid.sum()), distinct)):
        same = cls(model, tokenizer, data, backbone, theta, index, K, draws())
        t_loss, info = same.forward()
        t_loss.backward()
        np.testing.assert_array_equal(info["negatives"].numpy(), negatives)
        np.testing.assert_array_equal(info["valid"].numpy(), valid)
        assert (info["image_rows"], info["text_rows"]) == (image_rows, text_rows), name
        np.testing.assert_allclose(float(t_loss.detach()), float(loss), rtol=LOSS_RTOL)
        errors[name] = (abs(float(t_loss.detach()) / float(loss) - 1),
                        max_rel_err(same.theta.grad.numpy(), grad))
    assert distinct < slot_count and B + valid.sum() < slot_count  # both eliminations act

    for chunk in (0, 3):  # one pass over all C classes; chunks of 3 (slot classes first)
        released = bench.ReleasedStep(model, tokenizer, data, backbone, theta, index, K,
                                      draws(), text_chunk=chunk)
        r_loss, r_info = released.forward()
        r_loss.backward()
        assert released.draws.queue == released.draws.choices == []  # all taken, in order
        np.testing.assert_array_equal(r_info["slot_labels"].numpy(), released_labels)
        np.testing.assert_allclose(float(r_loss.detach()), float(loss), rtol=LOSS_RTOL)
        errors[f"released chunk {chunk}"] = (abs(float(r_loss.detach()) / float(loss) - 1),
                                             max_rel_err(released.theta.grad.numpy(), grad))
    print("\n[torch_step vs dpc_objective] (loss rel err, grad max rel err): "
          + ", ".join(f"{k} {a:.1e} {b:.1e}" for k, (a, b) in errors.items()))
    assert all(g <= GRAD_TOL for _, g in errors.values()), errors


def test_torch_selection_matches_dhno_reference_policy():
    """select_hard_negatives in torch against dhno's on scores where anchors share their top
    classes (so the non-repeat rule and the fallback both act), with the same draws."""
    bench = load_benchmark("torch_step")
    rng = np.random.default_rng(0)
    c, b, k = 12, 5, 4
    base = rng.standard_normal(c)
    scores = (base[None] + 0.3 * rng.standard_normal((b, c))).astype(np.float32)
    labels = np.array([0, 3, 3, 7, 11], np.int32)
    key = jax.random.key(5)
    negatives, valid = dhno.select_hard_negatives(jnp.asarray(scores), jnp.asarray(labels), k,
                                                  key, "reference")
    draws = torch.from_numpy(np.asarray(dhno.fallback_draws(key, b, c), np.int64))
    t_neg, t_valid = bench.select_hard_negatives(torch.from_numpy(scores),
                                                 torch.from_numpy(labels.astype(np.int64)), k,
                                                 draws)
    assert np.asarray(valid).sum(axis=1).min() < k - 1  # the fallback acted
    np.testing.assert_array_equal(t_valid.numpy(), np.asarray(valid))
    np.testing.assert_array_equal(t_neg.numpy(), np.asarray(negatives))


def test_same_eliminated_encodes_only_valid_rows_and_distinct_labels(monkeypatch):
    """SameEliminatedStep's two tower hooks on stand-in towers (a row-wise map): the valid rows
    equal the full encoding's, invalid rows are finite, only the valid negatives and each
    distinct valid label are encoded; with no valid negative, one row is."""
    bench = load_benchmark("torch_step")
    encoded = []

    def tower(x):
        encoded.append(x.shape[0])
        return torch.tanh(x.flatten(1)[:, :5] * 3.0) + 2.0

    fake = types.SimpleNamespace(model=types.SimpleNamespace(encode_image=tower),
                                 texts=(torch.randn(6, 4, 5), torch.zeros(6, dtype=torch.long)))
    monkeypatch.setattr(bench, "encode_text", lambda model, emb, eot: tower(emb.sum(1)))
    monkeypatch.setattr(bench, "insert_context", lambda emb, ctx: emb + ctx.sum())
    images = torch.randn(6, 3, 2, 2)
    for valid in ([False, True, True, False, True, False], [False] * 6):
        valid = torch.tensor(valid)
        encoded.clear()
        feats, rows = bench.SameEliminatedStep.negative_features(fake, images, valid)
        assert rows == encoded[0] == max(int(valid.sum()), 1) and len(encoded) == 1
        assert feats.shape == (6, 5) and bool(torch.isfinite(feats).all())
        torch.testing.assert_close(feats[valid], tower(images)[valid])
    labels = torch.tensor([3, 0, 3, 5, 1, 0])
    valid = torch.tensor([True, False, True, True, True, False])
    q = torch.zeros(2, 5)
    encoded.clear()
    feats, rows = bench.SameEliminatedStep.slot_text_features(fake, q, labels, valid)
    full, full_rows = bench.SameAlgorithmStep.slot_text_features(fake, q, labels, valid)
    assert (rows, full_rows, encoded) == (3, 6, [3, 6])  # classes 1, 3, 5 once; every slot
    assert bool(torch.isfinite(feats).all())
    torch.testing.assert_close(feats[valid], full[valid])
