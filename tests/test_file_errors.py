"""A cut or corrupt CLIP or tokenizer file, a hub id without network, cuDNN attention without a
GPU: one `Error:` line naming the file or field and what to do, exit status 2 (issue 28)."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from dpc_jax.convert import huggingface
from dpc_jax.convert.__main__ import main as convert_main
from dpc_jax.models import checkpoint
from dpc_jax.models.tokenizer import Tokenizer
from helpers import train_cli


def _folder(root):
    """A folder dataset of four classes (a non-world CLIP needs a non-world dataset)."""
    for split in ("train", "test"):
        for c in ("apple", "banana", "cherry", "date"):
            os.makedirs(root / split / c)
            for k in range(2):
                Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(
                    root / split / c / f"{k}.jpg")
    return root


def _cut(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _assert_one_error(proc, *names):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in errors[0]
    return errors[0]


def _train(tmp_path, clip, tokenizer, *flags, env=None):
    data = _folder(tmp_path / "d")
    return train_cli(tmp_path, f"--config=configs/dpc_coop.py:dataset=folder,root={data},"
                     f"clip={clip}", f"--config.clip.tokenizer={tokenizer}", *flags, env=env)


def test_cut_clip_params(tmp_path):
    clip = tmp_path / "clip"
    shutil.copytree(checkpoint.asset_dir(), clip)
    _cut(clip / checkpoint.PARAMS_FILE)
    line = _assert_one_error(_train(tmp_path, clip, clip),
                             str(clip / checkpoint.PARAMS_FILE), "python -m dpc_jax.convert")
    assert "truncated or corrupt" in line


def test_cut_safetensors_through_train_and_convert(tmp_path, capsys):
    config, params = checkpoint.load_clip_checkpoint(checkpoint.asset_dir())
    hf = tmp_path / "hf"
    huggingface.save_huggingface(config, params, str(hf))
    _cut(hf / huggingface.SAFETENSORS_FILE)
    want = str(hf / huggingface.SAFETENSORS_FILE)
    _assert_one_error(_train(tmp_path, hf, checkpoint.asset_dir()), want, "safetensors")
    with pytest.raises(SystemExit) as exit_:
        convert_main([str(hf), str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert want in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt"])
def test_cut_tokenizer_file(tmp_path, name):
    tok = tmp_path / "tok"
    shutil.copytree(checkpoint.asset_dir(), tok)
    if name == "vocab.json":
        _cut(tok / name)
    else:
        with open(tok / name, "a") as f:
            f.write("not a merge line\n")
    _assert_one_error(_train(tmp_path, checkpoint.asset_dir(), tok), str(tok / name),
                      "--tokenizer")
    with pytest.raises(ValueError, match=name):
        Tokenizer.from_pretrained(str(tok))


def test_hub_id_without_network(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    line = _assert_one_error(_train(tmp_path, "someone/no-such-clip", checkpoint.asset_dir(),
                                    env=env),
                             "'someone/no-such-clip'", "no network",
                             "python -m dpc_jax.convert someone/no-such-clip DIR", "clip=DIR")
    assert len(line) < 600


def test_cudnn_attention_without_a_gpu(tmp_path):
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN attention is allowed on a GPU")
    proc = train_cli(tmp_path, "--config=configs/dpc_coop.py", "--config.clip.attention=cudnn")
    _assert_one_error(proc, "config.clip.attention='cudnn'", "einsum", "dot_product")
