"""CLIP (ViT image tower + text tower) in Flax linen, with prompt hooks.

Module and parameter names mirror OpenAI's CLIP state dict (`visual.transformer.resblocks.0.attn`
-> `visual/transformer/resblocks_0/attn`), so conversion is renames and transposes only
(see `dpc_jax.convert`). Attention keeps OpenAI's packed `in_proj` (q, k, v stacked on the output
axis) and `out_proj`.

Numerics: parameters are float32; activations run in `config.dtype` (bfloat16 on TPU/GPU runs);
LayerNorm, softmax and feature normalisation are computed in float32; every matmul uses the
explicit `config.precision` (float32 parity with PyTorch needs 'highest': TPUs and Ampere+ GPUs
otherwise default to bf16/TF32 passes).

Accelerator options (same numbers up to rounding, `tests/test_accel.py`): `config.attention`
picks the attention kernel ('einsum': the explicit einsum/softmax below; 'dot_product':
`jax.nn.dot_product_attention` with jax's choice of implementation, XLA in jax 0.10; 'cudnn': its
cuDNN flash attention, GPU with float16/bfloat16 only). `config.remat` recomputes each residual
block's activations in the backward pass (`nn.remat`) instead of storing them.

Prompt hooks (docs/reference/backbones.md#common-ground):
- `encode_text_embeddings(x, eot_indices, deep_prompts)` takes token embeddings [N, L, W] instead
  of ids, so prompt learners can replace the embeddings of placeholder tokens with context
  vectors; the text feature is read at `eot_indices`.
- Deep text prompts [D-1, n, W] replace token positions 1..n at the input of blocks 1..D-1.
- Visual prompts [n, W] are appended after the patch tokens before `ln_pre`; deep visual prompts
  [D-1, n, W] replace the last n tokens at the input of blocks 1..D-1.
- Any prompt may also carry a leading batch axis ([N, n, W] / [D-1, N, n, W]) for per-sample
  prompts. With no prompts the computation is exactly plain CLIP (same ops, bitwise equal).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = Any

_PRECISIONS = {
    "default": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# config.attention -> jax.nn.dot_product_attention's `implementation` (None: jax's choice).
ATTENTIONS = {"einsum": None, "dot_product": None, "cudnn": "cudnn"}

# CLIP's image normalisation (OpenAI clip/clip.py, _transform).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a ViT CLIP (the fields OpenAI's `build_model` derives from a state dict)."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    vision_head_width: int = 64  # OpenAI: heads = vision_width // 64
    dtype: str = "float32"  # compute dtype of activations
    precision: str = "highest"  # matmul precision: default | high | highest
    # Class texts are encoded over the positions up to their last EOT only (exact under the
    # causal mask, `tokenizer.trim_context`); False: all context_length positions (bitwise
    # the computation before trimming existed).
    trim_text: bool = True
    # Attention kernel: einsum | dot_product | cudnn (see the module docstring).
    attention: str = "einsum"
    # Recompute each residual block's activations in the backward pass (less memory).
    remat: bool = False
    # Class texts encoded with gradients at most this many at a time, each chunk recomputed in
    # the backward pass (`dpc_jax.prompts.base.encode_class_texts`): the same numbers up to
    # rounding, a text tower's stored activations for one chunk instead of every class.
    # 0: all at once.
    text_chunk: int = 128

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"CLIPConfig.dtype={self.dtype!r}; expected one of {sorted(_DTYPES)}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"CLIPConfig.attention={self.attention!r}; expected one of "
                             f"{sorted(ATTENTIONS)}")
        if not isinstance(self.remat, bool):
            raise ValueError(f"CLIPConfig.remat={self.remat!r}; expected True or False")
        if (not isinstance(self.text_chunk, int) or isinstance(self.text_chunk, bool)
                or self.text_chunk < 0):
            raise ValueError(f"CLIPConfig.text_chunk={self.text_chunk!r}; expected an integer "
                             f">= 0 (0: every class text at once)")
        if self.precision not in _PRECISIONS:
            raise ValueError(
                f"CLIPConfig.precision={self.precision!r}; expected one of {sorted(_PRECISIONS)}")
        if self.image_resolution % self.vision_patch_size:
            raise ValueError(
                f"CLIPConfig.image_resolution={self.image_resolution} is not a multiple of "
                f"vision_patch_size={self.vision_patch_size}")
        if self.vision_width % self.vision_head_width:
            raise ValueError(
                f"CLIPConfig.vision_width={self.vision_width} is not a multiple of "
                f"vision_head_width={self.vision_head_width}")
        if self.transformer_width % self.transformer_heads:
            raise ValueError(
                f"CLIPConfig.transformer_width={self.transformer_width} is not a multiple of "
                f"transformer_heads={self.transformer_heads}")

    @property
    def vision_heads(self) -> int:
        return self.vision_width // self.vision_head_width

    @property
    def grid_size(self) -> int:
        return self.image_resolution // self.vision_patch_size

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def matmul_precision(self):
        return _PRECISIONS[self.precision]

    def replace(self, **changes) -> "CLIPConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CLIPConfig fields {unknown}; expected a subset of "
                             f"{sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _openai(embed, res, vl, vw, patch, tw, th, tl) -> CLIPConfig:
    return CLIPConfig(embed_dim=embed, image_resolution=res, vision_layers=vl, vision_width=vw,
                      vision_patch_size=patch, context_length=77, vocab_size=49408,
                      transformer_width=tw, transformer_heads=th, transformer_layers=tl)


CONFIGS = {
    "ViT-B/32": _openai(512, 224, 12, 768, 32, 512, 8, 12),
    "ViT-B/16": _openai(512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L/14": _openai(768, 224, 24, 1024, 14, 768, 12, 12),
    "ViT-L/14@336px": _openai(768, 336, 24, 1024, 14, 768, 12, 12),
    # Tiny architectures for tests and the embedded world.
    "tiny": CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                       vision_patch_size=8, context_length=77, vocab_size=1000,
                       transformer_width=48, transformer_heads=4, transformer_layers=2,
                       vision_head_width=16),
}


def get_config(name: str, **overrides) -> CLIPConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown CLIP architecture {name!r}; expected one of {sorted(CONFIGS)}")
    return CONFIGS[name].replace(**overrides)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 with OpenAI's epsilon (1e-5; Flax defaults to 1e-6)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,))
        bias = self.param("bias", nn.initializers.zeros, (width,))
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
        return y.astype(self.dtype)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention as CLIP uses it: packed q/k/v input projection, out_proj."""

    width: int
    heads: int
    dtype: Any
    precision: Any
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, mask: Optional[Array] = None):
        n, length, _ = x.shape
        head_dim = self.width // self.heads
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision,
            name=name)
        qkv = dense(3 * self.width, "in_proj")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k, v = (t.reshape(n, length, self.heads, head_dim) for t in (q, k, v))
        # torch scales q before the product, as done here.
        q = q * jnp.asarray(head_dim ** -0.5, dtype=q.dtype)
        if self.attention == "einsum":
            scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision=self.precision)
            scores = scores.astype(jnp.float32)
            if mask is not None:
                scores = jnp.where(mask, scores, -jnp.inf)
            weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
            out = jnp.einsum("nhqk,nkhd->nqhd", weights, v, precision=self.precision)
        else:
            # q is already scaled (torch's order), so scale=1: jax's `scale` would multiply the
            # float32 logits after the product instead, which rounds differently unless the
            # scale is a power of two (head_dim 64 in every OpenAI CLIP). Its XLA einsums take
            # no precision argument; the context states ours (bf16 inputs: jax's BF16_BF16_F32).
            with jax.default_matmul_precision(self.precision.name.lower()):
                out = jax.nn.dot_product_attention(
                    q, k, v, mask=mask, scale=1.0, implementation=ATTENTIONS[self.attention])
        return dense(self.width, "out_proj")(out.reshape(n, length, self.width))


class MLP(nn.Module):
    width: int
    dtype: Any
    precision: Any

    @nn.compact
    def __call__(self, x):
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision,
            name=name)
        return dense(self.width, "c_proj")(quick_gelu(dense(4 * self.width, "c_fc")(x)))


class ResidualAttentionBlock(nn.Module):
    width: int
    heads: int
    dtype: Any
    precision: Any
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, mask=None):
        x = x + MultiheadAttention(self.width, self.heads, self.dtype, self.precision,
                                   self.attention,
                                   name="attn")(LayerNorm(self.dtype, name="ln_1")(x), mask)
        x = x + MLP(self.width, self.dtype, self.precision,
                    name="mlp")(LayerNorm(self.dtype, name="ln_2")(x))
        return x


def _broadcast_prompt(prompt, batch: int, dtype, width: Optional[int] = None):
    """[n, W] -> [N, n, W]; a prompt that already has the batch axis is kept."""
    prompt = jnp.asarray(prompt).astype(dtype)
    if prompt.ndim == 2:
        prompt = jnp.broadcast_to(prompt[None], (batch,) + prompt.shape)
    expected_width = prompt.shape[-1] if width is None else width
    if prompt.ndim != 3 or prompt.shape[0] != batch or prompt.shape[-1] != expected_width:
        raise ValueError(f"prompt of shape {prompt.shape}; expected [n, {expected_width}] or "
                         f"[{batch}, n, {expected_width}]")
    return prompt


class Transformer(nn.Module):
    """A stack of residual attention blocks with optional deep-prompt replacement.

    `deep_prompts` holds prompts for blocks 1..len(deep_prompts); before block i (i >= 1) the
    tokens at `prompt_slot` are replaced: 'front' replaces positions 1..n (text), 'back' replaces
    the last n positions (vision). `remat` wraps each block in `nn.remat` (same parameter
    names and numbers; its activations are recomputed in the backward pass).
    """

    width: int
    layers: int
    heads: int
    dtype: Any
    precision: Any
    attention: str = "einsum"
    remat: bool = False

    @nn.compact
    def __call__(self, x, mask=None, deep_prompts=None, prompt_slot: str = "front"):
        n_deep = 0 if deep_prompts is None else len(deep_prompts)
        if n_deep > self.layers - 1:
            raise ValueError(f"{n_deep} deep prompt layers given; this transformer has "
                             f"{self.layers} blocks, so at most {self.layers - 1} can be replaced")
        block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        for i in range(self.layers):
            if 1 <= i <= n_deep:
                p = _broadcast_prompt(deep_prompts[i - 1], x.shape[0], x.dtype, self.width)
                n = p.shape[1]
                if n > x.shape[1] - 1:
                    raise ValueError(f"deep prompt for block {i} has {n} tokens; the sequence "
                                     f"has {x.shape[1]} positions (at most {x.shape[1] - 1} "
                                     f"can be replaced)")
                if prompt_slot == "front":
                    x = jnp.concatenate([x[:, :1], p, x[:, 1 + n:]], axis=1)
                else:
                    x = jnp.concatenate([x[:, :-n], p], axis=1)
            x = block(self.width, self.heads, self.dtype, self.precision, self.attention,
                      name=f"resblocks_{i}")(x, mask)
        return x


class VisionTransformer(nn.Module):
    config: CLIPConfig

    @nn.compact
    def __call__(self, images, prompts=None, deep_prompts=None):
        cfg = self.config
        dtype, precision = cfg.compute_dtype, cfg.matmul_precision
        res = cfg.image_resolution
        if images.ndim != 4 or images.shape[1:] != (res, res, 3):
            raise ValueError(
                f"images of shape {tuple(images.shape)}; this CLIP expects NHWC float images of "
                f"shape [N, {res}, {res}, 3] (CLIP-normalised)")
        width = cfg.vision_width
        x = nn.Conv(width, (cfg.vision_patch_size,) * 2, strides=(cfg.vision_patch_size,) * 2,
                    padding="VALID", use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    precision=precision, name="conv1")(images.astype(dtype))
        n = x.shape[0]
        x = x.reshape(n, -1, width)
        scale = width ** -0.5
        class_embedding = self.param("class_embedding", nn.initializers.normal(scale), (width,))
        positional_embedding = self.param("positional_embedding", nn.initializers.normal(scale),
                                          (cfg.grid_size ** 2 + 1, width))
        cls = jnp.broadcast_to(class_embedding.astype(dtype), (n, 1, width))
        x = jnp.concatenate([cls, x], axis=1) + positional_embedding.astype(dtype)
        if prompts is not None:
            x = jnp.concatenate([x, _broadcast_prompt(prompts, n, dtype, width)], axis=1)
        x = LayerNorm(dtype, name="ln_pre")(x)
        if deep_prompts is not None and prompts is None:
            raise ValueError("deep visual prompts need shallow visual prompts (the slots they "
                             "replace are the appended prompt tokens)")
        if deep_prompts is not None:
            # Deep prompts replace the last n tokens: any other n would overwrite patch tokens.
            n_prompt = jnp.shape(prompts)[-2]
            for i in range(len(deep_prompts)):
                if jnp.shape(deep_prompts[i])[-2] != n_prompt:
                    raise ValueError(
                        f"deep visual prompt for block {i + 1} has shape "
                        f"{tuple(jnp.shape(deep_prompts[i]))}; its token count must equal the "
                        f"{n_prompt} shallow visual prompt tokens")
        x = Transformer(width, cfg.vision_layers, cfg.vision_heads, dtype, precision,
                        cfg.attention, cfg.remat, name="transformer")(x, None, deep_prompts,
                                                                      prompt_slot="back")
        x = LayerNorm(dtype, name="ln_post")(x[:, 0])
        proj = self.param("proj", nn.initializers.normal(scale), (width, cfg.embed_dim))
        return jnp.dot(x, proj.astype(dtype), precision=precision)


class CLIP(nn.Module):
    """OpenAI CLIP (ViT) with prompt hooks; see the module docstring."""

    config: CLIPConfig

    def setup(self):
        cfg = self.config
        dtype, precision = cfg.compute_dtype, cfg.matmul_precision
        width = cfg.transformer_width
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embed(cfg.vocab_size, width,
                                        embedding_init=nn.initializers.normal(0.02),
                                        param_dtype=jnp.float32, name="token_embedding")
        self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.01),
                                               (cfg.context_length, width))
        self.transformer = Transformer(width, cfg.transformer_layers, cfg.transformer_heads,
                                       dtype, precision, cfg.attention, cfg.remat)
        self.ln_final = LayerNorm(dtype)
        self.text_projection = self.param("text_projection", nn.initializers.normal(width ** -0.5),
                                          (width, cfg.embed_dim))
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)),
                                      ())

    # -- image ----------------------------------------------------------------------------------
    def encode_image(self, images, prompts=None, deep_prompts=None):
        """images: [N, R, R, 3] float, CLIP-normalised -> [N, embed_dim] un-normalised features."""
        return self.visual(images, prompts, deep_prompts)

    # -- text -----------------------------------------------------------------------------------
    def embed_tokens(self, token_ids):
        """Token embeddings [N, L, W] (float32) for int ids [N, L]."""
        return self.token_embedding(token_ids)

    def encode_text_embeddings(self, embeddings, eot_indices, deep_prompts=None):
        """Text features from token embeddings [N, L, W] and EOT positions [N].

        L may be shorter than context_length (`tokenizer.trim_context`): under the causal mask
        a position after a text's EOT token cannot change the EOT feature, so encoding the first
        L positions (every EOT inside them) gives the 77-token result exactly, in fewer FLOPs."""
        cfg = self.config
        if (embeddings.ndim != 3 or not 1 <= embeddings.shape[1] <= cfg.context_length
                or embeddings.shape[2] != cfg.transformer_width):
            raise ValueError(f"text embeddings of shape {tuple(embeddings.shape)}; expected "
                             f"[N, L <= {cfg.context_length}, {cfg.transformer_width}]")
        dtype = cfg.compute_dtype
        length = embeddings.shape[1]
        x = embeddings.astype(dtype) + self.positional_embedding[:length].astype(dtype)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        x = self.transformer(x, causal, deep_prompts, prompt_slot="front")
        x = self.ln_final(x)
        x = x[jnp.arange(x.shape[0]), eot_indices]
        return jnp.dot(x, self.text_projection.astype(dtype), precision=cfg.matmul_precision)

    def encode_text(self, token_ids):
        """token_ids: int [N, L] (L = context_length, or fewer positions holding every EOT:
        `tokenizer.trim_context`) -> [N, embed_dim]; pooled at argmax(ids) (EOT)."""
        cfg = self.config
        if token_ids.ndim != 2 or not 1 <= token_ids.shape[1] <= cfg.context_length:
            raise ValueError(f"token ids of shape {tuple(token_ids.shape)}; expected "
                             f"[N, L <= {cfg.context_length}]")
        eot = jnp.argmax(token_ids, axis=-1)
        return self.encode_text_embeddings(self.embed_tokens(token_ids), eot)

    def __call__(self, images, token_ids):
        """Returns (logits_per_image, logits_per_text) as OpenAI's and HF's CLIP do."""
        img = normalize(self.encode_image(images))
        txt = normalize(self.encode_text(token_ids))
        logits = jnp.exp(self.logit_scale) * jnp.dot(img, txt.T,
                                                      precision=self.config.matmul_precision)
        return logits, logits.T


def normalize(x, axis=-1, eps=0.0):
    """L2 normalisation in float32 (CLIP's `x / x.norm(dim=-1, keepdim=True)`)."""
    x = x.astype(jnp.float32)
    norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
    return x / (norm + eps) if eps else x / norm


def logit_scale(clip_params):
    """CLIP's temperature exp(logit_scale) in float32 (100 for OpenAI's weights)."""
    return jnp.exp(jnp.asarray(clip_params["logit_scale"]).astype(jnp.float32))


def cosine_logits(image_features, classifier, scale, precision=jax.lax.Precision.HIGHEST):
    """scale * cos(image, class) [N, C]: the one place logits are formed (training, the DHNO
    scorer, the slot logits, evaluation). `image_features` [N, E] are L2-normalised here; the
    rows of `classifier` [C, E] are unit vectors already (a classifier is computed once per
    prompt and class list). The scale multiplies the image side before the matmul, at the
    stated precision (never the platform default: TF32 on recent GPUs, bf16 passes on TPU)."""
    img = scale * normalize(image_features)
    return jnp.matmul(img, jnp.asarray(classifier).astype(jnp.float32).T, precision=precision)


def init_params(config: CLIPConfig, seed: int = 0):
    """Random CLIP parameters (float32) for the given architecture."""
    model = CLIP(config)
    res = config.image_resolution
    images = jnp.zeros((1, res, res, 3), jnp.float32)
    tokens = jnp.zeros((1, config.context_length), jnp.int32)
    # Jitted: an eager Flax init dispatches op by op (tens of seconds on a small CPU).
    return jax.jit(model.init)(jax.random.key(seed), images, tokens)["params"]


def abstract_params(config: CLIPConfig):
    """The parameter tree's shapes and dtypes, without allocating (for conversion checks)."""
    return jax.eval_shape(lambda: init_params(config))
