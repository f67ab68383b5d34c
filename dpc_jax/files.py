"""Files a run writes for others to read (results, settings, split files): written whole or not
at all, by one process."""

from __future__ import annotations

import json
import os

import jax


def write_json(path: str, obj, **kw) -> None:
    """Write `obj` as JSON atomically (a temporary file renamed over `path`); process 0 only."""
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, **kw)
    try:
        os.replace(tmp, path)
    except OSError as e:  # name the file that could not be replaced, not the temporary one
        os.remove(tmp)
        raise type(e)(e.errno, f"{e.strerror} (this file cannot be replaced: is it "
                      f"read-only?)", path) from None
