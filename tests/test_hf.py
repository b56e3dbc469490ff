"""hf.py: export to Hugging Face Llama folders and import them back.

The oracle is transformers' LlamaForCausalLM itself: every exported variant must give our logits
(eager and SDPA attention) at a length beyond the original context, so the scaling is exercised.
Then the round trip, the refusals, the command line, and the transformers behaviours hf.py's
docstring describes."""

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault(
    "HF_HUB_OFFLINE", "1"
)  # everything here is a local folder; never reach for the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import flags  # noqa: E402
import generate  # noqa: E402
import hf  # noqa: E402
import rope  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from rope import RopeConfig  # noqa: E402

L = 32  # original context
T = 100  # test length: beyond L, inside s*L = 128
TOL = 1e-4  # ||ours - theirs|| / ||theirs||; observed ~2e-7 (float32 rounding of the frequencies)
# LongRoPE's divisors for head_dim 16 (8 pairs), Phi-3-like: near 1 up to L, growing towards s = 4
# past it
SHORT = (1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.7)
LONG = (1.0, 1.1, 1.4, 2.0, 2.8, 3.5, 3.9, 4.0)

# Every variant hf.py exports, with how (see hf.py's table). GQA in the yarn case.
EXPORTABLE = {
    "default": dict(rope_cfg=RopeConfig()),
    "linear": dict(rope_cfg=RopeConfig(type="linear", factor=4.0)),
    "ntk": dict(
        rope_cfg=RopeConfig(type="ntk", factor=4.0)
    ),  # as default with base b * s^(|D|/(|D|-2))
    "dynamic": dict(
        rope_cfg=RopeConfig(type="dynamic", factor=2.0, original_context=L), block_size=L
    ),
    "ntk_by_parts": dict(
        rope_cfg=RopeConfig(type="ntk_by_parts", factor=4.0, original_context=L)
    ),  # yarn, factor 1
    "yarn": dict(rope_cfg=RopeConfig(type="yarn", factor=4.0, original_context=L), n_kv_head=2),
    "yarn_mscale_untruncated": dict(
        rope_cfg=RopeConfig(
            type="yarn",
            factor=4.0,
            original_context=L,
            beta_fast=16.0,
            beta_slow=0.5,
            truncate=False,
            mscale=0.707,
            mscale_all_dim=1.0,
        )
    ),
    "llama3": dict(rope_cfg=RopeConfig(type="llama3", factor=4.0, original_context=L)),
    "longrope": dict(
        rope_cfg=RopeConfig(
            type="longrope", factor=4.0, original_context=L, short_factor=SHORT, long_factor=LONG
        )
    ),  # at T > L: the long factors
}


def tiny_model(
    rope_cfg: RopeConfig, n_kv_head: int = 0, block_size: int = 4 * L, seed: int = 0, **kw
) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=128,
        n_layer=2,
        n_head=4,
        n_kv_head=n_kv_head,
        d_model=64,
        block_size=block_size,
        rope=rope_cfg,
        **kw,
    )
    model = Transformer(config).eval()
    # At the init scale (std 0.02) attention is nearly uniform, so positions barely matter: a wrong
    # RoPE moves the logits by only ~2e-3. With W_q, W_k ten times larger the scores are O(1) and a
    # wrong RoPE moves them by ~30% (test_parity_is_sensitive), far beyond TOL.
    with torch.no_grad():
        for block in model.blocks:  # the rows of W_q and W_k in the stacked wqkv
            block.attn.wqkv.weight[: (config.n_head + config.kv_heads) * config.head_dim].mul_(10.0)
    return model


def case_model(name: str) -> Transformer:
    return tiny_model(**EXPORTABLE[name])


def tokens(n: int = T, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def load_hf(folder, attn: str = "eager"):
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn, output_loading_info=True
    )
    assert not any(info.values()), f"transformers did not load the weights cleanly: {info}"
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Parity with LlamaForCausalLM


@pytest.mark.parametrize("name", EXPORTABLE)
def test_logits_match_transformers(name, tmp_path):
    model = case_model(name)
    hf.export_hf(model, tmp_path)
    idx = tokens()
    with torch.no_grad():
        ours = model(
            idx
        )  # one forward pass: the dynamic scale comes from T in both implementations
        for attn in ("eager", "sdpa"):
            theirs = load_hf(tmp_path, attn)(idx).logits
            assert rel_err(ours, theirs) < TOL, (name, attn, rel_err(ours, theirs))


def test_parity_is_sensitive():
    """The parity test would catch a wrong variant, a wrong scale, or a wrong attention factor: each
    moves the logits by far more than TOL at this weight scale and length."""
    idx = tokens()
    with torch.no_grad():
        yarn = case_model("yarn")(idx)
        for other in (
            RopeConfig(),
            RopeConfig(type="ntk_by_parts", factor=4.0, original_context=L),
            RopeConfig(type="yarn", factor=4.5, original_context=L),
        ):
            assert rel_err(tiny_model(other, n_kv_head=2)(idx), yarn) > 100 * TOL, other
        dynamic = case_model("dynamic")
        # the length the scale is for matters
        assert rel_err(dynamic(idx), dynamic(idx, seq_len=2 * T)) > 100 * TOL
        longrope = case_model("longrope")
        # long factors, not short ones
        assert rel_err(longrope(idx), longrope(idx, seq_len=L)) > 100 * TOL


def test_config_json_per_variant(tmp_path):
    """The rope_parameters and max_position_embeddings each variant exports as (hf.py's table)."""

    def exported(name):
        return hf.hf_config(case_model(name).config)

    assert exported("default")["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    ntk = exported("ntk")["rope_parameters"]
    assert ntk["rope_type"] == "default" and ntk["rope_theta"] == pytest.approx(
        10000.0 * 4.0 ** (16 / 14)
    )
    dynamic = exported("dynamic")
    assert dynamic["max_position_embeddings"] == L  # transformers' L for this type
    assert dynamic["rope_parameters"] == {
        "rope_type": "dynamic",
        "factor": 2.0,
        "rope_theta": 10000.0,
    }
    by_parts = exported("ntk_by_parts")["rope_parameters"]
    assert by_parts["rope_type"] == "yarn" and by_parts["attention_factor"] == 1.0
    yarn = exported("yarn")
    assert yarn["max_position_embeddings"] == 4 * L
    assert yarn["rope_parameters"] == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": L,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": True,
        "attention_factor": 0.1 * math.log(4.0) + 1,
    }
    assert (
        yarn["num_key_value_heads"] == 2
        and yarn["head_dim"] == 16
        and yarn["intermediate_size"] == 192
    )
    assert yarn["tie_word_embeddings"] is True and yarn["torch_dtype"] == "float32"
    llama3 = exported("llama3")
    assert llama3["max_position_embeddings"] == 4 * L
    assert llama3["rope_parameters"]["original_max_position_embeddings"] == L
    longrope = exported("longrope")
    assert longrope["max_position_embeddings"] == 4 * L
    assert longrope["rope_parameters"] == {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": L,
        "short_factor": list(SHORT),
        "long_factor": list(LONG),
        "attention_factor": math.sqrt(1 + math.log(4.0) / math.log(L)),
    }


# --------------------------------------------------------------------------------------------------
# Round trip


def assert_same_weights(a: Transformer, b: Transformer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


ROUND_TRIP = {
    **EXPORTABLE,
    "dynamic_longer_block": dict(
        rope_cfg=RopeConfig(type="dynamic", factor=2.0, original_context=L), block_size=4 * L
    ),
    "explicit_defaults": dict(
        rope_cfg=RopeConfig(), n_kv_head=4, ffn_hidden=192
    ),  # = the defaults, given explicitly
    "odd_sizes": dict(
        rope_cfg=RopeConfig(type="linear", factor=2.5, base=500.0), ffn_hidden=100, norm_eps=1e-6
    ),
}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_export_import_is_identity(name, tmp_path):
    model = tiny_model(**ROUND_TRIP[name])
    hf.export_hf(model, tmp_path)
    back = hf.import_hf(tmp_path)
    assert back.config == model.config
    assert_same_weights(back, model)


def test_hf_resave_keeps_the_round_trip(tmp_path):
    """A folder loaded and saved again by transformers still imports to the same config and
    weights."""
    model = case_model("dynamic")
    hf.export_hf(model, tmp_path / "a")
    load_hf(tmp_path / "a").save_pretrained(tmp_path / "b")
    back = hf.import_hf(tmp_path / "b")
    assert back.config == model.config
    assert_same_weights(back, model)


def strip_record(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    del config[hf.RECORD_KEY]
    (folder / "config.json").write_text(json.dumps(config))
    return config


@pytest.mark.parametrize(
    "name", ["ntk", "dynamic", "ntk_by_parts", "yarn_mscale_untruncated", "longrope"]
)
def test_import_without_record_gives_the_same_logits(name, tmp_path):
    """A folder from elsewhere (no record) imports from the Llama fields alone: other names (or the
    attention factor written out), same function."""
    model = case_model(name)
    hf.export_hf(model, tmp_path)
    strip_record(tmp_path)
    back = hf.import_hf(tmp_path)
    assert back.config.rope.type == {
        "ntk": "default",
        "dynamic": "dynamic",
        "longrope": "longrope",
    }.get(name, "yarn")
    assert_same_weights(back, model)
    idx = tokens()
    with torch.no_grad():
        assert rel_err(back(idx), model(idx)) < 1e-6


def test_edited_config_json_wins_over_the_record(tmp_path):
    hf.export_hf(case_model("yarn"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"]["factor"] = 8.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hf.import_hf(tmp_path).config.rope.factor == 8.0


def test_legacy_rope_scaling_config(tmp_path):
    """transformers 4.x configs: rope_theta and rope_scaling at the top level, 'type' for the
    type."""
    model = case_model("linear")
    hf.export_hf(model, tmp_path)
    config = strip_record(tmp_path)
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {"type": params["rope_type"], "factor": params["factor"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hf.import_hf(tmp_path).config.rope == model.config.rope


def test_sharded_weights(tmp_path):
    model = case_model("yarn")
    hf.export_hf(model, tmp_path)
    tensors = safetensors_torch.load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in shards.items():
        safetensors_torch.save_file(
            {n: tensors[n] for n in part}, tmp_path / file, metadata={"format": "pt"}
        )
    weight_map = {n: file for file, part in shards.items() for n in part}
    (tmp_path / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_weights(hf.import_hf(tmp_path), model)
    idx = tokens()
    with torch.no_grad():  # transformers reads the same shards: the index is a real one
        assert rel_err(model(idx), load_hf(tmp_path)(idx).logits) < TOL
    other = tiny_model(
        EXPORTABLE["yarn"]["rope_cfg"], n_kv_head=2, seed=1
    )  # a single file wins, as in transformers
    hf.export_hf(other, tmp_path, force=True)
    assert_same_weights(hf.import_hf(tmp_path), other)


def test_export_dtype(tmp_path):
    model = case_model("yarn")
    config = hf.export_hf(model, tmp_path, dtype=torch.bfloat16)
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    tensors = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    back = hf.import_hf(tmp_path)  # imported into float32
    for name, p in back.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(
            p, model.state_dict()[name].bfloat16().float()
        ), name


def test_untied_head_equal_to_embedding_is_accepted(tmp_path):
    model = case_model("default")
    hf.export_hf(model, tmp_path)
    tensors = safetensors_torch.load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = strip_record(tmp_path)
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_same_weights(hf.import_hf(tmp_path), model)


# --------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "rope_cfg, match",
    [
        (
            RopeConfig(type="dynamic_yarn", factor=1.0, original_context=L),
            "no Hugging Face equivalent",
        ),
        (
            RopeConfig(type="yarn", factor=4.0, original_context=L, partial_rotary_factor=0.5),
            "partial_rotary_factor",
        ),
    ],
)
def test_export_refuses(rope_cfg, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        hf.export_hf(tiny_model(rope_cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_transformers_llama_cannot_express_partial_rotary():
    """Why partial rotary is refused: LlamaForCausalLM rotates the whole head for 'default' (the key
    is ignored) and fails on a shape mismatch for the scaled types."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    def config(**rope_parameters):
        return transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            rope_parameters=dict(rope_theta=1e4, **rope_parameters),
        )

    assert (
        LlamaRotaryEmbedding(
            config(rope_type="default", partial_rotary_factor=0.5)
        ).inv_freq.numel()
        == 8
    )  # 16/2
    with pytest.raises(RuntimeError):
        transformers.LlamaForCausalLM(
            config(rope_type="linear", factor=2.0, partial_rotary_factor=0.5)
        )(tokens(5, 1))


def test_export_refuses_a_non_empty_folder_unless_forced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        hf.export_hf(case_model("default"), tmp_path)
    hf.export_hf(case_model("default"), tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert_same_weights(hf.import_hf(tmp_path), case_model("default"))


def edit_config(folder: Path, **changes):
    config = strip_record(folder)
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, edit):
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    edit(tensors)
    safetensors_torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(model_type="mistral"), "model_type"),
        (dict(head_dim=32), "head_dim"),
        (
            dict(hidden_size=60, head_dim=None),
            "even",
        ),  # head_dim 15: rotary pairs need an even head
        (
            dict(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": list(SHORT),
                }
            ),
            "needs 'long_factor'",
        ),
        (
            dict(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 3,
                    "long_factor": list(LONG),
                }
            ),
            "short_factor has 3 numbers; rotary dim 16 has 8",
        ),
        (
            dict(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": list(SHORT),
                    "long_factor": [*LONG[:7], "4.0"],
                }
            ),
            r"'long_factor'\]\[7\] must be a finite number",
        ),
        (
            dict(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": list(SHORT),
                    "long_factor": [*LONG[:7], 0.0],
                }
            ),
            "long_factor must be a tuple of numbers > 0",
        ),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(num_hidden_layers="2"), "num_hidden_layers"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "factor"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings"),  # and no lm_head.weight
    ],
)
def test_import_refuses_config(changes, match, tmp_path):
    hf.export_hf(case_model("default"), tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        hf.import_hf(tmp_path)


def _untie(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1.0


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "lack 1 tensors.*up_proj"),
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}), "biases"),
        (_untie, "lm_head.weight differs"),
        (lambda t: t.update({"model.norm.weight": torch.ones(32)}), "model.norm.weight has shape"),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}),
            "floating-point",
        ),
    ],
)
def test_import_refuses_weights(edit, match, tmp_path):
    hf.export_hf(case_model("default"), tmp_path)
    edit_weights(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        hf.import_hf(tmp_path)


def test_import_refuses_missing_or_broken_files(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        hf.import_hf(tmp_path / "nowhere")
    hf.export_hf(case_model("default"), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        hf.import_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        hf.import_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: cannot read it as JSON"):
        hf.import_hf(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        hf.import_hf(tmp_path)


# --------------------------------------------------------------------------------------------------
# Command line


def save_ckpt(model: Transformer, path: Path):
    checkpoint.save({"model_config": model.config.to_dict(), "model": model.state_dict()}, path)


def test_cli_export_then_import(tmp_path):
    model = case_model("yarn")
    save_ckpt(model, tmp_path / "run" / "ckpt.pt")
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = subprocess.run(
        [
            sys.executable,
            "hf.py",
            "export",
            "--ckpt",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "hf_out"),
        ],
        **run,
    )
    assert out.returncode == 0, out.stderr
    assert "rope_type yarn" in out.stdout
    out = subprocess.run(
        [
            sys.executable,
            "hf.py",
            "import",
            "--hf_dir",
            str(tmp_path / "hf_out"),
            "--out",
            str(tmp_path / "imported" / "ckpt.pt"),
        ],
        **run,
    )
    assert out.returncode == 0, out.stderr
    back, state = checkpoint.load_model(tmp_path / "imported" / "ckpt.pt")
    assert back.config == model.config
    assert_same_weights(back, model)
    # an error: one line, exit status 2, no traceback
    save_ckpt(
        tiny_model(RopeConfig(type="dynamic_yarn", factor=1.0, original_context=L)),
        tmp_path / "dy.pt",
    )
    out = subprocess.run(
        [
            sys.executable,
            "hf.py",
            "export",
            "--ckpt",
            str(tmp_path / "dy.pt"),
            "--out",
            str(tmp_path / "dy_out"),
        ],
        **run,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "no Hugging Face equivalent" in out.stderr
    assert "Traceback" not in out.stderr


def test_export_needs_no_transformers():
    code = "import sys, hf; print('transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    "argv, match",
    [
        (["import", "--hf_dir", "{tmp}/nowhere", "--out", "{tmp}/x.pt"], "not a folder"),
        (["export", "--ckpt", "{tmp}/nowhere", "--out", "{tmp}/y"], "no checkpoint"),
        (["export", "--ckpt", "{tmp}/ntk.pt", "--out", "{tmp}/ckpt_is_here"], "not empty"),
    ],
)
def test_cli_errors(argv, match, tmp_path, capsys):
    save_ckpt(case_model("ntk"), tmp_path / "ntk.pt")
    (tmp_path / "ckpt_is_here").mkdir()
    (tmp_path / "ckpt_is_here" / "f").write_text("")
    assert flags.cli(hf.main, [a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err


# --------------------------------------------------------------------------------------------------
# What hf.py's docstring says about transformers' dynamic variants during generation, and the
# interleaved layout

# LlamaForCausalLM's KV-cache keyword: past_key_values, renamed cache in later transformers 5
# releases
CACHE_KEYWORD = (
    "cache"
    if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


def hf_cached(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """LlamaForCausalLM's logits for ids continuing the sequence held in cache (a DynamicCache,
    extended in place)."""
    return model(ids, use_cache=True, **{CACHE_KEYWORD: cache}).logits


def greedy_decode(model: Transformer, prompt: torch.Tensor, n: int, rule: str):
    """generate.generate with the KV cache, greedy: (prompt and the n tokens, each step's logits
    (B, V))."""
    logits = []

    def choose(step_logits):
        logits.append(step_logits)
        return step_logits.argmax(dim=-1)

    new = list(generate.generate(model, prompt, n, choose, rule))
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1), logits


def test_transformers_dynamic_ntk_is_stateful_and_differs_when_cached(tmp_path):
    """Single forward passes agree (test_logits_match_transformers). But transformers' dynamic
    frequencies only grow: a forward of 64 tokens after one of 100 keeps the scale for 100 (ours:
    seq_len 100); and decoding with its KV cache rotates each new token under a larger scale than
    the cached keys, so the last logits differ from its own full forward pass, while ours equal our
    full forward pass."""
    model = case_model("dynamic")
    hf.export_hf(model, tmp_path)
    idx = tokens(T, 1)
    with torch.no_grad():
        theirs = load_hf(tmp_path)
        full = theirs(idx).logits
        after_longer = theirs(idx[:, :64]).logits
        assert rel_err(after_longer, load_hf(tmp_path)(idx[:, :64]).logits) > 100 * TOL
        assert rel_err(after_longer, model(idx[:, :64], seq_len=T)) < TOL

        fresh, kv = load_hf(tmp_path), transformers.DynamicCache()
        hf_cached(fresh, idx[:, :-1], kv)
        step = hf_cached(fresh, idx[:, -1:], kv)[:, -1]
        assert rel_err(step, full[:, -1]) > 10 * TOL

        cache = model.new_cache(1, T)
        model(idx[:, :-1], cache=cache)
        assert rel_err(model(idx[:, -1:], cache=cache)[:, -1], model(idx)[:, -1]) < TOL


def test_transformers_longrope_cache_keeps_short_keys_past_L_ours_follows(tmp_path):
    """transformers picks longrope's factors in each call from its largest position. Decoding with
    its KV cache, the token at position L (the sequence passes L) is rotated with the long factors
    while the L keys before it stay cached under the short ones: its logits are exactly that mixture
    (our model made to compute it: a cache filled at l' = L, then one token at l' = L + 1), not
    transformers' own full forward pass. Single forward passes agree on both sides of L. Ours under
    the rule 'follow' re-prefills when l' passes L, so every step of model.decode equals the full
    forward pass of its prefix, ours and LlamaForCausalLM's."""
    model = case_model("longrope")
    hf.export_hf(model, tmp_path)
    theirs = load_hf(tmp_path)
    idx = tokens(L + 1, 1)
    with torch.no_grad():
        for n in (L, L + 1):  # the short factors, then the long ones
            assert rel_err(model(idx[:, :n]), theirs(idx[:, :n]).logits) < TOL, n

        kv = transformers.DynamicCache()
        hf_cached(theirs, idx[:, :L], kv)
        their_step = hf_cached(theirs, idx[:, L:], kv)[:, -1]
        assert rel_err(their_step, theirs(idx).logits[:, -1]) > 100 * TOL
        cache = model.new_cache(1, L + 1)
        model(idx[:, :L], cache=cache, seq_len=L)
        mixed = model(idx[:, L:], cache=cache, seq_len=L + 1)[:, -1]
        assert rel_err(their_step, mixed) < TOL

    prompt = idx[:, : L - 3]
    seq, logits = greedy_decode(
        model, prompt, 8, "follow"
    )  # predictions from 29 .. 36 tokens: across L = 32
    with torch.no_grad():
        for i, step in enumerate(logits):
            prefix = seq[:, : prompt.shape[1] + i]
            assert rel_err(step, model(prefix)[:, -1]) < 1e-6, i
            assert rel_err(step, theirs(prefix).logits[:, -1]) < TOL, i


def test_phi3_style_longrope_config_imports_as_transformers_reads_it(tmp_path):
    """Phi-3's config.json has original_max_position_embeddings at the top level and rope_scaling
    without a factor: transformers takes L from the top level (over one in rope_scaling) and s =
    max_position_embeddings / L. The import reads it the same way: the exported model's config back,
    and LlamaForCausalLM's logits at a length past the top-level L but within the other (where the
    two readings would differ)."""
    model = case_model("longrope")
    hf.export_hf(model, tmp_path)
    config = strip_record(tmp_path)
    params = config.pop("rope_parameters")
    config.update(
        rope_theta=params["rope_theta"],
        original_max_position_embeddings=L,
        rope_scaling={
            "type": "longrope",
            "short_factor": params["short_factor"],
            "long_factor": params["long_factor"],
            "original_max_position_embeddings": 2 * L,
        },
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    back = hf.import_hf(tmp_path)
    assert (
        back.config == model.config
    )  # factor 4 = 128 / 32, L = 32, no attention_factor: the same formula
    idx = tokens(3 * L // 2)
    with torch.no_grad():
        assert rel_err(back(idx), load_hf(tmp_path)(idx).logits) < TOL
        # past L: the long factors matter here
        assert rel_err(back(idx), back(idx, seq_len=L)) > 100 * TOL


def interleaved_rope(
    x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Meta's rotation: channels (2j, 2j+1) as the complex number x_2j + i x_2j+1,
    times e^(i m theta_j)."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    rotation = torch.polar(
        torch.ones(len(positions), len(inv_freq), dtype=torch.float64),
        positions.double()[:, None] * inv_freq.double()[None, :],
    )
    return torch.view_as_real(pairs * rotation).flatten(-2)


def test_interleaved_to_half_split_gives_meta_weights_the_same_scores():
    """A Meta-layout W_q / W_k with each head's output rows permuted by hf.interleaved_to_half_split
    and rotated in half-split pairs (rope.apply_rope) gives the same q.k scores as the interleaved
    rotation of the original weights, and the rotated vectors are the interleaved ones permuted."""
    torch.manual_seed(0)
    n_heads, head_dim, d_in, n = 4, 16, 32, 40
    w_q, w_k = torch.randn(n_heads * head_dim, d_in), torch.randn(n_heads * head_dim, d_in)
    x = torch.randn(n, d_in)
    freqs, _ = rope.frequencies(head_dim, RopeConfig(type="yarn", factor=4.0, original_context=L))
    positions = torch.arange(n)
    cos, sin = rope.cos_sin_table(freqs, 1.0, positions)

    def heads(w):  # (n, H*hd) -> (H, n, hd)
        return (x.double() @ w.double().T).reshape(n, n_heads, head_dim).transpose(0, 1)

    perm = hf.interleaved_to_half_split(head_dim)

    def half_split(w):  # each head's rows of W (H*hd, d_in) permuted
        return w.view(n_heads, head_dim, d_in)[:, perm].reshape(w.shape)

    q_meta, k_meta = (
        interleaved_rope(heads(w_q), freqs, positions),
        interleaved_rope(heads(w_k), freqs, positions),
    )
    q_ours, k_ours = (
        rope.apply_rope(heads(half_split(w_q)), cos, sin),
        rope.apply_rope(heads(half_split(w_k)), cos, sin),
    )
    assert torch.allclose(q_ours, q_meta[..., perm], atol=1e-5)
    scores_meta, scores_ours = q_meta @ k_meta.transpose(-1, -2), q_ours @ k_ours.transpose(-1, -2)
    assert torch.allclose(scores_ours, scores_meta, atol=1e-4, rtol=1e-5)
    # and without the permutation the half-split rotation of Meta weights is wrong
    q_wrong = rope.apply_rope(heads(w_q), cos, sin)
    assert not torch.allclose(
        q_wrong @ rope.apply_rope(heads(w_k), cos, sin).transpose(-1, -2), scores_meta, atol=1e-2
    )


def test_export_refuses_previous_token_embeddings(tmp_path):
    with pytest.raises(ValueError, match="prev_tokens"):
        hf.export_hf(tiny_model(RopeConfig(), prev_tokens=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Llama-family folders beyond what export writes: an untied head, Qwen2's q/k/v biases


def random_hf_model(kind: str, tmp_path: Path, **config):
    """A transformers model of that kind with random weights (q/k scaled up, biases non-zero),
    saved."""
    torch.manual_seed(3)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=L,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 1e4,
            "original_max_position_embeddings": L,
        },
        **config,
    )
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    model = cls[1](cls[0](**common)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(10.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0)
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize(
    "kind, config",
    [
        ("llama", dict(tie_word_embeddings=False)),
        ("qwen2", dict(tie_word_embeddings=False)),
        ("qwen2", dict(tie_word_embeddings=True)),
    ],
)
def test_untied_and_qwen2_folders_import_with_transformers_logits(kind, config, tmp_path):
    theirs = random_hf_model(kind, tmp_path, **config)
    ours = hf.import_hf(tmp_path)
    assert ours.config.qkv_bias == (kind == "qwen2")
    assert ours.config.tie_embeddings == config["tie_word_embeddings"]
    idx = tokens()
    with torch.no_grad():
        assert rel_err(ours(idx), theirs(idx).logits) < TOL
    if ours.config.qkv_bias:
        with pytest.raises(ValueError, match="q/k/v biases cannot be exported"):
            hf.export_hf(ours, tmp_path / "back")
    else:  # an untied head exports as one
        hf.export_hf(ours, tmp_path / "back")
        assert_same_weights(hf.import_hf(tmp_path / "back"), ours)


def test_qwen2_with_sliding_windows_is_refused(tmp_path):
    random_hf_model(
        "qwen2", tmp_path, use_sliding_window=True, sliding_window=16, max_window_layers=0
    )
    with pytest.raises(ValueError, match="sliding-window"):
        hf.import_hf(tmp_path)


def test_the_new_model_options_leave_the_default_model_as_it_was():
    default = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32))
    assert not any(k.endswith(".bias") for k in default.state_dict())
    assert default.lm_head.weight is default.tok_emb.weight
    both = Transformer(
        ModelConfig(
            vocab_size=64, n_layer=1, n_head=2, d_model=32, qkv_bias=True, tie_embeddings=False
        )
    )
    assert both.lm_head.weight is not both.tok_emb.weight
    assert torch.equal(both.blocks[0].attn.wqkv.bias, torch.zeros(3 * 32))
    assert both.num_params() == default.num_params() + 64 * 32 + 3 * 32
    with pytest.raises(ValueError, match="qkv_bias must be bool"):
        ModelConfig(qkv_bias="yes")
