"""DHNO (dpc_jax.training.dhno) against plain-Python transcriptions of
docs/reference/method.md#dhno."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpc_jax.data.train_sets import build_class_table
from dpc_jax.training import dhno


# ------------------------------------------------------------------------------------------------
# Plain-Python rules, straight from the spec, with lists
# ------------------------------------------------------------------------------------------------


def py_ranking(row):
    """Classes by decreasing score, ties towards the lower class index."""
    return sorted(range(len(row)), key=lambda c: (-row[c], c))


def py_reference(scores, labels, k, draws):
    """The released rule. draws[i] = the random classes anchor i's fallback tries, in order.

    Returns (negatives per anchor, number kept from the top-K per anchor, fallback used flags).
    """
    objects = list(labels)  # duplicates kept
    out, n_top, used = [], [], []
    for i, y in enumerate(labels):
        candidates = [c for c in py_ranking(scores[i])[:k] if c != y]
        negs = []
        for c in candidates:
            if c not in objects:
                negs.append(c)
                objects.append(c)
        n_top.append(len(negs))
        used.append(len(negs) < 2)
        if len(negs) < 2:
            for r in draws[i]:
                if len(negs) >= 2:
                    break
                if r not in objects:
                    negs.append(r)
                    objects.append(r)
        out.append(negs)
    return out, n_top, used


def py_hardest(scores, labels, k):
    objects = list(labels)
    out = []
    for i, y in enumerate(labels):
        negs = []
        for c in py_ranking(scores[i]):
            if len(negs) == k - 1:
                break
            if c != y and c not in objects:
                negs.append(c)
                objects.append(c)
        out.append(negs)
    return out


def as_lists(negatives, valid):
    negatives, valid = np.asarray(negatives), np.asarray(valid)
    return [[int(c) for c, v in zip(n, m) if v] for n, m in zip(negatives, valid)]


select = jax.jit(dhno.select_hard_negatives, static_argnames=("k", "policy"))


@jax.jit(static_argnames="k")
def select_reference_and_draws(scores, labels, key, k):
    """'reference' selection and the fallback draws it used, in one compile per shape."""
    b, c = scores.shape
    return (*dhno.select_hard_negatives(scores, labels, k, key, "reference"),
            dhno.fallback_draws(key, b, c))


def random_cases(rng, n, b, c):
    """Scores with and without ties; labels with duplicates (some cases draw from few classes)."""
    scores = rng.random((n, b, c)).astype(np.float32)
    ties = rng.random(n) < 0.5
    scores[ties] = rng.integers(0, 3, (int(ties.sum()), b, c)).astype(np.float32)
    labels = rng.integers(0, c, (n, b))
    few = rng.random(n) < 0.3
    labels[few] = rng.integers(0, max(2, c // 3), (int(few.sum()), b))
    return scores, labels.astype(np.int32)


# (B, C, K): small class counts and K = 2 mostly reach the fallback, large K mostly not.
SHAPES = [(2, 5, 2), (4, 5, 4), (8, 12, 3), (2, 20, 6), (4, 37, 8), (3, 40, 5)]


# ------------------------------------------------------------------------------------------------
# select_hard_negatives
# ------------------------------------------------------------------------------------------------


def test_reference_equals_python_rule():
    rng = np.random.default_rng(0)
    n = 60
    counts = {"no_fallback": 0, "fallback": 0}
    for b, c, k in SHAPES:
        scores, labels = random_cases(rng, n, b, c)
        for case in range(n):
            key = jax.random.key(case)
            negatives, valid, draws = select_reference_and_draws(scores[case], labels[case],
                                                                 key, k=k)
            assert negatives.shape == (b, k) and negatives.dtype == jnp.int32
            assert valid.shape == (b, k) and valid.dtype == jnp.bool_
            negatives, valid = np.asarray(negatives), np.asarray(valid)
            want, n_top, used = py_reference(scores[case].tolist(), labels[case].tolist(), k,
                                             np.asarray(draws).tolist())
            got = as_lists(negatives, valid)
            # The deterministic top-K part always matches, the whole rule with the same draws too.
            assert [g[:t] for g, t in zip(got, n_top)] == [w[:t] for w, t in zip(want, n_top)]
            assert got == want, (b, c, k, case)
            counts["fallback" if any(used) else "no_fallback"] += 1
            # Layout: valid slots first, invalid slots hold class 0.
            assert (np.sort(~valid, axis=1) == ~valid).all()
            assert (negatives[~valid] == 0).all()
            if any(used):
                check_fallback_invariants(got, n_top, labels[case].tolist(), c)
    # Both regimes were exercised.
    assert counts["no_fallback"] > 80 and counts["fallback"] > 80, counts


def check_fallback_invariants(got, n_top, labels, c):
    everything = list(labels)
    for negs, t in zip(got, n_top):
        fallback = negs[t:]
        assert all(1 <= r <= c - 2 for r in fallback), (fallback, c)  # randint(1, C-2)
        assert len(negs) <= max(t, 2)
        if t >= 2:
            assert not fallback
        everything += negs
    negatives = [n for negs in got for n in negs]
    assert len(set(negatives)) == len(negatives)  # no class twice as a negative
    assert not set(negatives) & set(labels)  # no negative is an anchor's class


def test_fallback_draws_range_and_count():
    draws = np.asarray(dhno.fallback_draws(jax.random.key(3), 200, 7))
    assert draws.shape == (200, 5)  # the released loop makes C-2 tries
    assert set(np.unique(draws).tolist()) == {1, 2, 3, 4, 5}  # never 0 or C-1


def test_fallback_reached_and_capped_by_tries():
    # 3 classes, anchors of class 0 and 2: the top-2 of anchor 0 are {0, 2}, both in 'objects';
    # the fallback can only draw class 1 (randint(1, 1)) once; anchor 1 then finds nothing.
    scores = jnp.asarray([[0.9, 0.0, 0.1], [0.1, 0.0, 0.9]])
    negatives, valid = dhno.select_hard_negatives(scores, jnp.asarray([0, 2]), 2,
                                                  jax.random.key(0))
    assert as_lists(negatives, valid) == [[1], []]


def test_ties_go_to_the_lower_class_index():
    scores = jnp.asarray([[0.2, 0.5, 0.5, 0.5, 0.1, 0.5]])
    np.testing.assert_array_equal(dhno.rank_classes(scores)[0], [1, 2, 3, 5, 0, 4])
    negatives, valid = dhno.select_hard_negatives(scores, jnp.asarray([2]), 3, jax.random.key(0))
    assert as_lists(negatives, valid) == [[1, 3]]  # top-3 = 1, 2, 3; drop y = 2
    negatives, valid = dhno.select_hard_negatives(scores, jnp.asarray([2]), 4, jax.random.key(0),
                                                  "hardest")
    assert as_lists(negatives, valid) == [[1, 3, 5]]


def test_reference_worked_example():
    # Anchor 0 (y=0): top-3 = 1, 2, 0 -> keeps 1, 2. Anchor 1 (y=3): top-3 = 1, 4, 2 -> 1 and 2
    # are taken by anchor 0, keeps 4 only -> the fallback's C-2 = 5 draws from [1, 5] can only
    # add class 5 (the rest is in 'objects'), if one of them hits it; class 6 = C-1 never.
    scores = jnp.asarray([[0.5, 0.9, 0.8, 0.0, 0.1, 0.0, 0.0],
                          [0.0, 0.9, 0.7, 0.1, 0.8, 0.0, 0.0]])
    outcomes = set()
    for seed in range(20):
        negatives, valid = select(scores, jnp.asarray([0, 3]), k=3, key=jax.random.key(seed),
                                  policy="reference")
        got = as_lists(negatives, valid)
        assert got[0] == [1, 2] and got[1] in ([4], [4, 5])
        outcomes.add(len(got[1]))
    assert outcomes == {1, 2}  # P(no draw hits 5) = (4/5)^5


def test_hardest_equals_python_rule():
    rng = np.random.default_rng(1)
    n = 40
    key = jax.random.key(0)
    for b, c, k in SHAPES:
        scores, labels = random_cases(rng, n, b, c)
        for case in range(n):
            negatives, valid = select(scores[case], labels[case], k=k, key=key, policy="hardest")
            negatives, valid = np.asarray(negatives), np.asarray(valid)
            assert not valid[:, k - 1].any()  # slot K is never used
            want = py_hardest(scores[case].tolist(), labels[case].tolist(), k)
            assert as_lists(negatives, valid) == want, (b, c, k, case)
            # Always K-1 negatives while enough classes are left.
            left = c - len(set(labels[case].tolist()))
            for negs in want:
                assert len(negs) == min(k - 1, left)
                left -= len(negs)


def test_hardest_ignores_the_key():
    scores = jax.random.uniform(jax.random.key(0), (4, 9))
    labels = jnp.asarray([0, 1, 1, 5])
    a = dhno.select_hard_negatives(scores, labels, 3, jax.random.key(1), "hardest")
    b = dhno.select_hard_negatives(scores, labels, 3, jax.random.key(2), "hardest")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_runs_inside_jit_with_traced_inputs():
    fn = jax.jit(lambda s, y, key: dhno.select_hard_negatives(s, y, 4, key, "reference"))
    scores = jax.random.uniform(jax.random.key(0), (4, 10))
    negatives, valid = fn(scores, jnp.asarray([0, 1, 2, 3]), jax.random.key(5))
    assert negatives.shape == (4, 4) and valid.shape == (4, 4)


@pytest.mark.parametrize("k,c", [(8, 5), (5, 5)])
def test_top_k_not_below_class_count_is_rejected(k, c):
    # EuroSAT has 5 base classes: the released K = 8 cannot work there.
    with pytest.raises(ValueError, match=rf"top-K={k}.*{c} classes"):
        dhno.select_hard_negatives(jnp.zeros((4, c)), jnp.zeros(4, jnp.int32), k,
                                   jax.random.key(0))


@pytest.mark.parametrize("policy", dhno.POLICIES)
def test_top_k_of_one_is_rejected(policy):
    with pytest.raises(ValueError, match="top-K=1"):
        dhno.select_hard_negatives(jnp.zeros((4, 5)), jnp.zeros(4, jnp.int32), 1,
                                   jax.random.key(0), policy)


def test_bad_policy_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="policy='easiest'"):
        dhno.select_hard_negatives(jnp.zeros((4, 5)), jnp.zeros(4, jnp.int32), 2,
                                   jax.random.key(0), "easiest")
    with pytest.raises(ValueError, match="labels must be"):
        dhno.select_hard_negatives(jnp.zeros((4, 5)), jnp.zeros(3, jnp.int32), 2,
                                   jax.random.key(0))


# ------------------------------------------------------------------------------------------------
# Negative images
# ------------------------------------------------------------------------------------------------


def test_build_class_table():
    labels = np.asarray([2, 0, 1, 2, 2, 0])
    table, counts = build_class_table(labels, 3)
    np.testing.assert_array_equal(counts, [2, 1, 3])
    np.testing.assert_array_equal(table, [[1, 5, 1], [2, 2, 2], [0, 3, 4]])
    assert table.dtype == np.int32 and counts.dtype == np.int32
    # Every entry, padding included, is an image of its row's class.
    assert (labels[table] == np.arange(3)[:, None]).all()


def test_build_class_table_errors_name_the_class():
    with pytest.raises(ValueError, match=r"classes \[1, 3\] have no training image"):
        build_class_table(np.asarray([0, 2, 0]), 4)
    with pytest.raises(ValueError, match=r"\[7\] outside \[0, 4\)"):
        build_class_table(np.asarray([0, 7, 1, 2, 3]), 4)


def test_sample_negative_images_class_and_uniformity():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(6), [1, 2, 3, 4, 5, 16]))
    table, counts = build_class_table(labels, 6)
    negatives = jnp.asarray([[5, 3, 1], [4, 0, 2]], jnp.int32)
    valid = jnp.asarray([[True, True, True], [True, True, False]])
    draws = jax.jit(jax.vmap(dhno.sample_negative_images, in_axes=(0, None, None, None, None)))(
        jax.random.split(jax.random.key(0), 4000), jnp.asarray(table), jnp.asarray(counts),
        negatives, valid)
    draws = np.asarray(draws)
    assert draws.dtype == np.int32 and draws.shape == (4000, 2, 3)
    assert (draws[:, 1, 2] == 0).all()  # invalid slot: safe index 0
    classes = labels[draws]
    np.testing.assert_array_equal(classes[:, valid], np.broadcast_to(negatives[valid],
                                                                     (4000, 5)))
    # Every image of the class is drawn, about equally often (chi-square, 16 images of class 5).
    for slot, cls in [((0, 0), 5), ((1, 0), 4), ((0, 1), 3)]:
        images = np.flatnonzero(labels == cls)
        freq = np.asarray([(draws[:, slot[0], slot[1]] == i).sum() for i in images])
        expected = 4000 / len(images)
        chi2 = ((freq - expected) ** 2 / expected).sum()
        assert freq.min() > 0 and chi2 < 3 * len(images) + 10, (cls, freq)


# ------------------------------------------------------------------------------------------------
# Batch assembly and loss
# ------------------------------------------------------------------------------------------------


def test_assemble_batch_order():
    anchors = jnp.asarray([7, 3])
    negatives = jnp.asarray([[1, 2, 0], [4, 0, 0]])
    valid = jnp.asarray([[True, True, False], [True, False, False]])
    labels, slot_valid = dhno.assemble_batch(anchors, negatives, valid)
    np.testing.assert_array_equal(labels, [7, 1, 2, 0, 3, 4, 0, 0])
    np.testing.assert_array_equal(slot_valid, [1, 1, 1, 0, 1, 1, 0, 0])
    feats = dhno.interleave(jnp.ones((2, 5)), jnp.zeros((2, 3, 5)))
    np.testing.assert_array_equal(feats[:, 0], [1, 0, 0, 0, 1, 0, 0, 0])


def released_loss_numpy(v, t, scale):
    """The released step on a compacted batch, in float64."""
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = scale * v @ t.T

    def ce(z):
        z = z - z.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(axis=1)) - np.diag(z))

    return (ce(logits) + ce(logits.T)) / 2


def released_loss_torch(v, t, scale):
    v, t = torch.tensor(v, requires_grad=True), torch.tensor(t, requires_grad=True)
    vn = v / v.norm(dim=-1, keepdim=True)
    tn = t / t.norm(dim=-1, keepdim=True)
    logits = scale * vn @ tn.t()
    ids = torch.arange(v.shape[0])
    loss = (F.cross_entropy(logits, ids) + F.cross_entropy(logits.t(), ids)) / 2
    loss.backward()
    return loss.item(), v.grad.numpy(), t.grad.numpy()


loss_and_grad = jax.jit(jax.value_and_grad(dhno.contrastive_loss, argnums=(0, 1)))


@pytest.mark.parametrize("seed", range(4))
def test_contrastive_loss_equals_released_on_compacted_batch(seed):
    rng = np.random.default_rng(seed)
    b, k, e = 4, 3, 32
    m = b * (k + 1)
    v = rng.normal(size=(m, e)).astype(np.float32)
    t = rng.normal(size=(m, e)).astype(np.float32)
    t[5] = t[1]  # duplicate labels give identical text features, as in the released step
    valid = rng.random(m) < 0.6
    valid[:: k + 1] = True  # anchors are always valid
    keep = np.flatnonzero(valid)

    loss, (gv, gt) = loss_and_grad(jnp.asarray(v), jnp.asarray(t), jnp.asarray(valid), 100.0)
    want = released_loss_numpy(v[keep].astype(np.float64), t[keep].astype(np.float64), 100.0)
    assert abs(float(loss) - want) <= 1e-6 * max(1.0, abs(want)), (float(loss), want)
    want_t, gv_t, gt_t = released_loss_torch(v[keep], t[keep], 100.0)
    assert abs(float(loss) - want_t) <= 1e-6 * max(1.0, abs(want_t))
    # Gradients: those of the compacted batch on valid slots, exactly zero on invalid ones.
    np.testing.assert_allclose(np.asarray(gv)[keep], gv_t, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gt)[keep], gt_t, rtol=1e-4, atol=1e-6)
    assert (np.asarray(gv)[~valid] == 0).all() and (np.asarray(gt)[~valid] == 0).all()
    # Whatever sits in the invalid slots does not change the loss.
    v2, t2 = v.copy(), t.copy()
    v2[~valid] = rng.normal(size=v2[~valid].shape) * 50
    t2[~valid] = v[0]
    loss2, _ = loss_and_grad(jnp.asarray(v2), jnp.asarray(t2), jnp.asarray(valid), 100.0)
    assert float(loss2) == float(loss)


def test_contrastive_loss_all_valid_and_traced_scale():
    rng = np.random.default_rng(5)
    v = rng.normal(size=(6, 8)).astype(np.float32)
    t = rng.normal(size=(6, 8)).astype(np.float32)
    scale = jnp.exp(jnp.float32(np.log(100.0)))  # CLIP's exp(logit_scale), a traced value
    loss = jax.jit(dhno.contrastive_loss)(jnp.asarray(v), jnp.asarray(t), jnp.ones(6, bool),
                                          scale)
    want = released_loss_numpy(v.astype(np.float64), t.astype(np.float64), float(scale))
    assert abs(float(loss) - want) <= 1e-6 * max(1.0, want)


def test_contrastive_loss_shape_errors():
    with pytest.raises(ValueError, match="must both be"):
        dhno.contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((4, 6)), jnp.ones(4, bool))
    with pytest.raises(ValueError, match="valid must be"):
        dhno.contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((4, 8)), jnp.ones(3, bool))
