"""Encode only the rows a step needs, inside static shapes: work elimination with exact results.

The batch keeps its static size; the rows that matter are moved to the front and only the chunks
that hold them run, in the forward and the backward pass:
- `distinct_labels`: each distinct label of the valid slots once (its row is encoded once and
  gathered for every slot that has it).
- `compact`: the valid slots moved to the front, so that only they are encoded.
- `chunked_rows`: a function applied to the first `count` rows only, in static chunks under a
  `lax.scan` whose chunks past `count` are skipped by a `lax.cond`; the values to differentiate
  (the prompt) are passed to it and differentiated through a custom VJP that recomputes each
  chunk.
- `encode_labels` / `encode_valid_rows`: the two encodings DPC's stage-2 step calls, built from
  the three above.

The towers then see other batch shapes and the gradient sums run in another order, which moves
float32 rounding, so each caller keeps its own switch (`config.dpc.dedupe_text`,
`config.dpc.compact_negatives`).
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


def distinct_labels(labels: Array, valid: Array, num_classes: int) -> Tuple[Array, Array, Array]:
    """Each distinct label of the valid slots once, with static shapes.

    Args:
      labels: int [M] slot labels in [0, num_classes); valid: bool [M].

    Returns:
      ids int32 [M] (the distinct valid labels in increasing order, then class 0 as padding),
      count int32 [] (how many there are) and gather int32 [M] with ids[gather] == labels on
      the valid slots; an invalid slot gets 0, the position of a real label whenever one slot
      is valid.
    """
    if labels.ndim != 1 or valid.shape != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and valid {tuple(valid.shape)} must "
                         f"both be [M]")
    m = labels.shape[0]
    key = jnp.where(valid, labels.astype(jnp.int32), num_classes)  # invalid slots sort last
    order = jnp.argsort(key, stable=True)
    ranked = key[order]
    first = jnp.concatenate([jnp.ones((1,), bool), ranked[1:] != ranked[:-1]])
    first = first & (ranked < num_classes)
    rank = jnp.cumsum(first.astype(jnp.int32)) - 1  # position of each sorted slot's label
    ids = jnp.zeros((m,), jnp.int32).at[jnp.where(first, rank, m)].set(ranked, mode="drop")
    gather = jnp.zeros((m,), jnp.int32).at[order].set(jnp.maximum(rank, 0))
    return ids, jnp.sum(first).astype(jnp.int32), jnp.where(valid, gather, 0)


def compact(valid: Array) -> Tuple[Array, Array, Array]:
    """The valid slots moved to the front, in slot order.

    Returns order int32 [N] (slot indices, valid ones first: x[order] is the compacted x),
    count int32 [] (valid slots) and position int32 [N] (where each valid slot sits in the
    compacted order; 0 for invalid slots, the position of a real slot whenever one is valid).
    """
    if valid.ndim != 1:
        raise ValueError(f"valid must be [N]; got shape {tuple(valid.shape)}")
    n = valid.shape[0]
    valid = valid.astype(bool)
    order = jnp.argsort(~valid, stable=True).astype(jnp.int32)
    position = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return order, jnp.sum(valid).astype(jnp.int32), jnp.where(valid, position, 0)


def _zero(s):
    """Zeros shaped like the aval `s`, with its manual axes under shard_map (so that both branches
    of a cond, or a scan's carry, match)."""
    z = jnp.zeros(s.shape, s.dtype)
    varying = getattr(getattr(s, "manual_axis_type", None), "varying", None)
    return jax.lax.pcast(z, tuple(sorted(varying)), to="varying") if varying else z


def _chunk_scan(run, zeros, xs, needed, chunk: int):
    """`run(x_j)` on the chunks j with j * chunk < needed, `zeros()` elsewhere, under a
    `lax.scan` over the leading axis of the pytree `xs`. Returns the stacked outputs."""
    def body(carry, x):
        x_j, j = x
        return carry, jax.lax.cond(j * chunk < needed, run, lambda _: zeros(), x_j)

    count = jax.tree_util.tree_leaves(xs)[0].shape[0]
    _, ys = jax.lax.scan(body, None, (xs, jnp.arange(count, dtype=jnp.int32)))
    return ys


def chunked_rows(fn, rows: Array, count: Array, chunk: int, diff=None):
    """fn applied to the leading `count` rows of `rows` only: [N, ...] outputs, fn's on the
    chunks that hold one of those rows (and always on the first chunk), zeros elsewhere.

    `fn` maps [chunk, ...] rows to [chunk, ...] outputs (a pytree), row by row (no coupling
    across rows); with `diff` given it is called as fn(diff, rows_chunk). The rows are cut into
    static chunks of `chunk`, the last one zero-padded; a `lax.scan` over the chunks runs `fn`
    under a `lax.cond` that skips every chunk past `count`. A scan of one traced `fn` rather
    than a `lax.switch` over a few bucket sizes: a switch would compile one tower per bucket.
    The first chunk always runs, so every output row that a caller gathers at position 0 is a
    real output of `fn` (the features of an invalid slot stay finite and non-zero).

    With `diff` given, gradients flow to `diff` only (values `fn` closes over are constants:
    differentiating one is an error), through a custom VJP that recomputes each needed chunk's
    forward pass in the backward scan and skips the others there too. Differentiating the plain
    scan would keep every chunk's residuals, the tower's weights included, stacked per chunk and
    zero-filled in the skipped chunks' branch (jax merges a cond's residuals by shape): at
    ViT-B/16 with 9 text chunks its backward pass took 0.9-1.6 s, against 0.17-0.19 s with the
    custom VJP (docs/dpc.md). Recomputing costs one more
    forward pass of the chunks that ran, and the backward keeps one chunk's activations at a
    time. Without `diff`, the plain scan is differentiated (the A/B baseline of the
    benchmarks).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}; expected a positive int")
    chunk = int(chunk)
    n = rows.shape[0]
    chunks = -(-n // chunk)
    padded = jnp.pad(rows, [(0, chunks * chunk - n)] + [(0, 0)] * (rows.ndim - 1))
    xs = padded.reshape((chunks, chunk) + rows.shape[1:])
    needed = jnp.maximum(count, 1)
    call = (lambda d, x: fn(x)) if diff is None else fn
    d0 = () if diff is None else diff
    out_shape = jax.eval_shape(call, d0, xs[0])

    def forward(d, xs, needed):
        return _chunk_scan(lambda x: call(d, x), lambda: jax.tree_util.tree_map(_zero, out_shape),
                           xs, needed, chunk)

    @jax.custom_vjp
    def scanned(d, xs, needed):
        return forward(d, xs, needed)

    def scanned_fwd(d, xs, needed):
        return forward(d, xs, needed), (d, xs, needed)

    def scanned_bwd(res, ct):
        d, xs, needed = res
        d_shape = jax.eval_shape(lambda v: v, d)

        def run(chunk_and_ct):
            x_j, ct_j = chunk_and_ct
            _, vjp = jax.vjp(lambda v: call(v, x_j), d)
            return vjp(ct_j)[0]

        grads = _chunk_scan(run, lambda: jax.tree_util.tree_map(_zero, d_shape),
                            (xs, ct), needed, chunk)
        grad = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads)
        return grad, None, None

    scanned.defvjp(scanned_fwd, scanned_bwd)
    ys = forward(d0, xs, needed) if diff is None else scanned(d0, xs, needed)
    return jax.tree_util.tree_map(
        lambda y: y.reshape((chunks * chunk,) + y.shape[2:])[:n], ys)


def encode_labels(encode, labels: Array, valid: Array, num_classes: int, chunk: int,
                  diff=None) -> Array:
    """encode(class ids [n]) -> rows [n, ...] (encode(diff, ids) with `diff` given: the values
    to differentiate, see `chunked_rows`), for the slot labels [M], each distinct label of the
    valid slots encoded once and gathered: all `num_classes` classes at once when
    num_classes <= M, else the distinct labels (`distinct_labels`) in chunks of `chunk`
    (`chunked_rows`). An invalid slot gets a real row (masked by the caller)."""
    if num_classes <= labels.shape[0]:
        ids = jnp.arange(num_classes, dtype=jnp.int32)
        return (encode(ids) if diff is None else encode(diff, ids))[labels]
    ids, count, gather = distinct_labels(labels, valid, num_classes)
    return chunked_rows(encode, ids, count, chunk, diff)[gather]


def encode_valid_rows(encode, rows: Array, valid: Array, chunk: int, diff=None) -> Array:
    """encode(rows [n, ...]) -> [n, ...] (encode(diff, rows) with `diff` given, see
    `chunked_rows`) on the valid rows only (`compact`, then `chunked_rows`), back in row order;
    an invalid row gets a real output (that of the first compacted row), to be masked by the
    caller."""
    order, count, position = compact(valid)
    return chunked_rows(encode, rows[order], count, chunk, diff)[position]
