"""Pretraining and context extension; --init_from says where a run starts:

    python train.py                                            # pretrain the toy model
    python train.py --init_from=resume --out_dir=out/pretrain  # continue a run exactly
    python train.py --init_from=out/pretrain --out_dir=out/yarn8 --block_size=4096 \\
        --rope.type=yarn --rope.factor=8 --max_steps=200 --batch_size=8 --lr=1e-4  # extend it
    torchrun --standalone --nproc_per_node=8 train.py ...      # DDP: the same global batch

--help lists the settings. Exit codes: 0 done; 2 bad input; 1 a non-finite loss or weights (the
last good checkpoint is kept); 75 out_dir in use; 130 / 143 after SIGINT / SIGTERM, step saved.
"""

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import flags
import system
from config import RunConfig, new_model_config, parse_args, resumed_run_config
from data.loader import TrainingData, load_training_data, stream_seed, window_starts, windows
from model import ModelConfig, Transformer
from system import Dist, FolderInUse, RunLog, StopOnSignal, Throughput


class TrainingError(RuntimeError):
    """A non-finite loss or weights: exit code 1."""


ERRORS = {TrainingError: 1, FolderInUse: FolderInUse.exit_code, **flags.ERRORS}


# === Where a run starts: nanoGPT's init_from
class Start(NamedTuple):
    phase: str  # scratch, resume or extend
    cfg: RunConfig
    model_config: ModelConfig
    state: dict | None  # the checkpoint it starts from
    extended_from: str | None  # an extension's first checkpoint


def init_from(run: dict, model: dict, state: dict | None = None) -> Start:
    """The run the settings given describe; state: its checkpoint, if loaded."""
    init = run.get("init_from", RunConfig.init_from)
    if init == "resume":  # out_dir's checkpoint, its model and run (the settings given on top)
        path = Path(run.get("out_dir", RunConfig.out_dir)) / "ckpt.pt"
        if state is None and not path.exists():
            raise ValueError(
                f"--init_from=resume but {path} does not exist; check --out_dir, or "
                "start with --init_from=scratch or a checkpoint to extend"
            )
        state = state or checkpoint.load(path)
        config = ModelConfig.from_dict(state["model_config"])
        checkpoint.check_kept(config, model, "a resumed run keeps its model: use a new --out_dir")
        cfg = resumed_run_config(state, {**run, "out_dir": str(path.parent)})
        return Start("resume", cfg, config, state, state.get("extended_from"))
    cfg = RunConfig(**run)
    if (Path(cfg.out_dir) / "ckpt.pt").exists():
        raise ValueError(
            f"{cfg.out_dir} already holds a checkpoint: continue it with "
            "--init_from=resume, or choose another --out_dir"
        )
    if init == "scratch":
        return Start("scratch", cfg, new_model_config(model), None, None)
    path = Path(init) / "ckpt.pt" if Path(init).is_dir() else Path(init)  # a checkpoint to extend
    state = state or checkpoint.load(path)
    config = checkpoint.extended_config(ModelConfig.from_dict(state["model_config"]), model)
    return Start("extend", cfg, config, state, str(path))


# === The optimizer and its learning rate
def make_optimizer(model: Transformer, cfg: RunConfig, on_cuda: bool) -> torch.optim.AdamW:
    """AdamW, weight decay on the 2-D weights (matmuls, the tied embedding), none on norm gains."""
    params = list(model.parameters())  # the tied embedding once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas, fused = (cfg.beta1, cfg.beta2), True if on_cuda else None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to lr, then a cosine down to final_lr at max_steps: a pure function of the
    step, so a resumed run needs no scheduler state."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)


# === Set-up: all checked before the first step
@dataclass
class Run:
    cfg: RunConfig
    dist: Dist  # this process's rank among `world`
    device: str
    dtype: torch.dtype  # autocast's; float32 = none
    model: Transformer  # saved and evaluated
    trained: torch.nn.Module  # what a step calls: the model, or DDP(model)
    optimizer: torch.optim.Optimizer
    data: TrainingData
    tokenizer: str | dict  # saved with the model (checkpoint.kept_vocabulary)


def setup(start: Start, d: Dist) -> Run:
    cfg, config, state = start.cfg, start.model_config, start.state
    if cfg.grad_accum % d.world:
        raise ValueError(
            f"--grad_accum ({cfg.grad_accum}) must be divisible by the number of "
            f"processes ({d.world}), so that the global batch stays the same"
        )
    data = load_training_data(cfg.data_dir, config.block_size, config.vocab_size, cfg.data_mix)
    vocab = checkpoint.kept_vocabulary(state, data.tokenizer)
    device = system.pick_device(cfg.device)
    dtype = system.pick_dtype(cfg.dtype, device)
    on_cuda = device.startswith("cuda")
    if d.world > 1 and on_cuda:
        device = f"cuda:{d.local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)  # every process builds the same model
    model = Transformer(config) if state is None else checkpoint.model_from_state(state)
    model.set_rope(config.rope, config.block_size)  # an extension's RoPE and context
    model.to(device).train()
    model.checkpoint_blocks = cfg.checkpoint_blocks
    optimizer = make_optimizer(model, cfg, on_cuda)
    if start.phase == "resume" and "optimizer" in state:  # absent only in a finished run
        optimizer.load_state_dict(state["optimizer"])
    if on_cuda:  # TF32 outside autocast
        torch.set_float32_matmul_precision("high")
    if cfg.compile or (cfg.compile is None and on_cuda):
        model.compile()  # in place: no `_orig_mod.` in the state_dict
    trained = model
    if d.world > 1:  # last, once everything is checked: join the other processes
        dist.init_process_group("nccl" if on_cuda else "gloo")
        trained = DDP(model, device_ids=[d.local_rank] if on_cuda else None)
    return Run(cfg, d, device, dtype, model, trained, optimizer, data, vocab)


def tokens_per_step(run: Run) -> int:
    return run.cfg.batch_size * run.cfg.grad_accum * run.model.config.block_size


def start_log(r: Run, start: Start, record: dict) -> RunLog:
    """The run's log, opened with out_dir/config.json: the settings and what they resolved to."""
    resolved = {
        "phase": start.phase,
        "device": r.device,
        "dtype": system.dtype_name(r.dtype),
        "tokens_per_step": tokens_per_step(r),
        "warmup_steps": r.cfg.warmup,
        "min_lr": r.cfg.final_lr,
        "start_step": int(start.state["step"]) if start.phase == "resume" else 0,
        "extended_from": start.extended_from,
        "tokenizer": r.data.tokenizer,
        "params": r.model.num_params(),
    }
    log = RunLog(r.cfg.out_dir, master=r.dist.rank == 0)
    config = {"run": asdict(r.cfg), "model": r.model.config.to_dict()}
    log.start({**config, "provenance": record["provenance"], "resolved": resolved})
    return log


# === One training step, and an evaluation
def autocast(run: Run):
    if run.dtype == torch.float32:
        return nullcontext()
    return torch.autocast(run.device.split(":")[0], run.dtype)


def train_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step; its mean loss over the global batch (a tensor, not synced)."""
    cfg, tokens, d = run.cfg, run.data.train, run.dist
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    T = run.model.config.block_size
    accum = cfg.grad_accum // d.world  # this process's share of the micro-batches
    total = torch.zeros((), device=run.device)
    for i in range(accum):
        micro = d.rank * accum + i
        starts = window_starts(tokens, T, (cfg.batch_size,), cfg.seed, "train", step, micro)
        mix_seed = stream_seed(cfg.seed, "mix", step, micro)
        x, y = windows(tokens, starts, T, cfg.data_mix, mix_seed, run.device)
        skip_sync = d.world > 1 and i < accum - 1  # DDP all-reduces in the last backward
        with run.trained.no_sync() if skip_sync else nullcontext():
            with autocast(run):
                loss = run.trained(x, y) / accum
            loss.backward()
        total += loss.detach()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return system.all_reduce_sum(total, d) / d.world


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over the fixed validation windows, shared among the processes."""
    cfg, T, tokens = run.cfg, run.model.config.block_size, run.data.val
    starts = window_starts(tokens, T, (cfg.eval_batches, cfg.batch_size), cfg.seed, "val")
    run.model.eval()
    total = torch.zeros((), device=run.device, dtype=torch.float64)
    for i in range(run.dist.rank, len(starts), run.dist.world):
        x, y = windows(tokens, starts[i], T, device=run.device)
        with autocast(run):
            total += run.model(x, y).double()
    run.model.train()
    return system.all_reduce_sum(total, run.dist).item() / len(starts)


# === Checkpoints, written by process 0
def save_checkpoint(run: Run, step: int, record: dict) -> None:
    """out_dir/ckpt.pt, with record's metrics, extended_from and provenance."""
    cfg = run.cfg
    state = {
        "model_config": run.model.config.to_dict(),
        "model": run.model.state_dict(),
        "tokenizer": run.tokenizer,
        "step": step,
        "run_config": asdict(cfg),
        "metrics": dict(record["metrics"]),
        "extended_from": record["extended_from"],
        "data_state": {"order": "windows seeded by (seed, step, micro-batch)", "seed": cfg.seed},
        "provenance": record["provenance"],
    }
    if step < cfg.max_steps or cfg.final_optimizer:  # a finished run's optimizer: on request
        state["optimizer"] = run.optimizer.state_dict()
    checkpoint.save_numbered(state, Path(cfg.out_dir), step, cfg.keep_checkpoints)


def check_finite(pending: list, metrics: dict, cfg: RunConfig, saved: int | None) -> None:
    """Read the pending (step, loss) at once, not a GPU sync a step; stop at a non-finite one."""
    values = torch.stack([loss for _, loss in pending]).tolist() if pending else []
    for (step, _), value in zip(pending, values):
        if not math.isfinite(value):
            raise TrainingError(
                f"loss is {value} at step {step}; {not_saved(cfg, saved)}. "
                "Lower --lr or check the data"
            )
        metrics["last_train_loss"] = value
    pending.clear()


def not_saved(cfg: RunConfig, saved: int | None) -> str:
    if saved is None:
        return "stopped before any checkpoint was saved"
    path = Path(cfg.out_dir) / "ckpt.pt"
    return f"stopped without saving: {path} keeps the last good weights, step {saved}"


# === The loop
def loop(run: Run, start: Start, record: dict, log: RunLog, stopper: StopOnSignal) -> dict:
    """At step `step` (the weights after `step` updates): evaluate, save or stop, then step."""
    cfg, metrics = run.cfg, record["metrics"]
    first = step = int(start.state["step"]) if start.phase == "resume" else 0
    saved = first if start.phase == "resume" else None  # the step out_dir/ckpt.pt holds
    peak = cfg.peak_tflops * 1e12 * run.dist.world if run.device.startswith("cuda") else None
    tokens = tokens_per_step(run)
    speed = Throughput(tokens, run.model.flops_per_token(run.model.config.block_size), peak, step)
    t_start, pending, stopped = time.time(), [], None  # pending: (step, loss) not yet read
    while True:
        last = step == cfg.max_steps
        signum = stopper.agreed(run.dist, run.device)  # all processes stop at the same step
        if signum or (cfg.stop_at_step == step and not last):
            stopped = signal.Signals(signum).name if signum else "stop_at_step"
        evaluated = start.phase == "resume" and step == first  # before its checkpoint was saved
        if (step % cfg.eval_interval == 0 or last) and not evaluated:
            check_finite(pending, metrics, cfg, saved)
            metrics["last_val_loss"] = val_loss = evaluate(run)
            best = metrics["best_val_loss"]
            metrics["best_val_loss"] = val_loss if best is None else min(best, val_loss)
            log.print(f"step {step}/{cfg.max_steps} | val loss {val_loss:.4f}")
            elapsed = round(time.time() - t_start, 3)
            log.event(event="eval", step=step, val_loss=val_loss, elapsed_s=elapsed)
            speed.mark(step)
        if stopped or last or (step % cfg.ckpt_interval == 0 and step > first):
            check_finite(pending, metrics, cfg, saved)  # no save after a non-finite loss
            if not all(p.isfinite().all() for p in run.model.parameters()):
                raise TrainingError(
                    f"the weights became NaN/inf by step {step}; "
                    f"{not_saved(cfg, saved)}. Lower --lr"
                )
            if run.dist.rank == 0:
                save_checkpoint(run, step, record)
            saved = step
            speed.mark(step)
        if stopped or last:
            break
        pending.append((step, train_step(run, step)))
        if step % cfg.log_interval == 0 or step == first + 2:  # three steps in: the time to go
            check_finite(pending, metrics, cfg, saved)  # the GPU catches up
            tokens_per_s, mfu = speed.rates(step + 1)
            loss, lr = metrics["last_train_loss"], lr_at(step, cfg)
            to_go = (cfg.max_steps - step - 1) * tokens / tokens_per_s  # start-up aside
            eta = f" | eta {system.duration(to_go)}" if step > first else ""
            mfu_text, elapsed = "n/a" if mfu is None else f"{100 * mfu:.1f}%", time.time() - t_start
            log.print(
                f"step {step}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{tokens_per_s:,.0f} tok/s | mfu {mfu_text} | {elapsed:.0f}s{eta}"
            )
            if step % cfg.log_interval == 0:  # not the early line: the curves keep their steps
                rates = {"tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed_s": round(elapsed, 3)}
                log.event(event="train", step=step, train_loss=loss, lr=lr, **rates)
        step += 1
    path = Path(cfg.out_dir) / "ckpt.pt"
    if stopped is None:
        log.print(
            f"done: val loss {metrics['last_val_loss']:.4f} at step {step}; checkpoint {path}"
        )
    else:
        resume = f"--init_from=resume --out_dir={cfg.out_dir}"
        log.print(f"stopped ({stopped}) at step {step}; checkpoint {path}; continue with {resume}")
    tokens_per_s, mfu = speed.rates()
    return {
        "final_val_loss": metrics["last_val_loss"] if last else None,
        **metrics,
        "final_train_loss": metrics["last_train_loss"],
        "steps": step,
        "max_steps": cfg.max_steps,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "elapsed_s": round(time.time() - t_start, 3),
        "out_dir": str(Path(cfg.out_dir)),
        "checkpoint": str(path),
        "phase": start.phase,
        "stopped": stopped,
    }


# === The entry point
def train(run: dict, model: dict, state: dict | None = None, argv=None) -> dict:
    """Hold out_dir, decide the start (init_from), set up, loop; the summary, or ValueError,
    FolderInUse, TrainingError, SystemExit(128 + signal)."""
    d = system.dist_from_env()
    try:
        out_dir = run.get("out_dir", RunConfig.out_dir)
        with system.lock_folder(out_dir, "--out_dir") if d.rank == 0 else nullcontext():
            start = init_from(run, model, state)
            r = setup(start, d)  # under torchrun: joins the other processes
            metrics = {"best_val_loss": None, "last_val_loss": None, "last_train_loss": None}
            metrics.update(start.state.get("metrics", {}) if start.phase == "resume" else {})
            record = {
                "metrics": metrics,
                "extended_from": start.extended_from,
                "provenance": {**system.provenance(r.device, argv), "world_size": d.world},
            }
            log = start_log(r, start, record)
            with StopOnSignal() as stopper:
                summary = loop(r, start, record, log, stopper)
        if summary["stopped"] not in (None, "stop_at_step"):
            raise SystemExit(128 + signal.Signals[summary["stopped"]].value)
        return summary
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv) -> dict:
    """train() from the command line's flags."""
    return train(*parse_args(argv, __doc__), argv=argv)


if __name__ == "__main__":
    raise SystemExit(flags.cli(main, errors=ERRORS))
