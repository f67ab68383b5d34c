"""One seed of a run: its data (base and new halves, or a protocol's test sets), the learner's
class texts and per-seed constants, its training sets, evaluation, and its stages as values."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

from tqdm import tqdm

from dpc_jax.data.base import BaseToNewData
from dpc_jax.data.train_sets import TrainSet, load_unlabeled, make_train_set, resident_megabytes
from dpc_jax.evaluation.results import scores
from dpc_jax.mesh import replicate
from dpc_jax.prompts import LearnerContext, ZeroShotCLIP, capabilities
from dpc_jax.training.checkpoints import StageDir, host
from dpc_jax.training.loop import Stage, run_stage
from dpc_jax.training.run import BACKBONE, STAGE_FOLDERS, Run


@dataclasses.dataclass
class SeedRun:
    """One seed: its base/new halves, class texts, the learner's constants, the train set."""

    run: Run
    seed: int
    seed_dir: str
    base: BaseToNewData
    new: BaseToNewData
    train_mode: bool = True  # False: stages restore what they need (config.mode 'eval')
    # Called with (this seed, stage 1's initial params, state, extra) just before stage 1
    # trains: the trainer sets `stage2.compile_ahead` when this seed trains both stages and
    # config.compile_ahead is on.
    before_stage1: Optional[Callable] = None
    # Protocols other than base_to_new: `base` is the training source (all its classes), `new`
    # is None and these are the test sets (`dpc_jax.evaluation.protocols`).
    eval_sets: Optional[list] = None
    _train_set: Optional[TrainSet] = None
    _unlabeled_set: Optional[TrainSet] = None
    _consts: Optional[dict] = None
    # A learner that distils: the teacher's seed run and its frozen prompt (`teacher` module).
    teacher: Optional["SeedRun"] = None
    teacher_prompt: Any = None

    @classmethod
    def create(cls, run: Run, seed: int, workdir: str, train_mode: bool = True) -> "SeedRun":
        base, new, sets = run.protocol.data(seed)
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
            if capabilities.distils(learner):
                kw["teacher"] = {"clip": run.teacher.clip_params,
                                 "prompt": replicate(run.teacher_prompt(self), run.mesh)}
            context = LearnerContext(dataset=run.config.dataset, classnames=tuple(names),
                                     templates=tuple(self.base.templates), **kw)
            self._consts = replicate(learner.constants(run.clip_params, context), run.mesh)
        return self._consts

    def train_set(self) -> TrainSet:
        if self._train_set is None:
            size = self.run.config.stored_size or self.run.res
            self._train_set = make_train_set(self.base.train, self.base.num_classes, size,
                                             lambda t: replicate(t, self.run.mesh),
                                             self.run.config)
        return self._train_set

    def unlabeled_set(self) -> TrainSet:
        """The training split of all classes (labels kept only for the per-class table):
        stage 1 of learners with train_split 'unlabeled'."""
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
        with the ones `config.dpc.transfer_prompt` names (`Protocol.select_prompt`)."""
        run = self.run
        out = {}
        new_state = state if new_state is None else new_state
        for eval_set in self.eval_sets:
            set_learner = learner or run.learner
            if isinstance(set_learner, ZeroShotCLIP):  # each set with its own templates
                set_learner = run.zeroshot_learner(eval_set.templates)
            consts = self.consts if set_learner is run.learner else {}
            prompt = run.protocol.select_prompt(eval_set.role, base_prompt, new_prompt)
            set_state = run.protocol.select_prompt(eval_set.role, state, new_state)
            out[eval_set.name] = run.evaluator.accuracy(
                set_learner, eval_set.test, prompt, self.set_texts(set_learner, eval_set),
                f"seed {self.seed} {eval_set.name}", set_state, consts, rows=eval_set.rows)
        return {"accuracy": out}

    def stage_dir(self, stage_id: int) -> StageDir:
        return StageDir(os.path.join(self.seed_dir, STAGE_FOLDERS[stage_id]), stage_id,
                        self.run.config)

    def stage(self, stage_id: int, params, state, *, name: str, batch_size: int,
              batch_field: str, epochs: int, extra_consts: Optional[dict] = None,
              epoch_hooks=None, epoch_hook: Optional[Callable] = None) -> Tuple[Stage, dict]:
        """A training stage of this seed as a `loop.Stage`, and the train state it starts from
        {'params', 'opt_state', 'state'} (host trees)."""
        train_set = self.stage_set(stage_id)
        program = self.run.program(stage_id, params, train_set.size, batch_size, batch_field)
        stage = Stage(name=name, directory=self.stage_dir(stage_id), program=program.program,
                      schedule=program.schedule,
                      consts={**self.train_consts(stage_id), **(extra_consts or {})},
                      train_size=train_set.size, global_batch=batch_size * self.run.mesh.size,
                      epoch_steps=program.epoch_steps, epochs=epochs, stream=train_set.stream,
                      epoch_hooks=epoch_hooks, epoch_hook=epoch_hook)
        return stage, {"params": params, "opt_state": host(program.optimizer.init(params)),
                       "state": state}

    def train(self, stage: Stage, train_state: dict, extra: dict):
        """`loop.run_stage` of one of this seed's stages: the final train state and carry."""
        run = self.run
        return run_stage(stage, train_state, extra, seed=self.seed, mesh=run.mesh,
                         config=run.config, hooks=run.hooks)

