"""Step time and peak memory of the stage-1 and stage-2 (DPC) steps against the number of classes.

    python benchmarks/cost_vs_classes.py [--learners coop,ivlp] [--classes 50,100,200,500,1000]
        [--arch ViT-B/16] [--layers 2] [--image-size 224] [--repeats 5] [--dataset imagenet]
        [--json OUT] [--plot OUT.png]

For each learner and class count C, the real step programs are built as a run builds them
(`training.run.Run.program`, through `benchmarks/memory.py`'s `Setup`: the learner's config
file at `--dataset` with the few-shot protocol, so every one of the C classes is trained; its
shots, batch sizes and K), at `--arch`'s widths with both towers cut to `--layers` blocks (prompt
depths capped at that) and images of `--image-size` pixels (stored at that size). Each step is
compiled once from abstract inputs; its memory is XLA's compiled memory analysis as memory.py
reads it (peak = arguments + outputs - aliased + temporaries). The same executable is then run
on real arrays of exactly those shapes (random CLIP weights, the learner's own prompt init and
constants, the stage-2 scorer from the evaluator's classifier, random images): one warm-up call,
then `--repeats` timed calls, each fed the state the previous one returned (the state is
donated), with the key of a new step. Reported: the median seconds and the min-max spread, the
FLOPs XLA counts for the program (a loop body counted once: for stage 2 the eliminated chunks'
work is counted once whatever runs), and for stage 2 the median valid negatives (of B*K).

Stage 1 encodes all C class texts every step; stage 2 encodes only the slots' labels and scores
against a fixed classifier, so only its [C, E] classifier and the device-held few-shot images
(shots * C) grow with C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memory  # noqa: E402  (benchmarks/memory.py: Setup, memory(), the BPE tokenizer)
from dpc_jax import cli  # noqa: E402
from dpc_jax.data import registry as data_registry  # noqa: E402
from dpc_jax.data.train_sets import build_class_table  # noqa: E402
from dpc_jax.evaluation.evaluator import Evaluator  # noqa: E402
from dpc_jax.models import clip as clip_lib  # noqa: E402
from dpc_jax.prompts import LearnerContext, capabilities, get_learner  # noqa: E402
from dpc_jax.training.run import BACKBONE, DPC  # noqa: E402

STAGES = ("stage1", "stage2")
MIB = 2 ** 20


def reduced_arch(arch: str, layers, image_size, vocab_size: int) -> str:
    """The name of `arch` with both towers at `layers` blocks and `image_size` pixels, added to
    `clip.CONFIGS` (memory.Setup builds its CLIP from a CONFIGS name). `vocab_size`: the
    tokenizer's (the tiny test CLIP's own vocabulary is smaller than the BPE one)."""
    cfg = clip_lib.get_config(arch)
    over = {} if cfg.vocab_size == vocab_size else {"vocab_size": vocab_size}
    if layers:
        over.update(vision_layers=layers, transformer_layers=layers)
    if image_size:
        over["image_resolution"] = image_size
    if not over:
        return arch
    name = f"{arch} [{layers or 'all'} layers, {image_size or cfg.image_resolution} px]"
    clip_lib.CONFIGS[name] = cfg.replace(**over)
    return name


@contextlib.contextmanager
def reduced_configs(shape: clip_lib.CLIPConfig):
    """memory.Setup loading configs whose prompt depths fit `shape`'s towers and whose images
    are stored at the CLIP's resolution (a reduced image size must not be cropped from 224)."""
    load = memory.load_config
    blocks = {"depth_text": shape.transformer_layers, "depth_vision": shape.vision_layers,
              "depth": min(shape.transformer_layers, shape.vision_layers)}

    def load_reduced(name, dataset, protocol):
        cfg = load(name, dataset, protocol)
        cfg.stored_size = 0
        for field, most in blocks.items():
            if field in cfg.backbone and cfg.backbone[field] > most:
                cfg.backbone[field] = most
        return cfg

    memory.load_config = load_reduced
    try:
        yield
    finally:
        memory.load_config = load


def class_names(tokenizer, count: int) -> list:
    return memory.standin_names(tokenizer, count)


def same_shapes(concrete, abstract) -> None:
    """The real arrays have the compiled program's shapes and dtypes, leaf for leaf."""
    tc, ta = jax.tree_util.tree_structure(concrete), jax.tree_util.tree_structure(abstract)
    if tc != ta:
        raise AssertionError(f"argument trees differ:\n{tc}\n{ta}")
    for c, a in zip(jax.tree_util.tree_leaves(concrete), jax.tree_util.tree_leaves(abstract)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            continue
        if tuple(np.shape(c)) != tuple(a.shape) or np.dtype(c.dtype) != np.dtype(a.dtype):
            raise AssertionError(f"{np.shape(c)} {c.dtype} != {a.shape} {a.dtype}")


def real_pieces(setup: memory.Setup, seed: int = 0) -> dict:
    """What both stages' real arguments share: CLIP, class texts, constants, prompt, train set."""
    cfg, learner, run = setup.cfg, setup.learner, setup.run
    rng = np.random.default_rng(seed)
    clip = clip_lib.init_params(run.clip_config, seed=seed)
    texts = learner.prepare(clip, setup.base_names)
    context = LearnerContext(dataset=cfg.dataset, classnames=tuple(setup.base_names),
                             templates=tuple(data_registry.get(cfg.dataset).templates),
                             teacher=None)
    lconsts = learner.constants(clip, context)
    prompt = learner.init(jax.random.key(seed + 1), clip, setup.n_train)
    n = setup.shots * setup.n_train
    labels = np.repeat(np.arange(setup.n_train, dtype=np.int32), setup.shots)
    table, counts = build_class_table(labels, setup.n_train)
    # Pixel values do not change the work; 64 distinct random images, tiled, keep the host
    # from drawing gigabytes of random numbers at C = 1000.
    distinct = rng.integers(0, 256, (min(64, n), setup.size, setup.size, 3), dtype=np.uint8)
    images = jax.device_put(np.resize(distinct, (n, setup.size, setup.size, 3)))
    train = {"images": images, "labels": labels, "class_table": table, "class_counts": counts}
    return {"clip": clip, "texts": texts, "lconsts": lconsts, "prompt": prompt, "n": n,
            "train": train, "rng": rng, "seed": seed}


def real_args(setup: memory.Setup, stage: str, pieces: dict) -> tuple:
    """`setup.program(stage)`'s arguments as real arrays (see the module docstring)."""
    cfg, learner, run = setup.cfg, setup.learner, setup.run
    clip, texts, lconsts, prompt = (pieces[k] for k in ("clip", "texts", "lconsts", "prompt"))
    n, rng, seed = pieces["n"], pieces["rng"], pieces["seed"]
    consts = {"clip": clip, "train": pieces["train"], "class_texts": texts, "learner": lconsts}
    if stage == "stage1":
        params, stage_id = prompt, BACKBONE
        batch_size, field = cfg.backbone.batch_size, "backbone.batch_size"
    else:
        hooks = capabilities.dual(learner)
        backbone = hooks.dpc_backbone(prompt, lconsts)
        params = hooks.dpc_init(run.dual.init(backbone), cfg.dpc, jax.random.key(seed + 2))
        scorer_prompt = hooks.scorer_prompt(backbone, cfg.dpc, lconsts)
        evaluator = Evaluator(clip, run.res, setup.mesh, cfg)
        consts["scorer"] = evaluator.classifier(learner, scorer_prompt, texts, lconsts)
        stage_id, batch_size, field = DPC, cfg.batch_size, "batch_size"
    prog = run.program(stage_id, params, n, batch_size, field)
    state = {"params": params, "opt_state": prog.optimizer.init(params),
             "state": capabilities.init_state(learner, clip)}
    # The step donates its state: copies keep the shared prompt alive for the other stage.
    state = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)
    index = rng.choice(n, batch_size, replace=False).astype(np.int32)[:, None]
    # On the device once, as a run holds them: host arrays would be copied in at every call.
    return jax.device_put((state, consts, {"index": index}, jax.random.key(seed + 3),
                           np.int32(0), np.int32(1)))


def measure(setup: memory.Setup, stage: str, pieces: dict, repeats: int) -> dict:
    fn, abstract_args = setup.program(stage)
    t0 = time.perf_counter()
    compiled = fn.lower(*abstract_args).compile()
    row = {"compile_s": round(time.perf_counter() - t0, 1)}
    row.update(memory.memory(compiled))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row["xla_flops"] = float(cost.get("flops", 0.0))
    args = real_args(setup, stage, pieces)
    same_shapes(args, abstract_args)
    times, valid = [], []
    for i in range(repeats + 1):  # the first call is the warm-up
        args = args[:4] + (jax.device_put(np.int32(i)),) + args[5:]
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        if i:
            times.append(time.perf_counter() - t0)
        state, losses, metrics = out
        if not np.all(np.isfinite(np.asarray(losses)[0])):
            raise FloatingPointError(f"{stage}: non-finite loss {np.asarray(losses)[0]}")
        if i and "valid_negatives" in metrics:
            valid.append(int(np.asarray(metrics["valid_negatives"])[0].sum()))
        args = (state,) + args[1:]
    row.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
               times_s=[round(t, 4) for t in times])
    if valid:
        row["valid_negatives"] = statistics.median(valid)
    return row


def table(rows: list) -> str:
    lines = [f"{'learner':<8} {'stage':<7} {'C':>5} {'median s':>9} {'min-max s':>15} "
             f"{'peak MiB':>9} {'args MiB':>9} {'temp MiB':>9} {'XLA GFLOP':>10} "
             f"{'valid neg':>9}"]
    for r in rows:
        lines.append(f"{r['learner']:<8} {r['stage']:<7} {r['classes']:>5} "
                     f"{r['median_s']:9.3f} {r['min_s']:7.3f}-{r['max_s']:<7.3f} "
                     f"{r['peak_bytes'] / MIB:9.1f} {r['argument_bytes'] / MIB:9.1f} "
                     f"{r['temp_bytes'] / MIB:9.1f} {r['xla_flops'] / 1e9:10.1f} "
                     f"{r.get('valid_negatives', '-'):>9}")
    return "\n".join(lines)


def fits(rows: list) -> list:
    """Per learner and stage, the least-squares line a + b*C through the median step times and
    through the peaks, and the largest distance of a median from its line (relative)."""
    out = []
    for learner, stage in sorted({(r["learner"], r["stage"]) for r in rows},
                                 key=lambda k: (k[0], k[1])):
        rs = [r for r in rows if (r["learner"], r["stage"]) == (learner, stage)]
        if len({r["classes"] for r in rs}) < 2:
            continue
        c = np.array([r["classes"] for r in rs], float)
        t = np.array([r["median_s"] for r in rs])
        b, a = np.polyfit(c, t, 1)
        mb, ma = np.polyfit(c, [r["peak_bytes"] / MIB for r in rs], 1)
        tb, ta = np.polyfit(c, [r["temp_bytes"] / MIB for r in rs], 1)
        out.append({"learner": learner, "stage": stage, "time_intercept_s": float(a),
                    "time_ms_per_class": float(1e3 * b),
                    "time_max_residual": float(np.max(np.abs(t - (a + b * c)) / t)),
                    "peak_intercept_mib": float(ma), "peak_mib_per_class": float(mb),
                    "temp_mib_per_class": float(tb)})
    return out


def fits_table(lines: list) -> str:
    out = [f"{'learner':<8} {'stage':<7} {'time = a + b*C':>24} {'max resid':>10} "
           f"{'peak MiB/class':>15} {'temp MiB/class':>15}"]
    for f in lines:
        out.append(f"{f['learner']:<8} {f['stage']:<7} {f['time_intercept_s']:8.3f} s + "
                   f"{f['time_ms_per_class']:6.3f} ms*C {100 * f['time_max_residual']:9.1f}% "
                   f"{f['peak_mib_per_class']:15.3f} {f['temp_mib_per_class']:15.3f}")
    return "\n".join(out)


def plot(rows: list, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 6.4))
    keys = sorted({(r["learner"], r["stage"]) for r in rows})
    colors = dict(zip(sorted({k[0] for k in keys}), plt.rcParams["axes.prop_cycle"].by_key()
                      ["color"]))
    for learner, stage in keys:
        rs = sorted((r for r in rows if (r["learner"], r["stage"]) == (learner, stage)),
                    key=lambda r: r["classes"])
        c = [r["classes"] for r in rs]
        med = np.array([r["median_s"] for r in rs])
        err = [med - [r["min_s"] for r in rs], [r["max_s"] for r in rs] - med]
        style = dict(color=colors[learner], linestyle="-" if stage == "stage1" else "--",
                     marker="o" if stage == "stage1" else "s")
        label = f"{learner}, {'stage 1' if stage == 'stage1' else 'stage 2 (DPC)'}"
        ax_t.errorbar(c, med, yerr=err, capsize=3, label=label, **style)
        ax_m.plot(c, [r["peak_bytes"] / MIB for r in rs], label=f"{label}: peak", **style)
        ax_m.plot(c, [r["temp_bytes"] / MIB for r in rs], alpha=0.45, linewidth=1,
                  label=f"{label}: temporaries", color=colors[learner],
                  linestyle=style["linestyle"], marker=".")
    # A guide of slope 1 (time proportional to C) through the slowest step at the largest C.
    c_all = np.array(sorted({r["classes"] for r in rows}), float)
    top = max((r for r in rows if r["classes"] == c_all[-1]), key=lambda r: r["median_s"])
    ax_t.plot(c_all, top["median_s"] * c_all / c_all[-1], color="gray", linestyle=":",
              label="proportional to C (guide)")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes C (log scale)")
        ax.set_xticks(sorted({r["classes"] for r in rows}))
        ax.get_yaxis().set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        for axis in (ax.get_xaxis(), ax.get_yaxis()):
            axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_ylabel("step time, s (median; bars: min-max)")
    ax_t.set_title("Step time")
    ax_m.set_ylabel("MiB (XLA compiled memory analysis)")
    ax_m.set_title("Peak memory and temporaries")
    # Below the axes: inside, they cover the lines at some counts.
    ax_t.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax_m.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learners", default="coop,ivlp",
                        help="comma list of learners without a teacher that DPC runs on")
    parser.add_argument("--classes", default="50,100,200,500,1000",
                        help="comma list of class counts C (each more than DHNO's K)")
    parser.add_argument("--arch", default="ViT-B/16", help="a clip.CONFIGS name")
    parser.add_argument("--layers", type=int, default=2,
                        help="blocks of each tower (0: the architecture's)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="image resolution in pixels (0: the architecture's)")
    parser.add_argument("--dataset", default="imagenet",
                        help="the config's dataset (shots, batch sizes, templates)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma list of stage1 (the backbone's step), stage2 (DPC's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps after a warm-up")
    parser.add_argument("--json", default="", help="write the rows here")
    parser.add_argument("--plot", default="", help="draw the figure here (needs matplotlib)")
    a = parser.parse_args(argv)
    try:
        if a.arch not in clip_lib.CONFIGS:
            raise ValueError(f"--arch {a.arch!r}; expected one of {sorted(clip_lib.CONFIGS)}")
        learners = [n for n in a.learners.split(",") if n]
        for n in learners:
            try:
                cls = get_learner(n)
            except ValueError as e:
                raise ValueError(f"--learners {n!r}: {cli.message(e)}") from None
            if capabilities.distils(cls) or capabilities.dpc_unsupported(cls):
                raise ValueError(f"--learners {n!r}: expected a learner without a teacher that "
                                 f"DPC runs on (coop, ivlp, maple, ...)")
            if not memory.config_file(n):
                raise ValueError(f"--learners {n!r}: no config file configs/dpc_{n}.py")
        try:
            classes = [int(c) for c in a.classes.split(",") if c]
        except ValueError:
            classes = []
        if not classes or min(classes) < 2:
            raise ValueError(f"--classes {a.classes!r}; expected a comma list of integers >= 2")
        stages = [s for s in a.stages.split(",") if s]
        if not stages or set(stages) - set(STAGES):
            raise ValueError(f"--stages {a.stages!r}; expected some of {', '.join(STAGES)}")
        if a.layers < 0 or a.image_size < 0 or a.repeats < 1:
            raise ValueError("--layers and --image-size expect integers >= 0, --repeats >= 1")
        dataset = data_registry.get(a.dataset).name
        top_k = max(memory.load_config(n, dataset, "few_shot").dhno.top_k for n in learners)
        if min(classes) <= top_k:
            raise ValueError(f"--classes {a.classes!r}; DHNO's top-K is {top_k}: expected more "
                             f"than {top_k} classes")
        if a.plot:
            cli.require_extra("matplotlib", "--plot")
    except (ValueError, KeyError, cli.MissingExtra) as e:
        return cli.print_error(cli.message(e))
    tokenizer = memory._tokenizer()
    arch = reduced_arch(a.arch, a.layers, a.image_size, tokenizer.vocab_size)
    shape = clip_lib.get_config(arch)
    device = jax.devices()[0]
    head = (f"{arch}: vision {shape.vision_layers}x{shape.vision_width} (patch "
            f"{shape.vision_patch_size}), text {shape.transformer_layers}x"
            f"{shape.transformer_width}, {shape.image_resolution} px; {dataset} few-shot "
            f"configs, float32; {device.platform} ({device.device_kind}), jax {jax.__version__}, "
            f"{os.cpu_count()} CPUs")
    print(head, flush=True)
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}",
          flush=True)
    t_all = time.perf_counter()
    rows = []
    with reduced_configs(shape):
        for name in learners:
            for c in classes:
                setup = memory.Setup(name, arch, dataset, "few_shot", "float32", None,
                                     tokenizer, class_names(tokenizer, c))
                pieces = real_pieces(setup)
                for stage in stages:
                    row = {"learner": name, "stage": stage, "classes": c,
                           "batch": int(setup.cfg.backbone.batch_size if stage == "stage1"
                                        else setup.cfg.batch_size),
                           "top_k": int(setup.cfg.dhno.top_k), "shots": int(setup.shots)}
                    row.update(measure(setup, stage, pieces, a.repeats))
                    rows.append(row)
                    print(f"  {name} {stage} C={c} B={row['batch']}: median "
                          f"{row['median_s']:.3f} s ({row['min_s']:.3f}-{row['max_s']:.3f}), "
                          f"peak {row['peak_bytes'] / MIB:.1f} MiB, temp "
                          f"{row['temp_bytes'] / MIB:.1f} MiB [compile {row['compile_s']} s]",
                          flush=True)
    print(table(rows))
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
          f"{time.perf_counter() - t_all:.0f} s in all")
    lines = fits(rows)
    if lines:
        print(fits_table(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shapes": head, "arch": arch, "layers": a.layers,
                       "image_size": shape.image_resolution, "dataset": dataset,
                       "repeats": a.repeats, "load_average_before": load_before, "load_average_after": load_after,
                       "seconds": round(time.perf_counter() - t_all, 1), "rows": rows,
                       "fits": lines},
                      f, indent=1)
    if a.plot:
        batches = ", ".join(sorted({f"{r['learner']} stage {r['stage'][-1]} B {r['batch']}"
                                    for r in rows}))
        plot(rows, f"{head.split(';')[0]}, float32, {jax.devices()[0].platform.upper()}\n"
                   f"{batches}; K {rows[0]['top_k']}, {rows[0]['shots']} shots; median of "
                   f"{a.repeats} steps", a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
