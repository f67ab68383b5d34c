"""The TFDS source (dpc_jax.data.tfds_source) without TensorFlow.

Two kinds of offline data:
- real array_record files written by the test (tf.Example protos from TFDS's bundled proto
  module, TFDS's own DatasetInfo written to the folder), read back through `tfds.data_source`:
  the production path, images left undecoded by TFDS and decoded by PIL;
- `tfds.testing.mock_data`, which without TensorFlow only serves fully decoded examples (any
  `decoders=` makes the mock encode images, which needs TF), so it runs with decode='tfds'.
"""

import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")
from array_record.python import array_record_module  # noqa: E402
from tensorflow_datasets.proto import tf_example_pb2  # noqa: E402

from dpc_jax.data import base, coop, registry, tfds_source  # noqa: E402
from dpc_jax.data.sources import build_dataset, load_dataset  # noqa: E402
from dpc_jax.data.transforms import clip_test_transform  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)


def _jpeg(value, w=20, h=14):
    buf = io.BytesIO()
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = value % 256
    arr[:, : w // 2, 1] = (3 * value) % 256
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def write_tfds(data_dir, name, splits):
    """Prepare TFDS dataset `name` in `data_dir` as array_record: splits[split] = labels."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    info = builder.info
    out = builder.data_dir
    os.makedirs(out, exist_ok=True)
    split_infos = []
    for split, labels in splits.items():
        fname = f"{info.name}-{split}.array_record-00000-of-00001"
        writer = array_record_module.ArrayRecordWriter(os.path.join(out, fname), "group_size:1")
        for i, y in enumerate(labels):
            ex = tf_example_pb2.Example()
            for key in info.features.keys():
                feature = ex.features.feature[key]
                if key == "image":
                    feature.bytes_list.value.append(_jpeg(7 * i + 3 * len(split)))
                elif key == "label":
                    feature.int64_list.value.append(int(y))
                else:  # file names
                    feature.bytes_list.value.append(f"{split}/{i}.jpg".encode())
            writer.write(ex.SerializeToString())
        writer.close()
        template = tfds.core.ShardedFileTemplate(
            data_dir=out, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name=info.name, split=split, filetype_suffix="array_record")
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(labels)],
                                               num_bytes=0, filename_template=template))
    info.set_splits(tfds.core.SplitDict(split_infos))
    info.set_file_format("array_record", override=True)
    info.write_to_directory(out)


def test_caltech_label_order_is_coop_order():
    names = tfds.builder("caltech101").info.features["label"].names  # shipped with TFDS
    info = registry.get("caltech101")
    classnames, mapping = tfds_source.coop_label_map(info, names)
    assert len(names) == 102 and len(classnames) == 100
    # CoOp sorts the original folder names case-sensitively: capitalised folders come first.
    assert classnames[:5] == ["face", "leopard", "motorbike", "accordion", "airplane"]
    assert mapping[names.index("background_google")] == -1
    assert mapping[names.index("faces_easy")] == -1
    assert mapping[names.index("faces")] == 0
    assert "airplanes" not in classnames and "Faces" not in classnames


def test_food101_order_differs_from_tfds():
    names = tfds.builder("food101").info.features["label"].names
    classnames, mapping = tfds_source.coop_label_map(registry.get("food101"), names)
    assert names[16:18] == ["cheesecake", "cheese_plate"]
    assert classnames[16:18] == ["cheese_plate", "cheesecake"]  # sorted folder names
    assert mapping[16] == 17 and mapping[17] == 16
    assert classnames == sorted(names)


def test_name_rules_for_index_ordered_datasets():
    pets = tfds.builder("oxford_iiit_pet").info.features["label"].names
    classnames, mapping = tfds_source.coop_label_map(registry.get("oxford_pets"), pets)
    assert classnames[0] == "abyssinian" and mapping.tolist() == list(range(37))
    cars = tfds.builder("cars196").info.features["label"].names
    classnames, _ = tfds_source.coop_label_map(registry.get("stanford_cars"), cars)
    assert classnames[0] == "2000 AM General Hummer SUV"
    sun = tfds.builder("sun397/standard-part1-120k").info.features["label"].names
    classnames, _ = tfds_source.coop_label_map(registry.get("sun397"), sun)
    assert len(classnames) == 397 and classnames[0] == "abbey"
    assert "outdoor apartment_building" in classnames


def test_eurosat_from_array_record(tmp_path):
    # One TFDS split; 10 classes x 10 images, carved 50/20/30 per class.
    labels = [i % 10 for i in range(100)]
    write_tfds(tmp_path, "eurosat/rgb", {"train": labels})
    data, prov = load_dataset("eurosat", str(tmp_path), source="tfds", shots=0,
                              cache_dir=str(tmp_path / "cache"))
    assert data.classnames[0] == "Annual Crop Land" and data.classnames[-1] == "Sea or Lake"
    assert data.templates == ["a centered satellite photo of {}."]
    assert (len(data.train), len(data.val), len(data.test)) == (50, 20, 30)
    idx = {k: set(getattr(data, k).records.tolist()) for k in ("train", "val", "test")}
    assert not (idx["train"] & idx["val"]) and not (idx["val"] & idx["test"])
    assert len(idx["train"] | idx["val"] | idx["test"]) == 100
    for k in ("train", "val", "test"):
        s = getattr(data, k)
        assert np.bincount(s.labels, minlength=10).tolist() == [len(s) // 10] * 10
        assert s.labels.tolist() == [labels[i] for i in s.records]
    # Images: the record's JPEG, decoded by PIL, through the CLIP test transform.
    rec = data.test.records[3]
    want = clip_test_transform(Image.open(io.BytesIO(_jpeg(7 * rec + 15))).convert("RGB"), 16)
    np.testing.assert_array_equal(data.test.load_image(3, 16), want)
    # TFDS's own decoding (PIL too, without TF) gives the same pixels.
    data_tfds = build_dataset("eurosat", str(tmp_path), source="tfds", shots=0, decode="tfds",
                              cache_dir=None)
    np.testing.assert_array_equal(data_tfds.test.load_image(3, 16), want)
    assert "test" in prov["splits"]["test"] or "carved" in prov["splits"]["test"]


def test_fewshot_and_subsample_follow_dassl(tmp_path):
    labels = [(3 * i + i // 10) % 10 for i in range(200)]  # 20 per class, interleaved
    write_tfds(tmp_path, "eurosat/rgb", {"train": labels})
    full = build_dataset("eurosat", str(tmp_path), source="tfds", shots=0, cache_dir=None)
    data = build_dataset("eurosat", str(tmp_path), source="tfds", shots=4, seed=3,
                         cache_dir=None)
    want = base.fewshot(full, 4, 3)
    # Both are views of the full splits: the same positions are selected.
    assert data.train.indices.tolist() == want.train.indices.tolist()
    assert data.val.indices.tolist() == want.val.indices.tolist()
    assert len(data.train) == 40 and len(data.val) == 40
    new = build_dataset("eurosat", str(tmp_path), source="tfds", shots=4, seed=3,
                        subsample="new", cache_dir=None)
    assert new.classnames == full.classnames[5:]
    assert sorted(set(new.train.labels.tolist())) == list(range(5)) and len(new.train) == 20


def test_food101_splits_and_label_cache(tmp_path, monkeypatch):
    names = tfds.builder("food101").info.features["label"].names
    train = [i % 101 for i in range(303)]
    write_tfds(tmp_path, "food101", {"train": train, "validation": list(range(101))})
    cache = tmp_path / "cache"
    data = build_dataset("food101", str(tmp_path), source="tfds", shots=0, cache_dir=str(cache))
    assert (len(data.train), len(data.val), len(data.test)) == (202, 101, 101)
    assert data.test.split == "validation" and data.val.split == "train"
    # TFDS label 16 (cheesecake) is CoOp label 17.
    k = data.test.records.tolist().index(16)
    assert data.test.labels[k] == 17 and data.classnames[17] == names[16] == "cheesecake"
    assert len(list((cache / "tfds_labels").iterdir())) == 2
    # The second build reads the cached labels, not the records.
    monkeypatch.setattr(tfds_source, "read_labels", lambda *a, **k: 1 / 0)
    again = build_dataset("food101", str(tmp_path), source="tfds", shots=0, cache_dir=str(cache))
    assert again.train.labels.tolist() == data.train.labels.tolist()


def test_caltech_drops_background_from_array_record(tmp_path):
    names = tfds.builder("caltech101").info.features["label"].names
    bg, easy = names.index("background_google"), names.index("faces_easy")
    write_tfds(tmp_path, "caltech101", {"train": [y for y in range(102) for _ in range(5)],
                                        "test": list(range(102))})
    data = build_dataset("caltech101", str(tmp_path), source="tfds", shots=0, cache_dir=None)
    assert len(data.test) == 100 and len(data.train) + len(data.val) == 500
    assert bg not in data.test.records and easy not in data.test.records
    assert data.classnames[data.test.labels[data.test.records.tolist().index(
        names.index("faces"))]] == "face"


def test_mock_data_end_to_end(tmp_path):
    with tfds.testing.mock_data(num_examples=120, policy=tfds.testing.MockPolicy.USE_CODE):
        data = build_dataset("dtd", None, source="tfds", shots=2, seed=1, subsample="base",
                             decode="tfds", cache_dir=None)
        assert len(data.classnames) == 24 and data.templates == ["{} texture."]
        assert np.bincount(data.train.labels).max() <= 2
        assert set(data.test.labels.tolist()) <= set(range(24))
        img = data.train.load_image(0, 16)
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8


def test_errors(tmp_path):
    with pytest.raises(tfds_source.TfdsDatasetError,
                       match="(?s)not prepared.*tfds build dtd.*array_record"):
        build_dataset("dtd", str(tmp_path), source="tfds", cache_dir=None)
    with pytest.raises(tfds_source.TfdsDatasetError, match="no TFDS source.*coop"):
        build_dataset("fgvc_aircraft", str(tmp_path), source="tfds")
    with pytest.raises(coop.DatasetNotFoundError, match="classnames.txt"):
        build_dataset("imagenet", str(tmp_path), source="tfds")
    with pytest.raises(ValueError, match="decode='jpeg'"):
        build_dataset("dtd", str(tmp_path), source="tfds", decode="jpeg")
