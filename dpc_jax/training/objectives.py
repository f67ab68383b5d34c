"""The two training objectives, built once per run from a learner.

objective(params, state, consts, batch, key) -> (loss, (metrics, new_state)); `consts` holds
'clip' (the CLIP parameters), 'train' (the device-resident few-shot set), 'class_texts' (the
base classes), 'learner' (the learner's frozen per-seed constants) and, for DPC, 'scorer' (the
frozen stage-1 classifier over the base classes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpc_jax.data import augment
from dpc_jax.prompts import capabilities
from dpc_jax.training import dhno, row_skipping


def backbone_objective(learner, res: int, crop_scale=(0.08, 1.0)):
    """Stage 1: the learner's own loss on augmented few-shot images (by default CE over all
    base classes)."""

    def objective(prompt, state, consts, batch, key):
        train = consts["train"]
        idx = batch["index"]
        raw = batch["images"] if "images" in batch else train["images"][idx]  # streamed or not
        images = augment.random_resized_crop_flip(key, raw, res, crop_scale)
        loss, metrics, state = learner.loss(consts["clip"], prompt, state, consts["learner"],
                                            consts["class_texts"], images, train["labels"][idx],
                                            jax.random.fold_in(key, 1))
        return loss, (metrics, state)

    return objective


def check_work_fields(dedupe_text, compact_negatives, chunk_tail) -> None:
    """The `config.dpc` fields that choose how `dpc_objective` skips work, or a ValueError
    naming the first one that is out of range (the trainer checks them before any stage)."""
    for name, value in (("dedupe_text", dedupe_text), ("compact_negatives", compact_negatives)):
        if not isinstance(value, bool):
            raise ValueError(f"config.dpc.{name}={value!r}; expected True or False")
    if chunk_tail not in row_skipping.TAILS:
        raise ValueError(f"config.dpc.chunk_tail={chunk_tail!r}; expected one of "
                         f"{', '.join(row_skipping.TAILS)}")


def dpc_objective(learner, dual, res: int, top_k: int, policy: str, crop_scale=(0.08, 1.0),
                  dedupe_text: bool = True, compact_negatives: bool = True,
                  chunk_tail: str = "single"):
    """Stage 2: DHNO inside the step (docs/reference/method.md#dhno), on B anchors of this device.
    The learner's state is frozen (passed through unchanged).

    Two exact eliminations of work, the same loss and gradients up to float32 rounding
    (`tests/test_dpc_elimination.py`; both False: the plain step, the A/B baseline that
    `benchmarks/dpc_step.py` and the exactness tests compare against):
    - dedupe_text (`config.dpc.dedupe_text`): the text tower encodes each distinct label of the
      valid slots once (all C classes once when C <= B*(K+1)) and the slots gather their rows,
      instead of one text per slot, repeats and invalid slots included.
    - compact_negatives (`config.dpc.compact_negatives`): only the valid negative slots go
      through the image tower (compacted to the front, in chunks of B; invalid slots reuse a
      real row, masked out of the loss).
    Both run their rows in chunks of B; chunk_tail (`config.dpc.chunk_tail`, see
    `row_skipping.chunked_rows`): 'single' runs the rows past the last full chunk one at a
    time (exactly the needed rows), 'padded' runs that chunk whole.
    """
    check_work_fields(dedupe_text, compact_negatives, chunk_tail)
    hooks = capabilities.dual(learner)

    def forward(params, state, consts, batch, key):
        """The step's loss and what DHNO decided: {'loss', 'scores' [B, C] (the scorer's
        softmax), 'negatives' [B, K], 'valid' [B, K]}."""
        clip_params, train, lconsts = consts["clip"], consts["train"], consts["learner"]
        k_aug, k_sel, k_sample, k_neg_aug = jax.random.split(key, 4)
        idx = batch["index"]
        labels = train["labels"][idx]
        anchors = augment.random_resized_crop_flip(k_aug, train["images"][idx], res, crop_scale)
        prompt = dual.train_prompt(params)
        backbone = jax.lax.stop_gradient(params["backbone"])
        # 1. Score with the frozen stage-1 model. For learners without image prompts the
        #    scorer's image features are the anchors' own features.
        anchor_feats = learner.image_features(clip_params, prompt, anchors, state)
        if learner.uses_image_prompts:
            scorer_feats = hooks.scorer_image_features(clip_params, backbone, anchors, state,
                                                         lconsts)
        else:
            scorer_feats = anchor_feats
        scorer_feats = jax.lax.stop_gradient(scorer_feats)
        scores = jax.nn.softmax(learner.classify(clip_params, backbone, consts["scorer"],
                                                 scorer_feats, lconsts), axis=-1)
        # 2. Hard negatives: vectorised top-k + the non-repeat rule, static [B, K] slots.
        negatives, valid = dhno.select_hard_negatives(scores, labels, top_k, k_sel, policy)
        neg_idx = dhno.sample_negative_images(k_sample, train["class_table"],
                                              train["class_counts"], negatives, valid)
        b = idx.shape[0]
        neg_images = train["images"][neg_idx.reshape(-1)]
        if hooks.augment_negatives:
            neg_images = augment.random_resized_crop_flip(k_neg_aug, neg_images, res, crop_scale)
        else:  # the test transform (a learner's released DPC trainer does so)
            neg_images = augment.center_normalize(neg_images, res)

        # The towers take the prompt as an argument: the chunked encodings differentiate it
        # alone (row_skipping.chunked_rows), the CLIP weights and learner constants are constants.
        def encode_images(prompt_, images):
            return learner.image_features(clip_params, prompt_, images, state)

        if compact_negatives and learner.uses_image_prompts:  # the same crops, augmented above
            neg_feats = row_skipping.encode_valid_rows(encode_images, neg_images, valid.reshape(-1),
                                                       b, diff=prompt, tail=chunk_tail)
        elif compact_negatives:  # an unprompted image tower: nothing in it to differentiate
            neg_feats = row_skipping.encode_valid_rows(
                lambda images: encode_images(prompt, images), neg_images, valid.reshape(-1), b,
                tail=chunk_tail)
        else:
            neg_feats = encode_images(prompt, neg_images)
        # 3. The enlarged batch [anchor_i, negatives_i] and its symmetric contrastive loss; text
        #    features only for the slot labels (the cost does not depend on the class count).
        slot_labels, slot_valid = dhno.assemble_batch(labels, negatives, valid)
        slot_images = dhno.interleave(anchor_feats, neg_feats.reshape(b, top_k, -1))
        texts = consts["class_texts"]

        def encode_texts(prompt_, ids):
            return learner.classifier(clip_params, prompt_, texts, ids, lconsts)

        if dedupe_text:
            slot_text = row_skipping.encode_labels(encode_texts, slot_labels, slot_valid,
                                                   texts.num_classes, b, diff=prompt,
                                                   tail=chunk_tail)
        else:
            slot_text = encode_texts(prompt, slot_labels)
        loss = hooks.pair_loss(clip_params, prompt, slot_images, slot_text, slot_valid, lconsts,
                               dhno.symmetric_infonce)
        return {"loss": loss, "scores": scores,
                "negatives": negatives, "valid": valid}

    def objective(params, state, consts, batch, key):
        out = forward(params, state, consts, batch, key)
        return out["loss"], ({"valid_negatives": jnp.sum(out["valid"]).astype(jnp.float32)},
                             state)

    objective.forward = forward  # for tests and diagnostics
    return objective
