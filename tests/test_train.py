"""train.py on CPU with a tiny model (d_model 64, 2 layers, block 32) on a tiny corpus: the whole
path (pretrain, extend with YaRN, fine-tune, sample), exact resume, DDP with gloo equal to one
process, flag parsing (with hypothesis throwing hostile strings at it), NaN handling and SIGTERM.
About a minute on 2 cores."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint as checkpoint_fn

import checkpoint
import config
import flags as flags_lib
import generate
import system
import train
from data.prepare import PrepareConfig, prepare
from data.tokenizer import get_tokenizer
from model import ModelConfig
from rope import RopeConfig

REPO = Path(__file__).resolve().parent.parent
L = 32  # the pretraining context of every run here
TINY = {
    "d_model": 64,
    "n_layer": 2,
    "n_head": 2,
    "block_size": L,
    "batch_size": 2,
    "eval_batches": 2,
    "log_interval": 1,
    "lr": 3e-3,
    "device": "cpu",
}  # cpu even where a GPU is present: the asserts expect it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The DDP test compares with one-thread worker processes (torchrun sets OMP_NUM_THREADS=1), and
    # small matmuls gain nothing from a second thread on a shared 2-core machine. Restored for the
    # other test files.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Eight small standard-library modules (~36k tokens), tokenized by data.prepare."""
    root = tmp_path_factory.mktemp("train_data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "corpus").mkdir()
    for name in [
        "textwrap.py",
        "shlex.py",
        "fnmatch.py",
        "bisect.py",
        "heapq.py",
        "queue.py",
        "colorsys.py",
        "keyword.py",
    ]:
        shutil.copy(stdlib / name, root / "corpus" / name)
    prepare(PrepareConfig(source=str(root / "corpus"), out=str(root / "data"), block_size=L))
    return root / "data"


def flags(data_dir: Path, out_dir: Path, **overrides) -> list[str]:
    settings_ = {**TINY, "data_dir": data_dir, "out_dir": out_dir, **overrides}
    return [f"--{k}={v}" for k, v in settings_.items()]


def events(out_dir: Path, kind: str) -> dict[int, float]:
    """step -> loss for the train or eval events of out_dir/metrics.jsonl."""
    key = {"train": "train_loss", "eval": "val_loss"}[kind]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e[key] for e in records if e["event"] == kind}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def cli(argv) -> int:
    """train.py's command line in this process: its exit code."""
    return flags_lib.cli(train.main, argv, errors=train.ERRORS)


# --------------------------------------------------------------------------------------------------
# 1. The whole path: pretrain, extend with YaRN, fine-tune, sample


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    summary = train.main(
        flags(data_dir, out, max_steps=30, batch_size=4, eval_interval=15, ckpt_interval=15)
    )
    return out, summary


def test_pretrain_then_extend_with_yarn_then_finetune_then_sample(data_dir, pretrained, tmp_path):
    pre, summary = pretrained
    assert summary["steps"] == 30 and summary["out_dir"] == str(pre)
    assert set(summary) >= {"final_val_loss", "steps", "tokens_per_s", "mfu", "out_dir"}
    assert summary["mfu"] is None  # no peak to compare with on a CPU
    val, losses = events(pre, "eval"), events(pre, "train")
    assert sorted(val) == [0, 15, 30] and summary["final_val_loss"] == val[30]
    assert val[30] < val[0] - 1.5, val  # ~10.8 (uniform over 50k tokens) down to ~7
    assert sum(list(losses.values())[-5:]) / 5 < losses[0] - 2.0, losses
    written = json.loads((pre / "config.json").read_text())
    assert written["run"]["max_steps"] == 30 and written["model"]["d_model"] == 64
    assert (
        written["provenance"]["torch"] == torch.__version__
        and written["resolved"]["device"] == "cpu"
    )
    assert sorted(p.name for p in pre.glob("ckpt*.pt")) == ["ckpt.pt", "ckpt_15.pt", "ckpt_30.pt"]

    # extend: YaRN s = 4 at 4L; stopped at step 0, the checkpoint holds the extended model before
    # any update
    ext = tmp_path / "yarn"
    ext_flags = [
        f"--init_from={pre}",
        f"--data_dir={data_dir}",
        f"--out_dir={ext}",
        "--rope.type=yarn",
        "--rope.factor=4",
        f"--block_size={4 * L}",
        "--batch_size=1",
        "--max_steps=8",
        "--lr=2e-3",
        "--eval_interval=8",
        "--eval_batches=2",
        "--log_interval=5",
        "--device=cpu",
    ]
    stopped = train.main(ext_flags + ["--stop_at_step=0"])
    assert stopped["stopped"] == "stop_at_step" and stopped["steps"] == 0
    state = checkpoint.load(ext / "ckpt.pt")
    assert state["step"] == 0 and state["extended_from"] == str(pre / "ckpt.pt")
    rope_cfg = state["model_config"]["rope"]
    assert (rope_cfg["type"], rope_cfg["factor"], rope_cfg["original_context"]) == ("yarn", 4.0, L)
    assert state["model_config"]["block_size"] == 4 * L
    pre_weights = weights(pre / "ckpt.pt")
    assert pre_weights.keys() == state["model"].keys()
    assert all(torch.equal(pre_weights[k], state["model"][k]) for k in pre_weights)
    assert not any(k.startswith(("_orig_mod", "module")) for k in state["model"])

    # fine-tune: the rest of the extension run; its validation loss at 4L goes down too
    done = train.main(["--init_from=resume", f"--out_dir={ext}"])
    ext_val = events(ext, "eval")
    assert sorted(ext_val) == [0, 8] and done["final_val_loss"] == ext_val[8]
    assert ext_val[8] < ext_val[0] - 0.2, ext_val
    state = checkpoint.load(ext / "ckpt.pt")
    assert state["step"] == 8 and state["extended_from"] == str(pre / "ckpt.pt")
    assert state["model_config"]["rope"]["type"] == "yarn" and state["run_config"][
        "init_from"
    ] == str(pre)

    # sample from the extended checkpoint, with a prompt longer than the pretraining context
    model, _ = checkpoint.load_model(ext)
    enc = get_tokenizer()
    prompt = torch.tensor([enc.encode("def wrap(text, width=70):\n    " * 5)[: 2 * L]])
    choose = generate.sampler(temperature=0.8, top_k=50, generator=torch.Generator().manual_seed(0))
    out = list(generate.generate(model, prompt, 8, choose))
    assert len(out) == 8 and all(0 <= int(t) < enc.n_vocab for t in out)
    assert isinstance(enc.decode([int(t) for t in out]), str)


def test_extension_and_resume_refuse_a_different_architecture(data_dir, pretrained, tmp_path):
    pre, _ = pretrained
    with pytest.raises(ValueError, match="extension keeps the architecture"):
        train.main(flags(data_dir, tmp_path / "x", init_from=pre, d_model=128))
    with pytest.raises(ValueError, match="a resumed run keeps its model"):
        train.main(["--init_from=resume", f"--out_dir={pre}", "--n_layer=3"])
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train.main(flags(data_dir, pre))  # scratch over an existing run
    with pytest.raises(ValueError, match="does not exist"):
        train.main(["--init_from=resume", f"--out_dir={tmp_path / 'nothing'}"])
    with pytest.raises(ValueError, match="data.prepare"):
        train.main(flags(tmp_path / "no_data", tmp_path / "y"))


def test_a_final_checkpoint_without_the_optimizer_extends_but_does_not_continue(
    data_dir, pretrained, tmp_path
):
    pre, _ = pretrained
    lean = tmp_path / "lean"
    train.main(flags(data_dir, lean, init_from=pre, max_steps=2, final_optimizer="false"))
    state = checkpoint.load(lean)
    assert "optimizer" not in state and state["step"] == 2
    assert "optimizer" in checkpoint.load(pre)  # the default keeps it
    assert (
        train.main(["--init_from=resume", f"--out_dir={lean}"])["steps"] == 2
    )  # finished: nothing to do
    with pytest.raises(ValueError, match="no optimizer state"):
        train.main(["--init_from=resume", f"--out_dir={lean}", "--max_steps=4"])
    assert train.main(flags(data_dir, tmp_path / "next", init_from=lean, max_steps=1))["steps"] == 1


def test_checkpointed_blocks_train_exactly_as_stored_activations(
    data_dir, pretrained, tmp_path, monkeypatch
):
    """--checkpoint_blocks recomputes each block in the backward (torch.utils.checkpoint, once
    per block and micro-step): the same losses and weights as keeping the activations, only less
    memory."""
    import model as model_lib

    calls = []
    monkeypatch.setattr(
        model_lib, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint_fn(*a, **k)
    )
    runs = {}
    for on in (False, True):
        out = tmp_path / str(on)
        train.main(
            flags(
                data_dir,
                out,
                init_from=pretrained[0],
                max_steps=3,
                block_size=2 * L,
                eval_interval=3,
                checkpoint_blocks=str(on).lower(),
                **{"rope.type": "yarn", "rope.factor": 2.0},
            )
        )
        runs[on] = (events(out, "train"), weights(out))
    assert len(calls) == 3 * 2  # 3 steps x 2 blocks, and none in the evaluations
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-6)
    for name, w in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], w, atol=1e-6, rtol=0)


def test_an_imported_vocabulary_stays_in_every_checkpoint_after_it():
    """A model imported with its own vocabulary (hf.py) keeps it through an extension, so evaluation
    and sampling can decode; data tokenized by another tokenizer is refused."""
    from checkpoint import kept_vocabulary

    vocab = {"name": "smollm2", "tokens": ["a"], "special": []}
    assert kept_vocabulary({"tokenizer": vocab}, "smollm2") is vocab
    assert kept_vocabulary({"tokenizer": "gpt2"}, "smollm2") == "smollm2"  # a name: the data's
    assert kept_vocabulary(None, "smollm2") == "smollm2"
    with pytest.raises(ValueError, match="tokenized by 'gpt2'"):
        kept_vocabulary({"tokenizer": vocab}, "gpt2")


def test_the_time_to_go_is_printed_three_steps_in_whatever_the_log_interval(
    data_dir, tmp_path, capsys
):
    out = tmp_path / "eta"
    train.main(flags(data_dir, out, max_steps=6, log_interval=100, eval_interval=100))
    lines = [line for line in capsys.readouterr().out.splitlines() if "| loss" in line]
    assert [line.split(" |")[0] for line in lines] == ["step 0/6", "step 2/6"], lines
    assert "eta" not in lines[0]  # the first step holds the start-up (on CUDA, compilation)
    assert re.search(r"\| eta \d+ s$", lines[1]), lines[1]
    assert list(events(out, "train")) == [
        0
    ]  # printed, not logged: the loss curves keep their steps


def test_durations_read_in_their_unit():
    assert [system.duration(s) for s in (0.4, 45, 89.4, 750, 5399, 190_000)] == [
        "0 s",
        "45 s",
        "89 s",
        "12.5 min",
        "90.0 min",
        "52.8 h",
    ]


# --------------------------------------------------------------------------------------------------
# 2. Resume: stopped at step k and resumed = uninterrupted, exactly (CPU, float32)


def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(data_dir, tmp_path):
    common = {
        "max_steps": 8,
        "grad_accum": 2,
        "warmup_steps": 2,
        "eval_interval": 4,
        "ckpt_interval": 2,
    }
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.main(flags(data_dir, whole, **common))
    train.main(flags(data_dir, parts, **common, stop_at_step=3))
    assert checkpoint.load(parts / "ckpt.pt")["step"] == 3
    assert max(events(parts, "train")) == 2
    summary = train.main(
        ["--init_from=resume", f"--out_dir={parts}"]
    )  # the saved run config, no flags needed
    assert summary["steps"] == 8 and summary["stopped"] is None

    assert events(parts, "train") == events(whole, "train")  # exactly equal, every step
    assert events(parts, "eval") == events(whole, "eval")
    a, b = weights(whole / "ckpt.pt"), weights(parts / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a bounded number of checkpoints: ckpt.pt plus the last keep_checkpoints (2) saves
    assert sorted(p.name for p in whole.glob("ckpt*.pt")) == ["ckpt.pt", "ckpt_6.pt", "ckpt_8.pt"]


# --------------------------------------------------------------------------------------------------
# 3. DDP on CPU: two processes (gloo) = one process on the same global batch


def test_ddp_two_processes_match_one_process(data_dir, tmp_path):
    common = {"max_steps": 5, "grad_accum": 2, "eval_interval": 5, "keep_checkpoints": 0}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train.main(flags(data_dir, single, **common))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        *flags(data_dir, ddp, **common),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((ddp / "config.json").read_text())["provenance"]["world_size"] == 2
    assert len((ddp / "metrics.jsonl").read_text().splitlines()) == 5 + 2  # process 0 alone logs
    assert [p.name for p in ddp.glob("ckpt*.pt")] == ["ckpt.pt"]  # keep_checkpoints=0
    one, two = events(single, "train"), events(ddp, "train")
    assert one.keys() == two.keys() == set(range(5))
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (one, two)
    assert abs(events(single, "eval")[5] - events(ddp, "eval")[5]) < 1e-5
    a, b = weights(single / "ckpt.pt"), weights(ddp / "ckpt.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_grad_accum_must_divide_among_processes(data_dir, tmp_path):
    start = train.init_from(*config.parse_args(flags(data_dir, tmp_path, grad_accum=3)))
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        train.setup(start, train.Dist(rank=0, local_rank=0, world=2))


def test_global_batch_does_not_depend_on_the_process_count():
    # process r of W takes micro-batches r*A .. r*A + A - 1 of the step; their windows depend on the
    # number only
    tokens = torch.arange(10_000).numpy()
    one = [
        train.window_starts(tokens, 16, (4,), 7, "train", 3, m) for m in range(4)
    ]  # step 3, micro-batch m
    again = [train.window_starts(tokens, 16, (4,), 7, "train", 3, m) for m in range(4)]
    assert all((a == b).all() for a, b in zip(one, again))
    assert len({tuple(w) for w in one}) == 4  # different micro-batches, different windows
    assert not (
        train.window_starts(tokens, 16, (4,), 7, "train", 4, 0) == one[0]
    ).all()  # and different steps


# --------------------------------------------------------------------------------------------------
# 4. Flags


def test_flags_are_parsed_by_type():
    given, model = config.parse_args(
        [
            "--lr=3e-4",
            "--max_steps",
            "100",
            "--compile",
            "--min_lr=none",
            "--warmup_steps=10",
            "--device",
            "cpu",
            "--d_model=256",
            "--rope.type=yarn",
            "--rope.factor",
            "8",
            "--rope.original_context=512",
            "--rope.truncate=false",
            "--grad_clip=0",
        ]
    )
    run = config.RunConfig(**given)
    assert (run.lr, run.max_steps, run.compile, run.min_lr, run.device) == (
        3e-4,
        100,
        True,
        None,
        "cpu",
    )
    assert run.grad_clip == 0.0 and isinstance(run.grad_clip, float)
    assert run.final_lr == pytest.approx(3e-5) and run.warmup == 10
    rope_given = {"type": "yarn", "factor": 8.0, "original_context": 512, "truncate": False}
    assert model == {"d_model": 256, "rope": rope_given}
    assert given == {
        "lr": 3e-4,
        "max_steps": 100,
        "compile": True,
        "min_lr": None,
        "warmup_steps": 10,
        "device": "cpu",
        "grad_clip": 0.0,
    }
    assert config.RunConfig(**config.parse_args([])[0]) == config.RunConfig()
    assert config.RunConfig().warmup == 100  # 5% of the default 2000 steps


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "lr": 1e-4,
                "max_steps": 50,
                "rope": {"type": "linear", "factor": 2},
                "rope.base": 500000,
                "n_layer": 2,
                "compile": False,
            }
        )
    )
    given, model = config.parse_args(["--max_steps=70", f"--config={path}"])
    run = config.RunConfig(**given)
    assert (run.lr, run.max_steps, run.compile) == (
        1e-4,
        70,
        False,
    )  # the flag wins, wherever it is
    assert model == {"n_layer": 2, "rope": {"type": "linear", "factor": 2.0, "base": 500000.0}}
    path.write_text(json.dumps({"max_steps": 1e4}))
    with pytest.raises(ValueError, match="max_steps expects an int"):
        config.parse_args([f"--config={path}"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    config.parse_args([f"--config={path}"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_steps=1e4"], "--max_steps expects an int, got '1e4'; write it as 10000"),
        (["--lr=abc"], "--lr expects a float"),
        (["--compile=maybe"], "--compile expects a bool or none (true/false)"),
        (["--lr=nan"], "--lr must be a finite number"),
        (["--lr=0"], "--lr must be > 0"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--batch_size=0"], "--batch_size must be >= 1"),
        (["--grad_clip=-1"], "--grad_clip must be >= 0"),
        (
            ["--max_steps=10", "--warmup_steps=50"],
            "--warmup_steps (50) must be <= --max_steps (10)",
        ),
        (["--lr=1e-4", "--min_lr=1e-3"], "--min_lr"),
        (["--beta2=1"], "--beta2 must be in [0, 1)"),
        (["--device=tpu"], "--device must be"),
        (["--dtype=float16"], "--dtype must be"),
        (["--peak_tflops=989e12"], "TFLOP/s"),
        (["--max_step=10"], "unknown option --max_step; did you mean --max_steps"),
        (["--rope.typ=yarn"], "did you mean --rope.type"),
        (["--rope=yarn"], "--rope.<field>"),
        (["--lr"], "--lr: expected one argument"),
        (["out/pretrain"], "unexpected argument 'out/pretrain'"),
        (["-lr=1"], "unexpected argument"),
        (["--config=does/not/exist.json"], "cannot read it"),
        (
            ["--rope.type=yarn"],
            "needs original_context",
        ),  # a new model is checked as a whole, up front
        (["--rope.type=spline"], "rope type 'spline' is unknown"),
        (["--d_model=100", "--n_head=3"], "must divide d_model"),
        (["--vocab_size=0"], "vocab_size must be in [1, 2^31]"),
    ],
)
def test_bad_flags_name_the_problem(argv, message):
    with pytest.raises(ValueError) as e:
        config.parse_args(argv)
    assert message in str(e.value)


def test_cli_errors_exit_2_without_a_traceback_and_help_lists_the_fields(capsys):
    proc = subprocess.run(
        [sys.executable, "train.py", "--max_steps=1e4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error: --max_steps")
        and "Traceback" not in proc.stderr
    )
    with pytest.raises(SystemExit) as e:  # argparse prints the help and exits 0
        train.main(["--help"])
    assert e.value.code == 0 and cli(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(
        f"--{key}" in text
        for key in ("lr", "init_from", "d_model", "rope.factor", "rope.original_context")
    )
    # what each field means, from the table in its class's docstring
    assert all(meaning for _, _, meaning in config.FLAGS.values()), [
        k for k, v in config.FLAGS.items() if not v[2]
    ]
    assert "peak learning rate, after a linear warmup (default 0.001)" in " ".join(text.split())
    assert "the paper's beta" in text and "L, the pretraining context" in " ".join(text.split())
    assert cli(["--compile=maybe"]) == 2
    assert capsys.readouterr().err.startswith("error: --compile expects a bool")


KEYS = sorted(config.FLAGS) + ["config", "rope", "help", ""]


def only_value_errors_or_help(parse, argv):
    """parse(argv) returns, raises ValueError, or (for --help, which prints the flags) exits 0."""
    try:
        return parse(argv)
    except ValueError:
        return None
    except SystemExit as e:
        assert e.code == 0 and any(a.startswith("--help") for a in argv), argv
        return None


hostile_text = st.text(max_size=30) | st.sampled_from(
    [
        "",
        "-",
        "--",
        "=",
        "none",
        "nan",
        "inf",
        "-1",
        "1e400",
        "9" * 5000,
        "True",
        "0x10",
        "1_000",
        "\x00",
        "\ud800",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(hostile_text, max_size=6))
def test_hostile_argument_lists_raise_only_value_errors(argv):
    only_value_errors_or_help(config.parse_args, argv)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), hostile_text, st.booleans()), max_size=4))
def test_hostile_values_for_real_keys_raise_only_value_errors(items):
    argv = []
    for key, value, joined in items:
        if key == "config":
            continue  # a random path could name a real file; config files are fuzzed below
        argv += [f"--{key}={value}"] if joined else [f"--{key}", value]
    parsed = only_value_errors_or_help(config.parse_args, argv)
    assert parsed is None or all(isinstance(part, dict) for part in parsed)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), json_values, max_size=4)
    | json_values
)
def test_hostile_config_files_raise_only_value_errors(tmp_path_factory, obj):
    path = tmp_path_factory.mktemp("cfg") / "c.json"
    path.write_text(json.dumps(obj))
    only_value_errors_or_help(config.parse_args, [f"--config={path}"])


def test_extension_keeps_how_the_model_was_pretrained_and_changes_only_rope_and_context():
    base = ModelConfig(
        d_model=64,
        n_head=2,
        block_size=L,
        rope=RopeConfig(base=500000.0, partial_rotary_factor=0.5),
    )
    given = {
        "d_model": 64,
        "block_size": 4 * L,
        "rope": {"type": "yarn", "factor": 4.0},
    }  # d_model repeats base's
    ext = checkpoint.extended_config(base, given)
    assert (ext.d_model, ext.block_size) == (64, 4 * L)
    assert (ext.rope.type, ext.rope.factor, ext.rope.original_context) == ("yarn", 4.0, L)
    assert (ext.rope.base, ext.rope.partial_rotary_factor) == (500000.0, 0.5)
    linear = {"type": "linear", "factor": 2.0, "original_context": 16}
    explicit = checkpoint.extended_config(base, {"rope": linear})
    assert explicit.rope.original_context == 16 and explicit.block_size == L


def test_resume_applies_the_flags_given_on_top_of_the_saved_run_config(tmp_path):
    saved = {
        "model_config": ModelConfig(d_model=64, n_head=2, block_size=L).to_dict(),
        "step": 5,
        "optimizer": {},
        "run_config": asdict(config.RunConfig(max_steps=10, lr=1e-3, stop_at_step=5)),
    }

    def resume(state, **given):  # out_dir's checkpoint, as loaded (init_from loads it otherwise)
        run = {"init_from": "resume", "out_dir": str(tmp_path), **given}
        return train.init_from(run, {}, state)

    start = resume(saved, max_steps=20)
    assert start.phase == "resume" and start.model_config.d_model == 64
    assert (start.cfg.max_steps, start.cfg.lr, start.cfg.init_from) == (20, 1e-3, "scratch")
    assert start.cfg.stop_at_step is None  # belongs to one invocation
    with pytest.raises(ValueError, match="warmup_steps"):
        resume(saved, warmup_steps=15)
    with pytest.raises(ValueError, match="does not know"):
        resume({**saved, "run_config": {**saved["run_config"], "lr_decay": True}})
    with pytest.raises(ValueError, match="past --max_steps"):
        resume(saved, max_steps=4)


def test_lr_schedule_is_warmup_then_cosine():
    run = config.RunConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert train.lr_at(0, run) == pytest.approx(0.1) and train.lr_at(9, run) == pytest.approx(1.0)
    assert train.lr_at(10, run) == pytest.approx(1.0) and train.lr_at(60, run) == pytest.approx(
        0.55
    )
    assert train.lr_at(110, run) == pytest.approx(0.1)
    lrs = [train.lr_at(s, run) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# --------------------------------------------------------------------------------------------------
# 5. NaN: stop with the step, keep the last good checkpoint


def nan_at_step(monkeypatch, nan_step: int):
    """Make train.py's loss NaN at one step (after its optimizer step, as a NaN would show up)."""
    real = train.train_step
    monkeypatch.setattr(
        train,
        "train_step",
        lambda r, step: real(r, step) * (float("nan") if step == nan_step else 1),
    )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "nan"
    nan_at_step(monkeypatch, 5)
    assert cli(flags(data_dir, out, max_steps=20, ckpt_interval=2)) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: loss is nan at step 5; stopped without saving:") and "step 4" in err
    ), err
    state = checkpoint.load(out / "ckpt.pt")
    assert state["step"] == 4
    model = checkpoint.model_from_state(state)
    assert all(p.isfinite().all() for p in model.parameters())
    assert max(events(out, "train")) == 4  # the NaN step was never logged as a loss

    # an absurd learning rate: the weights blow up at once; nothing non-finite is ever saved
    monkeypatch.undo()
    out = tmp_path / "lr"
    with pytest.raises(train.TrainingError, match="step"):
        train.main(flags(data_dir, out, max_steps=20, ckpt_interval=1, lr=1e6, warmup_steps=0))
    for path in out.glob("ckpt*.pt"):
        assert all(t.isfinite().all() for t in checkpoint.load(path)["model"].values())


def test_bfloat16_autocast_trains(data_dir, tmp_path):
    summary = train.main(
        flags(data_dir, tmp_path / "bf16", max_steps=2, dtype="bfloat16", eval_batches=1)
    )
    assert math.isfinite(summary["final_val_loss"]) and math.isfinite(summary["final_train_loss"])
    assert (
        json.loads((tmp_path / "bf16" / "config.json").read_text())["resolved"]["dtype"]
        == "bfloat16"
    )


# --------------------------------------------------------------------------------------------------
# 6. SIGTERM: finish the step, save, exit 143


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    out = tmp_path / "term"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "train.py", *flags(data_dir, out, max_steps=100000, ckpt_interval=100000)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and events(out, "train"):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-2000:]
    assert "stopped (SIGTERM)" in stdout and "Traceback" not in stderr
    state = checkpoint.load(out / "ckpt.pt")
    assert state["step"] > 0 and math.isfinite(state["metrics"]["last_train_loss"])
    checkpoint.model_from_state(state)


def test_signals_become_a_flag_and_a_second_sigint_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with train.StopOnSignal() as stopper:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert stopper.signum == signal.SIGTERM
        stopper.signum = 0
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stopper.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
