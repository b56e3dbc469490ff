"""Every bad input gets a clear error: hypothesis throws random and hostile values at the parsers
(RopeConfig, hf.from_hf / hf.hf_inv_freq, ModelConfig.from_dict, train.py's flags, sample.py's
flags) and at the files train.py and sample.py read (token files, checkpoints); every flag that
names where a script writes gets a file for a folder or a folder for a file, and every JSON file the
project reads back comes corrupt or of another shape. The only acceptable failures are ValueErrors
(CheckpointError, DataError, ConfigError are ValueErrors), or, from a CLI, exit code 2 with an
`error:` line and no traceback (and then nothing written)."""

import io
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import zipfile
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import bench  # noqa: E402
import checkpoint  # noqa: E402
import config  # noqa: E402
import eval as evaluation  # noqa: E402
import flags  # noqa: E402
import hf  # noqa: E402
import report  # noqa: E402
import reproduce  # noqa: E402
import rope  # noqa: E402
import rope_check  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402
from data.prepare import main as prepare_main  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from system import write_json  # noqa: E402

FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# values of every type, the awkward ones made likely
hostile = st.one_of(
    st.sampled_from(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            2,
            0.0,
            -0.0,
            0.5,
            1.0,
            1e-300,
            1e308,
            -1e308,
            2**63,
            10**400,
            -(10**400),
            float("nan"),
            float("inf"),
            float("-inf"),
            "",
            "nan",
            "1",
            "yarn",
            [],
            {},
            [1.0],
        ]
    ),
    st.integers(),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# plausible values, so that valid configs are reached and then computed with
plausible_number = st.one_of(
    st.integers(1, 10**6), st.floats(0.01, 1e6, allow_nan=False), st.sampled_from([1, 2, 4, 8])
)
# lists, as LongRoPE's short_factor / long_factor are: of numbers, plausible or hostile
number_lists = st.lists(plausible_number | hostile, max_size=4)

ROPE_FIELDS = [f.name for f in fields(rope.RopeConfig)]
HF_KEYS = [
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "truncate",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "low_freq_factor",
    "high_freq_factor",
    "partial_rotary_factor",
    "short_factor",
    "long_factor",
]
MODEL_FIELDS = [f.name for f in fields(ModelConfig)]
HEAD_DIMS = [2, 4, 6, 16, 64, 128]


def check_frequencies(result) -> None:
    freqs, factor = result
    assert (
        isinstance(freqs, torch.Tensor)
        and freqs.dtype == torch.float32
        and freqs.ndim == 1
        and len(freqs) >= 1
    )
    assert bool(torch.isfinite(freqs).all()) and bool((freqs >= 0).all()), freqs
    assert isinstance(factor, float) and math.isfinite(factor) and factor > 0, factor


@st.composite
def divisor_lists(draw, pairs):
    """A short_factor / long_factor for a head of `pairs` frequency pairs: mostly of that length and
    of plausible numbers (extreme ones among them), else of another length or with one hostile
    entry."""
    n = draw(st.sampled_from([pairs, pairs, pairs, pairs, pairs, 0, 1, pairs + 1]))
    values = draw(
        st.lists(
            plausible_number | st.sampled_from([1e-300, 1e-30, 1e30, 1e308]), min_size=n, max_size=n
        )
    )
    if values and draw(st.integers(0, 5)) == 0:
        values[draw(st.integers(0, n - 1))] = draw(hostile)
    return values


def mostly(plausible):
    """plausible three times in four, else hostile (st.one_of would weigh each of hostile's branches
    as one)."""
    return st.integers(0, 3).flatmap(lambda k: plausible if k else hostile)


@st.composite
def longrope_cases(draw, type_key, context_key, keys):
    """(a longrope config as a dict, head_dim): both divisor lists drawn for that head, L
    (context_key) and some of `keys`, each mostly plausible, else hostile. Random dicts almost never
    hold two lists of the head's length; these often do, so that valid configs are reached and
    computed."""
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    d = draw(st.dictionaries(st.sampled_from(keys), mostly(plausible_number), max_size=len(keys)))
    context = draw(mostly(st.integers(1, 10**6)))
    d.update(
        {type_key: "longrope", context_key: context},
        short_factor=draw(divisor_lists(head_dim // 2)),
        long_factor=draw(divisor_lists(head_dim // 2)),
    )
    return d, head_dim


# --------------------------------------------------------------------------------------------------
# rope.RopeConfig, rope.frequencies


rope_kwargs = st.dictionaries(
    st.sampled_from(ROPE_FIELDS),
    hostile | plausible_number | st.sampled_from(rope.VARIANTS) | number_lists,
    max_size=6,
)


@FAST
@given(rope_kwargs)
@example({"base": 10**400})  # found: OverflowError from math.isfinite in rope.is_number
def test_rope_config_takes_any_values_or_raises_value_error(kwargs):
    try:
        cfg = rope.RopeConfig(**kwargs)
    except ValueError:
        return
    for name in ("base", "factor", "partial_rotary_factor"):
        assert math.isfinite(getattr(cfg, name))


@FAST
@given(
    st.dictionaries(
        st.sampled_from(ROPE_FIELDS), plausible_number | st.sampled_from(rope.VARIANTS), max_size=8
    ).map(lambda d: {"type": "yarn", **d})
    | rope_kwargs,
    st.sampled_from(HEAD_DIMS),
    st.none() | st.integers(-5, 10**7),
)
def test_a_valid_rope_config_gives_finite_frequencies_or_value_error(kwargs, head_dim, seq_len):
    frequencies_or_value_error(kwargs, head_dim, seq_len)


@FAST
@given(
    longrope_cases("type", "original_context", ["base", "factor", "attention_factor"]),
    st.none() | st.integers(-5, 10**7),
)
@example(
    (
        {
            "type": "longrope",
            "original_context": 1,
            "factor": 2,
            "short_factor": [1],
            "long_factor": [1],
        },
        2,
    ),
    None,
)  # found: ZeroDivisionError, ln L = 0 in the attention factor
def test_a_longrope_config_gives_finite_frequencies_or_value_error(case, seq_len):
    kwargs, head_dim = case
    frequencies_or_value_error(kwargs, head_dim, seq_len)


def frequencies_or_value_error(kwargs, head_dim, seq_len):
    """A RopeConfig from kwargs and its frequencies are finite and checked, or a ValueError is
    raised on the way."""
    try:
        cfg = rope.RopeConfig(**kwargs)
        result = rope.frequencies(head_dim, cfg, seq_len)
    except ValueError:
        return
    check_frequencies(result)


# --------------------------------------------------------------------------------------------------
# hf.from_hf, hf.hf_inv_freq (Hugging Face rope_parameters dicts, e.g. from a downloaded
# config.json)


hf_dicts = st.dictionaries(
    st.sampled_from(HF_KEYS) | st.text(max_size=4),
    st.sampled_from(hf.HF_TYPES + ("dynamic_yarn", "YARN"))
    | plausible_number
    | hostile
    | number_lists,
    max_size=7,
)
max_positions = st.sampled_from(
    [1, 2, 16, 4096, 0, -1, 10**400, None, 4096.0, "4096", True]
) | st.integers(1, 10**7)


@FAST
@given(hf_dicts | hostile, max_positions)
def test_from_hf_gives_a_config_or_value_error(d, max_position_embeddings):
    try:
        cfg = hf.from_hf(d, max_position_embeddings)
    except ValueError:
        return
    assert isinstance(cfg, rope.RopeConfig)


@FAST
@given(
    hf_dicts,
    st.sampled_from([64, 32, 6, 2, 1, 0, -2, 63, True, 64.0, None, "64"]),
    max_positions,
    st.none() | st.integers(1, 10**7),
)
@example(
    {
        "rope_type": "llama3",
        "factor": 2,
        "low_freq_factor": 1,
        "high_freq_factor": 4,
        "original_max_position_embeddings": 10**400,
    },
    64,
    4096,
    None,
)  # found: OverflowError in llama3_rope
@example(
    {"rope_type": "yarn", "factor": 2.0, "beta_fast": 1e308}, 64, 16, None
)  # ValueError, but "math domain error"
def test_hf_inv_freq_gives_finite_frequencies_or_value_error(
    d, head_dim, max_position_embeddings, seq_len
):
    try:
        result = hf.hf_inv_freq(d, head_dim, max_position_embeddings, seq_len)
    except ValueError:
        return
    check_frequencies(result)


@FAST
@given(
    longrope_cases(
        "rope_type",
        "original_max_position_embeddings",
        ["rope_theta", "factor", "attention_factor"],
    ),
    st.integers(0, 3).flatmap(lambda k: st.integers(1, 10**6) if k else max_positions),
    st.none() | st.integers(1, 10**7),
)
@example(
    ({"rope_type": "longrope", "short_factor": [1e-300], "long_factor": [1]}, 2), 16, None
)  # fp32 overflow
@example(
    (
        {
            "rope_type": "longrope",
            "short_factor": [1],
            "long_factor": [1],
            "original_max_position_embeddings": 1,
        },
        2,
    ),
    16,
    None,
)  # found: ZeroDivisionError, ln L = 0 in the attention factor
@example(
    ({"rope_type": "longrope", "short_factor": [1], "long_factor": [1]}, 2), 10**400, None
)  # found: OverflowError, max_position_embeddings / L as a float
def test_longrope_hf_inv_freq_gives_finite_frequencies_or_value_error(
    case, max_position_embeddings, seq_len
):
    d, head_dim = case
    try:
        result = hf.hf_inv_freq(d, head_dim, max_position_embeddings, seq_len)
    except ValueError:
        return
    check_frequencies(result)


# --------------------------------------------------------------------------------------------------
# model.ModelConfig.from_dict (what a checkpoint's model_config goes through)


model_dicts = st.dictionaries(
    st.sampled_from(MODEL_FIELDS) | st.text(max_size=4),
    st.one_of(
        hostile,
        plausible_number,
        st.dictionaries(
            st.sampled_from(ROPE_FIELDS) | st.text(max_size=3),
            hostile | plausible_number | st.sampled_from(rope.VARIANTS),
            max_size=3,
        ),
    ),
    max_size=6,
)


@FAST
@given(model_dicts | hostile)
@example(
    None
)  # found: TypeError, 'NoneType' object is not iterable (a checkpoint whose model_config is None)
@example({"d_model": 10**400})  # found: OverflowError in rope.rotary_dim
def test_model_config_from_dict_gives_a_config_or_value_error(d):
    try:
        cfg = ModelConfig.from_dict(d)
    except ValueError:
        return
    assert isinstance(cfg, ModelConfig) and isinstance(cfg.rope, rope.RopeConfig)


# --------------------------------------------------------------------------------------------------
# train.py's flags: real field names, values hostile for their type (tests/test_train.py fuzzes
# random strings)


hostile_text = st.sampled_from(
    [
        "1e4",
        "1e400",
        "nan",
        "-nan",
        "inf",
        "-1",
        "0",
        "",
        " ",
        "True",
        "none",
        "None",
        "0x10",
        "1_000",
        "١٢",
        "²",
        "½",
        "9" * 4400,
        "1" * 10000,
        "-0",
        "+5",
        "1.",
        ".5",
        "\t7\n",
        "é",
        "\x00",
        "--",
        "=",
        "auto",
        "cuda:",
        "cuda:99999999999999999999",
        "scratch",
        "resume",
        "x" * 300,
    ]
) | st.text(max_size=8)


@FAST
@given(st.lists(st.tuples(st.sampled_from(sorted(config.FLAGS)), hostile_text), max_size=5))
def test_train_flags_with_hostile_values_give_a_config_or_value_error(items):
    argv = [f"--{key}={value}" for key, value in items]
    try:
        run_values, model_values = config.parse_args(argv)
    except ValueError:
        return
    if run_values.get("init_from", "scratch") != "resume":
        assert isinstance(
            config.RunConfig(**run_values), config.RunConfig
        )  # checked already: must not raise now
    if run_values.get("init_from", "scratch") == "scratch":
        config.new_model_config(model_values)


# --------------------------------------------------------------------------------------------------
# Files: a tiny corpus and a tiny checkpoint


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_data")
    (root / "corpus").mkdir()
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / "bisect.py", root / "corpus" / "bisect.py")
    shutil.copy(
        Path(sysconfig.get_paths()["stdlib"]) / "colorsys.py", root / "corpus" / "colorsys.py"
    )
    prepare(PrepareConfig(source=str(root / "corpus"), out=str(root / "data"), block_size=16))
    return root / "data"


TINY_MODEL = ModelConfig(d_model=32, n_layer=1, n_head=2, block_size=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hostile_ckpt") / "ckpt.pt"
    checkpoint.save(
        {
            "model_config": TINY_MODEL.to_dict(),
            "model": Transformer(TINY_MODEL).state_dict(),
            "step": 3,
        },
        path,
    )
    return path


def train_cli(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    code = flags.cli(train.main, [str(a) for a in argv], errors=train.ERRORS)
    return code, capsys.readouterr().err


def train_flags(data_dir, out_dir, **overrides):
    settings_ = {
        "d_model": 32,
        "n_layer": 1,
        "n_head": 2,
        "block_size": 16,
        "batch_size": 2,
        "max_steps": 2,
        "eval_batches": 1,
        "device": "cpu",
        "data_dir": data_dir,
        "out_dir": out_dir,
        **overrides,
    }
    return [f"--{k}={v}" for k, v in settings_.items()]


# --------------------------------------------------------------------------------------------------
# sample.py's flags


def sample_main(capsys, *args) -> tuple[int, str, str]:
    """sample.py's main in this process, as the script runs it (flags.cli): (exit code, stdout,
    stderr)."""
    capsys.readouterr()
    code = flags.cli(sample.main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "args, word",
    [
        (["--temperature", "nan"], "temperature"),
        (["--temperature", "inf"], "temperature"),
        (["--temperature", "-1"], "temperature"),
        (["--top_k", "0"], "top_k"),
        (["--max_new_tokens", "-5"], "max_new_tokens"),
        (["--max_new_tokens", "1e3"], "max_new_tokens"),
        (["--num_samples", "-1"], "num_samples"),
        (["--rope.factor", "nan"], "factor"),
        (["--rope.base", "1e400"], "base"),
        (["--rope.type", "yarn", "--rope.original_context", "-16"], "original_context"),
        (["--rope.truncate", "maybe"], "truncate"),
        (["--device", ""], "device"),
        (["--dtype", "fp8"], "dtype"),
    ],
)
def test_sample_hostile_flags_exit_2(ckpt, capsys, args, word):
    code, out, err = sample_main(capsys, "--ckpt", ckpt, "--max_new_tokens", 2, *args)
    assert code == 2, (code, err)
    assert "error:" in err and word in err and "Traceback" not in err, err
    assert out == ""


def test_sample_binary_prompt_file_exits_2(ckpt, tmp_path, capsys):
    path = tmp_path / "prompt.bin"
    path.write_bytes(bytes(range(256)) * 4)
    code, out, err = sample_main(
        capsys, "--ckpt", ckpt, "--prompt_file", path, "--max_new_tokens", 2
    )
    assert code == 2 and out == "" and "error:" in err and "UTF-8" in err and str(path) in err, err
    code, out, err = sample_main(
        capsys, "--ckpt", ckpt, "--prompt_file", tmp_path, "--max_new_tokens", 2
    )
    assert code == 2 and out == "" and "error:" in err, err  # a folder, not a file


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [f"rope.{f}" for f in ROPE_FIELDS] + ["temperature", "top_k", "max_context", "seed"]
            ),
            hostile_text,
        ),
        min_size=1,
        max_size=3,
    )
)
@example(
    [("temperature", "--")]
)  # found: argparse turns `--temperature=--` into [], then a TypeError
@example([("max_context", "--")])
def test_sample_random_hostile_flags_never_give_a_traceback(ckpt, capsys, items):
    args = [f"--{key}={value}" for key, value in items]
    code, out, err = sample_main(
        capsys, "--ckpt", ckpt, "--max_new_tokens", 1, "--prompt", "x", *args
    )
    assert code in (0, 2), (args, code, err)
    if code == 2:
        assert "error:" in err and "Traceback" not in err, (args, err)


# --------------------------------------------------------------------------------------------------
# reproduce.py: a value that only a later stage reads is refused before the first stage runs


LATE_VALUES = {  # flags on top of a valid tiny job -> a word of the error
    "a negative replication seed": (["--seed=-1"], "--seed must be >= 0"),
    "a seed past 2^63": ([f"--seed={2**63 - 1000}"], "--seed"),  # 1337 + 2 --seed: the warm-up's
    "the report's folder": (["--out", "file/report"], "--out"),  # written last, after every stage
    "the data source": (["--data_source", "missing"], "missing"),
    "a CUDA device": (["--device=cuda:99"], "cuda:99"),
    "prepared data of another tokenizer": (
        ["--data_dir", "GPT2_DATA"],
        "vocabulary",
    ),  # the tiny preset is bytes
}


@pytest.mark.parametrize("case", list(LATE_VALUES))
def test_reproduce_checks_every_value_before_the_first_stage(case, data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    args, words = LATE_VALUES[case]
    args = [
        str(data_dir)
        if a == "GPT2_DATA"
        else str(tmp_path / a)
        if "/" in a or a == "missing"
        else a
        for a in args
    ]
    valid = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--data_source",
        data_dir.parent / "corpus",
        "--data_dir",
        tmp_path / "data",
        "--runs",
        tmp_path / "runs",
        "--out",
        tmp_path / "results",
    ]
    capsys.readouterr()
    code = flags.cli(reproduce.main, [str(a) for a in valid + args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and words in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "file"
    ]  # no stage output, no runs folder, no data


# --------------------------------------------------------------------------------------------------
# Data edge cases train.py meets (tests/test_data.py covers data.loader itself)


def test_train_with_a_corpus_shorter_than_one_block_exits_2_naming_the_block_size(
    data_dir, tmp_path, capsys
):
    n_val = json.loads((data_dir / "meta.json").read_text())["splits"]["val"]["n_tokens"]
    block = 1 << (
        n_val.bit_length()
    )  # a power of two > the val split, so d_model/n_head need not change
    code, err = train_cli(capsys, train_flags(data_dir, tmp_path / "o", block_size=block))
    assert (
        code == 2
        and err.startswith("error:")
        and f"block size {block}" in err
        and "Traceback" not in err
    ), err
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_train_with_a_truncated_val_bin_exits_2(data_dir, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    with open(broken / "val.bin", "r+b") as f:
        f.truncate(os.path.getsize(broken / "val.bin") - 3)
    code, err = train_cli(capsys, train_flags(broken, tmp_path / "o"))
    assert code == 2 and err.startswith("error:") and "val.bin" in err and "corrupt" in err, err


# --------------------------------------------------------------------------------------------------
# Checkpoint edge cases: checkpoint.load / model_from_state raise CheckpointError; train.py exits 2


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def not_torch_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    return buffer.getvalue()


def good_state() -> dict:
    torch.manual_seed(0)
    return {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "model_config": TINY_MODEL.to_dict(),
        "model": Transformer(TINY_MODEL).state_dict(),
    }


def with_model_config(value) -> bytes:
    return torch_bytes({**good_state(), "model_config": value})


BAD_CHECKPOINTS = {
    "random_bytes": (lambda: random.Random(0).randbytes(4096), "corrupt"),
    "empty": (lambda: b"", "corrupt"),
    "zip_not_torch": (not_torch_zip, "corrupt"),
    "truncated": (lambda: torch_bytes(good_state())[:5000], "corrupt"),
    "plain_list": (lambda: torch_bytes([1, 2, 3]), "not a"),
    "no_format": (lambda: torch_bytes({"model_config": {}, "model": {}}), "not a"),
    "format_version_99": (
        lambda: torch_bytes({**good_state(), "format_version": 99}),
        "format version 99",
    ),
    "format_version_string": (
        lambda: torch_bytes({**good_state(), "format_version": "1"}),
        "format version",
    ),
    "no_model": (
        lambda: torch_bytes({k: v for k, v in good_state().items() if k != "model"}),
        "'model'",
    ),
    "unknown_model_key": (
        lambda: with_model_config({**TINY_MODEL.to_dict(), "n_experts": 8}),
        "n_experts",
    ),
    "unknown_rope_key": (
        lambda: with_model_config({**TINY_MODEL.to_dict(), "rope": {"type": "yarn", "zeta": 1}}),
        "zeta",
    ),
    "bad_model_value": (
        lambda: with_model_config({**TINY_MODEL.to_dict(), "d_model": -32}),
        "d_model",
    ),
    "model_config_list": (lambda: with_model_config([1, 2]), "model config"),
    "model_config_int": (lambda: with_model_config(7), "model config"),
    "model_config_none": (lambda: with_model_config(None), "model config"),
    "wrong_weights": (
        lambda: torch_bytes({**good_state(), "model": {"tok_emb.weight": torch.zeros(3, 3)}}),
        "do not fit",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_a_checkpoint_error_and_train_exits_2(name, data_dir, tmp_path, capsys):
    make, words = BAD_CHECKPOINTS[name]
    path = tmp_path / f"{name}.pt"
    path.write_bytes(make())
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.model_from_state(checkpoint.load(path))
    assert isinstance(info.value, ValueError)
    assert words.lower() in str(info.value).lower(), str(info.value)

    code, err = train_cli(capsys, train_flags(data_dir, tmp_path / "ext", init_from=path))
    assert code == 2 and err.startswith("error:") and "Traceback" not in err, (code, err)
    assert not (tmp_path / "ext" / "ckpt.pt").exists()


# ------------------------------------------------------------------------------------------------
# Paths the flags name and the JSON read back (system.check_writable, system.read_json): exit 2, an
# `error:` naming the flag or the file, what is wrong and what to do, and nothing written


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder, with each file's bytes: what a refused command leaves as it was."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def refused(capsys, main, args, words) -> str:
    """A script's main, run as the script runs it (flags.cli): exit 2, an `error:` with words."""
    capsys.readouterr()
    code = flags.cli(main, [str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, (code, err)
    assert "Traceback" not in err and all(str(w) in err for w in words), (words, err)
    return err


def write_job(runs: Path, data_dir: Path) -> Path:
    """A runs folder as reproduce.py leaves it before its first stage: job.json alone (report.py
    then says every claim is "not run")."""
    job = reproduce.Job(
        reproduce.PRESETS["tiny"],
        "tiny",
        runs,
        runs.parent / "results",
        data_dir,
        "cpu",
        0,
        "python reproduce.py --preset tiny",
    )
    write_json(runs / "job.json", reproduce.job_record(job))
    return runs


NOT_RESULTS = {  # --replicate FILE: its content -> words of the error
    "an empty object": ("{}", "it has no 'claims'"),
    "a list": ("[1, 2]", "it is a list, not an object"),
    "claims not a list": ('{"claims": 3}', "claims is 3, not a list"),
    "a claim not an object": ('{"claims": ["1."]}', 'claims[0] is "1.", not an object'),
    "a claim without its verdict": ('{"claims": [{"claim": "1."}]}', "claims[0] has no 'held'"),
    "truncated": ('{"claims": [{"claim"', "cannot read it as JSON"),
    "not UTF-8": (b"\xff\xfe{}", "cannot read it as JSON (UnicodeDecodeError"),
    "a folder": (None, "cannot read it (Is a directory)"),
}


@pytest.mark.parametrize("case", list(NOT_RESULTS))
def test_report_replicate_of_json_that_is_not_a_report_s_results(case, tmp_path, capsys):
    """`report.py --replicate {}` once ended in a traceback (KeyError: 'claims'), exit 1."""
    content, words = NOT_RESULTS[case]
    runs, other = write_job(tmp_path / "runs", tmp_path / "data"), tmp_path / "other.json"
    if content is None:
        other.mkdir()
    else:
        other.write_bytes(content.encode() if isinstance(content, str) else content)
    before = snapshot(tmp_path)
    args = ["--runs", runs, "--out", tmp_path / "report", "--replicate", other]
    words = [f"--replicate {other}: {words}", "another run's results.json"]
    refused(capsys, report.main, args, words)
    assert snapshot(tmp_path) == before


def test_report_replicates_a_report_s_own_results(tmp_path):
    """The test above's control: results.json as report.py writes it is what --replicate reads."""
    runs = str(write_job(tmp_path / "runs", tmp_path / "data"))
    report.main(["--runs", runs, "--out", str(tmp_path / "a")])
    report.main(
        [
            "--runs",
            runs,
            "--out",
            str(tmp_path / "b"),
            "--replicate",
            str(tmp_path / "a" / "results.json"),
        ]
    )
    replication = json.loads((tmp_path / "b" / "results.json").read_text())["replication"]
    assert replication["kinds"]["undecided"]  # every claim "not run" in both


def tiny_job(prepared: Path, **paths) -> list:
    """reproduce.py's tiny preset on the prepared data's corpus, with paths (runs, out, ...)."""
    args = ["--preset", "tiny", "--device", "cpu", "--data_source", prepared.parent / "corpus"]
    return args + [x for flag, path in paths.items() for x in (f"--{flag}", path)]


def writers(tmp_path, data_dir, ckpt) -> dict:
    """{script and flag: (the flag, whether it names a folder (else a file), path -> (main, argv))}:
    each flag that names where a script writes, every other value valid."""
    hf_dir, runs = tmp_path / "hf_model", write_job(tmp_path / "runs", data_dir)
    hf.export_hf(checkpoint.load_model(ckpt)[0], hf_dir)
    fresh = {"runs": tmp_path / "new_runs", "out": tmp_path / "results", "data_dir": tmp_path / "d"}
    evaluate = [
        "--ckpt",
        ckpt,
        "--data_dir",
        data_dir,
        "--contexts",
        8,
        "--score",
        4,
        "--max_docs",
        1,
        "--trials",
        1,
        "--needle_len",
        4,
        "--device",
        "cpu",
    ]
    return {
        "train.py --out_dir": ("--out_dir", True, lambda p: (train.main, train_flags(data_dir, p))),
        **{
            f"reproduce.py --{flag}": (
                f"--{flag}",
                True,
                lambda p, flag=flag: (reproduce.main, tiny_job(data_dir, **{**fresh, flag: p})),
            )
            for flag in fresh
        },
        "report.py --out": ("--out", True, lambda p: (report.main, ["--runs", runs, "--out", p])),
        "data/prepare.py --out": (
            "--out",
            True,
            lambda p: (
                prepare_main,
                ["--source", data_dir.parent / "corpus", "--block_size", 16, "--out", p],
            ),
        ),
        "hf.py export --out": (
            "--out",
            True,
            lambda p: (hf.main, ["export", "--ckpt", ckpt, "--out", p]),
        ),
        "hf.py import --out": (
            "--out",
            False,
            lambda p: (hf.main, ["import", "--hf_dir", hf_dir, "--out", p]),
        ),
        "eval.py --out": ("--out", False, lambda p: (evaluation.main, [*evaluate, "--out", p])),
        "bench.py --out": (
            "--out",
            False,
            lambda p: (
                bench.main,
                ["--preset", "smoke", "--cases", "train_T64", "--hf", "false", "--out", p],
            ),
        ),
    }


WRITERS = [
    "train.py --out_dir",
    "reproduce.py --runs",
    "reproduce.py --out",
    "reproduce.py --data_dir",
    "report.py --out",
    "data/prepare.py --out",
    "hf.py export --out",
    "hf.py import --out",
    "eval.py --out",
    "bench.py --out",
]


@pytest.mark.parametrize("where", ["the wrong kind", "inside a file"])
@pytest.mark.parametrize("name", WRITERS)
def test_a_flag_naming_where_to_write_refuses_a_file_for_a_folder_and_a_folder_for_a_file(
    name, where, tmp_path, data_dir, ckpt, capsys
):
    """`train.py --out_dir README.md` once said `error: [Errno 17] File exists: 'README.md'`;
    `data.prepare --out README.md` said so after tokenizing the whole corpus."""
    flag, folder, command = writers(tmp_path, data_dir, ckpt)[name]
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_folder" / "kept.txt").write_text("kept")
    if where == "the wrong kind":
        path = readme if folder else tmp_path / "a_folder"
        kinds = "file, not a folder" if folder else "folder, not a file"
        words = [f"{flag} {path} is a {kinds}"]
    else:
        path = readme / "sub"
        kind = "folder" if folder else "file"
        words = [f"{flag} {path}: {readme} is a file, so no {kind} can be made"]
    before = snapshot(tmp_path)
    refused(capsys, *command(path), words)
    assert snapshot(tmp_path) == before


def job_with_text_for_L(job: dict) -> str:
    return json.dumps({**job, "config": {**job["config"], "L": "64"}})


REDO = "a stage of reproduce.py wrote it"
RUNS_FILES = {  # a runs folder's file: its content (or a function of job.json's) -> words of error
    "job.json, corrupt": (
        "job.json",
        '{"preset": "cpu"\n"config": {}}',
        ["Expecting ',' delimiter", "reproduce.py writes it as a job starts"],
    ),
    "job.json, an empty object": ("job.json", "{}", ["it has no 'preset', 'command', 'device'"]),
    "job.json, of another shape": ("job.json", job_with_text_for_L, ['config.L is "64", not an']),
    "stages.json, corrupt": ("stages.json", '{"data": 1.', ["cannot read it as JSON", "wall time"]),
    "stages.json, of another shape": ("stages.json", '{"data": "1 s"}', ['data is "1 s", not']),
    "an evaluation": ("eval/nft_yarn.json", '{"ppl": {}}', ["it has no 'retrieval'", REDO]),
    "an evaluation's numbers": (
        "eval/ft_ntk_1.json",
        '{"ppl": {"128": {"nll": 1, "ppl": 3, "doc_nll": [1, null]}}, "retrieval": {}}',
        ["ppl.128.doc_nll[1] is null"],
    ),
    "a training summary": ("pretrain/summary.json", "[]", ["it is a list", REDO]),
    "a training log": (
        "ft_yarn_0/metrics.jsonl",
        '{"event": "train", "step": 0}\n{"ev',
        ["line 2: Unterminated string", "train.py logged the run there"],
    ),
    "a training log's event": (
        "ft_yarn_0/metrics.jsonl",
        '{"event": "train"}',
        ["line 1 has no 'step'", "delete"],
    ),
    "temperature.json": ("temperature.json", '{"2": {"context": 128}}', ["2 has no 'a'", REDO]),
    "leakage.json": (
        "leakage.json",
        '{"dropped_from_val": [], "piece_tokens": 64, "scored_pieces_seen_in_train": 0.1}',
        ["dropped_from_val is a list", REDO],
    ),
}


@pytest.mark.parametrize("case", list(RUNS_FILES))
def test_report_names_a_corrupt_or_wrong_shaped_file_of_the_runs_folder(case, tmp_path, capsys):
    """A corrupt job.json once gave `error: Expecting ',' delimiter: line 2 column 1 (char 17)`,
    naming neither the file nor what wrote it; `{}` gave a traceback (KeyError: 'config')."""
    name, content, words = RUNS_FILES[case]
    runs, path = write_job(tmp_path / "runs", tmp_path / "data"), tmp_path / "runs" / name
    if path.name == "metrics.jsonl":  # read for a run that finished
        summary = {"steps": 2, "tokens_per_s": 1.0, "elapsed_s": 1.0}
        write_json(path.parent / "summary.json", summary)
    if callable(content):
        content = content(json.loads((runs / "job.json").read_text()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    before = snapshot(tmp_path)
    refused(capsys, report.main, ["--runs", runs, "--out", tmp_path / "r"], [f"{path}: ", *words])
    assert snapshot(tmp_path) == before


def test_report_reads_the_summary_of_a_run_resumed_at_its_end(tmp_path):
    """What `delete summary.json and run reproduce.py again` gives: a run resumed at its last step
    trains no step, so it has no speed (null); the report says n/a (it once raised a TypeError)."""
    runs = write_job(tmp_path / "runs", tmp_path / "data")
    write_json(
        runs / "pretrain" / "summary.json",
        {"steps": 6, "tokens_per_s": None, "mfu": None, "elapsed_s": 0.2},
    )
    report.main([str(a) for a in ("--runs", runs, "--out", tmp_path / "r")])
    assert "| pretrain | 6 | n/a | n/a | 0.2 |" in (tmp_path / "r" / "report.md").read_text()


def test_reproduce_refuses_a_stages_json_of_another_shape_before_work(data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "stages.json").write_text("[]")
    before = snapshot(tmp_path)
    args = tiny_job(data_dir, runs=runs, out=tmp_path / "r", data_dir=tmp_path / "d")
    refused(capsys, reproduce.main, args, [f"{runs / 'stages.json'}: it is a list", "delete it"])
    assert snapshot(tmp_path) == before


def test_a_corrupt_training_log_stops_a_resume_before_it_writes(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main([str(a) for a in train_flags(data_dir, run)])["steps"] == 2
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": ')  # a line cut short
    before = snapshot(tmp_path)
    refused(
        capsys,
        train.main,
        train_flags(data_dir, run, init_from="resume", max_steps=4),
        [f"{run / 'metrics.jsonl'}: cannot read it as JSON", "Expecting value", "delete it"],
    )
    assert snapshot(tmp_path) == before


def json_reader(kind: str, tmp_path: Path, data_dir: Path, ckpt: Path) -> tuple[Path, object, list]:
    """(the JSON file, the main that reads it, its flags): data meta.json (eval.py: train.py would
    take --out_dir's lock first), --config, a Hugging Face config.json or shard index, the golden
    file."""
    if kind == "meta.json":
        shutil.copytree(data_dir, tmp_path / "data")
        return (
            tmp_path / "data" / kind,
            evaluation.main,
            ["--ckpt", ckpt, "--data_dir", tmp_path / "data", "--contexts", 8, "--device", "cpu"],
        )
    if kind in ("config.json", hf.INDEX_FILE):
        hf.export_hf(checkpoint.load_model(ckpt)[0], tmp_path / "hf")
        if kind == hf.INDEX_FILE:
            shard = tmp_path / "hf" / "model-00001-of-00001.safetensors"
            (tmp_path / "hf" / hf.WEIGHTS_FILE).rename(shard)
        return (
            tmp_path / "hf" / kind,
            hf.main,
            ["import", "--hf_dir", tmp_path / "hf", "--out", tmp_path / "o.pt"],
        )
    if kind == "golden":
        return (
            tmp_path / "golden.json",
            rope_check.main,
            ["--golden", tmp_path / "golden.json", "--examples", 0],
        )
    return (
        tmp_path / "settings.json",
        train.main,
        [f"--config={tmp_path / 'settings.json'}", *train_flags(data_dir, tmp_path / "o")],
    )


GOLDEN = json.loads(rope_check.GOLDEN.read_text())
OTHER_JSON = {  # name: (which, content, words of the error)
    "data meta.json, without a split": (
        "meta.json",
        '{"splits": {"train": {}}}',
        ["splits has no 'val'", "data.prepare writes it"],
    ),
    "data meta.json, corrupt": ("meta.json", '{"splits"', ["cannot read it as JSON", "prepare"]),
    "--config, a list": ("--config", '[{"lr": 1e-4}]', ["--config", "it is a list", "settings"]),
    "--config, corrupt": ("--config", '{"lr": 1e-4,}', ["--config", "cannot read it as JSON"]),
    "hf config.json, a list": ("config.json", "[]", ["it is a list", "save_pretrained"]),
    "hf shard index, not names": (
        hf.INDEX_FILE,
        '{"weight_map": {"x": 1}}',
        ["weight_map.x is 1, not a string", "save_pretrained"],
    ),
    "rope golden file, a case without answers": (
        "golden",
        json.dumps(
            {**GOLDEN, "cases": [{k: v for k, v in GOLDEN["cases"][0].items() if k != "cos"}]}
        ),
        ["cases[0] has no 'cos'", "not a golden cases file"],
    ),
    "rope golden file, an unknown bug class": (
        "golden",
        json.dumps({**GOLDEN, "cases": [{**GOLDEN["cases"][0], "bug_class": "typo"}]}),
        ["bug_classes has no typo"],
    ),
}


@pytest.mark.parametrize("case", list(OTHER_JSON))
def test_a_corrupt_or_wrong_shaped_json_input_is_named(case, data_dir, ckpt, tmp_path, capsys):
    kind, content, words = OTHER_JSON[case]
    path, main, args = json_reader(kind, tmp_path, data_dir, ckpt)
    path.write_text(content)
    before = snapshot(tmp_path)
    refused(capsys, main, args, [path, *words])
    assert snapshot(tmp_path) == before
