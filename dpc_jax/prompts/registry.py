"""The learners selectable as `config.backbone.name`: every `PromptLearner` subclass with its own
`name` and `info` in a module of this package is found on first use, so adding a learner is its
module (plus a config file); learners defined elsewhere join with `register_learner`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Type

import ml_collections

from dpc_jax.prompts.base import PromptLearner

_LEARNERS: Dict[str, Type[PromptLearner]] = {}
_discovered = False


def _add(cls: Type[PromptLearner]) -> None:
    if cls.name in _LEARNERS and _LEARNERS[cls.name] is not cls:
        raise ValueError(f"a learner named {cls.name!r} is already registered "
                         f"({_LEARNERS[cls.name].__module__}.{_LEARNERS[cls.name].__name__})")
    _LEARNERS[cls.name] = cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(__package__)
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__package__}.{module_info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, PromptLearner)
                    and value.__module__ == module.__name__
                    and "name" in vars(value) and "info" in vars(value)):
                _add(value)
    _discovered = True


def register_learner(cls: Type[PromptLearner]) -> Type[PromptLearner]:
    """Make `cls` selectable as `config.backbone.name = cls.name` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, PromptLearner)):
        raise TypeError(f"{cls!r} is not a PromptLearner subclass")
    _discover()
    _add(cls)
    return cls


def unregister_learner(name: str) -> None:
    """Undo `register_learner` (a test's or a notebook's learner)."""
    _LEARNERS.pop(name, None)


def learner_names() -> List[str]:
    """Every registered learner name, in the papers' order (`LearnerInfo.order`, then name)."""
    _discover()
    return sorted(_LEARNERS, key=lambda n: (_LEARNERS[n].info.order, n))


def get_learner(name: str) -> Type[PromptLearner]:
    """The learner class registered under `name` (the value of `config.backbone.name`)."""
    _discover()
    if name not in _LEARNERS:
        raise ValueError(f"config.backbone.name={name!r}; allowed values: {sorted(_LEARNERS)}")
    return _LEARNERS[name]


def display_name(name: str) -> str:
    """A learner's name in tables ('coop' -> 'CoOp'); unknown names are shown as given."""
    _discover()
    return _LEARNERS[name].info.display_name if name in _LEARNERS else name


def build_learner(clip_config, tokenizer, backbone_config: ml_collections.ConfigDict,
                  **kwargs) -> PromptLearner:
    """The learner named by `backbone_config.name`, constructed from `config.backbone`
    (`kwargs`: e.g. `teacher=` for learners that distil)."""
    if "name" not in backbone_config:
        _discover()
        raise ValueError(f"config.backbone.name is missing; allowed values: {sorted(_LEARNERS)}")
    return get_learner(backbone_config.name)(clip_config, tokenizer, backbone_config, **kwargs)
