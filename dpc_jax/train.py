"""Train and evaluate one config: zero-shot, the stage-1 prompt learner, DPC, for every seed.

Runs the stages in `config.stages` (zero-shot, the stage-1 backbone, DPC) for every seed in
`config.seeds`, writes W/results.json and prints the base/new/H table; a rerun into the same W
resumes from its checkpoints. Override any field with `--config.field=value` (e.g.
`--config.seeds=1,2,3 --config.dhno.policy=hardest`); `--help --config FILE` lists FILE's fields.

`--config.mode=eval` re-evaluates the checkpoints saved in W. `--config.mode=export` writes each
seed's stage-1 prompt (IVLP, MaPLe) as the released PyTorch code saves it, to
W/seed_N/torch/<VLPromptLearner|MultiModalPromptLearner>/model.pth.tar-<backbone.epochs>, which
the upstream trainers load with `--model-dir W/seed_N/torch --load-epoch E`; for PromptKD it
writes the student, and with 'dpc' in config.stages its DPC stage 2 as StackSPLE_PromptKD saves
it, to W/seed_N/torch/dpc/VLPromptLearner/model.pth.tar-<dpc.epochs>.

Optional dependency: torch (pip install -e ".[torch]") for --config.mode=export,
backbone.init_from, dpc.init_from and an OpenAI .pt CLIP; without it these say so in one line.

A wrong input (config value, misspelt --config.field, data, checkpoint, path) ends the run with
one `Error: ...` line and exit status 2 (`dpc_jax.cli`; DPC_JAX_TRACEBACK=1 shows the
traceback).
"""

import os
import sys
from typing import List

from absl import app, flags, logging
from ml_collections import config_flags

from dpc_jax import cli
from dpc_jax.configs.base_to_new import field_help
from dpc_jax.training import train_lib

USAGE = ("python -m dpc_jax.train --config configs/dpc_coop.py[:key=val,...] --workdir W "
         "[--config.FIELD=VALUE ...]")

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, results.json")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; --verbosity=0 shows it
        logging.set_verbosity(logging.WARNING)
    status = cli.run_cli(_run, _CONFIG.value, _WORKDIR.value)
    if status:
        sys.exit(status)


def torch_needed_by(config) -> List[str]:
    """What in `config` reads or writes PyTorch files: export mode, every `*init_from` set,
    and a CLIP given as an OpenAI model name or .pt/.pth file."""
    from dpc_jax.convert.openai import OPENAI_MODELS

    needs = ["--config.mode=export"] if config.mode == "export" else []
    for k, v in _flatten(config.to_dict()).items():
        leaf = k.split(".")[-1]
        if (leaf == "init_from" and v) or (leaf == "source" and k.endswith("clip.source") and (
                v in OPENAI_MODELS or str(v).endswith((".pt", ".pth")))):
            needs.append(f"config.{k}={v!r}")
    return needs


def _run(config, workdir):
    needs = torch_needed_by(config)
    if needs:  # before the data and the model: not after an hour of training
        cli.require_extra("torch", " and ".join(needs))
    if config.mode == "export":
        train_lib.export_backbone(config, workdir)
        if train_lib.exports_dpc(config):
            train_lib.export_dpc(config, workdir)
    else:
        train_lib.train_and_evaluate(config, workdir)


def print_config_help(argv: List[str], name: str = "config") -> None:
    """This module's docstring, then every field of the config (`--config` if given and
    loadable, else configs/dpc_coop.py) with its default and meaning."""
    print(f"usage: {USAGE}\n")
    print((__doc__ or "").strip() + "\n")
    spec = cli.config_spec(argv, name)
    default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "dpc_coop.py")
    try:
        config = train_lib.load_config(spec or default)
        shown = spec or os.path.relpath(default)
    except Exception as e:  # the help still lists the defaults of the default config
        print(f"(--{name} {spec} did not load: {cli.message(e)}; showing configs/dpc_coop.py)")
        config, shown = train_lib.load_config(default), os.path.relpath(default)
    print("flags:\n"
          f"  --{name} FILE[:key=val,...]  a config file (configs/*.py) and its arguments:\n"
          "                               dataset=, root=, source=, clip=, variant=\n"
          "                               (configs/dept.py: backbone=)\n"
          "  --workdir DIR                checkpoints, logs, results.json (a rerun resumes)\n"
          f"  --{name}.FIELD=VALUE         set one field (the list below)\n")
    print(f"config fields (defaults of {shown}):")
    flat = _flatten(config.to_dict())
    helps = field_help(config)
    width = min(36, max(len(k) for k in flat) + 2 + len(name) + 3)
    for key, value in flat.items():
        text = helps.get(key, "")
        left = f"  --{name}.{key}={value!r}"
        print(f"{left:<{width + 11}}  {text}" if text else left)  # >= 2 spaces before the help


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser("config", print_help=print_config_help))
