"""The main job, one command: the YaRN paper's central comparison at toy scale, from data to report.

    python reproduce.py --preset cpu      # 2 CPU cores: byte-level data, a small model (the README's numbers)
    python reproduce.py --preset gpu      # one H100 / H200
    python reproduce.py --preset tiny     # seconds: the smoke test (tests/test_reproduce.py)

Stages, each skipped when its output exists, so that a re-run resumes where a run stopped:
  data         prepare the corpus (Python's standard library) with the preset's tokenizer, if missing
  warmup       (cpu preset) a short run on the induction task, at a constant learning rate (data/recall.py)
  pretrain     plain RoPE at context L (cpu preset: from the warm-up, on the recall mix)
  finetune     every method extended to L' = s L and fine-tuned at L' with the same budget, once per seed; YaRN at
               the larger s_long ("train short, test long"); where affordable, a model trained at L' from scratch
  evaluate     perplexity and needle recall (eval.py): the pretrained model under every method, every fine-tuned one
  temperature  sqrt(1/t) swept for NTK-by-parts on the pretrained model at several s (paper Sec. 3.4)
  report       <out>/report.md, results.json and plots (report.py), every claim decided from the numbers
"""

import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import checkpoint
import eval as evaluation
import flags
import report
import rope
import train
from data.loader import load_split
from data.prepare import PrepareConfig, prepare
from data.tokenizer import get_tokenizer
from model import ModelConfig
from rope import RopeConfig
from system import device_name, git_commit, pick_device, write_json

METHODS = ("default", "linear", "ntk", "ntk_by_parts", "yarn")  # extended by fine-tuning, in this order
NO_FINETUNE = METHODS + ("dynamic", "dynamic_yarn")  # the pretrained model under each, no training


@dataclass(frozen=True)
class Preset:
    tokenizer: str  # gpt2 or bytes (data/tokenizer.py)
    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    prev_tokens: int  # previous-token embeddings (model.Transformer.embed); 0 = a plain LLaMA-style model
    L: int  # pretraining context
    s: int  # the extension: fine-tune at L' = s L
    s_long: int  # train short, test long: YaRN at this scale, fine-tuned at L' (s_long L > L')
    pretrain_steps: int
    pretrain_batch: int
    lr: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float  # the pretraining's final lr (lr / 10), as the paper fine-tunes Llama 2 at about its own
    data_mix: str = "natural"  # pretraining windows (data/recall.py); fine-tuning is always on natural text
    warmup_steps: int = 0  # a warm-up run on the induction task before pretraining (0 = none) ...
    warmup_block: int = 128  # ... at this context
    warmup_batch: int = 16
    finetune_seeds: tuple = (0, 1, 2)
    scratch_long: bool = False  # also train a model at L' from scratch on the same total tokens
    stride: int = 64
    max_docs: int = 16
    max_windows: int = 2
    trials: int = 16
    needle_len: int = 16
    depths: tuple = (0.0, 0.25, 0.5, 0.75)
    temp_scales: tuple = (2, 4, 8, 16)
    temp_factors: tuple = (1.0, 1.1, 1.2, 1.3, 1.45, 1.6)  # plus each s's 0.1 ln s + 1
    data_source: str = "stdlib"
    val_fraction: float = 0.05
    train_eval_batches: int = 4  # train.py's own validation loss, batches per evaluation

    @property
    def contexts(self) -> list[int]:
        """L, 2L, 4L, ... up to 2 L' and s_long L, whichever is longer."""
        top = max(2 * self.s, self.s_long)
        return [self.L * 2**k for k in range(int(math.log2(top)) + 1)]


PRESETS = {
    # train.py's default model shape at head_dim 128 and L = 512: pairs 0..6 make more than 32 rotations in L.
    # Sized for ~5 minutes on one H100 (an estimate: no GPU has run it): 13M tokens of pretraining (~35 s at the
    # ~400k tokens/s such a model trains at), 19 fine-tunes of 0.5M tokens (~5 s each with their start-up), the
    # from-scratch baseline at L' (~60 s), 26 evaluations (~2.5 s each).
    "gpu": Preset(tokenizer="gpt2", vocab_size=50304, d_model=512, n_layer=8, n_head=4, prev_tokens=0, L=512, s=8,
                  s_long=16, pretrain_steps=800, pretrain_batch=32, lr=1e-3, finetune_steps=30, finetune_batch=4,
                  finetune_lr=1e-4, scratch_long=True, stride=256, max_docs=16, max_windows=1, trials=8),
    # Bytes, so that the output head is cheap and 2 cores train a model of head_dim 64 at L = 512 (pairs 0..3 make
    # more than 32 rotations in L). Copying, which the retrieval probe needs, does not form from natural text in
    # CPU minutes: a warm-up on the induction task, previous-token embeddings and the recall mix make it form in a
    # few hundred steps (3 of 3 seeds tried). About 4M tokens of pretraining, 82k (2%) per fine-tune.
    "cpu": Preset(tokenizer="bytes", vocab_size=320, d_model=128, n_layer=4, n_head=2, prev_tokens=3, L=512, s=4,
                  s_long=8, pretrain_steps=800, pretrain_batch=8, lr=3e-3, finetune_steps=20, finetune_batch=2,
                  finetune_lr=3e-4, data_mix="recall", warmup_steps=400, stride=128, max_docs=16, max_windows=1,
                  trials=8, temp_scales=(2, 4, 8)),
    # the smoke test: seconds of everything, numbers meaningless
    "tiny": Preset(tokenizer="bytes", vocab_size=320, d_model=32, n_layer=1, n_head=1, prev_tokens=2, L=64, s=2,
                   s_long=4, pretrain_steps=6, pretrain_batch=2, lr=3e-3, finetune_steps=2, finetune_batch=1,
                   finetune_lr=1e-3, data_mix="recall", warmup_steps=3, warmup_block=32, warmup_batch=2,
                   finetune_seeds=(0, 1), stride=32, max_docs=4, max_windows=1, trials=2, needle_len=8,
                   depths=(0.0, 0.5), temp_scales=(2,), temp_factors=(1.0, 1.2), train_eval_batches=1),
}


@dataclass(frozen=True)
class ReproduceConfig:
    preset: str = "auto"  # gpu, cpu or tiny; auto = gpu where CUDA is available, else cpu
    out: str | None = None  # the report's folder; default results/<preset>
    runs: str | None = None  # checkpoints and stage outputs; default runs/<preset> (git-ignored)
    data_dir: str | None = None  # default data/<source>, with _bytes for the byte tokenizer
    data_source: str | None = None  # another corpus for data.prepare (a folder); default the preset's
    device: str = "auto"
    seed: int = 0  # added to every training seed, to check that verdicts do not hang on one seed

    def __post_init__(self):
        flags.check_types(self)
        if self.preset not in ("auto", *PRESETS):
            raise ValueError(f"--preset must be auto, {', '.join(PRESETS)}, got {self.preset!r}")


# Stages
class Stages:
    """Runs named stages once: a stage whose output exists is skipped; wall times are kept in stages.json."""

    def __init__(self, runs: Path):
        self.path = runs / "stages.json"
        self.times = json.loads(self.path.read_text()) if self.path.exists() else {}

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

    def model_config(self, block_size: int, rope_cfg: RopeConfig = RopeConfig()) -> ModelConfig:
        return ModelConfig(vocab_size=self.p.vocab_size, n_layer=self.p.n_layer, n_head=self.p.n_head,
                           d_model=self.p.d_model, block_size=block_size, prev_tokens=self.p.prev_tokens,
                           rope=rope_cfg)

    def train(self, name: str, run: train.RunConfig, config: ModelConfig):
        """train.train under runs/name, resuming a run that was interrupted; its summary in summary.json."""
        out = self.runs / name
        run = replace(run, out_dir=str(out), data_dir=str(self.data_dir), device=self.device,
                      eval_batches=self.p.train_eval_batches, eval_interval=run.max_steps)
        state = checkpoint.load(out / "ckpt.pt") if (out / "ckpt.pt").exists() else None
        write_json(out / "summary.json", train.train(run, config, state, resume=state is not None))

    def pretrain(self, name: str, block_size: int, steps: int, batch: int, **run_fields):
        """Plain RoPE at block_size, from scratch (or from run_fields' init_from); eager, as every run here."""
        run = train.RunConfig(max_steps=steps, batch_size=batch, lr=self.p.lr, seed=1337 + self.seed, compile=False,
                              **run_fields)
        self.train(name, run, self.model_config(block_size))

    def finetune(self, name: str, method: str, scale: int, seed: int):
        """The pretrained model extended with `method` at scale s to L' = s L, fine-tuned at L' (the same budget
        for every method); eager, since a few short steps do not repay torch.compile's start-up."""
        p = self.p
        run = train.RunConfig(init_from=str(self.runs / "pretrain"), max_steps=p.finetune_steps, lr=p.finetune_lr,
                              batch_size=p.finetune_batch, seed=seed + self.seed, compile=False, weight_decay=0.0,
                              warmup_steps=max(1, p.finetune_steps // 10))  # the paper: no weight decay
        extended = RopeConfig(type=method, factor=float(scale), original_context=p.L)
        self.train(name, run, self.model_config(p.s * p.L, extended))


def load_model(job: Job, name: str):
    return checkpoint.load_model(job.runs / name, job.device)[0]


def without_finetuning(job: Job, method: str):
    """The pretrained model under `method` at scale s, no training; dynamic variants start from s = 1 and follow
    the evaluated length (s = max(1, l'/L))."""
    model = load_model(job, "pretrain")
    factor = 1.0 if method in rope.DYNAMIC_VARIANTS else float(job.p.s)
    model.set_rope(RopeConfig(type=method, factor=factor, original_context=job.p.L))
    return model


def evaluate(job: Job, model, out: Path, val):
    p = job.p
    vocab = evaluation.needle_vocab(get_tokenizer(p.tokenizer))
    result = evaluation.evaluate(model, *val, p.contexts, p.stride, vocab, p.max_docs, p.max_windows, p.depths,
                                 p.trials, p.needle_len, retrieval_contexts(p), job.device)
    write_json(out, {**result, "rope": asdict(model.config.rope)})


def retrieval_contexts(p: Preset) -> list[int]:
    """L .. L': the claims need L and L'; at 2 L' it cost half of the CPU evaluation, with every method at chance."""
    return [T for T in p.contexts if T <= p.s * p.L]


def temperature_sweep(job: Job, val, out: Path):
    """Paper Sec. 3.4 / App. A.2: on the pretrained model, NTK-by-parts at scale s with sqrt(1/t) set by hand
    (rope type yarn with an explicit attention_factor is exactly that), perplexity at s L per document."""
    p, model, result = job.p, load_model(job, "pretrain"), {}
    for s in p.temp_scales:
        paper = round(rope.yarn_mscale(s), 4)
        factors = {}
        for a in sorted(set(p.temp_factors) | {paper}):
            model.set_rope(RopeConfig(type="yarn", factor=float(s), original_context=p.L, attention_factor=a))
            r = evaluation.perplexity(model, *val, s * p.L, p.stride, p.max_docs, job.device, max_windows=p.max_windows)
            factors[str(a)] = r
            print(f"  s={s:3d} @ {s * p.L:6d}  sqrt(1/t)={a:.4f}: ppl {r['ppl']:.3f}", flush=True)
        result[str(s)] = {"context": s * p.L, "paper": str(paper), "factors": factors}
    write_json(out, result)


# The whole job
def training_stages(job: Job, stages: Stages):
    p, runs = job.p, job.runs
    prepare_cfg = PrepareConfig(source=p.data_source, out=str(job.data_dir), val_fraction=p.val_fraction,
                                block_size=p.L, tokenizer=p.tokenizer)
    stages.run("data", job.data_dir / "meta.json", lambda: prepare(prepare_cfg))
    if p.warmup_steps:  # at a constant lr: a decaying one delays the copy circuit's phase change
        stages.run("warmup", runs / "warmup" / "summary.json", lambda: job.pretrain(
            "warmup", p.warmup_block, p.warmup_steps, p.warmup_batch, data_mix="induction", min_lr=p.lr))
    after_warmup = {"init_from": str(runs / "warmup"), "warmup_steps": max(1, p.pretrain_steps // 80)} \
        if p.warmup_steps else {}
    stages.run("pretrain", runs / "pretrain" / "summary.json", lambda: job.pretrain(
        "pretrain", p.L, p.pretrain_steps, p.pretrain_batch, data_mix=p.data_mix, **after_warmup))
    for seed in p.finetune_seeds:
        for m in METHODS:
            stages.run(f"finetune {m} s={p.s} at {p.s * p.L}, seed {seed}", runs / f"ft_{m}_{seed}" / "summary.json",
                       lambda m=m, seed=seed: job.finetune(f"ft_{m}_{seed}", m, p.s, seed))
        stages.run(f"short_long: yarn s={p.s_long} at {p.s * p.L}, seed {seed}",
                   runs / f"short_long_{seed}" / "summary.json",
                   lambda seed=seed: job.finetune(f"short_long_{seed}", "yarn", p.s_long, seed))
    if p.scratch_long:  # the same tokens as pretraining plus one fine-tune, all at L'
        tokens = p.L * p.pretrain_steps * p.pretrain_batch + p.s * p.L * p.finetune_steps * p.finetune_batch
        batch = max(1, p.pretrain_batch // p.s)
        stages.run(f"scratch_long: plain RoPE from scratch at {p.s * p.L}", runs / "scratch_long" / "summary.json",
                   lambda: job.pretrain("scratch_long", p.s * p.L, math.ceil(tokens / (batch * p.s * p.L)), batch))


def evaluation_stages(job: Job, stages: Stages):
    p, ev = job.p, job.runs / "eval"

    @functools.cache
    def data():  # the validation split, opened once, when first needed
        return load_split(job.data_dir, "val")[:2]

    models = [(f"nft_{m}", lambda m=m: without_finetuning(job, m)) for m in NO_FINETUNE]
    models += [(name, lambda name=name: load_model(job, name)) for name in
               [f"ft_{m}_{seed}" for seed in p.finetune_seeds for m in METHODS]
               + [f"short_long_{seed}" for seed in p.finetune_seeds] + (["scratch_long"] if p.scratch_long else [])]
    for name, build in models:
        stages.run(f"evaluate {name}", ev / f"{name}.json",
                   lambda name=name, build=build: evaluate(job, build(), ev / f"{name}.json", data()))
    stages.run("temperature", job.runs / "temperature.json",
               lambda: temperature_sweep(job, data(), job.runs / "temperature.json"))


def results(job: Job, stages: Stages) -> dict:
    """Every stage's output in one dict: report.py's input, and results.json."""
    p, ev = job.p, job.runs / "eval"

    def read(path: Path):
        return json.loads(path.read_text())

    seeds = p.finetune_seeds
    commit, dirty = git_commit()
    return {
        "preset": job.name, "command": job.command, "config": {**asdict(p), "contexts": p.contexts},
        "contexts": p.contexts, "retrieval_contexts": retrieval_contexts(p), "device": device_name(job.device),
        "torch": torch.__version__, "commit": (commit or "unknown")[:12] + (" (dirty)" if dirty else ""),
        "no_finetune": {m: read(ev / f"nft_{m}.json") for m in NO_FINETUNE},
        "finetuned": {m: [read(ev / f"ft_{m}_{seed}.json") for seed in seeds] for m in METHODS},
        "short_long": [read(ev / f"short_long_{seed}.json") for seed in seeds],
        "scratch_long": [read(ev / "scratch_long.json")] if p.scratch_long else None,
        "temperature": read(job.runs / "temperature.json"),
        "train": {d.name: read(d / "summary.json") for d in sorted(job.runs.iterdir())
                  if (d / "summary.json").exists()},
        "stage_seconds": stages.times,
    }


def main(argv) -> list[dict]:
    args = flags.build(ReproduceConfig, flags.parse(argv, flags.flag_table((ReproduceConfig, "")),
                                                    "python reproduce.py", __doc__))
    device = pick_device(args.device)
    name = args.preset if args.preset != "auto" else "gpu" if device.startswith("cuda") else "cpu"
    p = PRESETS[name]
    if args.data_source:  # a small corpus: a larger validation share, so there are long held-out documents
        p = replace(p, data_source=args.data_source, val_fraction=0.2)
    data_dir = Path(args.data_dir or f"data/{p.data_source}" + ("_bytes" if p.tokenizer == "bytes" else ""))
    job = Job(p, name, Path(args.runs or f"runs/{name}"), Path(args.out or f"results/{name}"), data_dir, device,
              args.seed, "python reproduce.py " + " ".join(argv))
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 evaluation's matmuls, as train.py
    print(f"preset {name}: {p}\ndevice {device_name(device)}, torch {torch.__version__}\n"
          f"runs -> {job.runs}, report -> {job.out}", flush=True)
    t0 = time.time()
    job.runs.mkdir(parents=True, exist_ok=True)
    stages = Stages(job.runs)
    training_stages(job, stages)
    evaluation_stages(job, stages)
    claims = report.write(results(job, stages), job.out)  # always rewritten: cheap, and every stage may have re-run
    for c in claims:
        print(f"  [{c['held']}] {c['claim']}: {c['evidence']}")
    print(f"report: {job.out / 'report.md'}\nall stages done; this invocation took {time.time() - t0:.1f}s", flush=True)
    return claims


if __name__ == "__main__":
    sys.exit(flags.cli(main))
