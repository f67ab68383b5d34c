"""Hugging Face `CLIPModel` checkpoints (directory or hub id) <-> dpc_jax CLIP.

A directory holds `config.json` plus `model.safetensors` (read with safetensors.numpy, no torch),
a sharded `model.safetensors.index.json`, or `pytorch_model.bin` (read through torch). A hub id is
first downloaded with `huggingface_hub.snapshot_download`; from then on it is the same directory
code path. `save_huggingface` writes a directory that `transformers.CLIPModel.from_pretrained`
loads.

HF splits OpenAI's packed attention projection into q/k/v; they are concatenated (in that order)
into our `in_proj`. Configuration values our CLIP cannot represent (other activations, other
LayerNorm epsilons, a non-4x MLP, non-square images or patches) fail with the field named.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Mapping, Optional

import numpy as np

from dpc_jax.convert.mapping import Entry, as_float32, export_params, import_params
from dpc_jax.models.clip import CLIPConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_FILE, TORCH_INDEX)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for fields a config.json
# may omit (PreTrainedConfig.to_diff_dict drops values equal to the defaults).
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406,
                      eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
_PROJECTION_DEFAULT = 512
_TRANSPOSE = (1, 0)
_CONV = (2, 3, 1, 0)  # torch [W, 3, p, p] -> Flax [p, p, 3, W]


def _block_entries(ours: str, theirs: str) -> list:
    attn = f"{theirs}.self_attn"
    return [
        Entry(f"{ours}/ln_1/scale", (f"{theirs}.layer_norm1.weight",)),
        Entry(f"{ours}/ln_1/bias", (f"{theirs}.layer_norm1.bias",)),
        Entry(f"{ours}/attn/in_proj/kernel",
              (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
              _TRANSPOSE, concat_axis=1),
        Entry(f"{ours}/attn/in_proj/bias",
              (f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"),
              concat_axis=0),
        Entry(f"{ours}/attn/out_proj/kernel", (f"{attn}.out_proj.weight",), _TRANSPOSE),
        Entry(f"{ours}/attn/out_proj/bias", (f"{attn}.out_proj.bias",)),
        Entry(f"{ours}/ln_2/scale", (f"{theirs}.layer_norm2.weight",)),
        Entry(f"{ours}/ln_2/bias", (f"{theirs}.layer_norm2.bias",)),
        Entry(f"{ours}/mlp/c_fc/kernel", (f"{theirs}.mlp.fc1.weight",), _TRANSPOSE),
        Entry(f"{ours}/mlp/c_fc/bias", (f"{theirs}.mlp.fc1.bias",)),
        Entry(f"{ours}/mlp/c_proj/kernel", (f"{theirs}.mlp.fc2.weight",), _TRANSPOSE),
        Entry(f"{ours}/mlp/c_proj/bias", (f"{theirs}.mlp.fc2.bias",)),
    ]


def huggingface_layout(config: CLIPConfig) -> list:
    """Our parameter paths <-> `transformers.CLIPModel` state-dict keys."""
    entries = [
        Entry("visual/conv1/kernel", ("vision_model.embeddings.patch_embedding.weight",), _CONV),
        Entry("visual/class_embedding", ("vision_model.embeddings.class_embedding",)),
        Entry("visual/positional_embedding",
              ("vision_model.embeddings.position_embedding.weight",)),
        Entry("visual/ln_pre/scale", ("vision_model.pre_layrnorm.weight",)),  # (sic) in HF
        Entry("visual/ln_pre/bias", ("vision_model.pre_layrnorm.bias",)),
        Entry("visual/ln_post/scale", ("vision_model.post_layernorm.weight",)),
        Entry("visual/ln_post/bias", ("vision_model.post_layernorm.bias",)),
        # HF's projections are bias-free nn.Linear ([out, in]); ours are [in, out] matrices.
        Entry("visual/proj", ("visual_projection.weight",), _TRANSPOSE),
        Entry("token_embedding/embedding", ("text_model.embeddings.token_embedding.weight",)),
        Entry("positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
        Entry("ln_final/scale", ("text_model.final_layer_norm.weight",)),
        Entry("ln_final/bias", ("text_model.final_layer_norm.bias",)),
        Entry("text_projection", ("text_projection.weight",), _TRANSPOSE),
        Entry("logit_scale", ("logit_scale",)),
    ]
    for i in range(config.vision_layers):
        entries += _block_entries(f"visual/transformer/resblocks_{i}",
                                  f"vision_model.encoder.layers.{i}")
    for i in range(config.transformer_layers):
        entries += _block_entries(f"transformer/resblocks_{i}", f"text_model.encoder.layers.{i}")
    return entries


def _ignored(key: str) -> bool:
    # Older transformers saved the position-id buffers; they are not parameters.
    return key.endswith("position_ids")


# ----------------------------------------------------------------------------------------------
# config.json <-> CLIPConfig
# ----------------------------------------------------------------------------------------------


def _square(value, field: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{source}: vision_config.{field}={value!r}; dpc_jax's CLIP supports "
                             f"square {field}s only")
        value = value[0]
    return int(value)


def _sub_config(hf: dict, name: str, defaults: dict) -> dict:
    sub = dict(defaults)
    sub.update(hf.get(name) or {})
    # Legacy configs carry `text_config_dict`/`vision_config_dict`; transformers lets them win.
    sub.update(hf.get(f"{name}_dict") or {})
    return sub


def config_from_huggingface(hf: Mapping, source: str = "config.json", **overrides) -> CLIPConfig:
    """CLIPConfig for an HF `CLIPConfig` dict; fails naming any field we cannot represent."""
    model_type = hf.get("model_type", "clip")
    if model_type != "clip":
        raise ValueError(f"{source}: model_type={model_type!r}; expected 'clip' (a CLIPModel "
                         f"checkpoint)")
    text = _sub_config(dict(hf), "text_config", _TEXT_DEFAULTS)
    vision = _sub_config(dict(hf), "vision_config", _VISION_DEFAULTS)
    problems = []
    for side, sub in (("text_config", text), ("vision_config", vision)):
        if sub["hidden_act"] != "quick_gelu":
            problems.append(f"{side}.hidden_act={sub['hidden_act']!r} (expected 'quick_gelu')")
        if sub["layer_norm_eps"] != 1e-5:
            problems.append(f"{side}.layer_norm_eps={sub['layer_norm_eps']!r} (expected 1e-05)")
        if sub["intermediate_size"] != 4 * sub["hidden_size"]:
            problems.append(f"{side}.intermediate_size={sub['intermediate_size']} (expected "
                            f"4 * hidden_size = {4 * sub['hidden_size']})")
        if sub["hidden_size"] % sub["num_attention_heads"]:
            problems.append(f"{side}.hidden_size={sub['hidden_size']} is not a multiple of "
                            f"num_attention_heads={sub['num_attention_heads']}")
    if vision["num_channels"] != 3:
        problems.append(f"vision_config.num_channels={vision['num_channels']} (expected 3)")
    eos = text["eos_token_id"]
    # encode_text pools at argmax(ids) as OpenAI does; HF pools at the first eos_token_id
    # (or at argmax when eos_token_id == 2, its legacy value). They agree when EOT is the
    # largest id.
    if eos not in (2, text["vocab_size"] - 1):
        problems.append(f"text_config.eos_token_id={eos!r} (expected the largest id "
                        f"{text['vocab_size'] - 1}, or the legacy 2: features are pooled at "
                        f"argmax(ids))")
    if problems:
        raise ValueError(f"{source}: this CLIP cannot be represented by dpc_jax's CLIP: "
                         + "; ".join(problems))
    image_size = _square(vision["image_size"], "image_size", source)
    patch_size = _square(vision["patch_size"], "patch_size", source)
    derived = dict(
        embed_dim=int(hf.get("projection_dim") or _PROJECTION_DEFAULT),
        image_resolution=image_size,
        vision_layers=vision["num_hidden_layers"],
        vision_width=vision["hidden_size"],
        vision_patch_size=patch_size,
        vision_head_width=vision["hidden_size"] // vision["num_attention_heads"],
        context_length=text["max_position_embeddings"],
        vocab_size=text["vocab_size"],
        transformer_width=text["hidden_size"],
        transformer_heads=text["num_attention_heads"],
        transformer_layers=text["num_hidden_layers"],
    )
    derived.update(overrides)
    return CLIPConfig(**derived)


def huggingface_config(config: CLIPConfig, logit_scale: Optional[float] = None) -> dict:
    """An HF `CLIPConfig` dict (config.json) for our architecture."""
    act = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0)
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": 2.6592 if logit_scale is None else float(logit_scale),
        "dtype": "float32",
        "text_config": dict(
            model_type="clip_text_model", vocab_size=config.vocab_size,
            hidden_size=config.transformer_width, intermediate_size=4 * config.transformer_width,
            num_hidden_layers=config.transformer_layers,
            num_attention_heads=config.transformer_heads,
            max_position_embeddings=config.context_length, projection_dim=config.embed_dim,
            # OpenAI's convention (sot = vocab-2, eot = vocab-1) so HF pools where we do.
            bos_token_id=config.vocab_size - 2, eos_token_id=config.vocab_size - 1,
            pad_token_id=1, **act),
        "vision_config": dict(
            model_type="clip_vision_model", hidden_size=config.vision_width,
            intermediate_size=4 * config.vision_width, num_hidden_layers=config.vision_layers,
            num_attention_heads=config.vision_heads, num_channels=3,
            image_size=config.image_resolution, patch_size=config.vision_patch_size,
            projection_dim=config.embed_dim, **act),
    }


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def from_huggingface_state_dict(state_dict: Mapping[str, object], config: CLIPConfig,
                                source: str = "state dict") -> dict:
    """Our params from a `CLIPModel` state dict; fails listing missing/unexpected/mis-shaped."""
    return import_params(state_dict, huggingface_layout(config), config, source, ignore=_ignored)


def to_huggingface_state_dict(config: CLIPConfig, params) -> dict:
    """{HF key: float32 np.ndarray}; the exact inverse of `from_huggingface_state_dict`."""
    return export_params(params, huggingface_layout(config), config)


def corrupt_file(path: str, holds: str, error) -> ValueError:
    """The error of a Hugging Face file that cannot be decoded: its path, what it holds, the
    fix."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ValueError(
        f"{path} is truncated or corrupt ({reason}): it should hold {holds}; download it again "
        f"(or convert the CLIP once with `python -m dpc_jax.convert HUB_ID_OR_DIR OUT_DIR` where "
        f"it is whole, and use OUT_DIR)")


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        try:
            tensors = load_file(path)
        except TypeError as e:
            if "bfloat16" not in str(e):
                raise
            # numpy has no bfloat16; jax (ml_dtypes) does, and widening to float32 is exact.
            from safetensors.flax import load_file as load_file_flax

            tensors = load_file_flax(path)
    except SafetensorError as e:  # a cut download, or not a safetensors file
        raise corrupt_file(path, "the CLIP's weights as safetensors", e) from e
    return {k: as_float32(v, k) for k, v in tensors.items()}


def _read_torch_bin(path: str) -> dict:
    import torch  # only here: reading a torch file needs it (STYLE rule 8)

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # a cut or foreign file
        raise corrupt_file(path, "the CLIP's weights as a PyTorch state dict", e) from e
    return {k: as_float32(v.detach().float().numpy() if v.is_floating_point() else v.numpy(), k)
            for k, v in state.items()}


def _read_json(path: str, holds: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:  # json's decode errors (and bad UTF-8) are ValueErrors
            raise corrupt_file(path, holds, e) from e


def read_huggingface_weights(directory: str) -> dict:
    """{key: float32 np.ndarray} from an HF directory; safetensors preferred over torch files."""
    present = set(os.listdir(directory))
    for single, index, reader in ((SAFETENSORS_FILE, SAFETENSORS_INDEX, _read_safetensors),
                                  (TORCH_FILE, TORCH_INDEX, _read_torch_bin)):
        if single in present:
            return reader(os.path.join(directory, single))
        if index in present:
            shards = sorted(set(_read_json(os.path.join(directory, index), "the shard of "
                                           "every weight ('weight_map')")["weight_map"].values()))
            missing = [s for s in shards if s not in present]
            if missing:
                raise FileNotFoundError(f"{directory!r}: shards {missing} listed in {index} are "
                                        f"missing")
            out = {}
            for shard in shards:
                out.update(reader(os.path.join(directory, shard)))
            return out
    raise FileNotFoundError(f"{directory!r} holds no Hugging Face weights: expected one of "
                            f"{list(WEIGHT_FILES)} (found: {sorted(present)})")


def is_huggingface_dir(path: str) -> bool:
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))
            and any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES))


def load_huggingface_dir(directory: str, **overrides):
    """(config, params) from a local HF `CLIPModel` directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Hugging Face CLIP directory {directory!r} does not exist")
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} has no {CONFIG_FILE}; expected a Hugging Face "
                                f"CLIPModel directory (config.json + model.safetensors)")
    config = config_from_huggingface(_read_json(config_path, "the CLIPModel's config as JSON"),
                                     source=config_path, **overrides)
    params = from_huggingface_state_dict(read_huggingface_weights(directory), config,
                                         source=directory)
    return config, params


def download_huggingface(repo_id: str, revision: Optional[str] = None) -> str:
    """Local snapshot directory of hub repo `repo_id` (config, weights, tokenizer files)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    wanted = [CONFIG_FILE, *TOKENIZER_FILES]
    try:
        directory = snapshot_download(repo_id, revision=revision,
                                      allow_patterns=wanted + ["*.safetensors",
                                                               SAFETENSORS_INDEX])
        if not any(os.path.isfile(os.path.join(directory, w))
                   for w in (SAFETENSORS_FILE, SAFETENSORS_INDEX)):
            # Only torch weights on the hub: fetch those (not both: they are large).
            directory = snapshot_download(repo_id, revision=revision,
                                          allow_patterns=wanted + ["*.bin", TORCH_INDEX])
    except _network_errors() as e:  # offline, or the hub cannot be reached, and not cached
        raise FileNotFoundError(
            f"could not fetch Hugging Face hub id {repo_id!r} ({type(e).__name__}): no network "
            f"here and no copy in the Hugging Face cache; on a machine with network run "
            f"`python -m dpc_jax.convert {repo_id} DIR` once, bring DIR here and pass "
            f"clip=DIR (--config.clip.source=DIR)") from e
    except HfHubHTTPError as e:  # the hub's own answers: unknown or gated repo, revision
        reason = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"could not fetch Hugging Face hub id {repo_id!r} "
                                f"({type(e).__name__}): {reason}") from e
    return directory


def _network_errors() -> tuple:
    """What huggingface_hub raises when it cannot reach the hub and has no cached copy: its
    offline and cache-miss errors, and the HTTP client's connection errors."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors = [LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module, name in (("httpx", "TransportError"), ("httpx2", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def load_huggingface(source: str, revision: Optional[str] = None, **overrides):
    """(config, params) from a local HF directory or a hub id (downloaded first)."""
    directory = source if os.path.isdir(source) else download_huggingface(source, revision)
    return load_huggingface_dir(directory, **overrides)


def save_huggingface(config: CLIPConfig, params, out_dir: str) -> str:
    """Write config.json + model.safetensors that `transformers.CLIPModel.from_pretrained` loads."""
    from safetensors.numpy import save_file

    state = to_huggingface_state_dict(config, params)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(huggingface_config(config, float(np.asarray(state["logit_scale"]))), f,
                  indent=2, sort_keys=True)
    # transformers refuses safetensors files without format metadata.
    save_file(state, os.path.join(out_dir, SAFETENSORS_FILE), metadata={"format": "pt"})
    return out_dir
