"""Parameter pytrees as flat {'a/b/c': leaf} maps: the one path naming used by checkpoints,
conversion, optax masks and DPC's doubling rules; and rule lists that decide a value per leaf
from its path.

A rule is `(regex, value)`; the first rule whose regex matches the whole '/'-joined path
(`re.fullmatch`) decides. Every leaf must be decided by some rule: a leaf that no rule covers is
an error, so a new parameter can never be trained, frozen or doubled by accident.
"""

from __future__ import annotations

import re
from typing import Any, List, Mapping, Sequence, Tuple

import jax

Rules = Sequence[Tuple[str, Any]]


def key_name(key) -> str:
    """The name of one pytree path entry (a dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path) -> str:
    return "/".join(key_name(k) for k in path)


def leaf_paths(tree) -> List[str]:
    """'/'-joined paths of the leaves of `tree`, in `tree_leaves` order."""
    return [path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def flatten(tree) -> dict:
    """{'a/b/c': leaf} of a nested dict of parameters."""
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The nested dict of a {'a/b/c': leaf} map (the inverse of `flatten` for dicts)."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, name = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return tree


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


def rule_values(tree, rules: Rules, value_type=bool):
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
