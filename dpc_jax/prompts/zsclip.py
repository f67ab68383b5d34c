"""Zero-shot CLIP as a learner with no parameters: its classifier is the template ensemble.

As CLIP's zero-shot recipe (and CoOp's zsclip.py): for each class, every template is filled
with the class name ('_' -> ' '), each text feature is L2-normalised, the features are averaged
over templates, and the `classifier` normalises the average again. The image tower is CLIP's,
unprompted. Treating zero-shot CLIP as a learner gives evaluation one path for every stage.

`config` fields: name ('zsclip'), templates (a list of strings with one '{}' each; the trainer
passes the dataset's templates).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from dpc_jax.models.clip import normalize
from dpc_jax.models.tokenizer import trim_context
from dpc_jax.prompts.base import Array, Prompt, PromptLearner, check_class_ids, config_field


@flax.struct.dataclass
class TemplateTexts:
    """Token ids int32 [C, T, L] of every (class, template) text (L: `trim_context`)."""

    ids: Array

    @property
    def num_classes(self) -> int:
        return self.ids.shape[0]


def check_templates(templates) -> list:
    if isinstance(templates, str) or not templates:
        raise ValueError(f"zero-shot templates must be a non-empty list of strings; got "
                         f"{templates!r}")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}' for the class name")
    return list(templates)


class ZeroShotCLIP(PromptLearner):
    """CLIP with hand-written templates; `init` gives an empty prompt."""

    name = "zsclip"

    def __init__(self, clip_config, tokenizer, config: ml_collections.ConfigDict):
        super().__init__(clip_config, tokenizer, config)
        self.templates = check_templates(list(config_field(config, "templates", "zero-shot")))

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({"name": cls.name, "templates": ["a photo of a {}."]})

    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        return {}

    def prepare(self, clip_params, classnames: Sequence[str], *,
                new_classes: bool = False) -> TemplateTexts:
        if isinstance(classnames, str) or len(classnames) == 0:
            raise ValueError(f"classnames must be a non-empty sequence of strings; got "
                             f"{classnames!r}")
        texts = [t.format(c.replace("_", " ")) for c in classnames for t in self.templates]
        ids, eot = self.tokenizer(texts)
        ids = jnp.asarray(trim_context(ids, eot, enabled=self.clip_config.trim_text), jnp.int32)
        ids = ids.reshape(len(classnames), len(self.templates), -1)
        return TemplateTexts(ids=ids)

    def text_features(self, clip_params, prompt: Prompt, class_texts: TemplateTexts,
                      class_ids) -> Array:
        """The template average of normalised text features (normalised again by
        `classifier`)."""
        class_ids = check_class_ids(class_ids)
        ids = class_texts.ids[class_ids]
        n, t, length = ids.shape
        feats = self.model.apply({"params": clip_params}, ids.reshape(n * t, length),
                                 method="encode_text")
        return normalize(feats).reshape(n, t, -1).mean(axis=1)

    def image_features(self, clip_params, prompt: Prompt, images, state=None) -> Array:
        return self.model.apply({"params": clip_params}, images, method="encode_image")
