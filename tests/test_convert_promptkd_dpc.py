"""Import and export of PyTorch PromptKD+DPC stage-2 checkpoints (StackSPLE_PromptKD).

The stage-2 files are written here by torch itself in the released layout (JREion/DPC
trainers/sple_promptkd.py; docs/reference/backbones.md#dpc-on-each-backbone, #pytorch-checkpoints):
the whole `CustomSPLECLIP` saved by Dassl, i.e. the student image tower with its visual prompts,
`logit_scale`, the projector `VPT_image_trans` (fp16 convs, BatchNorm statistics moved by stage 2's
train-mode forwards), the prompt learner with theta as `prompt_learner.ctx` (fp16), its
prefix/suffix buffers and the teacher-width text tower `prompt_learner.text_encoder` (deep prompts
`VPT_shallow` in blocks 1..J-1) registered a second time as `text_encoder`, and `clip_model` (the
student CLIP again, with its unused 512-wide text tower and that tower's random deep prompts),
inside a Dassl dict with a pickled scheduler.
"""

from __future__ import annotations

import collections
import copy
import os

import ml_collections
import numpy as np
import pytest

from dpc_jax.convert.promptkd_torch import (
    export_promptkd_dpc,
    load_promptkd_dpc,
    load_promptkd_student,
    student_checkpoint_path,
)
from dpc_jax.prompts.base import DualRules
from dpc_jax.prompts.dpc import DualPrompt
from helpers import RAN, _listed, assert_tree_equal

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_helpers import (  # noqa: E402
    PROJECTOR_KEYS,
    R,
    Block,
    FeatureTrans,
    ImageEncoder,
    learner_stub,
    make_student,
    ours,
    save_upstream,
    whole_state_dict,
)

TEXT_CTX = "prompt_learner.ctx"
TEXT_R = "prompt_learner.text_encoder.transformer.resblocks.{}.VPT_shallow"
COPY_R = "text_encoder.transformer.resblocks.{}.VPT_shallow"
W_B = 0.2  # the released PromptKD+DPC SPLE.STACK.WEIGHT


# -- an upstream-shaped stage-2 model ------------------------------------------------------------


class TextTower(nn.Module):
    """A cut-down CLIP text transformer with IVLP's deep prompts (upstream names)."""

    def __init__(self, n, width, depth, embed_dim, g):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            [Block(width, 0.02 * torch.randn(n, width, generator=g) if 1 <= i < depth else None)
             for i in range(max(depth, 2) + 1)])
        self.positional_embedding = nn.Parameter(torch.randn(6, width, generator=g))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim, generator=g))


class PromptLearner(nn.Module):
    """VLPromptLearner_SPLE: theta, the class-text buffers, the teacher-width text tower."""

    def __init__(self, n_t, w_t, depth_t, e_t, n_cls, g):
        super().__init__()
        self.text_encoder = TextTower(n_t, w_t, depth_t, e_t, g)
        self.ctx = nn.Parameter(torch.randn(n_t, w_t, generator=g).half())
        half = (n_cls + 1) // 2
        self.register_buffer("token_prefix", torch.randn(half, 1, w_t, generator=g).half())
        self.register_buffer("token_suffix", torch.randn(half, 3, w_t, generator=g).half())
        self.register_buffer("token_prefix2", torch.randn(n_cls - half, 1, w_t,
                                                          generator=g).half())
        self.register_buffer("token_suffix2", torch.randn(n_cls - half, 3, w_t,
                                                          generator=g).half())


class StudentCLIP(nn.Module):
    """The student CLIP as `clip_model`: its visual tower (shared) and unused text tower."""

    def __init__(self, visual, n_t, w_s, depth_t, e_s, g):
        super().__init__()
        self.visual = visual
        self.transformer = TextTower(n_t, w_s, depth_t, e_s, g).transformer


class SPLECLIP(nn.Module):
    """Upstream's CustomSPLECLIP, registration order as there."""

    def __init__(self, dims, g):
        n_v, w_v, depth_v, e_s, e_t, n_t, w_t, depth_t = dims
        super().__init__()
        self.image_encoder = ImageEncoder(n_v, w_v, depth_v, e_s, g)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.VPT_image_trans = FeatureTrans(e_s, e_t)
        self.prompt_learner = PromptLearner(n_t, w_t, depth_t, e_t, 5, g)
        self.text_encoder = self.prompt_learner.text_encoder  # one module, two names
        self.clip_model = StudentCLIP(self.image_encoder, n_t, e_s + 2, depth_t, e_s, g)


def make_stage2(dims, seed=0):
    """A stage-2 model as the released trainer leaves it: BN statistics moved by train-mode
    forwards, the projector convs and frozen tensors fp16, theta fp16, prompts fp32."""
    e_s, e_t = dims[3], dims[4]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SPLECLIP(dims, g)
    trans = model.VPT_image_trans
    with torch.no_grad():
        trans.conv1[1].weight.copy_(1 + 0.3 * torch.randn(e_t, generator=g))
        trans.conv1[1].bias.copy_(0.3 * torch.randn(e_t, generator=g))
        trans.train()
        for _ in range(4):
            trans(1.5 * torch.randn(5, e_s, generator=g) - 0.5)
    trans.eval()
    trans.conv1[0].half()
    trans.conv1[3].half()
    for name, param in model.named_parameters():
        if "VPT" not in name and "ln_" not in name and name != TEXT_CTX:
            param.data = param.data.half()
    return model


def ours_dpc(model):
    """The dpc_jax (parallel, state) the torch stage-2 model stands for, built here."""
    prompt, state = ours(model)
    f = lambda t: t.detach().float().numpy()  # noqa: E731
    prompt["ctx"] = f(model.prompt_learner.ctx)
    deep = [f(b.VPT_shallow) for b in model.prompt_learner.text_encoder.transformer.resblocks
            if hasattr(b, "VPT_shallow")]
    if deep:
        prompt["text_deep"] = np.stack(deep)
    return prompt, state


def dpc_shapes(n_v, w_v, depth_v, e_s, e_t, n_t, w_t, depth_t):
    out = learner_stub(n_v, w_v, depth_v, e_s, e_t).expected_shapes()
    out["ctx"] = (n_t, w_t)
    if depth_t > 1:
        out["text_deep"] = (depth_t - 1, n_t, w_t)
    return out


def stage2_keys(depth_v, depth_t):
    """The keys an export writes, in its order."""
    return (["image_encoder.VPT"] + [R.format(i) for i in range(1, depth_v)] + PROJECTOR_KEYS
            + [TEXT_CTX] + [TEXT_R.format(i) for i in range(1, depth_t)]
            + [COPY_R.format(i) for i in range(1, depth_t)])


# n_v, W_v, depth_v, E_s, E_t, n_t, W_t, depth_t
B16 = (4, 768, 9, 512, 768, 4, 768, 9)  # the released shapes (student B/16, teacher L/14)
TINY = (2, 16, 3, 8, 12, 3, 20, 3)
CASES = {"b16_l14": (B16, False), "tiny_module": (TINY, True),
         "tiny_text_depth1": ((2, 16, 2, 8, 12, 3, 20, 1), False)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_export_round_trip(tmp_path, case):
    dims, module_prefix = CASES[case]
    depth_v, depth_t = dims[2], dims[7]
    model = make_stage2(dims)
    state_dict = collections.OrderedDict(model.state_dict())
    # The layout the released trainer saves: both names of the text tower, clip_model's copies.
    assert state_dict[TEXT_CTX].dtype == torch.float16
    for i in range(1, depth_t):
        assert torch.equal(state_dict[TEXT_R.format(i)], state_dict[COPY_R.format(i)])
        assert f"clip_model.transformer.resblocks.{i}.VPT_shallow" in state_dict
    assert "clip_model.visual.VPT" in state_dict
    path = save_upstream(str(tmp_path / "dpc" / "VLPromptLearner" / "model-best.pth.tar"),
                         state_dict, module_prefix)
    expected = dpc_shapes(*dims)

    RAN.clear()
    parallel, state = load_promptkd_dpc(path, expected)
    assert RAN == []  # the pickled scheduler object was not built
    want_parallel, want_state = ours_dpc(model)
    assert_tree_equal(parallel, want_parallel)
    assert_tree_equal(state, want_state)  # stage 2's BatchNorm statistics
    assert ("text_deep" in parallel) == (depth_t > 1)
    # A stage-2 file is refused where a stage-1 student is expected.
    with pytest.raises(ValueError, match=r"is a PromptKD\+DPC stage-2 checkpoint "
                                         r"\(StackSPLE_PromptKD.*config\.dpc\.init_from"):
        load_promptkd_student(path, learner_stub(*dims[:5]).expected_shapes())

    # Export: the student's keys, theta, the text deep prompts under both names; float32.
    out = student_checkpoint_path(str(tmp_path / "exported"), 20)
    assert export_promptkd_dpc(parallel, state, out, 20, num_batches_tracked=4) == out
    assert os.listdir(os.path.dirname(out)) == ["model.pth.tar-20"]  # no temporary left
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 20 and saved["optimizer"] is None
    written = saved["state_dict"]
    assert list(written) == stage2_keys(depth_v, depth_t)
    for key, value in written.items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64 and int(value) == 4
        else:
            assert value.dtype == torch.float32, key
            assert torch.equal(value, state_dict[key].float()), key  # fp16 -> fp32 exact

    # Re-import is bitwise equal.
    again_parallel, again_state = load_promptkd_dpc(out, expected)
    assert_tree_equal(again_parallel, parallel)
    assert_tree_equal(again_state, state)

    # The released load_model (load_state_dict(strict=False) on the built model) takes every
    # key; the fp16 parameters get back their exact values, both text-tower names included.
    fresh = make_stage2(dims, seed=3)
    result = fresh.load_state_dict(written, strict=False)
    assert result.unexpected_keys == []
    loaded = fresh.state_dict()
    for key in written:
        if not key.endswith("num_batches_tracked"):
            assert loaded[key].dtype == state_dict[key].dtype, key
            assert torch.equal(loaded[key], state_dict[key]), key


def test_converse_map_of_the_imported_theta_is_the_released_forward(tmp_path):
    """Base classes use Q = (theta - (1-w_b) P) / w_b for the text context, as the released
    forward computes it, and every other leaf as stored; w_n = 0 gives P itself for new
    classes; w_n > 0 mixes the text context as the released new-class loader does."""
    dims = TINY
    model = make_stage2(dims)
    path = save_upstream(str(tmp_path / "m" / "model-best.pth.tar"), model.state_dict())
    parallel, _ = load_promptkd_dpc(path, dpc_shapes(*dims))
    g = torch.Generator().manual_seed(11)
    p_ctx = torch.randn(*parallel["ctx"].shape, generator=g).half()  # the teacher's fp16 ctx
    backbone = copy.deepcopy(parallel)
    rng = np.random.default_rng(0)
    for leaf in ("vision_ctx", "vision_deep", "text_deep"):
        backbone[leaf] = parallel[leaf] + rng.standard_normal(parallel[leaf].shape).astype(
            np.float32)
    backbone["ctx"] = p_ctx.float().numpy()
    params = {"backbone": backbone, "parallel": parallel}
    theta = model.prompt_learner.ctx.detach().float()
    pre = p_ctx.float()

    dual = DualPrompt(ml_collections.ConfigDict({"mode": "reference", "w_base": W_B,
                                                 "w_new": 0.0}), DualRules())
    base = dual.eval_prompt(params, "base")
    released_q = ((theta - (1 - W_B) * pre) * (1 / W_B)).numpy()
    np.testing.assert_allclose(np.asarray(base["ctx"]), released_q, rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(base["ctx"]), parallel["ctx"])  # not theta itself
    for leaf in ("vision_ctx", "vision_deep", "text_deep"):
        np.testing.assert_array_equal(np.asarray(base[leaf]), parallel[leaf])
    assert dual.eval_prompt(params, "new") is backbone

    w_n = 0.3
    dual = DualPrompt(ml_collections.ConfigDict({"mode": "reference", "w_base": W_B,
                                                 "w_new": w_n}), DualRules())
    mixed = w_n * theta + (1 - w_n) * pre  # the released loader's ctx for new classes
    released_new = ((mixed - (1 - W_B) * pre) * (1 / W_B)).numpy()
    np.testing.assert_allclose(np.asarray(dual.eval_prompt(params, "new")["ctx"]), released_new,
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Mismatches
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_file(tmp_path):
    return save_upstream(str(tmp_path / "dpc" / "VLPromptLearner" / "model-best.pth.tar"),
                         make_stage2(TINY).state_dict(), module_prefix=True)


def _error(path, expected):
    with pytest.raises(ValueError) as info:
        load_promptkd_dpc(path, expected)
    message = str(info.value)
    assert path in message
    for ignored in ("clip_model", "token_prefix", "logit_scale", "ln_final", "class_embedding",
                    "num_batches_tracked"):
        assert ignored not in message, ignored
    return message


def test_wrong_teacher_text_width_and_n_ctx(tiny_file):
    n_v, w_v, d_v, e_s, e_t, n_t, w_t, d_t = TINY
    message = _error(tiny_file, dpc_shapes(n_v, w_v, d_v, e_s, e_t, n_t, 24, d_t))
    assert "does not fit the PromptKD+DPC stage-2 model of this configuration" in message
    assert "looks like a PromptKD+DPC stage-2 checkpoint (StackSPLE_PromptKD)" in message
    assert "teacher n_ctx_text 3, teacher text width 24, teacher depth_text 3" in message
    assert ("prompt_learner.ctx: file (3, 20), expected (3, 24) (set by the teacher CLIP text "
            "width (config.backbone.teacher_clip))") in message
    assert (f"{TEXT_R.format(2)}: file (3, 20), expected (3, 24) (set by the teacher CLIP text "
            f"width") in message
    assert "missing keys" not in message and "image_encoder" not in message
    message = _error(tiny_file, dpc_shapes(n_v, w_v, d_v, e_s, e_t, 4, w_t, d_t))
    assert ("prompt_learner.ctx: file (3, 20), expected (4, 20) (set by the teacher's "
            "n_ctx_text (config.backbone.teacher.n_ctx_text))") in message


@pytest.mark.parametrize("depth_t,unexpected,missing", [
    (2, [TEXT_R.format(2)], []),
    (4, [], [TEXT_R.format(3)]),
], ids=["shallower", "deeper"])
def test_wrong_text_depth(tiny_file, depth_t, unexpected, missing):
    message = _error(tiny_file, dpc_shapes(*TINY[:7], depth_t))
    assert ("text_deep: the file has VPT_shallow entries for blocks [1, 2] (prompt depth 3); the "
            f"config expects prompt depth {depth_t} (the teacher's depth_text, "
            "config.backbone.teacher.depth_text)") in message
    for label, keys in (("unexpected prompt keys", unexpected), ("missing keys", missing)):
        if keys:
            assert _listed(message, label) == keys
        else:
            assert label not in message
    assert "vision_deep:" not in message  # the student's depth fits


def test_all_problems_in_one_listing(tmp_path):
    state = collections.OrderedDict(make_stage2(TINY).state_dict())
    del state[TEXT_CTX]
    state[R.format(2)] = state[R.format(2)][:1]
    state[COPY_R.format(1)] = state[COPY_R.format(1)] + 1  # a second copy that disagrees
    state["VPT_image_trans.conv1.1.running_var"] = torch.ones(12, dtype=torch.int64)
    path = save_upstream(str(tmp_path / "m.pth.tar-20"), state)
    message = _error(path, dpc_shapes(*TINY))
    assert _listed(message, "missing keys") == [TEXT_CTX]
    assert f"{R.format(2)}: file (1, 16), expected (2, 16) (set by n_ctx_vision" in message
    assert ("keys that are not floating-point tensors: ['VPT_image_trans.conv1.1.running_var: "
            "Tensor torch.int64']") in message
    assert _listed(message, "second copies that disagree") == [
        f"{COPY_R.format(1)} (differs from {TEXT_R.format(1)}, the same module's parameter)"]


def test_stage1_student_given_as_stage2(tmp_path):
    model = make_student(*TINY[:5])
    path = save_upstream(student_checkpoint_path(str(tmp_path / "run"), 20),
                         whole_state_dict(model))
    message = _error(path, dpc_shapes(*TINY))
    assert ("looks like a stage-1 PromptKD student checkpoint (no prompt_learner.text_encoder.* "
            "text tower), not a stage-2 file: give it as config.backbone.init_from") in message
    assert _listed(message, "missing keys") == [TEXT_CTX, TEXT_R.format(1), TEXT_R.format(2)]


def test_expected_and_export_argument_errors(tmp_path):
    shapes = dpc_shapes(*TINY)
    student_only = {k: v for k, v in shapes.items() if k not in ("ctx", "text_deep")}
    with pytest.raises(ValueError, match=r"expected lacks the PromptKD\+DPC parallel prompt "
                                         r"leaves \['ctx'\]"):
        load_promptkd_dpc(str(tmp_path / "x"), student_only)
    with pytest.raises(ValueError, match=r"expected has leaves \['meta_net'\] that the "
                                         r"PromptKD\+DPC parallel prompt does not have"):
        load_promptkd_dpc(str(tmp_path / "x"), {**shapes, "meta_net": (3,)})
    with pytest.raises(FileNotFoundError, match=r"PromptKD\+DPC stage-2 checkpoint .*nope"):
        load_promptkd_dpc(str(tmp_path / "nope"), shapes)

    model = make_stage2(TINY)
    path = save_upstream(str(tmp_path / "m.pth.tar-20"), model.state_dict())
    parallel, state = load_promptkd_dpc(path, shapes)
    out = str(tmp_path / "out" / "model.pth.tar-1")
    bad = dict(parallel, text_deep=parallel["text_deep"][:, :, :5])
    with pytest.raises(ValueError, match=r"parallel\['text_deep'\] has shape \(2, 3, 5\); "
                                         r"expected \(depth_text - 1, 3, 20\)"):
        export_promptkd_dpc(bad, state, out, 1)
    with pytest.raises(ValueError, match=r"a PromptKD\+DPC parallel prompt has the text "
                                         r"context 'ctx'"):
        export_promptkd_dpc({k: v for k, v in parallel.items() if k != "ctx"}, state, out, 1)
    with pytest.raises(ValueError, match=r"parallel\['ctx'\] has dtype float64"):
        export_promptkd_dpc(dict(parallel, ctx=parallel["ctx"].astype(np.float64)), state,
                            out, 1)
    assert not os.path.exists(os.path.dirname(out))  # nothing written for a rejected model


def test_config_dpc_init_from_is_checked_before_anything_runs():
    from dpc_jax.prompts import get_learner
    from dpc_jax.training import stage2, train_lib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = train_lib.load_config(os.path.join(root, "configs", "dpc_promptkd.py"))
    promptkd = get_learner("promptkd")
    stage2.check_dpc_import(cfg, promptkd)  # empty: nothing to check
    cfg.dpc.init_from = "/runs/dpc/VLPromptLearner/model-best.pth.tar"
    with pytest.raises(ValueError, match=r"needs config\.backbone\.init_from: the stage-1 "
                                         r"PyTorch file that stage 2 started from"):
        stage2.check_dpc_import(cfg, promptkd)
    cfg.backbone.init_from = "/runs/kd/VLPromptLearner/model-best.pth.tar"
    with pytest.raises(ValueError, match=r"needs config\.backbone\.teacher\.init_from"):
        stage2.check_dpc_import(cfg, promptkd)
    cfg.backbone.teacher.init_from = cfg.dpc.init_from
    with pytest.raises(ValueError, match=r"config\.backbone\.teacher\.init_from and "
                                         r"config\.dpc\.init_from are the same file"):
        stage2.check_dpc_import(cfg, promptkd)
    cfg.backbone.teacher.init_from = "/teacher_model/X/VLPromptLearner/model-best.pth.tar"
    stage2.check_dpc_import(cfg, promptkd)
    cfg.dpc.mode = "paper"
    with pytest.raises(ValueError, match=r"config\.dpc\.mode='paper': a released "
                                         r"StackSPLE_PromptKD file stores the released"):
        stage2.check_dpc_import(cfg, promptkd)
    coop = train_lib.load_config(os.path.join(root, "configs", "dpc_coop.py"))
    coop.dpc.init_from = "/runs/x/prompt_learner/model.pth.tar-20"
    with pytest.raises(ValueError, match=r"the 'coop' learner has no importer of PyTorch DPC "
                                         r"stage-2 checkpoints \(learners with one: promptkd\)"):
        stage2.check_dpc_import(coop, get_learner("coop"))
