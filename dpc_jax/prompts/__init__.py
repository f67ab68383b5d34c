"""Prompt learners, selected by `config.backbone.name`, and DPC's dual-prompt parameterisation.

Adding a learner: a module `dpc_jax/prompts/<name>.py` with a `PromptLearner` subclass, one
line in `_LEARNERS` below (or `register_learner(cls)` from outside the package) and a config;
the trainer reads everything else from the learner's hooks.
"""

from __future__ import annotations

from typing import Dict, Type

import ml_collections

from dpc_jax.prompts.base import ClassTexts, DualRules, PromptLearner
from dpc_jax.prompts.cocoop import CoCoOp
from dpc_jax.prompts.coop import CoOp
from dpc_jax.prompts.dept import DePT
from dpc_jax.prompts.dpc import DualPrompt
from dpc_jax.prompts.ivlp import IVLP
from dpc_jax.prompts.maple import MaPLe
from dpc_jax.prompts.promptkd import PromptKD
from dpc_jax.prompts.promptsrc import PromptSRC
from dpc_jax.prompts.zsclip import ZeroShotCLIP

_LEARNERS: Dict[str, Type[PromptLearner]] = {
    cls.name: cls for cls in (CoOp, CoCoOp, DePT, IVLP, MaPLe, PromptSRC, PromptKD)}


def register_learner(cls: Type[PromptLearner]) -> Type[PromptLearner]:
    """Make `cls` selectable as `config.backbone.name = cls.name` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, PromptLearner)):
        raise TypeError(f"{cls!r} is not a PromptLearner subclass")
    if cls.name in _LEARNERS and _LEARNERS[cls.name] is not cls:
        raise ValueError(f"a learner named {cls.name!r} is already registered "
                         f"({_LEARNERS[cls.name].__name__})")
    _LEARNERS[cls.name] = cls
    return cls


def get_learner(name: str) -> Type[PromptLearner]:
    """The learner class registered under `name` (the value of `config.backbone.name`)."""
    if name not in _LEARNERS:
        raise ValueError(f"config.backbone.name={name!r}; allowed values: {sorted(_LEARNERS)}")
    return _LEARNERS[name]


def build_learner(clip_config, tokenizer, backbone_config: ml_collections.ConfigDict,
                  **kwargs) -> PromptLearner:
    """The learner named by `backbone_config.name`, constructed from `config.backbone`
    (`kwargs`: e.g. `teacher=` for learners with `needs_teacher`)."""
    if "name" not in backbone_config:
        raise ValueError(f"config.backbone.name is missing; allowed values: {sorted(_LEARNERS)}")
    return get_learner(backbone_config.name)(clip_config, tokenizer, backbone_config, **kwargs)


__all__ = ["ClassTexts", "CoCoOp", "CoOp", "DePT", "DualPrompt", "DualRules", "IVLP", "MaPLe", "PromptLearner",
           "PromptKD", "PromptSRC", "ZeroShotCLIP", "build_learner", "get_learner", "register_learner"]
