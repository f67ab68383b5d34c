"""Count XLA compilations of a whole run: `python benchmarks/compile_count.py CONFIG[:args]
WORKDIR [field=value ...]`, e.g.

    python benchmarks/compile_count.py configs/dpc_coop.py /tmp/cc seeds=1,2,3 \
        backbone.epochs=1 dpc.epochs=1 optim.warmup_epochs=0

(epochs do not change what is compiled). Prints how many functions were traced to jaxprs,
lowered to MLIR and compiled by XLA, with the time spent; compare seeds=1 with seeds=1,2,3 to
see what each extra seed costs. (JAX reuses an executable whose lowered module it has compiled
before, so a re-traced step shows up in the trace and lowering counts, not always in XLA's.)
"""

import sys
import time

import jax
from jax import monitoring

EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "traced",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowered",
          "/jax/core/compile/backend_compile_duration": "XLA-compiled"}
SEEN = {name: [] for name in EVENTS.values()}


def _listener(event, duration, **kwargs):
    if event in EVENTS:
        SEEN[EVENTS[event]].append(duration)


def config_from_argv(argv, doc: str):
    """The config of `SCRIPT CONFIG WORKDIR [field=value ...]` (progress off); also used by
    stage_speed.py. The persistent compilation cache is off unless a field=value sets
    compilation_cache (a warm cache would load programs instead of compiling them)."""
    if len(argv) < 3:
        raise SystemExit(doc)
    from ml_collections.config_flags import config_flags

    config = config_flags.ConfigFileFlagParser("config", lock_config=False).parse(argv[1])
    changes = {"progress": False}
    if "compilation_cache" in config:  # not in configs older than the field
        changes["compilation_cache"] = ""
    for item in argv[3:]:
        key, value = item.split("=", 1)
        current = config
        for part in key.split(".")[:-1]:
            current = current[part]
        old = current[key.split(".")[-1]]
        if isinstance(old, bool):
            if value not in ("True", "False"):
                raise SystemExit(f"{key}={value!r}: expected True or False")
            changes[key] = value == "True"
        else:
            changes[key] = type(old)(value) if not isinstance(old, str) else value
    config.update_from_flattened_dict(changes)
    return config


def main(argv):
    from dpc_jax.training import train_lib

    config = config_from_argv(argv, __doc__)
    monitoring.register_event_duration_secs_listener(_listener)
    t0 = time.time()
    train_lib.train_and_evaluate(config, argv[2])
    counts = ", ".join(f"{name} {len(d)} ({sum(d):.1f} s)" for name, d in SEEN.items())
    print(f"seeds={config.seeds}: {counts}; {time.time() - t0:.1f} s wall; jax {jax.__version__}")


if __name__ == "__main__":
    main(sys.argv)
