"""IVLP and MaPLe through the trainer on the embedded world (tiny schedules): stages zero-shot,
backbone and DPC, the frozen stage-1 leaves, w_new = 0, and a stage-1 prompt exported to the
PyTorch layout and imported back with `config.backbone.init_from`."""

import json
import os

import numpy as np
import pytest

from dpc_jax import tree as tree_lib
from dpc_jax.convert.load import load_clip_and_tokenizer
from dpc_jax.training import train_lib
from helpers import REPO, _restore
from helpers import small_config as train_small_config

CONFIGS = {name: os.path.join(REPO, "configs", f"dpc_{name}.py")
           for name in ("ivlp", "maple", "promptsrc")}


def small_config(name, **changes):
    return train_small_config(CONFIGS[name], **changes)


def stage1_prompt(name, workdir):
    """Stage 1's result P: the learner's `final_prompt` of the last parameters and the epoch
    carry (PromptSRC: the GPA sum; the others: the last parameters)."""
    import orbax.checkpoint as ocp

    from dpc_jax.prompts import build_learner, capabilities
    from dpc_jax.training import checkpoints

    stage = os.path.join(workdir, "seed_1", "backbone")
    meta = checkpoints.read_stage_meta(stage)
    manager = checkpoints.checkpoint_manager(os.path.join(stage, "checkpoints"))
    params = _restore(stage)
    config = small_config(name)
    clip_config, _, tok = load_clip_and_tokenizer(config)
    learner = build_learner(clip_config, tok, config.backbone)
    hooks = capabilities.epoch_hooks(learner)
    extra = hooks.init_extra(params)
    if extra:  # an empty carry is not written to the checkpoint
        extra = manager.restore(meta["final_step"], args=ocp.args.Composite(
            aux=ocp.args.StandardRestore()))["aux"]["extra"]
    return hooks.final_prompt(params, extra)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def run(request, tmp_path_factory):
    name = request.param
    workdir = str(tmp_path_factory.mktemp(name))
    return name, workdir, train_lib.train_and_evaluate(small_config(name), workdir)


def test_world_defaults_fit_the_world_clip():
    ivlp, maple = (train_lib.load_config(CONFIGS[n]) for n in ("ivlp", "maple"))
    assert (ivlp.backbone.depth_text, ivlp.backbone.depth_vision) == (2, 3)
    assert maple.backbone.depth == 2
    # The published settings on a real dataset (docs/reference/backbones.md#ivlp, #maple,
    # #dpc-on-each-backbone).
    ivlp, maple = (train_lib.load_config(CONFIGS[n] + ":dataset=dtd,root=/data")
                   for n in ("ivlp", "maple"))
    b = ivlp.backbone
    assert (b.n_ctx_text, b.n_ctx_vision, b.depth_text, b.depth_vision, b.batch_size, b.lr,
            b.epochs) == (4, 4, 9, 9, 4, 0.0025, 20)
    b = maple.backbone
    assert (b.n_ctx, b.depth, b.batch_size, b.lr, b.epochs) == (2, 9, 4, 0.0035, 5)
    src = train_lib.load_config(CONFIGS["promptsrc"] + ":dataset=dtd,root=/data")
    b = src.backbone
    assert (b.n_ctx_text, b.depth_text, b.batch_size, b.lr, b.epochs, b.gpa_mean, b.gpa_std,
            b.text_loss_weight, b.image_loss_weight) == (4, 9, 4, 0.0025, 20, 15, 1, 25, 10)
    for variant, want in (("cross_dataset", (3, 3, 20, 6, 10)), ("few_shot", (9, 9, 50, 45, 5))):
        b = train_lib.load_config(CONFIGS["promptsrc"] + f":dataset=dtd,root=/d,variant={variant}"
                                  ).backbone
        assert (b.depth_text, b.depth_vision, b.epochs, b.gpa_mean, b.gpa_std) == want, variant
    teacher = train_lib.load_config(CONFIGS["promptsrc"] + ":dataset=dtd,root=/d,variant=teacher")
    assert (teacher.clip.source, teacher.backbone.batch_size, teacher.backbone.lr) == (
        "ViT-L/14", 8, 0.005)
    with pytest.raises(ValueError, match="variant='teacher'; this config offers base_to_new"):
        train_lib.load_config(CONFIGS["ivlp"] + ":variant=teacher")
    for c, w_b in ((ivlp, 0.5), (maple, 0.2), (src, 0.2)):
        assert (c.batch_size, c.dhno.top_k, c.dpc.epochs, c.dpc.lr, c.dpc.w_base,
                c.dpc.w_new) == (4, 8, 20, 0.002, w_b, 0.0)


def test_three_stages_and_results_layout(run):
    name, workdir, results = run
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    assert set(on_disk) == {"zeroshot", "backbone", "dpc"}
    assert set(on_disk["dpc"]["per_seed"]) == {"1"}
    with open(os.path.join(workdir, "seed_1", "backbone", "settings.json")) as f:
        assert json.load(f)["backbone.name"] == name
    # w_new = 0: the new-class prompt is P itself, so new accuracy equals stage 1's exactly.
    assert results["dpc"]["new"] == results["backbone"]["new"]
    assert results["backbone"]["base"] != results["zeroshot"]["base"]  # stage 1 did something


def test_stage2_keeps_every_stage1_leaf_bitwise(run):
    name, workdir, _ = run
    p1 = stage1_prompt(name, workdir)
    p2 = _restore(os.path.join(workdir, "seed_1", "dpc"))
    flat1, back = tree_lib.flatten(p1), tree_lib.flatten(p2["backbone"])
    assert sorted(flat1) == sorted(back)
    for k in flat1:
        assert np.array_equal(np.asarray(flat1[k]), np.asarray(back[k])), k
    par = tree_lib.flatten(p2["parallel"])
    assert sorted(par) == sorted(flat1)  # every prompt leaf is doubled
    assert all(not np.array_equal(np.asarray(par[k]), np.asarray(flat1[k])) for k in par)


def test_exported_stage1_imports_as_init_from(run, tmp_path):
    """Stage 1's prompt written in the upstream layout by torch, then used as P: the backbone
    evaluates to the same accuracies, and DPC's stage 2 starts from it."""
    torch = pytest.importorskip("torch")
    from dpc_jax.convert.vlp_torch import MODEL_DIRS

    name, workdir, results = run
    p1 = stage1_prompt(name, workdir)
    [path] = train_lib.export_backbone(small_config(name), workdir)
    layout = "maple" if name == "maple" else "ivlp"  # PromptSRC files are IVLP's layout
    assert path == os.path.join(workdir, "seed_1", "torch", MODEL_DIRS[layout],
                                "model.pth.tar-2")
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 2 and all(k.startswith(("prompt_learner.", "text_encoder.",
                                                      "image_encoder.")) for k in saved["state_dict"])
    again = train_lib.train_and_evaluate(
        small_config(name, stages="backbone,dpc", **{"backbone.init_from": path}),
        str(tmp_path / "from_torch"))
    assert again["backbone"]["base"] == results["backbone"]["base"]
    assert again["backbone"]["new"] == results["backbone"]["new"]
    assert again["dpc"]["new"] == results["backbone"]["new"]
    p2 = _restore(str(tmp_path / "from_torch" / "seed_1" / "dpc"))
    for k, v in tree_lib.flatten(p1).items():
        assert np.array_equal(np.asarray(v), np.asarray(tree_lib.flatten(p2["backbone"])[k]))
