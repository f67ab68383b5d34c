"""Prompt learners, selected by `config.backbone.name`, and DPC's dual-prompt parameterisation."""

from __future__ import annotations

from typing import Dict, Type

import ml_collections

from dpc_jax.prompts.base import ClassTexts, PromptLearner
from dpc_jax.prompts.coop import CoOp
from dpc_jax.prompts.dpc import DualPrompt

_LEARNERS: Dict[str, Type[PromptLearner]] = {CoOp.name: CoOp}


def get_learner(name: str) -> Type[PromptLearner]:
    """The learner class registered under `name` (the value of `config.backbone.name`)."""
    if name not in _LEARNERS:
        raise ValueError(f"config.backbone.name={name!r}; allowed values: {sorted(_LEARNERS)}")
    return _LEARNERS[name]


def build_learner(clip_config, tokenizer, backbone_config: ml_collections.ConfigDict
                  ) -> PromptLearner:
    """The learner named by `backbone_config.name`, constructed from `config.backbone`."""
    if "name" not in backbone_config:
        raise ValueError(f"config.backbone.name is missing; allowed values: {sorted(_LEARNERS)}")
    return get_learner(backbone_config.name)(clip_config, tokenizer, backbone_config)


__all__ = ["ClassTexts", "CoOp", "DualPrompt", "PromptLearner", "build_learner", "get_learner"]
