"""CoCoOp backbone (docs/reference/backbones.md#cocoop); DPC's stage 2 is not offered on it (see
`dpc_jax/prompts/cocoop.py`), so the stages are zero-shot and backbone.

Default: the embedded offline world and its shipped CLIP. On a real dataset
(`--config configs/cocoop.py:dataset=oxford_pets,root=/data`): 4 context tokens from
"a photo of a", the meta-net E -> E/16 -> W_t, 10 epochs, LR 0.002, B 1 (upstream's
vit_b16_c4_ep10_batch1; DPC's copy of this config says B 8).

Arguments (comma-separated key=value): dataset, root, source (coop|tfds), clip.
"""

from dpc_jax.configs import base_to_new, common


def get_config(arg=None):
    c = base_to_new.get_config(arg)
    c.stages = "zeroshot,backbone"
    c.backbone.name = "cocoop"
    c.backbone.n_ctx = 4
    c.backbone.ctx_init = "a photo of a"
    c.backbone.csc = False
    c.backbone.class_token_position = "end"
    c.backbone.batch_size = 1
    c.backbone.lr = 0.002
    c.backbone.epochs = 10
    common.apply_settings(c)
    return c
