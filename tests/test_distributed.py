"""Multi-host training for real: two processes on localhost joined by `jax.distributed.initialize`
(JAX's gloo CPU collectives), one emulated CPU device each, train and evaluate a short world job
into one shared workdir; one process with two emulated devices runs the same job (the same
global batch). Their results, per-step losses and final parameters must agree."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpc_jax.training import checkpoints
from helpers import REPO

# A short two-stage job on the world's 16-class domain (8 base classes, 512 test images per
# half): each stage runs 2 epochs of 4 steps at a global batch of 4 (checkpoints at steps 3, 6
# and 8), with learning rates large enough that stage 2 changes the accuracies.
JOB = ["--config", os.path.join(REPO, "configs", "dpc_coop.py") + ":dataset=world_a",
       "--config.stages=backbone,dpc", "--config.shots=2", "--config.progress=False",
       "--config.backbone.epochs=2", "--config.backbone.batch_size=2",
       "--config.backbone.lr=0.5", "--config.batch_size=2", "--config.dpc.epochs=2",
       "--config.dpc.lr=0.1", "--config.dhno.top_k=4", "--config.optim.warmup_epochs=0",
       "--config.log_every_steps=1", "--config.checkpoint_every_steps=3"]
# XLA's CPU code generation without LLVM optimisation halves the compile time that dominates
# this test; both runs use it (a run at the default level gave the same equalities).
XLA_FAST = "--xla_backend_optimization_level=0"
DEADLINE_S = 420  # a hung collective fails the test instead of freezing CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, devices, log, *flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {XLA_FAST}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "dpc_jax.train", "--workdir",
                                 str(workdir), *JOB, *flags], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_all(procs: dict) -> None:
    """Wait for every process; on the deadline or any failure, stop them all and show logs."""
    deadline = time.time() + DEADLINE_S
    try:
        while any(p.poll() is None for p, _ in procs.values()):
            failed = [n for n, (p, _) in procs.items() if p.poll() not in (None, 0)]
            if failed or time.time() > deadline:
                break
            time.sleep(0.5)
    finally:
        stopped = [n for n, (p, _) in procs.items() if p.poll() is None]
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    bad = {n: p.returncode for n, (p, _) in procs.items() if p.returncode != 0}
    if bad:
        tails = "\n".join(
            f"--- {n} (exit {p.returncode}{', stopped' if n in stopped else ''}):\n"
            + open(log).read()[-2500:] for n, (p, log) in procs.items())
        raise AssertionError(f"runs failed: {bad}\n{tails}")


def final_params(stage_dir):
    meta = checkpoints.read_stage_meta(stage_dir)
    mngr = checkpoints.checkpoint_manager(os.path.join(stage_dir, "checkpoints"))
    return mngr.restore(meta["final_step"], args=ocp.args.Composite(
        params=ocp.args.StandardRestore()))["params"]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_two_processes_equal_one_process_on_two_devices(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    address = f"127.0.0.1:{free_port()}"
    procs = {"single process, 2 devices": (launch(single, 2, tmp_path / "single.log"),
                                           tmp_path / "single.log")}
    for i in range(2):
        log = tmp_path / f"process_{i}.log"
        procs[f"process {i} of 2"] = (launch(
            multi, 1, log, "--config.distributed=True",
            f"--config.coordinator_address={address}", "--config.num_processes=2",
            f"--config.process_id={i}"), log)
    wait_all(procs)

    # Two processes of one device each made one 2-device mesh.
    for stage in ("backbone", "dpc"):
        for workdir in (single, multi):
            assert read_json(workdir / "seed_1" / stage / "settings.json")["devices"] == 2
    got, want = read_json(multi / "results.json"), read_json(single / "results.json")
    assert got == want  # accuracies: the same predictions on every test image
    assert want["dpc"]["base"] != want["backbone"]["base"]  # stage 2 changed the predictions
    for stage in ("backbone", "dpc"):
        logs = [[json.loads(line) for line in open(w / "seed_1" / stage / "log.jsonl")]
                for w in (multi, single)]
        # Only process 0 wrote the log: one line per step, not two.
        assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == list(range(1, 9))
        np.testing.assert_allclose([r["per_device_loss"] for r in logs[0]],
                                   [r["per_device_loss"] for r in logs[1]], rtol=1e-6)
        a, b = (final_params(w / "seed_1" / stage) for w in (multi, single))
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
