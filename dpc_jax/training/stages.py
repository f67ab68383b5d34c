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
from jax.sharding import Mesh

from dpc_jax.data.base import BaseToNewData
from dpc_jax.data.train_sets import TrainSet, load_benchmark, make_train_set
from dpc_jax.evaluation.evaluator import Evaluator
from dpc_jax.evaluation.results import scores
from dpc_jax.models.clip import CLIPConfig
from dpc_jax.prompts import DualPrompt, PromptLearner, ZeroShotCLIP, build_learner
from dpc_jax.training import masks, objectives, optim
from dpc_jax.training.checkpoints import StageDir, host
from dpc_jax.training.loop import check_batch_fits, steps_per_epoch, train_loop
from dpc_jax.training.step import make_per_device_step, map_step, replicate

BACKBONE, DPC = 1, 2  # stage ids (they seed the epoch order and the step keys)


@dataclasses.dataclass
class Run:
    """What every seed of a run shares; built once by `train_lib.train_and_evaluate`."""

    config: Any
    mesh: Mesh
    clip_config: CLIPConfig
    clip_params: Any  # replicated
    tokenizer: Any
    hooks: Sequence[Callable] = ()

    def __post_init__(self):
        self.learner: PromptLearner = build_learner(self.clip_config, self.tokenizer,
                                                    self.config.backbone)
        if self.learner.train_split != "fewshot":
            raise ValueError(f"config.backbone.name={self.learner.name!r} trains on the "
                             f"{self.learner.train_split!r} split; only 'fewshot' (the labelled "
                             f"base few-shot set) is supported so far")
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
        """(step_fn, optimizer, schedule, mask, epoch_steps) of a stage, built once per shape."""
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
                objective = objectives.dpc_objective(self.learner, self.dual, self.res,
                                                     cfg.dhno.top_k, cfg.dhno.policy,
                                                     tuple(cfg.crop_scale))
            optimizer, schedule = _optimizer(cfg, name, stage_cfg.lr, stage_cfg.epochs,
                                             epoch_steps, mask)
            step_fn = map_step(make_per_device_step(objective, optimizer, mask), self.mesh)
            self._steps[key] = (step_fn, optimizer, schedule, mask, epoch_steps)
        return self._steps[key]


def _optimizer(cfg, stage: str, lr, epochs, epoch_steps, mask):
    """The stage's SGD (Dassl schedule) and its learning-rate schedule (for logging)."""
    kw = dict(warmup_epochs=cfg.optim.warmup_epochs, warmup_lr=cfg.optim.warmup_lr)
    names = {"lr": f"config.{stage}.lr", "max_epoch": f"config.{stage}.epochs",
             **{k: f"config.optim.{k}" for k in ("momentum", "weight_decay", "warmup_epochs",
                                                 "warmup_lr")}}
    optimizer = optim.make_optimizer(lr, epochs, epoch_steps, mask=mask,
                                     momentum=cfg.optim.momentum,
                                     weight_decay=cfg.optim.weight_decay, field_names=names, **kw)
    return optimizer, optim.dassl_schedule(lr, epochs, epoch_steps, **kw)


@dataclasses.dataclass
class SeedRun:
    """One seed: its base/new halves, class texts, the learner's constants, the train set."""

    run: Run
    seed: int
    seed_dir: str
    base: BaseToNewData
    new: BaseToNewData
    _train_set: Optional[TrainSet] = None

    @classmethod
    def create(cls, run: Run, seed: int, workdir: str) -> "SeedRun":
        base, new = load_benchmark(run.config, seed)
        run.evaluator.clear_cache()
        return cls(run=run, seed=seed, seed_dir=os.path.join(workdir, f"seed_{seed}"),
                   base=base, new=new)

    def __post_init__(self):
        run, learner = self.run, self.run.learner
        self.base_texts = replicate(learner.prepare(run.clip_params, self.base.classnames),
                                    run.mesh)
        self.new_texts = replicate(learner.prepare(run.clip_params, self.new.classnames,
                                                   new_classes=True), run.mesh)
        self.consts = replicate(learner.constants(run.clip_params, self.base.classnames),
                                run.mesh)

    def train_set(self) -> TrainSet:
        if self._train_set is None:
            size = self.run.config.stored_size or self.run.res
            self._train_set = make_train_set(self.base.train, self.base.num_classes, size,
                                             lambda t: replicate(t, self.run.mesh),
                                             self.run.config)
        return self._train_set

    def train_consts(self) -> dict:
        return {"clip": self.run.clip_params, "train": self.train_set().as_consts(),
                "class_texts": self.base_texts, "learner": self.consts}

    def evaluate(self, base_prompt, new_prompt, state=None, learner=None, texts=None) -> dict:
        learner = learner or self.run.learner
        base_texts, new_texts = texts or (self.base_texts, self.new_texts)
        ev, consts = self.run.evaluator, self.consts if learner is self.run.learner else {}
        base = ev.accuracy(learner, self.base.test, base_prompt, base_texts,
                           f"seed {self.seed} base", state, consts)
        new = ev.accuracy(learner, self.new.test, new_prompt, new_texts,
                          f"seed {self.seed} new", state, consts)
        return scores(base, new)

    def stage_dir(self, stage_id: int) -> StageDir:
        name = "backbone" if stage_id == BACKBONE else "dpc"
        return StageDir(os.path.join(self.seed_dir, name), stage_id, self.run.config)

    def train(self, stage_id: int, params, lstate, extra, batch_size: int, batch_field: str,
              epochs: int, name: str, learner=None, more_consts: Optional[dict] = None):
        ts = self.train_set()
        step_fn, optimizer, schedule, _, epoch_steps = self.run.step(
            stage_id, params, ts.size, batch_size, batch_field)
        train_state = {"params": params, "opt_state": host(optimizer.init(params)),
                       "state": lstate}
        return train_loop(name=name, stage=self.stage_dir(stage_id), step_fn=step_fn,
                          schedule=schedule, train_state=train_state, extra=extra,
                          consts={**self.train_consts(), **(more_consts or {})}, n=ts.size,
                          global_batch=batch_size * self.run.mesh.size,
                          epoch_steps=epoch_steps, epochs=epochs, seed=self.seed,
                          mesh=self.run.mesh, config=self.run.config, learner=learner,
                          hooks=self.run.hooks)


def run_zeroshot(sr: SeedRun, train: bool) -> dict:
    learner = sr.run.zeroshot_learner(sr.base.templates)
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
        return learner.load_torch_prompt(cfg.backbone.init_from, sr.base.num_classes), init_state
    init = host(learner.init(jax.random.fold_in(jax.random.key(sr.seed), 101), clip_params,
                             sr.base.num_classes))
    extra = host(learner.init_extra(init))
    if not train:
        final = sr.stage_dir(BACKBONE).final({"params": init,
                                              "aux": {"state": init_state, "extra": extra}})
        params, aux = final["params"], final["aux"]
        return learner.final_prompt(params, aux["extra"]), aux["state"]
    out, extra = sr.train(BACKBONE, init, init_state, extra, cfg.backbone.batch_size,
                          "backbone.batch_size", cfg.backbone.epochs,
                          f"seed {sr.seed} backbone ({cfg.backbone.name})", learner=learner)
    return learner.final_prompt(out["params"], extra), out["state"]


def run_backbone(sr: SeedRun, train: bool = True) -> dict:
    prompt, lstate = backbone_prompt(sr, train)
    prompt, lstate = replicate((prompt, lstate), sr.run.mesh)
    return sr.evaluate(prompt, prompt, lstate)


def run_dpc(sr: SeedRun, train: bool = True) -> dict:
    cfg, run = sr.run.config, sr.run
    backbone, lstate = backbone_prompt(sr, train=False)
    backbone, lstate = host(backbone), host(lstate)
    init = run.dual.init(backbone)
    if train:
        rep_backbone = replicate(backbone, run.mesh)
        scorer = run.evaluator.classifier(run.learner, rep_backbone, sr.base_texts, sr.consts)
        out, _ = sr.train(DPC, init, lstate, {}, cfg.batch_size, "batch_size", cfg.dpc.epochs,
                          f"seed {sr.seed} dpc ({cfg.dpc.mode}, {cfg.dhno.policy})",
                          more_consts={"scorer": replicate(scorer, run.mesh)})
        params = out["params"]
    else:
        params = sr.stage_dir(DPC).final({"params": init, "aux": {}})["params"]
    params, lstate = replicate((params, lstate), run.mesh)
    return sr.evaluate(run.dual.eval_prompt(params, "base"), run.dual.eval_prompt(params, "new"),
                       lstate)


STAGE_RUNNERS = {"zeroshot": run_zeroshot, "backbone": run_backbone, "dpc": run_dpc}
