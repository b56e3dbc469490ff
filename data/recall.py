"""Recall-shaped training data, so that a small model learns to copy within CPU minutes (the main
job's cpu preset). A mix rewrites the windows train.py draws, seeded by (seed, step, micro-batch)
like them, so a resume sees the same data. `induction` tiles a random string over each window, the
task on which a copy (induction) circuit forms in a few hundred steps; `recall` mixes natural
windows, natural ones with random strings planted twice, and tiled strings. The strings are bytes
(lowercase, as the probe's needles, or printable ASCII): the byte tokenizer only.
"""

import numpy as np

MIXES = ("natural", "induction", "recall")
LOWERCASE = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8).astype(np.int64)
PRINTABLE = np.arange(33, 127, dtype=np.int64)  # printable ASCII, space excluded


def random_string(rng: np.random.Generator, n: int, alphabet: np.ndarray) -> np.ndarray:
    """n symbols of the alphabet, distinct where the alphabet is large enough."""
    return rng.choice(alphabet, size=n, replace=n > len(alphabet))


def tiled(
    rng: np.random.Generator, length: int, shortest: int, longest: int, alphabet: np.ndarray
) -> np.ndarray:
    """One random string of shortest..longest symbols, repeated to fill `length`."""
    s = random_string(rng, int(rng.integers(shortest, longest + 1)), alphabet)
    return np.tile(s, length // len(s) + 1)[:length]


def plant_pairs(window: np.ndarray, rng: np.random.Generator, pairs: int) -> None:
    """Write `pairs` random strings of 8-32 symbols into the window, each twice: at p and again d >=
    its length later, d uniform up to what the window allows."""
    length = len(window)
    for _ in range(pairs):
        n = min(int(rng.integers(8, 33)), length // 2)
        d = int(rng.integers(n, max(n, length - n) + 1))
        p = int(rng.integers(0, length - n - d + 1))
        window[p : p + n] = window[p + d : p + d + n] = random_string(
            rng, n, (LOWERCASE, PRINTABLE)[rng.integers(2)]
        )


def mix(windows: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """The windows (B, T + 1), int64, rewritten in place as mix `kind` says."""
    if kind not in MIXES:
        raise ValueError(f"data mix {kind!r} is unknown; known: {', '.join(MIXES)}")
    rng = np.random.default_rng(seed)
    for w in windows if kind != "natural" else ():
        u = rng.random()
        if kind == "induction":
            w[:] = tiled(rng, len(w), 8, 24, PRINTABLE)
        elif u < 0.15:  # recall: 15% tiled, 25% with 2-6 planted pairs, 60% natural
            w[:] = tiled(rng, len(w), 8, 48, (LOWERCASE, PRINTABLE)[rng.integers(2)])
        elif u < 0.40:
            plant_pairs(w, rng, int(rng.integers(2, 7)))
    return windows
