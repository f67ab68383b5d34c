"""DePT (Zhang et al., "DePT: Decoupled Prompt Tuning"): feature-level decoupling, trained
jointly with any inner prompt learner (docs/reference/backbones.md#dept).

The prompt is {'inner': the inner learner's prompt, 'head': the channel-wise attention head}:
- 'film_img' {'scale', 'bias'} [E] and 'film_text' {'scale', 'bias'} [E] (init 1 and 0): a
  channel-wise scale and bias on the raw, un-normalised image and text features;
- 'linear' {'kernel' [E, C_base], 'bias' [C_base]}: a linear classifier over the base classes
  (torch's nn.Linear init).
Stage 1 (with t_c the inner learner's text features, v the image features, y the labels):

    L = 0.3 * L_inner + 0.7 * CE(head([film_text(t_y); film_img(v)]), [y; y])

L_inner is the inner learner's own stage-1 loss (CE of its 100 * cos logits for CoOp, CoCoOp,
IVLP and MaPLe, as DePT's released code computes; PromptSRC's self-regulating loss for DePT over
PromptSRC, which DePT never released: our composition). DePT over CoCoOp (released as
ExtrasLinearProbeCoCoOp): t_y is the text of each image's label under that image's own
conditioned context (ctx + meta_net(v)), one text per image beside CoCoOp's B x C for the cos
logits. The head and FiLM parameters train at
`head_lr_scale` (6.5) times the prompt's learning rate (`lr_multipliers`). Inference: base
classes 0.3 * cos logits + 0.7 * head logits (unscaled); new classes the cos logits alone (the
head is never evaluated for them: their classifier carries no head).

DPC's stage 2 on a DePT-trained stage 1 is refused (`dpc_unsupported`): DePT's base logits are
fused with a head tied to the base classes, which DPC's prompt-level contrastive stage neither
trains nor can mix with w_b; the comparison runs DPC and DePT each on the plain backbone.

`config.backbone` fields: name 'dept', inner (the inner learner's config: coop, cocoop,
ivlp, maple, promptsrc), cos_weight (0.3; the head's weight is 1 - cos_weight), head_lr_scale (6.5).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from dpc_jax.models.clip import normalize
from dpc_jax.prompts import capabilities
from dpc_jax.prompts.base import (Array, LearnerContext, LearnerInfo, Prompt, PromptLearner,
                                  check_class_ids, config_field,
                                  cross_entropy)

_WHERE = "config.backbone"


@flax.struct.dataclass
class DePTTexts:
    """The inner learner's class texts, marked base (head applies) or new (cos logits only)."""

    texts: object
    is_new: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def num_classes(self) -> int:
        return self.texts.num_classes


def init_head(key: jax.Array, dim: int, num_classes: int) -> dict:
    """FiLM pairs at (1, 0) and the linear head with torch's nn.Linear init."""
    k_w, k_b = jax.random.split(key)
    bound = 1.0 / math.sqrt(dim)
    film = lambda: {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}
    return {"film_img": film(), "film_text": film(),
            "linear": {"kernel": jax.random.uniform(k_w, (dim, num_classes), jnp.float32,
                                                    -bound, bound),
                       "bias": jax.random.uniform(k_b, (num_classes,), jnp.float32, -bound,
                                                  bound)}}


def film(x: Array, pair: dict) -> Array:
    return x.astype(jnp.float32) * pair["scale"] + pair["bias"]


def head_logits(head: dict, features: Array, kernel: Optional[Array] = None,
                bias: Optional[Array] = None, precision=jax.lax.Precision.HIGHEST) -> Array:
    """linear(features) [N, C] (the head's columns, or the given class rows kernel [C, E])."""
    kernel = head["linear"]["kernel"] if kernel is None else kernel.T
    bias = head["linear"]["bias"] if bias is None else bias
    return jnp.dot(features, kernel, precision=precision) + bias


def inner_learners() -> list:
    """The learners DePT can wrap (those whose `info.dept_inner` says so)."""
    from dpc_jax.prompts import registry  # the registry imports every learner module

    return [n for n in registry.learner_names() if registry.get_learner(n).info.dept_inner]


class DePT(capabilities.Stateful, capabilities.EpochHooks, capabilities.TorchFormat,
           PromptLearner):
    """DePT's channel-wise head around an inner prompt learner."""

    name = "dept"
    info = LearnerInfo(display_name="DePT", order=70,
                       field_help={"inner": "the wrapped learner's config (its name: one of the "
                                            "learners DePT wraps)",
                                   "cos_weight": "weight of the cosine logits (the head's: 1 - "
                                                 "cos_weight)",
                                   "head_lr_scale": "the head's learning-rate multiplier"})
    dpc_unsupported = ("DePT fuses the base logits with a head tied to the base classes, which "
                       "DPC's prompt-level stage 2 neither trains nor can mix; run DPC on the "
                       "plain backbone (configs/dpc_<backbone>.py) for the comparison")

    def __init__(self, clip_config, tokenizer, config: ml_collections.ConfigDict):
        super().__init__(clip_config, tokenizer, config)
        from dpc_jax.prompts import registry

        inner, wrappable = config_field(config, "inner", _WHERE), inner_learners()
        if inner.get("name") not in wrappable:
            raise ValueError(f"{_WHERE}.inner.name={inner.get('name')!r}; DePT wraps one of "
                             f"{wrappable}")
        self.inner = registry.build_learner(clip_config, tokenizer, inner)
        self.uses_image_prompts = self.inner.uses_image_prompts
        self.text_needs_image = getattr(self.inner, "text_needs_image", False)
        self.cos_weight = float(config_field(config, "cos_weight", _WHERE))
        if not 0 <= self.cos_weight <= 1:
            raise ValueError(f"{_WHERE}.cos_weight={self.cos_weight!r}; expected a number in "
                             f"[0, 1]")
        self.head_lr_scale = float(config_field(config, "head_lr_scale", _WHERE))
        if not self.head_lr_scale > 0:
            raise ValueError(f"{_WHERE}.head_lr_scale={self.head_lr_scale!r}; expected a "
                             f"positive number")

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        from dpc_jax.prompts.coop import CoOp

        config = ml_collections.ConfigDict()
        config.name = cls.name
        inner = CoOp.default_config()
        inner.n_ctx, inner.ctx_init = 16, ""  # DePT's CoOp: 16 random context tokens
        config.inner = inner
        config.cos_weight = 0.3
        config.head_lr_scale = 6.5
        return config

    # -- parameters ---------------------------------------------------------------------------
    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        if num_classes is None or num_classes < 1:
            raise ValueError(f"DePT's head needs the number of base classes; got "
                             f"num_classes={num_classes!r}")
        k_inner, k_head = jax.random.split(key)
        return {"inner": self.inner.init(k_inner, clip_params, num_classes),
                "head": init_head(k_head, self.clip_config.embed_dim, num_classes)}

    def init_state(self, clip_params):
        return capabilities.init_state(self.inner, clip_params)

    def constants(self, clip_params, context: LearnerContext) -> dict:
        return self.inner.constants(clip_params, context)

    def lr_multipliers(self):
        return [("head/.*", self.head_lr_scale), (".*", 1.0)]

    # -- PyTorch checkpoints (`dpc_jax.convert.dept_torch`) -----------------------------------
    def load_torch_prompt(self, path: str, num_classes: Optional[int] = None) -> Prompt:
        """{'inner', 'head'} of the released DePT trainer's single file (the whole CustomCLIP:
        inner prompt keys and head keys). MaPLe/IVLP/PromptSRC: the inner learner's own
        importer reads the same file (same module, same prefixes; the head keys are not
        prompt keys to it); CoOp: 'prompt_learner.ctx', which the plain CoOp importer (the
        prompt learner saved alone, unprefixed 'ctx') does not read."""
        from dpc_jax.convert import dept_torch  # torch lives there

        layout = self.inner.torch_layout
        if layout == "cocoop":  # one read: prompt and head from the same state dict
            inner, state_dict = dept_torch.load_dept_cocoop(path, self.inner.expected_shapes())
            head = dept_torch.head_from_state_dict(state_dict, path, self.clip_config.embed_dim,
                                                   num_classes)
            inner = jax.tree_util.tree_map(jnp.asarray, inner)
            return {"inner": inner, "head": jax.tree_util.tree_map(jnp.asarray, head)}
        if layout == "coop":
            inner = {"ctx": jnp.asarray(dept_torch.load_dept_coop_ctx(
                path, self.inner.ctx_shape(num_classes)))}
        else:
            inner = self.inner.load_torch_prompt(path, num_classes)
        head = dept_torch.load_dept_head(path, self.clip_config.embed_dim, num_classes)
        return {"inner": inner, "head": jax.tree_util.tree_map(jnp.asarray, head)}

    def export_torch_prompt(self, prompt: Prompt, run_dir: str, epoch: int,
                            state=None) -> str:
        """`<run_dir>/PromptLearner/model.pth.tar-<epoch>` (CoOp inner),
        `<run_dir>/MultiModalPromptLearner/...` (MaPLe) or `<run_dir>/VLPromptLearner/...`
        (IVLP, PromptSRC): the inner prompt keys and the head keys in one file, which the
        DePT trainer's `load_model` reads (frozen CLIP weights stay the model's own)."""
        import numpy as np

        from dpc_jax.convert import dept_torch

        del state  # the inner learners DePT wraps keep no state in their upstream file
        path = dept_torch.dept_checkpoint_path(run_dir, self.inner.torch_layout, epoch)
        prompt = jax.tree_util.tree_map(np.asarray, jax.device_get(prompt))
        return dept_torch.export_dept_checkpoint(prompt, path, self.inner.torch_layout, epoch,
                                                 embed_dim=self.clip_config.embed_dim)

    # -- features -----------------------------------------------------------------------------
    def prepare(self, clip_params, classnames: Sequence[str], *,
                new_classes: bool = False) -> DePTTexts:
        return DePTTexts(texts=self.inner.prepare(clip_params, classnames,
                                                  new_classes=new_classes),
                         is_new=bool(new_classes))

    def text_features(self, clip_params, prompt: Prompt, class_texts: DePTTexts, class_ids):
        return self.inner.text_features(clip_params, prompt["inner"], class_texts.texts,
                                        class_ids)

    def image_features(self, clip_params, prompt: Prompt, images, state=None):
        return self.inner.image_features(clip_params, prompt["inner"], images, state)

    def classifier(self, clip_params, prompt: Prompt, class_texts: DePTTexts, class_ids,
                   consts: Optional[dict] = None):
        """{'w': the inner classifier} and, for base classes, the head's rows of these
        classes ('kernel' [C, E], 'bias' [C]) and the FiLM'd text side is not needed at
        inference (the head classifies FiLM'd image features)."""
        class_ids = check_class_ids(class_ids)
        out = {"w": self.inner.classifier(clip_params, prompt["inner"], class_texts.texts,
                                          class_ids, consts)}
        if not class_texts.is_new:
            linear = prompt["head"]["linear"]
            out["kernel"] = linear["kernel"].T[class_ids]
            out["bias"] = linear["bias"][class_ids]
        return out

    def classify(self, clip_params, prompt: Prompt, classifier, image_features,
                 consts: Optional[dict] = None):
        cos = self.inner.classify(clip_params, prompt["inner"], classifier["w"], image_features,
                                  consts)
        if "kernel" not in classifier:  # new classes: the cosine logits alone
            return cos
        head = prompt["head"]
        fused = head_logits(head, film(image_features, head["film_img"]), classifier["kernel"],
                            classifier["bias"], self.clip_config.matmul_precision)
        return self.cos_weight * cos + (1.0 - self.cos_weight) * fused

    # -- stage 1 ------------------------------------------------------------------------------
    def loss(self, clip_params, prompt: Prompt, state, consts: dict, class_texts: DePTTexts,
             images, labels, key):
        inner, head = prompt["inner"], prompt["head"]
        texts = class_texts.texts
        ids = jnp.arange(texts.num_classes)
        image = self.inner.image_features(clip_params, inner, images, state)
        if self.text_needs_image:  # CoCoOp: each image's own class texts
            classifier = self.inner.classifier(clip_params, inner, texts, ids, consts)
            logits = self.inner.classify(clip_params, inner, classifier, image, consts)
            label_text = self.inner.conditioned_text_features(clip_params, inner, texts, image,
                                                              labels)
        else:
            text = self.inner.text_features(clip_params, inner, texts, ids)
            logits = self.inner.classify(clip_params, inner, normalize(text), image, consts)
            label_text = text[labels]
        if type(self.inner).loss is PromptLearner.loss:  # CE of the cos logits
            inner_loss = cross_entropy(logits, labels)
            metrics = {"acc": jnp.mean(jnp.argmax(logits, -1) == labels)}
        else:  # the inner learner's own loss (PromptSRC: self-regulating terms, our composition)
            inner_loss, metrics, state = self.inner.loss(clip_params, inner, state, consts,
                                                         texts, images, labels, key)
        rows = jnp.concatenate([film(label_text, head["film_text"]),
                                film(image, head["film_img"])])
        precision = self.clip_config.matmul_precision
        head_loss = cross_entropy(head_logits(head, rows, precision=precision),
                                  jnp.concatenate([labels, labels]))
        loss = self.cos_weight * inner_loss + (1.0 - self.cos_weight) * head_loss
        return loss, {**metrics, "inner_loss": inner_loss, "head_loss": head_loss}, state

    # -- epoch hooks: the inner learner's, on its prompt ---------------------------------------
    def init_extra(self, prompt: Prompt) -> dict:
        return capabilities.epoch_hooks(self.inner).init_extra(prompt["inner"])

    def on_epoch_end(self, epoch: int, epochs: int, prompt: Prompt, extra: dict) -> dict:
        return capabilities.epoch_hooks(self.inner).on_epoch_end(epoch, epochs, prompt["inner"],
                                                                 extra)

    def final_prompt(self, prompt: Prompt, extra: dict) -> Prompt:
        return {"inner": capabilities.epoch_hooks(self.inner).final_prompt(prompt["inner"], extra),
                "head": prompt["head"]}
