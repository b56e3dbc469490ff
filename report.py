"""The main job's report from the stage outputs reproduce.py leaves in its runs folder: the paper's
claims decided from the numbers, tables, figures (figures.py) and report.md.

A claim "A beats B" pairs A and B by document (perplexity) or trial (retrieval), seed by seed; it is
"yes" when the t-interval of the mean difference lies on A's side of 0 in every seed, "no" when on
B's side in every seed, "within noise" otherwise, and "not run" when a stage it needs did not finish
(a run cut part-way still reports what it has). The paper's claims (PRIMARY) are decided with
Bonferroni-adjusted intervals (t, or a bootstrap where the statistic is not a mean), so that the
chance of any false "yes" or "no" among them stays under 5%; every other claim is exploratory, at
95% each; the ablation (a plain model) is a family of its own, exploratory too.

    python report.py --runs runs/cpu  # rewrite results/cpu/ from whatever stages finished
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
PRIMARY = 9  # interval comparisons among the paper's claims: 1 (x2), 2 (x2), 3 (x2), 4, 4b, 6
PRIMARY_LEVEL = 1 - 0.05 / PRIMARY  # Bonferroni: 99.44% each
SMOOTH = 5  # steps in the trailing mean of a fine-tuning loss curve (the figure)
SPEEDUP = 2.5  # the project page: YaRN needs "2.5x less training steps"
A_PAPER, A_MARGIN = (
    0.1,
    0.05,
)  # sqrt(1/t) = a ln s + 1: the paper's a, and how far from it still counts as equal
EQUAL_NATS = 0.01  # "as good as": not worse by more than this per token
BOOTSTRAP = 10_000  # resamples of the documents: ~28 beyond each end of a 99.44% interval

# What this report reads of each file in a runs folder (system.shape_problem): a file of another
# shape is an error that names it, not a traceback
NUMBER = (int, float)
PRESET_INTS = (
    "L",
    "s",
    "s_long",
    "d_model",
    "n_layer",
    "n_head",
    "vocab_size",
    "prev_tokens",
    "pretrain_steps",
    "pretrain_batch",
    "finetune_steps",
    "finetune_batch",
    "warmup_steps",
    "warmup_batch",
    "warmup_block",
    "score",
    "max_docs",
    "trials",
    "needle_len",
)
JOB = {
    "preset": str,
    "command": str,
    "device": str,
    "torch": str,
    "commit": str,
    "contexts": [int],
    "retrieval_contexts": [int],
    "methods": [str],
    "no_finetune_methods": [str],
    "long_methods": [str],
    "config": {
        **dict.fromkeys(PRESET_INTS, int),
        "lr": NUMBER,
        "finetune_lr": NUMBER,
        "finetune_seeds": [int],
        "temp_scales": [int],
        "contexts": [int],
        "tokenizer": str,
        "data_source": str,
        "data_mix": str,
    },
}
EVAL = {
    "ppl": {str: {"nll": NUMBER, "ppl": NUMBER, "doc_nll": [NUMBER]}},
    "retrieval": {
        str: {
            "acc": {str: NUMBER},
            "trial_acc": {str: [NUMBER]},
            "distance": {str: NUMBER},
            "chance": [NUMBER],
        }
    },
}
TEMPERATURE = {str: {"context": int, "a": {str: {"ppl": NUMBER, "doc_nll": [NUMBER]}}}}
LEAKAGE = {"dropped_from_val": dict, "piece_tokens": int, "scored_pieces_seen_in_train": NUMBER}
SUMMARY = {"steps": int, "tokens_per_s": (*NUMBER, type(None)), "elapsed_s": NUMBER}
EVENT = {"event": str, "step": int}  # a line of metrics.jsonl
RESULTS = {"claims": [{"claim": str, "held": str}]}  # results.json, for --replicate
REDO = "a stage of reproduce.py wrote it: delete it and run reproduce.py again to redo that stage"


# Statistics
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (p > 0.5): bisection on its CDF,
    integrated from the density by Simpson's rule, accurate to ~1e-6 (2.776 for df 4, 2.131 for df
    15, 1.960 as df grows)."""

    def cdf(x):
        t = np.linspace(0.0, x, 2001)
        pdf = np.exp(
            math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - (df + 1) / 2 * np.log1p(t * t / df)
        )
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
    """(mean, low, high): the t-interval of the mean of d at that level; infinite for fewer than 2
    values."""
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
    """Per-unit scores of a run at context T: each document's mean NLL ("ppl"), or each retrieval
    trial's accuracy ("retrieval": teacher-forced; "exact": 1 if every token was right), averaged
    over the depths whose needle lies more than min_distance tokens before its cue."""
    if key == "ppl":
        return np.array(run["ppl"][str(T)]["doc_nll"])
    r = run["retrieval"][str(T)]
    acc = [np.array(r["trial_acc"][d]) for d in r["trial_acc"] if r["distance"][d] > min_distance]
    return np.mean([a == 1.0 if key == "exact" else a for a in acc], axis=0)


def compare(
    a: list, b: list, T: int, key: str = "ppl", level: float = LEVEL, min_distance: int = 0
) -> dict:
    """Does A do better than B at T (lower NLL, higher recall)? a, b: one run per seed, None for a
    seed that did not run (a single run stands for every seed of the other side). The verdict rule
    of the module docstring, and the numbers behind it: the intervals of A - B per seed that both
    sides ran."""
    pairs = list(zip(a, b)) if len(a) == len(b) else [(x, y) for x in a for y in b]
    pairs = [(x, y) for x, y in pairs if has(x, T, key) and has(y, T, key)]
    seeds = max(len(a), len(b))
    if not pairs:
        return {
            "verdict": NOT_RUN,
            "mean": math.nan,
            "intervals": [],
            "n": 0,
            "seeds": 0,
            "of": seeds,
        }
    diffs = [units(x, T, key, min_distance) - units(y, T, key, min_distance) for x, y in pairs]
    rows = [interval(d, level) for d in diffs]
    return {
        "verdict": side(rows, key == "ppl"),
        "mean": float(np.mean([m for m, _, _ in rows])),
        "intervals": rows,
        "n": len(diffs[0]),
        "seeds": len(rows),
        "of": seeds,
        "level": level,
    }


def evidence(c: dict, key: str = "ppl") -> str:
    if c["verdict"] == NOT_RUN:
        return "its stages did not finish"
    what = {
        "ppl": "\u0394NLL (nats, A - B)",
        "retrieval": "\u0394recall (A - B)",
        "exact": "\u0394exact match (A - B)",
    }
    spans = ", ".join(f"[{lo:+.4f}, {hi:+.4f}]" for _, lo, hi in c["intervals"])
    unit = "documents" if key == "ppl" else "trials"
    seeds = (
        ""
        if c["of"] <= 1
        else ", per seed"
        if c["seeds"] == c["of"]
        else f", {c['seeds']} of {c['of']} seeds"
    )
    return (
        f"{what[key]} {c['mean']:+.4f}; {100 * c['level']:.4g}% CI {spans} ({c['n']} {unit}{seeds})"
    )


def present(runs: list) -> list[dict]:
    """The runs that finished (None marks a seed whose stage did not)."""
    return [r for r in runs if r is not None]


def ppl(runs: list, T: int) -> float:
    """Perplexity at T, the geometric mean over the seeds that ran (exp of the mean NLL)."""
    return math.exp(np.mean([r["ppl"][str(T)]["nll"] for r in present(runs)]))


def recall(runs: list, T: int, key: str = "retrieval", min_distance: int = 0) -> float:
    """Needle recall at T (teacher-forced, or exact match), the mean over trials, depths and seeds
    that ran."""
    return float(np.mean([units(r, T, key, min_distance).mean() for r in present(runs)]))


def method_runs(res: dict) -> tuple[dict[str, list], dict[str, list]]:
    """(without fine-tuning, fine-tuned), each {method: one run per seed, None where it did not
    run}; the fine-tuned ones include the methods at s_long and the baseline from scratch at L'
    where the preset has them."""
    c, nf = res["config"], {m: [r] for m, r in res["no_finetune"].items()}
    long = {f"{LABELS[m]} s={c['s_long']}": runs for m, runs in res["long"].items()}
    return nf, {
        **res["finetuned"],
        **long,
        **({"from scratch at L'": res["scratch_long"]} if c.get("scratch_long") else {}),
    }


# Claims
def claims(res: dict) -> list[dict]:
    """The paper's claims, each decided from the numbers: {"claim", "held", "evidence", "primary",
    "family"}."""
    c, out = res["config"], []
    L, Le, far = c["L"], c["L"] * c["s"], c["L"] * c["s_long"]
    nf, ft = method_runs(res)
    long = res["long"]

    def vs(claim, a, b, T, primary=False):
        result = compare(a, b, T, level=PRIMARY_LEVEL if primary else LEVEL)
        out.append(claimed(claim, result["verdict"], evidence(result), primary))

    # YaRN against NTK-by-parts without fine-tuning is claim 4 (the same numbers): not a claim here
    for m in ("linear", "ntk", "default"):
        vs(
            f"1. No fine-tuning, at L'={Le}: YaRN beats {LABELS[m]}",
            nf["yarn"],
            nf[m],
            Le,
            m != "default",
        )
    vs(
        f"1b. No fine-tuning, beyond L' (at {2 * Le}): YaRN beats plain RoPE",
        nf["yarn"],
        nf["default"],
        2 * Le,
    )
    # at l' = L' a dynamic variant is its static one at s (tested); past it they part
    vs(
        f"1c. No fine-tuning, at {2 * Le}: Dynamic YaRN beats Dynamic NTK",
        nf["dynamic_yarn"],
        nf["dynamic"],
        2 * Le,
    )
    vs(
        f"1d. No fine-tuning, at {2 * Le}: Dynamic YaRN beats YaRN with s fixed",
        nf["dynamic_yarn"],
        nf["yarn"],
        2 * Le,
    )
    for m in ("linear", "ntk"):
        vs(
            f"2. Fine-tuned with equal budgets, at L'={Le}: YaRN beats {LABELS[m]}",
            ft["yarn"],
            ft[m],
            Le,
            True,
        )
    vs(f"2b. Fine-tuned, beyond L' (at {2 * Le}): YaRN beats PI", ft["yarn"], ft["linear"], 2 * Le)
    vs(
        f"2c. Baseline: fine-tuned YaRN beats plain RoPE fine-tuned at L'={Le}",
        ft["yarn"],
        ft["default"],
        Le,
    )
    if c.get("scratch_long"):
        vs(
            f"2d. Baseline: fine-tuned YaRN beats a model trained at L'={Le} from scratch on the "
            "same tokens",
            ft["yarn"],
            res["scratch_long"],
            Le,
        )
    vs(
        f"2e. Short-context check, at L={L}: the pretrained model beats fine-tuned YaRN (extending "
        "costs there)",
        nf["default"],
        ft["yarn"],
        L,
    )
    curves = res.get("curves") or {}
    for steps in c.get("budgets", ()):
        at = {
            m: [point_run(x, steps, Le) for x in curves.get(m, [])]
            for m in ("yarn", "linear", "ntk")
        }
        for m in ("linear", "ntk"):
            vs(
                f"2f. Fine-tuned for {steps} steps instead of {c['finetune_steps']}, at L'={Le}: "
                f"YaRN beats {LABELS[m]}",
                at["yarn"],
                at[m],
                Le,
            )
    for m in ("linear", "ntk"):
        vs(
            f"3. Train short, test long: at {far}, YaRN s={c['s_long']} fine-tuned at {Le} beats "
            f"{LABELS[m]} s={c['s_long']} fine-tuned alike",
            long["yarn"],
            long.get(m, [None]),
            far,
            True,
        )
    out += temperature_claims(res["temperature"] or {}, c)
    out += retrieval_claims(res, L, Le)
    out += efficiency_claims(curves, c)
    if c.get("plain_steps"):
        out += ablation_claims(res.get("plain") or {}, c)
    return out


def claimed(
    claim: str, verdict: str, text: str, primary: bool = False, family: str | None = None
) -> dict:
    return {
        "claim": claim,
        "held": verdict,
        "evidence": text,
        "primary": primary,
        "family": family or ("primary" if primary else "exploratory"),
    }


def point_run(curve: dict | None, step: int, Le: int) -> dict | None:
    """A fine-tune's held-out NLL at L' after `step` steps, as an evaluation's run (None where it
    was not scored)."""
    docs = (curve or {}).get("doc_nll", {}).get(str(step))
    if docs is None:
        return None
    return {"ppl": {str(Le): {"doc_nll": docs, "nll": float(np.mean(docs))}}}


def ablation_claims(plain: dict, c: dict) -> list[dict]:
    """Claims 1 and 2 again on the plain model of the ablation (no previous-token embeddings, no
    recall mix), the first seed: exploratory, a family of its own."""
    nf, ft, Le, out = plain.get("no_finetune", {}), plain.get("finetuned", {}), c["L"] * c["s"], []
    for number, what, runs in (
        ("A1", "no fine-tuning", {m: [r] for m, r in nf.items()}),
        ("A2", "fine-tuned with equal budgets (the first seed)", ft),
    ):
        for m in ("linear", "ntk"):
            result = compare(runs.get("yarn", [None]), runs.get(m, [None]), Le)
            out.append(
                claimed(
                    f"{number}. Plain byte model, {what}, at L'={Le}: YaRN beats {LABELS[m]}",
                    result["verdict"],
                    evidence(result),
                    family="ablation",
                )
            )
    return out


def temperature_grid(temp: dict, s: str) -> tuple[list[float], np.ndarray]:
    """(the a values of the sweep at s, sorted; each one's NLL per document, (a, document))."""
    keys = sorted(temp[s]["a"], key=float)
    return [float(a) for a in keys], np.array([temp[s]["a"][a]["doc_nll"] for a in keys])


def fitted_a(temp: dict, resamples: np.ndarray | None = None):
    """The a of sqrt(1/t) = a ln s + 1 that minimises the NLL summed over the swept s (each s's
    mean over its documents): the vertex of the parabola through the grid's best a and its
    neighbours, or the grid's end when the best lies there. With `resamples` (B x documents,
    indices), one a per resample of the documents, the same resample at every s (they score the
    same documents: paired), as an array."""
    a_values, total = None, 0.0
    for s in temp:
        a_values, nll = temperature_grid(temp, s)  # (a, document)
        means = nll.mean(axis=1)[:, None] if resamples is None else nll[:, resamples].mean(axis=2)
        total = total + means  # (a, resample)
    a, rows, cols = np.array(a_values), total.shape[0], np.arange(total.shape[1])
    i = total.argmin(axis=0)
    mid = np.clip(i, 1, rows - 2)  # the parabola through (a, total) at mid - 1, mid, mid + 1
    x0, x1, x2 = (a[mid + k] for k in (-1, 0, 1))
    y0, y1, y2 = (total[mid + k, cols] for k in (-1, 0, 1))
    d1, d2 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    curvature = (d2 - d1) / (x2 - x0)  # p(x) = y0 + d1 (x - x0) + curvature (x - x0)(x - x1)
    safe = np.where(curvature > 0, curvature, 1.0)
    vertex = np.where(curvature > 0, (x0 + x1) / 2 - d1 / (2 * safe), x1)  # where p' = 0
    best = np.where((i == 0) | (i == rows - 1), a[i], vertex)
    return float(best[0]) if resamples is None else best


def cross_fitted(temp: dict, s: str) -> np.ndarray:
    """Each document's NLL at the a that is best on the other half of the documents (even and odd
    positions): a choice the tested documents had no part in."""
    _, nll = temperature_grid(temp, s)
    halves = (np.arange(0, nll.shape[1], 2), np.arange(1, nll.shape[1], 2))
    out = np.empty(nll.shape[1])
    for mine, other in (halves, halves[::-1]):
        out[mine] = nll[int(np.argmin(nll[:, other].mean(axis=1))), mine]
    return out


def temperature_claims(temp: dict, c: dict) -> list[dict]:
    """Claim 4 (primary): at the extension's s the paper's sqrt(1/t) beats none; 4b (primary): a
    fitted over every s is within A_MARGIN of the paper's 0.1, by a paired bootstrap over
    documents; per s (exploratory), 4c: an a chosen on half the documents beats none on the other
    half, 4d: the paper's is as good as that one (within EQUAL_NATS)."""
    out, scales = [], [str(s) for s in c["temp_scales"]]

    def add(claim, verdict, text, primary=False):
        out.append(claimed(claim, verdict, text, primary))

    s = str(c["s"])
    mscale = rope.yarn_mscale(c["s"])
    name = f"4. Temperature, s={s}: the paper's \u221a(1/t) = {mscale:.3f} beats none (1.0)"
    if s in temp:
        one = {a: [{"ppl": {"0": temp[s]["a"][a]}}] for a in ("0.1", "0.0")}
        result = compare(one["0.1"], one["0.0"], 0, level=PRIMARY_LEVEL)
        add(name, result["verdict"], evidence(result), True)
    else:
        add(name, NOT_RUN, "its stage did not finish", True)
    name = (
        f"4b. Temperature: a fitted over s = {', '.join(scales)} in \u221a(1/t) = a ln s + 1 is "
        f"within {A_MARGIN} of the paper's {A_PAPER}"
    )
    if temp and all(s in temp for s in scales):
        n = temperature_grid(temp, scales[0])[1].shape[1]  # every s scores the same documents
        boot = fitted_a(temp, np.random.default_rng(0).integers(0, n, (BOOTSTRAP, n)))
        lo, hi = np.quantile(boot, [(1 - PRIMARY_LEVEL) / 2, (1 + PRIMARY_LEVEL) / 2])
        inside = A_PAPER - A_MARGIN <= lo and hi <= A_PAPER + A_MARGIN
        outside = hi < A_PAPER - A_MARGIN or lo > A_PAPER + A_MARGIN
        add(
            name,
            "yes" if inside else "no" if outside else "within noise",
            f"fitted a = {fitted_a(temp):.3f}; {100 * PRIMARY_LEVEL:.4g}% paired bootstrap "
            f"interval [{lo:.3f}, {hi:.3f}] ({BOOTSTRAP:,} resamples of the {n} documents, the "
            "same resample at every s)",
            True,
        )
    else:
        add(name, NOT_RUN, "its stage did not finish", True)
    for s in scales:
        none = (
            f"4c. Temperature, s={s}: a \u221a(1/t) chosen on half the documents beats none on the "
            "other half"
        )
        paper = (
            f"4d. Temperature, s={s}: the paper's \u221a(1/t) is within {EQUAL_NATS} nats of one "
            "chosen on the other half of the documents"
        )
        if s not in temp:
            add(none, NOT_RUN, "its stage did not finish")
            add(paper, NOT_RUN, "its stage did not finish")
            continue
        a_values, nll = temperature_grid(temp, s)
        chosen = cross_fitted(temp, s)
        m, lo, hi = interval(chosen - nll[a_values.index(0.0)])
        add(
            none,
            side([(m, lo, hi)]),
            f"\u0394NLL (chosen - none) {m:+.4f}; 95% CI [{lo:+.4f}, {hi:+.4f}] "
            f"({nll.shape[1]} documents)",
        )
        m, lo, hi = interval(nll[a_values.index(A_PAPER)] - chosen)
        add(
            paper,
            "yes" if hi < EQUAL_NATS else "no" if lo > EQUAL_NATS else "within noise",
            f"\u0394NLL (paper's - chosen) {m:+.4f}; 95% CI [{lo:+.4f}, {hi:+.4f}] ({nll.shape[1]} "
            "documents)",
        )
    return out


def beyond_chance(runs: list, T: int, min_distance: int) -> list[tuple]:
    """Per seed, the interval over trials of (recall - chance), needles more than min_distance
    back."""
    return [
        interval(
            units(r, T, "retrieval", min_distance) - np.array(r["retrieval"][str(T)]["chance"])
        )
        for r in runs
        if has(r, T, "retrieval")
    ]


def lift_beyond_ceiling(runs: list, T: int) -> tuple[list[tuple], str]:
    """Per seed, the interval over trials of (lift - ceiling), and the means behind it in words.
    The lift is the trial's recall with the needle minus its recall without it (the same filler
    and cue); the ceiling, the best recall any guess reaches without the needle (eval.ceiling)."""
    rows, parts = [], []
    for r in (r for r in runs if has(r, T, "retrieval")):
        at = r["retrieval"][str(T)]
        if "ceiling" not in at:  # an evaluation older than the ceiling
            continue
        lift = units(r, T, "retrieval") - np.array(at["no_needle"])
        rows.append(interval(lift - np.array(at["ceiling"])))
        parts.append(
            f"lift {lift.mean():+.3f}, no-needle recall {np.mean(at['no_needle']):.3f}, "
            f"ceiling {np.mean(at['ceiling']):.4f}"
        )
    return rows, "; ".join(parts)


def retrieval_claims(res: dict, L: int, Le: int) -> list[dict]:
    """5: the control (the pretrained model at L) recalls beyond chance; 5a: the needle is what it
    recalls: planting it lifts recall, trial by trial, by more than any guess without it could
    reach; past L' only needles more than L tokens back count: 5b fine-tuned YaRN recalls beyond
    chance, 5c better than PI, 5d writes whole needles out more often than PI. 5b-5d are not
    decided when the control fails."""
    control, yarn, pi = (
        [res["no_finetune"]["default"]],
        res["finetuned"]["yarn"],
        res["finetuned"]["linear"],
    )
    out = []
    for claim, runs, T, far in (
        (
            "5. Control: the pretrained model (plain RoPE) at its own context L recalls the "
            "needle beyond chance",
            control,
            L,
            0,
        ),
        (
            f"5b. Fine-tuned YaRN at L'={Le} recalls needles more than L={L} tokens back beyond "
            "chance",
            yarn,
            Le,
            L,
        ),
    ):
        rows = beyond_chance(runs, T, far)
        spans = ", ".join(f"[{lo:+.3f}, {hi:+.3f}]" for _, lo, hi in rows)
        mean = np.mean([m for m, _, _ in rows]) if rows else math.nan
        out.append(
            claimed(
                claim,
                NOT_RUN if not rows else side(rows, better_below=False),
                "its stages did not finish"
                if not rows
                else f"recall - chance {mean:+.3f}; 95% CI {spans}",
            )
        )
    rows, means = lift_beyond_ceiling(control, L)
    text = (
        "its stages did not finish"
        if not rows
        else f"lift - ceiling {rows[0][0]:+.3f}; 95% CI [{rows[0][1]:+.3f}, {rows[0][2]:+.3f}] "
        f"({means})"
    )
    out.insert(
        1,
        claimed(
            "5a. Control: the needle is what it recalls: at L, planting the needle "
            "lifts recall (with - without, trial by trial) by more than the best "
            "recall possible without it",
            NOT_RUN if not rows else side(rows, better_below=False),
            text,
        ),
    )
    for key, what in (
        ("retrieval", "recalls needles"),
        ("exact", "writes whole needles out (exact match)"),
    ):
        result = compare(yarn, pi, Le, key, min_distance=L)
        out.append(
            claimed(
                f"5{'c' if key == 'retrieval' else 'd'}. Fine-tuned, at L'={Le}, more "
                f"than L={L} tokens back: YaRN {what} better than PI",
                result["verdict"],
                evidence(result, key),
            )
        )
    if out[0]["held"] not in (
        "yes",
        NOT_RUN,
    ):  # a model that cannot copy at L: the probe measures nothing past it
        for c in (c for c in out[2:] if c["held"] != NOT_RUN):
            c.update(
                held=CONTROL_FAILED,
                evidence="the control (claim 5) does not recall beyond chance, so the probe "
                f"cannot tell the methods apart; the numbers, for the record: {c['evidence']}",
            )
    return out


def smooth(losses: list[float]) -> np.ndarray:
    """The trailing mean over SMOOTH steps (fewer at the start)."""
    x = np.asarray(losses, dtype=float)
    return np.array([x[max(0, k - SMOOTH + 1) : k + 1].mean() for k in range(len(x))])


def crossing(nll: np.ndarray, steps: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The step at which each column of `nll` (held-out NLL at the points `steps`, a column a
    curve) first reaches its column's `level`: linear in log(1 + step) between the two points
    around it, since the curves fall about linearly in log step; inf where the curve ends above
    the level (it needs more steps than it ran)."""
    below = nll <= level
    j, cols, x = below.argmax(axis=0), np.arange(nll.shape[1]), np.log1p(steps)
    before = np.maximum(j - 1, 0)
    y0, y1 = nll[before, cols], nll[j, cols]
    drop = np.where(j > 0, y0 - y1, 1.0)  # y0 > level >= y1 where j > 0
    part = np.where(j > 0, (y0 - level) / drop, 0.0)
    at = np.expm1(x[before] + part * (x[j] - x[before]))
    return np.where(below.any(axis=0), at, np.inf)


def steps_to_level(curve: dict, level_docs: list[float], level: float) -> tuple[float, ...]:
    """The steps a fine-tune needs to reach the mean of level_docs, and that number's bootstrap
    interval at `level`: the documents resampled BOOTSTRAP times, the same resample for the curve
    and for the level (paired); inf for a curve that ends above it."""
    steps = np.array(sorted(int(k) for k in curve["doc_nll"]))
    nll = np.array([curve["doc_nll"][str(k)] for k in steps])  # (point, document)
    target = np.array(level_docs)
    picks = np.random.default_rng(0).integers(0, len(target), (BOOTSTRAP, len(target)))
    boot = crossing(nll[:, picks].mean(axis=2), steps, target[picks].mean(axis=1))
    ends = [(1 - level) / 2, (1 + level) / 2]
    lo, hi = np.quantile(boot, ends, method="inverted_cdf")  # a sample's value: inf stays inf
    return float(crossing(nll.mean(axis=1)[:, None], steps, target.mean())[0]), float(lo), float(hi)


def efficiency(curves: dict, c: dict, method: str, level: float) -> dict:
    """Claim 6 for one method: for each seed whose curve reaches SPEEDUP x YaRN's budget, the
    steps it needs to reach YaRN's held-out NLL at L' after that budget, with its interval at
    `level`; "yes" where every seed needs at least SPEEDUP x the budget, "no" where every seed
    needs fewer."""
    budget = c["finetune_steps"]
    decided, rows = SPEEDUP * budget, []
    for yarn, other in zip(curves.get("yarn", []), curves.get(method, [])):
        target = (yarn or {}).get("doc_nll", {}).get(str(budget))
        last = max((int(k) for k in (other or {}).get("doc_nll", {})), default=0)
        if target is not None and last >= decided:
            rows.append((*steps_to_level(other, target, level), float(np.mean(target)), last))
    verdict = (
        NOT_RUN
        if not rows
        else "yes"
        if all(r[1] >= decided for r in rows)
        else "no"
        if all(r[2] < decided for r in rows)
        else "within noise"
    )
    return {"verdict": verdict, "rows": rows, "seeds": len(rows), "of": len(curves.get(method, []))}


def steps_text(k: float, last: int) -> str:
    return f"> {last}" if math.isinf(k) else f"{k:.0f}"


def efficiency_claims(curves: dict, c: dict) -> list[dict]:
    """6 (primary, the project page's headline): YaRN reaches its held-out level at L' (after its
    budget, claim 2's) in at most 1/SPEEDUP of the steps PI needs to reach it, per seed, by a
    paired bootstrap over documents at the Bonferroni level; the same against NTK-aware,
    exploratory (95%)."""
    out, budget, tokens = [], c["finetune_steps"], c["finetune_batch"] * c["L"] * c["s"]
    for method, primary in (("linear", True), ("ntk", False)):
        level = PRIMARY_LEVEL if primary else LEVEL
        name = (
            f"6. Efficiency: YaRN reaches its held-out NLL at L'={c['L'] * c['s']} after "
            f"{budget} steps in at most 1/{SPEEDUP} of the steps {LABELS[method]} needs to "
            "reach it"
        )
        e = efficiency(curves, c, method, level)
        out.append(
            claimed(
                name,
                e["verdict"],
                efficiency_text(e, LABELS[method], budget, level, tokens),
                primary,
            )
        )
    return out


def efficiency_text(e: dict, method: str, budget: int, level: float, tokens: int) -> str:
    if not e["rows"]:
        return "its stages did not finish"
    steps = ", ".join(
        f"{steps_text(k, last)} [{steps_text(lo, last)}, {steps_text(hi, last)}]"
        for k, lo, hi, _, last in e["rows"]
    )
    targets = ", ".join(f"{t:.4f}" for *_, t, _ in e["rows"])
    seeds = (
        "per seed" if e["seeds"] == e["of"] else f"the {e['seeds']} of {e['of']} seeds run that far"
    )
    censored = "; > K: still above it after K steps, where its run ended" if "> " in steps else ""
    return (
        f"{method} needs {steps} steps to reach YaRN's NLL after {budget} ({targets} nats); "
        f"{seeds}, {100 * level:.4g}% paired bootstrap intervals ({BOOTSTRAP:,} resamples of "
        f"the documents); {SPEEDUP} x {budget} = {SPEEDUP * budget:.0f} steps; a step is "
        f"{tokens:,} tokens{censored}"
    )


def agree(a: list[dict], b: list[dict]) -> list[str]:
    """The claims on which two reports contradict each other: "yes" in one, "no" in the other."""
    theirs = {c["claim"]: c["held"] for c in b}
    return [c["claim"] for c in a if {c["held"], theirs.get(c["claim"])} == {"yes", "no"}]


def replication(a: list[dict], b: list[dict]) -> dict[str, list[str]]:
    """Each claim both reports decide, by how the two verdicts relate: the same, weakened ("yes" or
    "no" in one, "within noise" in the other), contradicted ("yes" against "no"), or undecided in
    both."""
    theirs, out = (
        {c["claim"]: c["held"] for c in b},
        {"same": [], "weakened": [], "contradicted": [], "undecided": []},
    )
    decided = {"yes", "no"}
    for c in (c for c in a if c["claim"] in theirs):
        pair = {c["held"], theirs[c["claim"]]}
        kind = (
            "same"
            if len(pair) == 1 and pair <= decided
            else "contradicted"
            if pair == decided
            else "weakened"
            if pair & decided and "within noise" in pair
            else "undecided"
        )
        out[kind].append(c["claim"])
    return out


# Tables
def table(runs: dict[str, list], contexts, score=ppl, digits: int = 3) -> str:
    """One row per method, one column per context: score(the method's runs, T), perplexity by
    default; "-" where the method was not evaluated at T."""
    lines = [
        "| method | " + " | ".join(str(T) for T in contexts) + " |",
        "|---|" + "---|" * len(contexts),
    ]
    for name, rs in runs.items():
        key = "ppl" if score is ppl else "retrieval"
        cells = [
            NOT_RUN
            if not present(rs)
            else f"{score(rs, T):.{digits}f}"
            if has(present(rs)[0], T, key)
            else "-"
            for T in contexts
        ]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recall_table(runs: dict[str, list], T: int, L: int) -> str:
    """Recall at T per method: teacher-forced over every depth, then over needles more than L back,
    and exact."""
    lines = [
        f"| method | teacher-forced, all depths | more than {L} back | exact match, more than {L} "
        "back |",
        "|---|---|---|---|",
    ]
    for name, rs in runs.items():
        if present(rs) and has(present(rs)[0], T, "retrieval"):
            cells = [recall(rs, T), recall(rs, T, min_distance=L), recall(rs, T, "exact", L)]
            lines.append(
                f"| {LABELS.get(name, name)} | " + " | ".join(f"{v:.2f}" for v in cells) + " |"
            )
    return "\n".join(lines) + "\n"


def curve_table(curves: dict, c: dict) -> str:
    """Held-out NLL at L' after each fine-tuning step scored (the mean over the seeds that
    reached it, and how many), per method; the efficiency claims' target, YaRN's NLL after its
    budget, in its own row."""
    steps = sorted({int(k) for runs in curves.values() for x in runs if x for k in x["val"]})
    lines = [
        "| method (held-out NLL at L', nats) | " + " | ".join(f"step {k}" for k in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for m, per_seed in curves.items():
        cells = []
        for k in steps:
            values = [x["val"][str(k)] for x in per_seed if x and str(k) in x["val"]]
            n = "" if len(values) == len(per_seed) else f" ({len(values)})"
            cells.append(f"{np.mean(values):.4f}{n}" if values else "-")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    budget = str(c["finetune_steps"])
    levels = [x["val"][budget] for x in curves.get("yarn", []) if x and budget in x["val"]]
    if levels:
        lines.append(
            f"| target: YaRN after {budget} steps, per seed | "
            + ", ".join(f"{v:.4f}" for v in levels)
            + " |"
            + " |" * (len(steps) - 1)
        )
    return "\n".join(lines) + "\n\n(n): the number of seeds with that point, where not all.\n"


def temperature_table(temp: dict) -> str:
    lines = [
        "| s | context | ppl, none (a = 0) | ppl, the paper's (a = 0.1) | best a on all documents "
        "| ppl at the a chosen on the other half |",
        "|---|---|---|---|---|---|",
    ]
    for s, r in temp.items():
        a_values, nll = temperature_grid(temp, s)
        best = a_values[int(np.argmin(nll.mean(axis=1)))]
        lines.append(
            f"| {s} | {r['context']} | {r['a']['0.0']['ppl']:.3f} | {r['a']['0.1']['ppl']:.3f} | "
            f"{best} | {math.exp(cross_fitted(temp, s).mean()):.3f} |"
        )
    return "\n".join(lines) + "\n"


# report.md
def setup_lines(res: dict) -> list[str]:
    c = res["config"]
    head_dim, L, s = c["d_model"] // c["n_head"], c["L"], c["s"]
    yarn = RopeConfig(type="yarn", factor=float(s), original_context=L)
    low, high = rope.ramp_bounds(head_dim, yarn)
    fast = sum(
        1
        for d in range(head_dim // 2)
        if d < rope.correction_dim(yarn.beta_fast, head_dim, yarn.base, L)
    )
    kept = int((rope.ramp(head_dim, yarn) == 0).sum())
    pre, fine = (
        c["pretrain_steps"] * c["pretrain_batch"] * L,
        c["finetune_steps"] * c["finetune_batch"] * L * s,
    )
    leak = res.get("leakage")
    return [
        f"- Data: {c['data_source']}, {c['tokenizer']} tokens (vocabulary {c['vocab_size']}), "
        "split by a hash of each file's path; val documents that share more than a fifth of their "
        "64-token pieces with train (near-copies: generated tables, copied modules) are dropped"
        + (
            f" ({len(leak['dropped_from_val'])} were). Of the scored tokens, "
            f"{100 * leak['scored_pieces_seen_in_train']:.1f}% end a {leak['piece_tokens']}-token "
            "piece that occurs verbatim in train."
            if leak
            else "."
        ),
        f"- Model: d_model {c['d_model']}, {c['n_layer']} layers, {c['n_head']} heads of "
        f"{head_dim}, plain RoPE (base 10000) pretrained at L = {L} for {c['pretrain_steps']} "
        f"steps x {c['pretrain_batch']} sequences ({pre:,} tokens), lr {c['lr']}.",
        f"- Extension: s = {s}, L' = {L * s}. Every method fine-tuned {c['finetune_steps']} steps "
        f"x {c['finetune_batch']} sequences of L' ({fine:,} tokens, {100 * fine / pre:.1f}% of "
        f"pretraining) at lr {c['finetune_lr']} after a {max(1, c['finetune_steps'] // 10)}-step "
        "warm-up, constant (no decay, as the paper's fine-tunes), on the same batches, with "
        f"{len(c['finetune_seeds'])} seeds (data order) {list(c['finetune_seeds'])}{shifted(res)}; "
        "its training loss kept at every step.",
        *efficiency_setup(c),
        f"- Why this size: with head_dim {head_dim}, base 10000 and L = {L}, pairs 0..{fast - 1} "
        f"make more than beta_fast = 32 rotations inside L ({fast} pair(s)), and NTK-by-parts / "
        f"YaRN keep {kept} pair(s) exactly (ramp from pair {low} to pair {high} of "
        f"{head_dim // 2}): the high-frequency band the paper's argument is about. "
        + ("" if fast else "None does here, so that argument cannot show at this size."),
        f"- Train short, test long: YaRN, PI and NTK-aware at s = {c['s_long']}, each fine-tuned "
        f"at L' = {L * s} with the same budget, evaluated at {L * c['s_long']}."
        + (
            " Baseline: a model pretrained at L' from scratch on as many tokens."
            if c.get("scratch_long")
            else ""
        ),
        *(
            [
                f"- Copying (which the retrieval probe needs) forms within the budget thanks to "
                + (
                    f"previous-token embeddings (prev_tokens {c['prev_tokens']}), "
                    if c["prev_tokens"]
                    else ""
                )
                + f"a warm-up of {c['warmup_steps']} steps x {c['warmup_batch']} windows of "
                f"{c['warmup_block']} on the induction task at a constant lr, and the "
                f"'{c['data_mix']}' mix during pretraining (data/recall.py); fine-tuning and "
                "evaluation use natural text only."
            ]
            if c["warmup_steps"]
            else []
        ),
        f"- Perplexity (per token: per byte for the byte tokenizer): {c['max_docs']} held-out "
        f"documents, each scoring {c['score']} consecutive tokens from its body (placed at random "
        "after the longest context's history), the same tokens at every context; at context T a "
        f"window scores its last min(T/2, {c['score']}) tokens, so each scored token sees between "
        "T/2 + 1 and T tokens.",
        f"- Retrieval: a needle of {c['needle_len']} random "
        f"{'letters' if c['tokenizer'] == 'bytes' else 'words'} at depth d of the text, its first "
        f"{c['needle_len'] // 4} tokens repeated at the end; top-1 recall of the rest, "
        "teacher-forced, and exact match (every token right: what greedy decoding from the cue "
        f"would write); {c['trials']} trials per cell; chance = a guesser that knows the needle's "
        "tokens but not their order. The same trials with no needle planted are a control; "
        "without the needle no guess recalls more than its ceiling, the mean over the scored "
        "tokens j = 0 .. n - c - 1 of 1/(|V| - c - j) (|V| the needle's alphabet, c the cue: its "
        "tokens are distinct and uniform, and c + j of them are shown). Past L only needles more "
        "than L tokens back count.",
    ]


def shifted(res: dict) -> str:
    r = res.get("replication_seed") or 0
    shift = r * len(res["config"]["finetune_seeds"])
    return f", shifted by {shift} (replication seed {r})" if r else ""


def efficiency_setup(c: dict) -> list[str]:
    if not c.get("curve_steps"):
        return []
    budget, steps = c["finetune_steps"], c["curve_steps"]
    return [
        f"- Efficiency (claim 6): the held-out NLL at L' on the same documents after "
        f"{', '.join(map(str, steps))} steps; YaRN's after its {budget}-step budget is the "
        f"target. PI runs to {SPEEDUP} x {budget} steps in every seed; on the first seed PI "
        f"and NTK-aware go on to {steps[-1]} while above the target, YaRN to "
        f"{max(list(c['budgets']) + [budget])}. The learning rate does not decay, so the "
        "model after k steps is the k-step budget's whatever the run's length, and one run per "
        "method gives every point (a cosine as long as the run would make the steps to a level "
        "depend on the budget chosen). Steps to the target are interpolated in log(1 + step) "
        "between points; intervals from a bootstrap over documents, resampled jointly for the "
        "curve and the target."
    ]


def limitations(res: dict) -> list[str]:
    """What this toy departs from, and what each departure could do to the comparison, with the
    numbers."""
    c, n = res["config"], len(res["config"]["finetune_seeds"])
    params = f"{c['d_model']}-wide, {c['n_layer']}-layer"
    lines = [
        f"- Scale: a {params} model on {c['tokenizer']} of Python source, against LLaMA 7B-70B on "
        "web text. Which method wins can change with scale; the paper's own gaps are a few tenths "
        "of perplexity at 7B.",
        "- Seeds vary the fine-tuning data order only; every seed shares one pretrained model, "
        "the same documents and the same needles. The intervals cover documents (or trials) and "
        "agreement across seeds covers the fine-tuning run; nothing here covers pretraining. A "
        f"replication, `--seed r`, shifts every training seed by {n} r (pretraining and warm-up "
        "included, so no data order is shared) and scores other documents, regions and needles "
        "(the evaluation's seed is r).",
    ]
    if c["prev_tokens"]:
        lines.append(
            f"- Previous-token embeddings (the last {c['prev_tokens']} tokens added to each input) "
            "give every position local context without RoPE, which plausibly hides what PI loses "
            "by squeezing the high frequencies. " + pi_cost(res)
        )
    if c["data_mix"] != "natural":
        lines.append(recall_mix(res))
    if not c.get("scratch_long"):
        lines.append("- No model trained at L' from scratch (too costly on this preset).")
    if res.get("curves"):
        lines.append(budget_gaps(res))
    return lines


def pi_cost(res: dict) -> str:
    """PI's cost at L, as perplexity over the pretrained model's there, here and on the ablation's
    plain model."""
    L, parts = res["config"]["L"], []
    plain = res.get("plain") or {}
    for what, nf, ft in (
        ("with them", res["no_finetune"], res["finetuned"]),
        (
            "without (the ablation's plain model)",
            plain.get("no_finetune") or {},
            plain.get("finetuned") or {},
        ),
    ):
        base, pi, tuned = nf.get("default"), nf.get("linear"), present(ft.get("linear") or [])
        if has(base, L, "ppl") and has(pi, L, "ppl"):
            after = (
                f", x{ppl(tuned, L) / ppl([base], L):.2f} fine-tuned"
                if tuned and has(tuned[0], L, "ppl")
                else ""
            )
            parts.append(f"{what} x{ppl([pi], L) / ppl([base], L):.2f} without fine-tuning{after}")
    if not parts:
        return "The ablation that measures PI's cost at L without them did not run."
    return "PI's perplexity at L over the pretrained model's: " + "; ".join(parts) + "."


def recall_mix(res: dict) -> str:
    """The recall mix against the probe's needles: how much of pretraining is the probe's kind of
    string, and whether a model without the mix copies at all (the ablation's control)."""
    from data.recall import mix

    c = res["config"]
    blank = np.zeros((2000, c["L"] + 1), dtype=np.int64)  # what the mix writes over blanks shows
    written = (mix(blank, c["data_mix"], 0) != 0).mean()
    warmup = c["warmup_steps"] * c["warmup_batch"] * c["warmup_block"]
    text = (
        f"- Pretraining saw the '{c['data_mix']}' mix (data/recall.py): {100 * written:.0f}% "
        "of its tokens are random strings written twice or tiled, half of the strings "
        "lowercase letters, and a quarter of its windows hold pairs of 8-32 distinct symbols "
        f"planted twice: the probe's needles ({c['needle_len']} distinct lowercase letters, "
        "planted and repeated) are that kind of string, so the probe measures a skill trained "
        f"directly. Warm-up: {warmup:,} tokens of the induction task."
    )
    plain = ((res.get("plain") or {}).get("no_finetune") or {}).get("default")
    control = res["no_finetune"]["default"]
    if has(plain, c["L"], "retrieval") and has(control, c["L"], "retrieval"):
        chance = np.mean(plain["retrieval"][str(c["L"])]["chance"])
        text += (
            " Without the mix, the warm-up and previous-token embeddings (the ablation's "
            f"plain model) the control recalls {recall([plain], c['L']):.2f} at L against "
            f"chance {chance:.2f}; this model {recall([control], c['L']):.2f}."
        )
    return text


def budget_gaps(res: dict) -> str:
    """Claim 2 at every budget the curves give: YaRN minus PI at L', the mean over the seeds that
    have both."""
    c, curves, parts = res["config"], res["curves"], []
    for k in sorted({*c.get("budgets", ()), c["finetune_steps"]}):
        gaps = [
            np.mean(np.subtract(y["doc_nll"][str(k)], p["doc_nll"][str(k)]))
            for y, p in zip(curves.get("yarn", []), curves.get("linear", []))
            if y and p and str(k) in y["doc_nll"] and str(k) in p["doc_nll"]
        ]
        if gaps:
            seeds = f"{len(gaps)} seed" + "s" * (len(gaps) > 1)
            parts.append(f"{np.mean(gaps):+.3f} nats after {k} steps ({seeds})")
    if not parts:
        return "- Claim 2 at other budgets: not run."
    return (
        "- Claim 2 at other budgets (claims 2f): YaRN minus PI at L' is " + ", ".join(parts) + "."
    )


def claims_table(found: list[dict]) -> list[str]:
    return ["| claim | held | numbers |", "|---|---|---|"] + [
        f"| {x['claim']} | {x['held']} | {x['evidence']} |" for x in found
    ]


def markdown(res: dict, plot_files: list[str]) -> str:
    c, (nf, ft) = res["config"], method_runs(res)
    L, Le = c["L"], c["L"] * c["s"]
    missing = sum(x["held"] == NOT_RUN for x in res["claims"])
    family = {
        k: [
            x
            for x in res["claims"]
            if x.get("family", "primary" if x["primary"] else "exploratory") == k
        ]
        for k in ("primary", "exploratory", "ablation")
    }
    lines = [
        f"# YaRN toy reproduction: preset `{res['preset']}`",
        "",
        f"Generated by `{res['command']}` on {res['device']}, torch {res['torch']}, commit "
        f"{res['commit']}. Every number comes from `results.json`; every verdict is computed from "
        "those numbers by report.py.",
        *(
            [
                "",
                f"**This run did not finish:** {missing} of {len(res['claims'])} claims are 'not "
                "run', because stages they need did not finish (see the wall times below).",
            ]
            if missing
            else []
        ),
        "",
        "## Set-up",
        "",
        *setup_lines(res),
        "",
        "## The paper's claims (primary)",
        "",
        f"Decided with {100 * PRIMARY_LEVEL:.4g}% intervals (Bonferroni over the {PRIMARY} "
        "interval comparisons), so that the chance of any false verdict among them is under 5%.",
        "",
        *claims_table(family["primary"]),
        "",
        "## Exploratory claims (95% intervals each, no correction)",
        "",
        *claims_table(family["exploratory"]),
        "",
        "How to read them: 'yes' means the interval of the per-document difference (per trial for "
        "recall) lies on the claim's side of zero for every fine-tuning seed; 'no' that it lies "
        "on the other side for every seed; 'within noise' anything else; 'not run' that a stage "
        "it needs did not finish; 'not decided (control failed)' that the pretrained model does "
        "not recall the needle at its own context, so the probe cannot compare methods. What the "
        "intervals cover: see the limitations.",
        "",
    ]
    if family["ablation"]:
        lines += ablation_lines(res, family["ablation"])
    lines += ["## Limitations", "", *limitations(res), "", *replication_lines(res)]
    lines += [
        "## Perplexity, no fine-tuning (the pretrained model, RoPE swapped)",
        "",
        table(nf, res["contexts"]),
        "## Perplexity, fine-tuned at L' (geometric mean over seeds)",
        "",
        table(ft, res["contexts"]),
        "## Needle recall, no fine-tuning (mean over depths)",
        "",
        table(nf, res["retrieval_contexts"], recall, 2),
        f"## Needle recall at L' = {Le}, fine-tuned (mean over seeds)",
        "",
        recall_table(ft, Le, L),
        "## Efficiency: held-out NLL at L' against fine-tuning steps (the same batches)",
        "",
        curve_table(res.get("curves") or {}, c),
        "## Temperature (NTK-by-parts with \u221a(1/t) = a ln s + 1, pretrained model, perplexity "
        "at sL)",
        "",
        temperature_table(res["temperature"]) if res["temperature"] else NOT_RUN,
        "",
        "## Wall time per stage (seconds)",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in res["stage_seconds"].items()]
    lines += [
        f"| total | {sum(res['stage_seconds'].values()):.1f} |",
        "",
        "## Training runs",
        "",
        "| run | steps | tokens/s | MFU | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, t in res["train"].items():
        mfu = "n/a" if t.get("mfu") is None else f"{100 * t['mfu']:.1f}%"
        speed = "n/a" if t["tokens_per_s"] is None else f"{t['tokens_per_s']:,.0f}"  # none: no step
        lines.append(f"| {name} | {t['steps']} | {speed} | {mfu} | {t['elapsed_s']:.1f} |")
    lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in plot_files]
    lines += ["", "## Config", "", "```json", json.dumps(c, indent=2), "```", ""]
    return "\n".join(lines)


def ablation_lines(res: dict, found: list[dict]) -> list[str]:
    c, plain = res["config"], res.get("plain") or {}
    runs = {
        **{f"{LABELS[m]}, no fine-tuning": [r] for m, r in plain["no_finetune"].items()},
        **{f"{LABELS[m]}, fine-tuned": rs for m, rs in plain["finetuned"].items()},
    }
    return [
        "## Ablation: a plain byte model (exploratory, 95% each)",
        "",
        "The same model and data without previous-token embeddings, the recall mix or the "
        f"warm-up, pretrained {c['plain_steps']} steps on natural text; claims 1 and 2 again "
        "(the first seed).",
        "",
        *claims_table(found),
        "",
        table(runs, [c["L"], c["L"] * c["s"]]),
    ]


def replication_lines(res: dict) -> list[str]:
    if not res.get("replication"):
        return []
    rep = res["replication"]
    lines = [
        "## Replication",
        "",
        f"Against `{rep['other']}` (another replication seed: every "
        "training seed shifted, pretraining included, and other held-out documents, regions "
        "and needles): " + ", ".join(f"{len(v)} {k}" for k, v in rep["kinds"].items()) + ".",
        "",
    ]
    kinds = ("contradicted", "weakened")
    return lines + [f"- {k}: {name}" for k in kinds for name in rep["kinds"][k]] + [""]


def plots(res: dict, out: Path) -> list[str]:
    """The figures of whatever finished, as PNG files in out; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, (nf, ft) = res["config"], (finished(runs) for runs in method_runs(res))
    made = {"scaling_per_dimension.png": figures.plot_scaling(plt, c)}
    if nf:
        made["ppl_no_finetune.png"] = figures.plot_ppl(
            plt, nf, c, "Perplexity vs context, no fine-tuning"
        )
        probed = {m: rs for m, rs in nf.items() if rs[0].get("retrieval")}
        made["retrieval_no_finetune.png"] = figures.plot_recall(
            plt, probed, "Needle recall, no fine-tuning"
        )
    if ft:
        made["ppl_finetuned.png"] = figures.plot_ppl(
            plt, ft, c, "Perplexity vs context, fine-tuned at L' (bars: range over seeds)"
        )
        with_recall = {m: rs for m, rs in ft.items() if rs[0].get("retrieval")}
        made["retrieval_finetuned.png"] = figures.plot_recall(
            plt, with_recall, "Needle recall, fine-tuned (mean over seeds)"
        )
    curves = finished(res.get("curves") or {})
    if curves:
        budget = str(c["finetune_steps"])
        levels = [x["val"][budget] for x in curves.get("yarn", []) if budget in x["val"]]
        target = np.mean(levels) if levels else None
        made["loss_curves.png"] = figures.plot_curves(
            plt, curves, smooth, c, target, SPEEDUP * c["finetune_steps"]
        )
    if res["temperature"]:
        a = (
            fitted_a(res["temperature"])
            if all(str(s) in res["temperature"] for s in c["temp_scales"])
            else None
        )
        made["temperature.png"] = figures.plot_temperature(plt, res["temperature"], interval, a)
    return figures.draw(made, out, plt)


def finished(runs: dict[str, list]) -> dict[str, list[dict]]:
    """{method: its runs that finished}, for the methods with any."""
    return {name: present(rs) for name, rs in runs.items() if present(rs)}


# Inputs and outputs
def curve(runs: Path, method: str, seed: int, c: dict) -> dict | None:
    """A fine-tune's training loss at every step (metrics.jsonl) and its held-out NLL at L' (the
    mean, and each document's) at step 0 (the pretrained model under the method) and after each
    curve step it was scored at."""
    name = f"ft_{method}_{seed}"
    if not (runs / name / "metrics.jsonl").is_file():
        return None
    fix = f"train.py logged the run there: delete {runs / name}, run reproduce.py again to redo it"
    events = read_json(runs / name / "metrics.jsonl", fix, EVENT, lines=True)
    train = [
        e["train_loss"] for e in sorted(events, key=lambda e: e["step"]) if e["event"] == "train"
    ]
    budget, Le = c["finetune_steps"], str(c["L"] * c["s"])
    files = {
        0: f"nft_{method}",
        **{k: f"{name}_{k}" for k in c.get("curve_steps", ())},
        budget: name,
    }
    val, docs = {}, {}
    for step, evaluated in sorted(files.items()):
        path = runs / "eval" / f"{evaluated}.json"
        at = read_json(path, REDO, EVAL)["ppl"].get(Le) if path.is_file() else None
        if at:
            val[str(step)], docs[str(step)] = at["nll"], at["doc_nll"]
    return {"train": train, "val": val, "doc_nll": docs}


def plain_runs(plain: Path, c: dict) -> dict | None:
    """The ablation's evaluations: the plain model under each method, and fine-tuned (the first
    seed); None where the preset has no ablation."""
    if not c.get("plain_steps"):
        return None

    def read(name: str):
        path = plain / "eval" / f"{name}.json"
        return read_json(path, REDO, EVAL) if path.is_file() else None

    seed = c["finetune_seeds"][0]
    return {
        "no_finetune": {m: read(f"nft_{m}") for m in ("default", "linear", "ntk", "yarn")},
        "finetuned": {m: [read(f"ft_{m}_{seed}")] for m in ("yarn", "linear", "ntk")},
    }


def gather(runs: Path) -> dict:
    """Every stage output under a reproduce.py runs folder, in one dict (report.py's input, and
    results.json): what a stage did not produce is None (a method's run) or absent."""
    runs, ev = Path(runs), Path(runs) / "eval"
    if not (runs / "job.json").is_file():
        raise ValueError(
            f"{runs} holds no job.json: it is not a runs folder of reproduce.py; give --runs the "
            "folder `python reproduce.py --runs` wrote"
        )

    def read(path: Path, shape=EVAL, fix=REDO):
        return read_json(path, fix, shape) if path.is_file() else None

    job = read(
        runs / "job.json",
        JOB,
        f"reproduce.py writes it as a job starts: run `python "
        f"reproduce.py --runs {runs}` with the job's flags again (finished stages are "
        "kept), or give --runs another folder",
    )
    c, seeds = job["config"], job["config"]["finetune_seeds"]
    long_name = {
        m: (lambda seed, m=m: f"short_long_{seed}" if m == "yarn" else f"short_long_{m}_{seed}")
        for m in job["long_methods"]
    }
    plain = runs / "plain"
    return {
        **{
            k: v
            for k, v in job.items()
            if k not in ("methods", "no_finetune_methods", "long_methods")
        },
        "no_finetune": {m: read(ev / f"nft_{m}.json") for m in job["no_finetune_methods"]},
        "finetuned": {
            m: [read(ev / f"ft_{m}_{seed}.json") for seed in seeds] for m in job["methods"]
        },
        "long": {
            m: [read(ev / f"{name(seed)}.json") for seed in seeds] for m, name in long_name.items()
        },
        "scratch_long": [read(ev / "scratch_long.json")] if c.get("scratch_long") else None,
        "temperature": read(runs / "temperature.json", TEMPERATURE),
        "curves": {m: [curve(runs, m, seed, c) for seed in seeds] for m in job["methods"]},
        "plain": plain_runs(plain, c),
        "leakage": read(runs / "leakage.json", LEAKAGE),
        "train": {
            str(d.relative_to(runs)): read(d / "summary.json", SUMMARY)
            for folder in (runs, plain)
            if folder.is_dir()
            for d in sorted(folder.iterdir())
            if (d / "summary.json").is_file()
        },
        "stage_seconds": stage_seconds(runs),
    }


def stage_seconds(runs: Path) -> dict[str, float]:
    """{stage: wall seconds} from a runs folder's stages.json (reproduce.Stages); {} before any."""
    path = runs / "stages.json"
    fix = "reproduce.py keeps each stage's wall time there: delete it (only those times are lost)"
    return read_json(path, fix, {str: NUMBER}) if path.exists() else {}


def write(res: dict, out: Path, other: Path | None = None) -> list[dict]:
    """Decide the claims, draw the plots, write results.json and report.md into out; with `other`
    (another run's results.json), a replication section too. Returns the claims."""
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
    args = flags.build(
        ReportConfig,
        flags.parse(argv, flags.flag_table((ReportConfig, "")), "python report.py", __doc__),
    )
    res = gather(Path(args.runs))
    out = check_writable(args.out or f"results/{res['preset']}", "--out")
    found = write(res, out, None if args.replicate is None else Path(args.replicate))
    done = sum(x["held"] != NOT_RUN for x in found)
    print(
        f"report: {out / 'report.md'}; {done} of {len(found)} claims decided from the stages that "
        "finished"
    )
    return found


if __name__ == "__main__":
    sys.exit(flags.cli(main))
