"""Shared fixtures: the tiny CLIP architecture and random parameters for it."""

import jax
import numpy as np
import pytest

from dpc_jax.models.clip import abstract_params, get_config


def random_clip_params(config, seed=0):
    """Random float32 parameters shaped like `init_params(config)`.

    Drawn with numpy from the abstract tree: Flax's eager `init` costs tens of seconds on a
    loaded 2-core machine; LayerNorm scales sit near 1 and biases are non-zero so that a swapped
    or dropped parameter changes the outputs.
    """
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "logit_scale":
            return np.asarray(np.log(1 / 0.07), np.float32)
        x = rng.standard_normal(leaf.shape)
        x = 1.0 + 0.1 * x if name == "scale" else 0.05 * x
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


@pytest.fixture(scope="session")
def tiny_config():
    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_config):
    return random_clip_params(tiny_config, seed=0)
