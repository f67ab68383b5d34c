"""Import and export of PyTorch PromptKD student checkpoints (promptkd_torch).

The checkpoints are written here by torch itself in the upstream layout
(docs/reference/backbones.md#promptkd, #pytorch-checkpoints):
the student `CustomCLIP` saved whole (its image tower with the visual prompts, frozen CLIP
tensors, logit_scale, and the projector `VPT_image_trans.conv1 = Sequential(Conv2d, BatchNorm2d,
ReLU, Conv2d)` with fp16 convs and trained BN statistics), plus text-side tensors and prompt
learner buffers some versions save, inside a Dassl dict whose scheduler entry is a pickled object
the loader must not build.
"""

from __future__ import annotations

import collections
import copy
import os

import numpy as np
import pytest

from dpc_jax.convert.promptkd_torch import (
    export_promptkd_student,
    load_promptkd_student,
    student_checkpoint_path,
)
from helpers import RAN, _listed, assert_tree_equal

torch = pytest.importorskip("torch")

from torch_helpers import (  # noqa: E402
    CONV,
    PROJECTOR_KEYS,
    R,
    learner_stub,
    make_student,
    ours,
    save_upstream,
    whole_state_dict,
)


def expected_shapes(*dims):
    return learner_stub(*dims).expected_shapes()


def numpy_projector(prompt, state, x):
    """The projector in inference mode, in numpy, from the imported kernels and statistics."""
    p, s = prompt["projector"], state["bn"]
    h = x.astype(np.float64) @ p["dense0"]["kernel"] + p["dense0"]["bias"]
    h = (h - s["mean"]) / np.sqrt(s["var"].astype(np.float64) + 1e-5)
    h = np.maximum(h * p["bn"]["scale"] + p["bn"]["bias"], 0.0)
    return h @ p["dense1"]["kernel"] + p["dense1"]["bias"]


def torch_reference(model):
    """The upstream projector in float32, eval mode (fp16 convs widened exactly)."""
    return copy.deepcopy(model.VPT_image_trans).float().eval()


# ----------------------------------------------------------------------------------------------
# Import, projector parity, export, round trip
# ----------------------------------------------------------------------------------------------

CASES = {
    # name: (n_v, W_v, depth_vision, E_s, E_t, 'module.' prefix, text-side keys, exported count)
    "b16_depth9": (4, 768, 9, 512, 768, False, False, 0),
    "tiny_depth3_module_text_side": (2, 16, 3, 8, 12, True, True, 3),
    "tiny_depth1": (3, 16, 1, 8, 12, False, True, 0),
    "cross_dataset_depth3": (4, 24, 3, 10, 6, True, False, 1200),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_export_round_trip(tmp_path, case):
    n_v, width, depth, e_s, e_t, module_prefix, text_side, count = CASES[case]
    model = make_student(n_v, width, depth, e_s, e_t)
    state_dict = whole_state_dict(model, text_side)
    assert state_dict[CONV + "0.weight"].dtype == torch.float16  # as upstream
    assert state_dict[CONV + "1.running_var"].dtype == torch.float32
    assert int(state_dict[CONV + "1.num_batches_tracked"]) == 3
    path = save_upstream(student_checkpoint_path(str(tmp_path / "run"), 20), state_dict,
                         module_prefix)
    expected = expected_shapes(n_v, width, depth, e_s, e_t)

    RAN.clear()
    prompt, state = load_promptkd_student(path, expected)
    assert RAN == []  # the pickled scheduler object was not built
    want_prompt, want_state = ours(model)
    assert_tree_equal(prompt, want_prompt)
    assert_tree_equal(state, want_state)
    assert ("vision_deep" in prompt) == (depth > 1)
    flat_shapes = {"vision_ctx": prompt["vision_ctx"].shape,
                   **({"vision_deep": prompt["vision_deep"].shape} if depth > 1 else {}),
                   **{f"projector/{a}/{b}": v.shape for a, d in prompt["projector"].items()
                      for b, v in d.items()}}
    assert flat_shapes == expected
    assert not np.allclose(state["bn"]["mean"], 0) and not np.allclose(state["bn"]["var"], 1)

    # The imported kernels compute torch's projector (eval mode) on the same input.
    x = torch.randn(5, e_s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = torch_reference(model)(x).numpy()
    np.testing.assert_allclose(numpy_projector(prompt, state, x.numpy()), reference,
                               rtol=1e-5, atol=1e-5)

    # The learner's loaders (what config.backbone.init_from calls) give the same trees.
    learner = learner_stub(n_v, width, depth, e_s, e_t)
    assert_tree_equal(learner.load_torch_prompt(path), want_prompt)
    prompt, state = learner.load_torch_backbone(path)
    assert_tree_equal(prompt, want_prompt)
    assert_tree_equal(state, want_state)

    # Export: the upstream keys only, float32 (the count int64), in torch's order.
    out = student_checkpoint_path(str(tmp_path / "exported"), 7)
    assert export_promptkd_student(prompt, state, out, 7, num_batches_tracked=count) == out
    assert os.listdir(os.path.dirname(out)) == ["model.pth.tar-7"]  # no temporary left
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert sorted(saved) == ["epoch", "optimizer", "scheduler", "state_dict", "val_result"]
    assert saved["epoch"] == 7
    assert saved["optimizer"] is saved["scheduler"] is saved["val_result"] is None
    written = saved["state_dict"]
    student_keys = ["image_encoder.VPT"] + [R.format(i) for i in range(1, depth)]
    assert list(written) == student_keys + PROJECTOR_KEYS
    for key, value in written.items():
        original = state_dict[key]
        assert value.shape == original.shape, key
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64 and value.shape == () and int(value) == count
        else:
            assert value.dtype == torch.float32, key
            assert torch.equal(value, original.float()), key  # fp16 -> fp32 exact

    # Re-import is bitwise equal.
    again_prompt, again_state = load_promptkd_student(out, expected)
    assert_tree_equal(again_prompt, prompt)
    assert_tree_equal(again_state, state)

    # Upstream's load_model (load_state_dict(strict=False) on the whole model) takes the file:
    # every key lands, the fp16 convs get back their exact fp16 values.
    fresh = make_student(n_v, width, depth, e_s, e_t, seed=5)
    result = fresh.load_state_dict(written, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(
        set(model.state_dict()) - set(student_keys + PROJECTOR_KEYS))
    loaded = fresh.state_dict()
    for key in student_keys + PROJECTOR_KEYS:
        if not key.endswith("num_batches_tracked"):
            assert loaded[key].dtype == state_dict[key].dtype, key
            assert torch.equal(loaded[key], state_dict[key]), key


def test_the_scheduler_sentinel_works(tmp_path):
    """A plain unpickling of the test file does build the scheduler (so RAN == [] above means
    the loader did not)."""
    model = make_student(2, 16, 2, 8, 12)
    path = save_upstream(str(tmp_path / "m.pth.tar-1"), whole_state_dict(model))
    RAN.clear()
    torch.load(path, map_location="cpu", weights_only=False)
    assert len(RAN) == 1
    RAN.clear()
    load_promptkd_student(path, expected_shapes(2, 16, 2, 8, 12))
    assert RAN == []


def test_project_matches_the_torch_projector(tmp_path):
    """dpc_jax.prompts.promptkd.project with the imported projector and statistics is torch's
    Sequential: in eval mode, and in train mode (batch statistics, momentum-0.1 update of the
    running ones with the unbiased variance)."""
    import jax.numpy as jnp

    from dpc_jax.prompts.promptkd import project

    n_v, width, depth, e_s, e_t = 2, 16, 3, 8, 12
    model = make_student(n_v, width, depth, e_s, e_t, seed=2)
    path = save_upstream(str(tmp_path / "VLPromptLearner" / "model-best.pth.tar"),
                         whole_state_dict(model))
    prompt, state = load_promptkd_student(path, expected_shapes(n_v, width, depth, e_s, e_t))
    x = 1.3 * torch.randn(7, e_s, generator=torch.Generator().manual_seed(3)) + 0.2
    reference = torch_reference(model)
    with torch.no_grad():
        want = reference(x).numpy()
    got, stats = project(prompt["projector"], state["bn"], jnp.asarray(x.numpy()), train=False)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats["mean"]), state["bn"]["mean"])

    reference.train()
    with torch.no_grad():
        want = reference(x).numpy()
    got, stats = project(prompt["projector"], state["bn"], jnp.asarray(x.numpy()), train=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    bn = reference.conv1[1]
    np.testing.assert_allclose(np.asarray(stats["mean"]), bn.running_mean.numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"]), bn.running_var.numpy(),
                               rtol=1e-5, atol=1e-6)


def test_export_then_load_is_exact_for_float32_and_jax_arrays(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(0)
    shapes = expected_shapes(3, 16, 4, 8, 12)
    flat = {leaf: rng.standard_normal(shape).astype(np.float32) for leaf, shape in shapes.items()}
    prompt = {}
    for leaf, value in flat.items():
        *parents, name = leaf.split("/")
        node = prompt
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = jnp.asarray(value)
    state = {"bn": {"mean": rng.standard_normal(12).astype(np.float32),
                    "var": rng.uniform(0.5, 2, 12).astype(np.float32)}}
    path = export_promptkd_student(prompt, state, str(tmp_path / "a" / "b" / "model.pth.tar-3"), 3)
    again_prompt, again_state = load_promptkd_student(path, shapes)
    assert_tree_equal(again_prompt, {k: (np.asarray(v) if not isinstance(v, dict) else
                                         {a: {b: np.asarray(w) for b, w in d.items()}
                                          for a, d in v.items()})
                                     for k, v in prompt.items()})
    assert_tree_equal(again_state, state)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert int(saved[CONV + "1.num_batches_tracked"]) == 0  # the default count


# ----------------------------------------------------------------------------------------------
# Mismatches
# ----------------------------------------------------------------------------------------------

TINY = (2, 16, 3, 8, 12)  # n_v, W_v, depth_vision, E_s, E_t


@pytest.fixture
def tiny_file(tmp_path):
    model = make_student(*TINY)
    return save_upstream(student_checkpoint_path(str(tmp_path / "run"), 20),
                         whole_state_dict(model, text_side=True), module_prefix=True)


def _error(path, expected):
    with pytest.raises(ValueError) as info:
        load_promptkd_student(path, expected)
    message = str(info.value)
    assert path in message
    # Frozen copies, buffers and text-side tensors are never reported.
    for frozen in ("class_embedding", "ln_post", "mlp", "logit_scale", "token_prefix",
                   "token_suffix", "text_encoder", "prompt_learner", "num_batches_tracked"):
        assert frozen not in message, frozen
    return message


def test_wrong_vision_width_and_n_ctx(tiny_file):
    message = _error(tiny_file, expected_shapes(2, 24, 3, 8, 12))
    assert "looks like a PromptKD student checkpoint" in message
    assert ("n_ctx_vision 2, student vision width 24, depth_vision 3, student embed dim E_s 8, "
            "teacher embed dim E_t 12") in message
    assert ("image_encoder.VPT: file (2, 16), expected (2, 24) (set by the student CLIP vision "
            "width (vision_width))") in message
    assert ("image_encoder.transformer.resblocks.2.VPT_shallow: file (2, 16), expected (2, 24) "
            "(set by the student CLIP vision width (vision_width))") in message
    assert "missing keys" not in message and "unexpected prompt keys" not in message
    assert "VPT_image_trans" not in message  # the projector fits
    message = _error(tiny_file, expected_shapes(4, 16, 3, 8, 12))
    assert ("image_encoder.VPT: file (2, 16), expected (4, 16) (set by n_ctx_vision "
            "(config.backbone.n_ctx_vision))") in message


def test_wrong_embed_dims_name_the_upstream_conv_shapes(tiny_file):
    message = _error(tiny_file, expected_shapes(2, 16, 3, 8, 16))
    assert ("VPT_image_trans.conv1.0.weight: file (12, 8, 1, 1), expected (16, 8, 1, 1) (set "
            "by the teacher embed dim E_t") in message
    assert ("VPT_image_trans.conv1.1.running_mean: file (12,), expected (16,) (set by the "
            "teacher embed dim E_t") in message
    assert "VPT_image_trans.conv1.1.running_var: file (12,), expected (16,)" in message
    assert ("VPT_image_trans.conv1.3.weight: file (12, 12, 1, 1), expected (16, 16, 1, 1) (set "
            "by the teacher embed dim E_t (the teacher CLIP's embed_dim, "
            "config.backbone.teacher_clip))\n") in message
    assert "image_encoder.VPT" not in message
    message = _error(tiny_file, expected_shapes(2, 16, 3, 10, 12))
    assert ("VPT_image_trans.conv1.0.weight: file (12, 8, 1, 1), expected (12, 10, 1, 1) (set "
            "by the student embed dim E_s (the student CLIP's embed_dim))") in message
    assert "conv1.3" not in message and "running_mean" not in message


@pytest.mark.parametrize("depth,unexpected,missing", [
    (2, [R.format(2)], []),
    (1, [R.format(1), R.format(2)], []),
    (5, [], [R.format(3), R.format(4)]),
], ids=["shallower", "depth1", "deeper"])
def test_wrong_depth(tiny_file, depth, unexpected, missing):
    message = _error(tiny_file, expected_shapes(2, 16, depth, 8, 12))
    assert ("vision_deep: the file has VPT_shallow entries for blocks [1, 2] (prompt depth 3); "
            f"the config expects prompt depth {depth} (depth_vision") in message
    if unexpected:
        assert _listed(message, "unexpected prompt keys") == unexpected
    else:
        assert "unexpected prompt keys" not in message
    if missing:
        assert _listed(message, "missing keys") == missing
    else:
        assert "missing keys" not in message


def test_depth1_file_with_a_deeper_config(tmp_path):
    model = make_student(2, 16, 1, 8, 12)
    path = save_upstream(str(tmp_path / "m.pth.tar-20"), whole_state_dict(model))
    message = _error(path, expected_shapes(2, 16, 3, 8, 12))
    assert ("vision_deep: the file has no VPT_shallow entries (prompt depth 1); the config "
            "expects prompt depth 3") in message
    assert _listed(message, "missing keys") == [R.format(1), R.format(2)]


def test_broken_projector(tmp_path):
    state = whole_state_dict(make_student(*TINY))
    del state[CONV + "1.running_var"]
    state[CONV + "4.weight"] = torch.zeros(12, 12, 1, 1)
    state[CONV + "1.running_mean"] = torch.zeros(12, dtype=torch.int32)
    state[CONV + "3.weight"] = state[CONV + "3.weight"][:, :, 0, 0]  # a Linear-shaped weight
    path = save_upstream(str(tmp_path / "m.pth.tar-20"), state)
    message = _error(path, expected_shapes(*TINY))
    assert _listed(message, "missing keys") == [CONV + "1.running_var"]
    assert _listed(message, "unexpected prompt keys") == [CONV + "4.weight"]
    assert (f"keys that are not floating-point tensors: ['{CONV}1.running_mean: Tensor "
            f"torch.int32']") in message
    assert (f"{CONV}3.weight: file (12, 12), expected (12, 12, 1, 1) (a rank-4 tensor)"
            in message)


def _teacher_state(n, text_width, n_v, vision_width, depth):
    """An IVLP/PromptSRC (PromptKD teacher) whole-model state dict."""
    g = torch.Generator().manual_seed(4)
    state = collections.OrderedDict()
    state["prompt_learner.ctx"] = torch.randn(n, text_width, generator=g).half()
    state["prompt_learner.token_prefix"] = torch.randn(3, 1, text_width, generator=g).half()
    state["image_encoder.VPT"] = torch.randn(n_v, vision_width, generator=g)
    state["image_encoder.conv1.weight"] = torch.randn(vision_width, 3, 2, 2, generator=g).half()
    for i in range(1, depth):
        state[R.format(i)] = torch.randn(n_v, vision_width, generator=g)
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(
            n, text_width, generator=g)
    state["logit_scale"] = torch.tensor(4.6)
    return state


def test_teacher_file_given_as_student(tmp_path):
    path = save_upstream(str(tmp_path / "teacher_model" / "X" / "VLPromptLearner" /
                             "model-best.pth.tar"), _teacher_state(4, 20, 2, 24, 3))
    message = _error(path, expected_shapes(*TINY))
    assert ("the file looks like an IVLP/PromptSRC checkpoint (the layout of a PromptKD teacher"
            in message)
    assert "not a student: it has no projector (VPT_image_trans.*)" in message
    assert _listed(message, "missing keys") == [k for k in PROJECTOR_KEYS
                                                if not k.endswith("num_batches_tracked")]
    assert "image_encoder.VPT: file (2, 24), expected (2, 16)" in message


def test_maple_file_given_as_student(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = "prompt_learner."
    state = collections.OrderedDict()
    state[p + "ctx"] = torch.randn(2, 20, generator=g).half()
    state[p + "proj.weight"] = torch.randn(16, 20, generator=g).half()
    state[p + "proj.bias"] = torch.randn(16, generator=g).half()
    state[p + "compound_prompts_text.0"] = torch.randn(2, 20, generator=g)
    state[p + "compound_prompt_projections.0.weight"] = torch.randn(16, 20, generator=g)
    state[p + "compound_prompt_projections.0.bias"] = torch.randn(16, generator=g)
    path = save_upstream(str(tmp_path / "MultiModalPromptLearner" / "model.pth.tar-5"), state)
    with pytest.raises(ValueError) as info:
        load_promptkd_student(path, expected_shapes(*TINY))
    message = str(info.value)
    assert "the file looks like a MaPLe checkpoint, not a PromptKD student" in message
    missing = _listed(message, "missing keys")
    assert missing[:3] == ["image_encoder.VPT", R.format(1), R.format(2)]
    assert len(missing) == 3 + 8


def test_missing_and_non_dassl_files(tmp_path):
    expected = expected_shapes(*TINY)
    with pytest.raises(FileNotFoundError, match=r"PromptKD student checkpoint .*nope.*"
                                                r"VLPromptLearner/model-best\.pth\.tar"):
        load_promptkd_student(str(tmp_path / "nope" / "model.pth.tar-20"), expected)
    plain = str(tmp_path / "plain.pth")
    torch.save({"image_encoder.VPT": torch.zeros(2, 16)}, plain)
    with pytest.raises(ValueError, match=r"plain\.pth.*expected a dict with 'state_dict'"):
        load_promptkd_student(plain, expected)


def test_expected_argument_errors(tmp_path):
    good = expected_shapes(*TINY)
    with pytest.raises(ValueError, match=r"expected has leaves \['ctx'\] that the PromptKD "
                                         r"student prompt does not have"):
        load_promptkd_student(str(tmp_path / "x"), {**good, "ctx": (4, 20)})
    partial = {k: v for k, v in good.items() if k != "projector/bn/scale"}
    with pytest.raises(ValueError, match=r"expected lacks the PromptKD student leaves "
                                         r"\['projector/bn/scale'\]"):
        load_promptkd_student(str(tmp_path / "x"), partial)
    with pytest.raises(ValueError, match=r"expected\['vision_deep'\] has shape \(0, 2, 16\)"):
        load_promptkd_student(str(tmp_path / "x"), {**good, "vision_deep": (0, 2, 16)})


def test_export_rejects_bad_students(tmp_path):
    rng = np.random.default_rng(0)
    shapes = expected_shapes(*TINY)
    flat = {leaf: rng.standard_normal(shape).astype(np.float32) for leaf, shape in shapes.items()}
    prompt = {"vision_ctx": flat["vision_ctx"], "vision_deep": flat["vision_deep"],
              "projector": {a: {b: flat[f"projector/{a}/{b}"] for b in ("kernel", "bias")}
                            for a in ("dense0", "dense1")}}
    prompt["projector"]["bn"] = {"scale": flat["projector/bn/scale"],
                                 "bias": flat["projector/bn/bias"]}
    state = {"bn": {"mean": np.zeros(12, np.float32), "var": np.ones(12, np.float32)}}
    path = str(tmp_path / "out" / "model.pth.tar-1")
    bad_bias = copy.deepcopy(prompt)
    bad_bias["projector"]["bn"]["bias"] = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match=r"projector/bn/bias \(10,\) \(expected \(12,\)\)"):
        export_promptkd_student(bad_bias, state, path, 1)
    with pytest.raises(ValueError, match=r"state bn/var \(5,\) \(expected \(12,\)\)"):
        export_promptkd_student(prompt, {"bn": {"mean": state["bn"]["mean"],
                                                "var": np.ones(5, np.float32)}}, path, 1)
    with pytest.raises(ValueError, match=r"state has leaves \['bn/mean'\]"):
        export_promptkd_student(prompt, {"bn": {"mean": state["bn"]["mean"]}}, path, 1)
    with pytest.raises(ValueError, match=r"prompt\['vision_ctx'\] has dtype float64"):
        export_promptkd_student({**prompt, "vision_ctx": np.zeros((2, 16))}, state, path, 1)
    with pytest.raises(ValueError, match=r"num_batches_tracked=-1"):
        export_promptkd_student(prompt, state, path, 1, num_batches_tracked=-1)
    assert not os.path.exists(os.path.dirname(path))  # nothing written for a rejected student


def test_student_checkpoint_path():
    assert student_checkpoint_path("out/run", 20) == os.path.join(
        "out/run", "VLPromptLearner", "model.pth.tar-20")
