"""PromptSRC backbone + DPC (docs/reference/backbones.md#promptsrc, #dpc-on-each-backbone).

Default: the embedded offline world and its shipped CLIP (minutes on a CPU): IVLP's world
prompts (depth 2/3), 20 epochs at B 32, LR 0.001, GPA (15, 1). On a real dataset
(`--config configs/dpc_promptsrc.py:dataset=oxford_pets,root=/data`) the published settings,
chosen by `variant=`:
- base_to_new (default): 4+4 tokens, depth 9/9, B 4, LR 0.0025, 20 epochs, GPA (15, 1).
- cross_dataset: depth 3/3, GPA (6, 10) (vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets).
- few_shot: 50 epochs, GPA (30, 30) for ImageNet, Caltech101, OxfordPets, Food101, UCF101,
  SUN397 and (45, 5) for StanfordCars, Flowers102, FGVCAircraft, DTD, EuroSAT.
- teacher: the ViT-L/14 variant PromptKD distils from (B 8, LR 0.005, 20 epochs, GPA (15, 1)).
These variants set the schedule and prompt settings; every run here follows the base-to-new
protocol (stages zero-shot, backbone, DPC on base and new classes).
Stage 2 (DPC) is the contrastive loss only, no self-regulating terms and no GPA, as released;
no PromptSRC+DPC config was released, so it takes the values used for such backbones (B 4,
K 8, 20 epochs, LR .002, w_b .2, w_n 0; docs/reference/backbones.md#dpc-on-each-backbone).

Arguments (comma-separated key=value): dataset, root, source (coop|tfds), clip, variant.
"""

from dpc_jax.configs import base_to_new, common
from dpc_jax.evaluation import protocols

VARIANTS = ("base_to_new", "cross_dataset", "few_shot", "teacher")
FEW_SHOT_GPA = {**{d: (30.0, 30.0) for d in ("imagenet", "caltech101", "oxford_pets", "food101",
                                             "ucf101", "sun397")},
                **{d: (45.0, 5.0) for d in ("stanford_cars", "oxford_flowers", "fgvc_aircraft",
                                            "dtd", "eurosat")}}


def get_config(arg=None):
    c = base_to_new.get_config(arg, VARIANTS)
    variant = common.variant(arg, VARIANTS)
    b = c.backbone
    b.name = "promptsrc"
    b.n_ctx_text, b.n_ctx_vision, b.depth_text, b.depth_vision = 4, 4, 9, 9
    b.ctx_init = "a photo of a"
    b.text_loss_weight, b.image_loss_weight = 25.0, 10.0
    b.batch_size, b.lr, b.epochs = 4, 0.0025, 20
    b.gpa_mean, b.gpa_std = 15.0, 1.0
    c.dpc.w_base = 0.2
    if variant == "cross_dataset":
        b.depth_text, b.depth_vision = 3, 3
        b.gpa_mean, b.gpa_std = 6.0, 10.0
    elif variant == "few_shot":
        b.epochs = 50
        b.gpa_mean, b.gpa_std = FEW_SHOT_GPA.get(c.dataset, (30.0, 30.0))
    elif variant == "teacher":
        if not protocols.is_world(c.dataset):
            c.clip.source = common.parse_arguments(arg).get("clip", "ViT-L/14")
            c.clip.tokenizer = "openai/clip-vit-large-patch14"
        b.batch_size, b.lr = 8, 0.005
    common.apply_settings(c)
    return c
