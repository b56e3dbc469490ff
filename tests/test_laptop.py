"""The laptop path of the README (configs/laptop_*.json) keeps working: each config runs a few steps
on a small byte corpus, with the README's flags, and sample.py and eval.py take the checkpoints it
makes. The configs' own models, contexts and RoPE; only the step counts, the folders and the number
of documents and trials are made small. About 15 seconds on 2 cores. (Every config parses:
tests/test_train.py.)"""

import json
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402
import eval as evaluation  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402

CONFIGS = REPO / "configs"
PRETRAIN, EXTEND = CONFIGS / "laptop_pretrain.json", CONFIGS / "laptop_yarn_s4.json"
PROMPT = CONFIGS / "laptop_prompt.txt"  # the README's long prompt
EVAL = [
    "--data_dir=data/stdlib_bytes",
    "--contexts=512,1024,2048,4096",
    "--score=1024",
]  # the README's eval flags


def settings(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # small matmuls gain nothing from a second thread on a shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> Path:
    """A dozen standard-library modules as bytes (~350 kB), a third held out: documents longer than
    the eval ladder's longest context plus its scored tokens."""
    root = tmp_path_factory.mktemp("laptop")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "corpus").mkdir()
    for name in [
        "textwrap.py",
        "shlex.py",
        "heapq.py",
        "queue.py",
        "argparse.py",
        "difflib.py",
        "pprint.py",
        "string.py",
        "calendar.py",
        "tokenize.py",
        "fnmatch.py",
        "bisect.py",
    ]:
        shutil.copy(stdlib / name, root / "corpus" / name)
    prepare(
        PrepareConfig(
            source=str(root / "corpus"),
            out=str(root / "data"),
            tokenizer="bytes",
            block_size=settings(EXTEND)["block_size"],
            val_fraction=0.35,
        )
    )
    return root / "data"


@pytest.fixture(scope="module")
def laptop_runs(byte_data, tmp_path_factory) -> tuple[Path, Path]:
    """The README's two training commands, 3 and 2 steps: pretraining, then the YaRN extension
    fine-tuned."""
    runs = tmp_path_factory.mktemp("runs")
    pre, ext = runs / "laptop", runs / "laptop_yarn4"
    small = [f"--data_dir={byte_data}", "--eval_batches=1", "--device=cpu"]
    train.main(
        ["--config", PRETRAIN, f"--out_dir={pre}", "--max_steps=3", "--eval_interval=3", *small]
    )
    train.main(
        [
            "--config",
            EXTEND,
            f"--init_from={pre}",
            f"--out_dir={ext}",
            "--max_steps=2",
            "--warmup_steps=1",
            "--eval_interval=2",
            *small,
        ]
    )
    return pre, ext


def test_the_laptop_configs_train_the_models_they_describe(laptop_runs):
    pre, ext = laptop_runs
    pre_cfg, ext_cfg = settings(PRETRAIN), settings(EXTEND)
    state = checkpoint.load(pre / "ckpt.pt")
    model = state["model_config"]
    assert state["step"] == 3 and state["tokenizer"] == "bytes"
    assert {k: model[k] for k in ("vocab_size", "d_model", "n_layer", "n_head", "block_size")} == {
        k: pre_cfg[k] for k in ("vocab_size", "d_model", "n_layer", "n_head", "block_size")
    }
    assert (
        state["run_config"]["data_mix"] == "natural"
    )  # natural text only: no recall-shaped windows
    state = checkpoint.load(ext / "ckpt.pt")
    rope = state["model_config"]["rope"]
    assert state["step"] == 2 and state["extended_from"] == str(pre / "ckpt.pt")
    assert (rope["type"], rope["factor"]) == (ext_cfg["rope"]["type"], ext_cfg["rope"]["factor"])
    assert rope["original_context"] == pre_cfg["block_size"]  # L = the pretraining context
    assert (
        state["model_config"]["block_size"]
        == rope["factor"] * pre_cfg["block_size"]
        == ext_cfg["block_size"]
    )
    assert all(bool(torch.isfinite(w).all()) for w in state["model"].values())


def test_the_laptop_config_defaults_are_the_readmes_folders():
    """The README's commands name no folders: the configs' out_dir, init_from and data_dir chain
    them."""
    pre, ext = settings(PRETRAIN), settings(EXTEND)
    assert (
        ext["init_from"] == pre["out_dir"]
        and pre["data_dir"] == ext["data_dir"] == EVAL[0].split("=")[1]
    )
    assert (
        pre["data_dir"] == "data/stdlib_bytes"
    )  # where `python -m data.prepare --tokenizer bytes` writes
    assert pre.get("data_mix", "natural") == "natural"


@pytest.mark.parametrize(
    "rope", [[], ["--rope.type=dynamic_yarn"]], ids=["fine-tuned", "dynamic-yarn"]
)
def test_sampling_at_the_long_context(laptop_runs, rope, capsys):
    """The fine-tuned model at its context L' = s L, and the pretrained one under Dynamic YaRN past
    its L."""
    pre, ext = laptop_runs
    long = settings(EXTEND)["block_size"]
    prompt = len(
        PROMPT.read_bytes()
    )  # bytes = tokens: past L, and with the README's 400 new ones within L'
    assert settings(PRETRAIN)["block_size"] < prompt and prompt + 400 <= long
    ckpt, extra = (ext, []) if not rope else (pre, [f"--max_context={long}"])
    sample.main(
        [
            "--ckpt",
            ckpt,
            "--prompt_file",
            PROMPT,
            "--max_new_tokens=8",
            "--stop_at_eot=false",
            "--device=cpu",
            *rope,
            *extra,
        ]
    )
    captured = capsys.readouterr()
    assert f"context {long}" in captured.err and ("dynamic_yarn" in captured.err) == bool(rope)
    assert ("warning" in captured.err) == bool(
        rope
    )  # past the context it was trained at: only the pretrained
    assert len(captured.out) > 1 and captured.out.endswith("\n")


@pytest.mark.parametrize(
    "rope", [[], ["--rope.type=dynamic_yarn"]], ids=["fine-tuned", "dynamic-yarn"]
)
def test_evaluating_against_context_length(laptop_runs, byte_data, rope):
    pre, ext = laptop_runs
    result = evaluation.main(
        [
            "--ckpt",
            ext if not rope else pre,
            *EVAL,
            f"--data_dir={byte_data}",
            "--max_docs=1",
            "--trials=1",
            "--device=cpu",
            *rope,
        ]
    )
    assert result["contexts"][-1] == 2 * settings(EXTEND)["block_size"]  # to 2 L' = 8 L
    assert all(
        1 < r["ppl"] < 400 for r in result["ppl"].values()
    )  # a byte model: at most ~uniform over 320 ids
    assert result["rope"]["type"] == ("dynamic_yarn" if rope else "yarn")
