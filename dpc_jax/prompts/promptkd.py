"""PromptKD (Li et al., "PromptKD: Unsupervised Prompt Distillation"): a visually prompted
student CLIP distilled from a frozen PromptSRC teacher on a larger CLIP
(docs/reference/backbones.md#promptkd, #dpc-on-each-backbone).

Teacher: a PromptSRC learner (`dpc_jax.prompts.promptsrc`) on its own CLIP (ViT-L/14 for real
data; the shipped `world_teacher` CLIP on the embedded world), built by the trainer from
`config.backbone.teacher` and `config.backbone.teacher_clip` and passed in as `teacher=`. Its
prompt is trained per seed with dpc_jax's PromptSRC (W/seed_N/teacher/) or read from the PyTorch
teacher checkpoint (`teacher.init_from`: `teacher_model/<dataset>/VLPromptLearner/
model-best.pth.tar`, IVLP keys at L/14). It is frozen. Its normalised text features h over ALL
classes are a per-seed constant computed once; its image features are computed per batch
(stop-gradient). Only one copy of the teacher CLIP is held (the constants share the teacher
run's arrays).

Student prompt (the trainable pytree, float32):
- 'vision_ctx' [n_v, W_v], 'vision_deep' [J_v-1, n_v, W_v]: IVLP's visual prompts on the
  student's image tower (depth 9 at B/16); N(0, 0.02) init.
- 'projector': {'dense0': {kernel [E_s, E_t], bias [E_t]}, 'bn': {scale, bias} [E_t],
  'dense1': {kernel [E_t, E_t], bias [E_t]}}: Dense -> BatchNorm -> ReLU -> Dense on the
  student's un-normalised CLIP feature (upstream 1x1 convs; torch's default init).
State (the learner's mutable state): {'bn': {'mean', 'var'}}, BatchNorm's running statistics,
updated in stage-1 training with torch's momentum 0.1 (running var from the unbiased batch
variance; normalisation with the biased one, eps 1e-5), averaged over devices by the step,
checkpointed, used in inference mode for evaluation and frozen in DPC's stage 2.
There is no student text tower: classes are the teacher's text features.

Stage 1 is transductive and label-free (`train_split = 'unlabeled'`): the training split of all
classes, labels unused. With s = 100 * norm(proj(f_s)) h^T and r = 100 * norm(f_t) h^T (each
CLIP's own logit scale; 100 for OpenAI's and the world's), f_t the teacher image feature of the
same augmented image:

    L = kd_weight * T^2 * sum_{b,c} softmax(r/T) (log softmax(r/T) - log softmax(s/T)) / (B*C)

T = 1; kd_weight 1000, 200 for FGVCAircraft, Flowers102 and DTD (`configs/dpc_promptkd.py`).
Model selection (`selection`): the last epoch by default; 'best_base_test' keeps the epoch with
the best base TEST accuracy, as the released code does (for reproduction only: it selects on
test data); 'best_base_val' the best on the base validation split.

DPC's stage 2 (as released, defects fixed): P = the student's prompts and projector plus the
teacher's text prompts 'ctx' [n_t, W_t^T] and 'text_deep', which become a trainable text branch on
the teacher's text tower (`dpc_backbone`); the converse map acts on 'ctx' only; the loss is
contrastive only; the scorer is the teacher (image and text towers) over the base classes;
negatives take the test transform; BatchNorm normalises with the frozen stage-1 statistics. New
classes at w_n = 0 are the teacher's text and the stage-1 student, so new accuracy is PromptKD's
exactly. `config.dpc.released` reproduces the released code's defects, one option each
(docs/reference/backbones.md#released-code-defects), all False by default:
- random_vision_deep: the parallel visual deep prompts restart from N(0, 0.02) (released: they
  are assigned into a Python list, not the blocks).
- random_text_deep: the parallel text deep prompts restart from N(0, 0.02) (released: they go to
  the student's unused text tower; the teacher-width tower that trains keeps random ones).
- scorer_ctx_unloaded: the scorer's text context is the init phrase's embedding, not the
  teacher's ctx (released: a parameter-name mismatch leaves it unloaded).
The released configs' KD weight for stage 2 is read nowhere; stage 2 has no KD term here either.
A released stage-2 file (StackSPLE_PromptKD) is evaluated with `config.dpc.init_from` beside
the stage-1 student and teacher files it started from (`load_torch_dpc`: reference mode's
parallel prompt and the stage-2 BatchNorm statistics, which serve the base classes only; new
classes keep stage 1's); `export_torch_dpc` writes a stage 2 trained here in that layout (its
BatchNorm statistics: the frozen stage-1 ones that its base classes use).

`config.backbone` fields: name 'promptkd', n_ctx_vision (4), depth_vision (9), kd_weight
(1000), temperature (1), teacher (a PromptSRC backbone config plus epochs, lr, batch_size,
init_from), teacher_clip (source, dtype, precision; the student's tokenizer is shared, as
OpenAI's B/16 and L/14 share theirs), init_from (a PyTorch student checkpoint).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpc_jax.models.clip import cosine_logits, logit_scale, normalize
from dpc_jax.models.tokenizer import trim_context
from dpc_jax.prompts.base import (Array, ClassTexts, DualRules, LearnerContext, LearnerInfo,
                                  Prompt, PromptLearner, check_class_ids, classifier_rows,
                                  config_field)
from dpc_jax.prompts.capabilities import Distils, Dual, Stateful, TorchDPCFormat
from dpc_jax.prompts.ivlp import IVLP, PROMPT_STD, VisionPrompts, positive_int

_WHERE = "config.backbone"
BN_MOMENTUM = 0.1  # torch's BatchNorm momentum (flax's 0.9)
BN_EPS = 1e-5
RELEASED_OPTIONS = ("random_vision_deep", "random_text_deep", "scorer_ctx_unloaded")
_TEXT_CHUNK = 256  # classes per teacher text call when computing the constants


def kd_loss(student_logits: Array, teacher_logits: Array, weight: float,
            temperature: float = 1.0) -> Array:
    """weight * T^2 * KL(softmax(r/T) || softmax(s/T)) summed over [B, C], divided by B*C."""
    t = float(temperature)
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s))
    return weight * t * t * kl / student_logits.size


def batch_norm(x: Array, scale: Array, bias: Array, mean: Array, var: Array, *, train: bool,
               mask: Optional[Array] = None, momentum: float = BN_MOMENTUM,
               eps: float = BN_EPS):
    """BatchNorm over rows of x [N, D] as torch's BatchNorm1d: (y, (new_mean, new_var)).

    train: normalise with the batch statistics of the valid rows (`mask` [N], default all)
    and update the running ones with `momentum` (the running variance takes the unbiased batch
    variance); otherwise normalise with the running statistics, which are returned unchanged."""
    x = x.astype(jnp.float32)
    if not train:
        return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, (mean, var)
    w = jnp.ones(x.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.sum(w)
    mu = jnp.sum(w[:, None] * x, axis=0) / n
    v = jnp.sum(w[:, None] * jnp.square(x - mu), axis=0) / n
    y = (x - mu) * jax.lax.rsqrt(v + eps) * scale + bias
    unbiased = v * n / jnp.maximum(n - 1.0, 1.0)
    return y, ((1.0 - momentum) * mean + momentum * mu,
               (1.0 - momentum) * var + momentum * unbiased)


def init_projector(key: jax.Array, e_in: int, e_out: int) -> dict:
    """Dense(e_in -> e_out) -> BN(e_out) -> ReLU -> Dense(e_out -> e_out), torch's default
    init (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BN scale 1, bias 0)."""
    k = jax.random.split(key, 4)

    def uniform(key, shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    return {"dense0": {"kernel": uniform(k[0], (e_in, e_out), e_in),
                       "bias": uniform(k[1], (e_out,), e_in)},
            "bn": {"scale": jnp.ones((e_out,), jnp.float32),
                   "bias": jnp.zeros((e_out,), jnp.float32)},
            "dense1": {"kernel": uniform(k[2], (e_out, e_out), e_out),
                       "bias": uniform(k[3], (e_out,), e_out)}}


def project(projector: dict, stats: dict, x: Array, *, train: bool,
            mask: Optional[Array] = None, precision=jax.lax.Precision.HIGHEST):
    """(projector(x), new BN statistics {'mean', 'var'})."""
    h = jnp.dot(x.astype(jnp.float32), projector["dense0"]["kernel"],
                precision=precision) + projector["dense0"]["bias"]
    bn = projector["bn"]
    h, (mean, var) = batch_norm(h, bn["scale"], bn["bias"], stats["mean"], stats["var"],
                                train=train, mask=mask)
    h = jax.nn.relu(h)
    y = jnp.dot(h, projector["dense1"]["kernel"], precision=precision) + projector["dense1"]["bias"]
    return y, {"mean": mean, "var": var}


@flax.struct.dataclass
class ClassTokens:
    """Class texts as token ids (PromptKD's classes are encoded by the teacher's text tower,
    whose token embedding lives in the constants)."""

    ids: Array  # int32 [C, L] (L: `tokenizer.trim_context`)
    eot_indices: Array  # int32 [C]

    @property
    def num_classes(self) -> int:
        return self.ids.shape[0]


class PromptKD(VisionPrompts, Stateful, Distils, Dual, TorchDPCFormat, PromptLearner):
    """PromptKD's student: visual prompts and a projector, distilled from a teacher."""

    name = "promptkd"
    # Teacher: PromptSRC on the larger world_teacher CLIP at its full depth (3 text, 4 image
    # blocks) with IVLP's world schedule (seed-1 teacher: depth 3/4 gave H 56.29, 2/3 gave
    # 50.38; LR 0.005 at depth 2/3 gave 45.56); student: the world CLIP's 3 image blocks.
    info = LearnerInfo(
        display_name="PromptKD", order=60,
        world={"backbone.depth_vision": 3, "backbone.epochs": 20, "backbone.batch_size": 32,
               "backbone.lr": 0.005, "backbone.teacher.depth_text": 3,
               "backbone.teacher.depth_vision": 4, "backbone.teacher.epochs": 20,
               "backbone.teacher.batch_size": 32, "backbone.teacher.lr": 0.001},
        field_help={"n_ctx_vision": "student image prompt tokens",
                    "depth_vision": "student image blocks that take prompts",
                    "kd_weight": "weight of the distillation loss",
                    "temperature": "distillation temperature",
                    "selection": "stage-1 epoch: last | best_base_val | best_base_test",
                    "teacher": "the teacher's PromptSRC config (plus epochs, lr, batch_size, "
                               "init_from)",
                    "teacher_clip": "the teacher's CLIP (source, dtype, precision)"})
    uses_image_prompts = True
    train_split = "unlabeled"
    augment_negatives = False
    torch_dpc_trainer = "StackSPLE_PromptKD"

    def __init__(self, clip_config, tokenizer, config: ml_collections.ConfigDict,
                 teacher: Optional[PromptLearner] = None):
        super().__init__(clip_config, tokenizer, config)
        if not isinstance(teacher, IVLP):
            raise ValueError(f"the promptkd learner needs its teacher, an IVLP-family learner "
                             f"(config.backbone.teacher.name 'promptsrc'); got "
                             f"{type(teacher).__name__}")
        tc = teacher.clip_config
        if tc.image_resolution != clip_config.image_resolution:
            raise ValueError(f"config.backbone.teacher_clip: the teacher CLIP takes "
                             f"{tc.image_resolution}px images, the student "
                             f"{clip_config.image_resolution}px; both see the same images")
        self.teacher = teacher
        self._init_vision_side(config, minimum_depth=1)
        self.kd_weight = _positive(config_field(config, "kd_weight", _WHERE), "kd_weight")
        self.temperature = _positive(config_field(config, "temperature", _WHERE), "temperature")
        self.student_dim, self.teacher_dim = clip_config.embed_dim, tc.embed_dim

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        from dpc_jax.prompts.promptsrc import PromptSRC

        config = ml_collections.ConfigDict()
        config.name = cls.name
        config.n_ctx_vision = 4
        config.depth_vision = 9
        config.kd_weight = 1000.0
        config.temperature = 1.0
        # Stage-1 model selection (the trainer's `stages.SELECTIONS`): 'last' epoch (default),
        # 'best_base_test' (the released code's; it selects on test data, for reproduction
        # only) or 'best_base_val' (the base validation split).
        config.selection = "last"
        teacher = PromptSRC.default_config()
        teacher.epochs, teacher.lr, teacher.batch_size = 20, 0.005, 8
        teacher.init_from = ""
        config.teacher = teacher
        config.teacher_clip = ml_collections.ConfigDict(
            {"source": "ViT-L/14", "dtype": "float32", "precision": "highest"})
        return config

    # -- parameters, state, constants ---------------------------------------------------------
    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        k_vis, k_deep, k_proj = jax.random.split(key, 3)
        prompt = self._init_vision_prompts(k_vis, k_deep)
        prompt["projector"] = init_projector(k_proj, self.student_dim, self.teacher_dim)
        return prompt

    def init_state(self, clip_params) -> dict:
        d = self.teacher_dim
        return {"bn": {"mean": jnp.zeros((d,), jnp.float32), "var": jnp.ones((d,), jnp.float32)}}

    def expected_shapes(self) -> dict:
        """'/'-joined leaf path -> shape of the student prompt."""
        s, t = self.student_dim, self.teacher_dim
        out = self._vision_shapes()
        out.update({"projector/dense0/kernel": (s, t), "projector/dense0/bias": (t,),
                    "projector/bn/scale": (t,), "projector/bn/bias": (t,),
                    "projector/dense1/kernel": (t, t), "projector/dense1/bias": (t,)})
        return out

    def dpc_expected_shapes(self) -> dict:
        """'/'-joined leaf path -> shape of DPC's parallel prompt: the student's leaves and the
        teacher's text prompts (`dpc_backbone`)."""
        teacher = self.teacher.expected_shapes()
        out = self.expected_shapes()
        out.update({k: teacher[k] for k in ("ctx", "text_deep") if k in teacher})
        return out

    def prepare(self, clip_params, classnames: Sequence[str], *,
                new_classes: bool = False) -> ClassTokens:
        del clip_params, new_classes  # the teacher's text: any class
        if isinstance(classnames, str) or len(classnames) == 0:
            raise ValueError(f"classnames must be a non-empty sequence of strings; got "
                             f"{classnames!r}")
        prefix = self.teacher.text_prefix
        ids, eot = self.tokenizer([f"{prefix} {c.replace('_', ' ')}." for c in classnames])
        ids = trim_context(ids, eot, enabled=self.teacher.clip_config.trim_text)
        return ClassTokens(ids=jnp.asarray(ids, jnp.int32),
                           eot_indices=jnp.asarray(eot, jnp.int32))

    def constants(self, clip_params, context: LearnerContext) -> dict:
        """The teacher (its CLIP parameters and prompt), its normalised text features over
        the context's classes (all classes: base, then new) and the init phrase's embedding."""
        classnames, teacher = context.classnames, context.teacher
        if not isinstance(teacher, dict) or set(teacher) != {"clip", "prompt"}:
            raise ValueError("the promptkd learner's constants need teacher={'clip', 'prompt'}")
        consts = {"teacher_clip": teacher["clip"], "teacher_prompt": teacher["prompt"]}
        tokens = self.prepare(clip_params, classnames)
        consts["teacher_text"] = jnp.asarray(classifier_rows(self, clip_params, {}, tokens,
                                                             consts, _TEXT_CHUNK))
        consts["phrase_ctx"] = self._phrase_ctx(teacher["clip"])
        return consts

    def _phrase_ctx(self, teacher_clip) -> Array:
        """The teacher's token embeddings at context positions 1..n of its class text (the
        init phrase "a photo of a": what the released scorer's unloaded ctx holds)."""
        t = self.teacher
        ids, _ = self.tokenizer(t.text_prefix)
        emb = t.model.apply({"params": teacher_clip}, jnp.asarray(ids), method="embed_tokens")
        return jnp.asarray(emb[0, 1:1 + t.n_ctx], jnp.float32)

    # -- features -----------------------------------------------------------------------------
    def text_prompt(self, prompt: Prompt, consts: dict) -> dict:
        """The text prompts for the teacher's text tower: the prompt's own text branch (DPC's
        stage 2) or else the teacher's."""
        source = prompt if "ctx" in prompt else consts["teacher_prompt"]
        return {k: source[k] for k in ("ctx", "text_deep") if k in source}

    def text_features(self, clip_params, prompt, class_texts, class_ids) -> Array:
        raise ValueError("the promptkd learner's classes are the teacher's text features: use "
                         "classifier(..., consts) with the learner's constants")

    def classifier(self, clip_params, prompt: Prompt, class_texts: ClassTokens, class_ids,
                   consts: Optional[dict] = None) -> Array:
        class_ids = check_class_ids(class_ids)
        t, tclip = self.teacher, consts["teacher_clip"]
        emb = t.model.apply({"params": tclip}, class_texts.ids[class_ids], method="embed_tokens")
        texts = ClassTexts(embeddings=emb, eot_indices=class_texts.eot_indices[class_ids])
        return normalize(t.text_features(tclip, self.text_prompt(prompt, consts), texts,
                                         jnp.arange(class_ids.shape[0])))

    def student_features(self, clip_params, prompt: Prompt, images: Array) -> Array:
        """The student's prompted CLIP image feature (before the projector) [N, E_s]."""
        shallow, deep = self.vision_prompts(prompt)
        return self.model.apply({"params": clip_params}, images, shallow, deep,
                                method="encode_image")

    def image_features(self, clip_params, prompt: Prompt, images, state=None) -> Array:
        if not state or "bn" not in state:
            raise ValueError("the promptkd learner's image features need its state (BatchNorm "
                             "statistics {'bn': {'mean', 'var'}})")
        feats = self.student_features(clip_params, prompt, images)
        return project(prompt["projector"], state["bn"], feats, train=False,
                       precision=self.clip_config.matmul_precision)[0]

    def teacher_image_features(self, consts: dict, images: Array) -> Array:
        return jax.lax.stop_gradient(self.teacher.image_features(
            consts["teacher_clip"], consts["teacher_prompt"], images))

    def scorer_image_features(self, clip_params, backbone, images, state, consts) -> Array:
        return self.teacher_image_features(consts, images)  # the released scorer: the teacher

    # -- stage 1 ------------------------------------------------------------------------------
    def loss(self, clip_params, prompt: Prompt, state, consts: dict, class_texts, images,
             labels, key):
        del class_texts, labels, key  # label-free: every class's teacher text is a constant
        precision = self.clip_config.matmul_precision
        feats = self.student_features(clip_params, prompt, images)
        student, bn = project(prompt["projector"], state["bn"], feats, train=True,
                              precision=precision)
        h = consts["teacher_text"]
        s = cosine_logits(student, h, logit_scale(clip_params), precision)
        r = cosine_logits(self.teacher_image_features(consts, images), h,
                          logit_scale(consts["teacher_clip"]), precision)
        loss = kd_loss(s, r, self.kd_weight, self.temperature)
        agree = jnp.mean(jnp.argmax(s, -1) == jnp.argmax(r, -1))
        return loss, {"kd": loss, "agree": agree}, {"bn": bn}

    # -- DPC ----------------------------------------------------------------------------------
    def dual_rules(self) -> DualRules:
        """Every leaf doubled, the converse map on the text branch's ctx only; for new classes
        at w_n > 0, reference mode mixes the prompts and restores the projector to stage 1's
        (the released StackSPLE_PromptKD loader restores non-prompt modules)."""
        return DualRules(new_from_backbone=(("projector/.*", True), (".*", False)))

    def dpc_backbone(self, prompt: Prompt, consts: dict) -> Prompt:
        """The student's prompts and projector plus the teacher's text prompts."""
        out = dict(prompt)
        out.update(jax.tree_util.tree_map(lambda x: np.array(x, np.float32),
                                          self.text_prompt({}, consts)))
        return out

    def _released(self, dpc_config) -> dict:
        released = dpc_config.get("released", None) if dpc_config is not None else None
        if released is None:
            return {k: False for k in RELEASED_OPTIONS}
        released = dict(released)
        unknown = sorted(set(released) - set(RELEASED_OPTIONS))
        if unknown:
            raise ValueError(f"config.dpc.released has unknown options {unknown}; expected "
                             f"some of {list(RELEASED_OPTIONS)}")
        for k, v in released.items():
            if not isinstance(v, bool):
                raise ValueError(f"config.dpc.released.{k}={v!r}; expected True or False")
        return {k: released.get(k, False) for k in RELEASED_OPTIONS}

    def check_dpc_config(self, dpc_config) -> None:
        self._released(dpc_config)

    def dpc_init(self, params: dict, dpc_config, key: jax.Array) -> dict:
        released = self._released(dpc_config)
        parallel = dict(params["parallel"])
        for i, (option, leaf) in enumerate((("random_vision_deep", "vision_deep"),
                                            ("random_text_deep", "text_deep"))):
            if released[option] and leaf in parallel:
                shape = np.shape(parallel[leaf])
                parallel[leaf] = np.asarray(PROMPT_STD * jax.random.normal(
                    jax.random.fold_in(key, i), shape, jnp.float32))
        return {"backbone": params["backbone"], "parallel": parallel}

    def scorer_prompt(self, backbone: Prompt, dpc_config, consts: dict) -> Prompt:
        if self._released(dpc_config)["scorer_ctx_unloaded"]:
            return {**backbone, "ctx": consts["phrase_ctx"]}
        return backbone

    # -- PyTorch checkpoints ------------------------------------------------------------------
    def load_torch_prompt(self, path: str, num_classes: Optional[int] = None) -> Prompt:
        return self.load_torch_backbone(path, num_classes)[0]

    def load_torch_backbone(self, path: str, num_classes: Optional[int] = None):
        """(prompt, BatchNorm state) of a PyTorch student checkpoint, read once."""
        from dpc_jax.convert.promptkd_torch import load_promptkd_student

        loaded = load_promptkd_student(path, self.expected_shapes())
        return jax.tree_util.tree_map(jnp.asarray, loaded)

    def load_torch_dpc(self, path: str):
        """(parallel, BatchNorm state) of a StackSPLE_PromptKD stage-2 checkpoint: reference
        mode's parallel prompt (theta as 'ctx') and the stage-2 BatchNorm statistics, which its
        base classes are evaluated with (`promptkd_torch.load_promptkd_dpc`)."""
        from dpc_jax.convert.promptkd_torch import load_promptkd_dpc

        return load_promptkd_dpc(path, self.dpc_expected_shapes())

    def export_torch_dpc(self, parallel: Prompt, state, run_dir: str, epoch: int) -> str:
        """`<run_dir>/VLPromptLearner/model.pth.tar-<epoch>` in the StackSPLE_PromptKD layout:
        reference mode's parallel prompt and the BatchNorm statistics of the base classes."""
        from dpc_jax.convert import promptkd_torch

        args = _export_args(parallel, state, run_dir, epoch, "a promptkd DPC stage 2 needs the "
                            "BatchNorm statistics its base classes are evaluated with")
        return promptkd_torch.export_promptkd_dpc(*args, epoch)

    def export_torch_prompt(self, prompt: Prompt, run_dir: str, epoch: int,
                            state=None) -> str:
        """`<run_dir>/VLPromptLearner/model.pth.tar-<epoch>`: the student's prompts, projector
        and BatchNorm statistics in the released PromptKD key layout."""
        from dpc_jax.convert import promptkd_torch

        args = _export_args(prompt, state, run_dir, epoch,
                            "a promptkd student needs its state (BatchNorm statistics)")
        return promptkd_torch.export_promptkd_student(*args, epoch)


def _positive(value, field: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{_WHERE}.{field}={value!r}; expected a positive number")
    return float(value)


__all__ = ["PromptKD", "kd_loss", "batch_norm", "project", "init_projector", "ClassTokens",
           "RELEASED_OPTIONS", "positive_int"]


def _export_args(prompt, state, run_dir: str, epoch: int, needs: str) -> tuple:
    """(host prompt, host state, file path) of a PyTorch export; `needs`: the message's end
    when the BatchNorm state is missing."""
    from dpc_jax.convert import promptkd_torch

    if not state or "bn" not in state:
        raise ValueError(f"exporting {needs}")
    host = lambda t: jax.tree_util.tree_map(np.asarray, jax.device_get(t))
    return host(prompt), host(state), promptkd_torch.student_checkpoint_path(run_dir, epoch)
