"""CLIP test transform, file splits and the streaming batch loader (dpc_jax.data.transforms)."""

import os

import numpy as np
import pytest
from PIL import Image

from dpc_jax.data import base
from dpc_jax.data.augment import normalize_pixels as normalize
from dpc_jax.data.transforms import (FileImageSplit, ImageLoadError, clip_test_transform,
                                     iterate_batches, read_image)
from dpc_jax.models.clip import CLIP_MEAN, CLIP_STD


def _noise_image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


# (width, height, size) -> (resized width, resized height, crop left, crop top), worked out by
# hand from torchvision's Resize (long side int(size * long / short)) and CenterCrop
# (offset int(round(d / 2.0)), Python's round-half-even).
CASES = [
    ((50, 30, 24), (40, 24, 8, 0)),  # landscape: 24*50/30 = 40
    ((31, 64, 16), (16, 33, 0, 8)),  # portrait: int(33.03) = 33; round(8.5) = 8
    ((25, 24, 24), (25, 24, 0, 0)),  # already at size: no resampling; round(0.5) = 0
    ((99, 20, 8), (39, 8, 16, 0)),  # int(39.6) = 39 (truncation, not rounding); round(15.5) = 16
    ((13, 13, 20), (20, 20, 0, 0)),  # upscaling
]


@pytest.mark.parametrize("shape,expected", CASES)
def test_matches_pil_resize_and_crop(shape, expected):
    w, h, size = shape
    rw, rh, left, top = expected
    img = _noise_image(w, h, seed=w * h)
    resized = img if (rw, rh) == (w, h) else img.resize((rw, rh), Image.BICUBIC)
    want = np.asarray(resized)[top:top + size, left:left + size]
    got = clip_test_transform(img, size)
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    np.testing.assert_array_equal(got, want)


def test_grayscale_and_rgba_are_converted_to_rgb():
    for mode in ("L", "RGBA", "P"):
        img = _noise_image(40, 30, mode=mode)
        got = clip_test_transform(img, 16)
        want = clip_test_transform(img.convert("RGB"), 16)
        np.testing.assert_array_equal(got, want)


def test_normalize_uses_clip_statistics():
    x = np.array([[[0, 128, 255]]], np.uint8)
    got = normalize(x)
    want = (np.array([0, 128, 255]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)
    import jax.numpy as jnp

    np.testing.assert_allclose(np.asarray(normalize(jnp.asarray(x))), got, rtol=1e-6)


def _write_images(tmp_path, n, bad=()):
    relpaths, labels = [], []
    for i in range(n):
        rel = f"c{i % 3}/img_{i}.jpg"
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in bad:
            path.write_bytes(b"this is not a jpeg")
        else:
            Image.fromarray(np.full((20 + i, 30, 3), 10 * i, np.uint8)).save(path, "JPEG")
        relpaths.append(rel)
        labels.append(i % 3)
    return relpaths, labels


def test_file_split_loads_with_the_transform(tmp_path):
    relpaths, labels = _write_images(tmp_path, 4)
    split = FileImageSplit(str(tmp_path), relpaths, labels)
    assert list(split.labels) == [0, 1, 2, 0]
    want = clip_test_transform(Image.open(tmp_path / relpaths[2]).convert("RGB"), 16)
    np.testing.assert_array_equal(split.load_image(2, 16), want)
    assert split.describe(1) == os.path.join(str(tmp_path), relpaths[1])


def test_missing_and_corrupt_images_fail_with_their_path(tmp_path):
    relpaths, labels = _write_images(tmp_path, 3, bad={1})
    split = FileImageSplit(str(tmp_path), relpaths + ["c0/gone.jpg"], labels + [0])
    with pytest.raises(ImageLoadError, match="img_1.jpg"):
        split.load_image(1, 8)
    with pytest.raises(ImageLoadError, match="gone.jpg.*no such file"):
        split.load_image(3, 8)
    assert split.missing_files() == [3]
    with pytest.raises(ImageLoadError, match="img_1.jpg"):
        read_image(str(tmp_path / relpaths[1]))


def test_truncated_jpeg_is_reported(tmp_path):
    path = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="t.jpg"):
        read_image(str(path))


def test_iterate_batches_pads_and_masks(tmp_path):
    relpaths, labels = _write_images(tmp_path, 7)
    split = FileImageSplit(str(tmp_path), relpaths, labels)
    it = iterate_batches(split, 8, 3, num_threads=2, progress=False)
    batches = list(it)
    assert len(it) == 3 and len(batches) == 3
    for images, ys, valid in batches:
        assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
        assert ys.shape == (3,) and valid.shape == (3,)
    valid = np.concatenate([b[2] for b in batches])
    ys = np.concatenate([b[1] for b in batches])
    images = np.concatenate([b[0] for b in batches])
    assert valid.tolist() == [True] * 7 + [False] * 2
    assert ys[:7].tolist() == labels and ys[7:].tolist() == [0, 0]
    np.testing.assert_array_equal(images[:7], base.load_images(split, range(7), 8))
    assert not images[7:].any()


def test_iterate_batches_raises_or_skips_bad_images(tmp_path):
    relpaths, labels = _write_images(tmp_path, 5, bad={3})
    split = FileImageSplit(str(tmp_path), relpaths, labels)
    with pytest.raises(ImageLoadError, match="img_3.jpg"):
        list(iterate_batches(split, 8, 2, num_threads=2, progress=False))
    # Through a SubsetSplit view (what subsample_classes returns) the skip still works.
    view = split.subset([4, 3, 0], relabel={0: 0, 1: 1, 2: 2})
    it = iterate_batches(view, 8, 2, num_threads=2, progress=False, skip_bad=True)
    valid = np.concatenate([v for _, _, v in it])
    assert valid.tolist() == [True, False, True, False]
    assert it.num_skipped == 1
    index, where, reason = it.skipped[0]
    assert index == 1 and where.endswith("img_3.jpg") and reason


def test_iterate_batches_rejects_bad_arguments(tmp_path):
    split = FileImageSplit(str(tmp_path), [], [])
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(split, 8, 0)
    assert list(iterate_batches(split, 8, 4, progress=False)) == []
