"""Training steps per second of each stage of a whole run: `python benchmarks/stage_speed.py
CONFIG[:args] WORKDIR [field=value ...]`, e.g.

    python benchmarks/stage_speed.py configs/dpc_coop.py /tmp/speed seeds=1,2

trains the run (WORKDIR should be new: a finished stage is not retrained) and prints, for every
seed and trained stage, its steps, the wall seconds of its loop (the last record of its
log.jsonl: from its first step to its last, compilation included) and steps per second. Seed 1
compiles the stage's program; later seeds reuse it (the steps are built once per run), so
their figure is the training alone. The persistent compilation cache is off unless
`compilation_cache=DIR` is given: run twice with the same DIR to time a rerun whose programs
load from the cache.
"""

import json
import os
import sys

import jax


def stage_rates(workdir: str) -> list:
    """(seed, stage, steps, seconds) of every stage log under `workdir`."""
    rows = []
    for seed_dir in sorted(d for d in os.listdir(workdir) if d.startswith("seed_")):
        for stage in ("teacher/backbone", "backbone", "dpc"):
            path = os.path.join(workdir, seed_dir, stage, "log.jsonl")
            if os.path.isfile(path):
                with open(path) as f:
                    last = [json.loads(line) for line in f][-1]
                rows.append((seed_dir[5:], stage, last["step"], last["seconds"]))
    return rows


def main(argv):
    from compile_count import config_from_argv  # this folder is on sys.path for a script

    from dpc_jax.training import train_lib

    config = config_from_argv(argv, __doc__)
    train_lib.train_and_evaluate(config, argv[2])
    print(f"steps_per_call={config.get('steps_per_call', 1)}, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}")
    print("seed  stage     steps  seconds  steps/s")
    for seed, stage, steps, seconds in stage_rates(argv[2]):
        print(f"{seed:>4}  {stage:<8} {steps:>6} {seconds:>8.1f} {steps / seconds:>8.1f}")


if __name__ == "__main__":
    main(sys.argv)
