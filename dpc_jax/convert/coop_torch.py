"""PyTorch CoOp checkpoints (Dassl `prompt_learner/model.pth.tar-N`) -> context vectors.

Used to start DPC's stage 2 from a stage-1 prompt trained by the PyTorch code
(`config.backbone.init_from`). The files are read and written by `dpc_jax.convert.torch_files`
(restricted unpickler, state dict only). torch is imported only when such a file is read.
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import numpy as np

from dpc_jax.convert.torch_files import (not_float, read_dassl_state_dict, read_state_dict,
                                         tensor_as_float32, write_dassl_checkpoint)


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
    ctx = tensor_as_float32(ctx)
    if expected_shape is not None and tuple(ctx.shape) != tuple(expected_shape):
        raise ValueError(f"{path!r}: state_dict[{key!r}] has shape {tuple(ctx.shape)}; expected "
                         f"{tuple(expected_shape)} ([classes,] n_ctx, text width)")
    return ctx


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
    state = read_state_dict(path, "CoCoOp checkpoint",
                            "<output_dir>/prompt_learner/model.pth.tar-10")
    return cocoop_from_state_dict(state, path, expected)


def cocoop_from_state_dict(state: dict, path: str, expected: dict, prefix: str = "") -> dict:
    """The CoCoOp prompt of a state dict whose CoCoOp keys carry `prefix` ('' for the plain
    CoCoOp trainer's prompt-learner file, 'prompt_learner.' inside DePT-CoCoOp's whole-model
    file); see `load_cocoop_torch_checkpoint`."""
    from dpc_jax import tree as tree_lib

    keys = {prefix + key: target for key, target in COCOOP_KEYS.items()}
    missing = [k for k in keys if k not in state]
    flat, misshaped = {}, []
    for key, (leaf, transposed) in keys.items():
        if key in missing:
            continue
        value = state[key]
        if not_float(key, value):
            misshaped.append(f"{key}: a {type(value).__name__}, expected a float tensor")
            continue
        array = tensor_as_float32(value)
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
