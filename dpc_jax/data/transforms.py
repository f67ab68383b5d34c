"""Host-side image loading: CLIP's test transform, file-list splits and a streaming batch loader.

`clip_test_transform` reproduces CLIP's / Dassl's evaluation transform on a PIL image exactly:
torchvision `Resize(size, BICUBIC)` (the shorter side becomes `size`, the longer side
`int(size * long / short)`; PIL's bicubic resize), then `CenterCrop(size)` (offsets
`int(round((h - size) / 2.0))`). `normalize` applies CLIP's mean/std; it works on NumPy and on
JAX arrays, so it can run on device.

Images are decoded like Dassl's `read_image`: `PIL.Image.open(path).convert('RGB')`, no EXIF
rotation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from dpc_jax.data import base


class ImageLoadError(ValueError):
    """An image that cannot be read or decoded; `where` names it (a path for file datasets). A
    ValueError: bad data is the user's to fix (the CLIs print one `Error:` line)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"cannot load image {where}: {reason}")
        self.where = where
        self.reason = reason


# --- the transform ---------------------------------------------------------------------------

def resized_size(width: int, height: int, size: int) -> tuple:
    """(new_width, new_height) of torchvision Resize(size): shorter side -> size."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple:
    """PIL crop box (left, top, right, bottom) of torchvision CenterCrop(size)."""
    if width < size or height < size:
        # Cannot happen after `resized_size`; torchvision would pad here, we refuse.
        raise ValueError(f"image {width}x{height} is smaller than the crop size {size}")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def clip_test_transform(image: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: bicubic resize of the shorter side to `size`, centre crop."""
    if size < 1:
        raise ValueError(f"size={size}; expected a positive image size")
    if image.mode != "RGB":
        image = image.convert("RGB")
    new_size = resized_size(image.width, image.height, size)
    if new_size != image.size:  # torchvision returns the image untouched at the target size
        image = image.resize(new_size, Image.BICUBIC)
    image = image.crop(center_crop_box(image.width, image.height, size))
    out = np.asarray(image, dtype=np.uint8)
    return out


# --- decoding --------------------------------------------------------------------------------

def read_image(path: str) -> Image.Image:
    """Dassl's read_image: the decoded RGB image at `path`; ImageLoadError names the path."""
    if not os.path.isfile(path):
        raise ImageLoadError(path, "no such file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad files
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e


def decode_image_bytes(data: bytes, where: str) -> Image.Image:
    """An encoded image (JPEG/PNG bytes) as an RGB PIL image; ImageLoadError names `where`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception as e:
        raise ImageLoadError(where, f"{type(e).__name__}: {e}") from e


# --- file-list splits ------------------------------------------------------------------------

class FileImageSplit(base.ImageSplit):
    """Images stored as files: `root/relpath` with integer labels.

    A missing or undecodable file raises `ImageLoadError` naming the full path;
    `iterate_batches(..., skip_bad=True)` turns those into masked-out slots and counts them.
    """

    def __init__(self, root: str, relpaths: Sequence[str], labels: Sequence[int]):
        if len(relpaths) != len(labels):
            raise ValueError(f"{len(relpaths)} paths but {len(labels)} labels")
        self.root = root
        self.relpaths = list(relpaths)
        self._labels = np.asarray(labels, dtype=np.int32).reshape(-1)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.relpaths[index])

    def load_image(self, index: int, size: int) -> np.ndarray:
        return clip_test_transform(read_image(self.path(index)), size)

    def describe(self, index: int) -> str:
        return self.path(index)

    def missing_files(self) -> list:
        """Indices whose file does not exist (a cheap layout check: no decoding)."""
        return [i for i in range(len(self.relpaths)) if not os.path.isfile(self.path(i))]


def unwrap(split: base.ImageSplit, index: int) -> tuple:
    """(innermost split, its index) behind any chain of `SubsetSplit` views."""
    while isinstance(split, base.SubsetSplit):
        split, index = split.parent, int(split.indices[index])
    return split, index


# --- streaming batches -----------------------------------------------------------------------

class BatchIterator:
    """Iterates a split in order as (uint8 [B, size, size, 3], int32 [B], bool [B] valid).

    Every batch has exactly `batch_size` slots (static shapes for jit); slots past the end of the
    split, and images skipped with `skip_bad=True`, are zeros with label 0 and valid False.
    A thread pool decodes ahead of the consumer, at most `prefetch` batches in flight.
    After (or during) iteration `skipped` lists (index, description, reason) of skipped items.
    """

    def __init__(self, split: base.ImageSplit, size: int, batch_size: int, num_threads: int = 8,
                 progress: bool = True, skip_bad: bool = False, prefetch: int = 2,
                 desc: Optional[str] = None):
        for field, value in (("size", size), ("batch_size", batch_size),
                             ("num_threads", num_threads), ("prefetch", prefetch)):
            if int(value) < 1:
                raise ValueError(f"{field}={value}; expected a positive integer")
        self.split = split
        self.size = int(size)
        self.batch_size = int(batch_size)
        self.num_threads = int(num_threads)
        self.progress = progress
        self.skip_bad = skip_bad
        self.prefetch = int(prefetch)
        self.desc = desc
        self.skipped: list = []

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __iter__(self) -> Iterator[tuple]:
        n, bs, size = len(self.split), self.batch_size, self.size
        labels = np.asarray(self.split.labels, dtype=np.int32)
        window = max(bs * self.prefetch, self.num_threads)
        bar = None
        if self.progress:
            from dpc_jax.progress import progress_bar

            bar = progress_bar(total=n, desc=self.desc, unit="img", leave=False)
        pool = concurrent.futures.ThreadPoolExecutor(self.num_threads)
        pending: collections.deque = collections.deque()
        next_item = 0

        def fill():
            nonlocal next_item
            while next_item < n and len(pending) < window:
                pending.append(pool.submit(self.split.load_image, next_item, size))
                next_item += 1

        try:
            for b in range(len(self)):
                fill()
                images = np.zeros((bs, size, size, 3), np.uint8)
                batch_labels = np.zeros((bs,), np.int32)
                valid = np.zeros((bs,), bool)
                for j in range(min(bs, n - b * bs)):
                    i = b * bs + j
                    future = pending.popleft()
                    try:
                        images[j] = future.result()
                    except ImageLoadError as e:
                        if not self.skip_bad:
                            raise
                        self.skipped.append((i, self.split.describe(i), e.reason))
                        continue
                    batch_labels[j] = labels[i]
                    valid[j] = True
                fill()  # keep the pool busy while the consumer works on this batch
                if bar is not None:
                    bar.update(min(bs, n - b * bs))
                    if self.skipped:
                        bar.set_postfix(skipped=len(self.skipped))
                yield images, batch_labels, valid
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()


def iterate_batches(split: base.ImageSplit, size: int, batch_size: int, num_threads: int = 8,
                    progress: bool = True, skip_bad: bool = False, prefetch: int = 2,
                    desc: Optional[str] = None) -> BatchIterator:
    """Stream a (test) split in fixed-size, padded batches; see `BatchIterator`."""
    return BatchIterator(split, size, batch_size, num_threads=num_threads, progress=progress,
                         skip_bad=skip_bad, prefetch=prefetch, desc=desc)
