"""The stages of one seed: zero-shot CLIP, the stage-1 backbone, DPC's stage 2.

`Run` holds what every seed shares and is built once per run: the mesh, the CLIP, the learner,
the evaluator, and the compiled steps (cached by their shapes, so seeds 2 and 3 reuse seed 1's
programs). `SeedRun` holds one seed's data, class texts and constants.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from dpc_jax.convert.load import load_clip_from_config
from dpc_jax.data.base import BaseToNewData
from dpc_jax.data.train_sets import (TrainSet, load_benchmark, load_named, load_unlabeled,
                                     make_train_set, resident_megabytes)
from dpc_jax.evaluation import protocols
from dpc_jax.evaluation.evaluator import Evaluator
from dpc_jax.evaluation.results import scores
from dpc_jax.mesh import replicate
from dpc_jax.models.clip import CLIPConfig
from dpc_jax.prompts import DualPrompt, PromptLearner, ZeroShotCLIP, build_learner, get_learner
from dpc_jax.training import masks, objectives, optim
from dpc_jax.training.ahead import AheadProgram
from dpc_jax.training.checkpoints import StageDir, host, read_stage_meta
from dpc_jax.training.loop import (SELECTION, check_batch_fits, first_call_args,
                                   steps_per_epoch, train_loop)
from dpc_jax.training.step import make_per_device_step, map_step, map_steps

BACKBONE, DPC = 1, 2  # stage ids (they seed the epoch order and the step keys)
TRAIN_SPLITS = ("fewshot", "unlabeled")
# Stage-1 model selection: the last epoch; the released PromptKD's best base TEST accuracy
# (reproduction only: it selects on test data); the best base validation accuracy.
SELECTIONS = ("last", "best_base_test", "best_base_val")


@dataclasses.dataclass
class Run:
    """What every seed of a run shares; built once by `train_lib.train_and_evaluate`."""

    config: Any
    mesh: Mesh
    clip_config: CLIPConfig
    clip_params: Any  # replicated
    tokenizer: Any
    hooks: Sequence[Callable] = ()

    teacher: Optional["Run"] = None  # the teacher's run, for learners that distil from one

    def __post_init__(self):
        extra = {}
        if get_learner(self.config.backbone.get("name", "")).needs_teacher and self.teacher is None:
            self.teacher = teacher_run(self)
        if self.teacher is not None:
            extra["teacher"] = self.teacher.learner
        self.learner: PromptLearner = build_learner(self.clip_config, self.tokenizer,
                                                    self.config.backbone, **extra)
        if self.learner.train_split not in TRAIN_SPLITS:
            raise ValueError(f"config.backbone.name={self.learner.name!r} trains on the "
                             f"{self.learner.train_split!r} split; supported: {TRAIN_SPLITS}")
        self.dual = DualPrompt(self.config.dpc, self.learner.dual_rules())
        self.res = self.clip_config.image_resolution
        self.evaluator = Evaluator(self.clip_params, self.res, self.mesh, self.config)
        self._steps: Dict[tuple, tuple] = {}
        self._zeroshot: Dict[tuple, ZeroShotCLIP] = {}

    def zeroshot_learner(self, templates) -> ZeroShotCLIP:
        key = tuple(templates)
        if key not in self._zeroshot:
            cfg = ml_collections.ConfigDict({"name": ZeroShotCLIP.name, "templates": list(key)})
            self._zeroshot[key] = ZeroShotCLIP(self.clip_config, self.tokenizer, cfg)
        return self._zeroshot[key]

    def step(self, stage_id: int, params, n: int, batch_size: int, batch_field: str):
        """(steps_fn, optimizer, schedule, mask, epoch_steps) of a stage, built once per shape
        (`steps_fn`: the stretch of steps `loop.train_loop` calls, `step.map_steps`, as an
        `ahead.AheadProgram`, which `SeedRun.compile_dpc_ahead` may compile early)."""
        cfg = self.config
        check_batch_fits(batch_field, batch_size, self.mesh.size, n, cfg.dataset, cfg.shots)
        epoch_steps = steps_per_epoch(n, batch_size, self.mesh.size)
        key = (stage_id, epoch_steps, batch_size, jax.tree_util.tree_structure(params))
        if key not in self._steps:
            name = "backbone" if stage_id == BACKBONE else "dpc"
            stage_cfg = cfg.backbone if stage_id == BACKBONE else cfg.dpc
            if stage_id == BACKBONE:
                mask = masks.trainable_mask(params, [(".*", True)])
                objective = objectives.backbone_objective(self.learner, self.res,
                                                          tuple(cfg.crop_scale))
            else:  # P frozen, the parallel prompt trained; every leaf must be covered by a rule
                mask = masks.trainable_mask(params, DualPrompt.trainable_rules())
                objective = objectives.dpc_objective(
                    self.learner, self.dual, self.res, cfg.dhno.top_k, cfg.dhno.policy,
                    tuple(cfg.crop_scale), dedupe_text=cfg.dpc.get("dedupe_text", True),
                    compact_negatives=cfg.dpc.get("compact_negatives", True))
            scales = None
            if stage_id == BACKBONE and self.learner.lr_multipliers():
                scales = masks.rule_values(params, self.learner.lr_multipliers(), float)
            optimizer, schedule = _optimizer(cfg, name, stage_cfg.lr, stage_cfg.epochs,
                                             epoch_steps, mask, scales)
            step_fn = map_step(make_per_device_step(objective, optimizer, mask), self.mesh,
                               donate=False)  # its caller, the stretch, donates the state
            self._steps[key] = (AheadProgram(map_steps(step_fn)), optimizer, schedule, mask,
                                epoch_steps)
        return self._steps[key]


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The teacher's run config: the student's, with `backbone` = `config.backbone.teacher`
    and `clip` = `config.backbone.teacher_clip` (the student's tokenizer is shared)."""
    for field in ("teacher", "teacher_clip"):
        if field not in config.backbone:
            raise ValueError(f"config.backbone.{field} is missing: the "
                             f"{config.backbone.name!r} learner distils from a teacher")
    out = ml_collections.ConfigDict(config.to_dict())
    out.backbone = ml_collections.ConfigDict(config.backbone.teacher.to_dict())
    clip = ml_collections.ConfigDict(config.clip.to_dict())
    clip.update(config.backbone.teacher_clip.to_dict())
    out.clip = clip
    return out


def teacher_run(student: "Run") -> "Run":
    """The teacher's `Run`: its CLIP loaded once, its learner, evaluator and steps."""
    cfg = teacher_config(student.config)
    clip_config, params = load_clip_from_config(cfg.clip, "config.backbone.teacher_clip")
    if student.tokenizer.vocab_size > clip_config.vocab_size:
        raise ValueError(f"config.backbone.teacher_clip.source={cfg.clip.source!r} embeds "
                         f"{clip_config.vocab_size} tokens; the shared tokenizer has "
                         f"{student.tokenizer.vocab_size}")
    return Run(config=cfg, mesh=student.mesh, clip_config=clip_config,
               clip_params=replicate(params, student.mesh), tokenizer=student.tokenizer,
               hooks=student.hooks)


def _optimizer(cfg, stage: str, lr, epochs, epoch_steps, mask, lr_scales=None):
    """The stage's SGD (Dassl schedule) and its learning-rate schedule (for logging)."""
    kw = dict(warmup_epochs=cfg.optim.warmup_epochs, warmup_lr=cfg.optim.warmup_lr)
    names = {"lr": f"config.{stage}.lr", "max_epoch": f"config.{stage}.epochs",
             **{k: f"config.optim.{k}" for k in ("momentum", "weight_decay", "warmup_epochs",
                                                 "warmup_lr")}}
    optimizer = optim.make_optimizer(lr, epochs, epoch_steps, mask=mask,
                                     momentum=cfg.optim.momentum,
                                     weight_decay=cfg.optim.weight_decay, field_names=names,
                                     lr_scales=lr_scales, **kw)
    return optimizer, optim.dassl_schedule(lr, epochs, epoch_steps, **kw)


@dataclasses.dataclass
class SeedRun:
    """One seed: its base/new halves, class texts, the learner's constants, the train set."""

    run: Run
    seed: int
    seed_dir: str
    base: BaseToNewData
    new: BaseToNewData
    train_mode: bool = True  # False: stages restore what they need (config.mode 'eval')
    # Compile stage 2's program in the background while stage 1 trains (`compile_dpc_ahead`);
    # set by the trainer when this seed trains both and config.compile_ahead is on.
    compile_ahead: bool = False
    # Protocols other than base_to_new: `base` is the training source (all its classes), `new`
    # is None and these are the test sets (`dpc_jax.evaluation.protocols`).
    eval_sets: Optional[list] = None
    _train_set: Optional[TrainSet] = None
    _unlabeled_set: Optional[TrainSet] = None
    _consts: Optional[dict] = None
    _teacher: Optional["SeedRun"] = None
    _teacher_prompt: Any = None

    @classmethod
    def create(cls, run: Run, seed: int, workdir: str, train_mode: bool = True) -> "SeedRun":
        cfg, sets = run.config, None
        if protocols.protocol_name(cfg) == "base_to_new":
            base, new = load_benchmark(cfg, seed)
        else:
            base, new = load_named(cfg, cfg.dataset, seed, cfg.shots), None
            sets = protocols.eval_sets(cfg, base, seed)
        run.evaluator.clear_cache()
        return cls(run=run, seed=seed, seed_dir=os.path.join(workdir, f"seed_{seed}"),
                   base=base, new=new, train_mode=train_mode, eval_sets=sets)

    def __post_init__(self):
        run, learner = self.run, self.run.learner
        self.base_texts = replicate(learner.prepare(run.clip_params, self.base.classnames),
                                    run.mesh)
        self.new_texts = None if self.new is None else replicate(
            learner.prepare(run.clip_params, self.new.classnames, new_classes=True), run.mesh)
        self._set_texts: Dict[tuple, Any] = {}

    @property
    def consts(self) -> dict:
        """The learner's per-seed constants (built on first use: a teacher's are its trained
        prompt's)."""
        if self._consts is None:
            run, learner = self.run, self.run.learner
            kw = {}
            names = list(self.base.classnames)
            if learner.train_split == "unlabeled":  # transductive: every class
                names += list(self.new.classnames)
            if learner.needs_teacher:
                kw["teacher"] = {"clip": run.teacher.clip_params,
                                 "prompt": replicate(self.teacher_prompt(), run.mesh)}
            self._consts = replicate(learner.constants(run.clip_params, names, **kw), run.mesh)
        return self._consts

    def teacher(self) -> "SeedRun":
        """The teacher's seed (its stage directory is W/seed_N/teacher/backbone)."""
        if self.run.teacher is None:
            raise ValueError(f"config.backbone.name={self.run.config.backbone.name!r} has no "
                             f"teacher; the 'teacher' stage is for learners that distil "
                             f"(promptkd)")
        if self._teacher is None:
            self._teacher = SeedRun(run=self.run.teacher, seed=self.seed,
                                    seed_dir=os.path.join(self.seed_dir, "teacher"),
                                    base=self.base, new=self.new, train_mode=self.train_mode)
        return self._teacher

    def teacher_prompt(self):
        """The teacher's frozen prompt: trained (or restored) by its PromptSRC stage 1, or read
        from `config.backbone.teacher.init_from`."""
        if self._teacher_prompt is None:
            teacher = self.teacher()
            self._teacher_prompt = backbone_prompt(teacher, teacher.train_mode)[0]
        return self._teacher_prompt

    def train_set(self) -> TrainSet:
        if self._train_set is None:
            size = self.run.config.stored_size or self.run.res
            self._train_set = make_train_set(self.base.train, self.base.num_classes, size,
                                             lambda t: replicate(t, self.run.mesh),
                                             self.run.config)
        return self._train_set

    def unlabeled_set(self) -> TrainSet:
        """The training split of all classes (labels kept only for the per-class table):
        stage 1 of learners with train_split 'unlabeled' (PromptKD)."""
        if self._unlabeled_set is None:
            size = self.run.config.stored_size or self.run.res
            split = load_unlabeled(self.run.config, self.seed)
            mb = resident_megabytes(len(split), size)
            stream = mb > self.run.config.max_resident_mb
            if stream:
                tqdm.write(f"seed {self.seed}: the unlabeled training split ({len(split)} "
                           f"images, {mb:.0f} MB at {size}px) exceeds config.max_resident_mb="
                           f"{self.run.config.max_resident_mb}: streamed from the host")
            self._unlabeled_set = make_train_set(
                split, self.base.num_classes + self.new.num_classes, size,
                lambda t: replicate(t, self.run.mesh), self.run.config,
                desc="decode unlabeled train (all classes)", stream=stream)
        return self._unlabeled_set

    def stage_set(self, stage_id: int) -> TrainSet:
        if stage_id == BACKBONE and self.run.learner.train_split == "unlabeled":
            return self.unlabeled_set()
        return self.train_set()

    def train_consts(self, stage_id: int) -> dict:
        return {"clip": self.run.clip_params, "train": self.stage_set(stage_id).as_consts(),
                "class_texts": self.base_texts, "learner": self.consts}

    def evaluate(self, base_prompt, new_prompt, state=None, learner=None, texts=None,
                 new_state=None) -> dict:
        """Base and new accuracy; `state` is the learner state of both splits unless
        `new_state` is given (an imported DPC stage 2: its own BatchNorm statistics for base
        classes, stage 1's for new classes). Other protocols: `evaluate_sets`."""
        if self.eval_sets is not None:
            if texts is not None:
                raise ValueError("texts are per eval set in protocols other than base_to_new")
            return self.evaluate_sets(base_prompt, new_prompt, state, learner, new_state)
        learner = learner or self.run.learner
        base_texts, new_texts = texts or (self.base_texts, self.new_texts)
        ev, consts = self.run.evaluator, self.consts if learner is self.run.learner else {}
        base = ev.accuracy(learner, self.base.test, base_prompt, base_texts,
                           f"seed {self.seed} base", state, consts)
        new = ev.accuracy(learner, self.new.test, new_prompt, new_texts,
                          f"seed {self.seed} new", state if new_state is None else new_state,
                          consts)
        return scores(base, new)

    def set_texts(self, learner, es) -> Any:
        """The class texts an eval set's classifier is built from (the learner's inputs): the
        source's classes for the source and for domain-shift targets (whose `rows` select
        among them), the target's own classes (unseen: `new_classes`) otherwise. Zero-shot
        CLIP uses each set's own templates."""
        zeroshot = isinstance(learner, ZeroShotCLIP)
        if learner is self.run.learner and (es.role == "source" or es.rows is not None):
            return self.base_texts
        key = (id(learner), es.name)
        if key not in self._set_texts:
            names = self.base.classnames if (es.rows is not None or es.role == "source") \
                else es.classnames
            new = not (zeroshot or es.rows is not None or es.role == "source")
            self._set_texts[key] = replicate(learner.prepare(self.run.clip_params, names,
                                                             new_classes=new), self.run.mesh)
        return self._set_texts[key]

    def evaluate_sets(self, base_prompt, new_prompt, state=None, learner=None,
                      new_state=None) -> dict:
        """{"accuracy": {eval set: %}}: the source with the base prompt and state, each target
        with the ones `config.dpc.transfer_prompt` names (`protocols.select_prompt`)."""
        cfg, ev = self.run.config, self.run.evaluator
        out = {}
        new_state = state if new_state is None else new_state
        for es in self.eval_sets:
            lrn = learner or self.run.learner
            if isinstance(lrn, ZeroShotCLIP):
                lrn = self.run.zeroshot_learner(es.templates)
            consts = self.consts if lrn is self.run.learner else {}
            prompt = protocols.select_prompt(cfg, es.role, base_prompt, new_prompt)
            st = protocols.select_prompt(cfg, es.role, state, new_state)
            out[es.name] = ev.accuracy(lrn, es.test, prompt, self.set_texts(lrn, es),
                                       f"seed {self.seed} {es.name}", st, consts, rows=es.rows)
        return {"accuracy": out}

    def stage_dir(self, stage_id: int) -> StageDir:
        name = "backbone" if stage_id == BACKBONE else "dpc"
        return StageDir(os.path.join(self.seed_dir, name), stage_id, self.run.config)

    def selection_hook(self, selection: str) -> Callable:
        """The epoch hook of stage-1 model selection: evaluate the epoch's prompt on the base
        test split (the released PromptKD's choice) or the base validation split, and keep the
        best (the first on ties) in `extra['selection']`."""
        split, key = ((self.base.test, f"seed {self.seed} base") if selection == "best_base_test"
                      else (self.base.val, f"seed {self.seed} base val"))
        learner, mesh = self.run.learner, self.run.mesh

        def hook(epoch: int, current: dict, extra: dict) -> dict:
            prompt, state = replicate((current["params"], current["state"]), mesh)
            acc = self.run.evaluator.accuracy(learner, split, prompt, self.base_texts,
                                              f"{key} (epoch {epoch + 1})", state, self.consts)
            best = extra[SELECTION]
            if acc > float(best["accuracy"]):
                best = {"accuracy": np.asarray(acc, np.float32),
                        "epoch": np.asarray(epoch + 1, np.int32),
                        "params": current["params"], "state": current["state"]}
            return {**extra, SELECTION: best}

        return hook

    def stage_inputs(self, stage_id: int, params, lstate, batch_size: int, batch_field: str,
                     more_consts: Optional[dict] = None) -> dict:
        """What a stage's loop starts from: its program, schedule, epoch steps, train state
        {'params', 'opt_state', 'state'} (host trees), constants and training set."""
        ts = self.stage_set(stage_id)
        steps_fn, optimizer, schedule, _, epoch_steps = self.run.step(
            stage_id, params, ts.size, batch_size, batch_field)
        return {"steps_fn": steps_fn, "schedule": schedule, "epoch_steps": epoch_steps,
                "train_state": {"params": params, "opt_state": host(optimizer.init(params)),
                                "state": lstate},
                "consts": {**self.train_consts(stage_id), **(more_consts or {})}, "set": ts}

    def train(self, stage_id: int, params, lstate, extra, batch_size: int, batch_field: str,
              epochs: int, name: str, learner=None, more_consts: Optional[dict] = None,
              epoch_hook: Optional[Callable] = None):
        inputs = self.stage_inputs(stage_id, params, lstate, batch_size, batch_field,
                                   more_consts)
        ts = inputs["set"]
        return train_loop(name=name, stage=self.stage_dir(stage_id),
                          steps_fn=inputs["steps_fn"], schedule=inputs["schedule"],
                          train_state=inputs["train_state"], extra=extra,
                          consts=inputs["consts"], n=ts.size,
                          global_batch=batch_size * self.run.mesh.size, stream=ts.stream,
                          epoch_steps=inputs["epoch_steps"], epochs=epochs, seed=self.seed,
                          mesh=self.run.mesh, config=self.run.config, learner=learner,
                          hooks=self.run.hooks, epoch_hook=epoch_hook)

    def compile_dpc_ahead(self, stage1_params, lstate, extra) -> None:
        """Start compiling stage 2's program in the background (`ahead.AheadProgram`), from
        stand-in arguments of its first call built from stage 1's initial parameters: the same
        shapes as the trained ones (the scorer's classifier only as shapes). Seeds after the
        first share the compiled program; a finished or imported stage 2 needs none."""
        cfg = self.run.config
        if (cfg.dpc.get("init_from", "") or self.stage_set(DPC).stream is not None
                or read_stage_meta(self.stage_dir(DPC).path) is not None):
            return
        try:  # a speedup only: a stand-in that cannot be built must not stop the run
            backbone = dpc_backbone(self, self.run.learner.final_prompt(stage1_params, extra))
            init = dpc_init(self, backbone)
            steps_fn = self.run.step(DPC, init, self.stage_set(DPC).size, cfg.batch_size,
                                     "batch_size")[0]
            if steps_fn.started:  # a seed before this one compiled it
                return
            inputs = self.stage_inputs(DPC, init, host(lstate), cfg.batch_size, "batch_size",
                                       {"scorer": dpc_scorer(self, backbone, True)})
            args = first_call_args(inputs["train_state"], inputs["consts"], self.run.mesh,
                                   cfg.batch_size * self.run.mesh.size, self.seed, DPC, cfg)
        except Exception as e:
            tqdm.write(f"seed {self.seed}: config.compile_ahead skipped ({type(e).__name__}: "
                       f"{e}); stage 2 compiles on its first call")
            return
        steps_fn.start(args)


def run_zeroshot(sr: SeedRun, train: bool) -> dict:
    learner = sr.run.zeroshot_learner(sr.base.templates)
    if sr.eval_sets is not None:  # each set with its own templates
        return sr.evaluate({}, {}, learner=learner)
    texts = (learner.prepare(sr.run.clip_params, sr.base.classnames),
             learner.prepare(sr.run.clip_params, sr.new.classnames, new_classes=True))
    return sr.evaluate({}, {}, learner=learner, texts=texts)


def backbone_prompt(sr: SeedRun, train: bool):
    """Stage 1's tuned prompt P and the learner's state: trained here, restored, or read from
    a PyTorch checkpoint (`config.backbone.init_from`)."""
    cfg, learner = sr.run.config, sr.run.learner
    clip_params = sr.run.clip_params
    init_state = host(learner.init_state(clip_params))
    if cfg.backbone.init_from:
        prompt, state = learner.load_torch_backbone(cfg.backbone.init_from, sr.base.num_classes)
        return prompt, init_state if state is None else host(state)
    init = host(learner.init(jax.random.fold_in(jax.random.key(sr.seed), 101), clip_params,
                             sr.base.num_classes))
    extra = host(learner.init_extra(init))
    selection = model_selection(cfg)
    if selection != "last":
        extra[SELECTION] = {"accuracy": np.asarray(-1, np.float32),
                            "epoch": np.asarray(0, np.int32), "params": init,
                            "state": init_state}
    if not train:
        final = sr.stage_dir(BACKBONE).final({"params": init,
                                              "aux": {"state": init_state, "extra": extra}})
        return _selected(sr, learner, final["params"], final["aux"]["state"],
                         final["aux"]["extra"])
    if sr.compile_ahead:
        sr.compile_dpc_ahead(init, init_state, extra)
    out, extra = sr.train(BACKBONE, init, init_state, extra, cfg.backbone.batch_size,
                          "backbone.batch_size", cfg.backbone.epochs,
                          f"seed {sr.seed} backbone ({cfg.backbone.name})", learner=learner,
                          epoch_hook=None if selection == "last" else sr.selection_hook(selection))
    return _selected(sr, learner, out["params"], out["state"], extra)


def model_selection(cfg) -> str:
    """`config.backbone.selection` ('last' when the learner's config has no such field)."""
    value = cfg.backbone.get("selection", "last")
    if value not in SELECTIONS:
        raise ValueError(f"config.backbone.selection={value!r}; expected one of {SELECTIONS} "
                         f"('best_base_test' reproduces the released PromptKD, which selects "
                         f"on test data)")
    return value


def _selected(sr: SeedRun, learner, params, state, extra):
    """Stage 1's P and state: the selected epoch's (model selection), else the learner's
    `final_prompt` of the last parameters."""
    if SELECTION in extra:
        best = extra[SELECTION]
        tqdm.write(f"seed {sr.seed} backbone: selected epoch {int(best['epoch'])} "
                   f"(base accuracy {float(best['accuracy']):.2f} on the selection split)")
        return best["params"], best["state"]
    return learner.final_prompt(params, extra), state


def run_backbone(sr: SeedRun, train: bool = True) -> dict:
    prompt, lstate = backbone_prompt(sr, train)
    prompt, lstate = replicate((prompt, lstate), sr.run.mesh)
    return sr.evaluate(prompt, prompt, lstate)


def run_teacher(sr: SeedRun, train: bool = True) -> dict:
    """The teacher's accuracy on base and new classes (trained here, restored or imported)."""
    teacher = sr.teacher()
    prompt = replicate(sr.teacher_prompt(), sr.run.mesh)
    return teacher.evaluate(prompt, prompt)


def check_dpc_import(cfg, learner) -> None:
    """`config.dpc.init_from` (a released stage-2 checkpoint to evaluate) is usable: the learner
    has an importer, the mode is the released parameterisation, and stage 1 comes from the
    PyTorch files the stage-2 run started from (its theta is only meaningful against them)."""
    path = cfg.dpc.get("init_from", "")
    if not path:
        return
    if not learner.torch_dpc_trainer:
        raise ValueError(f"config.dpc.init_from={path!r}: the {learner.name!r} learner has no "
                         f"importer of PyTorch DPC stage-2 checkpoints (only promptkd: "
                         f"StackSPLE_PromptKD); leave config.dpc.init_from empty and train "
                         f"stage 2 here")
    if cfg.dpc.mode != "reference":
        raise ValueError(f"config.dpc.init_from={path!r} with config.dpc.mode="
                         f"{cfg.dpc.mode!r}: a released {learner.torch_dpc_trainer} file stores "
                         f"the released ('reference', converse) parameterisation; set "
                         f"config.dpc.mode='reference'")
    stage1 = {"backbone.init_from": cfg.backbone.init_from}
    if learner.needs_teacher:
        stage1["backbone.teacher.init_from"] = cfg.backbone.teacher.init_from
    for field, value in stage1.items():
        if not value:
            raise ValueError(f"config.dpc.init_from={path!r} needs config.{field}: the stage-1 "
                             f"PyTorch file that stage 2 started from (the stored theta is a "
                             f"mix with its prompt P, and new classes use P)")
        if os.path.abspath(value) == os.path.abspath(path):
            raise ValueError(f"config.{field} and config.dpc.init_from are the same file "
                             f"{path!r}; config.{field} takes the stage-1 file")


def dpc_model(sr: SeedRun, train: bool):
    """Stage 2's (params, base_state, new_state): DPC parameters {'backbone', 'parallel'} and
    the learner states of base and new evaluation. Trained here, restored, or imported from a
    released stage-2 checkpoint (`config.dpc.init_from`: evaluated, never trained; its own
    state, e.g. PromptKD's stage-2 BatchNorm statistics, serves the base classes). Otherwise
    both states are stage 1's (frozen in stage 2)."""
    cfg, learner = sr.run.config, sr.run.learner
    backbone, lstate = backbone_prompt(sr, train=False)
    backbone, lstate = dpc_backbone(sr, backbone), host(lstate)
    if cfg.dpc.get("init_from", ""):
        check_dpc_import(cfg, learner)
        parallel, state = learner.load_torch_dpc(cfg.dpc.init_from)
        return ({"backbone": backbone, "parallel": parallel},
                lstate if state is None else state, lstate)
    init = dpc_init(sr, backbone)
    if train:
        out, _ = sr.train(DPC, init, lstate, {}, cfg.batch_size, "batch_size", cfg.dpc.epochs,
                          f"seed {sr.seed} dpc ({cfg.dpc.mode}, {cfg.dhno.policy})",
                          more_consts={"scorer": dpc_scorer(sr, backbone)})
        params = out["params"]
    else:
        params = sr.stage_dir(DPC).final({"params": init, "aux": {}})["params"]
    return params, lstate, lstate


def dpc_backbone(sr: SeedRun, prompt):
    """Stage 1's prompt P as stage 2 holds it (the learner's `dpc_backbone`), a host tree."""
    return host(sr.run.learner.dpc_backbone(host(prompt), sr.consts))


def dpc_init(sr: SeedRun, backbone):
    """Stage 2's initial parameters {'backbone', 'parallel'} from P (after the learner's
    `dpc_backbone`): `DualPrompt.init`, then the learner's `dpc_init`."""
    return sr.run.learner.dpc_init(sr.run.dual.init(backbone), sr.run.config.dpc,
                                   jax.random.fold_in(jax.random.key(sr.seed), 202))


def dpc_scorer(sr: SeedRun, backbone, shape: bool = False):
    """The frozen stage-1 classifier over the base classes that DHNO ranks with, replicated;
    with `shape`, only its `jax.ShapeDtypeStruct`s (for a program compiled ahead)."""
    run, learner = sr.run, sr.run.learner
    prompt = replicate(learner.scorer_prompt(backbone, run.config.dpc, sr.consts), run.mesh)
    if not shape:
        return replicate(run.evaluator.classifier(learner, prompt, sr.base_texts, sr.consts),
                         run.mesh)
    replicated = NamedSharding(run.mesh, PartitionSpec())
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
        run.evaluator.classifier_shape(learner, prompt, sr.base_texts, sr.consts))


def run_dpc(sr: SeedRun, train: bool = True) -> dict:
    params, base_state, new_state = replicate(dpc_model(sr, train), sr.run.mesh)
    dual = sr.run.dual
    return sr.evaluate(dual.eval_prompt(params, "base"), dual.eval_prompt(params, "new"),
                       base_state, new_state=new_state)


STAGE_RUNNERS = {"zeroshot": run_zeroshot, "teacher": run_teacher, "backbone": run_backbone,
                 "dpc": run_dpc}
