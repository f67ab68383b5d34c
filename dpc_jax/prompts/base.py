"""The prompt-learner interface shared by CoOp, IVLP, MaPLe, PromptSRC, PromptKD and DPC.

A learner is a stateless object built from (CLIP config, tokenizer, `config.backbone`). Its
prompts are plain pytrees (dicts of float32 arrays), so DPC (`dpc_jax.prompts.dpc`), optax masks
and checkpoints treat every learner alike. All array methods are pure functions of their inputs
and can be jitted (the learner object itself is static configuration).

Text side, common to the CoOp family (DPC_PROTOCOL.md §5): each class is the text
"X X ... X {name}." with '_' in names replaced by ' '; the n_ctx placeholder tokens at positions
1..n_ctx are replaced by context vectors, and the text feature is read at the EOT token.
`prepare` embeds these texts once per class list with the frozen token embedding (`ClassTexts`);
`text_features` then encodes only the requested class ids, so a training step that encodes the
labels present in its batch costs the same whatever the number of classes.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from dpc_jax.models.clip import CLIP, CLIPConfig, normalize

Array = Any
Prompt = Any  # a pytree (dict) of float32 arrays

# The placeholder word whose tokens are replaced by context vectors; one BPE token per word.
PLACEHOLDER = "X"


@flax.struct.dataclass
class ClassTexts:
    """Per-class text inputs built once per class list by `PromptLearner.prepare`.

    embeddings: float32 [C, context_length, width], token embeddings of the class texts (the
      placeholder positions hold the placeholder's embedding and are replaced by the prompt).
    eot_indices: int32 [C], position of the end-of-text token of each class text.
    """

    embeddings: Array
    eot_indices: Array

    @property
    def num_classes(self) -> int:
        return self.embeddings.shape[0]


def config_field(config: ml_collections.ConfigDict, field: str, where: str):
    """`config.<field>`, or an error naming the missing field."""
    if field not in config:
        raise ValueError(f"{where}.{field} is missing; fields present: {sorted(config.keys())}")
    return config[field]


def class_texts_from_names(model: CLIP, clip_params, tokenizer, classnames: Sequence[str],
                           n_ctx: int) -> ClassTexts:
    """Embeds "X X .. X {name}." (n_ctx placeholders) for every class name ('_' -> ' ')."""
    if isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError(f"classnames must be a non-empty sequence of strings; got {classnames!r}")
    prefix = " ".join([PLACEHOLDER] * n_ctx)
    texts = [f"{prefix} {name.replace('_', ' ')}." if n_ctx else f"{name.replace('_', ' ')}."
             for name in classnames]
    ids, eot = tokenizer(texts)
    embeddings = model.apply({"params": clip_params}, jnp.asarray(ids), method="embed_tokens")
    return ClassTexts(embeddings=jnp.asarray(embeddings, jnp.float32),
                      eot_indices=jnp.asarray(eot, jnp.int32))


def insert_context(embeddings: Array, ctx: Array) -> Array:
    """Replaces token positions 1..n_ctx of `embeddings` [N, L, W] by `ctx` ([n_ctx, W] or
    [N, n_ctx, W]); the start token and the class-name/EOT suffix are kept."""
    n = embeddings.shape[0]
    ctx = jnp.asarray(ctx, embeddings.dtype)
    if ctx.ndim == 2:
        ctx = jnp.broadcast_to(ctx[None], (n,) + ctx.shape)
    n_ctx = ctx.shape[1]
    return jnp.concatenate([embeddings[:, :1], ctx, embeddings[:, 1 + n_ctx:]], axis=1)


def clip_logits(image_features: Array, text_features: Array, logit_scale: Array,
                precision=jax.lax.Precision.HIGHEST) -> Array:
    """exp(logit_scale) * norm(img) @ norm(txt).T: CLIP's cosine logits (exp(logit_scale) is
    100 for OpenAI's weights)."""
    img = normalize(image_features)
    txt = normalize(text_features)
    return jnp.exp(logit_scale) * jnp.dot(img, txt.T, precision=precision)


def cross_entropy(logits: Array, labels: Array, weights: Optional[Array] = None) -> Array:
    """Mean softmax cross-entropy (in float32) with integer labels; `weights` (a 0/1 validity
    mask) restricts the mean to the valid rows."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if weights is None:
        return jnp.mean(nll)
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class PromptLearner(abc.ABC):
    """Base class of prompt learners. Subclasses set `name` and `uses_image_prompts`.

    uses_image_prompts: whether `image_features` depends on the prompt. When False (CoOp), image
      features computed once per image serve every prompt (DHNO reuses the anchors' features).
    """

    name: ClassVar[str]
    uses_image_prompts: ClassVar[bool]

    def __init__(self, clip_config: CLIPConfig, tokenizer, config: ml_collections.ConfigDict):
        if not isinstance(clip_config, CLIPConfig):
            raise TypeError(f"clip_config must be a CLIPConfig; got {type(clip_config).__name__}")
        if getattr(tokenizer, "context_length", None) != clip_config.context_length:
            raise ValueError(
                f"tokenizer context_length={getattr(tokenizer, 'context_length', None)}; the CLIP "
                f"model expects {clip_config.context_length}")
        self.clip_config = clip_config
        self.tokenizer = tokenizer
        self.config = config
        self.model = CLIP(clip_config)

    @classmethod
    @abc.abstractmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The learner's `config.backbone` with default values."""

    @property
    def supports_new_classes(self) -> bool:
        """Whether prompts can be applied to classes not seen in training."""
        return True

    @abc.abstractmethod
    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        """Initial prompt pytree. `num_classes` is needed only by class-specific prompts."""

    @abc.abstractmethod
    def prepare(self, clip_params, classnames: Sequence[str], *,
                new_classes: bool = False) -> ClassTexts:
        """Per-class text inputs for a class list. `new_classes=True` marks classes unseen in
        training (learners that cannot handle them raise)."""

    @abc.abstractmethod
    def text_features(self, clip_params, prompt: Prompt, class_texts: ClassTexts,
                      class_ids: Array) -> Array:
        """Un-normalised text features [len(class_ids), embed_dim] of the requested classes."""

    @abc.abstractmethod
    def image_features(self, clip_params, prompt: Prompt, images: Array) -> Array:
        """Un-normalised image features [N, embed_dim] of CLIP-normalised NHWC images."""

    # -- shared helpers ---------------------------------------------------------------------------
    def logits(self, clip_params, image_features: Array, text_features: Array) -> Array:
        """CLIP logits [N, n] from un-normalised features, with CLIP's exp(logit_scale)."""
        return clip_logits(image_features, text_features, clip_params["logit_scale"],
                           self.clip_config.matmul_precision)

    def classification_logits(self, clip_params, prompt: Prompt, class_texts: ClassTexts,
                              images: Array) -> Array:
        """Logits [N, C] of images against every class of `class_texts` (stage-1 training and
        evaluation)."""
        class_ids = jnp.arange(class_texts.num_classes)
        txt = self.text_features(clip_params, prompt, class_texts, class_ids)
        img = self.image_features(clip_params, prompt, images)
        return self.logits(clip_params, img, txt)

    def classification_loss(self, clip_params, prompt: Prompt, class_texts: ClassTexts,
                            images: Array, labels: Array) -> Array:
        """Stage-1 loss of CoOp-style learners: cross-entropy over all classes."""
        return cross_entropy(self.classification_logits(clip_params, prompt, class_texts, images),
                             labels)


def check_class_ids(class_ids: Array) -> Array:
    class_ids = jnp.asarray(class_ids)
    if class_ids.ndim != 1 or not jnp.issubdtype(class_ids.dtype, jnp.integer):
        raise ValueError(f"class_ids must be a 1-D integer array; got shape {class_ids.shape} "
                         f"and dtype {class_ids.dtype}")
    return class_ids
