"""A stage directory: its settings check, Orbax checkpoints, `stage.json`, atomic JSON files.

    W/seed_N/<stage>/settings.json   the config fields that decide what the stage computes
    W/seed_N/<stage>/checkpoints/    Orbax items: params, opt_state, and `aux` = {state, extra}
                                     (the learner's mutable state and epoch-hook carry) if any
    W/seed_N/<stage>/stage.json      written last: the stage finished (final step, batch, ...)

Checkpoints hold the prompt parameters and the optimiser state, never the CLIP.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from typing import Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dpc_jax.files import write_json

# Config fields that decide what a stage computes; a workdir resumed with other values is refused.
STAGE_FIELDS = {
    1: ("dataset", "root", "source", "shots", "stored_size", "crop_scale", "clip",
        "backbone", "optim"),
    2: ("dataset", "root", "source", "shots", "stored_size", "crop_scale", "clip",
        "backbone", "optim", "batch_size", "dpc", "dhno"),
}


def sync_processes(name: str) -> None:
    """Wait until every process of a multi-host run has reached this point (e.g. process 0
    has written a file the others read next)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def has_leaves(tree) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


# A write that fails for lack of room: a full disk, a quota, a file-size limit.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class _OrbaxThreadReports(logging.Filter):
    """Drops Orbax's log record of an exception in one of its save threads: Orbax raises the
    same exception again in the thread that called `save` (where we report it once), and
    each thread's record carries a whole traceback (a full disk gave ~200 lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.replace(os.sep, "/").endswith("orbax/checkpoint/_src/"
                                                                  "futures/future.py")
                    and record.levelno >= logging.ERROR and record.exc_info is not None)


def _quiet_orbax_threads() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxThreadReports) for f in logger.filters):
        logger.addFilter(_OrbaxThreadReports())


def _quiet_closed_loop_reports() -> None:
    """When a save fails, tensorstore still completes the writes Orbax had started and
    reports each to the event loop Orbax has closed meanwhile; each such 'Event loop is
    closed' RuntimeError (raised inside asyncio's call_soon_threadsafe) reaches Python's
    sys.unraisablehook, which prints its traceback. Those are echoes of the failure the
    save raises: leave them out, and nothing else."""
    previous = sys.unraisablehook
    if getattr(previous, "_dpc_jax_quiet", False):
        return

    def hook(unraisable):
        tb, value = unraisable.exc_traceback, unraisable.exc_value
        if (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
                and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"):
            return
        previous(unraisable)

    hook._dpc_jax_quiet = True
    sys.unraisablehook = hook


def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
    _quiet_orbax_threads()
    _quiet_closed_loop_reports()
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("params", "opt_state", "aux"))


def read_stage_meta(stage_dir: str) -> Optional[dict]:
    path = os.path.join(stage_dir, "stage.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def stage_settings(stage_id: int, config) -> dict:
    """The settings a stage trains with, flat and as stored in its settings.json."""
    flat = {}
    for field in STAGE_FIELDS[stage_id]:
        value = config[field]
        if isinstance(value, ml_collections.ConfigDict):
            flat.update({f"{field}.{k}": v for k, v in value.to_dict().items()})
        else:
            flat[field] = value
    # Weights that act only at evaluation may change between runs (the w_b / w_n ablation).
    flat.pop("dpc.w_new", None)
    # An imported stage 2 (config.dpc.init_from) never trains in a stage directory.
    flat.pop("dpc.init_from", None)
    # Which prompt transfer targets get acts only at evaluation.
    flat.pop("dpc.transfer_prompt", None)
    # Memory only (the same numbers up to rounding): a stage may resume with another chunk.
    flat.pop("clip.text_chunk", None)
    # Work only, likewise: how the stage-2 step's last partial chunk of rows runs.
    flat.pop("dpc.chunk_tail", None)
    # Protocols other than base_to_new train on all classes of the source (the same training
    # for few_shot, cross_dataset and domain_generalisation); base_to_new on the base half.
    # (Absent for base_to_new: its training classes are the default.)
    if config.get("protocol", "base_to_new") != "base_to_new":
        flat["train_classes"] = "all"
    if stage_id == 2 and config.dpc.mode == "paper":
        flat.pop("dpc.w_base", None)
    flat["devices"] = jax.device_count()  # the global batch and epoch length depend on it
    return json.loads(json.dumps(flat, default=str))  # tuples -> lists, as stored


def compare_stage_settings(stage_dir: str, stage_id: int, config) -> bool:
    """Refuse (ValueError naming every changed field) when `stage_dir` was trained with
    other settings than `config`'s; writes nothing. True when it holds a settings.json."""
    path = os.path.join(stage_dir, "settings.json")
    if not os.path.isfile(path):
        return False
    flat = stage_settings(stage_id, config)
    with open(path) as f:
        stored = json.load(f)
    changed = sorted(k for k in set(stored) | set(flat) if stored.get(k) != flat.get(k))
    if changed:
        raise ValueError(
            f"{stage_dir} was trained with other settings; changed: "
            + ", ".join(f"config.{k} {stored.get(k)!r} -> {flat.get(k)!r}" for k in changed)
            + ". Use a new --workdir (or restore the old values to resume or re-evaluate).")
    return True


def check_stage_settings(stage_dir: str, stage_id: int, config) -> None:
    """Record the settings a stage trains with; refuse to resume it with different ones."""
    if compare_stage_settings(stage_dir, stage_id, config):
        return
    os.makedirs(stage_dir, exist_ok=True)
    write_json(os.path.join(stage_dir, "settings.json"), stage_settings(stage_id, config),
               sort_keys=True)


def nonfinite_leaves(tree) -> list:
    """'/'-joined paths of the floating-point leaves of `tree` holding a NaN or an inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(jax.device_get(leaf))
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            bad.append("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path))
    return bad


LOCK_FILE = ".lock"


class WorkdirLock:
    """An exclusive lock on a workdir (`W/.lock`, fcntl.flock), held by process 0 while it
    trains or evaluates, so that two runs never train the same stages into one workdir and
    interleave their logs. The kernel releases a flock when its process dies (also by
    SIGKILL), so a stale lock of a dead process is taken over without a word; the file holds
    the holder's pid, host and start time for the message a second run gets. The holder
    removes the file when it leaves (still holding the lock, so a run that opened the file
    meanwhile sees it gone once it gets the lock, and tries again)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def __enter__(self):
        import fcntl
        import socket
        import time

        if jax.process_index() != 0:
            return self
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise ValueError(
                    f"{os.path.dirname(self.path)} is in use by {holder}: two runs in one "
                    f"workdir would train the same stages twice and interleave their logs. "
                    f"Wait for it to finish, or use another --workdir") from None
            if self._is_current(f):
                break
            f.close()  # its holder removed it after we opened it: lock the new one
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def _is_current(self, f) -> bool:
        """Whether `f` is still the file at self.path (not removed or replaced)."""
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(f.fileno())
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def __exit__(self, *exc):
        if self._file is not None:
            import fcntl

            try:
                os.remove(self.path)  # while still holding it (see the class docstring)
            except FileNotFoundError:
                pass
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        return False


def _no_room(error: BaseException) -> Optional[int]:
    """The errno of a failed write for lack of room in `error` or what caused it, else None
    (tensorstore reports it as a ValueError 'RESOURCE_EXHAUSTED' or with the OS's text)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_ROOM:
            return error.errno
        text = str(error)
        if "RESOURCE_EXHAUSTED" in text or os.strerror(errno.ENOSPC) in text:
            return errno.ENOSPC
        if os.strerror(errno.EFBIG) in text:
            return errno.EFBIG
        error = error.__cause__ or error.__context__
    return None


def _check_readable(path: str, top: bool = False) -> None:
    """Raise PermissionError naming the first file or folder under `path` (only `path`
    itself with `top`) that this user cannot read."""
    def refuse(error: OSError):
        raise PermissionError(errno.EACCES, f"permission denied: this user cannot read this "
                              f"part of a checkpoint (it is not damaged and nothing was "
                              f"moved); give it read permission (chmod -R u+rwX "
                              f"{os.path.dirname(os.path.abspath(path)) if not top else path})"
                              f" or run as its owner", error.filename or path) from None

    if not os.path.isdir(path):
        return
    try:
        if top:
            os.listdir(path)
            return
        for folder, _, files in os.walk(path, onerror=refuse):
            for name in files:
                with open(os.path.join(folder, name), "rb"):
                    pass
    except PermissionError as e:
        refuse(e)


class StageDir:
    """One training stage's directory (see the module docstring)."""

    def __init__(self, path: str, stage_id: int, config):
        self.path, self.stage_id, self.config = path, stage_id, config
        self._mngr = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._mngr is None:
            self._mngr = checkpoint_manager(os.path.join(self.path, "checkpoints"))
        return self._mngr

    def check_settings(self) -> None:
        check_stage_settings(self.path, self.stage_id, self.config)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, train_state: dict) -> None:
        """train_state: {'params', 'opt_state', 'aux'} (aux saved only if it has leaves)."""
        items = {k: ocp.args.StandardSave(host(train_state[k])) for k in ("params", "opt_state")}
        if has_leaves(train_state["aux"]):
            items["aux"] = ocp.args.StandardSave(host(train_state["aux"]))
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # orbax/tensorstore report a full disk as several kinds
            room = _no_room(e)
            if room is None:
                raise
            kept = [s for s in self.manager.all_steps() if s != step]
            before = f"steps {sorted(kept)} are kept" if kept else "none was saved before"
            fix = ("raise the file-size limit (ulimit -f)" if room == errno.EFBIG
                   else "make room on that disk")
            raise OSError(room, f"{os.strerror(room)} while saving checkpoint step {step} "
                          f"(not kept; {before}); {fix} and rerun the same command to "
                          f"resume",
                          os.path.join(self.path, "checkpoints")) from None

    def restore_latest(self, like: dict) -> tuple:
        """(step, items) of the newest checkpoint that restores and holds finite values, or
        (None, None) when there is none. A damaged one (truncated data, broken metadata,
        non-finite values) is moved to `<stage>/damaged_checkpoints/<step>` with a warning
        naming it, and the previous one is used; when every checkpoint is damaged, a
        ValueError names the directory and what to delete."""
        _check_readable(os.path.join(self.path, "checkpoints"), top=True)
        steps = sorted(self.manager.all_steps(), reverse=True)
        problems, damaged = [], []
        for step in steps:
            # A checkpoint this user cannot read is not damaged: say so, and move nothing.
            _check_readable(os.path.join(self.path, "checkpoints", str(step)))
            try:
                restored = self.restore(step, like)
                bad = nonfinite_leaves(restored)
                if bad:
                    raise ValueError(f"non-finite values in {bad}")
            except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
                line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                problems.append(f"step {step}: {type(e).__name__}: {line}")
                damaged.append(step)
                continue
            if damaged:
                self._set_aside(damaged, problems)
            return step, restored
        if problems:
            raise ValueError(
                f"every checkpoint in {os.path.join(self.path, 'checkpoints')} is damaged ("
                + "; ".join(problems) + f"). Delete {self.path} to train this stage again from "
                f"its start (the other stages' directories are unaffected)")
        return None, None

    def _set_aside(self, steps, problems) -> None:
        import shutil

        target = os.path.join(self.path, "damaged_checkpoints")
        os.makedirs(target, exist_ok=True)
        for step in steps:
            source = os.path.join(self.path, "checkpoints", str(step))
            if os.path.isdir(source):
                shutil.move(source, os.path.join(target, str(step)))
        self.manager.close()
        self._mngr = None  # re-read the remaining steps
        print(f"warning: {self.path}: damaged checkpoint(s) {steps} moved to {target} ("
              + "; ".join(problems) + "); resuming from the previous one", file=sys.stderr,
              flush=True)

    def restore(self, step: int, like: dict, items=("params", "opt_state", "aux")) -> dict:
        """The items of checkpoint `step`, shaped like `like`; an empty `aux` is not stored."""
        wanted = [k for k in items if k != "aux" or has_leaves(like["aux"])]
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{k: ocp.args.StandardRestore(host(like[k])) for k in wanted}))
        out = {k: restored[k] for k in wanted}
        if "aux" in items and "aux" not in out:
            out["aux"] = like["aux"]
        return out

    def finish(self, meta: dict) -> None:
        """Write stage.json; a rerun of a finished stage keeps the fields it does not
        recompute (e.g. the global batch and device count of the run that trained it)."""
        write_json(os.path.join(self.path, "stage.json"), {**(read_stage_meta(self.path) or {}),
                                                           **meta})
        sync_processes(f"{self.path}/stage.json")  # the next stage may read it on any process

    def final(self, like: dict) -> dict:
        """{'params', 'aux'} at the end of the finished stage (stage 2's P; the eval mode)."""
        if os.path.isfile(os.path.join(self.path, "settings.json")):
            self.check_settings()
        meta = read_stage_meta(self.path)
        if meta is None:
            raise FileNotFoundError(
                f"no finished stage in {self.path!r} (expected stage.json, written at the end "
                f"of training): run that stage first, or for stage 2 set "
                f"config.backbone.init_from")
        step = meta["final_step"]
        _check_readable(os.path.join(self.path, "checkpoints"), top=True)
        if step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"checkpoint step {step} named in {self.path}/stage.json is missing from "
                f"{self.path}/checkpoints (found {self.manager.all_steps()})")
        _check_readable(os.path.join(self.path, "checkpoints", str(step)))
        return self.restore(step, like, items=("params", "aux"))
