"""Every config builds and passes the training code's checks, for the world and every dataset."""

import os

import pytest

from dpc_jax.data import registry
from dpc_jax.training import train_lib

DPC_COOP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        "dpc_coop.py")


def get_config(arg=None):
    """configs/dpc_coop.py through the loader the command line uses."""
    return train_lib.load_config(DPC_COOP + (f":{arg}" if arg else ""))


def test_world_default():
    c = get_config()
    train_lib.check_config(c)
    assert (c.dataset, c.clip.source, c.clip.tokenizer) == ("world", "world", "world")
    assert c.stages == "zeroshot,backbone,dpc" and c.seeds == "1"


@pytest.mark.parametrize("name", sorted(registry.DATASETS))
def test_every_dataset_builds_with_the_paper_settings(name):
    c = get_config(f"dataset={name},root=/data")
    train_lib.check_config(c)
    assert c.dataset == name and c.root == "/data" and c.clip.source == "ViT-B/16"
    # CoOp/vit_b16_ep20 of the released configs (DPC_PROTOCOL.md §4) and CoOp's stage 1 (§5).
    assert (c.batch_size, c.dpc.epochs, c.dpc.lr, c.dpc.w_base, c.dpc.w_new) == \
        (4, 20, 0.002, 0.5, 0.0)
    assert (c.backbone.n_ctx, c.backbone.ctx_init, c.backbone.epochs, c.backbone.batch_size,
            c.backbone.lr) == (4, "a photo of a", 100, 32, 0.002)
    assert (c.optim.momentum, c.optim.weight_decay, c.optim.warmup_lr) == (0.9, 5e-4, 1e-5)
    assert c.dhno.top_k == (4 if name == "eurosat" else 8)


def test_bad_config_arguments():
    with pytest.raises(ValueError, match="unknown config argument 'datset'"):
        get_config("datset=dtd")
    with pytest.raises(ValueError, match="expected key=value"):
        get_config("dtd")
    with pytest.raises(Exception, match="no_such_dataset"):
        get_config("dataset=no_such_dataset")
