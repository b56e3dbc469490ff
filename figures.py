"""The main job's figures, drawn from the results report.py gathers: perplexity and needle recall
against context, the per-pair frequency scaling, the temperature sweep, and the fine-tuning loss
curves (the paper's Figure 1 at toy scale). Each takes matplotlib's pyplot and returns a figure;
draw() saves those whose inputs exist."""

import math
from pathlib import Path

import numpy as np

import rope
from rope import RopeConfig

LABELS = {
    "default": "RoPE",
    "linear": "PI",
    "ntk": "NTK-aware",
    "ntk_by_parts": "NTK-by-parts",
    "yarn": "YaRN",
    "dynamic": "Dynamic NTK",
    "dynamic_yarn": "Dynamic YaRN",
}


def mark_lengths(ax, c: dict):
    for x, text in ((c["L"], " L"), (c["L"] * c["s"], f" L'={c['s']}L")):
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.text(x, 0.98, text, va="top", color="gray", transform=ax.get_xaxis_transform())


def plot_ppl(plt, runs: dict[str, list[dict]], c: dict, title: str):
    """Perplexity against context, one line per method over the contexts it was evaluated at: the
    geometric mean over seeds, bars from the lowest to the highest seed (one seed: no bars)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rs) in enumerate(runs.items()):
        contexts = sorted(int(T) for T in rs[0]["ppl"])
        per_seed = np.array([[r["ppl"][str(T)]["ppl"] for T in contexts] for r in rs])
        mid = np.exp(np.mean([[r["ppl"][str(T)]["nll"] for T in contexts] for r in rs], axis=0))
        spread = [
            np.maximum(mid - per_seed.min(0), 0),
            np.maximum(per_seed.max(0) - mid, 0),
        ]  # rounding: >= 0
        ax.errorbar(
            contexts,
            mid,
            yerr=spread,
            fmt="o-",
            ms=3,
            capsize=3,
            color=f"C{i}",
            label=LABELS.get(name, name),
        )
    mark_lengths(ax, c)
    ax.set(
        xscale="log",
        xlabel="evaluation context T (tokens)",
        title=title,
        ylabel=f"perplexity ({c['score']} tokens per document, history >= T/2)",
    )
    ax.minorticks_off()
    ax.set_xticks(c["contexts"], [str(T) for T in c["contexts"]])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_recall(plt, runs: dict[str, list[dict]], title: str):
    """One heat map per method: teacher-forced recall (mean over seeds) by needle depth and
    context."""
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, rs) in zip(axes.flat, runs.items()):
        contexts = list(rs[0]["retrieval"])
        depths = list(rs[0]["retrieval"][contexts[0]]["acc"])
        grid = np.array(
            [[np.mean([r["retrieval"][T]["acc"][d] for r in rs]) for T in contexts] for d in depths]
        )
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(contexts)), contexts, fontsize=7)
        ax.set_yticks(range(len(depths)), depths, fontsize=7)
        for (i, j), v in np.ndenumerate(grid):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="w" if v < 0.5 else "k",
            )
        ax.set_title(LABELS.get(name, name), fontsize=9)
        ax.set_xlabel("context", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    first = next(iter(runs.values()))[0]["retrieval"]
    fig.suptitle(
        f"{title}; chance {np.mean(next(iter(first.values()))['chance']):.2f}", fontsize=10
    )
    return fig


def plot_scaling(plt, c: dict):
    """theta'_d / theta_d against wavelength for each method at this preset's head_dim, L and s."""
    head_dim, L, s = c["d_model"] // c["n_head"], c["L"], c["s"]
    theta = rope.base_inv_freq(head_dim, 10000.0)
    wavelength = (2 * math.pi / theta).numpy()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, m in enumerate(("default", "linear", "ntk", "ntk_by_parts")):
        cfg = RopeConfig(type=m, factor=float(s), original_context=L)
        freqs, _ = rope.frequencies(head_dim, cfg, s * L)
        ax.plot(
            wavelength,
            (freqs.double() / theta).numpy(),
            "o-",
            ms=3,
            color=f"C{i}",
            label=LABELS[m] + (" / YaRN" if m == "ntk_by_parts" else ""),
        )
    for x, text in ((L, " L"), (s * L, " sL"), (L / 32, " L/32 (r_d = \u03b2)")):
        ax.axvline(x, color="gray", ls=":")
        ax.text(x, 0.5, text, color="gray", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="wavelength \u03bb_d = 2\u03c0/\u03b8_d (tokens)",
        ylabel="\u03b8'_d / \u03b8_d",
        title=f"Per-pair frequency scaling: head_dim {head_dim}, L={L}, s={s}",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_temperature(plt, temp: dict, interval, fitted: float | None):
    """Per s: the mean NLL difference of each a (sqrt(1/t) = a ln s + 1) from a = 0 (no
    temperature), with its 95% interval over documents; the paper's a = 0.1 and the fitted a
    marked."""
    fig, axes = plt.subplots(1, len(temp), figsize=(3.4 * len(temp), 3.6), squeeze=False)
    for ax, (s, r) in zip(axes[0], temp.items()):
        xs = sorted(r["a"], key=float)
        rows = [
            interval(np.array(r["a"][a]["doc_nll"]) - np.array(r["a"]["0.0"]["doc_nll"]))
            for a in xs
        ]
        mid = np.array([m for m, _, _ in rows])
        ax.errorbar(
            [float(a) for a in xs],
            mid,
            yerr=[mid - [lo for _, lo, _ in rows], [hi for _, _, hi in rows] - mid],
            fmt="o-",
            ms=3,
            capsize=3,
        )
        ax.axvline(0.1, color="k", ls="--", lw=1, label="paper: a = 0.1")
        if fitted is not None:
            ax.axvline(fitted, color="C3", ls=":", lw=1.5, label=f"fitted a = {fitted:.3f}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(title=f"s = {s}, at {r['context']}", xlabel="a in \u221a(1/t) = a ln s + 1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("\u0394NLL vs no temperature (nats)")
    fig.suptitle(
        "Temperature sweep: NTK-by-parts with an attention factor, pretrained model", fontsize=10
    )
    return fig


def plot_curves(
    plt, curves: dict[str, list[dict]], smooth, c: dict, target: float | None, decided: float
):
    """Left: fine-tuning loss against step per method (trailing mean, one line per seed); right:
    held-out NLL at L' against step (log x), the mean over the seeds scored there (a thin line per
    seed), with the efficiency target (YaRN's level after its budget) and the step count the claim
    compares with (SPEEDUP x that budget)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (m, per_seed) in enumerate(curves.items()):
        for j, x in enumerate(per_seed):
            loss = smooth(x["train"])
            left.plot(
                np.arange(len(loss)),
                loss,
                color=f"C{i}",
                lw=0.8,
                alpha=0.7,
                label=None if j else LABELS[m],
            )
            at = sorted(x["val"], key=int)
            right.plot(
                [int(k) for k in at], [x["val"][k] for k in at], color=f"C{i}", lw=0.6, alpha=0.5
            )
        steps = sorted({int(k) for x in per_seed for k in x["val"]})
        mean = [np.mean([x["val"][str(k)] for x in per_seed if str(k) in x["val"]]) for k in steps]
        right.plot(steps, mean, "o-", ms=3, color=f"C{i}", label=LABELS.get(m, m))
    if target is not None:
        right.axhline(
            target,
            color="k",
            ls="--",
            lw=1,
            label=f"target: YaRN after {c['finetune_steps']} steps",
        )
        right.axvline(decided, color="gray", ls=":", lw=1, label=f"{decided:.0f} steps (2.5x)")
    left.set(
        xlabel="fine-tuning step",
        ylabel="training loss (nats, trailing mean)",
        title=f"Fine-tuning at L' = {c['s'] * c['L']}, the same batches",
    )
    right.set(
        xlabel="fine-tuning step (0 = no fine-tuning)",
        ylabel="held-out NLL at L' (nats)",
        title="Held-out NLL at L' against steps",
    )
    ticks = [0, *c.get("curve_steps", [c["finetune_steps"]])]
    for ax in (left, right):
        ax.set_xscale("symlog", linthresh=1, linscale=0.25)  # 0 to 1: a quarter decade
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlim(-0.2, ticks[-1] * 1.15)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def draw(figures: dict, out: Path, plt) -> list[str]:
    """Save each figure as out/<name> and close it; returns the names."""
    for name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(Path(out) / name, dpi=110)
        plt.close(fig)
    return list(figures)
