"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models"): learned text context.

The prompt is `{'ctx': [n_ctx, W]}` (generic context) or `{'ctx': [C, n_ctx, W]}` (class-specific
context, `csc=True`). Class texts are "X X X X {name}." with the class token at the end; the
placeholders at positions 1..n_ctx are replaced by ctx. The image encoder is CLIP's, unprompted.

`config.backbone` fields (see `CoOp.default_config`):
- name: 'coop'
- n_ctx: number of context tokens. With `ctx_init` it must equal the number of BPE tokens of
  ctx_init (4 for "a photo of a").
- ctx_init: words whose token embeddings initialise ctx ("" -> N(0, 0.02) init). CoOp takes
  n_ctx = the number of space-separated words and then the first n_ctx BPE tokens; we count BPE
  tokens instead, which is the same for every released config ("a photo of a" is 4 words and 4
  tokens) and, for words split into several tokens, makes the initial prompt equal the text.
- csc: class-specific contexts. CoOp ignores CSC when CTX_INIT is set (generic context); here
  csc with ctx_init gives every class a copy of the initial words. Class-specific contexts exist
  only for the training classes, so new-class evaluation with csc raises.
- class_token_position (optional, default 'end'): only 'end' (the only position DPC uses).
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


class CoOp(Dual, TorchFormat, PromptLearner):
    """Context Optimization: a learned text context shared by all classes (or one per class)."""

    name = "coop"
    # The world's LR is 0.003: at 0.002 (the paper's value) CoOp does not move base accuracy
    # off zero-shot in 10 epochs.
    info = LearnerInfo(
        display_name="CoOp", order=10, dept_inner=True,
        world={"backbone.epochs": 10, "backbone.batch_size": 32, "backbone.lr": 0.003},
        field_help={
            "n_ctx": "context tokens (with ctx_init: its BPE token count)",
            "ctx_init": "words that initialise the context ('' = N(0, 0.02))",
            "csc": "class-specific contexts (base classes only)",
            "class_token_position": "where the class name goes: only 'end'"})
    uses_image_prompts = False
    torch_layout = "coop"

    def __init__(self, clip_config, tokenizer, config: ml_collections.ConfigDict):
        super().__init__(clip_config, tokenizer, config)
        n_ctx = config_field(config, "n_ctx", _WHERE)
        ctx_init = config_field(config, "ctx_init", _WHERE)
        csc = config_field(config, "csc", _WHERE)
        position = config.get("class_token_position", "end")
        if not isinstance(ctx_init, str):
            raise ValueError(f"{_WHERE}.ctx_init={ctx_init!r}; expected a string ('' for random "
                             f"initialisation)")
        if not isinstance(csc, bool):
            raise ValueError(f"{_WHERE}.csc={csc!r}; expected True or False")
        if position != "end":
            raise ValueError(f"{_WHERE}.class_token_position={position!r}; allowed values: "
                             f"['end'] (CoOp's 'middle'/'front' are not implemented)")
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1:
            raise ValueError(f"{_WHERE}.n_ctx={n_ctx!r}; expected a positive integer")
        if 1 + n_ctx + 1 > clip_config.context_length:
            raise ValueError(f"{_WHERE}.n_ctx={n_ctx} leaves no room for a class name in "
                             f"{clip_config.context_length} tokens")
        self.ctx_init = ctx_init.replace("_", " ").strip()
        if self.ctx_init:
            n_init = len(tokenizer.encode(self.ctx_init))
            if n_ctx != n_init:
                raise ValueError(
                    f"{_WHERE}.n_ctx={n_ctx} but {_WHERE}.ctx_init={ctx_init!r} has {n_init} "
                    f"tokens; set n_ctx={n_init} (the context is initialised from those tokens)")
        # The placeholder must tokenize to exactly one token per context vector, or the class
        # tokens would not start at position 1 + n_ctx.
        placeholder_ids = tokenizer.encode(" ".join([PLACEHOLDER] * n_ctx))
        if len(placeholder_ids) != n_ctx:
            raise ValueError(f"the tokenizer splits {n_ctx} placeholder words {PLACEHOLDER!r} "
                             f"into {len(placeholder_ids)} tokens; expected {n_ctx}")
        self.n_ctx = n_ctx
        self.csc = csc

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        config = ml_collections.ConfigDict()
        config.name = cls.name
        config.n_ctx = 4
        config.ctx_init = "a photo of a"
        config.csc = False
        config.class_token_position = "end"
        return config

    def ctx_shape(self, num_classes: Optional[int] = None) -> tuple:
        width = self.clip_config.transformer_width
        if self.csc:
            if num_classes is None or num_classes < 1:
                raise ValueError(f"{_WHERE}.csc=True (class-specific contexts) needs the number "
                                 f"of training classes; got num_classes={num_classes!r}")
            return (num_classes, self.n_ctx, width)
        return (self.n_ctx, width)

    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        shape = self.ctx_shape(num_classes)
        if self.ctx_init:
            ids, _ = self.tokenizer(self.ctx_init)
            emb = self.model.apply({"params": clip_params}, jnp.asarray(ids), method="embed_tokens")
            ctx = jnp.asarray(emb[0, 1:1 + self.n_ctx], jnp.float32)
            ctx = jnp.broadcast_to(ctx, shape)
        else:
            ctx = 0.02 * jax.random.normal(key, shape, jnp.float32)
        return {"ctx": ctx}

    def prepare(self, clip_params, classnames: Sequence[str], *,
                new_classes: bool = False) -> ClassTexts:
        if new_classes and self.csc:
            raise ValueError(
                f"{_WHERE}.csc=True: class-specific contexts exist only for the training classes, "
                f"so CoOp-CSC cannot be evaluated on new classes; use csc=False for base-to-new")
        return class_texts_from_names(self.model, clip_params, self.tokenizer, classnames,
                                      self.n_ctx)

    def text_features(self, clip_params, prompt: Prompt, class_texts: ClassTexts,
                      class_ids) -> jax.Array:
        class_ids = check_class_ids(class_ids)
        ctx = prompt["ctx"]
        if ctx.shape[-2:] != (self.n_ctx, self.clip_config.transformer_width):
            raise ValueError(f"prompt['ctx'] of shape {ctx.shape}; expected [..., {self.n_ctx}, "
                             f"{self.clip_config.transformer_width}] (n_ctx, text width)")
        if self.csc:
            if ctx.ndim != 3 or ctx.shape[0] != class_texts.num_classes:
                raise ValueError(
                    f"class-specific prompt['ctx'] of shape {ctx.shape} does not fit "
                    f"{class_texts.num_classes} classes (csc contexts exist only for the "
                    f"training classes)")
            ctx = ctx[class_ids]
        elif ctx.ndim != 2:
            raise ValueError(f"prompt['ctx'] of shape {ctx.shape}; {_WHERE}.csc=False expects "
                             f"[{self.n_ctx}, {self.clip_config.transformer_width}]")
        embeddings = insert_context(class_texts.embeddings[class_ids], ctx)
        return encode_class_texts(self.model, clip_params, embeddings,
                                  class_texts.eot_indices[class_ids])

    def image_features(self, clip_params, prompt: Prompt, images, state=None) -> jax.Array:
        del prompt, state  # CoOp does not prompt the image encoder
        return self.model.apply({"params": clip_params}, images, method="encode_image")

    def load_torch_prompt(self, path: str, num_classes: Optional[int] = None) -> Prompt:
        """The prompt of a PyTorch CoOp checkpoint, checked against this learner's shape."""
        from dpc_jax.convert.coop_torch import load_coop_torch_checkpoint  # torch lives there

        ctx = load_coop_torch_checkpoint(path, expected_shape=self.ctx_shape(num_classes))
        return {"ctx": jnp.asarray(ctx)}

    def export_torch_prompt(self, prompt: Prompt, run_dir: str, epoch: int,
                            state=None) -> str:
        """`<run_dir>/prompt_learner/model.pth.tar-<epoch>`, the upstream CoOp layout (what
        `load_torch_prompt` reads and CoOp's trainer loads with --model-dir run_dir)."""
        import os

        from dpc_jax.convert.coop_torch import export_coop_torch_checkpoint

        del state  # CoOp has no learner state
        ctx = np.asarray(jax.device_get(prompt["ctx"]))
        path = os.path.join(run_dir, "prompt_learner", f"model.pth.tar-{int(epoch)}")
        return export_coop_torch_checkpoint(ctx, path, epoch)
