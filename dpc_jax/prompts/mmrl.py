"""MMRL (Guo et al., "Multi-Modal Representation Learning for Vision-Language Models", CVPR 2025):
shared representation tokens mapped into both CLIP towers, a second image head, and a loss kept
close to frozen CLIP (docs/mmrl.md).

The prompt pytree (all float32), K tokens, d_r the representation width, L_r = blocks - J + 1:
- 'rep_tokens' [K, d_r]: the shared representation tokens R, N(0, 0.02).
- 'text_maps' {'kernel' [L_r, d_r, W_t], 'bias' [L_r, W_t]} and 'vision_maps' {'kernel'
  [L_r, d_r, W_v], 'bias' [L_r, W_v]}: the affine maps F_t^i, F_v^i of the blocks J..last
  (1-based J; "last" is the shallower tower's last block). PyTorch's nn.Linear init
  U(-1/sqrt(d_r), 1/sqrt(d_r)); all L_r maps start as copies of one draw (the released code
  deep-copies one module).
- 'proj_rep' [W_v, E]: the representation branch's image projection, used as x @ proj_rep,
  N(0, 1/W_v) (the released code draws it and never loads CLIP's proj into it);
  `proj_rep_init='clip'` starts it at CLIP's proj instead.

Forward. Token i = F^i(R) [K, W]. Blocks 1..J-1 (1-based) are plain CLIP. At the input of block
J the K tokens of map 0 are inserted after CLS (image: [CLS, R_v, patches], after ln_pre, no
positional embedding) and after BOT (text: [BOT, R_t, words...], the causal mask rebuilt at
the longer length); at every later block positions 1..K are overwritten by that block's tokens.
Image features: v_c = ln_post(CLS) @ proj (CLIP's, frozen) and v_r = mean_k ln_post(token k)
@ proj_rep. Text feature t: the EOT token (shifted by K) after ln_final, @ text_projection, of
the class text `template.format(name)` (no learned context).

Heads: L_cls = 100 cos(v_c, t), L_rep = 100 cos(v_r, t), L_fuse = a L_cls + (1-a) L_rep. Base
(training) classes are scored with L_fuse, classes unseen in training with L_cls (the released
trainer's B2N rule); the rule is carried by the class list: `prepare(..., new_classes=True)`
gives every class the fusion weight 1, so one classifier serves a list of either kind.
Arrays between the methods: `image_features` -> [N, 2E] = [v_c | v_r] (un-normalised);
`classifier` -> [C, E+1] = [unit t_c | fusion weight of class c].

Stage-1 loss (the released `forward_backward`; z = frozen CLIP's normalised image feature of
the same augmented image, g_c = frozen CLIP's normalised feature of the class's template text):

    L = a CE(L_cls, y) + (1-a) CE(L_rep, y)
        + lam (1 - mean_b cos(v_c, z)) + lam (1 - mean_c cos(t_c, g_c))

DPC on MMRL (docs/mmrl.md): every leaf is doubled; mixes w P' + (1-w) P are taken over the
tokens entering the towers, R^i(w) = w F'^i(R') + (1-w) F^i(R), and proj_rep linearly
(`dpc_mix='parameters'` mixes the leaves instead); base classes use the fused head with P_b,
new classes the CLS head with P_n, so at w_n = 0 new accuracy is MMRL's. Stage 2's loss is
a InfoNCE(v_c, t) + (1-a) InfoNCE(v_r, t) (`dpc_loss='fused'`: InfoNCE on the fused logits).
Reference mode's converse map, which the released trainers apply to the layer-0 text context,
acts on R here (MMRL has no text context); paper mode is the default of configs/dpc_mmrl.py.

`config.backbone` fields (see `MMRL.default_config`; upstream names in brackets):
- name: 'mmrl'
- n_rep_tokens [N_REP_TOKENS] (5), rep_dim [REP_DIM] (512; EuroSAT 2048), first_layer J
  [REP_LAYERS[0]] (6, 1-based: blocks J..last take tokens, in both towers), alpha [SCALE] (0.7),
  reg_weight lam [REG_WEIGHT] (per dataset), template (the class text, '{}' = the class name).
- proj_rep_init: 'random' (released) | 'clip'.
- optimizer: 'adamw' (MMRL's) | 'sgd': stage 1's optimiser, read by the trainer.
- dpc_mix: 'tokens' | 'parameters'; dpc_loss: 'branches' | 'fused'.
- init_from: a PyTorch MMRL checkpoint (`MultiModalRepresentationLearner/model.pth.tar-N`).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpc_jax.models.clip import LayerNorm, ResidualAttentionBlock, normalize
from dpc_jax.models.tokenizer import trim_context
from dpc_jax.prompts.base import (Array, DualRules, LearnerInfo, Prompt, PromptLearner,
                                  check_class_ids, config_field, cross_entropy, in_chunks)
from dpc_jax.prompts.capabilities import Dual, TorchFormat
from dpc_jax.prompts.ivlp import check_leaf, positive_int

_WHERE = "config.backbone"
SCALE = 100.0  # the released code's fixed logit scale (trainers/mmrl.py), not CLIP's
REP_STD = 0.02
COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps in the released loss
PROJ_REP_INITS = ("random", "clip")
DPC_MIXES = ("tokens", "parameters")
DPC_LOSSES = ("branches", "fused")
TORCH_FOLDER = "MultiModalRepresentationLearner"
_RL = "representation_learner."


@flax.struct.dataclass
class RepTexts:
    """Per-class inputs of MMRL's text tower, built once per class list by `prepare`.

    embeddings: float32 [C, L, W_t], token embeddings of `template.format(name)` (L:
      `trim_context`); eot_indices: int32 [C], the EOT positions before the K tokens are
      inserted; fusion: float32 [C], the weight of the CLS head in the class's logits (alpha for
      training classes, 1 for new classes).
    """

    embeddings: Array
    eot_indices: Array
    fusion: Array

    @property
    def num_classes(self) -> int:
        return self.embeddings.shape[0]


def _choice(value, field: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{_WHERE}.{field}={value!r}; allowed values: {list(allowed)}")
    return value


def _number(value, field: str, low: float, high: float = math.inf) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high):
        bound = f"in [{low}, {high}]" if high != math.inf else f">= {low}"
        raise ValueError(f"{_WHERE}.{field}={value!r}; expected a number {bound}")
    return float(value)


def cosine(a, b):
    """torch.nn.functional.cosine_similarity along the last axis (its eps)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1)
                                            * jnp.linalg.norm(b, axis=-1), COS_EPS)


def mmrl_loss(logits_cls, logits_rep, image, image_target, text, text_target, labels,
              alpha: float, reg_weight: float):
    """(loss, terms) of the released MMRL_Loss from its inputs: the two heads' logits [B, C],
    v_c and frozen z [B, E], t and frozen g [C, E], labels [B]."""
    ce_cls = cross_entropy(logits_cls, labels)
    ce_rep = cross_entropy(logits_rep, labels)
    reg_image = 1.0 - jnp.mean(cosine(image, image_target))
    reg_text = 1.0 - jnp.mean(cosine(text, text_target))
    loss = alpha * ce_cls + (1.0 - alpha) * ce_rep + reg_weight * (reg_image + reg_text)
    return loss, {"ce_cls": ce_cls, "ce_rep": ce_rep, "reg_image": reg_image,
                  "reg_text": reg_text}


class MMRL(Dual, TorchFormat, PromptLearner):
    """Multi-modal representation learning: shared tokens in both towers, two image heads."""

    name = "mmrl"
    # The world CLIP has 2 text and 3 image blocks: J = 2 inserts the tokens at block 2 of both
    # towers (the image tower's third block carries them on), leaving the first block plain as
    # MMRL's J = 6 of 12 leaves the first half.
    info = LearnerInfo(
        display_name="MMRL", order=60,
        # Batch 8 from a seed-2 sweep of stage 1 (at B 32 that seed's CLS branch stalled near
        # 43% base); stage 2's LR from a seed-1 sweep of (dpc.lr, w_b) (docs/mmrl.md).
        world={"backbone.first_layer": 2, "backbone.rep_dim": 32, "backbone.epochs": 20,
               "backbone.batch_size": 8, "backbone.lr": 0.002, "backbone.reg_weight": 1.0,
               "dpc.lr": 0.02},
        field_help={"n_rep_tokens": "representation tokens K",
                    "rep_dim": "width d_r of the representation space",
                    "first_layer": "first block (1-based) that takes the tokens, both towers",
                    "alpha": "weight of the CLS head in the fused logits and the loss",
                    "reg_weight": "lam: weight of the two cosine terms toward frozen CLIP",
                    "template": "class text, '{}' = the class name (the dataset's template)",
                    "proj_rep_init": "random (released) | clip: start proj_rep at CLIP's proj",
                    "optimizer": "stage-1 optimiser: adamw (MMRL's) | sgd",
                    "dpc_mix": "DPC mixing: tokens (entering the towers) | parameters",
                    "dpc_loss": "DPC stage-2 loss: branches (a InfoNCE_cls + (1-a) "
                                "InfoNCE_rep) | fused"})
    uses_image_prompts = True
    torch_layout = "mmrl"

    def __init__(self, clip_config, tokenizer, config: ml_collections.ConfigDict):
        super().__init__(clip_config, tokenizer, config)
        cc = clip_config
        # The same blocks J..last of both towers take tokens (REP_LAYERS is one list upstream);
        # with towers of different depth "last" is the shallower tower's last block, and the
        # deeper tower's remaining blocks carry the tokens on without overwriting them.
        self.layers = min(cc.transformer_layers, cc.vision_layers)
        self.n_rep = positive_int(config_field(config, "n_rep_tokens", _WHERE), "n_rep_tokens")
        self.rep_dim = positive_int(config_field(config, "rep_dim", _WHERE), "rep_dim")
        self.first_layer = positive_int(config_field(config, "first_layer", _WHERE),
                                        "first_layer", 1, self.layers,
                                        f" (1-based; the shallower tower has {self.layers} "
                                        f"blocks)")
        self.rep_layers = self.layers - self.first_layer + 1
        self.alpha = _number(config_field(config, "alpha", _WHERE), "alpha", 0.0, 1.0)
        self.reg_weight = _number(config_field(config, "reg_weight", _WHERE), "reg_weight", 0.0)
        template = config_field(config, "template", _WHERE)
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"{_WHERE}.template={template!r}; expected a string with exactly "
                             f"one '{{}}' for the class name")
        self.template = template
        self.proj_rep_init = _choice(config_field(config, "proj_rep_init", _WHERE),
                                     "proj_rep_init", PROJ_REP_INITS)
        self.dpc_mix = _choice(config_field(config, "dpc_mix", _WHERE), "dpc_mix", DPC_MIXES)
        self.dpc_loss = _choice(config_field(config, "dpc_loss", _WHERE), "dpc_loss", DPC_LOSSES)
        self.text_width, self.vision_width = cc.transformer_width, cc.vision_width
        self.embed_dim = cc.embed_dim

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        config = ml_collections.ConfigDict()
        config.name = cls.name
        config.n_rep_tokens = 5
        config.rep_dim = 512
        config.first_layer = 6
        config.alpha = 0.7
        config.reg_weight = 1.0
        config.template = "a photo of a {}."
        config.proj_rep_init = "random"
        config.dpc_mix = "tokens"
        config.dpc_loss = "branches"
        config.optimizer = "adamw"  # read by the trainer (stage 1's optimiser)
        return config

    # -- parameters ---------------------------------------------------------------------------
    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        k_rep, k_tw, k_tb, k_vw, k_vb, k_proj = jax.random.split(key, 6)
        d, n = self.rep_dim, self.rep_layers
        bound = d ** -0.5  # torch nn.Linear: kaiming_uniform(a=sqrt(5)) and bias bound

        def linear(kw, kb, width):
            w = jax.random.uniform(kw, (d, width), jnp.float32, -bound, bound)
            b = jax.random.uniform(kb, (width,), jnp.float32, -bound, bound)
            # One draw copied to every block, as the released _get_clones.
            return {"kernel": jnp.broadcast_to(w, (n, d, width)) + 0.0,
                    "bias": jnp.broadcast_to(b, (n, width)) + 0.0}

        if self.proj_rep_init == "clip":
            proj_rep = jnp.array(clip_params["visual"]["proj"], jnp.float32)
        else:
            proj_rep = (self.vision_width ** -0.5) * jax.random.normal(
                k_proj, (self.vision_width, self.embed_dim), jnp.float32)
        return {"rep_tokens": REP_STD * jax.random.normal(k_rep, (self.n_rep, d), jnp.float32),
                "text_maps": linear(k_tw, k_tb, self.text_width),
                "vision_maps": linear(k_vw, k_vb, self.vision_width),
                "proj_rep": proj_rep}

    def expected_shapes(self) -> dict:
        """'/'-joined leaf path -> shape of this learner's prompt (what a checkpoint must hold)."""
        d, n = self.rep_dim, self.rep_layers
        return {"rep_tokens": (self.n_rep, d),
                "text_maps/kernel": (n, d, self.text_width), "text_maps/bias": (n, self.text_width),
                "vision_maps/kernel": (n, d, self.vision_width),
                "vision_maps/bias": (n, self.vision_width),
                "proj_rep": (self.vision_width, self.embed_dim)}

    def towers(self, prompt: Prompt) -> Prompt:
        """The tokens entering the towers {'text_tokens' [L_r, K, W_t], 'vision_tokens'
        [L_r, K, W_v], 'proj_rep'}; a prompt already in that form is returned as it is."""
        if isinstance(prompt, dict) and "text_tokens" in prompt:
            return prompt
        precision = self.clip_config.matmul_precision
        shapes = self.expected_shapes()
        rep = check_leaf(prompt, "rep_tokens", shapes["rep_tokens"], "n_rep_tokens, rep_dim")
        out = {"proj_rep": check_leaf(prompt, "proj_rep", shapes["proj_rep"],
                                      "vision width, embed dim")}
        for tower in ("text", "vision"):
            maps = prompt.get(f"{tower}_maps")
            maps = maps if isinstance(maps, dict) else {}
            kernel = check_leaf(maps, "kernel", shapes[f"{tower}_maps/kernel"],
                                f"{tower}_maps: blocks from first_layer, rep_dim, width")
            bias = check_leaf(maps, "bias", shapes[f"{tower}_maps/bias"],
                              f"{tower}_maps: blocks from first_layer, width")
            out[f"{tower}_tokens"] = (jnp.einsum("kd,ldw->lkw", rep, kernel, precision=precision)
                                      + bias[:, None, :])
        return out

    # -- the towers ---------------------------------------------------------------------------
    def _run(self, blocks, x, tokens, heads: int, mask_fn):
        """Blocks 0..last of a tower on x [N, L, W]: the K tokens [L_r, K, W] inserted after
        position 0 at block J-1 (0-based) and overwriting positions 1..K after that."""
        cc = self.clip_config
        block = nn.remat(ResidualAttentionBlock) if cc.remat else ResidualAttentionBlock
        block = block(x.shape[-1], heads, cc.compute_dtype, cc.matmul_precision, cc.attention)
        n = x.shape[0]
        j = self.first_layer - 1
        tokens = tokens.astype(x.dtype)
        for i in range(len(blocks)):
            if j <= i < j + self.rep_layers:
                t = jnp.broadcast_to(tokens[i - j][None], (n,) + tokens.shape[1:])
                rest = x[:, 1:] if i == j else x[:, 1 + self.n_rep:]
                x = jnp.concatenate([x[:, :1], t, rest], axis=1)
            x = block.apply({"params": blocks[f"resblocks_{i}"]}, x, mask_fn(x.shape[1]))
        return x

    def _text(self, clip_params, tokens, embeddings, eot_indices):
        cc = self.clip_config
        dtype = cc.compute_dtype
        length = embeddings.shape[1]
        x = embeddings.astype(dtype) + clip_params["positional_embedding"][:length].astype(dtype)

        def causal(size):
            return jnp.tril(jnp.ones((size, size), dtype=bool))[None, None]

        x = self._run(clip_params["transformer"], x, tokens, cc.transformer_heads, causal)
        x = LayerNorm(dtype).apply({"params": clip_params["ln_final"]}, x)
        x = x[jnp.arange(x.shape[0]), eot_indices + self.n_rep]
        return jnp.dot(x, clip_params["text_projection"].astype(dtype),
                       precision=cc.matmul_precision)

    def _image(self, clip_params, tokens, proj_rep, images):
        cc = self.clip_config
        dtype, precision = cc.compute_dtype, cc.matmul_precision
        res = cc.image_resolution
        if images.ndim != 4 or images.shape[1:] != (res, res, 3):
            raise ValueError(f"images of shape {tuple(images.shape)}; this CLIP expects NHWC "
                             f"float images of shape [N, {res}, {res}, 3] (CLIP-normalised)")
        v = clip_params["visual"]
        width = cc.vision_width
        x = nn.Conv(width, (cc.vision_patch_size,) * 2, strides=(cc.vision_patch_size,) * 2,
                    padding="VALID", use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    precision=precision).apply({"params": v["conv1"]}, images.astype(dtype))
        n = x.shape[0]
        x = x.reshape(n, -1, width)
        cls = jnp.broadcast_to(v["class_embedding"].astype(dtype), (n, 1, width))
        x = jnp.concatenate([cls, x], axis=1) + v["positional_embedding"].astype(dtype)
        x = LayerNorm(dtype).apply({"params": v["ln_pre"]}, x)
        x = self._run(v["transformer"], x, tokens, cc.vision_heads, lambda size: None)
        ln_post = LayerNorm(dtype)
        cls_out = ln_post.apply({"params": v["ln_post"]}, x[:, 0])
        rep_out = ln_post.apply({"params": v["ln_post"]}, x[:, 1:1 + self.n_rep])
        rep_out = jnp.mean(rep_out.astype(jnp.float32), axis=1).astype(dtype)
        v_c = jnp.dot(cls_out, v["proj"].astype(dtype), precision=precision)
        v_r = jnp.dot(rep_out, jnp.asarray(proj_rep).astype(dtype), precision=precision)
        return v_c, v_r

    # -- features -----------------------------------------------------------------------------
    def prepare(self, clip_params, classnames: Sequence[str], *,
                new_classes: bool = False) -> RepTexts:
        if isinstance(classnames, str) or len(classnames) == 0:
            raise ValueError(f"classnames must be a non-empty sequence of strings; got "
                             f"{classnames!r}")
        texts = [self.template.format(c.replace("_", " ")) for c in classnames]
        ids, eot = self.tokenizer(texts)
        ids = trim_context(ids, eot, enabled=self.clip_config.trim_text)
        emb = self.model.apply({"params": clip_params}, jnp.asarray(ids), method="embed_tokens")
        fusion = 1.0 if new_classes else self.alpha
        return RepTexts(embeddings=jnp.asarray(emb, jnp.float32),
                        eot_indices=jnp.asarray(eot, jnp.int32),
                        fusion=jnp.full((len(classnames),), fusion, jnp.float32))

    def text_features(self, clip_params, prompt: Prompt, class_texts: RepTexts,
                      class_ids) -> Array:
        class_ids = check_class_ids(class_ids)
        tokens = self.towers(prompt)["text_tokens"]
        return in_chunks(lambda emb, eot: self._text(clip_params, tokens, emb, eot),
                         self.clip_config.text_chunk, class_texts.embeddings[class_ids],
                         class_texts.eot_indices[class_ids])

    def branch_features(self, clip_params, prompt: Prompt, images) -> tuple:
        """(v_c, v_r), each [N, E] un-normalised."""
        towers = self.towers(prompt)
        return self._image(clip_params, towers["vision_tokens"], towers["proj_rep"], images)

    def image_features(self, clip_params, prompt: Prompt, images, state=None) -> Array:
        """[N, 2E]: v_c and v_r side by side (un-normalised)."""
        del state
        return jnp.concatenate(self.branch_features(clip_params, prompt, images), axis=-1)

    def classifier(self, clip_params, prompt: Prompt, class_texts: RepTexts, class_ids,
                   consts=None) -> Array:
        """[C, E+1]: unit text features and each class's CLS-head weight."""
        class_ids = check_class_ids(class_ids)
        t = normalize(self.text_features(clip_params, prompt, class_texts, class_ids))
        return jnp.concatenate([t, class_texts.fusion[class_ids][:, None]], axis=-1)

    def _branch_logits(self, image_features, classifier):
        e = self.embed_dim
        precision = self.clip_config.matmul_precision
        t = jnp.asarray(classifier)[:, :e].astype(jnp.float32)
        v_c = normalize(image_features[:, :e])
        v_r = normalize(image_features[:, e:])
        return (SCALE * jnp.matmul(v_c, t.T, precision=precision),
                SCALE * jnp.matmul(v_r, t.T, precision=precision))

    def classify(self, clip_params, prompt: Prompt, classifier, image_features,
                 consts=None) -> Array:
        """f_c L_cls + (1 - f_c) L_rep per class c (f_c: alpha for base classes, 1 for new)."""
        cls, rep = self._branch_logits(image_features, classifier)
        fusion = jnp.asarray(classifier)[:, -1].astype(jnp.float32)
        return fusion * cls + (1.0 - fusion) * rep

    # -- stage 1 ------------------------------------------------------------------------------
    def constants(self, clip_params, context) -> dict:
        """{'text_target': g [C, E]}: frozen CLIP's normalised features of the template texts
        of the training classes."""
        from dpc_jax.prompts.zsclip import ZeroShotCLIP
        from dpc_jax.prompts.base import classifier_rows

        frozen = ZeroShotCLIP(self.clip_config, self.tokenizer, ml_collections.ConfigDict(
            {"name": ZeroShotCLIP.name, "templates": [self.template]}))
        texts = frozen.prepare(clip_params, list(context.classnames))
        return {"text_target": jnp.asarray(classifier_rows(frozen, clip_params, {}, texts))}

    def loss(self, clip_params, prompt, state, consts, class_texts, images, labels, key):
        del key
        ids = jnp.arange(class_texts.num_classes)
        text = self.classifier(clip_params, prompt, class_texts, ids, consts)
        feats = self.image_features(clip_params, prompt, images, state)
        logits_cls, logits_rep = self._branch_logits(feats, text)
        frozen = jax.lax.stop_gradient(normalize(self.model.apply(
            {"params": clip_params}, images, method="encode_image")))
        loss, terms = mmrl_loss(logits_cls, logits_rep, normalize(feats[:, :self.embed_dim]),
                                frozen, text[:, :self.embed_dim], consts["text_target"], labels,
                                self.alpha, self.reg_weight)
        fused = self.alpha * logits_cls + (1.0 - self.alpha) * logits_rep
        terms["acc"] = jnp.mean(jnp.argmax(fused, -1) == labels)
        return loss, terms, state

    # -- DPC ----------------------------------------------------------------------------------
    def dual_rules(self) -> DualRules:
        """Every leaf doubled; reference mode's converse map on R; mixes over the tower tokens
        (or the leaves, `dpc_mix='parameters'`)."""
        return DualRules(converse=(("rep_tokens", True), (".*", False)),
                         towers=self.towers if self.dpc_mix == "tokens" else None)

    def pair_loss(self, clip_params, prompt, image_features, slot_classifier, valid,
                  consts, infonce):
        """a InfoNCE(v_c, t) + (1-a) InfoNCE(v_r, t) over DHNO's slots (`dpc_loss='fused'`:
        InfoNCE of the fused logits)."""
        cls, rep = self._branch_logits(image_features, slot_classifier)
        if self.dpc_loss == "fused":
            return infonce(self.alpha * cls + (1.0 - self.alpha) * rep, valid)
        return self.alpha * infonce(cls, valid) + (1.0 - self.alpha) * infonce(rep, valid)

    def pair_logits(self, clip_params, prompt, image_features, slot_classifier, consts=None):
        """The fused logits of the slots (what `dpc_loss='fused'` trains on)."""
        cls, rep = self._branch_logits(image_features, slot_classifier)
        return self.alpha * cls + (1.0 - self.alpha) * rep

    # -- PyTorch checkpoints ------------------------------------------------------------------
    def torch_keys(self) -> dict:
        """Released key -> (our leaf path, block index or None, transposed) of every tensor."""
        out = {_RL + "compound_rep_tokens": ("rep_tokens", None, False),
               "image_encoder.proj_rep": ("proj_rep", None, False)}
        for i in range(self.rep_layers):
            for tower, letter in (("text", "t"), ("vision", "v")):
                key = f"{_RL}compound_rep_tokens_r2{letter}proj.{i}."
                out[key + "weight"] = (f"{tower}_maps/kernel", i, True)
                out[key + "bias"] = (f"{tower}_maps/bias", i, False)
        return out

    def _torch_shape(self, leaf: str, index, transposed) -> tuple:
        shape = self.expected_shapes()[leaf]
        shape = shape[1:] if index is not None else shape
        return tuple(reversed(shape)) if transposed else tuple(shape)

    def load_torch_prompt(self, path: str, num_classes: Optional[int] = None) -> Prompt:
        """The prompt of a released MMRL checkpoint (`<run>/MultiModalRepresentationLearner/
        model.pth.tar-N`): the keys of `torch_keys`; the template embeddings and the frozen
        CLIP copies it also holds are ignored. Linear weights [out, in] become kernels."""
        from dpc_jax import tree as tree_lib
        from dpc_jax.convert import torch_files as tf

        example = os.path.join("<run>", TORCH_FOLDER, "model.pth.tar-10")
        state = tf.read_state_dict(path, "MMRL checkpoint", example)
        wanted = self.torch_keys()
        missing = sorted((k for k in wanted if k not in state), key=tf.natural_key)
        unexpected = sorted((k for k in state if k.startswith(_RL) and k not in wanted),
                            key=tf.natural_key)
        hints = {"rep_tokens": ("n_rep_tokens", "rep_dim"),
                 "proj_rep": ("vision width", "embed dim")}
        misshaped, not_tensor = tf.tensor_problems(state, {
            k: (self._torch_shape(leaf, i, tr),
                hints.get(leaf, ("width", "rep_dim") if tr else ("width",)))
            for k, (leaf, i, tr) in wanted.items()})
        if missing or unexpected or misshaped or not_tensor:
            lines = [f"{path!r} does not fit this MMRL config (n_rep_tokens={self.n_rep}, "
                     f"rep_dim={self.rep_dim}, first_layer={self.first_layer} of {self.layers} "
                     f"blocks):"]
            raise ValueError("\n".join(lines + tf.key_problem_lines(missing, unexpected,
                                                                     misshaped, not_tensor)))
        flat = {}
        for leaf in self.expected_shapes():
            keys = [k for k, (lf, _, _) in wanted.items() if lf == leaf]
            _, index, tr = wanted[keys[0]]
            flat[leaf] = tf.leaf_from_tensors(state, keys, index is not None,
                                              (lambda a: a.T) if tr else None)
        return jax.tree_util.tree_map(jnp.asarray, tree_lib.unflatten(flat))

    def export_torch_prompt(self, prompt: Prompt, run_dir: str, epoch: int,
                            state=None) -> str:
        """`<run_dir>/MultiModalRepresentationLearner/model.pth.tar-<epoch>` with the keys of
        `torch_keys` in float32 (the released loader reads it non-strictly; the frozen CLIP
        and template embeddings are the model's own)."""
        from dpc_jax import tree as tree_lib
        from dpc_jax.convert import torch_files as tf

        del state
        flat = tree_lib.flatten(jax.tree_util.tree_map(np.asarray, jax.device_get(prompt)))
        shapes = self.expected_shapes()
        bad = {k: tuple(np.shape(flat.get(k))) for k in shapes
               if k not in flat or tuple(np.shape(flat[k])) != shapes[k]}
        if bad or set(flat) != set(shapes):
            raise ValueError(f"the prompt does not fit this MMRL config: leaves {sorted(flat)}, "
                             f"expected shapes {shapes}")
        out = {}
        for key, (leaf, index, tr) in self.torch_keys().items():
            a = tf.widen_to_float32(flat[leaf], leaf)
            a = a[index] if index is not None else a
            out[key] = tf.tensor_of(a.T if tr else a)
        path = os.path.join(run_dir, TORCH_FOLDER, f"model.pth.tar-{int(epoch)}")
        return tf.write_dassl_checkpoint(out, path, epoch)
