"""MMRL backbone + DPC (MMRL: Guo et al., CVPR 2025; `dpc_jax.prompts.mmrl`, docs/mmrl.md).

Default: the embedded offline world and its shipped CLIP (minutes on a CPU; the learner's world
schedule puts the tokens into the last block of the world CLIP's two). `--config
configs/dpc_mmrl.py:dataset=oxford_pets,root=/data` switches to a real dataset with MMRL's
base-to-new settings (ViT-B/16, K 5, d_r 512, tokens from block 6 of 12, alpha 0.7, AdamW LR
1e-3 wd 5e-4, B 4, 10 epochs; ImageNet B 32, 5 epochs; crop scale 0.5-1; the per-dataset
regulariser weight below, EuroSAT d_r 2048) and DPC's stage 2 at the values used for backbones
without a released DPC config (SGD, B 4, K 8, 20 epochs, LR .002, w_b .2, w_n 0), in paper
mode.

Arguments (comma-separated key=value): dataset, root, source (coop|tfds), clip, protocol.
"""

from dpc_jax.configs import base_to_new, common
from dpc_jax.prompts.mmrl import MMRL

# The released per-dataset overrides (trainers/config.py): regulariser weight lam, and EuroSAT's
# wider representation space. Datasets not listed keep the YAML default lam 1.0.
REG_WEIGHTS = {"imagenet": 0.5, "caltech101": 0.5, "oxford_pets": 0.2, "stanford_cars": 7.0,
               "oxford_flowers": 4.0, "food101": 5.0, "fgvc_aircraft": 6.0, "sun397": 6.0,
               "dtd": 6.0, "eurosat": 0.01, "ucf101": 3.0}
REP_DIMS = {"eurosat": 2048}


def dataset_template(dataset: str) -> str:
    """The dataset's hand-crafted template (MMRL's CUSTOM_TEMPLATES are the zero-shot ones)."""
    from dpc_jax.data import registry, world

    domain = world.world_dataset_domain(dataset)
    if domain is not None:
        return world.DOMAINS[domain].templates[0]
    return registry.get(dataset).templates[0]


def get_config(arg=None):
    c = base_to_new.get_config(arg)
    b = MMRL.default_config()
    imagenet = c.dataset == "imagenet"
    b.epochs, b.lr, b.batch_size, b.init_from = (5 if imagenet else 10), 1e-3, \
        (32 if imagenet else 4), ""
    b.optimizer = "adamw"
    b.reg_weight = REG_WEIGHTS.get(c.dataset, 1.0)
    b.rep_dim = REP_DIMS.get(c.dataset, 512)
    b.template = dataset_template(c.dataset)
    c.backbone = b
    c.crop_scale = (0.5, 1.0)
    c.dpc.mode = "paper"
    c.dpc.w_base = 0.2
    common.apply_settings(c)
    return c
