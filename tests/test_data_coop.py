"""The CoOp/Dassl folder layout (dpc_jax.data.coop, sources.build_dataset with source='coop')."""

import collections
import json
import os
import pickle
import random
import sys
import types

import numpy as np
import pytest
from PIL import Image

from dpc_jax.data import base, coop, registry
from dpc_jax.data.sources import build_dataset, load_dataset
from dpc_jax.data.transforms import ImageLoadError, clip_test_transform
from helpers import _imagenet_tree, _jpeg, make_split_tree


PETS = [f"breed_{i:02d}" for i in range(37)]


@pytest.fixture
def pets(tmp_path):
    counts = {"train": [3 + (i % 3) for i in range(37)], "val": 2, "test": 1}
    # Image files are written only where a test decodes them (file creation dominates time).
    split = make_split_tree(tmp_path, "oxford_pets", PETS, counts, write_images=False)
    return tmp_path, split


def _write_image(root, rel, value=0):
    path = root / "oxford_pets" / "images" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg(value))
    return path


def test_split_file_is_read_exactly(pets):
    root, split = pets
    data = build_dataset("oxford_pets", str(root), shots=0)
    assert data.classnames == PETS
    assert data.templates == ["a photo of a {}, a type of pet."]
    for part in ("train", "val", "test"):
        s = getattr(data, part)
        assert len(s) == len(split[part])
        assert s.labels.tolist() == [e[1] for e in split[part]]
        assert [s.relpaths[i] for i in range(len(s))] == [e[0] for e in split[part]]
    path = str(_write_image(root, split["test"][5][0], 99))
    assert data.test.describe(5) == path
    want = clip_test_transform(Image.open(path).convert("RGB"), 16)
    np.testing.assert_array_equal(data.test.load_image(5, 16), want)


def _dassl_reference(items, shots, seed):
    """Dassl's generate_fewshot_dataset as written (global random.seed + random.sample)."""
    state = random.getstate()
    try:
        random.seed(seed)
        out = []
        for k, part in ((shots, items["train"]), (min(shots, 4), items["val"])):
            tracker = collections.defaultdict(list)
            for item in part:
                tracker[item[1]].append(item)
            chosen = []
            for _, group in tracker.items():
                chosen.extend(random.sample(group, k) if len(group) >= k else group)
            out.append([x[0] for x in chosen])
        return out
    finally:
        random.setstate(state)


@pytest.mark.parametrize("shots,seed", [(4, 1), (4, 2), (2, 3), (16, 1)])
def test_fewshot_equals_the_dassl_algorithm(pets, shots, seed):
    root, split = pets
    data, prov = load_dataset("oxford_pets", str(root), shots=shots, seed=seed)
    assert prov["fewshot"] == "dassl"
    want_train, want_val = _dassl_reference(split, shots, seed)
    got_train = [data.train.describe(i) for i in range(len(data.train))]
    img = os.path.join(str(root), "oxford_pets", "images")
    assert got_train == [os.path.join(img, p) for p in want_train]
    assert [data.val.describe(i) for i in range(len(data.val))] == [
        os.path.join(img, p) for p in want_val]
    # ... and equals base.fewshot applied to the full dataset.
    full = base.fewshot(build_dataset("oxford_pets", str(root), shots=0), shots, seed)
    assert [full.train.describe(i) for i in range(len(full.train))] == got_train
    # Classes with fewer than `shots` items are kept whole (repeat=False).
    per_class = collections.Counter(data.train.labels.tolist())
    sizes = [3 + (i % 3) for i in range(37)]
    assert [per_class[y] for y in range(37)] == [min(shots, n) for n in sizes]


def test_base_and_new_halves(pets):
    root, _ = pets
    b = build_dataset("oxford_pets", str(root), shots=2, seed=1, subsample="base")
    n = build_dataset("oxford_pets", str(root), shots=2, seed=1, subsample="new")
    assert b.classnames == PETS[:19] and n.classnames == PETS[19:]
    assert sorted(set(b.train.labels.tolist())) == list(range(19))
    assert sorted(set(n.test.labels.tolist())) == list(range(18))
    full = build_dataset("oxford_pets", str(root), shots=2, seed=1)
    # The new split's item 0 is the first test item of class >= 19, re-labelled by -19.
    first = next(i for i, y in enumerate(full.test.labels) if y >= 19)
    assert n.test.describe(0) == full.test.describe(first)
    assert n.test.labels[0] == full.test.labels[first] - 19


def _write_dassl_pickle(path, payload):
    """Pickle `payload` ({key: [(impath, label, classname)]}) as Dassl would: Datum objects of
    the class dassl.data.datasets.base_dataset.Datum. The fake module exists only here."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType(names[-1])

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label = impath, label
            self._domain, self._classname = domain, classname

    Datum.__module__ = names[-1]
    Datum.__qualname__ = "Datum"
    mod.Datum = Datum
    try:
        for n in names[:-1]:
            sys.modules[n] = types.ModuleType(n)
        sys.modules[names[-1]] = mod
        data = {k: [Datum(p, y, 0, c) for p, y, c in v] for k, v in payload.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def test_dassl_pickle_is_read_without_dassl_and_rerooted(pets):
    root, split = pets
    other = "/home/someone/DATA/oxford_pets/images/"
    # A selection that differs from what the Dassl algorithm gives for seed 1.
    train = [(other + e[0], e[1], e[2]) for e in split["train"][::7]]
    val = [("C:\\data\\oxford_pets\\images\\" + e[0].replace("/", "\\"), e[1], e[2])
           for e in split["val"][:5]]
    pkl = root / "oxford_pets" / "split_fewshot" / "shot_16-seed_1.pkl"
    _write_dassl_pickle(pkl, {"train": train, "val": val})
    assert "dassl" not in sys.modules
    data, prov = load_dataset("oxford_pets", str(root), shots=16, seed=1)
    assert "dassl" not in sys.modules
    assert prov["fewshot"] == "pickle" and prov["fewshot_matches_dassl"] is False
    img = os.path.join(str(root), "oxford_pets", "images")
    assert [data.train.describe(i) for i in range(len(data.train))] == [
        os.path.join(img, e[0]) for e in split["train"][::7]]
    assert data.train.labels.tolist() == [e[1] for e in split["train"][::7]]
    assert [data.val.describe(i) for i in range(len(data.val))] == [
        os.path.join(img, e[0]) for e in split["val"][:5]]
    _write_image(root, split["train"][0][0])
    data.train.load_image(0, 8)  # the re-rooted path is the local file
    # Other seeds have no pickle: the Dassl algorithm is used.
    assert load_dataset("oxford_pets", str(root), shots=16, seed=2)[1]["fewshot"] == "dassl"
    # use_fewshot_pickle=False ignores the file.
    _, prov = load_dataset("oxford_pets", str(root), shots=16, seed=1, use_fewshot_pickle=False)
    assert prov["fewshot"] == "dassl"


def test_pickle_of_the_dassl_selection_matches(pets):
    root, split = pets
    want_train, want_val = _dassl_reference(split, 4, 1)
    label = {e[0]: (e[1], e[2]) for part in split.values() for e in part}
    payload = {"train": [("/x/oxford_pets/images/" + p, *label[p]) for p in want_train],
               "val": [("/x/oxford_pets/images/" + p, *label[p]) for p in want_val]}
    _write_dassl_pickle(root / "oxford_pets" / "split_fewshot" / "shot_4-seed_1.pkl", payload)
    _, prov = load_dataset("oxford_pets", str(root), shots=4, seed=1)
    assert prov["fewshot"] == "pickle" and prov["fewshot_matches_dassl"] is True


def test_pickle_errors(pets):
    root, split = pets
    pkl = root / "oxford_pets" / "split_fewshot" / "shot_1-seed_1.pkl"
    e = split["train"][0]
    _write_dassl_pickle(pkl, {"train": [("/elsewhere/pics/" + e[0], e[1], e[2])], "val": []})
    with pytest.raises(coop.SplitFileError, match="oxford_pets/images.*cannot be mapped"):
        build_dataset("oxford_pets", str(root), shots=1, seed=1)
    _write_dassl_pickle(pkl, {"train": [("/a/oxford_pets/images/" + e[0], e[1], "cat")],
                              "val": []})
    with pytest.raises(coop.SplitFileError, match="another split"):
        build_dataset("oxford_pets", str(root), shots=1, seed=1)
    with open(pkl, "wb") as f:  # a pickle with an arbitrary class is refused
        pickle.dump({"train": [collections.OrderedDict()]}, f)
    with open(pkl, "wb") as f:
        pickle.dump({"train": [types.SimpleNamespace()]}, f)
    with pytest.raises(coop.SplitFileError, match="refusing"):
        build_dataset("oxford_pets", str(root), shots=1, seed=1)


def test_reroot():
    info = registry.get("stanford_cars")  # image folder = the dataset folder
    assert coop.reroot("/d/stanford_cars/cars_train/00001.jpg", info, "/l/stanford_cars") == \
        "cars_train/00001.jpg"
    info = registry.get("oxford_pets")
    assert coop.reroot("/l/oxford_pets/images/a.jpg", info, "/l/oxford_pets/images") == "a.jpg"
    assert coop.reroot("D:\\x\\oxford_pets\\images\\a\\b.jpg", info, "/l") == "a/b.jpg"
    # The last occurrence wins (a root that itself contains the marker).
    assert coop.reroot("/oxford_pets/images/oxford_pets/images/c.jpg", info, "/l") == "c.jpg"


def test_stanford_cars_paths_are_relative_to_the_dataset_folder(tmp_path):
    names = [f"{2000 + i % 12} Make Model{i}" for i in range(196)]
    split = make_split_tree(tmp_path, "stanford_cars", names, {"train": 1, "val": 1, "test": 1},
                            write_images=False)
    data = build_dataset("stanford_cars", str(tmp_path), shots=0)
    assert data.train.describe(0) == os.path.join(str(tmp_path), "stanford_cars",
                                                  split["train"][0][0])
    assert data.classnames[0] == "2000 Make Model0"


def test_layout_errors_say_what_where_and_where_from(tmp_path, pets):
    root, _ = pets
    with pytest.raises(coop.DatasetNotFoundError, match="data root.*does_not_exist"):
        build_dataset("oxford_pets", str(tmp_path / "does_not_exist"))
    with pytest.raises(coop.DatasetNotFoundError) as e:
        build_dataset("dtd", str(root))
    msg = str(e.value)
    assert "dataset folder 'dtd'" in msg and str(root) in msg and "robots.ox.ac.uk" in msg
    os.remove(root / "oxford_pets" / "split_zhou_OxfordPets.json")
    with pytest.raises(coop.DatasetNotFoundError) as e:
        build_dataset("oxford_pets", str(root))
    msg = str(e.value)
    assert "split_zhou_OxfordPets.json" in msg and "DATASETS.md" in msg


def test_split_file_content_errors(tmp_path):
    eurosat = list(registry.EUROSAT_RENAMED.values())
    make_split_tree(tmp_path, "eurosat", eurosat, {"train": 1, "val": 1, "test": 1},
                    write_images=False)
    data = build_dataset("eurosat", str(tmp_path), shots=0)
    assert data.classnames == eurosat
    assert data.templates == ["a centered satellite photo of {}."]
    # A class the registry does not know (EuroSAT's names are fixed by CoOp's reader).
    make_split_tree(tmp_path, "eurosat", eurosat[:9] + ["Forest Land"],
                    {"train": 1, "val": 1, "test": 1}, write_images=False)
    with pytest.raises(coop.SplitFileError, match="unknown eurosat classes.*Forest Land"):
        build_dataset("eurosat", str(tmp_path), shots=0)
    # Raw folder names that CoOp renames: the file was not made by CoOp's reader.
    make_split_tree(tmp_path, "eurosat", ["AnnualCrop"] + eurosat[1:],
                    {"train": 1, "val": 1, "test": 1}, write_images=False)
    with pytest.raises(coop.SplitFileError, match="AnnualCrop"):
        build_dataset("eurosat", str(tmp_path), shots=0)
    # Wrong number of classes.
    make_split_tree(tmp_path, "dtd", [f"t{i}" for i in range(46)],
                    {"train": 1, "val": 1, "test": 1}, write_images=False)
    with pytest.raises(coop.SplitFileError, match="46 classes, but dtd has 47"):
        build_dataset("dtd", str(tmp_path), shots=0)
    # One label with two names; a malformed entry; broken JSON.
    split = make_split_tree(tmp_path, "dtd", [f"t{i}" for i in range(47)],
                            {"train": 1, "val": 1, "test": 1}, write_images=False)
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split["test"][0] = [split["test"][0][0], split["test"][0][1], "other"]
    path.write_text(json.dumps(split))
    with pytest.raises(coop.SplitFileError, match="label .* but 'other' at test\\[0\\]"):
        build_dataset("dtd", str(tmp_path), shots=0)
    split["test"][0] = ["only/path.jpg", 3]
    path.write_text(json.dumps(split))
    with pytest.raises(coop.SplitFileError, match="test\\[0\\].*expected \\[relative path"):
        build_dataset("dtd", str(tmp_path), shots=0)
    path.write_text("{not json")
    with pytest.raises(coop.SplitFileError, match="not valid JSON"):
        build_dataset("dtd", str(tmp_path), shots=0)


def test_caltech_raw_names_are_rejected(tmp_path):
    names = ["Faces"] + [f"c{i}" for i in range(99)]
    make_split_tree(tmp_path, "caltech101", names, {"train": 1, "val": 1, "test": 1},
                    write_images=False)
    with pytest.raises(coop.SplitFileError, match="Faces"):
        build_dataset("caltech101", str(tmp_path), shots=0)


def test_unreadable_image_fails_with_its_path(pets):
    root, split = pets
    bad = _write_image(root, split["test"][0][0])
    bad.write_bytes(b"garbage")
    data = build_dataset("oxford_pets", str(root), shots=1)
    with pytest.raises(ImageLoadError, match=str(bad)):
        data.test.load_image(0, 8)


def test_imagenet_folders_val_is_test_and_fewshot_train_only(tmp_path):
    wnids = _imagenet_tree(tmp_path)
    data, prov = load_dataset("imagenet", str(tmp_path), shots=1, seed=1)
    assert data.classnames[:2] == ["class 0", "class 1"] and len(data.classnames) == 1000
    assert len(data.train) == 1000 and len(data.test) == 1000 and data.val is data.test
    assert data.test.relpaths[0] == os.path.join("val", wnids[0], f"{wnids[0]}_0.JPEG")
    full = build_dataset("imagenet", str(tmp_path), shots=0)
    assert full.train.relpaths[:2] == [os.path.join("train", wnids[0], f"{wnids[0]}_{k}.JPEG")
                                       for k in range(2)]
    rng = random.Random(1)
    idx = base.dassl_fewshot_indices(full.train.labels, 1, rng)
    assert [data.train.describe(i) for i in range(1000)] == [full.train.describe(i) for i in idx]
    b = build_dataset("imagenet", str(tmp_path), shots=1, subsample="base")
    assert len(b.classnames) == 500 and len(b.val) == 500 and len(b.test) == 500
    # A Dassl few-shot pickle for ImageNet holds 'train' only.
    pkl = tmp_path / "imagenet" / "split_fewshot" / "shot_1-seed_5.pkl"
    _write_dassl_pickle(pkl, {"train": [(f"/o/imagenet/images/train/{wnids[3]}/{wnids[3]}_1.JPEG",
                                         3, "class 3")]})
    data, prov = load_dataset("imagenet", str(tmp_path), shots=1, seed=5)
    assert prov["fewshot"] == "pickle" and len(data.train) == 1 and data.val is data.test


def test_imagenet_preprocessed_pickle(tmp_path):
    items = {"train": [(f"/o/imagenet/images/train/w{y}/{k}.JPEG", y, f"c{y}")
                       for y in range(1000) for k in range(2)],
             "test": [(f"/o/imagenet/images/val/w{y}/v.JPEG", y, f"c{y}") for y in range(1000)]}
    (tmp_path / "imagenet" / "images").mkdir(parents=True)
    _write_dassl_pickle(tmp_path / "imagenet" / "preprocessed.pkl", items)
    data = build_dataset("imagenet", str(tmp_path), shots=0)
    assert data.classnames[999] == "c999" and len(data.train) == 2000
    assert data.train.relpaths[1] == "train/w0/1.JPEG"


def test_imagenet_missing_classnames(tmp_path):
    (tmp_path / "imagenet" / "images" / "train").mkdir(parents=True)
    with pytest.raises(coop.DatasetNotFoundError, match="classnames.txt"):
        build_dataset("imagenet", str(tmp_path))


def test_aircraft(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    variants = [f"7{i:02d}-300" for i in range(100)]
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    for part in ("train", "val", "test"):
        lines = [f"{1000000 + 10 * y + k} {v}" for y, v in enumerate(variants) for k in range(2)]
        (d / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    data = build_dataset("fgvc_aircraft", str(tmp_path), shots=1, seed=1, subsample="new")
    assert data.classnames == variants[50:]
    assert data.templates == ["a photo of a {}, a type of aircraft."]
    assert len(data.train) == 50 and len(data.test) == 100
    assert data.test.describe(0).endswith(os.path.join("images", "1000500.jpg"))
    (d / "images_variant_test.txt").write_text("1 unknown-variant\n")
    with pytest.raises(coop.SplitFileError, match="unknown-variant"):
        build_dataset("fgvc_aircraft", str(tmp_path))


def test_imagenet_variants(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text(
        "".join(f"{w} name {i}\n" for i, w in enumerate(wnids)))
    # ImageNet-R: 200 folders (every 5th class) plus README.txt; classnames.txt from imagenet/.
    r = tmp_path / "imagenet-rendition" / "imagenet-r"
    for w in wnids[::5]:
        (r / w).mkdir(parents=True)
        (r / w / "a.jpg").write_bytes(_jpeg(1))
    (r / "README.txt").write_text("x")
    data = build_dataset("imagenet_r", str(tmp_path), shots=16)
    assert len(data.classnames) == 200 and data.classnames[1] == "name 5"
    assert len(data.train) == 0 and len(data.test) == 200 and data.test.labels[-1] == 199
    with pytest.raises(ValueError, match="subsample='all'"):
        build_dataset("imagenet_r", str(tmp_path), subsample="base")
    # ImageNetV2: folders 0..999 in classnames.txt order.
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for y in range(1000):
        (v2 / str(y)).mkdir(parents=True)
        (v2 / str(y) / "x.jpeg").write_bytes(b"")
    data = build_dataset("imagenetv2", str(tmp_path), subsample="new")
    assert data.classnames[0] == "name 500" and len(data.test) == 500
    assert data.test.describe(0).endswith(os.path.join("500", "x.jpeg"))


def test_bad_arguments(pets):
    root, _ = pets
    with pytest.raises(KeyError, match="unknown dataset 'petz'"):
        build_dataset("petz", str(root))
    with pytest.raises(ValueError, match="subsample='half'"):
        build_dataset("oxford_pets", str(root), subsample="half")
    with pytest.raises(ValueError, match="source='hf'"):
        build_dataset("oxford_pets", str(root), source="hf")
    with pytest.raises(ValueError, match="shots='16'"):
        build_dataset("oxford_pets", str(root), shots="16")
    # CoOp's class names work as aliases.
    assert build_dataset("OxfordPets", str(root), shots=0).name == "oxford_pets"
