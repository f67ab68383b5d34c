"""JAX's persistent compilation cache for training runs (`config.compilation_cache`).

A run compiles each program once (`run.Run` builds the stage programs once for all seeds); with the
cache, a later run of the same shapes on the same machine (a rerun, a resumed run, the next
config of a grid, the notebooks) loads the compiled programs from disk instead of compiling
them again. The world's DPC stage spends about half of its wall time compiling on a 2-core
CPU (docs/benchmarks.md), and a ViT-B/16 step takes tens of seconds to compile.

Cache entries are native executables for the machine that compiled them. XLA:CPU runs an entry
built for another CPU after only logging "Target machine feature ... is not supported", so on a
home directory shared by a cluster, nodes with different processors must not share entries:
the default directory is split by a machine key (the platform, device kind and, for CPUs, the
processor model and feature flags). A directory the caller set already (the environment
variable JAX_COMPILATION_CACHE_DIR, `jax.config.update('jax_compilation_cache_dir', ...)`, as
the test suite does) is kept as it is. The cache is trusted code: do not point it at a directory
others can write to (JAX's documentation says the same).
"""

from __future__ import annotations

import hashlib
import os
import platform
from typing import Optional

import jax

def machine_key() -> str:
    """A short name for this machine's compile target: platform and device kind, plus a hash
    of the processor model and feature flags (from /proc/cpuinfo where there is one)."""
    device = jax.devices()[0]
    cpu = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        cpu += "".join(sorted(set(lines)))
    except OSError:
        pass
    digest = hashlib.sha256(cpu.encode()).hexdigest()[:12]
    kind = "".join(ch if ch.isalnum() else "-" for ch in str(device.device_kind)).strip("-")
    return f"{device.platform}-{kind.lower()}-{digest}"


def enable(directory: str) -> Optional[str]:
    """Turn on JAX's persistent compilation cache under `directory` (`config.compilation_cache`;
    '~' expanded), in the subfolder `machine_key()`, unless a cache directory is set already;
    '' leaves JAX's setting alone. Returns the directory in use (None: no cache)."""
    if not isinstance(directory, str):
        raise ValueError(f"config.compilation_cache={directory!r}; expected a directory path "
                         f"or '' (no persistent compilation cache)")
    current = jax.config.jax_compilation_cache_dir
    if current or not directory.strip():
        return current or None
    path = os.path.join(os.path.expanduser(directory.strip()), machine_key())
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"config.compilation_cache={directory!r}: cannot create {path!r} "
                         f"({e.strerror}); give a writable directory, or '' for no persistent "
                         f"compilation cache") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"config.compilation_cache={directory!r}: {path!r} is not writable; "
                         f"give a writable directory, or '' for no persistent compilation cache")
    jax.config.update("jax_compilation_cache_dir", path)
    return path
