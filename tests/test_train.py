"""End-to-end tests of the two-stage training on the embedded world (tiny schedules)."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import pytest

from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.training import checkpoints, train_lib
from dpc_jax.training import stage2
from helpers import (DPC_COOP, REPO, Interrupted, _restore, interrupt_after, make_split_tree,
                     read_log, small_config, tree_equal)

LOWERINGS = []  # (function name, thread name) of every lowering to MLIR in this process
FULL_RUN_LOWERED = []  # those of the full_run fixture


def _record_lowering(event, duration, **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
        LOWERINGS.append((kwargs.get("fun_name"), threading.current_thread().name))


jax.monitoring.register_event_duration_secs_listener(_record_lowering)


def lowered_during(fn):
    """(fn(), the (function, thread) of each lowering while it ran)."""
    start = len(LOWERINGS)
    out = fn()
    return out, LOWERINGS[start:]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    results, lowered = lowered_during(lambda: train_lib.train_and_evaluate(small_config(),
                                                                           workdir))
    FULL_RUN_LOWERED[:] = lowered
    return workdir, results


def test_results_table_and_files(full_run):
    workdir, results = full_run
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    assert set(on_disk) == {"zeroshot", "backbone", "dpc"}
    for stage, r in on_disk.items():
        assert 0.0 <= r["base"] <= 100.0 and 0.0 <= r["new"] <= 100.0
        assert r["hm"] == pytest.approx(2 * r["base"] * r["new"] / (r["base"] + r["new"]))
        assert set(r["per_seed"]) == {"1"}
    for stage in ("backbone", "dpc"):
        log = read_log(os.path.join(workdir, "seed_1", stage, "log.jsonl"))
        assert log and all(np.isfinite(rec["loss"]) for rec in log)
        assert os.listdir(os.path.join(workdir, "seed_1", stage, "tensorboard"))


def test_new_classes_keep_backbone_accuracy(full_run):
    # w_new = 0: the new-class prompt is P itself, so new accuracy equals stage 1's exactly.
    _, results = full_run
    assert results["dpc"]["new"] == results["backbone"]["new"]


def test_stage2_leaves_backbone_prompt_bitwise(full_run):
    workdir, _ = full_run
    p_stage1 = _restore(os.path.join(workdir, "seed_1", "backbone"))
    dpc_params = _restore(os.path.join(workdir, "seed_1", "dpc"))
    assert tree_equal(dpc_params["backbone"], p_stage1)
    assert not tree_equal(dpc_params["parallel"], p_stage1)  # the parallel prompt did train


def test_stage2_compiled_ahead_is_the_same_run(tmp_path, full_run):
    """config.compile_ahead (on in full_run): stage 2's stretch program is lowered (and
    compiled) once, in the background thread, while stage 1 trains, and never again on the
    main thread; the run is bitwise the one that compiles it on its first call."""
    reference_dir, results = full_run
    stretches = [thread for name, thread in FULL_RUN_LOWERED if "steps_fn" in name]
    assert sorted(stretches) == ["MainThread", "dpc_jax-compile-ahead"]  # stage 1, stage 2
    workdir = str(tmp_path)
    plain, lowered = lowered_during(lambda: train_lib.train_and_evaluate(
        small_config(compile_ahead=False), workdir))
    assert [t for name, t in lowered if "steps_fn" in name] == ["MainThread"] * 2
    assert plain == results
    for stage in ("backbone", "dpc"):
        assert tree_equal(_restore(os.path.join(workdir, "seed_1", stage)),
                          _restore(os.path.join(reference_dir, "seed_1", stage))), stage
        got, want = ([{k: v for k, v in r.items() if k != "seconds"}
                      for r in read_log(os.path.join(d, "seed_1", stage, "log.jsonl"))]
                     for d in (workdir, reference_dir))
        assert got == want, stage


def test_a_stand_in_that_fails_skips_compile_ahead_and_the_run_goes_on(tmp_path, full_run,
                                                                       monkeypatch, capsys):
    """A stand-in whose scorer shapes cannot be built: one line says so, stage 2 compiles on
    the main thread as without compile_ahead, and the numbers are the same."""
    calls = []

    def shape_fails(sr, backbone, shape=False):
        if shape:
            calls.append(sr.seed)
            raise RuntimeError("no stand-in")
        return real(sr, backbone)

    real = stage2.dpc_scorer
    monkeypatch.setattr(stage2, "dpc_scorer", shape_fails)
    results, lowered = lowered_during(lambda: train_lib.train_and_evaluate(
        small_config(), str(tmp_path)))
    assert calls == [1]
    assert ("seed 1: config.compile_ahead skipped (RuntimeError: no stand-in); stage 2 "
            "compiles on its first call") in capsys.readouterr().out
    assert [t for name, t in lowered if "steps_fn" in name] == ["MainThread"] * 2
    assert results == full_run[1]


def test_compile_ahead_must_be_a_bool(tmp_path):
    config = small_config()
    with config.ignore_type():  # a config file's own value (overrides are type-checked)
        config.compile_ahead = "yes"
    with pytest.raises(ValueError, match=re.escape(
            "config.compile_ahead='yes'; expected True or False")):
        train_lib.train_and_evaluate(config, str(tmp_path))


def test_stage2_work_fields_are_checked_before_any_stage(tmp_path):
    config = small_config()
    with config.ignore_type():
        config.dpc.chunk_tail = "whole"
    with pytest.raises(ValueError, match=re.escape(
            "config.dpc.chunk_tail='whole'; expected one of single, padded")):
        train_lib.train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # refused before any stage wrote anything


def test_eval_mode_reproduces_results(full_run):
    workdir, results = full_run
    again = train_lib.train_and_evaluate(small_config(mode="eval"), workdir)
    for stage in results:
        assert again[stage]["base"] == results[stage]["base"]
        assert again[stage]["new"] == results[stage]["new"]


def test_resume_equals_uninterrupted(tmp_path, full_run):
    """Stopped after step 5 of stage 1 (inside a stretch of the world's steps_per_call, so it
    resumes from the step-4 checkpoint), rerun with one step per call: bitwise the
    uninterrupted run's parameters and log records, stage 2 trained wholly the other way."""
    reference_dir, _ = full_run
    workdir = str(tmp_path)
    assert small_config().steps_per_call > 4
    with pytest.raises(Interrupted):
        train_lib.train_and_evaluate(small_config(), workdir, hooks=[interrupt_after(5)])
    assert checkpoints.StageDir(os.path.join(workdir, "seed_1", "backbone"), 1,
                                small_config()).latest_step() == 4
    train_lib.train_and_evaluate(small_config(steps_per_call=1), workdir)
    for stage in ("backbone", "dpc"):
        resumed = _restore(os.path.join(workdir, "seed_1", stage))
        straight = _restore(os.path.join(reference_dir, "seed_1", stage))
        assert tree_equal(resumed, straight), stage
        # Every log record (but its wall time) is the uninterrupted run's.
        got, want = ({r["step"]: {k: v for k, v in r.items() if k != "seconds"}
                      for r in read_log(os.path.join(d, "seed_1", stage, "log.jsonl"))}
                     for d in (workdir, reference_dir))
        assert got == want, stage
        steps = [r["step"] for r in read_log(os.path.join(workdir, "seed_1", stage,
                                                          "log.jsonl"))]
        assert steps == sorted(set(steps))  # no step logged twice across the restart


@pytest.mark.parametrize("changes, message", [
    ({"dhno.top_k": 32}, "top_k=32"),
    ({"batch_size": 100}, "batch_size=100"),
    ({"backbone.name": "cocoop_typo"}, "backbone.name"),
    ({"dpc.mode": "converse"}, "dpc.mode"),
    ({"dhno.policy": "easiest"}, "dhno.policy"),
    ({"stages": "backbone,dcp"}, "stages"),
    ({"dataset": "oxford_pets"}, "world CLIP"),
    ({"dpc.lr": 0.0}, "dpc.lr"),
    ({"seeds": "1,2,1"}, "config.seeds='1,2,1' repeats seed(s) [1]"),
    ({"stages": "dpc,backbone"}, "config.stages='dpc,backbone': 'backbone' must come before "
                                 "'dpc' (stages run in the order zeroshot, teacher, backbone, "
                                 "dpc); e.g. config.stages=backbone,dpc"),
    ({"stages": "dpc"}, "config.stages='dpc': stage 'dpc' needs stage 1, and "),
    ({"shots": 0}, "config.shots=0; expected a positive integer"),
    ({"steps_per_call": 0}, "config.steps_per_call=0; expected a positive integer"),
    ({"optim.warmup_epochs": 1}, "config.dpc.epochs=1 with config.optim.warmup_epochs=1: every "
                                 "epoch would be a warm-up epoch"),
])
def test_bad_config_values_fail_clearly(tmp_path, changes, message):
    # All of these fail before any training starts.
    with pytest.raises(ValueError, match=re.escape(message)):
        train_lib.train_and_evaluate(small_config(**changes), str(tmp_path))
    assert not os.path.exists(os.path.join(str(tmp_path), "seed_1", "backbone", "checkpoints"))


def test_one_and_four_devices_give_the_same_per_device_losses(tmp_path):
    """The shard_map step on 4 emulated devices equals the per-device function run for each
    shard on one device (vmap with the same axis name): same losses, same averaged update."""
    script = textwrap.dedent("""
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        from dpc_jax.convert.load import load_clip_and_tokenizer
        from dpc_jax.mesh import make_mesh, replicate, shard_batch
        from dpc_jax.training import train_lib as T, objectives, run as R, seed as S, step as ST
        assert jax.device_count() == 4, jax.devices()
        c = T.load_config("configs/dpc_coop.py"); c.shots = 2; c.progress = False
        c.dhno.top_k = 4
        mesh = make_mesh()
        cc, cp, tok = load_clip_and_tokenizer(c)
        run = R.Run(config=c, mesh=mesh, clip_config=cc, clip_params=replicate(cp, mesh),
                    tokenizer=tok)
        sr = S.SeedRun.create(run, 1, "unused")
        dpc = run.dual
        p = run.learner.init(jax.random.key(0), cp)
        params = dpc.init(jax.tree_util.tree_map(lambda x: x + 0.01, p))
        program = run.program(R.DPC, params, sr.train_set().size, c.batch_size, "batch_size")
        opt, mask = program.optimizer, program.mask
        consts = sr.train_consts(R.DPC)
        consts["scorer"] = jnp.asarray(run.evaluator.classifier(run.learner, p, sr.base_texts))
        loss_fn = objectives.dpc_objective(run.learner, dpc, cc.image_resolution, 4,
                                             "reference")
        per_device = ST.make_per_device_step(loss_fn, opt, mask)
        index = np.arange(16, dtype=np.int32)
        key = jax.random.key(3)
        state = {"params": params, "opt_state": opt.init(params), "state": {}}
        step = ST.map_step(per_device, mesh, donate=False)
        s4, l4, _ = step(state, consts, {"index": shard_batch(index, mesh)}, key)
        p4 = s4["params"]
        one = jax.devices()[0]
        host = lambda t: jax.device_put(jax.device_get(t), one)
        emulated = ST.make_per_device_step(loss_fn, opt, mask, under_shard_map=False)
        vm = jax.vmap(emulated, in_axes=(None, None, 0, None), axis_name="data")
        s1, l1, _ = jax.jit(vm)(host(state), host(consts), {"index": index.reshape(4, 4)}, key)
        p1 = s1["params"]
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b[0]))))
                   for a, b in zip(jax.tree_util.tree_leaves(p4), jax.tree_util.tree_leaves(p1)))
        update = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree_util.tree_leaves(p4),
                                     jax.tree_util.tree_leaves(params)))
        print(json.dumps({"l4": np.asarray(l4).tolist(), "update": update,
                          "l1": np.asarray(l1)[0].tolist(), "param_diff": diff}))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["l4"], out["l1"], rtol=1e-5, atol=1e-6)
    assert len(set(round(x, 6) for x in out["l4"])) > 1  # the shards really differ
    # The same averaged update (to float rounding of the mean over shards).
    assert out["update"] > 0
    assert out["param_diff"] <= 1e-3 * out["update"], out


def test_real_dataset_source_end_to_end(tmp_path):
    """The CoOp-layout source wired through the config (`dataset=eurosat,root=...`): EuroSAT's
    5 base classes get K = 4 from the per-dataset settings, and K = 8 is refused."""
    from dpc_jax.data import registry

    names = list(registry.EUROSAT_RENAMED.values())
    make_split_tree(tmp_path / "data", "eurosat", names, {"train": 4, "val": 1, "test": 2})
    # A small CLIP converted beforehand (here: a copy of the world's, any CLIP directory works).
    clip_dir = tmp_path / "clip"
    shutil.copytree(asset_dir(), clip_dir)
    config = train_lib.load_config(f"{DPC_COOP}:dataset=EuroSAT,root={tmp_path / 'data'},"
                                   f"clip={clip_dir}")
    assert config.dataset == "eurosat" and config.dhno.top_k == 4
    config.update_from_flattened_dict({"clip.tokenizer": str(clip_dir), "stored_size": 0, "shots": 4,
                                       "progress": False, "backbone.epochs": 2,
                                       "backbone.batch_size": 4, "batch_size": 2,
                                       "dpc.epochs": 2})
    results = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["dpc"]["new"] == results["backbone"]["new"]
    for r in results.values():
        # 5 classes x 2 test images per half: accuracies are multiples of 10%.
        assert r["base"] % 10 == pytest.approx(0) and r["new"] % 10 == pytest.approx(0)
    config.dhno.top_k = 8
    with pytest.raises(ValueError, match="top_k=8.*5"):
        train_lib.train_and_evaluate(config, str(tmp_path / "run_k8"))


def test_resuming_with_other_settings_is_refused(full_run):
    workdir, _ = full_run
    with pytest.raises(ValueError, match=r"config\.dpc\.lr 0\.002 -> 0\.01"):
        train_lib.train_and_evaluate(small_config(stages="backbone,dpc", **{"dpc.lr": 0.01}),
                                     workdir)


def test_model_selection_keeps_the_best_epoch_and_survives_eval_mode(tmp_path):
    """`config.backbone.selection`: the released PromptKD's best base TEST epoch (reproduction
    only) is kept, its parameters are that epoch's checkpoint, and eval mode returns it again;
    an unknown value is refused before anything runs."""
    import orbax.checkpoint as ocp

    config = small_config(stages="backbone", **{"backbone.epochs": 3})
    config.backbone.selection = "best_base_test"
    workdir = str(tmp_path / "w")
    results = train_lib.train_and_evaluate(config, workdir)
    stage = os.path.join(workdir, "seed_1", "backbone")
    meta = checkpoints.read_stage_meta(stage)
    mngr = checkpoints.checkpoint_manager(os.path.join(stage, "checkpoints"))
    aux = mngr.restore(meta["final_step"], args=ocp.args.Composite(
        aux=ocp.args.StandardRestore()))["aux"]
    best = aux["extra"]["selection"]
    epoch = int(best["epoch"])
    assert 1 <= epoch <= 3
    # The kept accuracy is the base test accuracy the stage reports for the kept prompt.
    assert float(best["accuracy"]) == pytest.approx(results["backbone"]["base"], abs=1e-4)
    steps = meta["steps_per_epoch"]
    if epoch * steps in mngr.all_steps():  # the last two checkpoints are kept
        at_epoch = mngr.restore(epoch * steps, args=ocp.args.Composite(
            params=ocp.args.StandardRestore()))["params"]
        assert tree_equal(best["params"], at_epoch)
    again = train_lib.train_and_evaluate(_with_selection(
        small_config(stages="backbone", mode="eval", **{"backbone.epochs": 3}),
        "best_base_test"), workdir)
    assert again["backbone"] == results["backbone"]
    bad = _with_selection(small_config(), "best_test")
    with pytest.raises(ValueError, match="config.backbone.selection='best_test'"):
        train_lib.train_and_evaluate(bad, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")


def _with_selection(config, value):
    config.backbone.selection = value
    return config


def test_real_dataset_without_root_is_refused():
    c = train_lib.load_config(os.path.join(REPO, "configs", "dpc_coop.py") + ":dataset=dtd")
    with pytest.raises(ValueError, match=r"config\.root is empty for dataset 'dtd'.*root=/data"):
        train_lib.check_config(c)
    c.source = "tfds"  # TFDS's own default data_dir is a meaning of its own
    train_lib.check_config(c)


def test_reruns_keep_the_records_of_finished_work(tmp_path, full_run):
    """A refused run leaves config.json alone; a run of fewer stages keeps the other stages'
    summaries in results.json; a rerun of a finished stage keeps stage.json's fields."""
    workdir = str(tmp_path / "w")
    shutil.copytree(full_run[0], workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        before = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
        config_before = f.read()
    stage_json = os.path.join(workdir, "seed_1", "backbone", "stage.json")
    with open(stage_json) as f:
        meta_before = json.load(f)
    with pytest.raises(ValueError, match="other settings"):
        train_lib.train_and_evaluate(small_config(**{"backbone.lr": 0.5}), workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == config_before
    train_lib.train_and_evaluate(small_config(stages="zeroshot,backbone"), workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        after = json.load(f)
    assert set(after) == {"zeroshot", "backbone", "dpc"}
    assert after["dpc"] == before["dpc"] and after["backbone"] == before["backbone"]
    with open(stage_json) as f:
        assert json.load(f) == meta_before
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["stages"] == "zeroshot,backbone"


# -- kill -9 through the real command line -----------------------------------------------------

KILL_FLAGS = ["--config.shots=2", "--config.progress=False", "--config.backbone.epochs=2",
              "--config.backbone.batch_size=16", "--config.batch_size=4",
              "--config.dhno.top_k=4", "--config.dpc.epochs=1", "--config.optim.warmup_epochs=0",
              "--config.log_every_steps=1", "--config.checkpoint_every_steps=2"]


def _saving(stage_dir):
    """True while Orbax writes a checkpoint of the stage (its temporary step directory)."""
    d = os.path.join(stage_dir, "checkpoints")
    return os.path.isdir(d) and any("tmp" in name for name in os.listdir(d))


def _steps_logged(stage_dir):
    path = os.path.join(stage_dir, "log.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def test_sigkill_in_both_stages_and_inside_a_save_then_resume_equals_uninterrupted(tmp_path,
                                                                                   full_run):
    """SIGKILL the training command (i) inside a stage-1 checkpoint save, (ii) in the middle of
    stage 2; each rerun resumes, and the final results and parameters equal the uninterrupted
    run's (`full_run`, which saves every 4 steps, not 2) bitwise."""
    import signal
    import time

    reference, want = full_run
    workdir = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "dpc_jax.train", "--config", DPC_COOP, "--workdir", workdir,
           *KILL_FLAGS]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    stage1, stage2 = (os.path.join(workdir, "seed_1", s) for s in ("backbone", "dpc"))
    kills = [("inside a stage-1 save", lambda: _saving(stage1) and _steps_logged(stage1) >= 3),
             ("mid stage 2", lambda: _steps_logged(stage2) >= 3)]
    for what, when in kills:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 600
        while not when() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before the kill {what}: " + \
            proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        got = json.load(f)
    for stage in ("zeroshot", "backbone", "dpc"):
        assert got[stage]["per_seed"] == json.loads(json.dumps(want[stage]["per_seed"])), stage
    for stage in ("backbone", "dpc"):
        a = _restore(os.path.join(workdir, "seed_1", stage))
        b = _restore(os.path.join(reference, "seed_1", stage))
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                        jax.tree_util.tree_leaves(b))), stage
