"""`ahead.AheadProgram`: a program compiled in the background from stand-in arguments serves
the calls whose arguments match them, and anything else falls back to the jitted function.
(The trainer's use of it, stage 2 compiled while stage 1 trains, is tested end to end in
tests/test_train.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpc_jax.training.ahead import AheadProgram


def _program():
    def stretch(state, x):
        return {"w": state["w"] + x.sum()}, x * 2.0

    return jax.jit(stretch, donate_argnums=(0,))


def _state():
    return {"w": jnp.arange(3, dtype=jnp.float32)}


def test_matching_arguments_run_the_program_compiled_ahead():
    prog = AheadProgram(_program())
    stand_in = (jax.eval_shape(_state), jax.ShapeDtypeStruct((4,), jnp.float32))
    prog.start(stand_in)
    assert prog.started
    prog.start(stand_in)  # once per program: a second start is ignored
    state, y = prog(_state(), jnp.ones(4))
    assert prog.source == "ahead" and prog.error is None
    want_state, want_y = _program()(_state(), jnp.ones(4))
    np.testing.assert_array_equal(state["w"], want_state["w"])
    np.testing.assert_array_equal(y, want_y)
    state, _ = prog(state, jnp.full(4, 2.0))  # later calls reuse it
    assert prog.source == "ahead"
    np.testing.assert_array_equal(state["w"], np.arange(3) + 4.0 + 8.0)


@pytest.mark.parametrize("x", [jnp.ones(5), jnp.ones(4, jnp.int32)])
def test_other_arguments_fall_back_to_the_jitted_function_with_nothing_donated(x):
    prog = AheadProgram(_program())
    prog.start((jax.eval_shape(_state), jax.ShapeDtypeStruct((4,), jnp.float32)))
    state = _state()
    out, y = prog(state, x)  # the executable refuses them before running: state is intact
    assert prog.source == "jit"
    np.testing.assert_array_equal(out["w"], np.arange(3) + float(np.sum(x)))
    assert y.shape == x.shape
    assert state["w"].is_deleted()  # donated once, by the jitted call


def test_a_failed_ahead_compilation_is_kept_and_the_jitted_function_serves():
    prog = AheadProgram(_program())
    prog.start(({"v": jax.ShapeDtypeStruct((3,), jnp.float32)},  # no 'w': tracing fails
                jax.ShapeDtypeStruct((4,), jnp.float32)))
    state, _ = prog(_state(), jnp.ones(4))
    assert isinstance(prog.error, KeyError)
    assert prog.source == "jit"
    np.testing.assert_array_equal(state["w"], np.arange(3) + 4.0)


def test_without_a_start_it_is_the_jitted_function():
    prog = AheadProgram(_program())
    assert not prog.started and prog.source is None
    state, _ = prog(_state(), jnp.ones(4))
    assert prog.source == "jit"
    assert prog.lower(_state(), jnp.ones(4)).compile() is not None
    np.testing.assert_array_equal(state["w"], np.arange(3) + 4.0)
