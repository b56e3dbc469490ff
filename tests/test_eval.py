"""Tests for eval.py: the perplexity windows score exactly the intended tokens, and the retrieval
probe tells a perfect copier (100%) from a random model (~0%). Synthetic tokens and tiny models,
CPU, a few seconds."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402
import eval as E  # noqa: E402
from checkpoint import parse_rope_swap, rope_with_overrides  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

VOCAB = 64


def corpus(lengths, seed=0):
    """Back-to-back documents of random tokens (with a separator after each, like EOT) and their
    (start, len)."""
    rng = np.random.default_rng(seed)
    docs, parts, pos = [], [], 0
    for n in lengths:
        parts += [rng.integers(0, VOCAB - 1, n), [VOCAB - 1]]
        docs.append((pos, n))
        pos += n + 1
    return np.concatenate(parts).astype(np.uint16), np.array(docs, dtype=np.int64)


def last_rows(logits, last_n):
    """The stand-in models take forward's last_n as Transformer does: logits of the last n positions
    only."""
    return logits if last_n is None else logits[:, -last_n:]


class Uniform(nn.Module):
    """Equal logits everywhere: every token's loss is exactly ln(vocab)."""

    def forward(self, idx, seq_len=None, last_n=None):
        return last_rows(torch.zeros(*idx.shape, VOCAB), last_n)


class Recorder(nn.Module):
    """Uniform logits, and remembers every batch of inputs it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, idx, seq_len=None, last_n=None):
        self.seen.append(idx.clone())
        return last_rows(torch.zeros(*idx.shape, VOCAB), last_n)


class PerfectCopier(nn.Module):
    """Predicts, at each position, the token that followed the previous occurrence of the current
    token (an ideal induction head); no opinion where the current token has not occurred before."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, seq_len=None, last_n=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            last = {}  # token -> its latest position so far
            row = idx[b].tolist()
            for p, tok in enumerate(row):
                if tok in last:
                    logits[b, p, row[last[tok] + 1]] = 1.0
                last[tok] = p
        return last_rows(logits, last_n)


class RandomModel(nn.Module):
    def __init__(self, vocab, seed=0):
        super().__init__()
        self.vocab, self.gen = vocab, torch.Generator().manual_seed(seed)

    def forward(self, idx, seq_len=None, last_n=None):
        return last_rows(torch.randn(*idx.shape, self.vocab, generator=self.gen), last_n)


LENGTHS = [10, 40, 100, 70, 33, 65, 200]


def test_uniform_model_nll_is_log_vocab_and_token_count_is_exact():
    tokens, docs = corpus(LENGTHS)
    max_context, score = 32, 16
    # only documents with room for the scored region after the longest context's history: 40 and 33
    # are too short
    eligible = [n for n in LENGTHS if n >= max_context + score]
    for context in (8, 16, 32):
        r = E.perplexity(
            Uniform(), tokens, docs, context, score, max_docs=100, max_context=max_context
        )
        assert r["nll"] == pytest.approx(math.log(VOCAB), abs=1e-6)
        assert r["n_tokens"] == score * len(eligible)  # the same tokens at every context
        assert r["n_docs"] == len(eligible) == len(r["doc_nll"]) == len(r["regions"])
        assert r["doc_nll"] == pytest.approx([math.log(VOCAB)] * len(eligible), abs=1e-6)
        span = min(context // 2, score)
        assert r["n_windows"] == len(eligible) * score // span and r["history"] == [
            context - span + 1,
            context,
        ]


def test_scored_regions_are_in_the_body_the_same_each_time_and_spread_over_documents():
    tokens, docs = corpus([300] * 12)
    chosen, firsts = E.scored_regions(docs, 64, 32, max_docs=12, seed=1)
    assert all(
        64 <= a <= 300 - 32 for a in firsts
    )  # after the longest context's history, before the end
    assert len(set(firsts)) > 6  # not all at one offset (the ending, say)
    again = E.scored_regions(docs, 64, 32, max_docs=12, seed=1)
    assert list(again[0]) == list(chosen) and again[1] == firsts
    r = E.perplexity(Uniform(), tokens, docs, 16, 32, max_docs=12, max_context=64, seed=1)
    assert r["regions"] == [
        [int(docs[i, 0]) + a, int(docs[i, 0]) + a + 32] for i, a in zip(chosen, firsts)
    ]
    with pytest.raises(ValueError):
        E.select_docs(docs, 10_000, max_docs=3)
    with pytest.raises(
        ValueError, match="multiple"
    ):  # a window at 16 scores 8: 12 tokens do not tile
        E.perplexity(Uniform(), tokens, docs, 16, 12, max_docs=3, max_context=64)


def scored_windows(tokens, docs, context, score, max_context):
    """(stream offset of each window's end, tokens it scores), as perplexity lays them out."""
    chosen, firsts = E.scored_regions(docs, max_context, score, 100)
    span = min(context // 2, score)
    return [
        (int(docs[i, 0]) + end, span)
        for i, a in zip(chosen, firsts)
        for end in range(a + span, a + score + 1, span)
    ]


def test_windows_are_contiguous_slices_with_full_history():
    tokens, docs = corpus(LENGTHS)
    context, score, max_context = 16, 16, 32
    rec = Recorder()
    E.perplexity(
        rec, tokens, docs, context, score, max_docs=100, max_context=max_context, batch_size=1
    )
    stream = tokens.astype(np.int64)
    ends = scored_windows(tokens, docs, context, score, max_context)
    assert (
        len(rec.seen) == len(ends) == 2 * len([n for n in LENGTHS if n >= 48])
    )  # two windows of 8 per region
    for x, (end, _) in zip(rec.seen, ends):
        # inputs are the context tokens just before the last target; the scored targets are [end -
        # span, end)
        assert x.shape == (1, context)
        assert np.array_equal(x[0].numpy(), stream[end - 1 - context : end - 1])


def test_perplexity_equals_direct_computation_on_a_real_model():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, block_size=16)
    ).eval()
    tokens, docs = corpus(LENGTHS, seed=3)
    context, score, max_context = 16, 16, 32
    r = E.perplexity(model, tokens, docs, context, score, max_docs=100, max_context=max_context)
    stream = torch.from_numpy(tokens.astype(np.int64))
    losses, per_doc = [], []
    with torch.no_grad():
        for k, (end, span) in enumerate(scored_windows(tokens, docs, context, score, max_context)):
            logits = model(stream[None, end - 1 - context : end - 1])[
                0
            ]  # the whole window's logits
            losses.append(
                F.cross_entropy(logits[-span:], stream[end - span : end], reduction="none")
            )
            if k % 2:  # two windows per document
                per_doc.append(torch.cat(losses[-2:]).mean().item())
    direct = torch.cat(losses)
    assert r["n_tokens"] == direct.numel()
    assert r["nll"] == pytest.approx(direct.mean().item(), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(direct.mean().item()), rel=1e-5)
    assert r["doc_nll"] == pytest.approx(per_doc, rel=1e-5)


def test_last_positions_only_matches_full_logits():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, block_size=16)
    ).eval()
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(x)
        part = model(x, last_n=5)
        assert part.shape == (2, 5, VOCAB)
        torch.testing.assert_close(part, full[:, -5:])


def test_probe_sequence_layout():
    filler, needle = np.arange(100, 120), np.arange(8)
    seq = E.probe_sequence(filler, needle, 0.5)
    assert len(seq) == len(filler) + 2 * len(needle)
    assert np.array_equal(seq[10:18], needle) and np.array_equal(seq[-8:], needle)
    assert np.array_equal(seq[18:-8], filler[10:])  # the text between the needle and its cue


def test_retrieval_perfect_copier_scores_100_and_random_model_about_0():
    # filler tokens from [0, 100), needle words from [100, 164): the copier's only earlier match is
    # the needle
    rng = np.random.default_rng(0)
    lengths = [300, 400, 500]
    tokens = rng.integers(0, 100, sum(lengths)).astype(np.uint16)
    docs = np.array([(sum(lengths[:i]), n) for i, n in enumerate(lengths)], dtype=np.int64)
    vocab = list(range(100, 164))
    depths = (0.0, 0.5, 0.75)
    for context in (64, 256):
        r = E.retrieval(PerfectCopier(200), tokens, docs, context, depths, trials=4, vocab=vocab)
        assert all(a == 1.0 for a in r["acc"].values()), r
        assert all(
            d > 0 for d in r["distance"].values()
        )  # text between needle and cue in every cell
        assert max(r["no_needle"]) < 0.2, (
            r
        )  # nothing planted, nothing to copy: the control sits near 0
        r = E.retrieval(RandomModel(200), tokens, docs, context, depths, trials=4, vocab=vocab)
        assert r["mean"] < 0.05, r
    with pytest.raises(
        ValueError, match="depth"
    ):  # depth 1 would put the needle right before its cue
        E.retrieval(PerfectCopier(200), tokens, docs, 64, (0.0, 1.0), trials=4, vocab=vocab)


def test_chance_is_what_a_guesser_knowing_the_needles_tokens_scores():
    """Not 1/len(vocab): a guesser that knows which tokens remain, striking out those teacher
    forcing reveals, scores H_n / n for n distinct tokens (0.26 for n = 12, against 1/77 for GPT-2's
    needle vocabulary)."""
    assert E.chance(list(range(12))) == pytest.approx(sum(1 / k for k in range(1, 13)) / 12)
    assert E.chance(list(range(12))) > 0.25
    assert E.chance([5, 5, 5]) == 1.0
    assert E.chance([1, 1, 2]) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    rng = np.random.default_rng(0)  # and a simulated guesser agrees
    needle, hits = list(range(8)), []
    for _ in range(4000):
        left = list(needle)
        for token in needle:
            hits.append(left[rng.integers(len(left))] == token)
            left.remove(token)
    assert np.mean(hits) == pytest.approx(E.chance(needle), abs=0.02)


def test_ceiling_is_the_best_recall_without_the_needle():
    """Without the needle, the best guess after the cue and j teacher-forced letters is any of the
    |V| - c - j letters not yet shown (the needle's letters are distinct): the mean of
    1/(22 - j) over 12 letters, 0.0635, for the byte probe; a simulated best guesser agrees, and
    the retrieval probe reports it per trial."""
    assert E.ceiling(12, 4, 26) == pytest.approx(np.mean([1 / (22 - j) for j in range(12)]))
    assert E.ceiling(12, 4, 26) == pytest.approx(0.0635, abs=5e-5)
    assert E.ceiling(12, 4, 26, distinct=False) == pytest.approx(1 / 26)
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(3000):
        needle = rng.choice(26, size=16, replace=False)
        for j in range(4, 16):  # guess among the letters not shown yet
            hits.append(rng.choice(np.setdiff1d(np.arange(26), needle[:j])) == needle[j])
    assert np.mean(hits) == pytest.approx(E.ceiling(12, 4, 26), abs=0.005)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 100, 1000).astype(np.uint16)
    docs = np.array([(0, 1000)], dtype=np.int64)
    r = E.retrieval(
        RandomModel(200), tokens, docs, 64, (0.0,), trials=3, vocab=list(range(100, 126))
    )
    assert r["ceiling"] == [pytest.approx(E.ceiling(12, 4, 26))] * 3


def test_rope_overrides_are_typed_like_the_config_and_unknown_ones_refused():
    args, got = parse_rope_swap(
        [
            "--ckpt=run",
            "--contexts=8,16",
            "--rope.type=yarn",
            "--rope.factor=8",
            "--rope.original_context=512",
            "--rope.truncate=false",
            "--rope.attention_factor=none",
        ],
        E.EvalConfig,
        "eval.py",
        "",
    )
    assert (args.ckpt, args.contexts) == ("run", (8, 16))
    assert got == {
        "type": "yarn",
        "factor": 8.0,
        "original_context": 512,
        "truncate": False,
        "attention_factor": None,
    }
    assert isinstance(got["factor"], float) and isinstance(got["original_context"], int)
    with pytest.raises(ValueError, match="bogus"):
        parse_rope_swap(
            ["--ckpt=run", "--contexts=8", "--rope.bogus=1"], E.EvalConfig, "eval.py", ""
        )


def test_extended_rope_defaults_original_context_to_the_training_context():
    model = Transformer(
        ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, block_size=16)
    )
    cfg = rope_with_overrides(model.config, {"type": "yarn", "factor": 4.0})
    assert (cfg.type, cfg.factor, cfg.original_context) == ("yarn", 4.0, 16)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--ckpt", "{tmp}/missing", "--contexts", "128"], ["no checkpoint"]),
        (["--ckpt", "{tmp}/truncated.pt", "--contexts", "128"], ["corrupt"]),
        (
            ["--ckpt", "{tmp}/ok.pt", "--contexts", "10000000", "--data_dir", "{data}"],
            ["no held-out document"],
        ),
        (["--ckpt", "{tmp}/ok.pt", "--contexts", "abc"], ["--contexts expects an int list"]),
    ],
)
def test_cli_errors_exit_2_without_a_traceback(argv, words, tmp_path):
    """Bad input to eval.py gives `error: ...` and exit 2, as to train.py and sample.py."""
    model = Transformer(
        ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, block_size=16)
    )
    checkpoint.save(
        {"model_config": model.config.to_dict(), "model": model.state_dict(), "tokenizer": "bytes"},
        tmp_path / "ok.pt",
    )
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:3000])
    data = tmp_path / "data"
    make_token_files(data)
    args = [a.format(tmp=tmp_path, data=data) for a in argv]
    r = subprocess.run(
        [sys.executable, "eval.py", *args, "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, (
        r.stderr
    )
    assert all(w in r.stderr for w in words), r.stderr


def make_token_files(folder):
    """A prepared folder (data.prepare's format) of random byte-level documents."""
    from data.prepare import PrepareConfig, prepare

    src = folder.parent / "corpus"
    src.mkdir()
    for i in range(6):
        (src / f"doc{i}.txt").write_text("".join(chr(97 + (7 * k + i) % 26) for k in range(400)))
    prepare(
        PrepareConfig(
            source=str(src), out=str(folder), block_size=16, tokenizer="bytes", val_fraction=0.5
        )
    )
