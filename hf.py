"""Export a model to a Hugging Face Llama folder, import one back (or a GGUF file), and translate
RoPE configs to and from Hugging Face `rope_parameters` (from_hf, to_hf, hf_inv_freq). Only
`safetensors` is needed here, not transformers; a GGUF file needs the `gguf` package (gguf_io.py
reads it as a Llama folder's config and tensors).

    python hf.py export --ckpt out/yarn --out hf_out/           # config.json + model.safetensors
    python hf.py import --hf_dir hf_out/ --out out/imported/ckpt.pt
    python hf.py import --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2/ckpt.pt
    python hf.py export --gguf --ckpt out/yarn --out yarn.gguf   # for llama.cpp (docs/llama_cpp.md)

`LlamaForCausalLM.from_pretrained(folder)` computes the same logits: our half-split pairs are its
`rotate_half`. A variant without a Hugging Face type exports as an exact equivalent (to_hf);
dynamic_yarn, partial rotary and previous-token embeddings are refused. config.json also keeps our
ModelConfig (RECORD_KEY), which import trusts only if exporting it gives config.json's Llama fields
exactly (they cannot tell ntk from default). Import also takes an untied output head and Qwen2's
q/k/v biases (model_type qwen2, no sliding window); export writes Llama. A GGUF import also keeps
the model's tokenizer in the checkpoint.
"""

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import checkpoint
import flags
import gguf_io
import rope
from model import ModelConfig, Transformer
from rope import RopeConfig
from system import DTYPES, atomic_write, check_writable, dtype_name, read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# sharded checkpoints: {"weight_map": {tensor name: shard file}}
INDEX_FILE = "model.safetensors.index.json"
# our exact ModelConfig, kept in config.json for a lossless round trip
RECORD_KEY = "yarn_from_scratch"

# The config.json keys that define the network; import compares these when it decides to trust the
# record.
ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "rope_parameters",
)

# Names: our state_dict <-> Hugging Face Llama (our name, the Hugging Face names it holds): a
# stacked weight of ours is theirs concatenated along the rows
PER_LAYER_NAMES = (
    ("attn_norm.weight", ("input_layernorm.weight",)),
    (
        "attn.wqkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ),
    ("attn.wo.weight", ("self_attn.o_proj.weight",)),
    ("mlp_norm.weight", ("post_attention_layernorm.weight",)),
    # SwiGLU: down(silu(gate x) * up x)
    ("mlp.w13.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    ("mlp.w2.weight", ("mlp.down_proj.weight",)),
)


QKV_BIAS = (
    "attn.wqkv.bias",  # Qwen2's
    ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
)


def weight_names(n_layer: int, qkv_bias: bool = False, tied: bool = True):
    """(our name, Hugging Face names) of every tensor; a tied lm_head is the embedding: unlisted."""
    names = [("tok_emb.weight", ("model.embed_tokens.weight",))]
    per_layer = PER_LAYER_NAMES + ((QKV_BIAS,) if qkv_bias else ())
    for i in range(n_layer):
        names += [
            (f"blocks.{i}.{ours}", tuple(f"model.layers.{i}.{t}" for t in theirs))
            for ours, theirs in per_layer
        ]
    head = [] if tied else [("lm_head.weight", ("lm_head.weight",))]
    return names + [("norm.weight", ("model.norm.weight",))] + head


def config_names(config: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    return weight_names(config.n_layer, config.qkv_bias, config.tie_embeddings)


def row_split(config: ModelConfig, ours: str) -> list[int]:
    """Rows of each Hugging Face tensor inside our (possibly stacked) tensor `ours`."""
    if ours.endswith(("wqkv.weight", "wqkv.bias")):
        return [config.n_head * config.head_dim] + [config.kv_heads * config.head_dim] * 2
    return [config.hidden_dim] * 2 if ours.endswith("w13.weight") else [-1]


def hf_tensors(state: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state_dict as Hugging Face's Llama tensors (the stacked weights split)."""
    out = {}
    for ours, theirs in config_names(config):
        out.update(
            zip(
                theirs,
                state[ours].split(row_split(config, ours)) if len(theirs) > 1 else [state[ours]],
            )
        )
    return out


# RoPE configs, and ModelConfig -> config.json
HF_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def from_hf(rope_parameters: dict, max_position_embeddings: int) -> RopeConfig:
    """The RopeConfig of a Hugging Face `rope_parameters` dict (`rope_scaling` in older configs),
    reading every key transformers reads, with its defaults: rope_theta 10000; L =
    original_max_position_embeddings, default max_position_embeddings (the dynamic type always takes
    max_position_embeddings); a missing yarn or longrope factor is max_position_embeddings / L (for
    longrope at least 1: below 1 it only sets the attention factor to 1, as 1 does); falsy beta_fast
    / beta_slow are 32 / 1; truncate True."""
    if not isinstance(rope_parameters, dict):
        raise ValueError(f"rope_parameters must be a dict, got {type(rope_parameters).__name__}")
    p = rope_parameters
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in HF_TYPES:
        raise ValueError(
            f"rope_type {kind!r} is not supported; supported Hugging Face types: "
            f"{', '.join(HF_TYPES)}"
        )
    if not isinstance(max_position_embeddings, int) or not 0 < max_position_embeddings <= 2**40:
        raise ValueError(
            f"max_position_embeddings must be a positive int (at most 2^40), "
            f"got {max_position_embeddings!r}"
        )
    cfg = {
        "type": kind,
        "base": _number(p, "rope_theta", 10000.0),
        "partial_rotary_factor": _number(p, "partial_rotary_factor", 1.0),
    }
    if kind in ("linear", "dynamic", "llama3"):
        cfg["factor"] = _number(p, "factor")
    if kind == "dynamic":
        cfg["original_context"] = max_position_embeddings
    # the types transformers reads original_max_position_embeddings for
    if kind in ("yarn", "llama3", "longrope"):
        L = cfg["original_context"] = (
            p.get("original_max_position_embeddings") or max_position_embeddings
        )
        if not isinstance(L, int) or isinstance(L, bool):
            raise ValueError(f"original_max_position_embeddings must be an int, got {L!r}")
    if kind == "llama3":
        cfg.update(
            low_freq_factor=_number(p, "low_freq_factor"),
            high_freq_factor=_number(p, "high_freq_factor"),
        )
    if kind in ("yarn", "longrope"):
        derived = max_position_embeddings / L
        cfg["factor"] = _number(p, "factor", max(derived, 1.0) if kind == "longrope" else derived)
        cfg["attention_factor"] = _number(p, "attention_factor", None)
    if kind == "yarn":
        cfg.update(
            beta_fast=_number(p, "beta_fast", None) or 32.0,
            beta_slow=_number(p, "beta_slow", None) or 1.0,
            truncate=bool(p.get("truncate", True)),
            mscale=_number(p, "mscale", None),
            mscale_all_dim=_number(p, "mscale_all_dim", None),
        )
    if kind == "longrope":
        cfg.update(short_factor=_numbers(p, "short_factor"), long_factor=_numbers(p, "long_factor"))
    return RopeConfig(**cfg)


_REQUIRED = object()


def _number(p: dict, key: str, default=_REQUIRED):
    """p[key] as a float; default where it is absent or None (a ValueError naming the key if there
    is none)."""
    if p.get(key) is None:
        if default is _REQUIRED:
            raise ValueError(
                f"rope_parameters of type {p.get('rope_type', p.get('type'))!r} needs the key "
                f"{key!r}"
            )
        return default
    if not rope.is_number(p[key]):
        raise ValueError(f"rope_parameters[{key!r}] must be a finite number, got {p[key]!r}")
    return float(p[key])


def _numbers(p: dict, key: str) -> tuple[float, ...]:
    """p[key], a list of finite numbers (longrope's short_factor / long_factor), as floats."""
    values = p.get(key)
    if not isinstance(values, (list, tuple)):
        raise ValueError(
            f"rope_parameters of type 'longrope' needs {key!r}: a list of numbers, one per "
            f"frequency pair, got {values!r}"
        )
    for i, v in enumerate(values):
        if not rope.is_number(v):
            raise ValueError(f"rope_parameters[{key!r}][{i}] must be a finite number, got {v!r}")
    return tuple(float(v) for v in values)


def hf_inv_freq(
    rope_parameters: dict, head_dim: int, max_position_embeddings: int, seq_len: int | None = None
):
    """transformers' ROPE_INIT_FUNCTIONS for a rope_parameters dict, (inv_freq, attention_factor),
    computed here."""
    return rope.frequencies(head_dim, from_hf(rope_parameters, max_position_embeddings), seq_len)


def interleaved_to_half_split(dim: int) -> torch.Tensor:
    """The permutation p with x_half_split = x_interleaved[..., p]: Meta's pairs (2j, 2j+1)
    become (j, j + dim/2) (on the output rows of W_q and W_k it converts a Meta-layout checkpoint
    to ours)."""
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))


def to_hf(cfg: RopeConfig, head_dim: int) -> dict:
    """The `rope_parameters` under which transformers computes our frequencies and attention factor;
    a ValueError for dynamic_yarn, which transformers has no type for."""
    common = {"rope_theta": cfg.base}
    if cfg.partial_rotary_factor != 1.0:
        common["partial_rotary_factor"] = cfg.partial_rotary_factor
    scaled = {"factor": cfg.factor, "original_max_position_embeddings": cfg.original_context}
    if cfg.type == "default":
        return {"rope_type": "default", **common}
    if cfg.type == "linear":
        return {"rope_type": "linear", "factor": cfg.factor, **common}
    # paper Eq. 16: static NTK-aware scaling is plain RoPE with base b' = b * s^(|D|/(|D|-2))
    if cfg.type == "ntk":
        return {
            "rope_type": "default",
            **common,
            "rope_theta": rope.ntk_base(cfg.base, rope.rotary_dim(head_dim, cfg), cfg.factor),
        }
    if cfg.type == "dynamic":  # L travels as max_position_embeddings (hf_config)
        return {"rope_type": "dynamic", "factor": cfg.factor, **common}
    if cfg.type == "llama3":
        return {
            "rope_type": "llama3",
            **scaled,
            "low_freq_factor": cfg.low_freq_factor,
            "high_freq_factor": cfg.high_freq_factor,
            **common,
        }
    if cfg.type in ("yarn", "ntk_by_parts"):  # NTK-by-parts is YaRN's ramp without its temperature
        factor = 1.0 if cfg.type == "ntk_by_parts" else rope.yarn_attention_factor(cfg, cfg.factor)
        return {
            "rope_type": "yarn",
            **scaled,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
            "truncate": cfg.truncate,
            "attention_factor": factor,
            **common,
        }
    if cfg.type == "longrope":
        attention = rope.longrope_rope(rope.rotary_dim(head_dim, cfg), cfg)[1]
        return {
            "rope_type": "longrope",
            **scaled,
            "short_factor": list(cfg.short_factor),
            "long_factor": list(cfg.long_factor),
            "attention_factor": attention,
            **common,
        }
    raise ValueError(
        f"rope type {cfg.type!r} has no Hugging Face equivalent (it has {', '.join(HF_TYPES)}); "
        "extend with 'yarn', 'linear', 'dynamic', 'llama3' or 'longrope' to export, or keep using "
        "this model"
    )


def hf_config(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for LlamaForCausalLM (a plain dict; every key LlamaConfig reads that matters
    here)."""
    if config.prev_tokens:
        raise ValueError(
            f"prev_tokens={config.prev_tokens} (previous-token embeddings) cannot be exported: "
            "LlamaForCausalLM has no such input"
        )
    if config.qkv_bias:
        raise ValueError(
            "q/k/v biases cannot be exported: LlamaForCausalLM's attention_bias biases o_proj too"
        )
    if config.rope.partial_rotary_factor != 1.0:
        raise ValueError(
            f"rope partial_rotary_factor={config.rope.partial_rotary_factor} cannot be exported: "
            "Hugging Face's LlamaForCausalLM rotates the whole head (it ignores "
            "partial_rotary_factor for rope_type 'default' and fails on the others)"
        )
    rope_parameters = to_hf(config.rope, config.head_dim)
    # transformers takes the dynamic type's L from max_position_embeddings; the others read L from
    # rope_parameters
    max_positions = (
        config.rope.original_context if config.rope.type == "dynamic" else config.block_size
    )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "rope_parameters": rope_parameters,
        "use_cache": True,
        # the tokenizer's business; LlamaConfig would say 1 and 2
        "bos_token_id": None,
        "eos_token_id": None,
        # the names transformers 4.x and 5.x read
        "torch_dtype": dtype_name(dtype),
        "dtype": dtype_name(dtype),
        RECORD_KEY: {"model_config": config.to_dict()},
    }


# Export
def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ValueError(
            "the Hugging Face format needs the safetensors package: pip install safetensors"
        ) from None
    return safetensors.torch


def export_hf(
    model: Transformer, out_dir, dtype: torch.dtype | None = None, force: bool = False
) -> dict:
    """Write config.json and model.safetensors for LlamaForCausalLM into out_dir; returns the config
    dict. dtype: cast the weights (default: as they are). Refuses a non-empty out_dir unless force
    (which overwrites those two files and leaves any others)."""
    state = model.state_dict()
    dtype = dtype or state["tok_emb.weight"].dtype
    # raises for unexportable variants before touching the disk
    config_json = hf_config(model.config, dtype)
    tied = model.config.tie_embeddings
    if tied and not torch.equal(state["lm_head.weight"], state["tok_emb.weight"]):
        raise ValueError(
            "the model's lm_head differs from its embedding; this exporter writes tied weights only"
        )
    tensors = {
        k: t.detach().to("cpu", dtype).contiguous()
        for k, t in hf_tensors(state, model.config).items()
    }
    out = check_writable(out_dir, "--out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(
            f"--out {out} is not empty; choose a new folder, or pass --force to overwrite "
            f"{CONFIG_FILE} and {WEIGHTS_FILE} there"
        )
    out.mkdir(parents=True, exist_ok=True)
    st = _safetensors()
    # metadata format=pt: what transformers writes and expects of a PyTorch safetensors file
    atomic_write(out / WEIGHTS_FILE, st.save(tensors, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_FILE, json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    return config_json


# Import: config.json -> ModelConfig
def read_hf_config(hf_dir) -> dict:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ValueError(
            f"{hf_dir} is not a folder; pass the folder holding {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    path = hf_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: a Hugging Face model folder needs its {CONFIG_FILE}")
    fix = "save_pretrained (or `python hf.py export`) writes it: save the model again"
    return read_json(path, fix, {})


def _key(c: dict, key: str, kind: type, default=None):
    """c[key] (default where absent or null), checked to be of `kind`; ValueError naming the key."""
    value = c.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"config.json lacks the key {key!r}")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # JSON writes 1e-06 as a float but 10000 as an int
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ValueError(f"config.json {key!r} must be {kind.__name__}, got {value!r}")
    return value


def hf_rope_from_config(c: dict) -> RopeConfig:
    """The RopeConfig of a Llama config.json, read the way transformers reads it: `rope_parameters`,
    or the legacy `rope_scaling` + `rope_theta`; a top-level original_max_position_embeddings or
    partial_rotary_factor applies as transformers applies it (standardize_rope_params)."""
    # transformers 5 lets rope_scaling win
    params = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            f"config.json 'rope_parameters' must be one flat dict (per-layer-type RoPE is not "
            f"supported), got {params!r}"
        )
    params = dict(params)
    params.setdefault("rope_theta", c.get("rope_theta", 10000.0))
    if c.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", c["partial_rotary_factor"])
    kind = params.get("rope_type", params.get("type", "default"))
    if (
        kind in ("yarn", "llama3", "longrope")
        and c.get("original_max_position_embeddings") is not None
    ):
        params["original_max_position_embeddings"] = c["original_max_position_embeddings"]
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"config.json partial_rotary_factor={params['partial_rotary_factor']}: partial rotary "
            "is not something LlamaForCausalLM computes, so there is nothing exact to import"
        )
    try:
        return from_hf(params, _key(c, "max_position_embeddings", int, 2048))
    except ValueError as e:
        raise ValueError(f"config.json rope_parameters: {e}") from None


def model_config_from_hf(c: dict) -> ModelConfig:
    """Our ModelConfig for a Llama config.json: the recorded one if it exports to exactly these
    Llama fields (see the module docstring), else one derived from them. ValueError naming the key
    for what we lack."""
    kind = c.get("model_type", "llama")
    if kind not in ("llama", "qwen2"):
        raise ValueError(
            f"config.json 'model_type' is {kind!r}; only 'llama' and 'qwen2' models can be imported"
        )
    sliding = c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or ())
    if kind == "qwen2" and sliding:
        raise ValueError(
            "config.json sets sliding-window attention (use_sliding_window / "
            "layer_types); this model attends to the whole context"
        )
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ValueError(
                f"config.json {key!r} is true; this model's MLP and output projection "
                "have no biases (Qwen2's q/k/v biases import with model_type 'qwen2')"
            )
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.json 'hidden_act' is {c['hidden_act']!r}; this model's MLP is SwiGLU (silu) "
            "only"
        )
    d_model, n_head = _key(c, "hidden_size", int), _key(c, "num_attention_heads", int)
    head_dim = c.get("head_dim")
    if head_dim is not None and (n_head <= 0 or head_dim * n_head != d_model):
        raise ValueError(
            f"config.json 'head_dim' is {head_dim} but hidden_size / num_attention_heads = "
            f"{d_model} / {n_head}; this model needs head_dim * num_attention_heads == hidden_size"
        )
    n_kv_head = _key(c, "num_key_value_heads", int, n_head)
    intermediate = _key(c, "intermediate_size", int)
    try:
        derived = ModelConfig(
            vocab_size=_key(c, "vocab_size", int),
            n_layer=_key(c, "num_hidden_layers", int),
            n_head=n_head,
            n_kv_head=0 if n_kv_head == n_head else n_kv_head,
            d_model=d_model,
            # model.py's rule
            ffn_hidden=0 if intermediate == 64 * math.ceil(8 * d_model / 3 / 64) else intermediate,
            block_size=_key(c, "max_position_embeddings", int, 2048),
            norm_eps=_key(c, "rms_norm_eps", float, 1e-6),
            qkv_bias=kind == "qwen2",
            rope=hf_rope_from_config(c),
        )
    except ValueError as e:
        if str(e).startswith("config.json"):
            raise
        raise ValueError(
            f"config.json describes a model this repository cannot build: {e}"
        ) from None
    return _recorded_config(c) or derived


def _recorded_config(c: dict) -> ModelConfig | None:
    """The ModelConfig stored at export, if present, valid, and exporting it gives exactly c's Llama
    fields."""
    record = c.get(RECORD_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("model_config"), dict):
        return None
    try:
        recorded = ModelConfig.from_dict(record["model_config"])
        # JSON's view of it: what config.json would hold
        expected = json.loads(json.dumps(hf_config(recorded)))
    except (TypeError, ValueError):
        return None
    return recorded if all(expected[k] == c.get(k) for k in ARCHITECTURE_KEYS) else None


# Import: safetensors -> Transformer
def read_hf_weights(hf_dir) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists (the
    former wins, as in transformers)."""
    hf_dir = Path(hf_dir)
    st = _safetensors()
    if (hf_dir / WEIGHTS_FILE).is_file():
        files = [hf_dir / WEIGHTS_FILE]
    elif (hf_dir / INDEX_FILE).is_file():
        fix = "save_pretrained writes it with the shards it lists: save the model again"
        index = read_json(hf_dir / INDEX_FILE, fix, {"weight_map": {str: str}})
        files = [hf_dir / name for name in sorted(set(index["weight_map"].values()))]
    else:
        bins = any(hf_dir.glob("pytorch_model*.bin"))
        hint = (
            "; it has pytorch_model*.bin files: load and re-save them with safetensors first"
            if bins
            else ""
        )
        raise ValueError(f"{hf_dir} has no {WEIGHTS_FILE} (nor a sharded {INDEX_FILE}){hint}")
    tensors = {}
    for path in files:
        if not path.is_file():
            raise ValueError(f"weights file {path} is missing (named in {INDEX_FILE})")
        try:
            tensors.update(st.load_file(path))
        # safetensors raises its own SafetensorError for a truncated or foreign file
        except Exception as e:
            raise ValueError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: {e})"
            ) from None
    return tensors


def state_dict_from_hf(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    tied: bool,
    config: ModelConfig,
) -> dict:
    """Our state_dict from Hugging Face tensors, checked against `expected` (a state_dict of the
    model the config describes); ValueError naming missing, unexpected, misshapen or non-float
    tensors."""
    tensors = dict(tensors)
    state, missing = {}, []
    for ours, theirs in config_names(config):
        absent = [t for t in theirs if t not in tensors]
        if absent:
            missing += absent
            continue
        parts = [tensors.pop(t) for t in theirs]
        wanted = (
            expected[ours].split(row_split(config, ours)) if len(theirs) > 1 else [expected[ours]]
        )
        for name, tensor, want in zip(theirs, parts, wanted):
            if not tensor.is_floating_point():
                raise ValueError(
                    f"tensor {name} has dtype {tensor.dtype}; only floating-point weights can be "
                    "imported"
                )
            if tensor.shape != want.shape:
                raise ValueError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(want.shape)}"
                )
        state[ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
    if missing:
        raise ValueError(
            f"the weights lack {len(missing)} tensors the config needs, e.g. {missing[:3]}"
        )
    if config.tie_embeddings:  # an untied head was taken with the other weights
        head = tensors.pop("lm_head.weight", None)
        if head is not None and not same_head(head, state["tok_emb.weight"]):
            raise ValueError(
                "lm_head.weight differs from model.embed_tokens.weight, and "
                "tie_word_embeddings is true, so transformers would ignore it; set it "
                "to false to import the head as it is"
            )
        if head is None and not tied:
            raise ValueError(
                "config.json 'tie_word_embeddings' is false but there is no "
                "lm_head.weight; set it to true if the head is the embedding"
            )
        state["lm_head.weight"] = state["tok_emb.weight"]
    # old files store inv_freq
    unexpected = sorted(k for k in tensors if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        biases = any(k.endswith(".bias") for k in unexpected)
        hint = " (biases: this model has only Qwen2's q/k/v ones)" if biases else ""
        raise ValueError(
            f"the weights hold {len(unexpected)} tensors this model has no place for{hint}, "
            f"e.g. {unexpected[:3]}"
        )
    return state


def same_head(head: torch.Tensor, embedding: torch.Tensor) -> bool:
    return head.shape == embedding.shape and torch.equal(head.to(embedding.dtype), embedding)


def model_from_hf(config_json: dict, tensors: dict[str, torch.Tensor]) -> Transformer:
    """Our Transformer (float32, eval mode) from a Llama (or Qwen2) config.json and its tensors. The
    head is untied only where config.json says so and lm_head.weight differs from the embedding."""
    tied = bool(config_json.get("tie_word_embeddings", False))
    head, embedding = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    same = embedding is not None and head is not None and same_head(head, embedding)
    untied = not tied and head is not None and not same
    model = Transformer(replace(model_config_from_hf(config_json), tie_embeddings=not untied))
    model.load_state_dict(state_dict_from_hf(tensors, model.state_dict(), tied, model.config))
    return model.eval()


def import_hf(hf_dir) -> Transformer:
    """A Hugging Face Llama folder (config.json, safetensors) as our Transformer (float32, eval)."""
    return model_from_hf(read_hf_config(hf_dir), read_hf_weights(hf_dir))


def import_gguf(path) -> tuple[Transformer, gguf_io.GGUFModel]:
    """A Llama GGUF file as our Transformer (float32, eval mode), and what gguf_io read (its
    vocabulary and metadata); the tensors are dropped once loaded."""
    read = gguf_io.read(path)
    model = model_from_hf(read.config, read.tensors)
    return model, read._replace(tensors={})


def export_gguf(
    model: Transformer,
    tokenizer,
    out,
    dtype: torch.dtype | None = None,
    force: bool = False,
    name: str = "yarn-from-scratch",
) -> dict:
    """Write the model as one GGUF file for llama.cpp (gguf_io.write): F32, or F16 with dtype
    float16; its tokenizer (a name or an imported vocabulary) and its RoPE as llama.cpp's keys.
    Refuses, before writing, what a Llama in llama.cpp cannot compute; returns the rope keys."""
    c = model.config
    rope_keys = gguf_io.rope_metadata(c.rope, c.head_dim)
    hf_config(c)  # the refusals Llama has (previous-token embeddings, q/k/v biases, partial rotary)
    ftype = {None: "F32", torch.float32: "F32", torch.float16: "F16"}.get(dtype)
    if ftype is None:
        raise ValueError(
            f"--dtype {dtype_name(dtype)} cannot be written to GGUF here; use float32 or float16"
        )
    vocab = gguf_io.export_vocabulary(tokenizer)
    path = check_writable(out, "--out", folder=False)
    if path.exists() and not force:
        raise ValueError(f"--out {path} exists; choose a new file, or pass --force to overwrite it")
    state = model.state_dict()
    tensors = hf_tensors(state, c)
    if not c.tie_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"]
    hparams = {
        "context_length": c.block_size,
        "embedding_length": c.d_model,
        "block_count": c.n_layer,
        "feed_forward_length": c.hidden_dim,
        "attention.head_count": c.n_head,
        "attention.head_count_kv": c.kv_heads,
        "attention.layer_norm_rms_epsilon": float(c.norm_eps),
        "vocab_size": c.vocab_size,
    }
    gguf_io.write(path, hparams, tensors, vocab, rope_keys, name, ftype)
    return rope_keys


# Command line
@dataclass(frozen=True)
class ExportConfig:
    """`python hf.py export`'s settings.

    ckpt   a checkpoint file, or a run folder holding ckpt.pt
    out    the folder to write (new or empty, unless force); with gguf, the file
    dtype  cast the weights: float32, bfloat16 or float16 (default: as stored; GGUF: float32)
    force  overwrite config.json and model.safetensors in a non-empty out (or the GGUF file)
    gguf   write one GGUF file for llama.cpp instead, with the tokenizer and RoPE scaling
    """

    ckpt: str
    out: str
    dtype: str | None = None
    force: bool = False
    gguf: bool = False


@dataclass(frozen=True)
class ImportConfig:
    """`python hf.py import`'s settings.

    out     the checkpoint file to write, e.g. out/imported/ckpt.pt
    hf_dir  a folder with config.json and model.safetensors ...
    gguf    ... or a GGUF file (llama.cpp's format; its tokenizer comes with it)
    """

    out: str
    hf_dir: str | None = None
    gguf: str | None = None

    def __post_init__(self):
        if (self.hf_dir is None) == (self.gguf is None):
            raise ValueError(
                "give one of --hf_dir DIR (a Hugging Face folder) and --gguf FILE (a GGUF file)"
            )


def main(argv) -> None:
    commands = {"export": ExportConfig, "import": ImportConfig}
    if not argv or argv[0] not in commands:
        raise ValueError(
            "usage: python hf.py export --ckpt RUN --out DIR | python hf.py import "
            "(--hf_dir DIR | --gguf FILE) --out CKPT (`python hf.py export --help` "
            "lists the options)"
        )
    cls = commands[argv[0]]
    args = flags.build(
        cls, flags.parse(argv[1:], flags.flag_table((cls, "")), f"python hf.py {argv[0]}")
    )
    if cls is ExportConfig:
        if args.dtype is not None and args.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
        model, state = checkpoint.load_model(args.ckpt)
        if args.gguf:
            keys = export_gguf(
                model,
                state.get("tokenizer", "gpt2"),
                args.out,
                DTYPES.get(args.dtype),
                args.force,
                f"{Path(args.ckpt).name}",
            )
            print(
                f"exported {args.ckpt} to {args.out} (GGUF, {args.dtype or 'float32'}): "
                + ", ".join(f"{k} {v}" for k, v in keys.items())
            )
            r = model.config.rope
            if r.type == "yarn" and (r.beta_fast, r.beta_slow) != (32.0, 1.0):
                print(
                    f"note: llama.cpp takes YaRN's betas from its options, not the file: run it "
                    f"with --yarn-beta-fast {r.beta_fast:g} --yarn-beta-slow {r.beta_slow:g}"
                )
            return
        c = export_hf(model, args.out, dtype=DTYPES.get(args.dtype), force=args.force)
        print(
            f"exported {args.ckpt} (rope {model.config.rope.type}) to {args.out}: rope_type "
            f"{c['rope_parameters']['rope_type']}, max_position_embeddings "
            f"{c['max_position_embeddings']}, {model.num_params():,} parameters, {c['dtype']}"
        )
    elif args.hf_dir is not None:
        check_writable(args.out, "--out", folder=False)
        model = import_hf(args.hf_dir)
        checkpoint.save(
            {
                "model_config": model.config.to_dict(),
                "model": model.state_dict(),
                "provenance": {"imported_from_hf": str(args.hf_dir)},
            },
            args.out,
        )
        print(
            f"imported {args.hf_dir} to {args.out}: rope {model.config.rope.type}, "
            f"{model.num_params():,} parameters"
        )
    else:
        check_writable(args.out, "--out", folder=False)
        print(save_gguf_import(args.gguf, args.out))


def save_gguf_import(gguf, out) -> str:
    """Import a GGUF file and save it as a checkpoint at out, its vocabulary under "tokenizer";
    returns what was imported, in a line."""
    model, read = import_gguf(gguf)
    checkpoint.save(
        {
            "model_config": model.config.to_dict(),
            "model": model.state_dict(),
            "tokenizer": read.vocabulary,
            "provenance": {"imported_from_gguf": read.metadata},
        },
        out,
    )
    c, types = model.config, ", ".join(read.metadata["tensor_types"])
    return (
        f"imported {gguf} ({read.metadata['name']}; {types}) to {out}: {c.n_layer} layers, "
        f"{c.n_head} heads ({c.kv_heads} key-value) of {c.head_dim}, rope {c.rope.type} base "
        f"{c.rope.base:g}, "
        f"trained context {c.block_size}, {'tied' if c.tie_embeddings else 'untied'} head, "
        f"{model.num_params():,} parameters, tokenizer {read.vocabulary['name']} "
        f"({len(read.vocabulary['tokens']):,} ids)"
    )


if __name__ == "__main__":
    sys.exit(flags.cli(main))
