"""Import and export of PyTorch DePT checkpoints (dept_torch, DePT.load/export_torch_prompt).

The checkpoints are written here by torch itself in the layout of Koorye/DePT's trainers
(trainers/elp_coop.py, elp_maple.py; docs/reference/backbones.md#dept, #pytorch-checkpoints): the
whole `CustomCLIP` registered as 'PromptLearner' (CoOp) or 'MultiModalPromptLearner' (MaPLe) and
saved in one Dassl file: the 'prompt_learner.'-prefixed prompt and its buffers, frozen CLIP
tensors, logit_scale, and the unprefixed head film_lp_img / film_lp_text (upstream's FiLM, fp32)
and linear_probe_proj (fp16 under PREC 'fp16'), beside an optimizer state and a pickled scheduler
object.
"""

from __future__ import annotations

import collections
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dpc_jax.convert.dept_torch import (
    dept_checkpoint_path,
    export_dept_checkpoint,
    load_dept_head,
)
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.models.tokenizer import Tokenizer
from dpc_jax.prompts import dept as dept_lib
from dpc_jax.prompts.cocoop import CoCoOp
from dpc_jax.prompts.dept import DePT
from dpc_jax.prompts.maple import MaPLe
from dpc_jax.training import train_lib
from helpers import RAN, UpstreamScheduler

torch = pytest.importorskip("torch")
nn = torch.nn

C_BASE = 5
HEAD = ["film_lp_img.scale", "film_lp_img.bias", "film_lp_text.scale", "film_lp_text.bias",
        "linear_probe_proj.weight", "linear_probe_proj.bias"]


# -- upstream-shaped DePT models ------------------------------------------------------------------


class FiLM(nn.Module):
    """Upstream's FiLM (trainers/elp_maple.py)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.scale.unsqueeze(0).type(x.dtype) * x + self.bias.unsqueeze(0).type(x.dtype)


class CoOpPromptLearner(nn.Module):
    def __init__(self, n_ctx, width, n_cls, g):
        super().__init__()
        self.ctx = nn.Parameter((0.02 * torch.randn(n_ctx, width, generator=g)).half())
        self.register_buffer("token_prefix", torch.randn(n_cls, 1, width, generator=g).half())
        self.register_buffer("token_suffix",
                             torch.randn(n_cls, 76 - n_ctx, width, generator=g).half())


class CoCoOpPromptLearner(nn.Module):
    """trainers/cocoop.py's PromptLearner under PREC 'fp16': ctx from "a photo of a" and the
    meta-net E -> E/16 -> W_t, both half precision."""

    def __init__(self, width, embed_dim, n_cls, g):
        super().__init__()
        self.ctx = nn.Parameter(torch.randn(4, width, generator=g).half())
        self.meta_net = nn.Sequential(collections.OrderedDict([
            ("linear1", nn.Linear(embed_dim, embed_dim // 16)), ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(embed_dim // 16, width))]))
        self.meta_net.half()
        self.register_buffer("token_prefix", torch.randn(n_cls, 1, width, generator=g).half())
        self.register_buffer("token_suffix", torch.randn(n_cls, 72, width, generator=g).half())


class MaPLePromptLearner(nn.Module):
    def __init__(self, n_ctx, text_width, vision_width, depth, n_cls, g):
        super().__init__()
        self.proj = nn.Linear(text_width, vision_width)
        self.proj.half()
        self.ctx = nn.Parameter(torch.randn(n_ctx, text_width, generator=g).half())
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(0.02 * torch.randn(n_ctx, text_width, generator=g))
             for _ in range(depth - 1)])
        self.compound_prompt_projections = nn.ModuleList(
            [nn.Linear(text_width, vision_width) for _ in range(depth - 1)])
        self.register_buffer("token_prefix", torch.randn(n_cls, 1, text_width, generator=g).half())
        self.register_buffer("token_suffix",
                             torch.randn(n_cls, 76 - n_ctx, text_width, generator=g).half())


class Frozen(nn.Module):
    """A few frozen CLIP tensors under upstream names (fp16, as CLIP under PREC 'fp16')."""

    def __init__(self, width, embed_dim, g, text=False):
        super().__init__()
        if text:
            self.positional_embedding = nn.Parameter(torch.randn(77, width, generator=g).half())
            self.ln_final = nn.LayerNorm(width)
            self.text_projection = nn.Parameter(torch.randn(width, embed_dim, generator=g).half())
        else:
            self.conv1 = nn.Conv2d(3, width, 2, 2, bias=False).half()
            self.proj = nn.Parameter(torch.randn(width, embed_dim, generator=g).half())


class DePTCustomCLIP(nn.Module):
    """elp_coop/elp_maple CustomCLIP: the inner CustomCLIP's modules, then the head."""

    def __init__(self, inner, cc, n_cls, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        if inner == "coop":
            self.prompt_learner = CoOpPromptLearner(16, cc.transformer_width, n_cls, g)
        elif inner == "cocoop":
            self.prompt_learner = CoCoOpPromptLearner(cc.transformer_width, cc.embed_dim, n_cls,
                                                      g)
        else:
            self.prompt_learner = MaPLePromptLearner(2, cc.transformer_width, cc.vision_width,
                                                     2, n_cls, g)
        self.image_encoder = Frozen(cc.vision_width, cc.embed_dim, g)
        self.text_encoder = Frozen(cc.transformer_width, cc.embed_dim, g, text=True)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.film_lp_img = FiLM(cc.embed_dim)
        self.film_lp_text = FiLM(cc.embed_dim)
        self.linear_probe_proj = nn.Linear(cc.embed_dim, n_cls).type(torch.float16)
        with torch.no_grad():  # a trained head, away from FiLM's (1, 0) init
            for film in (self.film_lp_img, self.film_lp_text):
                film.scale.copy_(1 + 0.1 * torch.randn(cc.embed_dim, generator=g))
                film.bias.copy_(0.1 * torch.randn(cc.embed_dim, generator=g))


def save_dassl(model, path, epoch=10):
    """torch.save of what Dassl's save_model writes for the registered CustomCLIP."""
    params = [p for n, p in model.named_parameters()
              if any(s in n for s in ("prompt_learner", "linear_probe", "film"))]
    optim = torch.optim.SGD(params, lr=0.0035, momentum=0.9)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 10.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "epoch": epoch,
                "optimizer": optim.state_dict(),
                "scheduler": {"successor": cosine, "warmup": UpstreamScheduler()},
                "val_result": None}, path)
    return path


# -- learners -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(asset_dir(), context_length=77)


def make_learner(inner, tiny_config, tokenizer):
    config = DePT.default_config()  # inner CoOp with 16 random context tokens
    if inner == "maple":
        config.inner = MaPLe.default_config()
        config.inner.depth = 2  # the tiny towers have 2 blocks
    if inner == "cocoop":
        config.inner = CoCoOp.default_config()
    return DePT(tiny_config, tokenizer, config)


def upstream_file(inner, cc, tmp_path, seed=0):
    model = DePTCustomCLIP(inner, cc, C_BASE, seed)
    name = {"coop": "PromptLearner", "cocoop": "PromptLearner",
            "maple": "MultiModalPromptLearner"}[inner]
    return model, save_dassl(model, str(tmp_path / "run" / name / "model.pth.tar-10"))


def assert_tree_equal(got, want):
    assert isinstance(got, dict) and sorted(got) == sorted(want)
    for name in want:
        if isinstance(want[name], dict):
            assert_tree_equal(got[name], want[name])
        else:
            g = np.asarray(got[name])
            assert g.dtype == np.float32 and g.shape == np.shape(want[name]), name
            np.testing.assert_array_equal(g, want[name], err_msg=name)


def inner_from_model(inner, model):
    pl = {k: v.detach().float().numpy() for k, v in model.prompt_learner.state_dict().items()}
    if inner == "coop":
        return {"ctx": pl["ctx"]}
    if inner == "cocoop":
        return {"ctx": pl["ctx"],
                "meta_net": {name: {"kernel": pl[f"meta_net.{name}.weight"].T,
                                    "bias": pl[f"meta_net.{name}.bias"]}
                             for name in ("linear1", "linear2")}}
    return {"ctx": pl["ctx"], "text_deep": pl["compound_prompts_text.0"][None],
            "couple0": {"kernel": pl["proj.weight"].T, "bias": pl["proj.bias"]},
            "couple_deep": {"kernel": pl["compound_prompt_projections.0.weight"].T[None],
                            "bias": pl["compound_prompt_projections.0.bias"][None]}}


def head_from_model(model):
    f = lambda t: t.detach().float().numpy()
    return {"film_img": {"scale": f(model.film_lp_img.scale), "bias": f(model.film_lp_img.bias)},
            "film_text": {"scale": f(model.film_lp_text.scale),
                          "bias": f(model.film_lp_text.bias)},
            "linear": {"kernel": f(model.linear_probe_proj.weight).T,
                       "bias": f(model.linear_probe_proj.bias)}}


# -- import ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["coop", "cocoop", "maple"])
def test_upstream_dept_file_imports_exactly(inner, tiny_config, tokenizer, tmp_path):
    learner = make_learner(inner, tiny_config, tokenizer)
    model, path = upstream_file(inner, tiny_config, tmp_path)
    assert model.linear_probe_proj.weight.dtype == torch.float16  # upstream's PREC 'fp16'
    assert model.film_lp_img.scale.dtype == torch.float32
    RAN.clear()
    prompt = learner.load_torch_prompt(path, C_BASE)
    assert RAN == []  # the pickled scheduler object was not built
    assert_tree_equal(prompt, {"inner": inner_from_model(inner, model),
                               "head": head_from_model(model)})
    # The head computes upstream's FiLM + Linear on raw features (fp32 copy of the head).
    x = torch.randn(3, tiny_config.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = nn.functional.linear(model.film_lp_img(x), model.linear_probe_proj.weight.float(),
                                    model.linear_probe_proj.bias.float()).numpy()
    head = prompt["head"]
    got = dept_lib.head_logits(head, dept_lib.film(jnp.asarray(x.numpy()), head["film_img"]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_module_prefix_is_stripped(tiny_config, tmp_path):
    model = DePTCustomCLIP("coop", tiny_config, C_BASE)
    path = str(tmp_path / "PromptLearner" / "model.pth.tar-10")
    os.makedirs(os.path.dirname(path))
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "epoch": 10}, path)
    assert_tree_equal(load_dept_head(path, tiny_config.embed_dim, C_BASE),
                      head_from_model(model))


# -- export ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["coop", "cocoop", "maple"])
def test_export_round_trip_and_upstream_load(inner, tiny_config, tokenizer, tmp_path):
    learner = make_learner(inner, tiny_config, tokenizer)
    model, path = upstream_file(inner, tiny_config, tmp_path)
    prompt = learner.load_torch_prompt(path, C_BASE)

    out = learner.export_torch_prompt(prompt, str(tmp_path / "exported"), 7)
    assert out == dept_checkpoint_path(str(tmp_path / "exported"), inner, 7)
    assert out.endswith(os.path.join({"coop": "PromptLearner", "cocoop": "PromptLearner",
                                      "maple": "MultiModalPromptLearner"}[inner],
                                     "model.pth.tar-7"))
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 7 and saved["optimizer"] is None and saved["scheduler"] is None
    state = saved["state_dict"]
    trainable = [k for k, p in model.named_parameters()
                 if any(s in k for s in ("prompt_learner", "linear_probe", "film"))]
    assert sorted(state) == sorted(trainable)  # one file: inner prompt keys and head keys
    assert list(state)[-len(HEAD):] == HEAD
    assert all(v.dtype == torch.float32 for v in state.values())

    # The DePT trainer's load_model: load_state_dict(strict=False) into a fresh CustomCLIP
    # gives back every trained tensor exactly (fp16 -> fp32 -> fp16 is exact).
    fresh = DePTCustomCLIP(inner, tiny_config, C_BASE, seed=3)
    result = fresh.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert not any(k in result.missing_keys for k in trainable)
    reference = model.state_dict()
    for key in trainable:
        got = fresh.state_dict()[key]
        assert got.dtype == reference[key].dtype
        torch.testing.assert_close(got, reference[key], rtol=0, atol=0, msg=key)

    # load(export(p)) == p, also for values fp16 cannot hold.
    assert_tree_equal(learner.load_torch_prompt(out, C_BASE), prompt)
    rng = np.random.RandomState(0)
    wiggled = {"inner": prompt["inner"],
               "head": {group: {k: np.asarray(v) + np.float32(1e-4) * rng.randn(*v.shape)
                                .astype(np.float32) for k, v in leaves.items()}
                        for group, leaves in prompt["head"].items()}}
    again = learner.export_torch_prompt(wiggled, str(tmp_path / "wiggled"), 10)
    assert_tree_equal(learner.load_torch_prompt(again, C_BASE), wiggled)


def test_export_refuses_an_inconsistent_head(tiny_config, tmp_path):
    e, c = tiny_config.embed_dim, C_BASE
    head = {"film_img": {"scale": np.ones(e, np.float32), "bias": np.zeros(e, np.float32)},
            "film_text": {"scale": np.ones(e - 1, np.float32), "bias": np.zeros(e, np.float32)},
            "linear": {"kernel": np.zeros((e, c), np.float32), "bias": np.zeros(c, np.float32)}}
    prompt = {"inner": {"ctx": np.zeros((16, 48), np.float32)}, "head": head}
    with pytest.raises(ValueError, match=r"film_text/scale \(31,\) \(expected \(32,\)\)"):
        export_dept_checkpoint(prompt, str(tmp_path / "x.pth"), "coop", 1, embed_dim=e)
    assert not os.path.exists(tmp_path / "x.pth")


# -- mismatches -----------------------------------------------------------------------------------


def test_wrong_embed_dim_and_base_classes_name_keys_and_settings(tiny_config, tokenizer,
                                                                 tmp_path):
    _, path = upstream_file("coop", tiny_config, tmp_path)
    e = tiny_config.embed_dim
    with pytest.raises(ValueError) as err:
        load_dept_head(path, e + 8, C_BASE)
    msg = str(err.value)
    for key in HEAD[:4]:
        assert f"{key}: file ({e},), expected ({e + 8},) (set by E = the CLIP embed_dim " \
               f"(clip embed_dim={e + 8}))" in msg
    assert (f"linear_probe_proj.weight: file ({C_BASE}, {e}), expected ({C_BASE}, {e + 8}) "
            f"(set by E = the CLIP embed_dim") in msg
    assert "linear_probe_proj.bias" not in msg  # its shape does not depend on E

    learner = make_learner("coop", tiny_config, tokenizer)
    with pytest.raises(ValueError) as err:
        learner.load_torch_prompt(path, C_BASE + 2)
    msg = str(err.value)
    assert (f"linear_probe_proj.weight: file ({C_BASE}, {e}), expected ({C_BASE + 2}, {e}) "
            f"(set by C_base = the number of base classes (num_classes={C_BASE + 2}))") in msg
    assert f"linear_probe_proj.bias: file ({C_BASE},), expected ({C_BASE + 2},)" in msg
    assert "film_lp" not in msg
    with pytest.raises(ValueError, match="number of base classes"):
        learner.load_torch_prompt(path, None)


def test_wrong_context_length_names_the_key_and_setting(tiny_config, tokenizer, tmp_path):
    _, path = upstream_file("coop", tiny_config, tmp_path)
    config = DePT.default_config()
    config.inner.n_ctx = 8
    learner = DePT(tiny_config, tokenizer, config)
    with pytest.raises(ValueError, match=r"prompt_learner\.ctx: file \(16, 48\), expected "
                                         r"\(8, 48\) \(set by the CoOp n_ctx "
                                         r"\(config\.backbone\.inner\.n_ctx=8\)\)"):
        learner.load_torch_prompt(path, C_BASE)
    config.inner.n_ctx, config.inner.csc = 16, True
    with pytest.raises(ValueError, match=r"expected \(5, 16, 48\) \(a rank-3 tensor\); "
                                         r"config\.backbone\.inner\.csc=True sets the rank"):
        DePT(tiny_config, tokenizer, config).load_torch_prompt(path, C_BASE)


def test_a_dept_coop_file_does_not_fit_dept_cocoop(tiny_config, tokenizer, tmp_path):
    _, path = upstream_file("coop", tiny_config, tmp_path)
    with pytest.raises(ValueError) as err:
        make_learner("cocoop", tiny_config, tokenizer).load_torch_prompt(path, C_BASE)
    msg = str(err.value)
    assert "does not fit the CoCoOp prompt" in msg
    assert "'prompt_learner.meta_net.linear1.weight'" in msg
    assert "prompt_learner.ctx: file (16, 48), expected (4, 48)" in msg


def test_missing_and_unexpected_head_keys(tiny_config, tmp_path):
    e = tiny_config.embed_dim
    model = DePTCustomCLIP("coop", tiny_config, C_BASE)
    # A plain CoOp prompt-learner file: unprefixed ctx and no head.
    plain = str(tmp_path / "prompt_learner" / "model.pth.tar-10")
    os.makedirs(os.path.dirname(plain))
    torch.save({"state_dict": model.prompt_learner.state_dict(), "epoch": 10}, plain)
    with pytest.raises(ValueError) as err:
        load_dept_head(plain, e, C_BASE)
    msg = str(err.value)
    assert "plain CoOp/CoCoOp prompt-learner checkpoint" in msg
    assert f"missing keys: {HEAD}" in msg

    # A DePT run with TRAINER.LINEAR_PROBE.TYPE 'similarity' saves FiLM but no linear head.
    similarity = str(tmp_path / "similarity" / "model.pth.tar-10")
    os.makedirs(os.path.dirname(similarity))
    torch.save({"state_dict": {k: v for k, v in model.state_dict().items()
                               if not k.startswith("linear_probe_proj.")}, "epoch": 10},
               similarity)
    with pytest.raises(ValueError) as err:
        load_dept_head(similarity, e, C_BASE)
    msg = str(err.value)
    assert "no linear head" in msg and "'similarity'" in msg
    assert f"missing keys: {HEAD[4:]}" in msg

    state = model.state_dict()
    del state["linear_probe_proj.bias"]
    state["film_lp_img.gate"] = torch.ones(e)
    odd = str(tmp_path / "odd" / "model.pth.tar-10")
    os.makedirs(os.path.dirname(odd))
    torch.save({"state_dict": state, "epoch": 10}, odd)
    with pytest.raises(ValueError) as err:
        load_dept_head(odd, e, C_BASE)
    msg = str(err.value)
    assert "missing keys: ['linear_probe_proj.bias']" in msg
    assert "unexpected prompt keys: ['film_lp_img.gate']" in msg
    assert "no linear head" not in msg
