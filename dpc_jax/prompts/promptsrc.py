"""PromptSRC (Khattak et al., "Self-regulating Prompts"): IVLP's prompts with self-regulating
losses towards frozen CLIP and Gaussian prompt aggregation (docs/reference/backbones.md#promptsrc).

Prompts, insertion points and the PyTorch checkpoint layout are IVLP's (`dpc_jax.prompts.ivlp`;
the upstream file adds a frozen image-encoder copy `prompt_learner.ZS_image_encoder.*`, ignored
on import). Stage 1's loss, with v, t the normalised prompted image and text features, z the
frozen CLIP image feature of the same augmented image, g the frozen text target of each training
class, p = softmax(s v t^T), q = softmax(s z g^T) and s = CLIP's logit scale (100):

    L = CE(p, y) + w_text * mean|t - g| (over C x E) + w_image * mean|v - z| (over B x E)
        + sum_{b,c} q (log q - log p) / (B*C)

g_c: the 60 templates of `TEMPLATES_FILE` filled with the class name, encoded by frozen CLIP,
the un-normalised features averaged, then L2-normalised; a per-seed constant (`constants`).

Gaussian prompt aggregation (GPA): w_e = N(e; mu, sigma) for e = 1..E, normalised to sum 1;
after the last step of epoch e, w_e * (the prompt) is added to a float32 running sum (the
learner's epoch-hook `extra`, checkpointed with the stage, so a resumed run ends bitwise equal to
an uninterrupted one); stage 1's result P is the sum. Only the prompt leaves are averaged: the
released code sums every tensor of the model's state dict in fp16, frozen CLIP included, which
moves the frozen weights by about one ULP in many entries; here they are never touched.

DPC's stage 2 on PromptSRC is its contrastive loss only: no self-regulating terms and no GPA,
as in the released trainers (stage 2 never calls this learner's `loss` or epoch hooks).

`config.backbone` fields: IVLP's (`name` 'promptsrc'), plus text_loss_weight (25),
image_loss_weight (10), gpa_mean (mu, 15), gpa_std (sigma, 1).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpc_jax.models.clip import cosine_logits, logit_scale, normalize
from dpc_jax.models.tokenizer import trim_context
from dpc_jax.prompts.base import (LearnerContext, LearnerInfo, Prompt, config_field,
                                  cross_entropy, traced)
from dpc_jax.prompts.capabilities import EpochHooks
from dpc_jax.prompts.ivlp import IVLP

_WHERE = "config.backbone"
TEMPLATES_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "templates",
                              "promptsrc_imagenet_60.txt")
_TEXT_CHUNK = 256  # texts per frozen-encoder call (a static shape)


def read_templates(path: str = TEMPLATES_FILE) -> list:
    """The templates of a file with one template per line ('#' lines are comments)."""
    with open(path) as f:
        templates = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{path}: templates {bad[:3]} do not contain exactly one '{{}}'")
    return templates


def gpa_weights(epochs: int, mean: float, std: float) -> np.ndarray:
    """w_e = N(e; mean, std) for e = 1..epochs, normalised to sum 1 (float64)."""
    e = np.arange(1, epochs + 1, dtype=np.float64)
    w = np.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    if not np.sum(w) > 0:
        raise ValueError(f"{_WHERE}.gpa_mean={mean}, gpa_std={std}: the Gaussian has no weight "
                         f"on epochs 1..{epochs}; put gpa_mean within the schedule")
    return w / np.sum(w)


def promptsrc_loss(logits, zs_logits, text, text_target, image, image_target, labels,
                   w_text: float, w_image: float):
    """(loss, terms) of the formula in the module docstring from its inputs: prompted and
    frozen logits [B, C], normalised text features and targets [C, E], normalised image
    features and frozen image features [B, E], labels [B]."""
    ce = cross_entropy(logits, labels)
    scl_text = w_text * jnp.mean(jnp.abs(text - text_target))
    scl_image = w_image * jnp.mean(jnp.abs(image - image_target))
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(zs_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p)) / logits.size
    terms = {"ce": ce, "scl_text": scl_text, "scl_image": scl_image, "scl_kl": kl}
    return ce + scl_text + scl_image + kl, terms


class PromptSRC(EpochHooks, IVLP):
    """IVLP prompts trained with PromptSRC's self-regulating loss and GPA."""

    name = "promptsrc"
    info = LearnerInfo(
        display_name="PromptSRC", order=50, dept_inner=True, world=IVLP.info.world,
        field_help={**IVLP.info.field_help,
                    "text_loss_weight": "weight of the text self-regulating term",
                    "image_loss_weight": "weight of the image self-regulating term",
                    "gpa_mean": "Gaussian prompt aggregation: mean epoch",
                    "gpa_std": "Gaussian prompt aggregation: std in epochs"})

    def __init__(self, clip_config, tokenizer, config: ml_collections.ConfigDict):
        super().__init__(clip_config, tokenizer, config)
        self.w_text = _number(config_field(config, "text_loss_weight", _WHERE),
                              "text_loss_weight")
        self.w_image = _number(config_field(config, "image_loss_weight", _WHERE),
                               "image_loss_weight")
        self.gpa_mean = _number(config_field(config, "gpa_mean", _WHERE), "gpa_mean")
        self.gpa_std = _number(config_field(config, "gpa_std", _WHERE), "gpa_std")
        if self.gpa_std <= 0:
            raise ValueError(f"{_WHERE}.gpa_std={self.gpa_std!r}; expected a positive number")
        self.templates = read_templates()

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        config = super().default_config()
        config.name = cls.name
        config.text_loss_weight = 25.0
        config.image_loss_weight = 10.0
        config.gpa_mean = 15.0
        config.gpa_std = 1.0
        return config

    # -- constants: the frozen text target of every training class -----------------------------
    def constants(self, clip_params, context: LearnerContext) -> dict:
        return {"text_target": self.frozen_text_target(clip_params, context.classnames)}

    def frozen_text_target(self, clip_params, classnames: Sequence[str]) -> jax.Array:
        """g [C, E]: frozen CLIP's un-normalised features averaged over the templates, then
        L2-normalised."""
        names = [c.replace("_", " ") for c in classnames]
        texts = [t.format(n) for n in names for t in self.templates]
        ids, eot = self.tokenizer(texts)
        ids = np.asarray(trim_context(ids, eot, enabled=self.clip_config.trim_text), np.int32)
        encode = _frozen_text_encoder(self)
        xp = jnp if traced(clip_params) else np  # traced: shapes only (`jax.eval_shape`)
        feats = []
        for s in range(0, len(ids), _TEXT_CHUNK):
            chunk = ids[s:s + _TEXT_CHUNK]
            pad = np.concatenate([chunk, np.repeat(chunk[:1], _TEXT_CHUNK - len(chunk), 0)])
            feats.append(xp.asarray(encode(clip_params, pad))[:len(chunk)])
        feats = xp.concatenate(feats).reshape(len(names), len(self.templates), -1)
        return normalize(jnp.asarray(feats.mean(axis=1), jnp.float32))

    # -- stage 1 ------------------------------------------------------------------------------
    def loss(self, clip_params, prompt: Prompt, state, consts: dict, class_texts, images,
             labels, key):
        del key
        scale = logit_scale(clip_params)
        precision = self.clip_config.matmul_precision
        text = normalize(self.text_features(clip_params, prompt, class_texts,
                                            jnp.arange(class_texts.num_classes)))
        image = normalize(self.image_features(clip_params, prompt, images, state))
        frozen = jax.lax.stop_gradient(normalize(self.model.apply(
            {"params": clip_params}, images, method="encode_image")))
        target = consts["text_target"]
        logits = cosine_logits(image, text, scale, precision)
        zs_logits = cosine_logits(frozen, target, scale, precision)
        loss, terms = promptsrc_loss(logits, zs_logits, text, target, image, frozen, labels,
                                     self.w_text, self.w_image)
        terms["acc"] = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, terms, state

    # -- Gaussian prompt aggregation ------------------------------------------------------------
    def init_extra(self, prompt: Prompt) -> dict:
        return {"gpa_sum": jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.float32),
                                                  prompt)}

    def on_epoch_end(self, epoch: int, epochs: int, prompt: Prompt, extra: dict) -> dict:
        w = np.float32(gpa_weights(epochs, self.gpa_mean, self.gpa_std)[epoch])
        total = jax.tree_util.tree_map(lambda s, p: np.asarray(s, np.float32)
                                       + w * np.asarray(p, np.float32), extra["gpa_sum"], prompt)
        return {"gpa_sum": total}

    def final_prompt(self, prompt: Prompt, extra: dict) -> Prompt:
        return jax.tree_util.tree_map(jnp.asarray, extra["gpa_sum"])


def _number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_WHERE}.{field}={value!r}; expected a finite number")
    return float(value)


_ENCODERS = {}


def _frozen_text_encoder(learner):
    """A jitted frozen `encode_text`, one per CLIP architecture."""
    key = learner.clip_config
    if key not in _ENCODERS:
        model = learner.model
        _ENCODERS[key] = jax.jit(lambda cp, ids: model.apply({"params": cp}, ids,
                                                             method="encode_text"))
    return _ENCODERS[key]
