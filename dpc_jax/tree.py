"""Parameter pytrees as flat {'a/b/c': leaf} maps: the one path naming used by checkpoints,
conversion, optax masks and DPC's doubling rules."""

from __future__ import annotations

from typing import Any, List, Mapping

import jax


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
