"""Zero-shot CLIP classification: text classifier weights from templates, batched accuracy.

`zeroshot_classifier` follows CLIP's zero-shot notebook: for each class, embed every template
filled with the class name, L2-normalise each embedding, average over templates and normalise
again. `evaluate` runs the image tower over any `ImageSplit` in fixed-size batches (the last one
padded, so one compiled program serves the whole split) and returns top-1 accuracy in percent.
Both are deterministic for a given platform: no randomness, no data-dependent shapes.
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpc_jax.data.base import ImageSplit
from dpc_jax.models.clip import CLIP_MEAN, CLIP_STD, normalize


@functools.lru_cache(maxsize=8)
def _text_encoder(model):
    @jax.jit
    def encode(params, ids):
        return normalize(model.apply({"params": params}, ids, method="encode_text"))
    return encode


@functools.lru_cache(maxsize=8)
def _image_classifier(model):
    mean = jnp.asarray(CLIP_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(CLIP_STD, jnp.float32) * 255.0

    @jax.jit
    def classify(params, images_uint8, weights):
        x = (images_uint8.astype(jnp.float32) - mean) / std
        feats = normalize(model.apply({"params": params}, x, method="encode_image"))
        return jnp.argmax(jnp.dot(feats, weights.T.astype(jnp.float32),
                                  precision=jax.lax.Precision.HIGHEST), axis=-1)
    return classify


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    """Pad the leading axis of `x` to `n` rows by repeating the first row."""
    if len(x) == n:
        return x
    return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)], axis=0)


def zeroshot_classifier(model, params, tokenizer, classnames: Sequence[str],
                        templates: Sequence[str], batch_size: int = 256) -> jnp.ndarray:
    """Normalised zero-shot text weights [C, E].

    Class names have '_' replaced by ' ' (as CoOp's zero-shot CLIP does); each template must
    contain one '{}'.
    """
    if not classnames:
        raise ValueError("zeroshot_classifier needs at least one class name")
    if not templates:
        raise ValueError("zeroshot_classifier needs at least one template")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}' for the class name")
    texts = [t.format(c.replace("_", " ")) for c in classnames for t in templates]
    ids, _ = tokenizer(texts)
    encode = _text_encoder(model)
    feats = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        out = encode(params, _pad(chunk, min(batch_size, len(ids))))
        feats.append(np.asarray(out[:len(chunk)]))
    feats = np.concatenate(feats).reshape(len(classnames), len(templates), -1)
    return normalize(jnp.asarray(feats.mean(axis=1)))


def predict(model, params, weights, split: ImageSplit, image_size: Optional[int] = None,
            batch_size: int = 100) -> np.ndarray:
    """int32 [N] predicted labels: argmax of cosine similarity to the rows of `weights`."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected a positive integer")
    if image_size is None:
        image_size = model.config.image_resolution
    n = len(split)
    if n == 0:
        raise ValueError("cannot evaluate an empty split")
    batch_size = min(batch_size, n)
    classify = _image_classifier(model)
    weights = jnp.asarray(weights)

    def load(start):
        idx = range(start, min(start + batch_size, n))
        return np.stack([split.load_image(i, image_size) for i in idx])

    preds = []
    # Decode the next batch on a host thread while the device runs the current one.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        starts = list(range(0, n, batch_size))
        pending = pool.submit(load, starts[0])
        for k, _ in enumerate(starts):
            images = pending.result()
            if k + 1 < len(starts):
                pending = pool.submit(load, starts[k + 1])
            out = classify(params, _pad(images, batch_size), weights)
            preds.append(np.asarray(out[:len(images)]))
    return np.concatenate(preds).astype(np.int32)


def evaluate(model, params, weights, split: ImageSplit, image_size: Optional[int] = None,
             batch_size: int = 100) -> float:
    """Top-1 accuracy in percent of zero-shot (or any) classifier `weights` [C, E] on `split`."""
    preds = predict(model, params, weights, split, image_size, batch_size)
    return float(100.0 * np.mean(preds == split.labels))
