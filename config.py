"""What a training run is (RunConfig: all but the model), and how the flags and a checkpoint make the run and model
configs train.train takes (parse_args, then resolve):
    scratch   the model config from the flags (model.ModelConfig and --rope.* for rope.RopeConfig)
    extend    the checkpoint's architecture, the new --block_size, and the --rope.* fields given replacing the
              checkpoint's (rope.original_context, L, stays the checkpoint's, or is its block_size for plain RoPE)
    resume    the checkpoint's model, and its saved run config with the flags given on top
"""

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import checkpoint
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
    out_dir: str = "out/pretrain"
    data_dir: str = "data/stdlib"  # written by `python -m data.prepare`
    data_mix: str = "natural"  # natural, or recall-shaped training windows: induction | recall (data/recall.py)
    batch_size: int = 64  # windows per micro-step, per process
    grad_accum: int = 1  # micro-steps per optimizer step over all processes: the global batch is fixed
    max_steps: int = 2000  # optimizer steps; the cosine reaches min_lr here
    lr: float = 1e-3  # peak learning rate, after a linear warmup
    min_lr: float | None = None  # None = lr / 10
    warmup_steps: int | None = None  # None = 5% of max_steps
    weight_decay: float = 0.1  # decoupled (AdamW), on 2-D weights only, never on norm gains
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    seed: int = 1337  # model init, data order (with the step) and validation windows
    eval_interval: int = 250  # validation loss every this many steps, and at the end
    eval_batches: int = 20  # fixed validation windows: eval_batches x batch_size, the same at every eval
    log_interval: int = 10
    ckpt_interval: int = 500  # out_dir/ckpt.pt every this many steps, and at the end
    keep_checkpoints: int = 2  # also keep ckpt_<step>.pt for this many most recent saves; 0 = only ckpt.pt
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # autocast dtype: bfloat16 | float32; auto = bfloat16 on CUDA, float32 on CPU
    compile: bool | None = None  # torch.compile; None = on for CUDA, off for CPU
    peak_tflops: float = 989.0  # per device, for MFU: 989 = H100 SXM bf16 dense
    stop_at_step: int | None = None  # save and exit 0 at this step; the schedule stays max_steps'
    final_optimizer: bool = True  # false: the last checkpoint leaves out the optimizer state (a third of the size;
    # the run can still be extended, not continued)

    def __post_init__(self):
        flags.check_types(self)
        check_run(self)

    @property
    def warmup(self) -> int:
        return round(0.05 * self.max_steps) if self.warmup_steps is None else self.warmup_steps

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


INVOCATION_ONLY = ("init_from", "stop_at_step")  # never carried over by --init_from=resume


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


def rope_with_overrides(config: ModelConfig, overrides: dict) -> RopeConfig:
    """The model's RoPE config with some fields replaced: a RoPE swap at evaluation or sampling time. L
    (original_context), unless given, stays the model's, or is its block_size where it has none, since a model
    without scaling was pretrained at its block size. Raises RopeConfig's ValueError for invalid values."""
    values = {**asdict(config.rope), **overrides}
    if "original_context" not in overrides and not values["original_context"]:
        values["original_context"] = config.block_size
    return RopeConfig(**values)


def parse_rope_swap(argv, cls, prog: str, description: str) -> tuple:
    """(cls from the flags, {rope field: value} of the --rope.<field> flags given): the settings of a script that
    loads a checkpoint and may replace fields of its RoPE config (eval.py, sample.py), as rope_with_overrides."""
    rope_flags = {f"rope.{k}": (typ, "the checkpoint's") for k, (typ, _) in flags.flag_table((RopeConfig, "")).items()}
    values = flags.parse(argv, {**flags.flag_table((cls, "")), **rope_flags}, prog, description)
    overrides = {k[len("rope."):]: v for k, v in values.items() if k.startswith("rope.")}
    return flags.build(cls, {k: v for k, v in values.items() if not k.startswith("rope.")}), overrides


def extended_model_config(base: ModelConfig, given: dict) -> ModelConfig:
    """The pretrained model with a new training context and the RoPE fields given replacing its own."""
    for key in given.keys() - {"rope", "block_size"}:
        if given[key] != getattr(base, key):
            raise ValueError(f"--{key}={given[key]} differs from the pretrained checkpoint's {key}={getattr(base, key)}"
                             "; extension keeps the architecture (it changes only --block_size and --rope.*)")
    return replace(base, block_size=given.get("block_size", base.block_size),
                   rope=rope_with_overrides(base, given.get("rope", {})))


def check_same_model(saved: ModelConfig, given: dict) -> None:
    """A resumed run keeps its model: model flags may only repeat the checkpoint's values."""
    pairs = [(f"rope.{k}", v, getattr(saved.rope, k)) for k, v in given.get("rope", {}).items()]
    for name, value, have in pairs + [(k, v, getattr(saved, k)) for k, v in given.items() if k != "rope"]:
        if value != have:
            raise ValueError(f"--{name}={value} differs from the checkpoint's {have}; a resumed run keeps its "
                             "model: start a new run (another --out_dir) to change it")


def resumed_run_config(state: dict, given: dict) -> RunConfig:
    """The run config saved in the checkpoint with the settings given now on top (INVOCATION_ONLY ones excepted)."""
    saved = state.get("run_config")
    if not isinstance(saved, dict) or set(saved) - RUN_FIELDS:
        raise ValueError("the checkpoint's run_config is missing or has keys this train.py does not know "
                         f"({sorted(set(saved) - RUN_FIELDS) if isinstance(saved, dict) else saved!r}): it was not "
                         "written by this train.py")
    carried = {k: v for k, v in saved.items() if k not in INVOCATION_ONLY}
    return RunConfig(**{**carried, **given, "init_from": saved.get("init_from", "scratch")})


def resolve(run_values: dict, model_values: dict) -> tuple[RunConfig, ModelConfig, dict | None, bool]:
    """(run config, model config, the checkpoint to start from, whether it is a resume) for the settings given."""
    init = run_values.get("init_from", RunConfig.init_from)
    if init == "scratch":
        return RunConfig(**run_values), new_model_config(model_values), None, False
    if init != "resume":
        state = checkpoint.load(init)
        base = ModelConfig.from_dict(state["model_config"])
        return RunConfig(**run_values), extended_model_config(base, model_values), state, False
    path = Path(run_values.get("out_dir", RunConfig.out_dir)) / "ckpt.pt"
    if not path.exists():
        raise ValueError(f"--init_from=resume but {path} does not exist; start the run with --init_from=scratch "
                         "(or a checkpoint to extend), or check --out_dir")
    state = checkpoint.load(path)
    saved = ModelConfig.from_dict(state["model_config"])
    check_same_model(saved, model_values)
    return resumed_run_config(state, {**run_values, "out_dir": str(path.parent)}), saved, state, True
