"""The prompt-learner core shared by every learner, and DPC's doubling rules.

A learner is a stateless object built from (CLIP config, tokenizer, `config.backbone`). Its
prompts are plain pytrees (dicts of float32 arrays), so DPC (`dpc_jax.prompts.dpc`), optax masks
and checkpoints treat every learner alike. All array methods are pure functions of their inputs
and can be jitted (the learner object itself is static configuration).

Text side, common to the CoOp family (docs/reference/backbones.md#common-ground): each class is the
text "X X ... X {name}." with '_' in names replaced by ' '; the n_ctx placeholder tokens at
positions 1..n_ctx are replaced by context vectors, and the text feature is read at the EOT token.
`prepare` embeds these texts once per class list with the frozen token embedding (`ClassTexts`);
`text_features` then encodes only the requested class ids, so a training step that encodes the
labels present in its batch costs the same whatever the number of classes.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpc_jax.models.clip import CLIP, CLIPConfig, cosine_logits, logit_scale, normalize
from dpc_jax.models.tokenizer import trim_context

Array = Any
Prompt = Any  # a pytree (dict) of float32 arrays
State = Any  # a pytree of non-trainable arrays (`{}` for most learners)

# The placeholder word whose tokens are replaced by context vectors; one BPE token per word.
PLACEHOLDER = "X"


@flax.struct.dataclass
class ClassTexts:
    """Per-class text inputs built once per class list by `PromptLearner.prepare`.

    embeddings: float32 [C, L, width], token embeddings of the class texts (the placeholder
      positions hold the placeholder's embedding and are replaced by the prompt); L <=
      context_length covers every EOT (`tokenizer.trim_context`).
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
                           n_ctx: int, prefix: Optional[str] = None) -> ClassTexts:
    """Embeds "{prefix} {name}." for every class name ('_' -> ' '). The default prefix is n_ctx
    placeholders "X X .. X" (CoOp); IVLP and MaPLe pass their init phrase, whose first n_ctx
    tokens the context replaces (MaPLe: "a photo" learnable, "of a" kept as word embeddings)."""
    if isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError(f"classnames must be a non-empty sequence of strings; got {classnames!r}")
    if prefix is None:
        prefix = " ".join([PLACEHOLDER] * n_ctx)
    texts = [f"{prefix} {name.replace('_', ' ')}." if prefix else f"{name.replace('_', ' ')}."
             for name in classnames]
    ids, eot = tokenizer(texts)
    # Exact: the positions after every EOT are not encoded.
    ids = trim_context(ids, eot, enabled=model.config.trim_text)
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


def encode_class_texts(model: CLIP, clip_params, embeddings: Array, eot_indices: Array,
                       deep_prompts: Optional[Array] = None) -> Array:
    """Text features [N, E] of prompted class texts (token embeddings [N, L, W], EOT positions
    [N], optional deep text prompts shared by all N): the one place a learner's class texts
    enter CLIP's text tower, `model.config.text_chunk` texts at a time (`in_chunks`)."""
    def encode(emb, eot):
        return model.apply({"params": clip_params}, emb, eot, deep_prompts,
                           method="encode_text_embeddings")

    return in_chunks(encode, model.config.text_chunk, embeddings, eot_indices)


def in_chunks(fn, chunk: int, *rows: Array) -> Array:
    """`fn(*rows)` [N, ...] for row-wise `fn` (row i of the output depends on row i of each
    input only), computed `chunk` rows at a time when N > chunk > 0: `lax.map` over chunks (the
    last padded with copies of row 0 and cut), each under `jax.checkpoint`, so a gradient
    stores one chunk's activations, not N rows', and recomputes them in the backward pass. A
    learner with its own text tower (MMRL) chunks its class texts through this too.

    The output is the unchunked program's up to float32 rounding (matmuls of another shape),
    and the gradient sums the chunks' contributions in another order
    (`tests/test_memory_chunking.py`)."""
    n = rows[0].shape[0]
    if not chunk or n <= chunk:
        return fn(*rows)
    count = -(-n // chunk)
    index = jnp.concatenate([jnp.arange(n), jnp.zeros(count * chunk - n, jnp.int32)])
    index = index.reshape(count, chunk)
    fn_chunk = jax.checkpoint(fn)
    out = jax.lax.map(lambda r: fn_chunk(*(x[r] for x in rows)), index)
    return out.reshape((count * chunk,) + out.shape[2:])[:n]


def cross_entropy(logits: Array, labels: Array, weights: Optional[Array] = None) -> Array:
    """Mean softmax cross-entropy (in float32) with integer labels; `weights` (a 0/1 validity
    mask) restricts the mean to the valid rows."""
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if weights is None:
        return jnp.mean(nll)
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass(frozen=True)
class DualRules:
    """Which prompt leaves DPC doubles, and which of those get reference mode's converse map.

    Both are mask rule lists (`dpc_jax.training.masks`: regex on '/'-joined leaf paths, first
    match decides, every leaf must be matched). A leaf that is not doubled is shared: P's value
    serves both prompts and it never trains in stage 2. The released trainers apply the converse
    map (and its lr/w_b^2 amplification) to the layer-0 text context `ctx` only; every other
    doubled leaf is trained as itself (docs/reference/method.md#modes,
    docs/reference/backbones.md#dpc-on-each-backbone).
    """

    double: Tuple[Tuple[str, bool], ...] = ((".*", True),)
    converse: Tuple[Tuple[str, bool], ...] = (("ctx", True), (".*", False))
    # Doubled leaves that reference mode gives back to P for new classes instead of mixing
    # them with w_n: the modules that are not prompts (PromptKD's projector), which the
    # released loaders restore from stage 1 (docs/reference/method.md#modes). Only matters
    # for w_n > 0.
    new_from_backbone: Tuple[Tuple[str, bool], ...] = ((".*", False),)
    # Optional map from a prompt to the prompts that enter the towers (MaPLe: its vision prompts
    # are coupled from the text prompts). When given, the weighting-decoupling mix
    # w*P' + (1-w)*P (0 < w < 1) is taken over those tower prompts, not over the learned leaves,
    # and the mixed prompt is in tower form: the learner's feature methods must accept it.
    towers: Optional[Callable[[Any], Any]] = None


@dataclasses.dataclass(frozen=True)
class LearnerInfo:
    """What a learner declares about itself, read by configs, reports and DePT.

    display_name: its name in tables ('CoOp').
    world: flattened `config` overrides for the embedded world (its schedule: the world's tiny
      CLIP takes shallower prompts and shorter runs than the papers' settings); applied by
      `dpc_jax.configs.common.apply_settings` after the world's dataset settings.
    field_help: one line per `config.backbone.<field>` for `python -m dpc_jax.train --help`.
    dept_inner: DePT (`dpc_jax.prompts.dept`) can wrap it.
    order: its place among the learners in report tables (the papers' order; new ones after).
    """

    display_name: str
    world: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    field_help: Mapping[str, str] = dataclasses.field(default_factory=dict)
    dept_inner: bool = False
    order: int = 100


@dataclasses.dataclass(frozen=True)
class LearnerContext:
    """What a learner may need per seed, handed to `constants` in one object so a new learner
    never needs a trainer change.

    dataset: the dataset key ('world', 'oxford_pets', ...).
    classnames: the training classes (all classes, base then new, for a learner whose
      `train_split` is 'unlabeled').
    templates: the dataset's zero-shot templates (one '{}' each), the hand-crafted prompts.
    teacher: {'clip': its CLIP parameters, 'prompt': its frozen prompt} for a learner that
      distils (`capabilities.Distils`); None otherwise.
    """

    dataset: str
    classnames: Tuple[str, ...]
    templates: Tuple[str, ...] = ()
    teacher: Optional[dict] = None


class PromptLearner(abc.ABC):
    """The core every learner has; optional behaviour is opted into through the capability
    classes of `dpc_jax.prompts.capabilities` (mutable state, epoch hooks, a teacher, DPC,
    PyTorch files).

    Declared needs (class attributes), read instead of asking what a learner is:
    - uses_image_prompts: `image_features` depends on the prompt (IVLP, MaPLe, ...). When False
      (CoOp), image features computed once per image serve every prompt: evaluation caches
      them and the DHNO scorer reuses the anchors' features.
    - train_split: what stage 1 trains on: 'fewshot' (the labelled base few-shot set) or
      'unlabeled' (images of all classes, labels unused).

    The array methods are pure functions of their inputs (the learner object is static
    configuration), so the trainer jits them once per run. `state` is the learner's
    non-trainable state (`capabilities.Stateful`; `{}` otherwise); `consts` are the frozen
    per-seed constants from `constants`, never checkpointed.
    """

    name: ClassVar[str]
    info: ClassVar[LearnerInfo]
    uses_image_prompts: ClassVar[bool] = False
    train_split: ClassVar[str] = "fewshot"

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

    # -- parameters and constants -----------------------------------------------------------------
    @abc.abstractmethod
    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        """Initial prompt pytree. `num_classes` is needed only by class-specific prompts."""

    def constants(self, clip_params, context: LearnerContext) -> dict:
        """Frozen per-seed constants (`{}`: none), computed once per seed from the context."""
        return {}

    # -- features ---------------------------------------------------------------------------------
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
    def image_features(self, clip_params, prompt: Prompt, images: Array,
                       state: Optional[State] = None) -> Array:
        """Un-normalised image features [N, embed_dim] of CLIP-normalised NHWC images."""

    # -- classification: the class side once per (prompt, class list), the image side per batch --
    def classifier(self, clip_params, prompt: Prompt, class_texts, class_ids: Array,
                   consts: Optional[dict] = None) -> Array:
        """Unit-norm class weights [len(class_ids), E]. Evaluation calls it once per prompt and
        class list (in chunks of class ids), the DHNO scorer once per stage."""
        return normalize(self.text_features(clip_params, prompt, class_texts, class_ids))

    def classify(self, clip_params, prompt: Prompt, classifier: Array, image_features: Array,
                 consts: Optional[dict] = None) -> Array:
        """Logits [N, C] of image features against a classifier."""
        return cosine_logits(image_features, classifier, logit_scale(clip_params),
                             self.clip_config.matmul_precision)

    # -- stage 1 ----------------------------------------------------------------------------------
    def loss(self, clip_params, prompt: Prompt, state: State, consts: dict, class_texts,
             images: Array, labels: Array, key: jax.Array) -> Tuple[Array, dict, State]:
        """Stage-1 loss on augmented images: (loss, metrics, new state). Default: CE over all
        classes, with training accuracy as a metric."""
        del key
        logits = classification_logits(self, clip_params, prompt, class_texts, images, state,
                                       consts)
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
        return cross_entropy(logits, labels), {"acc": acc}, state

    def lr_multipliers(self):
        """Stage-1 learning-rate multipliers per leaf: (regex, float) rules over the prompt's
        '/'-joined leaf paths, first match decides ([] = all 1; DePT's head trains at 6.5x)."""
        return []


def classification_logits(learner: PromptLearner, clip_params, prompt: Prompt, class_texts,
                          images: Array, state: Optional[State] = None,
                          consts: Optional[dict] = None) -> Array:
    """Logits [N, C] of images against every class of `class_texts` (stage-1 training)."""
    ids = jnp.arange(class_texts.num_classes)
    w = learner.classifier(clip_params, prompt, class_texts, ids, consts)
    img = learner.image_features(clip_params, prompt, images, state)
    return learner.classify(clip_params, prompt, w, img, consts)


def classifier_rows(learner: PromptLearner, clip_params, prompt: Prompt, class_texts,
                    consts: Optional[dict] = None, chunk: int = 256,
                    fn: Optional[Callable] = None):
    """The learner's classifier over every class of `class_texts` as host arrays ([C, ...], or
    a pytree of them), in calls of `chunk` class ids: one program of a static shape (the last
    chunk wraps around and is cut), so a long class list never encodes all its texts at once.
    `fn(clip_params, prompt, class_texts, ids, consts)`: a jitted `learner.classifier` to reuse
    (default: one jitted here)."""
    if fn is None:
        fn = jax.jit(lambda cp, p, t, ids, c: learner.classifier(cp, p, t, ids, c))
    n = int(jax.tree_util.tree_leaves(class_texts)[0].shape[0])
    xp = jnp if traced(clip_params) else np  # traced: under `jax.eval_shape` (shapes only)
    out = []
    for start in range(0, n, chunk):
        ids = np.arange(start, start + chunk) % n
        keep = min(chunk, n - start)
        out.append(jax.tree_util.tree_map(lambda x: xp.asarray(x)[:keep],
                                          fn(clip_params, prompt, class_texts, ids, consts)))
    return jax.tree_util.tree_map(lambda *xs: xp.concatenate(xs), *out)


def traced(tree) -> bool:
    """Whether any leaf of `tree` is a tracer (host-side code then stays in jnp, so that a
    learner's constants can be built abstractly by `jax.eval_shape`)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def check_class_ids(class_ids: Array) -> Array:
    class_ids = jnp.asarray(class_ids)
    if class_ids.ndim != 1 or not jnp.issubdtype(class_ids.dtype, jnp.integer):
        raise ValueError(f"class_ids must be a 1-D integer array; got shape {class_ids.shape} "
                         f"and dtype {class_ids.dtype}")
    return class_ids
