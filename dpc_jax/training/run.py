"""What every seed of a run shares, built once per run: the mesh, the CLIP, the learner, DPC's
dual prompt, the evaluator, and the compiled stage programs (cached by their shapes, so seeds 2
and 3 reuse seed 1's)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from dpc_jax.evaluation import protocols
from dpc_jax.evaluation.evaluator import Evaluator
from dpc_jax.models.clip import CLIPConfig
from dpc_jax.prompts import (DualPrompt, PromptLearner, ZeroShotCLIP, build_learner,
                             capabilities, get_learner)
from dpc_jax.training import masks, objectives, optim
from dpc_jax.training.ahead import AheadProgram
from dpc_jax.training.loop import check_batch_fits, steps_per_epoch
from dpc_jax.training.step import make_per_device_step, map_step, map_steps

BACKBONE, DPC = 1, 2  # stage ids of stage 1 and stage 2 (they seed the epoch order and keys)
STAGE_FOLDERS = {BACKBONE: "backbone", DPC: "dpc"}  # a training stage's folder in its seed run
TRAIN_SPLITS = ("fewshot", "unlabeled")


class StageProgram(NamedTuple):
    """A training stage's compiled pieces (shared by every seed with the same shapes)."""

    program: AheadProgram  # the stretch of steps `loop.run_stage` calls
    optimizer: Any
    schedule: Callable  # step -> learning rate
    mask: Any  # the trainable leaves
    epoch_steps: int


@dataclasses.dataclass
class Run:
    """What every seed of a run shares; built once per run (`teacher.build_run`)."""

    config: Any
    mesh: Mesh
    clip_config: CLIPConfig
    clip_params: Any  # replicated
    tokenizer: Any
    hooks: Sequence[Callable] = ()

    teacher: Optional["Run"] = None  # the teacher's run, for learners that distil from one
    # seed run -> the teacher's frozen prompt for that seed (`teacher.teacher_prompt`), set
    # with `teacher`: the learner's per-seed context carries it.
    teacher_prompt: Optional[Callable] = None

    def __post_init__(self):
        extra = {}
        distils = capabilities.distils(get_learner(self.config.backbone.get("name", "")))
        if distils and (self.teacher is None or self.teacher_prompt is None):
            raise ValueError(f"config.backbone.name={self.config.backbone.name!r} distils from "
                             f"a teacher: build the run with training.teacher.build_run")
        if self.teacher is not None:
            extra["teacher"] = self.teacher.learner
        self.learner: PromptLearner = build_learner(self.clip_config, self.tokenizer,
                                                    self.config.backbone, **extra)
        if self.learner.train_split not in TRAIN_SPLITS:
            raise ValueError(f"config.backbone.name={self.learner.name!r} trains on the "
                             f"{self.learner.train_split!r} split; supported: {TRAIN_SPLITS}")
        rules = (self.learner.dual_rules() if isinstance(self.learner, capabilities.Dual)
                 else None)
        self.dual = DualPrompt(self.config.dpc, rules)
        self.res = self.clip_config.image_resolution
        self.evaluator = Evaluator(self.clip_params, self.res, self.mesh, self.config)
        self.protocol = protocols.get(self.config)
        self._programs: Dict[tuple, StageProgram] = {}
        self._zeroshot: Dict[tuple, ZeroShotCLIP] = {}

    def zeroshot_learner(self, templates) -> ZeroShotCLIP:
        key = tuple(templates)
        if key not in self._zeroshot:
            cfg = ml_collections.ConfigDict({"name": ZeroShotCLIP.name, "templates": list(key)})
            self._zeroshot[key] = ZeroShotCLIP(self.clip_config, self.tokenizer, cfg)
        return self._zeroshot[key]

    def program(self, stage_id: int, params, n: int, batch_size: int,
                batch_field: str) -> "StageProgram":
        """A stage's program, optimiser, schedule, mask and epoch steps, built once per shape
        (the program is an `ahead.AheadProgram`, which `stage2.compile_ahead` may compile
        early)."""
        cfg = self.config
        check_batch_fits(batch_field, batch_size, self.mesh.size, n, cfg.dataset, cfg.shots)
        epoch_steps = steps_per_epoch(n, batch_size, self.mesh.size)
        key = (stage_id, epoch_steps, batch_size, jax.tree_util.tree_structure(params))
        if key not in self._programs:
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
                    compact_negatives=cfg.dpc.get("compact_negatives", True),
                    chunk_tail=cfg.dpc.get("chunk_tail", "single"))
            scales = None
            if stage_id == BACKBONE and self.learner.lr_multipliers():
                scales = masks.rule_values(params, self.learner.lr_multipliers(), float)
            optimizer, schedule = stage_optimizer(cfg, name, stage_cfg.lr, stage_cfg.epochs,
                                                  epoch_steps, mask, scales)
            step_fn = map_step(make_per_device_step(objective, optimizer, mask), self.mesh,
                               donate=False)  # its caller, the stretch, donates the state
            self._programs[key] = StageProgram(AheadProgram(map_steps(step_fn)), optimizer,
                                               schedule, mask, epoch_steps)
        return self._programs[key]



def stage_optimizer(cfg, stage: str, lr, epochs, epoch_steps, mask, lr_scales=None):
    """The stage's optimiser (SGD, or the AdamW a stage config names in `optimizer`; Dassl
    schedule) and its learning-rate schedule (for logging)."""
    kw = dict(warmup_epochs=cfg.optim.warmup_epochs, warmup_lr=cfg.optim.warmup_lr)
    names = {"lr": f"config.{stage}.lr", "max_epoch": f"config.{stage}.epochs",
             "kind": f"config.{stage}.optimizer",
             **{k: f"config.optim.{k}" for k in ("momentum", "weight_decay", "warmup_epochs",
                                                 "warmup_lr")}}
    optimizer = optim.make_optimizer(lr, epochs, epoch_steps, mask=mask,
                                     momentum=cfg.optim.momentum,
                                     weight_decay=cfg.optim.weight_decay, field_names=names,
                                     lr_scales=lr_scales,
                                     kind=(cfg.get(stage) or {}).get("optimizer", "sgd"), **kw)
    return optimizer, optim.dassl_schedule(lr, epochs, epoch_steps, **kw)
