"""PyTorch DePT checkpoints (Koorye/DePT @d4ff416) <-> dpc_jax DePT prompts {'inner', 'head'}.

Import starts an evaluation from a DePT model trained by the released code; export writes a DePT
model trained here as the file the released trainers' `load_model` reads
(docs/reference/backbones.md#dept, #pytorch-checkpoints).

    load_dept_head(path, embed_dim, num_classes) -> head
    load_dept_coop_ctx(path, expected_shape) -> ctx
    head_state_dict(head) / dept_state_dict(prompt, layout) -> upstream state dict
    export_dept_checkpoint(prompt, path, layout, epoch) -> path
    dept_checkpoint_path(run_dir, layout, epoch) -> path

Upstream layout. Both released trainers (ExtrasLinearProbeCoOp, trainers/elp_coop.py;
ExtrasLinearProbeMaPLe, trainers/elp_maple.py) register the whole `CustomCLIP` with Dassl, as
'PromptLearner' and 'MultiModalPromptLearner', so ONE file `<run>/<name>/model.pth.tar-<epoch>`
(10 epochs: model.pth.tar-10) holds the inner prompt and the head, beside the frozen CLIP copies
(image_encoder.*, text_encoder.*, logit_scale) and the prompt learner's token_prefix/suffix
buffers. The head sits at the top level of that state dict, unprefixed, next to the
'prompt_learner.'-prefixed prompt keys:

    film_lp_img.scale, film_lp_img.bias    [E]           -> head/film_img/scale, bias
    film_lp_text.scale, film_lp_text.bias  [E]           -> head/film_text/scale, bias
    linear_probe_proj.weight               [C_base, E]   -> head/linear/kernel [E, C_base]
    linear_probe_proj.bias                 [C_base]      -> head/linear/bias

E = the CLIP embed_dim (text_projection.size(1)), C_base = the number of base classes. Dtypes
under the released precision (PREC 'fp16'): FiLM fp32 (fresh nn.Parameters, never cast), the
linear head fp16 (`nn.Linear(...).type(clip dtype)`), CoOp's and MaPLe's ctx fp16. The FiLM acts
on the raw, un-normalised features (`_forward_logits_linear_probe` gets them before any norm),
as `dpc_jax.prompts.dept.film` does.

Inner prompt keys: MaPLe's are those of `vlp_torch` ('maple', the same registered module and
file), so `vlp_torch` reads and writes them; IVLP/PromptSRC (DePT never released them; our
composition) use `vlp_torch`'s 'ivlp' layout in 'VLPromptLearner'. CoOp differs from the plain
CoOp trainer, which saves the prompt learner alone (unprefixed 'ctx'): DePT-CoOp's file holds
'prompt_learner.ctx', read and written here.

Reading strips a leading 'module.' and casts to float32; shapes are checked against the config
and a mismatch raises one ValueError listing the missing, unexpected and mis-shaped keys with
the setting behind each dimension. Export writes the prompt and head keys only, in float32
(upstream's `load_state_dict(strict=False)` keeps the frozen CLIP weights and casts into the
model's dtypes: the linear head rounds to fp16 there under PREC 'fp16').
"""

from __future__ import annotations

import collections
import os
import re
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from dpc_jax import tree as tree_lib
from dpc_jax.convert.torch_files import (key_problem_lines, leaf_from_tensors, misshape_line,
                                         natural_key, not_float, read_state_dict,
                                         tensor_of, tensor_problems, widen_to_float32,
                                         write_dassl_checkpoint)

# The key layouts an inner learner's prompt can have (its `TorchFormat.torch_layout`).
LAYOUTS = ("coop", "cocoop", "ivlp", "maple")
# Dassl's folder of the saved model: the name the DePT trainer registers its CustomCLIP under.
MODEL_DIRS = {"coop": "PromptLearner", "cocoop": "PromptLearner",
              "maple": "MultiModalPromptLearner", "ivlp": "VLPromptLearner"}
COOP_CTX = "prompt_learner.ctx"
PROMPT_PREFIX = "prompt_learner."  # CoOp's and CoCoOp's keys inside DePT's whole-model file

_E = "E = the CLIP embed_dim"
_C = "C_base = the number of base classes"
# head leaf -> (upstream key, transposed, what sets each dimension of the upstream tensor).
HEAD_KEYS = collections.OrderedDict([
    ("film_img/scale", ("film_lp_img.scale", False, (_E,))),
    ("film_img/bias", ("film_lp_img.bias", False, (_E,))),
    ("film_text/scale", ("film_lp_text.scale", False, (_E,))),
    ("film_text/bias", ("film_lp_text.bias", False, (_E,))),
    ("linear/kernel", ("linear_probe_proj.weight", True, (_C, _E))),
    ("linear/bias", ("linear_probe_proj.bias", False, (_C,))),
])
# Keys of the head's modules; one of these outside HEAD_KEYS is reported as unexpected.
_HEAD_MODULES = re.compile(r"(film_lp_img|film_lp_text|linear_probe_proj)\..*")
_EXAMPLE = os.path.join("<run>", "PromptLearner", "model.pth.tar-10")


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"DePT inner prompt layout {layout!r}: expected one of {list(LAYOUTS)}")
    return layout


def dept_checkpoint_path(run_dir: str, layout: str, epoch: int) -> str:
    """Where the DePT trainer saves (and its `load_model` looks for) epoch `epoch` (1-based):
    `<run_dir>/PromptLearner/model.pth.tar-<epoch>` (CoOp, CoCoOp),
    `<run_dir>/MultiModalPromptLearner/...` (MaPLe), `<run_dir>/VLPromptLearner/...`
    (the 'ivlp' layout of IVLP and PromptSRC: our composition, the name their own trainers
    register). `layout`: the inner learner's `torch_layout`."""
    return os.path.join(run_dir, MODEL_DIRS[_check_layout(layout)],
                        f"model.pth.tar-{int(epoch)}")


def expected_head_shapes(embed_dim: int, num_classes: Optional[int]) -> Dict[str, tuple]:
    """head leaf -> shape for CLIP embed_dim E and C_base base classes."""
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(f"DePT's head needs the number of base classes C_base; got "
                         f"num_classes={num_classes!r}")
    e, c = int(embed_dim), int(num_classes)
    return {leaf: ((e, c) if leaf == "linear/kernel" else (c,) if leaf == "linear/bias"
                   else (e,)) for leaf in HEAD_KEYS}


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def _read(path: str) -> dict:
    return read_state_dict(path, "DePT checkpoint", _EXAMPLE)


def _looks_like(state_dict: Mapping) -> str:
    head = [key for key in state_dict if _HEAD_MODULES.fullmatch(key)]
    if head:
        return "a DePT checkpoint"
    if "ctx" in state_dict:
        return ("a plain CoOp/CoCoOp prompt-learner checkpoint (unprefixed 'ctx', no DePT "
                "head): import it with backbone coop, not dept")
    if any(key.startswith("prompt_learner.") for key in state_dict):
        return ("a whole-model checkpoint without a DePT head (e.g. the plain MaPLe/IVLP "
                "trainer's): import it with that backbone, not dept")
    return "no DePT checkpoint (no head or prompt keys)"


def head_from_state_dict(state_dict: Mapping, path: str, embed_dim: int,
                         num_classes: Optional[int]) -> dict:
    """The head of an upstream DePT state dict ('module.' already stripped); see
    `load_dept_head`."""
    expected = expected_head_shapes(embed_dim, num_classes)
    values = {_E: f"clip embed_dim={int(embed_dim)}", _C: f"num_classes={int(num_classes)}"}
    wanted = {key: (expected[leaf][::-1] if transposed else expected[leaf], hints)
              for leaf, (key, transposed, hints) in HEAD_KEYS.items()}
    missing = [key for key in wanted if key not in state_dict]
    unexpected = sorted((key for key in state_dict
                         if _HEAD_MODULES.fullmatch(key) and key not in wanted), key=natural_key)
    misshaped, not_tensor = tensor_problems(state_dict, wanted, values)
    if missing or unexpected or misshaped or not_tensor:
        lines = [f"{path!r} does not fit the DePT head of this configuration ({values[_E]}, "
                 f"{values[_C]}); the file looks like {_looks_like(state_dict)}:"]
        has = lambda module: any(key.startswith(module + ".") for key in state_dict)
        if not has("linear_probe_proj") and (has("film_lp_img") or has("film_lp_text")):
            lines.append("  no linear head: upstream saves none for TRAINER.LINEAR_PROBE.TYPE "
                         "'similarity' or when the run's classes are not the base classes "
                         "(nn.Identity); dpc_jax's DePT has the linear head over C_base")
        lines += key_problem_lines(missing, unexpected, misshaped, not_tensor)
        raise ValueError("\n".join(lines))
    return tree_lib.unflatten({
        leaf: leaf_from_tensors(state_dict, [key], False, (lambda a: a.T) if transposed else None)
        for leaf, (key, transposed, _) in HEAD_KEYS.items()})


def load_dept_head(path: str, embed_dim: int, num_classes: Optional[int]) -> dict:
    """The DePT head {'film_img', 'film_text': {'scale', 'bias'} [E], 'linear': {'kernel'
    [E, C_base], 'bias' [C_base]}} (float32 numpy) of an upstream DePT checkpoint.

    `path`: a Dassl file such as `<run>/PromptLearner/model.pth.tar-10` (DePT-CoOp) or
    `<run>/MultiModalPromptLearner/model.pth.tar-10` (DePT-MaPLe). The fp16 linear weight
    [C_base, E] becomes the float32 kernel [E, C_base]. Raises FileNotFoundError for a missing
    file and ValueError for one that is not a Dassl checkpoint or whose head does not fit
    E = `embed_dim` and C_base = `num_classes` (all missing, unexpected and mis-shaped keys
    listed at once).
    """
    return head_from_state_dict(_read(path), path, embed_dim, num_classes)


def load_dept_coop_ctx(path: str, expected_shape: Sequence[int]) -> np.ndarray:
    """DePT-CoOp's context 'prompt_learner.ctx' (float32) of an upstream DePT checkpoint,
    checked against `expected_shape` ([n_ctx, W_t], or [C_base, n_ctx, W_t] with csc)."""
    state_dict = _read(path)
    want = tuple(int(d) for d in expected_shape)
    fields = ((_C, "num_classes={}, csc=True"),) if len(want) == 3 else ()
    fields += (("the CoOp n_ctx", "config.backbone.inner.n_ctx={}"),
               ("the CLIP text width", "transformer_width={}"))
    hints = tuple(hint for hint, _ in fields)
    values = {hint: setting.format(d) for (hint, setting), d in zip(fields, want)}
    if COOP_CTX not in state_dict:
        raise ValueError(f"{path!r} does not fit the DePT-CoOp prompt: missing key "
                         f"{COOP_CTX!r} (expected shape {want}); the file looks like "
                         f"{_looks_like(state_dict)}")
    value = state_dict[COOP_CTX]
    problem = not_float(COOP_CTX, value)
    if problem:
        raise ValueError(f"{path!r}: {problem}; expected a floating-point tensor")
    if tuple(value.shape) != want:
        rank = ("" if value.ndim == len(want) else
                f"; config.backbone.inner.csc={len(want) == 3} sets the rank (csc: one context "
                f"per base class)")
        raise ValueError(f"{path!r} does not fit the DePT-CoOp prompt: "
                         + misshape_line(COOP_CTX, tuple(value.shape), want, hints, values)
                         + rank)
    return leaf_from_tensors(state_dict, [COOP_CTX], False)


def load_dept_cocoop(path: str, expected: Mapping[str, tuple]) -> tuple:
    """(inner CoCoOp prompt, state dict) of DePT-CoCoOp's file (ExtrasLinearProbeCoCoOp,
    trainers/elp_cocoop.py: the whole CustomCLIP as 'PromptLearner'): 'prompt_learner.ctx'
    and 'prompt_learner.meta_net.linear{1,2}.{weight,bias}', checked against `expected`
    (CoCoOp.expected_shapes). The state dict is returned so the head is read from the same
    read of the file."""
    from dpc_jax.convert.coop_torch import cocoop_from_state_dict

    state_dict = _read(path)
    return cocoop_from_state_dict(state_dict, path, dict(expected), PROMPT_PREFIX), state_dict


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def head_state_dict(head: Mapping, embed_dim: Optional[int] = None
                    ) -> "collections.OrderedDict":
    """The upstream keys of a DePT head (float32 torch tensors, upstream order; linear kernel
    [E, C] -> weight [C, E]). The leaves must agree on one E (and equal `embed_dim` if given)
    and one C_base."""
    flat = {leaf: widen_to_float32(value, f"head[{leaf!r}]")
            for leaf, value in tree_lib.flatten(head).items()}
    if sorted(flat) != sorted(HEAD_KEYS):
        raise ValueError(f"the DePT head has leaves {sorted(flat)}; expected {list(HEAD_KEYS)}")
    kernel = flat["linear/kernel"]
    if kernel.ndim != 2:
        raise ValueError(f"head['linear/kernel'] has shape {kernel.shape}; expected [E, C_base]")
    e = kernel.shape[0] if embed_dim is None else int(embed_dim)
    want = expected_head_shapes(e, kernel.shape[1])
    bad = [f"{leaf} {flat[leaf].shape} (expected {want[leaf]})" for leaf in HEAD_KEYS
           if flat[leaf].shape != want[leaf]]
    if bad:
        raise ValueError(f"the DePT head's leaves disagree with E={e} (the CLIP embed_dim) and "
                         f"C_base={kernel.shape[1]} (the linear head's columns): {bad}")
    state = collections.OrderedDict()
    for leaf, (key, transposed, _) in HEAD_KEYS.items():
        array = flat[leaf].T if transposed else flat[leaf]
        state[key] = tensor_of(array)
    return state


def inner_state_dict(inner_prompt: Mapping, layout: str) -> "collections.OrderedDict":
    """The upstream prompt keys of the inner learner's prompt inside a DePT file: CoOp's
    'prompt_learner.ctx', CoCoOp's 'prompt_learner.ctx' and 'prompt_learner.meta_net.*', or
    `vlp_torch.to_upstream_state_dict` of MaPLe/IVLP/PromptSRC (`layout`: the inner learner's
    `torch_layout`)."""
    layout = _check_layout(layout)
    if layout == "cocoop":
        from dpc_jax.convert.coop_torch import cocoop_state_dict

        return cocoop_state_dict(inner_prompt, PROMPT_PREFIX)
    if layout != "coop":
        from dpc_jax.convert import vlp_torch

        return vlp_torch.to_upstream_state_dict(inner_prompt, layout)
    if not isinstance(inner_prompt, Mapping) or sorted(inner_prompt) != ["ctx"]:
        found = sorted(inner_prompt) if isinstance(inner_prompt, Mapping) else inner_prompt
        raise ValueError(f"the DePT-CoOp inner prompt has {found!r}; expected {{'ctx'}}")
    ctx = widen_to_float32(inner_prompt["ctx"], "inner['ctx']")
    if ctx.ndim not in (2, 3):
        raise ValueError(f"inner['ctx'] has shape {ctx.shape}; expected [n_ctx, W_t] or "
                         f"[C_base, n_ctx, W_t] (csc)")
    return collections.OrderedDict([(COOP_CTX, tensor_of(ctx))])


def dept_state_dict(prompt: Mapping, layout: str, embed_dim: Optional[int] = None
                    ) -> "collections.OrderedDict":
    """The DePT file's trainable keys: the inner prompt's, then the head's (upstream's
    `CustomCLIP.state_dict()` order)."""
    if not isinstance(prompt, Mapping) or sorted(prompt) != ["head", "inner"]:
        found = sorted(prompt) if isinstance(prompt, Mapping) else type(prompt).__name__
        raise ValueError(f"a DePT prompt is {{'inner', 'head'}}; got {found}")
    state = inner_state_dict(prompt["inner"], layout)
    state.update(head_state_dict(prompt["head"], embed_dim))
    return state


def export_dept_checkpoint(prompt: Mapping, path: str, layout: str, epoch: int,
                           embed_dim: Optional[int] = None) -> str:
    """Write a DePT prompt {'inner', 'head'} as the upstream DePT trainer's single Dassl file
    at `path` (see `dept_checkpoint_path`); returns `path`.

    `torch.save({'state_dict': <inner prompt keys + head keys>, 'epoch': epoch, 'optimizer':
    None, 'scheduler': None, 'val_result': None})`, float32: the DePT trainer's `load_model`
    (strict=False) loads it into its CustomCLIP; no optimizer state, so a model to evaluate,
    not a point to resume. Written atomically (`write_dassl_checkpoint`).
    """
    return write_dassl_checkpoint(dept_state_dict(prompt, layout, embed_dim), path, epoch)
