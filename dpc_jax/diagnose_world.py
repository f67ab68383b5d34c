"""Headroom diagnostics of the embedded world: `python -m dpc_jax.data diagnose`.

    python -m dpc_jax.data diagnose [--clip DIR] [--domain NAME] [--seed 1]
        [--prompt "a photo of a {}."] [--json]

Prints, for the base and new test halves of a world domain, with a world CLIP (default: the
shipped one):
- zero-shot accuracy with the domain's templates, and how often the predicted class has the
  right colour and the right shape;
- the accuracy of any extra hand-written prompts (`--prompt`, repeatable);
- a linear-probe ceiling: multinomial logistic regression on the frozen, L2-normalised image
  features of the 16-shot train set of the half (the weight decay chosen on the half's few-shot
  val set), evaluated on the half's test set. A text prompt yields a linear classifier on the
  same features, so accuracy far above the probe is not available to prompt tuning;
- for scale, 64-way zero-shot accuracy on pretraining-distribution images.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpc_jax.data import base, world
from dpc_jax.evaluation import zeroshot
from dpc_jax.models.checkpoint import asset_dir, load_clip_checkpoint
from dpc_jax.models.clip import CLIP, CLIP_MEAN, CLIP_STD, normalize
from dpc_jax.models.tokenizer import Tokenizer

PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def image_features(model, params, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 [N, E] L2-normalised image features of uint8 images [N, S, S, 3]."""
    mean = jnp.asarray(CLIP_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(CLIP_STD, jnp.float32) * 255.0

    @jax.jit
    def encode(x):
        x = (x.astype(jnp.float32) - mean) / std
        return normalize(model.apply({"params": params}, x, method="encode_image"))

    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        if n < batch_size and start > 0:  # one compiled shape: pad the last batch
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, 0)])
        out.append(np.asarray(encode(chunk))[:n])
    return np.concatenate(out)


def split_images(split: base.ImageSplit, size: int) -> np.ndarray:
    return base.load_images(split, range(len(split)), size)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_probe(xb, y, weight_decay, num_classes: int, steps: int):
    def loss(w):
        ce = optax.softmax_cross_entropy_with_integer_labels(xb @ w, y).mean()
        return ce + 0.5 * weight_decay * jnp.sum(w[:-1] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(_, carry):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(w, updates), state

    w = jnp.zeros((xb.shape[1], num_classes), jnp.float32)
    return jax.lax.fori_loop(0, steps, body, (w, opt.init(w)))[0]


def fit_probe(x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float,
              steps: int = 200) -> np.ndarray:
    """Multinomial logistic regression [E + 1, C] (bias last), full-batch L-BFGS."""
    xb = jnp.asarray(np.concatenate([x, np.ones((len(x), 1), np.float32)], 1))
    return np.asarray(_fit_probe(xb, jnp.asarray(y, jnp.int32), jnp.float32(weight_decay),
                                 num_classes, steps))


def probe_accuracy(train, val, test, num_classes: int) -> dict:
    """Probe ceiling (%): weight decay picked on val, accuracy on test."""
    best = None
    for wd in PROBE_WEIGHT_DECAYS:
        w = fit_probe(train[0], train[1], num_classes, wd)
        acc_val = _linear_accuracy(w, *val)
        if best is None or acc_val > best[0]:
            best = (acc_val, wd, w)
    return {"test": _linear_accuracy(best[2], *test), "val": best[0], "weight_decay": best[1]}


def _linear_accuracy(w, x, y) -> float:
    logits = np.concatenate([x, np.ones((len(x), 1), np.float32)], 1) @ w
    return float(100.0 * np.mean(np.argmax(logits, 1) == y))


def attribute_accuracy(pred: np.ndarray, labels: np.ndarray, classnames: Sequence[str]) -> dict:
    """% of predictions whose class has the right colour / the right shape."""
    attrs = [world.parse_classname(n) for n in classnames]
    colour = np.array([a[0] for a in attrs])
    shape = np.array([a[1] for a in attrs])
    return {"colour": float(100 * np.mean(colour[pred] == colour[labels])),
            "shape": float(100 * np.mean(shape[pred] == shape[labels]))}


def diagnose(clip_dir: Optional[str] = None, domain: str = world.DEFAULT_DOMAIN, seed: int = 1,
             prompts: Sequence[str] = (), pretrain_items: int = 640) -> dict:
    clip_dir = clip_dir or asset_dir()
    config, params = load_clip_checkpoint(clip_dir)
    model, tok = CLIP(config), Tokenizer.from_pretrained(clip_dir)
    size = config.image_resolution
    spec = world.get_domain(domain)
    out = {"clip": clip_dir, "domain": spec.name, "seed": seed,
           "logit_scale": float(np.exp(np.asarray(params["logit_scale"]))), "halves": {}}
    data = world.load_world(seed=seed, shots=16, subsample="all", domain=domain)
    for half in ("base", "new"):
        d = base.subsample_classes(data, half)
        feats = {name: (image_features(model, params, split_images(s, size), 256), s.labels)
                 for name, s in (("train", d.train), ("val", d.val), ("test", d.test))}
        x, y = feats["test"]
        row = {"classes": len(d.classnames), "test_images": int(len(y))}
        for label, templates in [("zeroshot", d.templates)] + [(p, [p]) for p in prompts]:
            w = np.asarray(zeroshot.zeroshot_classifier(model, params, tok, d.classnames,
                                                        templates))
            pred = np.argmax(x @ w.T, 1)
            row[label] = {"accuracy": float(100 * np.mean(pred == y)),
                          **attribute_accuracy(pred, y, d.classnames)}
        row["probe"] = probe_accuracy(feats["train"], feats["val"], feats["test"],
                                      len(d.classnames))
        out["halves"][half] = row
    # 64-way zero-shot on the pretraining distribution (all classes).
    imgs, labels = [], []
    for i in range(pretrain_items):
        imgs.append(world.pretrain_example(12345, i, i % world.NUM_CLASSES)[0])
        labels.append(world.composition_label(i % world.NUM_CLASSES))
    x = image_features(model, params, np.stack(imgs), 256)
    labels = np.asarray(labels)
    w = np.asarray(zeroshot.zeroshot_classifier(model, params, tok, world.CLASSNAMES,
                                                world.TEMPLATES))
    pred = np.argmax(x @ w.T, 1)
    out["pretrain_64way"] = {"images": pretrain_items,
                             "accuracy": float(100 * np.mean(pred == labels)),
                             **attribute_accuracy(pred, labels, world.CLASSNAMES)}
    return out


def format_report(r: dict) -> str:
    lines = [f"world diagnostics: domain {r['domain']}, CLIP {r['clip']}, few-shot seed "
             f"{r['seed']}, temperature exp(logit_scale) = {r['logit_scale']:.1f}",
             f"{'half':<5} {'classifier':<28} {'acc':>7} {'colour':>7} {'shape':>7}"]
    for half, row in r["halves"].items():
        for key, v in row.items():
            if isinstance(v, dict) and "colour" in v:
                lines.append(f"{half:<5} {key[:28]:<28} {v['accuracy']:7.2f} {v['colour']:7.2f} "
                             f"{v['shape']:7.2f}")
        p = row["probe"]
        lines.append(f"{half:<5} {'linear probe (16-shot)':<28} {p['test']:7.2f}       -       - "
                     f"(weight decay {p['weight_decay']:g}, val {p['val']:.2f})")
    p = r["pretrain_64way"]
    lines.append(f"pretraining-style images, 64-way zero-shot ({p['images']} images): "
                 f"{p['accuracy']:.2f} (colour {p['colour']:.2f}, shape {p['shape']:.2f})")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpc_jax.data diagnose",
                                description=__doc__.split("\n")[0])
    p.add_argument("--clip", default=None, help="world CLIP directory (default: the shipped one)")
    p.add_argument("--domain", default=world.DEFAULT_DOMAIN,
                   help=f"registered world domain, one of {sorted(world.DOMAINS)}")
    p.add_argument("--seed", type=int, default=1, help="few-shot sampling seed of the probe")
    p.add_argument("--prompt", action="append", default=[],
                   help="extra hand-written template with one '{}' (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    r = diagnose(args.clip, args.domain, args.seed, args.prompt)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
