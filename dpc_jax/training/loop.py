"""The epoch loop of one training stage: epoch order, batches (a stretch of steps per device
call), metric log, non-finite guard, epoch hooks, checkpoints and resume.

Per-step keys are `fold_in(key, step)` and the epoch order depends only on (seed, stage,
epoch), so a resumed run computes exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from dpc_jax.mesh import replicate, shard_batch
from dpc_jax.progress import progress_bar
from dpc_jax.training import checkpoints
from dpc_jax.training.checkpoints import nonfinite_leaves

SELECTION = "selection"  # the `extra` entry of the trainer's model selection (not a learner's)


def epoch_order(seed: int, stage_id: int, epoch: int, n: int) -> np.ndarray:
    """Dassl's RandomSampler order for one epoch, a pure function of (seed, stage, epoch)."""
    return np.random.default_rng([seed, stage_id, epoch]).permutation(n)


def check_batch_fits(field: str, batch_size: int, devices: int, n: int, dataset: str,
                     shots: int) -> None:
    """The global batch (per-device B x devices) must fit in the few-shot set (drop_last)."""
    if batch_size * devices > n:
        raise ValueError(
            f"config.{field}={batch_size} x {devices} device(s) = {batch_size * devices} "
            f"anchors per step exceeds the few-shot training set of {dataset} ({n} images at "
            f"{shots} shots); lower the batch size or use more shots")


def steps_per_epoch(n: int, batch_size: int, devices: int) -> int:
    """Dassl's sampler drops the last incomplete batch (`check_batch_fits` leaves at least one)."""
    return n // (batch_size * devices)


class MetricLog:
    """One JSON line per logged step (log.jsonl) and TensorBoard events (tensorboardX)."""

    def __init__(self, directory: str, resume_step: int = 0):
        self.file = self.writer = None
        if jax.process_index() != 0:
            return
        path = os.path.join(directory, "log.jsonl")
        if os.path.isfile(path):  # drop lines of steps after the checkpoint being resumed
            with open(path) as f:
                keep = [line for line in f if json.loads(line)["step"] <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        self.file = open(path, "a")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(directory, "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def check_finite_state(device_state: dict, name: str, step: int, seed: int,
                       last_saved: Optional[int]) -> None:
    """Raise FloatingPointError when the parameters or optimiser state after step `step` are
    not finite (the loss of that step was computed before its update, so it cannot tell)."""
    bad = nonfinite_leaves({"params": device_state["params"],
                            "opt_state": device_state["opt_state"]})
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        kept = (f"the latest checkpoint is step {last_saved}" if last_saved is not None
                else "no checkpoint of this stage was saved yet")
        again = ("resume from that checkpoint" if last_saved is not None
                 else "train the stage from its start")
        raise FloatingPointError(
            f"{name}: non-finite values after the update of step {step} (seed {seed}) in "
            f"{shown}; not saved: {kept}. Lower the learning rate or check the data, then rerun "
            f"to {again}")


def stage_key(seed: int, stage_id: int):
    """The stage's base key (step s of the stage takes `fold_in` of it with s)."""
    return jax.random.fold_in(jax.random.key(seed), stage_id)


def stretch_capacity(config, stream) -> int:
    """Steps per device call: `config.steps_per_call`, one for a set streamed from the host."""
    return 1 if stream is not None else config.steps_per_call


def device_train_state(train_state: dict, mesh: Mesh):
    """The train state {'params', 'opt_state', 'state'} as the stretch function takes it."""
    return replicate({k: train_state[k] for k in ("params", "opt_state", "state")}, mesh)


def stretch_batch(index: np.ndarray, mesh: Mesh, images=None) -> dict:
    """One call's batch: the index columns [global batch, capacity] (and streamed images)."""
    batch = {"index": shard_batch(index, mesh)}
    if images is not None:
        batch["images"] = shard_batch(images, mesh)
    return batch


def first_call_args(train_state: dict, consts, mesh: Mesh, global_batch: int, seed: int,
                    stage_id: int, config) -> tuple:
    """Arguments of the kind `run_stage` passes its program (the same avals and
    shardings; placeholder batch and step values), for compiling the stage's program ahead of
    its loop (`ahead.AheadProgram`); sets streamed from the host are not covered."""
    capacity = stretch_capacity(config, None)
    return (device_train_state(train_state, mesh), consts,
            stretch_batch(np.zeros((global_batch, capacity), np.int32), mesh),
            stage_key(seed, stage_id), np.int32(0), np.int32(1))


def stretch_end(step: int, total: int, capacity: int, epoch_steps: int, checkpoint_every: int,
                at_epoch_ends: bool) -> int:
    """Where the call of the stretch that starts at `step` ends (exclusive): after at most
    `capacity` steps, and at the next checkpoint step, the stage's end and, when epoch hooks
    run, the epoch's end, since the host acts on the state there. Where the cuts fall does not
    change the numbers: every step is the same loop body with its own batch and key."""
    ends = [step + capacity, total, (step // checkpoint_every + 1) * checkpoint_every]
    if at_epoch_ends:
        ends.append((step // epoch_steps + 1) * epoch_steps)
    return min(ends)


@dataclasses.dataclass
class Stage:
    """One training stage as a value: everything `run_stage` needs to train or resume it.

    program: the stretch function (`step.map_steps`, often an `ahead.AheadProgram`): up to
      `config.steps_per_call` steps per call. schedule: step -> learning rate (logged).
    consts: the device constants every step reads. train_size: images in the training set
      (the epoch order permutes them); stream: a `data.train_sets.StreamSource` when the set is
      decoded on the host by index instead of held on device.
    epoch_hooks: `on_epoch_end` after every epoch (stage 1: the learner's
      `capabilities.epoch_hooks`); epoch_hook(epoch, {'params', 'state'}, extra) -> extra
      after it (model selection keeps its record under `extra[SELECTION]`).
    """

    name: str
    directory: checkpoints.StageDir
    program: Callable
    schedule: Callable
    consts: Any
    train_size: int
    global_batch: int
    epoch_steps: int
    epochs: int
    stream: Any = None
    epoch_hooks: Any = None
    epoch_hook: Optional[Callable] = None


class DeferredInterrupt:
    """Ctrl-C (SIGINT) while a stage trains stops it at the end of the current stretch of
    steps (after its checkpoint, if one is due) rather than wherever the signal lands: a
    KeyboardInterrupt inside TensorBoard's writer left its queue without the item its
    thread waits for, and closing the writer then waited forever. A second Ctrl-C
    interrupts at once. Only where Python's own handler is in place (the main thread of a
    command; a notebook kernel keeps its own)."""

    def __init__(self):
        self.pending, self._previous = False, None

    def start(self) -> None:
        import signal
        import threading

        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        import signal

        self.pending = True
        signal.signal(signal.SIGINT, self._previous)

    def check(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def stop(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def run_stage(stage: Stage, train_state: dict, extra: dict, *, seed: int, mesh: Mesh, config,
              hooks: Sequence[Callable] = ()):
    """Run (or resume) one training stage. `train_state` {'params', 'opt_state', 'state'} and
    `extra` (the epoch-hook carry) are host trees; returns their final values (host arrays).

    Stretches of steps end at checkpoint steps, at the stage's end and, with epoch hooks, at
    epoch ends (`stretch_end`). The log holds the same records as one call per step (lines of
    steps inside a stretch are written, with their 'seconds', when it returns). A streamed set
    decodes each step's images on the host in the same epoch order, one step per call (a
    stretch would hold S image batches on the host and device; a resumed run streams from its
    step on, so it computes the same numbers). Each hook in `hooks` is called as
    hook(name=..., step=..., start=..., total=...) after every step (those inside a stretch
    when it returns, the last one after its checkpoint), so that raising from one stops the
    run as if it were killed after that step, e.g. to test a resume.
    """
    name, steps_fn, schedule, consts = stage.name, stage.program, stage.schedule, stage.consts
    n, global_batch, stream = stage.train_size, stage.global_batch, stage.stream
    epoch_steps, epochs = stage.epoch_steps, stage.epochs
    epoch_hooks, epoch_hook = stage.epoch_hooks, stage.epoch_hook
    directory = stage.directory
    total = epochs * epoch_steps
    os.makedirs(directory.path, exist_ok=True)
    directory.check_settings()
    state = {**train_state, "aux": {"state": train_state["state"], "extra": extra}}
    start = 0
    latest, restored = directory.restore_latest(state)
    if latest is not None:
        state.update(restored)
        start = int(latest)
    params, opt_state = state["params"], state["opt_state"]
    learner_state, extra = state["aux"]["state"], state["aux"]["extra"]
    if start >= total:
        directory.finish({"final_step": total, "steps_per_epoch": epoch_steps})
        return {"params": params, "opt_state": opt_state, "state": learner_state}, extra
    device_state = device_train_state({"params": params, "opt_state": opt_state,
                                       "state": learner_state}, mesh)
    key = stage_key(seed, directory.stage_id)
    log = MetricLog(directory.path, resume_step=start)
    bar = progress_bar(total=total, initial=start, desc=name, enabled=config.progress)
    capacity = stretch_capacity(config, stream)
    at_epoch_ends = epoch_hooks is not None or epoch_hook is not None
    order, order_epoch = None, -1
    t0 = time.time()
    step = start
    interrupt = DeferredInterrupt()
    try:
        interrupt.start()
        while step < total:
            end = stretch_end(step, total, capacity, epoch_steps, config.checkpoint_every_steps,
                              at_epoch_ends)
            # The stretch's index batches, one column per step (the batch axis first, so that
            # it is placed as one step's batch); columns past its end are never read.
            index = np.zeros((global_batch, capacity), np.int32)
            for j, s in enumerate(range(step, end)):
                epoch, i = divmod(s, epoch_steps)
                if epoch != order_epoch:
                    order, order_epoch = epoch_order(seed, directory.stage_id, epoch, n), epoch
                    if stream is not None:  # this epoch's remaining batches, decoded ahead
                        images = stream.batches(
                            order[i * global_batch:epoch_steps * global_batch], global_batch)
                index[:, j] = order[i * global_batch:(i + 1) * global_batch]
            batch = stretch_batch(index, mesh,
                                  None if stream is None else next(images)[:, None])
            device_state, losses, aux = steps_fn(device_state, consts, batch, key,
                                                 np.int32(step), np.int32(end - step))
            losses = np.asarray(losses)[:end - step]
            aux = {k: np.asarray(v)[:end - step] for k, v in jax.device_get(aux).items()}
            bad = np.flatnonzero(~np.all(np.isfinite(losses), axis=1))
            if bad.size:
                s = step + int(bad[0])
                latest = directory.latest_step()
                saved = (f"nothing after step {latest} was saved" if latest is not None
                         else "no checkpoint of this stage was saved")
                raise FloatingPointError(
                    f"{name}: non-finite loss {losses[bad[0]].tolist()} at step {s + 1} (epoch "
                    f"{s // epoch_steps}, seed {seed}); {saved}")
            bar.update(end - step)
            for j, s in enumerate(range(step, end)):
                if (s + 1) % config.log_every_steps == 0 or s + 1 == total:
                    record = {"step": s + 1, "epoch": s // epoch_steps, "lr": float(schedule(s)),
                              "loss": float(losses[j].mean()),
                              "per_device_loss": losses[j].tolist(),
                              "seconds": round(time.time() - t0, 3)}
                    record.update({k: float(np.mean(v[j])) for k, v in aux.items()})
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            for s in range(step + 1, end):  # nothing is saved inside a stretch
                for hook in hooks:
                    hook(name=name, step=s, start=start, total=total)
            step, epoch = end, (end - 1) // epoch_steps
            if step % epoch_steps == 0 and at_epoch_ends:
                # A host copy: the device buffers are donated to the next call.
                current = checkpoints.host(device_state["params"])
                if epoch_hooks is not None:  # the learner's carry, without the trainer's entry
                    kept = {k: v for k, v in extra.items() if k == SELECTION}
                    extra = {**epoch_hooks.on_epoch_end(
                        epoch, epochs, current,
                        {k: v for k, v in extra.items() if k != SELECTION}), **kept}
                if epoch_hook is not None:
                    extra = epoch_hook(epoch, {"params": current,
                                               "state": checkpoints.host(device_state["state"])},
                                       extra)
            if step % config.checkpoint_every_steps == 0 or step == total:
                # The loss above is the one before this step's update: check the update itself
                # before it is saved (or the stage marked finished), so that no checkpoint
                # holds non-finite parameters or optimiser state.
                check_finite_state(device_state, name, step, seed, directory.latest_step())
                directory.save(step, {**device_state,
                                  "aux": {"state": device_state["state"], "extra": extra}})
            for hook in hooks:
                hook(name=name, step=step, start=start, total=total)
            interrupt.check()
    finally:
        interrupt.stop()
        bar.close()
        log.close()
    directory.finish({"final_step": total, "steps_per_epoch": epoch_steps,
                  "global_batch": global_batch, "devices": mesh.size})
    return checkpoints.host(device_state), checkpoints.host(extra)
