"""Two-stage DPC training and evaluation: `train_and_evaluate(config, workdir)`.

This module checks the config (`checks`), loads the CLIP once (`dpc_jax.convert.load`), builds
what every seed shares once (`run.Run`: learner, evaluator, compiled stage programs) and runs
the configured stages for every seed (`stages`), then writes results.json as the protocol
summarises it; `export_backbone` and `export_dpc` write PyTorch files of trained stages.
docs/architecture.md describes the pieces.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
import ml_collections
from ml_collections.config_flags import config_flags
from tqdm import tqdm

from dpc_jax.convert.load import load_clip_and_tokenizer
from dpc_jax.data.sources import shots_used
from dpc_jax.evaluation import protocols
from dpc_jax.files import write_json
from dpc_jax.mesh import make_mesh, replicate
from dpc_jax.prompts import capabilities, get_learner
from dpc_jax.training import compile_cache, stage1, stage2, teacher
from dpc_jax.training.checkpoints import WorkdirLock
from dpc_jax.training.checks import (STAGES, check_config, check_resumed_settings, parse_list,
                                     preflight)
from dpc_jax.training.run import Run
from dpc_jax.training.seed import SeedRun
from dpc_jax.training.stages import STAGE_RUNNERS


def load_config(spec: str, lock: bool = False) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> its `get_config(arg)`: the loader `--config` uses on the
    command line, for tests and notebooks."""
    return config_flags.ConfigFileFlagParser("config", lock_config=lock).parse(spec)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: Sequence[Callable] = ()) -> dict:
    """Run the configured stages for every seed, write workdir/results.json (the summary of
    every seed the workdir holds, `_merge_results`) and config.json, and return this run's
    summary.

    `hooks` are called after every training step (see `loop.run_stage`)."""
    check_config(config)
    if config.mode == "export":
        raise ValueError("config.mode='export' writes PyTorch checkpoints and trains nothing: "
                         "call export_backbone(config, workdir) and, for a learner with a "
                         "released DPC trainer's format, "
                         "export_dpc(config, workdir) (the command line does)")
    if config.distributed:
        initialize_distributed(config)  # before anything touches the devices
    compile_cache.enable(config.get("compilation_cache", ""))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir!r} is a file; expected a directory (new or one "
                         f"a run wrote)")
    created = _missing_folders(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        raise ValueError(f"--workdir {workdir!r} cannot be created: a parent of it is a "
                         f"file") from None
    except OSError as e:  # no permission, a read-only or full file system
        raise ValueError(f"--workdir {workdir!r} cannot be created: {e.strerror or e} "
                         f"({e.filename or workdir}); choose a writable place") from None
    try:
        with WorkdirLock(workdir):
            return _run_locked(config, workdir, hooks)
    except BaseException:
        # A run refused (or stopped) before it wrote anything leaves no empty workdir behind.
        if jax.process_index() == 0:
            _remove_empty(created)
        raise


def _missing_folders(path: str) -> list:
    """`path` and those of its parents that do not exist, deepest first."""
    out, path = [], os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        out.append(path)
        path = os.path.dirname(path)
    return out


def _remove_empty(folders: list) -> None:
    """Remove each of `folders` (deepest first) that is empty; stop at the first that is not."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            continue
        except OSError:  # not empty: it holds something of this run's or the user's
            return


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize` (once per process) with the config's coordinator_address,
    num_processes and process_id where they are set; JAX detects the rest (TPU pod slices,
    SLURM, Open MPI; JAX_COORDINATOR_ADDRESS). CPU processes use gloo collectives, JAX's
    default."""
    if jax.distributed.is_initialized():  # a notebook's second run
        return
    given = {"coordinator_address": config.coordinator_address or None,
             "num_processes": config.num_processes if config.num_processes > 0 else None,
             "process_id": config.process_id if config.process_id >= 0 else None}
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


def _run_locked(config: ml_collections.ConfigDict, workdir: str, hooks) -> dict:
    results_path = os.path.join(workdir, "results.json")
    earlier = _read_results(results_path)  # checked before anything trains
    stages = parse_list(config.stages, "stages", STAGES)
    seeds = parse_list(config.seeds, "seeds", cast=int)
    protocol = protocols.get(config)
    train = config.mode == "train"
    # Every seed's resumed stages first (reads settings.json only): a rerun with changed
    # settings is refused before any stage of any seed runs.
    check_resumed_settings(config, workdir, seeds, stages, train)
    run = _build_run(config, hooks)
    per_seed = {stage: {} for stage in stages}
    for seed in seeds:
        seed_run = SeedRun.create(run, seed, workdir, train_mode=train)
        preflight(seed_run, stages, train)
        if train and {"backbone", "dpc"} <= set(stages) and config.get("compile_ahead", True):
            seed_run.before_stage1 = stage2.compile_ahead
        for stage in stages:
            result = STAGE_RUNNERS[stage](seed_run, train)
            used = shots_used(seed_run.base, config.shots) if stage != "zeroshot" else None
            if used:  # what a short class trained on, beside the requested config.shots
                result = {**result, "shots_used": used}
            per_seed[stage][seed] = result
            if jax.process_index() == 0:
                os.makedirs(os.path.join(seed_run.seed_dir, stage), exist_ok=True)
                write_json(os.path.join(seed_run.seed_dir, stage, "results.json"), result)
            tqdm.write(protocol.seed_line(stage, seed, result))
    results = protocol.summarize(per_seed)
    if jax.process_index() == 0:
        merged = _merge_results(earlier, results, workdir, protocol)
        seeds_held = _seeds_held(merged, protocol)
        # The config of the runs that wrote results.json, with the seeds it holds: written
        # when this run has finished, so a refused or failed run leaves the record of the
        # last finished one in place.
        record = json.loads(config.to_json_best_effort())
        record["seeds"] = ",".join(str(s) for s in seeds_held)
        write_json(results_path, merged)  # first: config.json describes the results it holds
        write_json(os.path.join(workdir, "config.json"), record)
        if seeds_held != sorted(seeds):
            print(f"{results_path} holds seeds {record['seeds']} (this run: {config.seeds})",
                  flush=True)
    print(protocol.format_table(results), flush=True)
    return results


def _merge_results(earlier: dict, results: dict, workdir: str, protocol) -> dict:
    """What results.json holds after this run: the summary of every seed's stage results in
    the workdir (W/seed_N/<stage>/results.json of this protocol's layout), so seeds and
    stages of earlier runs stay beside this run's (`--config.seeds=2` on a finished seed-1
    workdir gives the mean over both; `--config.stages=zeroshot` drops nothing). An earlier
    results.json of another protocol (or, beyond base_to_new, another source, targets or
    shots) is kept beside it as results.<protocol>.json, and results.json then holds this
    run's results only."""
    if earlier:
        old_protocol = earlier.get("protocol", "base_to_new")
        new_protocol = results.get("protocol", "base_to_new")
        if old_protocol != new_protocol or (new_protocol != "base_to_new" and any(
                earlier.get(k) != results.get(k) for k in ("source", "targets", "shots"))):
            name = f"results.{old_protocol}.json"
            write_json(os.path.join(workdir, name), earlier)
            print(f"the earlier results.json ({old_protocol}) is kept as {name}", flush=True)
            return results
    return protocol.summarize_workdir(workdir, STAGES) or results


def _seeds_held(results: dict, protocol) -> list:
    """The seeds of any stage of a results.json summary, ascending."""
    held = set().union(*(protocol.seeds(results, stage) or set() for stage in STAGES))
    return sorted(int(s) for s in held)


def _read_results(path: str) -> dict:
    """An earlier results.json of the workdir ({} when absent; a damaged one is refused
    rather than overwritten)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); move it away (the per-seed results stay "
                         f"in seed_N/<stage>/results.json) and rerun") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} holds a {type(results).__name__}; expected the per-stage "
                         f"summary dict; move it away and rerun")
    return results


def _build_run(config: ml_collections.ConfigDict, hooks: Sequence[Callable] = ()) -> Run:
    """The run every seed shares: the mesh, the CLIP (loaded once, replicated), the learner."""
    mesh = make_mesh()
    clip_config, clip_params, tokenizer = load_clip_and_tokenizer(config)
    return teacher.build_run(config, mesh, clip_config, replicate(clip_params, mesh), tokenizer,
                             hooks)


def export_backbone(config: ml_collections.ConfigDict, workdir: str) -> list:
    """Write each seed's trained stage-1 prompt in the released PyTorch code's checkpoint layout,
    to workdir/seed_N/torch/<model dir>/model.pth.tar-<backbone.epochs>; returns the paths."""
    check_config(config)
    run = _build_run(config)
    paths = []
    for seed in parse_list(config.seeds, "seeds", cast=int):
        seed_run = SeedRun.create(run, seed, workdir, train_mode=False)
        prompt, state = stage1.stage1_prompt(seed_run, train=False)
        if jax.process_index() == 0:
            exporter = capabilities.torch_format(run.learner, "config.mode=export")
            paths.append(exporter.export_torch_prompt(
                prompt, os.path.join(seed_run.seed_dir, "torch"), config.backbone.epochs,
                state=state))
            tqdm.write(f"seed {seed}: wrote {paths[-1]}")
    return paths


def exports_dpc(config: ml_collections.ConfigDict) -> bool:
    """Whether export mode also writes stage 2: 'dpc' is a configured stage and the learner
    has a released DPC trainer's layout."""
    learner = get_learner(config.backbone.get("name", ""))
    return ("dpc" in parse_list(config.stages, "stages", STAGES)
            and bool(capabilities.torch_dpc_trainer(learner)))


def export_dpc(config: ml_collections.ConfigDict, workdir: str) -> list:
    """Write each seed's trained (or imported) DPC stage 2 in the released DPC trainer's layout
    under workdir/seed_N/torch/dpc (that trainer's `--model-dir`; the learner's
    `export_torch_dpc` names the file); returns the paths.
    Reference mode only: the file stores theta, the released parameterisation."""
    if config.dpc.mode != "reference":
        raise ValueError(f"config.dpc.mode={config.dpc.mode!r}: the released DPC trainers store "
                         f"theta of the 'reference' (converse) parameterisation; a 'paper' "
                         f"stage 2 has no equivalent file")
    check_config(config)
    run = _build_run(config)
    paths = []
    for seed in parse_list(config.seeds, "seeds", cast=int):
        seed_run = SeedRun.create(run, seed, workdir, train_mode=False)
        params, base_state, _ = stage2.dpc_model(seed_run, train=False)
        if jax.process_index() == 0:
            exporter = capabilities.torch_dpc_format(run.learner, "config.mode=export")
            paths.append(exporter.export_torch_dpc(
                params["parallel"], base_state, os.path.join(seed_run.seed_dir, "torch", "dpc"),
                config.dpc.epochs))
            tqdm.write(f"seed {seed}: wrote {paths[-1]}")
    return paths
