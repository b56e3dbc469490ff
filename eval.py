"""Evaluation against context length: sliding-window perplexity on long held-out documents, and a
retrieval probe.

    python eval.py --ckpt out/yarn8 --contexts 512,1024,2048,4096 \\
        --out yarn8.json  # --rope.<field>=... too

Perplexity: each chosen held-out document scores `score` consecutive tokens from its body (not its
ending, which is boilerplate), the very same tokens at every context of a ladder (scored_regions).
At context T a window scores its last S = min(T/2, score) tokens, so every scored token sees between
T - S + 1 and T tokens of history (at least T/2, the paper's sliding window with stride S). Each
document's mean NLL is kept: documents, not their correlated windows, are the units the report's
statistics pair over.

Retrieval (the toy stand-in for the paper's passkey test, which needs an instruction-following
model): exactly T tokens of held-out text with a random needle of n tokens planted at depth d and
repeated at the end; teacher-forced, the model is scored on the last n - cue tokens of the repeat
(top-1; a trial whose every token is right is an exact match: greedy decoding from the cue would
write the whole needle). Depth d leaves (1 - d)(T - 2n) tokens between. The same trials with no
needle planted (only its repeat at the end) are the control: without the needle no model can beat
its ceiling (below), and the lift, the trial's recall with the needle minus without, is what the
needle gives.
"""

import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import flags
from checkpoint import parse_rope_swap, rope_with_overrides
from data.loader import load_split
from data.tokenizer import describe, get_tokenizer
from system import check_writable, pick_device, write_json

# Ordinary English words, each one GPT-2 token with its leading space: a GPT-2 needle looks like
# plain text (no rare tokens the model never learned) yet cannot be guessed. A byte-level needle is
# lowercase letters.
NEEDLE_WORDS = (
    "apple river stone garden window paper orange silver yellow market island winter summer "
    "forest doctor letter bridge castle engine planet pocket house water table chair music money "
    "green black white horse train glass heart light night field power story color party family "
    "friend school mother father city dog cat bird fish tree road car ship king queen sun moon "
    "star rain snow fire wind gold iron salt milk bread wine coffee tea sugar egg honey ocean lemon"
).split()


# Perplexity
def select_docs(docs: np.ndarray, min_len: int, max_docs: int, seed: int = 0) -> np.ndarray:
    """Indices of up to max_docs documents with at least min_len tokens: a seeded sample, in corpus
    order, so every context and every model sees the same documents."""
    eligible = np.flatnonzero(docs[:, 1] >= min_len)
    if len(eligible) == 0:
        raise ValueError(
            f"no held-out document has {min_len} tokens; shorten the context ladder or --score"
        )
    chosen = np.random.default_rng(seed).choice(
        eligible, size=min(max_docs, len(eligible)), replace=False
    )
    return np.sort(chosen)


def scored_regions(docs: np.ndarray, max_context: int, score: int, max_docs: int, seed: int = 0):
    """(chosen document indices, each one's first scored offset a): `score` tokens [a, a + score)
    from the body of each document, a drawn uniformly from [max_context, length - score] by (seed,
    document), so that every context up to max_context has the history it needs and every model sees
    the same tokens."""
    chosen = select_docs(docs, max_context + score, max_docs, seed)
    starts = [
        int(np.random.default_rng([seed, int(i)]).integers(max_context, docs[i, 1] - score + 1))
        for i in chosen
    ]
    return chosen, starts


@torch.no_grad()
def perplexity(
    model,
    tokens,
    docs,
    context: int,
    score: int,
    max_docs: int,
    device="cpu",
    seq_len: int | None = None,
    max_context: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """Perplexity at `context` on the scored regions (module docstring). tokens: 1-D; docs: (n, 2)
    of (start, length); max_context: the ladder's longest (default `context`); seq_len: the l'
    dynamic variants scale for (default the window's length). Returns nll (nats per scored token),
    ppl, n_tokens, n_windows, n_docs, docs (their indices), doc_nll (each one's mean NLL, in that
    order), regions ([start, end) in the token stream) and history (the fewest and most tokens a
    scored token sees)."""
    max_context = max_context or context
    span = min(context // 2, score)  # S: tokens scored per window
    if not (0 < span and context <= max_context and score % span == 0):
        raise ValueError(
            f"need 2 <= context ({context}) <= max_context ({max_context}) and a score ({score}) "
            "that is a multiple of min(context / 2, score)"
        )
    chosen, firsts = scored_regions(docs, max_context, score, max_docs, seed)
    windows, owner = [], []  # (inputs, targets) per window, and the document it came from
    for j, (i, a) in enumerate(zip(chosen, firsts)):
        start = int(docs[i, 0])
        doc = np.asarray(tokens[start : start + a + score], dtype=np.int64)
        for end in range(a + span, a + score + 1, span):
            # inputs doc[end-1-context : end-1] predict doc[end-context : end]; the last `span`
            # targets are scored
            windows.append((doc[end - 1 - context : end - 1], doc[end - span : end]))
            owner.append(j)
    sums = np.zeros(len(chosen))
    for b in range(0, len(windows), batch_size):
        x = torch.from_numpy(np.stack([w[0] for w in windows[b : b + batch_size]])).to(
            device
        )  # (B, context)
        y = torch.from_numpy(np.stack([w[1] for w in windows[b : b + batch_size]])).to(
            device
        )  # (B, span)
        logits = model(x, seq_len=seq_len, last_n=span).float()  # (B, span, V)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
        ).view(y.shape)
        np.add.at(sums, owner[b : b + batch_size], nll.sum(dim=1).double().cpu().numpy())
    nll = float(sums.sum() / (score * len(chosen)))
    return {
        "nll": nll,
        "ppl": math.exp(min(nll, 700.0)),
        "n_tokens": score * len(chosen),
        "n_windows": len(windows),
        "n_docs": len(chosen),
        "docs": chosen.tolist(),
        "doc_nll": (sums / score).tolist(),
        "regions": [
            [int(docs[i, 0]) + a, int(docs[i, 0]) + a + score] for i, a in zip(chosen, firsts)
        ],
        "history": [context - span + 1, context],
    }


# Retrieval probe
def needle_vocab(tokenizer) -> list[int]:
    """The ids needles are drawn from: lowercase letters for the byte tokenizer, NEEDLE_WORDS for
    GPT-2 and any vocabulary that has at least 16 of them as single tokens."""
    if tokenizer.name == "bytes":
        return list(b"abcdefghijklmnopqrstuvwxyz")
    ids = [tokenizer.encode_ordinary(" " + w) for w in NEEDLE_WORDS]
    words = list(dict.fromkeys(i[0] for i in ids if len(i) == 1))
    if len(words) >= 16:
        return words
    # a vocabulary with few whole words (a test's): letters, each one token in a byte-level BPE
    return list(
        dict.fromkeys(tokenizer.encode_ordinary(c)[0] for c in "abcdefghijklmnopqrstuvwxyz")
    )


def probe_sequence(filler: np.ndarray, needle: np.ndarray, depth: float) -> np.ndarray:
    """filler[:k] + needle + filler[k:] + needle, k = round(depth * len(filler)): what the model
    reads."""
    k = int(round(depth * len(filler)))
    return np.concatenate([filler[:k], needle, filler[k:], needle])


def chance(answer) -> float:
    """Expected top-1 accuracy of a guesser that knows the multiset of `answer` but not its order
    and strikes out each token as teacher forcing reveals it: mean over j of (copies of answer[j]
    left) / (tokens left)."""
    left, total = Counter(answer), 0.0
    for j, token in enumerate(answer):
        total += left[token] / (len(answer) - j)
        left[token] -= 1
    return total / len(answer)


def ceiling(n_scored: int, cue: int, alphabet: int, distinct: bool = True) -> float:
    """The best expected top-1 recall without the needle. Its tokens are distinct uniform draws
    from `alphabet` symbols (independent ones where the needle is longer than the alphabet); after
    the cue and j teacher-forced tokens, cue + j of them are known, so no guess beats
    1/(alphabet - cue - j) (1/alphabet for independent draws): the mean over the scored tokens
    j = 0 .. n_scored - 1 (0.0635 for 12 letters after a cue of 4)."""
    per_token = [1 / (alphabet - cue - j) if distinct else 1 / alphabet for j in range(n_scored)]
    return float(np.mean(per_token))


@torch.no_grad()
def retrieval(
    model,
    tokens,
    docs,
    context: int,
    depths,
    trials: int,
    vocab: list[int],
    needle_len: int = 16,
    cue: int = 4,
    device="cpu",
    seq_len: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    control: bool = True,
) -> dict:
    """Recall of a planted needle at each depth, in sequences of exactly `context` tokens. Trial t
    uses the same needle and filler for every model and depth (seeded by seed and t). Returns acc
    {depth: mean}, trial_acc {depth: per-trial accuracy}, distance {depth: tokens between needle and
    cue}, chance (per trial), ceiling (per trial: the best recall without the needle), mean, and
    with `control` no_needle (per-trial accuracy with no needle planted)."""
    n_fill = context - 2 * needle_len
    if n_fill < 1 or not 0 < cue < needle_len or (depths and max(depths) >= 1):
        raise ValueError(
            f"context {context} too short for two needles of {needle_len}, or cue {cue} not in "
            f"(0, {needle_len}), or a depth >= 1 (which would leave no text between needle and cue)"
        )
    fillers, needles, offsets = [], [], []
    eligible = np.flatnonzero(
        docs[:, 1] >= n_fill + needle_len
    )  # room for the control's longer filler too
    if len(eligible) == 0:
        raise ValueError(
            f"no held-out document has the {n_fill + needle_len} tokens of text context {context} "
            "needs"
        )
    for t in range(trials):
        rng = np.random.default_rng([seed, t])
        start, length = (int(v) for v in docs[eligible[rng.integers(len(eligible))]])
        offsets.append(start + int(rng.integers(length - n_fill - needle_len + 1)))
        fillers.append(np.asarray(tokens[offsets[-1] : offsets[-1] + n_fill], dtype=np.int64))
        needles.append(rng.choice(vocab, size=needle_len, replace=needle_len > len(vocab)))
    n_scored = needle_len - cue

    def hits(
        sequences,
    ) -> list[float]:  # each trial's share of the n_scored targets predicted top-1
        x_all, out = torch.from_numpy(np.stack(sequences)), []
        for b in range(0, trials, batch_size):
            x = x_all[b : b + batch_size].to(device)  # (B, context)
            # position p predicts token p+1: the last n_scored targets come from positions
            # -n_scored-1 .. -2
            logits = model(x, seq_len=seq_len, last_n=n_scored + 1)[:, :-1]  # (B, n_scored, V)
            out += (logits.argmax(-1) == x[:, -n_scored:]).float().mean(dim=1).tolist()
        return out

    best = ceiling(n_scored, cue, len(vocab), distinct=needle_len <= len(vocab))
    out = {
        "acc": {},
        "trial_acc": {},
        "distance": {},
        "chance": [chance(n[cue:]) for n in needles],
        "ceiling": [best] * trials,
    }
    for depth in depths:
        out["trial_acc"][str(depth)] = hits(
            [probe_sequence(f, n, depth) for f, n in zip(fillers, needles)]
        )
        out["acc"][str(depth)] = float(np.mean(out["trial_acc"][str(depth)]))
        out["distance"][str(depth)] = n_fill - int(round(depth * n_fill))
    out["mean"] = float(np.mean(list(out["acc"].values())))
    # no needle planted: the filler runs on where it stood, and only the repeat at the end remains
    if control:
        longer = [np.asarray(tokens[o : o + n_fill + needle_len], dtype=np.int64) for o in offsets]
        out["no_needle"] = hits([np.concatenate([f, n]) for f, n in zip(longer, needles)])
    return out


# Both, over a ladder of contexts
def evaluate(
    model,
    tokens,
    docs,
    contexts,
    score: int,
    vocab: list[int],
    max_docs: int = 8,
    depths=(0.0, 0.25, 0.5, 0.75),
    trials: int = 8,
    needle_len: int = 16,
    retrieval_contexts=None,
    device="cpu",
    seed: int = 0,
    log=print,
    max_context: int | None = None,
) -> dict:
    """Perplexity at every context of the ladder (the same documents and scored tokens at each,
    placed after max_context tokens, default the longest context) and the retrieval grid over
    retrieval_contexts (default the same ladder) x depths, with its no-needle control. JSON-able."""
    contexts = sorted(int(c) for c in contexts)
    max_context = max(max_context or 0, contexts[-1])
    model.eval()
    out = {
        "contexts": contexts,
        "score": score,
        "ppl": {},
        "retrieval": {},
        "depths": [float(d) for d in depths],
    }
    t0 = time.time()
    for T in contexts:
        r = out["ppl"][str(T)] = perplexity(
            model, tokens, docs, T, score, max_docs, device, max_context=max_context, seed=seed
        )
        log(f"  ppl @ {T:6d}: {r['ppl']:10.3f}  ({r['n_tokens']} tokens, {r['n_docs']} documents)")
    for T in sorted(
        int(c) for c in (contexts if retrieval_contexts is None else retrieval_contexts)
    ):
        r = out["retrieval"][str(T)] = retrieval(
            model,
            tokens,
            docs,
            T,
            depths,
            trials,
            vocab,
            needle_len,
            cue=needle_len // 4,
            device=device,
            seed=seed,
        )
        log(
            f"  retrieval @ {T:6d}: "
            + " ".join(f"{d}:{a:.2f}" for d, a in r["acc"].items())
            + f"  (no needle {np.mean(r['no_needle']):.2f}, chance {np.mean(r['chance']):.2f})"
        )
    out["seconds"] = time.time() - t0
    return out


# Command line
@dataclass(frozen=True)
class EvalConfig:
    """eval.py's settings.

    ckpt                a checkpoint file, or a run folder holding ckpt.pt
    contexts            the context ladder, e.g. 512,1024,2048
    retrieval_contexts  default: the ladder
    score               tokens scored per document, the same at every context (a window scores its
                        last T/2 at most)
    trials              retrieval trials per (context, depth) cell
    out                 write the results here as JSON
    """

    ckpt: str
    contexts: tuple[int, ...]
    data_dir: str = "data/stdlib"
    retrieval_contexts: tuple[int, ...] | None = None
    score: int = 512
    max_docs: int = 8
    trials: int = 8
    needle_len: int = 16
    device: str = "auto"
    out: str | None = None

    def __post_init__(self):
        flags.check_types(self)
        if not self.contexts or min(self.contexts) < 1:
            raise ValueError(
                f"--contexts must be positive lengths, e.g. 512,1024, got {self.contexts}"
            )
        for name in ("score", "max_docs", "trials", "needle_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def main(argv) -> dict:
    args, overrides = parse_rope_swap(argv, EvalConfig, "python eval.py", __doc__)
    if args.out:
        check_writable(args.out, "--out", folder=False)  # before minutes of evaluation
    device = pick_device(args.device)
    model, state = checkpoint.load_model(args.ckpt, device)
    if overrides:
        model.set_rope(rope_with_overrides(model.config, overrides))
    tokens, docs, meta = load_split(args.data_dir, "val")
    tokenizer = get_tokenizer(state.get("tokenizer", "gpt2"))
    ours, theirs = describe(state.get("tokenizer", "gpt2")), meta["tokenizer"]
    if any(ours.get(k) != theirs.get(k) for k in ("name", "sha256")):  # a vocabulary by its content
        raise ValueError(
            f"{args.data_dir} holds {theirs['name']} tokens but the checkpoint was "
            f"trained with the {tokenizer.name} tokenizer (or another version of it); "
            "pass a --data_dir prepared with it (data.prepare --tokenizer)"
        )
    print(f"evaluating {args.ckpt} with rope {asdict(model.config.rope)}", flush=True)
    result = evaluate(
        model,
        tokens,
        docs,
        args.contexts,
        args.score,
        needle_vocab(tokenizer),
        args.max_docs,
        trials=args.trials,
        needle_len=args.needle_len,
        retrieval_contexts=args.retrieval_contexts,
        device=device,
    )
    result.update(rope=asdict(model.config.rope), ckpt=str(args.ckpt))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(flags.cli(main))
