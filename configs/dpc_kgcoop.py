"""KgCoOp backbone + DPC (KgCoOp: Yao et al., CVPR 2023; `dpc_jax.prompts.kgcoop`).

Default: the embedded offline world and its shipped CLIP (minutes on a CPU; the learner's world
schedule is CoOp's). `--config configs/dpc_kgcoop.py:dataset=oxford_pets,root=/data` switches to
a real dataset with the released KgCoOp base-to-new settings (ViT-B/16, 4 context tokens from
"a photo of a", kg_weight 8.0, SGD LR 0.002, B 128, 100 epochs) and DPC's stage 2 at the
released CoOp/vit_b16_ep20 values (B 4, K 8, 20 epochs, LR .002, w_b .5, w_n 0; no KgCoOp+DPC
config was released). A dataset with fewer than 128 few-shot images (EuroSAT: 80) needs a
smaller `--config.backbone.batch_size`.

Arguments (comma-separated key=value): dataset, root, source (coop|tfds), clip, protocol.
"""

from dpc_jax.configs import base_to_new, common
from dpc_jax.prompts.kgcoop import KgCoOp


def get_config(arg=None):
    c = base_to_new.get_config(arg)
    b = KgCoOp.default_config()
    b.epochs, b.lr, b.batch_size, b.init_from = 100, 0.002, 128, ""
    c.backbone = b
    common.apply_settings(c)
    return c
