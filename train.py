"""
Pretraining and context extension in one script. A run is one of three phases, chosen by --init_from:

    python train.py                                            # pretrain the default toy model from scratch
    python train.py --init_from=resume --out_dir=out/pretrain  # continue a run from its latest checkpoint
    python train.py --init_from=out/pretrain --out_dir=out/yarn8 --block_size=4096 \\
        --rope.type=yarn --rope.factor=8 --max_steps=200 --batch_size=8 --lr=3e-4   # extend, then fine-tune
    torchrun --standalone --nproc_per_node=8 train.py ...      # the same on 8 GPUs (DDP), same global batch

Settings are `--key=value` (or `--key value`) for the fields of RunConfig below and of model.ModelConfig,
`--rope.<field>=value` for rope.RopeConfig; `--config FILE.json` sets any of them (flags override it);
`--help` lists them all with their defaults. Every value is checked before anything is built.

Extension (--init_from=PATH, a checkpoint or a run folder): the pretrained weights, a new RoPE variant and a
longer --block_size, a fresh optimizer, step 0. rope.original_context (L) defaults to the pretrained block_size;
rope.base and rope.partial_rotary_factor are the pretrained model's (they describe how it was trained).
Architecture flags (d_model, n_layer, ...) may only repeat the checkpoint's values.

Resume (--init_from=resume): model, optimizer, step and RNG from out_dir/ckpt.pt, the run config saved there
with any flags given applied on top. The data order is a function of (seed, step, micro-batch), so a resumed run
sees the same batches and gives the same losses as an uninterrupted one.

Data: `python -m data.prepare` must have written --data_dir first (the default data/stdlib comes from
`python -m data.prepare --out data/stdlib`); train.py does not run it itself, since the corpus is a choice.

Outputs in out_dir: ckpt.pt (latest; ckpt_<step>.pt for the last keep_checkpoints saves), config.json (resolved
config and provenance), metrics.jsonl (one JSON object per log or eval event).

Exit codes: 0 finished (or stopped at --stop_at_step); 2 a bad flag, missing data or unusable checkpoint
(`error: ...`, found before training starts); 1 the loss became NaN/inf (the last good checkpoint is left as it
was); 130 / 143 stopped by SIGINT / SIGTERM after finishing the current step and saving a checkpoint
(128 + signal number, the shell's convention, so a scheduler sees the run did not finish).

main(argv) runs in-process and returns a summary dict (final_val_loss, steps, tokens_per_s, mfu, out_dir, ...);
it raises ConfigError (a ValueError) or TrainingError, and SystemExit(130/143) after a signal.
"""

import difflib
import hashlib
import inspect
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from data.loader import check_block_size, load_split
import flags
from model import ModelConfig, Transformer
import rope
from rope import RopeConfig

REPO = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A bad flag, missing data or an unusable checkpoint: reported as `error: ...`, exit code 2."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or weights): reported as `error: ...`, exit code 1."""


# ----------------------------------------------------------------------------------------------------------
# Run config (the model config is model.ModelConfig; the two are kept apart and saved apart)


@dataclass(frozen=True)
class RunConfig:
    """Everything about a run that is not the model: phase, data, optimizer, schedule, logging, system.

    The defaults are the toy pretraining run for one H100: 64 windows x 512 tokens = 32,768 tokens per step,
    2,000 steps = 65M tokens, about 4 passes over the 15M-token stdlib corpus, for train.py's default 51M-parameter
    model (25M of them the tied embedding) -- minutes at a few hundred thousand tokens/s. lr 1e-3 with betas
    (0.9, 0.95) and weight decay 0.1 is the usual AdamW setting for models of this size (GPT-3 Table 2.1 uses
    6e-4 at 125M; smaller models take larger rates); the cosine ends at lr/10 (Chinchilla)."""

    # phase and folders
    init_from: str = "scratch"  # scratch, resume (out_dir's latest checkpoint), or a checkpoint/run folder to extend
    out_dir: str = "out/pretrain"  # checkpoints, config.json, metrics.jsonl
    data_dir: str = "data/stdlib"  # written by `python -m data.prepare`
    # batch: an optimizer step sees batch_size * grad_accum windows of block_size tokens, whatever the process count
    batch_size: int = 64  # windows per micro-step, per process
    grad_accum: int = 1  # micro-steps per optimizer step, over all processes (divided among them)
    # schedule: linear warmup, then cosine to min_lr at max_steps, a pure function of the step
    max_steps: int = 2000  # optimizer steps; the cosine reaches min_lr here
    lr: float = 1e-3  # peak learning rate
    min_lr: float | None = None  # None = lr / 10
    warmup_steps: int | None = None  # None = 5% of max_steps (100 of the default 2000)
    # AdamW; weight decay on 2-D weights only (matmuls and the embedding), never on norms
    weight_decay: float = 0.1  # decoupled (AdamW), on 2-D weights only
    beta1: float = 0.9  # AdamW betas (0.9, 0.95), as GPT-3 and LLaMA
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    seed: int = 1337  # model init, data order (with the step) and validation windows
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # validation loss every this many steps, and at the end
    eval_batches: int = 20  # fixed validation windows: eval_batches x batch_size, the same at every eval
    log_interval: int = 10  # a train log line (and metrics.jsonl record) every this many steps
    ckpt_interval: int = 500  # out_dir/ckpt.pt every this many steps, and at the end
    keep_checkpoints: int = 2  # also keep ckpt_<step>.pt for this many most recent saves; 0 = only ckpt.pt
    # system
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # autocast dtype: bfloat16 | float32; auto = bfloat16 on CUDA, float32 on CPU
    compile: bool | None = None  # torch.compile; None = on for CUDA, off for CPU
    peak_tflops: float = 989.0  # per device, for MFU: 989 = H100 SXM bf16 dense (TFLOP/s)
    # for tests and scripted runs
    stop_at_step: int | None = None  # save a checkpoint and exit 0 at this step; the schedule stays max_steps'
    debug_nan_at_step: int | None = None  # tests only: make the loss NaN at this step

    def __post_init__(self):
        check_types(self, "")
        check_ranges(self)

    @property
    def warmup(self) -> int:
        return round(0.05 * self.max_steps) if self.warmup_steps is None else self.warmup_steps

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


# Fields of RunConfig that belong to one invocation, never carried over by --init_from=resume.
INVOCATION_ONLY = ("init_from", "stop_at_step", "debug_nan_at_step")


def check_ranges(c: RunConfig) -> None:
    """Each field on its own; check_relations compares fields with each other."""
    def need(ok: bool, message: str):
        if not ok:
            raise ValueError(message)

    for name in ("init_from", "out_dir", "data_dir"):
        need(getattr(c, name).strip() != "", f"--{name} must not be empty")
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval",
                 "ckpt_interval"):
        need(getattr(c, name) >= 1, f"--{name} must be >= 1, got {getattr(c, name)}")
    need(c.lr > 0, f"--lr must be > 0, got {c.lr}")
    need(c.min_lr is None or c.min_lr >= 0, f"--min_lr must be >= 0 (or none = lr/10), got {c.min_lr}")
    need(c.warmup_steps is None or c.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {c.warmup_steps}")
    need(c.weight_decay >= 0, f"--weight_decay must be >= 0, got {c.weight_decay}")
    for name in ("beta1", "beta2"):
        need(0 <= getattr(c, name) < 1, f"--{name} must be in [0, 1), got {getattr(c, name)}")
    need(c.grad_clip >= 0, f"--grad_clip must be >= 0 (0 = off), got {c.grad_clip}")
    need(0 <= c.seed < 2**63, f"--seed must be in [0, 2^63), got {c.seed}")
    need(c.keep_checkpoints >= 0, f"--keep_checkpoints must be >= 0, got {c.keep_checkpoints}")
    need(c.device in ("auto", "cpu", "cuda") or (c.device.startswith("cuda:") and c.device[5:].isdigit()),
         f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    need(c.dtype in ("auto", "bfloat16", "float32"), f"--dtype must be auto, bfloat16 or float32, got {c.dtype!r}")
    need(0 < c.peak_tflops <= 1e5,
         f"--peak_tflops is in TFLOP/s per device (989 for an H100's bf16), got {c.peak_tflops}")
    need(c.stop_at_step is None or c.stop_at_step >= 0, f"--stop_at_step must be >= 0, got {c.stop_at_step}")
    need(c.debug_nan_at_step is None or c.debug_nan_at_step >= 0,
         f"--debug_nan_at_step must be >= 0, got {c.debug_nan_at_step}")


def check_relations(c: RunConfig) -> None:
    if c.warmup_steps is not None and c.warmup_steps > c.max_steps:
        raise ValueError(f"--warmup_steps ({c.warmup_steps}) must be <= --max_steps ({c.max_steps})")
    if c.min_lr is not None and c.min_lr > c.lr:
        raise ValueError(f"--min_lr ({c.min_lr}) must be <= --lr ({c.lr})")
    if c.stop_at_step is not None and c.stop_at_step > c.max_steps:
        raise ValueError(f"--stop_at_step ({c.stop_at_step}) must be <= --max_steps ({c.max_steps})")


# ----------------------------------------------------------------------------------------------------------
# Flags: --key=value parsed into dataclass fields by their types (flags.py reads each value)


def check_types(obj, prefix: str) -> None:
    """Every field of a (frozen) dataclass instance holds a value of its declared type; an int given for a float
    field becomes that float, a bool is never taken for a number."""
    for name, typ in flags.field_types(type(obj)).items():
        base, optional = flags.unwrap_optional(typ)
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if base is float and isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**1023:
            value = float(value)
            object.__setattr__(obj, name, value)
        ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
        if base is float:
            ok = isinstance(value, float) and math.isfinite(value)
        if not ok:
            raise ValueError(f"--{prefix}{name} must be {flags.type_name(typ)}, got {value!r}")


def flag_table() -> dict[str, tuple[object, object, str]]:
    """Every settable key -> (type, default, group). Model fields are flat (--d_model), rope fields dotted."""
    table = {}
    for cls, prefix, group in ((RunConfig, "", "run"), (ModelConfig, "", "model"), (RopeConfig, "rope.", "rope")):
        types = flags.field_types(cls)
        for f in fields(cls):
            if cls is ModelConfig and f.name == "rope":
                continue
            assert prefix + f.name not in table, f"{f.name} is both a run and a model field"
            table[prefix + f.name] = (types[f.name], f.default, group)
    return table


FLAGS = flag_table()


def coerce_json(key: str, value, typ, source: str) -> object:
    """A value from a JSON config file as the field's type (strings are parsed as flags are)."""
    base, optional = flags.unwrap_optional(typ)
    if isinstance(value, str) and base is not str:
        return flags.parse_value(key, value, typ)
    if value is None and optional:
        return value
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
    if base is str and isinstance(value, str):
        return value
    raise ValueError(f"{source}: {key} must be {flags.type_name(typ)}, got {json.dumps(value)[:60]}")


def unknown_key(key: str, source: str) -> ValueError:
    close = difflib.get_close_matches(key, list(FLAGS) + ["config"], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; `python train.py --help` lists them"
    if key == "rope":
        hint = "; RoPE settings are --rope.<field>, e.g. --rope.type=yarn --rope.factor=8"
    return ValueError(f"{source}unknown option --{key}{hint}")


def split_flags(argv: list[str]) -> list[tuple[str, str | None]]:
    """[(key, text or None)] from --key=value, --key value and bare --key (a bool set to true)."""
    items, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not isinstance(arg, str):
            raise ValueError(f"arguments must be strings, got {arg!r}")
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}: settings look like --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and isinstance(argv[i + 1], str) and not argv[i + 1].startswith("--"):
                value, eq = argv[i + 1], "="
                i += 1
        if key not in FLAGS and key != "config":
            raise unknown_key(key, "")
        items.append((key, value if eq else None))
        i += 1
    return items


def read_config_file(path: str) -> dict[str, object]:
    """Typed values from a JSON object of settings: {"lr": 3e-4, "rope": {"type": "yarn"}} or {"rope.type": ...}."""
    source = f"--config {path}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(10_000_001)
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte; UnicodeDecodeError is one too
        raise ValueError(f"{source}: cannot read it ({type(e).__name__}: {e})") from None
    if len(text) > 10_000_000:
        raise ValueError(f"{source}: larger than 10 MB; a config file is a small JSON object")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: must hold a JSON object of settings, got {type(obj).__name__}")
    flat = {}
    for key, value in obj.items():
        if key == "rope" and isinstance(value, dict):
            flat.update({f"rope.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    values = {}
    for key, value in flat.items():
        if key not in FLAGS:
            raise unknown_key(key, f"{source}: ")
        values[key] = coerce_json(key, value, FLAGS[key][0], source)
    return values


def parse_args(argv: list[str]) -> tuple[RunConfig, dict, dict]:
    """(run config, model overrides, run overrides) from command-line flags; ValueError naming the flag otherwise.

    model overrides: the ModelConfig fields given, with RoPE fields nested: {"d_model": 64, "rope": {"type": "yarn"}}.
    run overrides: the RunConfig fields given (resume applies them on top of the saved run config).
    Values come from --config FILE.json first, then from the flags, whatever their order."""
    items = split_flags(list(argv))
    values = {}
    configs = [text for key, text in items if key == "config"]
    if len(configs) > 1:
        raise ValueError("--config given more than once; put everything in one file")
    if configs:
        if configs[0] is None:
            raise ValueError("--config needs a file: --config=FILE.json")
        values.update(read_config_file(configs[0]))
    for key, text in items:
        if key == "config":
            continue
        typ = FLAGS[key][0]
        if text is None:
            if flags.unwrap_optional(typ)[0] is not bool:
                raise ValueError(f"--{key} needs a value: --{key}=<{flags.type_name(typ)}>")
            text = "true"
        values[key] = flags.parse_value(key, text, typ)  # a repeated flag: the last one wins, as with argparse

    run_overrides = {k: v for k, v in values.items() if FLAGS[k][2] == "run"}
    model_overrides = {k: v for k, v in values.items() if FLAGS[k][2] == "model"}
    rope_overrides = {k[len("rope."):]: v for k, v in values.items() if FLAGS[k][2] == "rope"}
    if rope_overrides:
        model_overrides["rope"] = rope_overrides
    run = RunConfig(**run_overrides)
    if run.init_from != "resume":  # a resumed run is checked once merged with its saved config
        check_relations(run)
    if run.init_from == "scratch":
        new_model_config(model_overrides)  # the model is fully known now: check it up front
    return run, model_overrides, run_overrides


def new_model_config(overrides: dict) -> ModelConfig:
    rest = {k: v for k, v in overrides.items() if k != "rope"}
    return ModelConfig(**rest, rope=RopeConfig(**overrides.get("rope", {})))


def extended_model_config(base: ModelConfig, overrides: dict) -> ModelConfig:
    """The pretrained model's config with a new RoPE variant and training context. The new RopeConfig starts from
    the defaults, not from the checkpoint's scaling, except for what describes how the model was pretrained: its
    base and rotary fraction, and L = rope.original_context = the pretrained block_size."""
    for key, value in overrides.items():
        if key not in ("rope", "block_size") and getattr(base, key) != value:
            raise ValueError(f"--{key}={value} differs from the pretrained checkpoint's {key}={getattr(base, key)}; "
                             "extension keeps the architecture (it changes only --block_size and --rope.*)")
    rope_cfg = RopeConfig(**{"base": base.rope.base, "partial_rotary_factor": base.rope.partial_rotary_factor,
                             "original_context": base.block_size, **overrides.get("rope", {})})
    return replace(base, block_size=overrides.get("block_size", base.block_size), rope=rope_cfg)


def check_same_model(saved: ModelConfig, overrides: dict) -> None:
    """A resumed run keeps its model: model flags may only repeat the checkpoint's values."""
    for key, value in overrides.items():
        pairs = [(f"rope.{k}", v, getattr(saved.rope, k)) for k, v in value.items()] if key == "rope" else \
            [(key, value, getattr(saved, key))]
        for name, given, have in pairs:
            if given != have:
                raise ValueError(f"--{name}={given} differs from the checkpoint's {have}; a resumed run keeps its "
                                 "model: start a new run (another --out_dir) to change it")


def field_comments(cls) -> dict[str, str]:
    """The comment at the end of each field's line in the class's source: the help text, kept in one place."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = (re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line) for line in source.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def usage() -> str:
    lines = [__doc__.strip(), ""]
    comments = {**field_comments(ModelConfig), **{f"rope.{k}": v for k, v in field_comments(RopeConfig).items()},
                **field_comments(RunConfig)}
    comments["rope.type"] = "one of " + ", ".join(rope.VARIANTS)
    comments["rope.original_context"] += "; extension: defaults to the pretrained block_size"
    titles = {"run": "Run (RunConfig)", "model": "Model (model.ModelConfig)", "rope": "RoPE (rope.RopeConfig)"}
    defaults = {"model": ModelConfig(), "rope": RopeConfig()}
    for group, title in titles.items():
        lines.append(f"{title}:")
        for key, (typ, default, g) in FLAGS.items():
            if g == group:
                if group != "run":
                    default = getattr(defaults[group], key.removeprefix("rope."))
                kind = flags.type_name(typ)
                lines.append(f"  --{key:<26} {kind:<14} {default!r:<14} {comments.get(key, '')}".rstrip())
        lines.append("")
    lines.append(f"  --{'config':<26} {'FILE.json':<29} a JSON object of any of these; flags override it")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Distributed setup from torchrun's environment


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them; one process when absent."""
    if "RANK" not in os.environ:
        return Dist()
    try:
        d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"RANK is set but the torchrun environment is incomplete ({e}); "
                         "launch with torchrun") from None
    return d if d.world > 1 else Dist()


def resolve_device(run: RunConfig, d: Dist) -> str:
    device = run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device={device} but CUDA is not available here; use --device=cpu")
        if d.world > 1:
            device = f"cuda:{d.local_rank}"  # one GPU per process
            torch.cuda.set_device(device)
    return device


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # SUM, not AVG: gloo has no AVG
    return x


# ----------------------------------------------------------------------------------------------------------
# Batches: windows of block_size + 1 tokens at positions drawn from (seed, step, micro-batch)
#
# Step `step` of the run consumes grad_accum micro-batches, numbered 0..grad_accum-1 over all processes; process
# `rank` takes numbers rank*A .. rank*A + A - 1 (A = grad_accum / world). Each micro-batch's windows come from its
# own generator, seeded by a hash of (seed, step, number), so the global batch is the same for any world size,
# a resumed run needs no sampler state, and no two processes draw the same windows.


def stream_seed(seed: int, *key) -> int:
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def windows(tokens: np.ndarray, starts: np.ndarray, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (B, T) int64 each, for windows tokens[s : s + T + 1]."""
    w = torch.from_numpy(tokens[starts[:, None] + np.arange(T + 1)].astype(np.int64))  # (B, T+1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


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


# ----------------------------------------------------------------------------------------------------------
# Learning rate: a pure function of the step, so a resumed run needs no scheduler state


def lr_at(step: int, run: RunConfig) -> float:
    """Linear warmup to lr over the first `warmup` steps, then a cosine from lr down to final_lr at max_steps."""
    if step < run.warmup:
        return run.lr * (step + 1) / run.warmup
    progress = min(1.0, (step - run.warmup) / max(1, run.max_steps - run.warmup))
    return run.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (run.lr - run.final_lr)


# ----------------------------------------------------------------------------------------------------------
# Setup: the phase, the model, the optimizer, the data


@dataclass
class Run:
    """Everything the loop needs, built and checked by setup() before the first step."""
    run: RunConfig
    phase: str  # pretrain | resume | extend
    d: Dist
    device: str
    dtype: torch.dtype
    compile: bool
    out_dir: Path
    raw_model: Transformer  # the module whose state_dict is saved
    model: torch.nn.Module  # raw_model, compiled or not: used for evaluation
    train_model: torch.nn.Module  # model, wrapped in DDP when there are several processes
    optimizer: torch.optim.Optimizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_starts: np.ndarray
    accum: int  # micro-steps per optimizer step in this process
    start_step: int
    extended_from: str | None
    metrics: dict  # best_val_loss, last_val_loss, last_train_loss
    saved_step: int | None  # the step out_dir/ckpt.pt holds, None before the first save
    provenance: dict

    @property
    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.dtype)

    @property
    def tokens_per_step(self) -> int:
        return self.run.batch_size * self.run.grad_accum * self.raw_model.config.block_size


def setup(argv: list[str], d: Dist) -> Run:
    """Parse and check everything (flags, data, checkpoint, model config) before building anything big."""
    run, model_overrides, run_overrides = parse_args(argv)
    out_dir = Path(run.out_dir)
    state, extended_from = None, None
    if run.init_from == "resume":
        phase = "resume"
        ckpt_path = out_dir / "ckpt.pt"
        if not ckpt_path.exists():
            raise ValueError(f"--init_from=resume but {ckpt_path} does not exist; start the run with "
                             "--init_from=scratch (or a checkpoint to extend), or check --out_dir")
        state = checkpoint.load(ckpt_path)
        run = resumed_run_config(state, {**run_overrides, "out_dir": str(out_dir)})  # wherever the run is now
        model_config = ModelConfig.from_dict(state["model_config"])
        check_same_model(model_config, model_overrides)
        extended_from = state.get("extended_from")
        if state["step"] > run.max_steps:
            raise ValueError(f"the checkpoint is at step {state['step']}, past --max_steps={run.max_steps}")
    else:
        if (out_dir / "ckpt.pt").exists():
            raise ValueError(f"{out_dir} already holds a checkpoint: continue it with --init_from=resume, "
                             "or choose another --out_dir")
        if run.init_from == "scratch":
            phase = "pretrain"
            model_config = new_model_config(model_overrides)
        else:
            phase = "extend"
            source = Path(run.init_from)
            state = checkpoint.load(source)  # a checkpoint file, or a run folder's ckpt.pt
            extended_from = str(source / "ckpt.pt" if source.is_dir() else source)
            model_config = extended_model_config(ModelConfig.from_dict(state["model_config"]), model_overrides)

    if run.grad_accum % d.world:
        raise ValueError(f"--grad_accum ({run.grad_accum}) must be divisible by the number of processes ({d.world}): "
                         "the global batch batch_size x grad_accum stays the same whatever the process count, "
                         "so each process runs grad_accum / processes micro-steps")
    train_tokens, _, meta = load_split(run.data_dir, "train")
    val_tokens, _, _ = load_split(run.data_dir, "val")
    check_block_size(train_tokens, model_config.block_size, "train")
    check_block_size(val_tokens, model_config.block_size, "val")
    if meta["vocab_size"] > model_config.vocab_size:
        raise ValueError(f"--vocab_size={model_config.vocab_size} is smaller than the data's vocabulary "
                         f"({meta['vocab_size']} tokens)")
    device = resolve_device(run, d)
    on_cuda = device.startswith("cuda")
    dtype = {"auto": torch.bfloat16 if on_cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[run.dtype]
    use_compile = on_cuda if run.compile is None else run.compile

    # The model: new (seeded, so every process builds the same one), or the checkpoint's weights
    if state is None:
        torch.manual_seed(run.seed)
        raw_model = Transformer(model_config)
    else:
        raw_model = checkpoint.model_from_state(state)
        if phase == "extend":
            raw_model.set_rope(model_config.rope, model_config.block_size)  # weights untouched
    raw_model.to(device).train()
    optimizer = make_optimizer(raw_model, run, on_cuda)
    start_step, metrics = 0, {"best_val_loss": None, "last_val_loss": None, "last_train_loss": None}
    if phase == "resume":
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        metrics.update(state.get("metrics", {}))
        restore_rng(state.get("rng", {}))
    del state

    if on_cuda:  # TF32 for any fp32 matmul left outside autocast
        # (the one call that sets the legacy allow_tf32 flag and the newer fp32_precision together: setting only
        # fp32_precision makes any later read of allow_tf32, e.g. by inductor in torch 2.10-2.11, raise)
        torch.set_float32_matmul_precision("high")
    model = torch.compile(raw_model) if use_compile else raw_model
    train_model = model
    if d.world > 1:  # everything is checked: join the other processes (NCCL between GPUs, gloo between CPUs)
        dist.init_process_group("nccl" if on_cuda else "gloo")
        train_model = DDP(model, device_ids=[d.local_rank] if on_cuda else None)  # broadcasts rank 0's weights
    return Run(
        run=run, phase=phase, d=d, device=device, dtype=dtype, compile=use_compile, out_dir=out_dir,
        raw_model=raw_model, model=model, train_model=train_model, optimizer=optimizer,
        train_tokens=train_tokens, val_tokens=val_tokens,
        val_starts=val_windows(val_tokens, run.seed, run.eval_batches, run.batch_size, model_config.block_size),
        accum=run.grad_accum // d.world, start_step=start_step, extended_from=extended_from, metrics=metrics,
        saved_step=start_step if phase == "resume" else None,
        provenance=provenance(device, d, argv),
    )


def resumed_run_config(state: dict, overrides: dict) -> RunConfig:
    """The run config saved in the checkpoint with the flags given now applied on top (the test hooks and
    init_from come from this invocation only)."""
    saved = state.get("run_config")
    if not isinstance(saved, dict):
        raise ValueError("the checkpoint has no run_config to resume from; it was not written by train.py")
    known = {f.name for f in fields(RunConfig)}
    unknown = set(saved) - known
    if unknown:
        raise ValueError(f"the checkpoint's run_config has keys this train.py does not know: {sorted(unknown)}")
    carried = {k: v for k, v in saved.items() if k not in INVOCATION_ONLY}
    run = RunConfig(**{**carried, **overrides, "init_from": saved.get("init_from", "scratch")})
    check_relations(run)
    return run


def make_optimizer(model: Transformer, run: RunConfig, on_cuda: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weights (matmuls, the tied embedding) and none on norm gains."""
    params = list(model.parameters())  # the tied embedding/head weight appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": run.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=run.lr, betas=(run.beta1, run.beta2), fused=True if on_cuda else None)


def restore_rng(rng: dict) -> None:
    # nothing in training draws from these (data order is seeded per step, there is no dropout); restored anyway,
    # so a resumed run is the uninterrupted one even if something random is added later
    if isinstance(rng.get("torch"), torch.Tensor):
        torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def provenance(device: str, d: Dist, argv: list[str]) -> dict:
    """Where this run came from (STYLE #11): commit, versions, hardware, command line."""
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"git_commit": git(["rev-parse", "HEAD"]), "git_dirty": bool(git(["status", "--porcelain", "-uno"])),
            "torch": str(torch.__version__), "python": platform.python_version(), "device": device_name,
            "world_size": d.world, "argv": list(argv),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------------
# One training step, evaluation


def train_step(r: Run, step: int) -> torch.Tensor:
    """One optimizer step; returns the step's mean loss over the global batch (a tensor, not synced)."""
    lr = lr_at(step, r.run)
    for group in r.optimizer.param_groups:
        group["lr"] = lr
    T = r.raw_model.config.block_size
    total = torch.zeros((), device=r.device)
    for i in range(r.accum):
        micro = r.d.rank * r.accum + i  # this micro-batch's number in the global batch
        starts = train_windows(r.train_tokens, r.run.seed, step, micro, r.run.batch_size, T)
        x, y = to_device(*windows(r.train_tokens, starts, T), r.device)
        # DDP all-reduces gradients in backward; only the last micro-step's backward needs to
        last = i == r.accum - 1
        with nullcontext() if last or r.d.world == 1 else r.train_model.no_sync():
            with r.autocast:
                loss = r.train_model(x, y) / r.accum
            if step == r.run.debug_nan_at_step:
                loss = loss * float("nan")
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
    r.model.eval()
    T = r.raw_model.config.block_size
    total = torch.zeros((), device=r.device, dtype=torch.float64)
    for i in range(r.d.rank, len(r.val_starts), r.d.world):
        x, y = to_device(*windows(r.val_tokens, r.val_starts[i], T), r.device)
        with r.autocast:
            total += r.model(x, y).double()
    r.model.train()
    return all_reduce_sum(total, r.d).item() / len(r.val_starts)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and logs


def save_checkpoint(r: Run, step: int) -> Path:
    """out_dir/ckpt.pt (atomic), plus ckpt_<step>.pt for the last keep_checkpoints saves."""
    state = {
        "model_config": r.raw_model.config.to_dict(),
        "model": r.raw_model.state_dict(),  # the raw module: no `_orig_mod.` or `module.` prefixes
        "optimizer": r.optimizer.state_dict(),
        "run_config": asdict(r.run),
        "step": step,
        "data_state": {"order": "windows seeded by (seed, step, micro-batch)", "seed": r.run.seed, "step": step},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "metrics": dict(r.metrics),
        "extended_from": r.extended_from,
        "provenance": r.provenance,
    }
    path = r.out_dir / "ckpt.pt"
    checkpoint.save(state, path)
    if r.run.keep_checkpoints > 0:
        numbered = r.out_dir / f"ckpt_{step}.pt"
        numbered.unlink(missing_ok=True)
        try:
            os.link(path, numbered)  # a second name for the same file; the next save replaces ckpt.pt, not it
        except OSError:
            checkpoint.save(state, numbered)  # a filesystem without hard links
    saved = sorted((int(p.stem[5:]), p) for p in r.out_dir.glob("ckpt_*.pt") if p.stem[5:].isdigit())
    for _, old in saved[: max(0, len(saved) - r.run.keep_checkpoints)]:
        old.unlink(missing_ok=True)
    return path


def check_finite(r: Run, pending: list) -> None:
    """Raise TrainingError at the first non-finite loss among the steps not yet checked (they are checked in
    batches, at each log line and before each save, so the GPU is not synchronized every step)."""
    if not pending:
        return
    values = torch.stack([loss for _, loss in pending]).tolist()
    steps = [step for step, _ in pending]
    pending.clear()
    for step, value in zip(steps, values):
        if not math.isfinite(value):
            raise TrainingError(f"loss is {value} at step {step}; {not_saved(r)}. Lower --lr or check the data")
        r.metrics["last_train_loss"] = value


def not_saved(r: Run) -> str:
    if r.saved_step is None:
        return "stopped without saving (no checkpoint had been saved yet)"
    return f"stopped without saving: {r.out_dir / 'ckpt.pt'} keeps the last good weights, step {r.saved_step}"


def weights_finite(r: Run) -> bool:
    return bool(torch.stack([p.isfinite().all() for p in r.raw_model.parameters()]).all())


class Logger:
    """Log lines on stdout and one JSON object per event in out_dir/metrics.jsonl, from process 0 only."""

    def __init__(self, r: Run):
        self.master = r.d.master
        self.path = r.out_dir / "metrics.jsonl"
        if self.master:
            r.out_dir.mkdir(parents=True, exist_ok=True)
            keep = []
            if r.phase == "resume" and self.path.exists():
                # drop what the interrupted run logged after its checkpoint: this run logs those steps again
                for line in self.path.read_text().splitlines():
                    try:
                        event = json.loads(line)
                        if event["step"] < r.start_step or (event["event"] == "eval" and event["step"] == r.start_step):
                            keep.append(line)
                    except (ValueError, KeyError, TypeError):
                        continue
            self.path.write_text("".join(line + "\n" for line in keep))

    def print(self, text: str):
        if self.master:
            print(text, flush=True)

    def event(self, **record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def write_config(r: Run) -> None:
    """out_dir/config.json: the run config as given, the model config, the resolved settings, the provenance."""
    if not r.d.master:
        return
    resolved = {"phase": r.phase, "device": r.device, "dtype": str(r.dtype).removeprefix("torch."),
                "compile": r.compile, "world_size": r.d.world, "micro_steps_per_process": r.accum,
                "tokens_per_step": r.tokens_per_step, "warmup_steps": r.run.warmup, "min_lr": r.run.final_lr,
                "start_step": r.start_step, "extended_from": r.extended_from, "params": r.raw_model.num_params()}
    config = {"run": asdict(r.run), "model": r.raw_model.config.to_dict(), "resolved": resolved,
              "provenance": r.provenance}
    tmp = r.out_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, r.out_dir / "config.json")


def header(r: Run) -> str:
    """The run's first lines: what it is and where it came from (STYLE #11)."""
    c, p = r.raw_model.config, r.provenance
    origin = {"pretrain": "from scratch", "resume": f"from {r.out_dir / 'ckpt.pt'}",
              "extend": f"from {r.extended_from}"}[r.phase]
    commit = (p["git_commit"] or "unknown")[:12] + (" (dirty)" if p["git_dirty"] else "")
    return (f"train.py: {r.phase} {origin}, step {r.start_step} -> {r.run.max_steps}, "
            f"{r.raw_model.num_params() / 1e6:.1f}M parameters, block {c.block_size}, rope {c.rope.type} "
            f"(factor {c.rope.factor}, L {c.rope.original_context}), {r.tokens_per_step:,} tokens/step\n"
            f"  {p['device']} x {r.d.world}, {str(r.dtype).removeprefix('torch.')}, compile {r.compile}, "
            f"torch {p['torch']}, commit {commit}, out_dir {r.out_dir}")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------------------
# Signals: SIGINT / SIGTERM finish the current step, save, and exit


class StopOnSignal:
    """Turns SIGINT and SIGTERM into a flag the loop reads after each step. A second SIGINT interrupts at once.
    Handlers can only be installed from the main thread; elsewhere (a test's worker thread) signals keep theirs."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def agreed_signal(stopper: StopOnSignal, r: Run) -> int:
    """The signal number every process stops for (0 = none): processes must stop at the same step, or DDP hangs."""
    if r.d.world == 1:
        return stopper.signum
    flag = torch.tensor(float(stopper.signum), device=r.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


# ----------------------------------------------------------------------------------------------------------
# The loop


class Throughput:
    """Tokens/s between marks; eval and checkpoint time is excluded by marking after them. The run's average leaves
    out the first interval, which holds start-up and compilation."""

    def __init__(self, r: Run, step: int):
        self.tokens_per_step = r.tokens_per_step
        self.flops_per_token = r.raw_model.flops_per_token(r.raw_model.config.block_size)
        # MFU against the per-device peak times the devices; no meaningful peak for a CPU
        self.peak = r.run.peak_tflops * 1e12 * r.d.world if r.device.startswith("cuda") else None
        self.sum_seconds, self.sum_steps, self.intervals = 0.0, 0, 0
        self.last = None  # (tokens/s, mfu) of the latest interval
        self.mark(step)

    def mark(self, step: int):
        self.time, self.step = time.perf_counter(), step

    def measure(self, steps_done: int) -> tuple[float, float, float | None]:
        """(seconds per step, tokens/s, mfu) since the mark, which moves to steps_done (the steps completed)."""
        now = time.perf_counter()
        n, seconds = steps_done - self.step, now - self.time
        self.intervals += 1
        if self.intervals > 1:
            self.sum_seconds, self.sum_steps = self.sum_seconds + seconds, self.sum_steps + n
        self.mark(steps_done)
        self.last = self.rates(n, seconds)
        return seconds / n, *self.last

    def rates(self, steps: int, seconds: float) -> tuple[float, float | None]:
        tokens_per_s = steps * self.tokens_per_step / seconds
        return tokens_per_s, self.flops_per_token * tokens_per_s / self.peak if self.peak else None

    def average(self) -> tuple[float | None, float | None]:
        if self.sum_steps:
            return self.rates(self.sum_steps, self.sum_seconds)
        return self.last or (None, None)


def train(r: Run, log: Logger, stopper: StopOnSignal) -> dict:
    run = r.run
    t_start = time.time()
    speed = Throughput(r, r.start_step)
    pending = []  # (step, loss tensor) not yet checked for finiteness
    stopped, step = None, r.start_step

    while True:
        # at the top of step `step`: the weights after `step` updates; evaluate, save, or stop here
        last = step == run.max_steps
        signum = agreed_signal(stopper, r)
        if signum and not last:
            stopped = signal.Signals(signum).name
        elif run.stop_at_step == step and not last:
            stopped = "stop_at_step"
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
            if not weights_finite(r):
                raise TrainingError(f"the weights became NaN/inf by step {step}; {not_saved(r)}. Lower --lr")
            if r.d.master:
                save_checkpoint(r, step)
            r.saved_step = step
            speed.mark(step)
        if stopped or last:
            break

        pending.append((step, train_step(r, step)))
        if step % run.log_interval == 0:
            check_finite(r, pending)  # reads the losses back, so the GPU has caught up
            if r.device.startswith("cuda"):
                torch.cuda.synchronize(r.device)
            seconds_per_step, tokens_per_s, mfu = speed.measure(step + 1)
            loss, lr = r.metrics["last_train_loss"], lr_at(step, run)
            log.print(f"step {step}/{run.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
                      f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {duration(time.time() - t_start)} "
                      f"elapsed | eta {duration((run.max_steps - step - 1) * seconds_per_step)}")
            log.event(event="train", step=step, train_loss=loss, lr=lr, tokens_per_s=tokens_per_s, mfu=mfu,
                      elapsed_s=round(time.time() - t_start, 3))
        step += 1

    tokens_per_s, mfu = speed.average()
    return {
        "final_val_loss": r.metrics["last_val_loss"] if last else None, "best_val_loss": r.metrics["best_val_loss"],
        "last_val_loss": r.metrics["last_val_loss"], "final_train_loss": r.metrics["last_train_loss"],
        "steps": step, "max_steps": run.max_steps, "tokens_per_s": tokens_per_s, "mfu": mfu,
        "elapsed_s": round(time.time() - t_start, 3), "out_dir": str(r.out_dir),
        "checkpoint": str(r.out_dir / "ckpt.pt"), "phase": r.phase, "stopped": stopped,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run train.py in-process: returns the summary, raises ConfigError / TrainingError, or SystemExit(128 + n)
    after saving on signal n."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            d = dist_from_env()
            r = setup(argv, d)  # joins the process group at its end, under torchrun
        except ValueError as e:  # flags, data (DataError), checkpoints (CheckpointError), model config
            raise ConfigError(str(e)) from None
        log = Logger(r)
        write_config(r)
        log.print(header(r))
        with StopOnSignal() as stopper:
            summary = train(r, log, stopper)
        if summary["final_val_loss"] is not None:
            log.print(f"done: val loss {summary['final_val_loss']:.4f} at step {summary['steps']}; "
                      f"checkpoint {summary['checkpoint']}")
        else:
            log.print(f"stopped ({summary['stopped']}) at step {summary['steps']}; checkpoint {summary['checkpoint']}; "
                      f"continue with --init_from=resume --out_dir={r.out_dir}")
        if summary["stopped"] not in (None, "stop_at_step"):
            raise SystemExit(128 + signal.Signals[summary["stopped"]].value)
        return summary
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(usage())
        return 0
    try:
        main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
