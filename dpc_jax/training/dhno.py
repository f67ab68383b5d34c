"""DPC stage 2: the Dynamic Hard Negative Optimizer (DHNO) with static shapes
(docs/reference/method.md#dhno).

Everything here runs inside the jitted per-device step. The released code builds a batch whose
size changes every step; here every anchor owns K negative slots and a validity mask, so the
enlarged batch always has B*(K+1) slots, invalid ones stay in place and are masked in the loss.

Pieces, in the order the step uses them:
- `select_hard_negatives`: the negative classes of every anchor (policy 'reference' = the released
  rule, 'hardest' = the K-1 hardest classes not yet in the batch).
- `sample_negative_images`: one random few-shot training image per negative class, via the
  device-resident table of `dpc_jax.data.train_sets.build_class_table`.
- `assemble_batch` / `interleave`: the released slot order [anchor_i, negatives_i...] for i in
  batch order.
- `contrastive_loss`: the symmetric InfoNCE over the valid slots.

The encodings of the enlarged batch that skip invalid slots and repeated labels are in
`dpc_jax.training.row_skipping`.
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dpc_jax.models.clip import cosine_logits, normalize

Array = Any

POLICIES = ("reference", "hardest")

# The released fallback stops once an anchor has this many negatives (`len(hn_labels) < 2`).
FALLBACK_TARGET = 2


def _check_selection_args(scores, labels, k, policy) -> Tuple[int, int]:
    if policy not in POLICIES:
        raise ValueError(f"DHNO policy={policy!r}; expected one of {POLICIES}")
    if scores.ndim != 2:
        raise ValueError(f"DHNO scores must be [B, C]; got shape {tuple(scores.shape)}")
    b, c = scores.shape
    if labels.shape != (b,):
        raise ValueError(
            f"DHNO labels must be [B]={b} to match scores {tuple(scores.shape)}; got shape "
            f"{tuple(labels.shape)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"DHNO top-K must be a Python int; got {k!r}")
    # K = 1 cannot work with either policy: 'hardest' takes K-1 = 0 classes, and the released
    # code takes no top-K candidate at all for K = 1 (its `len(hn_labels) < K - 1` test) but then
    # adds 2 random negatives, which do not fit into K = 1 slots.
    if k < FALLBACK_TARGET:
        raise ValueError(f"DHNO top-K={k}; expected K >= 2 (K-1 hard negatives per anchor)")
    if k >= c:
        raise ValueError(
            f"DHNO top-K={k} needs more than K classes, but the scores have {c} classes "
            f"(use K <= {c - 1})")
    return b, c


def rank_classes(scores: Array) -> Array:
    """int32 [B, C]: classes by decreasing score, ties towards the lower class index.

    An explicit two-key sort rather than `lax.top_k`, whose order among equal values is not a
    documented guarantee on every backend. NaN scores rank last.
    """
    scores = scores.astype(jnp.float32)
    iota = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    _, order = jax.lax.sort((-scores, iota), dimension=1, num_keys=2)
    return order


def fallback_draws(key: Array, b: int, c: int) -> Array:
    """int32 [B, C-2]: the random classes the 'reference' fallback tries, per anchor.

    The released DPC loop makes at most C-2 tries of `random.randint(1, C-2)`, so classes 0
    and C-1 are never drawn; kept as is in the 'reference' policy. Drawn up front (static shape);
    an anchor that needs no fallback ignores its row.
    """
    tries = max(c - 2, 0)
    return jax.random.randint(key, (b, tries), 1, c - 1, dtype=jnp.int32)


def _first_occurrence(draws: Array, c: int) -> Array:
    """bool [T]: draws[t] is the first occurrence of its value in `draws`."""
    t = draws.shape[0]
    pos = jnp.arange(t, dtype=jnp.int32)
    first = jnp.full((c,), t, jnp.int32).at[draws].min(pos)
    return first[draws] == pos


def _place(slots: Array, values: Array, take: Array, position: Array) -> Array:
    """slots with values[j] written at position[j] where take[j] (positions are distinct)."""
    k = slots.shape[0]
    return slots.at[jnp.where(take, position, k)].set(values, mode="drop")


def _mark(present: Array, classes: Array, take: Array) -> Array:
    c = present.shape[0]
    return present.at[jnp.where(take, classes, c)].set(True, mode="drop")


def select_hard_negatives(scores: Array, labels: Array, k: int, key: Array,
                          policy: str = "reference") -> Tuple[Array, Array]:
    """Negative classes for every anchor, the batch-wide non-repeat rule included.

    Args:
      scores: [B, C] scorer output (the released code ranks softmax(100 * cos); any monotone
        score ranks the same, except that float32 softmax can underflow distant classes to
        equal zeros, which then tie).
      labels: int [B] ground-truth classes of the anchors, in batch order (values in [0, C)).
      k: top-K (static), 2 <= K < C.
      key: PRNG key, used by the 'reference' fallback only.
      policy: 'reference' or 'hardest'.

    Returns:
      negative_labels int32 [B, K] and valid bool [B, K]. Each anchor's valid slots come first,
      in the order the negatives were chosen; invalid slots hold class 0 (a safe gather index).

    'objects' starts as the batch labels; anchors are processed in batch order and every chosen
    negative joins 'objects', so no class appears twice as a negative and no negative is the
    class of any anchor. Ranking ties go towards the lower class index.

    'reference' (the released DPC trainer's `parse_sple_batch_train`): candidates = the top-K
    classes minus y_i (K-1 of them, or K when y_i is not in the top-K), in rank order; a
    candidate is kept iff it is not in 'objects'. If fewer than 2 were kept, a fallback draws
    C-2 random classes (see `fallback_draws`: uniform on [1, C-2], never 0 or C-1) and keeps,
    in draw order, those not in 'objects' until the anchor has 2. The released loop has the
    same C-2 tries, so an anchor may still end with fewer than 2 (as there, e.g. when
    'objects' covers [1, C-2]).

    'hardest' (the improved policy of docs/reference/method.md#dhno): the K-1 highest-scoring
    classes not in 'objects',
    fewer only when fewer classes are left; slot K is always invalid. No randomness.
    """
    b, c = _check_selection_args(scores, labels, k, policy)
    labels = labels.astype(jnp.int32)
    order = rank_classes(scores)
    present = jnp.zeros((c,), bool).at[labels].set(True)
    slot_pos = jnp.arange(k, dtype=jnp.int32)

    if policy == "hardest":
        def body(present, order_i):
            avail = ~present[order_i]
            rank = jnp.cumsum(avail) - 1
            take = avail & (rank < k - 1)
            negs = _place(jnp.zeros((k,), jnp.int32), order_i, take, rank)
            count = jnp.sum(take)
            return _mark(present, order_i, take), (negs, slot_pos < count)

        _, (negatives, valid) = jax.lax.scan(body, present, order)
        return negatives, valid

    draws = fallback_draws(key, b, c)

    def body(present, xs):
        order_i, draws_i = xs
        # y_i is always in 'objects' (objects starts as the batch labels), so the non-repeat
        # test also removes it from the candidates, exactly as the released `index != label`.
        cands = order_i[:k]
        keep = ~present[cands]
        rank = jnp.cumsum(keep) - 1
        negs = _place(jnp.zeros((k,), jnp.int32), cands, keep, rank)
        n_top = jnp.sum(keep)
        present = _mark(present, cands, keep)
        # Fallback: sequential accept-if-new over the draws == the first `need` draws that are
        # new to 'objects' and not repeated earlier in the draws.
        need = jnp.maximum(FALLBACK_TARGET - n_top, 0)
        ok = ~present[draws_i] & _first_occurrence(draws_i, c)
        seen = jnp.cumsum(ok)
        take = ok & (seen <= need)
        negs = _place(negs, draws_i, take, n_top + seen - 1)
        count = n_top + jnp.sum(take)
        return _mark(present, draws_i, take), (negs, slot_pos < count)

    _, (negatives, valid) = jax.lax.scan(body, present, (order, draws))
    return negatives, valid


def sample_negative_images(key: Array, class_table: Array, class_counts: Array,
                           negative_labels: Array, valid: Array) -> Array:
    """int32 [B, K]: one uniformly random training image of each negative class.

    Like the released `random.choice` over the class's image list, but over the few-shot
    training set (the released JSON probably lists the whole train split;
    docs/reference/method.md#dhno). Invalid slots
    get index 0.
    """
    if negative_labels.shape != valid.shape:
        raise ValueError(f"negative_labels {tuple(negative_labels.shape)} and valid "
                         f"{tuple(valid.shape)} must have the same shape")
    counts = class_counts[negative_labels]
    col = jax.random.randint(key, negative_labels.shape, 0, counts, dtype=jnp.int32)
    idx = class_table[negative_labels, col]
    return jnp.where(valid, idx, 0).astype(jnp.int32)


def interleave(anchors: Array, negatives: Array) -> Array:
    """[B*(K+1), ...]: anchors [B, ...] and negatives [B, K, ...] as [anchor_i, negatives_i...]."""
    if negatives.shape[0] != anchors.shape[0] or negatives.shape[2:] != anchors.shape[1:]:
        raise ValueError(f"negatives {tuple(negatives.shape)} must be [B, K, ...] for anchors "
                         f"{tuple(anchors.shape)}")
    b, k = negatives.shape[:2]
    both = jnp.concatenate([anchors[:, None], negatives.astype(anchors.dtype)], axis=1)
    return both.reshape((b * (k + 1),) + anchors.shape[1:])


def assemble_batch(anchor_labels: Array, negative_labels: Array,
                   valid: Array) -> Tuple[Array, Array]:
    """Slot labels int32 [B*(K+1)] and slot validity bool [B*(K+1)], released order.

    Invalid negative slots stay in place (masked), they are not compacted.
    """
    if negative_labels.shape != valid.shape:
        raise ValueError(f"negative_labels {tuple(negative_labels.shape)} and valid "
                         f"{tuple(valid.shape)} must have the same shape")
    labels = interleave(anchor_labels.astype(jnp.int32), negative_labels.astype(jnp.int32))
    slot_valid = interleave(jnp.ones(anchor_labels.shape, bool), valid.astype(bool))
    return labels, slot_valid


def contrastive_loss(image_features: Array, text_features: Array, valid: Array,
                     logit_scale: Any = 100.0) -> Array:
    """Symmetric InfoNCE of the released step on features: both sides L2-normalised,
    logits = scale * cos (`cosine_logits`, 'highest' precision; the scale multiplies after the
    matmul, as `PromptLearner.pair_logits` does), then `symmetric_infonce`."""
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must both be [M, E]")
    logits = jnp.asarray(logit_scale, jnp.float32) * cosine_logits(
        image_features, normalize(text_features), 1.0)
    return symmetric_infonce(logits, valid)


def symmetric_infonce(logits: Array, valid: Array) -> Array:
    """(CE(logits, arange) + CE(logits^T, arange)) / 2 over the valid slots of [M, M] logits
    (slot i's image against slot j's text).

    Each CE is averaged over the valid slots. Invalid rows are dropped and invalid columns get
    -inf before the softmax, so the result equals the released computation on the compacted
    batch and invalid slots get exactly zero gradient.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be [M, M]; got {tuple(logits.shape)}")
    if valid.shape != logits.shape[:1]:
        raise ValueError(f"valid must be [M]={logits.shape[0]}; got {tuple(valid.shape)}")
    logits = logits.astype(jnp.float32)
    valid = valid.astype(bool)
    pair = valid[:, None] & valid[None, :]
    masked = jnp.where(pair, logits, -jnp.inf)
    diag = jnp.diagonal(logits)

    def ce(mat):  # rows of `mat` are the softmax axis; invalid rows are zeroed to stay finite
        mat = jnp.where(valid[:, None], mat, 0.0)
        per_row = jax.nn.logsumexp(mat, axis=1) - jnp.where(valid, diag, 0.0)
        return jnp.sum(jnp.where(valid, per_row, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    return (ce(masked) + ce(masked.T)) / 2
