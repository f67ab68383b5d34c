"""The teacher of a learner that distils (`capabilities.Distils`): its run (its own CLIP and
learner, from `config.backbone.teacher` and `teacher_clip`), its stage 1 per seed in
W/seed_N/teacher/ (trained, restored or read from `teacher.init_from`), and the 'teacher' stage
that reports its accuracy. The student's stage 1 obtains the teacher's prompt itself when the
'teacher' stage is not listed."""

from __future__ import annotations

import os

import ml_collections

from dpc_jax.convert.load import load_clip_from_config
from dpc_jax.mesh import replicate
from dpc_jax.prompts import capabilities, get_learner
from dpc_jax.training.run import Run
from dpc_jax.training.seed import SeedRun
from dpc_jax.training.stage1 import stage1_prompt


def build_run(config, mesh, clip_config, clip_params, tokenizer, hooks=()) -> Run:
    """The run every seed shares (`clip_params` replicated); for a learner that distils, its
    teacher's run first, built once."""
    teacher = None
    if capabilities.distils(get_learner(config.backbone.get("name", ""))):
        teacher = teacher_run(config, mesh, tokenizer, hooks)
    return Run(config=config, mesh=mesh, clip_config=clip_config, clip_params=clip_params,
               tokenizer=tokenizer, hooks=tuple(hooks), teacher=teacher,
               teacher_prompt=teacher_prompt if teacher is not None else None)


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


def teacher_run(student_config, mesh, tokenizer, hooks=()) -> Run:
    """The teacher's `Run`: its CLIP loaded once, its learner, evaluator and steps."""
    cfg = teacher_config(student_config)
    clip_config, params = load_clip_from_config(cfg.clip, "config.backbone.teacher_clip")
    if tokenizer.vocab_size > clip_config.vocab_size:
        raise ValueError(f"config.backbone.teacher_clip.source={cfg.clip.source!r} embeds "
                         f"{clip_config.vocab_size} tokens; the shared tokenizer has "
                         f"{tokenizer.vocab_size}")
    return Run(config=cfg, mesh=mesh, clip_config=clip_config,
               clip_params=replicate(params, mesh), tokenizer=tokenizer, hooks=tuple(hooks))


def teacher_seed(seed_run: SeedRun) -> SeedRun:
    """The teacher's seed run (its stage directory is W/seed_N/teacher/backbone)."""
    if seed_run.run.teacher is None:
        raise ValueError(f"config.backbone.name={seed_run.run.config.backbone.name!r} has no "
                         f"teacher; the 'teacher' stage is for learners that distil")
    if seed_run.teacher is None:
        seed_run.teacher = SeedRun(
            run=seed_run.run.teacher, seed=seed_run.seed,
            seed_dir=os.path.join(seed_run.seed_dir, "teacher"), base=seed_run.base,
            new=seed_run.new, train_mode=seed_run.train_mode)
    return seed_run.teacher


def teacher_prompt(seed_run: SeedRun):
    """The teacher's frozen prompt for this seed: its own stage 1 (trained, restored, or read
    from `config.backbone.teacher.init_from`)."""
    if seed_run.teacher_prompt is None:
        teacher = teacher_seed(seed_run)
        seed_run.teacher_prompt = stage1_prompt(teacher, teacher.train_mode)[0]
    return seed_run.teacher_prompt


def run_teacher(seed_run: SeedRun, train: bool = True) -> dict:
    """The teacher's accuracy on base and new classes (trained here, restored or imported)."""
    prompt = replicate(teacher_prompt(seed_run), seed_run.run.mesh)
    return teacher_seed(seed_run).evaluate(prompt, prompt)
