"""Pretraining and context extension in one script; --init_from chooses the phase:

    python train.py                                            # pretrain the default toy model from scratch
    python train.py --init_from=resume --out_dir=out/pretrain  # continue a run from its latest checkpoint
    python train.py --init_from=out/pretrain --out_dir=out/yarn8 --block_size=4096 \\
        --rope.type=yarn --rope.factor=8 --max_steps=200 --batch_size=8 --lr=1e-4   # extend, then fine-tune
    torchrun --standalone --nproc_per_node=8 train.py ...      # DDP on 8 GPUs, the same global batch

Settings (--help says what each means): config.RunConfig, model.ModelConfig and --rope.<field> of rope.RopeConfig,
or --config FILE.json. An extension starts a fresh optimizer at step 0; a resume continues out_dir/ckpt.pt exactly.
Outputs in out_dir: ckpt.pt (and ckpt_<step>.pt), config.json, metrics.jsonl. Exit codes: 0 done; 2 bad input
(`error: ...`); 1 a non-finite loss or weights (the last good checkpoint is kept); 75 out_dir is in use by another
run (its lock, out_dir/.lock); 130 / 143 after SIGINT / SIGTERM, once the step is saved. Read top to bottom: where
a run starts, batches, optimizer, set-up, a step, checkpoints and logs, the loop; train() typed, main() the flags.
"""

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import flags
from config import RUN_FIELDS, RunConfig, new_model_config, parse_args
from data.loader import TrainingData, load_training_data, stream_seed, window_starts, windows
from model import ModelConfig, Transformer
from system import (Dist, FolderInUse, StopOnSignal, Throughput, all_reduce_sum, dist_from_env, duration,
                    dtype_name, lock_folder, pick_device, pick_dtype, provenance, read_json,
                    write_json)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or weights): `error: ...`, exit code 1."""


# === Where a run starts: scratch, resume or extend, decided here and only here
class Start(NamedTuple):
    phase: str  # scratch | resume | extend
    cfg: RunConfig
    model_config: ModelConfig  # new (scratch), the checkpoint's (resume), the checkpoint's extended (extend)
    state: dict | None  # the checkpoint it starts from: out_dir's (resume) or --init_from's (extend)
    extended_from: str | None  # the checkpoint an extension started from (a resume keeps its run's)


def decide_start(run_values: dict, model_values: dict, state: dict | None = None) -> Start:
    """The run that the settings given describe ({run field: value}, {model field: value, 'rope': {...}}), from
    the checkpoint --init_from names (`state`, if the caller has loaded it already)."""
    init = run_values.get("init_from", RunConfig.init_from)
    if init == "resume":
        return resumed(run_values, model_values, state)
    cfg = RunConfig(**run_values)
    if (Path(cfg.out_dir) / "ckpt.pt").exists():
        raise ValueError(f"{cfg.out_dir} already holds a checkpoint: continue it with --init_from=resume, "
                         "or choose another --out_dir")
    if init == "scratch":
        return Start("scratch", cfg, new_model_config(model_values), None, None)
    path = Path(init) / "ckpt.pt" if Path(init).is_dir() else Path(init)
    state = state or checkpoint.load(path)
    pretrained = ModelConfig.from_dict(state["model_config"])
    return Start("extend", cfg, extended_model_config(pretrained, model_values), state, str(path))


def extended_model_config(base: ModelConfig, given: dict) -> ModelConfig:
    """The pretrained model with a new training context and the RoPE fields given replacing its own."""
    check_kept(base, {k: v for k, v in given.items() if k not in ("rope", "block_size")},
               "extension keeps the architecture (it changes only --block_size and --rope.*)")
    rope = checkpoint.rope_with_overrides(base, given.get("rope", {}))
    return replace(base, block_size=given.get("block_size", base.block_size), rope=rope)


def check_kept(saved: ModelConfig, given: dict, why: str) -> None:
    """Model flags that may only repeat the checkpoint's values: a ValueError naming the first that does not."""
    pairs = [(f"rope.{k}", v, getattr(saved.rope, k)) for k, v in given.get("rope", {}).items()]
    for name, value, have in pairs + [(k, v, getattr(saved, k)) for k, v in given.items() if k != "rope"]:
        if value != have:
            raise ValueError(f"--{name}={value} differs from the checkpoint's {have}; {why}")


def resumed(run_values: dict, model_values: dict, state: dict | None) -> Start:
    """out_dir's checkpoint continued: its model, and its saved run config with the settings given now on top (but
    not init_from and stop_at_step, which belong to one invocation)."""
    path = Path(run_values.get("out_dir", RunConfig.out_dir)) / "ckpt.pt"
    if state is None and not path.exists():
        raise ValueError(f"--init_from=resume but {path} does not exist; start the run with --init_from=scratch "
                         "(or a checkpoint to extend), or check --out_dir")
    state = state or checkpoint.load(path)
    saved_model = ModelConfig.from_dict(state["model_config"])
    check_kept(saved_model, model_values, "a resumed run keeps its model: change it in a new run (another --out_dir)")
    saved = state.get("run_config")
    if not isinstance(saved, dict) or set(saved) - RUN_FIELDS:
        raise ValueError("the checkpoint's run_config is missing or has keys this train.py does not know "
                         f"({sorted(set(saved) - RUN_FIELDS) if isinstance(saved, dict) else saved!r}): it was not "
                         "written by this train.py")
    carried = {k: v for k, v in saved.items() if k not in ("init_from", "stop_at_step")}
    given = {**run_values, "out_dir": str(path.parent), "init_from": saved.get("init_from", "scratch")}
    cfg = RunConfig(**{**carried, **given})
    step = int(state["step"])
    if step > cfg.max_steps:
        raise ValueError(f"the checkpoint is at step {step}, past --max_steps={cfg.max_steps}")
    if "optimizer" not in state and step < cfg.max_steps:
        raise ValueError(f"the checkpoint in {cfg.out_dir} has no optimizer state (saved with "
                         "--final_optimizer=false), so it cannot be continued; extend from it with --init_from")
    return Start("resume", cfg, saved_model, state, state.get("extended_from"))


# === The optimizer and its learning rate
def make_optimizer(model: Transformer, cfg: RunConfig, on_cuda: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weights (matmuls, the tied embedding) and none on norm gains."""
    params = list(model.parameters())  # the tied embedding/head weight appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True if on_cuda else None)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to lr over `warmup` steps, then a cosine down to final_lr at max_steps: a pure function of
    the step, so a resumed run needs no scheduler state."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)


# === Set-up: the data, the device, the model and optimizer, everything checked before the first step
@dataclass
class Run:
    """A run in progress, as setup() builds it; every later function reads it."""
    cfg: RunConfig
    out_dir: Path
    phase: str  # scratch | resume | extend
    extended_from: str | None
    dist: Dist  # this process's rank among `world`
    device: str
    dtype: torch.dtype  # autocast's; float32 = none
    model: Transformer  # saved and evaluated (compiled in place when compile is on)
    trained: torch.nn.Module  # what a training step calls: model, or model in DDP when there are processes
    optimizer: torch.optim.Optimizer
    data: TrainingData  # train and val tokens, the tokenizer's name
    start_step: int
    provenance: dict
    metrics: dict  # best_val_loss, last_val_loss, last_train_loss
    tokens_per_step: int  # batch_size x grad_accum x block_size
    saved_step: int | None = None  # the step out_dir/ckpt.pt holds


def setup(start: Start, d: Dist, argv=None) -> Run:
    """The data, the device, the model and its optimizer; under torchrun, it joins the other processes last."""
    cfg, config, state = start.cfg, start.model_config, start.state
    if cfg.grad_accum % d.world:
        raise ValueError(f"--grad_accum ({cfg.grad_accum}) must be divisible by the number of processes ({d.world}): "
                         "the global batch batch_size x grad_accum is the same whatever the process count")
    data = load_training_data(cfg.data_dir, config.block_size, config.vocab_size, cfg.data_mix)
    device = pick_device(cfg.device)
    on_cuda = device.startswith("cuda")
    if d.world > 1 and on_cuda:
        device = f"cuda:{d.local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)  # every process builds the same model
    model = Transformer(config) if state is None else checkpoint.model_from_state(state)
    model.set_rope(config.rope, config.block_size)  # an extension's RoPE and context; the weights are untouched
    model.to(device).train()
    optimizer = make_optimizer(model, cfg, on_cuda)
    metrics = {"best_val_loss": None, "last_val_loss": None, "last_train_loss": None}
    resuming = start.phase == "resume"
    if resuming:
        metrics.update(state.get("metrics", {}))
        if "optimizer" in state:  # absent only where the run had finished (decide_start checks)
            optimizer.load_state_dict(state["optimizer"])
    start_step = int(state["step"]) if resuming else 0
    if on_cuda:  # TF32 for fp32 matmuls left outside autocast (this call sets the legacy and the new flags alike)
        torch.set_float32_matmul_precision("high")
    if cfg.compile or (cfg.compile is None and on_cuda):
        model.compile()  # in place: the module stays itself, its state_dict keys get no `_orig_mod.` prefix
    trained = model
    if d.world > 1:  # last, once everything is checked: join the other processes
        dist.init_process_group("nccl" if on_cuda else "gloo")
        trained = DDP(model, device_ids=[d.local_rank] if on_cuda else None)  # broadcasts rank 0's weights
    return Run(cfg=cfg, out_dir=Path(cfg.out_dir), phase=start.phase, extended_from=start.extended_from, dist=d,
               device=device, dtype=pick_dtype(cfg.dtype, device), model=model, trained=trained, optimizer=optimizer,
               data=data, start_step=start_step, provenance={**provenance(device, argv), "world_size": d.world},
               metrics=metrics, tokens_per_step=cfg.batch_size * cfg.grad_accum * config.block_size,
               saved_step=start_step if resuming else None)


# === One training step, and an evaluation
def autocast(run: Run):
    return nullcontext() if run.dtype == torch.float32 else torch.autocast(run.device.split(":")[0], run.dtype)


def train_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step; returns the step's mean loss over the global batch (a tensor, not synced)."""
    cfg, tokens = run.cfg, run.data.train
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    T = run.model.config.block_size
    accum = cfg.grad_accum // run.dist.world  # this process's share: micro-batches rank*accum .. rank*accum+accum-1
    total = torch.zeros((), device=run.device)
    for i in range(accum):
        micro = run.dist.rank * accum + i
        starts = window_starts(tokens, T, (cfg.batch_size,), cfg.seed, "train", step, micro)
        mix_seed = stream_seed(cfg.seed, "mix", step, micro)
        x, y = windows(tokens, starts, T, cfg.data_mix, mix_seed, run.device)
        skip_sync = run.dist.world > 1 and i < accum - 1  # DDP all-reduces in backward: the last micro-step only
        with run.trained.no_sync() if skip_sync else nullcontext():
            with autocast(run):
                loss = run.trained(x, y) / accum
            loss.backward()
        total += loss.detach()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum(total, run.dist) / run.dist.world


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over the fixed validation windows; the processes share them and sum their parts."""
    T, tokens = run.model.config.block_size, run.data.val
    starts = window_starts(tokens, T, (run.cfg.eval_batches, run.cfg.batch_size), run.cfg.seed, "val")
    run.model.eval()
    total = torch.zeros((), device=run.device, dtype=torch.float64)
    for i in range(run.dist.rank, len(starts), run.dist.world):
        x, y = windows(tokens, starts[i], T, device=run.device)
        with autocast(run):
            total += run.model(x, y).double()
    run.model.train()
    return all_reduce_sum(total, run.dist).item() / len(starts)


# === Checkpoints and logs (written by process 0 only)
def save_checkpoint(run: Run, step: int) -> None:
    cfg = run.cfg
    with_optimizer = step < cfg.max_steps or cfg.final_optimizer
    checkpoint.save_numbered({
        "model_config": run.model.config.to_dict(), "model": run.model.state_dict(), "tokenizer": run.data.tokenizer,
        **({"optimizer": run.optimizer.state_dict()} if with_optimizer else {}), "step": step,
        "run_config": asdict(cfg), "metrics": dict(run.metrics), "extended_from": run.extended_from,
        "data_state": {"order": "windows seeded by (seed, step, micro-batch)", "seed": cfg.seed, "step": step},
        "provenance": run.provenance,
    }, run.out_dir, step, cfg.keep_checkpoints)


def check_finite(run: Run, pending: list) -> None:
    """Raise TrainingError at the first non-finite loss not yet checked (in batches: no GPU sync every step)."""
    values = torch.stack([loss for _, loss in pending]).tolist() if pending else []
    for (step, _), value in zip(pending, values):
        if not math.isfinite(value):
            raise TrainingError(f"loss is {value} at step {step}; {not_saved(run)}. Lower --lr or check the data")
        run.metrics["last_train_loss"] = value
    pending.clear()


def not_saved(run: Run) -> str:
    if run.saved_step is None:
        return "stopped without saving (no checkpoint had been saved yet)"
    return f"stopped without saving: {run.out_dir / 'ckpt.pt'} keeps the last good weights, step {run.saved_step}"


class Logger:
    """stdout, out_dir/metrics.jsonl (one JSON event a line) and out_dir/config.json, from process 0 only."""

    def __init__(self, run: Run):
        self.master = run.dist.rank == 0
        self.path = run.out_dir / "metrics.jsonl"
        if not self.master:
            return
        # a resume drops what the interrupted run logged after its checkpoint: it logs them again
        fix = "train.py logs an event a line there: delete it (the log is lost, not the checkpoint)"
        logged = read_json(self.path, fix, {"event": str, "step": int}, lines=True) \
            if run.phase == "resume" and self.path.exists() else []
        at = run.start_step
        keep = [e for e in logged if e["step"] < at or (e["event"] == "eval" and e["step"] == at)]
        self.path.write_text("".join(json.dumps(event) + "\n" for event in keep))
        c, p = run.model.config, run.provenance
        write_json(run.out_dir / "config.json", {"run": asdict(run.cfg), "model": c.to_dict(), "provenance": p,
                   "resolved": {"phase": run.phase, "device": run.device, "dtype": dtype_name(run.dtype),
                                "world_size": run.dist.world, "tokens_per_step": run.tokens_per_step,
                                "warmup_steps": run.cfg.warmup, "min_lr": run.cfg.final_lr,
                                "start_step": run.start_step, "extended_from": run.extended_from,
                                "tokenizer": run.data.tokenizer, "params": run.model.num_params()}})
        commit = (p["git_commit"] or "unknown")[:12] + (" (dirty)" if p["git_dirty"] else "")
        self.print(f"train.py: {run.phase} {run.extended_from or ''} step {run.start_step} -> {run.cfg.max_steps}, "
                   f"{run.model.num_params() / 1e6:.1f}M parameters, block {c.block_size}, rope {c.rope.type} "
                   f"(factor {c.rope.factor}, L {c.rope.original_context}), {run.tokens_per_step:,} tokens/step\n"
                   f"  {p['device']} x {run.dist.world}, {dtype_name(run.dtype)}, torch {p['torch']}, commit {commit}")

    def print(self, text: str):
        if self.master:
            print(text, flush=True)

    def event(self, **record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# === The loop
def loop(run: Run, log: Logger, stopper: StopOnSignal) -> dict:
    cfg = run.cfg
    peak = cfg.peak_tflops * 1e12 * run.dist.world if run.device.startswith("cuda") else None  # none for a CPU
    flops = run.model.flops_per_token(run.model.config.block_size)
    speed = Throughput(run.tokens_per_step, flops, peak, run.start_step)
    t_start, pending = time.time(), []  # pending: (step, loss) not yet checked
    stopped, step = None, run.start_step
    while True:  # at the top of step `step`: the weights after `step` updates; evaluate, save, or stop here
        last = step == cfg.max_steps
        signum = stopper.agreed(run.dist, run.device)  # every process stops at the same step, or DDP hangs
        if signum or (cfg.stop_at_step == step and not last):  # a signal during the last step still counts
            stopped = signal.Signals(signum).name if signum else "stop_at_step"
        evaluated_already = run.phase == "resume" and step == run.start_step  # before the checkpoint was saved
        if (step % cfg.eval_interval == 0 or last) and not evaluated_already:
            check_finite(run, pending)
            val_loss = evaluate(run)
            best = run.metrics["best_val_loss"]
            run.metrics["last_val_loss"] = val_loss
            run.metrics["best_val_loss"] = val_loss if best is None else min(best, val_loss)
            log.print(f"step {step}/{cfg.max_steps} | val loss {val_loss:.4f}")
            log.event(event="eval", step=step, val_loss=val_loss, elapsed_s=round(time.time() - t_start, 3))
            speed.mark(step)
        if stopped or last or (step % cfg.ckpt_interval == 0 and step > run.start_step):
            check_finite(run, pending)  # never save weights that a non-finite loss has touched
            if not all(p.isfinite().all() for p in run.model.parameters()):
                raise TrainingError(f"the weights became NaN/inf by step {step}; {not_saved(run)}. Lower --lr")
            if run.dist.rank == 0:
                save_checkpoint(run, step)
            run.saved_step = step
            speed.mark(step)
        if stopped or last:
            break
        pending.append((step, train_step(run, step)))
        early = step == run.start_step + 2  # three steps in, the time to go is printed, whatever log_interval
        if step % cfg.log_interval == 0 or early:
            check_finite(run, pending)  # reads the losses back, so the GPU has caught up
            tokens_per_s, mfu = speed.rates(step + 1)
            loss, lr = run.metrics["last_train_loss"], lr_at(step, cfg)
            to_go = (cfg.max_steps - step - 1) * run.tokens_per_step / tokens_per_s  # the first step's start-up aside
            log.print(f"step {step}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
                      f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {time.time() - t_start:.0f}s"
                      + (f" | eta {duration(to_go)}" if step > run.start_step else ""))
            if step % cfg.log_interval == 0:  # the early line is not an event: the loss curves keep their steps
                log.event(event="train", step=step, train_loss=loss, lr=lr, tokens_per_s=tokens_per_s, mfu=mfu,
                          elapsed_s=round(time.time() - t_start, 3))
        step += 1
    tokens_per_s, mfu = speed.rates()
    return {"final_val_loss": run.metrics["last_val_loss"] if last else None, **run.metrics,
            "final_train_loss": run.metrics["last_train_loss"], "steps": step, "max_steps": cfg.max_steps,
            "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed_s": round(time.time() - t_start, 3),
            "out_dir": str(run.out_dir), "checkpoint": str(run.out_dir / "ckpt.pt"), "phase": run.phase,
            "stopped": stopped}


# === Entry points
def run_training(run_values: dict, model_values: dict, state: dict | None = None, argv=None) -> dict:
    """Hold out_dir (process 0 writes), decide the start, set up, loop. Returns the summary; raises ValueError for
    bad input, FolderInUse while another process holds out_dir, TrainingError, or SystemExit(128 + n) on signal n."""
    d = dist_from_env()
    out_dir = run_values.get("out_dir", RunConfig.out_dir)
    try:
        with lock_folder(out_dir, "--out_dir") if d.rank == 0 else nullcontext():
            run = setup(decide_start(run_values, model_values, state), d, argv)  # under torchrun: joins the others
            log = Logger(run)
            with StopOnSignal() as stopper:
                summary = loop(run, log, stopper)
        if summary["stopped"] is None:
            log.print(f"done: val loss {summary['final_val_loss']:.4f} at step {summary['steps']}; "
                      f"checkpoint {summary['checkpoint']}")
        else:
            log.print(f"stopped ({summary['stopped']}) at step {summary['steps']}; checkpoint "
                      f"{summary['checkpoint']}; continue with --init_from=resume --out_dir={run.out_dir}")
        if summary["stopped"] not in (None, "stop_at_step"):
            raise SystemExit(128 + signal.Signals[summary["stopped"]].value)
        return summary
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: RunConfig, model_config: ModelConfig, state: dict | None = None, resume: bool = False,
          argv=None) -> dict:
    """The typed entry point: what the flags of cfg and model_config would do (an extension: the checkpoint's
    architecture with a new block_size and RoPE); resume continues out_dir's checkpoint, `state` if loaded."""
    run_values = {**asdict(cfg), "init_from": "resume"} if resume else asdict(cfg)
    return run_training(run_values, asdict(model_config), state, argv)


def main(argv) -> dict:
    return run_training(*parse_args(argv, __doc__), argv=argv)


def cli(argv=None) -> int:
    return flags.cli(main, argv, errors={TrainingError: 1, FolderInUse: FolderInUse.exit_code, **flags.ERRORS})


if __name__ == "__main__":
    raise SystemExit(cli())
