"""The base-to-new protocol (docs/reference/method.md): every field a run reads, with the paper's
values for real datasets (ViT-B/16; DPC: the released CoOp/vit_b16_ep20 config). A method's
config file sets `config.backbone` and calls `common.apply_settings`."""

from __future__ import annotations

import ml_collections

from dpc_jax.configs import common


def get_config(arg=None, variants=("base_to_new",)) -> ml_collections.ConfigDict:
    """`variants`: the settings variants the calling config file offers (it applies them)."""
    args = common.parse_arguments(arg)
    common.variant(arg, variants)  # a variant the config does not offer is refused here
    if "backbone" in args:  # configs/dept.py reads it and passes the rest on
        raise ValueError(f"config argument backbone={args['backbone']!r}: only configs/dept.py "
                         f"takes a backbone (the learner DePT wraps)")
    c = ml_collections.ConfigDict()
    c.mode = "train"  # train | eval (re-evaluate saved checkpoints) | export (stage 1 to PyTorch)
    c.stages = "zeroshot,backbone,dpc"
    c.seeds = "1"
    # Evaluation protocol (dpc_jax/evaluation/protocols.py): base_to_new | few_shot |
    # cross_dataset | domain_generalisation; `targets` (transfer protocols): a comma list of
    # datasets ('' = the protocol's default for the source).
    c.protocol = args.get("protocol", "base_to_new")
    c.targets = ""

    # Data.
    c.dataset = common.dataset_key(args.get("dataset", "world"))
    c.root = args.get("root", "")
    c.source = args.get("source", "coop")  # coop | tfds (ignored for the world)
    c.shots = 16
    # Model input size is the CLIP's resolution; the few-shot set is kept on device at
    # stored_size (0: the CLIP's resolution) and augmented there.
    c.stored_size = 224
    # Area range of the training RandomResizedCrop (CoOp/DPC: torchvision's default 0.08-1).
    c.crop_scale = (0.08, 1.0)
    c.skip_bad_images = False
    # A transductive stage-1 split (PromptKD: every class's training images) larger than this
    # once decoded is streamed from the host by index instead of held on every device.
    c.max_resident_mb = 4096
    c.eval_batch_size = 100
    c.num_workers = 8  # image decoding threads

    # CLIP.
    c.clip = ml_collections.ConfigDict()
    c.clip.source = args.get("clip", "ViT-B/16")
    if c.dataset.startswith("world") and args.get("clip", "world") != "world":
        # The world's settings set its shipped CLIP; another one would be ignored silently.
        raise ValueError(f"config argument clip={args['clip']!r} with dataset={c.dataset!r}: the "
                         f"world datasets run on the shipped world CLIP they were drawn for; to "
                         f"run your CLIP, give a real dataset or your own folder "
                         f"(dataset=NAME,root=DIR,clip={args['clip']})")
    c.clip.tokenizer = "openai/clip-vit-base-patch16"
    c.clip.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16
    c.clip.precision = "highest"
    # Encode class texts up to their last EOT only: exact under the causal mask (about 5x
    # fewer text-tower FLOPs for ~10-token class texts). False encodes all 77 positions: the
    # A/B baseline of the exactness tests and benchmarks, not a setting to train with.
    c.clip.trim_text = True
    # Accelerator options, the same numbers up to rounding (docs/devices.md): the attention
    # kernel einsum | dot_product (jax.nn.dot_product_attention) | cudnn (its flash attention,
    # GPU, float16/bfloat16); remat recomputes block activations in the backward pass.
    c.clip.attention = "einsum"
    c.clip.remat = False
    # Class texts encoded with gradients in chunks of this many, each recomputed in the
    # backward pass: the same numbers up to rounding in a fraction of the memory
    # (docs/memory.md); 0: all classes at once.
    c.clip.text_chunk = 128

    # Stage 1: the prompt learner; its own fields are set by the method's config file.
    c.backbone = ml_collections.ConfigDict()
    c.backbone.name = ""
    c.backbone.epochs = 100
    c.backbone.lr = 0.002
    c.backbone.batch_size = 32
    c.backbone.init_from = ""  # a PyTorch stage-1 checkpoint to use as P instead of training

    # Stage 2: DPC (released CoOp/vit_b16_ep20).
    c.batch_size = 4  # per-device B of the reference; the global batch is B * devices
    c.dpc = ml_collections.ConfigDict()
    c.dpc.mode = "reference"  # reference | paper (docs/reference/method.md#modes)
    c.dpc.w_base = 0.5
    c.dpc.w_new = 0.0
    # The prompt a transfer target (cross_dataset, domain_generalisation) is evaluated with:
    # 'new' = the w_n mix (the released CoOp+DPC: every dataset but the source), 'base' = w_b.
    c.dpc.transfer_prompt = "new"
    c.dpc.epochs = 20
    c.dpc.lr = 0.002
    # Exact work elimination in the stage-2 step (the same loss and gradients up to float32
    # rounding): each distinct slot label's text encoded once and gathered, and only the valid
    # negative slots sent through the image tower. False: the plain step, the A/B baseline of
    # benchmarks/dpc_step.py and the exactness tests.
    c.dpc.dedupe_text = True
    c.dpc.compact_negatives = True
    # Both encodings run their rows in chunks of B. 'single': the rows past the last full chunk
    # run one at a time, so the executed work is the needed rows' (docs/benchmarks.md);
    # 'padded': that chunk runs whole (one tower copy in the program instead of two; on an
    # accelerator a one-row pass may cost as much as a chunk).
    c.dpc.chunk_tail = "single"
    # A released stage-2 checkpoint (PromptKD: StackSPLE_PromptKD's VLPromptLearner/
    # model-best.pth.tar) to evaluate instead of training stage 2; needs backbone.init_from
    # (and the teacher's) set to the stage-1 files it started from, and mode 'reference'.
    c.dpc.init_from = ""
    c.dhno = ml_collections.ConfigDict()
    c.dhno.top_k = 8
    c.dhno.policy = "reference"  # reference | hardest

    # Optimiser (both stages).
    c.optim = ml_collections.ConfigDict()
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.warmup_epochs = 1
    c.optim.warmup_lr = 1e-5

    # Logging and checkpoints.
    c.log_every_steps = 10
    c.checkpoint_every_steps = 200  # plus one at the end of every stage
    # Training steps per device call (a loop on device; the numbers are those of one step per
    # call): more amortise the per-call dispatch and host read of a small model; the log lines
    # of a call's steps are written when it returns.
    c.steps_per_call = 1
    # JAX's persistent compilation cache: a rerun of the same shapes on this machine loads its
    # compiled programs instead of compiling them (dpc_jax/training/compile_cache.py; one
    # subfolder per machine). '' = off; a JAX_COMPILATION_CACHE_DIR already set is kept.
    c.compilation_cache = "~/.cache/dpc_jax/xla"
    # While stage 1 trains, compile stage 2's program in a background thread (the same program
    # and numbers; dpc_jax/training/ahead.py).
    c.compile_ahead = True
    c.progress = True
    c.distributed = False  # call jax.distributed.initialize() (multi-host)
    # Its arguments where the cluster does not provide them (TPU pod slices, SLURM and Open MPI
    # do; JAX_COORDINATOR_ADDRESS is read too): '' / 0 / -1 = detect.
    c.coordinator_address = ""  # host:port of process 0
    c.num_processes = 0
    c.process_id = -1
    return c


# One line per field for `python -m dpc_jax.train --help`; `field_help` adds the learner's own.
FIELD_HELP = {
    "mode": "train | eval (re-evaluate the saved checkpoints) | export (stage 1, and PromptKD's "
            "stage 2, as the released PyTorch files; needs torch)",
    "stages": "comma list of zeroshot, teacher, backbone, dpc, run in this order",
    "seeds": "comma list of seeds; 1,2,3 is the papers' protocol",
    "protocol": "base_to_new | few_shot | cross_dataset | domain_generalisation",
    "targets": "transfer protocols: comma list of target datasets, a registered name or "
               "folder:DIR for a folder of your own ('' = the source's default set; a folder "
               "source has none)",
    "dataset": "world (offline), a dataset name, or folder (your own images); set it with the "
               "config argument dataset=",
    "root": "folder of the CoOp-layout data, TFDS data_dir, or your own images' folder "
            "(config argument root=)",
    "source": "coop | tfds: how a real dataset is read",
    "shots": "images per training class (16 in the papers)",
    "stored_size": "side the few-shot images are kept at on device (0: the CLIP resolution)",
    "crop_scale": "area range of the training RandomResizedCrop",
    "skip_bad_images": "skip unreadable training images instead of failing",
    "max_resident_mb": "a transductive split larger than this is streamed from the host",
    "eval_batch_size": "images per evaluation batch",
    "num_workers": "image decoding threads",
    "clip.source": "world, an OpenAI name (ViT-B/16), a Hugging Face id or a checkpoint dir "
                   "(config argument clip=; torch for OpenAI names and .pt files)",
    "clip.tokenizer": "the CLIP's tokenizer: world, a hub id or a directory",
    "clip.dtype": "compute dtype: float32 | bfloat16 | float16 (parameters stay float32)",
    "clip.precision": "matmul precision: default | high | highest",
    "clip.trim_text": "encode class texts up to their last EOT only (exact; False: A/B only)",
    "clip.attention": "einsum | dot_product (jax.nn.dot_product_attention) | cudnn (GPU, "
                      "float16/bfloat16)",
    "clip.remat": "recompute each tower block in the backward pass (less memory)",
    "clip.text_chunk": "class texts encoded this many at a time, recomputed in the backward "
                       "pass (same numbers, less memory; 0: all at once)",
    "backbone.epochs": "stage-1 epochs",
    "backbone.lr": "stage-1 learning rate (SGD, cosine, Dassl warm-up)",
    "backbone.batch_size": "stage-1 per-device batch",
    "backbone.init_from": "a PyTorch stage-1 checkpoint to use as P instead of training "
                          "(needs torch)",
    "batch_size": "stage-2 per-device batch B (the global batch is B x devices)",
    "dpc.mode": "reference (the released converse map) | paper",
    "dpc.w_base": "weight of the parallel prompt for base classes",
    "dpc.w_new": "weight of the parallel prompt for new classes (0: stage 1's prompt)",
    "dpc.transfer_prompt": "transfer targets get the 'new' (w_n) or the 'base' (w_b) mix",
    "dpc.epochs": "stage-2 epochs",
    "dpc.lr": "stage-2 learning rate",
    "dpc.dedupe_text": "encode each distinct slot label's text once (exact; False: A/B only)",
    "dpc.compact_negatives": "only valid negatives enter the image tower (exact; False: A/B only)",
    "dpc.chunk_tail": "single (rows past the last full chunk of B run one by one: only the "
                      "needed rows run) | padded (that chunk runs whole)",
    "dpc.init_from": "a released stage-2 checkpoint to evaluate (PromptKD) instead of training "
                     "(needs torch)",
    "dpc.released.random_vision_deep": "PromptKD stage 2 as released: the parallel image deep "
                                       "prompts restart from N(0, 0.02)",
    "dpc.released.random_text_deep": "PromptKD stage 2 as released: the parallel text deep "
                                     "prompts restart from N(0, 0.02)",
    "dpc.released.scorer_ctx_unloaded": "PromptKD stage 2 as released: the scorer's text "
                                        "context is the init phrase's, not the teacher's",
    "dhno.top_k": "K: hard negatives per anchor",
    "dhno.policy": "reference (the released selection rule) | hardest",
    "optim.momentum": "SGD momentum",
    "optim.weight_decay": "SGD weight decay",
    "optim.warmup_epochs": "epochs at warmup_lr before the cosine schedule",
    "optim.warmup_lr": "the constant warm-up learning rate",
    "log_every_steps": "a log.jsonl line every this many steps",
    "checkpoint_every_steps": "a checkpoint every this many steps (and at each stage's end)",
    "steps_per_call": "training steps per device call (a loop on device; the same numbers)",
    "compilation_cache": "persistent XLA compilation cache directory ('' = off)",
    "compile_ahead": "compile stage 2's program in the background while stage 1 trains",
    "progress": "progress output (a bar on a terminal, a line every 30 s in a log)",
    "distributed": "call jax.distributed.initialize() (one process per host)",
    "coordinator_address": "distributed: host:port of process 0 ('' = detect)",
    "num_processes": "distributed: number of processes (0 = detect)",
    "process_id": "distributed: this process's index (-1 = detect)",
}
# A stage-1 group's fields every learner reads (config.backbone's, and a nested learner's such
# as PromptKD's teacher): their help is config.backbone's, said of that group.
STAGE_FIELDS = ("name", "epochs", "lr", "batch_size", "init_from")
# Groups inside config.backbone that hold another learner's config, and what they are.
NESTED = {"inner": "DePT's inner learner", "teacher": "PromptKD's teacher"}
NESTED_HELP = {
    "backbone.inner.name": "the learner DePT wraps (set it with configs/dept.py's argument "
                           "backbone=)",
    "backbone.teacher.name": "PromptKD's teacher learner: promptsrc",
    "backbone.teacher_clip.source": "PromptKD's teacher CLIP: world_teacher, an OpenAI name "
                                    "(ViT-L/14), a Hugging Face id or a checkpoint dir",
}


def _learner_help(name: str) -> dict:
    """`LearnerInfo.field_help` of learner `name` and of the learners it derives from (a
    subclass's entry wins): CoCoOp keeps CoOp's fields and their help."""
    from dpc_jax.prompts import get_learner  # imported here: config files stay light

    out: dict = {}
    for cls in reversed(type.mro(get_learner(name))):
        info = getattr(cls, "info", None)
        out.update(getattr(info, "field_help", None) or {})
    return out


def field_help(config: ml_collections.ConfigDict) -> dict:
    """One line per field of `config`: the run's fields, then the learner's own
    (`LearnerInfo.field_help` of `config.backbone.name` and of a learner nested in it: DePT's
    inner learner, PromptKD's teacher), then a nested CLIP's (PromptKD's teacher_clip)."""
    from dpc_jax.prompts import learner_names

    out = {**FIELD_HELP, **NESTED_HELP, "backbone.name": f"the stage-1 learner ({', '.join(learner_names())})"}
    backbone = config.get("backbone", ml_collections.ConfigDict())
    groups = [("backbone.", backbone, "")]
    groups += [(f"backbone.{k}.", backbone.get(k), what) for k, what in NESTED.items()]
    for prefix, sub, what in groups:
        if sub is None or sub.get("name") not in learner_names():
            continue
        for field, text in _learner_help(sub.name).items():
            out.setdefault(prefix + field, f"{what}: {text}" if what else text)
        for field in STAGE_FIELDS:
            text = out["backbone." + field].replace("stage-1 ", "")
            out.setdefault(prefix + field, f"{what}: {text}" if what else text)
    if "teacher_clip" in backbone:
        for field in backbone.teacher_clip:
            out.setdefault(f"backbone.teacher_clip.{field}",
                           "PromptKD's teacher CLIP: " + FIELD_HELP[f"clip.{field}"])
    return out
