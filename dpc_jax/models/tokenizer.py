"""CLIP tokenisation to int32 [N, context_length] with start/end tokens and EOT positions.

Backed by transformers' `CLIPTokenizer`, loaded from a hub id or a local directory holding
`vocab.json` and `merges.txt` (or `tokenizer.json`). Text is first cleaned as OpenAI's tokenizer
does (`basic_clean`: ftfy, HTML unescaping; needs `ftfy`). Sequences are padded with 0 as OpenAI's
`clip.tokenize` does, so the EOT token (the largest id) is also `argmax(ids)`.
`write_vocab_from_openai_bpe` turns OpenAI's `bpe_simple_vocab_16e6.txt.gz` into those two files.
"""

from __future__ import annotations

import gzip
import html
import json
import os
from typing import Sequence

import numpy as np

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def is_tokenizer_dir(directory: str) -> bool:
    """Whether `directory` holds a CLIP BPE tokenizer: vocab.json + merges.txt, or
    tokenizer.json."""
    present = set(os.listdir(directory))
    return {"vocab.json", "merges.txt"} <= present or "tokenizer.json" in present


class Tokenizer:
    """CLIP BPE tokenizer producing fixed-length id arrays and EOT indices."""

    def __init__(self, hf_tokenizer, context_length: int = 77):
        self.hf = hf_tokenizer
        self.context_length = context_length
        self.sot_token_id = hf_tokenizer.convert_tokens_to_ids(START_TOKEN)
        self.eot_token_id = hf_tokenizer.convert_tokens_to_ids(END_TOKEN)

    @classmethod
    def from_pretrained(cls, source: str, context_length: int = 77) -> "Tokenizer":
        """`source`: a local directory (vocab.json + merges.txt, or tokenizer.json) or a hub id."""
        from transformers import CLIPTokenizer

        if os.path.isdir(source):
            if not is_tokenizer_dir(source):
                raise FileNotFoundError(
                    f"tokenizer directory {source!r} holds neither vocab.json + merges.txt nor "
                    f"tokenizer.json (found: {sorted(os.listdir(source))})")
            check_bpe_files(source)
            try:
                return cls(CLIPTokenizer.from_pretrained(source), context_length)
            except Exception as e:  # the tokenizers library raises a bare Exception on bad files
                raise _corrupt(source, "vocab.json + merges.txt (or tokenizer.json)",
                               "a CLIP BPE tokenizer", e) from e
        if os.path.exists(source):
            raise NotADirectoryError(f"tokenizer source {source!r} is a file; expected a "
                                     f"directory with vocab.json and merges.txt, or a hub id")
        return cls(_hub_tokenizer(CLIPTokenizer, source), context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list:
        """BPE ids of `text` without start/end tokens (after OpenAI's `basic_clean`)."""
        return list(self.hf(basic_clean(text), add_special_tokens=False)["input_ids"])

    def __call__(self, texts: Sequence[str] | str):
        """Returns (ids int32 [N, context_length], eot_indices int32 [N])."""
        if isinstance(texts, str):
            texts = [texts]
        ids = np.zeros((len(texts), self.context_length), np.int32)
        eot = np.zeros((len(texts),), np.int32)
        for i, text in enumerate(texts):
            seq = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(seq) > self.context_length:
                raise ValueError(
                    f"Input {text!r} is too long for context length {self.context_length} "
                    f"({len(seq)} tokens with start and end tokens)")
            ids[i, :len(seq)] = seq
            eot[i] = len(seq) - 1
        return ids, eot

    def decode(self, ids: Sequence[int]) -> str:
        """Text of one id sequence (padding and special tokens dropped)."""
        keep = [int(t) for t in ids if t not in (0, self.sot_token_id, self.eot_token_id)]
        return self.hf.decode(keep).strip()


def check_bpe_files(directory: str) -> None:
    """Raise naming the file if `directory`'s vocab.json is not a JSON {token: id} object or a
    line of its merges.txt is not two tokens (a cut copy or another file)."""
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        return  # a tokenizer.json directory
    with open(vocab, "rb") as f:
        try:
            tokens = json.loads(f.read().decode("utf-8"))
        except ValueError as e:  # json's decode errors and bad UTF-8 are ValueErrors
            raise _corrupt(vocab, "vocab.json", "a JSON object {token: id}", e) from e
    if not isinstance(tokens, dict) or not all(isinstance(i, int) for i in tokens.values()):
        raise _corrupt(vocab, "vocab.json", "a JSON object {token: id}", "not {token: id}")
    with open(merges, "rb") as f:
        try:
            lines = f.read().decode("utf-8").splitlines()
        except ValueError as e:
            raise _corrupt(merges, "merges.txt", "BPE merges, two tokens a line", e) from e
    for number, line in enumerate(lines, 1):
        if line and not line.startswith("#version") and len(line.split(" ")) != 2:
            raise _corrupt(merges, "merges.txt", "BPE merges, two tokens a line",
                           f"line {number} is {line[:40]!r}")


def _corrupt(path: str, files: str, holds: str, error) -> ValueError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ValueError(
        f"{path} is truncated or corrupt ({reason}): it should hold {holds}; copy {files} again "
        f"from the CLIP's own tokenizer (`python -m dpc_jax.convert SOURCE DIR --tokenizer "
        f"DIR_OR_HUB_ID` writes them into DIR)")


HUB_HOST = "huggingface.co"


def _hub_tokenizer(tokenizer_class, source: str):
    """A hub tokenizer: from the local Hugging Face cache when it is there, else downloaded.
    Offline without a cached copy this fails at once, naming the source, instead of retrying
    for minutes (transformers then falls back to a tokenizer without the vocabulary)."""
    missing = FileNotFoundError(
        f"tokenizer {source!r}: not a local directory, not in the Hugging Face cache, and "
        f"{HUB_HOST} cannot be reached; set config.clip.tokenizer to a directory holding "
        f"vocab.json and merges.txt (e.g. one written by `python -m dpc_jax.convert`), or "
        f"download it once while online")
    try:
        cached = tokenizer_class.from_pretrained(source, local_files_only=True)
        if len(cached) > 2:  # without its files transformers builds one of 2 special tokens
            return cached
    except Exception:  # not cached (transformers raises OSError or ValueError)
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or not _hub_reachable():
        raise missing
    loaded = tokenizer_class.from_pretrained(source)
    if len(loaded) <= 2:
        raise missing
    return loaded


def _hub_reachable(timeout: float = 5.0) -> bool:
    import socket

    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


TRIM_MULTIPLE = 8  # trimmed text lengths are multiples of this (fewer distinct compiled shapes)


def trim_context(ids, eot_indices, multiple: int = TRIM_MULTIPLE, enabled: bool = True):
    """`ids[..., :L]`: the token positions a set of texts needs, L the smallest multiple of
    `multiple` above every EOT position (at most the context length).

    Exact for CLIP's text tower: under its causal mask the tokens after a text's EOT cannot
    change the EOT feature, so class texts of about 10 tokens are encoded in 16 positions
    instead of 77 (the text tower's FLOPs drop with them). Deep text prompts replace positions
    1..n, all before the EOT, so they land where they did. `enabled=False` (CLIPConfig
    trim_text False) returns `ids` whole."""
    ids = np.asarray(ids)
    if not enabled:
        return ids
    eot = np.asarray(eot_indices)
    length = ids.shape[-1]
    need = int(eot.max()) + 1 if eot.size else 1
    return ids[..., :min(length, -(-need // multiple) * multiple)]


def basic_clean(text: str) -> str:
    """OpenAI's `simple_tokenizer.basic_clean`: ftfy repairs, HTML unescaped twice, stripped.

    transformers' CLIPTokenizer (tokenizers backend) skips this step, so without it mojibake,
    ligatures, full-width letters, curly quotes and HTML entities tokenise differently from
    OpenAI's `clip.tokenize`, which the reference code uses.
    """
    try:
        import ftfy
    except ImportError as e:
        raise ImportError("dpc_jax's tokenizer needs the `ftfy` package (pip install ftfy) to "
                          "tokenise exactly as OpenAI's CLIP does") from e
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def bytes_to_unicode() -> dict:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_vocab_from_openai_bpe(bpe_gz_path: str, out_dir: str) -> str:
    """Write vocab.json and merges.txt equivalent to OpenAI's SimpleTokenizer(bpe_gz_path).

    OpenAI builds its vocabulary as: the 256 byte symbols, the same with '</w>', one token per
    merge (the first 49152 - 256 - 2 merge lines), then the start and end tokens.
    """
    with gzip.open(bpe_gz_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    return write_bpe_files([tuple(m.split()) for m in merges], out_dir)


def write_bpe_files(merges: Sequence[tuple], out_dir: str) -> str:
    """vocab.json + merges.txt of a CLIP BPE vocabulary built as OpenAI builds it: the 256 byte
    symbols, the same with '</w>', one token per merge, then the start and end tokens."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += [START_TOKEN, END_TOKEN]
    if len(set(vocab)) != len(vocab):
        raise ValueError("the BPE merges produce duplicate tokens")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir
