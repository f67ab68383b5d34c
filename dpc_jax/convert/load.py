"""`load_clip(source)`: one entry point for every CLIP weight source dpc_jax reads.

Accepted sources, tried in this order:
1. a dpc_jax checkpoint directory (clip_config.json + clip_params.msgpack; fastest, no torch);
2. a Hugging Face CLIPModel directory (config.json + model.safetensors / pytorch_model.bin);
3. an OpenAI `.pt` / `.pth` file (TorchScript archive or plain state dict);
4. an OpenAI model name ("ViT-B/16", ...), downloaded to ~/.cache/clip;
5. a Hugging Face hub id ("openai/clip-vit-base-patch16"), downloaded with huggingface_hub.

A run's config names its CLIP in `config.clip` (a source above or a shipped CLIP, 'world' or
'world_teacher', plus dtype, precision, attention, ...): `load_clip_from_config(config.clip)`
and `load_clip_and_tokenizer(config)` read it, the tokenizer checked to fit the CLIP.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Optional

import jax

from dpc_jax.convert import huggingface, openai
from dpc_jax.models import checkpoint
from dpc_jax.models.clip import ATTENTIONS, CLIPConfig
from dpc_jax.models.tokenizer import Tokenizer, is_tokenizer_dir

# Shipped CLIPs named by `config.clip.source` (and `config.backbone.teacher_clip.source`).
SHIPPED_CLIPS = {"world": "world", "world_teacher": "world_teacher"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
ACCEPTED = ("a dpc_jax checkpoint directory (clip_config.json + clip_params.msgpack), "
            "a Hugging Face CLIPModel directory (config.json + model.safetensors or "
            "pytorch_model.bin), an OpenAI .pt/.pth file, an OpenAI model name "
            f"({', '.join(n for n in openai.OPENAI_MODELS if not n.startswith('RN'))}), "
            "or a Hugging Face hub id such as 'openai/clip-vit-base-patch16'")


def resolve_source(source: str) -> tuple:
    """(kind, location) for `source`; kind is 'dpc_jax', 'huggingface', 'openai_file',
    'openai_name' or 'hub_id'. Nothing is downloaded here."""
    source = os.fspath(source)
    if os.path.isdir(source):
        if checkpoint.is_clip_checkpoint(source):
            return "dpc_jax", source
        if huggingface.is_huggingface_dir(source):
            return "huggingface", source
        raise FileNotFoundError(
            f"directory {source!r} is neither a dpc_jax checkpoint nor a Hugging Face CLIP "
            f"directory (found: {sorted(os.listdir(source))[:20]}); expected {ACCEPTED}")
    if os.path.isfile(source):
        if source.endswith((".pt", ".pth")):
            return "openai_file", source
        raise ValueError(f"file {source!r} is not a .pt/.pth file; expected {ACCEPTED}")
    if source in openai.OPENAI_MODELS:
        return "openai_name", source
    # A relative path that does not exist looks like a hub id; absolute or dotted ones do not.
    if _HUB_ID.match(source) and not source.endswith((".pt", ".pth")):
        return "hub_id", source
    raise FileNotFoundError(f"CLIP source {source!r} does not exist; expected {ACCEPTED}")


def load_clip(source: str, download_root: Optional[str] = None, **overrides):
    """(config, params) from any accepted source (see the module docstring).

    `overrides` change CLIPConfig fields after loading, e.g. dtype='bfloat16'.
    """
    kind, location = resolve_source(source)
    if kind == "dpc_jax":
        return checkpoint.load_clip_checkpoint(location, **overrides)
    if kind == "huggingface":
        return huggingface.load_huggingface_dir(location, **overrides)
    if kind == "openai_file":
        return openai.load_openai_checkpoint(location, **overrides)
    if kind == "openai_name":
        return openai.load_openai_checkpoint(
            openai.download_openai_model(location, download_root), **overrides)
    try:
        directory = huggingface.download_huggingface(location)
    except FileNotFoundError as e:  # one line: `e` says why and what to do
        raise FileNotFoundError(f"CLIP source {source!r} is not a local path or an OpenAI "
                                f"model name, and as a hub id: {e}") from e
    return huggingface.load_huggingface_dir(directory, **overrides)


def load_clip_from_config(clip_config, field: str = "config.clip") -> tuple[CLIPConfig, Any]:
    """(CLIP config, parameters) of `clip_config.source`: a shipped CLIP ('world',
    'world_teacher'), an OpenAI name, a Hugging Face id, or a checkpoint path."""
    overrides = dict(dtype=clip_config.dtype, precision=clip_config.precision,
                     trim_text=bool(clip_config.get("trim_text", True)),
                     attention=clip_config.get("attention", "einsum"),
                     remat=bool(clip_config.get("remat", False)),
                     text_chunk=clip_config.get("text_chunk", 128))
    if overrides["attention"] not in ATTENTIONS:  # before a download or a load
        raise ValueError(f"{field}.attention={overrides['attention']!r}; expected one of "
                         f"{sorted(ATTENTIONS)}")
    if ATTENTIONS[overrides["attention"]] == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"{field}.attention={overrides['attention']!r} needs a GPU with cuDNN "
                         f"(jax runs on {jax.default_backend()!r} here); use 'einsum' or "
                         f"'dot_product'")
    source = clip_config.source
    if source in SHIPPED_CLIPS:
        source = checkpoint.asset_dir(SHIPPED_CLIPS[source])
    return load_clip(source, **overrides)


def load_clip_and_tokenizer(config) -> tuple[CLIPConfig, Any, Tokenizer]:
    """(CLIP config, parameters, tokenizer) of `config.clip`; the tokenizer 'world' is the
    shipped world CLIP's."""
    clip_config, params = load_clip_from_config(config.clip)
    tok_source = (checkpoint.asset_dir() if config.clip.tokenizer == "world"
                  else config.clip.tokenizer)
    tokenizer = Tokenizer.from_pretrained(tok_source, context_length=clip_config.context_length)
    check_tokenizer_fits(tokenizer, clip_config, config.clip.tokenizer, config.clip.source)
    return clip_config, params, tokenizer


def check_tokenizer_fits(tokenizer, clip_config, tokenizer_name, clip_name) -> None:
    """The tokenizer belongs to the CLIP: the same vocabulary size, and CLIP's special tokens
    (start = vocab - 2, end = vocab - 1, the largest id, where the text tower pools). A smaller
    or foreign tokenizer runs but gives other numbers without a word, so it is refused."""
    v = clip_config.vocab_size
    found = (tokenizer.vocab_size, tokenizer.sot_token_id, tokenizer.eot_token_id)
    if found != (v, v - 2, v - 1):
        raise ValueError(
            f"tokenizer {tokenizer_name!r} does not fit the CLIP from {clip_name!r}: it has "
            f"{found[0]} tokens (start token {found[1]}, end token {found[2]}); the CLIP embeds "
            f"{v} tokens with start {v - 2} and end {v - 1}. Set config.clip.tokenizer to that "
            f"CLIP's own tokenizer (the directory `python -m dpc_jax.convert` wrote, or its "
            f"hub id)")


def _tokenizer_files(directory: str) -> list:
    if not is_tokenizer_dir(directory):
        return []
    present = set(os.listdir(directory))
    return [f for f in huggingface.TOKENIZER_FILES if f in present]


def copy_tokenizer(source: str, out_dir: str, config: CLIPConfig) -> list:
    """Copy tokenizer files from a directory or hub id into `out_dir`; returns the file names.

    The copy is loaded back and checked against the model: its ids must fit the vocabulary.
    """
    if os.path.isdir(source):
        files = _tokenizer_files(source)
        if not files:
            raise FileNotFoundError(f"tokenizer directory {source!r} holds neither vocab.json + "
                                    f"merges.txt nor tokenizer.json")
        for f in files:
            shutil.copyfile(os.path.join(source, f), os.path.join(out_dir, f))
    else:
        Tokenizer.from_pretrained(source).hf.save_pretrained(out_dir)
        files = _tokenizer_files(out_dir)
    tok = Tokenizer.from_pretrained(out_dir, context_length=config.context_length)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer from {source!r} has {tok.vocab_size} tokens; the model's "
                         f"vocabulary has {config.vocab_size}")
    return files


def convert_checkpoint(source: str, out_dir: str, tokenizer: Optional[str] = None) -> dict:
    """Load `source` once, write a dpc_jax checkpoint to `out_dir`; returns a summary dict.

    Tokenizer files are copied from `tokenizer` (directory or hub id) when given, else from the
    source's (downloaded) Hugging Face directory when it has them.
    """
    kind, location = resolve_source(source)
    if kind == "hub_id":
        location = huggingface.download_huggingface(location)
        kind = "huggingface"
    config, params = load_clip(location)
    checkpoint.save_clip_checkpoint(out_dir, config, params)
    copied, tokenizer_from = [], None
    if tokenizer is not None:
        copied, tokenizer_from = copy_tokenizer(tokenizer, out_dir, config), tokenizer
    elif kind == "huggingface" and _tokenizer_files(location):
        copied, tokenizer_from = copy_tokenizer(location, out_dir, config), location
    return dict(source=source, kind=kind, out_dir=out_dir, config=config.to_dict(),
                n_params=sum(int(x.size) for x in jax.tree_util.tree_leaves(params)),
                tokenizer_from=tokenizer_from, tokenizer_files=copied)
