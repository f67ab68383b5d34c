"""Accuracy of any learner's prompt on a test split: the classifier is computed once per
(prompt, class list), image batches are classified with it.

Built once per run; its jitted functions are built once per learner (so seeds and stages do not
recompile them). Image features are cached per split key when the prompt cannot change them
(learners with `uses_image_prompts = False`: zero-shot CLIP and CoOp share one encoding of each
test image).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from dpc_jax.data import augment, transforms
from dpc_jax.data.base import ImageSplit
from dpc_jax.mesh import shard_batch
from dpc_jax.prompts.base import classifier_rows

CLASS_CHUNK = 256  # class ids per classifier call (a static shape; ImageNet has 1000 classes)


class Evaluator:
    def __init__(self, clip_params, res: int, mesh: Mesh, config):
        self.clip_params, self.res, self.mesh = clip_params, res, mesh
        self.batch = int(math.ceil(config.eval_batch_size / mesh.size) * mesh.size)
        self.workers, self.progress = config.num_workers, config.progress
        self.skip_bad = config.skip_bad_images
        self._fns = {}
        self._cache = {}

    def clear_cache(self) -> None:
        """Forget cached image features (a new seed's splits)."""
        self._cache.clear()

    def _jitted(self, learner):
        if id(learner) not in self._fns:
            res = self.res
            out = NamedSharding(self.mesh, P())  # batch-sharded inputs, replicated outputs
            features = jax.jit(lambda cp, prompt, state, x: learner.image_features(
                cp, prompt, augment.center_normalize(x, res), state), out_shardings=out)
            classifier = jax.jit(lambda cp, prompt, texts, ids, consts: learner.classifier(
                cp, prompt, texts, ids, consts))
            predict = jax.jit(lambda cp, prompt, w, feats, consts: jnp.argmax(
                learner.classify(cp, prompt, w, feats, consts), axis=-1), out_shardings=out)
            self._fns[id(learner)] = (learner, features, classifier, predict)
        return self._fns[id(learner)][1:]

    def classifier(self, learner, prompt, class_texts, consts=None):
        """The class weights [C, E] of every class of `class_texts`, in chunks of class ids."""
        _, fn, _ = self._jitted(learner)
        # A classifier is an array [C, ...] or a pytree of them (CoCoOp: the class texts).
        return classifier_rows(learner, self.clip_params, prompt, class_texts, consts or {},
                               CLASS_CHUNK, fn)

    def classifier_shape(self, learner, prompt, class_texts, consts=None):
        """`jax.ShapeDtypeStruct`s of what `classifier` returns (nothing is computed)."""
        _, fn, _ = self._jitted(learner)
        n = int(jax.tree_util.tree_leaves(class_texts)[0].shape[0])
        chunk = jax.eval_shape(fn, self.clip_params, prompt, class_texts,
                               np.arange(CLASS_CHUNK) % n, consts or {})
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((n, *s.shape[1:]),
                                                                     s.dtype), chunk)

    def image_features(self, learner, split: ImageSplit, prompt, key: str, state=None):
        """(un-normalised features [N, E], valid [N]); invalid = skipped unreadable images."""
        cacheable = not learner.uses_image_prompts
        if cacheable and key in self._cache:
            return self._cache[key]
        fn, _, _ = self._jitted(learner)
        batches = transforms.iterate_batches(
            split, self.res, self.batch, num_threads=self.workers, progress=self.progress,
            skip_bad=self.skip_bad, desc=f"encode {key} test")
        feats, valid = [], []
        for images, _, ok in batches:
            images = shard_batch(images, self.mesh)
            feats.append(np.asarray(fn(self.clip_params, prompt, state or {}, images)))
            valid.append(ok)
        n = len(split)
        if batches.num_skipped:
            tqdm.write(f"{key} test: skipped {batches.num_skipped} unreadable image(s), e.g. "
                       f"{batches.skipped[0][1]} ({batches.skipped[0][2]})")
        out = (np.concatenate(feats)[:n], np.concatenate(valid)[:n])
        if cacheable:
            self._cache[key] = out
        return out

    def predict(self, learner, prompt, classifier, features, consts=None) -> np.ndarray:
        """int [N] predicted classes of image features, in fixed-size (padded) batches."""
        _, _, fn = self._jitted(learner)
        w = jax.tree_util.tree_map(jnp.asarray, classifier)
        n, preds = len(features), []
        for s in range(0, n, self.batch):
            chunk = features[s:s + self.batch]
            pad = np.concatenate([chunk, np.repeat(chunk[:1], self.batch - len(chunk), 0)])
            pad = shard_batch(pad, self.mesh)
            preds.append(np.asarray(fn(self.clip_params, prompt, w, pad, consts or {}))[
                :len(chunk)])
        return np.concatenate(preds)

    def accuracy(self, learner, split: ImageSplit, prompt, class_texts, key: str, state=None,
                 consts=None, rows=None) -> float:
        """Top-1 accuracy in percent over the readable images of `split`. `rows` (int [C']):
        classify among these classes of `class_texts` only, label y of `split` meaning class
        rows[y] (a target domain covering a subset of the source's classes)."""
        weights = self.classifier(learner, prompt, class_texts, consts)
        if rows is not None:
            weights = select_rows(weights, rows)
        feats, valid = self.image_features(learner, split, prompt, key, state)
        pred = self.predict(learner, prompt, weights, feats, consts)
        correct = (pred == np.asarray(split.labels)) & valid
        return float(100.0 * correct.sum() / max(1, valid.sum()))


def select_rows(classifier, rows):
    """The classifier of classes `rows` (in that order) of a classifier [C, ...] or a pytree of
    them."""
    rows = np.asarray(rows, np.int64)
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], classifier)
