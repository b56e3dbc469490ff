"""The two tokenizers, by name (get_tokenizer), both with as much of tiktoken's interface as this project uses:
    gpt2   GPT-2's BPE (50,257 ids, EOT 50256), built from the ranks file committed next to this module:
           tiktoken.get_encoding("gpt2") would download its files on first use, which fails offline.
    bytes  UTF-8 bytes as ids 0..255 and EOT 256: no vocabulary to learn, so on a CPU the output head is
           cheap and the budget goes to the layers and to long contexts (as nanoGPT's character-level data).
"""

import base64
import codecs
import functools
import hashlib
from pathlib import Path

import tiktoken

RANKS_PATH = Path(__file__).parent / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# GPT-2's pre-tokenizer: contractions, letters, digits, punctuation runs, whitespace
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

EOT = 50256  # GPT-2's <|endoftext|>, its only special token; marks document boundaries
VOCAB_SIZE = 50257  # 50256 merged byte sequences + EOT


class DataError(ValueError):
    """A problem with input or prepared data, shown to the user without a traceback (tokenizer, prepare, loader)."""


def load_ranks(path=RANKS_PATH, expected_sha256=RANKS_SHA256):
    """Read a .tiktoken ranks file ("<base64 token> <rank>" per line) after checking its hash. Not with tiktoken's
    load_tiktoken_bpe, which returns a cached copy when one is present, so a corrupt file here could go unnoticed."""
    path = Path(path)
    restore = f"restore it with `git checkout data/{path.name}`"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the GPT-2 BPE ranks file {path} ({e.strerror}); {restore}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise DataError(f"the GPT-2 BPE ranks file {path} is corrupt (sha256 {digest[:12]}..., "
                        f"expected {expected_sha256[:12]}...); {restore}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; 256 is end-of-text. Decoding joins the bytes; ids past 255 have none."""

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


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = "gpt2"):
    """The tokenizer of that name, built once per process: GPT-2's tiktoken.Encoding from data/gpt2.tiktoken,
    or the byte tokenizer."""
    if name == "bytes":
        return ByteTokenizer()
    if name != "gpt2":
        raise DataError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")
    enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=load_ranks(),
                            special_tokens={"<|endoftext|>": EOT})
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT
    return enc


class StreamDecoder:
    """Token ids in, complete characters out: a token may hold part of a UTF-8 character ("日" is three bytes), so
    the bytes go through an incremental UTF-8 decoder. Invalid bytes and unknown ids (padding rows) become U+FFFD."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tokens) -> str:
        """The characters that the new tokens complete (possibly "")."""
        known = [self.tokenizer.decode_bytes([t]) if 0 <= t < self.tokenizer.n_vocab else "\ufffd".encode()
                 for t in tokens]
        return self.utf8.decode(b"".join(known))

    def flush(self) -> str:
        """At the end: an incomplete tail still held back becomes U+FFFD."""
        return self.utf8.decode(b"", final=True)
