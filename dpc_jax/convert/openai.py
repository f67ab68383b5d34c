"""OpenAI CLIP checkpoints (`clip.load` `.pt` files and their state dicts) <-> dpc_jax CLIP.

The architecture is derived from the tensor shapes as OpenAI's `clip/model.py:build_model` does;
only ViT CLIPs are supported (our Flax CLIP has no ModifiedResNet image tower).
torch is imported only inside the functions that read a torch file (STYLE rule 8).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
import zipfile
from typing import Mapping, Optional

import numpy as np

from dpc_jax.convert.mapping import Entry, as_float32, export_params, import_params
from dpc_jax.models.clip import CLIPConfig

# OpenAI's clip/clip.py `_MODELS`; the second-to-last URL component is the file's SHA256.
# (URLs are kept whole, over the line limit.)
OPENAI_MODELS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
DEFAULT_DOWNLOAD_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "clip")

# Not parameters: OpenAI's TorchScript archives carry these; build_model deletes them too.
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")

_TRANSPOSE = (1, 0)
_CONV = (2, 3, 1, 0)  # torch [W, 3, p, p] -> Flax [p, p, 3, W]
_RESNET_HINT = "ResNet CLIPs (RN50, RN101, RN50x4, ...) are not supported yet; use a ViT CLIP"


def _block_entries(ours: str, theirs: str) -> list:
    return [
        Entry(f"{ours}/ln_1/scale", (f"{theirs}.ln_1.weight",)),
        Entry(f"{ours}/ln_1/bias", (f"{theirs}.ln_1.bias",)),
        Entry(f"{ours}/attn/in_proj/kernel", (f"{theirs}.attn.in_proj_weight",), _TRANSPOSE),
        Entry(f"{ours}/attn/in_proj/bias", (f"{theirs}.attn.in_proj_bias",)),
        Entry(f"{ours}/attn/out_proj/kernel", (f"{theirs}.attn.out_proj.weight",), _TRANSPOSE),
        Entry(f"{ours}/attn/out_proj/bias", (f"{theirs}.attn.out_proj.bias",)),
        Entry(f"{ours}/ln_2/scale", (f"{theirs}.ln_2.weight",)),
        Entry(f"{ours}/ln_2/bias", (f"{theirs}.ln_2.bias",)),
        Entry(f"{ours}/mlp/c_fc/kernel", (f"{theirs}.mlp.c_fc.weight",), _TRANSPOSE),
        Entry(f"{ours}/mlp/c_fc/bias", (f"{theirs}.mlp.c_fc.bias",)),
        Entry(f"{ours}/mlp/c_proj/kernel", (f"{theirs}.mlp.c_proj.weight",), _TRANSPOSE),
        Entry(f"{ours}/mlp/c_proj/bias", (f"{theirs}.mlp.c_proj.bias",)),
    ]


def openai_layout(config: CLIPConfig) -> list:
    """Our parameter paths <-> OpenAI state-dict keys (renames; Linear and conv transposes)."""
    entries = [
        Entry("visual/conv1/kernel", ("visual.conv1.weight",), _CONV),
        Entry("visual/class_embedding", ("visual.class_embedding",)),
        Entry("visual/positional_embedding", ("visual.positional_embedding",)),
        Entry("visual/ln_pre/scale", ("visual.ln_pre.weight",)),
        Entry("visual/ln_pre/bias", ("visual.ln_pre.bias",)),
        Entry("visual/ln_post/scale", ("visual.ln_post.weight",)),
        Entry("visual/ln_post/bias", ("visual.ln_post.bias",)),
        Entry("visual/proj", ("visual.proj",)),  # OpenAI applies it as x @ proj: no transpose
        Entry("token_embedding/embedding", ("token_embedding.weight",)),
        Entry("positional_embedding", ("positional_embedding",)),
        Entry("ln_final/scale", ("ln_final.weight",)),
        Entry("ln_final/bias", ("ln_final.bias",)),
        Entry("text_projection", ("text_projection",)),
        Entry("logit_scale", ("logit_scale",)),
    ]
    for i in range(config.vision_layers):
        entries += _block_entries(f"visual/transformer/resblocks_{i}",
                                  f"visual.transformer.resblocks.{i}")
    for i in range(config.transformer_layers):
        entries += _block_entries(f"transformer/resblocks_{i}", f"transformer.resblocks.{i}")
    return entries


def _is_resnet(state_dict: Mapping) -> bool:
    return any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state_dict)


def _n_blocks(state_dict: Mapping, prefix: str) -> int:
    """Number of residual blocks under `prefix` (highest index + 1).

    On a complete checkpoint this equals OpenAI's count of `...attn.in_proj_weight` keys; on a
    broken one a block with a key missing is then reported as missing, not as unexpected.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in state_dict if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def config_from_openai_state_dict(state_dict: Mapping, source: str = "state dict",
                                  **overrides) -> CLIPConfig:
    """The CLIPConfig OpenAI's `build_model` would build for `state_dict`.

    OpenAI fixes the head counts at width // 64 (both towers); `overrides` may set
    `transformer_heads` / `vision_head_width` for checkpoints trained otherwise, and run-time
    fields (`dtype`, `precision`).
    """
    if _is_resnet(state_dict):
        raise ValueError(f"{source} holds a ResNet CLIP (keys visual.layer1.*, visual.attnpool.*): "
                         f"{_RESNET_HINT}")
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj",
              "text_projection", "positional_embedding", "token_embedding.weight",
              "ln_final.weight"]
    absent = [k for k in needed if k not in state_dict]
    if absent:
        raise ValueError(f"{source} is not an OpenAI ViT CLIP state dict: missing keys {absent} "
                         f"needed to derive the architecture (it has {len(state_dict)} keys)")
    shape = {k: tuple(np.shape(state_dict[k])) for k in needed}
    ndims = {"visual.conv1.weight": 4, "visual.positional_embedding": 2, "visual.proj": 2,
             "text_projection": 2, "positional_embedding": 2, "token_embedding.weight": 2,
             "ln_final.weight": 1}
    wrong = [f"{k}: shape {shape[k]}, expected {ndims[k]} dims" for k in needed
             if len(shape[k]) != ndims[k]]
    if wrong:
        raise ValueError(f"{source}: cannot derive the CLIP architecture; mis-shaped keys {wrong}")
    vision_width = shape["visual.conv1.weight"][0]
    patch = shape["visual.conv1.weight"][-1]
    n_pos = shape["visual.positional_embedding"][0]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise ValueError(f"{source}: visual.positional_embedding has {n_pos} rows; expected "
                         f"grid**2 + 1 (a square patch grid plus the class token)")
    text_width = shape["ln_final.weight"][0]
    derived = dict(
        embed_dim=shape["text_projection"][1],
        image_resolution=patch * grid,
        vision_layers=_n_blocks(state_dict, "visual.transformer.resblocks."),
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=shape["positional_embedding"][0],
        vocab_size=shape["token_embedding.weight"][0],
        transformer_width=text_width,
        transformer_heads=text_width // 64,
        transformer_layers=_n_blocks(state_dict, "transformer.resblocks."),
    )
    derived.update(overrides)
    if derived["transformer_heads"] < 1 or vision_width < derived.get("vision_head_width", 64):
        raise ValueError(
            f"{source}: text width {text_width} / vision width {vision_width} is below OpenAI's "
            f"head width 64, so heads = width // 64 is 0; pass transformer_heads=... and "
            f"vision_head_width=... for this checkpoint")
    return CLIPConfig(**derived)


def from_openai_state_dict(state_dict: Mapping[str, object], source: str = "state dict",
                           **overrides):
    """(config, params) from an OpenAI CLIP state dict {name: array}.

    Raises a ValueError listing missing, unexpected and mis-shaped keys on any misfit, and one
    naming ResNet for ResNet checkpoints. `overrides`: see `config_from_openai_state_dict`.
    """
    config = config_from_openai_state_dict(state_dict, source, **overrides)
    params = import_params(state_dict, openai_layout(config), config, source,
                           ignore=lambda k: k in IGNORED_KEYS)
    return config, params


def to_openai_state_dict(config: CLIPConfig, params) -> dict:
    """{name: float32 np.ndarray} in OpenAI's layout; the exact inverse of the import."""
    return export_params(params, openai_layout(config), config)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _is_torchscript(path: str) -> bool:
    # TorchScript archives carry compiled code and constants; torch.save zips do not.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _is_cut_zip(path: str) -> bool:
    """A file that starts as a zip archive (as torch.save and TorchScript files do) but has no
    end record: cut short."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def read_torch_state_dict(path: str) -> dict:
    """{name: float32 np.ndarray} from a TorchScript archive or a `torch.save`d state dict."""
    import torch  # only here: reading a torch file needs it (STYLE rule 8)

    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist")
    expected = ("expected an OpenAI CLIP .pt (a TorchScript archive as clip.load downloads, or "
                "a state dict torch.save wrote): download or copy it again")
    if _is_cut_zip(path):
        raise ValueError(f"{path!r} is cut short (a zip archive without its end, as an "
                         f"interrupted download or copy leaves); {expected}")
    if _is_torchscript(path):
        try:
            state = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:  # torch reports a damaged archive as RuntimeError and others
            raise ValueError(f"{path!r} is a damaged TorchScript archive (torch.jit.load: "
                             f"{_first_line(e)}); {expected}") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path!r} is neither a TorchScript archive nor a state dict that "
                             f"torch.load(weights_only=True) can read ({_first_line(e)}); "
                             f"{expected}") from e
        if isinstance(state, dict) and set(state) == {"state_dict"}:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{path!r} holds a {type(state).__name__}; expected a state dict "
                             f"(name -> tensor) or a TorchScript archive")
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise TypeError(f"{path!r}: value of key {key!r} is a {type(value).__name__}, "
                            f"not a tensor")
        # float() first: numpy has no bfloat16; fp16 OpenAI weights widen exactly.
        out[key] = as_float32(value.detach().float().numpy() if value.is_floating_point()
                              else value.numpy(), key)
    return out


def load_openai_checkpoint(path: str, **overrides):
    """(config, params) from an OpenAI `.pt` file (TorchScript archive or plain state dict)."""
    return from_openai_state_dict(read_torch_state_dict(path), source=path, **overrides)


def download_openai_model(name: str, root: Optional[str] = None) -> str:
    """Path of OpenAI's `.pt` for `name` (e.g. "ViT-B/16") in `root`, downloaded if needed."""
    if name not in OPENAI_MODELS:
        raise ValueError(f"unknown OpenAI CLIP model {name!r}; expected one of "
                         f"{sorted(OPENAI_MODELS)}")
    if name.startswith("RN"):
        raise ValueError(f"OpenAI CLIP {name!r} is a ResNet: {_RESNET_HINT}")
    url = OPENAI_MODELS[name]
    sha256 = url.split("/")[-2]
    root = root or DEFAULT_DOWNLOAD_ROOT
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target) and _sha256(target) == sha256:
        return target
    os.makedirs(root, exist_ok=True)
    partial = target + ".part"
    try:
        from tqdm import tqdm

        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.info().get("Content-Length") or 0)
            with tqdm(total=total, unit="iB", unit_scale=True, desc=name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(partial):
            os.remove(partial)
        raise ConnectionError(
            f"could not download OpenAI CLIP {name!r} from {url}: {e}. Without network access, "
            f"download that file elsewhere and pass its path (`clip=PATH` in --config's arguments, or "
            f"to `python -m dpc_jax.convert`), or place it at {target}") from e
    if _sha256(partial) != sha256:
        os.remove(partial)
        raise ValueError(f"downloaded OpenAI CLIP {name!r} from {url} but its SHA256 does not "
                         f"match {sha256}")
    os.replace(partial, target)
    return target


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
