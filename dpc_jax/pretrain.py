"""Pretrain the small world CLIP shipped in `dpc_jax/assets/world` (contrastive, from scratch).

    python -m dpc_jax.pretrain --out dpc_jax/assets/world --steps 5500 --seed 0

Trains `dpc_jax.models.clip.CLIP` with the symmetric InfoNCE loss of CLIP on image-caption
pairs of the world's pretraining distribution (all 64 classes, plain style; see
`dpc_jax.data.world`), rendered on the fly in a background thread. At the end it writes the
checkpoint (`save_clip_checkpoint`), the tokenizer files and `model_card.json` with the command,
seed, wall time and zero-shot accuracy on the downstream base and new test halves.

Batches are class-balanced: each run of 64 consecutive items holds every colour x shape
composition once (a fresh random permutation, in a colour-major numbering that does not depend
on the benchmark's class order), so a full caption has exactly one positive image in its block.
The temperature exp(logit_scale) is fixed at 100 (`--fixed_logit_scale`; 0 learns it).

Speed: the text tower runs on the first `--text_context` positions only. Under the causal mask
the feature read at the EOT token depends on positions <= EOT alone, so this equals running the
full 77-token context for captions that fit (checked), at a fraction of the cost; positional
rows beyond are never used by such captions and keep their initial values (AdamW decays them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import queue
import shlex
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dpc_jax.data import world
from dpc_jax.evaluation import zeroshot
from dpc_jax.models.checkpoint import PARAMS_FILE, save_clip_checkpoint
from dpc_jax.models.clip import CLIP, CLIP_MEAN, CLIP_STD, CLIPConfig, init_params, normalize
from dpc_jax.models.tokenizer import Tokenizer
from dpc_jax.progress import progress_bar

# Fixed test subset recorded in the model card for fast regression tests: the first
# EVAL_SUBSET_PER_CLASS test images of every class of each half.
EVAL_SUBSET_PER_CLASS = 10


@dataclasses.dataclass
class PretrainConfig:
    out: str
    steps: int = 5500
    batch_size: int = 32
    seed: int = 0
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.05
    text_context: int = 12
    embed_dim: int = 128
    vision_width: int = 128
    vision_layers: int = 3
    vision_patch_size: int = 8
    vision_head_width: int = 32
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 2
    # > 0: the temperature exp(logit_scale) is fixed at this value (not trained).
    fixed_logit_scale: float = 100.0
    log_every: int = 500


def model_config(cfg: PretrainConfig, vocab_size: int) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=cfg.embed_dim, image_resolution=world.NATIVE_SIZE,
        vision_layers=cfg.vision_layers, vision_width=cfg.vision_width,
        vision_patch_size=cfg.vision_patch_size, context_length=77, vocab_size=vocab_size,
        transformer_width=cfg.text_width, transformer_heads=cfg.text_heads,
        transformer_layers=cfg.text_layers, vision_head_width=cfg.vision_head_width)


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------


def batch_labels(seed: int, step: int, batch_size: int) -> np.ndarray:
    """Class-balanced compositions (colour * 8 + shape) of one batch: concatenated random
    permutations of all 64."""
    rng = np.random.default_rng([seed, 99, step])
    reps = -(-batch_size // world.NUM_CLASSES)
    return np.concatenate([rng.permutation(world.NUM_CLASSES)
                           for _ in range(reps)])[:batch_size].astype(np.int32)


def render_batch(seed: int, step: int, batch_size: int):
    """(images uint8 [B, 32, 32, 3], caption indices int32 [B]) of pretraining step `step`."""
    labels = batch_labels(seed, step, batch_size)
    images = np.empty((batch_size, world.NATIVE_SIZE, world.NATIVE_SIZE, 3), np.uint8)
    captions = np.empty((batch_size,), np.int32)
    for j, y in enumerate(labels):
        images[j], captions[j] = world.pretrain_example(seed, step * batch_size + j, int(y))
    return images, captions


def batches(seed: int, steps: int, batch_size: int, start: int = 0, prefetch: int = 4):
    """Yield rendered batches, produced by a background thread (rendering overlaps compute)."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
        try:
            for step in range(start, steps):
                if stop.is_set():
                    return
                q.put(render_batch(seed, step, batch_size))
        except BaseException as e:  # hand the error to the consumer instead of hanging it
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        for _ in range(start, steps):
            item = q.get()
            if isinstance(item, BaseException):
                raise RuntimeError("rendering a pretraining batch failed") from item
            yield item
    finally:
        stop.set()


# ----------------------------------------------------------------------------------------------
# Model and update
# ----------------------------------------------------------------------------------------------


def make_train_step(config: CLIPConfig, text_context: int, tx, fixed_logit_scale: float = 0.0):
    short = CLIP(config.replace(context_length=text_context))
    mean = jnp.asarray(CLIP_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(CLIP_STD, jnp.float32) * 255.0
    max_logit_scale = math.log(100.0)  # OpenAI clamps the learnt temperature at 100

    def loss_fn(params, images, ids, eot):
        short_params = dict(params, positional_embedding=params["positional_embedding"][
            :text_context])
        x = (images.astype(jnp.float32) - mean) / std
        img = normalize(short.apply({"params": short_params}, x, method="encode_image"))
        emb = short.apply({"params": short_params}, ids, method="embed_tokens")
        txt = normalize(short.apply({"params": short_params}, emb, eot,
                                    method="encode_text_embeddings"))
        if fixed_logit_scale > 0:
            scale = jnp.asarray(fixed_logit_scale, jnp.float32)
        else:
            scale = jnp.exp(jnp.minimum(params["logit_scale"], max_logit_scale))
        logits = scale * img @ txt.T
        target = jnp.arange(logits.shape[0])
        loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
                      + optax.softmax_cross_entropy_with_integer_labels(logits.T, target).mean())
        acc = jnp.mean(jnp.argmax(logits, axis=1) == target)
        return loss, (acc, scale)

    @jax.jit
    def step(params, opt_state, images, ids, eot):
        (loss, (acc, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, images, ids, eot)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "batch_acc": acc, "logit_scale": scale}

    return step


def make_optimizer(cfg: PretrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, min(cfg.warmup_steps, max(cfg.steps - 1, 1)), max(cfg.steps, 2),
        end_value=cfg.lr * 0.01)

    def decay_mask(params):
        # No decay on LayerNorm gains, biases, the class embedding and the logit scale (ndim < 2).
        return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6,
                                   weight_decay=cfg.weight_decay, mask=decay_mask))


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def world_zeroshot(model, params, tokenizer, per_class=None, world_seed: int = 0) -> dict:
    """Zero-shot accuracy (%) on the downstream base and new test halves.

    `per_class` restricts each half to the first `per_class` test images of every class.
    """
    out = {}
    for half in ("base", "new"):
        data = world.load_world(seed=1, shots=0, subsample=half, world_seed=world_seed)
        test = data.test
        if per_class is not None:
            keep = [i for i in range(len(test))
                    if i % world.SPLIT_SIZES["test"] < per_class]
            test = test.subset(keep)
        weights = zeroshot.zeroshot_classifier(model, params, tokenizer, data.classnames,
                                               data.templates)
        out[half] = zeroshot.evaluate(model, params, weights, test, world.NATIVE_SIZE, 100)
    return out


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def pretrain(cfg: PretrainConfig, command: str = "") -> dict:
    """Train, write the checkpoint, tokenizer and model card to `cfg.out`; return the card."""
    t0 = time.time()
    world.build_tokenizer_files(cfg.out)
    tokenizer = Tokenizer.from_pretrained(cfg.out)
    config = model_config(cfg, tokenizer.vocab_size)
    captions = world.caption_table()
    caption_ids, caption_eot = tokenizer(captions)
    if caption_eot.max() >= cfg.text_context:
        raise ValueError(f"--text_context={cfg.text_context} is too short for the longest "
                         f"caption ({caption_eot.max() + 1} tokens)")
    caption_ids = caption_ids[:, :cfg.text_context]

    params = jax.jit(init_params, static_argnums=(0, 1))(config, cfg.seed)  # eager init is slow
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    if cfg.fixed_logit_scale > 0:  # stored in the checkpoint, which training code reads
        params = dict(params, logit_scale=jnp.asarray(math.log(cfg.fixed_logit_scale),
                                                      params["logit_scale"].dtype))
    step_fn = make_train_step(config, cfg.text_context, tx, cfg.fixed_logit_scale)
    model = CLIP(config)

    bar = progress_bar(batches(cfg.seed, cfg.steps, cfg.batch_size), total=cfg.steps,
                       desc="pretrain")
    for step, (images, cap) in enumerate(bar):
        params, opt_state, metrics = step_fn(params, opt_state, images, caption_ids[cap],
                                             caption_eot[cap])
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {step + 1}")
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            tqdm.write(json.dumps({"step": step + 1, **{k: round(v, 4)
                                                         for k, v in metrics.items()}}))
    jax.block_until_ready(params)
    train_time = time.time() - t0

    save_clip_checkpoint(cfg.out, config, params)
    full = world_zeroshot(model, params, tokenizer)
    subset = world_zeroshot(model, params, tokenizer, per_class=EVAL_SUBSET_PER_CLASS)
    card = {
        "command": command,
        "seed": cfg.seed,
        "pretrain_config": dataclasses.asdict(cfg),
        "clip_config": config.to_dict(),
        "num_params": n_params,
        "checkpoint_bytes": os.path.getsize(os.path.join(cfg.out, PARAMS_FILE)),
        "train_wall_seconds": round(train_time, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
                   f"({jax.default_backend()})",
        "zeroshot_template": world.TEMPLATES,
        "zeroshot_test_accuracy": {k: round(v, 2) for k, v in full.items()},
        "zeroshot_test_subset": {"per_class": EVAL_SUBSET_PER_CLASS,
                                 "accuracy": {k: round(v, 2) for k, v in subset.items()}},
        "world_seed": 0,
    }
    card["pretrain_config"].pop("out")
    with open(os.path.join(cfg.out, "model_card.json"), "w") as f:
        json.dump(card, f, indent=2)
    return card


# One line per PretrainConfig field for --help.
FIELD_HELP = {
    "out": "output directory (checkpoint, tokenizer, card)",
    "steps": "training steps",
    "batch_size": "image-caption pairs per step",
    "seed": "seed of the initialisation and of the rendered batches",
    "lr": "peak AdamW learning rate (cosine decay after the warm-up)",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "weight_decay": "AdamW weight decay",
    "text_context": "caption positions the text tower runs on (exact for captions that fit)",
    "embed_dim": "joint embedding width",
    "vision_width": "image tower width",
    "vision_layers": "image tower blocks",
    "vision_patch_size": "patch side in pixels",
    "vision_head_width": "image tower width per attention head",
    "text_width": "text tower width",
    "text_heads": "text tower attention heads",
    "text_layers": "text tower blocks",
    "fixed_logit_scale": "fixed temperature exp(logit_scale) (0: learnt)",
    "log_every": "a log line every this many steps",
}


def parse_args(argv=None) -> PretrainConfig:
    p = argparse.ArgumentParser(prog="python -m dpc_jax.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help=FIELD_HELP["out"])
    for field in dataclasses.fields(PretrainConfig):
        if field.name == "out":
            continue
        p.add_argument(f"--{field.name}", type=type(field.default), default=field.default,
                       help=f"{FIELD_HELP[field.name]} (default {field.default})")
    return PretrainConfig(**vars(p.parse_args(argv)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    for name in ("steps", "batch_size", "text_context", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}={getattr(cfg, name)}; expected a positive integer")
    command = "python -m dpc_jax.pretrain " + " ".join(shlex.quote(a) for a in argv)
    card = pretrain(cfg, command)
    print(json.dumps({"zeroshot_test_accuracy": card["zeroshot_test_accuracy"],
                      "train_wall_seconds": card["train_wall_seconds"]}))


if __name__ == "__main__":
    from dpc_jax import cli

    sys.exit(cli.run_cli(main))
