"""Stage 2: DPC. P (stage 1's prompt) is frozen, the parallel prompt P' trains with DHNO;
evaluation mixes them (Weighting-Decoupling). Also: a released stage-2 checkpoint imported
instead of training, and stage 2's program compiled while stage 1 trains."""

from __future__ import annotations

import os

import jax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from dpc_jax.mesh import replicate
from dpc_jax.prompts import capabilities, get_learner, learner_names
from dpc_jax.training.checkpoints import host, read_stage_meta
from dpc_jax.training.loop import first_call_args
from dpc_jax.training.run import DPC
from dpc_jax.training.seed import SeedRun
from dpc_jax.training.stage1 import stage1_prompt


def check_dpc_import(cfg, learner) -> None:
    """`config.dpc.init_from` (a released stage-2 checkpoint to evaluate) is usable: the learner
    has an importer, the mode is the released parameterisation, and stage 1 comes from the
    PyTorch files the stage-2 run started from (its theta is only meaningful against them)."""
    path = cfg.dpc.get("init_from", "")
    if not path:
        return
    trainer = capabilities.torch_dpc_trainer(learner)
    if not trainer:
        having = [n for n in learner_names() if capabilities.torch_dpc_trainer(get_learner(n))]
        raise ValueError(f"config.dpc.init_from={path!r}: the {learner.name!r} learner has no "
                         f"importer of PyTorch DPC stage-2 checkpoints (learners with one: "
                         f"{', '.join(having)}); leave config.dpc.init_from empty and train "
                         f"stage 2 here")
    if cfg.dpc.mode != "reference":
        raise ValueError(f"config.dpc.init_from={path!r} with config.dpc.mode="
                         f"{cfg.dpc.mode!r}: a released {trainer} file stores "
                         f"the released ('reference', converse) parameterisation; set "
                         f"config.dpc.mode='reference'")
    stage1 = {"backbone.init_from": cfg.backbone.init_from}
    if capabilities.distils(learner):
        stage1["backbone.teacher.init_from"] = cfg.backbone.teacher.init_from
    for field, value in stage1.items():
        if not value:
            raise ValueError(f"config.dpc.init_from={path!r} needs config.{field}: the stage-1 "
                             f"PyTorch file that stage 2 started from (the stored theta is a "
                             f"mix with its prompt P, and new classes use P)")
        if os.path.abspath(value) == os.path.abspath(path):
            raise ValueError(f"config.{field} and config.dpc.init_from are the same file "
                             f"{path!r}; config.{field} takes the stage-1 file")


def dpc_model(seed_run: SeedRun, train: bool):
    """Stage 2's (params, base_state, new_state): DPC parameters {'backbone', 'parallel'} and
    the learner states of base and new evaluation. Trained here, restored, or imported from a
    released stage-2 checkpoint (`config.dpc.init_from`: evaluated, never trained; its own
    state, e.g. stage-2 BatchNorm statistics, serves the base classes). Otherwise
    both states are stage 1's (frozen in stage 2)."""
    cfg, learner = seed_run.run.config, seed_run.run.learner
    backbone, learner_state = stage1_prompt(seed_run, train=False)
    backbone, learner_state = dpc_backbone(seed_run, backbone), host(learner_state)
    if cfg.dpc.get("init_from", ""):
        check_dpc_import(cfg, learner)
        parallel, state = capabilities.torch_dpc_format(learner).load_torch_dpc(
            cfg.dpc.init_from)
        return ({"backbone": backbone, "parallel": parallel},
                learner_state if state is None else state, learner_state)
    init = dpc_init(seed_run, backbone)
    if train:
        stage, train_state = dpc_stage(seed_run, init, learner_state,
                                       dpc_scorer(seed_run, backbone))
        params = seed_run.train(stage, train_state, {})[0]["params"]
    else:
        params = seed_run.stage_dir(DPC).final({"params": init, "aux": {}})["params"]
    return params, learner_state, learner_state


def dpc_stage(seed_run: SeedRun, init, learner_state, scorer):
    """Stage 2 as a `loop.Stage` (P frozen, the parallel prompt trained with DHNO) and its
    initial train state; `scorer`: the frozen classifier DHNO ranks with (`dpc_scorer`)."""
    cfg = seed_run.run.config
    return seed_run.stage(DPC, init, learner_state,
                          name=f"seed {seed_run.seed} dpc ({cfg.dpc.mode}, {cfg.dhno.policy})",
                          batch_size=cfg.batch_size, batch_field="batch_size",
                          epochs=cfg.dpc.epochs, extra_consts={"scorer": scorer})


def dpc_backbone(seed_run: SeedRun, prompt):
    """Stage 1's prompt P as stage 2 holds it (the learner's `dpc_backbone`), a host tree."""
    return host(capabilities.dual(seed_run.run.learner).dpc_backbone(host(prompt), seed_run.consts))


def dpc_init(seed_run: SeedRun, backbone):
    """Stage 2's initial parameters {'backbone', 'parallel'} from P (after the learner's
    `dpc_backbone`): `DualPrompt.init`, then the learner's `dpc_init`."""
    return capabilities.dual(seed_run.run.learner).dpc_init(seed_run.run.dual.init(backbone),
                                                      seed_run.run.config.dpc,
                                   jax.random.fold_in(jax.random.key(seed_run.seed), 202))


def dpc_scorer(seed_run: SeedRun, backbone, shape: bool = False):
    """The frozen stage-1 classifier over the base classes that DHNO ranks with, replicated;
    with `shape`, only its `jax.ShapeDtypeStruct`s (for a program compiled ahead)."""
    run, learner = seed_run.run, seed_run.run.learner
    prompt = replicate(capabilities.dual(learner).scorer_prompt(backbone, run.config.dpc,
                                                                seed_run.consts), run.mesh)
    if not shape:
        return replicate(run.evaluator.classifier(learner, prompt, seed_run.base_texts,
                                                  seed_run.consts), run.mesh)
    replicated = NamedSharding(run.mesh, PartitionSpec())
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
        run.evaluator.classifier_shape(learner, prompt, seed_run.base_texts, seed_run.consts))


def compile_ahead(seed_run: SeedRun, stage1_params, learner_state, extra) -> None:
    """Start compiling stage 2's program in the background (`ahead.AheadProgram`), from
    stand-in arguments of its first call built from stage 1's initial parameters: the same
    shapes as the trained ones (the scorer's classifier only as shapes). Seeds after the
    first share the compiled program; a finished or imported stage 2 needs none."""
    cfg = seed_run.run.config
    if (cfg.dpc.get("init_from", "") or seed_run.stage_set(DPC).stream is not None
            or read_stage_meta(seed_run.stage_dir(DPC).path) is not None):
        return
    try:  # a speedup only: a stand-in that cannot be built must not stop the run
        hooks = capabilities.epoch_hooks(seed_run.run.learner)
        backbone = dpc_backbone(seed_run, hooks.final_prompt(stage1_params, extra))
        init = dpc_init(seed_run, backbone)
        program = seed_run.run.program(DPC, init, seed_run.stage_set(DPC).size,
                                       cfg.batch_size, "batch_size").program
        if program.started:  # a seed before this one compiled it
            return
        stage, train_state = dpc_stage(seed_run, init, host(learner_state),
                                       dpc_scorer(seed_run, backbone, shape=True))
        args = first_call_args(train_state, stage.consts, seed_run.run.mesh, stage.global_batch,
                               seed_run.seed, DPC, cfg)
    except Exception as e:
        tqdm.write(f"seed {seed_run.seed}: config.compile_ahead skipped ({type(e).__name__}: "
                   f"{e}); stage 2 compiles on its first call")
        return
    program.start(args)


def run_dpc(seed_run: SeedRun, train: bool = True) -> dict:
    params, base_state, new_state = replicate(dpc_model(seed_run, train), seed_run.run.mesh)
    dual = seed_run.run.dual
    return seed_run.evaluate(dual.eval_prompt(params, "base"), dual.eval_prompt(params, "new"),
                       base_state, new_state=new_state)
