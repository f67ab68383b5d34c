"""The dataset registry (dpc_jax.data.registry) against docs/reference/method.md#data-protocol and
CoOp's readers."""

import pytest

from dpc_jax.data import base, registry

CLASS_COUNTS = {"imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196,
                "oxford_flowers": 102, "food101": 101, "fgvc_aircraft": 100, "sun397": 397,
                "dtd": 47, "eurosat": 10, "ucf101": 101, "imagenetv2": 1000,
                "imagenet_sketch": 1000, "imagenet_a": 200, "imagenet_r": 200}


def test_fifteen_datasets_with_their_class_counts():
    assert set(registry.DATASETS) == set(CLASS_COUNTS)
    assert {k: d.num_classes for k, d in registry.DATASETS.items()} == CLASS_COUNTS
    assert set(registry.BASE_TO_NEW) | set(registry.IMAGENET_VARIANTS) == set(CLASS_COUNTS)
    assert all(registry.DATASETS[k].test_only for k in registry.IMAGENET_VARIANTS)
    assert not any(registry.DATASETS[k].test_only for k in registry.BASE_TO_NEW)


@pytest.mark.parametrize("name,n_base,n_new", [
    ("oxford_pets", 19, 18), ("dtd", 24, 23), ("food101", 51, 50), ("ucf101", 51, 50),
    ("sun397", 199, 198), ("imagenet", 500, 500), ("eurosat", 5, 5), ("caltech101", 50, 50),
    ("stanford_cars", 98, 98), ("oxford_flowers", 51, 51), ("fgvc_aircraft", 50, 50)])
def test_base_new_sizes(name, n_base, n_new):
    n = CLASS_COUNTS[name]
    base_map = base.base_new_relabel(range(n), "base")
    new_map = base.base_new_relabel(range(n), "new")
    assert (len(base_map), len(new_map)) == (n_base, n_new)
    assert sorted(base_map) == list(range(n_base))  # the first half, re-numbered from 0
    assert sorted(new_map.values()) == list(range(n_new)) and min(new_map) == n_base
    info = registry.get(name)
    assert (info.num_base, info.num_new) == (n_base, n_new)


def test_layout_and_split_files():
    expected = {
        "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
        "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
        "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
        "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
        "food101": ("food-101", "images", "split_zhou_Food101.json"),
        "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
        "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
        "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
        "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
        "imagenet": ("imagenet", "images", None),
        "fgvc_aircraft": ("fgvc_aircraft", "images", None),
        "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", None),
        "imagenet_sketch": ("imagenet-sketch", "images", None),
        "imagenet_a": ("imagenet-adversarial", "imagenet-a", None),
        "imagenet_r": ("imagenet-rendition", "imagenet-r", None),
    }
    for name, (d, img, split) in expected.items():
        info = registry.get(name)
        assert (info.dataset_dir, info.image_dir, info.split_file) == (d, img, split), name
        assert info.download and "DATASETS.md" in info.download


def test_zero_shot_templates():
    custom = {"oxford_pets": "a photo of a {}, a type of pet.",
              "oxford_flowers": "a photo of a {}, a type of flower.",
              "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
              "dtd": "{} texture.", "eurosat": "a centered satellite photo of {}.",
              "food101": "a photo of {}, a type of food.",
              "ucf101": "a photo of a person doing {}."}
    for name, info in registry.DATASETS.items():
        assert info.templates == [custom.get(name, "a photo of a {}.")], name
        assert info.template.count("{}") == 1


def test_coop_classname_rules():
    assert [registry.caltech101_classname(x) for x in ("airplanes", "Faces", "Leopards",
                                                       "Motorbikes", "ant")] == [
        "airplane", "face", "leopard", "motorbike", "ant"]
    assert registry.CALTECH101_IGNORED == ("BACKGROUND_Google", "Faces_easy")
    assert registry.oxford_pets_classname("Abyssinian") == "abyssinian"
    assert registry.stanford_cars_classname("Acura RL Sedan 2012") == "2012 Acura RL Sedan"
    assert registry.sun397_classname("/a/apartment_building/outdoor") == \
        "outdoor apartment_building"
    assert registry.sun397_classname("/a/abbey") == "abbey"
    assert registry.ucf101_classname("ApplyEyeMakeup") == "Apply_Eye_Makeup"
    assert registry.eurosat_classname("SeaLake") == "Sea or Lake"
    assert registry.get("eurosat").known_classnames[0] == "Annual Crop Land"
    assert len(registry.get("eurosat").known_classnames) == 10


def test_dpc_settings():
    assert registry.get("eurosat").num_base == 5  # DHNO top-K = 8 cannot work there
    assert {n for n, d in registry.DATASETS.items() if d.promptkd_kd_weight == 200} == {
        "fgvc_aircraft", "oxford_flowers", "dtd"}
    assert registry.get("imagenet").val_is_test


def test_get_accepts_coop_names_and_rejects_unknown():
    assert registry.get("OxfordPets").name == "oxford_pets"
    assert registry.get("DescribableTextures").name == "dtd"
    assert registry.get(" Caltech101 ").name == "caltech101"
    with pytest.raises(KeyError, match="unknown dataset 'mnist'.*oxford_pets"):
        registry.get("mnist")
