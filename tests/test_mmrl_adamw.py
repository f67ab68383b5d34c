"""Stage 1's AdamW (`config.backbone.optimizer='adamw'`, MMRL's optimiser) against
torch.optim.AdamW under the same Dassl schedule: the parameters after a few steps agree, frozen
leaves stay bitwise unchanged, and an unknown optimiser name is refused with its field."""

import jax.numpy as jnp
import numpy as np
import pytest

from dpc_jax.training import masks, optim

torch = pytest.importorskip("torch")

LR, WD, EPOCHS, STEPS = 1e-3, 5e-4, 3, 2


def test_adamw_matches_torch_under_the_dassl_schedule():
    rng = np.random.RandomState(0)
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(EPOCHS * STEPS)]
    params = {"w": jnp.asarray(w0), "frozen": jnp.asarray(w0[0])}
    mask = masks.trainable_mask(params, [("w", True), ("frozen", False)])
    tx = optim.make_optimizer(LR, EPOCHS, STEPS, mask=mask, weight_decay=WD, warmup_epochs=1,
                              warmup_lr=1e-5, kind="adamw")
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g), "frozen": jnp.ones(3)}, state, params)
        params = optim.apply_updates(params, updates, mask)

    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.AdamW([p], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    lrs = optim.dassl_epoch_lrs(LR, EPOCHS, 1, 1e-5)
    for step, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = float(lrs[step // STEPS])
        p.grad = torch.from_numpy(g)
        opt.step()
    np.testing.assert_allclose(np.asarray(params["w"]), p.detach().numpy(), rtol=1e-6,
                               atol=1e-7)
    assert np.abs(np.asarray(params["w"]) - w0).max() > 1e-4  # it moved
    np.testing.assert_array_equal(np.asarray(params["frozen"]), w0[0])


def test_an_unknown_optimiser_is_refused_with_its_field():
    params = {"w": jnp.zeros(2)}
    mask = masks.trainable_mask(params, [(".*", True)])
    with pytest.raises(ValueError, match=r"config\.backbone\.optimizer='adam'; allowed values: "
                                         r"\['sgd', 'adamw'\]"):
        optim.make_optimizer(LR, 2, 1, mask=mask, kind="adam",
                             field_names={"kind": "config.backbone.optimizer"})


def test_the_run_refuses_an_unknown_optimiser_before_training():
    import os

    from dpc_jax.training import train_lib
    from dpc_jax.training.checks import check_config
    from helpers import REPO

    c = train_lib.load_config(os.path.join(REPO, "configs", "dpc_mmrl.py"))
    check_config(c)
    c.backbone.optimizer = "adam"
    with pytest.raises(ValueError, match=r"config\.backbone\.optimizer='adam'; allowed values"):
        check_config(c)
