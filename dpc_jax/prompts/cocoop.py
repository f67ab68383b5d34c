"""CoCoOp (Zhou et al., "Conditional Prompt Learning"): CoOp's context shifted per image by a
meta-net (docs/reference/backbones.md#cocoop).

The prompt pytree (float32): 'ctx' [n, W_t] (from "a photo of a") and 'meta_net' {'linear1'
{'kernel' [E, E/16], 'bias'}, 'linear2' {'kernel' [E/16, W_t], 'bias'}}: the meta-net
Linear -> ReLU -> Linear (PyTorch's default init) maps the L2-normalised image feature to a
shift added to every context token, so each image has its own class texts. The image tower is
CLIP's, unprompted (its features are cached at evaluation).

Cost: every image encodes the text of every class, B x C text encodings per training step and
N x C per evaluation (CoOp: C once per class list). `classify` runs them in chunks of about
`TEXTS_PER_CALL` texts (`jax.lax.map` over image chunks) to bound memory, and with
`config.clip.text_chunk` > 0 recomputes each chunk's texts in the backward pass, so a training
step stores no text-tower activations beyond one chunk's (docs/memory.md); README "Backbones"
gives the measured cost on the world.

DPC's stage 2 is not offered on CoCoOp (`dpc_unsupported`): the paper does not run it, and its
slot logits would need the text of every slot label conditioned on every slot image.

`config.backbone` fields: name 'cocoop', n_ctx (4), ctx_init ("a photo of a"), and CoOp's csc
(must be False) and class_token_position ('end').
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from dpc_jax.models.clip import cosine_logits, logit_scale, normalize
from dpc_jax.prompts.base import (ClassTexts, LearnerInfo, Prompt, check_class_ids,
                                  encode_class_texts, insert_context)
from dpc_jax.prompts.coop import CoOp

_WHERE = "config.backbone"
TEXTS_PER_CALL = 1024  # text sequences encoded per chunk of images in `classify`


class CoCoOp(CoOp):
    """Conditional context optimisation: the context is shifted per image by a meta-net."""

    name = "cocoop"
    info = LearnerInfo(display_name="CoCoOp", order=20, dept_inner=True,
                       world={"backbone.epochs": 10, "backbone.batch_size": 8,
                              "backbone.lr": 0.003},
                       field_help={"n_ctx": "context tokens (ctx_init's BPE token count)",
                                   "ctx_init": "words that initialise the context",
                                   "csc": "False only (one shared, image-conditioned "
                                          "context)"})
    # Its class texts depend on the image: `classify` conditions them on each image, and a
    # wrapper (DePT) must ask for each image's own label text.
    text_needs_image = True
    torch_layout = "cocoop"
    dpc_unsupported = ("DPC on CoCoOp is not in the paper, and its slot logits would need the "
                       "text of every slot label conditioned on every slot image")

    def __init__(self, clip_config, tokenizer, config: ml_collections.ConfigDict):
        super().__init__(clip_config, tokenizer, config)
        if self.csc:
            raise ValueError(f"{_WHERE}.csc=True: CoCoOp has one shared, image-conditioned "
                             f"context; set csc=False")
        self.hidden = max(1, clip_config.embed_dim // 16)

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        config = super().default_config()
        config.name = cls.name
        return config

    def expected_shapes(self) -> dict:
        """'/'-joined leaf path -> shape (what a checkpoint must hold)."""
        e, h, w = self.clip_config.embed_dim, self.hidden, self.clip_config.transformer_width
        return {"ctx": (self.n_ctx, w), "meta_net/linear1/kernel": (e, h),
                "meta_net/linear1/bias": (h,), "meta_net/linear2/kernel": (h, w),
                "meta_net/linear2/bias": (w,)}

    def init(self, key: jax.Array, clip_params, num_classes: Optional[int] = None) -> Prompt:
        k_ctx, k1w, k1b, k2w, k2b = jax.random.split(key, 5)
        prompt = super().init(k_ctx, clip_params)
        e, h, w = self.clip_config.embed_dim, self.hidden, self.clip_config.transformer_width

        def linear(kw, kb, n_in, n_out):  # torch nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
            bound = n_in ** -0.5
            return {"kernel": jax.random.uniform(kw, (n_in, n_out), jnp.float32, -bound, bound),
                    "bias": jax.random.uniform(kb, (n_out,), jnp.float32, -bound, bound)}

        prompt["meta_net"] = {"linear1": linear(k1w, k1b, e, h), "linear2": linear(k2w, k2b, h, w)}
        return prompt

    def context_shift(self, prompt: Prompt, image_features) -> jax.Array:
        """The meta-net's shift [N, W_t] of normalised image features [N, E]."""
        precision = self.clip_config.matmul_precision
        m = prompt["meta_net"]
        x = jnp.matmul(image_features, m["linear1"]["kernel"], precision=precision)
        x = jax.nn.relu(x + m["linear1"]["bias"])
        return jnp.matmul(x, m["linear2"]["kernel"], precision=precision) + m["linear2"]["bias"]

    def classifier(self, clip_params, prompt: Prompt, class_texts: ClassTexts, class_ids,
                   consts=None) -> ClassTexts:
        """The class texts themselves: their features depend on the image (see `classify`)."""
        class_ids = check_class_ids(class_ids)
        return ClassTexts(embeddings=class_texts.embeddings[class_ids],
                          eot_indices=class_texts.eot_indices[class_ids])

    def classify(self, clip_params, prompt: Prompt, classifier: ClassTexts, image_features,
                 consts=None) -> jax.Array:
        """Logits [N, C]: image i against the class texts with ctx + meta_net(image i)."""
        feats = normalize(image_features)
        ctx = prompt["ctx"][None] + self.context_shift(prompt, feats)[:, None]  # [N, n, W]
        scale = logit_scale(clip_params)
        precision = self.clip_config.matmul_precision

        def one(cp, c, f):
            emb = insert_context(classifier.embeddings, c)
            text = encode_class_texts(self.model, cp, emb, classifier.eot_indices)
            return cosine_logits(f[None], normalize(text), scale, precision)[0]

        # Streamed: with config.clip.text_chunk > 0 each image's texts are recomputed in the
        # backward pass, so a gradient stores no text activations of the other images.
        if self.clip_config.text_chunk:
            one = jax.checkpoint(one)
        per_call = max(1, TEXTS_PER_CALL // classifier.num_classes)
        return jax.lax.map(lambda a: one(clip_params, *a), (ctx, feats),
                           batch_size=min(per_call, feats.shape[0]))

    def conditioned_text_features(self, clip_params, prompt: Prompt, class_texts: ClassTexts,
                                  image_features, class_ids) -> jax.Array:
        """Un-normalised text features [N, E] of class `class_ids[i]` under the context of
        image i (ctx + meta_net(normalised image feature i)): one text per image, as DePT's
        head takes the label class's text of each training image."""
        class_ids = jnp.asarray(class_ids, jnp.int32)
        ctx = prompt["ctx"][None] + self.context_shift(prompt, normalize(image_features))[:, None]
        emb = insert_context(class_texts.embeddings[class_ids], ctx)
        return encode_class_texts(self.model, clip_params, emb, class_texts.eot_indices[class_ids])

    def load_torch_prompt(self, path: str, num_classes: Optional[int] = None) -> Prompt:
        """The prompt of a PyTorch CoCoOp checkpoint (`prompt_learner/model.pth.tar-N`)."""
        from dpc_jax.convert.coop_torch import load_cocoop_torch_checkpoint

        prompt = load_cocoop_torch_checkpoint(path, self.expected_shapes())
        return jax.tree_util.tree_map(jnp.asarray, prompt)

    def export_torch_prompt(self, prompt: Prompt, run_dir: str, epoch: int,
                            state=None) -> str:
        """`<run_dir>/prompt_learner/model.pth.tar-<epoch>`, the upstream CoCoOp layout."""
        import os

        import numpy as np

        from dpc_jax.convert.coop_torch import export_cocoop_torch_checkpoint

        prompt = jax.tree_util.tree_map(np.asarray, jax.device_get(prompt))
        path = os.path.join(run_dir, "prompt_learner", f"model.pth.tar-{int(epoch)}")
        return export_cocoop_torch_checkpoint(prompt, path, epoch)
