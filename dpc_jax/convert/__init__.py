"""Conversion of OpenAI and Hugging Face CLIP checkpoints to dpc_jax's CLIP parameters.

`load_clip(source)` reads any supported source; `python -m dpc_jax.convert SOURCE OUT_DIR`
converts once into a dpc_jax checkpoint. torch is imported only when a torch file is read.
"""

from dpc_jax.convert.huggingface import (
    config_from_huggingface,
    from_huggingface_state_dict,
    huggingface_config,
    load_huggingface,
    save_huggingface,
    to_huggingface_state_dict,
)
from dpc_jax.convert.load import convert_checkpoint, load_clip, resolve_source
from dpc_jax.convert.openai import (
    OPENAI_MODELS,
    config_from_openai_state_dict,
    download_openai_model,
    from_openai_state_dict,
    load_openai_checkpoint,
    read_torch_state_dict,
    to_openai_state_dict,
)

__all__ = [
    "OPENAI_MODELS", "config_from_huggingface", "config_from_openai_state_dict",
    "convert_checkpoint", "download_openai_model", "from_huggingface_state_dict",
    "from_openai_state_dict", "huggingface_config", "load_clip", "load_huggingface",
    "load_openai_checkpoint", "read_torch_state_dict", "resolve_source", "save_huggingface",
    "to_huggingface_state_dict", "to_openai_state_dict",
]
