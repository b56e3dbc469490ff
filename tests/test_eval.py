"""Tests for eval.py: the perplexity windows score exactly the intended tokens, and the retrieval probe tells a
perfect copier (100%) from a random model (~0%). Synthetic tokens and tiny models, CPU, a few seconds."""

import math
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

import eval as E  # noqa: E402
from model import ModelConfig, Transformer, rope_with_overrides  # noqa: E402

VOCAB = 64


def corpus(lengths, seed=0):
    """Back-to-back documents of random tokens (with a separator after each, like EOT) and their (start, len)."""
    rng = np.random.default_rng(seed)
    docs, parts, pos = [], [], 0
    for n in lengths:
        parts += [rng.integers(0, VOCAB - 1, n), [VOCAB - 1]]
        docs.append((pos, n))
        pos += n + 1
    return np.concatenate(parts).astype(np.uint16), np.array(docs, dtype=np.int64)


def last_rows(logits, last_n):
    """The stand-in models take forward's last_n as Transformer does: logits of the last n positions only."""
    return logits if last_n is None else logits[:, -last_n:]


class Uniform(nn.Module):
    """Equal logits everywhere: every token's loss is exactly ln(vocab)."""

    def forward(self, idx, rope_length=None, last_n=None):
        return last_rows(torch.zeros(*idx.shape, VOCAB), last_n)


class Recorder(nn.Module):
    """Uniform logits, and remembers every batch of inputs it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, idx, rope_length=None, last_n=None):
        self.seen.append(idx.clone())
        return last_rows(torch.zeros(*idx.shape, VOCAB), last_n)


class PerfectCopier(nn.Module):
    """Predicts, at each position, the token that followed the previous occurrence of the current token
    (an ideal induction head); no opinion where the current token has not occurred before."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, rope_length=None, last_n=None):
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

    def forward(self, idx, rope_length=None, last_n=None):
        return last_rows(torch.randn(*idx.shape, self.vocab, generator=self.gen), last_n)


LENGTHS = [10, 40, 100, 70, 33, 65, 200]


def test_uniform_model_nll_is_log_vocab_and_token_count_is_exact():
    tokens, docs = corpus(LENGTHS)
    max_context, stride, max_windows = 32, 8, 4
    eligible = [n for n in LENGTHS if n > max_context]
    # windows per document: scored spans end at n, n - stride, ... while the span starts >= max_context
    expected = sum(min(max_windows, (n - max_context) // stride) for n in eligible) * stride
    for context in (8, 16, 32):
        r = E.perplexity(Uniform(), tokens, docs, context, stride, max_docs=100, max_context=max_context,
                         max_windows=max_windows)
        assert r["nll"] == pytest.approx(math.log(VOCAB), abs=1e-6)
        assert r["n_tokens"] == expected  # the same tokens at every context
        assert r["n_docs"] == len(eligible)


def test_only_documents_longer_than_the_longest_context_and_the_same_ones_each_time():
    _, docs = corpus(LENGTHS)
    chosen = E.select_docs(docs, 64, max_docs=3, seed=1)
    assert all(docs[i, 1] > 64 for i in chosen) and len(chosen) == 3
    assert list(chosen) == list(E.select_docs(docs, 64, max_docs=3, seed=1))
    with pytest.raises(ValueError):
        E.select_docs(docs, 10_000, max_docs=3)


def test_windows_are_contiguous_slices_with_full_history():
    tokens, docs = corpus(LENGTHS)
    context, stride, max_context = 16, 4, 32
    rec = Recorder()
    E.perplexity(rec, tokens, docs, context, stride, max_docs=100, max_context=max_context, max_windows=3,
                 batch_size=1)
    stream = tokens.astype(np.int64)
    ends = []
    for i in E.select_docs(docs, max_context, 100):
        start, n = docs[i]
        ends += [start + e for e in E.window_ends(n, stride, max_context, 3)]
    assert len(rec.seen) == len(ends)
    for x, end in zip(rec.seen, ends):
        # inputs are the context tokens just before the last target; the scored targets are [end-stride, end)
        assert x.shape == (1, context)
        assert np.array_equal(x[0].numpy(), stream[end - 1 - context : end - 1])


def test_perplexity_equals_direct_computation_on_a_real_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, block_size=16)).eval()
    tokens, docs = corpus(LENGTHS, seed=3)
    context, stride, max_context = 16, 8, 32
    r = E.perplexity(model, tokens, docs, context, stride, max_docs=100, max_context=max_context, max_windows=2)
    losses = []
    with torch.no_grad():
        for i in E.select_docs(docs, max_context, 100):
            start, n = docs[i]
            doc = torch.from_numpy(tokens[start : start + n].astype(np.int64))
            for end in E.window_ends(n, stride, max_context, 2):
                logits = model(doc[None, end - 1 - context : end - 1])[0]  # the whole window, no hook
                losses.append(F.cross_entropy(logits[-stride:], doc[end - stride : end], reduction="none"))
    direct = torch.cat(losses)
    assert r["n_tokens"] == direct.numel()
    assert r["nll"] == pytest.approx(direct.mean().item(), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(direct.mean().item()), rel=1e-5)


def test_last_positions_only_matches_full_logits_and_removes_the_hook():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, block_size=16)).eval()
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(x)
        part = E.last_logits(model, x, 5)
        assert part.shape == (2, 5, VOCAB)
        torch.testing.assert_close(part, full[:, -5:])
        assert model(x).shape == full.shape  # hook removed


def test_probe_sequence_layout():
    filler, needle = np.arange(100, 120), np.arange(8)
    seq, n = E.probe_sequence(filler, needle, 0.5, prefix=3)
    assert len(seq) == len(filler) + 2 * len(needle) and n == 5
    assert np.array_equal(seq[10:18], needle) and np.array_equal(seq[-8:], needle)


def test_retrieval_perfect_copier_scores_100_and_random_model_about_0():
    # filler tokens from [0, 100), needle words from [100, 164): the copier's only earlier match is the needle
    rng = np.random.default_rng(0)
    lengths = [300, 400, 500]
    tokens = rng.integers(0, 100, sum(lengths)).astype(np.uint16)
    docs = np.array([(sum(lengths[:i]), n) for i, n in enumerate(lengths)], dtype=np.int64)
    vocab = list(range(100, 164))
    depths = (0.0, 0.5, 1.0)
    for context in (64, 256):
        r = E.retrieval(PerfectCopier(200), tokens, docs, context, depths, trials=4, vocab=vocab)
        assert all(a == 1.0 for a in r["acc"].values()), r
        r = E.retrieval(RandomModel(200), tokens, docs, context, depths, trials=4, vocab=vocab)
        assert r["mean"] < 0.05, r


def test_rope_overrides_are_typed_like_the_config_and_unknown_ones_refused():
    got = E.parse_rope_overrides(["--rope.type=yarn", "--rope.factor=8", "--rope.original_context=512",
                                  "--rope.truncate=false", "--rope.attention_factor=none"])
    assert got == {"type": "yarn", "factor": 8.0, "original_context": 512, "truncate": False, "attention_factor": None}
    assert isinstance(got["factor"], float) and isinstance(got["original_context"], int)
    with pytest.raises(SystemExit):
        E.parse_rope_overrides(["--rope.bogus=1"])
    with pytest.raises(SystemExit):
        E.parse_rope_overrides(["--stride=3"])


def test_extended_rope_defaults_original_context_to_the_training_context():
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, block_size=16))
    cfg = rope_with_overrides(model.config, {"type": "yarn", "factor": 4.0})
    assert (cfg.type, cfg.factor, cfg.original_context) == ("yarn", 4.0, 16)
