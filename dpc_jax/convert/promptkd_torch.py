"""PyTorch PromptKD student checkpoints <-> dpc_jax student prompt and BatchNorm state, and
PromptKD+DPC stage-2 checkpoints <-> DPC's parallel prompt and stage-2 BatchNorm state.

Import starts an evaluation or DPC's stage 2 from a student distilled by the released PromptKD
code; export writes a student trained here as a file its trainer loads
(docs/reference/backbones.md#promptkd, #pytorch-checkpoints).
The stage-2 pair does the same for the released StackSPLE_PromptKD trainer (JREion/DPC
trainers/sple_promptkd.py; layout below). torch is imported only inside the functions that read
or write a file.

    load_promptkd_student(path, expected) -> (prompt, state)
    export_promptkd_student(prompt, state, path, epoch, *, num_batches_tracked=0) -> path
    load_promptkd_dpc(path, expected) -> (parallel, state)
    export_promptkd_dpc(parallel, state, path, epoch, *, num_batches_tracked=0) -> path
    student_checkpoint_path(run_dir, epoch) -> path   (both trainers' VLPromptLearner/ name)

dpc_jax side (nested dicts of float32 numpy arrays; deep index k holds the prompt of block k+1):

    prompt = {'vision_ctx': [n_v, W_v],
              'vision_deep': [J-1, n_v, W_v]            (absent when J == 1),
              'projector': {'dense0': {'kernel': [E_s, E_t], 'bias': [E_t]},
                            'bn': {'scale': [E_t], 'bias': [E_t]},
                            'dense1': {'kernel': [E_t, E_t], 'bias': [E_t]}}}
    state = {'bn': {'mean': [E_t], 'var': [E_t]}}

Upstream keys (the student `CustomCLIP` saved whole under `VLPromptLearner/`; T =
'VPT_image_trans.conv1.', the projector `nn.Sequential(Conv2d(E_s, E_t, 1), BatchNorm2d(E_t),
ReLU, Conv2d(E_t, E_t, 1))`):

    'image_encoder.VPT'                                  [n_v, W_v]      -> vision_ctx
    f'image_encoder.transformer.resblocks.{i}.VPT_shallow' (i = 1..J-1)  -> vision_deep[i-1]
    T+'0.weight' [E_t, E_s, 1, 1], T+'0.bias' [E_t]      -> projector/dense0 kernel (transposed
                                                            [E_s, E_t]), bias
    T+'1.weight', T+'1.bias'                             -> projector/bn scale, bias
    T+'1.running_mean', T+'1.running_var'                -> state bn mean, var
    T+'1.num_batches_tracked' (int64)                    -> ignored on import
    T+'3.weight' [E_t, E_t, 1, 1], T+'3.bias' [E_t]      -> projector/dense1 kernel (transposed),
                                                            bias

The frozen CLIP tensors (image_encoder.* other than the prompts), logit_scale and, where a
version of the code saves them, text_encoder.* and prompt_learner.* (ctx, token_prefix/suffix,
token_prefix2/suffix2) are ignored, never reported. Reading strips a leading 'module.'
(DataParallel) and casts to float32: upstream stores the projector convs in fp16
(`convert_weights`), everything else in fp32, so the import is exact. A file that does not fit
`expected` raises one ValueError naming the file, what the file looks like (a student, an
IVLP/PromptSRC teacher, a MaPLe file, ...), the missing, unexpected and mis-shaped keys with
the found and expected shapes and the setting behind each dimension (n_ctx_vision, the student
vision width, depth_vision, the student embed dim E_s, the teacher embed dim E_t).

Export writes float32 everywhere, the projector convs included (upstream's `load_state_dict`
casts them to its fp16 parameters on load), so export followed by import is lossless.

Stage 2 (StackSPLE_PromptKD saves its whole `CustomSPLECLIP` under `VLPromptLearner/`): the
student keys above, with the BatchNorm statistics of stage 2 (the released stage 2 trains in
train mode and moves them; its base classes are evaluated with them), plus

    'prompt_learner.ctx' [n_t, W_t] (fp16 upstream)     -> parallel 'ctx': theta, the stored
                                                            weighted mix (reference mode,
                                                            docs/reference/method.md#modes)
    'prompt_learner.text_encoder.transformer.resblocks.{i}.VPT_shallow' (i = 1..J_t-1)
                                                        -> parallel 'text_deep'[i-1]
    'text_encoder.transformer.resblocks.{i}.VPT_shallow' -> the same tower under its second
                                                            name: checked equal, written too

`parallel` is reference mode's (the released parameterisation): the converse map
Q = (theta - (1-w_b)*P) / w_b of `DualPrompt` needs the stage-1 ctx P (the teacher's, not in
this file) and the w_b of the stage-2 run. Ignored: `clip_model.*` (the student CLIP again, with
the unused 512-wide text tower whose deep prompts the released code wrongly initialises),
frozen tensors, prefix/suffix buffers, logit_scale.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Dict, Mapping, Tuple

import numpy as np

from dpc_jax import tree as tree_lib
from dpc_jax.convert.torch_files import (flat_shapes, key_problem_lines, leaf_from_tensors,
                                         natural_key, read_state_dict, tensor_of,
                                         tensor_problems, widen_to_float32,
                                         write_dassl_checkpoint)
from dpc_jax.convert.vlp_torch import _looks_like

MODEL_DIR = "VLPromptLearner"  # the name the student trainer registers its model under
VPT = "image_encoder.VPT"
VPT_DEEP = "image_encoder.transformer.resblocks.{}.VPT_shallow"
TRANS = "VPT_image_trans."
CONV = TRANS + "conv1."
NUM_BATCHES = CONV + "1.num_batches_tracked"
# DPC's stage 2 (StackSPLE_PromptKD): the theta of the teacher-width text context and the deep
# prompts of the trainable teacher-width text tower, which the model registers twice (as
# prompt_learner.text_encoder and as text_encoder: one module, two names in the state dict).
TEXT_CTX = "prompt_learner.ctx"
TEXT_DEEP = "prompt_learner.text_encoder.transformer.resblocks.{}.VPT_shallow"
TEXT_DEEP_COPY = "text_encoder.transformer.resblocks.{}.VPT_shallow"
STAGE2_TOWER = "prompt_learner.text_encoder."  # only a stage-2 file has keys under it


def _pattern(key_format: str):
    return re.compile(re.escape(key_format).replace(r"\{\}", r"(\d+)"))


_DEEP_PATTERN = _pattern(VPT_DEEP)
_TEXT_DEEP_PATTERN = _pattern(TEXT_DEEP)
_COPY_PATTERN = _pattern(TEXT_DEEP_COPY)

# What sets each dimension of an upstream tensor, for mis-shape messages.
_N_V = "n_ctx_vision (config.backbone.n_ctx_vision)"
_W_V = "the student CLIP vision width (vision_width)"
_E_S = "the student embed dim E_s (the student CLIP's embed_dim)"
_E_T = "the teacher embed dim E_t (the teacher CLIP's embed_dim, config.backbone.teacher_clip)"
_K = "the 1x1 conv kernel"
_N_T = "the teacher's n_ctx_text (config.backbone.teacher.n_ctx_text)"
_W_T = "the teacher CLIP text width (config.backbone.teacher_clip)"
_VISION = (_N_V, _W_V)
_TEXT = (_N_T, _W_T)

# Per leaf (prompt leaves, then 'state:'-prefixed state leaves): (upstream key, or the key format
# of upstream block i for the deep leaf; 1x1 conv weight; what sets each upstream dimension).
_LAYOUT = {
    "vision_ctx": (VPT, False, _VISION),
    "vision_deep": (VPT_DEEP, False, _VISION),
    "projector/dense0/kernel": (CONV + "0.weight", True, (_E_T, _E_S, _K, _K)),
    "projector/dense0/bias": (CONV + "0.bias", False, (_E_T,)),
    "projector/bn/scale": (CONV + "1.weight", False, (_E_T,)),
    "projector/bn/bias": (CONV + "1.bias", False, (_E_T,)),
    "state:bn/mean": (CONV + "1.running_mean", False, (_E_T,)),
    "state:bn/var": (CONV + "1.running_var", False, (_E_T,)),
    "projector/dense1/kernel": (CONV + "3.weight", True, (_E_T, _E_T, _K, _K)),
    "projector/dense1/bias": (CONV + "3.bias", False, (_E_T,)),
}
# The stage-2 file: the student's layout plus the text branch (upstream state dict order).
_DPC_LAYOUT = {**_LAYOUT,
               "ctx": (TEXT_CTX, False, _TEXT),
               "text_deep": (TEXT_DEEP, False, _TEXT)}
_DEEP = {"vision_deep": VPT_DEEP, "text_deep": TEXT_DEEP}  # leaf -> key format of block i
_PROMPT_LEAVES = tuple(leaf for leaf in _LAYOUT if not leaf.startswith("state:"))
_DPC_LEAVES = _PROMPT_LEAVES + ("ctx", "text_deep")
_STATE_LEAVES = ("bn/mean", "bn/var")
_REQUIRED = tuple(leaf for leaf in _PROMPT_LEAVES if leaf != "vision_deep")
_RANKS = {"vision_ctx": 2, "vision_deep": 3, "projector/dense0/kernel": 2,
          "projector/dense1/kernel": 2, "ctx": 2, "text_deep": 3}  # every other leaf: rank 1
_KNOWN_TRANS = {key for key, _, _ in _LAYOUT.values() if key.startswith(TRANS)} | {NUM_BATCHES}
_EXAMPLE = os.path.join("<run>", MODEL_DIR, "model-best.pth.tar")
_DPC_EXAMPLE = os.path.join("<DPC run>", MODEL_DIR, "model-best.pth.tar")


def student_checkpoint_path(run_dir: str, epoch: int) -> str:
    """Where the upstream student trainer saves (and its `load_model` looks for) epoch `epoch`
    (1-based): `<run_dir>/VLPromptLearner/model.pth.tar-<epoch>`. (The released code's model
    selection also writes `VLPromptLearner/model-best.pth.tar`, the file
    docs/reference/backbones.md#pytorch-checkpoints names.)
    """
    return os.path.join(run_dir, MODEL_DIR, f"model.pth.tar-{int(epoch)}")


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def load_promptkd_student(path: str, expected: Mapping) -> Tuple[dict, dict]:
    """(prompt, state) of an upstream PromptKD student checkpoint, float32 numpy arrays.

    `path`: a Dassl file such as `<run>/VLPromptLearner/model-best.pth.tar` (read with the
    restricted unpickler: the state dict only, the pickled optimizer and scheduler never built).
    `expected`: the student prompt's leaf path -> shape, flat ('projector/dense0/kernel':
    (E_s, E_t)) as `PromptKD.expected_shapes()` returns it, or nested, shapes as tuples or
    anything with `.shape`. The BatchNorm running statistics take the shape of
    'projector/bn/scale'. Raises FileNotFoundError for a missing file and ValueError for a file
    that is not a Dassl checkpoint or does not fit `expected`, and for a PromptKD+DPC stage-2
    file (it holds a student too, the stage-2 one: `load_promptkd_dpc` reads it).
    """
    expected = _check_expected(flat_shapes(expected), "expected")
    state_dict = read_state_dict(path, "PromptKD student checkpoint", _EXAMPLE)
    if any(key.startswith(STAGE2_TOWER) for key in state_dict):
        raise ValueError(f"{path!r} is a PromptKD+DPC stage-2 checkpoint (StackSPLE_PromptKD: "
                         f"it has {STAGE2_TOWER}* keys), not a stage-1 PromptKD student; give "
                         f"it as config.dpc.init_from and its stage-1 student file as "
                         f"config.backbone.init_from")
    return _read(path, state_dict, expected, _LAYOUT)


def load_promptkd_dpc(path: str, expected: Mapping) -> Tuple[dict, dict]:
    """(parallel, state) of a StackSPLE_PromptKD (PromptKD+DPC stage-2) checkpoint, float32.

    `parallel` is dpc_jax's reference-mode parallel prompt of a PromptKD backbone (the
    'parallel' subtree of `DualPrompt` parameters): the student's leaves as in
    `load_promptkd_student` plus 'ctx' [n_t, W_t] = theta, the stored weighted mix (the
    converse map, docs/reference/method.md#modes, turns it into the base-class context, given
    the stage-1 ctx P and w_b, neither of which the file holds), and 'text_deep' [J_t-1, n_t,
    W_t] (the trainable teacher-width text tower's deep prompts, block i -> index i-1). `state`
    is {'bn': {'mean', 'var'}}: the projector's BatchNorm statistics after stage 2 (the released
    stage 2 trains in train mode, so they moved; its base-class evaluation uses them).

    `expected`: the parallel prompt's leaf path -> shape (`PromptKD.dpc_expected_shapes()`).
    The file's text-tower deep prompts are read from `prompt_learner.text_encoder.*`; its
    second copy `text_encoder.*` (the same module under a second name) is checked to agree
    where present. Everything else (frozen towers, `clip_model.*` with the student's unused
    512-wide text tower, buffers) is ignored. Raises FileNotFoundError / ValueError as
    `load_promptkd_student` does, one ValueError listing every missing, unexpected and
    mis-shaped key.
    """
    expected = _check_expected(flat_shapes(expected), "expected", dpc=True)
    state_dict = read_state_dict(path, "PromptKD+DPC stage-2 checkpoint", _DPC_EXAMPLE)
    return _read(path, state_dict, expected, _DPC_LAYOUT)


def _read(path: str, state_dict: Mapping, expected: Mapping[str, tuple],
          layout: Mapping) -> Tuple[dict, dict]:
    """(prompt, state) of the keys `layout` names, checked against `expected`."""
    dpc = layout is _DPC_LAYOUT
    wanted = _upstream_entries(expected, layout)  # upstream key -> (leaf, deep index or None)
    prompt_like = {key for key in state_dict if _is_prompt_key(key, dpc)}
    missing = [key for key in wanted if key not in state_dict]  # upstream (state_dict) order
    unexpected = sorted(prompt_like - set(wanted) - {NUM_BATCHES}, key=natural_key)
    misshaped, not_tensor = tensor_problems(state_dict, {
        key: (_upstream_shape(leaf, expected[_shape_leaf(leaf)], index is not None, layout),
              layout[leaf][2])
        for key, (leaf, index) in wanted.items()})
    differing = _differing_copies(state_dict, wanted) if dpc else []
    if missing or unexpected or misshaped or not_tensor or differing:
        raise ValueError(_mismatch_message(path, expected, state_dict, missing, unexpected,
                                           misshaped, not_tensor, differing, dpc))

    flat = {}
    for leaf in layout:
        keys = [key for key, entry in wanted.items() if entry[0] == leaf]  # in block order
        if not keys:
            continue
        # conv [out, in, 1, 1] -> kernel [in, out]
        to_ours = (lambda a: a[:, :, 0, 0].T) if layout[leaf][1] else None
        flat[leaf] = leaf_from_tensors(state_dict, keys, leaf in _DEEP, to_ours)
    prompt = tree_lib.unflatten({k: v for k, v in flat.items() if not k.startswith("state:")})
    state = tree_lib.unflatten({k[len("state:"):]: v for k, v in flat.items()
                                if k.startswith("state:")})
    return prompt, state


def _shape_leaf(leaf: str) -> str:
    """The `expected` leaf whose shape a leaf has (the BN statistics: the BN scale's)."""
    return "projector/bn/scale" if leaf.startswith("state:") else leaf


def _upstream_entries(expected: Mapping[str, tuple], layout: Mapping) -> Dict[str, tuple]:
    """Upstream key -> (leaf, deep index or None) of the prompt and state `expected` implies."""
    entries = {}
    for leaf, (key, _, _) in layout.items():
        if leaf in _DEEP:
            for k in range(expected[leaf][0] if leaf in expected else 0):
                entries[_DEEP[leaf].format(k + 1)] = (leaf, k)
        elif _shape_leaf(leaf) in expected:
            entries[key] = (leaf, None)
    return entries


def _upstream_shape(leaf: str, leaf_shape: tuple, deep: bool, layout: Mapping) -> tuple:
    shape = tuple(leaf_shape[1:] if deep else leaf_shape)
    return shape[::-1] + (1, 1) if layout[leaf][1] else shape


def _is_prompt_key(key: str, dpc: bool = False) -> bool:
    """A key of the student's trainable layout (visual prompts, projector) or, for a stage-2
    file, of its text branch; anything else is a frozen copy, a buffer or a part the model
    does not use, ignored."""
    student = key == VPT or bool(_DEEP_PATTERN.fullmatch(key)) or key.startswith(TRANS)
    return student or (dpc and (key == TEXT_CTX or bool(_TEXT_DEEP_PATTERN.fullmatch(key))))


def _differing_copies(state_dict: Mapping, wanted: Mapping) -> list:
    """Stage-2 text deep prompts whose second copy (text_encoder.*) differs from the first."""
    import torch

    out = []
    for key, (leaf, index) in wanted.items():
        copy = TEXT_DEEP_COPY.format(index + 1) if leaf == "text_deep" else None
        if copy is None or copy not in state_dict or key not in state_dict:
            continue
        a, b = state_dict[key], state_dict[copy]
        if not (isinstance(b, torch.Tensor) and a.shape == b.shape
                and torch.equal(a.to(torch.float32), b.to(torch.float32))):
            out.append(f"{copy} (differs from {key}, the same module's parameter)")
    return out


def _file_blocks(state_dict: Mapping, pattern=_DEEP_PATTERN) -> list:
    return sorted(int(m.group(1)) for m in map(pattern.fullmatch, state_dict) if m)


def _describe(state_dict: Mapping) -> str:
    """What the file looks like."""
    if any(key.startswith(STAGE2_TOWER) for key in state_dict):
        return "a PromptKD+DPC stage-2 checkpoint (StackSPLE_PromptKD)"
    if any(key.startswith(TRANS) for key in state_dict):
        return "a PromptKD student checkpoint"
    vlp = _looks_like(state_dict)  # the IVLP/PromptSRC/MaPLe classification of vlp_torch
    has_text = ("prompt_learner.ctx" in state_dict
                or any(k.startswith("text_encoder.transformer.resblocks.")
                       and k.endswith(".VPT_shallow") for k in state_dict))
    if vlp.startswith("an IVLP/PromptSRC") and has_text:
        return ("an IVLP/PromptSRC checkpoint (the layout of a PromptKD teacher, "
                "teacher_model/<dataset>/VLPromptLearner/model-best.pth.tar), not a student: it "
                "has no projector (VPT_image_trans.*)")
    if vlp.startswith("an IVLP/PromptSRC"):
        return "visual prompts without the student's projector (no VPT_image_trans.* keys)"
    if vlp.startswith("no "):
        return "no PromptKD student (no image_encoder.VPT and no VPT_image_trans.* keys)"
    return f"{vlp}, not a PromptKD student (no VPT_image_trans.* projector)"


def _describe_dpc(state_dict: Mapping) -> str:
    """What a file given as a stage-2 checkpoint looks like."""
    what = _describe(state_dict)
    if what == "a PromptKD student checkpoint":
        return ("a stage-1 PromptKD student checkpoint (no prompt_learner.text_encoder.* text "
                "tower), not a stage-2 file: give it as config.backbone.init_from")
    return what


def _settings(expected: Mapping[str, tuple]) -> str:
    n_v, w_v = expected["vision_ctx"]
    depth = 1 + (expected["vision_deep"][0] if "vision_deep" in expected else 0)
    e_s, e_t = expected["projector/dense0/kernel"]
    out = (f"n_ctx_vision {n_v}, student vision width {w_v}, depth_vision {depth}, student "
           f"embed dim E_s {e_s}, teacher embed dim E_t {e_t}")
    if "ctx" in expected:
        n_t, w_t = expected["ctx"]
        depth_t = 1 + (expected["text_deep"][0] if "text_deep" in expected else 0)
        out += (f"; teacher n_ctx_text {n_t}, teacher text width {w_t}, teacher depth_text "
                f"{depth_t}")
    return out


def _depth_line(state_dict, expected, leaf, pattern, field) -> list:
    found = _file_blocks(state_dict, pattern)
    want = expected[leaf][0] if leaf in expected else 0
    if found == list(range(1, want + 1)):
        return []
    blocks = (f"VPT_shallow entries for blocks {found} (prompt depth {len(found) + 1})"
              if found else "no VPT_shallow entries (prompt depth 1)")
    return [f"  {leaf}: the file has {blocks}; the config expects prompt depth {want + 1} "
            f"({field})"]


def _mismatch_message(path, expected, state_dict, missing, unexpected, misshaped,
                      not_tensor, differing=(), dpc=False) -> str:
    what = "PromptKD+DPC stage-2 model" if dpc else "PromptKD student"
    looks = _describe_dpc(state_dict) if dpc else _describe(state_dict)
    lines = [f"{path!r} does not fit the {what} of this configuration ({_settings(expected)}); "
             f"the file looks like {looks}:"]
    lines += _depth_line(state_dict, expected, "vision_deep", _DEEP_PATTERN,
                         "depth_vision, config.backbone.depth_vision")
    if dpc:
        lines += _depth_line(state_dict, expected, "text_deep", _TEXT_DEEP_PATTERN,
                             "the teacher's depth_text, config.backbone.teacher.depth_text")
    lines += key_problem_lines(missing, unexpected, misshaped, not_tensor)
    if differing:
        lines.append(f"  second copies that disagree: {list(differing)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def to_upstream_state_dict(prompt: Mapping, state: Mapping,
                           num_batches_tracked: int = 0) -> "collections.OrderedDict":
    """The upstream state dict (the student's prompt and projector keys only, float32 torch
    tensors, and the BN's int64 num_batches_tracked) in the order torch's state_dict lists
    them."""
    import torch  # only here: building torch tensors needs it

    if (isinstance(num_batches_tracked, bool) or not isinstance(num_batches_tracked,
                                                                (int, np.integer))
            or num_batches_tracked < 0):
        raise ValueError(f"num_batches_tracked={num_batches_tracked!r}; expected an integer "
                         f">= 0")
    flat = {leaf: widen_to_float32(value, f"prompt[{leaf!r}]")
            for leaf, value in tree_lib.flatten(prompt).items()}
    stats = {leaf: widen_to_float32(value, f"state[{leaf!r}]")
             for leaf, value in tree_lib.flatten(state).items()}
    _check_expected({leaf: a.shape for leaf, a in flat.items()}, "prompt")
    if sorted(stats) != sorted(_STATE_LEAVES):
        raise ValueError(f"state has leaves {sorted(stats)}; expected {list(_STATE_LEAVES)} "
                         f"(the projector BatchNorm's running statistics)")
    _check_consistent(flat, stats)
    flat.update({"state:" + leaf: value for leaf, value in stats.items()})

    state_dict = collections.OrderedDict()
    for leaf, (key, conv, _) in _LAYOUT.items():  # upstream order: prompts, then conv1.0/1/3
        if leaf not in flat:
            continue
        if leaf == "vision_deep":
            for k, array in enumerate(flat[leaf]):
                state_dict[VPT_DEEP.format(k + 1)] = tensor_of(array)
            continue
        array = flat[leaf]
        if conv:
            array = np.ascontiguousarray(array.T)[:, :, None, None]  # [in, out] -> [out, in, 1, 1]
        state_dict[key] = tensor_of(array)
        if key == CONV + "1.running_var":
            state_dict[NUM_BATCHES] = torch.tensor(int(num_batches_tracked), dtype=torch.int64)
    return state_dict


def export_promptkd_student(prompt: Mapping, state: Mapping, path: str, epoch: int, *,
                            num_batches_tracked: int = 0) -> str:
    """Write a student (prompt and BN state) as an upstream Dassl checkpoint at `path`; returns
    `path` (`student_checkpoint_path` gives the name upstream's `load_model` looks for).

    The file is `torch.save({'state_dict': <the student's prompt and projector keys only>,
    'epoch': epoch, 'optimizer': None, 'scheduler': None, 'val_result': None})`, written
    atomically (`write_dassl_checkpoint`). Every tensor is float32, the projector convs
    included although upstream keeps them in fp16: upstream's `load_state_dict(strict=False)`
    keeps its frozen CLIP weights and casts each tensor to its parameter's dtype, and
    `load_promptkd_student` reads the file back bit for bit. `num_batches_tracked` (int64 in
    the file) is the BatchNorm's update count; torch reads it only for a cumulative average
    (momentum None), which upstream (momentum 0.1) does not use, and dpc_jax does not keep it:
    pass the number of training steps when it matters, else 0 is written.
    """
    return write_dassl_checkpoint(to_upstream_state_dict(prompt, state, num_batches_tracked),
                                  path, epoch)


def to_upstream_dpc_state_dict(parallel: Mapping, state: Mapping,
                               num_batches_tracked: int = 0) -> "collections.OrderedDict":
    """The stage-2 state dict: the student's keys (`to_upstream_state_dict`), then theta as
    'prompt_learner.ctx' and the text deep prompts under both names the released model
    registers its text tower by (`prompt_learner.text_encoder.*` and `text_encoder.*`; the
    released new-class loader reads the second). float32 torch tensors."""
    flat = dict(tree_lib.flatten(parallel))
    text = {leaf: widen_to_float32(flat.pop(leaf), f"parallel[{leaf!r}]")
            for leaf in ("ctx", "text_deep") if leaf in flat}
    if "ctx" not in text:
        raise ValueError(f"parallel has leaves {sorted(tree_lib.flatten(parallel))}; a "
                         f"PromptKD+DPC parallel prompt has the text context 'ctx' (theta) "
                         f"besides the student's leaves")
    _check_expected({**{leaf: a.shape for leaf, a in text.items()},
                     **{leaf: np.shape(v) for leaf, v in flat.items()}}, "parallel", dpc=True)
    ctx = text["ctx"]
    deep = text.get("text_deep")
    if deep is not None and deep.shape[1:] != ctx.shape:
        raise ValueError(f"parallel['text_deep'] has shape {deep.shape}; expected "
                         f"(depth_text - 1, {ctx.shape[0]}, {ctx.shape[1]}), the blocks of the "
                         f"text context's shape {ctx.shape} (teacher n_ctx_text, text width)")
    state_dict = to_upstream_state_dict(tree_lib.unflatten(flat), state, num_batches_tracked)
    state_dict[TEXT_CTX] = tensor_of(ctx)
    blocks = [] if deep is None else list(deep)
    for key_format in (TEXT_DEEP, TEXT_DEEP_COPY):
        for k, array in enumerate(blocks):
            state_dict[key_format.format(k + 1)] = tensor_of(array)
    return state_dict


def export_promptkd_dpc(parallel: Mapping, state: Mapping, path: str, epoch: int, *,
                        num_batches_tracked: int = 0) -> str:
    """Write a PromptKD+DPC stage 2 (reference mode's parallel prompt, theta as 'ctx', and the
    BatchNorm statistics its base classes are evaluated with) as the released StackSPLE_PromptKD
    trainer's Dassl checkpoint at `path` (`student_checkpoint_path(run_dir, epoch)`: the trainer
    registers its model under the same name); returns `path`. Written atomically, float32
    throughout, `load_promptkd_dpc` reads it back bit for bit. The file holds what the released
    `load_model` takes over its built model with `load_state_dict(strict=False)`; the stage-1
    prompts P it also needs come, as upstream, from the stage-1 student and teacher files
    (SPLE.BACK_CKPT_PATH, teacher_model/), which must be the ones this stage 2 started from,
    with SPLE.STACK.WEIGHT = the w_b theta was trained under.
    """
    return write_dassl_checkpoint(
        to_upstream_dpc_state_dict(parallel, state, num_batches_tracked), path, epoch)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _check_expected(shapes: Mapping[str, tuple], what: str,
                    dpc: bool = False) -> Dict[str, tuple]:
    """`shapes` (leaf -> shape) if its leaves and ranks are those of a student prompt (`dpc`:
    of a PromptKD+DPC parallel prompt, the student's leaves plus the text branch)."""
    allowed, name = ((_DPC_LEAVES, "PromptKD+DPC parallel prompt") if dpc
                     else (_PROMPT_LEAVES, "PromptKD student prompt"))
    unknown = sorted(set(shapes) - set(allowed))
    if unknown:
        raise ValueError(f"{what} has leaves {unknown} that the {name} does not have; "
                         f"expected leaves among {list(allowed)}")
    absent = [leaf for leaf in _REQUIRED + (("ctx",) if dpc else ()) if leaf not in shapes]
    if absent:
        short = "PromptKD+DPC parallel prompt" if dpc else "PromptKD student"
        raise ValueError(f"{what} lacks the {short} leaves {absent}; it has {sorted(shapes)}")
    out = {}
    for leaf, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        rank = _RANKS.get(leaf, 1)
        if len(shape) != rank:
            raise ValueError(f"{what}[{leaf!r}] has shape {shape}; expected a rank-{rank} "
                             f"PromptKD student leaf")
        if leaf in _DEEP and shape[0] < 1:
            depth = "depth_vision" if leaf == "vision_deep" else "the teacher's depth_text"
            raise ValueError(f"{what}[{leaf!r}] has shape {shape}: no deep blocks; leave the "
                             f"leaf out when {depth} is 1")
        out[leaf] = shape
    return out


def _check_consistent(flat: Mapping[str, np.ndarray], stats: Mapping[str, np.ndarray]) -> None:
    """The shapes of one student agree with one (n_v, W_v, E_s, E_t), as upstream's model needs."""
    n_v, w_v = flat["vision_ctx"].shape
    e_s, e_t = flat["projector/dense0/kernel"].shape
    want = {"vision_ctx": (n_v, w_v), "projector/dense0/kernel": (e_s, e_t),
            "projector/dense0/bias": (e_t,), "projector/bn/scale": (e_t,),
            "projector/bn/bias": (e_t,), "projector/dense1/kernel": (e_t, e_t),
            "projector/dense1/bias": (e_t,)}
    if "vision_deep" in flat:
        want["vision_deep"] = (flat["vision_deep"].shape[0], n_v, w_v)
    bad = [f"{leaf} {flat[leaf].shape} (expected {shape})" for leaf, shape in want.items()
           if flat[leaf].shape != shape]
    bad += [f"state {leaf} {stats[leaf].shape} (expected {(e_t,)})" for leaf in _STATE_LEAVES
            if stats[leaf].shape != (e_t,)]
    if bad:
        raise ValueError(f"the PromptKD student's leaves disagree with its vision_ctx "
                         f"{(n_v, w_v)} (n_ctx_vision, vision width) and projector/dense0/"
                         f"kernel {(e_s, e_t)} (E_s, E_t): {bad}")


__all__ = ["load_promptkd_student", "export_promptkd_student", "student_checkpoint_path",
           "to_upstream_state_dict", "load_promptkd_dpc", "export_promptkd_dpc",
           "to_upstream_dpc_state_dict", "MODEL_DIR"]
