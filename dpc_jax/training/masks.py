"""Which parameters train: big_vision-style rule lists compiled to boolean masks.

A rule is `(regex, trainable)`; a leaf's path is its keys joined by '/' (e.g.
'prompt/parallel/ctx', 'clip/visual/conv1/kernel'). The first rule whose regex matches the whole
path (`re.fullmatch`) decides. Every leaf must be decided by some rule: a leaf that no rule
covers is an error, so a new parameter can never be trained or frozen by accident. The rule
lists compile in `dpc_jax.tree` (`trainable_mask`, `rule_values`), where DPC's doubling rules
compile too.

    rules = [('clip/.*', False)] + DualPrompt.trainable_rules('prompt/')
    mask = trainable_mask(params, rules)        # pytree of bools, True = trainable
    tx = dpc_jax.training.optim.make_optimizer(..., mask=mask)
"""

from __future__ import annotations

from typing import Any, List

import jax

from dpc_jax.tree import leaf_paths, rule_values, trainable_mask

TRAINABLE, FROZEN = "trainable", "frozen"

__all__ = ["FROZEN", "TRAINABLE", "leaf_paths", "optax_labels", "rule_values", "trainable_mask",
           "trainable_paths"]


def optax_labels(mask) -> Any:
    """`mask` as optax.multi_transform labels: 'trainable' / 'frozen'."""
    return jax.tree_util.tree_map(lambda m: TRAINABLE if m else FROZEN, mask)


def trainable_paths(tree, mask) -> List[str]:
    """Paths of the trainable leaves (for logging what a run optimises)."""
    return [p for p, m in zip(leaf_paths(tree), jax.tree_util.tree_leaves(mask)) if m]
