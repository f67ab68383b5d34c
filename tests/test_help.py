"""What the commands tell a user, through the real command line.

`--help` of every `python -m dpc_jax.*` command: exit 0, a `usage: python -m dpc_jax.X` line,
every option and positional argument explained, and for `python -m dpc_jax.train` every config
field of every config file listed with its help and the accepted values of the enumerated fields
(dtype, precision) listed in full.

A command that needs an optional dependency (torch: `.[torch]`, matplotlib: `.[plot]`) which is
not installed stops before any work with one `Error:` line naming what needs it and the extra
to install, exit 2, no traceback."""

import glob
import os
import re
import subprocess
import sys

import pytest

from dpc_jax import cli
from dpc_jax.models import clip
from helpers import REPO

# (the argv after `python -m`, the usage line's prog).
ARGPARSE_COMMANDS = [
    (["dpc_jax.data"], "python -m dpc_jax.data"),
    (["dpc_jax.data", "check"], "python -m dpc_jax.data check"),
    (["dpc_jax.data", "synth"], "python -m dpc_jax.data synth"),
    (["dpc_jax.data", "list"], "python -m dpc_jax.data list"),
    (["dpc_jax.data", "diagnose"], "python -m dpc_jax.data diagnose"),
    (["dpc_jax.benchmark"], "python -m dpc_jax.benchmark"),
    (["dpc_jax.benchmark", "run"], "python -m dpc_jax.benchmark run"),
    (["dpc_jax.benchmark", "report"], "python -m dpc_jax.benchmark report"),
    (["dpc_jax.compare"], "python -m dpc_jax.compare"),
    (["dpc_jax.convert"], "python -m dpc_jax.convert"),
    (["dpc_jax.pretrain"], "python -m dpc_jax.pretrain"),
]
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs",
                                                                           "*.py")))
# configs/dept.py wraps a learner; CoCoOp brings fields of its own.
CONFIG_SPECS = CONFIGS + ["configs/dept.py:backbone=cocoop"]
PLACEHOLDERS = ("see its module", "TODO", "learner field")


def help_of(*argv):
    env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    for text in PLACEHOLDERS:
        assert text not in out.stdout, f"{argv}: {text!r} in --help"
    return out.stdout


def unexplained_arguments(text):
    """The options and positional arguments an argparse help lists without a help text: an
    argument line ('  --name METAVAR' or '  name') with no text after two spaces and no
    indented continuation line."""
    lines = text.splitlines()
    bare = []
    section = None
    for i, line in enumerate(lines):
        if line and not line.startswith(" "):
            section = line
            continue
        if section not in ("options:", "optional arguments:", "positional arguments:"):
            continue
        m = re.match(r"^  (\S.*?)(\s{2,}\S.*)?$", line)
        if not m or line.startswith("    "):
            continue
        explained = m.group(2) is not None or (i + 1 < len(lines) and re.match(
            r"^\s{6,}\S", lines[i + 1]) and not lines[i + 1].lstrip().startswith("-"))
        if not explained:
            bare.append(m.group(1))
    return bare


@pytest.mark.parametrize("argv,prog", ARGPARSE_COMMANDS, ids=[" ".join(a) for a, _ in
                                                                ARGPARSE_COMMANDS])
def test_argparse_help_names_the_module_and_explains_every_argument(argv, prog):
    text = help_of(*argv, "--help")
    assert text.startswith(f"usage: {prog} "), text.splitlines()[0]
    assert unexplained_arguments(text) == [], text


def test_the_argument_check_finds_an_unexplained_option():
    text = ("usage: python -m x [-h] [--a A] [--bee BEE]\n\noptions:\n  -h, --help  show this\n"
            "  --a A       explained\n  --bee BEE\n  --c C\n                 wrapped help\n")
    assert unexplained_arguments(text) == ["--bee BEE"]


def train_fields(text):
    """{field: help} of the 'config fields' list of `python -m dpc_jax.train --help`."""
    fields = {}
    listing = text.split("config fields (defaults of", 1)[1].splitlines()[1:]
    for line in listing:
        m = re.match(r"^  --config\.([\w.]+)=(.*?)(?:\s{2,}(\S.*))?$", line)
        assert m, line
        fields[m.group(1)] = (m.group(3) or "").strip()
    return fields


@pytest.mark.parametrize("spec", CONFIG_SPECS)
def test_train_help_lists_every_field_of_every_config_with_its_help(spec):
    from dpc_jax.train import _flatten
    from dpc_jax.training import train_lib

    text = help_of("dpc_jax.train", "--help", "--config", spec)
    assert text.startswith("usage: python -m dpc_jax.train "), text.splitlines()[0]
    assert f"config fields (defaults of {spec})" in text
    fields = train_fields(text)
    assert sorted(fields) == sorted(_flatten(train_lib.load_config(spec).to_dict()))
    assert [f for f, h in fields.items() if not h] == []
    # Every value the model accepts is named: a dtype or precision missing here is one a user
    # cannot find.
    for field in ("clip.dtype", "clip.precision"):
        accepted = clip._DTYPES if field == "clip.dtype" else clip._PRECISIONS
        named = set(re.findall(r"\w+", fields[field]))
        assert set(accepted) <= named, (field, fields[field])
    if "backbone.teacher_clip.dtype" in fields:
        assert set(clip._DTYPES) <= set(re.findall(r"\w+", fields["backbone.teacher_clip.dtype"]))


def test_train_help_without_a_config_shows_the_default_config():
    text = help_of("dpc_jax.train", "--help")
    assert text.startswith("usage: python -m dpc_jax.train --config ")
    assert "config fields (defaults of configs/dpc_coop.py)" in text
    assert 'pip install -e ".[torch]"' in text


# ---------------------------------------------------------------- optional dependencies

def without(packages, *argv, cwd=REPO):
    """`python -m argv...` with `packages` not importable (`import torch` raises
    ModuleNotFoundError, and importlib finds no spec, as when the package is not installed)."""
    code = ("import runpy, sys\n"
            f"for name in {list(packages)!r}:\n"
            "    sys.modules[name] = None\n"
            f"sys.argv = {list(argv)!r}\n"
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
    env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_needs(out, what, package, extra):
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (f"Error: {what} needs {package}, which is not installed: pip "
                                  f"install -e \".[{extra}]\" (from the repository folder)")


@pytest.mark.parametrize("args,what", [
    (["--config", "configs/dpc_maple.py", "--config.mode=export"], "--config.mode=export"),
    (["--config", "configs/dpc_coop.py", "--config.backbone.init_from=/x/model.pth.tar-10"],
     "config.backbone.init_from='/x/model.pth.tar-10'"),
    (["--config", "configs/dpc_coop.py:dataset=dtd,root=/nowhere,clip=ViT-B/16"],
     "config.clip.source='ViT-B/16'"),
], ids=["export", "init_from", "openai_clip"])
def test_train_without_torch_says_which_extra_before_any_work(tmp_path, args, what):
    out = without(["torch"], "dpc_jax.train", "--workdir", str(tmp_path / "w"), *args)
    assert_needs(out, what, "torch", "torch")
    assert not (tmp_path / "w").exists()  # stopped before the run made its folder


def test_convert_of_an_openai_name_without_torch_stops_before_downloading(tmp_path):
    out = without(["torch"], "dpc_jax.convert", "ViT-B/16", str(tmp_path / "out"))
    assert_needs(out, "reading OpenAI's CLIP 'ViT-B/16'", "torch", "torch")
    assert not (tmp_path / "out").exists()


def test_compare_without_matplotlib_stops_before_training(tmp_path):
    out = without(["matplotlib"], "dpc_jax.compare", "--workdir", str(tmp_path / "w"),
                  "--backbones", "coop", "--seeds", "1")
    assert_needs(out, "the chart of python -m dpc_jax.compare", "matplotlib", "plot")
    assert not (tmp_path / "w").exists()
