"""Prompt learners, selected by `config.backbone.name`, and DPC's dual-prompt parameterisation.

Adding a learner: a module `dpc_jax/prompts/<name>.py` with a `PromptLearner` subclass that
declares its `name` and `info` (`base.LearnerInfo`), opts into the capabilities it has
(`capabilities`), and a config file; the registry finds the module, and the trainer, configs
and reports read everything else from the learner.
"""

from dpc_jax.prompts.base import ClassTexts, DualRules, LearnerContext, LearnerInfo, PromptLearner
from dpc_jax.prompts.cocoop import CoCoOp
from dpc_jax.prompts.coop import CoOp
from dpc_jax.prompts.dept import DePT
from dpc_jax.prompts.dpc import DualPrompt
from dpc_jax.prompts.ivlp import IVLP
from dpc_jax.prompts.maple import MaPLe
from dpc_jax.prompts.promptkd import PromptKD
from dpc_jax.prompts.promptsrc import PromptSRC
from dpc_jax.prompts.registry import (build_learner, display_name, get_learner, learner_names,
                                      register_learner, unregister_learner)
from dpc_jax.prompts.zsclip import ZeroShotCLIP

__all__ = ["ClassTexts", "CoCoOp", "CoOp", "DePT", "DualPrompt", "DualRules", "IVLP",
           "LearnerContext", "LearnerInfo", "MaPLe", "PromptLearner", "PromptKD", "PromptSRC",
           "ZeroShotCLIP", "build_learner", "display_name", "get_learner", "learner_names",
           "register_learner", "unregister_learner"]
