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


def test_chunked_rows_computes_only_the_chunks_holding_the_first_count_rows():
    rows = jnp.arange(10, dtype=jnp.float32)[:, None] + 1.0
    calls = []

    def fn(x):
        calls.append(x.shape)
        return {"double": 2.0 * x}

    run = jax.jit(lambda r, n: row_skipping.chunked_rows(fn, r, n, 4))
    for count, computed in ((5, 8), (8, 8), (10, 10), (0, 4), (1, 4)):
        out = np.asarray(run(rows, count)["double"])[:, 0]
        want = np.where(np.arange(10) < computed, 2.0 * (np.arange(10) + 1.0), 0.0)
        np.testing.assert_array_equal(out, want, err_msg=f"count={count}")
    # Traced for one chunk shape only (by its output shape and by the cond), whatever the
    # count: one fn in the compiled step, not one per bucket size.
    assert calls == [(4, 1)] * 2
    with pytest.raises(ValueError, match="chunk=0"):
        row_skipping.chunked_rows(fn, rows, 1, 0)
