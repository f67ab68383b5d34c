"""The non-finite guard: a step whose loss is finite but whose update is not (the loss is taken
before the update) must not be saved, and the stage must not be marked finished."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpc_jax.training import checkpoints, loop
from dpc_jax.training.step import make_mesh
from test_train import small_config


def toy_step(bad_step):
    """A step_fn of the loop's signature: w <- w + 1, finite loss; at `bad_step` (1-based) the
    update writes a NaN into the parameters."""

    def step_fn(state, consts, batch, key):
        del consts, batch, key
        count = state["opt_state"]["count"] + 1
        w = state["params"]["w"] + 1.0
        w = jnp.where(count == bad_step, w.at[0].set(jnp.nan), w)
        new = {"params": {"w": w}, "opt_state": {"count": count}, "state": state["state"]}
        return new, jnp.zeros((1,), jnp.float32), {}

    return step_fn


def run(tmp_path, bad_step, total=8):
    c = small_config()
    c.checkpoint_every_steps = 4
    stage = checkpoints.StageDir(str(tmp_path / "stage"), 1, c)
    return stage, lambda: loop.train_loop(
        name="toy", stage=stage, step_fn=toy_step(bad_step),
        schedule=lambda s: 0.1,
        train_state={"params": {"w": np.zeros(3, np.float32)},
                     "opt_state": {"count": np.zeros((), np.int32)}, "state": {}},
        extra={}, consts={}, n=8, global_batch=1, epoch_steps=total, epochs=1, seed=1,
        mesh=make_mesh(), config=c)


@pytest.mark.parametrize("bad_step", [4, 8])  # a checkpoint step; the stage's last step
def test_a_nan_update_on_a_save_step_is_neither_saved_nor_finished(tmp_path, bad_step):
    stage, train = run(tmp_path, bad_step)
    with pytest.raises(FloatingPointError) as err:
        train()
    msg = str(err.value)
    assert f"after the update of step {bad_step} (seed 1) in params/w" in msg
    assert f"the latest checkpoint is step {None if bad_step == 4 else 4}" in msg
    assert stage.latest_step() == (None if bad_step == 4 else 4)
    assert not os.path.exists(os.path.join(stage.path, "stage.json"))  # not finished
    if bad_step == 8:  # the saved checkpoint is the good one before it
        restored = stage.restore(4, {"params": {"w": np.zeros(3, np.float32)},
                                     "opt_state": {"count": np.zeros((), np.int32)},
                                     "aux": {}})
        np.testing.assert_array_equal(restored["params"]["w"], np.full(3, 4.0, np.float32))


def test_nonfinite_leaves_names_float_leaves_only():
    tree = {"a": jnp.ones(2), "b": {"c": jnp.array([1.0, jnp.inf])}, "n": jnp.arange(3)}
    assert loop.nonfinite_leaves(tree) == ["b/c"]
    assert jax.tree_util.tree_leaves(tree)  # unchanged
