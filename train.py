"""Pretraining and context extension in one script; --init_from chooses the phase:

    python train.py                                            # pretrain the default toy model from scratch
    python train.py --init_from=resume --out_dir=out/pretrain  # continue a run from its latest checkpoint
    python train.py --init_from=out/pretrain --out_dir=out/yarn8 --block_size=4096 \\
        --rope.type=yarn --rope.factor=8 --max_steps=200 --batch_size=8 --lr=1e-4   # extend, then fine-tune
    torchrun --standalone --nproc_per_node=8 train.py ...      # DDP on 8 GPUs, the same global batch

Settings (--help): config.RunConfig, model.ModelConfig and --rope.<field> of rope.RopeConfig, or --config FILE.json.
An extension starts a fresh optimizer at step 0; a resume continues out_dir/ckpt.pt exactly. Outputs in out_dir:
ckpt.pt (and ckpt_<step>.pt), config.json, metrics.jsonl. Exit codes: 0 done; 2 bad input (`error: ...`); 1 a
non-finite loss or weights (the last good checkpoint is kept); 75 out_dir is in use by another run (its lock,
out_dir/.lock); 130 / 143 after SIGINT / SIGTERM, once the step is saved. train(run, model_config) is the typed
entry point; main(argv) parses the flags and calls it.
"""

import hashlib
import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import flags
from config import RunConfig, extended_model_config, parse_args, resolve
from data.loader import load_training_data
from data.recall import mix
from model import ModelConfig, Transformer
from system import (IN_USE_EXIT, Dist, FolderInUse, StopOnSignal, Throughput, all_reduce_sum, dist_from_env,
                    dtype_name, lock_folder, pick_device, pick_dtype, provenance, write_json)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or weights): `error: ...`, exit code 1."""


# Batches and the learning rate
# Step `step` consumes grad_accum micro-batches, numbered 0..grad_accum-1 over all processes; process `rank` takes
# numbers rank*A .. rank*A + A - 1 (A = grad_accum / world). Each micro-batch's windows of block_size + 1 tokens
# come from a generator seeded by a hash of (seed, step, number): the global batch is the same for any world size,
# a resumed run needs no sampler state, and no two processes draw the same windows.
def stream_seed(seed: int, *key) -> int:
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def windows(tokens: np.ndarray, starts: np.ndarray, T: int, data_mix: str = "natural", seed: int = 0):
    """Inputs and next-token targets, (B, T) int64 each, of windows tokens[s : s + T + 1] as the data mix (seeded
    by seed) rewrites them."""
    w = torch.from_numpy(mix(tokens[starts[:, None] + np.arange(T + 1)].astype(np.int64), data_mix, seed))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T) each


def train_windows(tokens: np.ndarray, seed: int, step: int, micro: int, B: int, T: int) -> np.ndarray:
    g = torch.Generator().manual_seed(stream_seed(seed, "train", step, micro))
    return torch.randint(len(tokens) - T, (B,), generator=g).numpy()  # starts 0 .. len - T - 1


def val_windows(tokens: np.ndarray, seed: int, n_batches: int, B: int, T: int) -> np.ndarray:
    """Fixed validation windows (n_batches, B): the same at every eval of a run, so its curve is comparable."""
    g = torch.Generator().manual_seed(stream_seed(seed, "val"))
    return torch.randint(len(tokens) - T, (n_batches, B), generator=g).numpy()


def to_device(x: torch.Tensor, y: torch.Tensor, device: str):
    if device.startswith("cuda"):  # pinned host memory lets the copy overlap the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def lr_at(step: int, run: RunConfig) -> float:
    """Linear warmup to lr over `warmup` steps, then a cosine down to final_lr at max_steps: a pure function of
    the step, so a resumed run needs no scheduler state."""
    if step < run.warmup:
        return run.lr * (step + 1) / run.warmup
    progress = min(1.0, (step - run.warmup) / max(1, run.max_steps - run.warmup))
    return run.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (run.lr - run.final_lr)


# Setup: the model, the optimizer, the data, everything checked before the first step
@dataclass
class Run:
    run: RunConfig
    phase: str  # pretrain | resume | extend
    d: Dist
    device: str
    dtype: torch.dtype
    raw_model: Transformer  # the module whose state_dict is saved
    model: torch.nn.Module  # raw_model, compiled or not: used for evaluation
    train_model: torch.nn.Module  # model, wrapped in DDP when there are several processes
    optimizer: torch.optim.Optimizer
    data: tuple  # (train tokens, val tokens, the tokenizer's name)
    start_step: int
    extended_from: str | None
    provenance: dict
    metrics: dict  # best_val_loss, last_val_loss, last_train_loss
    saved_step: int | None = None  # the step out_dir/ckpt.pt holds

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir)

    @property
    def tokens_per_step(self) -> int:
        return self.run.batch_size * self.run.grad_accum * self.raw_model.config.block_size


def setup(run: RunConfig, config: ModelConfig, state: dict | None, resume: bool, d: Dist, argv=None) -> Run:
    phase = "resume" if resume else "pretrain" if run.init_from == "scratch" else "extend"
    if phase != "resume" and (Path(run.out_dir) / "ckpt.pt").exists():
        raise ValueError(f"{run.out_dir} already holds a checkpoint: continue it with --init_from=resume, "
                         "or choose another --out_dir")
    if phase == "extend":  # a typed call's config must keep the checkpoint's architecture too
        state = state or checkpoint.load(run.init_from)
        extended_model_config(ModelConfig.from_dict(state["model_config"]), asdict(config))
    if run.grad_accum % d.world:
        raise ValueError(f"--grad_accum ({run.grad_accum}) must be divisible by the number of processes ({d.world}): "
                         "the global batch batch_size x grad_accum is the same whatever the process count")
    data = load_training_data(run.data_dir, config.block_size, config.vocab_size, run.data_mix)
    device = pick_device(run.device)
    if d.world > 1 and device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
    torch.manual_seed(run.seed)  # every process builds the same model
    raw_model = Transformer(config) if state is None else checkpoint.model_from_state(state)
    raw_model.set_rope(config.rope, config.block_size)  # for an extension; the weights are untouched
    raw_model.to(device).train()
    optimizer = make_optimizer(raw_model, run, device.startswith("cuda"))
    start_step, metrics = 0, {"best_val_loss": None, "last_val_loss": None, "last_train_loss": None}
    if phase == "resume":
        start_step = int(state["step"])
        if start_step > run.max_steps:
            raise ValueError(f"the checkpoint is at step {start_step}, past --max_steps={run.max_steps}")
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        elif start_step < run.max_steps:
            raise ValueError(f"the checkpoint in {run.out_dir} has no optimizer state (saved with "
                             "--final_optimizer=false), so it cannot be continued; extend from it with --init_from")
        metrics.update(state.get("metrics", {}))
    model, train_model = compiled_and_wrapped(raw_model, run, d, device)
    extended_from = None if state is None else state.get("extended_from") if phase == "resume" else \
        str(Path(run.init_from) / "ckpt.pt" if Path(run.init_from).is_dir() else run.init_from)
    return Run(run=run, phase=phase, d=d, device=device, dtype=pick_dtype(run.dtype, device), raw_model=raw_model,
               model=model, train_model=train_model, optimizer=optimizer, data=data, start_step=start_step,
               extended_from=extended_from, provenance={**provenance(device, argv), "world_size": d.world},
               metrics=metrics, saved_step=start_step if phase == "resume" else None)


def make_optimizer(model: Transformer, run: RunConfig, on_cuda: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weights (matmuls, the tied embedding) and none on norm gains."""
    params = list(model.parameters())  # the tied embedding/head weight appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": run.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=run.lr, betas=(run.beta1, run.beta2), fused=True if on_cuda else None)


def compiled_and_wrapped(raw_model: Transformer, run: RunConfig, d: Dist, device: str):
    """(the model to evaluate: compiled or not, the model to train: that one in DDP when there are processes)."""
    on_cuda = device.startswith("cuda")
    if on_cuda:  # TF32 for fp32 matmuls left outside autocast (this call sets the legacy and the new flags alike)
        torch.set_float32_matmul_precision("high")
    model = torch.compile(raw_model) if (on_cuda if run.compile is None else run.compile) else raw_model
    if d.world == 1:
        return model, model
    dist.init_process_group("nccl" if on_cuda else "gloo")  # everything is checked: join the other processes
    return model, DDP(model, device_ids=[d.local_rank] if on_cuda else None)  # broadcasts rank 0's weights


# One training step, evaluation, checkpoints
def autocast(r: Run):
    return nullcontext() if r.dtype == torch.float32 else torch.autocast(r.device.split(":")[0], dtype=r.dtype)


def train_step(r: Run, step: int) -> torch.Tensor:
    """One optimizer step; returns the step's mean loss over the global batch (a tensor, not synced)."""
    for group in r.optimizer.param_groups:
        group["lr"] = lr_at(step, r.run)
    T, tokens, accum = r.raw_model.config.block_size, r.data[0], r.run.grad_accum // r.d.world
    total = torch.zeros((), device=r.device)
    for i in range(accum):
        micro = r.d.rank * accum + i
        starts = train_windows(tokens, r.run.seed, step, micro, r.run.batch_size, T)
        mix_seed = stream_seed(r.run.seed, "mix", step, micro)
        x, y = to_device(*windows(tokens, starts, T, r.run.data_mix, mix_seed), r.device)
        # DDP all-reduces gradients in backward; only the last micro-step's backward needs to
        with nullcontext() if i == accum - 1 or r.d.world == 1 else r.train_model.no_sync():
            with autocast(r):
                loss = r.train_model(x, y) / accum
            loss.backward()
        total += loss.detach()
    if r.run.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(r.raw_model.parameters(), r.run.grad_clip)
    r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum(total, r.d) / r.d.world


@torch.no_grad()
def evaluate(r: Run) -> float:
    """Mean loss over the fixed validation windows; the processes share them and sum their parts."""
    T, tokens = r.raw_model.config.block_size, r.data[1]
    starts = val_windows(tokens, r.run.seed, r.run.eval_batches, r.run.batch_size, T)
    r.model.eval()
    total = torch.zeros((), device=r.device, dtype=torch.float64)
    for i in range(r.d.rank, len(starts), r.d.world):
        x, y = to_device(*windows(tokens, starts[i], T), r.device)
        with autocast(r):
            total += r.model(x, y).double()
    r.model.train()
    return all_reduce_sum(total, r.d).item() / len(starts)


def save_checkpoint(r: Run, step: int) -> None:
    optimizer = {} if step == r.run.max_steps and not r.run.final_optimizer else \
        {"optimizer": r.optimizer.state_dict()}
    checkpoint.save_numbered({
        "model_config": r.raw_model.config.to_dict(), "tokenizer": r.data[2],
        "model": r.raw_model.state_dict(),  # the raw module: no `_orig_mod.` or `module.` prefixes
        **optimizer, "run_config": asdict(r.run), "step": step,
        "data_state": {"order": "windows seeded by (seed, step, micro-batch)", "seed": r.run.seed, "step": step},
        "metrics": dict(r.metrics), "extended_from": r.extended_from,
        "provenance": r.provenance,
    }, r.out_dir, step, r.run.keep_checkpoints)


def check_finite(r: Run, pending: list) -> None:
    """Raise TrainingError at the first non-finite loss not yet checked (in batches: no GPU sync every step)."""
    values = torch.stack([loss for _, loss in pending]).tolist() if pending else []
    for (step, _), value in zip(pending, values):
        if not math.isfinite(value):
            raise TrainingError(f"loss is {value} at step {step}; {not_saved(r)}. Lower --lr or check the data")
        r.metrics["last_train_loss"] = value
    pending.clear()


def not_saved(r: Run) -> str:
    if r.saved_step is None:
        return "stopped without saving (no checkpoint had been saved yet)"
    return f"stopped without saving: {r.out_dir / 'ckpt.pt'} keeps the last good weights, step {r.saved_step}"


# The loop, and its logs (stdout, out_dir/metrics.jsonl and config.json, from process 0 only)
class Logger:
    def __init__(self, r: Run):
        self.master, self.path = r.d.rank == 0, r.out_dir / "metrics.jsonl"
        if not self.master:
            return
        keep = []  # a resume drops what the interrupted run logged after its checkpoint: it logs those steps again
        for line in self.path.read_text().splitlines() if r.phase == "resume" and self.path.exists() else []:
            event = json.loads(line)
            if event["step"] < r.start_step or (event["event"] == "eval" and event["step"] == r.start_step):
                keep.append(line)
        r.out_dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in keep))
        c, p = r.raw_model.config, r.provenance
        write_json(r.out_dir / "config.json", {"run": asdict(r.run), "model": c.to_dict(), "provenance": p,
                   "resolved": {"phase": r.phase, "device": r.device, "dtype": dtype_name(r.dtype),
                                "world_size": r.d.world, "tokens_per_step": r.tokens_per_step,
                                "warmup_steps": r.run.warmup, "min_lr": r.run.final_lr, "start_step": r.start_step,
                                "extended_from": r.extended_from, "tokenizer": r.data[2],
                                "params": r.raw_model.num_params()}})
        commit = (p["git_commit"] or "unknown")[:12] + (" (dirty)" if p["git_dirty"] else "")
        self.print(f"train.py: {r.phase} {r.extended_from or ''} step {r.start_step} -> {r.run.max_steps}, "
                   f"{r.raw_model.num_params() / 1e6:.1f}M parameters, block {c.block_size}, rope {c.rope.type} "
                   f"(factor {c.rope.factor}, L {c.rope.original_context}), {r.tokens_per_step:,} tokens/step\n"
                   f"  {p['device']} x {r.d.world}, {dtype_name(r.dtype)}, torch {p['torch']}, commit {commit}")

    def print(self, text: str):
        if self.master:
            print(text, flush=True)

    def event(self, **record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def agreed_signal(stopper: StopOnSignal, r: Run) -> int:
    """The signal every process stops for (0 = none): processes must stop at the same step, or DDP hangs."""
    if r.d.world == 1:
        return stopper.signum
    flag = torch.tensor(float(stopper.signum), device=r.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def loop(r: Run, log: Logger, stopper: StopOnSignal) -> dict:
    peak = r.run.peak_tflops * 1e12 * r.d.world if r.device.startswith("cuda") else None  # none for a CPU
    speed = Throughput(r.tokens_per_step, r.raw_model.flops_per_token(r.raw_model.config.block_size), peak,
                       r.start_step)
    run, t_start, pending = r.run, time.time(), []  # pending: (step, loss) not yet checked
    stopped, step = None, r.start_step
    while True:  # at the top of step `step`: the weights after `step` updates; evaluate, save, or stop here
        last = step == run.max_steps
        signum = agreed_signal(stopper, r)
        if signum or (run.stop_at_step == step and not last):  # a signal during the last step still counts
            stopped = signal.Signals(signum).name if signum else "stop_at_step"
        if (step % run.eval_interval == 0 or last) and not (r.phase == "resume" and step == r.start_step):
            check_finite(r, pending)
            val_loss = evaluate(r)
            best = r.metrics["best_val_loss"]
            r.metrics.update(last_val_loss=val_loss, best_val_loss=val_loss if best is None else min(best, val_loss))
            log.print(f"step {step}/{run.max_steps} | val loss {val_loss:.4f}")
            log.event(event="eval", step=step, val_loss=val_loss, elapsed_s=round(time.time() - t_start, 3))
            speed.mark(step)
        if stopped or last or (step % run.ckpt_interval == 0 and step > r.start_step):
            check_finite(r, pending)  # never save weights that a non-finite loss has touched
            if not all(p.isfinite().all() for p in r.raw_model.parameters()):
                raise TrainingError(f"the weights became NaN/inf by step {step}; {not_saved(r)}. Lower --lr")
            if r.d.rank == 0:
                save_checkpoint(r, step)
            r.saved_step = step
            speed.mark(step)
        if stopped or last:
            break
        pending.append((step, train_step(r, step)))
        if step % run.log_interval == 0:
            check_finite(r, pending)  # reads the losses back, so the GPU has caught up
            tokens_per_s, mfu = speed.rates(step + 1)
            loss, lr = r.metrics["last_train_loss"], lr_at(step, run)
            log.print(f"step {step}/{run.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
                      f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {time.time() - t_start:.0f}s")
            log.event(event="train", step=step, train_loss=loss, lr=lr, tokens_per_s=tokens_per_s, mfu=mfu,
                      elapsed_s=round(time.time() - t_start, 3))
        step += 1
    tokens_per_s, mfu = speed.rates()
    return {"final_val_loss": r.metrics["last_val_loss"] if last else None, **r.metrics,
            "final_train_loss": r.metrics["last_train_loss"], "steps": step, "max_steps": run.max_steps,
            "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed_s": round(time.time() - t_start, 3),
            "out_dir": str(r.out_dir), "checkpoint": str(r.out_dir / "ckpt.pt"), "phase": r.phase,
            "stopped": stopped}


def train(run: RunConfig, config: ModelConfig, state: dict | None = None, resume: bool = False, argv=None) -> dict:
    """Train as `run` says the model `config` describes (for an extension: the checkpoint's architecture with its
    new block_size and RoPE); `state` is the checkpoint to start from (loaded here for an extension if None), and
    `resume` says to continue it. Returns the summary; raises ValueError for bad input, FolderInUse while another
    process holds out_dir, TrainingError, or SystemExit(128 + n) after saving on signal n."""
    d = dist_from_env()
    try:
        with lock_folder(run.out_dir, "--out_dir") if d.rank == 0 else nullcontext():  # the process that writes
            r = setup(run, config, state, resume, d, argv)  # joins the process group under torchrun
            del state
            log = Logger(r)
            with StopOnSignal() as stopper:
                summary = loop(r, log, stopper)
        if summary["stopped"] is None:
            log.print(f"done: val loss {summary['final_val_loss']:.4f} at step {summary['steps']}; "
                      f"checkpoint {summary['checkpoint']}")
        else:
            log.print(f"stopped ({summary['stopped']}) at step {summary['steps']}; checkpoint "
                      f"{summary['checkpoint']}; continue with --init_from=resume --out_dir={r.out_dir}")
        if summary["stopped"] not in (None, "stop_at_step"):
            raise SystemExit(128 + signal.Signals[summary["stopped"]].value)
        return summary
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv) -> dict:
    return train(*resolve(*parse_args(argv, __doc__)), argv=argv)


def cli(argv=None) -> int:
    return flags.cli(main, argv, errors={TrainingError: 1, FolderInUse: IN_USE_EXIT, **flags.ERRORS})


if __name__ == "__main__":
    raise SystemExit(cli())
