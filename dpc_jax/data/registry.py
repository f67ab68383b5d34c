"""The benchmark datasets of the CoOp/DPC protocol: where they live, how CoOp names their classes.

One `DatasetInfo` per dataset holds the CoOp folder layout (`root/<dataset_dir>/<image_dir>`, the
split file), the zero-shot template (zsclip.py CUSTOM_TEMPLATES,
docs/reference/method.md#templates), the class count, the TFDS counterpart, and where the data
comes from (CoOp's DATASETS.md).

Class lists are never shipped here: the CoOp sources read them from the split files / class files
on disk, and the TFDS source derives them from the TFDS label names with CoOp's renaming rules
(the functions below, from the CoOp dataset readers). The one exception is EuroSAT, whose full
list of readable names *is* CoOp's renaming table, so the registry can check a split file
against it.

`FOLDER` ('folder') is your own images (folder.py): not a benchmark and not in `DATASETS`, but
`get` finds it like one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"

# CoOp caltech101.py: these folders are not classes of the benchmark.
CALTECH101_IGNORED = ("BACKGROUND_Google", "Faces_easy")
# CoOp caltech101.py NEW_CNAMES: folder name -> class name.
CALTECH101_RENAMED = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard",
                      "Motorbikes": "motorbike"}
# The only capitalised folder names of the Caltech101 archive (101_ObjectCategories). TFDS lower-
# cases every name; CoOp sorts the original names case-sensitively, so the case is needed to
# reproduce CoOp's label order from TFDS.
CALTECH101_CAPITALISED = ("BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes")
# CoOp eurosat.py NEW_CNAMES: folder name -> readable class name (all ten classes).
EUROSAT_RENAMED = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


# --- CoOp's class-name rules (as the CoOp readers build the names written into split files) ---

def caltech101_classname(folder: str) -> str:
    """caltech101.py: renamed folders, others unchanged."""
    return CALTECH101_RENAMED.get(folder, folder)


def eurosat_classname(folder: str) -> str:
    return EUROSAT_RENAMED[folder]


def oxford_pets_classname(breed: str) -> str:
    """oxford_pets.py: the breed from the file name, lower-cased ('Abyssinian' -> 'abyssinian')."""
    return breed.lower()


def stanford_cars_classname(name: str) -> str:
    """stanford_cars.py: the year moves to the front ('Acura RL Sedan 2012' -> '2012 Acura ...')."""
    words = name.split(" ")
    return " ".join([words[-1]] + words[:-1])


def sun397_classname(path: str) -> str:
    """sun397.py: '/a/apartment_building/outdoor' -> 'outdoor apartment_building'."""
    parts = path.strip("/").split("/")[1:]  # drop the first-letter folder
    return " ".join(parts[::-1])


def ucf101_classname(action: str) -> str:
    """ucf101.py: CamelCase split with '_' ('ApplyEyeMakeup' -> 'Apply_Eye_Makeup')."""
    return "_".join(re.findall("[A-Z][^A-Z]*", action))


@dataclasses.dataclass(frozen=True)
class TfdsPlan:
    """How a TFDS dataset gives the three CoOp splits.

    `train`/`val`/`test` name TFDS splits. `val=None` with `val_fraction` carves the validation
    set out of the TFDS train split per class (CoOp's `split_trainval`, p_val = 0.2), `test=None`
    with `test_fraction` carves the test set too (CoOp's `read_and_split_data`, 50/20/30).
    `val_is_test` reproduces CoOp's ImageNet, whose val set is the test set.
    `label_order`: 'index' when CoOp numbers classes like TFDS (the official class ids),
    'sorted' when CoOp numbers sorted folder names (TFDS may order them differently).
    """

    name: str
    train: Optional[str]
    val: Optional[str]
    test: str
    label_order: str
    classname: Optional[Callable[[str], str]] = None
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    val_is_test: bool = False
    notes: str = ""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """One benchmark dataset in the CoOp layout."""

    name: str  # our key (lower case)
    coop_name: str  # the Dassl/CoOp class name (DATASET.NAME in the CoOp configs)
    dataset_dir: str  # folder under the data root
    image_dir: str  # image folder under dataset_dir ('' = dataset_dir itself)
    layout: str  # 'split_json' | 'imagenet' | 'aircraft' | 'imagenet_variant'
    num_classes: int  # 0: the data decides (your own folder)
    template: str  # zero-shot template with one '{}'
    download: str  # where the data comes from (CoOp DATASETS.md)
    split_file: Optional[str] = None
    tfds: Optional[TfdsPlan] = None
    test_only: bool = False  # ImageNet variants: evaluation data only
    val_is_test: bool = False  # CoOp ImageNet evaluates on val = test
    known_classnames: Optional[tuple] = None  # only where CoOp's code fixes the whole list
    forbidden_classnames: tuple = ()  # raw names CoOp renames or drops
    # PromptKD KD_W (docs/reference/backbones.md#promptkd)
    promptkd_kd_weight: Optional[float] = None
    notes: str = ""

    @property
    def templates(self) -> list:
        return [self.template]

    @property
    def num_base(self) -> int:
        """Base classes of the Dassl halving (first ceil(n/2) labels)."""
        return math.ceil(self.num_classes / 2)

    @property
    def num_new(self) -> int:
        return self.num_classes - self.num_base


_DEFAULT_TEMPLATE = "a photo of a {}."

_IMAGENET_DOWNLOAD = (
    "ImageNet from https://image-net.org (extract train/ and val/ with 1,000 class folders each "
    "into imagenet/images/) and CoOp's classnames.txt (copied from CLIP) into imagenet/; see "
    + COOP_DATASETS_MD + "#imagenet")

DATASETS = {
    d.name: d
    for d in [
        DatasetInfo(
            name="imagenet", coop_name="ImageNet", dataset_dir="imagenet", image_dir="images",
            layout="imagenet", num_classes=1000, template=_DEFAULT_TEMPLATE,
            download=_IMAGENET_DOWNLOAD, val_is_test=True,
            tfds=TfdsPlan("imagenet2012", train="train", val=None, test="validation",
                          label_order="index", val_is_test=True,
                          notes="manual download: put ILSVRC2012_img_train.tar and "
                                "ILSVRC2012_img_val.tar in <data_dir>/downloads/manual and run "
                                "`tfds build imagenet2012 --file_format=array_record`; class "
                                "names come from CoOp's classnames.txt"),
            notes="CoOp uses the official val set as test and as val (the last-epoch model is "
                  "evaluated); few-shot sampling applies to train only."),
        DatasetInfo(
            name="caltech101", coop_name="Caltech101", dataset_dir="caltech-101",
            image_dir="101_ObjectCategories", layout="split_json",
            split_file="split_zhou_Caltech101.json", num_classes=100, template=_DEFAULT_TEMPLATE,
            download="101_ObjectCategories.tar.gz from "
                     "http://www.vision.caltech.edu/Image_Datasets/Caltech101/ and "
                     "split_zhou_Caltech101.json; see " + COOP_DATASETS_MD + "#caltech101",
            forbidden_classnames=CALTECH101_IGNORED + tuple(CALTECH101_RENAMED),
            tfds=TfdsPlan("caltech101", train="train", val=None, test="test",
                          label_order="sorted", val_fraction=0.2,
                          notes="TFDS keeps BACKGROUND_Google and Faces_easy (102 labels) and "
                                "lower-cases folder names; CoOp drops both classes and sorts "
                                "the original names case-sensitively (face, leopard, motorbike "
                                "first). TFDS train has 30 images per class, test the rest."),
            notes="BACKGROUND_Google and Faces_easy dropped; airplanes/Faces/Leopards/Motorbikes "
                  "renamed."),
        DatasetInfo(
            name="oxford_pets", coop_name="OxfordPets", dataset_dir="oxford_pets",
            image_dir="images", layout="split_json", split_file="split_zhou_OxfordPets.json",
            num_classes=37, template="a photo of a {}, a type of pet.",
            download="images.tar.gz and annotations.tar.gz from "
                     "https://www.robots.ox.ac.uk/~vgg/data/pets/ and split_zhou_OxfordPets.json;"
                     " see " + COOP_DATASETS_MD + "#oxfordpets",
            tfds=TfdsPlan("oxford_iiit_pet", train="train", val=None, test="test",
                          label_order="index", classname=oxford_pets_classname,
                          val_fraction=0.2),
            notes="class names are the lower-cased breeds."),
        DatasetInfo(
            name="stanford_cars", coop_name="StanfordCars", dataset_dir="stanford_cars",
            image_dir="", layout="split_json", split_file="split_zhou_StanfordCars.json",
            num_classes=196, template=_DEFAULT_TEMPLATE,
            download="cars_train.tgz, cars_test.tgz, car_devkit.tgz and "
                     "cars_test_annos_withlabels.mat from https://ai.stanford.edu/~jkrause/cars/"
                     " and split_zhou_StanfordCars.json; see " + COOP_DATASETS_MD +
                     "#stanfordcars",
            tfds=TfdsPlan("cars196", train="train", val=None, test="test", label_order="index",
                          classname=stanford_cars_classname, val_fraction=0.2),
            notes="split paths are relative to stanford_cars/ itself (cars_train/, cars_test/); "
                  "the year moves to the front of the class name."),
        DatasetInfo(
            name="oxford_flowers", coop_name="OxfordFlowers", dataset_dir="oxford_flowers",
            image_dir="jpg", layout="split_json", split_file="split_zhou_OxfordFlowers.json",
            num_classes=102, template="a photo of a {}, a type of flower.",
            download="102flowers.tgz and imagelabels.mat from "
                     "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/, cat_to_name.json and "
                     "split_zhou_OxfordFlowers.json; see " + COOP_DATASETS_MD + "#flowers102",
            promptkd_kd_weight=200.0,
            tfds=TfdsPlan("oxford_flowers102", train="train", val="validation", test="test",
                          label_order="index",
                          notes="TFDS uses the official 10/10/rest per-class split and its own "
                                "class names; CoOp's names come from cat_to_name.json and its "
                                "split is 50/20/30.")),
        DatasetInfo(
            name="food101", coop_name="Food101", dataset_dir="food-101", image_dir="images",
            layout="split_json", split_file="split_zhou_Food101.json", num_classes=101,
            template="a photo of {}, a type of food.",
            download="food-101.tar.gz from "
                     "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ and "
                     "split_zhou_Food101.json; see " + COOP_DATASETS_MD + "#food101",
            tfds=TfdsPlan("food101", train="train", val=None, test="validation",
                          label_order="sorted", val_fraction=0.2,
                          notes="TFDS orders cheesecake before cheese_plate (meta/classes.txt); "
                                "CoOp sorts folder names ('_' < 'c'). The TFDS 'validation' "
                                "split is the official test set.")),
        DatasetInfo(
            name="fgvc_aircraft", coop_name="FGVCAircraft", dataset_dir="fgvc_aircraft",
            image_dir="images", layout="aircraft", num_classes=100,
            template="a photo of a {}, a type of aircraft.",
            download="fgvc-aircraft-2013b.tar.gz from "
                     "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (keep data/, renamed "
                     "fgvc_aircraft/); see " + COOP_DATASETS_MD + "#fgvcaircraft",
            promptkd_kd_weight=200.0,
            notes="no CoOp split file: variants.txt and images_variant_{train,val,test}.txt."),
        DatasetInfo(
            name="sun397", coop_name="SUN397", dataset_dir="sun397", image_dir="SUN397",
            layout="split_json", split_file="split_zhou_SUN397.json", num_classes=397,
            template=_DEFAULT_TEMPLATE,
            download="SUN397.tar.gz and Partitions.zip from "
                     "https://vision.princeton.edu/projects/2010/SUN/ and split_zhou_SUN397.json;"
                     " see " + COOP_DATASETS_MD + "#sun397",
            tfds=TfdsPlan("sun397/standard-part1-120k", train="train", val=None, test="test",
                          label_order="index", classname=sun397_classname, val_fraction=0.2,
                          notes="TFDS resizes SUN397 images to at most 120,000 pixels and re-"
                                "encodes them (JPEG quality 72), so pixels differ from the "
                                "originals; partition 1 is the one CoOp uses."),
            notes="class names reverse the path parts ('outdoor apartment_building')."),
        DatasetInfo(
            name="dtd", coop_name="DescribableTextures", dataset_dir="dtd", image_dir="images",
            layout="split_json", split_file="split_zhou_DescribableTextures.json",
            num_classes=47, template="{} texture.",
            download="dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and "
                     "split_zhou_DescribableTextures.json; see " + COOP_DATASETS_MD + "#dtd",
            promptkd_kd_weight=200.0,
            tfds=TfdsPlan("dtd", train="train", val="validation", test="test",
                          label_order="sorted",
                          notes="TFDS uses the official fold 1 (40/40/40 per class); CoOp's "
                                "split is 50/20/30.")),
        DatasetInfo(
            name="eurosat", coop_name="EuroSAT", dataset_dir="eurosat", image_dir="2750",
            layout="split_json", split_file="split_zhou_EuroSAT.json", num_classes=10,
            template="a centered satellite photo of {}.",
            download="EuroSAT.zip (RGB) from http://madm.dfki.de/files/sentinel/EuroSAT.zip and "
                     "split_zhou_EuroSAT.json; see " + COOP_DATASETS_MD + "#eurosat",
            known_classnames=tuple(EUROSAT_RENAMED.values()),
            forbidden_classnames=tuple(k for k, v in EUROSAT_RENAMED.items() if k != v),
            tfds=TfdsPlan("eurosat/rgb", train="train", val=None, test=None,
                          label_order="sorted", classname=eurosat_classname, val_fraction=0.2,
                          test_fraction=0.3,
                          notes="TFDS has one split; it is divided 50/20/30 per class."),
            notes="5 base classes: DHNO's top-K must be clamped (K = 8 cannot work)."),
        DatasetInfo(
            name="ucf101", coop_name="UCF101", dataset_dir="ucf101",
            image_dir="UCF-101-midframes", layout="split_json",
            split_file="split_zhou_UCF101.json", num_classes=101,
            template="a photo of a person doing {}.",
            download="UCF-101-midframes.zip (CoOp's middle frames) and split_zhou_UCF101.json; "
                     "see " + COOP_DATASETS_MD + "#ucf101",
            notes="class names split CamelCase with '_' (Apply_Eye_Makeup)."),
        DatasetInfo(
            name="imagenetv2", coop_name="ImageNetV2", dataset_dir="imagenetv2",
            image_dir="imagenetv2-matched-frequency-format-val", layout="imagenet_variant",
            num_classes=1000, template=_DEFAULT_TEMPLATE, test_only=True,
            download="imagenetv2-matched-frequency.tar.gz from "
                     "https://github.com/modestyachts/ImageNetV2 and CoOp's classnames.txt; see "
                     + COOP_DATASETS_MD + "#imagenetv2",
            notes="folders 0..999 are the labels (ImageNet order)."),
        DatasetInfo(
            name="imagenet_sketch", coop_name="ImageNetSketch", dataset_dir="imagenet-sketch",
            image_dir="images", layout="imagenet_variant", num_classes=1000,
            template=_DEFAULT_TEMPLATE, test_only=True,
            download="https://github.com/HaohanWang/ImageNet-Sketch and CoOp's classnames.txt; "
                     "see " + COOP_DATASETS_MD + "#imagenet-sketch"),
        DatasetInfo(
            name="imagenet_a", coop_name="ImageNetA", dataset_dir="imagenet-adversarial",
            image_dir="imagenet-a", layout="imagenet_variant", num_classes=200,
            template=_DEFAULT_TEMPLATE, test_only=True,
            download="https://github.com/hendrycks/natural-adv-examples and CoOp's "
                     "classnames.txt; see " + COOP_DATASETS_MD + "#imagenet-a",
            notes="200 of the ImageNet classes, labelled 0..199 in sorted folder order."),
        DatasetInfo(
            name="imagenet_r", coop_name="ImageNetR", dataset_dir="imagenet-rendition",
            image_dir="imagenet-r", layout="imagenet_variant", num_classes=200,
            template=_DEFAULT_TEMPLATE, test_only=True,
            download="https://github.com/hendrycks/imagenet-r and CoOp's classnames.txt; see "
                     + COOP_DATASETS_MD + "#imagenet-r",
            notes="200 of the ImageNet classes, labelled 0..199 in sorted folder order."),
    ]
}

# Your own images (dpc_jax/data/folder.py, docs/data.md): not a benchmark, so not in DATASETS;
# the folder at `root` gives the classes, and may give the templates.
FOLDER = DatasetInfo(
    name="folder", coop_name="folder", dataset_dir="", image_dir="", layout="folder",
    num_classes=0, template=_DEFAULT_TEMPLATE,
    download="your own images under root: train/<class>/<image> and test/<class>/<image> "
             "(optionally val/<class>/<image>), or split.json; see docs/data.md")

BASE_TO_NEW = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
               "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
IMAGENET_VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")

# Accept CoOp's class names (configs say DATASET.NAME: OxfordPets) as aliases.
_ALIASES = {d.coop_name.lower(): d.name for d in DATASETS.values()}
_ALIASES.update({"caltech-101": "caltech101", "oxfordpets": "oxford_pets", "pets": "oxford_pets",
                 "flowers": "oxford_flowers", "flowers102": "oxford_flowers",
                 "oxford_flowers102": "oxford_flowers", "cars": "stanford_cars",
                 "food-101": "food101", "aircraft": "fgvc_aircraft",
                 "describabletextures": "dtd"})


def get(name: str) -> DatasetInfo:
    """The registry entry for `name` (our key or CoOp's class name, any case; 'folder': your own
    images)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key == FOLDER.name:
        return FOLDER
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)} "
                       f"(or a CoOp name such as 'OxfordPets'), or 'folder' for your own images")
    return DATASETS[key]
