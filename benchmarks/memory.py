"""Peak memory of every learner's real programs at a real dataset's shapes, compiled, not run.

    python benchmarks/memory.py [--arch ViT-B/16] [--dataset imagenet] [--learners coop,...]
        [--dtype float32,bfloat16] [--protocol base_to_new] [--text-chunk N]
        [--parts stage1,stage2,eval_features,eval_predict,classifier] [--classnames FILE]
        [--json OUT]

For each learner (default: every registered learner with a config file in configs/) and
compute dtype (`config.clip.dtype`), the programs the trainer and evaluator jit are built by
the functions that build them for a run (`training.run.Run.program`: the stage's step under
`step.map_steps`, one step per call; `Evaluator._jitted`: image features of one evaluation
batch, the classifier of one chunk of class ids, the predictions of one batch) from the
learner's real-data config (`configs/dpc_<name>.py` or `configs/<name>.py` with
`dataset=<dataset>`: its batch sizes, depths, K), then lowered with abstract inputs
(`jax.ShapeDtypeStruct`; parameters, constants and prompts by `jax.eval_shape`, so no weights
are loaded) and compiled for this machine's backend. Parts:

- stage1: one stage-1 training step at `config.backbone.batch_size` (PromptKD: its unlabeled
  split of every class, streamed from the host when larger than `config.max_resident_mb`, with
  its ViT-L/14 teacher's parameters and image forward);
- stage2: one DPC step at `config.batch_size` with K = `config.dhno.top_k` (learners DPC does
  not run on: n/a);
- eval_features: the image features of one evaluation batch (`config.eval_batch_size`);
- eval_predict: the predictions of one batch of image features against the base classifier
  (CoCoOp encodes every class text per image here);
- classifier: the classifier of one chunk of class ids (`evaluator.CLASS_CHUNK`).

Memory: XLA's `compiled.memory_analysis()`: arguments (parameters, constants, the device-held
few-shot images, the train state), outputs, the bytes of outputs aliased to donated arguments,
temporaries (every intermediate buffer at XLA's buffer assignment, activations stored for the
backward pass included) and generated code. peak_bytes = arguments + outputs - aliased +
temporaries: the device memory the program needs while it runs (a donated train state counted
once). The figure is the compiling backend's: a CPU compile fuses, lays out and assigns buffers
as XLA:CPU does, and can differ from XLA:GPU's by tens of percent (docs/memory.md says how and
how it is checked on a GPU: `benchmarks/accelerator_check.py --memory`).

Class names: ImageNet's are not shipped; `--classnames` reads CoOp's `classnames.txt`
('<folder> <name>' per line) or one name per line. Without it, every class is named by a
stand-in phrase of `STANDIN_TOKENS` BPE tokens (the text length, hence the trimmed text
shapes; an assumed length for ImageNet's longer names). Progress is printed as each program compiles; prints a
table learner x part x dtype with the peak in GiB and the smallest of 16/24/40/80 GiB it fits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dpc_jax import cli  # noqa: E402
from dpc_jax.data import registry as data_registry  # noqa: E402
from dpc_jax.evaluation.evaluator import CLASS_CHUNK  # noqa: E402
from dpc_jax.models import clip as clip_lib  # noqa: E402
from dpc_jax.prompts import LearnerContext, capabilities, get_learner, learner_names  # noqa: E402
from dpc_jax.training.run import BACKBONE, DPC, Run  # noqa: E402
from dpc_jax.training.teacher import teacher_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("stage1", "stage2", "eval_features", "eval_predict", "classifier")
GPUS_GIB = (16, 24, 40, 80)
STANDIN_TOKENS = 9  # "a photo of a" + 9 name tokens + "." : 16 positions with start and EOT
# Training images of the datasets whose unlabeled split (PromptKD) is sized here.
TRAIN_IMAGES = {"imagenet": 1281167}
GIB = 2 ** 30


def config_file(name: str) -> str:
    for base in (f"dpc_{name}.py", f"{name}.py"):
        path = os.path.join(REPO, "configs", base)
        if os.path.isfile(path):
            return path
    return ""


def load_config(name: str, dataset: str, protocol: str) -> ml_collections.ConfigDict:
    path = config_file(name)
    spec = importlib.util.spec_from_file_location(f"memory_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"dataset={dataset},protocol={protocol}")


def clip_config_of(clip_cfg: ml_collections.ConfigDict, arch: str) -> clip_lib.CLIPConfig:
    """The CLIPConfig `convert.load.load_clip_from_config` would give for `arch`."""
    return clip_lib.get_config(arch).replace(
        dtype=clip_cfg.dtype, precision=clip_cfg.precision,
        trim_text=bool(clip_cfg.get("trim_text", True)),
        attention=clip_cfg.get("attention", "einsum"), remat=bool(clip_cfg.get("remat", False)),
        text_chunk=clip_cfg.get("text_chunk", 128))


def abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def host_zeros(tree):
    """Zeros of the shapes (untouched pages: no memory) for host-side code that needs values."""
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)


def standin_names(tokenizer, count: int) -> list:
    """`count` distinct names of STANDIN_TOKENS BPE tokens each."""
    words = ["red", "blue", "green", "small", "large", "dog", "cat", "bird", "car", "tree"]
    names = []
    for i in range(count):
        digits = [words[(i // 10 ** k) % 10] for k in range(3)]
        name = " ".join(digits + ["and"] * (STANDIN_TOKENS - 3))
        names.append(name)
    lengths = {len(tokenizer.encode(n)) for n in names}
    assert lengths == {STANDIN_TOKENS}, lengths  # one BPE token per word
    return names


def read_classnames(path: str) -> list:
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    # CoOp's classnames.txt: '<wnid> <name with spaces>'; otherwise one name per line.
    return [line.split(" ", 1)[1] if re.fullmatch(r"n\d{8} .+", line) else line
            for line in lines]


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {"argument_bytes": int(m.argument_size_in_bytes),
           "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes),
           "code_bytes": int(m.generated_code_size_in_bytes)}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                         + out["temp_bytes"])
    return out


class Setup:
    """One learner's run pieces at the dataset's shapes, every array abstract."""

    def __init__(self, name, arch, dataset, protocol, dtype, text_chunk, tokenizer, names_all):
        cfg = load_config(name, dataset, protocol)
        cfg.clip.dtype = dtype
        if text_chunk is not None:
            cfg.clip.text_chunk = text_chunk
        self.cfg = cfg
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
        self.mesh = mesh
        clip_config = clip_config_of(cfg.clip, arch)
        self.clip = abstract(clip_lib.abstract_params(clip_config))
        kw, teacher_abs = {}, None
        cls = get_learner(cfg.backbone.name)
        if capabilities.distils(cls):
            tcfg = teacher_config(cfg)
            tclip_config = clip_config_of(tcfg.clip, tcfg.clip.source)
            tclip = abstract(clip_lib.abstract_params(tclip_config))
            teacher_run = Run(config=tcfg, mesh=mesh, clip_config=tclip_config, clip_params=tclip,
                              tokenizer=tokenizer)
            tprompt = jax.eval_shape(lambda cp: teacher_run.learner.init(
                jax.random.key(0), cp, None), tclip)
            teacher_abs = {"clip": tclip, "prompt": tprompt}
            kw = dict(teacher=teacher_run, teacher_prompt=lambda seed_run: None)
        self.run = Run(config=cfg, mesh=mesh, clip_config=clip_config, clip_params=self.clip,
                       tokenizer=tokenizer, **kw)
        learner = self.learner = self.run.learner
        n_all = len(names_all)
        n_train = math.ceil(n_all / 2) if protocol == "base_to_new" else n_all
        self.base_names = names_all[:n_train]
        consts_names = list(names_all) if learner.train_split == "unlabeled" else self.base_names
        templates = tuple(data_registry.get(dataset).templates)
        self.texts = jax.eval_shape(lambda cp: learner.prepare(cp, self.base_names), self.clip)
        context = lambda t: LearnerContext(dataset=dataset, classnames=tuple(consts_names),
                                           templates=templates, teacher=t)
        self.consts = jax.eval_shape(lambda cp, t: learner.constants(cp, context(t)),
                                     self.clip, teacher_abs)
        self.prompt = jax.eval_shape(lambda cp: learner.init(jax.random.key(0), cp, n_train),
                                     self.clip)
        self.state = jax.eval_shape(lambda cp: capabilities.init_state(learner, cp), self.clip)
        self.n_train, self.shots = n_train, cfg.shots
        size = cfg.stored_size or clip_config.image_resolution
        self.size = size
        self.unlabeled = TRAIN_IMAGES.get(dataset, 0)

    def train_set(self, n: int, num_classes: int, stream: bool) -> dict:
        per_class = max(1, math.ceil(n / num_classes))
        return {"images": None if stream else jax.ShapeDtypeStruct(
                    (n, self.size, self.size, 3), jnp.uint8),
                "labels": jax.ShapeDtypeStruct((n,), jnp.int32),
                "class_table": jax.ShapeDtypeStruct((num_classes, per_class), jnp.int32),
                "class_counts": jax.ShapeDtypeStruct((num_classes,), jnp.int32)}

    def step_args(self, stage_id, params, consts, n, batch_size, field, stream):
        prog = self.run.program(stage_id, params, n, batch_size, field)
        state = {"params": params, "opt_state": jax.eval_shape(prog.optimizer.init, params),
                 "state": self.state}
        batch = {"index": jax.ShapeDtypeStruct((batch_size, 1), jnp.int32)}
        if stream:
            batch["images"] = jax.ShapeDtypeStruct((batch_size, 1, self.size, self.size, 3),
                                                   jnp.uint8)
        args = (state, consts, batch, jax.random.key(0), np.int32(0), np.int32(1))
        return prog.program.fn, args

    def stage1(self):
        cfg, learner = self.cfg, self.learner
        if learner.train_split == "unlabeled":
            n = self.unlabeled
            if not n:
                raise ValueError(f"the unlabeled split's size of {cfg.dataset!r} is not known "
                                 f"here (TRAIN_IMAGES)")
            classes = 2 * self.n_train
            stream = n * self.size ** 2 * 3 / 2 ** 20 > cfg.max_resident_mb
        else:
            n, classes, stream = self.shots * self.n_train, self.n_train, False
        consts = {"clip": self.clip, "train": self.train_set(n, classes, stream),
                  "class_texts": self.texts, "learner": self.consts}
        return self.step_args(BACKBONE, self.prompt, consts, n, cfg.backbone.batch_size,
                              "backbone.batch_size", stream)

    def stage2(self):
        cfg, learner = self.cfg, self.learner
        if capabilities.dpc_unsupported(learner):
            return None
        hooks = capabilities.dual(learner)
        consts_host = host_zeros(self.consts)
        backbone = hooks.dpc_backbone(host_zeros(self.prompt), consts_host)
        init = abstract(hooks.dpc_init(self.run.dual.init(backbone), cfg.dpc,
                                       jax.random.key(0)))
        scorer_prompt = abstract(hooks.scorer_prompt(backbone, cfg.dpc, consts_host))
        scorer = self.run.evaluator.classifier_shape(learner, scorer_prompt, self.texts,
                                                     self.consts)
        n = self.shots * self.n_train
        consts = {"clip": self.clip, "train": self.train_set(n, self.n_train, False),
                  "class_texts": self.texts, "learner": self.consts, "scorer": scorer}
        return self.step_args(DPC, init, consts, n, cfg.batch_size, "batch_size", False)

    def evaluation(self, part):
        features, classifier, predict = self.run.evaluator._jitted(self.learner)
        batch = self.run.evaluator.batch
        res = self.run.clip_config.image_resolution
        if part == "eval_features":
            images = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.uint8)
            return features, (self.clip, self.prompt, self.state, images)
        ids = jax.ShapeDtypeStruct((CLASS_CHUNK,), jnp.int32)
        if part == "classifier":
            return classifier, (self.clip, self.prompt, self.texts, ids, self.consts)
        w = self.run.evaluator.classifier_shape(self.learner, self.prompt, self.texts,
                                                self.consts)
        feats = jax.eval_shape(features, self.clip, self.prompt, self.state,
                               jax.ShapeDtypeStruct((batch, res, res, 3), jnp.uint8))
        return predict, (self.clip, self.prompt, w, feats, self.consts)

    def program(self, part):
        if part == "stage1":
            return self.stage1()
        if part == "stage2":
            return self.stage2()
        return self.evaluation(part)


def fits(peak: int) -> str:
    for gib in GPUS_GIB:
        if peak <= gib * GIB:
            return f"{gib} GiB"
    return f"> {GPUS_GIB[-1]} GiB"


def _tokenizer():
    import dpc_step  # the benchmark beside this file: the CLIP BPE vocabulary

    return dpc_step._bpe_tokenizer()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B/16", help="a clip.CONFIGS name")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--protocol", default="base_to_new",
                        help="base_to_new (the base half of the classes) or another protocol "
                             "(every class)")
    parser.add_argument("--learners", default="", help="comma list (default: every registered "
                                                       "learner with a config file)")
    parser.add_argument("--dtype", default="float32,bfloat16",
                        help="comma list of compute dtypes (config.clip.dtype)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--text-chunk", type=int, default=None,
                        help="config.clip.text_chunk (default: the config's; 0: unchunked)")
    parser.add_argument("--classnames", default="", help="the dataset's class names file")
    parser.add_argument("--json", default="", help="write the figures here")
    a = parser.parse_args(argv)
    try:
        if a.arch not in clip_lib.CONFIGS:
            raise ValueError(f"--arch {a.arch!r}; expected one of {sorted(clip_lib.CONFIGS)}")
        dataset = data_registry.get(a.dataset).name
        names = [n for n in (a.learners.split(",") if a.learners else learner_names()) if n]
        for n in names:
            get_learner(n)
        missing = [n for n in names if not config_file(n)]
        if a.learners and missing:
            raise ValueError(f"--learners: no config file configs/dpc_<name>.py or "
                             f"configs/<name>.py for {missing}")
        names = [n for n in names if n not in missing]
        dtypes = [d for d in a.dtype.split(",") if d]
        bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
        if bad:
            raise ValueError(f"--dtype {bad}; expected float32 and/or bfloat16")
        parts = [p for p in a.parts.split(",") if p]
        if set(parts) - set(PARTS):
            raise ValueError(f"--parts {sorted(set(parts) - set(PARTS))}; expected some of "
                             f"{', '.join(PARTS)}")
        if a.text_chunk is not None and a.text_chunk < 0:
            raise ValueError(f"--text-chunk {a.text_chunk}; expected an integer >= 0")
        if a.classnames and not os.path.isfile(a.classnames):
            raise FileNotFoundError(f"--classnames {a.classnames}: no such file")
    except (ValueError, FileNotFoundError) as e:
        return cli.print_error(cli.message(e))
    tokenizer = _tokenizer()
    count = data_registry.get(dataset).num_classes
    classnames = read_classnames(a.classnames) if a.classnames else standin_names(tokenizer,
                                                                                  count)
    device = jax.devices()[0]
    print(f"{a.arch}, {dataset} ({a.protocol}, {len(classnames)} classes), compiled for "
          f"{device.platform} ({device.device_kind}), jax {jax.__version__}", flush=True)
    results, t_all = [], time.perf_counter()
    for name in names:
        for dtype in dtypes:
            t0 = time.perf_counter()
            setup = Setup(name, a.arch, dataset, a.protocol, dtype, a.text_chunk, tokenizer,
                          classnames)
            chunk = setup.run.clip_config.text_chunk
            print(f"{name} {dtype}: built in {time.perf_counter() - t0:.0f} s (text_chunk "
                  f"{chunk}, stage-1 B {setup.cfg.backbone.batch_size}, stage-2 B "
                  f"{setup.cfg.batch_size} K {setup.cfg.dhno.top_k})", flush=True)
            for part in parts:
                row = {"learner": name, "part": part, "dtype": dtype, "text_chunk": chunk}
                t0 = time.perf_counter()
                try:
                    built = setup.program(part)
                    if built is None:
                        row["skipped"] = "DPC does not run on this learner"
                    else:
                        fn, args = built
                        row.update(memory(fn.lower(*args).compile()))
                except Exception as e:  # noqa: BLE001  (report and go on with the next)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                row["compile_s"] = round(time.perf_counter() - t0, 1)
                results.append(row)
                if "peak_bytes" in row:
                    what = (f"peak {row['peak_bytes'] / GIB:6.2f} GiB (args "
                            f"{row['argument_bytes'] / GIB:.2f}, temp "
                            f"{row['temp_bytes'] / GIB:.2f}) fits {fits(row['peak_bytes'])}")
                else:
                    what = row.get("skipped") or row.get("error")
                print(f"  {part:<13} {what}  [{row['compile_s']:.0f} s]", flush=True)
    total = time.perf_counter() - t_all
    print(f"\n{'learner':<10} {'part':<13} {'dtype':<9} {'peak GiB':>8} {'args':>6} "
          f"{'temp':>6}  fits")
    for r in results:
        if "peak_bytes" in r:
            print(f"{r['learner']:<10} {r['part']:<13} {r['dtype']:<9} "
                  f"{r['peak_bytes'] / GIB:8.2f} {r['argument_bytes'] / GIB:6.2f} "
                  f"{r['temp_bytes'] / GIB:6.2f}  {fits(r['peak_bytes'])}")
        else:
            print(f"{r['learner']:<10} {r['part']:<13} {r['dtype']:<9} "
                  f"{'n/a':>8}  {r.get('skipped') or r.get('error')}")
    print(f"compiled in {total:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"arch": a.arch, "dataset": dataset, "protocol": a.protocol,
                       "classes": len(classnames), "platform": device.platform,
                       "device_kind": device.device_kind, "jax": jax.__version__,
                       "compile_seconds": round(total, 1), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
