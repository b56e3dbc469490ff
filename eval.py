"""
Evaluate a (possibly context-extended) model the same way for every method: sliding-window perplexity over
a ladder of context lengths, and a copy-retrieval probe a small pretrained model can do without instructions.

    python eval.py --ckpt out/pretrain --rope.type=yarn --rope.factor=8 --contexts 512,1024,4096 --out r.json

Perplexity (paper Sec. 4.3.1 / YARN_SPEC Sec. 3, Press et al.'s sliding window). Averaging the loss over every
position of a window mixes in tokens that see almost no context and hides what long context does, so a window
of length T scores only its last `stride` tokens: each has at least T - stride tokens of history. Two choices
make the numbers comparable across contexts and models:
  * only documents longer than the longest context of the ladder are used (the same ones at every T), and
  * windows are anchored at the end of each document and slide backwards by `stride`; a window is kept only
    if every token it scores sits at least `max_context` tokens into its document. So at every context T the
    very same tokens are scored, and a change in perplexity is the change that T tokens of history make.
The mean is token-weighted (every scored token counts once); with all windows scoring `stride` tokens this is
also the paper's mean of per-window means.

Retrieval probe (the toy stand-in for the paper's passkey test, which needs an instruction-following model).
A random "needle" of ordinary word tokens is planted at a depth (fraction of the context) inside held-out
text; the sequence, T tokens in all, ends with the needle's first few tokens again, and the model is scored
on predicting the rest of the needle, teacher-forced: top-1 accuracy over the remaining needle tokens. A
pretrained model does this by copying (induction heads) as long as it can attend to the needle correctly, so
the accuracy against T and depth shows how far each position-scaling method keeps attention working.
"""

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import flags
import rope as rope_lib
from model import rope_with_overrides
from rope import RopeConfig

# Ordinary English words, each a single GPT-2 token with its leading space. Needles are drawn from these so a
# needle looks like plain text (no rare tokens the model has never embedded well) yet cannot be guessed.
NEEDLE_WORDS = (
    "apple river stone garden window paper orange silver yellow market island winter summer forest doctor "
    "letter bridge castle engine planet pocket house water table chair music money green black white horse "
    "train glass heart light night field power story color party family friend school mother father city dog "
    "cat bird fish tree road car ship king queen sun moon star rain snow fire wind gold iron salt milk bread "
    "wine coffee tea sugar egg honey ocean lemon"
).split()

# ----------------------------------------------------------------------------------------------------------
# Helpers


def last_logits(model, idx: torch.Tensor, n: int, rope_length: int | None = None) -> torch.Tensor:
    """Logits (B, n, V) of the last n positions of idx (B, T), in fp32.

    With a 50k-token vocabulary the output head is most of a small model's forward cost, and the evaluation
    only ever scores the last tokens of a window, so the head runs on those alone (forward's last_n)."""
    return model(idx, rope_length=rope_length, last_n=n).float()


def select_docs(docs: np.ndarray, min_len: int, max_docs: int, seed: int = 0) -> np.ndarray:
    """Indices of up to max_docs documents with more than min_len tokens: a seeded sample, in corpus order,
    so every context and every model sees the same documents."""
    eligible = np.flatnonzero(docs[:, 1] > min_len)
    if len(eligible) == 0:
        raise ValueError(f"no held-out document is longer than {min_len} tokens; shorten the context ladder")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(eligible, size=min(max_docs, len(eligible)), replace=False)
    return np.sort(chosen)


def window_ends(doc_len: int, stride: int, max_context: int, max_windows: int) -> list[int]:
    """End offsets (exclusive, within the document) of the scored spans [end - stride, end): anchored at the
    document's end, sliding back by stride, each scored token at least max_context tokens into the document."""
    ends = []
    end = doc_len
    while end - stride >= max_context and len(ends) < max_windows:
        ends.append(end)
        end -= stride
    return ends


# ----------------------------------------------------------------------------------------------------------
# Perplexity


@torch.no_grad()
def perplexity(model, tokens, docs, context: int, stride: int, max_docs: int, device="cpu",
               rope_length: int | None = None, max_context: int | None = None, max_windows: int = 4,
               batch_size: int = 8, seed: int = 0) -> dict:
    """Sliding-window perplexity at `context`, scoring the last `stride` tokens of each window.

    tokens: 1-D uint16/int array; docs: (n, 2) of (start, length). max_context: the longest context of the
    ladder (default `context`); documents must be longer than it, and only tokens at least that far into a
    document are scored, so the scored tokens are identical at every context <= max_context.
    rope_length: the l' dynamic variants scale for (default the window's own length, i.e. `context`).
    Returns nll (mean per scored token, nats), ppl = exp(nll), n_tokens, n_docs, n_windows, and window_nll
    (each window's mean NLL, in a fixed order)."""
    max_context = max_context or context
    if not 0 < stride <= context <= max_context:
        raise ValueError(f"need 0 < stride ({stride}) <= context ({context}) <= max_context ({max_context})")
    chosen = select_docs(docs, max_context, max_docs, seed)
    windows = []  # (input ids, target ids) per window
    for i in chosen:
        start, length = int(docs[i, 0]), int(docs[i, 1])
        doc = np.asarray(tokens[start : start + length], dtype=np.int64)
        for end in window_ends(length, stride, max_context, max_windows):
            # inputs doc[end-1-context : end-1] predict doc[end-context : end]; the last stride targets are scored
            windows.append((doc[end - 1 - context : end - 1], doc[end - stride : end]))
    if not windows:
        raise ValueError(f"no document has {max_context} + {stride} tokens; lower max_context or stride")
    total_nll, n_tokens, window_nll = 0.0, 0, []
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        x = torch.from_numpy(np.stack([w[0] for w in batch])).to(device)  # (B, context)
        y = torch.from_numpy(np.stack([w[1] for w in batch])).to(device)  # (B, stride)
        logits = last_logits(model, x, stride, rope_length)  # (B, stride, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(y.shape)
        window_nll += nll.mean(dim=1).tolist()
        total_nll += nll.sum().item()
        n_tokens += y.numel()
    nll = total_nll / n_tokens
    # window_nll, in a fixed window order, lets two models scored on the same windows be compared pairwise
    return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "n_tokens": n_tokens, "n_docs": len(chosen),
            "n_windows": len(windows), "window_nll": window_nll}


# ----------------------------------------------------------------------------------------------------------
# Retrieval probe


def needle_vocab() -> list[int]:
    """Token ids of " " + each of NEEDLE_WORDS (each a single GPT-2 token), deduplicated, in order."""
    from data.tokenizer import get_tokenizer

    enc = get_tokenizer()
    ids = [enc.encode_ordinary(" " + w) for w in NEEDLE_WORDS]
    return list(dict.fromkeys(i[0] for i in ids if len(i) == 1))


def probe_sequence(filler: np.ndarray, needle: np.ndarray, depth: float, prefix: int) -> tuple[np.ndarray, int]:
    """filler[:k] + needle + filler[k:] + needle, k = round(depth * len(filler)). The model reads it all and is
    scored on the last len(needle) - prefix tokens (the needle after its repeated first `prefix` tokens).
    Returns (sequence, number of scored tokens)."""
    k = int(round(depth * len(filler)))
    return np.concatenate([filler[:k], needle, filler[k:], needle]), len(needle) - prefix


@torch.no_grad()
def retrieval(model, tokens, docs, context: int, depths, trials: int = 8, needle_len: int = 16, prefix: int = 4,
              device="cpu", rope_length: int | None = None, seed: int = 0, vocab: list[int] | None = None,
              batch_size: int = 8) -> dict:
    """Accuracy of recalling a planted needle at each depth, in sequences of exactly `context` tokens.
    Trial t uses the same needle and filler for every model and depth (seeded by seed and t).
    Returns {"acc": {depth: mean accuracy}, "mean": over depths, "trials", "scored_per_trial"}."""
    vocab = np.asarray(vocab if vocab is not None else needle_vocab())
    n_fill = context - 2 * needle_len
    if n_fill < 1 or not 0 < prefix < needle_len:
        raise ValueError(f"context {context} too short for two needles of {needle_len} (or bad prefix {prefix})")
    eligible = np.flatnonzero(docs[:, 1] >= n_fill)
    if len(eligible) == 0:
        raise ValueError(f"no held-out document has the {n_fill} filler tokens context {context} needs")
    fillers, needles = [], []
    for t in range(trials):
        rng = np.random.default_rng([seed, t])
        i = eligible[rng.integers(len(eligible))]
        start, length = int(docs[i, 0]), int(docs[i, 1])
        off = start + int(rng.integers(length - n_fill + 1))
        fillers.append(np.asarray(tokens[off : off + n_fill], dtype=np.int64))
        needles.append(rng.choice(vocab, size=needle_len, replace=False))
    acc = {}
    for depth in depths:
        seqs, n_scored = zip(*(probe_sequence(f, n, depth, prefix) for f, n in zip(fillers, needles)))
        n_scored = n_scored[0]
        correct = 0
        for b in range(0, trials, batch_size):
            x = torch.from_numpy(np.stack(seqs[b : b + batch_size])).to(device)  # (B, context)
            # position p predicts token p+1: the last n_scored targets are predicted from positions -n_scored-1 .. -2
            logits = last_logits(model, x, n_scored + 1, rope_length)[:, :-1]  # (B, n_scored, V)
            correct += (logits.argmax(-1) == x[:, -n_scored:]).sum().item()
        acc[float(depth)] = correct / (trials * n_scored)
    return {"acc": acc, "mean": float(np.mean(list(acc.values()))), "trials": trials,
            "scored_per_trial": len(needles[0]) - prefix, "chance": 1.0 / len(vocab)}


# ----------------------------------------------------------------------------------------------------------
# Both, over a ladder of contexts


def evaluate(model, tokens, docs, contexts, stride: int, max_docs: int = 8, max_windows: int = 4,
             depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 8, retrieval_contexts=None, device="cpu",
             seed: int = 0, log=print) -> dict:
    """Perplexity at every context of the ladder (same documents and scored tokens at each) and the retrieval
    grid over retrieval_contexts (default the same ladder) x depths. JSON-able."""
    contexts = sorted(int(c) for c in contexts)
    retrieval_contexts = sorted(int(c) for c in (retrieval_contexts or contexts))
    model.eval()
    vocab = needle_vocab()
    out = {"contexts": contexts, "stride": stride, "ppl": {}, "retrieval": {}, "depths": [float(d) for d in depths]}
    t0 = time.time()
    for T in contexts:
        r = perplexity(model, tokens, docs, T, min(stride, T), max_docs, device, max_context=contexts[-1],
                       max_windows=max_windows, seed=seed)
        out["ppl"][str(T)] = r
        log(f"  ppl @ {T:6d}: {r['ppl']:10.3f}  ({r['n_tokens']} tokens)")
    for T in retrieval_contexts:
        r = retrieval(model, tokens, docs, T, depths, trials, device=device, seed=seed, vocab=vocab)
        out["retrieval"][str(T)] = r
        log(f"  retrieval @ {T:6d}: " + " ".join(f"{d:.2f}:{a:.2f}" for d, a in r["acc"].items()))
    out["seconds"] = time.time() - t0
    return out


# ----------------------------------------------------------------------------------------------------------
# CLI


def parse_rope_overrides(args: list[str]) -> dict:
    """--rope.key=value flags -> {key: value typed like RopeConfig's field}; anything else is an error."""
    types = flags.field_types(RopeConfig)
    out = {}
    for arg in args:
        if not arg.startswith("--rope.") or "=" not in arg:
            raise SystemExit(f"error: unrecognized argument {arg!r} (rope overrides look like --rope.factor=8)")
        key, value = arg[len("--rope."):].split("=", 1)
        if key not in types:
            raise SystemExit(f"error: unknown rope field {key!r}; known: {', '.join(types)}")
        try:
            out[key] = flags.parse_value(f"rope.{key}", value, types[key])
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python eval.py", description=__doc__.split("\n\n")[0],
                                     epilog="Extra flags --rope.<field>=<value> override the checkpoint's RoPE "
                                            "config, e.g. --rope.type=yarn --rope.factor=8.")
    parser.add_argument("--ckpt", required=True, help="checkpoint file or run folder holding ckpt.pt")
    parser.add_argument("--data_dir", default="data/stdlib")
    parser.add_argument("--contexts", required=True, help="comma-separated context lengths, e.g. 512,1024,2048")
    parser.add_argument("--retrieval_contexts", default=None, help="default: --contexts")
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--max_docs", type=int, default=8)
    parser.add_argument("--max_windows", type=int, default=4)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_rope_overrides(rest)

    from checkpoint import load_model
    from data.loader import load_split

    model, _ = load_model(args.ckpt, args.device)
    if overrides:
        model.set_rope(rope_with_overrides(model.config, overrides))
    tokens, docs, _ = load_split(args.data_dir, "val")
    contexts = [int(c) for c in args.contexts.split(",")]
    rc = [int(c) for c in args.retrieval_contexts.split(",")] if args.retrieval_contexts else None
    print(f"evaluating {args.ckpt} with rope {rope_lib.describe(model.config.rope)}")
    result = evaluate(model, tokens, docs, contexts, args.stride, args.max_docs, args.max_windows,
                      trials=args.trials, retrieval_contexts=rc, device=args.device)
    result["rope"] = rope_lib.describe(model.config.rope)
    result["ckpt"] = str(args.ckpt)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
