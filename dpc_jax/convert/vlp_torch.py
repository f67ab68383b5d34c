"""PyTorch IVLP, PromptSRC and MaPLe stage-1 checkpoints <-> dpc_jax prompt pytrees.

Import starts DPC's stage 2 (or an evaluation) from a prompt trained by the PyTorch code; export
writes a prompt trained here as a file the upstream trainers load.
docs/reference/backbones.md#common-ground and #pytorch-checkpoints give the layout; torch is
imported only inside the functions that read or write a file.

    load_vlp_torch_checkpoint(path, kind, expected) -> prompt
    export_vlp_torch_checkpoint(prompt, path, kind, epoch) -> path
    expected_prompt_shapes(kind, n_ctx, text_width, depth, ...) -> expected
    upstream_checkpoint_path(run_dir, kind, epoch) -> path

`kind` is 'ivlp' (also PromptSRC, whose learner and file layout are IVLP's) or 'maple'. Prompts
are nested dicts of float32 arrays (deep index k holds the prompt of block k+1):

    ivlp:  ctx [n, W_t], text_deep [J_t-1, n, W_t], vision_ctx [n_v, W_v],
           vision_deep [J_v-1, n_v, W_v]
           (text_deep absent when J_t == 1; vision_* absent when J_v == 0, vision_deep
           when J_v == 1)
    maple: ctx [n, W_t], text_deep [J-1, n, W_t], couple0 {kernel [W_t, W_v], bias [W_v]},
           couple_deep {kernel [J-1, W_t, W_v], bias [J-1, W_v]}
           (text_deep and couple_deep absent when J == 1)

Upstream keys (P = 'prompt_learner.', R(i) = f'transformer.resblocks.{i}.VPT_shallow'):

    ivlp:  P+'ctx' -> ctx; 'text_encoder.'+R(i) -> text_deep[i-1];
           'image_encoder.VPT' -> vision_ctx; 'image_encoder.'+R(i) -> vision_deep[i-1]
    maple: P+'ctx' -> ctx; P+f'compound_prompts_text.{k}' -> text_deep[k];
           P+'proj.weight' / '.bias' -> couple0 kernel (transposed) / bias;
           P+f'compound_prompt_projections.{k}.weight' / '.bias' -> couple_deep kernel[k]
           (transposed) / bias[k]

A stage-1 file holds the whole model: the frozen CLIP copies (image_encoder.*, text_encoder.*,
token_embedding, logit_scale, PromptSRC's P+'ZS_image_encoder.*') and the token_prefix/suffix
buffers are ignored, never reported. Reading strips a leading 'module.' (DataParallel) and casts
to float32 (upstream stores ctx and MaPLe's layer-0 map in fp16). The file's depths and widths
are checked against `expected`, the shapes the learner's config implies: a mismatch raises one
ValueError listing the missing, unexpected (prompt-like keys the config does not have, e.g. a
deeper VPT_shallow, or the other method's keys) and mis-shaped keys, with the config field that
sets each dimension.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from dpc_jax import tree as tree_lib
from dpc_jax.convert.torch_files import (flat_shapes, key_problem_lines, leaf_from_tensors,
                                         natural_key, read_state_dict, tensor_of,
                                         tensor_problems, widen_to_float32,
                                         write_dassl_checkpoint)

KINDS = ("ivlp", "maple")
P = "prompt_learner."

# Dassl's folder of the saved model (the name of the trainer's registered module) per kind.
MODEL_DIRS = {"ivlp": "VLPromptLearner", "maple": "MultiModalPromptLearner"}
_NAMES = {"ivlp": "IVLP/PromptSRC", "maple": "MaPLe"}
_A = {"ivlp": "an IVLP/PromptSRC", "maple": "a MaPLe"}

# What sets each dimension of an upstream tensor, for mis-shape messages.
_TEXT = ("the text n_ctx", "the CLIP text width (transformer_width)")
_VISION = ("the vision n_ctx", "the CLIP vision width (vision_width)")
_PROJ_WEIGHT = ("the CLIP vision width (vision_width)", "the CLIP text width (transformer_width)")
_PROJ_BIAS = ("the CLIP vision width (vision_width)",)

_RESBLOCK = "_encoder.transformer.resblocks.{}.VPT_shallow"

# Per leaf: (upstream key, or for a deep leaf the key format of upstream index i, transposed,
# what sets each dimension of one upstream tensor). Deep index k is upstream index k + offset:
# IVLP names its deep prompts by block (1..J-1), MaPLe's lists count from 0.
_LAYOUTS = {
    "ivlp": {
        "ctx": (P + "ctx", False, _TEXT),
        "text_deep": ("text" + _RESBLOCK, False, _TEXT),
        "vision_ctx": ("image_encoder.VPT", False, _VISION),
        "vision_deep": ("image" + _RESBLOCK, False, _VISION),
    },
    "maple": {
        "ctx": (P + "ctx", False, _TEXT),
        "text_deep": (P + "compound_prompts_text.{}", False, _TEXT),
        "couple0/kernel": (P + "proj.weight", True, _PROJ_WEIGHT),
        "couple0/bias": (P + "proj.bias", False, _PROJ_BIAS),
        "couple_deep/kernel": (P + "compound_prompt_projections.{}.weight", True, _PROJ_WEIGHT),
        "couple_deep/bias": (P + "compound_prompt_projections.{}.bias", False, _PROJ_BIAS),
    },
}
_OFFSETS = {"ivlp": 1, "maple": 0}
# The rank of each leaf (deep leaves stack one tensor per block along a leading axis).
_RANKS = {"ctx": 2, "text_deep": 3, "vision_ctx": 2, "vision_deep": 3, "couple0/kernel": 2,
          "couple0/bias": 1, "couple_deep/kernel": 3, "couple_deep/bias": 2}
_REQUIRED = {"ivlp": ("ctx",), "maple": ("ctx", "couple0/kernel", "couple0/bias")}
# Leaves that exist only together (a deep vision prompt needs the layer-0 one; MaPLe couples
# every deep text prompt to its own map).
_TOGETHER = {"ivlp": [("vision_deep", "vision_ctx")],
             "maple": [("text_deep", "couple_deep/kernel"),
                       ("couple_deep/kernel", "couple_deep/bias"),
                       ("couple_deep/bias", "text_deep")]}
# The config value that sets the number of deep blocks of a leaf, for depth messages.
_DEPTH_FIELDS = {"ivlp": {"text_deep": "the text prompt depth",
                          "vision_deep": "the vision prompt depth"},
                 "maple": {"text_deep": "the prompt depth",
                           "couple_deep/kernel": "the prompt depth"}}


def _key_pattern(key_format: str) -> "re.Pattern":
    """The regex of a deep leaf's upstream keys, capturing the upstream index."""
    head, tail = key_format.split("{}")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


def _deep_key(kind: str, leaf: str, k: int) -> str:
    return _LAYOUTS[kind][leaf][0].format(k + _OFFSETS[kind])


# Prompt-like keys of each layout. A key of neither is a frozen copy or a buffer, ignored.
_PROMPT_KEYS = {kind: [_key_pattern(key) if "{}" in key else re.compile(re.escape(key))
                       for key, _, _ in layout.values() if key != P + "ctx"]
                for kind, layout in _LAYOUTS.items()}
_SHARED_KEYS = (P + "ctx",)
_EXAMPLES = {"ivlp": 20, "maple": 5}  # the usual last epoch, for the example path in errors


def upstream_checkpoint_path(run_dir: str, kind: str, epoch: int) -> str:
    """Where the upstream trainer saves (and its `load_model` looks for) epoch `epoch` (1-based):
    `<run_dir>/VLPromptLearner/model.pth.tar-<epoch>` (ivlp) or
    `<run_dir>/MultiModalPromptLearner/model.pth.tar-<epoch>` (maple)."""
    _check_kind(kind)
    return os.path.join(run_dir, MODEL_DIRS[kind], f"model.pth.tar-{int(epoch)}")


def expected_prompt_shapes(kind: str, n_ctx: int, text_width: int, depth: int,
                           vision_n_ctx: Optional[int] = None,
                           vision_width: Optional[int] = None,
                           vision_depth: Optional[int] = None) -> Dict[str, Tuple[int, ...]]:
    """The `expected` map of `load_vlp_torch_checkpoint` for a learner's configuration.

    ivlp: `depth` is the text prompt depth J_t >= 1, `vision_depth` J_v >= 0 (0: no visual
    prompts; then `vision_n_ctx` and `vision_width` are not needed). maple: one depth J >= 1 and
    n = n_ctx on both sides; `vision_width` is required and the vision_* counts are not used.
    """
    _check_kind(kind)
    if depth < 1:
        raise ValueError(f"{_NAMES[kind]} prompt depth {depth}: expected >= 1 (the layer-0 text "
                         f"context is always learned)")
    shapes = {"ctx": (n_ctx, text_width)}
    if kind == "ivlp":
        if depth > 1:
            shapes["text_deep"] = (depth - 1, n_ctx, text_width)
        vision_depth = 0 if vision_depth is None else vision_depth
        if vision_depth < 0:
            raise ValueError(f"IVLP vision prompt depth {vision_depth}: expected >= 0")
        if vision_depth:
            if vision_n_ctx is None or vision_width is None:
                raise ValueError("IVLP with vision prompts (vision_depth >= 1) needs "
                                 "vision_n_ctx and vision_width")
            shapes["vision_ctx"] = (vision_n_ctx, vision_width)
            if vision_depth > 1:
                shapes["vision_deep"] = (vision_depth - 1, vision_n_ctx, vision_width)
        return shapes
    if vision_width is None:
        raise ValueError("MaPLe needs vision_width (its coupling maps are W_t -> W_v)")
    shapes["couple0/kernel"] = (text_width, vision_width)
    shapes["couple0/bias"] = (vision_width,)
    if depth > 1:
        shapes["text_deep"] = (depth - 1, n_ctx, text_width)
        shapes["couple_deep/kernel"] = (depth - 1, text_width, vision_width)
        shapes["couple_deep/bias"] = (depth - 1, vision_width)
    return shapes


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def load_vlp_torch_checkpoint(path: str, kind: str, expected: Mapping) -> dict:
    """The prompt (nested dict of float32 numpy arrays) of an upstream stage-1 checkpoint.

    `path`: a Dassl file such as `<run>/VLPromptLearner/model.pth.tar-20` (ivlp, PromptSRC) or
    `<run>/MultiModalPromptLearner/model.pth.tar-5` (maple). `expected`: leaf path -> shape,
    flat ('couple0/kernel': (W_t, W_v)) or nested, shapes as tuples or anything with `.shape`
    (e.g. `jax.eval_shape` of the learner's init); `expected_prompt_shapes` builds it from the
    config. Raises FileNotFoundError for a missing file and ValueError for a file that is not a
    Dassl checkpoint or does not fit `expected` (all missing, unexpected and mis-shaped keys
    listed at once).
    """
    _check_kind(kind)
    expected = _check_expected(flat_shapes(expected), kind, "expected")
    example = upstream_checkpoint_path("<run>", kind, _EXAMPLES[kind])
    state_dict = read_state_dict(path, f"{_NAMES[kind]} checkpoint", example)

    wanted = _upstream_entries(kind, expected)  # upstream key -> (leaf, index, transposed, hints)
    prompt_like = {key for key in state_dict if _prompt_layout(key)}
    missing = sorted((key for key in wanted if key not in state_dict), key=natural_key)
    unexpected = sorted(prompt_like - set(wanted), key=natural_key)
    misshaped, not_tensor = tensor_problems(state_dict, {
        key: (_upstream_shape(expected[leaf], index is not None, transposed), hints)
        for key, (leaf, index, transposed, hints) in wanted.items()})
    if missing or unexpected or misshaped or not_tensor:
        raise ValueError(_mismatch_message(path, kind, expected, state_dict, missing, unexpected,
                                           misshaped, not_tensor))

    flat = {}
    for leaf in expected:
        keys = [key for key, entry in wanted.items() if entry[0] == leaf]  # in index order
        # torch Linear [out, in] -> flax kernel [in, out]
        to_ours = (lambda a: a.T) if _LAYOUTS[kind][leaf][1] else None
        flat[leaf] = leaf_from_tensors(state_dict, keys, _is_deep(kind, leaf), to_ours)
    return tree_lib.unflatten(flat)


def _upstream_entries(kind: str, expected: Mapping[str, tuple]) -> Dict[str, tuple]:
    """Upstream key -> (leaf, deep index or None, transposed, dimension hints) of `expected`."""
    entries = {}
    for leaf, shape in expected.items():
        key, transposed, hints = _LAYOUTS[kind][leaf]
        if _is_deep(kind, leaf):
            for k in range(shape[0]):
                entries[_deep_key(kind, leaf, k)] = (leaf, k, transposed, hints)
        else:
            entries[key] = (leaf, None, transposed, hints)
    return entries


def _upstream_shape(leaf_shape: tuple, deep: bool, transposed: bool) -> tuple:
    shape = tuple(leaf_shape[1:] if deep else leaf_shape)
    return shape[::-1] if transposed else shape


def _prompt_layout(key: str) -> Optional[str]:
    """'ivlp', 'maple' or 'shared' for a prompt-like key; None for frozen copies and buffers."""
    if key in _SHARED_KEYS:
        return "shared"
    for kind, patterns in _PROMPT_KEYS.items():
        if any(p.fullmatch(key) for p in patterns):
            return kind
    return None


def _looks_like(state_dict: Mapping) -> str:
    """A description of the layout of a file's prompt keys."""
    layouts = {_prompt_layout(key) for key in state_dict} - {None}
    methods = sorted(layouts - {"shared"})
    if len(methods) == 1:
        return f"{_A[methods[0]]} checkpoint"
    if methods:
        return f"a mix of {' and '.join(_NAMES[k] for k in methods)} keys"
    if "shared" in layouts:
        return "an IVLP checkpoint with only the layer-0 text context"
    if "ctx" in state_dict:
        return "a CoOp/CoCoOp prompt-learner checkpoint (unprefixed 'ctx')"
    return "no IVLP, PromptSRC or MaPLe checkpoint (no prompt keys)"


def _file_blocks(state_dict: Mapping, kind: str, leaf: str) -> List[int]:
    """The deep indices (k: block k+1) the file holds for one deep leaf of `kind`'s layout."""
    pattern = _key_pattern(_LAYOUTS[kind][leaf][0])
    return sorted(int(m.group(1)) - _OFFSETS[kind]
                  for m in map(pattern.fullmatch, state_dict) if m)


def _mismatch_message(path, kind, expected, state_dict, missing, unexpected, misshaped,
                      not_tensor) -> str:
    lines = [f"{path!r} does not fit the {_NAMES[kind]} prompt of this configuration; the file "
             f"looks like {_looks_like(state_dict)}:"]
    for leaf, field in _DEPTH_FIELDS[kind].items():
        found = _file_blocks(state_dict, kind, leaf)
        want = expected[leaf][0] if leaf in expected else 0
        if found != list(range(want)):
            blocks = (f"entries for blocks {[k + 1 for k in found]} (prompt depth "
                      f"{len(found) + 1})" if found else "no entries (prompt depth 1)")
            lines.append(f"  {leaf}: the file has {blocks}; the config expects prompt depth "
                         f"{want + 1} ({field})")
    return "\n".join(lines + key_problem_lines(missing, unexpected, misshaped, not_tensor))


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def to_upstream_state_dict(prompt: Mapping, kind: str) -> "collections.OrderedDict":
    """The upstream state dict (prompt keys only, float32 torch tensors) of a prompt pytree."""
    _check_kind(kind)
    flat = {}
    for leaf, value in tree_lib.flatten(prompt).items():
        flat[leaf] = widen_to_float32(value, f"prompt[{leaf!r}]")
    _check_expected({leaf: a.shape for leaf, a in flat.items()}, kind, "prompt")
    _check_consistent(flat, kind)
    state_dict = collections.OrderedDict()
    for leaf in _LAYOUTS[kind]:  # upstream order: layer 0 first, then block by block
        if leaf not in flat:
            continue
        key, transposed, _ = _LAYOUTS[kind][leaf]
        arrays = list(flat[leaf]) if _is_deep(kind, leaf) else [flat[leaf]]
        keys = ([_deep_key(kind, leaf, k) for k in range(len(arrays))] if _is_deep(kind, leaf)
                else [key])
        for name, array in zip(keys, arrays):
            state_dict[name] = tensor_of(array.T if transposed else array)
    return state_dict


def export_vlp_torch_checkpoint(prompt: Mapping, path: str, kind: str, epoch: int) -> str:
    """Write `prompt` as an upstream Dassl checkpoint at `path`; returns `path`.

    The file is `torch.save({'state_dict': <prompt keys only>, 'epoch': epoch, 'optimizer':
    None, 'scheduler': None, 'val_result': None})`, the layout Dassl's `save_model` writes
    (`epoch` is Dassl's stored, 1-based epoch; `upstream_checkpoint_path` gives the file name
    its `load_model` looks for). Upstream loads it with `load_state_dict(strict=False)`, which
    keeps the frozen CLIP weights and casts the float32 prompts to the model's dtype; the file
    holds no optimizer state, so it is a model to evaluate or to start DPC from, not a point
    to resume training. Written to a temporary file in the same folder, then renamed, so a
    crash never leaves a partial checkpoint; parent folders are created.
    """
    return write_dassl_checkpoint(to_upstream_state_dict(prompt, kind), path, epoch)


# ----------------------------------------------------------------------------------------------
# Checks and pytree helpers
# ----------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"prompt checkpoint kind {kind!r}: expected one of {list(KINDS)} "
                         f"('ivlp' also covers PromptSRC)")


def _is_deep(kind: str, leaf: str) -> bool:
    return "{}" in _LAYOUTS[kind][leaf][0]


def _check_expected(shapes: Mapping[str, tuple], kind: str, what: str) -> Dict[str, tuple]:
    """`shapes` (leaf -> shape) if its leaves and ranks are those of a `kind` prompt."""
    layout = _LAYOUTS[kind]
    unknown = sorted(set(shapes) - set(layout))
    if unknown:
        raise ValueError(f"{what} has leaves {unknown} that {_A[kind]} prompt does not have; "
                         f"expected leaves among {list(layout)}")
    absent = [leaf for leaf in _REQUIRED[kind] if leaf not in shapes]
    if absent:
        raise ValueError(f"{what} lacks the {_NAMES[kind]} leaves {absent}; it has "
                         f"{sorted(shapes)}")
    for leaf, partner in _TOGETHER[kind]:
        if leaf in shapes and partner not in shapes:
            raise ValueError(f"{what} has {leaf!r} but no {partner!r}; {_A[kind]} prompt "
                             f"has both or neither")
    out = {}
    for leaf, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if len(shape) != _RANKS[leaf]:
            raise ValueError(f"{what}[{leaf!r}] has shape {shape}; expected a rank-"
                             f"{_RANKS[leaf]} {_NAMES[kind]} leaf")
        if _is_deep(kind, leaf) and shape[0] < 1:
            raise ValueError(f"{what}[{leaf!r}] has shape {shape}: no deep blocks; leave the "
                             f"leaf out when the prompt depth is 1")
        out[leaf] = shape
    return out


def _check_consistent(flat: Mapping[str, np.ndarray], kind: str) -> None:
    """The shapes of one prompt agree with one (n, widths, depths), as upstream's model needs."""
    shapes = {leaf: a.shape for leaf, a in flat.items()}
    n, text_width = shapes["ctx"]
    depth = 1 + (shapes["text_deep"][0] if "text_deep" in shapes else 0)
    if kind == "ivlp":
        vision_n_ctx, vision_width = shapes.get("vision_ctx", (None, None))
        vision_depth = 0 if "vision_ctx" not in shapes else 1 + (
            shapes["vision_deep"][0] if "vision_deep" in shapes else 0)
        want = expected_prompt_shapes(kind, n, text_width, depth, vision_n_ctx, vision_width,
                                      vision_depth)
    else:
        want = expected_prompt_shapes(kind, n, text_width, depth,
                                      vision_width=shapes["couple0/kernel"][1])
    bad = [f"{leaf} {shapes[leaf]} (expected {want[leaf]})" for leaf in want
           if shapes.get(leaf) != want[leaf]]
    if bad:
        raise ValueError(f"the {_NAMES[kind]} prompt's leaves disagree with its ctx "
                         f"{shapes['ctx']} (n, text width) and with each other: {bad}")
