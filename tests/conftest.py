"""Shared fixtures: the tiny CLIP architecture and random parameters for it."""

import atexit
import json
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

# One persistent XLA compilation cache per test session, shared through the environment with the
# processes the tests start (command-line runs, notebook kernels, the multi-host processes), so
# that a program compiled by one test is loaded by the next. On this 2-core CPU it cut the CPU
# time of tests/test_train.py + tests/test_train_vlp.py from 11m16s to 8m12s (user + sys). A
# cache directory given by the caller is used as it is and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dpc_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

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
