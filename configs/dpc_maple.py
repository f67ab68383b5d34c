"""MaPLe backbone + DPC (docs/reference/backbones.md#maple, #dpc-on-each-backbone).

Default: the embedded offline world and its shipped CLIP (minutes on a CPU). Its text tower has
2 blocks, so the coupling depth there is J = 2 (the learner's `info.world`).
`--config configs/dpc_maple.py:dataset=oxford_pets,root=/data` switches to a real dataset with
MaPLe's published settings (J 9, 2 context tokens from "a photo of a", B 4, LR 0.0035, 5 epochs)
and DPC's stage 2 at the values used for backbones without a released DPC config
(B 4, K 8, 20 epochs, LR .002, w_b .2, w_n 0; docs/reference/backbones.md#dpc-on-each-backbone).

Arguments (comma-separated key=value): dataset, root, source (coop|tfds), clip.
"""

from dpc_jax.configs import base_to_new, common


def get_config(arg=None):
    c = base_to_new.get_config(arg)
    c.backbone.name = "maple"
    c.backbone.n_ctx = 2
    c.backbone.depth = 9
    c.backbone.ctx_init = "a photo of a"
    c.backbone.batch_size = 4
    c.backbone.lr = 0.0035
    c.backbone.epochs = 5
    c.dpc.w_base = 0.2
    common.apply_settings(c)
    return c
