"""Per-seed results, their summary over seeds (the papers' convention), and the table."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from dpc_jax.prompts import display_name

STAGE_NAMES = {"zeroshot": "zero-shot CLIP"}


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def scores(base: float, new: float) -> dict:
    return {"base": base, "new": new, "hm": harmonic_mean(base, new)}


def summarize(per_seed: dict) -> dict:
    """Mean over seeds of base and new, H of the means (as the papers report), std, per seed."""
    out = {}
    for stage, by_seed in per_seed.items():
        base = np.array([r["base"] for r in by_seed.values()])
        new = np.array([r["new"] for r in by_seed.values()])
        out[stage] = {"base": float(base.mean()), "new": float(new.mean()),
                      "hm": harmonic_mean(float(base.mean()), float(new.mean())),
                      "base_std": float(base.std()), "new_std": float(new.std()),
                      "per_seed": {str(s): r for s, r in by_seed.items()}}
    return out


def read_seed_results(workdir: str, order: Sequence[str] = ()) -> dict:
    """{stage: {seed: result}} of every W/seed_N/<stage>/results.json a run directory holds,
    seeds ascending, stages in `order` first, then the others by name ({} when none)."""
    per_seed: dict = {}
    if not os.path.isdir(workdir):
        return {}
    for entry in os.listdir(workdir):
        seed_dir = os.path.join(workdir, entry)
        if not (entry.startswith("seed_") and entry[5:].isdigit() and os.path.isdir(seed_dir)):
            continue
        for stage in os.listdir(seed_dir):
            path = os.path.join(seed_dir, stage, "results.json")
            if os.path.isfile(path):
                with open(path) as f:
                    per_seed.setdefault(stage, {})[int(entry[5:])] = json.load(f)
    rank = {stage: i for i, stage in enumerate(order)}
    stages = sorted(per_seed, key=lambda stage: (rank.get(stage, len(rank)), stage))
    return {stage: dict(sorted(per_seed[stage].items())) for stage in stages}


def format_table(results: dict, backbone_name: str = "coop") -> str:
    pretty = display_name(backbone_name)
    names = {**STAGE_NAMES, "backbone": pretty, "dpc": f"{pretty}+DPC"}
    lines = [f"{'method':<20} {'base':>7} {'new':>7} {'H':>7}"]
    for stage, r in results.items():
        lines.append(f"{names.get(stage, stage):<20} {r['base']:7.2f} {r['new']:7.2f} "
                     f"{r['hm']:7.2f}")
    return "\n".join(lines)
