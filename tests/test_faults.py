"""Faults in one training stage, on a toy step (3 steps per call): a non-finite update is
never saved (its loss is taken before the update), and a damaged checkpoint is set aside with
the previous one used, or named with what to delete when none is good."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpc_jax.mesh import make_mesh
from dpc_jax.training import checkpoints, loop
from dpc_jax.training.step import map_steps
from helpers import Interrupted, small_config


def toy_step(bad_step, bad_loss_step=-1):
    """A step_fn of `map_step`'s signature: w <- w + 1, finite loss; at `bad_step` (1-based)
    the update writes a NaN into the parameters; at `bad_loss_step` the loss is NaN."""

    def step_fn(state, consts, batch, key):
        del consts, batch, key
        count = state["opt_state"]["count"] + 1
        w = state["params"]["w"] + 1.0
        w = jnp.where(count == bad_step, w.at[0].set(jnp.nan), w)
        new = {"params": {"w": w}, "opt_state": {"count": count}, "state": state["state"]}
        loss = jnp.where(count == bad_loss_step, jnp.nan, 0.0)
        return new, jnp.full((1,), loss, jnp.float32), {}

    return step_fn


def run(tmp_path, bad_step, total=8, stop_at=None, bad_loss_step=-1, steps_per_call=3):
    c = small_config(steps_per_call=steps_per_call)
    c.checkpoint_every_steps = 4

    def stop(step, **_):
        if step == stop_at:
            raise Interrupted(step)

    stage = checkpoints.StageDir(str(tmp_path / "stage"), 1, c)
    return stage, lambda: loop.run_stage(
        loop.Stage(name="toy", directory=stage,
                   program=map_steps(toy_step(bad_step, bad_loss_step)),
                   schedule=lambda s: 0.1, consts={}, train_size=total, global_batch=1,
                   epoch_steps=total, epochs=1),
        {"params": {"w": np.zeros(3, np.float32)},
         "opt_state": {"count": np.zeros((), np.int32)}, "state": {}}, {}, seed=1,
        mesh=make_mesh(), config=c, hooks=(stop,))


def damage(stage, step, kind="data"):
    """'data': truncate every data file of checkpoint `step`'s params (a crash mid-copy, a
    full disk); 'metadata': garbage in its params metadata."""
    root = os.path.join(stage.path, "checkpoints", str(step), "params")
    if kind == "metadata":
        with open(os.path.join(root, "_METADATA"), "w") as f:
            f.write("{not json")
        return
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(max(0, os.path.getsize(path) // 3))


@pytest.mark.parametrize("kind", ["data", "metadata"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, capsys,
                                                                            kind):
    stage, train = run(tmp_path, bad_step=-1, total=12, stop_at=8)
    with pytest.raises(Interrupted):
        train()
    assert sorted(stage.manager.all_steps()) == [4, 8]
    damage(stage, 8, kind)
    stage, train = run(tmp_path, bad_step=-1, total=12)
    out, _ = train()
    said = capsys.readouterr()
    lines = [line for line in (said.out + said.err).splitlines() if "damaged" in line]
    assert len(lines) == 1, lines  # one warning, with what was wrong
    assert lines[0].startswith(f"warning: {stage.path}: damaged checkpoint(s) [8] moved to "
                               f"{stage.path}/damaged_checkpoints (step 8: "), lines
    np.testing.assert_array_equal(out["params"]["w"], np.full(3, 12.0, np.float32))  # exact
    assert os.path.isdir(os.path.join(stage.path, "damaged_checkpoints", "8"))  # kept, aside
    assert os.path.isfile(os.path.join(stage.path, "stage.json"))


def test_every_checkpoint_damaged_names_the_directory_and_what_to_delete(tmp_path):
    stage, train = run(tmp_path, bad_step=-1, total=12, stop_at=8)
    with pytest.raises(Interrupted):
        train()
    damage(stage, 8)
    damage(stage, 4)
    stage, train = run(tmp_path, bad_step=-1, total=12)
    with pytest.raises(ValueError) as err:
        train()
    msg = str(err.value)
    assert f"every checkpoint in {os.path.join(stage.path, 'checkpoints')} is damaged" in msg
    assert "step 8: " in msg and "step 4: " in msg
    assert f"Delete {stage.path} to train this stage again" in msg


@pytest.mark.parametrize("bad_step", [4, 8])  # a checkpoint step; the stage's last step
def test_a_nan_update_on_a_save_step_is_neither_saved_nor_finished(tmp_path, bad_step):
    stage, train = run(tmp_path, bad_step)
    with pytest.raises(FloatingPointError) as err:
        train()
    msg = str(err.value)
    assert f"after the update of step {bad_step} (seed 1) in params/w" in msg
    assert ("not saved: no checkpoint of this stage was saved yet" if bad_step == 4
            else "not saved: the latest checkpoint is step 4") in msg
    assert stage.latest_step() == (None if bad_step == 4 else 4)
    assert not os.path.exists(os.path.join(stage.path, "stage.json"))  # not finished
    if bad_step == 8:  # the saved checkpoint is the good one before it
        restored = stage.restore(4, {"params": {"w": np.zeros(3, np.float32)},
                                     "opt_state": {"count": np.zeros((), np.int32)},
                                     "aux": {}})
        np.testing.assert_array_equal(restored["params"]["w"], np.full(3, 4.0, np.float32))


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_a_nonfinite_loss_names_its_step_inside_a_stretch_too(tmp_path, steps_per_call):
    # Checkpoints every 4; with 3 steps per call, step 6 is inside the stretch of steps 5-7.
    stage, train = run(tmp_path, bad_step=-1, total=12, bad_loss_step=6,
                       steps_per_call=steps_per_call)
    with pytest.raises(FloatingPointError, match=r"^toy: non-finite loss \[nan\] at step 6 "
                                                 r"\(epoch 0, seed 1\); nothing after step 4 "
                                                 r"was saved$"):
        train()
    assert stage.latest_step() == 4


def test_nonfinite_leaves_names_float_leaves_only():
    tree = {"a": jnp.ones(2), "b": {"c": jnp.array([1.0, jnp.inf])}, "n": jnp.arange(3)}
    assert loop.nonfinite_leaves(tree) == ["b/c"]
    assert jax.tree_util.tree_leaves(tree)  # unchanged


def test_a_stage_whose_settings_lack_a_field_is_refused_naming_it(tmp_path):
    """A settings.json without a field this run records (a stage from another version of
    dpc_jax) is refused with the field named, not matched by guessing its value."""
    import json

    c = small_config()
    path = str(tmp_path / "stage")
    checkpoints.check_stage_settings(path, 2, c)
    with open(os.path.join(path, "settings.json")) as f:
        stored = json.load(f)
    assert (stored["dpc.dedupe_text"], stored["clip.attention"]) == (True, "einsum")
    del stored["dpc.dedupe_text"], stored["clip.attention"]
    with open(os.path.join(path, "settings.json"), "w") as f:
        json.dump(stored, f)
    with pytest.raises(ValueError, match=r"config\.clip\.attention None -> 'einsum', "
                                         r"config\.dpc\.dedupe_text None -> True"):
        checkpoints.check_stage_settings(path, 2, c)


def test_a_second_run_on_a_locked_workdir_is_refused_and_a_dead_holder_frees_it(tmp_path):
    import signal
    import subprocess
    import sys

    from dpc_jax.training import train_lib

    workdir = tmp_path / "w"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from dpc_jax.training.checkpoints import WorkdirLock\n"
         "with WorkdirLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
         str(workdir)], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"{workdir} is in use by pid {holder.pid} on "):
            train_lib.train_and_evaluate(small_config(stages="zeroshot"), str(workdir))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with checkpoints.WorkdirLock(str(workdir)):  # the dead holder's lock is taken over
        with open(workdir / checkpoints.LOCK_FILE) as f:
            assert f.read().startswith(f"pid {os.getpid()} ")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; expected a directory"):
        train_lib.train_and_evaluate(small_config(), str(tmp_path / "file"))
    with pytest.raises(ValueError, match="a parent of it is a file"):
        train_lib.train_and_evaluate(small_config(), str(tmp_path / "file" / "w"))
    assert not (workdir / checkpoints.LOCK_FILE).exists()  # its holder removed it


def test_a_lock_file_its_holder_removed_meanwhile_is_not_taken(tmp_path, monkeypatch):
    """The holder removes W/.lock while it still holds it; a run that opened the file just
    before gets the lock on the removed file, sees that, and locks a new one instead (else
    it and a third run could both hold a lock)."""
    import fcntl

    real, exclusive = fcntl.flock, []
    lock = checkpoints.WorkdirLock(str(tmp_path))

    def flock(f, op):
        if op & fcntl.LOCK_EX:
            exclusive.append(op)
            if len(exclusive) == 1:  # the holder leaves between our open and our flock
                os.remove(lock.path)
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with lock:
        assert os.path.samestat(os.fstat(lock._file.fileno()), os.stat(lock.path))
        with open(lock.path) as f:
            assert f.read().startswith(f"pid {os.getpid()} ")
    assert len(exclusive) == 2 and not os.path.exists(lock.path)
