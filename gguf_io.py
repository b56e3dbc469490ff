"""GGUF files (llama.cpp's format) in: a Llama GGUF read as the Hugging Face config and tensors
that hf.py imports (`python hf.py import --gguf FILE --out CKPT`), and its vocabulary, from which
data.tokenizer builds a tiktoken tokenizer; and out (`python hf.py export --gguf`): write() puts
a model's tensors (F32 or F16), its tokenizer as byte-level BPE with merges, and its RoPE as the
keys llama.cpp reads (rope_metadata) into one file; docs/llama_cpp.md says what exports.

Reading needs the `gguf` package, the reader llama.cpp maintains (pip install gguf); it de-quantizes
every tensor type in SUPPORTED, and nothing here re-implements that. What llama.cpp's converter
changed is undone here, with two pieces an export to GGUF can use as they are:
  - names: GGUF's (token_embd.weight, blk.N.attn_q.weight, ...) <-> Hugging Face's: hf_name and
    gguf_name, from one table;
  - the row order of W_q and W_k: the converter stores each head's rows in Meta's interleaved pair
    order (2j, 2j+1), which llama.cpp rotates; Hugging Face and this project pair channel j with
    j + head_dim/2. permute goes ours -> GGUF, unpermute back (hf.interleaved_to_half_split is
    the same map, per head).
A GGUF has no config.json: the config comes from its metadata ({arch}.block_count,
.context_length, .rope.freq_base, ...); the head is tied when there is no output.weight; rope
scaling keys (none, linear, yarn) become rope_parameters. Every problem (not GGUF, truncated,
another architecture or tokenizer, a tensor this cannot place or de-quantize) is a ValueError
that names it.
"""

import itertools
import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import rope
from data.tokenizer import EOT, GPT2_PAT_STR, load_ranks
from rope import RopeConfig
from system import atomic_write

ARCHITECTURE = "llama"
# Tensor types the gguf package both writes and de-quantizes (the tests write each one): 32- and
# 16-bit floats, and blocks of 32 weights in 8, 5 or 4 bits with a scale (and a minimum: _1)
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")

# (GGUF name, Hugging Face name); in LAYER_NAMES, blk.N.<gguf> is model.layers.N.<hf>
GLOBAL_NAMES = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
LAYER_NAMES = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
)
_LAYER = re.compile(r"(?:blk|model\.layers)\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name (None: no Llama tensor has it)."""
    return _rename(gguf_name, 0, "model.layers")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face Llama tensor name (None: GGUF has none for it)."""
    return _rename(hf_name, 1, "blk")


def _rename(name: str, side: int, prefix: str) -> str | None:
    whole = {pair[side]: pair[1 - side] for pair in GLOBAL_NAMES}
    per_layer = {pair[side]: pair[1 - side] for pair in LAYER_NAMES}
    m = _LAYER.fullmatch(name)
    if m and m[2] in per_layer:
        return f"{prefix}.{m[1]}.{per_layer[m[2]]}"
    return whole.get(name)


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """W_q or W_k (rows: n_head heads of head_dim), or its bias, from half-split pairs
    (j, j + head_dim/2) to llama.cpp's interleaved ones: in each head, row 2j + i takes row
    j + i head_dim/2 (i = 0, 1)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of permute: llama.cpp's row order of W_q or W_k (or its bias) to half-split."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Reading
class GGUFModel(NamedTuple):
    config: dict  # a Llama config.json's fields, as hf.model_config_from_hf reads them
    tensors: dict[str, torch.Tensor]  # Hugging Face names, float32, W_q / W_k rows half-split
    vocabulary: dict  # data.tokenizer's vocabulary (read_vocabulary)
    metadata: dict  # what the file says of itself: name, file type, context, tensor types


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def open_reader(path):
    """A gguf.GGUFReader of path, every tensor's bytes present; a ValueError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass the path of a .gguf file")
    try:
        reader = _gguf().GGUFReader(path)
    except Exception as e:  # ValueError, IndexError, KeyError, ...: a foreign or cut file
        raise ValueError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may "
            "be truncated (download it again) or not GGUF at all"
        ) from None
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise ValueError(
                f"{path} is truncated: tensor {t.name} needs {t.n_bytes} bytes and "
                f"the file holds {t.data.nbytes} of them; download it again"
            )
    return reader


def field(reader, key: str, default=None):
    """The value of a metadata key (a number, a string, a list), or default where it is absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # bytes that are not UTF-8, a type the reader does not know
        raise ValueError(f"GGUF metadata {key} cannot be read ({type(e).__name__}: {e})") from None


def read(path) -> GGUFModel:
    """A Llama GGUF file as Hugging Face config and tensors (float32), and its vocabulary."""
    reader = open_reader(path)
    arch = field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(
            f"{path} holds a {arch!r} model; only the {ARCHITECTURE!r} architecture "
            "(Llama, SmolLM, TinyLlama, ...) can be imported"
        )
    config = llama_config(reader, path)
    tensors = read_tensors(reader, path, config)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    metadata = {
        "name": field(reader, "general.name"),
        "file": Path(path).name,
        "file_type": field(reader, "general.file_type"),
        "context_length": config["max_position_embeddings"],
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
    }
    return GGUFModel(config, tensors, read_vocabulary(reader, path), metadata)


def llama_config(reader, path) -> dict:
    """config.json's fields from the GGUF metadata of a Llama model."""

    def need(key: str, kind=int, default=None):
        value = field(reader, f"{ARCHITECTURE}.{key}", default)
        if value is None:
            raise ValueError(f"{path} lacks the metadata key {ARCHITECTURE}.{key}")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and value > 0):
            raise ValueError(
                f"{path}: metadata {ARCHITECTURE}.{key} must be a positive number, got {value!r}"
            )
        return kind(value)

    d_model, n_head = need("embedding_length"), need("attention.head_count")
    head_dim = d_model // n_head
    if need("rope.dimension_count", int, head_dim) != head_dim:
        raise ValueError(
            f"{path}: RoPE rotates {need('rope.dimension_count')} of each head's "
            f"{head_dim} channels; this model rotates whole heads"
        )
    vocab_size = need("vocab_size", int, len(field(reader, "tokenizer.ggml.tokens", [])) or None)
    return {
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": d_model,
        "num_attention_heads": n_head,
        "head_dim": head_dim,
        "num_key_value_heads": need("attention.head_count_kv", int, n_head),
        "num_hidden_layers": need("block_count"),
        "intermediate_size": need("feed_forward_length"),
        "max_position_embeddings": need("context_length"),
        # stored as float32: its shortest decimal (1e-05, not 9.99999974738e-06)
        "rms_norm_eps": float(str(np.float32(need("attention.layer_norm_rms_epsilon", float)))),
        "vocab_size": vocab_size,
        "rope_parameters": rope_parameters(reader, path, need("rope.freq_base", float, 1e4)),
    }


def rope_parameters(reader, path, base: float) -> dict:
    """Hugging Face rope_parameters from llama.cpp's {arch}.rope.scaling.* keys."""

    def key(name, default=None):
        return field(reader, f"{ARCHITECTURE}.rope.scaling.{name}", default)

    kind, factor, L = key("type", "none"), key("factor"), key("original_context_length")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": base}
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor), "rope_theta": base}
    if kind == "yarn" and factor and L:
        return {
            "rope_type": "yarn",
            "factor": float(factor),
            "rope_theta": base,
            "original_max_position_embeddings": int(L),
            "beta_fast": float(key("yarn_beta_fast", 32.0)),
            "beta_slow": float(key("yarn_beta_slow", 1.0)),
        }
    raise ValueError(
        f"{path}: rope scaling {kind!r} (factor {factor}) is not one this import "
        "reads: none, linear (with a factor), yarn (with a factor and "
        "original_context_length)"
    )


def read_tensors(reader, path, config: dict) -> dict[str, torch.Tensor]:
    """Every tensor de-quantized by the gguf package, under its Hugging Face name, with the rows of
    W_q and W_k unpermuted."""
    dequantize = _gguf().quants.dequantize
    heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"]}
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise ValueError(
                f"{path} holds the tensor {t.name!r}, which has no place in a Llama "
                "model (rope_freqs.weight: Llama 3's scaling, not supported)"
            )
        if t.tensor_type.name not in SUPPORTED:
            raise ValueError(
                f"{path}: tensor {t.name} is of type {t.tensor_type.name}; supported: "
                f"{', '.join(SUPPORTED)} (llama.cpp's llama-quantize converts)"
            )
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists the inner dim first
        if tuple(w.shape) != shape:
            raise ValueError(
                f"{path}: tensor {t.name} de-quantizes to {tuple(w.shape)}, its header says {shape}"
            )
        qk = re.search(r"\.attn_([qk])\.", t.name)
        tensors[name] = unpermute(w, heads[qk[1]]) if qk else w
    return tensors


# The vocabulary
def byte_decoder() -> dict[str, int]:
    """GPT-2's map from the characters a byte-level BPE vocabulary stores back to bytes: printable
    Latin-1 bytes stand for themselves, the other 68 bytes for characters 256, 257, ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + n): b for n, b in enumerate(others)}}


CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types of special tokens (1 is normal)


def read_vocabulary(reader, path) -> dict:
    """The vocabulary data.tokenizer builds a tiktoken Encoding from: {"name", "pat_str", "tokens"
    (bytes; index = token id = BPE rank), "special" (ids of special tokens, whose bytes are their
    text), "eot"}. Byte-level BPE ("gpt2") only, with ids in merge order (check_merge_order); the
    split pattern is GPT-2's; end-of-text is <|endoftext|> where the vocabulary has it, else EOS."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{path}: its tokenizer is {model!r}; only byte-level BPE ('gpt2') "
            "tokenizers can be built with tiktoken"
        )
    texts = field(reader, "tokenizer.ggml.tokens", [])
    types = field(reader, "tokenizer.ggml.token_type", [])
    if not texts or len(types) != len(texts):
        raise ValueError(f"{path}: its tokenizer has {len(texts)} tokens, {len(types)} types")
    special = [i for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED)]
    decoder, specials, tokens = byte_decoder(), set(special), []
    for i, text in enumerate(texts):
        if i in specials:
            tokens.append(text.encode("utf-8"))
        elif text and all(c in decoder for c in text):
            tokens.append(bytes(decoder[c] for c in text))
        else:
            raise ValueError(f"{path}: token {i} ({text!r}) is not byte-level BPE text")
    check_merge_order(path, texts, field(reader, "tokenizer.ggml.merges", []))
    eot = (
        texts.index("<|endoftext|>")
        if "<|endoftext|>" in texts
        else field(reader, "tokenizer.ggml.eos_token_id")
    )
    if not isinstance(eot, int) or not 0 <= eot < len(texts):
        raise ValueError(f"{path}: its tokenizer has no <|endoftext|> and no valid EOS ({eot!r})")
    name = field(reader, "general.basename") or Path(path).stem.split(".")[0]
    return {
        "name": str(name).lower(),
        "pat_str": GPT2_PAT_STR,
        "tokens": tokens,
        "special": special,
        "eot": eot,
    }


def check_merge_order(path, texts: list[str], merges: list[str]) -> None:
    """BPE applies merges in their listed order; tiktoken merges by the rank of the merged token
    (its id here). The two agree when the merged tokens' ids rise with the merges, as they do in a
    vocabulary numbered by BPE training; a ValueError otherwise."""
    ids, last = {t: i for i, t in enumerate(texts)}, -1
    for k, merge in enumerate(merges):
        token = ids.get(merge.replace(" ", "", 1), -1)
        if token <= last:
            raise ValueError(
                f"{path}: merge {k} ({merge!r}) makes token {token}, not above the "
                f"previous merge's {last}: its ids are not in merge order, which "
                "tiktoken needs"
            )
        last = token


# Writing (hf.py export --gguf)
FILE_TYPES = {"F32": 0, "F16": 1}  # general.file_type: llama.cpp's ALL_F32 and MOSTLY_F16


def rope_metadata(cfg: RopeConfig, dim: int, arch: str = ARCHITECTURE) -> dict:
    """llama.cpp's {arch}.rope.* keys for a RoPE it computes exactly as rope.py does (dim = |D|);
    a ValueError naming what it cannot express. llama.cpp's YaRN fixes the ramp's ends rounded out
    (truncate) and the temperature at sqrt(1/t) = 0.1 ln s + 1, ext_factor 1 where the file says
    yarn; it takes beta_fast and beta_slow from its options, not the file (docs/llama_cpp.md)."""
    keys = _gguf().Keys.Rope
    base = cfg.base
    if cfg.type == "ntk":  # NTK-aware (Eq. 16) is plain RoPE at b' = b s^(|D|/(|D|-2)): exact
        base = rope.ntk_base(cfg.base, dim, cfg.factor)
    meta = {keys.DIMENSION_COUNT: dim, keys.FREQ_BASE: base, keys.SCALING_TYPE: "none"}
    if cfg.type in ("default", "ntk"):
        return {k.format(arch=arch): v for k, v in meta.items()}
    if cfg.type not in ("linear", "yarn"):
        raise ValueError(
            f"rope type {cfg.type!r} cannot be exported to GGUF: llama.cpp computes "
            "default, ntk (as a changed base), linear and yarn only (no dynamic "
            "scaling, no LongRoPE or Llama 3 here); extend with one of those"
        )
    meta.update({keys.SCALING_TYPE: cfg.type, keys.SCALING_FACTOR: cfg.factor})
    if cfg.type == "yarn":
        if not cfg.truncate:
            raise ValueError(
                "rope truncate=false cannot be exported to GGUF: llama.cpp rounds "
                "the YaRN ramp's ends out to whole pairs (truncate=true)"
            )
        if rope.yarn_attention_factor(cfg, cfg.factor) != rope.yarn_mscale(cfg.factor):
            raise ValueError(
                "a YaRN attention factor other than 0.1 ln s + 1 cannot be exported "
                "to GGUF: llama.cpp fixes it there (drop attention_factor / mscale)"
            )
        meta.update(
            {
                keys.SCALING_ORIG_CTX_LEN: cfg.original_context,
                keys.SCALING_YARN_BETA_FAST: cfg.beta_fast,
                keys.SCALING_YARN_BETA_SLOW: cfg.beta_slow,
            }
        )
    return {k.format(arch=arch): v for k, v in meta.items()}


def export_vocabulary(tokenizer: str | dict) -> dict:
    """A tokenizer as a vocabulary (data.tokenizer's dict): an imported one as it is; GPT-2's from
    its ranks file; the byte tokenizer as 256 one-byte tokens, <|endoftext|> and an inert merge
    (id 257, a padding row), so that the ids of any text are the byte tokenizer's."""
    if isinstance(tokenizer, dict):
        if tokenizer.get("pat_str") != GPT2_PAT_STR:
            raise ValueError(
                "this tokenizer splits text with another pattern than GPT-2's, which "
                "a GGUF's byte-level BPE ('gpt2' pre-tokenizer) would not"
            )
        return tokenizer
    if tokenizer == "bytes":  # llama.cpp's BPE needs a merge: one of bytes UTF-8 never has (0xFF)
        return {
            "name": "bytes",
            "pat_str": GPT2_PAT_STR,
            "special": [256],
            "eot": 256,
            "tokens": [*(bytes([b]) for b in range(256)), b"<|endoftext|>", b"\xff\xff"],
        }
    if tokenizer != "gpt2":
        raise ValueError(
            f"tokenizer {tokenizer!r} is not one this export knows (gpt2, bytes, or "
            "an imported vocabulary)"
        )
    ranks = load_ranks()
    tokens = sorted(ranks, key=ranks.get)
    assert [ranks[t] for t in tokens] == list(range(EOT))
    return {
        "name": "gpt2",
        "pat_str": GPT2_PAT_STR,
        "tokens": tokens + [b"<|endoftext|>"],
        "special": [EOT],
        "eot": EOT,
    }


def bpe_merges(tokens: list[bytes], special) -> list[tuple[bytes, bytes]]:
    """The merges of a byte-level BPE vocabulary whose ids are its ranks, in order: the merge that
    makes token i joins the two parts that BPE reaches on its bytes with the tokens ranked below i
    (tiktoken keeps ranks, llama.cpp wants merges)."""
    ranks = {t: i for i, t in enumerate(tokens) if i not in special}
    merges = []
    for i, t in enumerate(tokens):
        if i in special or len(t) == 1:
            continue
        parts = [t[j : j + 1] for j in range(len(t))]
        while len(parts) > 2:
            rank, j = min(
                (ranks.get(a + b, math.inf), j)
                for j, (a, b) in enumerate(itertools.pairwise(parts))
            )
            if rank >= i:
                break
            parts[j : j + 2] = [parts[j] + parts[j + 1]]
        if len(parts) != 2 or not all(ranks.get(p, i) < i for p in parts):
            raise ValueError(
                f"token {i} ({t!r}) is not made by merging two tokens ranked below "
                "it: the vocabulary is not a byte-level BPE that llama.cpp can read"
            )
        merges.append(tuple(parts))
    return merges


def add_vocabulary(w, vocab: dict, n_vocab: int) -> None:
    """tokenizer.ggml.*: byte-level BPE ('gpt2'), special tokens as control tokens (their text),
    rows past the vocabulary (a padded embedding) as control tokens <|pad_N|>."""
    tokens, special = vocab["tokens"], set(vocab["special"])
    if len(tokens) > n_vocab:
        raise ValueError(
            f"the tokenizer has {len(tokens)} ids in GGUF, the model {n_vocab} "
            "rows (a byte model needs vocab_size 258 or more); pad its vocabulary"
        )
    encoder = {b: c for c, b in byte_decoder().items()}
    texts = [
        t.decode("utf-8") if i in special else "".join(encoder[b] for b in t)
        for i, t in enumerate(tokens)
    ]
    texts += [f"<|pad_{i}|>" for i in range(len(tokens), n_vocab)]
    types = [CONTROL if i in special or i >= len(tokens) else 1 for i in range(n_vocab)]
    merges = bpe_merges(tokens, special)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # llama.cpp's name of GPT-2's split, which data.tokenizer uses
    w.add_token_list(texts)
    w.add_token_types(types)
    w.add_token_merges([" ".join("".join(encoder[b] for b in p) for p in m) for m in merges])
    w.add_bos_token_id(vocab["eot"])  # GPT-2's way: <|endoftext|> begins and ends; no BOS added
    w.add_eos_token_id(vocab["eot"])
    w.add_add_bos_token(False)


def write(
    path,
    hparams: dict,
    tensors: dict[str, torch.Tensor],
    vocab: dict,
    rope_keys: dict,
    name: str,
    ftype: str = "F32",
) -> None:
    """One GGUF file at path, written atomically: hparams ({arch}.* keys without the prefix:
    context_length, ...), Hugging Face-named tensors (W_q, W_k in half-split rows, permuted here;
    2-D ones in ftype, the norms F32 as llama.cpp keeps them), the vocabulary and the rope keys."""
    gguf = _gguf()
    w = gguf.GGUFWriter(None, ARCHITECTURE)
    w.add_name(name)
    w.add_basename(vocab["name"])
    w.add_file_type(FILE_TYPES[ftype])
    for key, value in {
        **{f"{ARCHITECTURE}.{k}": v for k, v in hparams.items()},
        **rope_keys,
    }.items():
        kind = {str: "STRING", int: "UINT32", float: "FLOAT32"}[type(value)]
        w.add_key_value(key, value, gguf.GGUFValueType[kind])
    add_vocabulary(w, vocab, hparams["vocab_size"])
    heads = {"q": hparams["attention.head_count"], "k": hparams["attention.head_count_kv"]}
    for hf, t in tensors.items():
        qk = re.search(r"self_attn\.([qk])_proj", hf)
        t = (permute(t, heads[qk[1]]) if qk else t).detach().float().cpu()
        kind = ftype if t.dim() == 2 else "F32"
        w.add_tensor(gguf_name(hf), t.numpy().astype(np.float16 if kind == "F16" else np.float32))

    def write_to(f):
        w.fout, w.state = [f], gguf.WriterState.EMPTY  # the writer's own file is atomic_write's
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()

    atomic_write(path, write_to)
