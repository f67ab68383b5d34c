"""Shared fixtures: the tiny CLIP architecture and random parameters for it."""

import json

import jax
import numpy as np
import pytest

from dpc_jax.models.clip import abstract_params, get_config
from dpc_jax.models.tokenizer import END_TOKEN, START_TOKEN, bytes_to_unicode


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


def write_tiny_vocab(out_dir, merged_words):
    """A CLIP-style BPE vocabulary (< 1000 tokens): byte symbols, one merge chain per word."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in merged_words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            if (current, part) not in merges:
                merges.append((current, part))
            if current + part not in vocab:
                vocab.append(current + part)
            current += part
    vocab += [START_TOKEN, END_TOKEN]
    with open(out_dir / "vocab.json", "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(out_dir / "merges.txt", "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir
