"""`python -m dpc_jax.data check` (dpc_jax.data.check and __main__)."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dpc_jax.data.__main__ import main

DTD = [f"texture_{i:02d}" for i in range(47)]


def _tree(root, write_images=True):
    """A CoOp DTD tree: per class 3 train, 2 val, 1 test images (tiny JPEGs)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((9, 11, 3), 50, np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    split = {}
    for part, n in (("train", 3), ("val", 2), ("test", 1)):
        split[part] = [[f"{c}/{part}{k}.jpg", y, c] for k in range(n) for y, c in enumerate(DTD)]
        for rel, _, _ in split[part]:
            if write_images:
                path = root / "dtd" / "images" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(jpeg)
    (root / "dtd" / "images").mkdir(parents=True, exist_ok=True)
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return split


def test_cli_json_via_subprocess(tmp_path):
    split = _tree(tmp_path)
    cmd = [sys.executable, "-m", "dpc_jax.data", "check", "--dataset", "dtd", "--root",
           str(tmp_path), "--shots", "2", "--seed", "1", "--subsample", "new", "--json",
           "--list-files"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True
    assert report["classnames"] == DTD[24:]
    assert report["counts"] == {"train": 2 * 23, "val": 2 * 23, "test": 23}
    assert report["provenance"]["fewshot"] == "dassl"
    files = report["train_files"]
    assert len(files) == 46 and all(label in range(23) for _, label in files)
    label_of = {rel: y for rel, y, _ in split["train"]}
    for rel, label in files:  # paths relative to the image folder, labels re-numbered
        assert label_of[rel] - 24 == label
    assert len({rel for rel, _ in files}) == 46


def test_text_report(tmp_path, capsys):
    _tree(tmp_path)
    assert main(["check", "--dataset", "dtd", "--root", str(tmp_path), "--shots", "1"]) == 0
    text = capsys.readouterr().out
    assert "counts: train 47, val 47, test 47" in text
    assert "texture_00, texture_01" in text and text.strip().endswith("OK")


def test_missing_dataset_says_where_and_where_from(tmp_path, capsys):
    assert main(["check", "--dataset", "oxford_pets", "--root", str(tmp_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert os.path.join(str(tmp_path), "oxford_pets") in report["error"]
    assert "robots.ox.ac.uk/~vgg/data/pets" in report["error"]
    assert main(["check", "--dataset", "oxford_pets", "--root", str(tmp_path)]) == 1
    assert "FAILED" in capsys.readouterr().err
    # Not a dataset at all: a bad argument (exit 2, one Error line), not a failed check.
    assert main(["check", "--dataset", "nope", "--root", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: --dataset: unknown dataset 'nope'") and err.count("\n") == 1


def test_missing_and_unreadable_files_are_reported(tmp_path, capsys):
    split = _tree(tmp_path)
    os.remove(tmp_path / "dtd" / "images" / split["test"][3][0])
    (tmp_path / "dtd" / "images" / split["test"][5][0]).write_bytes(b"broken")
    assert main(["check", "--dataset", "dtd", "--root", str(tmp_path), "--shots", "0",
                 "--json", "--verify-images", "--threads", "2"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["missing_files"] == {"train": 0, "val": 0, "test": 1}
    assert report["missing_examples"][0].endswith(split["test"][3][0])
    assert report["unreadable"]["test"] == 2  # the missing one cannot be decoded either
    assert any(split["test"][5][0] in e for e in report["unreadable_examples"])
    assert len(report["problems"]) == 2


def test_bad_flags_exit_with_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["check", "--dataset", "dtd", "--root", str(tmp_path), "--subsample", "half"])
    assert e.value.code == 2


def test_list(capsys):
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 15
    assert {r["name"]: (r["base"], r["new"]) for r in rows}["eurosat"] == (5, 5)
