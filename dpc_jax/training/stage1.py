"""Stage 1: the learner's prompt P trained on the base classes (or restored, or read from a
PyTorch checkpoint), with optional model selection of its epoch."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from dpc_jax.mesh import replicate
from dpc_jax.prompts import capabilities
from dpc_jax.training.checkpoints import host
from dpc_jax.training.loop import SELECTION
from dpc_jax.training.run import BACKBONE
from dpc_jax.training.seed import SeedRun

# Stage-1 model selection: the last epoch; the best base TEST accuracy (released code selects
# so; reproduction only: it selects on test data); the best base validation accuracy.
SELECTIONS = ("last", "best_base_test", "best_base_val")


def stage1_prompt(seed_run: SeedRun, train: bool):
    """Stage 1's tuned prompt P and the learner's state: trained here, restored, or read from
    a PyTorch checkpoint (`config.backbone.init_from`)."""
    cfg, learner = seed_run.run.config, seed_run.run.learner
    clip_params = seed_run.run.clip_params
    init_state = host(capabilities.init_state(learner, clip_params))
    if cfg.backbone.init_from:
        prompt, state = capabilities.torch_format(learner).load_torch_backbone(
            cfg.backbone.init_from, seed_run.base.num_classes)
        return prompt, init_state if state is None else host(state)
    init = host(learner.init(jax.random.fold_in(jax.random.key(seed_run.seed), 101), clip_params,
                             seed_run.base.num_classes))
    extra = host(capabilities.epoch_hooks(learner).init_extra(init))
    selection = model_selection(cfg)
    if selection != "last":
        extra[SELECTION] = {"accuracy": np.asarray(-1, np.float32),
                            "epoch": np.asarray(0, np.int32), "params": init,
                            "state": init_state}
    if not train:
        final = seed_run.stage_dir(BACKBONE).final({"params": init,
                                              "aux": {"state": init_state, "extra": extra}})
        return _selected(seed_run, learner, final["params"], final["aux"]["state"],
                         final["aux"]["extra"])
    if seed_run.before_stage1 is not None:
        seed_run.before_stage1(seed_run, init, init_state, extra)
    stage, train_state = seed_run.stage(
        BACKBONE, init, init_state, name=f"seed {seed_run.seed} backbone ({cfg.backbone.name})",
        batch_size=cfg.backbone.batch_size, batch_field="backbone.batch_size",
        epochs=cfg.backbone.epochs, epoch_hooks=capabilities.epoch_hooks(learner),
        epoch_hook=None if selection == "last" else selection_hook(seed_run, selection))
    out, extra = seed_run.train(stage, train_state, extra)
    return _selected(seed_run, learner, out["params"], out["state"], extra)


def model_selection(cfg) -> str:
    """`config.backbone.selection` ('last' when the learner's config has no such field)."""
    value = cfg.backbone.get("selection", "last")
    if value not in SELECTIONS:
        raise ValueError(f"config.backbone.selection={value!r}; expected one of {SELECTIONS} "
                         f"('best_base_test' reproduces released code that selects on test "
                         f"data)")
    return value


def selection_hook(seed_run: SeedRun, selection: str) -> Callable:
    """The epoch hook of stage-1 model selection: evaluate the epoch's prompt on the base
    test split (a released learner's choice) or the base validation split, and keep the
    best (the first on ties) in `extra['selection']`."""
    base, seed = seed_run.base, seed_run.seed
    split, key = ((base.test, f"seed {seed} base") if selection == "best_base_test"
                  else (base.val, f"seed {seed} base val"))
    learner, mesh = seed_run.run.learner, seed_run.run.mesh

    def hook(epoch: int, current: dict, extra: dict) -> dict:
        prompt, state = replicate((current["params"], current["state"]), mesh)
        acc = seed_run.run.evaluator.accuracy(learner, split, prompt, seed_run.base_texts,
                                          f"{key} (epoch {epoch + 1})", state, seed_run.consts)
        best = extra[SELECTION]
        if acc > float(best["accuracy"]):
            best = {"accuracy": np.asarray(acc, np.float32),
                    "epoch": np.asarray(epoch + 1, np.int32),
                    "params": current["params"], "state": current["state"]}
        return {**extra, SELECTION: best}

    return hook


def _selected(seed_run: SeedRun, learner, params, state, extra):
    """Stage 1's P and state: the selected epoch's (model selection), else the learner's
    `final_prompt` of the last parameters."""
    if SELECTION in extra:
        best = extra[SELECTION]
        tqdm.write(f"seed {seed_run.seed} backbone: selected epoch {int(best['epoch'])} "
                   f"(base accuracy {float(best['accuracy']):.2f} on the selection split)")
        return best["params"], best["state"]
    return capabilities.epoch_hooks(learner).final_prompt(params, extra), state


def run_backbone(seed_run: SeedRun, train: bool = True) -> dict:
    prompt, learner_state = stage1_prompt(seed_run, train)
    prompt, learner_state = replicate((prompt, learner_state), seed_run.run.mesh)
    return seed_run.evaluate(prompt, prompt, learner_state)
