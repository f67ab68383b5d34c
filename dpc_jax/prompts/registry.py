"""The learners selectable by `config.backbone.name`.

Importing this module imports the `dpc_jax.prompts` package first, which registers the learners
it ships; `register_learner` adds more from anywhere. The registry imports no learner itself, so
a learner that builds another one (DePT wraps the learner it names) can use it without an
import cycle.
"""

from __future__ import annotations

from typing import Dict, Type

import ml_collections

from dpc_jax.prompts.base import PromptLearner

_LEARNERS: Dict[str, Type[PromptLearner]] = {}


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
