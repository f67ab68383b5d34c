"""The checks of a run's inputs, made before any stage runs: every config value, with the field
named (`check_config`), and what needs the seed's data (`preflight`)."""

from __future__ import annotations

import math
import os
import sys

import ml_collections

from dpc_jax.convert.load import SHIPPED_CLIPS
from dpc_jax.data.check import missing_files
from dpc_jax.data.train_sets import load_unlabeled
from dpc_jax.data.transforms import ImageLoadError
from dpc_jax.evaluation import protocols
from dpc_jax.prompts import capabilities, get_learner
from dpc_jax.prompts import dpc as dpc_lib
from dpc_jax.training import (checkpoints, dhno, objectives, optim, stage1, stage2,
                              teacher)
from dpc_jax.training.loop import check_batch_fits
from dpc_jax.training.run import BACKBONE, DPC, STAGE_FOLDERS
from dpc_jax.training.seed import SeedRun
from dpc_jax.training.stages import STAGE_RUNNERS

STAGES = tuple(STAGE_RUNNERS)
MODES = ("train", "eval", "export")
# A seed becomes `jax.random.key(seed)`, which keeps 32 bits (JAX without x64): 2**32 would
# give seed 0's key, and numpy's generators refuse negative seeds.
MAX_SEED = 2**32 - 1
# The multi-host fields and the values that mean "not given" (`initialize_distributed`).
DISTRIBUTED_FIELDS = {"coordinator_address": "", "num_processes": 0, "process_id": -1}


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


def _field(config, field: str):
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


# Fields checked by range: (field, test, what is expected). The optimiser checks the same
# ranges when it is built, but only when stage 1 starts, after the zero-shot stage.
RANGES = (
    ("optim.momentum", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.weight_decay", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    ("optim.warmup_epochs", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("stored_size", lambda v: _is_int(v) and v >= 0,
     "an integer >= 0 (pixels; 0: the CLIP's resolution)"),
    ("max_resident_mb", lambda v: _is_number(v) and v >= 0, "a number of megabytes >= 0"),
)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fail early, naming the field, on values the run cannot use."""
    if config.mode not in MODES:
        raise ValueError(f"config.mode={config.mode!r}; expected one of {MODES}")
    stages = parse_list(config.stages, "stages", STAGES)
    ordered = sorted(stages, key=STAGES.index)
    if stages != ordered:  # the first place they differ names the stage that must come first
        later, earlier = next((a, b) for a, b in zip(stages, ordered) if a != b)
        raise ValueError(f"config.stages={config.stages!r}: {earlier!r} must come before "
                         f"{later!r} (stages run in the order {', '.join(STAGES)}); "
                         f"e.g. config.stages={','.join(dict.fromkeys(ordered))}")
    seeds = parse_list(config.seeds, "seeds", cast=int)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"config.seeds={config.seeds!r} repeats seed(s) {repeated}; a seed is "
                         f"one run (its results would count twice in the mean)")
    outside = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if outside:
        raise ValueError(f"config.seeds={config.seeds!r}: seed(s) {outside} out of range; "
                         f"expected integers from 0 to {MAX_SEED} (the 32-bit JAX random key: a "
                         f"larger seed would repeat a smaller one's numbers)")
    if not isinstance(config.shots, int) or config.shots < 1:
        raise ValueError(f"config.shots={config.shots!r}; expected a positive integer (images "
                         f"per base class; the papers use 16)")
    if config.clip.source in SHIPPED_CLIPS and not protocols.is_world(config.dataset):
        raise ValueError(
            f"config.dataset={config.dataset!r} with config.clip.source={config.clip.source!r}: "
            f"the shipped world CLIP belongs to the world datasets only. Choose a dataset with "
            f"`--config configs/<config>.py:dataset=NAME,root=DIR` (which also sets the CLIP "
            f"and schedules), not with --config.dataset")
    if protocols.is_world(config.dataset) and config.clip.source not in SHIPPED_CLIPS:
        raise ValueError(
            f"config.clip.source={config.clip.source!r} with the world dataset "
            f"{config.dataset!r}: the world's images and classes are those the shipped world "
            f"CLIP was pretrained on, so its runs use it (config.clip.source='world'); to run "
            f"your CLIP, choose a real dataset or your own folder with `--config "
            f"configs/<config>.py:dataset=NAME,root=DIR,clip={config.clip.source}`")
    if (not protocols.is_world(config.dataset) and config.source == "coop"
            and not str(config.root).strip()):
        raise ValueError(f"config.root is empty for dataset {config.dataset!r}: expected the "
                         f"folder of the dataset in the CoOp data layout, e.g. `--config "
                         f"configs/<config>.py:dataset={config.dataset},root=/data` (root=. for "
                         f"the current directory)")
    if config.dhno.policy not in dhno.POLICIES:
        raise ValueError(f"config.dhno.policy={config.dhno.policy!r}; expected one of "
                         f"{dhno.POLICIES}")
    for field in ("batch_size", "backbone.batch_size", "dhno.top_k", "eval_batch_size",
                  "num_workers", "log_every_steps", "checkpoint_every_steps", "steps_per_call"):
        value = _field(config, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field}={value!r}; expected a positive integer")
    for field, ok, expected in RANGES:
        if not ok(_field(config, field)):
            raise ValueError(f"config.{field}={_field(config, field)!r}; expected {expected}")
    check_distributed(config)
    if not isinstance(config.get("compile_ahead", True), bool):
        raise ValueError(f"config.compile_ahead={config.compile_ahead!r}; expected True or "
                         f"False")
    objectives.check_work_fields(config.dpc.get("dedupe_text", True),
                                 config.dpc.get("compact_negatives", True),
                                 config.dpc.get("chunk_tail", "single"))
    scale = tuple(config.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"config.crop_scale={scale}; expected (min, max) with "
                         f"0 < min <= max <= 1")
    if config.dhno.top_k < 2:
        raise ValueError(f"config.dhno.top_k={config.dhno.top_k}; expected >= 2 (the released "
                         f"rule keeps K-1 candidates and its fallback adds 2 negatives)")
    for stage in ("backbone", "dpc"):
        optim.check_kind(config[stage].get("optimizer", "sgd"), f"config.{stage}.optimizer")
    for field in ("backbone.lr", "dpc.lr", "optim.warmup_lr"):
        value = _field(config, field)
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"config.{field}={value!r}; expected a positive number")
    warmup = config.optim.warmup_epochs
    for field in ("backbone.epochs", "dpc.epochs"):
        if _field(config, field) < 1:
            raise ValueError(f"config.{field}={_field(config, field)!r}; expected >= 1")
        if _field(config, field) <= warmup:
            raise ValueError(
                f"config.{field}={_field(config, field)} with config.optim.warmup_epochs="
                f"{warmup}: every epoch would be a warm-up epoch at config.optim.warmup_lr="
                f"{config.optim.warmup_lr}; set more epochs, or --config.optim.warmup_epochs=0")
    dpc_lib.DualPrompt(config.dpc)  # validates mode, w_base, w_new
    stage1.model_selection(config)
    protocols.get(config).check(get_learner(config.backbone.get("name", "")))


def check_distributed(config: ml_collections.ConfigDict) -> None:
    """The multi-host fields: only with config.distributed=True (elsewhere nothing reads
    them), and in range."""
    distributed = config.get("distributed", False)
    if not isinstance(distributed, bool):
        raise ValueError(f"config.distributed={distributed!r}; expected True or False")
    given = {k: config.get(k, unset) for k, unset in DISTRIBUTED_FIELDS.items()
             if config.get(k, unset) != unset}
    if not distributed:
        if given:  # the first one given, in the order of DISTRIBUTED_FIELDS
            field, value = next(iter(given.items()))
            raise ValueError(f"config.{field}={value!r} is set, but config.distributed=False: "
                             f"only a multi-host run reads it; set config.distributed=True (or "
                             f"leave config.{field} at {DISTRIBUTED_FIELDS[field]!r})")
        return
    processes, index = config.num_processes, config.process_id
    if not isinstance(config.coordinator_address, str):
        raise ValueError(f"config.coordinator_address={config.coordinator_address!r}; "
                         f"expected 'host:port' of process 0, or '' to detect it")
    if not _is_int(processes) or processes < 0:
        raise ValueError(f"config.num_processes={processes!r}; expected an integer >= 1, or 0 "
                         f"to detect it")
    if not _is_int(index) or index < -1 or (processes > 0 and index >= processes):
        upper = f"from 0 to {processes - 1}" if processes > 0 else "an integer >= 0"
        raise ValueError(f"config.process_id={index!r}; expected {upper} (this process's "
                         f"index), or -1 to detect it")


def check_resumed_settings(config, workdir: str, seeds, stages, train: bool) -> None:
    """Refuse, before any stage of any seed runs, to resume a training stage that was trained
    with other settings (`checkpoints.compare_stage_settings`; reads only: the stage writes its
    settings.json when it starts)."""
    if not train:
        return
    dirs = []  # (folder in the seed's directory, stage id, the config it trains with)
    if "backbone" in stages and not config.backbone.init_from:
        dirs.append((STAGE_FOLDERS[BACKBONE], BACKBONE, config))
    if "dpc" in stages and not config.dpc.get("init_from", ""):
        dirs.append((STAGE_FOLDERS[DPC], DPC, config))
    if ({"teacher", "backbone"} & set(stages)
            and capabilities.distils(get_learner(config.backbone.name))
            and not config.backbone.teacher.get("init_from", "")):
        # The teacher's seed directory is seed_N/teacher (`teacher.teacher_seed`).
        dirs.append((os.path.join("teacher", STAGE_FOLDERS[BACKBONE]), BACKBONE,
                     teacher.teacher_config(config)))
    for seed in seeds:
        for name, stage_id, cfg in dirs:
            stage_dir = os.path.join(workdir, f"seed_{seed}", name)
            checkpoints.compare_stage_settings(stage_dir, stage_id, cfg)


def _what_to_do(cfg) -> str:
    return (f"set config.skip_bad_images=True to leave unreadable images out, or list every "
            f"bad file with `python -m dpc_jax.data check --dataset {cfg.dataset} --root "
            f"{cfg.root} --verify-images`")


def check_files(seed_run: SeedRun, train: bool) -> None:
    """Every image file of the test splits the seed evaluates (and of the base val split when
    stage 1 selects its epoch on it) exists: existence only, no decoding."""
    cfg, base = seed_run.run.config, seed_run.base
    if cfg.skip_bad_images:  # missing files are skipped (and counted) where they are read
        return
    if seed_run.eval_sets is not None:
        splits = [(f"{es.name} test", es.test) for es in seed_run.eval_sets]
    else:
        splits = [("base test", base.test), ("new test", seed_run.new.test)]
    if train and stage1.model_selection(cfg) == "best_base_val":
        splits.append(("base val", base.val))
    for name, split in splits:
        missing = missing_files(split)
        if missing:
            raise ValueError(f"{len(missing)} image file(s) of the {name} split of "
                             f"{cfg.dataset} (seed {seed_run.seed}) are missing, e.g. "
                             f"{missing[0]}; restore them, or {_what_to_do(cfg)}")


def decode_train_set(seed_run: SeedRun, stages) -> None:
    """Decode the seed's few-shot training set now (it is decoded once and kept, so this moves
    the cost before the zero-shot stage rather than adding it); a streamed unlabeled split
    is only checked for missing files."""
    cfg, learner = seed_run.run.config, seed_run.run.learner
    stage1_trains = "backbone" in stages and not cfg.backbone.init_from
    unlabeled = learner.train_split == "unlabeled"
    if stage1_trains and unlabeled and not cfg.skip_bad_images:
        missing = missing_files(load_unlabeled(cfg, seed_run.seed))
        if missing:
            raise ValueError(f"{len(missing)} image file(s) of the unlabeled train split of "
                             f"{cfg.dataset} are missing, e.g. {missing[0]}; restore them, or "
                             f"{_what_to_do(cfg)}")
    stage2_trains = "dpc" in stages and not cfg.dpc.get("init_from", "")
    if (stage1_trains and not unlabeled) or stage2_trains:
        try:
            seed_run.train_set()
        except ImageLoadError as e:
            raise ValueError(f"the few-shot train split of {cfg.dataset} (seed "
                             f"{seed_run.seed}): {e}; replace that file, or {_what_to_do(cfg)}"
                             ) from e


def warmup_notes(cfg, stages) -> list:
    """`optim.warmup_note` of each stage the run trains whose warm-up takes half of its
    epochs or more."""
    trained = []
    if "backbone" in stages and not cfg.backbone.init_from:
        trained.append("backbone")
    if "dpc" in stages and not cfg.dpc.get("init_from", ""):
        trained.append("dpc")
    notes = [optim.warmup_note(g, _field(cfg, f"{g}.lr"), _field(cfg, f"{g}.epochs"),
                               cfg.optim.warmup_epochs, cfg.optim.warmup_lr) for g in trained]
    return [n for n in notes if n]


def preflight(seed_run: SeedRun, stages, train: bool) -> None:
    """Checks that need the data, run before any stage trains (nothing is half-done on error)."""
    cfg, n, devices = seed_run.run.config, len(seed_run.base.train), seed_run.run.mesh.size
    learner = seed_run.run.learner
    if "teacher" in stages and not capabilities.distils(learner):
        raise ValueError(f"config.stages={cfg.stages!r} includes 'teacher', but the "
                         f"{cfg.backbone.name!r} learner has no teacher (only learners that "
                         f"distil do)")
    if "dpc" in stages and capabilities.dpc_unsupported(learner):
        raise ValueError(f"config.stages={cfg.stages!r} includes 'dpc', which the "
                         f"{cfg.backbone.name!r} learner does not support: "
                         f"{capabilities.dpc_unsupported(learner)}; use "
                         f"config.stages=zeroshot,backbone")
    stage1_dir = os.path.join(seed_run.seed_dir, "backbone")
    if ("dpc" in stages and "backbone" not in stages and not cfg.backbone.init_from
            and checkpoints.read_stage_meta(stage1_dir) is None):
        raise ValueError(f"config.stages={cfg.stages!r}: stage 'dpc' needs stage 1, and "
                         f"{stage1_dir} holds no finished one; add "
                         f"'backbone' to config.stages (e.g. backbone,dpc), or set "
                         f"config.backbone.init_from to a PyTorch stage-1 checkpoint")
    if "dpc" in stages:
        capabilities.dual(learner).check_dpc_config(cfg.dpc)
        stage2.check_dpc_import(cfg, learner)
    if "dpc" in stages and cfg.dhno.top_k >= seed_run.base.num_classes:
        raise ValueError(
            f"config.dhno.top_k={cfg.dhno.top_k} needs more than {cfg.dhno.top_k} base classes; "
            f"{cfg.dataset} has {seed_run.base.num_classes} (e.g. EuroSAT has 5: use top_k <= 4)")
    check_files(seed_run, train)
    if not train:
        return
    if seed_run.seed == parse_list(cfg.seeds, "seeds", cast=int)[0]:  # once per run
        for line in warmup_notes(cfg, stages):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    decode_train_set(seed_run, stages)
    checks = []
    if "backbone" in stages and not cfg.backbone.init_from:
        size = n
        if learner.train_split == "unlabeled":
            size = len(load_unlabeled(cfg, seed_run.seed))
        checks.append(("backbone.batch_size", cfg.backbone.batch_size, size))
    if capabilities.distils(learner) and not cfg.backbone.teacher.init_from:
        checks.append(("backbone.teacher.batch_size", cfg.backbone.teacher.batch_size, n))
    if "dpc" in stages:
        checks.append(("batch_size", cfg.batch_size, n))
    for field, b, size in checks:
        check_batch_fits(field, b, devices, size, cfg.dataset, cfg.shots)
