"""Zero-shot CLIP classification: text classifier weights from templates, batched accuracy.

`zeroshot_classifier` is the classifier of the zero-shot learner (`dpc_jax.prompts.zsclip`,
CLIP's zero-shot recipe: every template filled with the class name, each embedding
L2-normalised, averaged over templates, normalised again). `evaluate` runs the image tower over any `ImageSplit` in fixed-size batches (the last one
padded, so one compiled program serves the whole split) and returns top-1 accuracy in percent.
Both are deterministic for a given platform: no randomness, no data-dependent shapes.
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpc_jax.data.augment import normalize_pixels
from dpc_jax.data.base import ImageSplit, load_images
from dpc_jax.models.clip import cosine_logits
from dpc_jax.prompts.base import classifier_rows


@functools.lru_cache(maxsize=8)
def _image_classifier(model):
    @jax.jit
    def classify(params, images_uint8, weights):
        feats = model.apply({"params": params}, normalize_pixels(images_uint8),
                            method="encode_image")
        return jnp.argmax(cosine_logits(feats, weights, 1.0), axis=-1)
    return classify


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    """Pad the leading axis of `x` to `n` rows by repeating the first row."""
    if len(x) == n:
        return x
    return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)], axis=0)


@functools.lru_cache(maxsize=8)
def _learner_and_classifier(model, tokenizer, templates: tuple):
    """One zero-shot learner and its jitted classifier per (model, tokenizer, templates)."""
    from dpc_jax.prompts.zsclip import ZeroShotCLIP

    config = ml_collections.ConfigDict({"name": ZeroShotCLIP.name, "templates": list(templates)})
    learner = ZeroShotCLIP(model.config, tokenizer, config)
    return learner, jax.jit(lambda p, prompt, texts, ids, consts: learner.classifier(
        p, prompt, texts, ids, consts))


def zeroshot_classifier(model, params, tokenizer, classnames: Sequence[str],
                        templates: Sequence[str], batch_size: int = 256) -> jnp.ndarray:
    """Normalised zero-shot text weights [C, E] (`ZeroShotCLIP`'s template ensemble), encoding
    at most `batch_size` texts per call.

    Class names have '_' replaced by ' ' (as CoOp's zero-shot CLIP does); each template must
    contain one '{}'.
    """
    from dpc_jax.prompts.zsclip import check_templates

    if not classnames:
        raise ValueError("zeroshot_classifier needs at least one class name")
    learner, fn = _learner_and_classifier(model, tokenizer, tuple(check_templates(templates)))
    texts = learner.prepare(params, classnames)
    per_call = max(1, min(batch_size // len(learner.templates), len(classnames)))
    return jnp.asarray(classifier_rows(learner, params, {}, texts, None, per_call, fn))


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
        return load_images(split, range(start, min(start + batch_size, n)), image_size)

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
