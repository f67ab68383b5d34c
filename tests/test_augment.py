"""On-device transforms (dpc_jax.data.augment) against torchvision's sampling rule and PIL."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dpc_jax.data import augment
from dpc_jax.models.clip import CLIP_MEAN, CLIP_STD

DEFAULT_SCALE, DEFAULT_RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)


def tv_get_params(height, width, scale, ratio, u_area, u_ratio, u_top, u_left):
    """torchvision RandomResizedCrop.get_params, with its random draws given as uniforms."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for ua, ur in zip(u_area, u_ratio):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * ua)
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ur)
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u_top * (height - h + 1))  # torch.randint(0, height - h + 1)
            j = int(u_left * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def smooth_images(rng, n, h, w):
    """Natural-ish uint8 images (random walks), where resampling differences would show."""
    steps = rng.integers(-12, 13, (n, h, w, 3))
    x = np.cumsum(steps, axis=1) + np.cumsum(steps, axis=2) + 128
    return np.clip(x, 0, 255).astype(np.uint8)


def pil_resized_crop(image, top, left, h, w, out, flip, order="hv"):
    """torchvision's F.resized_crop on a PIL image (+ flip); order 'hv' = one pass per call."""
    crop = Image.fromarray(image).crop((left, top, left + w, top + h))
    if order == "hv":
        crop = crop.resize((out, h), Image.BICUBIC).resize((out, out), Image.BICUBIC)
    else:  # one call: the installed Pillow picks the pass order
        crop = crop.resize((out, out), Image.BICUBIC)
    x = np.asarray(crop).astype(np.float32)
    return x[:, ::-1] if flip else x


CASES = [(64, 64, DEFAULT_SCALE, DEFAULT_RATIO), (48, 80, DEFAULT_SCALE, DEFAULT_RATIO),
         (100, 30, (0.5, 1.0), (0.2, 5.0)), (32, 32, (0.9, 1.0), (2.0, 3.0)),
         (30, 100, (0.9, 1.0), (3.0, 4.0))]


@pytest.mark.parametrize("height,width,scale,ratio", CASES)
def test_crop_params_match_torchvision_rule(height, width, scale, ratio):
    rng = np.random.default_rng(0)
    n = 2000
    u_area = rng.random((n, augment.CROP_TRIES), dtype=np.float32)
    u_ratio = rng.random((n, augment.CROP_TRIES), dtype=np.float32)
    u_top = rng.random(n, dtype=np.float32)
    u_left = rng.random(n, dtype=np.float32)
    got = jax.jit(augment.crop_params_from_uniforms, static_argnums=(4, 5, 6, 7))(
        u_area, u_ratio, u_top, u_left, height, width, scale, ratio)
    got = np.stack([np.asarray(g) for g in got], axis=1)
    want = np.asarray([
        tv_get_params(height, width, scale, ratio, u_area[i].tolist(), u_ratio[i].tolist(),
                      float(u_top[i]), float(u_left[i])) for i in range(n)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("height,width,scale,ratio", CASES)
def test_sampled_boxes_satisfy_torchvision_constraints(height, width, scale, ratio):
    top, left, h, w = (np.asarray(a) for a in jax.jit(
        augment.sample_crop_params, static_argnums=(1, 2, 3, 4, 5))(
            jax.random.key(1), 4000, height, width, scale, ratio))
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    fallback = augment.fallback_crop(height, width, ratio)
    is_fallback = (top == fallback[0]) & (left == fallback[1]) & (h == fallback[2]) & (
        w == fallback[3])
    # Accepted tries: some area in scale * H * W and ratio in `ratio` round to (w, h).
    # sqrt(area * r) in [w - 1/2, w + 1/2] and sqrt(area / r) in [h - 1/2, h + 1/2].
    a_lo, a_hi = (w - 0.5) * (h - 0.5), (w + 0.5) * (h + 0.5)
    r_lo, r_hi = (w - 0.5) / (h + 0.5), (w + 0.5) / (h - 0.5)
    area = height * width
    ok = (a_hi >= scale[0] * area - 1e-6) & (a_lo <= scale[1] * area + 1e-6)
    ok &= (r_hi >= ratio[0] - 1e-6) & (r_lo <= ratio[1] + 1e-6)
    assert (ok | is_fallback).all()
    # Offsets of accepted tries span their whole range [0, H - h].
    room = height - h
    moved = (room > 0) & ~is_fallback
    if moved.sum() > 100:
        assert (top[moved] == 0).any() and (top[moved] == room[moved]).any()
        assert (top[moved] > 0).mean() > 0.5
    else:  # (2, 3) ratios on a square image: every try fails, as in torchvision
        assert is_fallback.mean() > 0.99


def test_fallback_is_torchvision_center_crop():
    assert augment.fallback_crop(32, 32, (2.0, 3.0)) == (8, 0, 16, 32)  # too wide: h = W / 2
    assert augment.fallback_crop(30, 100, (0.5, 1.0)) == (0, 35, 30, 30)  # too narrow: w = H
    assert augment.fallback_crop(40, 50, DEFAULT_RATIO) == (0, 0, 40, 50)  # whole image


def test_resized_crop_matches_pil():
    rng = np.random.default_rng(0)
    height, width, out = 40, 56, 24
    n = 12
    images = smooth_images(rng, n, height, width)
    images[:3] = rng.integers(0, 256, (3, height, width, 3))  # noise too: maximal ringing
    boxes = [(0, 0, height, width), (3, 5, 10, 7), (1, 2, 39, 45), (10, 10, 24, 24),
             (5, 0, 30, 17), (0, 20, 12, 36), (2, 3, 24, 50), (7, 9, 33, 24), (0, 0, 24, 24),
             (16, 32, 24, 24), (1, 1, 5, 50), (0, 40, 40, 16)]
    top, left, h, w = (np.asarray(a) for a in zip(*boxes))
    flip = np.arange(n) % 2 == 1
    got = np.asarray(jax.jit(augment.resized_crop, static_argnums=6)(
        images, top, left, h, w, flip, out))
    assert got.shape == (n, out, out, 3) and got.dtype == np.float32
    for i, box in enumerate(boxes):
        # PIL with the horizontal pass first (its ImagingResampleInner order): equal up to
        # PIL's fixed-point coefficients.
        want = pil_resized_crop(images[i], *box, out, flip[i])
        diff = np.abs(got[i] - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (box, diff.max(), (diff > 0).mean())
        # One resize call of the installed Pillow, which may run the vertical pass first: the
        # intermediate rounding and clipping differ, the images hardly.
        want = pil_resized_crop(images[i], *box, out, flip[i], order="one call")
        assert np.abs(got[i] - want).mean() < 0.5, box


def test_full_image_crop_without_flip_is_plain_normalisation():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    full = jnp.asarray([0, 0, 0]), jnp.asarray([0, 0, 0]), jnp.full(3, 16), jnp.full(3, 16)
    pixels = augment.resized_crop(jnp.asarray(images), *full, jnp.zeros(3, bool), 16)
    np.testing.assert_array_equal(pixels, images.astype(np.float32))
    # ToTensor + Normalize in float32, as torchvision computes it.
    want = (images.astype(np.float32) / np.float32(255) - np.asarray(CLIP_MEAN, np.float32)
            ) / np.asarray(CLIP_STD, np.float32)
    np.testing.assert_allclose(augment.normalize_pixels(pixels), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(augment.center_normalize(jnp.asarray(images), 16), want, rtol=0,
                               atol=1e-6)


def test_flip_flips():
    rng = np.random.default_rng(2)
    images = jnp.asarray(smooth_images(rng, 4, 20, 20))
    box = jnp.asarray([1, 0, 3, 2]), jnp.asarray([2, 5, 0, 1]), jnp.asarray([15, 19, 7, 18]), \
        jnp.asarray([11, 14, 20, 6])
    plain = augment.resized_crop(images, *box, jnp.zeros(4, bool), 12)
    flipped = augment.resized_crop(images, *box, jnp.ones(4, bool), 12)
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_random_resized_crop_flip_output_and_flip_rate():
    # Left half black, right half white; with scale = ratio = 1 every crop is the whole image,
    # so an output is flipped iff its left half is bright.
    n, size = 2000, 8
    images = np.zeros((n, size, size, 3), np.uint8)
    images[:, :, size // 2:] = 255
    fn = jax.jit(augment.random_resized_crop_flip, static_argnums=(2, 3, 4))
    out = np.asarray(fn(jax.random.key(0), jnp.asarray(images), size, (1.0, 1.0), (1.0, 1.0)))
    assert out.shape == (n, size, size, 3) and out.dtype == np.float32
    black = (0.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    left_dark = np.isclose(out[:, :, : size // 2], black, atol=1e-5).all(axis=(1, 2, 3))
    left_bright = np.isclose(out[:, :, size // 2:], black, atol=1e-5).all(axis=(1, 2, 3))
    assert (left_dark ^ left_bright).all()
    assert 0.45 < left_bright.mean() < 0.55
    # Same key, same output; another key, other crops.
    again = np.asarray(fn(jax.random.key(0), jnp.asarray(images), size, (1.0, 1.0), (1.0, 1.0)))
    np.testing.assert_array_equal(out, again)


def test_random_resized_crop_flip_default_params():
    rng = np.random.default_rng(3)
    images = jnp.asarray(smooth_images(rng, 6, 32, 32))
    fn = jax.jit(augment.random_resized_crop_flip, static_argnums=2)
    a = np.asarray(fn(jax.random.key(0), images, 24))
    b = np.asarray(fn(jax.random.key(1), images, 24))
    assert a.shape == (6, 24, 24, 3) and a.dtype == np.float32
    assert np.isfinite(a).all() and not np.array_equal(a, b)
    lo = (0.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    hi = (1.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    assert (a >= lo - 1e-5).all() and (a <= hi + 1e-5).all()


@pytest.mark.parametrize("height,width", [(40, 40), (30, 50), (50, 36)])
def test_center_normalize_matches_resize_and_center_crop(height, width):
    rng = np.random.default_rng(4)
    out = 24
    images = smooth_images(rng, 2, height, width)
    got = np.asarray(augment.center_normalize(jnp.asarray(images), out))
    for i in range(2):
        # torchvision Resize(out) (shorter side) + CenterCrop(out), on PIL images.
        if width <= height:
            size = (out, int(out * height / width))
        else:
            size = (int(out * width / height), out)
        pil = Image.fromarray(images[i]).resize(size, Image.BICUBIC)
        top = int(round((size[1] - out) / 2.0))
        left = int(round((size[0] - out) / 2.0))
        pixels = np.asarray(pil.crop((left, top, left + out, top + out))).astype(np.float32)
        want = (pixels / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
        np.testing.assert_allclose(got[i], want, atol=1.01 / 255 / min(CLIP_STD))


def test_bad_inputs_are_rejected():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="uint8"):
        augment.random_resized_crop_flip(key, jnp.zeros((2, 8, 8, 3), jnp.float32), 8)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        augment.center_normalize(jnp.zeros((8, 8, 3), jnp.uint8), 8)
    with pytest.raises(ValueError, match="out_size=0"):
        augment.random_resized_crop_flip(key, jnp.zeros((2, 8, 8, 3), jnp.uint8), 0)
    with pytest.raises(ValueError, match="scale="):
        augment.random_resized_crop_flip(key, jnp.zeros((2, 8, 8, 3), jnp.uint8), 8,
                                         scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="ratio="):
        augment.random_resized_crop_flip(key, jnp.zeros((2, 8, 8, 3), jnp.uint8), 8,
                                         ratio=(0.0, 1.0))
