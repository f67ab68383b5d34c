"""DPC's dual prompts (DPC_PROTOCOL.md §2) over any prompt learner's prompt pytree.

The parameter tree is `{'backbone': P, 'parallel': theta}`: P is the stage-1 prompt (a frozen
leaf; `trainable_rules` keeps it out of the optimizer) and theta the trainable parallel prompt,
both initialised to P. Every leaf of the learner's prompt pytree is doubled and mixed alike.

`config.dpc` fields (see `default_config`):
- mode: 'reference' (default) reproduces the released code ('converse' mode of sple_coop.py);
  'paper' follows the paper's equations.
- w_base (w_b, released SPLE.STACK.WEIGHT), w_new (w_n, SPLE.STACK.WEIGHT_FOR_NEW).

paper:     training uses P'; base eval uses w_b*P' + (1-w_b)*P; new eval w_n*P' + (1-w_n)*P.
reference: every forward (training and base eval) uses Q = (theta - (1-w_b)*P) * (1/w_b); new
           eval uses the released code's ctx = w_n*theta + (1-w_n)*P followed by the same map,
           which equals w_n*Q + (1-w_n)*P. SGD on theta moves Q with learning rate lr/w_b^2.

Mixing weights of exactly 0 or 1 return the corresponding prompt itself (the same arrays), not
the arithmetic: 0*Q + 1*P differs from P where Q holds inf/nan and turns -0.0 into +0.0. With
w_n = 0 the new-class prompt is therefore bitwise P, which the method promises ("new-class
accuracy stays exactly the backbone's"); the released code's arithmetic gives P only up to
rounding (it evaluates (P - (1-w_b)*P) * (1/w_b)).
"""

from __future__ import annotations

import math
import re
from typing import Any, List, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from dpc_jax.prompts.base import config_field

Prompt = Any
MODES = ("reference", "paper")
_WHERE = "config.dpc"


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.mode = "reference"
    config.w_base = 0.5
    config.w_new = 0.0
    return config


def _check_weight(value, field: str, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_WHERE}.{field}={value!r}; expected a number in "
                         f"{'(0, 1]' if low_open else '[0, 1]'}")
    value = float(value)
    if value > 1 or value < 0 or (low_open and value == 0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        why = " (reference mode divides by it)" if low_open else ""
        raise ValueError(f"{_WHERE}.{field}={value!r}; expected a number in {interval}{why}")
    return value


def _mix(w: float, a: Prompt, b: Prompt) -> Prompt:
    """w*a + (1-w)*b leaf-wise, returning `a` or `b` themselves at w = 1 or w = 0."""
    if w == 1.0:
        return a
    if w == 0.0:
        return b
    return jax.tree_util.tree_map(lambda x, y: w * x + (1.0 - w) * y, a, b)


class DualPrompt:
    """Parameterisation of DPC's backbone and parallel prompts; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict):
        mode = config_field(config, "mode", _WHERE)
        if mode not in MODES:
            raise ValueError(f"{_WHERE}.mode={mode!r}; allowed values: {list(MODES)}")
        self.mode = mode
        self.w_base = _check_weight(config_field(config, "w_base", _WHERE), "w_base",
                                         low_open=(mode == "reference"))
        self.w_new = _check_weight(config_field(config, "w_new", _WHERE), "w_new",
                                        low_open=False)

    def init(self, backbone_prompt: Prompt) -> dict:
        """{'backbone': P, 'parallel': copy of P}. The copy has its own buffers, so donating
        the parameters to a jitted step never donates one buffer twice."""
        parallel = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), backbone_prompt)
        return {"backbone": backbone_prompt, "parallel": parallel}

    def _split(self, params: dict) -> Tuple[Prompt, Prompt]:
        if not isinstance(params, dict) or set(params) != {"backbone", "parallel"}:
            found = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"DPC parameters must be a dict with keys ['backbone', 'parallel']; "
                             f"found {found}")
        return params["backbone"], params["parallel"]

    def _unmix(self, theta: Prompt, backbone: Prompt) -> Prompt:
        """Reference mode's map theta -> Q, written as the released code computes it."""
        w = self.w_base
        return jax.tree_util.tree_map(lambda t, p: (t - (1.0 - w) * p) * (1.0 / w), theta,
                                      backbone)

    def train_prompt(self, params: dict) -> Prompt:
        """The prompt of the training forward: P' (paper) or Q (reference)."""
        backbone, parallel = self._split(params)
        if self.mode == "paper":
            return parallel
        return self._unmix(parallel, backbone)

    def eval_prompt(self, params: dict, split: str) -> Prompt:
        """The prompt for evaluating `split` ('base' or 'new') classes."""
        if split not in ("base", "new"):
            raise ValueError(f"eval split {split!r}; allowed values: ['base', 'new']")
        backbone, parallel = self._split(params)
        if self.mode == "paper":
            w = self.w_base if split == "base" else self.w_new
            return _mix(w, parallel, backbone)
        if split == "base":
            return self._unmix(parallel, backbone)
        if self.w_new == 0.0:
            return backbone
        return self._unmix(_mix(self.w_new, parallel, backbone), backbone)

    @staticmethod
    def trainable_rules(prefix: str = "") -> List[Tuple[str, bool]]:
        """Mask rules (see `dpc_jax.training.masks`) for DPC parameters found under `prefix`
        (e.g. 'prompt/'): the parallel prompt trains, the backbone prompt stays frozen."""
        prefix = re.escape(prefix)
        return [(f"{prefix}backbone(/.*)?", False), (f"{prefix}parallel(/.*)?", True)]
