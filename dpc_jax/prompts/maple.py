"""MaPLe (Khattak et al., "Multi-modal Prompt Learning"): text prompts coupled to the image tower
(docs/reference/backbones.md#common-ground, #maple).

The prompt pytree (all float32):
- 'ctx' [n, W_t]: the text context (n = 2: the first two tokens of "a photo of a"); the class text
  stays "a photo of a {name}.", the words after the context ("of a") are fixed word embeddings.
- 'text_deep' [J-1, n, W_t]: deep text prompts of blocks 1..J-1 (N(0, 0.02)).
- 'couple0' {'kernel' [W_t, W_v], 'bias' [W_v]} and 'couple_deep' {'kernel' [J-1, W_t, W_v],
  'bias' [J-1, W_v]}: the J affine coupling maps F_0..F_{J-1} text -> vision. The vision prompts
  are not free: V_0 = F_0(ctx) is appended to the image tokens (after the positional embedding,
  before ln_pre) and V_i = F_i(text_deep[i-1]) overwrites the last n tokens at block i.
  PyTorch's nn.Linear init U(-1/sqrt(W_t), 1/sqrt(W_t)); the J-1 deep maps start as copies of
  one draw (upstream clones one layer). Widths come from the CLIP config (upstream hard-codes
  512 -> 768, i.e. ViT-B/16 only).

`towers(prompt)` gives the prompts that enter the towers, in IVLP's form (ctx, text_deep,
vision_ctx, vision_deep); the feature methods accept either form. DPC doubles every leaf (ctx,
deep text prompts, coupling maps), applies reference mode's converse map to ctx only, and mixes
two prompts (0 < w < 1) after coupling: w*F'(T') + (1-w)*F(T) on the vision side, so the
decoupling stays at the prompt level. MaPLe has no released DPC code; this is our reading
(docs/reference/backbones.md#dpc-on-each-backbone).

`config.backbone` fields (see `MaPLe.default_config`; upstream names in brackets):
- name: 'maple'
- n_ctx [N_CTX] (2), depth [PROMPT_DEPTH] (J = 9; at most the smaller tower's block count),
  ctx_init [CTX_INIT] ("a photo of a").
- init_from: a PyTorch MaPLe checkpoint (`MultiModalPromptLearner/model.pth.tar-N`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from dpc_jax.prompts.base import DualRules, LearnerInfo, Prompt, PromptLearner, config_field
from dpc_jax.prompts.capabilities import Dual, TorchFormat
from dpc_jax.prompts.ivlp import PhraseContextText, check_leaf, positive_int

_WHERE = "config.backbone"
TOWER_LEAVES = ("ctx", "text_deep", "vision_ctx", "vision_deep")


class MaPLe(PhraseContextText, Dual, TorchFormat, PromptLearner):
    """Multi-modal prompt learning: vision prompts coupled from the text prompts."""

    name = "maple"
    info = LearnerInfo(
        display_name="MaPLe", order=40, dept_inner=True,
        world={"backbone.depth": 2, "backbone.epochs": 20, "backbone.batch_size": 32,
               "backbone.lr": 0.003},
        field_help={"n_ctx": "prompt tokens per block", "depth": "blocks that take prompts",
                    "ctx_init": "phrase that initialises the text context"})
    uses_image_prompts = True
    torch_layout = "maple"

    def __init__(self, clip_config, tokenizer, config: ml_collections.ConfigDict):
        super().__init__(clip_config, tokenizer, config)
        cc = clip_config
        layers = min(cc.transformer_layers, cc.vision_layers)
        n_ctx = positive_int(config_field(config, "n_ctx", _WHERE), "n_ctx")
        depth = positive_int(config_field(config, "depth", _WHERE), "depth", 1, layers,
                             f" (the text tower has {cc.transformer_layers} blocks, the image "
                             f"tower {cc.vision_layers})")
        self._init_text_side(config, n_ctx, depth)
        self.depth = depth
        self.vision_width = cc.vision_width

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        config = ml_collections.ConfigDict()
        config.name = cls.name
        config.n_ctx = 2
        config.depth = 9
        config.ctx_init = "a photo of a"
        return config

    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        k_text, k0w, k0b, kdw, kdb = jax.random.split(key, 5)
        prompt = self._init_text_prompts(k_text, clip_params)
        w_t, w_v = self.text_width, self.vision_width
        bound = w_t ** -0.5  # torch nn.Linear: kaiming_uniform(a=sqrt(5)) and bias bound

        def uniform(k, shape):
            return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

        prompt["couple0"] = {"kernel": uniform(k0w, (w_t, w_v)), "bias": uniform(k0b, (w_v,))}
        if self.depth > 1:
            d = self.depth - 1
            prompt["couple_deep"] = {
                "kernel": jnp.broadcast_to(uniform(kdw, (w_t, w_v)), (d, w_t, w_v)) + 0.0,
                "bias": jnp.broadcast_to(uniform(kdb, (w_v,)), (d, w_v)) + 0.0}
        return prompt

    def expected_shapes(self) -> dict:
        """'/'-joined leaf path -> shape of this learner's prompt (what a checkpoint must hold)."""
        w_t, w_v, d = self.text_width, self.vision_width, self.depth - 1
        out = {"ctx": (self.n_ctx, w_t), "couple0/kernel": (w_t, w_v), "couple0/bias": (w_v,)}
        if d:
            out.update({"text_deep": (d, self.n_ctx, w_t), "couple_deep/kernel": (d, w_t, w_v),
                        "couple_deep/bias": (d, w_v)})
        return out

    def towers(self, prompt: Prompt) -> Prompt:
        """The prompts entering the towers {ctx, text_deep, vision_ctx, vision_deep} (IVLP's
        form); a prompt already in that form is returned as it is."""
        if isinstance(prompt, dict) and "couple0" not in prompt and "vision_ctx" in prompt:
            return prompt
        w_t, w_v, d = self.text_width, self.vision_width, self.depth - 1
        precision = self.clip_config.matmul_precision
        ctx = check_leaf(prompt, "ctx", (self.n_ctx, w_t), "n_ctx, text width")
        c0 = prompt.get("couple0") if isinstance(prompt, dict) else None
        check_leaf(c0 if isinstance(c0, dict) else {}, "kernel", (w_t, w_v),
                   "couple0: text width, vision width")
        check_leaf(c0, "bias", (w_v,), "couple0: vision width")
        out = {"ctx": ctx,
               "vision_ctx": jnp.matmul(ctx, c0["kernel"], precision=precision) + c0["bias"]}
        if d:
            deep = check_leaf(prompt, "text_deep", (d, self.n_ctx, w_t),
                              "depth - 1, n_ctx, text width")
            cd = prompt.get("couple_deep")
            check_leaf(cd if isinstance(cd, dict) else {}, "kernel", (d, w_t, w_v),
                       "couple_deep: depth - 1, text width, vision width")
            check_leaf(cd, "bias", (d, w_v), "couple_deep: depth - 1, vision width")
            out["text_deep"] = deep
            out["vision_deep"] = (jnp.einsum("dnt,dtv->dnv", deep, cd["kernel"],
                                             precision=precision) + cd["bias"][:, None, :])
        return out

    def image_features(self, clip_params, prompt: Prompt, images, state=None) -> jax.Array:
        del state
        towers = self.towers(prompt)
        return self.model.apply({"params": clip_params}, images, towers["vision_ctx"],
                                towers.get("vision_deep"), method="encode_image")

    def dual_rules(self) -> DualRules:
        return DualRules(towers=self.towers)
