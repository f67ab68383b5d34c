"""A stage trained in stretches of steps per device call (`config.steps_per_call`,
`step.map_steps`) computes the numbers of one call per step: the losses, the log records, the
parameters, the optimiser state and the epoch-hook carry, also when it is stopped inside a
stretch and resumed; and every stretch length is one compiled program.

The step is the trainer's own (`make_per_device_step`, `map_step`, the Dassl SGD with a frozen
leaf, `run_stage` with its checkpoints); the objective is a small softmax regression whose
inputs are jittered with the step key, so that a step given another key, batch or state than
its own gives other numbers."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpc_jax.mesh import make_mesh, replicate
from dpc_jax.training import checkpoints, loop, masks, optim, step
from helpers import REPO, Interrupted, interrupt_after, read_log, small_config, tree_equal

N, FEATURES, CLASSES, GLOBAL_BATCH, EPOCHS = 24, 6, 3, 4, 2
EPOCH_STEPS = N // GLOBAL_BATCH  # 6 steps per epoch, 12 in the stage; checkpoints every 4


def objective(params, state, consts, batch, key):
    x = consts["x"][batch["index"]]
    x = x + 0.1 * jax.random.normal(key, x.shape)
    logits = x @ params["w"] + params["b"] + params["frozen"]
    labels = consts["y"][batch["index"]]
    loss = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, labels[:, None], -1)[:, 0])
    correct = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return loss, ({"acc": correct}, state)


def build_setup():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((FEATURES, CLASSES)).astype(np.float32),
              "b": np.zeros(CLASSES, np.float32),
              "frozen": rng.standard_normal(CLASSES).astype(np.float32)}
    consts = {"x": rng.standard_normal((N, FEATURES)).astype(np.float32),
              "y": rng.integers(0, CLASSES, N).astype(np.int32)}
    mask = masks.trainable_mask(params, [("frozen", False), (".*", True)])
    optimizer = optim.make_optimizer(0.5, EPOCHS, EPOCH_STEPS, mask=mask, warmup_epochs=0)
    schedule = optim.dassl_schedule(0.5, EPOCHS, EPOCH_STEPS, warmup_epochs=0)
    mesh = make_mesh()
    step_fn = step.map_step(step.make_per_device_step(objective, optimizer, mask), mesh,
                            donate=False)
    return {"params": params, "consts": replicate(consts, mesh), "mesh": mesh,
            "optimizer": optimizer, "schedule": schedule, "step_fn": step_fn,
            "steps_fn": step.map_steps(step_fn)}


@pytest.fixture(scope="module")
def setup():
    return build_setup()


def epoch_hook(epoch, current, extra):
    """An epoch-end carry (e.g. an average of epoch snapshots): it sees the epoch's params."""
    return {"sum": extra["sum"] + current["params"]["w"], "epochs": extra["epochs"] + 1}


def start_extra():
    return {"sum": np.zeros((FEATURES, CLASSES), np.float32), "epochs": np.asarray(0, np.int32)}


def per_step_reference(setup, with_hook):
    """The stage as one call of the mapped step per step (the loop before stretches): step s
    takes batch s of its epoch's order and the key fold_in(stage key, s)."""
    params = setup["params"]
    state = replicate({"params": params, "opt_state": setup["optimizer"].init(params),
                            "state": {}}, setup["mesh"])
    key = jax.random.fold_in(jax.random.key(1), 2)  # seed 1, stage 2
    extra, losses, accs = start_extra(), [], []
    for s in range(EPOCHS * EPOCH_STEPS):
        epoch, i = divmod(s, EPOCH_STEPS)
        index = loop.epoch_order(1, 2, epoch, N)[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]
        state, loss, metrics = setup["step_fn"](
            state, setup["consts"], {"index": index.astype(np.int32)},
            jax.random.fold_in(key, s))
        losses.append(float(np.asarray(loss).mean()))
        accs.append(float(np.asarray(metrics["acc"]).mean()))
        if with_hook and (s + 1) % EPOCH_STEPS == 0:
            extra = epoch_hook(epoch, {"params": checkpoints.host(state["params"])}, extra)
    return checkpoints.host(state), extra, losses, accs


def train(setup, path, steps_per_call, with_hook, hooks=()):
    c = small_config(steps_per_call=steps_per_call)  # logs every step, saves every 4
    stage = checkpoints.StageDir(str(path), 2, c)
    params = setup["params"]
    return loop.run_stage(
        loop.Stage(name="toy", directory=stage, program=setup["steps_fn"],
                   schedule=setup["schedule"], consts=setup["consts"], train_size=N,
                   global_batch=GLOBAL_BATCH, epoch_steps=EPOCH_STEPS, epochs=EPOCHS,
                   epoch_hook=epoch_hook if with_hook else None),
        {"params": params, "opt_state": checkpoints.host(setup["optimizer"].init(params)),
         "state": {}}, start_extra(), seed=1, mesh=setup["mesh"], config=c, hooks=hooks)


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.parametrize("with_hook", [False, True])  # stretches across / cut at epoch ends
def test_stretches_and_a_resume_inside_one_give_the_per_step_numbers(setup, tmp_path,
                                                                     with_hook):
    check_stretches_against_per_step(setup, tmp_path, with_hook)
    # Capacity 1 and capacity 3: two programs, whatever the stretch lengths (1, 2, 3).
    assert setup["steps_fn"]._cache_size() == 2


def check_stretches_against_per_step(setup, tmp_path, with_hook):
    want_state, want_extra, want_losses, want_accs = per_step_reference(setup, with_hook)
    one, one_extra = train(setup, tmp_path / "one", 1, with_hook)
    # Three steps per call: stretches of 3 and 1 (cut at the checkpoints every 4) and of 2
    # (with the hook, also at the epoch end 6); stopped after step 6, inside the stretch
    # 4..7 (without the hook), so the rerun resumes from the step-4 checkpoint.
    with pytest.raises(Interrupted):
        train(setup, tmp_path / "three", 3, with_hook, hooks=[interrupt_after(6)])
    assert checkpoints.StageDir(str(tmp_path / "three"), 2, small_config()).latest_step() == 4
    three, three_extra = train(setup, tmp_path / "three", 3, with_hook)
    for got, extra in ((one, one_extra), (three, three_extra)):
        assert tree_equal(got, want_state)  # params and optimiser state, bitwise
        assert tree_equal(extra, want_extra)
    np.testing.assert_array_equal(want_state["params"]["frozen"], setup["params"]["frozen"])
    assert int(want_extra["epochs"]) == (EPOCHS if with_hook else 0)
    log_one, log_three = (read_log(tmp_path / d / "log.jsonl") for d in ("one", "three"))
    assert without_seconds(log_three) == without_seconds(log_one)
    assert [r["step"] for r in log_one] == list(range(1, EPOCHS * EPOCH_STEPS + 1))
    assert [r["loss"] for r in log_one] == want_losses
    assert [r["acc"] for r in log_one] == want_accs
    assert [r["epoch"] for r in log_one] == [s // EPOCH_STEPS for s in range(12)]
    assert len(set(want_losses)) == len(want_losses)  # every step computed something new


def test_stretches_on_four_devices_give_the_per_step_numbers(tmp_path):
    """The same on 4 emulated devices (one anchor each): the stretch's [global batch, S] index
    batches are placed like one step's batch and sliced per step on device."""
    script = textwrap.dedent("""
        import pathlib, sys
        import jax
        sys.path.insert(0, "tests")
        import test_loop as t
        assert jax.device_count() == 4, jax.devices()
        setup, root = t.build_setup(), pathlib.Path(sys.argv[1])
        for with_hook in (False, True):
            t.check_stretches_against_per_step(setup, root / str(with_hook), with_hook)
        log = t.read_log(root / "False" / "one" / "log.jsonl")
        print("per-device losses", len(log[0]["per_device_loss"]))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "per-device losses 4"


def test_stretch_ends():
    # Checkpoints every 4, 6 steps per epoch, a stage of 12 steps, up to 5 steps per call.
    def stretches(at_epoch_ends, start=0):
        out, s = [], start
        while s < 12:
            e = loop.stretch_end(s, 12, 5, 6, 4, at_epoch_ends)
            out.append((s, e))
            s = e
        return out

    assert stretches(False) == [(0, 4), (4, 8), (8, 12)]
    assert stretches(True) == [(0, 4), (4, 6), (6, 8), (8, 12)]
    assert loop.stretch_end(9, 12, 2, 6, 4, True) == 11
