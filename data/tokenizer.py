"""
The GPT-2 BPE tokenizer, built from the ranks file committed next to this module.

tiktoken.get_encoding("gpt2") downloads its files on first use, which fails on a
machine without internet. Everything it needs is in data/gpt2.tiktoken, so we
build the same encoding from that file and never touch the network.
"""

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

RANKS_PATH = Path(__file__).parent / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# GPT-2's pre-tokenizer: contractions, letters, digits, punctuation runs, whitespace
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

EOT = 50256  # <|endoftext|>, the only special token; marks document boundaries
VOCAB_SIZE = 50257  # 50256 merged byte sequences + EOT


class DataError(ValueError):
    """A problem with input or prepared data, meant to be shown to the user without a traceback.

    Lives here, in the lowest module of the package, so that tokenizer, prepare and loader
    all raise the same type without importing each other in a circle.
    """


def load_ranks(path=RANKS_PATH, expected_sha256=RANKS_SHA256):
    """Read a .tiktoken ranks file ("<base64 token> <rank>" per line) after checking its hash.

    We parse it ourselves rather than with tiktoken.load.load_tiktoken_bpe because that one
    keeps a copy in a temp-dir cache keyed by path and returns the cached copy when present,
    so a corrupted file next to this module could go unnoticed.
    """
    path = Path(path)
    restore = f"restore it with `git checkout data/{path.name}`"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the GPT-2 BPE ranks file {path} ({e.strerror}); {restore}") from None
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


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """The GPT-2 tiktoken.Encoding, loaded once per process from data/gpt2.tiktoken."""
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=load_ranks(),
        special_tokens={"<|endoftext|>": EOT},
    )
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT
    return enc
