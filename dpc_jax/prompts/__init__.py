"""Prompt learners, selected by `config.backbone.name`, and DPC's dual-prompt parameterisation.

Adding a learner: a module `dpc_jax/prompts/<name>.py` with a `PromptLearner` subclass, its
class in the tuple registered below (or `register_learner(cls)` from outside the package) and a
config; the trainer reads everything else from the learner's hooks.
"""

from __future__ import annotations

from dpc_jax.prompts.base import ClassTexts, DualRules, PromptLearner
from dpc_jax.prompts.cocoop import CoCoOp
from dpc_jax.prompts.coop import CoOp
from dpc_jax.prompts.dept import DePT
from dpc_jax.prompts.dpc import DualPrompt
from dpc_jax.prompts.ivlp import IVLP
from dpc_jax.prompts.maple import MaPLe
from dpc_jax.prompts.promptkd import PromptKD
from dpc_jax.prompts.promptsrc import PromptSRC
from dpc_jax.prompts.registry import build_learner, get_learner, register_learner
from dpc_jax.prompts.zsclip import ZeroShotCLIP

for _cls in (CoOp, CoCoOp, DePT, IVLP, MaPLe, PromptSRC, PromptKD):
    register_learner(_cls)
del _cls

__all__ = ["ClassTexts", "CoCoOp", "CoOp", "DePT", "DualPrompt", "DualRules", "IVLP", "MaPLe", "PromptLearner",
           "PromptKD", "PromptSRC", "ZeroShotCLIP", "build_learner", "get_learner", "register_learner"]
