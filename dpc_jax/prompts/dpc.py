"""DPC's dual prompts (docs/reference/method.md#modes) over any prompt learner's prompt pytree.

The parameter tree is `{'backbone': P, 'parallel': theta}`: P is the stage-1 prompt (a frozen
leaf; `trainable_rules` keeps it out of the optimizer) and theta the trainable parallel prompt,
initialised to P. The learner's `DualRules` (`dpc_jax.prompts.base`) say which leaves of its
prompt are doubled (theta holds only those; the others are P's, shared and frozen) and which
doubled leaves get reference mode's converse map below. The default, and CoOp's: every leaf is
doubled, the converse map acts on `ctx`. Doubled leaves without the map are trained as
themselves, used as trained for base classes and mixed w_n*P' + (1-w_n)*P for new classes, as
the released multi-prompt trainers do. A learner whose tower prompts are
computed from its leaves (MaPLe's coupled vision prompts) gives `DualRules.towers`: mixes with
0 < w < 1 are then taken over the prompts entering the towers, after coupling, which keeps the
decoupling at the prompt level; w = 0 and w = 1 still return P and the trained prompt
themselves (docs/reference/backbones.md#dpc-on-each-backbone).

`config.dpc` fields (see `default_config`):
- mode: 'reference' (default) reproduces the released code ('converse' mode of sple_coop.py);
  'paper' follows the paper's equations.
- w_base (w_b, released SPLE.STACK.WEIGHT), w_new (w_n, SPLE.STACK.WEIGHT_FOR_NEW).
- init_from (read by the trainer, `stages.dpc_model`, not here): a released stage-2 checkpoint
  evaluated instead of training stage 2; its theta is reference mode's parallel prompt
  (learners with a `torch_dpc_trainer`: PromptKD's StackSPLE_PromptKD).

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
from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from dpc_jax import tree as tree_lib
from dpc_jax.prompts.base import DualRules, config_field

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

    def __init__(self, config: ml_collections.ConfigDict, rules: Optional[DualRules] = None):
        mode = config_field(config, "mode", _WHERE)
        if mode not in MODES:
            raise ValueError(f"{_WHERE}.mode={mode!r}; allowed values: {list(MODES)}")
        self.mode = mode
        self.w_base = _check_weight(config_field(config, "w_base", _WHERE), "w_base",
                                    low_open=(mode == "reference"))
        self.w_new = _check_weight(config_field(config, "w_new", _WHERE), "w_new",
                                   low_open=False)
        # Without a learner's rules every leaf is doubled and mapped alike (the paper's formulas
        # applied to the whole prompt); the trainer passes `learner.dual_rules()`.
        self.rules = rules or DualRules(converse=((".*", True),))

    def _decide(self, prompt: Prompt, rules) -> dict:
        return tree_lib.flatten(tree_lib.trainable_mask(prompt, list(rules)))

    def init(self, backbone_prompt: Prompt) -> dict:
        """{'backbone': P, 'parallel': copy of P's doubled leaves}. The copy has its own buffers,
        so donating the parameters to a jitted step never donates one buffer twice."""
        doubled = self._decide(backbone_prompt, self.rules.double)
        flat = tree_lib.flatten(backbone_prompt)
        if not any(doubled.values()):
            raise ValueError(f"the learner's DualRules double no prompt leaf of {sorted(flat)}")
        if all(doubled.values()):  # P's own structure (lists of deep prompts included)
            parallel = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), backbone_prompt)
        else:  # the doubled leaves only, as a nested dict of their paths
            parallel = tree_lib.unflatten({k: jnp.array(v, copy=True) for k, v in flat.items()
                                           if doubled[k]})
        return {"backbone": backbone_prompt, "parallel": parallel}

    def _split(self, params: dict) -> Tuple[Prompt, Prompt]:
        if not isinstance(params, dict) or set(params) != {"backbone", "parallel"}:
            found = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"DPC parameters must be a dict with keys ['backbone', 'parallel']; "
                             f"found {found}")
        return params["backbone"], params["parallel"]

    def _unmix(self, theta, backbone):
        """Reference mode's map theta -> Q, written as the released code computes it."""
        w = self.w_base
        return (theta - (1.0 - w) * backbone) * (1.0 / w)

    def _compose(self, params: dict, leaf_fn) -> Prompt:
        """The full prompt: P's tree with each doubled leaf replaced by
        leaf_fn(path, theta_leaf, p_leaf); shared leaves are P's."""
        backbone, parallel = self._split(params)
        flat_p, flat_t = tree_lib.flatten(backbone), tree_lib.flatten(parallel)
        out = {k: (leaf_fn(k, flat_t[k], v) if k in flat_t else v) for k, v in flat_p.items()}
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(backbone),
                                            [out[k] for k in tree_lib.leaf_paths(backbone)])

    def _converse(self, params: dict) -> dict:
        return self._decide(self._split(params)[0], self.rules.converse)

    def train_prompt(self, params: dict) -> Prompt:
        """The prompt of the training forward: P' (paper) or Q (reference; Q = theta on doubled
        leaves without the converse map)."""
        if self.mode == "paper":
            backbone, parallel = self._split(params)
            if tree_lib.leaf_paths(parallel) == tree_lib.leaf_paths(backbone):
                return parallel  # every leaf doubled: P' itself
            return self._compose(params, lambda k, t, p: t)
        conv = self._converse(params)
        return self._compose(params, lambda k, t, p: self._unmix(t, p) if conv[k] else t)

    def eval_prompt(self, params: dict, split: str) -> Prompt:
        """The prompt for evaluating `split` ('base' or 'new') classes."""
        if split not in ("base", "new"):
            raise ValueError(f"eval split {split!r}; allowed values: ['base', 'new']")
        backbone, _ = self._split(params)
        towers = self.rules.towers
        if self.mode == "paper":
            w = self.w_base if split == "base" else self.w_new
            if w == 0.0:
                return backbone
            if towers is not None and w != 1.0:
                return _mix(w, towers(self.train_prompt(params)), towers(backbone))
            return self._compose(params, lambda k, t, p: _mix(w, t, p))
        if split == "base":
            return self.train_prompt(params)
        if self.w_new == 0.0:
            return backbone
        w = self.w_new
        if towers is not None and w != 1.0:
            # w_n*Q + (1-w_n)*P over the tower prompts (for the text context the same value as
            # the released arithmetic below, up to rounding).
            return _mix(w, towers(self.train_prompt(params)), towers(backbone))
        conv = self._converse(params)
        keep = self._decide(self._split(params)[0], self.rules.new_from_backbone)
        return self._compose(params, lambda k, t, p: (
            p if keep[k] else self._unmix(_mix(w, t, p), p) if conv[k] else _mix(w, t, p)))

    @staticmethod
    def trainable_rules(prefix: str = "") -> List[Tuple[str, bool]]:
        """Mask rules (see `dpc_jax.training.masks`) for DPC parameters found under `prefix`
        (e.g. 'prompt/'): the parallel prompt trains, the backbone prompt stays frozen."""
        prefix = re.escape(prefix)
        return [(f"{prefix}backbone(/.*)?", False), (f"{prefix}parallel(/.*)?", True)]
