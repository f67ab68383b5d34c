"""Builders shared by several test files that need torch when imported: seeded torch weights and
an upstream-shaped PromptKD student written by torch itself.

Import it after `torch = pytest.importorskip("torch")`; the builders that need no torch are in
helpers.py. Imported by tests (tests/ is on sys.path under pytest's default import mode), never
by dpc_jax.
"""

import collections
import math
import os

import numpy as np
import torch

from dpc_jax.prompts.promptkd import PromptKD
from helpers import UpstreamScheduler

nn = torch.nn


# -- seeded weights --------------------------------------------------------------------------------


def randomize_(model, seed: int):
    """Fill every parameter with seeded noise: weights and biases N(0, 0.02), LayerNorm scales
    1 + N(0, 0.1), logit_scale log(1/0.07) + noise. Unlike transformers' init, biases are not 0
    and LayerNorms not the identity, so a swapped or dropped parameter shows; drawing directly
    is also several times faster than the library init at ViT-B/16 size."""
    rng = np.random.default_rng(seed)  # numpy's float32 ziggurat: faster than torch.randn here
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.from_numpy(rng.standard_normal(tuple(p.shape), dtype=np.float32))
            if name == "logit_scale":
                p.copy_(math.log(1 / 0.07) + 0.1 * noise)
            elif p.ndim == 1 and name.endswith(".weight"):  # the LayerNorm scales, in both
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return model


# -- an upstream-shaped PromptKD student -------------------------------------------------------
# (docs/reference/backbones.md#promptkd, #pytorch-checkpoints)


CONV = "VPT_image_trans.conv1."
R = "image_encoder.transformer.resblocks.{}.VPT_shallow"
# The student keys in the order torch's state_dict lists them (after the visual prompts).
PROJECTOR_KEYS = [CONV + k for k in ("0.weight", "0.bias", "1.weight", "1.bias",
                                     "1.running_mean", "1.running_var",
                                     "1.num_batches_tracked", "3.weight", "3.bias")]


class FeatureTrans(nn.Module):
    """Upstream's Feature_Trans_Module_two_layer."""

    def __init__(self, input_dim, out_dim):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(input_dim, out_dim, 1), nn.BatchNorm2d(out_dim),
                                   nn.ReLU(inplace=True), nn.Conv2d(out_dim, out_dim, 1))

    def forward(self, x):
        return self.conv1(x.unsqueeze(-1).unsqueeze(-1)).squeeze(-1).squeeze(-1)


class Block(nn.Module):
    def __init__(self, width, vpt=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, 4)
        if vpt is not None:
            self.VPT_shallow = nn.Parameter(vpt)


class ImageEncoder(nn.Module):
    """A cut-down CLIP VisionTransformer with IVLP's visual prompts (upstream names)."""

    def __init__(self, n_v, width, depth, embed_dim, g):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 2, 2, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width, generator=g))
        self.VPT = nn.Parameter(0.02 * torch.randn(n_v, width, generator=g))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            [Block(width, 0.02 * torch.randn(n_v, width, generator=g) if 1 <= i < depth else None)
             for i in range(max(depth, 2) + 1)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim, generator=g))


class Student(nn.Module):
    """Upstream's student CustomCLIP (image_encoder, logit_scale, VPT_image_trans)."""

    def __init__(self, n_v, width, depth, e_s, e_t, g):
        super().__init__()
        self.image_encoder = ImageEncoder(n_v, width, depth, e_s, g)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.VPT_image_trans = FeatureTrans(e_s, e_t)


def make_student(n_v, width, depth, e_s, e_t, seed=0):
    """A student as upstream trains and saves it: BN statistics updated by training batches,
    then the frozen CLIP tensors and the projector convs in fp16 (convert_weights), the visual
    prompts and BatchNorm in fp32."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Student(n_v, width, depth, e_s, e_t, g)
    trans = model.VPT_image_trans
    with torch.no_grad():
        trans.conv1[1].weight.copy_(1 + 0.3 * torch.randn(e_t, generator=g))
        trans.conv1[1].bias.copy_(0.3 * torch.randn(e_t, generator=g))
        trans.train()
        for _ in range(3):
            trans(1.5 * torch.randn(6, e_s, generator=g) + 0.5)
    trans.eval()
    trans.conv1[0].half()
    trans.conv1[3].half()
    for name, param in model.image_encoder.named_parameters():
        if "VPT" not in name and "ln_" not in name:
            param.data = param.data.half()
    return model


def whole_state_dict(model, text_side=False):
    """model.state_dict() plus, with text_side, the text tensors and prompt-learner buffers
    some versions of the code save beside the student (all to be ignored)."""
    state = collections.OrderedDict(model.state_dict())
    if text_side:
        g = torch.Generator().manual_seed(7)
        state["prompt_learner.ctx"] = torch.randn(4, 20, generator=g).half()
        for name in ("token_prefix", "token_suffix", "token_prefix2", "token_suffix2"):
            state["prompt_learner." + name] = torch.randn(3, 2, 20, generator=g).half()
        state["text_encoder.positional_embedding"] = torch.randn(77, 20, generator=g).half()
        state["text_encoder.transformer.resblocks.1.VPT_shallow"] = torch.randn(4, 20,
                                                                                generator=g)
        state["text_encoder.ln_final.weight"] = torch.ones(20)
    return state


def save_upstream(path, state, module_prefix=False):
    """torch.save of a Dassl checkpoint as `save_model` writes it (optimizer and scheduler
    state beside the model, the scheduler entry holding pickled objects)."""
    if module_prefix:  # a model saved from inside nn.DataParallel
        state = collections.OrderedDict(("module." + k, v) for k, v in state.items())
    param = nn.Parameter(torch.zeros(3))
    optim = torch.optim.SGD([param], lr=0.005, momentum=0.9, weight_decay=5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 20.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": state, "epoch": 20, "optimizer": optim.state_dict(),
                "scheduler": {"successor": cosine, "warmup": UpstreamScheduler()},
                "val_result": 80.5}, path)
    return path


def learner_stub(n_v, width, depth, e_s, e_t):
    """A PromptKD learner with just the attributes expected_shapes and the torch loaders read
    (building a real one needs two CLIPs and a teacher)."""
    learner = PromptKD.__new__(PromptKD)
    learner.n_ctx_vision, learner.vision_width, learner.depth_vision = n_v, width, depth
    learner.student_dim, learner.teacher_dim = e_s, e_t
    return learner


def ours(model):
    """The dpc_jax (prompt, state) the torch student stands for, built independently here."""
    enc, conv = model.image_encoder, model.VPT_image_trans.conv1

    def f(t):
        return t.detach().float().numpy()

    deep = [f(b.VPT_shallow) for b in enc.transformer.resblocks if hasattr(b, "VPT_shallow")]
    prompt = {"vision_ctx": f(enc.VPT),
              "projector": {"dense0": {"kernel": f(conv[0].weight)[:, :, 0, 0].T,
                                       "bias": f(conv[0].bias)},
                            "bn": {"scale": f(conv[1].weight), "bias": f(conv[1].bias)},
                            "dense1": {"kernel": f(conv[3].weight)[:, :, 0, 0].T,
                                       "bias": f(conv[3].bias)}}}
    if deep:
        prompt["vision_deep"] = np.stack(deep)
    state = {"bn": {"mean": f(conv[1].running_mean), "var": f(conv[1].running_var)}}
    return prompt, state
