"""CoOp backbone + DPC (docs/reference/method.md#stage-2-settings,
docs/reference/backbones.md#coop).

Default: the embedded offline world and its shipped CLIP (runs in a few minutes on a CPU).
`--config configs/dpc_coop.py:dataset=oxford_pets,root=/data` switches to a real dataset in the
CoOp layout with the paper's settings (ViT-B/16, CoOp 4 ctx "a photo of a" for 100 epochs at
B 32, then DPC B 4, K 8, 20 epochs, LR .002, w_b .5, w_n 0: the released
CoOp/vit_b16_ep20 config).

Arguments (comma-separated key=value): dataset, root, source (coop|tfds), clip (a CLIP source for
`dpc_jax.convert.load_clip`), protocol (base_to_new | few_shot | cross_dataset |
domain_generalisation, every method's config takes it; dpc_jax/evaluation/protocols.py).
"""

from dpc_jax.configs import base_to_new, common


def get_config(arg=None):
    c = base_to_new.get_config(arg)
    # CoOp vit_b16_ep100 with 4 context tokens (the DPC paper's CoOp backbone).
    c.backbone.name = "coop"
    c.backbone.n_ctx = 4
    c.backbone.ctx_init = "a photo of a"
    c.backbone.csc = False
    common.apply_settings(c)
    return c
