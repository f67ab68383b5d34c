"""Encode only the rows a step needs, inside static shapes: work elimination with exact results.

The batch keeps its static size; the rows that matter are moved to the front and only the chunks
that hold them run, in the forward and the backward pass:
- `distinct_labels`: each distinct label of the valid slots once (its row is encoded once and
  gathered for every slot that has it).
- `compact`: the valid slots moved to the front, so that only they are encoded.
- `chunked_rows`: a function applied to the first `count` rows only, in static chunks under a
  `lax.scan` whose chunks past `count` are skipped by a `lax.cond`, and the rows past the last
  full chunk one at a time (`TAILS`); the values to differentiate (the prompt) are passed to it
  and differentiated through a custom VJP that recomputes each chunk.
- `encode_labels` / `encode_valid_rows`: the two encodings DPC's stage-2 step calls, built from
  the three above.

The towers then see other batch shapes and the gradient sums run in another order, which moves
float32 rounding, so each caller keeps its own switch (`config.dpc.dedupe_text`,
`config.dpc.compact_negatives`, `config.dpc.chunk_tail`).
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


TAILS = ("single", "padded")  # what runs past the last full chunk: see `chunked_rows`


def _zero(s):
    """Zeros shaped like the aval `s`, with its manual axes under shard_map (so that both branches
    of a cond, or a scan's carry, match)."""
    z = jnp.zeros(s.shape, s.dtype)
    varying = getattr(getattr(s, "manual_axis_type", None), "varying", None)
    return jax.lax.pcast(z, tuple(sorted(varying)), to="varying") if varying else z


def _skipping_scan(run, zeros, xs, runs):
    """`run(x_j)` on the steps j of a `lax.scan` over the leading axis of the pytree `xs` for
    which `runs(j)` holds, `zeros()` elsewhere (under a `lax.cond`). Returns the stacked
    outputs."""
    def body(carry, x):
        x_j, j = x
        return carry, jax.lax.cond(runs(j), run, lambda _: zeros(), x_j)

    count = jax.tree_util.tree_leaves(xs)[0].shape[0]
    _, ys = jax.lax.scan(body, None, (xs, jnp.arange(count, dtype=jnp.int32)))
    return ys


class _Plan:
    """Which rows of the zero-padded rows [chunks * chunk, ...] run: chunk j (rows j*chunk ..
    j*chunk + chunk - 1) when `chunk_runs(j)`, under one scan; with the 'single' tail, the rows
    past the last full chunk one at a time under a second scan of chunk - 1 steps (step i runs
    row `single_row(i)` when `single_runs(i)`)."""

    def __init__(self, rows: int, chunk: int, needed, tail: str):
        self.chunk, self.chunks = chunk, -(-rows // chunk)
        self.total = self.chunks * chunk
        self.needed, self.tail = needed, tail
        self.singles = min(chunk - 1, rows) if tail == "single" else 0
        self.start = (needed // chunk) * chunk  # the first row past the full chunks

    def chunk_runs(self, j):
        if self.tail == "single":
            return (j + 1) * self.chunk <= self.needed
        return j * self.chunk < self.needed

    def single_row(self, i):
        return jnp.minimum(self.start + i, self.total - 1)

    def single_runs(self, i):
        return self.start + i < self.needed


def _take_row(flat, r):
    return jax.lax.dynamic_index_in_dim(flat, r, axis=0, keepdims=True)


def _run_rows(call, d, flat, plan: _Plan, shapes):
    """call(d, rows) on the rows of `plan`: outputs shaped like `flat`'s rows [total, ...] (a
    pytree), zeros on the rows that did not run. `shapes`: call's output avals on one chunk and
    on one row (with their manual axes under shard_map)."""
    out_shape, one = shapes
    chunk = plan.chunk
    xs = flat.reshape((plan.chunks, chunk) + flat.shape[1:])
    zeros = lambda: jax.tree_util.tree_map(_zero, out_shape)  # noqa: E731
    ys = _skipping_scan(lambda x: call(d, x), zeros, xs, plan.chunk_runs)
    ys = jax.tree_util.tree_map(lambda y: y.reshape((plan.total,) + y.shape[2:]), ys)
    if not plan.singles:
        return ys
    steps = jnp.arange(plan.singles, dtype=jnp.int32)
    singles = _skipping_scan(lambda i: call(d, _take_row(flat, plan.single_row(i))),
                             lambda: jax.tree_util.tree_map(_zero, one), steps,
                             plan.single_runs)
    where = jnp.where(plan.single_runs(steps), plan.single_row(steps), plan.total)
    return jax.tree_util.tree_map(lambda y, s: y.at[where].set(s[:, 0], mode="drop"),
                                  ys, singles)


def _run_rows_vjp(call, d, flat, ct, plan: _Plan):
    """The gradient with respect to `d` of <call(d, rows), ct> over the rows of `plan`, each
    chunk's (and single row's) forward pass recomputed under its own vjp."""
    chunk = plan.chunk
    d_shape = jax.eval_shape(lambda v: v, d)
    zeros = lambda: jax.tree_util.tree_map(_zero, d_shape)  # noqa: E731

    def pullback(x, ct_x):
        _, vjp = jax.vjp(lambda v: call(v, x), d)
        return vjp(ct_x)[0]

    xs = flat.reshape((plan.chunks, chunk) + flat.shape[1:])
    cts = jax.tree_util.tree_map(lambda c: c.reshape((plan.chunks, chunk) + c.shape[1:]), ct)
    grads = _skipping_scan(lambda a: pullback(*a), zeros, (xs, cts), plan.chunk_runs)
    grad = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads)
    if not plan.singles:
        return grad

    def single(i):
        r = plan.single_row(i)
        return pullback(_take_row(flat, r), jax.tree_util.tree_map(lambda c: _take_row(c, r), ct))

    more = _skipping_scan(single, zeros, jnp.arange(plan.singles, dtype=jnp.int32),
                          plan.single_runs)
    return jax.tree_util.tree_map(lambda g, m: g + jnp.sum(m, axis=0), grad, more)


def chunked_rows(fn, rows: Array, count: Array, chunk: int, diff=None, tail: str = "single"):
    """fn applied to the leading `count` rows of `rows` only (at least the first row): [N, ...]
    outputs, fn's on the rows that ran, zeros elsewhere.

    `fn` maps [n, ...] rows to [n, ...] outputs (a pytree), row by row (no coupling across
    rows); with `diff` given it is called as fn(diff, rows). The rows are cut into static
    chunks of `chunk` (the last one zero-padded); a `lax.scan` over the chunks runs `fn` under
    a `lax.cond` that skips the chunks not needed. `tail` says what happens to the rows past
    the last full chunk:
    - 'single' (the default): they run one row at a time, under a second scan of chunk - 1
      skipping steps, so exactly the needed rows run; `fn` is traced for two shapes ([chunk]
      and [1]: two copies of the tower in the program).
    - 'padded': the chunk that holds them runs whole, up to chunk - 1 zero or unneeded rows
      (one copy of the tower: less to compile, and on an accelerator one row may use the
      device so poorly that a full chunk takes no longer).
    A scan of one traced `fn` rather than a `lax.switch` over bucket sizes: a switch would
    compile one tower per bucket. The first row always runs, so every output row that a
    caller gathers at position 0 is a real output of `fn` (the features of an invalid slot
    stay finite and non-zero).

    With `diff` given, gradients flow to `diff` only (values `fn` closes over are constants:
    differentiating one is an error), through a custom VJP that recomputes each chunk's (and
    single row's) forward pass in the backward scan and skips the others there too.
    Differentiating the plain scan would keep every chunk's residuals, the tower's weights
    included, stacked per chunk and zero-filled in the skipped chunks' branch (jax merges a
    cond's residuals by shape): at ViT-B/16 with 9 text chunks its backward pass took 0.9-1.6 s,
    against 0.17-0.19 s with the custom VJP (docs/dpc.md). Recomputing costs one more forward
    pass of the rows that ran, and the backward keeps one chunk's activations at a time.
    Without `diff`, the plain scan is differentiated (the A/B baseline of the benchmarks).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}; expected a positive int")
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r}; expected one of {', '.join(TAILS)}")
    chunk = int(chunk)
    n = rows.shape[0]
    total = -(-n // chunk) * chunk
    flat = jnp.pad(rows, [(0, total - n)] + [(0, 0)] * (rows.ndim - 1))
    call = (lambda d, x: fn(x)) if diff is None else fn
    d0 = () if diff is None else diff
    shapes = (jax.eval_shape(call, d0, flat[:chunk]),
              jax.eval_shape(call, d0, flat[:1]) if tail == "single" else None)

    def plan(needed):
        return _Plan(n, chunk, needed, tail)

    @jax.custom_vjp
    def scanned(d, flat, needed):
        return _run_rows(call, d, flat, plan(needed), shapes)

    def scanned_fwd(d, flat, needed):
        return _run_rows(call, d, flat, plan(needed), shapes), (d, flat, needed)

    def scanned_bwd(res, ct):
        d, flat, needed = res
        return _run_rows_vjp(call, d, flat, ct, plan(needed)), None, None

    scanned.defvjp(scanned_fwd, scanned_bwd)
    needed = jnp.maximum(count, 1)
    ys = (_run_rows(call, d0, flat, plan(needed), shapes) if diff is None
          else scanned(d0, flat, needed))
    return jax.tree_util.tree_map(lambda y: y[:n], ys)


def encode_labels(encode, labels: Array, valid: Array, num_classes: int, chunk: int,
                  diff=None, tail: str = "single") -> Array:
    """encode(class ids [n]) -> rows [n, ...] (encode(diff, ids) with `diff` given: the values
    to differentiate, see `chunked_rows`), for the slot labels [M], each distinct label of the
    valid slots encoded once and gathered: all `num_classes` classes at once when
    num_classes <= M, else the distinct labels (`distinct_labels`) in chunks of `chunk`
    (`chunked_rows`, with its `tail`). An invalid slot gets a real row (masked by the
    caller)."""
    if num_classes <= labels.shape[0]:
        ids = jnp.arange(num_classes, dtype=jnp.int32)
        return (encode(ids) if diff is None else encode(diff, ids))[labels]
    ids, count, gather = distinct_labels(labels, valid, num_classes)
    return chunked_rows(encode, ids, count, chunk, diff, tail)[gather]


def encode_valid_rows(encode, rows: Array, valid: Array, chunk: int, diff=None,
                      tail: str = "single") -> Array:
    """encode(rows [n, ...]) -> [n, ...] (encode(diff, rows) with `diff` given, see
    `chunked_rows`, with its `tail`) on the valid rows only (`compact`, then `chunked_rows`),
    back in row order; an invalid row gets a real output (that of the first compacted row), to
    be masked by the caller."""
    order, count, position = compact(valid)
    return chunked_rows(encode, rows[order], count, chunk, diff, tail)[position]
