"""dpc_jax's own CLIP checkpoint: a directory with `clip_config.json` and `clip_params.msgpack`.

This is what `python -m dpc_jax.convert` writes and what training loads quickly (one file read,
no torch). A tokenizer (vocab.json + merges.txt) may sit in the same directory.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import serialization

from dpc_jax.models.clip import CLIPConfig, abstract_params
from dpc_jax.tree import flatten

CONFIG_FILE = "clip_config.json"
PARAMS_FILE = "clip_params.msgpack"


def asset_dir(name: str = "world") -> str:
    """The directory of a CLIP checkpoint shipped with dpc_jax, its tokenizer beside it:
    dpc_jax/assets/<name> ('world', 'world_teacher')."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        name)


def is_clip_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(
        os.path.join(path, PARAMS_FILE))


def save_clip_checkpoint(path: str, config: CLIPConfig, params) -> str:
    """Write the config and float32 parameters; the parameter file is written atomically."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(config.to_json())
    host = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    tmp = os.path.join(path, PARAMS_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(host))
    os.replace(tmp, os.path.join(path, PARAMS_FILE))
    return path


def load_clip_checkpoint(path: str, **config_overrides):
    """(config, params) from a directory written by `save_clip_checkpoint`.

    `config_overrides` change run-time fields such as `dtype` or `precision`.
    The stored tree is checked against the architecture's tree (names and shapes).
    """
    if not is_clip_checkpoint(path):
        raise FileNotFoundError(
            f"{path!r} is not a dpc_jax CLIP checkpoint: expected {CONFIG_FILE} and {PARAMS_FILE} "
            f"there (write one with `python -m dpc_jax.convert SOURCE OUT_DIR`)")
    config_path, params_path = os.path.join(path, CONFIG_FILE), os.path.join(path, PARAMS_FILE)
    with open(config_path) as f:
        try:
            stored = json.load(f)
        except ValueError as e:  # json's decode errors (and bad UTF-8) are ValueErrors
            raise _corrupt(config_path, "the CLIP's architecture as JSON", e) from e
    config = CLIPConfig.from_dict(stored).replace(**config_overrides)
    with open(params_path, "rb") as f:
        try:
            params = serialization.msgpack_restore(f.read())
        except (ValueError, TypeError) as e:  # msgpack's errors for a cut or overwritten file
            raise _corrupt(params_path, "the CLIP's float32 parameters (msgpack)", e) from e
    if not isinstance(params, dict):
        raise _corrupt(params_path, "the CLIP's float32 parameters (msgpack)",
                       f"it holds a {type(params).__name__}, not a parameter tree")
    check_tree(params, abstract_params(config), source=path)
    return config, params


def _corrupt(path: str, holds: str, error) -> ValueError:
    """The error of a CLIP file that cannot be decoded: its path, what it holds, the fix."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ValueError(
        f"{path} is truncated or corrupt ({reason}): it should hold "
        f"{holds}; write the checkpoint again with `python -m dpc_jax.convert SOURCE "
        f"{os.path.dirname(path)}` (SOURCE: the CLIP it was converted from)")


def check_tree(params, expected, source: str = "checkpoint") -> None:
    """Raise with the missing, unexpected and mis-shaped keys if `params` does not fit `expected`."""
    flat, want = flatten(params), flatten(expected)
    missing = sorted(set(want) - set(flat))
    unexpected = sorted(set(flat) - set(want))
    misshaped = sorted(f"{k}: got {tuple(np.shape(flat[k]))}, expected {tuple(want[k].shape)}"
                       for k in set(want) & set(flat)
                       if tuple(np.shape(flat[k])) != tuple(want[k].shape))
    if missing or unexpected or misshaped:
        raise ValueError(
            f"parameters from {source} do not fit the CLIP architecture:\n"
            f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n"
            f"  mis-shaped keys: {misshaped}")
