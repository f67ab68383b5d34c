"""Two-stage DPC training and evaluation: `train_and_evaluate(config, workdir)`.

Sections: config checks | mesh | CLIP and data | per-device steps | checkpoints | evaluation |
stage runners | the loop over seeds and stages.

The training step is a per-device function (it computes exactly the released code's single-GPU
batch of B anchors, DHNO included) mapped over a 1-D ('data',) mesh of all devices with
`jax.shard_map`; gradients are averaged with `lax.pmean`. One code path serves 1 device, N
devices and N hosts (`config.distributed`). Per-step keys are `fold_in(key, step)`, per-device
keys `fold_in(step_key, device)`, and the epoch order depends only on (seed, stage, epoch), so a
resumed run computes exactly the numbers of an uninterrupted one.

The converted CLIP is loaded once per run and passed to the steps as a constant; run
checkpoints hold only the prompt parameters and the optimiser state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from dpc_jax.data import augment, transforms
from dpc_jax.data.base import BaseToNewData, ImageSplit, subsample_classes
from dpc_jax.models.clip import CLIP, CLIPConfig, normalize
from dpc_jax.models.tokenizer import Tokenizer
from dpc_jax.prompts import get_learner
from dpc_jax.prompts import dpc as dpc_lib
from dpc_jax.training import dhno, masks, optim

STAGES = ("zeroshot", "backbone", "dpc")
MODES = ("train", "eval")
POLICIES = ("reference", "hardest")


# ----------------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------------


def parse_list(value: str, field: str, allowed=None, cast=str) -> list:
    items = [s.strip() for s in str(value).split(",") if s.strip()]
    if not items:
        raise ValueError(f"config.{field}={value!r} is empty; expected a comma-separated list")
    out = []
    for s in items:
        try:
            v = cast(s)
        except ValueError:
            raise ValueError(f"config.{field}: {s!r} is not a valid {cast.__name__}") from None
        if allowed is not None and v not in allowed:
            raise ValueError(f"config.{field}: unknown entry {s!r}; expected some of {allowed}")
        out.append(v)
    return out


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fail early, naming the field, on values the run cannot use."""
    if config.mode not in MODES:
        raise ValueError(f"config.mode={config.mode!r}; expected one of {MODES}")
    parse_list(config.stages, "stages", STAGES)
    parse_list(config.seeds, "seeds", cast=int)
    if (config.clip.source == "world") != (config.dataset == "world"):
        raise ValueError(
            f"config.dataset={config.dataset!r} with config.clip.source={config.clip.source!r}: "
            f"the shipped world CLIP belongs to dataset 'world' only. Choose a dataset with "
            f"`--config configs/dpc_coop.py:dataset=NAME,root=DIR` (which also sets the CLIP "
            f"and schedules), not with --config.dataset")
    if config.dhno.policy not in POLICIES:
        raise ValueError(f"config.dhno.policy={config.dhno.policy!r}; expected one of {POLICIES}")
    for field in ("batch_size", "backbone.batch_size", "dhno.top_k", "eval_batch_size"):
        value = config
        for part in field.split("."):
            value = value[part]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field}={value!r}; expected a positive integer")
    scale = tuple(config.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"config.crop_scale={scale}; expected (min, max) with "
                         f"0 < min <= max <= 1")
    if config.dhno.top_k < 2:
        raise ValueError(f"config.dhno.top_k={config.dhno.top_k}; expected >= 2 (the released "
                         f"rule keeps K-1 candidates and its fallback adds 2 negatives)")
    for field in ("backbone.lr", "dpc.lr", "optim.warmup_lr"):
        stage, key = field.split(".")
        value = config[stage][key]
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"config.{field}={value!r}; expected a positive number")
    for field in ("backbone.epochs", "dpc.epochs"):
        stage, key = field.split(".")
        if config[stage][key] < 1:
            raise ValueError(f"config.{field}={config[stage][key]!r}; expected >= 1")
    dpc_lib.DualPrompt(config.dpc)  # validates mode, w_base, w_new


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


def make_mesh() -> Mesh:
    """A 1-D ('data',) mesh over all devices of all hosts."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(x, mesh: Mesh):
    return jax.device_put(x, NamedSharding(mesh, P("data")))


# ----------------------------------------------------------------------------------------------
# CLIP and data
# ----------------------------------------------------------------------------------------------


def world_assets_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "world")


def load_clip_and_tokenizer(config) -> tuple[CLIPConfig, Any, Tokenizer]:
    overrides = dict(dtype=config.clip.dtype, precision=config.clip.precision)
    source = config.clip.source
    if source == "world":
        source = world_assets_dir()
    from dpc_jax.convert import load_clip  # torch is imported there only for torch files

    clip_config, params = load_clip(source, **overrides)
    tok_source = config.clip.tokenizer
    if tok_source == "world":
        tok_source = world_assets_dir()
    tokenizer = Tokenizer.from_pretrained(tok_source, context_length=clip_config.context_length)
    if tokenizer.vocab_size > clip_config.vocab_size:
        raise ValueError(f"tokenizer {config.clip.tokenizer!r} has {tokenizer.vocab_size} tokens; "
                         f"the CLIP from {config.clip.source!r} embeds only "
                         f"{clip_config.vocab_size}")
    return clip_config, params, tokenizer


def load_benchmark(config, seed: int) -> tuple[BaseToNewData, BaseToNewData]:
    """The (base, new) halves of the few-shot benchmark for one seed: the dataset is read and
    few-shot sampled once over all classes, then halved (Dassl's order)."""
    if config.dataset == "world":
        from dpc_jax.data import world

        data = world.load_world(seed=seed, shots=config.shots, subsample="all")
    else:
        from dpc_jax.data import sources

        data = sources.build_dataset(config.dataset, config.root, source=config.source,
                                     shots=config.shots, seed=seed, subsample="all")
    return subsample_classes(data, "base"), subsample_classes(data, "new")


def decode_split(split: ImageSplit, size: int, config, desc: str):
    """Decode a whole (few-shot) split once: (uint8 [N, size, size, 3], labels [N]); with
    `config.skip_bad_images` unreadable images are dropped (and reported), else they raise."""
    batches = transforms.iterate_batches(split, size, 64, num_threads=config.num_workers,
                                         progress=config.progress,
                                         skip_bad=config.skip_bad_images, desc=desc)
    images, labels, valid = zip(*list(batches))
    valid = np.concatenate(valid)[:len(split)]
    if batches.num_skipped:
        tqdm.write(f"{desc}: dropped {batches.num_skipped} unreadable image(s), e.g. "
                   f"{batches.skipped[0][1]} ({batches.skipped[0][2]})")
    images = np.concatenate(images)[:len(split)][valid]
    labels = np.asarray(split.labels, np.int32)[valid]
    return images, labels


@dataclasses.dataclass
class TrainSet:
    """The few-shot training set, resident on every device."""

    images: Any  # uint8 [N, S, S, 3]
    labels: Any  # int32 [N]
    class_table: Any  # int32 [C, M]
    class_counts: Any  # int32 [C]
    num_classes: int

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def make_train_set(split: ImageSplit, num_classes: int, size: int, mesh: Mesh, config) -> TrainSet:
    images, labels = decode_split(split, size, config, "decode few-shot train")
    table, counts = dhno.build_class_table(labels, num_classes)
    return TrainSet(*replicate((images, labels, table, counts), mesh), num_classes=num_classes)


# ----------------------------------------------------------------------------------------------
# Per-device steps
# ----------------------------------------------------------------------------------------------


def map_step(per_device: Callable, mesh: Mesh, donate: bool = True):
    """jit(shard_map(per_device)) with params/opt_state/consts replicated and the batch sharded.

    per_device(params, opt_state, consts, batch, key) -> (params, opt_state, losses [devices],
    aux [devices]), all replicated.
    """
    mapped = jax.shard_map(per_device, mesh=mesh,
                           in_specs=(P(), P(), P(), P("data"), P()),
                           out_specs=(P(), P(), P(), P()))
    return jax.jit(mapped, donate_argnums=(0, 1) if donate else ())


def make_per_device_step(loss_fn: Callable, optimizer: optax.GradientTransformation, mask,
                         under_shard_map: bool = True):
    """The update of one device: local loss, gradients averaged over 'data', optimiser step.
    Frozen leaves (mask False) are returned as they are, so they stay bitwise unchanged.
    `under_shard_map=False` is for running the same function under `jax.vmap(axis_name='data')`
    (the tests' one-device emulation), where there is no varying/invariant distinction."""

    def per_device(params, opt_state, consts, batch, key):
        key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        # Differentiate a device-varying view of the replicated parameters: the gradient of an
        # invariant input inside shard_map would otherwise arrive already summed over devices
        # (the transpose of the implicit cast to varying is a psum), and pmean of that sum
        # would give B x devices times the per-device mean.
        local = jax.lax.pcast(params, "data", to="varying") if under_shard_map else params
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(local, consts, batch, key)
        grads = jax.lax.pmean(grads, "data")
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates, mask)
        # Every device's loss, gathered (replicated), so any host can read and log them all.
        return params, opt_state, _gather(loss), jax.tree_util.tree_map(_gather, aux)

    return per_device


def _gather(x):
    """[devices] vector of a per-device scalar, replicated (a psum of one-hot placements, whose
    result shard_map knows to be the same on every device)."""
    n = jax.lax.axis_size("data")
    placed = jax.nn.one_hot(jax.lax.axis_index("data"), n, dtype=jnp.float32)
    return jax.lax.psum(placed * x.astype(jnp.float32), "data")


def logit_scale(clip_params):
    return jnp.exp(clip_params["logit_scale"].astype(jnp.float32))


def make_backbone_loss(learner, res: int, num_classes: int, crop_scale=(0.08, 1.0)):
    """Stage 1: CE over all base classes (CoOp's loss)."""

    def loss_fn(prompt, consts, batch, key):
        clip_params, train = consts["clip"], consts["train"]
        idx = batch["index"]
        images = augment.random_resized_crop_flip(key, train["images"][idx], res, crop_scale)
        labels = train["labels"][idx]
        img = learner.image_features(clip_params, prompt, images)
        all_ids = jnp.arange(num_classes)
        txt = learner.text_features(clip_params, prompt, consts["class_texts"], all_ids)
        logits = logit_scale(clip_params) * normalize(img) @ normalize(txt).T
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, {"acc": jnp.mean(jnp.argmax(logits, -1) == labels)}

    return loss_fn


def make_dpc_loss(learner, dpc: "dpc_lib.DualPrompt", res: int, top_k: int, policy: str,
                  crop_scale=(0.08, 1.0)):
    """Stage 2: DHNO inside the step (DPC_PROTOCOL.md §3), on B anchors of this device."""

    def loss_fn(params, consts, batch, key):
        clip_params, train = consts["clip"], consts["train"]
        k_aug, k_sel, k_sample, k_neg_aug = jax.random.split(key, 4)
        idx = batch["index"]
        labels = train["labels"][idx]
        anchors = augment.random_resized_crop_flip(k_aug, train["images"][idx], res, crop_scale)
        prompt = dpc.train_prompt(params)
        backbone = jax.lax.stop_gradient(params["backbone"])
        # 1. Score with the frozen stage-1 model. For learners without image prompts (CoOp) the
        #    scorer's image features are the anchors' own features.
        anchor_feats = learner.image_features(clip_params, prompt, anchors)
        if learner.uses_image_prompts:
            scorer_feats = learner.image_features(clip_params, backbone, anchors)
        else:
            scorer_feats = anchor_feats
        scorer_feats = jax.lax.stop_gradient(scorer_feats)
        scores = jax.nn.softmax(
            logit_scale(clip_params) * normalize(scorer_feats) @ consts["scorer_text"].T, axis=-1)
        # 2. Hard negatives: vectorised top-k + the non-repeat rule, static [B, K] slots.
        negatives, valid = dhno.select_hard_negatives(scores, labels, top_k, k_sel, policy)
        neg_idx = dhno.sample_negative_images(k_sample, train["class_table"],
                                              train["class_counts"], negatives, valid)
        b = idx.shape[0]
        neg_images = augment.random_resized_crop_flip(
            k_neg_aug, train["images"][neg_idx.reshape(-1)], res, crop_scale)
        neg_feats = learner.image_features(clip_params, prompt, neg_images)
        neg_feats = neg_feats.reshape(b, top_k, -1)
        # 3. The enlarged batch [anchor_i, negatives_i] and its symmetric contrastive loss; text
        #    features only for the slot labels (the cost does not depend on the class count).
        slot_labels, slot_valid = dhno.assemble_batch(labels, negatives, valid)
        slot_images = jnp.concatenate([anchor_feats[:, None], neg_feats], axis=1)
        slot_images = slot_images.reshape(b * (top_k + 1), -1)
        txt = learner.text_features(clip_params, prompt, consts["class_texts"], slot_labels)
        loss = dhno.contrastive_loss(slot_images, txt, slot_valid, logit_scale(clip_params))
        return loss, {"valid_negatives": jnp.sum(valid).astype(jnp.float32)}

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("params", "opt_state"))


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def save_state(mngr: ocp.CheckpointManager, step: int, params, opt_state) -> None:
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(_host(params)),
                                            opt_state=ocp.args.StandardSave(_host(opt_state))),
              force=True)
    mngr.wait_until_finished()


def restore_state(mngr: ocp.CheckpointManager, step: int, params_like, opt_state_like):
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_host(params_like)),
        opt_state=ocp.args.StandardRestore(_host(opt_state_like))))
    return restored["params"], restored["opt_state"]


def write_stage_meta(stage_dir: str, meta: dict) -> None:
    tmp = os.path.join(stage_dir, "stage.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(stage_dir, "stage.json"))


def read_stage_meta(stage_dir: str) -> Optional[dict]:
    path = os.path.join(stage_dir, "stage.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_final_params(stage_dir: str, params_like, stage_id: Optional[int] = None, config=None):
    """The prompt parameters at the end of a finished stage (stage 2's P; the eval mode)."""
    if stage_id is not None and os.path.isfile(os.path.join(stage_dir, "settings.json")):
        check_stage_settings(stage_dir, stage_id, config)
    meta = read_stage_meta(stage_dir)
    if meta is None:
        raise FileNotFoundError(
            f"no finished stage in {stage_dir!r} (expected stage.json, written at the end of "
            f"training): run that stage first, or for stage 2 set config.backbone.init_from")
    mngr = checkpoint_manager(os.path.join(stage_dir, "checkpoints"))
    step = meta["final_step"]
    if step not in mngr.all_steps():
        raise FileNotFoundError(f"checkpoint step {step} named in {stage_dir}/stage.json is "
                                f"missing from {stage_dir}/checkpoints (found {mngr.all_steps()})")
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_host(params_like))))
    return restored["params"]


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


class Evaluator:
    """Accuracy of a prompt on a test split. Image features are cached per split when the
    prompt cannot change them (plain CLIP, or learners without image prompts such as CoOp), so
    zero-shot, stage 1 and stage 2 encode each test image once."""

    def __init__(self, learner, clip_params, res: int, mesh: Mesh, config):
        self.learner, self.clip_params, self.res, self.mesh = learner, clip_params, res, mesh
        self.batch = int(math.ceil(config.eval_batch_size / mesh.size) * mesh.size)
        self.workers, self.progress = config.num_workers, config.progress
        self.skip_bad = config.skip_bad_images
        self._cache = {}
        model = CLIP(learner.clip_config)
        # Batch-sharded inputs, replicated outputs: readable on every host.
        out = NamedSharding(mesh, P())
        self._prompted = jax.jit(lambda cp, prompt, x: normalize(
            learner.image_features(cp, prompt, augment.center_normalize(x, res))),
            out_shardings=out)
        self._plain = jax.jit(lambda cp, x: normalize(model.apply(
            {"params": cp}, augment.center_normalize(x, res), method="encode_image")),
            out_shardings=out)

    def image_features(self, split: ImageSplit, prompt, key: str, plain: bool = False):
        """(normalised features [N, E], valid [N]); invalid = skipped unreadable images."""
        cacheable = plain or not self.learner.uses_image_prompts
        if cacheable and key in self._cache:
            return self._cache[key]
        batches = transforms.iterate_batches(
            split, self.res, self.batch, num_threads=self.workers, progress=self.progress,
            skip_bad=self.skip_bad, desc=f"encode {key} test")
        feats, valid = [], []
        for images, _, ok in batches:
            images = shard_batch(images, self.mesh)
            out = (self._plain(self.clip_params, images) if plain
                   else self._prompted(self.clip_params, prompt, images))
            feats.append(np.asarray(out))
            valid.append(ok)
        n = len(split)
        if batches.num_skipped:
            tqdm.write(f"{key} test: skipped {batches.num_skipped} unreadable image(s), e.g. "
                       f"{batches.skipped[0][1]} ({batches.skipped[0][2]})")
        out = (np.concatenate(feats)[:n], np.concatenate(valid)[:n])
        if cacheable:
            self._cache[key] = out
        return out

    def accuracy_from_features(self, split: ImageSplit, features, text) -> float:
        img, valid = features
        pred = np.argmax(img @ np.asarray(text).T, axis=-1)
        correct = (pred == np.asarray(split.labels)) & valid
        return float(100.0 * correct.sum() / max(1, valid.sum()))

    def accuracy(self, split: ImageSplit, prompt, class_texts, key: str) -> float:
        text = class_text_features(self.learner, self.clip_params, prompt, class_texts)
        return self.accuracy_from_features(split, self.image_features(split, prompt, key), text)


def class_text_features(learner, clip_params, prompt, class_texts, chunk: int = 256):
    """Normalised text features of every class, in chunks (ImageNet has 1000 classes)."""
    n = int(jax.tree_util.tree_leaves(class_texts)[0].shape[0])
    fn = _text_fn(learner)
    out = []
    for s in range(0, n, chunk):
        ids = np.arange(s, s + chunk) % n  # a static chunk shape; the wrap is cut below
        out.append(np.asarray(fn(clip_params, prompt, class_texts, ids))[: min(chunk, n - s)])
    return np.concatenate(out)


_TEXT_FNS = {}


def _text_fn(learner):
    if id(learner) not in _TEXT_FNS:
        _TEXT_FNS[id(learner)] = jax.jit(
            lambda cp, prompt, ct, ids: normalize(learner.text_features(cp, prompt, ct, ids)))
    return _TEXT_FNS[id(learner)]


# ----------------------------------------------------------------------------------------------
# Stage runners
# ----------------------------------------------------------------------------------------------


class Interrupted(RuntimeError):
    """Raised by `config.interrupt_after_steps` (a testing aid that simulates a crash)."""


def epoch_order(seed: int, stage_id: int, epoch: int, n: int) -> np.ndarray:
    """Dassl's RandomSampler order for one epoch, a pure function of (seed, stage, epoch)."""
    return np.random.default_rng([seed, stage_id, epoch]).permutation(n)


# Config fields that decide what a stage computes; a workdir resumed with other values is refused.
STAGE_FIELDS = {
    1: ("dataset", "root", "source", "shots", "stored_size", "crop_scale", "clip",
        "backbone", "optim"),
    2: ("dataset", "root", "source", "shots", "stored_size", "crop_scale", "clip",
        "backbone", "optim", "batch_size", "dpc", "dhno"),
}


def check_stage_settings(stage_dir: str, stage_id: int, config) -> None:
    """Record the settings a stage trains with; refuse to resume it with different ones."""
    flat = {}
    for field in STAGE_FIELDS[stage_id]:
        value = config[field]
        if isinstance(value, ml_collections.ConfigDict):
            flat.update({f"{field}.{k}": v for k, v in value.to_dict().items()})
        else:
            flat[field] = value
    # Weights that act only at evaluation may change between runs (the w_b / w_n ablation).
    flat.pop("dpc.w_new", None)
    if stage_id == 2 and config.dpc.mode == "paper":
        flat.pop("dpc.w_base", None)
    flat["devices"] = jax.device_count()  # the global batch and epoch length depend on it
    flat = json.loads(json.dumps(flat, default=str))  # tuples -> lists, as stored
    path = os.path.join(stage_dir, "settings.json")
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        changed = sorted(k for k in set(stored) | set(flat) if stored.get(k) != flat.get(k))
        if changed:
            raise ValueError(
                f"{stage_dir} was trained with other settings; changed: "
                + ", ".join(f"config.{k} {stored.get(k)!r} -> {flat.get(k)!r}" for k in changed)
                + ". Use a new --workdir (or restore the old values to resume or re-evaluate).")
        return
    with open(path, "w") as f:
        json.dump(flat, f, indent=2, sort_keys=True)


def check_batch_fits(field: str, batch_size: int, devices: int, n: int, dataset: str,
                     shots: int) -> None:
    """The global batch (per-device B x devices) must fit in the few-shot set (drop_last)."""
    if batch_size * devices > n:
        raise ValueError(
            f"config.{field}={batch_size} x {devices} device(s) = {batch_size * devices} "
            f"anchors per step exceeds the few-shot training set of {dataset} ({n} images at "
            f"{shots} shots); lower the batch size or use more shots")


def steps_per_epoch(n: int, batch_size: int, mesh: Mesh) -> int:
    """Dassl's sampler drops the last incomplete batch (`check_batch_fits` leaves at least one)."""
    return n // (batch_size * mesh.size)


def train_loop(*, name: str, stage_id: int, stage_dir: str, loss_fn: Callable, params, optimizer,
               mask, schedule: Callable, consts, train_set: TrainSet, batch_size: int,
               batch_field: str, epochs: int, seed: int, mesh: Mesh, config):
    """Run (or resume) one training stage; returns the final parameters (host arrays)."""
    global_batch = batch_size * mesh.size
    n = train_set.size  # after any unreadable images were dropped
    check_batch_fits(batch_field, batch_size, mesh.size, n, config.dataset, config.shots)
    epoch_steps = steps_per_epoch(n, batch_size, mesh)
    total = epochs * epoch_steps
    os.makedirs(stage_dir, exist_ok=True)
    check_stage_settings(stage_dir, stage_id, config)
    mngr = checkpoint_manager(os.path.join(stage_dir, "checkpoints"))
    opt_state = optimizer.init(params)
    start = 0
    latest = mngr.latest_step()
    if latest is not None:
        params, opt_state = restore_state(mngr, latest, params, opt_state)
        start = int(latest)
    if start >= total:
        write_stage_meta(stage_dir, {"final_step": total, "steps_per_epoch": epoch_steps})
        return params
    params, opt_state = replicate((params, opt_state), mesh)
    step_fn = map_step(make_per_device_step(loss_fn, optimizer, mask), mesh)
    key = jax.random.fold_in(jax.random.key(seed), stage_id)
    log = MetricLog(stage_dir, resume_step=start)
    bar = tqdm(total=total, initial=start, desc=name, disable=not config.progress,
               dynamic_ncols=True)
    order, order_epoch = None, -1
    t0 = time.time()
    try:
        for step in range(start, total):
            epoch, i = divmod(step, epoch_steps)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(seed, stage_id, epoch, n), epoch
            index = order[i * global_batch:(i + 1) * global_batch].astype(np.int32)
            params, opt_state, loss, aux = step_fn(params, opt_state, consts,
                                                   {"index": shard_batch(index, mesh)},
                                                   jax.random.fold_in(key, step))
            loss = np.asarray(loss)
            if not np.all(np.isfinite(loss)):
                raise FloatingPointError(
                    f"{name}: non-finite loss {loss.tolist()} at step {step} (epoch {epoch}, "
                    f"seed {seed}); nothing after step {mngr.latest_step()} was saved")
            bar.update(1)
            if (step + 1) % config.log_every_steps == 0 or step + 1 == total:
                record = {"step": step + 1, "epoch": epoch, "lr": float(schedule(step)),
                          "loss": float(loss.mean()), "per_device_loss": loss.tolist(),
                          "seconds": round(time.time() - t0, 3)}
                record.update({k: float(np.mean(v)) for k, v in jax.device_get(aux).items()})
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if (step + 1) % config.checkpoint_every_steps == 0 or step + 1 == total:
                save_state(mngr, step + 1, params, opt_state)
            if config.get("interrupt_after_steps", 0) and step + 1 - start >= \
                    config.interrupt_after_steps and step + 1 < total:
                raise Interrupted(f"{name}: interrupted after step {step + 1} "
                                  f"(config.interrupt_after_steps)")
    finally:
        bar.close()
        log.close()
    write_stage_meta(stage_dir, {"final_step": total, "steps_per_epoch": epoch_steps,
                                 "global_batch": global_batch, "devices": mesh.size})
    return _host(params)


class MetricLog:
    """One JSON line per logged step (log.jsonl) and TensorBoard events (tensorboardX)."""

    def __init__(self, directory: str, resume_step: int = 0):
        self.file = self.writer = None
        if jax.process_index() != 0:
            return
        path = os.path.join(directory, "log.jsonl")
        if os.path.isfile(path):  # drop lines of steps after the checkpoint being resumed
            with open(path) as f:
                keep = [line for line in f if json.loads(line)["step"] <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        self.file = open(path, "a")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(directory, "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


@dataclasses.dataclass
class SeedContext:
    """What every stage of one seed shares."""

    config: Any
    seed: int
    seed_dir: str
    mesh: Mesh
    clip_config: CLIPConfig
    clip_params: Any  # replicated
    tokenizer: Tokenizer
    base: BaseToNewData
    new: BaseToNewData
    learner: Any
    base_texts: Any
    new_texts: Any
    evaluator: Evaluator
    res: int
    _train_set: Optional[TrainSet] = None

    def train_set(self) -> TrainSet:
        if self._train_set is None:
            size = self.config.stored_size or self.res
            self._train_set = make_train_set(self.base.train, self.base.num_classes, size,
                                             self.mesh, self.config)
        return self._train_set

    def train_consts(self) -> dict:
        ts = self.train_set()
        return {"clip": self.clip_params,
                "train": {"images": ts.images, "labels": ts.labels,
                          "class_table": ts.class_table, "class_counts": ts.class_counts},
                "class_texts": self.base_texts}

    def scores(self, base_prompt, new_prompt) -> dict:
        ev = self.evaluator
        base = ev.accuracy(self.base.test, base_prompt, self.base_texts, "base")
        new = ev.accuracy(self.new.test, new_prompt, self.new_texts, "new")
        return {"base": base, "new": new, "hm": harmonic_mean(base, new)}


def run_zeroshot(ctx: SeedContext) -> dict:
    from dpc_jax.evaluation import zeroshot

    model = CLIP(ctx.clip_config)
    out = {}
    for half, data in (("base", ctx.base), ("new", ctx.new)):
        weights = np.asarray(zeroshot.zeroshot_classifier(
            model, ctx.clip_params, ctx.tokenizer, data.classnames, data.templates))
        feats = ctx.evaluator.image_features(data.test, None, half, plain=True)
        out[half] = ctx.evaluator.accuracy_from_features(data.test, feats, weights)
    out["hm"] = harmonic_mean(out["base"], out["new"])
    return out


def backbone_prompt(ctx: SeedContext, train: bool):
    """Stage 1's tuned prompt P: trained here, restored, or read from a PyTorch CoOp file."""
    cfg = ctx.config
    if cfg.backbone.init_from:
        return ctx.learner.load_torch_prompt(cfg.backbone.init_from, ctx.base.num_classes)
    stage_dir = os.path.join(ctx.seed_dir, "backbone")
    init = ctx.learner.init(jax.random.fold_in(jax.random.key(ctx.seed), 101), ctx.clip_params,
                            ctx.base.num_classes)
    init = _host(init)
    if not train:
        return load_final_params(stage_dir, init, 1, cfg)
    mask = all_trainable(init)
    optimizer, schedule = _optimizer(cfg, cfg.backbone.lr, cfg.backbone.epochs,
                                     ctx.train_set().size, cfg.backbone.batch_size,
                                     ctx.mesh, mask=mask, stage="backbone")
    return train_loop(
        name=f"seed {ctx.seed} backbone ({cfg.backbone.name})", stage_id=1, stage_dir=stage_dir,
        loss_fn=make_backbone_loss(ctx.learner, ctx.res, ctx.base.num_classes,
                                   tuple(cfg.crop_scale)),
        params=init, optimizer=optimizer, mask=mask, schedule=schedule,
        consts=ctx.train_consts(),
        train_set=ctx.train_set(), batch_size=cfg.backbone.batch_size,
        batch_field="backbone.batch_size", epochs=cfg.backbone.epochs, seed=ctx.seed,
        mesh=ctx.mesh, config=cfg)


def _optimizer(cfg, lr, epochs, n, batch_size, mesh, mask, stage: str = "dpc"):
    """The stage's SGD (Dassl schedule) and its learning-rate schedule (for logging)."""
    # At least 1 here: a batch that does not fit fails in train_loop, naming its config field.
    epoch_steps = max(1, steps_per_epoch(n, batch_size, mesh))
    kw = dict(warmup_epochs=cfg.optim.warmup_epochs, warmup_lr=cfg.optim.warmup_lr)
    names = {"lr": f"config.{stage}.lr", "max_epoch": f"config.{stage}.epochs",
             **{k: f"config.optim.{k}" for k in ("momentum", "weight_decay", "warmup_epochs",
                                                 "warmup_lr")}}
    optimizer = optim.make_optimizer(lr, epochs, epoch_steps, mask=mask,
                                     momentum=cfg.optim.momentum,
                                     weight_decay=cfg.optim.weight_decay, field_names=names, **kw)
    return optimizer, optim.dassl_schedule(lr, epochs, epoch_steps, **kw)


def all_trainable(params):
    return masks.trainable_mask(params, [(".*", True)])


def dpc_mask(params):
    """P frozen, the parallel prompt trained; every leaf must be covered by a rule."""
    return masks.trainable_mask(params, dpc_lib.DualPrompt.trainable_rules())


def run_backbone(ctx: SeedContext, train: bool = True) -> dict:
    prompt = replicate(backbone_prompt(ctx, train), ctx.mesh)
    return ctx.scores(prompt, prompt)


def run_dpc(ctx: SeedContext, train: bool = True) -> dict:
    cfg = ctx.config
    top_k = cfg.dhno.top_k
    dpc = dpc_lib.DualPrompt(cfg.dpc)
    backbone = _host(backbone_prompt(ctx, train=False))
    init = dpc.init(backbone)
    stage_dir = os.path.join(ctx.seed_dir, "dpc")
    if train:
        mask = dpc_mask(init)
        optimizer, schedule = _optimizer(cfg, cfg.dpc.lr, cfg.dpc.epochs, ctx.train_set().size,
                                         cfg.batch_size, ctx.mesh, mask=mask)
        consts = ctx.train_consts()
        rep_backbone = replicate(backbone, ctx.mesh)
        consts["scorer_text"] = replicate(class_text_features(
            ctx.learner, ctx.clip_params, rep_backbone, ctx.base_texts), ctx.mesh)
        params = train_loop(
            name=f"seed {ctx.seed} dpc ({cfg.dpc.mode}, {cfg.dhno.policy})", stage_id=2,
            stage_dir=stage_dir,
            loss_fn=make_dpc_loss(ctx.learner, dpc, ctx.res, top_k, cfg.dhno.policy,
                                  tuple(cfg.crop_scale)),
            params=init, optimizer=optimizer, mask=mask, schedule=schedule, consts=consts,
            train_set=ctx.train_set(), batch_size=cfg.batch_size, batch_field="batch_size",
            epochs=cfg.dpc.epochs, seed=ctx.seed, mesh=ctx.mesh, config=cfg)
    else:
        params = load_final_params(stage_dir, init, 2, cfg)
    params = replicate(params, ctx.mesh)
    return ctx.scores(dpc.eval_prompt(params, "base"), dpc.eval_prompt(params, "new"))


STAGE_RUNNERS = {"zeroshot": lambda ctx, train: run_zeroshot(ctx),
                 "backbone": run_backbone, "dpc": run_dpc}


# ----------------------------------------------------------------------------------------------
# The loop over seeds and stages
# ----------------------------------------------------------------------------------------------


def make_seed_context(config, seed, workdir, mesh, clip_config, clip_params, tokenizer):
    base, new = load_benchmark(config, seed)
    learner = get_learner(config.backbone.name)(clip_config, tokenizer, config.backbone)
    base_texts = replicate(learner.prepare(clip_params, base.classnames), mesh)
    new_texts = replicate(learner.prepare(clip_params, new.classnames, new_classes=True), mesh)
    res = clip_config.image_resolution
    evaluator = Evaluator(learner, clip_params, res, mesh, config)
    return SeedContext(config=config, seed=seed, seed_dir=os.path.join(workdir, f"seed_{seed}"),
                       mesh=mesh, clip_config=clip_config, clip_params=clip_params,
                       tokenizer=tokenizer, base=base, new=new, learner=learner,
                       base_texts=base_texts, new_texts=new_texts, evaluator=evaluator, res=res)


def preflight(ctx: SeedContext, stages, train: bool) -> None:
    """Checks that need the data, run before any stage trains (nothing is half-done on error)."""
    cfg, n, devices = ctx.config, len(ctx.base.train), ctx.mesh.size
    if "dpc" in stages and cfg.dhno.top_k >= ctx.base.num_classes:
        raise ValueError(
            f"config.dhno.top_k={cfg.dhno.top_k} needs more than {cfg.dhno.top_k} base classes; "
            f"{cfg.dataset} has {ctx.base.num_classes} (e.g. EuroSAT has 5: use top_k <= 4)")
    if not train:
        return
    checks = []
    if "backbone" in stages and not cfg.backbone.init_from:
        checks.append(("backbone.batch_size", cfg.backbone.batch_size))
    if "dpc" in stages:
        checks.append(("batch_size", cfg.batch_size))
    for field, b in checks:
        check_batch_fits(field, b, devices, n, cfg.dataset, cfg.shots)


def summarize(per_seed: dict) -> dict:
    """Mean over seeds of base and new, H of the means (as the papers report), std, per seed."""
    out = {}
    for stage, by_seed in per_seed.items():
        base = np.array([r["base"] for r in by_seed.values()])
        new = np.array([r["new"] for r in by_seed.values()])
        out[stage] = {"base": float(base.mean()), "new": float(new.mean()),
                      "hm": harmonic_mean(float(base.mean()), float(new.mean())),
                      "base_std": float(base.std()), "new_std": float(new.std()),
                      "per_seed": {str(s): r for s, r in by_seed.items()}}
    return out


def format_table(results: dict, backbone_name: str = "coop") -> str:
    pretty = {"coop": "CoOp"}.get(backbone_name, backbone_name)
    names = {"zeroshot": "zero-shot CLIP", "backbone": pretty, "dpc": f"{pretty}+DPC"}
    lines = [f"{'method':<20} {'base':>7} {'new':>7} {'H':>7}"]
    for stage, r in results.items():
        lines.append(f"{names.get(stage, stage):<20} {r['base']:7.2f} {r['new']:7.2f} "
                     f"{r['hm']:7.2f}")
    return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the configured stages for every seed, write workdir/results.json, return it."""
    check_config(config)
    if config.distributed:
        jax.distributed.initialize()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    mesh = make_mesh()
    stages = parse_list(config.stages, "stages", STAGES)
    seeds = parse_list(config.seeds, "seeds", cast=int)
    clip_config, clip_params, tokenizer = load_clip_and_tokenizer(config)
    clip_params = replicate(clip_params, mesh)
    train = config.mode == "train"
    per_seed = {stage: {} for stage in stages}
    for seed in seeds:
        ctx = make_seed_context(config, seed, workdir, mesh, clip_config, clip_params, tokenizer)
        preflight(ctx, stages, train)
        for stage in stages:
            result = STAGE_RUNNERS[stage](ctx, train)
            per_seed[stage][seed] = result
            if jax.process_index() == 0:
                os.makedirs(os.path.join(ctx.seed_dir, stage), exist_ok=True)
                with open(os.path.join(ctx.seed_dir, stage, "results.json"), "w") as f:
                    json.dump(result, f, indent=2)
            tqdm.write(f"seed {seed} {stage}: base {result['base']:.2f} new {result['new']:.2f} "
                       f"H {result['hm']:.2f}")
    results = summarize(per_seed)
    if jax.process_index() == 0:
        tmp = os.path.join(workdir, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, os.path.join(workdir, "results.json"))
    print(format_table(results, config.backbone.name), flush=True)
    return results
