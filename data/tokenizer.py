"""The tokenizers (get_tokenizer), each with as much of tiktoken's interface as this project uses.
Two are built in, by name:
    gpt2   GPT-2's BPE (50,257 ids, EOT 50256), built from the ranks file committed next to this
           module: tiktoken.get_encoding("gpt2") would download its files on first use, which fails
           offline.
    bytes  UTF-8 bytes as ids 0..255 and EOT 256: no vocabulary to learn, so on a CPU the output
           head is cheap and the budget goes to the layers and to long contexts (as nanoGPT's
           character-level data).
Any other byte-level BPE is a vocabulary: a plain dict that an imported checkpoint keeps under
"tokenizer" (`hf.py import --gguf`), {"name", "pat_str", "tokens": [bytes, one per id], "special":
[ids], "eot": id}. Its tiktoken Encoding ranks each token by its id; special tokens (<|im_start|>)
are text to encode_ordinary, tokens only where asked for (allowed_special). On a command line
(data.prepare --tokenizer) it is named by the checkpoint that holds it; its record (describe) has
the vocabulary's sha256, so that data and model are matched by content, not by name.
"""

import base64
import codecs
import functools
import hashlib
import zipfile
from pathlib import Path

import tiktoken

RANKS_PATH = Path(__file__).parent / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# GPT-2's pre-tokenizer: contractions, letters, digits, punctuation runs, whitespace
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

EOT = 50256  # GPT-2's <|endoftext|>, its only special token; marks document boundaries
VOCAB_SIZE = 50257  # 50256 merged byte sequences + EOT


class DataError(ValueError):
    """A problem with input or prepared data, shown to the user without a traceback (tokenizer,
    prepare, loader)."""


def load_ranks(path=RANKS_PATH, expected_sha256=RANKS_SHA256):
    """Read a .tiktoken ranks file ("<base64 token> <rank>" per line) after checking its hash. Not
    with tiktoken's load_tiktoken_bpe, which returns a cached copy when one is present, so a corrupt
    file here could go unnoticed."""
    path = Path(path)
    restore = f"restore it with `git checkout data/{path.name}`"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"cannot read the GPT-2 BPE ranks file {path} ({e.strerror}); {restore}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise DataError(
            f"the GPT-2 BPE ranks file {path} is corrupt (sha256 {digest[:12]}..., "
            f"expected {expected_sha256[:12]}...); {restore}"
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; 256 is end-of-text. Decoding joins the bytes; ids past 255
    have none."""

    name, n_vocab, eot_token = "bytes", 257, 256

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode_ordinary(t) for t in texts]

    def decode_bytes(self, ids) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


TOKENIZERS = ("gpt2", "bytes")


def get_tokenizer(name: str | dict = "gpt2"):
    """The tokenizer of that name, or of a vocabulary (a checkpoint's "tokenizer"), built once per
    process: GPT-2's tiktoken.Encoding from data/gpt2.tiktoken, the byte tokenizer, or a
    VocabularyEncoding."""
    if not isinstance(name, dict):
        return named_tokenizer(name)
    key = vocabulary_sha256(name)
    if key not in _BUILT:
        _BUILT[key] = VocabularyEncoding(name)
    return _BUILT[key]


@functools.lru_cache(maxsize=None)
def named_tokenizer(name: str):
    """A built-in tokenizer by name (get_tokenizer)."""
    if name == "bytes":
        return ByteTokenizer()
    if name != "gpt2":
        raise DataError(
            f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}, or a "
            "checkpoint holding a vocabulary (hf.py import --gguf writes one)"
        )
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=load_ranks(),
        special_tokens={"<|endoftext|>": EOT},
    )
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT
    return enc


class VocabularyEncoding(tiktoken.Encoding):
    """tiktoken.Encoding of a vocabulary: rank = token id; eot_token is the vocabulary's "eot"."""

    def __init__(self, vocab: dict):
        tokens, special = vocab["tokens"], set(vocab["special"])
        super().__init__(
            name=vocab["name"],
            pat_str=vocab["pat_str"],
            mergeable_ranks={t: i for i, t in enumerate(tokens) if i not in special},
            special_tokens={tokens[i].decode("utf-8", "replace"): i for i in sorted(special)},
        )
        self._eot = vocab["eot"]

    @property
    def eot_token(self) -> int:
        return self._eot


_BUILT: dict[str, VocabularyEncoding] = {}  # by the vocabulary's sha256


def vocabulary_sha256(vocab: dict) -> str:
    """A hash of all that decides a vocabulary's ids; a DataError if it is not a vocabulary."""
    if not _valid(vocab):
        raise DataError(
            "a tokenizer vocabulary must be a dict of name and pat_str (strings), "
            "tokens (distinct non-empty bytes, one per id), special (ids) and eot (an "
            "id); this one is not: import the model again"
        )
    h = hashlib.sha256(repr([vocab["pat_str"], sorted(vocab["special"]), vocab["eot"]]).encode())
    for t in vocab["tokens"]:
        h.update(len(t).to_bytes(4, "little") + t)
    return h.hexdigest()


def _valid(vocab) -> bool:
    keys = {"name", "pat_str", "tokens", "special", "eot"}
    if not isinstance(vocab, dict) or not keys <= set(vocab):
        return False
    tokens, ids = vocab["tokens"], vocab["special"]
    return (
        all(isinstance(vocab[k], str) and vocab[k] for k in ("name", "pat_str"))
        and isinstance(tokens, list)
        and len(tokens) > 0
        and all(isinstance(t, bytes) and t for t in tokens)
        and len(set(tokens)) == len(tokens)
        and isinstance(ids, list)
        and all(type(i) is int and 0 <= i < len(tokens) for i in [*ids, vocab["eot"]])
    )


def describe(name: str | dict) -> dict:
    """The record of a tokenizer that data.prepare writes to meta.json and eval.py compares: its
    name, and the sha256 of its ranks file (gpt2) or of its vocabulary."""
    if isinstance(name, dict):
        return {"name": name.get("name"), "sha256": vocabulary_sha256(name)}
    get_tokenizer(name)
    return {
        "name": name,
        **({"file": RANKS_PATH.name, "sha256": RANKS_SHA256} if name == "gpt2" else {}),
    }


def read_vocabulary(path) -> dict:
    """The vocabulary a checkpoint holds (a file, or a run folder holding ckpt.pt), read without
    loading its weights (torch.load with mmap, weights_only)."""
    import torch

    path = Path(path)
    path = path / "ckpt.pt" if path.is_dir() else path
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise DataError(
            f"tokenizer {str(path)!r} is neither {' nor '.join(TOKENIZERS)} nor a checkpoint file"
        )
    try:
        vocab = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("tokenizer")
    except Exception as e:  # a corrupt archive, a refused pickle
        raise DataError(f"cannot read the checkpoint {path} ({type(e).__name__}: {e})") from None
    if not isinstance(vocab, dict):
        raise DataError(
            f"checkpoint {path} holds no vocabulary (its tokenizer is "
            f"{vocab or 'gpt2'!r}); pass that name, or a checkpoint from "
            "`hf.py import --gguf`"
        )
    vocabulary_sha256(vocab)
    return vocab


class StreamDecoder:
    """Token ids in, complete characters out: a token may hold part of a UTF-8 character ("日" is
    three bytes), so the bytes go through an incremental UTF-8 decoder. Invalid bytes and unknown
    ids (padding rows) become U+FFFD."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tokens) -> str:
        """The characters that the new tokens complete (possibly "")."""
        known = [
            self.tokenizer.decode_bytes([t])
            if 0 <= t < self.tokenizer.n_vocab
            else "\ufffd".encode()
            for t in tokens
        ]
        return self.utf8.decode(b"".join(known))

    def flush(self) -> str:
        """At the end: an incomplete tail still held back becomes U+FFFD."""
        return self.utf8.decode(b"", final=True)
