"""Dassl schedule and SGD parity with torch, frozen leaves, and mask rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpc_jax.training import optim
from dpc_jax.training.masks import leaf_paths, trainable_mask, trainable_paths

torch = pytest.importorskip("torch")


def dassl_torch_lrs(lr, max_epoch, warmup_epochs, warmup_lr):
    """Per-epoch lr of Dassl's build_lr_scheduler('cosine') + ConstantWarmupScheduler
    (WARMUP_RECOUNT=True), replicated on torch's own CosineAnnealingLR and stepped once per
    epoch as Dassl's trainers do."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

    class ConstantWarmup(LRScheduler):  # Dassl's _BaseWarmupScheduler + ConstantWarmupScheduler
        def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
            self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
            super().__init__(optimizer)

        def step(self, epoch=None):
            if self.last_epoch >= self.warmup_epoch:
                self.successor.step(epoch)
                self._last_lr = self.successor.get_last_lr()
            else:
                super().step(epoch)

        def get_lr(self):
            if self.last_epoch >= self.warmup_epoch:
                return self.successor.get_last_lr()
            return [self.cons_lr for _ in self.base_lrs]

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = CosineAnnealingLR(optimizer, float(max_epoch))
    if warmup_epochs > 0:
        scheduler = ConstantWarmup(optimizer, scheduler, warmup_epochs, warmup_lr)
    lrs = []
    for _ in range(max_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.asarray(lrs)


@pytest.mark.parametrize("lr, max_epoch, warmup_epochs", [
    (0.002, 10, 1), (0.0035, 10, 1), (0.002, 20, 1), (0.002, 5, 2), (0.01, 4, 0)])
def test_schedule_matches_dassl(lr, max_epoch, warmup_epochs):
    expected = dassl_torch_lrs(lr, max_epoch, warmup_epochs, 1e-5)
    got = optim.dassl_epoch_lrs(lr, max_epoch, warmup_epochs, 1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    steps_per_epoch = 3
    schedule = jax.jit(optim.dassl_schedule(lr, max_epoch, steps_per_epoch, warmup_epochs, 1e-5))
    per_step = np.array([float(schedule(s)) for s in range(max_epoch * steps_per_epoch + 2)])
    # Constant within an epoch; after the last epoch the last value is kept.
    want = np.repeat(expected, steps_per_epoch)
    want = np.concatenate([want, [expected[-1]] * 2])
    np.testing.assert_allclose(per_step, want, rtol=1e-6)


def test_schedule_closed_form_values():
    lrs = optim.dassl_epoch_lrs(0.002, 10, 1, 1e-5)
    assert lrs[0] == 1e-5 and lrs[1] == 0.002
    assert math.isclose(lrs[2], 0.002 * 0.5 * (1 + math.cos(math.pi / 10)), rel_tol=1e-15)
    assert math.isclose(lrs[9], 0.002 * 0.5 * (1 + math.cos(math.pi * 8 / 10)), rel_tol=1e-15)


def test_sgd_matches_torch():
    """Momentum 0.9, L2 weight decay 5e-4 added to the gradient, Dassl schedule: the optax
    optimiser follows torch.optim.SGD step for step."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6)).astype(np.float32)
    target = rng.normal(size=(6,)).astype(np.float32)
    p0 = rng.normal(size=(6,)).astype(np.float32)
    lr, max_epoch, steps_per_epoch = 0.05, 4, 3

    def loss_np_grad(p):  # d/dp 0.5*|a p - t|^2
        return a.T @ (a @ p - target)

    p_t = torch.nn.Parameter(torch.tensor(p0))
    opt_t = torch.optim.SGD([p_t], lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=False)
    lrs = optim.dassl_epoch_lrs(lr, max_epoch, 1, 1e-5)
    torch_traj = []
    for epoch in range(max_epoch):
        for group in opt_t.param_groups:
            group["lr"] = float(lrs[epoch])
        for _ in range(steps_per_epoch):
            opt_t.zero_grad()
            p_t.grad = torch.tensor(loss_np_grad(p_t.detach().numpy()))
            opt_t.step()
            torch_traj.append(p_t.detach().numpy().copy())

    params = {"p": jnp.asarray(p0)}
    mask = {"p": True}
    tx = optim.make_optimizer(lr, max_epoch, steps_per_epoch, mask=mask)
    state = tx.init(params)
    for step in range(max_epoch * steps_per_epoch):
        grads = {"p": jnp.asarray(loss_np_grad(np.asarray(params["p"])))}
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates, mask)
        np.testing.assert_allclose(np.asarray(params["p"]), torch_traj[step], rtol=1e-5,
                                   atol=1e-6)
    assert np.abs(torch_traj[-1] - p0).max() > 0.1  # the run really moved


def test_frozen_leaves_bitwise_unchanged():
    params = {
        "clip": {"w": jnp.array([1.0, -0.0, 3.0]), "b": jnp.array([0.5, np.inf])},
        "prompt": {"backbone": {"ctx": jnp.array([[-0.0, 2.0]])},
                   "parallel": {"ctx": jnp.array([[-0.0, 2.0]])}},
    }
    rules = [("clip/.*", False), ("prompt/backbone/.*", False), ("prompt/parallel/.*", True)]
    mask = trainable_mask(params, rules)
    tx = optim.make_optimizer(0.1, 3, 2, mask=mask, warmup_epochs=0)
    state = tx.init(params)
    # Optimiser state (the momentum trace) exists for the trainable leaf only.
    state_leaves = [x for x in jax.tree_util.tree_leaves(state) if np.ndim(x) > 0]
    assert [x.shape for x in state_leaves] == [(1, 2)]
    original = jax.tree_util.tree_map(lambda x: np.asarray(x).copy(), params)

    @jax.jit
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates, mask), state

    for i in range(4):
        grads = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, 1.0 + i), params)
        params, state = step(params, grads, state)
    for path in ("clip", "prompt/backbone"):
        keys = path.split("/")
        got = params[keys[0]] if len(keys) == 1 else params[keys[0]][keys[1]]
        want = original[keys[0]] if len(keys) == 1 else original[keys[0]][keys[1]]
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(g).view(np.uint32), w.view(np.uint32))
    moved = np.asarray(params["prompt"]["parallel"]["ctx"])
    assert np.all(moved < np.asarray(original["prompt"]["parallel"]["ctx"]))
    assert trainable_paths(params, mask) == ["prompt/parallel/ctx"]


def test_mask_rules():
    tree = {"clip": {"a": 1.0, "b": {"c": 2.0}}, "clip_extra": {"x": 3.0}, "p": [4.0, 5.0]}
    assert leaf_paths(tree) == ["clip/a", "clip/b/c", "clip_extra/x", "p/0", "p/1"]
    # First match wins; fullmatch: 'clip/.*' does not cover 'clip_extra/x'.
    mask = trainable_mask(tree, [("clip/b/.*", True), ("clip/.*", False), ("clip_extra/x", True),
                                 ("p/1", True), (".*", False)])
    assert mask == {"clip": {"a": False, "b": {"c": True}}, "clip_extra": {"x": True},
                    "p": [False, True]}
    with pytest.raises(ValueError, match=r"no mask rule matches 2 parameter\(s\): "
                                         r"\['clip_extra/x', 'p/0'\]"):
        trainable_mask(tree, [("clip/.*", False), ("p/1", True)])
    with pytest.raises(ValueError, match=r"mask rule #1: invalid regex"):
        trainable_mask(tree, [(".*", True), ("(", False)])
    with pytest.raises(ValueError, match=r"mask rule #0 is \('.\*', 1\)"):
        trainable_mask(tree, [(".*", 1)])


def test_bad_optimizer_values_name_the_field():
    mask = {"p": True}
    names = {"lr": "config.dpc.lr", "max_epoch": "config.dpc.epochs",
             "momentum": "config.optim.momentum", "weight_decay": "config.optim.weight_decay",
             "warmup_epochs": "config.optim.warmup_epochs", "warmup_lr": "config.optim.warmup_lr"}
    good = dict(lr=0.1, max_epoch=3, steps_per_epoch=2, momentum=0.9, weight_decay=5e-4,
                warmup_epochs=1, warmup_lr=1e-5)
    cases = [
        (dict(lr=-1.0), r"config\.dpc\.lr=-1\.0; expected a positive number"),
        (dict(lr=float("nan")), r"config\.dpc\.lr=nan"),
        (dict(max_epoch=0), r"config\.dpc\.epochs=0; expected an integer >= 1"),
        (dict(max_epoch=2.5), r"config\.dpc\.epochs=2\.5; expected an integer >= 1"),
        (dict(momentum=1.0), r"config\.optim\.momentum=1\.0; expected a number in \[0, 1\)"),
        (dict(weight_decay=-1e-4), r"config\.optim\.weight_decay=-0\.0001"),
        (dict(warmup_epochs=-1), r"config\.optim\.warmup_epochs=-1; expected an integer >= 0"),
        (dict(warmup_lr=0.0), r"config\.optim\.warmup_lr=0\.0; expected a positive number"),
        (dict(steps_per_epoch=0), r"steps_per_epoch=0; expected an integer >= 1"),
    ]
    for changes, match in cases:
        kwargs = {**good, **changes}
        lr, epochs, steps = kwargs.pop("lr"), kwargs.pop("max_epoch"), kwargs.pop("steps_per_epoch")
        with pytest.raises(ValueError, match=match):
            optim.make_optimizer(lr, epochs, steps, mask=mask, field_names=names, **kwargs)
    # Without field names, errors name the argument.
    with pytest.raises(ValueError, match=r"^warmup_epochs=-1; expected an integer >= 0"):
        optim.make_optimizer(0.1, 3, 2, mask=mask, warmup_epochs=-1)
    # The first update of epoch 0 uses the warmup lr on grad + weight_decay * p.
    tx = optim.make_optimizer(0.1, 3, 2, mask=mask)
    params, grads = {"p": jnp.ones(3)}, {"p": jnp.full(3, 0.5)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["p"]), -1e-5 * (0.5 + 5e-4 * 1.0), rtol=1e-6)


def test_optax_sgd_has_torch_momentum_semantics():
    """optax.sgd(momentum) keeps buf = m*buf + g and steps -lr*buf, as torch does (not the
    (1-m)-damped EMA): two steps with gradients g1, g2 move by -lr*(g1) then -lr*(m*g1 + g2)."""
    tx = optax.sgd(0.1, momentum=0.9)
    params = {"p": jnp.zeros(())}
    state = tx.init(params)
    u1, state = tx.update({"p": jnp.asarray(1.0)}, state, params)
    u2, state = tx.update({"p": jnp.asarray(2.0)}, state, params)
    np.testing.assert_allclose([float(u1["p"]), float(u2["p"])], [-0.1, -0.1 * (0.9 + 2.0)],
                               rtol=1e-6)
