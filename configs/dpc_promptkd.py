"""PromptKD backbone + DPC (docs/reference/backbones.md#promptkd, #dpc-on-each-backbone,
#released-code-defects).

Default: the embedded offline world. The student is the shipped world CLIP; the teacher is
the larger shipped `world_teacher` CLIP with a PromptSRC prompt that the run trains per seed
(W/seed_N/teacher/, the 'teacher' stage reports its accuracy). Depths, epochs and LRs there:
the learner's `info.world`.

On a real dataset (`--config configs/dpc_promptkd.py:dataset=oxford_pets,root=/data`):
- teacher: PromptSRC on ViT-L/14 (4+4 tokens, depth 9/9), read from the released teacher
  checkpoint with `--config.backbone.teacher.init_from=<PromptKD>/teacher_model/OxfordPets/
  VLPromptLearner/model-best.pth.tar`, or trained here (B 8, LR 0.005, 20 epochs, GPA (15, 1));
- student (stage 1): ViT-B/16 visual prompts 4 tokens, depth 9, projector 512 -> 768 -> 768;
  B 8 (DPC's README runs 32), LR 0.005, 20 epochs; KD weight 1000 (200 for FGVCAircraft,
  Flowers102, DTD), T 1; transductive: the training split of all classes, labels unused;
- DPC (stage 2): B 4, K 8, 20 epochs, LR 0.002, w_b 0.2, w_n 0 (the released README config).
Stages: zeroshot, teacher, backbone, dpc. `config.dpc.released.*` reproduces the released
PromptKD+DPC defects one by one (all off: fixed; see `dpc_jax.prompts.promptkd`).

Arguments (comma-separated key=value): dataset, root, source (coop|tfds), clip (the student).
"""

import ml_collections

from dpc_jax.configs import base_to_new, common
from dpc_jax.evaluation import protocols
from dpc_jax.prompts.promptkd import RELEASED_OPTIONS, PromptKD

SMALL_KD_WEIGHT = {"fgvc_aircraft": 200.0, "oxford_flowers": 200.0, "dtd": 200.0}


def get_config(arg=None):
    c = base_to_new.get_config(arg)
    c.stages = "zeroshot,teacher,backbone,dpc"
    b = PromptKD.default_config()
    b.epochs, b.lr, b.batch_size, b.init_from = 20, 0.005, 8, ""
    b.kd_weight = SMALL_KD_WEIGHT.get(c.dataset, 1000.0)
    if protocols.is_world(c.dataset):
        b.teacher_clip.source = "world_teacher"
    c.backbone = b
    c.dpc.w_base, c.dpc.w_new, c.dpc.lr, c.dpc.epochs = 0.2, 0.0, 0.002, 20
    c.dpc.released = ml_collections.ConfigDict({k: False for k in RELEASED_OPTIONS})
    common.apply_settings(c)
    return c
