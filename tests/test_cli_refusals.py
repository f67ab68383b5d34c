"""Refusals through the real command line (`python -m dpc_jax.train`, the embedded world): one
`Error:` line naming the field or thing and what was expected, exit status 2, no traceback, and
nothing run, created or lost."""

import json
import os

import numpy as np
import pytest

from helpers import assert_refused, small_flags, train_cli

CONFIG = ["--config", "configs/dpc_coop.py"]


@pytest.mark.parametrize("flag, words", [
    ("--config.optim.momentum=1.5", ["config.optim.momentum=1.5", "[0, 1)"]),
    ("--config.optim.weight_decay=-1.0", ["config.optim.weight_decay=-1.0", ">= 0"]),
    ("--config.optim.warmup_epochs=-1", ["config.optim.warmup_epochs=-1", "integer >= 0"]),
    ("--config.stored_size=-1", ["config.stored_size=-1", "integer >= 0"]),
    ("--config.max_resident_mb=-1", ["config.max_resident_mb=-1", ">= 0"]),
    ("--config.num_workers=0", ["config.num_workers=0", "positive integer"]),
    ("--config.eval_batch_size=0", ["config.eval_batch_size=0", "positive integer"]),
    ("--config.seeds=-1", ["config.seeds='-1'", "[-1]", "from 0 to 4294967295"]),
    # jax.random.key keeps 32 bits: 2**40 would silently train with seed 0's key.
    ("--config.seeds=1,1099511627776", ["config.seeds='1,1099511627776'", "[1099511627776]",
                                        "from 0 to 4294967295"]),
    ("--config.num_processes=2", ["config.num_processes=2", "config.distributed=True"]),
    ("--config.coordinator_address=10.0.0.1:1234",
     ["config.coordinator_address='10.0.0.1:1234'", "config.distributed=True"]),
    ("--config.process_id=1", ["config.process_id=1", "config.distributed=True"]),
])
def test_bad_values_are_refused_before_anything_runs(tmp_path, flag, words):
    proc = train_cli(tmp_path, *CONFIG, flag)
    assert_refused(proc, *words)
    assert not os.path.exists(tmp_path / "w")  # no workdir, no lock, no zero-shot stage


def test_a_process_id_outside_the_processes_is_refused(tmp_path):
    proc = train_cli(tmp_path, *CONFIG, "--config.distributed=True",
                     "--config.num_processes=2", "--config.process_id=2")
    assert_refused(proc, "config.process_id=2", "from 0 to 1")
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("spec, words", [
    ("configs/dpc_coop.py:datset=world",
     ["--config configs/dpc_coop.py:datset=world: unknown config argument 'datset'; expected "
      "one of dataset, root,"]),
    ("configs/dpc_coop.py:world", ["config argument 'world': expected key=value"]),
    ("configs/dpc_coop.py:variant=x", ["variant='x'; this config offers base_to_new"]),
])
def test_a_bad_config_file_argument_is_one_line(tmp_path, spec, words):
    # ml_collections re-raises the config file's ValueError with its traceback as the message.
    proc = train_cli(tmp_path, "--config", spec)
    assert_refused(proc, *words)
    assert "Traceback" not in proc.stderr and "Error whilst parsing" not in proc.stderr
    assert not os.path.exists(tmp_path / "w")


def test_a_bug_in_a_config_file_keeps_one_traceback(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def get_config(arg=None):\n    return undefined_name\n")
    proc = train_cli(tmp_path, "--config", str(config))
    assert proc.returncode == 1
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().endswith("NameError: name 'undefined_name' is not defined")


def _read(path):
    with open(path) as f:
        return f.read()


def test_a_rerun_with_another_seed_keeps_the_first_and_leaves_no_lock(tmp_path):
    """seeds=1, then seeds=2 into the same workdir: results.json holds both seeds and their
    means, config.json says so; no run leaves W/.lock; a refused third run changes nothing."""
    workdir = tmp_path / "w"
    first = train_cli(tmp_path, *CONFIG, *small_flags(), "--config.seeds=1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (workdir / ".lock").exists()
    seed_1 = json.loads(_read(workdir / "results.json"))
    second = train_cli(tmp_path, *CONFIG, *small_flags(), "--config.seeds=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (workdir / ".lock").exists()
    assert f"{workdir / 'results.json'} holds seeds 1,2 (this run: 2)" in second.stdout
    results = json.loads(_read(workdir / "results.json"))
    assert list(results) == ["zeroshot", "backbone", "dpc"]
    for stage, summary in results.items():
        assert summary["per_seed"]["1"] == seed_1[stage]["per_seed"]["1"]  # kept as it was
        assert summary["per_seed"]["2"] == json.loads(
            _read(workdir / "seed_2" / stage / "results.json"))
        assert set(summary["per_seed"]) == {"1", "2"}
        for key in ("base", "new"):
            values = [summary["per_seed"][s][key] for s in ("1", "2")]
            assert summary[key] == pytest.approx(np.mean(values)), (stage, key)
            assert summary[f"{key}_std"] == pytest.approx(np.std(values)), (stage, key)
    assert json.loads(_read(workdir / "config.json"))["seeds"] == "1,2"

    records = {name: _read(workdir / name) for name in ("results.json", "config.json")}
    third = train_cli(tmp_path, *CONFIG, *small_flags(), "--config.seeds=2",
                      "--config.backbone.lr=0.5")
    assert_refused(third, "seed_2/backbone was trained with other settings",
                   "config.backbone.lr ", " -> 0.5")
    assert {name: _read(workdir / name) for name in records} == records
    assert not (workdir / ".lock").exists()


def test_a_refusal_after_the_workdir_is_made_leaves_no_workdir_or_lock(tmp_path):
    """'dpc' without stage 1 is refused once the data is read (inside the workdir lock): a
    workdir the run made is removed again; one the user made stays, as it was."""
    proc = train_cli(tmp_path, *CONFIG, "--config.stages=dpc")
    assert_refused(proc, "config.stages='dpc': stage 'dpc' needs stage 1")
    assert not (tmp_path / "w").exists()
    (tmp_path / "w").mkdir()
    proc = train_cli(tmp_path, *CONFIG, "--config.stages=dpc")
    assert_refused(proc, "config.stages='dpc': stage 'dpc' needs stage 1")
    assert os.listdir(tmp_path / "w") == []


def test_a_pytorch_file_without_torch_is_one_line_naming_the_extra(tmp_path):
    """Reading a PyTorch file needs the torch extra: without torch, `python -m dpc_jax.convert`
    says which extra to install in one line, exit 2, no traceback."""
    import subprocess
    import sys

    from helpers import REPO

    checkpoint = tmp_path / "ViT-B-16.pt"
    checkpoint.write_bytes(b"not read")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from dpc_jax.convert.__main__ import main\n"
            f"sys.exit(main([{str(checkpoint)!r}, {str(tmp_path / 'out')!r}]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ('Error: this command needs torch, which is not installed: pip '
                                  'install -e ".[torch]" (from the repository folder)')
    assert not (tmp_path / "out").exists()


def test_a_diverged_run_is_one_error_line_naming_the_step(tmp_path):
    """A non-finite loss is an outcome the user acts on (lower the learning rate): its message
    alone, exit 2, no traceback."""
    from helpers import train_cli

    out = train_cli(tmp_path, "--config", "configs/dpc_coop.py", "--config.stages=backbone",
                    "--config.shots=2",
                    "--config.backbone.epochs=2", "--config.backbone.batch_size=16",
                    "--config.optim.warmup_epochs=0", "--config.backbone.lr=1e30")
    assert out.returncode == 2, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert "Traceback" not in out.stderr and sum(l.startswith("Error:") for l in lines) == 1
    assert ("non-finite loss" in out.stderr and "seed 1" in out.stderr
            and "no checkpoint of this stage was saved" in out.stderr)


def test_the_world_with_another_clip_names_the_clip_not_the_dataset(tmp_path):
    """The world runs on its shipped CLIP: another one, as a config argument (which the world's
    settings used to replace silently) or as a field, is refused naming the CLIP."""
    from helpers import train_cli

    out = train_cli(tmp_path, "--config", "configs/dpc_coop.py:clip=/some/converted_clip")
    assert out.returncode == 2, out.stderr
    assert "Error: --config configs/dpc_coop.py:clip=/some/converted_clip: config argument " \
           "clip='/some/converted_clip' with dataset='world'" in out.stderr, out.stderr
    out = train_cli(tmp_path, "--config", "configs/dpc_coop.py",
                    "--config.clip.source=/some/converted_clip")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("Error: config.clip.source='/some/converted_clip' with the "
                                 "world dataset 'world'"), out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()
