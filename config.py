"""What a training run is, apart from its model: RunConfig, its checks, and train.py's flags for it
and the model. Where a run starts (scratch, resume or extend) is train.py's: train.init_from."""

from dataclasses import dataclass, fields

import flags
from data.recall import MIXES
from model import ModelConfig
from rope import RopeConfig


# Run config (the model's is model.ModelConfig; the two are kept apart and saved apart)
@dataclass(frozen=True)
class RunConfig:
    """Everything about a run that is not the model. The defaults are a toy pretraining run for
    one H100: 64 windows x 512 tokens a step, 2,000 steps = 65M tokens (about 4 passes over the
    stdlib corpus). AdamW with betas (0.9, 0.95) and weight decay 0.1 as GPT-3 and LLaMA; the
    cosine ends at lr/10 (Chinchilla).

    init_from         scratch, resume (out_dir's latest checkpoint), or a checkpoint/run folder to
                      extend
    out_dir           checkpoints, config.json and metrics.jsonl
    data_dir          written by `python -m data.prepare`
    data_mix          natural, or recall-shaped training windows: induction | recall
                      (data/recall.py)
    batch_size        windows per micro-step, per process
    grad_accum        micro-steps per optimizer step over all processes: the global batch is fixed
    max_steps         optimizer steps; the cosine reaches min_lr here
    lr                peak learning rate, after a linear warmup
    min_lr            where the cosine ends; None = lr / 10
    warmup_steps      steps of linear warmup from 0; None = 5% of max_steps
    weight_decay      decoupled (AdamW), on 2-D weights only, never on norm gains
    beta1             AdamW's decay rate of the gradient's running mean
    beta2             ... and of its running square
    grad_clip         max global gradient norm; 0 = no clipping
    seed              model init, data order (with the step) and validation windows
    eval_interval     validation loss every this many steps, and at the end
    eval_batches      fixed validation windows: eval_batches x batch_size, the same at every eval
    log_interval      a training loss line (and metrics.jsonl event) every this many steps
    ckpt_interval     out_dir/ckpt.pt every this many steps, and at the end
    keep_checkpoints  also keep ckpt_<step>.pt for this many most recent saves; 0 = only ckpt.pt
    device            auto = cuda if available, else cpu
    dtype             autocast dtype: bfloat16 | float32; auto = bfloat16 on CUDA, float32 on CPU
    compile           torch.compile; None = on for CUDA, off for CPU
    checkpoint_blocks  activation checkpointing per block: a block's activations are recomputed
                      in the backward (~1/3 more compute, memory ~ one block's at a time)
    peak_tflops       per device, for MFU: 989 = H100 SXM bf16 dense
    stop_at_step      save and exit 0 at this step; the schedule stays max_steps'
    final_optimizer   false: the last checkpoint has no optimizer state (1/3 the size; extend, not
                      resume)
    """

    init_from: str = "scratch"
    out_dir: str = "out/pretrain"
    data_dir: str = "data/stdlib"
    data_mix: str = "natural"
    batch_size: int = 64
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    ckpt_interval: int = 500
    keep_checkpoints: int = 2
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | None = None
    checkpoint_blocks: bool = False
    peak_tflops: float = 989.0
    stop_at_step: int | None = None
    final_optimizer: bool = True

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
    """A ValueError naming the first setting out of its range."""
    for name in ("init_from", "out_dir", "data_dir"):
        if not getattr(c, name).strip():
            raise ValueError(f"--{name} must not be empty")
    for name in (
        "batch_size",
        "grad_accum",
        "max_steps",
        "eval_interval",
        "eval_batches",
        "log_interval",
        "ckpt_interval",
    ):
        if getattr(c, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(c, name)}")
    for name in (
        "weight_decay",
        "grad_clip",
        "keep_checkpoints",
        "warmup_steps",
        "min_lr",
        "stop_at_step",
    ):
        if (getattr(c, name) or 0) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(c, name)}")
    if c.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {c.lr}")
    if not (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1):
        raise ValueError(f"--beta1 and --beta2 must be in [0, 1), got {c.beta1}, {c.beta2}")
    if not 0 <= c.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2^63), got {c.seed}")
    if c.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--dtype must be auto, bfloat16 or float32, got {c.dtype!r}")
    if not 0 < c.peak_tflops <= 1e5:
        raise ValueError(
            f"--peak_tflops is in TFLOP/s per device (989 for an H100), got {c.peak_tflops}"
        )
    if c.warmup > c.max_steps:
        raise ValueError(f"--warmup_steps ({c.warmup}) must be <= --max_steps ({c.max_steps})")
    if c.final_lr > c.lr:
        raise ValueError(f"--min_lr ({c.min_lr}) must be <= --lr ({c.lr})")
    if (c.stop_at_step or 0) > c.max_steps:
        raise ValueError(f"--stop_at_step ({c.stop_at_step}) must be <= --max_steps")
    if c.data_mix not in MIXES:
        raise ValueError(f"--data_mix must be one of {', '.join(MIXES)}, got {c.data_mix!r}")
    cuda_n = c.device.startswith("cuda:") and c.device[5:].isdigit()
    if c.device not in ("auto", "cpu", "cuda") and not cuda_n:  # whether CUDA is there: at set-up
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")


# From flags to configs
FLAGS = flags.flag_table((RunConfig, ""), (ModelConfig, ""), (RopeConfig, "rope."))
RUN_FIELDS = {f.name for f in fields(RunConfig)}


def parse_args(argv, description: str = "") -> tuple[dict, dict]:
    """({run field: value}, {model field: value, 'rope': {rope field: value}}) of the settings
    given, checked where they are complete: the run values unless resuming (they are merged with the
    saved ones first), and the model of a run from scratch."""
    values = flags.parse(argv, FLAGS, "python train.py", description)
    run = {k: v for k, v in values.items() if k in RUN_FIELDS}
    model = {k: v for k, v in values.items() if k not in RUN_FIELDS and not k.startswith("rope.")}
    if any(k.startswith("rope.") for k in values):
        model["rope"] = {k[len("rope.") :]: v for k, v in values.items() if k.startswith("rope.")}
    if run.get("init_from", RunConfig.init_from) != "resume":
        RunConfig(**run)
    if run.get("init_from", RunConfig.init_from) == "scratch":
        new_model_config(model)
    return run, model


def new_model_config(given: dict) -> ModelConfig:
    rope = RopeConfig(**given.get("rope", {}))
    return ModelConfig(**{k: v for k, v in given.items() if k != "rope"}, rope=rope)


def resumed_run_config(state: dict, given: dict) -> RunConfig:
    """The run config of a checkpoint (state) to continue, with the settings given on top (but not
    init_from and stop_at_step, which belong to one invocation); a ValueError if it cannot go on."""
    saved = state.get("run_config")
    if not isinstance(saved, dict) or set(saved) - RUN_FIELDS:
        unknown = sorted(set(saved) - RUN_FIELDS) if isinstance(saved, dict) else saved
        raise ValueError(
            f"the checkpoint's run_config is missing or has keys this train.py does "
            f"not know ({unknown!r}): it was not written by this train.py"
        )
    carried = {k: v for k, v in saved.items() if k not in ("init_from", "stop_at_step")}
    cfg = RunConfig(**{**carried, **given, "init_from": saved.get("init_from", "scratch")})
    step = int(state["step"])
    if step > cfg.max_steps:
        raise ValueError(f"the checkpoint is at step {step}, past --max_steps={cfg.max_steps}")
    if "optimizer" not in state and step < cfg.max_steps:
        raise ValueError(
            f"the checkpoint in {cfg.out_dir} has no optimizer state (saved with "
            "--final_optimizer=false), so it cannot be continued; extend from it with "
            "--init_from"
        )
    return cfg
