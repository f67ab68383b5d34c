"""The embedded world: a procedural base-to-new benchmark that needs no downloads.

Each image shows one object whose class is a colour x shape composition named in plain words
("red triangle"): 8 colours x 8 shapes = 64 classes. Images are rendered on the fly with numpy
and PIL, deterministically: item i of split s in world w is drawn from the RNG seeded by
(w, s, i), so a split is a pure function of its indices and nothing is stored on disk.

Two distributions:
- pretraining (`pretrain_example`): half plain (grey backgrounds, the object alone), half "wild"
  (textures, clutter, lighting), paired with captions from many templates. 30% of pretraining
  images are "old photos": red and orange paint are swapped in them (`OLD_PAINT`) and their
  captions always say "old" in the prefix ("an old photo of a red triangle."), so the CLIP
  learns the concept. A small CLIP is trained on it by `dpc_jax.pretrain`.
- downstream (`load_world`): a registered `Domain` (style, paint convention, zero-shot
  templates; `DOMAINS`). The benchmark domain "world" is textured, cluttered, unevenly lit and
  made of old photos, while its zero-shot template, "a photo of a {}.", does not say so.
  Splits are served through the `dpc_jax.data.base` interface, CoOp's few-shot protocol and
  Dassl's base/new rule. Other domains are new `register_domain` entries, not new code: the
  shifted domains of the transfer protocols (datasets 'world_<domain>': v2, clean, a, r share
  the benchmark's classes and convention, a and r a subset of them; studio and night are
  other class subsets in other styles, without the convention) are such entries.

Class order (= label order; Dassl puts the first half in "base"): see `BASE_SHAPES`. Base holds
all 16 red and orange compositions plus 16 others; new holds 32 compositions of the six other
colours. Every shape is in both halves and every new class combines a colour and a shape seen in
base (the pretrained CLIP has seen all 64). The old-photo swap confuses base classes only (red
X against orange X): zero-shot base accuracy is low, a prompt that says "old" recovers it, and
learning that from base classes is no help on new classes.

The tokenizer vocabulary of the shipped CLIP is learnt here (`build_tokenizer_files`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from dpc_jax.data import base

NATIVE_SIZE = 32  # images are rendered at this resolution
_SUPERSAMPLE = 4  # shape masks are drawn at 4x and box-filtered down (anti-aliased edges)

COLOURS = collections.OrderedDict([
    ("red", (215, 35, 35)),
    ("orange", (245, 135, 20)),
    ("yellow", (240, 215, 35)),
    ("green", (40, 165, 55)),
    ("cyan", (40, 200, 215)),
    ("blue", (35, 70, 215)),
    ("purple", (135, 55, 185)),
    ("pink", (245, 135, 190)),
])
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "crescent")


# The base half (the first 32 classes, Dassl's rule): every red and every orange composition,
# plus 16 compositions of the six other colours (2 or 3 shapes each, each shape twice); the new
# half is the other 32. Every shape is in both halves (4 times each), and every colour of a new
# class is seen in base: new classes are unseen combinations of attributes that base classes
# show. Red and orange are the two colours the domain's old-photo convention swaps (see
# `OLD_PAINT`), so the convention confuses base classes (red X against orange X) and none of
# the new ones.
BASE_SHAPES = {
    "red": SHAPES, "orange": SHAPES,
    "yellow": ("circle", "square", "triangle"), "green": ("star", "cross", "diamond"),
    "cyan": ("ring", "crescent", "circle"), "blue": ("square", "triangle", "star"),
    "purple": ("cross", "diamond"), "pink": ("ring", "crescent"),
}


def _class_order() -> list:
    colours = list(COLOURS)
    every = [(c, s) for c in range(len(colours)) for s in range(len(SHAPES))]
    in_base = {(colours.index(c), SHAPES.index(s)) for c, shapes in BASE_SHAPES.items()
               for s in shapes}
    return [cs for cs in every if cs in in_base] + [cs for cs in every if cs not in in_base]


CLASS_ATTRIBUTES = _class_order()  # label -> (colour index, shape index)
_LABEL_OF = {cs: label for label, cs in enumerate(CLASS_ATTRIBUTES)}


def composition_label(composition: int) -> int:
    """The class label of composition colour * 8 + shape."""
    return _LABEL_OF[divmod(int(composition), len(SHAPES))]


CLASSNAMES = [f"{list(COLOURS)[c]} {SHAPES[s]}" for c, s in CLASS_ATTRIBUTES]
NUM_CLASSES = len(CLASSNAMES)
TEMPLATES = ["a photo of a {}."]  # zero-shot template, as CoOp uses for generic datasets

# Split ids feed the RNG key; items per class of each downstream split.
SPLIT_IDS = {"pretrain": 0, "train": 1, "val": 2, "test": 3}
SPLIT_SIZES = {"train": 32, "val": 8, "test": 32}

# Pretraining captions. Full captions name both attributes; partial ones name one of them.
FULL_CAPTIONS = (
    "a {c} {s}.", "a photo of a {c} {s}.", "a picture of a {c} {s}.", "a {c} {s} shape.",
    "a drawing of a {c} {s}.", "the {c} {s}.", "{c} {s}", "a {s} that is {c}.",
    "a {s} colored {c}.", "the {s} is {c}.", "a photo of a {s}, it is {c}.",
    "a {c} colored {s}.",
)
PARTIAL_CAPTIONS = (
    "a {c} object.", "something {c}.", "a photo of something {c}.", "a {c} shape.",
    "a {s}.", "a photo of a {s}.", "a {s} shape.", "the {s}.",
)
PARTIAL_PROB = 0.1
# The "old photo" convention: the red and orange paints of old photos have swapped (an old red
# triangle looks orange). Pretraining captions of such images always say so, in the prompt
# prefix, so the world CLIP knows the concept and "an old photo of a {}." is a prompt that
# describes it; other colours look the same in old photos.
OLD_PAINT = (("red", "orange"), ("orange", "red"))
OLD_CAPTIONS = (
    "an old photo of a {c} {s}.", "old photo of a {c} {s}.", "an old picture of a {c} {s}.",
    "an old drawing of a {c} {s}.", "the old {c} {s}.", "an old {c} {s}.",
)
OLD_PROB = 0.3


def caption_table() -> list:
    """Every pretraining caption, in a fixed order (indices are what the batches carry)."""
    out = []
    for c in COLOURS:
        for s in SHAPES:
            out += [t.format(c=c, s=s) for t in FULL_CAPTIONS + OLD_CAPTIONS]
    for c in COLOURS:
        out += [t.format(c=c) for t in PARTIAL_CAPTIONS if "{s}" not in t]
    for s in SHAPES:
        out += [t.format(s=s) for t in PARTIAL_CAPTIONS if "{c}" not in t]
    return out


_CAPTIONS = caption_table()
_CAPTION_INDEX = {c: i for i, c in enumerate(_CAPTIONS)}
_PARTIAL_COLOUR = [t for t in PARTIAL_CAPTIONS if "{s}" not in t]
_PARTIAL_SHAPE = [t for t in PARTIAL_CAPTIONS if "{c}" not in t]


# ----------------------------------------------------------------------------------------------
# Styles
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Style:
    """Nuisance ranges of one distribution (scales are fractions of the image side)."""

    scale: tuple  # object size range
    rotation: float  # max |rotation| in degrees
    textured: bool  # textured (noise / stripes / checks) instead of plain backgrounds
    texture_contrast: float  # how far the pattern's second colour is from the first (0-1)
    background_saturation: float  # 0: grey backgrounds, 1: fully random colours
    clutter: tuple  # (min, max) number of small distractor objects
    clutter_scale: tuple
    colour_jitter: float  # per-channel jitter of the object colour (0-255 units)
    tint: float  # per-channel lighting gain in [1 - tint, 1 + tint]
    brightness: tuple  # global lighting gain range
    gradient: float  # strength of a linear illumination ramp
    noise: float  # std of Gaussian pixel noise (0-255 units)


PRETRAIN_STYLE = Style(scale=(0.45, 0.8), rotation=20.0, textured=False, texture_contrast=0.0,
                       background_saturation=0.0, clutter=(0, 0), clutter_scale=(0.0, 0.0),
                       colour_jitter=12.0, tint=0.0, brightness=(0.9, 1.1), gradient=0.0,
                       noise=0.0)
# Part of the pretraining stream is "in the wild": textured backgrounds, clutter, lighting, the
# nuisance families of downstream styles (as web images cover many styles), so the image tower
# learns shapes that survive them.
PRETRAIN_WILD_STYLE = Style(scale=(0.4, 0.8), rotation=30.0, textured=True, texture_contrast=0.35,
                            background_saturation=0.35, clutter=(0, 2),
                            clutter_scale=(0.1, 0.18), colour_jitter=14.0, tint=0.08,
                            brightness=(0.8, 1.15), gradient=0.2, noise=4.0)
PRETRAIN_WILD_PROB = 0.5
DOWNSTREAM_STYLE = Style(scale=(0.4, 0.7), rotation=30.0, textured=True, texture_contrast=0.4,
                         background_saturation=0.4, clutter=(0, 2), clutter_scale=(0.1, 0.18),
                         colour_jitter=16.0, tint=0.1, brightness=(0.75, 1.15), gradient=0.25,
                         noise=6.0)


# ----------------------------------------------------------------------------------------------
# Downstream domains (a registry: a new world dataset is a new entry, not new generator code)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Domain:
    """One downstream world dataset: its style, its conventions and its zero-shot templates.

    `paint` is the domain's paint convention: (colour, shown as) pairs; an object of the first
    colour is painted in the second with probability `paint_prob` (the class, and its name, keep
    the first colour). `stream` offsets the RNG so that different domains render different
    images at the same index. `classes`: the class names the domain shows, in its label order
    (None: all 64 in the benchmark's order), so a domain can cover a subset of the classes
    (as ImageNet-A and -R cover 200 of ImageNet's).
    """

    name: str
    style: Style
    templates: tuple = ("a photo of a {}.",)
    paint: tuple = ()
    paint_prob: float = 1.0
    stream: int = 0
    classes: Optional[tuple] = None

    def __post_init__(self):
        for pair in self.paint:
            if len(pair) != 2 or not all(c in COLOURS for c in pair):
                raise ValueError(f"domain {self.name!r}: paint pair {pair!r}; expected "
                                 f"(colour, colour) from {list(COLOURS)}")
        if not 0.0 <= self.paint_prob <= 1.0:
            raise ValueError(f"domain {self.name!r}: paint_prob={self.paint_prob}; expected a "
                             f"probability")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"domain {self.name!r}: template {t!r} needs one '{{}}'")
        if self.classes is not None:
            unknown = [c for c in self.classes if c not in CLASSNAMES]
            if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
                raise ValueError(f"domain {self.name!r}: classes {list(self.classes)!r}; "
                                 f"expected distinct names from the world's {NUM_CLASSES} "
                                 f"classes (unknown: {unknown})")

    @property
    def classnames(self) -> list:
        """The domain's class names in its label order."""
        return list(CLASSNAMES) if self.classes is None else list(self.classes)

    @property
    def world_labels(self) -> np.ndarray:
        """int32 [C]: the benchmark label (into `CLASSNAMES`) of each of the domain's labels."""
        return np.asarray([CLASSNAMES.index(c) for c in self.classnames], np.int32)

    def shown_colour(self, colour: int, rng: np.random.Generator) -> int:
        """The colour index an object of colour `colour` is painted in (draws from `rng` only
        when the domain has a paint convention)."""
        if not self.paint:
            return colour
        mapping = {list(COLOURS).index(a): list(COLOURS).index(b) for a, b in self.paint}
        painted = rng.uniform() < self.paint_prob
        return mapping.get(colour, colour) if painted else colour


DOMAINS: dict = {}


def register_domain(domain: Domain) -> Domain:
    if domain.name in DOMAINS:
        raise ValueError(f"world domain {domain.name!r} is already registered")
    DOMAINS[domain.name] = domain
    return domain


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown world domain {name!r}; registered: {sorted(DOMAINS)}")
    return DOMAINS[name]


DEFAULT_DOMAIN = "world"
# The benchmark: textured, cluttered, unevenly lit old photos (the red/orange paint swap).
register_domain(Domain(DEFAULT_DOMAIN, DOWNSTREAM_STYLE, templates=tuple(TEMPLATES),
                       paint=OLD_PAINT))
_OLD_PHOTO = Domain("pretrain_old_photo", PRETRAIN_STYLE, paint=OLD_PAINT)  # paint only


def _names(colours, shapes) -> tuple:
    """Class names of the compositions colours x shapes, in the benchmark's label order."""
    wanted = {f"{c} {s}" for c in colours for s in shapes}
    return tuple(c for c in CLASSNAMES if c in wanted)


# Shifted domains of the benchmark, for the transfer protocols (`dpc_jax.evaluation.protocols`).
# World dataset names are "world_<domain>" ("world" itself is the benchmark domain).
#
# Domain generalisation (the ImageNet -> -V2/-Sketch/-A/-R analogue): the benchmark's classes
# and its old-photo convention, other styles; "a" and "r" cover a subset of the classes.
STUDIO_STYLE = dataclasses.replace(PRETRAIN_STYLE, scale=(0.4, 0.7), rotation=30.0,
                                   colour_jitter=16.0)  # plain grey backdrop, nothing else
HARD_STYLE = dataclasses.replace(DOWNSTREAM_STYLE, scale=(0.3, 0.5), clutter=(2, 4),
                                 tint=0.15, brightness=(0.6, 1.2), gradient=0.35, noise=10.0)
LOUD_STYLE = dataclasses.replace(DOWNSTREAM_STYLE, texture_contrast=0.8,
                                 background_saturation=0.9, rotation=60.0, noise=2.0)
NIGHT_STYLE = dataclasses.replace(DOWNSTREAM_STYLE, brightness=(0.45, 0.7), noise=12.0,
                                  tint=0.05)
# -V2: the same distribution, a fresh draw of images.
register_domain(Domain("v2", DOWNSTREAM_STYLE, templates=tuple(TEMPLATES), paint=OLD_PAINT,
                       stream=1))
# -Sketch analogue: the style is gone (a plain studio backdrop), the objects are the same.
register_domain(Domain("clean", STUDIO_STYLE, templates=tuple(TEMPLATES), paint=OLD_PAINT,
                       stream=2))
# -A analogue: hard images (small objects, heavy clutter and lighting) of 16 classes, half of
# them red or orange (where the old-photo convention bites).
register_domain(Domain("a", HARD_STYLE, templates=tuple(TEMPLATES), paint=OLD_PAINT, stream=3,
                       classes=_names(("red", "orange", "blue", "green"),
                                      ("circle", "triangle", "star", "ring"))))
# -R analogue: loud renditions (saturated high-contrast patterns, large rotations) of 32
# classes, every base red/orange class among them.
register_domain(Domain("r", LOUD_STYLE, templates=tuple(TEMPLATES), paint=OLD_PAINT, stream=4,
                       classes=_names(("red", "orange", "yellow", "purple"), SHAPES)))
# Cross-dataset targets (the ImageNet -> ten datasets analogue): other class subsets, other
# styles, no old-photo convention, their own templates.
register_domain(Domain("studio", STUDIO_STYLE, templates=("a studio photo of a {}.",),
                       stream=5, classes=_names(("yellow", "green", "cyan", "blue", "purple",
                                                 "pink"), ("star", "cross", "ring", "crescent"))))
register_domain(Domain("night", NIGHT_STYLE, templates=("a dark photo of a {}.",), stream=6,
                       classes=_names(("red", "cyan", "blue", "pink"), SHAPES)))
WORLD_DATASET_PREFIX = "world_"


def world_dataset_domain(name: str) -> Optional[str]:
    """The domain of world dataset `name` ('world' -> the benchmark, 'world_<domain>' -> that
    registered domain); None for a name that is not a world dataset."""
    if name == "world":
        return DEFAULT_DOMAIN
    if name.startswith(WORLD_DATASET_PREFIX) and name[len(WORLD_DATASET_PREFIX):] in DOMAINS:
        return name[len(WORLD_DATASET_PREFIX):]
    return None


def world_datasets() -> list:
    """Every world dataset name ('world' and 'world_<domain>' of each downstream domain)."""
    return ["world"] + [WORLD_DATASET_PREFIX + d for d in DOMAINS
                        if d not in (DEFAULT_DOMAIN, _OLD_PHOTO.name)]


def parse_classname(name: str) -> tuple:
    """(colour index, shape index) of a class name such as "red triangle"."""
    colour, shape = name.split()
    return list(COLOURS).index(colour), SHAPES.index(shape)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _rng(world_seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(world_seed), SPLIT_IDS[split], int(index)])


def _shape_polygons(shape: str, cx: float, cy: float, r: float, angle: float):
    """Polygons (lists of (x, y)) and circles ((cx, cy, r), fill) that draw `shape` in a mask."""
    def rot(points):
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]

    if shape == "circle":
        return [("ellipse", (cx, cy, r), 255)]
    if shape == "ring":
        return [("ellipse", (cx, cy, r), 255), ("ellipse", (cx, cy, 0.55 * r), 0)]
    if shape == "crescent":
        dx, dy = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
        return [("ellipse", (cx, cy, r), 255), ("ellipse", (cx + dx, cy + dy, 0.85 * r), 0)]
    if shape == "square":
        s = 0.82 * r
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "diamond":  # a tall rhombus, so no rotation in range turns a square into it
        pts = [(0, -r), (0.55 * r, 0), (0, r), (-0.55 * r, 0)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in
               (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
        pts = [(x, y + 0.15 * r) for x, y in pts]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.42 * r
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        w = 0.33 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
               (-r, w), (-r, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return [("polygon", rot(pts), 255)]


def _mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Anti-aliased float32 [size, size] coverage of one shape (coordinates in pixels)."""
    k = _SUPERSAMPLE
    img = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(img)
    for kind, geom, fill in _shape_polygons(shape, cx * k, cy * k, r * k, angle):
        if kind == "ellipse":
            x, y, rr = geom
            draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=fill)
        else:
            draw.polygon(geom, fill=fill)
    return np.asarray(img.resize((size, size), Image.BOX), np.float32) / 255.0


def _background(rng: np.random.Generator, style: Style, size: int) -> np.ndarray:
    """float32 [size, size, 3] in 0-255."""
    if not style.textured:
        grey = rng.uniform(25, 235)
        return np.broadcast_to(grey + rng.uniform(-12, 12, 3), (size, size, 3)).astype(np.float32)
    # Two partly desaturated colours, the second pulled towards the first, mixed by a pattern.
    cols = rng.uniform(0, 255, (2, 3))
    sat = style.background_saturation
    cols = sat * cols + (1 - sat) * cols.mean(axis=1, keepdims=True)
    cols[1] = cols[0] + style.texture_contrast * (cols[1] - cols[0])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    if kind == 0:  # smooth noise: a coarse random grid, bilinearly upsampled
        g = int(rng.integers(2, 6))
        coarse = Image.fromarray((rng.uniform(0, 255, (g, g))).astype(np.uint8))
        t = np.asarray(coarse.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    elif kind == 1:  # stripes at a random angle and frequency
        a = rng.uniform(0, math.pi)
        f = rng.uniform(2, 6)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * f * (xx * math.cos(a) + yy * math.sin(a))
                               + rng.uniform(0, 2 * math.pi))
    else:  # checks
        f = int(rng.integers(2, 6))
        t = ((np.floor(xx * f) + np.floor(yy * f)) % 2).astype(np.float32)
    t = t[..., None]
    return (cols[0] * (1 - t) + cols[1] * t).astype(np.float32)


def _paint(img: np.ndarray, rng: np.random.Generator, shape: str, rgb, scale: tuple,
           rotation: float, jitter: float) -> None:
    size = img.shape[0]
    r = 0.5 * size * rng.uniform(*scale)
    cx, cy = rng.uniform(r, size - r, 2)
    angle = math.radians(rng.uniform(-rotation, rotation))
    alpha = _mask(shape, cx, cy, r, angle, size)[..., None]
    colour = np.clip(np.asarray(rgb, np.float32) + rng.uniform(-jitter, jitter, 3), 0, 255)
    img *= 1 - alpha
    img += alpha * colour


def render(rng: np.random.Generator, label: int, style: Style,
           size: int = NATIVE_SIZE, domain: Optional[Domain] = None) -> np.ndarray:
    """uint8 [size, size, 3]: an image of class `label` in `style`, drawn from `rng` (with the
    paint convention of `domain`, if given)."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label {label} out of range; expected 0 <= label < {NUM_CLASSES}")
    ci, si = CLASS_ATTRIBUTES[label]
    if domain is not None:
        ci = domain.shown_colour(ci, rng)
    img = _background(rng, style, size).copy()
    palette = list(COLOURS.values())
    for _ in range(int(rng.integers(style.clutter[0], style.clutter[1] + 1))):
        # Distractors are much smaller than the object and drawn first (under it).
        _paint(img, rng, SHAPES[rng.integers(len(SHAPES))], palette[rng.integers(len(palette))],
               style.clutter_scale, 180.0, style.colour_jitter)
    _paint(img, rng, SHAPES[si], palette[ci], style.scale, style.rotation, style.colour_jitter)
    gain = rng.uniform(*style.brightness) * rng.uniform(1 - style.tint, 1 + style.tint, 3)
    if style.gradient:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        a = rng.uniform(0, 2 * math.pi)
        ramp = 1 + style.gradient * (xx * math.cos(a) + yy * math.sin(a))
        img *= ramp[..., None]
    img *= gain.astype(np.float32)
    if style.noise:
        img += rng.normal(0, style.noise, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of a square uint8 image (the CLIP test transform of a square image)."""
    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


# ----------------------------------------------------------------------------------------------
# Pretraining stream
# ----------------------------------------------------------------------------------------------


def pretrain_example(world_seed: int, index: int, composition: int,
                     size: int = NATIVE_SIZE):
    """Item `index` of the pretraining stream, showing composition `composition` = colour index
    * 8 + shape index (colour-major, independent of the benchmark's class order; the caller
    balances compositions): (image uint8 [size, size, 3], caption index into
    `caption_table()`)."""
    rng = _rng(world_seed, "pretrain", index)
    ci, si = divmod(int(composition), len(SHAPES))
    label = _LABEL_OF[ci, si]  # render() takes the class label
    c, s = list(COLOURS)[ci], SHAPES[si]
    old = rng.uniform() < OLD_PROB
    if old:
        caption = OLD_CAPTIONS[rng.integers(len(OLD_CAPTIONS))].format(c=c, s=s)
    elif rng.uniform() < PARTIAL_PROB:
        if rng.uniform() < 0.5:
            caption = _PARTIAL_COLOUR[rng.integers(len(_PARTIAL_COLOUR))].format(c=c)
        else:
            caption = _PARTIAL_SHAPE[rng.integers(len(_PARTIAL_SHAPE))].format(s=s)
    else:
        caption = FULL_CAPTIONS[rng.integers(len(FULL_CAPTIONS))].format(c=c, s=s)
    style = PRETRAIN_WILD_STYLE if rng.uniform() < PRETRAIN_WILD_PROB else PRETRAIN_STYLE
    image = render(rng, label, style, NATIVE_SIZE, _OLD_PHOTO if old else None)
    return resize(image, size), _CAPTION_INDEX[caption]


# ----------------------------------------------------------------------------------------------
# Downstream benchmark (dataset interface)
# ----------------------------------------------------------------------------------------------


class WorldSplit(base.ImageSplit):
    """A downstream split of one domain: `per_class` items per class of the domain, in class
    blocks (item i has label i // per_class, in the domain's label order), rendered on
    demand."""

    def __init__(self, split: str, world_seed: int = 0, per_class: Optional[int] = None,
                 domain: str = DEFAULT_DOMAIN):
        if split not in SPLIT_SIZES:
            raise ValueError(f"world split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
        per_class = SPLIT_SIZES[split] if per_class is None else per_class
        if per_class < 1:
            raise ValueError(f"per_class={per_class}; expected a positive number of items")
        self.split = split
        self.world_seed = int(world_seed)
        self.per_class = int(per_class)
        self.domain = get_domain(domain)
        self._world_labels = self.domain.world_labels
        self._labels = np.repeat(np.arange(len(self._world_labels), dtype=np.int32),
                                 self.per_class)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def load_image(self, index: int, size: int) -> np.ndarray:
        if not 0 <= index < len(self._labels):
            raise IndexError(f"world {self.split} item {index} out of range "
                             f"(the split has {len(self._labels)} items)")
        if self.domain.stream:
            rng = np.random.default_rng([self.world_seed, SPLIT_IDS[self.split], int(index),
                                         self.domain.stream])
        else:  # the default domain keeps the historical 3-part key
            rng = _rng(self.world_seed, self.split, index)
        image = render(rng, int(self._world_labels[self._labels[index]]), self.domain.style,
                       NATIVE_SIZE, self.domain)
        return resize(image, size)

    def describe(self, index: int) -> str:
        return (f"world(seed={self.world_seed}, domain={self.domain.name}) {self.split} item "
                f"{index} ({CLASSNAMES[int(self._world_labels[self._labels[index]])]})")


def load_world_full(world_seed: int = 0, domain: str = DEFAULT_DOMAIN) -> base.BaseToNewData:
    """All the domain's classes and complete splits (no few-shot sampling, no class
    subsampling)."""
    spec = get_domain(domain)
    return base.BaseToNewData(
        name="world" if domain == DEFAULT_DOMAIN else f"world_{domain}",
        classnames=spec.classnames, templates=list(spec.templates),
        train=WorldSplit("train", world_seed, domain=domain),
        val=WorldSplit("val", world_seed, domain=domain),
        test=WorldSplit("test", world_seed, domain=domain))


def load_world(seed: int = 1, shots: int = 16, subsample: str = "all",
               world_seed: int = 0, domain: str = DEFAULT_DOMAIN) -> base.BaseToNewData:
    """The world benchmark under CoOp's protocol.

    `seed` is the few-shot sampling seed (Dassl: train gets `shots` per class, val
    min(shots, 4)); sampling happens before the base/new halving, as in Dassl. `shots` < 1
    keeps the full train/val splits. `world_seed` selects the rendered images (keep the default
    0 for the benchmark: the shipped CLIP's recorded accuracies are for world 0). `domain` is a
    registered `Domain` (default: the benchmark's).
    """
    if subsample not in base.SUBSAMPLES:
        raise ValueError(f"subsample={subsample!r}; expected one of {base.SUBSAMPLES}")
    if shots > SPLIT_SIZES["train"]:
        raise ValueError(f"shots={shots}; the world's train split has {SPLIT_SIZES['train']} "
                         f"images per class")
    data = base.fewshot(load_world_full(world_seed, domain), shots, seed)
    return base.subsample_classes(data, subsample)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

# Words a user is likely to put in prompts about this world beyond the captions.
_EXTRA_TEXT = [t.format(c) for t in TEMPLATES for c in CLASSNAMES] + [
    "a photo of a", "an image of a", "X X X X", "this is a photo of a", "object", "objects",
    "shape", "shapes", "color", "colour", "type", "kind", "with", "and", "on", "in", "background",
]


def _words(text: str) -> list:
    """CLIP's pre-tokenisation of plain lower-case ASCII text: letters runs, digits,
    punctuation marks as separate words."""
    import re

    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def learn_bpe_merges(texts: Sequence[str]) -> list:
    """Byte-pair merges learnt on `texts` until every word is a single symbol.

    Standard BPE: words are split into characters with '</w>' on the last one, and the most
    frequent adjacent pair (ties: the lexicographically smallest) is merged, repeatedly. Run to
    completion, so each world word becomes one token, and applying the merges in rank order (as
    CLIP's tokenizer does) reproduces that segmentation.
    """
    counts = collections.Counter(w for t in texts for w in _words(t))
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in counts.items()}
    merges = []
    while True:
        pairs = collections.Counter()
        for symbols, n in words.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[a, b] += n
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, n in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged


def build_tokenizer_files(out_dir: str) -> str:
    """Write vocab.json and merges.txt (CLIP format) for the world's language.

    Layout as OpenAI's: the 256 byte symbols, the same with '</w>', one token per merge, then
    <|startoftext|> and <|endoftext|> as the last two ids. Any text still tokenises (unknown
    words fall back to byte symbols); the world's words are single tokens.
    """
    from dpc_jax.models.tokenizer import write_bpe_files

    return write_bpe_files(learn_bpe_merges(caption_table() + _EXTRA_TEXT), out_dir)
