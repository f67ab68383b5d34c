"""The evaluation protocols of the CoOp/DPC paper family, chosen by `config.protocol`.

- `base_to_new` (default): train on the base half of the classes, report base and new accuracy
  and their harmonic mean (`dpc_jax.evaluation.results.summarize`; results.json unchanged).
- `few_shot`: train on all classes of `config.dataset` with `config.shots` in {1, 2, 4, 8, 16}
  images per class; report the accuracy on the full test set of all classes.
- `cross_dataset`: train on all classes of the source `config.dataset` (the papers: ImageNet,
  16 shots); evaluate on the full test sets of the target datasets `config.targets` (a comma
  list; default: the other ten datasets of the paper for a real source, `world_studio,
  world_night` for the world; a source `folder` has none), each with a classifier over its own
  classes. A target `folder:DIR` is a folder dataset of your own (`dpc_jax/data/folder.py`).
- `domain_generalisation`: train as for cross_dataset; evaluate on target domains that share
  the source's classes (default: ImageNet-V2, -Sketch, -A, -R for ImageNet; `world_v2,
  world_clean, world_a, world_r` for the world). A target covering a subset of the source's
  classes (ImageNet-A and -R: 200 of 1000) is scored on that subset of the source classifier:
  `EvalSet.rows[t]` is the source class index of target class t (matched by class name).

The source's own test set is reported too (role 'source'). Which DPC prompt a target gets is
`config.dpc.transfer_prompt`: 'new' (default) the new-class mix w_n Q + (1 - w_n) P, 'base'
the base-class mix (w_b). The released CoOp+DPC (trainers/sple_coop.py, `load_model`) applies
the w_n re-weighting when DATASET.SUBSAMPLE_CLASSES is 'new', or 'all' on any dataset whose
NAME is not 'ImageNet' -- the cross-dataset targets and ImageNet-V2/-Sketch/-A/-R alike --
and the base mix on ImageNet itself, which is what 'new' does here. (The released
StackSPLE_PromptKD re-weights for 'new' only, but PromptKD's cross-dataset stage 1 is
transductive on the target and is not supported here.) The source always gets the base mix.

results.json of a protocol other than base_to_new:

    {"protocol": "cross_dataset", "source": "world", "targets": ["world_studio", ...],
     "shots": 16, "transfer_prompt": "new",
     "stages": {"<stage>": {"accuracy": {"<eval set>": {"mean": %, "std": %,
                                                        "per_seed": {"<seed>": %}}},
                            "target_average": %}}}

Eval sets are the source (few_shot: the only one) and each target, in config order; accuracy
is top-1 in percent; std is over seeds (numpy's population std, as base_to_new's);
`target_average` (transfer protocols only) is the mean over targets of their means. Each seed's
W/seed_N/<stage>/results.json holds {"accuracy": {"<eval set>": %}}.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from dpc_jax.data import registry
from dpc_jax.data.base import BaseToNewData, ImageSplit
from dpc_jax.evaluation import results as results_lib
from dpc_jax.prompts import capabilities, display_name

# Transfer protocols test on other datasets or domains than the source, with no base/new split.
TRANSFER = ("cross_dataset", "domain_generalisation")
PROTOCOLS = ("base_to_new", "few_shot") + TRANSFER
TRANSFER_PROMPTS = ("new", "base")
FEW_SHOT_SHOTS = (1, 2, 4, 8, 16)
WORLD_TARGETS = {"cross_dataset": ("world_studio", "world_night"),
                 "domain_generalisation": ("world_v2", "world_clean", "world_a", "world_r")}
DG_TARGETS = {"imagenet": registry.IMAGENET_VARIANTS}


@dataclasses.dataclass
class EvalSet:
    """One test set of a protocol: its images and labels, the class names its labels index,
    its zero-shot templates, and (domain generalisation) the source class of each label."""

    name: str
    role: str  # 'source' | 'target'
    test: ImageSplit
    classnames: list
    templates: list
    rows: Optional[np.ndarray] = None  # int [C_target]: source class index of each class


def transfer_prompt(config) -> str:
    value = config.dpc.get("transfer_prompt", "new")
    if value not in TRANSFER_PROMPTS:
        raise ValueError(f"config.dpc.transfer_prompt={value!r}; expected one of "
                         f"{TRANSFER_PROMPTS} ('new': the w_n mix, as the released CoOp+DPC "
                         f"evaluates targets; 'base': the w_b mix)")
    return value


# A transfer target that is a folder dataset of your own (`dpc_jax/data/folder.py`):
# 'folder:DIR' in config.targets.
FOLDER_TARGET = "folder:"


def folder_target(name: str) -> Optional[str]:
    """The folder of a 'folder:DIR' target, else None."""
    return name[len(FOLDER_TARGET):] if name.startswith(FOLDER_TARGET) else None


def is_folder(name: str) -> bool:
    """Whether dataset `name` is your own folder (config.dataset='folder')."""
    return not is_world(name) and registry.get(name).layout == "folder"


def is_world(name: str) -> bool:
    from dpc_jax.data import world

    return world.world_dataset_domain(name) is not None


def dataset_name(name: str, field: str) -> str:
    """The key of a world or registry dataset; an unknown name is an error naming `field`."""
    from dpc_jax.data import world

    name = name.strip()
    if is_world(name):
        return name
    if field == "targets" and folder_target(name) is not None:
        root = folder_target(name)
        if not os.path.isdir(root):
            raise ValueError(f"config.targets: {name!r}: no folder {root!r}; expected a folder "
                             f"dataset (DIR/test/<class>/<image>, or DIR/split.json)")
        return FOLDER_TARGET + os.path.abspath(root)
    try:
        return registry.get(name).name
    except KeyError:
        raise ValueError(f"config.{field}: unknown dataset {name!r}; expected a world dataset "
                         f"({world.world_datasets()}) or one of {sorted(registry.DATASETS)}"
                         ) from None


def load_dataset(config, name: str, seed: int, shots: int) -> BaseToNewData:
    """All classes of world or registry dataset `name`, few-shot sampled with `shots` (< 1:
    full splits) for `seed`."""
    from dpc_jax.data import sources, train_sets

    if folder_target(name) is not None:
        return sources.build_dataset("folder", folder_target(name), shots=shots, seed=seed)
    return train_sets.load_named(config, name, seed, shots)


def class_rows(source_classnames: Sequence[str], target: str, target_classnames: Sequence[str],
               source: str) -> np.ndarray:
    """int [C_target]: the source class index of each target class (by name); every target
    class must be a source class, and source names must be unambiguous."""
    index = {}
    for i, c in enumerate(source_classnames):
        index.setdefault(c, []).append(i)
    missing = [c for c in target_classnames if c not in index]
    if missing:
        raise ValueError(f"config.targets: {target!r} has {len(missing)} class(es) that the "
                         f"source config.dataset={source!r} lacks, e.g. {missing[:5]}; "
                         f"domain_generalisation targets must share the source's classes "
                         f"(use config.protocol='cross_dataset' for other classes)")
    ambiguous = [c for c in target_classnames if len(index[c]) > 1]
    if ambiguous:
        raise ValueError(f"config.targets: {target!r} classes {ambiguous[:5]} name several "
                         f"classes of the source {source!r}; the class mapping is ambiguous")
    if len(set(target_classnames)) != len(target_classnames):
        raise ValueError(f"config.targets: {target!r} names a class twice")
    return np.asarray([index[c][0] for c in target_classnames], np.int64)


class Protocol:
    """One evaluation protocol, chosen once from the config (`get`): what a seed trains on and
    is evaluated on, which prompt each test set gets, and how results are summarised and read.
    """

    name = ""
    transfer = False  # test sets of other datasets (`targets`)

    def __init__(self, config):
        self.config = config

    def targets(self) -> list:
        """The target datasets of a transfer protocol (`config.targets`, or the default)."""
        config = self.config
        if not self.transfer:
            if config.get("targets", ""):
                raise ValueError(f"config.targets={config.targets!r} with config.protocol="
                                 f"{self.name!r}: targets belong to {TRANSFER} only")
            return []
        source = config.dataset
        value = config.get("targets", "")
        if value:
            names = [dataset_name(s, "targets") for s in str(value).split(",") if s.strip()]
        elif is_world(source):
            names = list(WORLD_TARGETS[self.name])
        elif is_folder(source):
            raise ValueError(f"config.targets is empty and the source is config.dataset="
                             f"{source!r}, which has no default targets; set config.targets "
                             f"to your other folder datasets as folder:DIR (comma-separated), "
                             f"or to registered datasets read from config.root")
        else:
            names = self.default_targets(source)
        if not names:
            raise ValueError(f"config.targets={value!r} is empty; expected a comma-separated "
                             f"list")
        for name in names:
            if (is_folder(source) and folder_target(name) is not None
                    and os.path.abspath(str(config.root)) == folder_target(name)):
                raise ValueError(f"config.targets lists the source's folder {name!r} "
                                 f"(config.root); its test set is always reported as the "
                                 f"source")
            if name == source:
                raise ValueError(f"config.targets lists the source {name!r} (config.dataset); "
                                 f"its test set is always reported as the source")
            if is_world(name) != is_world(source):
                raise ValueError(f"config.targets: {name!r} with source config.dataset="
                                 f"{source!r}: world datasets and real ones need different "
                                 f"CLIPs; use {'world' if is_world(source) else 'real'} "
                                 f"targets")
            self.check_target(name)
        if len(set(names)) != len(names):
            raise ValueError(f"config.targets={value!r} lists a dataset twice")
        return names

    def default_targets(self, source: str) -> list:
        """A real source's targets when config.targets is empty (the world's: WORLD_TARGETS)."""
        return []

    def check_shots(self) -> None:
        pass

    def check_target(self, name: str) -> None:
        pass

    def check(self, learner) -> None:
        """Fail early, naming the field, on protocol settings the run cannot use."""
        config = self.config
        transfer_prompt(config)
        self.targets()
        if not is_world(config.dataset) and registry.get(config.dataset).test_only:
            raise ValueError(f"config.dataset={config.dataset!r} has test data only; a "
                             f"{self.name!r} source needs training data (e.g. imagenet)")
        self.check_shots()  # positive shots: `train_lib.check_config` refused others already
        if learner.train_split != "fewshot" or capabilities.distils(learner):
            raise ValueError(f"config.protocol={self.name!r} with config.backbone.name="
                             f"{learner.name!r}: protocols other than base_to_new train on the "
                             f"labelled few-shot split without a teacher; {learner.name!r} "
                             f"does not (its transfer settings distil on the target's "
                             f"unlabeled images)")
        if config.dpc.get("init_from", ""):
            raise ValueError(f"config.dpc.init_from={config.dpc.init_from!r} with "
                             f"config.protocol={self.name!r}: importing a released stage 2 is "
                             f"for base_to_new only")

    def data(self, seed: int):
        """(training source, new half or None, eval sets or None) of one seed: base_to_new's
        halves, or the source's classes with the protocol's test sets."""
        from dpc_jax.data import train_sets

        config = self.config
        source = train_sets.load_named(config, config.dataset, seed, config.shots)
        return source, None, self.eval_sets(source, seed)

    def eval_sets(self, source: BaseToNewData, seed: int) -> list:
        """The protocol's test sets for one seed: the source's, then each target's (full test
        sets, all their classes)."""
        config = self.config
        out = [EvalSet(config.dataset, "source", source.test, list(source.classnames),
                       list(source.templates))]
        for name in self.targets():
            data = load_dataset(config, name, seed, shots=0)
            out.append(EvalSet(name, "target", data.test, list(data.classnames),
                               list(data.templates), self.rows(source, name, data)))
        return out

    def rows(self, source: BaseToNewData, name: str, data: BaseToNewData):
        return None

    def select_prompt(self, role: str, base, new):
        """The prompt (or learner state) of an eval set: the source gets the base one; a target
        the one `config.dpc.transfer_prompt` names."""
        if role == "source":
            return base
        return new if transfer_prompt(self.config) == "new" else base

    def summarize(self, per_seed: dict) -> dict:
        """{stage: {seed: {"accuracy": {set: %}}}} -> the results.json layout of the module
        docstring."""
        config, names = self.config, self.targets()
        stages = {}
        for stage, by_seed in per_seed.items():
            sets = list(next(iter(by_seed.values()))["accuracy"])
            acc = {}
            for s in sets:
                values = np.array([r["accuracy"][s] for r in by_seed.values()])
                acc[s] = {"mean": float(values.mean()), "std": float(values.std()),
                          "per_seed": {str(seed): float(r["accuracy"][s])
                                       for seed, r in by_seed.items()}}
            stages[stage] = {"accuracy": acc}
            if self.transfer:
                stages[stage]["target_average"] = float(np.mean([acc[t]["mean"]
                                                                 for t in names]))
        out = {"protocol": self.name, "source": config.dataset, "targets": names,
               "shots": int(config.shots), "transfer_prompt": transfer_prompt(config),
               "stages": stages}
        # Seeds whose source had classes with fewer training images than `shots`.
        used = {str(seed): r["shots_used"] for by_seed in per_seed.values()
                for seed, r in by_seed.items() if "shots_used" in r}
        if used:
            out["shots_used"] = dict(sorted(used.items(), key=lambda kv: int(kv[0])))
        return out

    def holds(self, result) -> bool:
        """Whether one seed's stage result (W/seed_N/<stage>/results.json) has this
        protocol's layout: an accuracy for each of its test sets, the source first."""
        accuracy = result.get("accuracy") if isinstance(result, dict) else None
        return isinstance(accuracy, dict) and list(accuracy) == [self.config.dataset,
                                                                 *self.targets()]

    def summarize_workdir(self, workdir: str, order: Sequence[str] = ()) -> dict:
        """`summarize` of every seed's stage results a run directory holds
        (W/seed_N/<stage>/results.json, stages in `order` first) that have this protocol's
        layout; {} when none. The trainer and the benchmark grid rebuild results.json so."""
        per_seed = {}
        for stage, by_seed in results_lib.read_seed_results(workdir, order).items():
            kept = {seed: r for seed, r in by_seed.items() if self.holds(r)}
            if kept:
                per_seed[stage] = kept
        return self.summarize(per_seed) if per_seed else {}

    def seeds(self, results: dict, stage: str) -> Optional[set]:
        """The seeds a summary holds for `stage` (None: the stage is not in it)."""
        entry = results.get("stages", {}).get(stage) if isinstance(results, dict) else None
        if not isinstance(entry, dict) or not entry.get("accuracy"):
            return None
        return set(next(iter(entry["accuracy"].values()))["per_seed"])

    def seed_line(self, stage: str, seed: int, result: dict) -> str:
        return f"seed {seed} {stage}: " + " ".join(f"{k} {v:.2f}"
                                                   for k, v in result["accuracy"].items())

    def format_table(self, results: dict) -> str:
        pretty = display_name(self.config.backbone.name)
        names = {**results_lib.STAGE_NAMES, "backbone": pretty, "dpc": f"{pretty}+DPC"}
        stages = results["stages"]
        sets = list(next(iter(stages.values()))["accuracy"])
        avg = results["protocol"] in TRANSFER
        width = max(8, *(len(s) for s in sets))
        head = f"{'method':<20} " + " ".join(f"{s:>{width}}" for s in sets)
        lines = [head + (f" {'avg':>{width}}" if avg else "")]
        for stage, r in stages.items():
            row = f"{names.get(stage, stage):<20} " + " ".join(
                f"{r['accuracy'][s]['mean']:{width}.2f}" for s in sets)
            lines.append(row + (f" {r['target_average']:{width}.2f}" if avg else ""))
        return f"{results['protocol']} (source {results['source']}, {results['shots']} " \
               f"shots)\n" + "\n".join(lines)


class BaseToNew(Protocol):
    """Train on the base half of the classes; base and new accuracy and their H."""

    name = "base_to_new"

    def check(self, learner) -> None:
        transfer_prompt(self.config)
        self.targets()

    def data(self, seed: int):
        from dpc_jax.data import train_sets

        base, new = train_sets.load_benchmark(self.config, seed)
        return base, new, None

    def summarize(self, per_seed: dict) -> dict:
        return results_lib.summarize(per_seed)

    def holds(self, result) -> bool:
        return isinstance(result, dict) and {"base", "new"} <= set(result)

    def seeds(self, results: dict, stage: str) -> Optional[set]:
        entry = results.get(stage) if isinstance(results, dict) else None
        if not isinstance(entry, dict) or "per_seed" not in entry:
            return None
        return set(entry["per_seed"])

    def seed_line(self, stage: str, seed: int, result: dict) -> str:
        return (f"seed {seed} {stage}: base {result['base']:.2f} new {result['new']:.2f} "
                f"H {result['hm']:.2f}")

    def format_table(self, results: dict) -> str:
        return results_lib.format_table(results, self.config.backbone.name)


class FewShot(Protocol):
    """All classes of the dataset at 1-16 shots; accuracy on its full test set."""

    name = "few_shot"

    def check_shots(self) -> None:
        if self.config.shots not in FEW_SHOT_SHOTS:
            raise ValueError(f"config.shots={self.config.shots!r} with config.protocol="
                             f"'few_shot'; expected one of {FEW_SHOT_SHOTS}")


class CrossDataset(Protocol):
    """Train on the source; evaluate on other datasets, each over its own classes."""

    name = "cross_dataset"
    transfer = True

    def default_targets(self, source: str) -> list:
        return [d for d in registry.BASE_TO_NEW if d != source]

    def check_target(self, name: str) -> None:
        if folder_target(name) is None and not is_world(name) and registry.get(name).test_only:
            raise ValueError(f"config.targets: {name!r} is a domain-shift set of ImageNet's "
                             f"classes; it belongs to config.protocol='domain_generalisation'")


class DomainGeneralisation(Protocol):
    """Train on the source; evaluate on shifted domains of its classes."""

    name = "domain_generalisation"
    transfer = True

    def default_targets(self, source: str) -> list:
        if source in DG_TARGETS:
            return list(DG_TARGETS[source])
        raise ValueError(f"config.targets is empty and source config.dataset={source!r} has no "
                         f"default domain-shift targets (only {sorted(DG_TARGETS)} and the "
                         f"world do); set config.targets to datasets sharing its classes")

    def rows(self, source: BaseToNewData, name: str, data: BaseToNewData):
        return class_rows(source.classnames, name, data.classnames, self.config.dataset)


_PROTOCOLS = {cls.name: cls for cls in (BaseToNew, FewShot, CrossDataset,
                                        DomainGeneralisation)}


def get(config) -> Protocol:
    """The protocol `config.protocol` names ('base_to_new' when the field is absent)."""
    value = config.get("protocol", "base_to_new")
    if value not in _PROTOCOLS:
        raise ValueError(f"config.protocol={value!r}; expected one of {PROTOCOLS}")
    return _PROTOCOLS[value](config)
