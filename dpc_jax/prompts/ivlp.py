"""IVLP: independent deep prompts on both CLIP towers (the base of PromptSRC and PromptKD;
docs/reference/backbones.md#common-ground, #ivlp).

The prompt pytree (all float32):
- 'ctx' [n, W_t]: the text context at token positions 1..n, initialised from the first n tokens
  of `ctx_init` ("a photo of a"); the class text is "<ctx_init> {name}.", so with n smaller
  than the phrase the remaining words stay as fixed word embeddings after the context.
- 'text_deep' [J_t-1, n, W_t]: at the input of text blocks 1..J_t-1 positions 1..n are
  overwritten by that block's prompt (absent when J_t = 1).
- 'vision_ctx' [n_v, W_v]: tokens appended after [CLS, patches] once the positional embedding
  has been added (they get none), before ln_pre (absent when J_v = 0: no visual prompts).
- 'vision_deep' [J_v-1, n_v, W_v]: at the input of vision blocks 1..J_v-1 the last n_v tokens are
  overwritten (absent when J_v <= 1).
Deep and visual prompts start at N(0, 0.02). Index k of a deep leaf is the prompt of block k+1.

`config.backbone` fields (see `IVLP.default_config`; upstream names in brackets):
- name: 'ivlp'
- n_ctx_text [N_CTX_TEXT], n_ctx_vision [N_CTX_VISION]: token counts (4, 4).
- depth_text [PROMPT_DEPTH_TEXT], depth_vision [PROMPT_DEPTH_VISION]: J_t, J_v (9, 9): the input
  layer plus blocks 1..J-1. At most the tower's number of blocks.
- ctx_init [CTX_INIT]: "a photo of a"; "" initialises ctx at N(0, 0.02) with placeholder words.
- init_from: a PyTorch IVLP/PromptSRC checkpoint (`VLPromptLearner/model.pth.tar-N`) to use as
  the stage-1 prompt P (DPC's stage 2 then starts from it; `dpc_jax.convert.vlp_torch`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpc_jax.prompts.base import (PLACEHOLDER, ClassTexts, LearnerInfo, Prompt, PromptLearner,
                                  check_class_ids, class_texts_from_names, config_field,
                                  encode_class_texts, insert_context)
from dpc_jax.prompts.capabilities import Dual, TorchFormat

_WHERE = "config.backbone"
PROMPT_STD = 0.02  # N(0, 0.02) init of deep and visual prompts (upstream nn.init.normal_)


def positive_int(value, field: str, minimum: int = 1, maximum: Optional[int] = None,
                 why: str = "") -> int:
    """`value` checked to be an int in [minimum, maximum], or an error naming the field."""
    if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{_WHERE}.{field}={value!r}; expected an integer {bound}{why}")
    return value


class PhraseContextText:
    """The text side shared by IVLP and MaPLe: a context at positions 1..n of
    "<ctx_init> {name}." plus deep text prompts (`'ctx'`, `'text_deep'`)."""

    def _init_text_side(self, config, n_ctx: int, depth: int) -> None:
        ctx_init = config_field(config, "ctx_init", _WHERE)
        if not isinstance(ctx_init, str):
            raise ValueError(f"{_WHERE}.ctx_init={ctx_init!r}; expected a string ('' for random "
                             f"initialisation)")
        width = self.clip_config.transformer_width
        self.ctx_init = ctx_init.replace("_", " ").strip()
        if self.ctx_init:
            n_init = len(self.tokenizer.encode(self.ctx_init))
            if n_ctx > n_init:
                raise ValueError(
                    f"{_WHERE}: {n_ctx} context tokens but ctx_init={ctx_init!r} has {n_init} "
                    f"tokens; use at most {n_init} (the context replaces the phrase's first "
                    f"tokens) or ctx_init='' (random context)")
            self.text_prefix = self.ctx_init
        else:
            self.text_prefix = " ".join([PLACEHOLDER] * n_ctx)
            if len(self.tokenizer.encode(self.text_prefix)) != n_ctx:
                raise ValueError(f"the tokenizer splits {n_ctx} placeholder words "
                                 f"{PLACEHOLDER!r} into more than {n_ctx} tokens")
        if 1 + len(self.tokenizer.encode(self.text_prefix)) + 1 > self.clip_config.context_length:
            raise ValueError(f"{_WHERE}: the prompt leaves no room for a class name in "
                             f"{self.clip_config.context_length} tokens")
        self.n_ctx, self.depth_text, self.text_width = n_ctx, depth, width

    def _init_text_prompts(self, key, clip_params) -> dict:
        shape = (self.n_ctx, self.text_width)
        k_ctx, k_deep = jax.random.split(key)
        if self.ctx_init:
            ids, _ = self.tokenizer(self.ctx_init)
            emb = self.model.apply({"params": clip_params}, jnp.asarray(ids), method="embed_tokens")
            ctx = jnp.asarray(emb[0, 1:1 + self.n_ctx], jnp.float32)
        else:
            ctx = PROMPT_STD * jax.random.normal(k_ctx, shape, jnp.float32)
        out = {"ctx": ctx}
        if self.depth_text > 1:
            out["text_deep"] = PROMPT_STD * jax.random.normal(
                k_deep, (self.depth_text - 1,) + shape, jnp.float32)
        return out

    def prepare(self, clip_params, classnames: Sequence[str], *,
                new_classes: bool = False) -> ClassTexts:
        del new_classes  # a shared context applies to any class
        return class_texts_from_names(self.model, clip_params, self.tokenizer, classnames,
                                      self.n_ctx, prefix=self.text_prefix)

    def text_features(self, clip_params, prompt: Prompt, class_texts: ClassTexts,
                      class_ids) -> jax.Array:
        class_ids = check_class_ids(class_ids)
        check_leaf(prompt, "ctx", (self.n_ctx, self.text_width), "n_ctx, text width")
        deep = None
        if self.depth_text > 1:
            deep = check_leaf(prompt, "text_deep",
                              (self.depth_text - 1, self.n_ctx, self.text_width),
                              "text prompt depth - 1, n_ctx, text width")
        embeddings = insert_context(class_texts.embeddings[class_ids], prompt["ctx"])
        return encode_class_texts(self.model, clip_params, embeddings,
                                  class_texts.eot_indices[class_ids], deep)

    def load_torch_prompt(self, path: str, num_classes: Optional[int] = None) -> Prompt:
        """The stage-1 prompt of a PyTorch checkpoint in the learner's upstream key layout
        (`torch_layout`), checked against `expected_shapes()`."""
        from dpc_jax.convert.vlp_torch import load_vlp_torch_checkpoint  # torch lives there

        prompt = load_vlp_torch_checkpoint(path, self.torch_layout, self.expected_shapes())
        return jax.tree_util.tree_map(jnp.asarray, prompt)

    def export_torch_prompt(self, prompt: Prompt, run_dir: str, epoch: int,
                            state=None) -> str:
        """`<run_dir>/VLPromptLearner/model.pth.tar-<epoch>` (IVLP) or
        `<run_dir>/MultiModalPromptLearner/...` (MaPLe): the prompt keys of the upstream layout,
        which its `load_model` reads (frozen CLIP weights stay the model's own)."""
        from dpc_jax.convert import vlp_torch

        path = vlp_torch.upstream_checkpoint_path(run_dir, self.torch_layout, epoch)
        prompt = jax.tree_util.tree_map(np.asarray, jax.device_get(prompt))
        return vlp_torch.export_vlp_torch_checkpoint(prompt, path, self.torch_layout, epoch)


def check_leaf(prompt: Prompt, name: str, shape: tuple, meaning: str):
    """prompt[name], checked to have `shape` (else an error naming the leaf and its axes)."""
    if not isinstance(prompt, dict) or name not in prompt:
        found = sorted(prompt) if isinstance(prompt, dict) else type(prompt).__name__
        raise ValueError(f"the prompt has no {name!r} leaf; found {found}")
    leaf = prompt[name]
    if tuple(jnp.shape(leaf)) != tuple(shape):
        raise ValueError(f"prompt[{name!r}] of shape {tuple(jnp.shape(leaf))}; expected "
                         f"{tuple(shape)} ({meaning})")
    return leaf


class VisionPrompts:
    """The image side shared by IVLP, PromptSRC and PromptKD's student: visual prompts
    `'vision_ctx'` [n_v, W_v] appended after [CLS, patches] and deep ones `'vision_deep'`
    [J_v-1, n_v, W_v] (config fields n_ctx_vision, depth_vision)."""

    def _init_vision_side(self, config, minimum_depth: int = 0) -> None:
        cc = self.clip_config
        why = f" (the image tower has {cc.vision_layers} blocks"
        why += "; 0 = no visual prompts)" if minimum_depth == 0 else ")"
        self.depth_vision = positive_int(config_field(config, "depth_vision", _WHERE),
                                         "depth_vision", minimum_depth, cc.vision_layers, why)
        self.n_ctx_vision = positive_int(config_field(config, "n_ctx_vision", _WHERE),
                                         "n_ctx_vision")
        self.vision_width = cc.vision_width

    def _init_vision_prompts(self, k_vis, k_deep) -> dict:
        shape = (self.n_ctx_vision, self.vision_width)
        out = {}
        if self.depth_vision >= 1:
            out["vision_ctx"] = PROMPT_STD * jax.random.normal(k_vis, shape, jnp.float32)
        if self.depth_vision > 1:
            out["vision_deep"] = PROMPT_STD * jax.random.normal(
                k_deep, (self.depth_vision - 1,) + shape, jnp.float32)
        return out

    def vision_prompts(self, prompt: Prompt):
        """(shallow [n_v, W_v] or None, deep [J_v-1, n_v, W_v] or None), checked."""
        if self.depth_vision == 0:
            return None, None
        shape = (self.n_ctx_vision, self.vision_width)
        shallow = check_leaf(prompt, "vision_ctx", shape, "n_ctx_vision, vision width")
        deep = None
        if self.depth_vision > 1:
            deep = check_leaf(prompt, "vision_deep", (self.depth_vision - 1,) + shape,
                              "vision prompt depth - 1, n_ctx_vision, vision width")
        return shallow, deep

    def _vision_shapes(self) -> dict:
        vision = (self.n_ctx_vision, self.vision_width)
        out = {}
        if self.depth_vision >= 1:
            out["vision_ctx"] = vision
        if self.depth_vision > 1:
            out["vision_deep"] = (self.depth_vision - 1,) + vision
        return out


class IVLP(PhraseContextText, VisionPrompts, Dual, TorchFormat, PromptLearner):
    """Independent vision-language prompting: free deep prompts on both towers."""

    name = "ivlp"
    # The world CLIP has 2 text and 3 image blocks: the deepest prompts it can take; epochs and
    # LR from a seed-1 sweep.
    info = LearnerInfo(
        display_name="IVLP", order=30, dept_inner=True,
        world={"backbone.depth_text": 2, "backbone.depth_vision": 3, "backbone.epochs": 20,
               "backbone.batch_size": 32, "backbone.lr": 0.001},
        field_help={"n_ctx_text": "text prompt tokens", "n_ctx_vision": "image prompt tokens",
                    "depth_text": "text blocks that take prompts",
                    "depth_vision": "image blocks that take prompts",
                    "ctx_init": "phrase that initialises the text context"})
    uses_image_prompts = True
    torch_layout = "ivlp"  # the key layout of `dpc_jax.convert.vlp_torch`

    def __init__(self, clip_config, tokenizer, config: ml_collections.ConfigDict):
        super().__init__(clip_config, tokenizer, config)
        cc = clip_config
        n_text = positive_int(config_field(config, "n_ctx_text", _WHERE), "n_ctx_text")
        depth_text = positive_int(config_field(config, "depth_text", _WHERE), "depth_text",
                                  1, cc.transformer_layers,
                                  f" (the text tower has {cc.transformer_layers} blocks)")
        self._init_vision_side(config, minimum_depth=0)
        self._init_text_side(config, n_text, depth_text)

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        config = ml_collections.ConfigDict()
        config.name = cls.name
        config.n_ctx_text = 4
        config.n_ctx_vision = 4
        config.depth_text = 9
        config.depth_vision = 9
        config.ctx_init = "a photo of a"
        return config

    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        k_text, k_vis, k_deep = jax.random.split(key, 3)
        prompt = self._init_text_prompts(k_text, clip_params)
        prompt.update(self._init_vision_prompts(k_vis, k_deep))
        return prompt

    def image_features(self, clip_params, prompt: Prompt, images, state=None) -> jax.Array:
        del state
        shallow, deep = self.vision_prompts(prompt)
        return self.model.apply({"params": clip_params}, images, shallow, deep,
                                method="encode_image")

    def expected_shapes(self) -> dict:
        """'/'-joined leaf path -> shape of this learner's prompt (what a checkpoint must hold)."""
        text = (self.n_ctx, self.text_width)
        out = {"ctx": text}
        if self.depth_text > 1:
            out["text_deep"] = (self.depth_text - 1,) + text
        out.update(self._vision_shapes())
        return out
