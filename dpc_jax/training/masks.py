"""Which parameters train: big_vision-style rule lists compiled to boolean masks.

A rule is `(regex, trainable)`; a leaf's path is its keys joined by '/' (e.g.
'prompt/parallel/ctx', 'clip/visual/conv1/kernel'). The first rule whose regex matches the whole
path (`re.fullmatch`) decides. Every leaf must be decided by some rule: a leaf that no rule
covers is an error, so a new parameter can never be trained or frozen by accident.

    rules = [('clip/.*', False)] + DualPrompt.trainable_rules('prompt/')
    mask = trainable_mask(params, rules)        # pytree of bools, True = trainable
    tx = dpc_jax.training.optim.make_optimizer(..., mask=mask)
"""

from __future__ import annotations

import re
from typing import Any, List, Sequence, Tuple

import jax

from dpc_jax.tree import leaf_paths

Rules = Sequence[Tuple[str, bool]]
TRAINABLE, FROZEN = "trainable", "frozen"


def _compile(rules: Rules, value_type=bool) -> List[Tuple[re.Pattern, Any]]:
    what = value_type.__name__
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise ValueError(f"mask rules must be a list of (regex, {what}) pairs; got {rules!r}")
    compiled = []
    for i, rule in enumerate(rules):
        if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
                or not isinstance(rule[1], value_type) or (value_type is float
                                                          and isinstance(rule[1], bool))):
            raise ValueError(f"mask rule #{i} is {rule!r}; expected a (regex string, {what}) "
                             f"pair")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"mask rule #{i}: invalid regex {rule[0]!r}: {e}") from e
    return compiled


def trainable_mask(tree, rules: Rules):
    """A pytree of bools shaped like `tree` (True = trainable); raises listing the leaves that no
    rule covers."""
    return rule_values(tree, rules, bool)


def rule_values(tree, rules, value_type=bool):
    """The value of the first matching rule for every leaf of `tree` (a pytree shaped like it;
    e.g. float learning-rate multipliers); raises listing the leaves that no rule covers."""
    compiled = _compile(rules, value_type)
    paths = leaf_paths(tree)
    decisions, uncovered = [], []
    for path in paths:
        decision = next((trainable for pattern, trainable in compiled
                         if pattern.fullmatch(path)), None)
        if decision is None:
            uncovered.append(path)
        decisions.append(decision)
    if uncovered:
        shown = uncovered[:20] + ([f"... ({len(uncovered) - 20} more)"] if len(uncovered) > 20
                                  else [])
        raise ValueError(f"no mask rule matches {len(uncovered)} parameter(s): {shown}; rules: "
                         f"{[r for r, _ in rules]}. Every parameter must be matched by a rule "
                         f"(re.fullmatch on '/'-joined paths)")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), decisions)


def optax_labels(mask) -> Any:
    """`mask` as optax.multi_transform labels: 'trainable' / 'frozen'."""
    return jax.tree_util.tree_map(lambda m: TRAINABLE if m else FROZEN, mask)


def trainable_paths(tree, mask) -> List[str]:
    """Paths of the trainable leaves (for logging what a run optimises)."""
    return [p for p, m in zip(leaf_paths(tree), jax.tree_util.tree_leaves(mask)) if m]
