"""Command-line user errors: one `Error:` line, exit status 2, no traceback (`dpc_jax.cli`)."""

import os
import subprocess
import sys

import pytest

from dpc_jax import cli
from dpc_jax.training import train_lib
from helpers import REPO, train_cli


@pytest.mark.parametrize("args, line", [
    (["--config", "configs/dpc_coop.py", "--config.backbone.lrr=0.1"],
     "Error: --config.backbone.lrr: config.backbone has no field 'lrr'; did you mean 'lr'?"),
    (["--config", "configs/dpc_coop.py", "--config.dhno.policy=bad"],
     "Error: config.dhno.policy='bad'; expected one of ('reference', 'hardest')"),
    (["--config", "configs/nope.py"],
     "Error: --config configs/nope.py: no config file 'configs/nope.py' (e.g. "
     "configs/dpc_coop.py)"),
])
def test_train_command_line_errors_are_one_line(tmp_path, args, line):
    proc = train_cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [line]
    assert not os.path.exists(tmp_path / "w" / "seed_1")  # refused before anything ran


def test_traceback_on_request(tmp_path):
    proc = train_cli(tmp_path, "--config", "configs/dpc_coop.py", "--config.dhno.policy=bad",
                     env={cli.TRACEBACK_ENV: "1"})
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: config.dhno.policy='bad'" in proc.stderr


def test_unknown_field_suggests_the_closest_names():
    config = train_lib.load_config(os.path.join(REPO, "configs", "dpc_coop.py"))
    assert cli.unknown_field(config, "backbone.lr") is None
    assert cli.unknown_field(config, "dhno.topk") == (
        "--config.dhno.topk: config.dhno has no field 'topk'; did you mean 'top_k'?")
    assert "its fields: [" in cli.unknown_field(config, "dpc.zzzzzz")
    assert cli.unknown_field(config, "seeds.x").startswith(
        "--config.seeds.x: config.seeds is a value ('1'), not a group of fields")


def test_run_cli_reports_user_errors_and_keeps_bugs(capsys, tmp_path):
    def bad_value():
        raise ValueError("config.shots=0; expected a positive integer")

    def missing():
        open(tmp_path / "absent.json")

    def unknown():
        raise KeyError("unknown dataset 'x'; expected one of ['dtd']")

    def offline():  # what openai.download_openai_model raises without network
        raise ConnectionError("could not download OpenAI CLIP 'ViT-B/16'; pass its path")

    assert cli.run_cli(lambda: None) == 0
    for fn, text in ((bad_value, "config.shots=0; expected a positive integer"),
                     (offline, "could not download OpenAI CLIP 'ViT-B/16'; pass its path"),
                     (missing, f"{tmp_path / 'absent.json'}: No such file or directory"),
                     (unknown, "unknown dataset 'x'; expected one of ['dtd']")):
        assert cli.run_cli(fn) == 2
        assert capsys.readouterr().err == f"Error: {text}\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: its traceback stays
        cli.run_cli(lambda: 1 / 0)


def test_help_exits_0_and_lists_the_config_fields(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpc_jax.train", "--help"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "config fields (defaults of configs/dpc_coop.py):" in out
    for line in ("--config.dhno.top_k=8", "K: hard negatives per anchor",
                 "--config.seeds='1'", "--config.backbone.n_ctx=4"):
        assert line in out, line
    with_kd = subprocess.run([sys.executable, "-m", "dpc_jax.train", "--config",
                              "configs/dpc_promptkd.py", "--help"], cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                             text=True, timeout=300)
    assert with_kd.returncode == 0 and "--config.backbone.teacher.epochs=" in with_kd.stdout
