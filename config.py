"""What a training run is, apart from its model: RunConfig, its checks, and train.py's flags for it and the model.
How the flags and a checkpoint become a run (scratch, resume or extend) is train.py's: train.decide_start."""

from dataclasses import dataclass, fields

import flags
from data.recall import MIXES
from model import ModelConfig
from rope import RopeConfig


# Run config (the model's is model.ModelConfig; the two are kept apart and saved apart)
@dataclass(frozen=True)
class RunConfig:
    """Everything about a run that is not the model. The defaults are a toy pretraining run for one H100:
    64 windows x 512 tokens a step, 2,000 steps = 65M tokens (about 4 passes over the stdlib corpus). AdamW with
    betas (0.9, 0.95) and weight decay 0.1 as GPT-3 and LLaMA; the cosine ends at lr/10 (Chinchilla)."""

    init_from: str = "scratch"  # scratch, resume (out_dir's latest checkpoint), or a checkpoint/run folder to extend
    out_dir: str = "out/pretrain"  # checkpoints, config.json and metrics.jsonl
    data_dir: str = "data/stdlib"  # written by `python -m data.prepare`
    data_mix: str = "natural"  # natural, or recall-shaped training windows: induction | recall (data/recall.py)
    batch_size: int = 64  # windows per micro-step, per process
    grad_accum: int = 1  # micro-steps per optimizer step over all processes: the global batch is fixed
    max_steps: int = 2000  # optimizer steps; the cosine reaches min_lr here
    lr: float = 1e-3  # peak learning rate, after a linear warmup
    min_lr: float | None = None  # where the cosine ends; None = lr / 10
    warmup_steps: int | None = None  # steps of linear warmup from 0; None = 5% of max_steps
    weight_decay: float = 0.1  # decoupled (AdamW), on 2-D weights only, never on norm gains
    beta1: float = 0.9  # AdamW's decay rate of the gradient's running mean
    beta2: float = 0.95  # ... and of its running square
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    seed: int = 1337  # model init, data order (with the step) and validation windows
    eval_interval: int = 250  # validation loss every this many steps, and at the end
    eval_batches: int = 20  # fixed validation windows: eval_batches x batch_size, the same at every eval
    log_interval: int = 10  # a training loss line (and metrics.jsonl event) every this many steps
    ckpt_interval: int = 500  # out_dir/ckpt.pt every this many steps, and at the end
    keep_checkpoints: int = 2  # also keep ckpt_<step>.pt for this many most recent saves; 0 = only ckpt.pt
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # autocast dtype: bfloat16 | float32; auto = bfloat16 on CUDA, float32 on CPU
    compile: bool | None = None  # torch.compile; None = on for CUDA, off for CPU
    peak_tflops: float = 989.0  # per device, for MFU: 989 = H100 SXM bf16 dense
    stop_at_step: int | None = None  # save and exit 0 at this step; the schedule stays max_steps'
    final_optimizer: bool = True  # false: the last checkpoint has no optimizer state (1/3 the size; extend, not resume)

    def __post_init__(self):
        flags.check_types(self)
        check_run(self)

    @property
    def warmup(self) -> int:
        return round(0.05 * self.max_steps) if self.warmup_steps is None else self.warmup_steps

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


def check_run(c: RunConfig) -> None:
    problems = [f"--{name} must not be empty" for name in ("init_from", "out_dir", "data_dir")
                if not getattr(c, name).strip()]
    problems += [f"--{name} must be >= 1, got {getattr(c, name)}" for name in ("batch_size", "grad_accum",
                 "max_steps", "eval_interval", "eval_batches", "log_interval", "ckpt_interval") if getattr(c, name) < 1]
    problems += [f"--{name} must be >= 0, got {getattr(c, name)}" for name in ("weight_decay", "grad_clip",
                 "keep_checkpoints", "warmup_steps", "min_lr", "stop_at_step") if (getattr(c, name) or 0) < 0]
    checks = [
        (c.lr > 0, f"--lr must be > 0, got {c.lr}"),
        (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1, f"--beta1 and --beta2 must be in [0, 1), got {c.beta1}, {c.beta2}"),
        (0 <= c.seed < 2**63, f"--seed must be in [0, 2^63), got {c.seed}"),
        (c.dtype in ("auto", "bfloat16", "float32"), f"--dtype must be auto, bfloat16 or float32, got {c.dtype!r}"),
        (0 < c.peak_tflops <= 1e5, f"--peak_tflops is in TFLOP/s per device (989 for an H100), got {c.peak_tflops}"),
        (c.warmup <= c.max_steps, f"--warmup_steps ({c.warmup}) must be <= --max_steps ({c.max_steps})"),
        (c.final_lr <= c.lr, f"--min_lr ({c.min_lr}) must be <= --lr ({c.lr})"),
        ((c.stop_at_step or 0) <= c.max_steps, f"--stop_at_step ({c.stop_at_step}) must be <= --max_steps"),
        (c.data_mix in MIXES, f"--data_mix must be one of {', '.join(MIXES)}, got {c.data_mix!r}"),
        (c.device in ("auto", "cpu", "cuda") or (c.device.startswith("cuda:") and c.device[5:].isdigit()),
         f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}"),  # whether CUDA is there: at setup
    ]
    problems += [message for ok, message in checks if not ok]
    if problems:
        raise ValueError(problems[0])


# From flags to configs
FLAGS = flags.flag_table((RunConfig, ""), (ModelConfig, ""), (RopeConfig, "rope."))
RUN_FIELDS = {f.name for f in fields(RunConfig)}


def parse_args(argv, description: str = "") -> tuple[dict, dict]:
    """({run field: value}, {model field: value, 'rope': {rope field: value}}) of the settings given, checked
    where they are complete: the run values unless resuming (they are merged with the saved ones first), and the
    model of a run from scratch."""
    values = flags.parse(argv, FLAGS, "python train.py", description)
    run = {k: v for k, v in values.items() if k in RUN_FIELDS}
    model = {k: v for k, v in values.items() if k not in RUN_FIELDS and not k.startswith("rope.")}
    if any(k.startswith("rope.") for k in values):
        model["rope"] = {k[len("rope."):]: v for k, v in values.items() if k.startswith("rope.")}
    if run.get("init_from", RunConfig.init_from) != "resume":
        RunConfig(**run)
    if run.get("init_from", RunConfig.init_from) == "scratch":
        new_model_config(model)
    return run, model


def new_model_config(given: dict) -> ModelConfig:
    return ModelConfig(**{k: v for k, v in given.items() if k != "rope"}, rope=RopeConfig(**given.get("rope", {})))
