"""A PyTorch transcription of MMRL's forward and loss on OpenAI's clip/model.py.

Transcribed from the released code (yunncheng/MMRL clip/model_mmrl.py ResidualAttentionBlock
'MMRL' branch, VisionTransformer.forward; trainers/mmrl.py TextEncoder_MMRL,
MultiModalRepresentationLearner, CustomCLIP.forward, MMRL_Loss, forward_backward), running
OpenAI's residual blocks one by one in their LND layout:
- representation learner: R -> (r2tproj[i](R), r2vproj[i](R)) for each rep layer i (nn.Linear);
- image: conv1, [CLS; patches] + positional embedding, ln_pre; at 1-based layer l in
  rep_layers the tokens go in after CLS (first rep layer) or overwrite positions 1..K; no mask;
  x_rep = ln_post(x[:, 1:1+K]).mean(1) @ proj_rep; x = ln_post(x[:, 0]) @ proj;
- text: embeddings + positional embedding; OpenAI's causal mask before the first rep layer, at
  and after it a causal mask rebuilt at the current length (77 + K); tokens inserted after BOT,
  then overwritten; ln_final; the EOT at argmax(ids) + K, @ text_projection;
- logits 100 cos; fused = a cls + (1-a) rep; the loss as MMRL_Loss.

Imported by tests (tests/ is on sys.path), never by dpc_jax.
"""

import numpy as np
import torch
import torch.nn.functional as F

nn = torch.nn


class RepresentationLearner(nn.Module):
    """MultiModalRepresentationLearner's parameters and forward (upstream names)."""

    def __init__(self, n_rep, rep_dim, text_dim, visual_dim, n_layers):
        super().__init__()
        self.compound_rep_tokens = nn.Parameter(torch.empty(n_rep, rep_dim))
        nn.init.normal_(self.compound_rep_tokens, std=0.02)
        self.compound_rep_tokens_r2vproj = nn.ModuleList(
            [nn.Linear(rep_dim, visual_dim) for _ in range(n_layers)])
        self.compound_rep_tokens_r2tproj = nn.ModuleList(
            [nn.Linear(rep_dim, text_dim) for _ in range(n_layers)])

    def forward(self):
        text, visual = [], []
        for i in range(len(self.compound_rep_tokens_r2tproj)):
            text.append(self.compound_rep_tokens_r2tproj[i](self.compound_rep_tokens))
            visual.append(self.compound_rep_tokens_r2vproj[i](self.compound_rep_tokens))
        return text, visual


def _blocks(resblocks, x, tokens, rep_layers, n_rep, text):
    counter = 0
    for i, block in enumerate(resblocks):
        layer = i + 1
        if layer in rep_layers:
            suffix = x[1:] if layer == rep_layers[0] else x[1 + n_rep:]
            ctx = tokens[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)
            x = torch.cat([x[:1], ctx, suffix], dim=0)
            counter += 1
        if text:
            if layer >= rep_layers[0]:
                width = x.shape[0]
                mask = torch.empty(width, width).fill_(float("-inf")).triu_(1)
            else:
                mask = block.attn_mask
            x = x + block.attn(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=False,
                               attn_mask=mask)[0]
            x = x + block.mlp(block.ln_2(x))
        else:
            x = block(x)
    return x


def encode_image(model, proj_rep, images_nchw, visual_tokens, rep_layers):
    """(v_c, v_r) [N, E] of OpenAI's ViT with MMRL's tokens."""
    visual = model.visual
    n_rep = visual_tokens[0].shape[0]
    x = visual.conv1(torch.as_tensor(images_nchw))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1],
                                                           dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x).permute(1, 0, 2)
    x = _blocks(visual.transformer.resblocks, x, visual_tokens, rep_layers, n_rep, text=False)
    x = x.permute(1, 0, 2)
    x_rep = visual.ln_post(x[:, 1:1 + n_rep, :]).mean(dim=1) @ proj_rep
    return visual.ln_post(x[:, 0, :]) @ visual.proj, x_rep


def encode_text(model, token_ids, text_tokens, rep_layers):
    """t [C, E] of OpenAI's text tower with MMRL's tokens (TextEncoder_MMRL)."""
    ids = torch.as_tensor(np.asarray(token_ids, np.int64))
    n_rep = text_tokens[0].shape[0]
    x = model.token_embedding(ids) + model.positional_embedding
    x = x.permute(1, 0, 2)
    x = _blocks(model.transformer.resblocks, x, text_tokens, rep_layers, n_rep, text=True)
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1) + n_rep] @ model.text_projection


def forward(model, learner, proj_rep, images_nchw, token_ids, rep_layers, alpha):
    """CustomCLIP.forward: (logits, logits_rep, logits_fusion, v_c, t) normalised, and v_r."""
    text_tokens, visual_tokens = learner()
    t = encode_text(model, token_ids, text_tokens, rep_layers)
    v, v_rep = encode_image(model, proj_rep, images_nchw, visual_tokens, rep_layers)
    v = v / v.norm(dim=-1, keepdim=True)
    v_rep = v_rep / v_rep.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    logits = 100. * v @ t.t()
    logits_rep = 100. * v_rep @ t.t()
    return logits, logits_rep, alpha * logits + (1 - alpha) * logits_rep, v, t, v_rep


def mmrl_loss(logits, logits_rep, image_features, text_features, image_features_clip,
              text_features_clip, label, reg_weight, scale):
    """MMRL_Loss.forward."""
    xe1 = F.cross_entropy(logits, label)
    xe2 = F.cross_entropy(logits_rep, label)
    reg_img = 1 - torch.mean(F.cosine_similarity(image_features, image_features_clip, dim=1))
    reg_text = 1 - torch.mean(F.cosine_similarity(text_features, text_features_clip, dim=1))
    return scale * xe1 + (1 - scale) * xe2 + reg_weight * reg_img + reg_weight * reg_text
