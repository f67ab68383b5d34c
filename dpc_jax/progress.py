"""Progress bars that suit where the output goes.

On a terminal, a tqdm bar. Anywhere else (a log file, a job scheduler's output, a notebook's
captured stderr) tqdm would write every refresh as another carriage-returned line, so the log
fills with bars; there `progress_bar` prints one plain line at most every `interval` seconds
(and one at the end): `train seed 1 backbone: 240/640 (38%) 76 s, 3.2 it/s, loss=0.8159`.

    bar = progress_bar(total=640, desc="backbone", initial=0, enabled=config.progress)
    bar.update(1); bar.set_postfix(loss="0.81"); bar.close()
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Optional, TextIO

LINE_INTERVAL_S = 30.0


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """tqdm's update / set_postfix / close / iteration, as a line every `interval` seconds."""

    def __init__(self, total: Optional[int], desc: str = "", initial: int = 0,
                 unit: str = "it", stream: Optional[TextIO] = None,
                 interval: float = LINE_INTERVAL_S, iterable: Optional[Iterable] = None):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.stream = stream or sys.stderr
        self.interval, self.iterable = interval, iterable
        self.postfix = ""
        self._start_n, self._t0 = initial, time.time()
        self._last = self._t0
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if now - self._last >= self.interval:
            self._last = now
            self._write(now)

    def _write(self, now: float) -> None:
        elapsed = now - self._t0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}{pct} {elapsed:.0f} s, {rate:.3g} {self.unit}/s{tail}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n > self._start_n:
                self._write(time.time())


class _Off:
    """A disabled bar (`enabled=False`): counts, prints nothing."""

    def __init__(self, iterable=None):
        self.iterable, self.n = iterable, 0

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def _on_process_zero() -> bool:
    """Only process 0 of a multi-host run shows progress (one bar per job, not per host).
    Asked of `jax.distributed` only, so that a bar never starts a JAX backend (the data
    tools run without one)."""
    jax = sys.modules.get("jax")
    return jax is None or not jax.distributed.is_initialized() or jax.process_index() == 0


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
                 desc: str = "", initial: int = 0, unit: str = "it", enabled: bool = True,
                 leave: bool = True, stream: Optional[TextIO] = None, **tqdm_kwargs):
    """A tqdm bar on a terminal, a `LineProgress` elsewhere, nothing when not `enabled` or
    on a process other than 0."""
    stream = stream or sys.stderr
    if not enabled or not _on_process_zero():
        return _Off(iterable)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not is_terminal(stream):
        return LineProgress(total, desc, initial, unit, stream, iterable=iterable)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit, leave=leave,
                file=stream, dynamic_ncols=True, **tqdm_kwargs)
