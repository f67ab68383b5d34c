"""The PyTorch prompt checkpoints' common ground: the Dassl file reader and writer, and the key
checks, mismatch lines and float32 casts of every prompt converter (coop_torch, vlp_torch,
promptkd_torch, dept_torch), so that their files are read alike and their errors read alike.

torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import types
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# Globals a Dassl checkpoint may hold that are safe to build: tensors and plain containers.
# Anything else (the pickled optimizer and LR-scheduler objects Dassl stores beside the state
# dict) is replaced by an inert stand-in, so loading neither imports nor runs foreign code and
# does not need dassl installed.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
} | {(module, name) for module in ("builtins", "__builtin__")  # protocol 2 says __builtin__
     for name in ("dict", "list", "tuple", "set", "frozenset")}


class _Opaque:
    """Stand-in for a pickled object of a class that is not loaded (accepts any state)."""

    source = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)

    def __repr__(self):
        return f"<unloaded {self.source}>"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        return type(name, (_Opaque,), {"source": f"{module}.{name}"})


def _restricted_pickle_module() -> types.ModuleType:
    module = types.ModuleType("dpc_jax_restricted_pickle")
    module.Unpickler = _RestrictedUnpickler
    module.load = lambda f, **kwargs: _RestrictedUnpickler(f, **kwargs).load()
    return module


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def read_dassl_state_dict(path: str, what: str, example: str) -> dict:
    """The 'state_dict' of a Dassl checkpoint file, opened with the restricted unpickler.

    `what` names the checkpoint in errors ("CoOp checkpoint"), `example` is a path of the usual
    form, shown when the file does not exist. Only the state dict is returned; the optimizer and
    scheduler entries are read as inert stand-ins and dropped. Keys and values are returned as
    stored (no renaming, no cast).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; expected a Dassl checkpoint "
                                f"such as {example}")
    import torch  # only needed to read PyTorch files

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False,
                                pickle_module=_restricted_pickle_module())
    except Exception as e:  # noqa: BLE001 -- report which file could not be read, and why
        raise ValueError(f"could not read {path!r} as a PyTorch checkpoint: {e}") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path!r} is not a Dassl checkpoint: expected a dict with 'state_dict'; "
                         f"found {found}")
    state_dict = checkpoint["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path!r}: 'state_dict' is a {type(state_dict).__name__}; expected a "
                         f"dict of tensors")
    return state_dict


def strip_module(state_dict: Mapping, path: str) -> dict:
    """Keys without DataParallel's leading 'module.'."""
    out = {}
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name in out:
            raise ValueError(f"{path!r}: state_dict holds both {name!r} and 'module.{name}'")
        out[name] = value
    return out


def read_state_dict(path: str, what: str, example: str) -> dict:
    """`read_dassl_state_dict`, its keys without DataParallel's leading 'module.'."""
    return strip_module(read_dassl_state_dict(path, what, example), path)


def write_dassl_checkpoint(state_dict, path: str, epoch: int) -> str:
    """torch.save({'state_dict', 'epoch', 'optimizer': None, 'scheduler': None, 'val_result':
    None}) at `path`, the dict Dassl's `save_model` writes (no optimizer state: a model to
    evaluate or start from, not a point to resume). Written to a temporary file in the same
    folder and renamed, so a crash never leaves a partial checkpoint; parent folders are
    created. Returns `path`."""
    import torch  # only needed to write PyTorch files

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                   suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"state_dict": state_dict, "epoch": int(epoch), "optimizer": None,
                        "scheduler": None, "val_result": None}, f)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


def tensor_as_float32(tensor) -> np.ndarray:
    """A float32 numpy copy of a torch tensor read from a file (fp16 widens exactly)."""
    import torch

    return tensor.detach().to(torch.float32).cpu().numpy()


def leaf_from_tensors(state_dict: Mapping, keys: Sequence[str], deep: bool,
                      to_ours: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
    """One float32 leaf of ours from the tensors of its upstream `keys`, each passed through
    `to_ours` (e.g. a transpose) when given: stacked along a new leading axis when `deep` (one
    tensor per block), else the single key's."""
    arrays = [tensor_as_float32(state_dict[key]) for key in keys]
    if to_ours is not None:
        arrays = [to_ours(a) for a in arrays]
    return np.ascontiguousarray(np.stack(arrays) if deep else arrays[0], dtype=np.float32)


def tensor_of(array: np.ndarray):
    """A torch tensor of its own (C-ordered, not sharing `array`'s memory), dtype kept."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array).copy())


def widen_to_float32(value, what: str) -> np.ndarray:
    """`value` as a float32 numpy array to export: float32 as is, bf16/fp16 widened (exactly);
    any other dtype, float64 included (casting would round it), is a ValueError naming `what`."""
    array = np.asarray(value)
    if array.dtype == np.float32:
        return array
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise ValueError(f"{what} has dtype {array.dtype}; expected float32")
    if array.dtype.itemsize > 4:
        raise ValueError(f"{what} has dtype {array.dtype}; expected float32 (casting would "
                         f"round it)")
    return array.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Key checks and mismatch messages
# ----------------------------------------------------------------------------------------------


def natural_key(key: str):
    """Sort key that orders resblocks.10 after resblocks.9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def not_float(key: str, value) -> Optional[str]:
    """None for a floating-point tensor, else the line that reports `key` as not one."""
    import torch  # read_dassl_state_dict has imported it already

    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return None
    return f"{key}: {type(value).__name__}" + (
        f" {value.dtype}" if isinstance(value, torch.Tensor) else "")


def misshape_line(key: str, found: tuple, want: tuple, hints: Sequence[str],
                  values: Optional[Mapping[str, str]] = None) -> str:
    """The line of a mis-shaped key: its file and expected shapes and what sets each dimension
    that differs (`hints[d]`, followed by `values[hints[d]]` in parentheses when `values` is
    given); a rank mismatch names the rank."""
    if len(found) != len(want):
        return f"{key}: file {found}, expected {want} (a rank-{len(want)} tensor)"
    fields = dict.fromkeys(hints[d] if values is None else f"{hints[d]} ({values[hints[d]]})"
                           for d in range(len(want)) if found[d] != want[d])
    return f"{key}: file {found}, expected {want} (set by {', '.join(fields)})"


def tensor_problems(state_dict: Mapping, wanted: Mapping[str, Tuple[tuple, Sequence[str]]],
                    values: Optional[Mapping[str, str]] = None) -> Tuple[List[str], List[str]]:
    """(mis-shaped, not floating-point) lines of the keys of `wanted` (key -> (upstream shape,
    what sets each dimension)) that `state_dict` holds; see `misshape_line` for `values`."""
    misshaped, not_tensor = [], []
    for key, (want, hints) in wanted.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        problem = not_float(key, value)
        if problem:
            not_tensor.append(problem)
        elif tuple(value.shape) != tuple(want):
            misshaped.append(misshape_line(key, tuple(value.shape), tuple(want), hints, values))
    return misshaped, not_tensor


def key_problem_lines(missing, unexpected, misshaped, not_tensor) -> List[str]:
    """The lines of a checkpoint mismatch message that list its key problems."""
    lines = []
    if missing:
        lines.append(f"  missing keys: {missing}")
    if unexpected:
        lines.append(f"  unexpected prompt keys: {unexpected}")
    if misshaped:
        lines.append("  mis-shaped keys:")
        lines.extend(f"    {line}" for line in misshaped)
    if not_tensor:
        lines.append(f"  keys that are not floating-point tensors: {not_tensor}")
    return lines


def flat_shapes(tree: Mapping, prefix: str = "") -> Dict[str, tuple]:
    """{'a/b': shape} of a flat or nested map whose leaves are shapes or have `.shape`."""
    out = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(flat_shapes(value, path + "/"))
        else:
            out[path] = tuple(value.shape) if hasattr(value, "shape") else tuple(value)
    return out
