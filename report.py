"""The main job's report from the stage outputs reproduce.py leaves in its runs folder: the paper's claims decided
from the numbers, tables, figures (figures.py) and report.md.

A claim "A beats B" pairs A and B by document (perplexity) or trial (retrieval), seed by seed; it is "yes" when
the t-interval of the mean difference lies on A's side of 0 in every seed, "no" when on B's side in every seed,
"within noise" otherwise, and "not run" when a stage it needs did not finish (a run cut part-way still reports what
it has). The paper's claims (PRIMARY) are decided with Bonferroni-adjusted intervals, so that the chance of any
false "yes" or "no" among them stays under 5%; every other claim is exploratory, at 95% each.

    python report.py --runs runs/cpu                  # rewrite results/cpu/ from whatever stages finished
    python report.py --runs runs/cpu --out somewhere/ --replicate results/cpu_seed1/results.json
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import figures
import flags
import rope
from figures import LABELS
from rope import RopeConfig
from system import atomic_write, check_writable, read_json, write_json

NOT_RUN = "not run"
CONTROL_FAILED = "not decided (control failed)"
LEVEL = 0.95  # each exploratory interval
PRIMARY = 8  # interval comparisons among the paper's claims: 1 (x2), 2 (x2), 3 (x2), 4, 4b
PRIMARY_LEVEL = 1 - 0.05 / PRIMARY  # Bonferroni: 99.375% each
SMOOTH = 5  # steps in the trailing mean of a fine-tuning loss curve
SPEEDUP = 2.5  # the project page: YaRN needs "2.5x less training steps"
A_PAPER, A_MARGIN = 0.1, 0.05  # sqrt(1/t) = a ln s + 1: the paper's a, and how far from it still counts as equal
EQUAL_NATS = 0.01  # "as good as": not worse by more than this per token
BOOTSTRAP = 2000

# What this report reads of each file in a runs folder (system.shape_problem): a file of another
# shape is an error that names it, not a traceback
NUMBER = (int, float)
PRESET_INTS = ("L", "s", "s_long", "d_model", "n_layer", "n_head", "vocab_size", "prev_tokens",
               "pretrain_steps", "pretrain_batch", "finetune_steps", "finetune_batch",
               "warmup_steps", "warmup_batch", "warmup_block", "score", "max_docs", "trials",
               "needle_len")
JOB = {"preset": str, "command": str, "device": str, "torch": str, "commit": str,
       "contexts": [int], "retrieval_contexts": [int], "methods": [str],
       "no_finetune_methods": [str], "long_methods": [str],
       "config": {**dict.fromkeys(PRESET_INTS, int), "lr": NUMBER, "finetune_lr": NUMBER,
                  "finetune_seeds": [int], "temp_scales": [int], "contexts": [int],
                  "tokenizer": str, "data_source": str, "data_mix": str}}
EVAL = {"ppl": {str: {"nll": NUMBER, "ppl": NUMBER, "doc_nll": [NUMBER]}},
        "retrieval": {str: {"acc": {str: NUMBER}, "trial_acc": {str: [NUMBER]},
                            "distance": {str: NUMBER}, "chance": [NUMBER]}}}
TEMPERATURE = {str: {"context": int, "a": {str: {"ppl": NUMBER, "doc_nll": [NUMBER]}}}}
LEAKAGE = {"dropped_from_val": dict, "piece_tokens": int, "scored_pieces_seen_in_train": NUMBER}
SUMMARY = {"steps": int, "tokens_per_s": (*NUMBER, type(None)), "elapsed_s": NUMBER}
EVENT = {"event": str, "step": int}  # a line of metrics.jsonl
RESULTS = {"claims": [{"claim": str, "held": str}]}  # results.json, for --replicate
REDO = "a stage of reproduce.py wrote it: delete it and run reproduce.py again to redo that stage"


# Statistics
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (p > 0.5): bisection on its CDF, integrated from
    the density by Simpson's rule, accurate to ~1e-6 (2.776 for df 4, 2.131 for df 15, 1.960 as df grows)."""
    def cdf(x):
        t = np.linspace(0.0, x, 2001)
        pdf = np.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - (df + 1) / 2 * np.log1p(t * t / df))
        pdf /= math.sqrt(df * math.pi)
        return 0.5 + (x / 6000) * (pdf[0] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum() + pdf[-1])
    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def interval(d: np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of d at that level; infinite for fewer than 2 values."""
    mean = float(np.mean(d))
    if len(d) < 2:
        return mean, -math.inf, math.inf
    half = t_quantile(0.5 + level / 2, len(d) - 1) * float(np.std(d, ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def side(rows, better_below: bool = True) -> str:
    """The verdict rule over per-seed intervals (mean, low, high)."""
    below, above = all(hi < 0 for _, _, hi in rows), all(lo > 0 for _, lo, _ in rows)
    better, worse = (below, above) if better_below else (above, below)
    return "yes" if better else "no" if worse else "within noise"


def has(run: dict | None, T: int, key: str) -> bool:
    return run is not None and str(T) in run.get("ppl" if key == "ppl" else "retrieval", {})


def units(run: dict, T: int, key: str, min_distance: int = 0) -> np.ndarray:
    """Per-unit scores of a run at context T: each document's mean NLL ("ppl"), or each retrieval trial's accuracy
    ("retrieval": teacher-forced; "exact": 1 if every token was right), averaged over the depths whose needle lies
    more than min_distance tokens before its cue."""
    if key == "ppl":
        return np.array(run["ppl"][str(T)]["doc_nll"])
    r = run["retrieval"][str(T)]
    acc = [np.array(r["trial_acc"][d]) for d in r["trial_acc"] if r["distance"][d] > min_distance]
    return np.mean([a == 1.0 if key == "exact" else a for a in acc], axis=0)


def compare(a: list, b: list, T: int, key: str = "ppl", level: float = LEVEL, min_distance: int = 0) -> dict:
    """Does A do better than B at T (lower NLL, higher recall)? a, b: one run per seed, None for a seed that did
    not run (a single run stands for every seed of the other side). The verdict rule of the module docstring, and
    the numbers behind it: the intervals of A - B per seed that both sides ran."""
    pairs = list(zip(a, b)) if len(a) == len(b) else [(x, y) for x in a for y in b]
    pairs = [(x, y) for x, y in pairs if has(x, T, key) and has(y, T, key)]
    seeds = max(len(a), len(b))
    if not pairs:
        return {"verdict": NOT_RUN, "mean": math.nan, "intervals": [], "n": 0, "seeds": 0, "of": seeds}
    diffs = [units(x, T, key, min_distance) - units(y, T, key, min_distance) for x, y in pairs]
    rows = [interval(d, level) for d in diffs]
    return {"verdict": side(rows, key == "ppl"), "mean": float(np.mean([m for m, _, _ in rows])), "intervals": rows,
            "n": len(diffs[0]), "seeds": len(rows), "of": seeds, "level": level}


def evidence(c: dict, key: str = "ppl") -> str:
    if c["verdict"] == NOT_RUN:
        return "its stages did not finish"
    what = {"ppl": "\u0394NLL (nats, A - B)", "retrieval": "\u0394recall (A - B)", "exact": "\u0394exact match (A - B)"}
    spans = ", ".join(f"[{lo:+.4f}, {hi:+.4f}]" for _, lo, hi in c["intervals"])
    unit = "documents" if key == "ppl" else "trials"
    seeds = "" if c["of"] <= 1 else ", per seed" if c["seeds"] == c["of"] else f", {c['seeds']} of {c['of']} seeds"
    return f"{what[key]} {c['mean']:+.4f}; {100 * c['level']:.4g}% CI {spans} ({c['n']} {unit}{seeds})"


def present(runs: list) -> list[dict]:
    """The runs that finished (None marks a seed whose stage did not)."""
    return [r for r in runs if r is not None]


def ppl(runs: list, T: int) -> float:
    """Perplexity at T, the geometric mean over the seeds that ran (exp of the mean NLL)."""
    return math.exp(np.mean([r["ppl"][str(T)]["nll"] for r in present(runs)]))


def recall(runs: list, T: int, key: str = "retrieval", min_distance: int = 0) -> float:
    """Needle recall at T (teacher-forced, or exact match), the mean over trials, depths and seeds that ran."""
    return float(np.mean([units(r, T, key, min_distance).mean() for r in present(runs)]))


def method_runs(res: dict) -> tuple[dict[str, list], dict[str, list]]:
    """(without fine-tuning, fine-tuned), each {method: one run per seed, None where it did not run}; the
    fine-tuned ones include the methods at s_long and the baseline from scratch at L' where the preset has them."""
    c, nf = res["config"], {m: [r] for m, r in res["no_finetune"].items()}
    long = {f"{LABELS[m]} s={c['s_long']}": runs for m, runs in res["long"].items()}
    return nf, {**res["finetuned"], **long, **({"from scratch at L'": res["scratch_long"]} if c.get("scratch_long")
                                               else {})}


# Claims
def claims(res: dict) -> list[dict]:
    """The paper's claims, each decided from the numbers: {"claim", "held", "evidence", "primary"}."""
    c, out = res["config"], []
    L, Le, far = c["L"], c["L"] * c["s"], c["L"] * c["s_long"]
    nf, ft = method_runs(res)
    long = res["long"]

    def add(claim, verdict, text, primary=False):
        out.append({"claim": claim, "held": verdict, "evidence": text, "primary": primary})
        return verdict

    def vs(claim, a, b, T, primary=False):
        result = compare(a, b, T, level=PRIMARY_LEVEL if primary else LEVEL)
        return add(claim, result["verdict"], evidence(result), primary)

    verdicts = [vs(f"1. No fine-tuning, at L'={Le}: YaRN beats {LABELS[m]}", nf["yarn"], nf[m], Le, m in ("linear",
                   "ntk")) for m in ("linear", "ntk", "ntk_by_parts", "default")]
    least = NOT_RUN if NOT_RUN in verdicts else "yes" if all(v == "yes" for v in verdicts) else \
        "no" if "no" in verdicts else "within noise"
    add(f"1. No fine-tuning, at L'={Le}: YaRN degrades least of the static methods", least,
        "its stages did not finish" if least == NOT_RUN else
        ", ".join(f"{LABELS[m]} {ppl(nf[m], Le):.3f}" for m in ("yarn", "linear", "ntk", "ntk_by_parts", "default")))
    vs(f"1b. No fine-tuning, beyond L' (at {2 * Le}): YaRN beats plain RoPE", nf["yarn"], nf["default"], 2 * Le)
    # at l' = L' a dynamic variant is its static one at s (tested); past it they part
    vs(f"1c. No fine-tuning, at {2 * Le}: Dynamic YaRN beats Dynamic NTK", nf["dynamic_yarn"], nf["dynamic"], 2 * Le)
    vs(f"1d. No fine-tuning, at {2 * Le}: Dynamic YaRN beats YaRN with s fixed", nf["dynamic_yarn"], nf["yarn"], 2 * Le)
    for m in ("linear", "ntk"):
        vs(f"2. Fine-tuned with equal budgets, at L'={Le}: YaRN beats {LABELS[m]}", ft["yarn"], ft[m], Le, True)
    vs(f"2b. Fine-tuned, beyond L' (at {2 * Le}): YaRN beats PI", ft["yarn"], ft["linear"], 2 * Le)
    vs(f"2c. Baseline: fine-tuned YaRN beats plain RoPE fine-tuned at L'={Le}", ft["yarn"], ft["default"], Le)
    if c.get("scratch_long"):
        vs(f"2d. Baseline: fine-tuned YaRN beats a model trained at L'={Le} from scratch on the same tokens",
           ft["yarn"], res["scratch_long"], Le)
    vs(f"2e. Short-context check, at L={L}: the pretrained model beats fine-tuned YaRN (extending costs there)",
       nf["default"], ft["yarn"], L)
    for steps, runs in (res.get("budgets") or {}).items():
        for m in ("linear", "ntk"):
            vs(f"2f. Fine-tuned for {steps} steps instead of {c['finetune_steps']}, at L'={Le}: YaRN beats "
               f"{LABELS[m]}", runs["yarn"], runs[m], Le)
    for m in ("linear", "ntk"):
        vs(f"3. Train short, test long: at {far}, YaRN s={c['s_long']} fine-tuned at {Le} beats {LABELS[m]} "
           f"s={c['s_long']} fine-tuned alike", long["yarn"], long.get(m, [None]), far, True)
    out += temperature_claims(res["temperature"] or {}, c)
    out += retrieval_claims(res, L, Le)
    out += efficiency_claims(res.get("curves") or {}, c)
    return out


def temperature_grid(temp: dict, s: str) -> tuple[list[float], np.ndarray]:
    """(the a values of the sweep at s, sorted; each one's NLL per document, (a, document))."""
    keys = sorted(temp[s]["a"], key=float)
    return [float(a) for a in keys], np.array([temp[s]["a"][a]["doc_nll"] for a in keys])


def fitted_a(temp: dict, pick: dict | None = None) -> float:
    """The a of sqrt(1/t) = a ln s + 1 that minimises the NLL summed over the swept s (each s's mean over its
    documents, or over the documents pick[s] lists): the vertex of the parabola through the grid's best a and its
    neighbours, or the grid's end when the best lies there."""
    total = 0.0
    for s in temp:
        a_values, nll = temperature_grid(temp, s)
        total = total + (nll[:, pick[s]] if pick else nll).mean(axis=1)
    i = int(np.argmin(total))
    if i in (0, len(a_values) - 1):
        return a_values[i]
    (x0, x1, x2), (y0, y1, y2) = a_values[i - 1 : i + 2], total[i - 1 : i + 2]
    d1, d2 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    curvature = (d2 - d1) / (x2 - x0)  # p(x) = y0 + d1 (x - x0) + curvature (x - x0)(x - x1); p' = 0 at the vertex
    return float((x0 + x1) / 2 - d1 / (2 * curvature)) if curvature > 0 else x1


def cross_fitted(temp: dict, s: str) -> np.ndarray:
    """Each document's NLL at the a that is best on the other half of the documents (even and odd positions):
    a choice the tested documents had no part in."""
    _, nll = temperature_grid(temp, s)
    halves = (np.arange(0, nll.shape[1], 2), np.arange(1, nll.shape[1], 2))
    out = np.empty(nll.shape[1])
    for mine, other in (halves, halves[::-1]):
        out[mine] = nll[int(np.argmin(nll[:, other].mean(axis=1))), mine]
    return out


def temperature_claims(temp: dict, c: dict) -> list[dict]:
    """Claim 4 (primary): at the extension's s the paper's sqrt(1/t) beats none; 4b (primary): a fitted over every
    s is within A_MARGIN of the paper's 0.1, by a bootstrap over documents; per s (exploratory), 4c: an a chosen on
    half the documents beats none on the other half, 4d: the paper's is as good as that one (within EQUAL_NATS)."""
    out, scales = [], [str(s) for s in c["temp_scales"]]

    def add(claim, verdict, text, primary=False):
        out.append({"claim": claim, "held": verdict, "evidence": text, "primary": primary})

    s = str(c["s"])
    name = f"4. Temperature, s={s}: the paper's \u221a(1/t) = {rope.yarn_mscale(c['s']):.3f} beats none (1.0)"
    if s in temp:
        one = {a: [{"ppl": {"0": temp[s]["a"][a]}}] for a in ("0.1", "0.0")}
        result = compare(one["0.1"], one["0.0"], 0, level=PRIMARY_LEVEL)
        add(name, result["verdict"], evidence(result), True)
    else:
        add(name, NOT_RUN, "its stage did not finish", True)
    name = (f"4b. Temperature: a fitted over s = {', '.join(scales)} in \u221a(1/t) = a ln s + 1 is within "
            f"{A_MARGIN} of the paper's {A_PAPER}")
    if temp and all(s in temp for s in scales):
        a = fitted_a(temp)
        rng = np.random.default_rng(0)
        sizes = {s: temperature_grid(temp, s)[1].shape[1] for s in temp}
        boot = [fitted_a(temp, {s: rng.integers(0, n, n) for s, n in sizes.items()}) for _ in range(BOOTSTRAP)]
        lo, hi = np.quantile(boot, [(1 - PRIMARY_LEVEL) / 2, (1 + PRIMARY_LEVEL) / 2])
        inside = A_PAPER - A_MARGIN <= lo and hi <= A_PAPER + A_MARGIN
        outside = hi < A_PAPER - A_MARGIN or lo > A_PAPER + A_MARGIN
        add(name, "yes" if inside else "no" if outside else "within noise",
            f"fitted a = {a:.3f}; {100 * PRIMARY_LEVEL:.4g}% bootstrap interval [{lo:.3f}, {hi:.3f}] ({BOOTSTRAP} "
            f"resamples of the documents; {', '.join(str(n) for n in sizes.values())} documents per s)", True)
    else:
        add(name, NOT_RUN, "its stage did not finish", True)
    for s in scales:
        none = f"4c. Temperature, s={s}: a \u221a(1/t) chosen on half the documents beats none on the other half"
        paper = (f"4d. Temperature, s={s}: the paper's \u221a(1/t) is within {EQUAL_NATS} nats of one chosen on the "
                 "other half of the documents")
        if s not in temp:
            add(none, NOT_RUN, "its stage did not finish")
            add(paper, NOT_RUN, "its stage did not finish")
            continue
        a_values, nll = temperature_grid(temp, s)
        chosen = cross_fitted(temp, s)
        m, lo, hi = interval(chosen - nll[a_values.index(0.0)])
        add(none, side([(m, lo, hi)]), f"\u0394NLL (chosen - none) {m:+.4f}; 95% CI [{lo:+.4f}, {hi:+.4f}] "
            f"({nll.shape[1]} documents)")
        m, lo, hi = interval(nll[a_values.index(A_PAPER)] - chosen)
        add(paper, "yes" if hi < EQUAL_NATS else "no" if lo > EQUAL_NATS else "within noise",
            f"\u0394NLL (paper's - chosen) {m:+.4f}; 95% CI [{lo:+.4f}, {hi:+.4f}] ({nll.shape[1]} documents)")
    return out


def lift(runs: list, T: int, min_distance: int, no_needle: bool = False) -> list[tuple]:
    """Per seed, the interval of (recall - chance) over trials: with the needle (depths more than min_distance
    back), or the control without it."""
    rows = []
    for r in (r for r in runs if has(r, T, "retrieval")):
        got = np.array(r["retrieval"][str(T)]["no_needle"]) if no_needle else units(r, T, "retrieval", min_distance)
        rows.append(interval(got - np.array(r["retrieval"][str(T)]["chance"])))
    return rows


def retrieval_claims(res: dict, L: int, Le: int) -> list[dict]:
    """5: the control (the pretrained model at L) recalls beyond chance; 5a: without the needle it does not; past
    L' only needles more than L tokens back count: 5b fine-tuned YaRN recalls beyond chance, 5c better than PI,
    5d writes whole needles out more often than PI. 5b-5d are not decided when the control fails."""
    control, yarn, pi = [res["no_finetune"]["default"]], res["finetuned"]["yarn"], res["finetuned"]["linear"]
    out = []
    for claim, runs, T, far, without in (
            ("5. Control: the pretrained model (plain RoPE) at its own context L recalls the needle beyond chance",
             control, L, 0, False),
            ("5a. Control: without the needle, the same model recalls it less often than chance", control, L, 0, True),
            (f"5b. Fine-tuned YaRN at L'={Le} recalls needles more than L={L} tokens back beyond chance", yarn, Le, L,
             False)):
        rows = lift(runs, T, far, without)
        verdict = NOT_RUN if not rows else side(rows, better_below=without)
        spans = ", ".join(f"[{lo:+.3f}, {hi:+.3f}]" for _, lo, hi in rows)
        out.append({"claim": claim, "held": verdict, "primary": False, "evidence": "its stages did not finish" if
                    not rows else f"recall - chance {np.mean([m for m, _, _ in rows]):+.3f}; 95% CI {spans}"})
    for key, what in (("retrieval", "recalls needles"), ("exact", "writes whole needles out (exact match)")):
        result = compare(yarn, pi, Le, key, min_distance=L)
        out.append({"claim": f"5{'c' if key == 'retrieval' else 'd'}. Fine-tuned, at L'={Le}, more than L={L} tokens "
                             f"back: YaRN {what} better than PI", "held": result["verdict"],
                    "evidence": evidence(result, key), "primary": False})
    if out[0]["held"] not in ("yes", NOT_RUN):  # a model that cannot copy at L: the probe measures nothing past it
        for c in (c for c in out[2:] if c["held"] != NOT_RUN):
            c.update(held=CONTROL_FAILED, evidence="the control (claim 5) does not recall beyond chance, so the probe "
                     f"cannot tell the methods apart; the numbers, for the record: {c['evidence']}")
    return out


def smooth(losses: list[float]) -> np.ndarray:
    """The trailing mean over SMOOTH steps (fewer at the start)."""
    x = np.asarray(losses, dtype=float)
    return np.array([x[max(0, k - SMOOTH + 1) : k + 1].mean() for k in range(len(x))])


def steps_to(losses: list[float], target: float) -> int | None:
    """The first step whose smoothed loss is at or below target (None: never)."""
    hit = np.flatnonzero(smooth(losses) <= target)
    return int(hit[0]) if hit.size else None


def efficiency_claims(curves: dict, c: dict) -> list[dict]:
    """6 (primary, the project page's headline): YaRN reaches PI's final fine-tuning loss (smoothed) in at most
    1/SPEEDUP of the steps PI needs, in every seed (the same batches, so the same tokens per step); 6b: at every
    step YaRN's loss is below PI's."""
    pairs = [(y, p) for y, p in zip(curves.get("yarn", []), curves.get("linear", [])) if y and p]
    name = f"6. Efficiency: fine-tuned YaRN reaches PI's final training loss in at most 1/{SPEEDUP} of PI's steps"
    every = "6b. At every fine-tuning step, YaRN's training loss is below PI's (the same batches)"
    if not pairs:
        return [{"claim": claim, "held": NOT_RUN, "evidence": "its stages did not finish", "primary": claim == name}
                for claim in (name, every)]
    rows = [(steps_to(y["train"], smooth(p["train"])[-1]), steps_to(p["train"], smooth(p["train"])[-1]),
             y["train"][0] <= smooth(p["train"])[-1]) for y, p in pairs]
    fast = [ky is not None and ky <= kp / SPEEDUP for ky, kp, _ in rows]
    text = "; ".join(f"YaRN {'never' if ky is None else ky} / PI {kp} steps" for ky, kp, _ in rows)
    text += f" (per seed; trailing mean of {SMOOTH} steps)"
    if any(start for *_, start in rows):
        text += (f"; YaRN's first batch, before any update, is already at or below PI's final level in "
                 f"{sum(start for *_, start in rows)} of {len(rows)} seeds")
    below = [int(np.sum(np.array(y["train"]) < np.array(p["train"]))) for y, p in pairs]
    steps = len(pairs[0][0]["train"])
    return [{"claim": name, "held": "yes" if all(fast) else "no" if not any(fast) else "within noise",
             "evidence": text, "primary": True},
            {"claim": every, "held": "yes" if min(below) == steps else "no" if max(below) == 0 else "within noise",
             "evidence": f"YaRN below PI at {', '.join(str(b) for b in below)} of {steps} steps (per seed)",
             "primary": False}]


def agree(a: list[dict], b: list[dict]) -> list[str]:
    """The claims on which two reports contradict each other: "yes" in one, "no" in the other."""
    theirs = {c["claim"]: c["held"] for c in b}
    return [c["claim"] for c in a if {c["held"], theirs.get(c["claim"])} == {"yes", "no"}]


def replication(a: list[dict], b: list[dict]) -> dict[str, list[str]]:
    """Each claim both reports decide, by how the two verdicts relate: the same, weakened ("yes" or "no" in one,
    "within noise" in the other), contradicted ("yes" against "no"), or undecided in both."""
    theirs, out = {c["claim"]: c["held"] for c in b}, {"same": [], "weakened": [], "contradicted": [], "undecided": []}
    decided = {"yes", "no"}
    for c in (c for c in a if c["claim"] in theirs):
        pair = {c["held"], theirs[c["claim"]]}
        kind = "same" if len(pair) == 1 and pair <= decided else "contradicted" if pair == decided else \
            "weakened" if pair & decided and "within noise" in pair else "undecided"
        out[kind].append(c["claim"])
    return out


# Tables
def table(runs: dict[str, list], contexts, score=ppl, digits: int = 3) -> str:
    """One row per method, one column per context: score(the method's runs, T), perplexity by default; "-" where
    the method was not evaluated at T."""
    lines = ["| method | " + " | ".join(str(T) for T in contexts) + " |", "|---|" + "---|" * len(contexts)]
    for name, rs in runs.items():
        key = "ppl" if score is ppl else "retrieval"
        cells = [NOT_RUN if not present(rs) else f"{score(rs, T):.{digits}f}" if has(present(rs)[0], T, key) else "-"
                 for T in contexts]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recall_table(runs: dict[str, list], T: int, L: int) -> str:
    """Recall at T per method: teacher-forced over every depth, then over needles more than L back, and exact."""
    lines = [f"| method | teacher-forced, all depths | more than {L} back | exact match, more than {L} back |",
             "|---|---|---|---|"]
    for name, rs in runs.items():
        if present(rs) and has(present(rs)[0], T, "retrieval"):
            cells = [recall(rs, T), recall(rs, T, min_distance=L), recall(rs, T, "exact", L)]
            lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def curve_table(curves: dict) -> str:
    """Per method: the first batch's loss, the smoothed final loss, and the steps to PI's final level, per seed."""
    lines = ["| method | first step | last step (smoothed) | steps to PI's final level, per seed |",
             "|---|---|---|---|"]
    pi = curves.get("linear", [])
    for m, per_seed in curves.items():
        ran = [(x, p) for x, p in zip(per_seed, pi) if x and p]
        if ran:
            hits = [steps_to(x["train"], smooth(p["train"])[-1]) for x, p in ran]
            lines.append(f"| {LABELS[m]} | {np.mean([x['train'][0] for x, _ in ran]):.3f} | "
                         f"{np.mean([smooth(x['train'])[-1] for x, _ in ran]):.3f} | "
                         f"{', '.join('never' if k is None else str(k) for k in hits)} |")
    return "\n".join(lines) + "\n"


def temperature_table(temp: dict) -> str:
    lines = ["| s | context | ppl, none (a = 0) | ppl, the paper's (a = 0.1) | best a on all documents | ppl at "
             "the a chosen on the other half |", "|---|---|---|---|---|---|"]
    for s, r in temp.items():
        a_values, nll = temperature_grid(temp, s)
        best = a_values[int(np.argmin(nll.mean(axis=1)))]
        lines.append(f"| {s} | {r['context']} | {r['a']['0.0']['ppl']:.3f} | {r['a']['0.1']['ppl']:.3f} | {best} | "
                     f"{math.exp(cross_fitted(temp, s).mean()):.3f} |")
    return "\n".join(lines) + "\n"


# report.md
def setup_lines(res: dict) -> list[str]:
    c = res["config"]
    head_dim, L, s = c["d_model"] // c["n_head"], c["L"], c["s"]
    yarn = RopeConfig(type="yarn", factor=float(s), original_context=L)
    low, high = rope.ramp_bounds(head_dim, yarn)
    fast = sum(1 for d in range(head_dim // 2) if d < rope.correction_dim(yarn.beta_fast, head_dim, yarn.base, L))
    kept = int((rope.ramp(head_dim, yarn) == 0).sum())
    pre, fine = c["pretrain_steps"] * c["pretrain_batch"] * L, c["finetune_steps"] * c["finetune_batch"] * L * s
    leak = res.get("leakage")
    return [
        f"- Data: {c['data_source']}, {c['tokenizer']} tokens (vocabulary {c['vocab_size']}), split by a hash of each "
        "file's path; val documents that share more than a fifth of their 64-token pieces with train (near-copies: "
        "generated tables, copied modules) are dropped"
        + (f" ({len(leak['dropped_from_val'])} were). Of the scored tokens, "
           f"{100 * leak['scored_pieces_seen_in_train']:.1f}% end a {leak['piece_tokens']}-token piece that occurs "
           "verbatim in train." if leak else "."),
        f"- Model: d_model {c['d_model']}, {c['n_layer']} layers, {c['n_head']} heads of {head_dim}, plain RoPE "
        f"(base 10000) pretrained at L = {L} for {c['pretrain_steps']} steps x {c['pretrain_batch']} sequences "
        f"({pre:,} tokens), lr {c['lr']}.",
        f"- Extension: s = {s}, L' = {L * s}. Every method fine-tuned {c['finetune_steps']} steps x "
        f"{c['finetune_batch']} sequences of L' ({fine:,} tokens, {100 * fine / pre:.1f}% of pretraining) at lr "
        f"{c['finetune_lr']}, on the same batches, with {len(c['finetune_seeds'])} seeds (data order) "
        f"{list(c['finetune_seeds'])}; its training loss kept at every step.",
        f"- Why this size: with head_dim {head_dim}, base 10000 and L = {L}, pairs 0..{fast - 1} make more than "
        f"beta_fast = 32 rotations inside L ({fast} pair(s)), and NTK-by-parts / YaRN keep {kept} pair(s) exactly "
        f"(ramp from pair {low} to pair {high} of {head_dim // 2}): the high-frequency band the paper's argument "
        "is about. " + ("" if fast else "None does here, so that argument cannot show at this size."),
        f"- Train short, test long: YaRN, PI and NTK-aware at s = {c['s_long']}, each fine-tuned at L' = {L * s} with "
        f"the same budget, evaluated at {L * c['s_long']}."
        + (" Baseline: a model pretrained at L' from scratch on as many tokens." if c.get("scratch_long") else ""),
        *([f"- Copying (which the retrieval probe needs) forms within the budget thanks to "
           + (f"previous-token embeddings (prev_tokens {c['prev_tokens']}), " if c["prev_tokens"] else "")
           + f"a warm-up of {c['warmup_steps']} steps x {c['warmup_batch']} windows of {c['warmup_block']} on the "
           f"induction task at a constant lr, and the '{c['data_mix']}' mix during pretraining (data/recall.py); "
           "fine-tuning and evaluation use natural text only."] if c["warmup_steps"] else []),
        f"- Perplexity (per token: per byte for the byte tokenizer): {c['max_docs']} held-out documents, each scoring "
        f"{c['score']} consecutive tokens from its body (placed at random after the longest context's history), the "
        "same tokens at every context; at context T a window scores its last min(T/2, "
        f"{c['score']}) tokens, so each scored token sees between T/2 + 1 and T tokens.",
        f"- Retrieval: a needle of {c['needle_len']} random {'letters' if c['tokenizer'] == 'bytes' else 'words'} at "
        f"depth d of the text, its first {c['needle_len'] // 4} tokens repeated at the end; top-1 recall of the rest, "
        f"teacher-forced, and exact match (every token right: what greedy decoding from the cue would write); "
        f"{c['trials']} trials per cell; chance = a guesser that knows the needle's tokens but not their order. The "
        "same trials with no needle planted are a control. Past L only needles more than L tokens back count.",
    ]


def limitations(res: dict) -> list[str]:
    """What this toy departs from, and what each departure could do to the comparison."""
    c = res["config"]
    params = f"{c['d_model']}-wide, {c['n_layer']}-layer"
    lines = [
        f"- Scale: a {params} model on {c['tokenizer']} of Python source, against LLaMA 7B-70B on web text. Which "
        "method wins can change with scale; the paper's own gaps are a few tenths of perplexity at 7B.",
        "- Seeds vary the fine-tuning data order only; every seed shares one pretrained model, the same documents and "
        "the same needles. The intervals cover documents (or trials) and agreement across seeds covers the "
        "fine-tuning run; nothing here covers pretraining. `--seed 1` reruns everything, pretraining included.",
    ]
    if c["prev_tokens"]:
        lines.append(f"- Previous-token embeddings (the last {c['prev_tokens']} tokens added to each input) give every "
                     "position local context without RoPE. That plausibly shrinks what PI loses by squeezing the high "
                     "frequencies, so PI may look better here than in a plain LLaMA. The gpu preset has none.")
    if c["data_mix"] != "natural":
        lines.append("- Pretraining saw 40% synthetic windows (repeated random strings) and an induction warm-up, so "
                     "that copying forms in a small budget; fine-tuning and evaluation are natural text only.")
    if not c.get("scratch_long"):
        lines.append("- No model trained at L' from scratch (too costly on this preset).")
    missing = ["an ablation with neither previous-token embeddings nor the recall mix"] \
        if c["prev_tokens"] or c["data_mix"] != "natural" else []
    if not c.get("budgets"):
        missing.append("claim 2 at other fine-tuning budgets (the gpu preset runs them: claims 2f)")
    if missing:
        lines.append("- Not run here: " + "; ".join(missing) + ".")
    return lines


def claims_table(found: list[dict]) -> list[str]:
    return ["| claim | held | numbers |", "|---|---|---|"] + [f"| {x['claim']} | {x['held']} | {x['evidence']} |"
                                                            for x in found]


def markdown(res: dict, plot_files: list[str]) -> str:
    c, (nf, ft) = res["config"], method_runs(res)
    L, Le = c["L"], c["L"] * c["s"]
    missing = sum(x["held"] == NOT_RUN for x in res["claims"])
    lines = [f"# YaRN toy reproduction: preset `{res['preset']}`", "",
             f"Generated by `{res['command']}` on {res['device']}, torch {res['torch']}, commit {res['commit']}. "
             "Every number comes from `results.json`; every verdict is computed from those numbers by report.py.",
             *(["", f"**This run did not finish:** {missing} of {len(res['claims'])} claims are 'not run', because "
                "stages they need did not finish (see the wall times below)."] if missing else []),
             "", "## Set-up", "", *setup_lines(res), "",
             "## The paper's claims (primary)", "",
             f"Decided with {100 * PRIMARY_LEVEL:.4g}% intervals (Bonferroni over the {PRIMARY} interval comparisons), "
             "so that the chance of any false verdict among them is under 5%.", "",
             *claims_table([x for x in res["claims"] if x["primary"]]), "",
             "## Exploratory claims (95% intervals each, no correction)", "",
             *claims_table([x for x in res["claims"] if not x["primary"]]), "",
             "How to read them: 'yes' means the interval of the per-document difference (per trial for recall) lies "
             "on the claim's side of zero for every fine-tuning seed; 'no' that it lies on the other side for every "
             "seed; 'within noise' anything else; 'not run' that a stage it needs did not finish; 'not decided "
             "(control failed)' that the pretrained model does not recall the needle at its own context, so the "
             "probe cannot compare methods. What the intervals cover: see the limitations.", "",
             "## Limitations", "", *limitations(res), ""]
    if res.get("replication"):
        rep = res["replication"]
        lines += ["## Replication", "", f"Against `{rep['other']}` (every training seed shifted, pretraining "
                  "included): " + ", ".join(f"{len(v)} {k}" for k, v in rep["kinds"].items()) + ".", ""]
        lines += [f"- {k}: {name}" for k in ("contradicted", "weakened") for name in rep["kinds"][k]] + [""]
    lines += ["## Perplexity, no fine-tuning (the pretrained model, RoPE swapped)", "", table(nf, res["contexts"]),
              "## Perplexity, fine-tuned at L' (geometric mean over seeds)", "", table(ft, res["contexts"]),
              "## Needle recall, no fine-tuning (mean over depths)", "",
              table(nf, res["retrieval_contexts"], recall, 2),
              f"## Needle recall at L' = {Le}, fine-tuned (mean over seeds)", "", recall_table(ft, Le, L),
              "## Fine-tuning loss curves (the same batches for every method)", "",
              curve_table(res.get("curves") or {}),
              "## Temperature (NTK-by-parts with \u221a(1/t) = a ln s + 1, pretrained model, perplexity at sL)", "",
              temperature_table(res["temperature"]) if res["temperature"] else NOT_RUN, "",
              "## Wall time per stage (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in res["stage_seconds"].items()]
    lines += [f"| total | {sum(res['stage_seconds'].values()):.1f} |", "", "## Training runs", "",
              "| run | steps | tokens/s | MFU | seconds |", "|---|---|---|---|---|"]
    for name, t in res["train"].items():
        mfu = "n/a" if t.get("mfu") is None else f"{100 * t['mfu']:.1f}%"
        speed = "n/a" if t["tokens_per_s"] is None else f"{t['tokens_per_s']:,.0f}"  # none: no step
        lines.append(f"| {name} | {t['steps']} | {speed} | {mfu} | {t['elapsed_s']:.1f} |")
    lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in plot_files]
    lines += ["", "## Config", "", "```json", json.dumps(c, indent=2), "```", ""]
    return "\n".join(lines)


def plots(res: dict, out: Path) -> list[str]:
    """The figures of whatever finished, as PNG files in out; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, (nf, ft) = res["config"], (finished(runs) for runs in method_runs(res))
    made = {"scaling_per_dimension.png": figures.plot_scaling(plt, c)}
    if nf:
        made["ppl_no_finetune.png"] = figures.plot_ppl(plt, nf, c, "Perplexity vs context, no fine-tuning")
        made["retrieval_no_finetune.png"] = figures.plot_recall(plt, nf, "Needle recall, no fine-tuning")
    if ft:
        made["ppl_finetuned.png"] = figures.plot_ppl(plt, ft, c, "Perplexity vs context, fine-tuned at L' (bars: "
                                                     "range over seeds)")
        with_recall = {m: rs for m, rs in ft.items() if rs[0].get("retrieval")}
        made["retrieval_finetuned.png"] = figures.plot_recall(plt, with_recall, "Needle recall, fine-tuned (mean "
                                                              "over seeds)")
    curves = finished(res.get("curves") or {})
    if curves:
        made["loss_curves.png"] = figures.plot_curves(plt, curves, smooth, c)
    if res["temperature"]:
        a = fitted_a(res["temperature"]) if all(str(s) in res["temperature"] for s in c["temp_scales"]) else None
        made["temperature.png"] = figures.plot_temperature(plt, res["temperature"], interval, a)
    return figures.draw(made, out, plt)


def finished(runs: dict[str, list]) -> dict[str, list[dict]]:
    """{method: its runs that finished}, for the methods with any."""
    return {name: present(rs) for name, rs in runs.items() if present(rs)}


# Inputs and outputs
def curve(runs: Path, method: str, name: str, steps: int, Le: int) -> dict | None:
    """A fine-tune's training loss at every step (metrics.jsonl) and its held-out NLL at L' at step 0 (the
    pretrained model under the method), at its midpoint and at its end, where they were evaluated."""
    if not (runs / name / "summary.json").is_file():
        return None
    fix = f"train.py logged the run there: delete {runs / name}, run reproduce.py again to redo it"
    events = read_json(runs / name / "metrics.jsonl", fix, EVENT, lines=True)
    train = [e["train_loss"] for e in sorted(events, key=lambda e: e["step"]) if e["event"] == "train"]
    val = {}
    for step, evaluated in ((0, f"nft_{method}"), (steps // 2, f"{name}_half"), (steps, name)):
        path = runs / "eval" / f"{evaluated}.json"
        at = read_json(path, REDO, EVAL)["ppl"].get(str(Le)) if path.is_file() else None
        if at:
            val[str(step)] = at["nll"]
    return {"train": train, "val": val}


def gather(runs: Path) -> dict:
    """Every stage output under a reproduce.py runs folder, in one dict (report.py's input, and results.json):
    what a stage did not produce is None (a method's run) or absent."""
    runs, ev = Path(runs), Path(runs) / "eval"
    if not (runs / "job.json").is_file():
        raise ValueError(f"{runs} holds no job.json: it is not a runs folder of reproduce.py; give --runs the folder "
                         "`python reproduce.py --runs` wrote")

    def read(path: Path, shape=EVAL, fix=REDO):
        return read_json(path, fix, shape) if path.is_file() else None

    job = read(runs / "job.json", JOB, f"reproduce.py writes it as a job starts: run `python "
               f"reproduce.py --runs {runs}` with the job's flags again (finished stages are "
               "kept), or give --runs another folder")
    c, seeds = job["config"], job["config"]["finetune_seeds"]
    Le = c["L"] * c["s"]
    long_name = {m: (lambda seed, m=m: f"short_long_{seed}" if m == "yarn" else f"short_long_{m}_{seed}")
                 for m in job["long_methods"]}
    return {**{k: v for k, v in job.items() if k not in ("methods", "no_finetune_methods", "long_methods")},
            "no_finetune": {m: read(ev / f"nft_{m}.json") for m in job["no_finetune_methods"]},
            "finetuned": {m: [read(ev / f"ft_{m}_{seed}.json") for seed in seeds] for m in job["methods"]},
            "long": {m: [read(ev / f"{name(seed)}.json") for seed in seeds] for m, name in long_name.items()},
            "scratch_long": [read(ev / "scratch_long.json")] if c.get("scratch_long") else None,
            "budgets": {str(steps): {m: [read(ev / f"ft_{m}_{seed}_{steps}steps.json") for seed in seeds[:1]]
                                     for m in job.get("budget_methods", ())} for steps in c.get("budgets", ())},
            "temperature": read(runs / "temperature.json", TEMPERATURE),
            "curves": {m: [curve(runs, m, f"ft_{m}_{seed}", c["finetune_steps"], Le) for seed in seeds]
                       for m in job["methods"]},
            "leakage": read(runs / "leakage.json", LEAKAGE),
            "train": {d.name: read(d / "summary.json", SUMMARY) for d in sorted(runs.iterdir())
                      if (d / "summary.json").is_file()},
            "stage_seconds": stage_seconds(runs)}


def stage_seconds(runs: Path) -> dict[str, float]:
    """{stage: wall seconds} from a runs folder's stages.json (reproduce.Stages); {} before any."""
    path = runs / "stages.json"
    fix = "reproduce.py keeps each stage's wall time there: delete it (only those times are lost)"
    return read_json(path, fix, {str: NUMBER}) if path.exists() else {}


def write(res: dict, out: Path, other: Path | None = None) -> list[dict]:
    """Decide the claims, draw the plots, write results.json and report.md into out; with `other` (another run's
    results.json), a replication section too. Returns the claims."""
    if other is not None:  # read before anything is written
        fix = "give another run's results.json (report.py writes it into its --out)"
        theirs = read_json(other, fix, RESULTS, f"--replicate {other}")["claims"]
    out.mkdir(parents=True, exist_ok=True)
    res["claims"] = claims(res)
    if other is not None:
        res["replication"] = {"other": str(other), "kinds": replication(res["claims"], theirs)}
    files = plots(res, out)
    write_json(out / "results.json", res)
    atomic_write(out / "report.md", markdown(res, files))
    return res["claims"]


@dataclass(frozen=True)
class ReportConfig:
    """report.py's settings.

    runs       the runs folder of a reproduce.py invocation, finished or not (it holds job.json)
    out        the report's folder; default results/<preset>
    replicate  another run's results.json (e.g. --seed 1): a replication section
    """

    runs: str
    out: str | None = None
    replicate: str | None = None

    def __post_init__(self):
        flags.check_types(self)


def main(argv) -> list[dict]:
    args = flags.build(ReportConfig, flags.parse(argv, flags.flag_table((ReportConfig, "")), "python report.py",
                                                 __doc__))
    res = gather(Path(args.runs))
    out = check_writable(args.out or f"results/{res['preset']}", "--out")
    found = write(res, out, None if args.replicate is None else Path(args.replicate))
    done = sum(x["held"] != NOT_RUN for x in found)
    print(f"report: {out / 'report.md'}; {done} of {len(found)} claims decided from the stages that finished")
    return found


if __name__ == "__main__":
    sys.exit(flags.cli(main))
