"""The main job's report from the stage outputs reproduce.py leaves in its runs folder: the paper's claims decided
from the numbers, tables, plots and report.md. A claim "A beats B" pairs A and B by document (perplexity) or trial
(retrieval), seed by seed; it is "yes" when the 95% t-interval of the mean difference lies on A's side of 0 in every
seed, "no" when on B's side in every seed, "within noise" otherwise, and "not run" when a stage it needs did not
finish (a run cut part-way still reports what it has).

    python report.py --runs runs/gpu                  # rewrite results/gpu/ from whatever stages finished
    python report.py --runs runs/cpu --out somewhere/
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import flags
import rope
from rope import RopeConfig

NOT_RUN = "not run"
CONTROL_FAILED = "not decided (control failed)"
LABELS = {"default": "RoPE", "linear": "PI", "ntk": "NTK-aware", "ntk_by_parts": "NTK-by-parts", "yarn": "YaRN",
          "dynamic": "Dynamic NTK", "dynamic_yarn": "Dynamic YaRN"}


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


def interval(d: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of d at that level; infinite for fewer than 2 values."""
    mean = float(np.mean(d))
    if len(d) < 2:
        return mean, -math.inf, math.inf
    half = t_quantile(0.5 + level / 2, len(d) - 1) * float(np.std(d, ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def units(run: dict, T: int, key: str) -> np.ndarray:
    """Per-unit scores of a run at context T: each document's mean NLL, or each retrieval trial's accuracy."""
    if key == "ppl":
        return np.array(run["ppl"][str(T)]["doc_nll"])
    return np.mean([acc for acc in run["retrieval"][str(T)]["trial_acc"].values()], axis=0)


def compare(a: list, b: list, T: int, key: str = "ppl") -> dict:
    """Does A do better than B at T (lower NLL, or higher recall)? a, b: one run per seed, None for a seed that did
    not run (a single run stands for every seed of the other side). The verdict rule of the module docstring, and
    the numbers behind it: the intervals of A - B per seed that both sides ran."""
    pairs = list(zip(a, b)) if len(a) == len(b) else [(x, y) for x in a for y in b]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    seeds = max(len(a), len(b))
    if not pairs:
        return {"verdict": NOT_RUN, "mean": math.nan, "intervals": [], "n": 0, "seeds": 0, "of": seeds}
    rows = [interval(units(x, T, key) - units(y, T, key)) for x, y in pairs]
    below, above = all(hi < 0 for _, _, hi in rows), all(lo > 0 for _, lo, _ in rows)
    better, worse = (below, above) if key == "ppl" else (above, below)
    verdict = "yes" if better else "no" if worse else "within noise"
    return {"verdict": verdict, "mean": float(np.mean([m for m, _, _ in rows])), "intervals": rows,
            "n": len(units(pairs[0][0], T, key)), "seeds": len(rows), "of": seeds}


def evidence(c: dict, key: str = "ppl") -> str:
    if c["verdict"] == NOT_RUN:
        return "its stages did not finish"
    what = "\u0394NLL (nats, A - B)" if key == "ppl" else "\u0394recall (A - B)"
    spans = ", ".join(f"[{lo:+.4f}, {hi:+.4f}]" for _, lo, hi in c["intervals"])
    unit = "documents" if key == "ppl" else "trials"
    seeds = "" if c["of"] <= 1 else ", per seed" if c["seeds"] == c["of"] else f", {c['seeds']} of {c['of']} seeds"
    return f"{what} {c['mean']:+.4f}; 95% CI {spans} ({c['n']} {unit}{seeds})"


def present(runs: list) -> list[dict]:
    """The runs that finished (None marks a seed whose stage did not)."""
    return [r for r in runs if r is not None]


def ppl(runs: list, T: int) -> float:
    """Perplexity at T, the geometric mean over the seeds that ran (exp of the mean NLL)."""
    return math.exp(np.mean([r["ppl"][str(T)]["nll"] for r in present(runs)]))


def recall(runs: list, T: int) -> float:
    """Needle recall at T, the mean over depths and the seeds that ran."""
    return float(np.mean([r["retrieval"][str(T)]["mean"] for r in present(runs)]))


def method_runs(res: dict) -> tuple[dict[str, list], dict[str, list]]:
    """(without fine-tuning, fine-tuned), each {method: one run per seed, None where it did not run}; the
    fine-tuned ones include YaRN at s_long and the baseline from scratch at L' where the preset has them."""
    c, nf = res["config"], {m: [r] for m, r in res["no_finetune"].items()}
    return nf, {**res["finetuned"], f"YaRN s={c['s_long']}": res["short_long"],
                **({"from scratch at L'": res["scratch_long"]} if c.get("scratch_long") else {})}


# Claims
def claims(res: dict) -> list[dict]:
    """The paper's claims, each decided from the numbers: {"claim", "held", "evidence"}."""
    c, out = res["config"], []
    L, Le, far = c["L"], c["L"] * c["s"], c["L"] * c["s_long"]
    nf, ft = method_runs(res)

    def add(claim, verdict, text):
        out.append({"claim": claim, "held": verdict, "evidence": text})

    def vs(claim, a, b, T, key="ppl"):
        result = compare(a, b, T, key)
        add(claim, result["verdict"], evidence(result, key))
        return result["verdict"]

    static = ("linear", "ntk", "ntk_by_parts", "default")
    verdicts = [vs(f"1. No fine-tuning, at L'={Le}: YaRN beats {LABELS[m]}", nf["yarn"], nf[m], Le) for m in static]
    least = NOT_RUN if NOT_RUN in verdicts else "yes" if all(v == "yes" for v in verdicts) else \
        "no" if "no" in verdicts else "within noise"
    add(f"1. No fine-tuning, at L'={Le}: YaRN degrades least of the static methods", least,
        "its stages did not finish" if least == NOT_RUN else
        ", ".join(f"{LABELS[m]} {ppl(nf[m], Le):.3f}" for m in ("yarn", *static)))
    vs(f"1b. No fine-tuning, beyond L' (at {2 * Le}): YaRN beats plain RoPE", nf["yarn"], nf["default"], 2 * Le)
    # at l' = L' a dynamic variant is its static one at s (tested); past it they part
    vs(f"1c. No fine-tuning, at {2 * Le}: Dynamic YaRN beats Dynamic NTK", nf["dynamic_yarn"], nf["dynamic"], 2 * Le)
    vs(f"1d. No fine-tuning, at {2 * Le}: Dynamic YaRN beats YaRN with s fixed", nf["dynamic_yarn"], nf["yarn"], 2 * Le)
    for m in ("linear", "ntk"):
        vs(f"2. Fine-tuned with equal budgets, at L'={Le}: YaRN beats {LABELS[m]}", ft["yarn"], ft[m], Le)
    vs(f"2b. Fine-tuned, beyond L' (at {2 * Le}): YaRN beats PI", ft["yarn"], ft["linear"], 2 * Le)
    vs(f"2c. Baseline: fine-tuned YaRN beats plain RoPE fine-tuned at L'={Le}", ft["yarn"], ft["default"], Le)
    if c.get("scratch_long"):
        vs(f"2d. Baseline: fine-tuned YaRN beats a model trained at L'={Le} from scratch on the same tokens",
           ft["yarn"], res["scratch_long"], Le)
    vs(f"2e. Short-context check, at L={L}: the pretrained model beats fine-tuned YaRN (extending costs there)",
       nf["default"], ft["yarn"], L)
    vs(f"3. Train short, test long: YaRN s={c['s_long']} fine-tuned at {Le} beats YaRN s={c['s']} at {far}",
       res["short_long"], ft["yarn"], far)
    out += temperature_claims(res["temperature"] or {}, c["temp_scales"])
    out += retrieval_claims(res, L, Le)
    return out


def temperature_claims(temp: dict, scales=None) -> list[dict]:
    """Per s: is the paper's sqrt(1/t) = 0.1 ln s + 1 as good as the sweep's best, and does a temperature beat
    none (1.0)? Paired by document against the best factor of the sweep; "not run" for an s the sweep lacks."""
    out = []
    for s in [str(s) for s in scales] if scales is not None else list(temp):
        paper_factor = temp[s]["paper"] if s in temp else str(round(rope.yarn_mscale(float(s)), 4))
        # The names do not carry the best factor, which may differ between runs: agree() matches claims by name.
        claim_4 = (f"4. Temperature, s={s}: the paper's \u221a(1/t) = {float(paper_factor):.3f} is as good as the "
                   "sweep's best, A = the paper's, B = the best")
        claim_4b = f"4b. Temperature, s={s}: the sweep's best \u221a(1/t) beats none (1.0)"
        if s not in temp:
            out += [{"claim": claim, "held": NOT_RUN, "evidence": "its stage did not finish"}
                    for claim in (claim_4, claim_4b)]
            continue
        runs = {a: {"ppl": {"T": x}} for a, x in temp[s]["factors"].items()}
        best = min(runs, key=lambda a: runs[a]["ppl"]["T"]["nll"])
        paper = compare([runs[paper_factor]], [runs[best]], "T")
        some = compare([runs[best]], [runs["1.0"]], "T")
        named = f"best {float(best):.3f}; "
        out.append({"claim": claim_4, "held": "no" if paper["verdict"] == "no" else "yes",
                    "evidence": named + evidence(paper)})
        out.append({"claim": claim_4b, "held": "no" if best == "1.0" else some["verdict"],
                    "evidence": "1.0 is the sweep's best" if best == "1.0" else named + evidence(some)})
    return out


def retrieval_claims(res: dict, L: int, Le: int) -> list[dict]:
    out = []
    control = ("5. Control: the pretrained model (plain RoPE) at its own context L", [res["no_finetune"]["default"]], L)
    for name, runs, T in (control, (f"5b. Fine-tuned YaRN at L'={Le}", res["finetuned"]["yarn"], Le)):
        claim, ran = f"{name} recalls the needle beyond chance", present(runs)
        if not ran:
            out.append({"claim": claim, "held": NOT_RUN, "evidence": "its stages did not finish"})
            continue
        lift = [interval(units(r, T, "retrieval") - np.array(r["retrieval"][str(T)]["chance"])) for r in ran]
        verdict = "yes" if all(lo > 0 for _, lo, _ in lift) else "no" if all(hi < 0 for _, _, hi in lift) \
            else "within noise"
        chance = np.mean([np.mean(r["retrieval"][str(T)]["chance"]) for r in ran])
        seeds = f" ({len(ran)} of {len(runs)} seeds)" if len(ran) < len(runs) else ""
        out.append({"claim": claim, "held": verdict,
                    "evidence": f"recall {recall(ran, T):.3f}, chance {chance:.3f}; lift 95% CI "
                                + ", ".join(f"[{lo:+.3f}, {hi:+.3f}]" for _, lo, hi in lift) + seeds})
    result = compare(res["finetuned"]["yarn"], res["finetuned"]["linear"], Le, "retrieval")
    out.append({"claim": f"5c. Fine-tuned, at L'={Le}: YaRN recalls better than PI", "held": result["verdict"],
                "evidence": evidence(result, "retrieval")})
    if out[0]["held"] not in ("yes", NOT_RUN):  # a model that cannot copy at L: the probe measures nothing past it
        for c in (c for c in out[1:] if c["held"] != NOT_RUN):
            c.update(held=CONTROL_FAILED, evidence="the control (claim 5) does not recall beyond chance, so the probe "
                     f"cannot tell the methods apart; the numbers, for the record: {c['evidence']}")
    return out


def agree(a: list[dict], b: list[dict]) -> list[str]:
    """The claims on which two reports disagree, other than where either reached no verdict ('within noise', 'not
    run', a failed control): two runs with different seeds must agree on every other verdict."""
    theirs, undecided = {c["claim"]: c["held"] for c in b}, {"within noise", NOT_RUN, CONTROL_FAILED}
    return [c["claim"] for c in a if c["claim"] in theirs and not undecided & {c["held"], theirs[c["claim"]]}
            and c["held"] != theirs[c["claim"]]]


# Tables and plots
def table(runs: dict[str, list], contexts, score=ppl, digits: int = 3) -> str:
    """One row per method, one column per context: score(the method's runs, T), perplexity by default."""
    lines = ["| method | " + " | ".join(str(T) for T in contexts) + " |", "|---|" + "---|" * len(contexts)]
    for name, rs in runs.items():
        cells = [f"{score(rs, T):.{digits}f}" if present(rs) else NOT_RUN for T in contexts]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finished(runs: dict[str, list]) -> dict[str, list[dict]]:
    """{method: its runs that finished}, for the methods with any."""
    return {name: present(rs) for name, rs in runs.items() if present(rs)}


def plot_ppl(plt, runs: dict[str, list[dict]], c: dict, title: str):
    """Perplexity against context, one line per method: the mean over seeds, bars from the lowest to the highest
    seed (one seed: no bars)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    contexts = c["contexts"]
    for i, (name, rs) in enumerate(runs.items()):
        per_seed = np.array([[r["ppl"][str(T)]["ppl"] for T in contexts] for r in rs])
        mid = np.array([ppl(rs, T) for T in contexts])
        ax.errorbar(contexts, mid, yerr=[mid - per_seed.min(0), per_seed.max(0) - mid], fmt="o-", ms=3, capsize=3,
                    color=f"C{i}", label=LABELS.get(name, name))
    for x, text in ((c["L"], " L"), (c["L"] * c["s"], f" L'={c['s']}L")):
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.text(x, 0.98, text, va="top", color="gray", transform=ax.get_xaxis_transform())
    ax.set(xscale="log", xlabel="evaluation context (tokens)", title=title,
           ylabel=f"perplexity (last {c['stride']} tokens of each window)")
    ax.minorticks_off()
    ax.set_xticks(contexts, [str(T) for T in contexts])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_recall(plt, runs: dict[str, list[dict]], title: str):
    """One heat map per method: recall (mean over seeds) by needle depth and context."""
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, rs) in zip(axes.flat, runs.items()):
        contexts, depths = list(rs[0]["retrieval"]), list(rs[0]["retrieval"][next(iter(rs[0]["retrieval"]))]["acc"])
        grid = np.array([[np.mean([r["retrieval"][T]["acc"][d] for r in rs]) for T in contexts] for d in depths])
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(contexts)), contexts, fontsize=7)
        ax.set_yticks(range(len(depths)), depths, fontsize=7)
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
        ax.set_title(LABELS.get(name, name), fontsize=9)
        ax.set_xlabel("context", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    chance = np.mean(next(iter(runs.values()))[0]["retrieval"][contexts[0]]["chance"])
    fig.suptitle(f"{title}; chance {chance:.2f}", fontsize=10)
    return fig


def plot_scaling(plt, c: dict):
    """theta'_d / theta_d against wavelength for each method at this preset's head_dim, L and s."""
    head_dim, L, s = c["d_model"] // c["n_head"], c["L"], c["s"]
    theta = rope.base_inv_freq(head_dim, 10000.0)
    wavelength = (2 * math.pi / theta).numpy()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, m in enumerate(("default", "linear", "ntk", "ntk_by_parts")):
        freqs, _ = rope.inv_freq(head_dim, RopeConfig(type=m, factor=float(s), original_context=L), s * L)
        ax.plot(wavelength, (freqs.double() / theta).numpy(), "o-", ms=3, color=f"C{i}",
                label=LABELS[m] + (" / YaRN" if m == "ntk_by_parts" else ""))
    for x, text in ((L, " L"), (s * L, " sL"), (L / 32, " L/32 (r_d = \u03b2)")):
        ax.axvline(x, color="gray", ls=":")
        ax.text(x, 0.5, text, color="gray", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set(xscale="log", yscale="log", xlabel="wavelength \u03bb_d = 2\u03c0/\u03b8_d (tokens)",
           ylabel="\u03b8'_d / \u03b8_d", title=f"Per-pair frequency scaling: head_dim {head_dim}, L={L}, s={s}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_temperature(plt, temp: dict):
    """Per s: each sqrt(1/t)'s mean NLL difference from the best one, with its 95% interval over documents."""
    fig, axes = plt.subplots(1, len(temp), figsize=(3.4 * len(temp), 3.6), squeeze=False)
    for ax, (s, r) in zip(axes[0], temp.items()):
        best = min(r["factors"], key=lambda a: r["factors"][a]["nll"])
        xs = sorted(r["factors"], key=float)
        rows = [interval(np.array(r["factors"][a]["doc_nll"]) - np.array(r["factors"][best]["doc_nll"])) for a in xs]
        mid = np.array([m for m, _, _ in rows])
        ax.errorbar([float(a) for a in xs], mid, yerr=[mid - [lo for _, lo, _ in rows], [hi for _, _, hi in rows]
                                                        - mid], fmt="o-", ms=3, capsize=3)
        ax.axvline(float(r["paper"]), color="k", ls="--", lw=1, label=f"0.1 ln s + 1 = {float(r['paper']):.3f}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(title=f"s = {s}, at {r['context']}", xlabel="\u221a(1/t)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("\u0394NLL vs the best (nats)")
    fig.suptitle("Temperature sweep: NTK-by-parts with an attention factor, pretrained model", fontsize=10)
    return fig


def plots(res: dict, out: Path) -> list[str]:
    """The figures of whatever finished, as PNG files in out; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, (nf, ft) = res["config"], (finished(runs) for runs in method_runs(res))
    figures = {"scaling_per_dimension.png": plot_scaling(plt, c)}
    if nf:
        figures["ppl_no_finetune.png"] = plot_ppl(plt, nf, c, "Perplexity vs context, no fine-tuning")
        figures["retrieval_no_finetune.png"] = plot_recall(plt, nf, "Needle recall, no fine-tuning")
    if ft:
        figures["ppl_finetuned.png"] = plot_ppl(plt, ft, c, "Perplexity vs context, fine-tuned at L' (bars: range "
                                                "over seeds)")
        figures["retrieval_finetuned.png"] = plot_recall(plt, ft, "Needle recall, fine-tuned (mean over seeds)")
    if res["temperature"]:
        figures["temperature.png"] = plot_temperature(plt, res["temperature"])
    for name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return list(figures)


# report.md
def setup_lines(res: dict) -> list[str]:
    c = res["config"]
    head_dim, L, s = c["d_model"] // c["n_head"], c["L"], c["s"]
    yarn = RopeConfig(type="yarn", factor=float(s), original_context=L)
    low, high = rope.ramp_bounds(head_dim, yarn)
    fast = sum(1 for d in range(head_dim // 2) if d < rope.correction_dim(yarn.beta_fast, head_dim, yarn.base, L))
    kept = int((rope.ramp(head_dim, yarn) == 0).sum())
    pre, fine = c["pretrain_steps"] * c["pretrain_batch"] * L, c["finetune_steps"] * c["finetune_batch"] * L * s
    return [
        f"- Data: {c['data_source']}, {c['tokenizer']} tokens (vocabulary {c['vocab_size']}); held-out documents "
        "for every evaluation.",
        f"- Model: d_model {c['d_model']}, {c['n_layer']} layers, {c['n_head']} heads of {head_dim}, plain RoPE "
        f"(base 10000) pretrained at L = {L} for {c['pretrain_steps']} steps x {c['pretrain_batch']} sequences "
        f"({pre:,} tokens), lr {c['lr']}.",
        f"- Extension: s = {s}, L' = {L * s}. Every method fine-tuned {c['finetune_steps']} steps x "
        f"{c['finetune_batch']} sequences of L' ({fine:,} tokens, {100 * fine / pre:.1f}% of pretraining) at lr "
        f"{c['finetune_lr']}, the same for every method, with {len(c['finetune_seeds'])} seeds (data order) "
        f"{list(c['finetune_seeds'])}.",
        f"- Why this size: with head_dim {head_dim}, base 10000 and L = {L}, pairs 0..{fast - 1} make more than "
        f"beta_fast = 32 rotations inside L ({fast} pair(s)), and NTK-by-parts / YaRN keep {kept} pair(s) exactly "
        f"(ramp from pair {low} to pair {high} of {head_dim // 2}): the high-frequency band the paper's argument "
        "is about. " + ("" if fast else "None does here, so that argument cannot show at this size."),
        f"- Train short, test long: YaRN s = {c['s_long']} fine-tuned at L' = {L * s} (same budget), evaluated up to "
        f"{L * c['s_long']}." + (" Baseline: a model pretrained at L' from scratch on the same total tokens."
                                  if c.get("scratch_long") else ""),
        *([f"- Copying (which the retrieval probe needs) forms within the budget thanks to previous-token "
           f"embeddings (prev_tokens {c['prev_tokens']}), a warm-up of {c['warmup_steps']} steps x "
           f"{c['warmup_batch']} windows of {c['warmup_block']} on the induction task at a constant lr, and the "
           f"'{c['data_mix']}' mix during pretraining (data/recall.py); fine-tuning and evaluation use natural text "
           "only."] if c["prev_tokens"] else []),
        f"- Perplexity (per token: per byte for the byte tokenizer): up to {c['max_docs']} held-out documents with "
        f"room for a scored window at the longest context ({res['contexts'][-1]} + {c['stride']} tokens), the same "
        f"documents and scored tokens at every context; windows scoring their last {c['stride']} tokens, at most "
        f"{c['max_windows']} per document.",
        f"- Retrieval: a needle of {c['needle_len']} random {'letters' if c['tokenizer'] == 'bytes' else 'words'} at "
        f"depth d of the text, its first {c['needle_len'] // 4} tokens repeated at the end; top-1 recall of the rest, "
        f"teacher-forced; {c['trials']} trials per cell; chance = a guesser that knows the needle's tokens but not "
        "their order.",
    ]


def markdown(res: dict, plot_files: list[str]) -> str:
    c, (nf, ft) = res["config"], method_runs(res)
    missing = sum(x["held"] == NOT_RUN for x in res["claims"])
    lines = [f"# YaRN toy reproduction: preset `{res['preset']}`", "",
             f"Generated by `{res['command']}` on {res['device']}, torch {res['torch']}, commit {res['commit']}. "
             "Every number comes from `results.json`; every verdict is computed from those numbers by report.py.",
             *(["", f"**This run did not finish:** {missing} of {len(res['claims'])} claims are 'not run', because "
                "stages they need did not finish (see the wall times below)."] if missing else []),
             "", "## Set-up", "", *setup_lines(res), "", "## Claims, decided from the numbers", "",
             "| claim | held | numbers |", "|---|---|---|"]
    lines += [f"| {x['claim']} | {x['held']} | {x['evidence']} |" for x in res["claims"]]
    lines += ["", "How to read it: 'yes' means the 95% t-interval of the per-document difference (per trial for "
              "recall) lies on the claim's side of zero for every fine-tuning seed; 'no' that it lies on the other "
              "side for every seed; 'within noise' anything else; 'not run' that a stage it needs did not finish; "
              "'not decided (control failed)' that the pretrained model does not recall the needle at its own "
              "context, so the retrieval probe cannot compare methods. "
              "An interval covers the choice of evaluation documents; agreement across seeds covers the "
              "fine-tuning run. Without fine-tuning there is one pretrained model, so those intervals cover the "
              "documents only.", "",
              "## Perplexity, no fine-tuning (the pretrained model, RoPE swapped)", "",
              table(nf, res["contexts"]), "## Perplexity, fine-tuned at L' (geometric mean over seeds)", "",
              table(ft, res["contexts"]), "## Needle recall (mean over depths), no fine-tuning", "",
              table(nf, res["retrieval_contexts"], recall, 2),
              "## Needle recall (mean over depths and seeds), fine-tuned", "",
              table(ft, res["retrieval_contexts"], recall, 2),
              "## Temperature (NTK-by-parts with an attention factor, pretrained model, perplexity at sL)", ""]
    if res["temperature"]:
        lines += ["| s | context | best \u221a(1/t) | ppl at best | ppl at 1.0 | paper 0.1 ln s + 1 | ppl at paper's |",
                  "|---|---|---|---|---|---|---|"]
    for s, r in (res["temperature"] or {}).items():
        best = min(r["factors"], key=lambda a: r["factors"][a]["nll"])
        lines.append(f"| {s} | {r['context']} | {float(best):.3f} | {r['factors'][best]['ppl']:.3f} | "
                     f"{r['factors']['1.0']['ppl']:.3f} | {float(r['paper']):.3f} | "
                     f"{r['factors'][r['paper']]['ppl']:.3f} |")
    lines += [] if res["temperature"] else [NOT_RUN]
    lines += ["", "## Wall time per stage (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in res["stage_seconds"].items()]
    lines += [f"| total | {sum(res['stage_seconds'].values()):.1f} |", "", "## Training runs", "",
              "| run | steps | tokens/s | MFU | seconds |", "|---|---|---|---|---|"]
    for name, t in res["train"].items():
        mfu = "n/a" if t.get("mfu") is None else f"{100 * t['mfu']:.1f}%"
        lines.append(f"| {name} | {t['steps']} | {t['tokens_per_s']:,.0f} | {mfu} | {t['elapsed_s']:.1f} |")
    lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in plot_files]
    lines += ["", "## Config", "", "```json", json.dumps(c, indent=2), "```", ""]
    return "\n".join(lines)


# Inputs and outputs
def gather(runs: Path) -> dict:
    """Every stage output under a reproduce.py runs folder, in one dict (report.py's input, and results.json):
    what a stage did not produce is None (a method's run) or absent from the lists of seeds."""
    runs, ev = Path(runs), Path(runs) / "eval"
    if not (runs / "job.json").is_file():
        raise ValueError(f"{runs} holds no job.json: it is not a runs folder of reproduce.py; give --runs the folder "
                         "`python reproduce.py --runs` wrote")

    def read(path: Path):
        return json.loads(path.read_text()) if path.is_file() else None

    job = read(runs / "job.json")
    c, seeds = job["config"], job["config"]["finetune_seeds"]
    return {**{k: v for k, v in job.items() if k not in ("methods", "no_finetune_methods")},
            "no_finetune": {m: read(ev / f"nft_{m}.json") for m in job["no_finetune_methods"]},
            "finetuned": {m: [read(ev / f"ft_{m}_{seed}.json") for seed in seeds] for m in job["methods"]},
            "short_long": [read(ev / f"short_long_{seed}.json") for seed in seeds],
            "scratch_long": [read(ev / "scratch_long.json")] if c.get("scratch_long") else None,
            "temperature": read(runs / "temperature.json"),
            "train": {d.name: read(d / "summary.json") for d in sorted(runs.iterdir())
                      if (d / "summary.json").is_file()},
            "stage_seconds": read(runs / "stages.json") or {}}


def write(res: dict, out: Path) -> list[dict]:
    """Decide the claims, draw the plots, write results.json and report.md into out; returns the claims."""
    from system import atomic_write, write_json

    out.mkdir(parents=True, exist_ok=True)
    res["claims"] = claims(res)
    files = plots(res, out)
    write_json(out / "results.json", res)
    atomic_write(out / "report.md", markdown(res, files))
    return res["claims"]


@dataclass(frozen=True)
class ReportConfig:
    runs: str  # the runs folder of a reproduce.py invocation, finished or not (it holds job.json)
    out: str | None = None  # the report's folder; default results/<preset>

    def __post_init__(self):
        flags.check_types(self)


def main(argv) -> list[dict]:
    args = flags.build(ReportConfig, flags.parse(argv, flags.flag_table((ReportConfig, "")), "python report.py",
                                                 __doc__))
    res = gather(Path(args.runs))
    out = Path(args.out or f"results/{res['preset']}")
    found = write(res, out)
    done = sum(x["held"] != NOT_RUN for x in found)
    print(f"report: {out / 'report.md'}; {done} of {len(found)} claims decided from the stages that finished")
    return found


if __name__ == "__main__":
    sys.exit(flags.cli(main))
