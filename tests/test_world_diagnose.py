"""The world's headroom diagnostics: probe, attribute accuracy, report, command line."""

import subprocess
import sys

import numpy as np

from dpc_jax import diagnose_world
from dpc_jax.data import world


def test_probe_fits_separable_features_and_picks_weight_decay_on_val():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)).astype(np.float32)

    def sample(n):
        y = np.repeat(np.arange(5), n)
        x = centres[y] + 0.1 * rng.normal(size=(len(y), 16)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True), y

    out = diagnose_world.probe_accuracy(sample(8), sample(4), sample(20), 5)
    assert out["test"] == 100.0 and out["val"] == 100.0
    assert out["weight_decay"] in diagnose_world.PROBE_WEIGHT_DECAYS
    # Chance-level labels stay near chance on held-out data.
    x, _ = sample(8)
    noise = diagnose_world.probe_accuracy((x, rng.integers(0, 5, len(x))), sample(4),
                                          (x, rng.integers(0, 5, len(x))), 5)
    assert noise["test"] < 60.0


def test_attribute_accuracy_counts_colour_and_shape_separately():
    names = ["red circle", "red square", "blue circle", "blue square"]
    labels = np.array([0, 0, 1, 2])
    # right; red circle as red square (shape wrong); red square as blue square (colour
    # wrong); blue circle as red circle (colour wrong)
    pred = np.array([0, 1, 3, 0])
    acc = diagnose_world.attribute_accuracy(pred, labels, names)
    assert acc == {"colour": 50.0, "shape": 75.0}


def test_report_lists_every_classifier():
    row = {"classes": 32, "test_images": 1024,
           "zeroshot": {"accuracy": 50.0, "colour": 60.0, "shape": 70.0},
           "an old photo of a {}.": {"accuracy": 80.0, "colour": 90.0, "shape": 85.0},
           "probe": {"test": 81.0, "val": 82.0, "weight_decay": 1e-4}}
    report = diagnose_world.format_report({
        "clip": "c", "domain": "world", "seed": 1, "logit_scale": 100.0,
        "halves": {"base": row, "new": row},
        "pretrain_64way": {"images": 64, "accuracy": 90.0, "colour": 99.0, "shape": 91.0}})
    assert report.count("linear probe") == 2 and report.count("an old photo of a") == 2
    assert "81.00" in report and "temperature exp(logit_scale) = 100.0" in report


def test_command_line_names_the_subcommand():
    out = subprocess.run([sys.executable, "-m", "dpc_jax.data"], capture_output=True,
                         text=True)
    assert out.returncode != 0 and "diagnose" in out.stderr
    out = subprocess.run([sys.executable, "-m", "dpc_jax.data", "diagnose", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "python -m dpc_jax.data diagnose" in out.stdout
    assert "--prompt" in out.stdout
    assert world.DEFAULT_DOMAIN in world.DOMAINS
