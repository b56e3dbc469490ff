"""Open the token files of `python -m data.prepare`, checking they are whole and fit this tokenizer;
draw batches.

    tokens, docs, meta = load_split("data/stdlib", "train")

tokens: a read-only np.memmap of uint16 ids, EOT after every document; docs[i] = (start, length) of
document i.
"""

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data.recall import mix
from data.tokenizer import TOKENIZERS, DataError, get_tokenizer
from system import read_json

SPLITS = ("train", "val")


def read_meta(data_dir):
    data_dir = Path(data_dir)
    rerun = f"run `python -m data.prepare --out {data_dir}`"
    if not data_dir.is_dir():
        raise DataError(f"no prepared data in {data_dir}: {rerun}")
    path = data_dir / "meta.json"
    if not path.is_file():
        # prepare writes meta.json last, so without it the folder is empty or a run was interrupted
        raise DataError(f"no prepared data in {data_dir} (meta.json missing): {rerun}")
    shape = {"splits": dict.fromkeys(SPLITS, {"n_tokens": int, "n_docs": int})}
    try:
        meta = read_json(path, f"data.prepare writes it: {rerun}", shape)
    except ValueError as e:
        raise DataError(str(e)) from None
    record = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    name = record.get("name")
    sized = type(meta.get("vocab_size")) is int and type(meta.get("eot")) is int
    if name not in TOKENIZERS and isinstance(record.get("sha256"), str) and sized:
        return meta  # a vocabulary's (data.tokenizer): its sizes are its own
    enc = get_tokenizer(name) if name in TOKENIZERS else None
    if enc is None or meta.get("vocab_size") != enc.n_vocab or meta.get("eot") != enc.eot_token:
        raise DataError(
            f"{data_dir} was prepared with tokenizer {name!r}, vocab_size {meta.get('vocab_size')} "
            f"and eot {meta.get('eot')}, which is not one of this code's tokenizers (gpt2: 50257 / "
            f"50256, bytes: 257 / 256); {rerun}"
        )
    return meta


def load_split(data_dir, split):
    """(tokens, docs, meta) for one split of a prepared folder; DataError if anything is missing or
    inconsistent."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    rerun = f"run `python -m data.prepare --out {data_dir}` again"
    bin_path, docs_path = data_dir / f"{split}.bin", data_dir / f"{split}_docs.npy"
    for path in (bin_path, docs_path):
        if not path.is_file():
            raise DataError(f"{path} is missing; {rerun}")

    expected = meta["splits"][split]["n_tokens"]
    n_bytes = bin_path.stat().st_size
    if n_bytes != 2 * expected or expected == 0:
        raise DataError(
            f"{bin_path} is corrupt: {n_bytes} bytes, meta.json says {expected} uint16 tokens; "
            f"{rerun}"
        )
    try:
        docs = np.load(docs_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable {docs_path} ({e}); {rerun}") from None
    n_docs = meta["splits"][split]["n_docs"]
    if docs.dtype != np.int64 or docs.shape != (n_docs, 2):
        raise DataError(
            f"{docs_path} is corrupt: {docs.dtype} {docs.shape}, expected int64 ({n_docs}, 2); "
            f"{rerun}"
        )
    # every document plus its EOT, back to back, must fill the .bin exactly
    if n_docs and (
        docs[0, 0] != 0
        or docs[-1].sum() + 1 != expected
        or int(docs[:, 1].sum()) + n_docs != expected
    ):
        raise DataError(f"{docs_path} does not match {bin_path}; {rerun}")

    tokens = np.memmap(bin_path, dtype="<u2", mode="r")  # prepare writes little-endian
    return tokens, docs, meta


def load_seen(data_dir) -> np.ndarray:
    """One bool per val token: whether the piece of tokens ending there occurs in train
    (data.prepare)."""
    path = Path(data_dir) / "val_seen.npy"
    read_meta(data_dir)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(
            f"unreadable {path} ({e}); run `python -m data.prepare --out {data_dir}` again"
        ) from None


def check_block_size(tokens, block_size, split):
    """Training samples block_size + 1 consecutive tokens (inputs and shifted targets), so a split
    needs that many."""
    if len(tokens) < block_size + 1:
        raise DataError(
            f"{split} split has {len(tokens)} tokens, too few for block size {block_size} "
            f"(needs at least {block_size + 1}); prepare a larger corpus or lower the block size"
        )


class TrainingData(NamedTuple):
    train: np.ndarray  # token ids (read-only memmaps)
    val: np.ndarray
    tokenizer: str  # its name, saved with the model


def load_training_data(
    data_dir, block_size: int, vocab_size: int, data_mix: str = "natural"
) -> TrainingData:
    """Both splits for train.py, each long enough for a window of block_size + 1 tokens, in a
    vocabulary the model's embedding covers, bytes for a recall mix."""
    train, _, meta = load_split(data_dir, "train")
    val, _, _ = load_split(data_dir, "val")
    for tokens, split in ((train, "train"), (val, "val")):
        check_block_size(tokens, block_size, split)
    if meta["vocab_size"] > vocab_size:
        raise DataError(
            f"--vocab_size={vocab_size} is smaller than the data's vocabulary "
            f"({meta['vocab_size']} tokens, tokenizer {meta['tokenizer']['name']})"
        )
    if data_mix != "natural" and meta["tokenizer"]["name"] != "bytes":
        raise DataError(
            f"--data_mix={data_mix} writes random bytes into the windows: it needs data prepared "
            f"with --tokenizer bytes, and {data_dir} holds {meta['tokenizer']['name']} tokens"
        )
    return TrainingData(train, val, meta["tokenizer"]["name"])


# Batches. Training step `step` takes grad_accum micro-batches, numbered 0..grad_accum-1 over all
# processes, their windows of block_size + 1 tokens drawn by a generator seeded by a hash of (seed,
# step, number): the global batch is the same for any world size, a resume needs no sampler state,
# and no two processes draw the same windows.
def stream_seed(seed: int, *key) -> int:
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def window_starts(tokens: np.ndarray, T: int, shape: tuple, seed: int, *key) -> np.ndarray:
    """Starts 0 .. len - T - 1 drawn by a generator seeded by (seed, *key): key ("train", step,
    micro-batch) for training, ("val",) for the fixed validation windows (the same at every eval, so
    a run's curve is comparable)."""
    g = torch.Generator().manual_seed(stream_seed(seed, *key))
    return torch.randint(len(tokens) - T, shape, generator=g).numpy()


def windows(
    tokens: np.ndarray,
    starts: np.ndarray,
    T: int,
    data_mix: str = "natural",
    seed: int = 0,
    device="cpu",
):
    """Inputs and next-token targets on device, (B, T) int64 each, of windows tokens[s : s + T + 1]
    as the data mix (seeded by seed) rewrites them."""
    w = torch.from_numpy(
        mix(tokens[starts[:, None] + np.arange(T + 1)].astype(np.int64), data_mix, seed)
    )
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T) each
    if device.startswith("cuda"):  # pinned host memory lets the copy overlap the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
            device, non_blocking=True
        )
    return x, y
