"""Your own images as a dataset (`dataset=folder,root=DIR`, dpc_jax/data/folder.py)."""

import glob
import json
import os
import shutil

import numpy as np
import pytest

from dpc_jax.data import base, registry, sources
from dpc_jax.data.__main__ import main
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.training import train_lib
from helpers import DPC_COOP, FOLDERS, REPO, make_folder, make_split_tree, write_class_image

# Sorted folder order is the label order: 'Zebra' < 'ant' (upper case first) < ... .
SORTED = ["Zebra", "ant", "cat", "golden_retriever", "tabby_cat"]


def _names(split):
    return [split.describe(i) for i in range(len(split))]


def test_class_folders_with_the_defaults(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "train" / "cat" / ".hidden.jpg").write_bytes(b"not an image")
    (root / "train" / "cat" / "notes.txt").write_text("not an image either")
    data, prov = sources.load_dataset("folder", str(root), shots=0)
    assert data.name == "folder"
    assert data.classnames == [c.replace("_", " ") for c in SORTED]
    assert data.templates == ["a photo of a {}."]
    assert prov["layout"] == "class folders" and prov["templates"] == "default"
    # No val/: one of each class's 5 training images (20%, CoOp's split_trainval) is val.
    assert np.bincount(data.train.labels).tolist() == [4] * 5
    assert np.bincount(data.val.labels).tolist() == [1] * 5
    assert np.bincount(data.test.labels).tolist() == [2] * 5
    assert "carved" in prov["val"]
    train, val = set(_names(data.train)), set(_names(data.val))
    assert not train & val
    assert train | val == {str(p) for p in root.glob("train/*/[0-9]*.*")}
    for split in (data.train, data.val, data.test):  # labels are the sorted folder index
        for i in range(len(split)):
            assert split.describe(i).split(os.sep)[-2] == SORTED[int(split.labels[i])]
    assert data.train.load_image(0, 16).shape == (16, 16, 3)
    # The carved val does not depend on the run seed, nor change between reads.
    again, _ = sources.load_dataset("folder", str(root), shots=0, seed=7)
    assert _names(again.val) == _names(data.val)


def test_classnames_and_templates_files(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "classnames.txt").write_text("golden_retriever  Golden Retriever dog\n\n"
                                         "Zebra zebra\n")
    (root / "templates.txt").write_text("a photo of a {}.\n\nan image of the {}, small.\n")
    data, prov = sources.load_dataset("folder", str(root), shots=0)
    # Listed folders take the file's names, the others keep their folder names.
    assert data.classnames == ["zebra", "ant", "cat", "Golden Retriever dog", "tabby cat"]
    assert data.templates == ["a photo of a {}.", "an image of the {}, small."]
    assert prov["classnames"].endswith("classnames.txt")
    assert prov["templates"].endswith("templates.txt")


def test_val_folder_is_read_when_present(tmp_path):
    root = make_folder(tmp_path / "d", {"train": 2, "val": 3, "test": 1})
    data, prov = sources.load_dataset("folder", str(root), shots=0)
    assert prov["val"] == str(root / "val")
    assert np.bincount(data.train.labels).tolist() == [2] * 5
    assert np.bincount(data.val.labels).tolist() == [3] * 5
    assert all(os.sep + "val" + os.sep in p for p in _names(data.val))


def test_split_json_replaces_the_folders(tmp_path):
    root = make_folder(tmp_path / "d", {"train": 1, "test": 1})  # ignored: split.json wins
    split = {}
    for part, n in (("train", 3), ("val", 1), ("test", 2)):
        split[part] = []
        for label, cname in enumerate(["red fox", "owl"]):
            for k in range(n):
                rel = f"images/{cname.replace(' ', '_')}_{part}{k}.png"
                write_class_image(root / rel, label + k)
                split[part].append([rel, label, cname])
    (root / "split.json").write_text(json.dumps(split))
    data, prov = sources.load_dataset("folder", str(root), shots=2, seed=1)
    assert prov["layout"] == str(root / "split.json")
    assert data.classnames == ["red fox", "owl"]
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 4)
    assert data.test.describe(0) == str(root / "images" / "red_fox_test0.png")
    assert main(["check", "--dataset", "folder", "--root", str(root), "--shots", "2",
                 "--verify-images"]) == 0
    (root / "classnames.txt").write_text("red_fox fox\n")
    with pytest.raises(ValueError, match="both split.json and classnames.txt"):
        sources.load_dataset("folder", str(root))


def test_base_new_halves_and_few_shot_sampling(tmp_path, capsys):
    root = make_folder(tmp_path / "d", {"train": {c: 6 for c in FOLDERS} | {"ant": 3},
                                        "test": 2})
    data = sources.build_dataset("folder", str(root), shots=4, seed=1)
    # 'ant' has 3 - 1 carved = 2 training images: all are kept, and one warning line says so.
    assert np.bincount(data.train.labels).tolist() == [4, 2, 4, 4, 4]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: folder ")
    assert "1 class(es) have fewer than 4 training images" in err[0] and "'ant' 2" in err[0]
    assert np.bincount(data.val.labels).tolist() == [1] * 5  # min(shots, 4) of 1 each
    base_half = base.subsample_classes(data, "base")
    new_half = base.subsample_classes(data, "new")
    assert base_half.classnames == ["Zebra", "ant", "cat"]
    assert new_half.classnames == ["golden retriever", "tabby cat"]
    assert np.bincount(new_half.train.labels).tolist() == [4, 4]
    assert np.bincount(new_half.test.labels).tolist() == [2, 2]
    # The subset is Dassl's for the seed: the same seed again, another seed differs.
    again = sources.build_dataset("folder", str(root), shots=4, seed=1)
    other = sources.build_dataset("folder", str(root), shots=4, seed=2)
    assert _names(again.train) == _names(data.train)
    assert _names(other.train) != _names(data.train)
    assert sources.build_dataset("folder", str(root), shots=1, seed=1).train.labels.tolist() \
        == [0, 1, 2, 3, 4]


def test_data_check_command(tmp_path, capsys):
    root = make_folder(tmp_path / "d")
    assert main(["check", "--dataset", "folder", "--root", str(root), "--shots", "2",
                 "--subsample", "new", "--verify-images"]) == 0
    text = capsys.readouterr().out
    assert "dataset: folder (your own images), root " + str(root) in text
    assert "classes (2, subsample new): golden retriever, tabby cat" in text
    assert "counts: train 4, val 2, test 4" in text and text.strip().endswith("OK")
    (root / "test" / "cat" / "01.png").write_bytes(b"broken")
    assert main(["check", "--dataset", "folder", "--root", str(root), "--shots", "2",
                 "--verify-images", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["unreadable"]["test"] == 1
    assert str(root / "test" / "cat" / "01.png") in report["unreadable_examples"][0]
    shutil.rmtree(root / "test" / "cat")
    assert main(["check", "--dataset", "folder", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("folder: FAILED")
    assert f"{root / 'test'} has no folder for class 'cat' of {root / 'train'}" in err
    assert main(["list"]) == 0
    assert "folder           your own images: DIR/train/<class>/<image>" in capsys.readouterr().out


def _break(root, what):
    if what == "no class folders":
        for d in (root / "train").iterdir():
            shutil.rmtree(d)
    elif what == "test class not in train":
        write_class_image(root / "test" / "dog" / "0.jpg", 1)
    elif what == "unknown classnames folder":
        (root / "classnames.txt").write_text("cat house cat\ndgo dog\n")
    elif what == "classnames line without a name":
        (root / "classnames.txt").write_text("cat\n")
    elif what == "template without {}":
        (root / "templates.txt").write_text("a photo of a {}.\na photo.\n")
    elif what == "template with other braces":
        (root / "templates.txt").write_text("a {} photo {x}.\n")
    elif what == "too few images to carve val":
        for p in sorted((root / "train" / "ant").iterdir())[2:]:
            p.unlink()
    elif what == "empty class folder":
        for p in (root / "train" / "ant").iterdir():
            p.unlink()
    elif what == "no test folder":
        shutil.rmtree(root / "test")
    elif what == "two classes with one name":
        (root / "classnames.txt").write_text("cat tabby cat\n")


@pytest.mark.parametrize("what,error,message", [
    ("no class folders", ValueError,
     "{root}/train has no class folders; expected {root}/train/<class>/<image>"),
    ("test class not in train", ValueError,
     "{root}/test/dog: class 'dog' has no folder in {root}/train; every class needs training "
     "images"),
    ("unknown classnames folder", ValueError,
     "{root}/classnames.txt:2: 'dgo' is not a class folder of {root}/train (its class folders: "
     "Zebra, ant, cat, golden_retriever, tabby_cat)"),
    ("classnames line without a name", ValueError,
     "{root}/classnames.txt:1: 'cat'; expected '<folder name> <class name>'"),
    ("template without {}", ValueError,
     "{root}/templates.txt:2: template 'a photo.'; expected exactly one '{{}}'"),
    ("template with other braces", ValueError, "{root}/templates.txt:1: template 'a {{}} photo"),
    ("too few images to carve val", ValueError,
     "{root}/train/ant has 2 image(s); carving the validation split (20% of each class, as "
     "CoOp's split_trainval) needs at least 3 per class: add images, or give "
     "{root}/val/<class>/<image> folders"),
    ("empty class folder", ValueError, "{root}/train/ant has no images; expected image files"),
    ("no test folder", FileNotFoundError,
     "{root}/test not found; expected {root}/train/<class>/<image> and "
     "{root}/test/<class>/<image> (optionally {root}/val/<class>/<image>), or {root}/split.json"),
    ("two classes with one name", ValueError,
     "class folders 'cat' and 'tabby_cat' of {root}/train are both named 'tabby cat'"),
])
def test_bad_folders_name_the_path_and_what_was_expected(tmp_path, what, error, message):
    root = make_folder(tmp_path / "d")
    _break(root, what)
    with pytest.raises(error) as e:
        sources.load_dataset("folder", str(root))
    assert message.format(root=root) in str(e.value)


def test_root_and_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder dataset: .*nowhere not found"):
        sources.load_dataset("folder", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"d/train not found; expected"):
        sources.load_dataset("folder", str((tmp_path / "d").mkdir() or tmp_path / "d"))
    with pytest.raises(ValueError, match="source='tfds' does not apply"):
        sources.load_dataset("folder", str(tmp_path), source="tfds")
    with pytest.raises(ValueError, match="root is required for dataset 'folder'"):
        sources.load_dataset("folder", "")


def test_config_argument_and_protocols(tmp_path):
    """`dataset=folder,root=DIR` is accepted by every config file; the world CLIP is refused;
    few_shot and cross_dataset read their sets from the folder (the targets from the same
    root)."""
    from dpc_jax.evaluation import protocols

    root = make_folder(tmp_path / "d")
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        config = train_lib.load_config(f"{path}:dataset=folder,root={root}")
        assert (config.dataset, config.root) == ("folder", str(root)), path
        train_lib.check_config(config)
    config = train_lib.load_config(f"{DPC_COOP}:dataset=folder,root={root}")
    assert (config.dataset, config.root, config.source) == ("folder", str(root), "coop")
    train_lib.check_config(config)
    config.clip.source = "world"
    with pytest.raises(ValueError, match="world CLIP belongs to the world datasets only"):
        train_lib.check_config(config)
    config.clip.source = "ViT-B/16"
    config.protocol, config.shots = "few_shot", 2
    source, new, eval_sets = protocols.get(config).data(1)
    assert new is None and len(source.classnames) == 5 and len(source.train) == 10
    assert [(s.name, len(s.test)) for s in eval_sets] == [("folder", 10)]
    make_split_tree(root, "eurosat", list(registry.EUROSAT_RENAMED.values()),
                    {"train": 1, "val": 1, "test": 1})
    config.protocol, config.targets = "cross_dataset", "eurosat"
    _, _, eval_sets = protocols.get(config).data(1)
    assert [(s.name, len(s.test)) for s in eval_sets] == [("folder", 10), ("eurosat", 10)]


def test_end_to_end_on_a_folder(tmp_path):
    """Zero-shot, CoOp and CoOp+DPC on a folder of six classes with a CLIP written to disk (a
    copy of the world's: the shipped world CLIP itself is for the world datasets only)."""
    classes = ["apple", "banana", "cherry", "date", "elder_berry", "fig"]
    root = make_folder(tmp_path / "d", {"train": 5, "test": 2}, classes)
    clip_dir = tmp_path / "clip"
    shutil.copytree(asset_dir(), clip_dir)
    config = train_lib.load_config(f"{DPC_COOP}:dataset=folder,root={root},clip={clip_dir}")
    config.update_from_flattened_dict({
        "clip.tokenizer": str(clip_dir), "stored_size": 0, "shots": 4, "progress": False,
        "backbone.epochs": 2, "backbone.batch_size": 4, "batch_size": 2, "dpc.epochs": 2,
        "dhno.top_k": 2})  # 3 base classes: K must leave a wrong class
    assert config.stages == "zeroshot,backbone,dpc"
    workdir = tmp_path / "run"
    returned = train_lib.train_and_evaluate(config, str(workdir))
    results = json.loads((workdir / "results.json").read_text())
    for stage in ("zeroshot", "backbone", "dpc"):
        r = results[stage]
        assert r == returned[stage]
        # 3 classes x 2 test images per half: accuracies are multiples of 1/6.
        for half in ("base", "new"):
            assert 0 <= r[half] <= 100 and (r[half] * 6 / 100) == pytest.approx(
                round(r[half] * 6 / 100), abs=1e-6)
        hm = 0 if r["base"] + r["new"] == 0 else 2 * r["base"] * r["new"] / (r["base"] + r["new"])
        assert r["hm"] == pytest.approx(hm, abs=1e-6)
    assert results["dpc"]["new"] == results["backbone"]["new"]
