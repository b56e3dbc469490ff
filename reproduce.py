"""
The whole toy reproduction of the YaRN paper's claims (EXPERIMENT.md), one command:

    python reproduce.py --preset gpu            # one H100, under 20 minutes (an estimate: not yet run on a GPU)
    python reproduce.py --preset cpu            # 2 CPU cores, under 10 minutes, a much smaller model
    python reproduce.py --preset tiny           # seconds-scale smoke test (tests/test_reproduce.py)

Stages, each skipped when its output already exists, so re-running resumes where a run stopped:
  1. data         prepare data/stdlib (Python's standard library source) if missing
  2. pretrain     a model with plain RoPE at context L
  3. finetune     extend to L' = s L with each method (plain RoPE, PI, NTK-aware, NTK-by-parts, YaRN) and
                  fine-tune each with the same small budget at L'
  4. short_long   "train short, test long": YaRN with a larger scale s2 (s2 L > L'), fine-tuned at L'
  5. evaluate     every fine-tuned model, and the pretrained model extended without fine-tuning by every method
                  (plus the dynamic ones), on the same perplexity ladder L .. 2L' and retrieval grid (eval.py)
  6. temperature  sweep sqrt(1/t) for NTK-by-parts on the pretrained model at several s (paper Sec. 3.4)
  7. report       <out>/report.md, <out>/results.json and PNG plots; every claim is decided from the numbers

Checkpoints and per-stage outputs go to --runs (default runs/<preset>, git-ignored); the report to --out
(default results/<preset>).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import eval as evaluation
import rope as rope_lib
from rope import RopeConfig

REPO = Path(__file__).resolve().parent
METHODS = ("default", "linear", "ntk", "ntk_by_parts", "yarn")  # extended by fine-tuning, in this order
NO_FINETUNE = METHODS + ("dynamic", "dynamic_yarn")  # the pretrained model under each, no training
LABELS = {
    "default": "RoPE", "linear": "PI", "ntk": "NTK-aware", "ntk_by_parts": "NTK-by-parts", "yarn": "YaRN",
    "dynamic": "Dynamic NTK", "dynamic_yarn": "Dynamic YaRN",
}

# ----------------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class Preset:
    # model (head_dim = d_model / n_head)
    d_model: int
    n_layer: int
    n_head: int
    L: int  # pretraining context
    s: int  # the extension scale: fine-tune at L' = s L
    # budgets
    pretrain_steps: int
    pretrain_batch: int
    finetune_steps: int
    finetune_batch: int
    s_long: int  # "train short, test long": YaRN at this scale, fine-tuned at L' (s_long L > L')
    # evaluation
    stride: int
    max_docs: int
    max_windows: int
    trials: int
    depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    temp_scales: tuple = (2, 4, 8, 16)
    temp_factors: tuple = (0.9, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.4, 1.5)
    lr: float = 1e-3
    # fine-tuning starts a fresh AdamW at the pretraining's final lr (lr / 10), as the paper fine-tunes Llama 2 at
    # 2e-5, about its final pretraining lr. Higher undoes pretraining in a few steps: on the cpu preset, 1e-3
    # (5x the final 2e-4) left every method worse after fine-tuning than before it.
    finetune_lr: float = 1e-4
    train_eval_batches: int = 20  # train.py's own validation loss (its log), batches per evaluation
    data_source: str = "stdlib"
    val_fraction: float = 0.05

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def L_ext(self) -> int:
        return self.s * self.L

    @property
    def contexts(self) -> list[int]:
        """L, 2L, 4L, ... up to at least 2 L' and s_long L (the train-short-test-long reach)."""
        top = max(2 * self.L_ext, self.s_long * self.L)
        return [self.L * 2**k for k in range(int(math.log2(top // self.L)) + 1)]


PRESETS = {
    # train.py's default model: head_dim 128 and L = 512 leave pairs 0..6 (r_d > 32) purely extrapolated by
    # NTK-by-parts / YaRN, the high-frequency band the paper's argument is about. 82M tokens of pretraining
    # (~3-5 min at 300-500k tokens/s), 2.6M tokens (~3%) of fine-tuning per method at L' = 4096.
    "gpu": Preset(d_model=512, n_layer=8, n_head=4, L=512, s=8, pretrain_steps=5000, pretrain_batch=32,
                  finetune_steps=80, finetune_batch=8, s_long=16, stride=256, max_docs=16, max_windows=4,
                  trials=16, lr=1e-3, finetune_lr=1e-4),
    # 2 cores: the 50k-vocabulary head makes even this model train at only ~1000 tokens/s (far less on a shared
    # machine), so ~300k pretraining tokens (~5 min: enough for plain RoPE to degrade past L, and for PI to cost
    # perplexity at every length), ~6k (2%) per fine-tune. With L = 128 every pair makes
    # fewer than 32 rotations (lambda_0 = 2 pi), so NTK-by-parts' ramp starts at pair 0 (kept as it is only by
    # the clamp of the ramp's lower end) and no high-frequency band is purely extrapolated: the CPU run checks
    # the pipeline more than the high-frequency argument (see the report).
    "cpu": Preset(d_model=128, n_layer=4, n_head=2, L=128, s=4, pretrain_steps=300, pretrain_batch=8,
                  finetune_steps=6, finetune_batch=2, s_long=8, stride=64, max_docs=8, max_windows=2, trials=8,
                  temp_factors=(0.9, 1.0, 1.1, 1.2, 1.3, 1.45, 1.6), lr=2e-3, finetune_lr=2e-4,
                  train_eval_batches=4),
    # the smoke test: seconds of everything, numbers meaningless
    "tiny": Preset(d_model=64, n_layer=1, n_head=1, L=64, s=4, pretrain_steps=6, pretrain_batch=2,
                   finetune_steps=2, finetune_batch=1, s_long=8, stride=32, max_docs=2, max_windows=1, trials=2,
                   depths=(0.0, 1.0), temp_scales=(2, 4), temp_factors=(1.0, 1.2), lr=3e-3, finetune_lr=1e-3,
                   train_eval_batches=1),
}

# ----------------------------------------------------------------------------------------------------------
# Small utilities


def banner(text: str):
    print(f"\n{'=' * 100}\n== {text}\n{'=' * 100}", flush=True)


def read_json(path: Path):
    return json.loads(path.read_text())


def write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)  # a stage's output appears whole or not at all: its existence means "done"


class Stages:
    """Runs named stages once: a stage whose output exists is skipped; wall times kept in stages.json."""

    def __init__(self, runs: Path):
        self.path = runs / "stages.json"
        self.times = read_json(self.path) if self.path.exists() else {}

    def run(self, name: str, output: Path, fn):
        if output.exists():
            print(f"[skip] {name}: {output} exists", flush=True)
            return
        banner(name)
        t0 = time.time()
        fn()
        self.times[name] = round(time.time() - t0, 1)
        write_json(self.path, self.times)
        print(f"[done] {name} in {self.times[name]:.1f}s", flush=True)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------
# Stages 1-4: data and training (train.py does the work)


def prepare_data(args, p: Preset):
    from data.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(source=p.data_source, out=str(args.data_dir), val_fraction=p.val_fraction,
                          block_size=p.L))


def train(args, p: Preset, out_dir: Path, flags: dict):
    """Run train.py in-process with --key=value flags; resumes a run that stopped half-way."""
    import train as trainer

    init = flags.pop("init_from", "scratch")
    if (out_dir / "ckpt.pt").exists():
        init = "resume"  # the stage started before and was interrupted: carry on from its last checkpoint
    flags.update(device=args.device, eval_batches=p.train_eval_batches)
    argv = [f"--out_dir={out_dir}", f"--init_from={init}"] + [f"--{k}={v}" for k, v in flags.items()]
    print("python train.py " + " ".join(argv), flush=True)
    summary = trainer.main(argv)
    write_json(out_dir / "summary.json", summary if isinstance(summary, dict) else {"summary": str(summary)})


def model_flags(p: Preset) -> dict:
    return {"d_model": p.d_model, "n_layer": p.n_layer, "n_head": p.n_head}


def pretrain(args, p: Preset):
    train(args, p, args.runs / "pretrain", {
        **model_flags(p), "data_dir": args.data_dir, "block_size": p.L, "max_steps": p.pretrain_steps,
        "batch_size": p.pretrain_batch, "lr": p.lr, "rope.type": "default",
    })


def finetune(args, p: Preset, name: str, method: str, scale: int):
    """Extend the pretrained model with `method` at scale s and fine-tune at L' (the same budget for every one)."""
    train(args, p, args.runs / name, {
        "init_from": str(args.runs / "pretrain"), "data_dir": args.data_dir, "block_size": p.L_ext,
        "max_steps": p.finetune_steps, "batch_size": p.finetune_batch, "lr": p.finetune_lr,
        "rope.type": method, "rope.factor": scale,
        # eager: 80 short steps don't repay torch.compile's start-up (tens of seconds per run, six runs)
        "compile": False,
    })


# ----------------------------------------------------------------------------------------------------------
# Stages 5-6: evaluation


def load(path: Path, device: str):
    from checkpoint import load_model

    model, _ = load_model(path, device)
    return model


def extended(model, p: Preset, method: str, scale: float, **extra):
    """The pretrained model under `method` at scale s, no training. Dynamic variants start from s = 1 and
    follow the evaluation length (their scale is max(1, l'/L))."""
    factor = 1.0 if method in rope_lib.DYNAMIC_VARIANTS else float(scale)
    model.set_rope(model.config.rope.replace(type=method, factor=factor, original_context=p.L, **extra))
    return model


def run_eval(args, p: Preset, model, out: Path, val):
    tokens, docs = val
    result = evaluation.evaluate(model, tokens, docs, p.contexts, p.stride, p.max_docs, p.max_windows, p.depths,
                                 p.trials, device=args.device)
    result["rope"] = rope_lib.describe(model.config.rope)
    write_json(out, result)


def temperature_sweep(args, p: Preset, val, out: Path):
    """Paper Sec. 3.4 / App. A.2: on the pretrained model, NTK-by-parts at scale s with the attention factor
    sqrt(1/t) set by hand (rope type "yarn" with an explicit attention_factor is exactly that), ppl at s L."""
    tokens, docs = val
    model = load(args.runs / "pretrain", args.device)
    result = {}
    for s in p.temp_scales:
        T = s * p.L
        rows = {}
        for a in p.temp_factors:
            extended(model, p, "yarn", s, attention_factor=float(a))
            r = evaluation.perplexity(model, tokens, docs, T, min(p.stride, T), p.max_docs, args.device,
                                      max_windows=p.max_windows)
            rows[str(a)] = r
            print(f"  s={s:3d} @ {T:6d}  sqrt(1/t)={a:.3f}: ppl {r['ppl']:.3f}", flush=True)
        best = min(rows, key=lambda a: rows[a]["nll"])
        result[str(s)] = {"context": T, "ppl": {a: r["ppl"] for a, r in rows.items()}, "best": float(best),
                          "paper": rope_lib.yarn_mscale(s), "n_tokens": rows[best]["n_tokens"]}
    write_json(out, result)


# ----------------------------------------------------------------------------------------------------------
# Stage 7: plots and report


def plot_all(res: dict, p: Preset, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    colors = {m: f"C{i}" for i, m in enumerate(NO_FINETUNE)}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(name)

    def mark_contexts(ax):
        top = ax.get_xaxis_transform()  # x in data, y in axes fraction: labels sit at the top whatever the scale
        ax.axvline(p.L, color="gray", ls=":", lw=1)
        ax.axvline(p.L_ext, color="gray", ls="--", lw=1)
        ax.text(p.L, 0.98, " L", va="top", color="gray", transform=top)
        ax.text(p.L_ext, 0.98, f" L'={p.s}L", va="top", color="gray", transform=top)

    # perplexity against context
    for key, title in (("finetuned", "fine-tuned at L'"), ("no_finetune", "no fine-tuning")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, r in res[key].items():
            xs = [int(c) for c in r["ppl"]]
            ax.plot(xs, [r["ppl"][str(c)]["ppl"] for c in xs], "o-", color=colors.get(m, "k"), label=LABELS.get(m, m))
        if key == "finetuned" and res.get("short_long"):
            r = res["short_long"]
            xs = [int(c) for c in r["ppl"]]
            ax.plot(xs, [r["ppl"][str(c)]["ppl"] for c in xs], "s--", color="k",
                    label=f"YaRN s={p.s_long} (fine-tuned at L')")
        ax.set_xscale("log", base=2)
        ax.set_xticks(p.contexts, [str(c) for c in p.contexts])
        ax.set_yscale("log")
        ax.set_xlabel("evaluation context (tokens)")
        ax.set_ylabel(f"perplexity (last {p.stride} tokens of each window)")
        ax.set_title(f"Perplexity vs context, {title} (L={p.L}, s={p.s})")
        ax.grid(alpha=0.3, which="both")
        mark_contexts(ax)
        ax.legend(fontsize=8)
        save(fig, f"ppl_{key}.png")

    # retrieval heat maps
    for key in ("no_finetune", "finetuned"):
        runs = dict(res[key])
        if key == "finetuned" and res.get("short_long"):
            runs[f"yarn_s{p.s_long}"] = res["short_long"]
        n = len(runs)
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
        for ax, (m, r) in zip(axes.flat, runs.items()):
            ctx = [int(c) for c in r["retrieval"]]
            depths = r["depths"]
            grid = np.array([[r["retrieval"][str(c)]["acc"][str(float(d))] for c in ctx] for d in depths])
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(ctx)), [str(c) for c in ctx], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
            for i in range(len(depths)):
                for j in range(len(ctx)):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="w" if grid[i, j] < 0.5 else "k")
            ax.set_title(LABELS.get(m, m) if m in LABELS else f"YaRN s={p.s_long}", fontsize=9)
            ax.set_xlabel("context", fontsize=8)
            ax.set_ylabel("needle depth", fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"Needle recall accuracy ({'no fine-tuning' if key == 'no_finetune' else 'fine-tuned'}); "
                     f"chance ~{next(iter(runs.values()))['retrieval'][str(p.L)]['chance']:.3f}", fontsize=10)
        save(fig, f"retrieval_{key}.png")

    # per-dimension scaling vs wavelength (pure rope.py), for this run and, for comparison, the gpu preset
    g = PRESETS["gpu"]
    panels = [(p.head_dim, p.L, p.s, "this run")]
    if (g.head_dim, g.L, g.s) != panels[0][:3]:
        panels.append((g.head_dim, g.L, g.s, "gpu preset"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (head_dim, L, s, name) in zip(axes[0], panels):
        theta = rope_lib.base_inv_freq(head_dim, 10000.0)
        wavelength = (2 * math.pi / theta).numpy()
        for m in ("default", "linear", "ntk", "ntk_by_parts", "dynamic"):
            cfg = RopeConfig(type=m, factor=1.0 if m == "dynamic" else float(s), original_context=L)
            freqs, _ = rope_lib.inv_freq(head_dim, cfg, s * L)
            label = LABELS[m] + (" / YaRN" if m == "ntk_by_parts" else "") + (" at l'=sL (= NTK)" if m == "dynamic" else "")
            ax.plot(wavelength, (freqs.double() / theta).numpy(), "x--" if m == "dynamic" else "o-",
                    ms=5 if m == "dynamic" else 3, lw=1 if m == "dynamic" else 1.5, color=colors[m], label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        top = ax.get_xaxis_transform()
        ax.axvline(L, color="gray", ls=":")
        ax.axvline(s * L, color="gray", ls="--")
        ax.axvline(L / 32, color="C4", ls=":", lw=0.8)
        ax.text(L, 0.5, " L", color="gray", transform=top)
        ax.text(s * L, 0.5, " s L", color="gray", transform=top)
        ax.text(L / 32, 0.4, " L/32\n (r_d = \u03b2)", color="C4", fontsize=8, transform=top)
        ax.set_xlabel("wavelength \u03bb_d = 2\u03c0/\u03b8_d (tokens)")
        ax.set_ylabel("\u03b8'_d / \u03b8_d")
        ax.set_title(f"{name}: head_dim {head_dim}, L={L}, s={s}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Per-pair frequency scaling of each method against wavelength", fontsize=10)
    save(fig, "scaling_per_dimension.png")

    # temperature sweep: one panel per s (their perplexities differ by orders of magnitude)
    temp = res["temperature"]
    fig, axes = plt.subplots(1, len(temp), figsize=(3.4 * len(temp), 3.6), squeeze=False)
    for i, (ax, (s, r)) in enumerate(zip(axes[0], temp.items())):
        xs = sorted(float(a) for a in r["ppl"])
        ax.plot(xs, [r["ppl"][str(a)] for a in xs], "o-", color=f"C{i}")
        ax.axvline(r["paper"], color="k", ls="--", lw=1, label=f"0.1 ln s + 1 = {r['paper']:.3f}")
        ax.plot([r["best"]], [r["ppl"][str(r["best"])]], "*", ms=14, color="C3", label=f"best {r['best']:.3f}")
        ax.set_title(f"s = {s}, ppl at {r['context']}", fontsize=10)
        ax.set_xlabel("\u221a(1/t)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("perplexity")
    fig.suptitle("Temperature sweep: NTK-by-parts + attention factor, pretrained model, no fine-tuning", fontsize=10)
    save(fig, "temperature.png")
    return files


def ppl_at(r: dict, T: int):
    x = r["ppl"].get(str(T))
    return None if x is None else x["ppl"]


def fmt(x, digits=2):
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if x < 1e4 else f"{x:.4g}"


def lower(a: dict, b: dict, T: int) -> tuple[str, str]:
    """Is run a's perplexity at T lower than run b's? Both score the same windows, so the difference of their
    per-window NLLs is paired: "yes" / "no" when the mean difference is beyond 2 standard errors, else
    "within noise". Returns (verdict, evidence)."""
    ra, rb = a["ppl"][str(T)], b["ppl"][str(T)]
    d = np.array(ra.get("window_nll", [])) - np.array(rb.get("window_nll", []))
    if len(d) < 2:  # no per-window numbers: the plain comparison
        return ("yes" if ra["nll"] < rb["nll"] else "no"), ""
    mean, se = d.mean(), d.std(ddof=1) / math.sqrt(len(d))
    verdict = "yes" if mean < -2 * se else "no" if mean > 2 * se else "within noise"
    return verdict, f" (\u0394nll {mean:+.4f} \u00b1 {2 * se:.4f}, 2 s.e. over {len(d)} windows)"


def claims(res: dict, p: Preset) -> list[dict]:
    """Each claim decided from the numbers: a statement, a verdict (yes / no / within noise) and its numbers."""
    out = []
    Le = p.L_ext

    def add(claim, held, evidence):
        if isinstance(held, bool):
            held = "yes" if held else "no"
        out.append({"claim": claim, "held": held, "evidence": evidence})

    def compare(claim, a, b, T, evidence):
        verdict, extra = lower(a, b, T)
        add(claim, verdict, evidence + extra)

    nf_runs, ft_runs = res["no_finetune"], res["finetuned"]
    nf = {m: ppl_at(r, Le) for m, r in nf_runs.items()}
    static = {m: nf[m] for m in METHODS}
    runner_up = min((m for m in METHODS if m != "yarn"), key=static.get)
    compare(f"1. No fine-tuning, at L'={Le}: YaRN has the lowest perplexity of the static methods (vs the best "
            f"other, {LABELS[runner_up]})", nf_runs["yarn"], nf_runs[runner_up], Le,
            ", ".join(f"{LABELS[m]} {fmt(v)}" for m, v in static.items()))
    compare(f"1b. No fine-tuning, at L'={Le}: Dynamic YaRN beats Dynamic NTK", nf_runs["dynamic_yarn"],
            nf_runs["dynamic"], Le, f"Dynamic YaRN {fmt(nf['dynamic_yarn'])}, Dynamic NTK {fmt(nf['dynamic'])}")
    compare(f"1c. No fine-tuning, at L'={Le}: YaRN beats plain RoPE extrapolation", nf_runs["yarn"],
            nf_runs["default"], Le, f"YaRN {fmt(nf['yarn'])}, RoPE {fmt(nf['default'])}")
    if 2 * Le in p.contexts:
        y2, r2 = ppl_at(nf_runs["yarn"], 2 * Le), ppl_at(nf_runs["default"], 2 * Le)
        compare(f"1d. No fine-tuning, beyond L' (at {2 * Le}): YaRN beats plain RoPE extrapolation", nf_runs["yarn"],
                nf_runs["default"], 2 * Le, f"YaRN {fmt(y2)}, RoPE {fmt(r2)}")

    ft = {m: ppl_at(r, Le) for m, r in ft_runs.items()}
    for other in ("linear", "ntk", "default"):
        compare(f"2. Fine-tuned with equal budgets, at L'={Le}: YaRN < {LABELS[other]}", ft_runs["yarn"],
                ft_runs[other], Le, f"YaRN {fmt(ft['yarn'])}, {LABELS[other]} {fmt(ft[other])}")
    beyond = 2 * Le
    ftb = {m: ppl_at(r, beyond) for m, r in ft_runs.items()}
    compare(f"2b. Fine-tuned, beyond L' (at {beyond}): YaRN < PI", ft_runs["yarn"], ft_runs["linear"], beyond,
            f"YaRN {fmt(ftb['yarn'])}, PI {fmt(ftb['linear'])}")

    if res.get("short_long"):
        far = p.s_long * p.L
        sl, yr = ppl_at(res["short_long"], far), ppl_at(res["finetuned"]["yarn"], far)
        sl_in = ppl_at(res["short_long"], Le)
        compare(f"3. Train short, test long: YaRN s={p.s_long} fine-tuned at {Le} beats YaRN s={p.s} (same "
                f"fine-tuning length) at {far} = s'L", res["short_long"], ft_runs["yarn"], far,
                f"s={p.s_long}: {fmt(sl)}, s={p.s}: {fmt(yr)}")
        add(f"3b. YaRN s={p.s_long} at {far} stays within 10% of its own perplexity at {Le}",
            sl <= 1.1 * sl_in, f"{fmt(sl)} at {far} vs {fmt(sl_in)} at {Le}")

    temp = res["temperature"]
    for s, r in temp.items():
        grid = sorted(float(a) for a in r["ppl"])
        step = max(b - a for a, b in zip(grid, grid[1:])) if len(grid) > 1 else 0
        add(f"4. Temperature, s={s}: best sqrt(1/t) within one grid step ({step:.2f}) of 0.1 ln s + 1",
            abs(r["best"] - r["paper"]) <= step + 1e-9,
            f"best {r['best']:.3f} (ppl {fmt(r['ppl'][str(r['best'])])}), paper {r['paper']:.3f} "
            f"(ppl at 1.0: {fmt(r['ppl'].get('1.0'))})")
    bests = [temp[s]["best"] for s in sorted(temp, key=int)]
    add("4b. Temperature: the best sqrt(1/t) is > 1 and does not decrease with s",
        all(b > 1 for b in bests) and all(b2 >= b1 for b1, b2 in zip(bests, bests[1:])),
        ", ".join(f"s={s}: {temp[s]['best']:.3f}" for s in sorted(temp, key=int)))
    return out


def table(runs: dict, contexts, key="ppl") -> str:
    head = "| method | " + " | ".join(str(c) for c in contexts) + " |\n|---|" + "---|" * len(contexts) + "\n"
    rows = []
    for m, r in runs.items():
        if key == "ppl":
            cells = [fmt(ppl_at(r, c)) for c in contexts]
        else:
            cells = [f"{r['retrieval'][str(c)]['mean']:.2f}" if str(c) in r["retrieval"] else "-" for c in contexts]
        rows.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def write_report(res: dict, p: Preset, out: Path, plots: list[str]):
    cs = p.contexts
    yarn = RopeConfig(type="yarn", factor=float(p.s), original_context=p.L)
    lo, hi = rope_lib.ramp_bounds(p.head_dim, yarn)
    kept = int((rope_lib.ramp(p.head_dim, yarn) == 0).sum())  # pairs with ramp weight 0: theta_d exactly
    fast = sum(1 for d in range(p.head_dim // 2)  # of those, pairs that really make > beta_fast rotations in L
               if d < rope_lib.correction_dim(yarn.beta_fast, p.head_dim, yarn.base, p.L))
    rounding = f" ({kept - fast} kept only because the ramp's lower end is rounded down and clamped)" if kept > fast else ""
    band = ("With so few, NTK-by-parts differs from PI mainly through the ramp, not a kept high-frequency band."
            if fast == 0 else "These high-frequency pairs are the band the paper's argument is about.")
    ft = dict(res["finetuned"])
    if res.get("short_long"):
        ft[f"YaRN s={p.s_long}"] = res["short_long"]
    control = res["no_finetune"]["default"]["retrieval"][str(p.L)]
    lines = [
        f"# YaRN toy reproduction: preset `{res['preset']}`",
        "",
        f"Generated by `python reproduce.py --preset {res['preset']}` on {res['device']}, torch {res['torch']}, "
        f"commit {res['commit']}. Every number below comes from `results.json`; the claims section is computed "
        "from those numbers by `reproduce.py`, not written by hand.",
        "",
        "## Set-up",
        f"- Model: d_model {p.d_model}, {p.n_layer} layers, {p.n_head} heads (head_dim {p.head_dim}), plain RoPE "
        f"(base 10000) pretrained at L = {p.L} for {p.pretrain_steps} steps x {p.pretrain_batch} sequences "
        f"({p.pretrain_steps * p.pretrain_batch * p.L:,} tokens).",
        f"- Extension: s = {p.s}, L' = {p.L_ext}. Each method fine-tuned {p.finetune_steps} steps x "
        f"{p.finetune_batch} sequences of L' ({p.finetune_steps * p.finetune_batch * p.L_ext:,} tokens, "
        f"{100 * p.finetune_steps * p.finetune_batch * p.L_ext / (p.pretrain_steps * p.pretrain_batch * p.L):.1f}% "
        "of pretraining), the same for every method.",
        f"- NTK-by-parts / YaRN ramp (beta_fast 32, beta_slow 1) for head_dim {p.head_dim}, L {p.L}: from pair "
        f"{lo} to pair {hi} of {p.head_dim // 2}; {kept} pair(s) kept exactly (ramp weight 0, pure extrapolation), "
        f"{fast} of them making more than 32 rotations in L{rounding}. " + band,
        f"- Train short, test long: YaRN s = {p.s_long} fine-tuned at {p.L_ext} (same budget), evaluated up to "
        f"{p.s_long * p.L}.",
        f"- Perplexity: held-out documents longer than {cs[-1]} tokens (the same <= {p.max_docs} documents and "
        f"the same scored tokens at every context), windows of length T scoring their last {p.stride} tokens, "
        f"<= {p.max_windows} windows per document; token-weighted mean NLL.",
        f"- Retrieval: a 16-token needle of random ordinary words at depth (fraction of the context), its first 4 "
        f"tokens repeated at the end; top-1 accuracy on the other 12, teacher-forced; {p.trials} trials per cell.",
        "",
        "## Claims, decided from the numbers",
        "",
        "| claim | held | numbers |",
        "|---|---|---|",
    ]
    lines += [f"| {c['claim']} | {c['held']} | {c['evidence']} |" for c in res["claims"]]
    lines += ["", "Perplexity comparisons are paired over the same windows: 'within noise' means the mean "
              "difference of per-window NLL is inside 2 standard errors."]
    lines += [
        "",
        f"Retrieval control: the pretrained model with plain RoPE at its own context L = {p.L} recalls "
        f"{control['mean']:.2f} of needle tokens (chance {control['chance']:.3f}). "
        + ("It copies well, so the retrieval grid is informative."
           if control["mean"] >= 0.5 else
           "That is low: this model has barely learned to copy, so the retrieval grid says little here."),
        "",
        "## Perplexity, no fine-tuning (pretrained model, RoPE swapped)",
        "",
        table(res["no_finetune"], cs),
        "## Perplexity, fine-tuned at L'",
        "",
        table(ft, cs),
        "## Retrieval accuracy (mean over depths), no fine-tuning",
        "",
        table(res["no_finetune"], cs, key="retrieval"),
        "## Retrieval accuracy (mean over depths), fine-tuned",
        "",
        table(ft, cs, key="retrieval"),
        "## Temperature: best sqrt(1/t) per s (NTK-by-parts, pretrained model, ppl at s L)",
        "",
        "| s | context | best sqrt(1/t) | ppl at best | ppl at 1.0 | paper 0.1 ln s + 1 |",
        "|---|---|---|---|---|---|",
    ]
    for s, r in res["temperature"].items():
        lines.append(f"| {s} | {r['context']} | {r['best']:.3f} | {fmt(r['ppl'][str(r['best'])])} | "
                     f"{fmt(r['ppl'].get('1.0'))} | {r['paper']:.3f} |")
    lines += ["", "## Wall time per stage (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in res["stage_seconds"].items()]
    lines += [f"| total | {sum(res['stage_seconds'].values()):.1f} |", "", "## Plots", ""]
    lines += [f"![{f}]({f})" for f in plots]
    lines += ["", "## Config", "", "```json", json.dumps(res["config"], indent=2), "```", ""]
    (out / "report.md").write_text("\n".join(lines))


def report(args, p: Preset):
    runs = args.runs
    res = {
        "preset": args.preset, "config": asdict(p), "contexts": p.contexts, "device": device_name(args.device),
        "torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(),
        "no_finetune": {m: read_json(runs / "eval" / f"nft_{m}.json") for m in NO_FINETUNE},
        "finetuned": {m: read_json(runs / "eval" / f"ft_{m}.json") for m in METHODS},
        "short_long": read_json(runs / "eval" / "short_long.json"),
        "temperature": read_json(runs / "temperature.json"),
        "train": {name: read_json(runs / name / "summary.json")
                  for name in ["pretrain"] + [f"ft_{m}" for m in METHODS] + ["short_long"]
                  if (runs / name / "summary.json").exists()},
    }
    res["stage_seconds"] = read_json(runs / "stages.json")
    res["claims"] = claims(res, p)
    args.out.mkdir(parents=True, exist_ok=True)
    plots = plot_all(res, p, args.out)
    write_json(args.out / "results.json", res)
    write_report(res, p, args.out, plots)
    for c in res["claims"]:
        print(f"  [{c['held']}] {c['claim']}: {c['evidence']}")
    print(f"report: {args.out / 'report.md'}")


# ----------------------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python reproduce.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="gpu (default when CUDA is available), cpu, or tiny (the smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default results/<preset>)")
    parser.add_argument("--runs", type=Path, default=None, help="checkpoints and stage outputs (default runs/<preset>)")
    parser.add_argument("--data_dir", type=Path, default=Path("data/stdlib"))
    parser.add_argument("--data_source", default=None, help="corpus for data.prepare (default: the preset's, stdlib)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")
    p = PRESETS[args.preset]
    if args.data_source:
        p = replace(p, data_source=args.data_source, val_fraction=0.2)
    args.out = args.out or Path("results") / args.preset
    args.runs = args.runs or Path("runs") / args.preset
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 evaluation's matmuls, as train.py
    print(f"preset {args.preset}: {p}\ndevice {device_name(args.device)}, torch {torch.__version__}\n"
          f"runs -> {args.runs}, report -> {args.out}", flush=True)
    t_start = time.time()
    stages = Stages(args.runs)

    # 1-4: data and training
    stages.run("data", args.data_dir / "meta.json", lambda: prepare_data(args, p))
    stages.run("pretrain", args.runs / "pretrain" / "summary.json", lambda: pretrain(args, p))
    for m in METHODS:
        stages.run(f"finetune {m} s={p.s} at {p.L_ext}", args.runs / f"ft_{m}" / "summary.json",
                   lambda m=m: finetune(args, p, f"ft_{m}", m, p.s))
    stages.run(f"short_long: yarn s={p.s_long} at {p.L_ext}", args.runs / "short_long" / "summary.json",
               lambda: finetune(args, p, "short_long", "yarn", p.s_long))

    # 5-6: evaluation; the validation split is opened once
    val = None

    def get_val():
        nonlocal val
        if val is None:
            from data.loader import load_split

            tokens, docs, _ = load_split(args.data_dir, "val")
            val = (tokens, docs)
        return val

    ev = args.runs / "eval"
    for m in NO_FINETUNE:
        stages.run(f"evaluate pretrained + {m} (no fine-tuning)", ev / f"nft_{m}.json", lambda m=m: run_eval(
            args, p, extended(load(args.runs / "pretrain", args.device), p, m, p.s), ev / f"nft_{m}.json", get_val()))
    for m in METHODS:
        stages.run(f"evaluate fine-tuned {m}", ev / f"ft_{m}.json", lambda m=m: run_eval(
            args, p, load(args.runs / f"ft_{m}", args.device), ev / f"ft_{m}.json", get_val()))
    stages.run("evaluate short_long", ev / "short_long.json", lambda: run_eval(
        args, p, load(args.runs / "short_long", args.device), ev / "short_long.json", get_val()))
    stages.run("temperature", args.runs / "temperature.json",
               lambda: temperature_sweep(args, p, get_val(), args.runs / "temperature.json"))

    # 7: report
    banner("report")  # always rewritten: cheap, and derived from every stage above, which may have re-run
    report(args, p)
    print(f"\nall stages done; this invocation took {time.time() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
