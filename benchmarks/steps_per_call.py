"""The world's stage-2 (DPC) step called once per step versus in stretches of S steps per call:

    python benchmarks/steps_per_call.py [--stretch 64] [--steps 128] [--rounds 5]

builds the default world run's DPC step (configs/dpc_coop.py, seed 1, an untrained stage-1
prompt: the step's cost does not depend on its values) the way the trainer does (`Run.step`:
`step.map_steps` of `step.map_step`), compiles each way once, then times rounds of `--steps`
steps of each way alternately, so that all ways share the machine's load, and prints XLA's FLOP
count of the step, the median steps per second (wall) of each way and its first round's time
(compiling included): 'per step' is one `map_step` call per step with the host's
`fold_in` key and loss read, as the loop ran before stretches; 'S=1' and 'S=N' are
`map_steps` calls of 1 and N steps (the loop's `config.steps_per_call`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

from dpc_jax.mesh import replicate, shard_batch
from dpc_jax.prompts import capabilities
from dpc_jax.training import checkpoints, objectives, train_lib
from dpc_jax.training.run import DPC
from dpc_jax.training.seed import SeedRun
from dpc_jax.training.step import make_per_device_step, map_step


def build(seed: int = 1):
    """(per-step fn, stretch fn, state, consts, key, n, batch) of the world's DPC stage."""
    cfg = train_lib.load_config("configs/dpc_coop.py")
    cfg.progress = False
    run = train_lib._build_run(cfg)
    sr = SeedRun.create(run, seed, tempfile.mkdtemp(), train_mode=False)
    learner, clip_params = run.learner, run.clip_params
    prompt = checkpoints.host(learner.init(jax.random.key(seed), clip_params,
                                           sr.base.num_classes))
    lstate = checkpoints.host(capabilities.init_state(learner, clip_params))
    dual = capabilities.dual(learner)
    backbone = checkpoints.host(dual.dpc_backbone(prompt, sr.consts))
    params = dual.dpc_init(run.dual.init(backbone), cfg.dpc, jax.random.key(seed + 1))
    scorer = run.evaluator.classifier(
        learner, replicate(dual.scorer_prompt(backbone, cfg.dpc, sr.consts), run.mesh),
        sr.base_texts, sr.consts)
    n = sr.stage_set(DPC).size
    program = run.program(DPC, params, n, cfg.batch_size, "batch_size")
    steps_fn, optimizer, mask = program.program, program.optimizer, program.mask
    objective = objectives.dpc_objective(learner, run.dual, run.res, cfg.dhno.top_k,
                                         cfg.dhno.policy, tuple(cfg.crop_scale))
    step_fn = map_step(make_per_device_step(objective, optimizer, mask), run.mesh)
    consts = {**sr.train_consts(DPC), "scorer": replicate(scorer, run.mesh)}
    state = checkpoints.host({"params": params, "opt_state": optimizer.init(params),
                              "state": lstate})
    return step_fn, steps_fn, state, consts, run.mesh, n, cfg.batch_size * run.mesh.size


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stretch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=128, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    step_fn, steps_fn, state0, consts, mesh, n, batch = build()
    key = jax.random.key(0)
    rng = np.random.default_rng(0)

    def per_step(state):
        for s in range(args.steps):
            index = shard_batch(rng.integers(0, n, batch).astype(np.int32), mesh)
            state, loss, _ = step_fn(state, consts, {"index": index}, jax.random.fold_in(key, s))
            np.asarray(loss)
        return state

    def stretches(size):
        def calls(state):
            for s in range(0, args.steps, size):
                count = min(size, args.steps - s)
                index = shard_batch(rng.integers(0, n, (batch, size)).astype(np.int32), mesh)
                state, losses, metrics = steps_fn(state, consts, {"index": index}, key,
                                                  np.int32(s), np.int32(count))
                np.asarray(losses), jax.device_get(metrics)
            return state
        return calls

    ways = {"per step": per_step, "S=1": stretches(1),
            f"S={args.stretch}": stretches(args.stretch)}
    compile_seconds = {}
    for name, fn in ways.items():  # the first round of each way compiles it
        t0 = time.perf_counter()
        jax.block_until_ready(fn(replicate(state0, mesh)))
        compile_seconds[name] = time.perf_counter() - t0
    index = shard_batch(np.zeros(batch, np.int32), mesh)
    cost = step_fn.lower(replicate(state0, mesh), consts, {"index": index},
                         key).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: a list
    rates = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            state = replicate(state0, mesh)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state))
            rates[name].append(args.steps / (time.perf_counter() - t0))
    print(f"world DPC step, {args.rounds} rounds of {args.steps} steps, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}; XLA counts {cost.get('flops', 0.0) / 1e9:.2f} GFLOP "
          f"per step")
    for name, r in rates.items():
        print(f"{name:>8}: {statistics.median(r):6.1f} steps/s (rounds: "
              f"{', '.join(f'{x:.1f}' for x in r)}); first round, compiling included, "
              f"{compile_seconds[name]:.1f} s")


if __name__ == "__main__":
    main()
