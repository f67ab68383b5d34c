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
import dataclasses
from typing import Any, Callable, ClassVar, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
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
    ids = trim_context(ids, eot, enabled=model.config.trim_text)  # exact: the positions after every EOT are not encoded
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
    doubled leaf is trained as itself (DPC_PROTOCOL.md §2, BACKBONES.md §8).
    """

    double: Tuple[Tuple[str, bool], ...] = ((".*", True),)
    converse: Tuple[Tuple[str, bool], ...] = (("ctx", True), (".*", False))
    # Doubled leaves that reference mode gives back to P for new classes instead of mixing
    # them with w_n: the modules that are not prompts (PromptKD's projector), which the
    # released loaders restore from stage 1 (BACKBONES.md §8). Only matters for w_n > 0.
    new_from_backbone: Tuple[Tuple[str, bool], ...] = ((".*", False),)
    # Optional map from a prompt to the prompts that enter the towers (MaPLe: its vision prompts
    # are coupled from the text prompts). When given, the weighting-decoupling mix
    # w*P' + (1-w)*P (0 < w < 1) is taken over those tower prompts, not over the learned leaves,
    # and the mixed prompt is in tower form: the learner's feature methods must accept it.
    towers: Optional[Callable[[Any], Any]] = None


class PromptLearner(abc.ABC):
    """Base class of prompt learners; every hook below has a default that suits CoOp.

    Declared needs (class attributes), read by the trainer instead of asking what a learner is:
    - uses_image_prompts: `image_features` depends on the prompt (IVLP, MaPLe, ...). When False
      (CoOp), image features computed once per image serve every prompt: evaluation caches
      them and the DHNO scorer reuses the anchors' features.
    - text_needs_image: the class text depends on the image (CoCoOp): `classify` must then be
      overridden (DPC's slot logits would need per-image texts too), and nothing caches text
      per class list.
    - train_split: what stage 1 trains on: 'fewshot' (the labelled base few-shot set) or
      'unlabeled' (PromptKD: images of all classes, labels unused).
    - dpc_unsupported: '' when DPC's stage 2 runs on this learner; otherwise why not (the
      trainer refuses the 'dpc' stage before anything trains, with this reason).
    - needs_teacher: the learner distils from a teacher learner (PromptKD). The trainer builds
      the teacher from `config.backbone.teacher` / `teacher_clip`, passes it to the constructor
      as `teacher=`, trains or loads its prompt per seed, and hands both to `constants`.
    - augment_negatives: DHNO's negative images get the training augmentation (True, CoOp) or
      the test transform (False, PromptKD+DPC as released).
    - torch_dpc_trainer: the released DPC trainer whose stage-2 checkpoints `load_torch_dpc`
      and `export_torch_dpc` read and write ('StackSPLE_PromptKD'); '' when there are none
      (`config.dpc.init_from` and stage-2 export are refused).

    The array methods are pure functions of their inputs (the learner object is static
    configuration), so the trainer jits them once per run. `state` is non-trainable mutable
    state (e.g. BatchNorm statistics; `{}` by default): threaded through the stage-1 step,
    averaged over devices, checkpointed, frozen in stage 2. `consts` are frozen per-seed
    constants from `constants` (template-ensemble features, a teacher): never checkpointed.
    """

    name: ClassVar[str]
    uses_image_prompts: ClassVar[bool] = False
    text_needs_image: ClassVar[bool] = False
    train_split: ClassVar[str] = "fewshot"
    dpc_unsupported: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    augment_negatives: ClassVar[bool] = True
    torch_dpc_trainer: ClassVar[str] = ""

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

    # -- parameters and constants -----------------------------------------------------------------
    @abc.abstractmethod
    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        """Initial prompt pytree. `num_classes` is needed only by class-specific prompts."""

    def init_state(self, clip_params) -> State:
        """Initial non-trainable state (a pytree; `{}`: none)."""
        return {}

    def constants(self, clip_params, classnames: Sequence[str], teacher=None) -> dict:
        """Frozen per-seed constants for the training classes `classnames` (`{}`: none); for
        a `train_split` of 'unlabeled' these are all classes (base, then new). `teacher`:
        {'clip': its CLIP parameters, 'prompt': its prompt} for learners that need one."""
        return {}

    def load_torch_backbone(self, path: str, num_classes: Optional[int] = None):
        """(prompt, state) of a PyTorch stage-1 checkpoint, read once; state None: the file
        holds none (the learner's initial state serves). Default: `load_torch_prompt`."""
        return self.load_torch_prompt(path, num_classes), None

    def load_torch_prompt(self, path: str, num_classes: Optional[int] = None) -> Prompt:
        """The stage-1 prompt of a checkpoint written by the released PyTorch code."""
        raise ValueError(f"config.backbone.init_from={path!r}: the {self.name!r} learner cannot "
                         f"import PyTorch checkpoints yet; train stage 1 here instead (leave "
                         f"init_from empty)")

    def export_torch_prompt(self, prompt: Prompt, run_dir: str, epoch: int,
                            state: Optional[State] = None) -> str:
        """Write a stage-1 prompt (and the learner's state) as the released PyTorch code saves
        it under `run_dir` (its output folder); returns the file's path."""
        raise ValueError(f"the {self.name!r} learner has no PyTorch checkpoint export; coop, "
                         f"cocoop, ivlp, maple, promptsrc, promptkd and dept have one")

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

    def pair_logits(self, clip_params, prompt: Prompt, image_features: Array,
                    slot_classifier: Array, consts: Optional[dict] = None) -> Array:
        """Logits [M, M] of slot images against the texts of the slot labels (DHNO's enlarged
        batch): `slot_classifier` [M, E] holds the unit-norm text feature of each slot's label,
        rows of `classifier` for these labels only (`objectives.dpc_objective` encodes each
        distinct label once and gathers, or every slot's label, per `config.dpc.dedupe_text`)."""
        # The scale multiplies the cosines after the matmul here, as the released contrastive
        # loss computes them (the stage-1 logits of `classify` scale the image side, as CoOp's
        # `logit_scale * image_features @ text_features.t()` does); kept so both stages
        # reproduce their earlier numbers bit for bit.
        return logit_scale(clip_params) * cosine_logits(
            image_features, slot_classifier, 1.0, self.clip_config.matmul_precision)

    def classification_logits(self, clip_params, prompt: Prompt, class_texts, images: Array,
                              state: Optional[State] = None,
                              consts: Optional[dict] = None) -> Array:
        """Logits [N, C] of images against every class of `class_texts` (stage-1 training)."""
        ids = jnp.arange(class_texts.num_classes)
        w = self.classifier(clip_params, prompt, class_texts, ids, consts)
        img = self.image_features(clip_params, prompt, images, state)
        return self.classify(clip_params, prompt, w, img, consts)

    def classification_loss(self, clip_params, prompt: Prompt, class_texts, images: Array,
                            labels: Array, state: Optional[State] = None,
                            consts: Optional[dict] = None) -> Array:
        """Cross-entropy over all classes of `class_texts` (CoOp's loss)."""
        return cross_entropy(self.classification_logits(clip_params, prompt, class_texts, images,
                                                        state, consts), labels)

    # -- stage 1 ----------------------------------------------------------------------------------
    def loss(self, clip_params, prompt: Prompt, state: State, consts: dict, class_texts,
             images: Array, labels: Array, key: jax.Array) -> Tuple[Array, dict, State]:
        """Stage-1 loss on augmented images: (loss, metrics, new state). Default: CE over all
        classes, with training accuracy as a metric."""
        del key
        logits = self.classification_logits(clip_params, prompt, class_texts, images, state,
                                            consts)
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
        return cross_entropy(logits, labels), {"acc": acc}, state

    def lr_multipliers(self):
        """Stage-1 learning-rate multipliers per leaf: (regex, float) rules over the prompt's
        '/'-joined leaf paths, first match decides ([] = all 1; DePT's head trains at 6.5x)."""
        return []

    # -- epoch hooks (their carried `extra` is checkpointed with the stage) -----------------------
    def init_extra(self, prompt: Prompt) -> dict:
        """What `on_epoch_end` carries between epochs (`{}`: nothing)."""
        return {}

    def on_epoch_end(self, epoch: int, epochs: int, prompt: Prompt, extra: dict) -> dict:
        """Called on the host after each stage-1 epoch (0-based); returns the new `extra`."""
        return extra

    def final_prompt(self, prompt: Prompt, extra: dict) -> Prompt:
        """Stage 1's result P from the last parameters (e.g. a prompt aggregate)."""
        return prompt

    # -- DPC ----------------------------------------------------------------------------------------
    def dual_rules(self) -> DualRules:
        """Which leaves DPC doubles and which get the converse map (default: double every leaf,
        converse map on `ctx`)."""
        return DualRules()

    def dpc_backbone(self, prompt: Prompt, consts: dict) -> Prompt:
        """The stage-1 prompt P as DPC's stage 2 sees it (PromptKD adds the teacher's text
        prompts, which become a trainable text branch). Default: the prompt itself."""
        return prompt

    def check_dpc_config(self, dpc_config) -> None:
        """Raise, naming the field, on `config.dpc` options this learner reads and cannot use
        (run before anything trains). Default: nothing to check."""

    def dpc_init(self, params: dict, dpc_config, key: jax.Array) -> dict:
        """DPC's initial {'backbone', 'parallel'} after cloning (a learner may reproduce a
        released initialisation here). Default: unchanged."""
        return params

    def scorer_prompt(self, backbone: Prompt, dpc_config, consts: dict) -> Prompt:
        """The prompt whose classifier over the base classes is DHNO's scorer (default P)."""
        return backbone

    def load_torch_dpc(self, path: str):
        """(parallel, state) of a released DPC stage-2 checkpoint (`config.dpc.init_from`):
        reference mode's parallel prompt and the learner state its base classes are evaluated
        with (None: the stage-1 state). Learners with a `torch_dpc_trainer` override it."""
        raise ValueError(f"config.dpc.init_from={path!r}: the {self.name!r} learner has no "
                         f"importer of PyTorch DPC stage-2 checkpoints (only promptkd: "
                         f"StackSPLE_PromptKD); leave config.dpc.init_from empty and train "
                         f"stage 2 here")

    def export_torch_dpc(self, parallel: Prompt, state, run_dir: str, epoch: int) -> str:
        """Write reference mode's parallel prompt (and the state its base classes use) as the
        released DPC trainer saves it under `run_dir`; returns the file's path."""
        raise ValueError(f"the {self.name!r} learner has no PyTorch DPC stage-2 export (only "
                         f"promptkd: StackSPLE_PromptKD)")

    def scorer_image_features(self, clip_params, backbone: Prompt, images: Array, state,
                              consts: dict) -> Array:
        """Image features of DHNO's scorer on the anchors (default: the frozen stage-1 model;
        PromptKD: its teacher). Used only when `uses_image_prompts`."""
        return self.image_features(clip_params, backbone, images, state)


def check_class_ids(class_ids: Array) -> Array:
    class_ids = jnp.asarray(class_ids)
    if class_ids.ndim != 1 or not jnp.issubdtype(class_ids.dtype, jnp.integer):
        raise ValueError(f"class_ids must be a 1-D integer array; got shape {class_ids.shape} "
                         f"and dtype {class_ids.dtype}")
    return class_ids
