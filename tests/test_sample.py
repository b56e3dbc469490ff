"""Tests for sample.py: cached generation equals a no-cache reference, seeds reproduce, EOT stops,
the streaming decoder never splits a character, the context policy, the RoPE override, and every bad
input exits 2 with a message and no traceback. Tiny one-layer models, CPU, about 15 seconds (a third
of it three subprocesses importing torch)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402
import flags  # noqa: E402
import generate  # noqa: E402
import sample  # noqa: E402
from data.tokenizer import EOT, StreamDecoder, get_tokenizer  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from rope import RopeConfig  # noqa: E402

CONFIG = ModelConfig(vocab_size=50304, n_layer=1, d_model=32, n_head=2, block_size=32)
LONG_PROMPT = " ".join(["alpha beta gamma delta"] * 10)  # 40 tokens, longer than block_size 32


def random_model(seed=0) -> Transformer:
    """Weights of std 0.3 rather than the init's 0.02: at init the tied head just repeats the last
    token whatever the positions say, so RoPE changes would not show in the text."""
    torch.manual_seed(seed)
    model = Transformer(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def eot_model() -> Transformer:
    """A model whose next token is EOT after any input. Channel 0 of every embedding is 1 (10 for
    EOT), no block writes to channel 0 (row 0 of wo and w2 zeroed), and the final norm keeps only
    channel 0: so the hidden state is (c, 0, ..., 0) with c > 0 and the tied head's logits are c *
    E[v, 0], largest by far for EOT."""
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    with torch.no_grad():
        model.tok_emb.weight[:, 0] = 1.0
        model.tok_emb.weight[EOT, 0] = 10.0
        for block in model.blocks:
            block.attn.wo.weight[0] = 0.0
            block.mlp.w2.weight[0] = 0.0
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
    return model.eval()


def save(model: Transformer, path: Path) -> Path:
    checkpoint.save(
        {"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 0}, path
    )
    return path


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save(random_model(), tmp_path_factory.mktemp("run") / "ckpt.pt")


@pytest.fixture(scope="module")
def eot_ckpt(tmp_path_factory) -> Path:
    return save(eot_model(), tmp_path_factory.mktemp("eot") / "ckpt.pt")


def on_cpu(args) -> list[str]:
    """The arguments, with --device cpu unless they name a device: the asserts expect cpu even
    beside a GPU."""
    args = [str(a) for a in args]
    return args if any(a.startswith("--device") for a in args) else args + ["--device", "cpu"]


def cli(*args):
    """Run sample.py in a fresh process: (exit code, stdout, stderr)."""
    r = subprocess.run(
        [sys.executable, "sample.py", *on_cpu(args)], cwd=REPO, capture_output=True, timeout=120
    )
    return r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8")


def main(capsys, *args):
    """sample.py's main in this process, as the script runs it: (exit code, stdout, stderr)."""
    code = flags.cli(sample.main, on_cpu(args))
    out, err = capsys.readouterr()
    return code, out, err


def generate_tokens(
    model, tokens, n, temperature=0.8, top_k=200, generator=None, stop_token=None, rule="follow"
):
    """generate.generate on a list of ids, sampling as sample.py does: the new ids."""
    choose = generate.sampler(temperature, top_k, generator)
    new = generate.generate(model, torch.tensor([tokens]), n, choose, rule, stop_token=stop_token)
    return [int(t[0]) for t in new]


def generate_text(model, tok, prompt, n, on_text=None, on_warning=None, **settings):
    """sample.generate_text of n new tokens under sample.py's other settings (SampleConfig)."""
    args = sample.SampleConfig(ckpt="-", max_new_tokens=n, **settings)
    return sample.generate_text(model, tok, prompt, args, on_text=on_text, on_warning=on_warning)


def reference_greedy(model, tokens, n, rule):
    """Greedy decoding the slow way: a full forward pass over the whole sequence for every new
    token, no cache, with the l' the rule gives for that sequence's length."""
    idx = torch.tensor([tokens])
    for _ in range(n):
        seq_len = generate.rope_seq_len(model.config.rope, idx.shape[1], len(tokens) + n, rule)
        logits = model(idx, seq_len=seq_len)[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(tokens) :].tolist()


# --------------------------------------------------------------------------------------------------
# The command line


def test_cli_prints_text_and_header(ckpt):
    code, out, err = cli(
        "--ckpt", ckpt.parent, "--prompt", "Hello there", "--max_new_tokens", 8, "--seed", 1
    )
    assert code == 0, err
    assert out.strip()  # some text
    header = err.splitlines()[0]
    for part in (str(ckpt.parent), "step 0", "rope default", "context 32", "device cpu", "float32"):
        assert part in header


def test_prompt_longer_than_context_is_an_error(ckpt):
    code, out, err = cli("--ckpt", ckpt, "--prompt", LONG_PROMPT, "--max_new_tokens", 4)
    assert code == 2 and out == ""
    assert "40 tokens" in err and "32 tokens" in err
    assert "--truncate_prompt" in err and "--max_context" in err
    assert "Traceback" not in err


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "ckpt.pt"
    code, out, err = main(capsys, "--ckpt", missing)
    assert code == 2 and out == ""
    assert err.startswith("error:") and str(missing) in err and "Traceback" not in err


def test_corrupt_checkpoint(ckpt, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    code, out, err = cli("--ckpt", truncated)
    assert code == 2 and out == ""
    assert (
        err.startswith("error:")
        and str(truncated) in err
        and "corrupt" in err
        and "Traceback" not in err
    )


def test_greedy_cli_is_deterministic(ckpt, capsys):
    runs = [
        main(
            capsys,
            "--ckpt",
            ckpt,
            "--prompt",
            "Once upon",
            "--max_new_tokens",
            10,
            "--temperature",
            0,
            "--seed",
            seed,
        )
        for seed in (1, 2)
    ]
    assert runs[0][0] == 0 and runs[0][1].strip()
    assert runs[0][1] == runs[1][1]  # the seed plays no part in greedy decoding


def test_compile_prints_the_same_greedy_text(ckpt, capsys):
    """--compile decodes through the compiled step (generate.compiled_step, inductor here): the
    eager path's text."""
    args = ("--ckpt", ckpt, "--prompt", "Once upon", "--max_new_tokens", 12, "--temperature", 0)
    eager, compiled = main(capsys, *args), main(capsys, *args, "--compile")
    assert eager[0] == compiled[0] == 0 and eager[1].strip() and compiled[1] == eager[1]


def test_seed_reproduces(ckpt, capsys):
    def run(seed):
        code, out, _ = main(
            capsys,
            "--ckpt",
            ckpt,
            "--max_new_tokens",
            6,
            "--temperature",
            1.0,
            "--seed",
            seed,
            "--num_samples",
            2,
        )
        assert code == 0
        return out

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    samples = first.split(sample.SEPARATOR + "\n")
    assert (
        len(samples) == 2 and samples[0] != samples[1]
    )  # the generator runs on from sample to sample


@pytest.mark.parametrize(
    "args, words",
    [
        (["--temperature", "-0.5"], ["temperature", ">= 0", "-0.5"]),
        (["--top_k", "0"], ["top_k", ">= 1", "0"]),
        (["--top_k", "-3"], ["top_k", ">= 1", "-3"]),
        (["--max_new_tokens", "0"], ["max_new_tokens", ">= 1"]),
        (["--num_samples", "0"], ["num_samples", ">= 1"]),
        (["--max_context", "0"], ["max_context", ">= 1"]),
        (["--rope.factor=0.5"], ["factor", "0.5", ">= 1"]),
        (["--rope.type=bogus"], ["bogus", "dynamic_yarn"]),
        (["--rope.factor=abc"], ["--rope.factor", "abc"]),
        (["--top_k", "many"], ["--top_k", "many"]),
        (["--device", "nonsense"], ["--device", "nonsense"]),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], ["CUDA is not available"])]),
)
def test_bad_settings_exit_2(ckpt, capsys, args, words):
    code, out, err = main(capsys, "--ckpt", ckpt, "--max_new_tokens", 4, *args)
    assert code == 2 and out == ""
    assert "error:" in err and "Traceback" not in err
    for word in words:
        assert word in err


def test_prompt_file(ckpt, tmp_path, capsys):
    good = tmp_path / "prompt.txt"
    good.write_text("naïve café", encoding="utf-8")
    code, out, _ = main(
        capsys, "--ckpt", ckpt, "--prompt_file", good, "--max_new_tokens", 5, "--temperature", 0
    )
    assert code == 0
    model, _ = checkpoint.load_model(ckpt)
    assert out == generate_text(model, get_tokenizer(), "naïve café", 5, temperature=0) + "\n"

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("naïve café".encode("latin-1"))
    code, out, err = main(capsys, "--ckpt", ckpt, "--prompt_file", bad)
    assert code == 2 and out == "" and str(bad) in err and "UTF-8" in err

    code, out, err = main(capsys, "--ckpt", ckpt, "--prompt_file", tmp_path / "absent.txt")
    assert code == 2 and "absent.txt" in err


def test_truncate_prompt_and_max_context(ckpt, capsys):
    code, out, err = main(
        capsys,
        "--ckpt",
        ckpt,
        "--prompt",
        LONG_PROMPT,
        "--max_new_tokens",
        4,
        "--temperature",
        0,
        "--truncate_prompt",
    )
    assert code == 0 and out.strip()
    assert "kept the last 28 of the prompt's 40 tokens" in err

    code, out, err = main(
        capsys,
        "--ckpt",
        ckpt,
        "--prompt",
        LONG_PROMPT,
        "--max_new_tokens",
        4,
        "--temperature",
        0,
        "--max_context",
        64,
    )
    assert code == 0 and out.strip()
    assert (
        "context 64 (trained at 32)" in err
        and "runs past the context the model was trained at (32)" in err
    )


# --------------------------------------------------------------------------------------------------
# generate_text and the context policy


@pytest.mark.parametrize("prompt", ["", "The quick brown fox", LONG_PROMPT[:60]])
def test_greedy_equals_no_cache_reference(tok, prompt):
    model = random_model()
    tokens = sample.encode_prompt(tok, prompt)
    n = min(16, 32 - len(tokens))
    cached = list(generate_tokens(model, tokens, n, temperature=0))
    assert cached == reference_greedy(model, tokens, n, "follow")
    decoder = StreamDecoder(tok)
    expected = decoder.push(cached) + decoder.flush()
    assert generate_text(model, tok, prompt, n, temperature=0, stop_at_eot=False) == expected


@pytest.mark.parametrize("rule", ["follow", "capacity"])
def test_greedy_equals_reference_for_dynamic_yarn_past_the_context(tok, rule):
    """Cached decoding with a dynamic variant equals the no-cache reference under either rule: l'
    stepping with the length (40 -> 64 -> 128 here, two re-prefills), or fixed at prompt + new
    tokens."""
    model = random_model()
    model.set_rope(sample.rope_with_overrides(model.config, {"type": "dynamic_yarn"}))
    tokens = tok.encode_ordinary(LONG_PROMPT)
    cached = list(generate_tokens(model, tokens, 40, temperature=0, rule=rule))
    assert cached == reference_greedy(model, tokens, 40, rule)


def test_on_text_streams_pieces(tok):
    pieces = []
    text = generate_text(random_model(), tok, "Hi", 12, temperature=0, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == text


def test_stop_at_eot(tok, eot_ckpt, capsys):
    model = eot_model()
    gen = torch.Generator().manual_seed(0)
    assert list(
        generate_tokens(model, [464], 5, temperature=1.0, generator=gen, stop_token=EOT)
    ) == [EOT]
    assert generate_text(model, tok, "The", 5, temperature=0) == ""
    text = generate_text(model, tok, "The", 3, temperature=0, stop_at_eot=False)
    assert text == "<|endoftext|>" * 3
    code, out, _ = main(capsys, "--ckpt", eot_ckpt, "--prompt", "The", "--max_new_tokens", 5)
    assert code == 0 and out == "\n"
    code, out, _ = main(capsys, "--ckpt", eot_ckpt, "--max_new_tokens", 2, "--stop_at_eot=false")
    assert code == 0 and out == "<|endoftext|>" * 2 + "\n"


def test_fit_context_policy():
    C = 32
    assert sample.fit_context(10, 5, C) == (10, 5, [])
    assert sample.fit_context(10, 22, C) == (10, 22, [])  # exactly full
    keep, n, warnings = sample.fit_context(
        10, 30, C
    )  # the prompt fits, the new tokens do not: lowered
    assert (keep, n) == (10, 22) and "lowered from 30 to 22" in warnings[0]
    for n_prompt in (32, 40):  # no room for one new token
        with pytest.raises(sample.ContextError, match=f"{n_prompt} tokens.*32 tokens"):
            sample.fit_context(n_prompt, 4, C)
    keep, n, warnings = sample.fit_context(
        40, 4, C, truncate_prompt=True
    )  # sliding window: the last C - N
    assert (keep, n) == (28, 4) and "kept the last 28 of the prompt's 40 tokens" in warnings[0]
    keep, n, warnings = sample.fit_context(
        40, 50, C, truncate_prompt=True
    )  # N >= C: one prompt token, N lowered
    assert (keep, n) == (1, 31) and len(warnings) == 2
    keep, n, warnings = sample.fit_context(
        40, 4, 64, block_size=32
    )  # --max_context past the trained context
    assert (keep, n) == (40, 4) and "trained at (32)" in warnings[0]


def test_truncate_prompt_keeps_the_last_tokens(tok):
    model = random_model()
    tokens = tok.encode_ordinary(LONG_PROMPT)
    warnings = []
    text = generate_text(
        model,
        tok,
        LONG_PROMPT,
        4,
        temperature=0,
        stop_at_eot=False,
        truncate_prompt=True,
        on_warning=warnings.append,
    )
    decoder = StreamDecoder(tok)
    expected = list(generate_tokens(model, tokens[-28:], 4, temperature=0))
    assert text == decoder.push(expected) + decoder.flush() and len(warnings) == 1


def test_max_new_tokens_lowered_to_fit(tok):
    warnings = []
    text = generate_text(
        eot_model(), tok, "a b c", 100, temperature=0, stop_at_eot=False, on_warning=warnings.append
    )
    assert text == "<|endoftext|>" * (32 - 3) and "lowered from 100 to 29" in warnings[0]


# --------------------------------------------------------------------------------------------------
# Streaming decode


def test_stream_decoder_prints_split_characters_whole(tok):
    text = "héllo 日本語 🙂"
    tokens = tok.encode_ordinary(text)
    alone = [tok.decode_bytes([t]) for t in tokens]
    assert b" \xe6" in alone and b"\x97" in alone, (
        "the test needs tokens that hold part of a character"
    )
    decoder = StreamDecoder(tok)
    pieces = [decoder.push([t]) for t in tokens] + [decoder.flush()]
    # each of 日本語 is split over two or three tokens: nothing is printed until its last byte
    # arrives
    assert pieces == ["h", "é", "llo", " ", "", "日", "", "本", "", "語", " 🙂", ""]
    assert "".join(pieces) == text


def test_stream_decoder_invalid_bytes_and_unknown_ids(tok):
    tokens = tok.encode_ordinary("ok 日本")
    decoder = StreamDecoder(tok)
    # an unknown id (a padding row of the model's vocabulary) and an incomplete character at the end
    cut = tok.encode_ordinary(" 語")[:1]
    assert tok.decode_bytes(cut).decode("utf-8", errors="replace").endswith("\ufffd")
    pieces = [decoder.push([t]) for t in tokens + [50300] + cut] + [decoder.flush()]
    whole = tok.decode_bytes(tokens) + "\ufffd".encode() + tok.decode_bytes(cut)
    assert "".join(pieces) == whole.decode("utf-8", errors="replace")
    assert pieces[-1].endswith("\ufffd")  # the incomplete tail, shown only at the end


# --------------------------------------------------------------------------------------------------
# RoPE override


def test_rope_override_changes_output_past_the_context_and_not_the_weights(ckpt, tok, capsys):
    model, _ = checkpoint.load_model(ckpt)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    short = "The quick brown fox"  # with the new tokens, within the original context L = 32
    before = [
        generate_text(model, tok, p, 12, temperature=0, max_context=64)
        for p in (short, LONG_PROMPT)
    ]
    model.set_rope(sample.rope_with_overrides(model.config, {"type": "dynamic_yarn"}))
    assert (
        model.config.rope.original_context == 32
    )  # the checkpoint's block_size, since plain RoPE has no L
    after = [
        generate_text(model, tok, p, 12, temperature=0, max_context=64)
        for p in (short, LONG_PROMPT)
    ]
    assert after[0] == before[0]  # Dynamic YaRN is plain RoPE while l' <= L
    assert after[1] != before[1]  # and rescales past it
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    args = [
        "--ckpt",
        ckpt,
        "--prompt",
        LONG_PROMPT,
        "--max_new_tokens",
        12,
        "--temperature",
        0,
        "--max_context",
        64,
    ]
    code, plain, _ = main(capsys, *args)
    code2, dynamic, err = main(capsys, *args, "--rope.type=dynamic_yarn")
    assert code == code2 == 0
    assert plain == before[1] + "\n" and dynamic == after[1] + "\n"
    assert "overridden to dynamic_yarn (original_context=32)" in err


def test_rope_override_keeps_the_checkpoints_other_fields():
    yarn = ModelConfig(
        vocab_size=64,
        n_layer=1,
        d_model=32,
        n_head=2,
        block_size=64,
        rope=RopeConfig(type="yarn", factor=4.0, original_context=16, beta_fast=16.0),
    )
    cfg = sample.rope_with_overrides(yarn, {"type": "dynamic_yarn"})
    assert (cfg.type, cfg.factor, cfg.original_context, cfg.beta_fast) == (
        "dynamic_yarn",
        4.0,
        16,
        16.0,
    )
    assert sample.rope_with_overrides(yarn, {"original_context": 8}).original_context == 8
    with pytest.raises(ValueError, match="factor"):
        sample.rope_with_overrides(yarn, {"factor": 0.5})
