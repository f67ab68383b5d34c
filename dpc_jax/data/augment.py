"""On-device image transforms of the CoOp/Dassl protocol (docs/reference/method.md#data-protocol),
jit-able.

Training: torchvision's RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic),
RandomHorizontalFlip(0.5), ToTensor, Normalize(CLIP mean/std). Evaluation: bicubic resize of the
shorter side, centre crop, normalise. Inputs are uint8 [N, H, W, 3] batches already decoded at a
stored resolution (the training code crops from those, not from the original files).

Resampling reproduces what torchvision does with PIL images, `img.crop(box).resize(size,
BICUBIC)`: PIL's bicubic kernel (a = -0.5), widened by the scale factor when downscaling (PIL's
antialiasing), kernel taps restricted to the crop box and renormalised at its edges, the
horizontal pass first, and a round-to-uint8 after each pass as PIL does for 8-bit images. PIL
stores its coefficients in 22-bit fixed point and we use float32, so results can differ from
PIL by one grey level on a few pixels. (Pillow resampled horizontally first until 2026; newer
releases, such as the 13.0 installed here, run the vertical pass first when the height shrinks
much more than the width (python-pillow/Pillow#9549), which moves about a quarter of those
images' pixels by a grey level or more where the bicubic overshoot is clipped. We keep the
order of the Pillow the released code ran on.) Each pass is a matmul with a per-image [out, in]
weight matrix (no gathers, so crops of any size share one static shape); the flip reverses the
rows of the horizontal weight matrix.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dpc_jax.models.clip import CLIP_MEAN, CLIP_STD

Array = Any

CROP_TRIES = 10  # torchvision RandomResizedCrop.get_params
_HIGHEST = jax.lax.Precision.HIGHEST  # pixel values up to 255: TF32/bf16 passes would blur them


def _check_images(images, name: str = "images") -> Tuple[int, int]:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be [N, H, W, 3]; got shape {tuple(images.shape)}")
    if images.dtype != jnp.uint8:
        raise ValueError(f"{name} must be uint8 pixels in [0, 255]; got dtype {images.dtype}")
    return int(images.shape[1]), int(images.shape[2])


def _check_size(out_size) -> int:
    if isinstance(out_size, bool) or not isinstance(out_size, (int, np.integer)) or out_size < 1:
        raise ValueError(f"out_size={out_size!r}; expected a positive int")
    return int(out_size)


def _check_range(value, name: str, positive: bool = False) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}; expected a pair (min, max)") from None
    if lo > hi or (positive and lo <= 0) or (not positive and lo < 0):
        raise ValueError(f"{name}={value!r}; expected {'0 <' if positive else '0 <='} min <= max")
    return lo, hi


def normalize_pixels(pixels: Array) -> Array:
    """float32 CLIP normalisation of pixel values in [0, 255] (ToTensor then Normalize)."""
    x = pixels.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def _bicubic(x: Array) -> Array:
    """PIL's bicubic filter, a = -0.5."""
    a = -0.5
    x = jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resample_weights(start: Array, length: Array, in_size: int, out_size: int) -> Array:
    """float32 [..., out_size, in_size]: PIL bicubic weights of one axis (PIL `precompute_coeffs`).

    Output pixel o reads input pixels [start, start + length) (the crop along this axis), as PIL
    does when resizing an image cropped to that range: centre (o + 0.5) * length / out_size,
    kernel support 2 * max(length / out_size, 1), taps clipped to the crop and renormalised.
    """
    start = jnp.asarray(start, jnp.float32)[..., None, None]
    length = jnp.asarray(length, jnp.float32)[..., None, None]
    scale = length / out_size
    filterscale = jnp.maximum(scale, 1.0)
    support = 2.0 * filterscale
    center = (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * scale  # [..., out, 1]
    lo = jnp.maximum(jnp.floor(center - support + 0.5), 0.0)
    hi = jnp.minimum(jnp.floor(center + support + 0.5), length)
    x = jnp.arange(in_size, dtype=jnp.float32) - start  # input index relative to the crop
    inside = (x >= lo) & (x < hi)
    w = jnp.where(inside, _bicubic((x - center + 0.5) / filterscale), 0.0)
    total = jnp.sum(w, axis=-1, keepdims=True)
    return w / jnp.where(total == 0.0, 1.0, total)


def _round_u8(x: Array) -> Array:
    """PIL's 8-bit output: round half up, clip to [0, 255]."""
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def resized_crop(images: Array, top: Array, left: Array, crop_h: Array, crop_w: Array,
                 flip: Array, out_size: int) -> Array:
    """float32 [N, out, out, 3] pixel values in [0, 255] (integers): crop, resize, flip.

    Per image n: the box rows [top, top + crop_h), columns [left, left + crop_w), resized to
    out_size x out_size as PIL `crop(...).resize(..., BICUBIC)`, then flipped left-right where
    flip[n]. All box arguments are int [N]; boxes must lie inside the image.
    """
    height, width = _check_images(images)
    out_size = _check_size(out_size)
    wy = resample_weights(top, crop_h, height, out_size)  # [N, out, H]
    wx = resample_weights(left, crop_w, width, out_size)  # [N, out, W]
    wx = jnp.where(jnp.asarray(flip, bool)[:, None, None], wx[:, ::-1, :], wx)
    x = images.astype(jnp.float32)
    x = _round_u8(jnp.einsum("nhwc,now->nhoc", x, wx, precision=_HIGHEST))
    return _round_u8(jnp.einsum("nph,nhoc->npoc", wy, x, precision=_HIGHEST))


def fallback_crop(height: int, width: int, ratio: Tuple[float, float]) -> Tuple[int, int, int, int]:
    """torchvision's central crop when no try is accepted: (top, left, h, w), static."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_params_from_uniforms(u_area: Array, u_ratio: Array, u_top: Array, u_left: Array,
                              height: int, width: int,
                              scale: Sequence[float] = (0.08, 1.0),
                              ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)) -> Tuple:
    """torchvision `RandomResizedCrop.get_params`, vectorised, from given uniform [0, 1) draws.

    u_area, u_ratio: [N, T] (one column per try); u_top, u_left: [N] (the offsets of the
    accepted try, `randint(0, H - h + 1)` = floor(u * (H - h + 1))). Try t: area uniform in
    scale * H * W, aspect ratio log-uniform in `ratio`, w = round(sqrt(area * r)),
    h = round(sqrt(area / r)) (round half to even, as Python's round), accepted if 0 < w <= W
    and 0 < h <= H; the first accepted try wins; with none, `fallback_crop`.
    Returns int32 [N] arrays (top, left, h, w).
    """
    scale = _check_range(scale, "scale")
    ratio = _check_range(ratio, "ratio", positive=True)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = jnp.float32(height * width) * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(ok, axis=1)[:, None]
    accepted = jnp.any(ok, axis=1)
    f_top, f_left, f_h, f_w = fallback_crop(height, width, ratio)
    h = jnp.where(accepted, jnp.take_along_axis(h, first, axis=1)[:, 0], f_h)
    w = jnp.where(accepted, jnp.take_along_axis(w, first, axis=1)[:, 0], f_w)

    def offset(u, room):  # uniform integer in [0, room]; the clip guards float rounding at u ~ 1
        return jnp.minimum(jnp.floor(u * (room + 1).astype(jnp.float32)).astype(jnp.int32), room)

    top = jnp.where(accepted, offset(u_top, height - h), f_top)
    left = jnp.where(accepted, offset(u_left, width - w), f_left)
    return top, left, h, w


def sample_crop_params(key: Array, n: int, height: int, width: int,
                       scale: Sequence[float] = (0.08, 1.0),
                       ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)) -> Tuple:
    """int32 [N] (top, left, h, w): torchvision's RandomResizedCrop boxes for n images."""
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    return crop_params_from_uniforms(
        jax.random.uniform(k_area, (n, CROP_TRIES)), jax.random.uniform(k_ratio, (n, CROP_TRIES)),
        jax.random.uniform(k_top, (n,)), jax.random.uniform(k_left, (n,)),
        height, width, scale, ratio)


def random_resized_crop_flip(key: Array, images: Array, out_size: int,
                             scale: Sequence[float] = (0.08, 1.0),
                             ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)) -> Array:
    """The CoOp training transform: float32 [N, out, out, 3], CLIP-normalised.

    images: uint8 [N, H, W, 3]. Every image gets its own crop box, and a flip with p = 0.5.
    """
    height, width = _check_images(images)
    out_size = _check_size(out_size)
    k_crop, k_flip = jax.random.split(key)
    n = images.shape[0]
    top, left, h, w = sample_crop_params(k_crop, n, height, width, scale, ratio)
    flip = jax.random.uniform(k_flip, (n,)) < 0.5
    return normalize_pixels(resized_crop(images, top, left, h, w, flip, out_size))


def center_normalize(images: Array, out_size: int) -> Array:
    """The CLIP test transform: float32 [N, out, out, 3], CLIP-normalised.

    For images already at out_size x out_size (the usual stored resolution) only normalisation;
    otherwise torchvision Resize(out_size) (shorter side, bicubic) then CenterCrop(out_size).
    """
    height, width = _check_images(images)
    out_size = _check_size(out_size)
    if height == width == out_size:
        return normalize_pixels(images)
    if width <= height:
        new_w, new_h = out_size, int(out_size * height / width)
    else:
        new_h, new_w = out_size, int(out_size * width / height)
    top = int(round((new_h - out_size) / 2.0))
    left = int(round((new_w - out_size) / 2.0))
    wy = resample_weights(0, height, height, new_h)[top:top + out_size]
    wx = resample_weights(0, width, width, new_w)[left:left + out_size]
    x = images.astype(jnp.float32)
    x = _round_u8(jnp.einsum("nhwc,ow->nhoc", x, wx, precision=_HIGHEST))
    x = _round_u8(jnp.einsum("ph,nhoc->npoc", wy, x, precision=_HIGHEST))
    return normalize_pixels(x)
