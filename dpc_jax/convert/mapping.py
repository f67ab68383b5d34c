"""Key-by-key mapping between an external state dict and dpc_jax's CLIP parameter tree.

A layout is a list of `Entry`s, one per parameter of ours; each names the external key(s) it is
made of and how (axis permutation; q/k/v pieces concatenated). The same layout drives import,
export and the shape check, so the two directions cannot drift apart. Import checks the external
names and shapes against the layout (errors use the external names, which is what a user has in
hand) and then the resulting tree against `abstract_params(config)` (STYLE rule 8).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from dpc_jax.models.checkpoint import check_tree
from dpc_jax.models.clip import CLIPConfig, abstract_params
from dpc_jax.tree import flatten, unflatten

_MAX_LISTED = 40  # keys listed per category in an error; a wrong file would list thousands


def _contiguous(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn the 0-d logit_scale into shape (1,).
    return np.array(a, order="C")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter of ours (`path`, '/'-separated) made of the external `keys`.

    Each external array is permuted by `perm` (None: kept) and, when there are several keys, the
    pieces are concatenated along `concat_axis` of our array (q, k, v -> in_proj).
    """

    path: str
    keys: tuple
    perm: Optional[tuple] = None
    concat_axis: int = -1

    def to_ours(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        pieces = [a if self.perm is None else np.transpose(a, self.perm) for a in arrays]
        if len(pieces) == 1:
            return pieces[0] if self.perm is None else _contiguous(pieces[0])
        return np.concatenate(pieces, axis=self.concat_axis)

    def to_theirs(self, x: np.ndarray) -> list:
        pieces = np.split(x, len(self.keys), axis=self.concat_axis) if len(self.keys) > 1 else [x]
        inverse = None if self.perm is None else tuple(np.argsort(self.perm))
        return [_contiguous(p if inverse is None else np.transpose(p, inverse))
                for p in pieces]

    def their_shapes(self, our_shape: tuple) -> list:
        shape = list(our_shape)
        if len(self.keys) > 1:
            axis = self.concat_axis % len(shape)
            shape[axis] //= len(self.keys)
        if self.perm is not None:
            shape = [shape[i] for i in np.argsort(self.perm)]
        return [tuple(shape)] * len(self.keys)


# Tracing the model for its shapes takes seconds at ViT-L; import and export each need them.
_abstract_params = functools.lru_cache(maxsize=8)(abstract_params)


def _listing(items: list) -> str:
    if len(items) <= _MAX_LISTED:
        return repr(items)
    return f"{items[:_MAX_LISTED]!r} ... and {len(items) - _MAX_LISTED} more"


def mismatch_error(source: str, missing: list, unexpected: list, misshaped: list,
                   what: str) -> ValueError:
    return ValueError(
        f"{source} does not fit the CLIP architecture {what}:\n"
        f"  missing keys: {_listing(sorted(missing))}\n"
        f"  unexpected keys: {_listing(sorted(unexpected))}\n"
        f"  mis-shaped keys: {_listing(sorted(misshaped))}")


def as_float32(value, key: str) -> np.ndarray:
    """A float32 numpy copy of an array-like state-dict value (fp16/bf16 checkpoints widen)."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # e.g. a nested dict or a torch bf16 tensor
        raise TypeError(f"value of key {key!r} is a {type(value).__name__}, not an array") from e
    if arr.dtype.kind not in "fiub" and arr.dtype.name != "bfloat16":
        raise TypeError(f"value of key {key!r} has dtype {arr.dtype}; expected a numeric array")
    return np.asarray(arr, dtype=np.float32)


def import_params(state_dict: Mapping[str, object], layout: Iterable[Entry], config: CLIPConfig,
                  source: str, ignore: Callable[[str], bool] = lambda key: False) -> dict:
    """Our float32 parameter tree from `state_dict`, or a ValueError listing every misfit."""
    layout = list(layout)
    expected = flatten(_abstract_params(config))
    want = {}
    for entry in layout:
        for key, shape in zip(entry.keys, entry.their_shapes(expected[entry.path].shape)):
            want[key] = shape
    got = {k: tuple(np.shape(v)) for k, v in state_dict.items() if not ignore(k)}
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    misshaped = [f"{k}: got {got[k]}, expected {want[k]}" for k in want
                 if k in got and got[k] != want[k]]
    if missing or unexpected or misshaped:
        raise mismatch_error(source, missing, unexpected, misshaped, _describe(config))
    flat = {e.path: e.to_ours([as_float32(state_dict[k], k) for k in e.keys]) for e in layout}
    params = unflatten(flat)
    # The layout is ours; this guards it against drifting from the Flax module.
    check_tree(params, _abstract_params(config), source=source)
    return params


def export_params(params, layout: Iterable[Entry], config: CLIPConfig) -> dict:
    """External state dict {key: float32 np.ndarray}; the exact inverse of `import_params`."""
    check_tree(params, _abstract_params(config), source="the parameters to export")
    flat = flatten(params)
    out = {}
    for entry in layout:
        for key, arr in zip(entry.keys, entry.to_theirs(np.asarray(flat[entry.path], np.float32))):
            out[key] = arr
    return out


def _describe(config: CLIPConfig) -> str:
    return (f"(ViT: width {config.vision_width}, {config.vision_layers} layers, patch "
            f"{config.vision_patch_size}, resolution {config.image_resolution}; text: width "
            f"{config.transformer_width}, {config.transformer_layers} layers, vocab "
            f"{config.vocab_size}, context {config.context_length}; embed {config.embed_dim})")
