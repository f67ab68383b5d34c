"""IVLP backbone + DPC (docs/reference/backbones.md#ivlp, #dpc-on-each-backbone).

Default: the embedded offline world and its shipped CLIP (minutes on a CPU). Its towers have 2
text and 3 image blocks, so the prompt depths there are 2/3 (the learner's `info.world`).
`--config configs/dpc_ivlp.py:dataset=oxford_pets,root=/data` switches to a real dataset with
the published stage-1 settings (PromptSRC repo's IVLP, the config DPC's script names: 4+4
tokens, depth 9/9, B 4, LR 0.0025, 20 epochs) and DPC's stage 2 at the released CoOp/vit_b16_ep20
values (B 4, K 8, 20 epochs, LR .002, w_b .5, w_n 0; no IVLP+DPC config was released).

Arguments (comma-separated key=value): dataset, root, source (coop|tfds), clip.
"""

from dpc_jax.configs import base_to_new, common


def get_config(arg=None):
    c = base_to_new.get_config(arg)
    c.backbone.name = "ivlp"
    c.backbone.n_ctx_text = 4
    c.backbone.n_ctx_vision = 4
    c.backbone.depth_text = 9
    c.backbone.depth_vision = 9
    c.backbone.ctx_init = "a photo of a"
    c.backbone.batch_size = 4
    c.backbone.lr = 0.0025
    c.backbone.epochs = 20
    common.apply_settings(c)
    return c
