"""What a user sees when their data, files or disk let a run down, through the real command
line: one `Error:` line naming the thing (exit status 2) or one `warning:` line, what was used
recorded in results.json, and nothing saved before lost.

Slow part: each case starts `python -m dpc_jax.train` (seconds of JAX start-up); the world
runs share one finished stage 1, copied per test."""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from dpc_jax import cli
from dpc_jax.models.checkpoint import asset_dir
from helpers import REPO, assert_refused, make_folder, small_flags, train_cli

DPC_COOP = "configs/dpc_coop.py"
CLASSES = ["apple", "banana", "cherry", "date", "elder_berry", "fig"]


def run_cli(module, *args, preexec_fn=None, prefix=(), no_cache=False):
    """`python -m module *args` from the repository; `no_cache`: without the tests' shared
    XLA compilation cache (JAX warns when it cannot write an entry)."""
    drop = {cli.TRACEBACK_ENV} | ({"JAX_COMPILATION_CACHE_DIR"} if no_cache else set())
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    return subprocess.run([*prefix, sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn)


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def without_read_override():
    """A command prefix that makes a root process obey file permissions (it drops the
    capabilities that let root read anything), so that an unreadable file is unreadable
    here too; none for other users."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot bind here")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")


# -- your own folder: what a short class trained on, the warm-up, transfer targets ---------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder dataset whose class 'apple' has 2 training images (the others 5) and a copy
    of the world's CLIP written to disk (the shipped one is for the world datasets only)."""
    tmp = tmp_path_factory.mktemp("folder")
    root = make_folder(tmp / "d", {"train": {c: 2 if c == "apple" else 5 for c in CLASSES},
                                   "val": 1, "test": 2}, CLASSES)
    clip = tmp / "clip"
    shutil.copytree(asset_dir(), clip)
    return tmp, root, clip


def folder_args(root, clip, *more):
    return ["--config", f"{DPC_COOP}:dataset=folder,root={root},clip={clip}",
            f"--config.clip.tokenizer={clip}", "--config.stored_size=0",
            "--config.progress=False", "--config.backbone.batch_size=4", *more]


def test_a_short_class_is_recorded_and_a_warm_up_taking_the_schedule_is_said(folder):
    tmp, root, clip = folder
    workdir = tmp / "w_short"
    proc = run_cli("dpc_jax.train", "--workdir", str(workdir), *folder_args(
        root, clip, "--config.shots=4", "--config.seeds=1,2",
        "--config.stages=zeroshot,backbone", "--config.backbone.epochs=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    short = [w for w in warnings if "fewer than 4 training images" in w]
    assert len(short) == 1 and "'apple' 2" in short[0], warnings  # once for the run
    warm = [w for w in warnings if "warmup_epochs" in w]
    assert warm == [
        "warning: config.optim.warmup_epochs=1 of config.backbone.epochs=2: 1 of the stage's 2 "
        "epoch(s) train at config.optim.warmup_lr=1e-05 instead of config.backbone.lr=0.002 "
        "(its epochs' learning rates: 1e-05, 0.002); for a short run, set more epochs or "
        "--config.optim.warmup_epochs=0"], warnings  # once for the run, not per seed
    used = {"requested": 4, "min": 2, "max": 4, "short_classes": {"apple": 2}}
    results = json.loads((workdir / "results.json").read_text())
    for seed in ("1", "2"):
        assert results["backbone"]["per_seed"][seed]["shots_used"] == used
        assert "shots_used" not in results["zeroshot"]["per_seed"][seed]  # it trains nothing
        stage = json.loads((workdir / f"seed_{seed}" / "backbone" / "results.json").read_text())
        assert stage["shots_used"] == used


def test_transfer_targets_of_a_folder_source(folder):
    tmp, root, clip = folder
    proc = run_cli("dpc_jax.train", "--workdir", str(tmp / "w_refused"), *folder_args(
        root, clip, "--config.protocol=cross_dataset", "--config.shots=2"))
    assert_refused(proc, "config.targets is empty", "config.dataset='folder'", "folder:DIR")
    assert not (tmp / "w_refused").exists()
    proc = run_cli("dpc_jax.train", "--workdir", str(tmp / "w_refused"), *folder_args(
        root, clip, "--config.protocol=cross_dataset", f"--config.targets=folder:{tmp}/none"))
    assert_refused(proc, f"config.targets: 'folder:{tmp}/none': no folder")
    proc = run_cli("dpc_jax.train", "--workdir", str(tmp / "w_refused"), *folder_args(
        root, clip, "--config.protocol=domain_generalisation", f"--config.targets=folder:{root}"))
    assert_refused(proc, "config.targets lists the source's folder")
    # Another folder of your own, with other classes: scored over its own classes.
    other = make_folder(tmp / "other", {"train": 3, "test": 3}, ["kiwi", "lime", "mango"])
    workdir = tmp / "w_transfer"
    proc = run_cli("dpc_jax.train", "--workdir", str(workdir), *folder_args(
        root, clip, "--config.protocol=cross_dataset", f"--config.targets=folder:{other}",
        "--config.shots=2", "--config.stages=zeroshot"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    target = f"folder:{other}"
    assert results["targets"] == [target]
    accuracy = results["stages"]["zeroshot"]["accuracy"]
    assert list(accuracy) == ["folder", target]
    # 9 test images of the target: accuracies are multiples of 1/9.
    assert round(accuracy[target]["mean"] * 9 / 100, 6) == round(accuracy[target]["mean"] * 9
                                                                 / 100)


# -- the world: checkpoints that cannot be read or written ---------------------------------------


@pytest.fixture(scope="module")
def finished_stage1(tmp_path_factory):
    """A workdir with a finished zero-shot stage and stage 1 (a checkpoint every step)."""
    tmp = tmp_path_factory.mktemp("world")
    proc = train_cli(tmp, "--config", DPC_COOP, "--config.stages=zeroshot,backbone",
                     *small_flags())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "w"


def world_run(workdir, *args, **kw):
    return run_cli("dpc_jax.train", "--workdir", str(workdir), "--config", DPC_COOP,
                   *small_flags(), *args, **kw)


def test_a_workdir_that_cannot_be_created_is_named(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    os.chmod(parent, 0o555)
    try:
        proc = run_cli("dpc_jax.train", "--workdir", str(parent / "w"), "--config", DPC_COOP,
                       *small_flags(), prefix=without_read_override())
    finally:
        os.chmod(parent, 0o755)
    assert_refused(proc, "--workdir", str(parent / "w"), "cannot be created",
                   "Permission denied", "choose a writable place")


def test_an_unreadable_checkpoint_is_named_and_nothing_is_moved(finished_stage1, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished_stage1, workdir)
    stage = workdir / "seed_1" / "backbone"
    steps = sorted(int(s) for s in os.listdir(stage / "checkpoints"))
    assert len(steps) == 2
    locked = stage / "checkpoints" / str(steps[-1]) / "params"
    os.chmod(locked, 0)
    try:
        before = {p for p in snapshot(workdir)}
        # Stage 1 finished: its final checkpoint is read for stage 2.
        proc = world_run(workdir, "--config.stages=backbone,dpc", prefix=without_read_override())
        assert_refused(proc, str(locked), "permission denied", "not damaged", "chmod -R u+rwX")
        # Stage 1 interrupted: resuming reads its latest checkpoint.
        os.rename(stage / "stage.json", tmp_path / "stage.json")
        proc = world_run(workdir, "--config.stages=backbone", prefix=without_read_override())
        assert_refused(proc, str(locked), "permission denied", "nothing was moved")
    finally:
        os.chmod(locked, 0o755)
    assert not (stage / "damaged_checkpoints").exists()
    os.rename(tmp_path / "stage.json", stage / "stage.json")
    assert {p for p in snapshot(workdir)} == before


def test_a_full_disk_while_saving_is_one_line_and_loses_nothing(finished_stage1, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) fails writes with EFBIG as a full
    disk fails them with ENOSPC: stage 2's first checkpoint (2 KB) cannot be written; stage 1's
    checkpoints stay and the rerun without the limit finishes."""
    workdir = tmp_path / "w"
    shutil.copytree(finished_stage1, workdir)
    stage1 = snapshot(workdir / "seed_1" / "backbone")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    proc = world_run(workdir, "--config.stages=backbone,dpc", "--config.compilation_cache=",
                     preexec_fn=limit, no_cache=True)
    line = assert_refused(proc, os.strerror(errno.EFBIG), "while saving checkpoint step",
                          str(workdir / "seed_1" / "dpc" / "checkpoints"), "ulimit -f")
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr, line
    assert snapshot(workdir / "seed_1" / "backbone") == stage1
    assert not (workdir / "seed_1" / "dpc" / "stage.json").exists()
    proc = world_run(workdir, "--config.stages=backbone,dpc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "seed_1" / "dpc" / "stage.json").exists()
    assert snapshot(workdir / "seed_1" / "backbone") == stage1


# -- an OpenAI .pt file cut short or damaged ----------------------------------------------------


def test_a_cut_or_damaged_openai_pt_is_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    import zipfile

    traced = torch.jit.trace(torch.nn.Linear(64, 64), torch.zeros(1, 64))
    whole = tmp_path / "whole.pt"
    traced.save(str(whole))
    torch.save(torch.nn.Linear(64, 64).state_dict(), str(tmp_path / "state.pt"))
    for name in ("whole.pt", "state.pt"):  # an interrupted download or copy
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[:len(data) // 2])
    with zipfile.ZipFile(whole) as src, zipfile.ZipFile(tmp_path / "bad.pt", "w") as dst:
        for info in src.infolist():  # a TorchScript archive whose pickled module is cut
            data = src.read(info.filename)
            dst.writestr(info, data[:len(data) // 2] if info.filename.endswith("data.pkl")
                         else data)
    for name, words in [("cut_whole.pt", ["is cut short"]), ("cut_state.pt", ["is cut short"]),
                        ("bad.pt", ["damaged TorchScript archive", "torch.jit.load"])]:
        path = str(tmp_path / name)
        proc = run_cli("dpc_jax.convert", path, str(tmp_path / "out"))
        assert_refused(proc, repr(path), *words, "expected an OpenAI CLIP .pt")
        assert not (tmp_path / "out").exists()
    path = str(tmp_path / "cut_whole.pt")
    proc = run_cli("dpc_jax.train", "--workdir", str(tmp_path / "w"), "--config",
                   f"{DPC_COOP}:dataset=eurosat,root={tmp_path},clip={path}")
    assert_refused(proc, repr(path), "is cut short")
    assert not (tmp_path / "w").exists()


# -- Ctrl-C ------------------------------------------------------------------------------------


def test_ctrl_c_during_stage_1_is_one_line_and_the_rerun_resumes(tmp_path):
    import time

    workdir = tmp_path / "w"
    args = [sys.executable, "-m", "dpc_jax.train", "--workdir", str(workdir), "--config",
            DPC_COOP, *small_flags(), "--config.stages=zeroshot,backbone",
            "--config.backbone.epochs=500", "--config.checkpoint_every_steps=10"]
    env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    # SIGINT's default disposition, as a shell starts a command (an ignored signal would stay
    # ignored across exec).
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoints = workdir / "seed_1" / "backbone" / "checkpoints"
    deadline = time.time() + 240
    # Signalled once the first checkpoint is saved, of 2000 steps: the signal lands mid-stage
    # however slow the machine (with 800 steps and a wait for two checkpoints, one run of the
    # full suite on a loaded CPU exited 0: the stage had likely ended before the signal).
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(d.isdigit() for d in os.listdir(checkpoints)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"no exit 120 s after SIGINT: {out[-2000:]} {err[-2000:]}")
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-3000:]
    assert err.strip().splitlines() == [
        "interrupted (Ctrl-C): what was saved stays (a training run resumes from its last "
        "checkpoint when the same command runs again)"], err[-3000:]
    saved = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = [json.loads(line)["step"] for line in
           (workdir / "seed_1" / "backbone" / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, log[-1] + 1)) and log[-1] > saved  # resumed, none twice
    assert json.loads((workdir / "results.json").read_text())["backbone"]["per_seed"]["1"]
