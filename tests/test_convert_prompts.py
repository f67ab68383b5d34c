"""Import and export of PyTorch IVLP/PromptSRC and MaPLe stage-1 checkpoints (vlp_torch).

The checkpoints are written here with torch in the upstream layout
(docs/reference/backbones.md#common-ground, #pytorch-checkpoints): the
whole model (prompt keys, frozen CLIP copies, token_prefix/suffix buffers) inside a Dassl dict
whose scheduler entry is a pickled object the loader must not build.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from dpc_jax.convert.vlp_torch import (
    expected_prompt_shapes,
    export_vlp_torch_checkpoint,
    load_vlp_torch_checkpoint,
    upstream_checkpoint_path,
)
from helpers import RAN, UpstreamScheduler, _listed

torch = pytest.importorskip("torch")

P = "prompt_learner."
R = "transformer.resblocks.{}.VPT_shallow"
TINY = dict(text_width=48, vision_width=64)
B16 = dict(text_width=512, vision_width=768)


def _randn(generator, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=generator).to(dtype)


def _frozen_copies(g, text_width, vision_width, n_ctx, promptsrc=False):
    """A few frozen CLIP tensors and buffers of a whole-model checkpoint, with upstream names."""
    frozen = collections.OrderedDict()
    frozen["image_encoder.class_embedding"] = _randn(g, vision_width, dtype=torch.float16)
    frozen["image_encoder.conv1.weight"] = _randn(g, vision_width, 3, 2, 2, dtype=torch.float16)
    frozen["image_encoder.transformer.resblocks.0.attn.in_proj_weight"] = _randn(
        g, 3 * vision_width, vision_width, dtype=torch.float16)
    frozen["image_encoder.transformer.resblocks.1.ln_1.weight"] = _randn(g, vision_width)
    frozen["image_encoder.proj"] = _randn(g, vision_width, 32, dtype=torch.float16)
    frozen["text_encoder.positional_embedding"] = _randn(g, 77, text_width, dtype=torch.float16)
    frozen["text_encoder.transformer.resblocks.0.attn.in_proj_weight"] = _randn(
        g, 3 * text_width, text_width, dtype=torch.float16)
    frozen["text_encoder.transformer.resblocks.1.mlp.c_fc.bias"] = _randn(g, 4 * text_width)
    frozen["text_encoder.ln_final.weight"] = _randn(g, text_width)
    frozen["logit_scale"] = torch.tensor(4.6052)
    frozen["token_embedding.weight"] = _randn(g, 50, text_width, dtype=torch.float16)
    frozen[P + "token_prefix"] = _randn(g, 3, 1, text_width, dtype=torch.float16)
    frozen[P + "token_suffix"] = _randn(g, 3, 76 - n_ctx, text_width, dtype=torch.float16)
    if promptsrc:  # PromptSRC keeps a frozen zero-shot image encoder inside the prompt learner
        frozen[P + "ZS_image_encoder.conv1.weight"] = _randn(g, vision_width, 3, 2, 2)
        frozen[P + "ZS_image_encoder.transformer.resblocks.1.ln_1.weight"] = _randn(
            g, vision_width)
    return frozen


def ivlp_state_dict(n_ctx, text_width, depth, vision_n_ctx, vision_width, vision_depth,
                    promptsrc=False, seed=0):
    """(prompt keys, whole state dict) of an upstream IVLP/PromptSRC model (ctx in fp16)."""
    g = torch.Generator().manual_seed(seed)
    prompt = collections.OrderedDict()
    prompt[P + "ctx"] = _randn(g, n_ctx, text_width, dtype=torch.float16)
    if vision_depth:
        prompt["image_encoder.VPT"] = _randn(g, vision_n_ctx, vision_width) * 0.02
    for i in range(1, vision_depth):
        prompt["image_encoder." + R.format(i)] = _randn(g, vision_n_ctx, vision_width) * 0.02
    for i in range(1, depth):
        prompt["text_encoder." + R.format(i)] = _randn(g, n_ctx, text_width) * 0.02
    state = _frozen_copies(g, text_width, vision_width, n_ctx, promptsrc)
    state.update(prompt)
    return prompt, state


def maple_state_dict(n_ctx, text_width, depth, vision_width, seed=0):
    """(prompt keys, whole state dict) of an upstream MaPLe model (ctx and proj in fp16)."""
    g = torch.Generator().manual_seed(seed)
    prompt = collections.OrderedDict()
    prompt[P + "ctx"] = _randn(g, n_ctx, text_width, dtype=torch.float16)
    prompt[P + "proj.weight"] = _randn(g, vision_width, text_width, dtype=torch.float16)
    prompt[P + "proj.bias"] = _randn(g, vision_width, dtype=torch.float16)
    for k in range(depth - 1):
        prompt[P + f"compound_prompts_text.{k}"] = _randn(g, n_ctx, text_width) * 0.02
    for k in range(depth - 1):
        prompt[P + f"compound_prompt_projections.{k}.weight"] = _randn(g, vision_width,
                                                                       text_width)
        prompt[P + f"compound_prompt_projections.{k}.bias"] = _randn(g, vision_width)
    state = _frozen_copies(g, text_width, vision_width, n_ctx)
    state.update(prompt)
    return prompt, state


def save_upstream(path, state, module_prefix=False):
    """torch.save of a Dassl checkpoint as `save_model` writes it (optimizer and scheduler
    state beside the model, the scheduler entry holding pickled objects)."""
    if module_prefix:  # a model saved from inside nn.DataParallel
        state = collections.OrderedDict(("module." + k, v) for k, v in state.items())
    param = torch.nn.Parameter(torch.zeros(3))
    optim = torch.optim.SGD([param], lr=0.0025, momentum=0.9, weight_decay=5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 20.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": state, "epoch": 20, "optimizer": optim.state_dict(),
                "scheduler": {"successor": cosine, "last_epoch": 19,
                              "warmup": UpstreamScheduler()},
                "val_result": 71.5}, path)
    return path


def ours(prompt_keys, kind):
    """The dpc_jax prompt the upstream prompt tensors stand for, built independently here."""
    f = {k: v.float().numpy() for k, v in prompt_keys.items()}
    if kind == "ivlp":
        out = {"ctx": f[P + "ctx"]}
        text = [f["text_encoder." + R.format(i)] for i in range(1, 99)
                if "text_encoder." + R.format(i) in f]
        vision = [f["image_encoder." + R.format(i)] for i in range(1, 99)
                  if "image_encoder." + R.format(i) in f]
        if text:
            out["text_deep"] = np.stack(text)
        if "image_encoder.VPT" in f:
            out["vision_ctx"] = f["image_encoder.VPT"]
        if vision:
            out["vision_deep"] = np.stack(vision)
        return out
    depth = 1 + sum(k.startswith(P + "compound_prompts_text.") for k in f)
    out = {"ctx": f[P + "ctx"], "couple0": {"kernel": f[P + "proj.weight"].T,
                                            "bias": f[P + "proj.bias"]}}
    if depth > 1:
        out["text_deep"] = np.stack([f[P + f"compound_prompts_text.{k}"]
                                     for k in range(depth - 1)])
        out["couple_deep"] = {
            "kernel": np.stack([f[P + f"compound_prompt_projections.{k}.weight"].T
                                for k in range(depth - 1)]),
            "bias": np.stack([f[P + f"compound_prompt_projections.{k}.bias"]
                              for k in range(depth - 1)])}
    return out


def assert_prompt_equal(actual, expected, where=""):
    assert isinstance(actual, dict) and sorted(actual) == sorted(expected), (where, actual)
    for name, value in expected.items():
        if isinstance(value, dict):
            assert_prompt_equal(actual[name], value, f"{where}{name}/")
        else:
            assert actual[name].dtype == np.float32, f"{where}{name}"
            assert actual[name].shape == value.shape, f"{where}{name}"
            np.testing.assert_array_equal(actual[name], value, err_msg=f"{where}{name}")


def check_exported_file(path, prompt_keys, epoch):
    """The exported file is a Dassl dict with exactly the upstream prompt tensors (float32),
    readable by a plain torch.load (weights_only: no pickled objects in it)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(saved) == ["epoch", "optimizer", "scheduler", "state_dict", "val_result"]
    assert saved["epoch"] == epoch
    assert saved["optimizer"] is saved["scheduler"] is saved["val_result"] is None
    assert sorted(saved["state_dict"]) == sorted(prompt_keys)
    for key, value in prompt_keys.items():
        written = saved["state_dict"][key]
        assert written.dtype == torch.float32, key
        assert torch.equal(written, value.float()), key


# ----------------------------------------------------------------------------------------------
# IVLP / PromptSRC
# ----------------------------------------------------------------------------------------------

IVLP_CASES = {
    # name: (n, widths, J_t, n_v, J_v, PromptSRC copies, 'module.' prefix)
    "b16_4+4_depth9": (4, B16, 9, 4, 9, False, False),
    "b16_promptsrc_module": (4, B16, 9, 4, 9, True, True),
    "b16_2+2_depth12": (2, B16, 12, 2, 12, False, False),
    "tiny_unequal": (2, TINY, 3, 3, 2, False, True),
    "tiny_text_only": (4, TINY, 1, None, 0, False, False),
    "tiny_vision_layer0": (4, TINY, 2, 2, 1, True, False),
}


@pytest.mark.parametrize("case", sorted(IVLP_CASES))
def test_ivlp_import_export_round_trip(tmp_path, case):
    n, widths, depth, n_v, vision_depth, promptsrc, module_prefix = IVLP_CASES[case]
    prompt_keys, state = ivlp_state_dict(n, widths["text_width"], depth, n_v,
                                         widths["vision_width"], vision_depth, promptsrc)
    path = save_upstream(str(tmp_path / "run" / "VLPromptLearner" / "model.pth.tar-20"), state,
                         module_prefix)
    expected = expected_prompt_shapes("ivlp", n, widths["text_width"], depth, n_v,
                                      widths["vision_width"], vision_depth)
    RAN.clear()
    loaded = load_vlp_torch_checkpoint(path, "ivlp", expected)
    assert RAN == []  # the pickled scheduler object was not built
    want = ours(prompt_keys, "ivlp")
    assert_prompt_equal(loaded, want)
    assert sorted(loaded) == sorted(expected)
    assert {k: v.shape for k, v in loaded.items()} == expected

    # export(load(file)) holds the file's prompt tensors; load(export(p)) == p.
    out = str(tmp_path / "exported" / "VLPromptLearner" / "model.pth.tar-7")
    assert export_vlp_torch_checkpoint(loaded, out, "ivlp", epoch=7) == out
    check_exported_file(out, prompt_keys, 7)
    assert_prompt_equal(load_vlp_torch_checkpoint(out, "ivlp", expected), want)
    assert os.listdir(os.path.dirname(out)) == ["model.pth.tar-7"]  # no temporary left behind


def test_ivlp_expected_may_be_a_nested_shape_tree(tmp_path):
    prompt_keys, state = ivlp_state_dict(4, 48, 3, 4, 64, 3)
    path = save_upstream(str(tmp_path / "m.pth.tar-1"), state)
    shapes = {"ctx": np.zeros((4, 48)), "text_deep": np.zeros((2, 4, 48)),
              "vision_ctx": np.zeros((4, 64)), "vision_deep": np.zeros((2, 4, 64))}
    assert_prompt_equal(load_vlp_torch_checkpoint(path, "ivlp", shapes), ours(prompt_keys, "ivlp"))


# ----------------------------------------------------------------------------------------------
# MaPLe
# ----------------------------------------------------------------------------------------------

MAPLE_CASES = {
    # name: (n, widths, J, 'module.' prefix)
    "b16_depth9": (2, B16, 9, False),
    "b16_cross_dataset_depth3_module": (2, B16, 3, True),
    "tiny_depth1": (2, TINY, 1, False),
    "tiny_n4_depth4": (4, TINY, 4, True),
}


@pytest.mark.parametrize("case", sorted(MAPLE_CASES))
def test_maple_import_export_round_trip(tmp_path, case):
    n, widths, depth, module_prefix = MAPLE_CASES[case]
    prompt_keys, state = maple_state_dict(n, widths["text_width"], depth, widths["vision_width"])
    path = save_upstream(str(tmp_path / "MultiModalPromptLearner" / "model.pth.tar-5"), state,
                         module_prefix)
    expected = expected_prompt_shapes("maple", n, widths["text_width"], depth,
                                      vision_width=widths["vision_width"])
    RAN.clear()
    loaded = load_vlp_torch_checkpoint(path, "maple", expected)
    assert RAN == []
    want = ours(prompt_keys, "maple")
    assert_prompt_equal(loaded, want)
    # The kernels are flax Dense layout [in, out]: x @ kernel + bias is torch's Linear.
    x = torch.randn(3, widths["text_width"], generator=torch.Generator().manual_seed(1))
    linear = torch.nn.functional.linear(x, prompt_keys[P + "proj.weight"].float(),
                                        prompt_keys[P + "proj.bias"].float())
    np.testing.assert_allclose(x.numpy() @ loaded["couple0"]["kernel"] + loaded["couple0"]["bias"],
                               linear.numpy(), rtol=1e-5, atol=1e-4)

    out = str(tmp_path / "out" / "model.pth.tar-5")
    export_vlp_torch_checkpoint(loaded, out, "maple", epoch=5)
    check_exported_file(out, prompt_keys, 5)
    assert_prompt_equal(load_vlp_torch_checkpoint(out, "maple", expected), want)


def test_exported_maple_file_loads_into_an_upstream_shaped_module(tmp_path):
    """Dassl's load_model: load_state_dict(strict=False) on the whole model, whose ctx and proj
    are fp16; every exported key lands on a parameter and is cast to its dtype."""
    prompt_keys, state = maple_state_dict(2, 48, 3, 64, seed=3)
    path = save_upstream(str(tmp_path / "a" / "model.pth.tar-5"), state)
    expected = expected_prompt_shapes("maple", 2, 48, 3, vision_width=64)
    out = export_vlp_torch_checkpoint(load_vlp_torch_checkpoint(path, "maple", expected),
                                      str(tmp_path / "b" / "model.pth.tar-5"), "maple", 5)

    model = torch.nn.Module()
    for key, value in state.items():  # a module tree with the upstream names and dtypes
        *parents, name = key.split(".")
        node = model
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(name, torch.nn.Parameter(torch.zeros_like(value)))
    result = model.load_state_dict(torch.load(out, weights_only=True)["state_dict"],
                                   strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(set(state) - set(prompt_keys))
    loaded_state = model.state_dict()
    for key, value in prompt_keys.items():
        assert loaded_state[key].dtype == value.dtype
        assert torch.equal(loaded_state[key], value), key  # fp16 -> fp32 -> fp16 is exact


# ----------------------------------------------------------------------------------------------
# Random float32 prompts: load(export(p)) == p
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,shapes", [
    ("ivlp", expected_prompt_shapes("ivlp", 4, 48, 4, 2, 64, 3)),
    ("ivlp", expected_prompt_shapes("ivlp", 4, 48, 2)),
    ("maple", expected_prompt_shapes("maple", 2, 48, 3, vision_width=64)),
])
def test_export_then_load_is_exact(tmp_path, kind, shapes):
    rng = np.random.default_rng(0)
    flat = {leaf: rng.standard_normal(shape).astype(np.float32) for leaf, shape in shapes.items()}
    prompt = {}
    for leaf, value in flat.items():
        *parents, name = leaf.split("/")
        node = prompt
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    path = str(tmp_path / "deep" / "er" / "model.pth.tar-3")
    export_vlp_torch_checkpoint(prompt, path, kind, epoch=3)
    assert_prompt_equal(load_vlp_torch_checkpoint(path, kind, shapes), prompt)


def test_export_accepts_jax_arrays(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    shapes = expected_prompt_shapes("ivlp", 2, 48, 2, 2, 64, 2)
    rng = np.random.default_rng(1)
    prompt = {leaf: rng.standard_normal(shape).astype(np.float32)
              for leaf, shape in shapes.items()}
    path = export_vlp_torch_checkpoint({k: jnp.asarray(v) for k, v in prompt.items()},
                                       str(tmp_path / "j.pth"), "ivlp", 1)
    assert_prompt_equal(load_vlp_torch_checkpoint(path, "ivlp", shapes), prompt)


# ----------------------------------------------------------------------------------------------
# Mismatches
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def ivlp_b16_file(tmp_path):
    _, state = ivlp_state_dict(4, 512, 9, 4, 768, 9, promptsrc=True)
    return save_upstream(str(tmp_path / "run" / "VLPromptLearner" / "model.pth.tar-20"), state)


@pytest.fixture
def maple_b16_file(tmp_path):
    _, state = maple_state_dict(2, 512, 9, 768)
    return save_upstream(str(tmp_path / "run" / "MultiModalPromptLearner" / "model.pth.tar-5"),
                         state)


def _error(path, kind, expected):
    with pytest.raises(ValueError) as info:
        load_vlp_torch_checkpoint(path, kind, expected)
    message = str(info.value)
    assert path in message
    # Frozen copies and buffers are never reported.
    for frozen in ("conv1", "token_prefix", "token_suffix", "ZS_image_encoder",
                   "positional_embedding", "in_proj_weight", "logit_scale"):
        assert frozen not in message
    return message


def test_shallower_config_reports_the_deeper_keys(ivlp_b16_file):
    message = _error(ivlp_b16_file, "ivlp", expected_prompt_shapes("ivlp", 4, 512, 3, 4, 768, 3))
    assert "looks like an IVLP/PromptSRC checkpoint" in message
    assert _listed(message, "unexpected prompt keys") == (
        [f"image_encoder.transformer.resblocks.{i}.VPT_shallow" for i in range(3, 9)]
        + [f"text_encoder.transformer.resblocks.{i}.VPT_shallow" for i in range(3, 9)])
    assert "missing keys" not in message and "mis-shaped" not in message
    assert ("text_deep: the file has entries for blocks [1, 2, 3, 4, 5, 6, 7, 8] (prompt "
            "depth 9); the config expects prompt depth 3 (the text prompt depth)") in message
    assert "vision_deep: the file has entries for blocks" in message


def test_deeper_config_reports_the_missing_keys(ivlp_b16_file):
    message = _error(ivlp_b16_file, "ivlp",
                     expected_prompt_shapes("ivlp", 4, 512, 12, 4, 768, 9))
    assert _listed(message, "missing keys") == [
        f"text_encoder.transformer.resblocks.{i}.VPT_shallow" for i in (9, 10, 11)]
    assert "unexpected" not in message
    assert "expects prompt depth 12 (the text prompt depth)" in message
    assert "vision_deep" not in message  # the vision side fits


def test_config_without_vision_prompts_reports_them(ivlp_b16_file):
    message = _error(ivlp_b16_file, "ivlp", expected_prompt_shapes("ivlp", 4, 512, 9))
    unexpected = _listed(message, "unexpected prompt keys")
    assert unexpected == ["image_encoder.VPT"] + [
        f"image_encoder.transformer.resblocks.{i}.VPT_shallow" for i in range(1, 9)]


def test_wrong_n_ctx_and_width_are_mis_shaped(ivlp_b16_file):
    message = _error(ivlp_b16_file, "ivlp", expected_prompt_shapes("ivlp", 2, 512, 9, 4, 1024, 9))
    assert ("prompt_learner.ctx: file (4, 512), expected (2, 512) (set by the text n_ctx)"
            in message)
    assert ("text_encoder.transformer.resblocks.8.VPT_shallow: file (4, 512), expected (2, 512) "
            "(set by the text n_ctx)") in message
    assert ("image_encoder.VPT: file (4, 768), expected (4, 1024) (set by the CLIP vision width "
            "(vision_width))") in message
    assert ("image_encoder.transformer.resblocks.1.VPT_shallow: file (4, 768), expected "
            "(4, 1024)") in message
    assert "missing" not in message and "unexpected" not in message


def test_maple_wrong_widths_name_the_transposed_upstream_shapes(maple_b16_file):
    message = _error(maple_b16_file, "maple",
                     expected_prompt_shapes("maple", 2, 768, 9, vision_width=1024))
    assert ("prompt_learner.proj.weight: file (768, 512), expected (1024, 768) (set by the CLIP "
            "vision width (vision_width), the CLIP text width (transformer_width))") in message
    assert ("prompt_learner.compound_prompt_projections.7.bias: file (768,), expected (1024,) "
            "(set by the CLIP vision width (vision_width))") in message
    assert ("prompt_learner.compound_prompts_text.0: file (2, 512), expected (2, 768) (set by "
            "the CLIP text width (transformer_width))") in message


def test_maple_wrong_depth(maple_b16_file):
    message = _error(maple_b16_file, "maple",
                     expected_prompt_shapes("maple", 2, 512, 3, vision_width=768))
    assert "looks like a MaPLe checkpoint" in message
    unexpected = _listed(message, "unexpected prompt keys")
    assert unexpected == (
        [f"{P}compound_prompt_projections.{k}.{p}" for k in range(2, 8) for p in ("bias", "weight")]
        + [f"{P}compound_prompts_text.{k}" for k in range(2, 8)])
    assert ("text_deep: the file has entries for blocks [1, 2, 3, 4, 5, 6, 7, 8] (prompt "
            "depth 9); the config expects prompt depth 3 (the prompt depth)") in message


def test_maple_file_given_as_ivlp(maple_b16_file):
    message = _error(maple_b16_file, "ivlp", expected_prompt_shapes("ivlp", 2, 512, 9, 2, 768, 9))
    assert "does not fit the IVLP/PromptSRC prompt" in message
    assert "the file looks like a MaPLe checkpoint" in message
    assert ("vision_deep: the file has no entries (prompt depth 1); the config expects prompt "
            "depth 9 (the vision prompt depth)") in message
    missing = _listed(message, "missing keys")
    assert missing == ["image_encoder.VPT"] + [
        f"{tower}_encoder.transformer.resblocks.{i}.VPT_shallow"
        for tower in ("image", "text") for i in range(1, 9)]
    unexpected = _listed(message, "unexpected prompt keys")
    assert f"{P}proj.weight" in unexpected and f"{P}compound_prompts_text.7" in unexpected
    assert len(unexpected) == 2 + 8 + 16
    assert f"{P}ctx" not in unexpected  # shared by both layouts, and it fits


def test_ivlp_file_given_as_maple(ivlp_b16_file):
    message = _error(ivlp_b16_file, "maple",
                     expected_prompt_shapes("maple", 4, 512, 9, vision_width=768))
    assert "looks like an IVLP/PromptSRC checkpoint" in message
    missing = _listed(message, "missing keys")
    assert f"{P}proj.weight" in missing and f"{P}compound_prompt_projections.7.bias" in missing
    assert len(missing) == 2 + 8 + 16
    assert "image_encoder.VPT" in _listed(message, "unexpected prompt keys")


def test_non_tensor_prompt_value(tmp_path):
    _, state = ivlp_state_dict(4, 48, 1, None, 64, 0)
    state[P + "ctx"] = [1.0, 2.0]
    path = save_upstream(str(tmp_path / "x.pth"), state)
    message = _error(path, "ivlp", expected_prompt_shapes("ivlp", 4, 48, 1))
    assert "keys that are not floating-point tensors: ['prompt_learner.ctx: list']" in message


# ----------------------------------------------------------------------------------------------
# Files that are not stage-1 checkpoints, and wrong arguments
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope" / "model.pth.tar-20")
    with pytest.raises(FileNotFoundError, match=r"IVLP/PromptSRC checkpoint .*nope/model\.pth\."
                                                r"tar-20.*VLPromptLearner/model\.pth\.tar-20"):
        load_vlp_torch_checkpoint(missing, "ivlp", expected_prompt_shapes("ivlp", 4, 48, 1))
    with pytest.raises(FileNotFoundError, match=r"MaPLe checkpoint .*MultiModalPromptLearner"):
        load_vlp_torch_checkpoint(missing, "maple",
                                  expected_prompt_shapes("maple", 2, 48, 1, vision_width=64))


def test_not_a_dassl_file(tmp_path):
    plain = str(tmp_path / "plain.pth")
    torch.save({"prompt_learner.ctx": torch.zeros(4, 48)}, plain)
    with pytest.raises(ValueError, match=r"plain\.pth.*expected a dict with 'state_dict'; found "
                                         r"\['prompt_learner\.ctx'\]"):
        load_vlp_torch_checkpoint(plain, "ivlp", expected_prompt_shapes("ivlp", 4, 48, 1))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"could not read .*garbage\.pth"):
        load_vlp_torch_checkpoint(str(garbage), "maple",
                                  expected_prompt_shapes("maple", 2, 48, 1, vision_width=64))


def test_coop_file_given_as_ivlp(tmp_path):
    coop = save_upstream(str(tmp_path / "prompt_learner" / "model.pth.tar-50"),
                         collections.OrderedDict(ctx=torch.zeros(4, 48).half(),
                                                 token_prefix=torch.zeros(3, 1, 48)))
    message = _error(coop, "ivlp", expected_prompt_shapes("ivlp", 4, 48, 1))
    assert "a CoOp/CoCoOp prompt-learner checkpoint" in message
    assert _listed(message, "missing keys") == ["prompt_learner.ctx"]


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"kind 'coop': expected one of \['ivlp', 'maple'\]"):
        load_vlp_torch_checkpoint(str(tmp_path / "x"), "coop", {"ctx": (4, 48)})
    with pytest.raises(ValueError, match=r"expected has leaves \['couple0/kernel'\] that an "
                                         r"IVLP/PromptSRC prompt does not have"):
        load_vlp_torch_checkpoint(str(tmp_path / "x"), "ivlp",
                                  {"ctx": (4, 48), "couple0": {"kernel": (48, 64)}})
    with pytest.raises(ValueError, match=r"expected\['text_deep'\] has shape \(0, 4, 48\): no "
                                         r"deep blocks"):
        load_vlp_torch_checkpoint(str(tmp_path / "x"), "ivlp",
                                  {"ctx": (4, 48), "text_deep": (0, 4, 48)})
    with pytest.raises(ValueError, match=r"expected has 'text_deep' but no 'couple_deep/kernel'"):
        load_vlp_torch_checkpoint(str(tmp_path / "x"), "maple",
                                  {"ctx": (2, 48), "text_deep": (2, 2, 48),
                                   "couple0/kernel": (48, 64), "couple0/bias": (64,)})


def test_export_rejects_inconsistent_or_non_float32_prompts(tmp_path):
    shapes = expected_prompt_shapes("ivlp", 4, 48, 3, 2, 64, 2)
    good = {leaf: np.zeros(shape, np.float32) for leaf, shape in shapes.items()}
    path = str(tmp_path / "out" / "model.pth.tar-1")
    with pytest.raises(ValueError, match=r"text_deep \(2, 2, 48\) \(expected \(2, 4, 48\)\)"):
        export_vlp_torch_checkpoint({**good, "text_deep": np.zeros((2, 2, 48), np.float32)},
                                    path, "ivlp", 1)
    with pytest.raises(ValueError, match=r"prompt\['ctx'\] has dtype float64; expected float32"):
        export_vlp_torch_checkpoint({**good, "ctx": np.zeros((4, 48))}, path, "ivlp", 1)
    with pytest.raises(ValueError, match=r"prompt lacks the MaPLe leaves \['couple0/bias'\]"):
        export_vlp_torch_checkpoint({"ctx": good["ctx"], "couple0": {"kernel": np.zeros(
            (48, 64), np.float32)}}, path, "maple", 1)
    assert not os.path.exists(os.path.dirname(path))  # nothing written for a rejected prompt


def test_export_is_atomic(tmp_path, monkeypatch):
    shapes = expected_prompt_shapes("ivlp", 4, 48, 1)
    path = str(tmp_path / "model.pth.tar-1")
    export_vlp_torch_checkpoint({"ctx": np.ones((4, 48), np.float32)}, path, "ivlp", 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        export_vlp_torch_checkpoint({"ctx": np.zeros((4, 48), np.float32)}, path, "ivlp", 2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.pth.tar-1"]  # the old file intact, no partial file
    np.testing.assert_array_equal(load_vlp_torch_checkpoint(path, "ivlp", shapes)["ctx"],
                                  np.ones((4, 48), np.float32))


def test_upstream_checkpoint_path():
    assert upstream_checkpoint_path("out/run", "ivlp", 20) == os.path.join(
        "out/run", "VLPromptLearner", "model.pth.tar-20")
    assert upstream_checkpoint_path("r", "maple", 5) == os.path.join(
        "r", "MultiModalPromptLearner", "model.pth.tar-5")


def test_expected_prompt_shapes():
    assert expected_prompt_shapes("ivlp", 4, 512, 9, 4, 768, 9) == {
        "ctx": (4, 512), "text_deep": (8, 4, 512), "vision_ctx": (4, 768),
        "vision_deep": (8, 4, 768)}
    assert expected_prompt_shapes("ivlp", 4, 512, 1, vision_depth=0) == {"ctx": (4, 512)}
    assert expected_prompt_shapes("maple", 2, 512, 9, vision_width=768) == {
        "ctx": (2, 512), "text_deep": (8, 2, 512), "couple0/kernel": (512, 768),
        "couple0/bias": (768,), "couple_deep/kernel": (8, 512, 768), "couple_deep/bias": (8, 768)}
    with pytest.raises(ValueError, match="prompt depth 0: expected >= 1"):
        expected_prompt_shapes("maple", 2, 512, 0, vision_width=768)
    with pytest.raises(ValueError, match="needs vision_n_ctx and vision_width"):
        expected_prompt_shapes("ivlp", 4, 512, 9, vision_depth=9)
