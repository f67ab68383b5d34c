"""Dassl's optimiser and learning-rate schedule (docs/reference/method.md#optimiser-and-schedule)
as optax transformations.

Optimiser: torch.optim.SGD(momentum, weight_decay, nesterov=False), i.e. per step
    g <- grad + weight_decay * p;  buf <- momentum * buf + g  (buf = g at the first step);
    p <- p - lr * buf.
optax.chain(add_decayed_weights(wd), sgd(lr, momentum)) computes the same: optax's momentum
`trace` starts at zero, so its first value is g as torch's buffer is, and the update is -lr*trace.

Schedule: Dassl's CosineAnnealingLR(T_max=max_epoch) wrapped in ConstantWarmupScheduler
(warmup_epoch, cons_lr, WARMUP_RECOUNT=True), stepped once at the end of every epoch. During the
warmup epochs the wrapper sets cons_lr; at epoch `warmup_epochs` it hands over the successor's
lr, which is still at its first value LR; each later step advances the successor by one epoch.
So with e the 0-based epoch and w = warmup_epochs, T = max_epoch:
    lr(e) = warmup_lr                                   for e < w
    lr(e) = LR * 0.5 * (1 + cos(pi * (e - w) / T))      for e >= w
(w = 1: lr(0) = 1e-5, lr(1) = LR, lr(2) = LR*0.5*(1+cos(pi/T)), ...; the cosine never reaches
its minimum within the run because it starts one epoch late.) The learning rate is constant
within an epoch; past the last epoch it stays at the last epoch's value.

Frozen leaves: the optimiser is an optax.multi_transform whose 'frozen' branch is set_to_zero,
so frozen leaves get exactly-zero updates and no optimiser state (optax.masked would instead pass
their raw gradients through). `apply_updates` then returns frozen leaves themselves: p + 0.0
would turn -0.0 into +0.0, so optax.apply_updates is not bitwise for them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpc_jax.training.masks import FROZEN, TRAINABLE, optax_labels

OPTIMIZERS = ("sgd", "adamw")


def check_kind(kind: str, field: str) -> None:
    """Refuse an optimiser other than those of OPTIMIZERS, naming the config field."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"{field}={kind!r}; allowed values: {list(OPTIMIZERS)}")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
            and math.isfinite(x))


def _validate(names: dict, lr, max_epoch, steps_per_epoch, momentum, weight_decay,
              warmup_epochs, warmup_lr) -> None:
    checks = [
        ("lr", lr, _is_number(lr) and lr > 0, "a positive number"),
        ("max_epoch", max_epoch, _is_int(max_epoch) and max_epoch >= 1, "an integer >= 1"),
        ("steps_per_epoch", steps_per_epoch, _is_int(steps_per_epoch) and steps_per_epoch >= 1,
         "an integer >= 1"),
        ("momentum", momentum, _is_number(momentum) and 0 <= momentum < 1,
         "a number in [0, 1)"),
        ("weight_decay", weight_decay, _is_number(weight_decay) and weight_decay >= 0,
         "a number >= 0"),
        ("warmup_epochs", warmup_epochs, _is_int(warmup_epochs) and warmup_epochs >= 0,
         "an integer >= 0"),
        ("warmup_lr", warmup_lr, _is_number(warmup_lr) and warmup_lr > 0, "a positive number"),
    ]
    for arg, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"{names.get(arg, arg)}={value!r}; expected {expected}")


def dassl_epoch_lrs(lr: float, max_epoch: int, warmup_epochs: int = 1,
                    warmup_lr: float = 1e-5) -> np.ndarray:
    """Learning rate of each epoch e = 0..max_epoch-1 (float64); see the module docstring."""
    lrs = [warmup_lr if e < warmup_epochs
           else lr * 0.5 * (1.0 + math.cos(math.pi * (e - warmup_epochs) / max_epoch))
           for e in range(max_epoch)]
    return np.asarray(lrs, np.float64)


def warmup_note(stage: str, lr: float, epochs: int, warmup_epochs: int,
                warmup_lr: float) -> Optional[str]:
    """A line saying so when the warm-up takes half of a stage's epochs or more (a short smoke
    run, whose prompt then barely moves from where it starts); None otherwise. `stage` is the
    config group of the stage's lr and epochs ('backbone', 'dpc')."""
    if warmup_epochs < 1 or 2 * warmup_epochs < epochs:
        return None
    lrs = dassl_epoch_lrs(lr, epochs, warmup_epochs, warmup_lr)
    shown = ", ".join(f"{x:.3g}" for x in lrs[:8]) + (", ..." if len(lrs) > 8 else "")
    return (f"config.optim.warmup_epochs={warmup_epochs} of config.{stage}.epochs={epochs}: "
            f"{warmup_epochs} of the stage's {epochs} epoch(s) train at config.optim.warmup_lr="
            f"{warmup_lr:g} instead of config.{stage}.lr={lr:g} (its epochs' learning rates: "
            f"{shown}); for a short run, set more epochs or --config.optim.warmup_epochs=0")


def dassl_schedule(lr: float, max_epoch: int, steps_per_epoch: int, warmup_epochs: int = 1,
                   warmup_lr: float = 1e-5) -> Callable[[Any], jax.Array]:
    """optax schedule of the update count: Dassl's per-epoch lr, constant within an epoch."""
    _validate({}, lr, max_epoch, steps_per_epoch, 0.0, 0.0, warmup_epochs, warmup_lr)
    table = jnp.asarray(dassl_epoch_lrs(lr, max_epoch, warmup_epochs, warmup_lr), jnp.float32)

    def schedule(count):
        epoch = jnp.clip(jnp.asarray(count) // steps_per_epoch, 0, max_epoch - 1)
        return table[epoch]

    return schedule


def make_optimizer(lr: float, max_epoch: int, steps_per_epoch: int, *, mask,
                   momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: int = 1,
                   warmup_lr: float = 1e-5, field_names: Optional[Dict[str, str]] = None,
                   lr_scales=None, kind: str = "sgd") -> optax.GradientTransformation:
    """SGD with L2 weight decay (`kind='adamw'`: Dassl's AdamW, betas 0.9/0.999, decoupled
    weight decay, as torch.optim.AdamW) and Dassl's schedule; leaves where `mask` is False (see
    `dpc_jax.training.masks.trainable_mask`) get zero updates and no optimiser state.
    `lr_scales`: an optional pytree of floats shaped like the parameters, multiplying each
    leaf's update (its learning rate: SGD's update is linear in it; e.g. a head at 6.5x).

    field_names: the config field each argument came from (e.g. {'lr': 'config.dpc.lr',
      'warmup_epochs': 'config.optim.warmup_epochs'}), so that errors name it.
    """
    _validate(field_names or {}, lr, max_epoch, steps_per_epoch, momentum, weight_decay,
              warmup_epochs, warmup_lr)
    check_kind(kind, (field_names or {}).get("kind", "optimizer"))
    schedule = dassl_schedule(lr, max_epoch, steps_per_epoch, warmup_epochs, warmup_lr)
    parts = []
    if kind == "adamw":  # torch: p *= 1 - lr*wd, then the Adam step; optax's adamw is the same
        parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                                 weight_decay=weight_decay))
    else:
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay))  # added to the gradient
        parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=False))
    tx = optax.multi_transform({TRAINABLE: optax.chain(*parts), FROZEN: optax.set_to_zero()},
                               optax_labels(mask))
    if lr_scales is not None and any(f != 1.0 for f in jax.tree_util.tree_leaves(lr_scales)):
        tx = optax.chain(tx, _scale_leaves(lr_scales))
    return tx


def _scale_leaves(factors) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, f: u if f == 1.0 else u * f, updates,
                                      factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def apply_updates(params, updates, mask):
    """params + updates for trainable leaves; frozen leaves are returned unchanged (the same
    arrays, bitwise, whatever their values). `mask` holds Python bools (static under jit), as
    `trainable_mask` returns."""
    return jax.tree_util.tree_map(
        lambda p, u, m: jnp.asarray(p + u).astype(jnp.asarray(p).dtype) if m else p,
        params, updates, mask)
