"""Config arguments (`--config file.py:key=val,...`), dataset keys, and the settings that
depend on the dataset (and, on the world, the learner's own world schedule). Values only; the
config files apply them with `apply_settings`."""

from __future__ import annotations

ARGUMENTS = ("dataset", "root", "source", "clip", "variant", "backbone", "protocol")

# The embedded world: its shipped CLIP and tokenizer, short schedules (minutes on a CPU).
WORLD = {
    "clip.source": "world",
    "clip.tokenizer": "world",
    "stored_size": 0,
    "eval_batch_size": 256,
    "dpc.epochs": 5,
    # 32-px images: an 8%-area crop is 9x9 pixels and usually loses the object, so the world
    # crops at least half the area.
    "crop_scale": (0.5, 1.0),
    "log_every_steps": 20,
    # Its step is small: a stretch of steps per call saves the per-step dispatch and host read
    # (the same numbers, bitwise; docs/benchmarks.md).
    "steps_per_call": 64,
}

# Per-dataset overrides of the released DPC configs: EuroSAT has 5 base classes, so K = 8
# cannot work there (the reference would crash); K = 4 is the largest value that leaves one
# wrong class.
DATASET_SETTINGS = {
    "world": WORLD,
    "eurosat": {"dhno.top_k": 4},
}

def parse_arguments(arg) -> dict:
    """'dataset=x,root=y' -> {'dataset': 'x', 'root': 'y'}; unknown keys are errors."""
    out = {}
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument {item!r}: expected key=value "
                             f"(keys: {', '.join(ARGUMENTS)})")
        key, value = item.split("=", 1)
        if key not in ARGUMENTS:
            raise ValueError(f"unknown config argument {key!r}; expected one of "
                             f"{', '.join(ARGUMENTS)}")
        out[key] = value
    return out


def variant(arg, allowed) -> str:
    """The `variant=...` argument of a config file that offers several settings (the first of
    `allowed` by default); a variant the file does not offer is an error naming the choices."""
    value = parse_arguments(arg).get("variant", allowed[0])
    if value not in allowed:
        raise ValueError(f"config argument variant={value!r}; this config offers "
                         f"{', '.join(allowed)}")
    return value


def dataset_key(name: str) -> str:
    """The registry key of a dataset named by key or CoOp class name ('EuroSAT' -> 'eurosat'),
    'world' / 'world_<domain>', or 'folder' (your own images at `root`, docs/data.md)."""
    from dpc_jax.data import registry, world

    if world.world_dataset_domain(name) is not None:  # 'world' or 'world_<domain>'
        return name

    return registry.get(name).name


def apply_settings(config) -> None:
    """The dataset's settings, then, on the world, the learner's world schedule
    (`LearnerInfo.world`, declared by the learner)."""
    from dpc_jax.data import world
    from dpc_jax.prompts import get_learner

    # Every world dataset (a shifted domain as the training source, too) takes the world's.
    dataset = "world" if world.world_dataset_domain(config.dataset) else config.dataset
    config.update_from_flattened_dict(dict(DATASET_SETTINGS.get(dataset, {})))
    if dataset == "world":
        config.update_from_flattened_dict(dict(get_learner(config.backbone.name).info.world))
