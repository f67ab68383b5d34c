"""Per-seed results, their summary over seeds (the papers' convention), and the table."""

from __future__ import annotations

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


def format_table(results: dict, backbone_name: str = "coop") -> str:
    pretty = display_name(backbone_name)
    names = {**STAGE_NAMES, "backbone": pretty, "dpc": f"{pretty}+DPC"}
    lines = [f"{'method':<20} {'base':>7} {'new':>7} {'H':>7}"]
    for stage, r in results.items():
        lines.append(f"{names.get(stage, stage):<20} {r['base']:7.2f} {r['new']:7.2f} "
                     f"{r['hm']:7.2f}")
    return "\n".join(lines)
