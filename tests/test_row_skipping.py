"""The row-skipping engine (dpc_jax.training.row_skipping): the helpers' exact outputs. The step
that uses them is tested against the step without them in tests/test_dpc_elimination.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpc_jax.training import row_skipping


def test_distinct_labels_gathers_every_valid_slot_from_one_row_per_label():
    labels = jnp.array([7, 3, 7, 0, 3, 9, 9, 2], jnp.int32)
    valid = jnp.array([1, 1, 1, 0, 1, 1, 0, 1], bool)  # class 0 only on an invalid slot
    ids, count, gather = jax.jit(row_skipping.distinct_labels, static_argnums=2)(labels, valid, 10)
    assert int(count) == 4
    np.testing.assert_array_equal(np.asarray(ids), [2, 3, 7, 9, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(ids)[np.asarray(gather)][np.asarray(valid)],
                                  np.asarray(labels)[np.asarray(valid)])
    np.testing.assert_array_equal(np.asarray(gather)[~np.asarray(valid)], [0, 0])


def test_compact_puts_valid_slots_first_in_slot_order():
    valid = jnp.array([0, 1, 1, 0, 0, 1], bool)
    order, count, position = row_skipping.compact(valid)
    assert int(count) == 3
    np.testing.assert_array_equal(np.asarray(order)[:3], [1, 2, 5])
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(position)][np.asarray(valid)],
                                  [1, 2, 5])
    np.testing.assert_array_equal(np.asarray(position)[~np.asarray(valid)], [0, 0, 0])


def test_chunked_rows_computes_only_the_needed_rows():
    rows = jnp.arange(10, dtype=jnp.float32)[:, None] + 1.0
    calls = []

    def fn(x):
        calls.append(x.shape)
        return {"double": 2.0 * x}

    # (count, rows computed with the 'single' tail, with the 'padded' tail), chunks of 4: full
    # chunks, then the rest one row at a time, or the chunk that holds it whole; always row 0.
    cases = ((5, 5, 8), (8, 8, 8), (10, 10, 10), (0, 1, 4), (1, 1, 4), (3, 3, 4), (7, 7, 8))
    for tail, column in (("single", 1), ("padded", 2)):
        calls.clear()
        run = jax.jit(lambda r, n: row_skipping.chunked_rows(fn, r, n, 4, tail=tail))
        for case in cases:
            out = np.asarray(run(rows, case[0])["double"])[:, 0]
            want = np.where(np.arange(10) < case[column], 2.0 * (np.arange(10) + 1.0), 0.0)
            np.testing.assert_array_equal(out, want, err_msg=f"{tail} count={case[0]}")
        # Traced for fixed shapes only (by its output shape, then by the conds), whatever the
        # count: the chunk's, and with the 'single' tail one row's; not one per bucket size.
        assert sorted(set(calls)) == ([(1, 1), (4, 1)] if tail == "single" else [(4, 1)]), calls
    with pytest.raises(ValueError, match="chunk=0"):
        row_skipping.chunked_rows(fn, rows, 1, 0)
    with pytest.raises(ValueError, match="tail='ragged'"):
        row_skipping.chunked_rows(fn, rows, 1, 4, tail="ragged")


@pytest.mark.parametrize("tail", row_skipping.TAILS)
def test_chunked_rows_gradient_is_that_of_the_needed_rows(tail):
    """The custom VJP (`diff` given): the gradient of a loss of the first `count` rows equals
    that of fn on those rows alone, for counts that fill chunks, leave a partial one, or are 0
    (row 0 still runs)."""
    rows = jnp.linspace(-1.0, 1.0, 10)[:, None] * jnp.arange(1.0, 4.0)

    def fn(d, x):
        return jnp.tanh(x @ d["w"] + d["b"])

    d = {"w": jnp.array([[0.3, -0.2], [0.1, 0.5], [-0.4, 0.2]]), "b": jnp.array([0.1, -0.3])}
    chunked = jax.jit(jax.grad(lambda d, n: jnp.sum(
        jnp.where(jnp.arange(10)[:, None] < jnp.maximum(n, 1),
                  row_skipping.chunked_rows(fn, rows, n, 4, diff=d, tail=tail) ** 2, 0.0))))
    for count in (0, 1, 3, 4, 5, 8, 9, 10):
        want = jax.grad(lambda d: jnp.sum(fn(d, rows[:max(count, 1)]) ** 2))(d)
        got = chunked(d, count)
        for key in d:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7,
                                       err_msg=f"{tail} count={count} {key}")
