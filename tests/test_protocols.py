"""The evaluation protocols (few_shot, cross_dataset, domain_generalisation) on world variants.

One tiny training run (few_shot: all 64 classes, 2 shots) is shared: the transfer protocols
train exactly the same (all classes of the source), so they re-evaluate its checkpoints with
config.mode='eval'. Test sets are cut to 2 images per class.
"""

import json
import os

import jax
import numpy as np
import pytest

from dpc_jax.data import train_sets, world
from dpc_jax.evaluation import evaluator as evaluator_lib
from dpc_jax.evaluation import protocols
from dpc_jax.prompts import get_learner
from dpc_jax.training import train_lib
from helpers import _imagenet_tree, _jpeg, small_config, tree_equal

TEST_PER_CLASS = 2


def tiny(**changes):
    c = small_config(**changes)
    c.backbone.epochs = 1
    return c


class Spy:
    """Records every `Evaluator.accuracy` call: its key, rows, labels, prompt, and the
    classifier `predict` was given (after any row selection)."""

    def __init__(self, mp):
        self.calls = []
        accuracy, predict = evaluator_lib.Evaluator.accuracy, evaluator_lib.Evaluator.predict
        spy = self

        def acc(ev, learner, split, prompt, class_texts, key, state=None, consts=None,
                rows=None):
            spy.calls.append({"key": key, "rows": rows, "labels": np.asarray(split.labels),
                              "prompt": jax.device_get(prompt), "learner": learner.name})
            out = accuracy(ev, learner, split, prompt, class_texts, key, state, consts, rows)
            spy.calls[-1]["accuracy"] = out
            return out

        def pred(ev, learner, prompt, classifier, features, consts=None):
            spy.calls[-1]["classifier"] = jax.tree_util.tree_map(np.asarray, classifier)
            return predict(ev, learner, prompt, classifier, features, consts)

        mp.setattr(evaluator_lib.Evaluator, "accuracy", acc)
        mp.setattr(evaluator_lib.Evaluator, "predict", pred)

    def stage(self, learner):
        """{eval set: call} of one learner's evaluation (the last one recorded)."""
        return {c["key"].split(" ", 2)[2]: c for c in self.calls if c["learner"] == learner}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The few_shot protocol trained end to end; records the training sets it built."""
    workdir = str(tmp_path_factory.mktemp("protocols"))
    built = []
    make = train_sets.make_train_set
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(world.SPLIT_SIZES, "test", TEST_PER_CLASS)

        def record(split, num_classes, *a, **kw):
            built.append((np.asarray(split.labels), num_classes))
            return make(split, num_classes, *a, **kw)

        from dpc_jax.training import seed
        mp.setattr(seed, "make_train_set", record)
        spy = Spy(mp)
        results = train_lib.train_and_evaluate(tiny(protocol="few_shot"), workdir)
    return workdir, results, built, spy


def evaluate(workdir, protocol, **changes):
    """Re-evaluate the trained workdir under another protocol; (results, spy)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(world.SPLIT_SIZES, "test", TEST_PER_CLASS)
        spy = Spy(mp)
        results = train_lib.train_and_evaluate(
            tiny(protocol=protocol, mode="eval", **changes), workdir)
    return results, spy


@pytest.fixture(scope="module")
def cross(trained):
    return evaluate(trained[0], "cross_dataset")


@pytest.fixture(scope="module")
def domain(trained):
    return evaluate(trained[0], "domain_generalisation", stages="backbone,dpc",
                    **{"dpc.transfer_prompt": "base"})


def test_few_shot_trains_and_scores_all_classes(trained):
    workdir, results, built, spy = trained
    for labels, num_classes in built:  # stage 1 and stage 2: all 64 classes, 2 shots each
        assert num_classes == world.NUM_CLASSES
        assert np.array_equal(np.bincount(labels, minlength=64), np.full(64, 2))
    assert len(built) == 1  # one training set serves both stages
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["protocol"] == "few_shot" and on_disk["targets"] == []
    assert set(on_disk["stages"]) == {"zeroshot", "backbone", "dpc"}
    for stage, r in on_disk["stages"].items():
        assert list(r["accuracy"]) == ["world"] and "target_average" not in r
        acc = r["accuracy"]["world"]
        assert acc["per_seed"]["1"] == acc["mean"] and acc["std"] == 0.0
        with open(os.path.join(workdir, "seed_1", stage, "results.json")) as f:
            assert json.load(f) == {"accuracy": {"world": acc["mean"]}}
    for call in spy.calls:  # the full test set of all 64 classes, one classifier row each
        assert call["rows"] is None and len(call["labels"]) == 64 * TEST_PER_CLASS
        assert jax.tree_util.tree_leaves(call["classifier"])[0].shape[0] == 64


def test_cross_dataset_targets_use_their_own_classes(trained, cross):
    results, spy = cross
    assert results["protocol"] == "cross_dataset"
    assert results["targets"] == ["world_studio", "world_night"]
    studio, night = (world.get_domain(d) for d in ("studio", "night"))
    for stage in ("zeroshot", "backbone", "dpc"):
        r = results["stages"][stage]
        assert list(r["accuracy"]) == ["world", "world_studio", "world_night"]
        assert r["target_average"] == pytest.approx(np.mean(
            [r["accuracy"][t]["mean"] for t in results["targets"]]))
        # Same training, same source test set: the few_shot run's numbers.
        assert r["accuracy"]["world"] == trained[1]["stages"][stage]["accuracy"]["world"]
    calls = spy.stage("coop")
    for name, spec in (("world_studio", studio), ("world_night", night)):
        call = calls[name]
        n = len(spec.classnames)
        assert call["rows"] is None
        assert jax.tree_util.tree_leaves(call["classifier"])[0].shape[0] == n
        assert np.array_equal(call["labels"], np.repeat(np.arange(n), TEST_PER_CLASS))
    # Zero-shot CLIP reads each target with its own template.
    zs = [c for c in spy.calls if c["learner"] == "zsclip"]
    assert len(zs) == 3
    # DPC with transfer_prompt 'new' and w_n = 0: targets get the stage-1 prompt P exactly,
    # the source the base mix.
    bb, dpc = results["stages"]["backbone"], results["stages"]["dpc"]
    for t in results["targets"]:
        assert dpc["accuracy"][t] == bb["accuracy"][t]
    dpc_calls = [c for c in spy.calls if c["learner"] == "coop"][-3:]
    bb_calls = [c for c in spy.calls if c["learner"] == "coop"][:3]
    assert not tree_equal(dpc_calls[0]["prompt"], dpc_calls[1]["prompt"])
    assert tree_equal(dpc_calls[1]["prompt"], bb_calls[1]["prompt"])


def test_domain_generalisation_scores_subsets_of_the_source_classifier(trained, domain):
    results, spy = domain
    assert results["protocol"] == "domain_generalisation"
    assert results["targets"] == ["world_v2", "world_clean", "world_a", "world_r"]
    assert results["transfer_prompt"] == "base"
    coop = [c for c in spy.calls if c["learner"] == "coop"]
    assert [c["key"] for c in coop] == [f"seed 1 {s}" for s in ["world"] + results["targets"]] * 2
    bb_calls = {c["key"].split(" ", 2)[2]: c for c in coop[:5]}
    full = bb_calls["world"]["classifier"]
    assert full.shape[0] == 64
    for name in ("world_a", "world_r"):
        spec = world.get_domain(name[len("world_"):])
        call = bb_calls[name]
        rows = call["rows"]
        # target class t -> source class rows[t], by name; labels stay the target's
        assert [world.CLASSNAMES[i] for i in rows] == spec.classnames
        assert len(rows) < 64 and call["classifier"].shape[0] == len(rows)
        assert np.array_equal(call["classifier"], full[rows])
        assert np.array_equal(call["labels"], np.repeat(np.arange(len(rows)), TEST_PER_CLASS))
    assert protocols.class_rows(world.CLASSNAMES, "world_a", world.get_domain("a").classnames,
                                "world")[:3].tolist() == [0, 2, 3]  # red circle/triangle/star
    for name in ("world_v2", "world_clean"):
        assert np.array_equal(bb_calls[name]["rows"], np.arange(64))
    # transfer_prompt 'base': every target gets the source's (w_b) prompt in the DPC stage;
    # the source's accuracy is the same as under the 'new' default.
    dpc_calls = coop[5:]
    for call in dpc_calls[1:]:
        assert tree_equal(call["prompt"], dpc_calls[0]["prompt"])
    assert not tree_equal(dpc_calls[0]["prompt"], coop[0]["prompt"])
    for stage in ("backbone", "dpc"):
        assert (results["stages"][stage]["accuracy"]["world"]
                == trained[1]["stages"][stage]["accuracy"]["world"])


def test_transfer_prompt_selects_only_the_target_prompt():
    c = tiny(protocol="cross_dataset")
    assert protocols.get(c).select_prompt("source", "B", "N") == "B"
    assert protocols.get(c).select_prompt("target", "B", "N") == "N"
    c.dpc.transfer_prompt = "base"
    assert protocols.get(c).select_prompt("source", "B", "N") == "B"
    assert protocols.get(c).select_prompt("target", "B", "N") == "B"


def _error(match, **changes):
    c = tiny(**changes)
    with pytest.raises(ValueError, match=match):
        train_lib.check_config(c)


def test_bad_protocol_inputs_name_the_field():
    _error(r"config.protocol='leave_one_out'.*expected one of", protocol="leave_one_out")
    _error(r"config.targets: unknown dataset 'world_mars'", protocol="cross_dataset",
           targets="world_studio,world_mars")
    _error(r"config.targets.*'world'.*source", protocol="cross_dataset", targets="world")
    _error(r"config.targets.*world datasets and real ones", protocol="cross_dataset",
           targets="oxford_pets")
    _error(r"config.targets.*belong to", protocol="base_to_new", targets="world_v2")
    _error(r"config.shots=3 with config.protocol='few_shot'", protocol="few_shot", shots=3)
    _error(r"config.dpc.transfer_prompt='both'", protocol="cross_dataset",
           **{"dpc.transfer_prompt": "both"})
    pkd = train_lib.load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                             "configs", "dpc_promptkd.py"))
    pkd.protocol = "cross_dataset"
    with pytest.raises(ValueError, match=r"config.protocol='cross_dataset' with "
                                         r"config.backbone.name='promptkd'"):
        train_lib.check_config(pkd)


def test_domain_target_with_foreign_classes_is_refused():
    c = tiny(protocol="domain_generalisation", dataset="world_a", targets="world_r")
    train_lib.check_config(c)  # a shifted domain can be the source too
    source = train_sets.load_named(c, "world_a", 1, 2)
    with pytest.raises(ValueError, match=r"config.targets: 'world_r' has 24 class\(es\) that "
                                         r"the source config.dataset='world_a' lacks"):
        protocols.get(c).eval_sets(source, 1)


def test_real_defaults_and_imagenet_subset_mapping():
    c = tiny(protocol="cross_dataset")
    c.dataset, c.clip.source = "imagenet", "ViT-B/16"
    assert protocols.get(c).targets() == ["caltech101", "oxford_pets", "stanford_cars",
                                    "oxford_flowers", "food101", "fgvc_aircraft", "sun397",
                                    "dtd", "eurosat", "ucf101"]
    with pytest.raises(ValueError, match="domain_generalisation"):
        c.targets = "imagenet_r"
        protocols.get(c).targets()
    c.protocol, c.targets = "domain_generalisation", ""
    assert protocols.get(c).targets() == ["imagenetv2", "imagenet_sketch", "imagenet_a",
                                    "imagenet_r"]
    c.dataset = "oxford_pets"
    with pytest.raises(ValueError, match="config.targets is empty"):
        protocols.get(c).targets()
    c.dataset, c.targets = "imagenet_a", "imagenetv2"
    with pytest.raises(ValueError, match="config.dataset='imagenet_a' has test data only"):
        protocols.get(c).check(get_learner("coop"))
    names = [f"class {i}" for i in range(10)]
    assert protocols.class_rows(names, "imagenet_r", ["class 7", "class 2"],
                                "imagenet").tolist() == [7, 2]
    with pytest.raises(ValueError, match="ambiguous"):
        protocols.class_rows(names + ["class 2"], "imagenet_r", ["class 2"], "imagenet")


def test_imagenet_r_in_the_coop_layout_maps_onto_imagenet(tmp_path):
    from dpc_jax.data import coop

    wnids = _imagenet_tree(tmp_path, n_train=1)
    r = tmp_path / "imagenet-rendition" / "imagenet-r"
    for w in wnids[3::5]:  # 200 of the 1000 classes
        (r / w).mkdir(parents=True)
        (r / w / "a.jpg").write_bytes(_jpeg(1))
    c = tiny(protocol="domain_generalisation", targets="imagenet_r,imagenet_a")
    c.dataset, c.root, c.clip.source = "imagenet", str(tmp_path), "ViT-B/16"
    source = train_sets.load_named(c, "imagenet", 1, 1)
    with pytest.raises(coop.DatasetNotFoundError, match="imagenet-adversarial"):
        protocols.get(c).eval_sets(source, 1)  # ImageNet-A is not there: the expected folder
    c.targets = "imagenet_r"
    sets = protocols.get(c).eval_sets(source, 1)
    assert [s.name for s in sets] == ["imagenet", "imagenet_r"]
    target = sets[1]
    assert target.rows.tolist() == list(range(3, 1000, 5))
    assert [source.classnames[i] for i in target.rows] == target.classnames
    assert np.array_equal(target.test.labels, np.arange(200))


def test_a_workdir_summary_takes_every_seed_of_the_protocols_layout(tmp_path):
    """`summarize_workdir` (results.json of the trainer and the benchmark grid): every seed's
    stage results of the protocol's layout, stages in the order given; another protocol's
    per-seed files (a rerun with another protocol left them) are left out."""
    few_shot = protocols.get(small_config(protocol="few_shot"))
    files = {(1, "zeroshot"): {"accuracy": {"world": 50.0}},
             (2, "zeroshot"): {"accuracy": {"world": 60.0}},
             (2, "backbone"): {"accuracy": {"world": 70.0}},
             (1, "backbone"): {"base": 1.0, "new": 2.0, "hm": 1.3}}  # base_to_new's layout
    for (seed, stage), result in files.items():
        os.makedirs(tmp_path / f"seed_{seed}" / stage)
        (tmp_path / f"seed_{seed}" / stage / "results.json").write_text(json.dumps(result))
    summary = few_shot.summarize_workdir(str(tmp_path), order=("zeroshot", "backbone"))
    assert list(summary["stages"]) == ["zeroshot", "backbone"]
    assert summary["stages"]["zeroshot"]["accuracy"]["world"] == {
        "mean": 55.0, "std": 5.0, "per_seed": {"1": 50.0, "2": 60.0}}
    assert summary["stages"]["backbone"]["accuracy"]["world"]["per_seed"] == {"2": 70.0}
    base_to_new = protocols.get(small_config())
    assert list(base_to_new.summarize_workdir(str(tmp_path))) == ["backbone"]
    assert few_shot.summarize_workdir(str(tmp_path / "absent")) == {}
