"""GGUF out (`hf.py export --gguf`, gguf_io.write) and back in (`hf.py import --gguf`): toy random
models, plain RoPE and YaRN s = 4, exported F32 give bit-identical logits after the round trip, F16
within a stated tolerance; the file holds llama.cpp's rope keys (read with the gguf package's
reader); the tokenizer gives the same ids on real text; what llama.cpp cannot compute is an
`error:`, exit 2, nothing written. Where llama-cpp-python is installed, llama.cpp itself runs an
exported YaRN model (scripts/llama_cpp_check.py) and must agree with ours."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
gguf = pytest.importorskip("gguf")

import checkpoint  # noqa: E402
import flags  # noqa: E402
import gguf_io  # noqa: E402
import hf  # noqa: E402
import llama_cpp_check  # noqa: E402
import tiny_gguf  # noqa: E402
from data.tokenizer import get_tokenizer  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from rope import RopeConfig  # noqa: E402

PLAIN = RopeConfig()
YARN = RopeConfig(type="yarn", factor=4.0, original_context=32)
TEXT = tiny_gguf.prose()[:3000] + "\nnaïve café — 日本語 🙂 \t  x = f(1, 2)  \n"
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="pip install llama-cpp-python"
)


def toy(tmp_path, rope=PLAIN, tokenizer="bytes", vocab_size=320, seed=0, **kw) -> Path:
    """A random toy checkpoint; W_q and W_k scaled up so that attention depends on position."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        block_size=128,
        rope=rope,
        **kw,
    )
    model = Transformer(config)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.wqkv.weight.mul_(8)
    path = tmp_path / "toy.pt"
    checkpoint.save(
        {"model_config": config.to_dict(), "model": model.state_dict(), "tokenizer": tokenizer},
        path,
    )
    return path


def round_trip(tmp_path, ckpt: Path, *extra) -> tuple[Path, Path]:
    out, back = tmp_path / "toy.gguf", tmp_path / "back.pt"
    assert (
        flags.cli(hf.main, ["export", "--gguf", "--ckpt", str(ckpt), "--out", str(out), *extra])
        == 0
    )
    assert flags.cli(hf.main, ["import", "--gguf", str(out), "--out", str(back)]) == 0
    return out, back


def logits(ckpt: Path, n: int = 120) -> torch.Tensor:
    model, _ = checkpoint.load_model(ckpt)
    x = torch.randint(0, 257, (2, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize(
    "rope, tied",
    [(PLAIN, True), (YARN, True), (YARN, False)],
    ids=["plain", "yarn s=4", "yarn s=4, untied head"],
)
def test_f32_round_trip_gives_identical_logits_rope_and_config(tmp_path, rope, tied):
    ckpt = toy(tmp_path, rope, tie_embeddings=tied)
    out, back = round_trip(tmp_path, ckpt)
    assert torch.equal(logits(ckpt), logits(back))  # positions 0-119: past L = 32 for YaRN
    assert checkpoint.load(back)["model_config"] == checkpoint.load(ckpt)["model_config"]
    reader = gguf_io.open_reader(out)
    meta = {k: gguf_io.field(reader, k) for k in reader.fields if k.startswith("llama.")}
    assert meta["llama.context_length"] == 128 and meta["llama.rope.dimension_count"] == 16
    assert meta["llama.rope.freq_base"] == 10000.0
    assert meta["llama.rope.scaling.type"] == ("yarn" if rope.type == "yarn" else "none")
    if rope.type == "yarn":
        scaling = {k.split(".")[-1]: v for k, v in meta.items() if ".scaling." in k}
        assert scaling == {
            "type": "yarn",
            "factor": 4.0,
            "original_context_length": 32,
            "yarn_beta_fast": 32.0,
            "yarn_beta_slow": 1.0,
        }
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    assert ("output.weight" in {t.name for t in reader.tensors}) == (not tied)


def test_the_round_trip_is_sensitive_to_the_rope(tmp_path):
    """The same weights under plain RoPE give other logits past the first position: the equality
    above could fail."""
    a, b = logits(toy(tmp_path / "a", YARN)), logits(toy(tmp_path / "b", PLAIN))
    assert (a - b)[:, 1:].abs().max() > 1e-2


def test_f16_within_tolerance_norms_stay_f32(tmp_path):
    ckpt = toy(tmp_path, YARN)
    out, back = round_trip(tmp_path, ckpt, "--dtype", "float16")
    types = {t.name: t.tensor_type.name for t in gguf_io.open_reader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    a, b = logits(ckpt), logits(back)
    assert 0 < (a - b).abs().max() < 5e-3 * a.abs().max()  # F16's 11-bit mantissa, 2 layers


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_builtin_tokenizers_give_the_same_ids(tmp_path, tokenizer):
    V = 320 if tokenizer == "bytes" else 50304
    _, back = round_trip(tmp_path, toy(tmp_path, tokenizer=tokenizer, vocab_size=V))
    vocab = checkpoint.load(back)["tokenizer"]
    assert len(vocab["tokens"]) == V and vocab["eot"] == get_tokenizer(tokenizer).eot_token
    ids = get_tokenizer(tokenizer).encode_ordinary(TEXT)
    assert get_tokenizer(vocab).encode_ordinary(TEXT) == ids and len(ids) > 500


def test_an_imported_model_round_trips_with_its_vocabulary(tmp_path):
    tiny_gguf.write(tmp_path / "tiny.gguf", qk_scale=1.0)
    first = tmp_path / "first.pt"
    assert (
        flags.cli(hf.main, ["import", "--gguf", str(tmp_path / "tiny.gguf"), "--out", str(first)])
        == 0
    )
    _, back = round_trip(tmp_path, first)
    a, b = checkpoint.load(first), checkpoint.load(back)
    assert a["tokenizer"] == b["tokenizer"] and a["model_config"] == b["model_config"]
    assert torch.equal(logits(first), logits(back))
    merges = gguf_io.field(gguf_io.open_reader(tmp_path / "toy.gguf"), "tokenizer.ggml.merges")
    original = gguf_io.field(gguf_io.open_reader(tmp_path / "tiny.gguf"), "tokenizer.ggml.merges")
    assert merges == original  # recovered from the ranks alone


def test_ntk_exports_exactly_as_a_changed_base(tmp_path):
    ntk = RopeConfig(type="ntk", factor=4.0, original_context=32)
    ckpt = toy(tmp_path, ntk)
    _, back = round_trip(tmp_path, ckpt)
    rope = checkpoint.load(back)["model_config"]["rope"]
    assert rope["type"] == "default"
    assert math.isclose(rope["base"], 10000 * 4 ** (16 / 14), rel_tol=1e-7)  # float32 in GGUF
    a, b = logits(ckpt), logits(back)
    assert (a - b).abs().max() < 1e-4 * a.abs().max()


BAD = {
    "dynamic yarn": (
        {"rope": RopeConfig(type="dynamic_yarn", factor=4.0, original_context=32)},
        "rope type 'dynamic_yarn' cannot be exported to GGUF",
    ),
    "dynamic ntk": (
        {"rope": RopeConfig(type="dynamic", factor=2.0, original_context=32)},
        "rope type 'dynamic' cannot",
    ),
    "longrope": (
        {
            "rope": RopeConfig(
                type="longrope",
                factor=4.0,
                original_context=32,
                short_factor=(1.0,) * 8,
                long_factor=(2.0,) * 8,
            )
        },
        "rope type 'longrope' cannot",
    ),
    "yarn without temperature": (
        {"rope": YARN.replace(attention_factor=1.0)},
        "attention factor other than 0.1 ln s",
    ),
    "yarn untruncated": ({"rope": YARN.replace(truncate=False)}, "truncate=false"),
    "previous tokens": ({"prev_tokens": 2}, "prev_tokens=2"),
    "q/k/v biases": ({"qkv_bias": True}, "q/k/v biases"),
    "partial rotary": ({"rope": PLAIN.replace(partial_rotary_factor=0.5)}, "partial_rotary"),
    "bytes in 257 rows": ({"vocab_size": 257}, "vocab_size 258 or more"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_what_llama_cpp_cannot_compute_is_refused_and_nothing_written(tmp_path, case, capsys):
    config, message = BAD[case]
    ckpt, out = toy(tmp_path, **config), tmp_path / "out.gguf"
    assert flags.cli(hf.main, ["export", "--gguf", "--ckpt", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [ckpt]


def test_bfloat16_and_an_existing_file_are_refused(tmp_path, capsys):
    ckpt = toy(tmp_path)
    out = tmp_path / "out.gguf"
    argv = ["export", "--gguf", "--ckpt", str(ckpt), "--out", str(out)]
    assert flags.cli(hf.main, [*argv, "--dtype", "bfloat16"]) == 2 and not out.exists()
    out.write_text("keep me")
    assert flags.cli(hf.main, argv) == 2 and out.read_text() == "keep me"
    err = capsys.readouterr().err
    assert "use float32 or float16" in err and "--force" in err


def test_bins_split_at_quarters_and_at_L():
    assert llama_cpp_check.bins(100, None) == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert llama_cpp_check.bins(100, 30) == [(0, 25), (25, 30), (30, 50), (50, 75), (75, 100)]
    a = torch.log_softmax(torch.randn(5, 7), -1).numpy()
    rows = llama_cpp_check.compare(a, a.copy(), [0, 1, 2, 3, 4, 5], None)
    assert all(r["mean_abs_delta"] == 0 and r["top1_agreement"] == 1 for r in rows)
    b = a.copy()
    b[0, 1] += 1.0  # position 0's log-prob of its target, token 1
    b[4] = -b[4]  # position 4's top-1 now its former last
    rows = llama_cpp_check.compare(a, b, [0, 1, 2, 3, 4, 5], None)  # 6 positions, 5 scored
    assert [r["positions"] for r in rows] == ["0-1", "1-3", "3-4", "4-5"]
    assert [r["mean_abs_delta"] for r in rows][:3] == pytest.approx([1, 0, 0])
    assert [r["top1_agreement"] for r in rows] == [a[0].argmax() == b[0].argmax(), 1, 1, 0]


@needs_llama_cpp
def test_llama_cpp_computes_our_yarn_from_the_file_alone(tmp_path):
    ckpt = toy(tmp_path, YARN)
    model, _ = checkpoint.load_model(ckpt)
    tokens = get_tokenizer("bytes").encode_ordinary(TEXT)[:128]
    hf.export_gguf(model, "bytes", tmp_path / "y.gguf")
    theirs = llama_cpp_check.llama_cpp_log_probs(tmp_path / "y.gguf", tokens, YARN, False)
    ours = llama_cpp_check.ours(model, tokens)
    rows = llama_cpp_check.compare(ours, theirs, tokens, 32)
    assert max(r["mean_abs_delta"] for r in rows) < 1e-3, rows
    model.set_rope(PLAIN)  # a world where llama.cpp's rotation is not ours: it shows past L
    rows = llama_cpp_check.compare(llama_cpp_check.ours(model, tokens), theirs, tokens, 32)
    assert max(r["mean_abs_delta"] for r in rows[2:]) > 1e-2, rows


@needs_llama_cpp
def test_llama_cpp_takes_yarn_betas_from_its_options_not_the_file(tmp_path, capsys):
    """What docs/llama_cpp.md says: betas other than 32 / 1 must be passed (the export says so);
    llama-cpp-python passes 32 / 1 unless told, and llama.cpp then ignores the file's."""
    rope = YARN.replace(beta_fast=1.0, beta_slow=0.25)  # the ramp over pairs 1-3 of 8 at L = 32
    ckpt, out = toy(tmp_path, rope), tmp_path / "b.gguf"
    assert flags.cli(hf.main, ["export", "--gguf", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert "--yarn-beta-fast 1 --yarn-beta-slow 0.25" in capsys.readouterr().out
    model, _ = checkpoint.load_model(ckpt)
    tokens = get_tokenizer("bytes").encode_ordinary(TEXT)[:128]
    ours = llama_cpp_check.ours(model, tokens)

    def worst(r):
        theirs = llama_cpp_check.llama_cpp_log_probs(out, tokens, r, False)
        return max(
            row["mean_abs_delta"] for row in llama_cpp_check.compare(ours, theirs, tokens, 32)
        )

    assert worst(rope) < 1e-3 and worst(YARN) > 1e-2  # YARN: llama-cpp-python's own 32 / 1
