"""PyTorch CoOp checkpoints (Dassl `prompt_learner/model.pth.tar-N`) -> context vectors.

Used to start DPC's stage 2 from a stage-1 prompt trained by the PyTorch code
(`config.backbone.init_from`). `read_dassl_state_dict` is the one Dassl-file reader (restricted
unpickler, state dict only), also used by `dpc_jax.convert.vlp_torch` for IVLP, PromptSRC and
MaPLe. torch is imported only when such a file is read.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import types
from typing import Optional, Sequence

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


def read_dassl_state_dict(path: str, what: str, example: str) -> dict:
    """The 'state_dict' of a Dassl checkpoint file, opened with the restricted unpickler.

    Shared by the CoOp and the IVLP/PromptSRC/MaPLe readers. `what` names the checkpoint in
    errors ("CoOp checkpoint"), `example` is a path of the usual form, shown when the file does
    not exist. Only the state dict is returned; the optimizer and scheduler entries are read as
    inert stand-ins and dropped. Keys and values are returned as stored (no renaming, no cast).
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


def load_coop_torch_checkpoint(path: str, key: str = "ctx",
                               expected_shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """The context vectors (float32) of a PyTorch CoOp checkpoint.

    `path`: a Dassl `prompt_learner/model.pth.tar-N` file (torch.save of a dict whose
    'state_dict' holds 'ctx' and the token_prefix/token_suffix buffers, beside pickled optimizer
    and scheduler objects, which are not loaded). fp16 contexts (CoOp's default precision) are
    cast to float32. `expected_shape`, when given, is checked.
    """
    state_dict = read_dassl_state_dict(
        path, "CoOp checkpoint", "<output_dir>/prompt_learner/model.pth.tar-50")
    import torch  # read_dassl_state_dict has imported it already

    if key not in state_dict:
        raise ValueError(f"{path!r}: state_dict has no {key!r} (the CoOp context); found keys "
                         f"{sorted(state_dict)}")
    ctx = state_dict[key]
    if not isinstance(ctx, torch.Tensor):
        raise ValueError(f"{path!r}: state_dict[{key!r}] is a {type(ctx).__name__}; expected a "
                         f"tensor")
    ctx = ctx.detach().to(torch.float32).cpu().numpy()
    if expected_shape is not None and tuple(ctx.shape) != tuple(expected_shape):
        raise ValueError(f"{path!r}: state_dict[{key!r}] has shape {tuple(ctx.shape)}; expected "
                         f"{tuple(expected_shape)} ([classes,] n_ctx, text width)")
    return ctx


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


def export_coop_torch_checkpoint(ctx, path: str, epoch: int) -> str:
    """Write CoOp context vectors as the upstream `prompt_learner/model.pth.tar-<epoch>`:
    state_dict {'ctx'} (float32; [n_ctx, W], or [classes, n_ctx, W] with class-specific
    contexts). Upstream also saves its token_prefix/token_suffix buffers, but its load_model
    deletes them before load_state_dict(strict=False), so the file loads there as one it wrote
    (the buffers stay the ones the model builds from its own class names)."""
    import collections

    import torch

    array = np.array(ctx, np.float32, order="C")
    if array.ndim not in (2, 3):
        raise ValueError(f"CoOp context of shape {array.shape}; expected [n_ctx, width] or "
                         f"[classes, n_ctx, width]")
    return write_dassl_checkpoint(collections.OrderedDict(ctx=torch.from_numpy(array)), path,
                                  epoch)


# CoCoOp (`prompt_learner/model.pth.tar-N`, no prefix): upstream key -> (leaf, transposed).
COCOOP_KEYS = {"ctx": ("ctx", False),
               "meta_net.linear1.weight": ("meta_net/linear1/kernel", True),
               "meta_net.linear1.bias": ("meta_net/linear1/bias", False),
               "meta_net.linear2.weight": ("meta_net/linear2/kernel", True),
               "meta_net.linear2.bias": ("meta_net/linear2/bias", False)}


def load_cocoop_torch_checkpoint(path: str, expected: dict) -> dict:
    """The CoCoOp prompt {'ctx', 'meta_net': {'linear1', 'linear2': {'kernel', 'bias'}}}
    (float32 numpy; Linear weights [out, in] -> kernels [in, out]) of a PyTorch checkpoint.
    `expected`: leaf path -> shape; a mismatch lists the missing and mis-shaped keys. The
    token_prefix/token_suffix buffers are ignored; a leading 'module.' is stripped."""
    raw = read_dassl_state_dict(path, "CoCoOp checkpoint",
                                "<output_dir>/prompt_learner/model.pth.tar-10")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()}
    return cocoop_from_state_dict(state, path, expected)


def cocoop_from_state_dict(state: dict, path: str, expected: dict, prefix: str = "") -> dict:
    """The CoCoOp prompt of a state dict whose CoCoOp keys carry `prefix` ('' for the plain
    CoCoOp trainer's prompt-learner file, 'prompt_learner.' inside DePT-CoCoOp's whole-model
    file); see `load_cocoop_torch_checkpoint`."""
    import torch  # read_dassl_state_dict has imported it already

    from dpc_jax import tree as tree_lib

    keys = {prefix + key: target for key, target in COCOOP_KEYS.items()}
    missing = [k for k in keys if k not in state]
    flat, misshaped = {}, []
    for key, (leaf, transposed) in keys.items():
        if key in missing:
            continue
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            misshaped.append(f"{key}: a {type(value).__name__}, expected a float tensor")
            continue
        array = value.detach().to(torch.float32).cpu().numpy()
        array = array.T if transposed else array
        if tuple(array.shape) != tuple(expected[leaf]):
            want = tuple(expected[leaf])[::-1] if transposed else tuple(expected[leaf])
            misshaped.append(f"{key}: file {tuple(value.shape)}, expected {want}")
            continue
        flat[leaf] = np.ascontiguousarray(array, np.float32)
    if missing or misshaped:
        found = sorted(k for k in state if k.startswith(prefix)) if prefix else sorted(state)
        raise ValueError(f"{path!r} does not fit the CoCoOp prompt of this configuration "
                         f"(n_ctx, CLIP text width and embed dim set the shapes): missing keys "
                         f"{missing}; mis-shaped keys {misshaped}; found keys {found}")
    return tree_lib.unflatten(flat)


def cocoop_state_dict(prompt: dict, prefix: str = "") -> "collections.OrderedDict":
    """The upstream keys (float32 torch tensors, `prefix` + COCOOP_KEYS) of a CoCoOp prompt."""
    import collections

    import torch

    from dpc_jax import tree as tree_lib

    flat = tree_lib.flatten(prompt)
    state = collections.OrderedDict()
    for key, (leaf, transposed) in COCOOP_KEYS.items():
        if leaf not in flat:
            raise ValueError(f"the CoCoOp prompt has no {leaf!r} leaf; found {sorted(flat)}")
        array = np.asarray(flat[leaf], np.float32)
        state[prefix + key] = torch.from_numpy(np.array(array.T if transposed else array,
                                                        np.float32, order="C"))
    return state


def export_cocoop_torch_checkpoint(prompt: dict, path: str, epoch: int) -> str:
    """Write a CoCoOp prompt as the upstream `prompt_learner/model.pth.tar-<epoch>` (its keys
    only, float32; upstream's load_state_dict(strict=False) keeps its prefix/suffix buffers)."""
    return write_dassl_checkpoint(cocoop_state_dict(prompt), path, epoch)
