"""The stages of a seed, in the order they run: zero-shot CLIP, the teacher (learners that
distil), stage 1 ('backbone': the learner's prompt P) and stage 2 ('dpc')."""

from __future__ import annotations

from dpc_jax.training.seed import SeedRun
from dpc_jax.training.stage1 import run_backbone
from dpc_jax.training.stage2 import run_dpc
from dpc_jax.training.teacher import run_teacher


def run_zeroshot(seed_run: SeedRun, train: bool) -> dict:
    learner = seed_run.run.zeroshot_learner(seed_run.base.templates)
    if seed_run.eval_sets is not None:  # each set with its own templates
        return seed_run.evaluate({}, {}, learner=learner)
    texts = (learner.prepare(seed_run.run.clip_params, seed_run.base.classnames),
             learner.prepare(seed_run.run.clip_params, seed_run.new.classnames, new_classes=True))
    return seed_run.evaluate({}, {}, learner=learner, texts=texts)


STAGE_RUNNERS = {"zeroshot": run_zeroshot, "teacher": run_teacher, "backbone": run_backbone,
                 "dpc": run_dpc}
