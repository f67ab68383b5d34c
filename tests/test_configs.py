"""Every config builds and passes the training code's checks, for the world and every dataset."""

import glob
import json
import os

import pytest

from dpc_jax.data import registry
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.training import train_lib
from helpers import DPC_COOP


def get_config(arg=None):
    """configs/dpc_coop.py through the loader the command line uses."""
    return train_lib.load_config(DPC_COOP + (f":{arg}" if arg else ""))


def test_world_default():
    c = get_config()
    train_lib.check_config(c)
    assert (c.dataset, c.clip.source, c.clip.tokenizer) == ("world", "world", "world")
    assert c.stages == "zeroshot,backbone,dpc" and c.seeds == "1"


@pytest.mark.parametrize("name", sorted(registry.DATASETS))
def test_every_dataset_builds_with_the_paper_settings(name):
    c = get_config(f"dataset={name},root=/data")
    train_lib.check_config(c)
    assert c.dataset == name and c.root == "/data" and c.clip.source == "ViT-B/16"
    # CoOp/vit_b16_ep20 of the released configs (docs/reference/method.md#stage-2-settings) and
    # CoOp's stage 1 (docs/reference/backbones.md#coop).
    assert (c.batch_size, c.dpc.epochs, c.dpc.lr, c.dpc.w_base, c.dpc.w_new) == \
        (4, 20, 0.002, 0.5, 0.0)
    assert (c.backbone.n_ctx, c.backbone.ctx_init, c.backbone.epochs, c.backbone.batch_size,
            c.backbone.lr) == (4, "a photo of a", 100, 32, 0.002)
    assert (c.optim.momentum, c.optim.weight_decay, c.optim.warmup_lr) == (0.9, 5e-4, 1e-5)
    assert c.dhno.top_k == (4 if name == "eurosat" else 8)


def test_bad_config_arguments():
    with pytest.raises(ValueError, match="unknown config argument 'datset'"):
        get_config("datset=dtd")
    with pytest.raises(ValueError, match="expected key=value"):
        get_config("dtd")
    with pytest.raises(Exception, match="no_such_dataset"):
        get_config("dataset=no_such_dataset")


CONFIG_FILES = sorted(glob.glob(os.path.join(os.path.dirname(DPC_COOP), "*.py")))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_builds_and_shape_checks(path):
    """Each config file loads, passes the checks, and its learner's init and both objectives
    trace (jax.eval_shape, nothing computed) on the world CLIP's architecture (the config's
    default; its prompt depths fit that CLIP)."""
    import jax
    import jax.numpy as jnp

    from dpc_jax.convert.load import load_clip_from_config
    from dpc_jax.models.clip import CLIPConfig, abstract_params
    from dpc_jax.models.tokenizer import Tokenizer
    from dpc_jax.prompts import DualPrompt, LearnerContext, build_learner, capabilities
    from dpc_jax.training import objectives

    c = train_lib.load_config(path)
    train_lib.check_config(c)
    with open(os.path.join(asset_dir(), "clip_config.json")) as f:
        tiny_config = CLIPConfig.from_dict(json.load(f))
    tok = Tokenizer.from_pretrained(asset_dir(), context_length=77)
    kw, teacher = {}, None
    if "teacher" in c.backbone:  # a distilling learner: its teacher on the shipped teacher CLIP
        from dpc_jax.training import teacher as teacher_lib

        tconfig = teacher_lib.teacher_config(c)
        tclip_config, tclip = load_clip_from_config(tconfig.clip)
        kw["teacher"] = build_learner(tclip_config, tok, tconfig.backbone)
        teacher = {"clip": tclip, "prompt": kw["teacher"].init(jax.random.key(2), tclip)}
    learner = build_learner(tiny_config, tok, c.backbone, **kw)
    clip = abstract_params(tiny_config)
    names = ["red circle", "blue star", "pink ring", "green cross"]
    prompt = jax.eval_shape(lambda cp: learner.init(jax.random.key(0), cp, len(names)), clip)
    texts = jax.eval_shape(lambda cp: learner.prepare(cp, names), clip)
    state = jax.eval_shape(lambda cp: capabilities.init_state(learner, cp), clip)
    n, res = 8, tiny_config.image_resolution
    # The learner's per-seed constants are computed for real (PromptSRC's frozen text targets
    # read values on the host), on the world CLIP's weights.
    from dpc_jax.convert import load_clip

    _, world_params = load_clip(asset_dir())
    real_consts = learner.constants(world_params, LearnerContext(
        dataset=c.dataset, classnames=tuple(names), templates=("a photo of a {}.",),
        teacher=teacher))
    lconsts = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                     real_consts)
    scorer = jax.eval_shape(lambda cp, p, t, k: learner.classifier(cp, p, t, jnp.arange(4), k),
                            clip, prompt, texts, lconsts)
    consts = {"clip": clip, "class_texts": texts, "learner": lconsts,
              "train": {"images": jax.ShapeDtypeStruct((n, res, res, 3), jnp.uint8),
                        "labels": jax.ShapeDtypeStruct((n,), jnp.int32),
                        "class_table": jax.ShapeDtypeStruct((4, 2), jnp.int32),
                        "class_counts": jax.ShapeDtypeStruct((4,), jnp.int32)},
              "scorer": scorer}
    batch = {"index": jax.ShapeDtypeStruct((2,), jnp.int32)}
    key = jax.random.key(1)
    stage1 = objectives.backbone_objective(learner, res, tuple(c.crop_scale))
    loss, (metrics, _) = jax.eval_shape(stage1, prompt, state, consts, batch, key)
    assert loss.shape == () and ("acc" in metrics or learner.train_split == "unlabeled")
    if capabilities.dpc_unsupported(learner):  # refused before training (tests/test_cocoop.py)
        assert "dpc" not in c.stages
        return
    hooks = capabilities.dual(learner)
    dual = DualPrompt(c.dpc, hooks.dual_rules())
    init = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), prompt)
    params = jax.eval_shape(dual.init, hooks.dpc_backbone(init, real_consts))
    stage2 = objectives.dpc_objective(learner, dual, res, 3, c.dhno.policy,
                                      tuple(c.crop_scale))
    loss, _ = jax.eval_shape(stage2, params, state, consts, batch, key)
    assert loss.shape == () and loss.dtype == jnp.float32
