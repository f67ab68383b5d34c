"""Count XLA compilations of a whole run: `python benchmarks/compile_count.py CONFIG[:args]
WORKDIR [field=value ...]`, e.g.

    python benchmarks/compile_count.py configs/dpc_coop.py /tmp/cc seeds=1,2,3 \
        backbone.epochs=1 dpc.epochs=1

(epochs do not change what is compiled). Prints the total number of backend compilations and
the time spent compiling; compare seeds=1 with seeds=1,2,3 to see what each extra seed costs.
"""

import sys
import time

import jax
from jax import monitoring

COMPILES = []


def _listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES.append(duration)


def main(argv):
    if len(argv) < 3:
        raise SystemExit(__doc__)
    from ml_collections.config_flags import config_flags

    from dpc_jax.training import train_lib

    config = config_flags.ConfigFileFlagParser("config", lock_config=False).parse(argv[1])
    changes = {"progress": False}
    for item in argv[3:]:
        key, value = item.split("=", 1)
        current = config
        for part in key.split(".")[:-1]:
            current = current[part]
        old = current[key.split(".")[-1]]
        changes[key] = type(old)(value) if not isinstance(old, str) else value
    config.update_from_flattened_dict(changes)
    monitoring.register_event_duration_secs_listener(_listener)
    t0 = time.time()
    train_lib.train_and_evaluate(config, argv[2])
    print(f"backend compilations: {len(COMPILES)} ({sum(COMPILES):.1f} s compiling, "
          f"{time.time() - t0:.1f} s wall) seeds={config.seeds} jax {jax.__version__}")


if __name__ == "__main__":
    main(sys.argv)
