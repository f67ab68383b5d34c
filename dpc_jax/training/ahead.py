"""Compiling a stage's program ahead, in a background thread, while an earlier stage trains.

A stage's stretch of steps (`step.map_steps`) compiles on its first call: on the embedded world
the DPC stage's program takes 3-6 s to compile on a 2-core CPU, about a third of the stage, and
on an accelerator a ViT-B/16 step takes tens of seconds while the host sits idle during stage 1.
`config.compile_ahead` lets stage 1's training hide it: the trainer builds stand-in arguments
of stage 2's first call (the same shapes, dtypes and shardings, from stage 1's initial prompt;
`stages.SeedRun.compile_dpc_ahead`) and an `AheadProgram` lowers and compiles the program with
them in a thread (XLA releases the GIL while it compiles). The first real call waits for that
compilation if it is still running and runs the compiled executable, so the numbers are those of
the jitted function: it is the same program. Arguments that do not match the stand-ins (an
executable refuses them before running, so nothing is donated) or a compilation that failed
fall back to the jitted function, which compiles on that call (and raises a real error itself).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional


class AheadProgram:
    """A jitted function (`jax.jit` result) that may be compiled ahead from stand-in arguments.

    `source` says what served the calls so far: None (not called), 'ahead' (the executable
    compiled in the background) or 'jit' (the jitted function: no ahead compilation, or its
    arguments did not match)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.source: Optional[str] = None
        self.error: Optional[BaseException] = None  # why the ahead compilation failed
        self._thread: Optional[threading.Thread] = None
        self._compiled: Any = None
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    def start(self, args: tuple) -> None:
        """Lower and compile `self.fn` for `args` (arrays or `jax.ShapeDtypeStruct`s, as the
        first real call will pass them) in a background thread; once per program."""
        if self._started:
            return
        self._started = True

        def compile_():
            try:
                self._compiled = self.fn.lower(*args).compile()
            except Exception as e:  # surfaced by the fallback's own compilation, if real
                self.error = e

        # Not a daemon: an interpreter exiting (e.g. after stage 1 failed) waits for the
        # compiler instead of tearing it down mid-compilation.
        self._thread = threading.Thread(target=compile_, name="dpc_jax-compile-ahead")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __call__(self, *args):
        self.wait()
        if self._compiled is not None:
            try:
                out = self._compiled(*args)
            except (TypeError, ValueError):  # other avals or shardings: checked before running
                self._compiled = None
            else:
                self.source = "ahead"
                return out
        self.source = "jit"
        return self.fn(*args)

    def lower(self, *args, **kwargs):
        return self.fn.lower(*args, **kwargs)
