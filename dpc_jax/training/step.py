"""The per-device training step mapped over the mesh (`dpc_jax.mesh`).

The step is a per-device function (it computes exactly the released code's single-GPU batch,
DHNO included) mapped over a 1-D ('data',) mesh of all devices with `jax.shard_map`; gradients
and the learner's mutable state are averaged with `lax.pmean`. One code path serves 1 device,
N devices and N hosts. A train state is a plain dict {'params', 'opt_state', 'state'}.
`map_steps` runs a stretch of such steps in one call (a loop on device), so that a small model
is not bound by one dispatch and one host read per step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dpc_jax.training import optim

# objective(params, state, consts, batch, key) -> (loss, (metrics, new_state))
Objective = Callable


def make_per_device_step(objective: Objective, optimizer: optax.GradientTransformation, mask,
                         under_shard_map: bool = True):
    """The update of one device: local loss, gradients averaged over 'data', optimiser step.
    Frozen leaves (mask False) are returned as they are, so they stay bitwise unchanged.
    `under_shard_map=False` is for running the same function under `jax.vmap(axis_name='data')`
    (the tests' one-device emulation), where there is no varying/invariant distinction.

    per_device(train_state, consts, batch, key) -> (train_state, losses [devices],
    metrics [devices]), all replicated.
    """

    def per_device(train_state, consts, batch, key):
        key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        params, state = train_state["params"], train_state["state"]
        # Differentiate a device-varying view of the replicated parameters: the gradient of an
        # invariant input inside shard_map would otherwise arrive already summed over devices
        # (the transpose of the implicit cast to varying is a psum), and pmean of that sum
        # would give B x devices times the per-device mean.
        local = jax.lax.pcast(params, "data", to="varying") if under_shard_map else params
        (loss, (metrics, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            local, state, consts, batch, key)
        grads = jax.lax.pmean(grads, "data")
        if new_state is not state:  # e.g. BatchNorm statistics of this device's batch
            new_state = jax.lax.pmean(new_state, "data")
        updates, opt_state = optimizer.update(grads, train_state["opt_state"], params)
        params = optim.apply_updates(params, updates, mask)
        # Every device's loss, gathered (replicated), so any host can read and log them all.
        out = {"params": params, "opt_state": opt_state, "state": new_state}
        return out, _gather(loss), jax.tree_util.tree_map(_gather, metrics)

    return per_device


def map_step(per_device: Callable, mesh: Mesh, donate: bool = True):
    """jit(shard_map(per_device)): train state and consts replicated, the batch sharded."""
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data"), P()),
                           out_specs=(P(), P(), P()))
    return jax.jit(mapped, donate_argnums=(0,) if donate else ())


def map_steps(step_fn: Callable, donate: bool = True):
    """A stretch of up to S steps of `step_fn` (a `map_step` function) in one jitted call:

        steps_fn(train_state, consts, batches, key, first, count)
            -> (train_state, losses [S, devices], metrics {name: [S, devices]})

    runs steps first, ..., first + count - 1 (1 <= count <= S) in a `lax.fori_loop` on device;
    step first + i takes `batches[:, i]` (every leaf [global_batch, S, ...]: the batch axis
    first, so the stretch is placed by `shard_batch` like one step's batch) and the key
    `fold_in(key, first + i)`, the key the per-step loop gave it. Rows count.. of the outputs
    are zeros. The trip count is an argument, not a shape, so every stretch length up to S is
    one compiled program; the loop body is the step, so the numbers are the per-step calls'."""

    def steps_fn(train_state, consts, batches, key, first, count):
        def batch_at(i):
            return jax.tree_util.tree_map(
                lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False), batches)

        capacity = jax.tree_util.tree_leaves(batches)[0].shape[1]
        _, loss_shape, metric_shapes = jax.eval_shape(step_fn, train_state, consts,
                                                      batch_at(0), key)
        stacked = jax.tree_util.tree_map(
            lambda s: jnp.zeros((capacity, *s.shape), s.dtype), (loss_shape, metric_shapes))

        def body(i, carry):
            state, (losses, metrics) = carry
            state, loss, m = step_fn(state, consts, batch_at(i),
                                     jax.random.fold_in(key, first + i))
            rows = jax.tree_util.tree_map(lambda buf, v: buf.at[i].set(v), (losses, metrics),
                                          (loss, m))
            return state, rows

        state, (losses, metrics) = jax.lax.fori_loop(0, count, body, (train_state, stacked))
        return state, losses, metrics

    return jax.jit(steps_fn, donate_argnums=(0,) if donate else ())


def _gather(x):
    """[devices] vector of a per-device scalar, replicated (a psum of one-hot placements, whose
    result shard_map knows to be the same on every device)."""
    n = jax.lax.axis_size("data")
    placed = jax.nn.one_hot(jax.lax.axis_index("data"), n, dtype=jnp.float32)
    return jax.lax.psum(placed * x.astype(jnp.float32), "data")
