"""What a run reads is checked before any stage runs (`checks.preflight`,
`checks.check_resumed_settings`): unreadable training images, missing test images and a resumed
stage with changed settings are one `Error:` line (exit 2), and no stage has run."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from dpc_jax.data.transforms import ImageLoadError, read_image
from dpc_jax.models.checkpoint import asset_dir
from helpers import DPC_COOP, train_cli

CLASSES = ["apple", "banana", "cherry", "date", "elder_berry", "fig"]  # 3 base, 3 new


def _make_dataset(root):
    """A folder dataset with a split.json (which may name files that are not there)."""
    split = {}
    for part, n in (("train", 4), ("val", 1), ("test", 2)):
        split[part] = []
        for label, name in enumerate(CLASSES):
            for k in range(n):
                rel = f"images/{name}_{part}{k}.jpg"
                (root / "images").mkdir(parents=True, exist_ok=True)
                rgb = np.full((32, 32, 3), (label * 40, k * 60, 200), np.uint8)
                Image.fromarray(rgb).save(root / rel, quality=95)
                split[part].append([rel, label, name])
    (root / "split.json").write_text(json.dumps(split))
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """The world CLIP copied to a folder (the shipped one is for the world datasets only)."""
    out = tmp_path_factory.mktemp("clip") / "clip"
    shutil.copytree(asset_dir(), out)
    return out


def _flags(root, clip_dir, **changes):
    settings = {"clip.tokenizer": clip_dir, "stored_size": 0, "shots": 4, "progress": False,
                "backbone.epochs": 1, "backbone.batch_size": 4, "batch_size": 2,
                "dpc.epochs": 1, "dhno.top_k": 2, "optim.warmup_epochs": 0, **changes}
    return [f"--config={DPC_COOP}:dataset=folder,root={root},clip={clip_dir}",
            *(f"--config.{k}={v}" for k, v in settings.items())]


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("Error:")]


def test_image_load_error_is_a_user_error_naming_the_file(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=str(bad)) as e:
        read_image(str(bad))
    assert isinstance(e.value, ImageLoadError)


def test_truncated_training_image_is_refused_before_zero_shot(tmp_path, clip_dir):
    root = _make_dataset(tmp_path / "d")
    bad = root / "images" / "banana_train2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    proc = train_cli(tmp_path, *_flags(root, clip_dir))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _error_lines(proc)
    assert len(errors) == 1 and str(bad) in errors[0], proc.stderr[-3000:]
    assert "few-shot train split" in errors[0] and "skip_bad_images=True" in errors[0]
    assert "--verify-images" in errors[0] and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("w/seed_*/zeroshot"))
    # config.skip_bad_images=True still drops it and trains.
    proc = train_cli(tmp_path, *_flags(root, clip_dir, skip_bad_images=True,
                                       stages="backbone"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped 1 unreadable image(s)" in proc.stdout + proc.stderr


def test_missing_test_image_is_refused_before_zero_shot(tmp_path, clip_dir):
    root = _make_dataset(tmp_path / "d")
    gone = root / "images" / "fig_test1.jpg"
    gone.unlink()
    proc = train_cli(tmp_path, *_flags(root, clip_dir))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _error_lines(proc)
    assert len(errors) == 1 and str(gone) in errors[0], proc.stderr[-3000:]
    assert "new test split" in errors[0] and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("w/seed_*/zeroshot"))


def test_changed_settings_are_refused_before_any_seed_runs(tmp_path, clip_dir):
    """A finished seed-2 run rerun with seeds 1,2 and another backbone.lr: refused before seed
    1 (which would run first, and whose stages would all run) or seed 2's zero-shot runs."""
    root = _make_dataset(tmp_path / "d")
    proc = train_cli(tmp_path, *_flags(root, clip_dir, stages="backbone", seeds=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "w" / "seed_2" / "backbone" / "stage.json").is_file()
    proc = train_cli(tmp_path, *_flags(root, clip_dir, stages="zeroshot,backbone", seeds="1,2",
                                       **{"backbone.lr": 0.5}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _error_lines(proc)
    assert len(errors) == 1 and "seed_2" in errors[0], proc.stderr[-3000:]
    assert "config.backbone.lr" in errors[0] and "-> 0.5" in errors[0]
    assert not (tmp_path / "w" / "seed_1").exists()  # seed 1 never ran
    assert not (tmp_path / "w" / "seed_2" / "zeroshot").exists()


def test_a_resumed_teachers_changed_settings_are_refused_up_front(tmp_path):
    """The teacher's stage 1 sits in seed_N/teacher/backbone: its settings are compared with
    the rest before any stage runs."""
    from dpc_jax.training import checkpoints, checks, teacher, train_lib
    from helpers import REPO

    config = train_lib.load_config(os.path.join(REPO, "configs", "dpc_promptkd.py"))
    stage_dir = str(tmp_path / "seed_1" / "teacher" / "backbone")
    checkpoints.check_stage_settings(stage_dir, 1, teacher.teacher_config(config))
    checks.check_resumed_settings(config, str(tmp_path), [1], ["teacher", "backbone"], True)
    config.backbone.teacher.lr = 0.5
    with pytest.raises(ValueError, match=r"teacher/backbone was trained with other settings; "
                                         r"changed: config\.backbone\.lr 0\.001 -> 0\.5"):
        checks.check_resumed_settings(config, str(tmp_path), [1], ["teacher", "backbone"], True)
