"""A tiny Llama GGUF written with the gguf package's writer, as llama.cpp's converter writes one:
random weights (quantized ones included), the rows of W_q and W_k permuted into llama.cpp's order,
and a small byte-level BPE vocabulary trained here on real text. Used by test_gguf.py (against
transformers' GGUF loading) and test_pretrained.py (the smollm2 presets' stages, in seconds)."""

import ast
import re
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<filename>")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAINING_TEXT = STDLIB / "json" / "decoder.py"


def prose() -> str:
    """English prose that every Python has: pydoc's help topics (pydoc_data/topics.py), joined."""
    tree = ast.parse((STDLIB / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    topics = next(n.value for n in tree.body if isinstance(n, ast.Assign))
    return "\n\n".join(ast.literal_eval(topics).values())


# (GGUF name, tensor type) of the weights, per layer: every type hf.py's import reads
LAYER_TYPES = {
    "attn_q": "Q8_0",
    "attn_k": "Q4_0",
    "attn_v": "Q4_1",
    "attn_output": "F16",
    "ffn_gate": "Q5_0",
    "ffn_up": "Q5_1",
    "ffn_down": "BF16",
}


def byte_encoder() -> dict[int, str]:
    """GPT-2's bytes -> printable characters (the inverse of gguf_io.byte_decoder), written out
    again here so that the test does not take the code under test's word for it."""
    keep = [*range(33, 127), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Merges learned by byte-level BPE on text: the most frequent adjacent pair each time."""
    enc = byte_encoder()
    chunks = re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", text)
    words = Counter(tuple(enc[b] for b in c.encode("utf-8")) for c in chunks)
    merges, made = [], set(enc.values())
    while len(merges) < n_merges:
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        ranked = sorted(((-n, p) for p, n in pairs.items() if p[0] + p[1] not in made))
        if not ranked:
            break
        a, b = ranked[0][1]
        merges.append((a, b))
        made.add(a + b)
        words = Counter({_merge(w, a, b): n for w, n in words.items()})
    return merges


def _merge(word: tuple, a: str, b: str) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of W_q / W_k rows (from HF's half-split)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write(
    path,
    n_layer=2,
    d_model=64,
    n_head=4,
    n_kv_head=2,
    ffn=128,
    context=64,
    base=10000.0,
    n_merges=60,
    seed=0,
    tied=True,
    arch="llama",
    types=None,
    extra=None,
    qk_scale=0.3,
    tokenizer="gpt2",
    merges_reversed=False,
):
    """Write the GGUF; returns the Hugging Face-layout weights it holds before quantization. types:
    {gguf layer tensor kind: type name} (default LAYER_TYPES); extra(writer) adds to the file;
    tokenizer: tokenizer.ggml.model; merges_reversed lists the merges in the wrong order."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    merges = train_bpe(TRAINING_TEXT.read_text(encoding="utf-8"), n_merges)
    tokens = [*SPECIALS, *byte_encoder().values(), *(a + b for a, b in merges)]
    kinds = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    V, head_dim = len(tokens), d_model // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("Tiny test model")
    w.add_basename("tiny")
    w.add_context_length(context)
    w.add_embedding_length(d_model)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv_head)
    w.add_rope_freq_base(base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(V)
    w.add_tokenizer_model(tokenizer)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(kinds)
    w.add_token_merges([f"{a} {b}" for a, b in (merges[::-1] if merges_reversed else merges)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    weights, types = {}, {**LAYER_TYPES, **(types or {})}

    def tensor(name, shape, kind="F32", std=0.05, hf=None, heads=None):
        x = (rng.standard_normal(shape) * std).astype(np.float32)
        if name.endswith("norm.weight"):
            x = 1.0 + x
        weights[hf] = x
        stored = permute(x, heads) if heads else x
        if kind == "F64":  # a type the gguf package reads but does not de-quantize
            w.add_tensor(name, stored.astype(np.float64))
            return
        qtype = gguf.GGMLQuantizationType[kind]
        w.add_tensor(name, quantize(stored, qtype), raw_dtype=qtype)

    tensor("token_embd.weight", (V, d_model), "Q8_0", 0.5, "model.embed_tokens.weight")
    for i in range(n_layer):
        hf = f"model.layers.{i}."
        tensor(f"blk.{i}.attn_norm.weight", (d_model,), hf=hf + "input_layernorm.weight")
        tensor(
            f"blk.{i}.attn_q.weight",
            (n_head * head_dim, d_model),
            types["attn_q"],
            qk_scale,
            hf + "self_attn.q_proj.weight",
            n_head,
        )
        tensor(
            f"blk.{i}.attn_k.weight",
            (n_kv_head * head_dim, d_model),
            types["attn_k"],
            qk_scale,
            hf + "self_attn.k_proj.weight",
            n_kv_head,
        )
        tensor(
            f"blk.{i}.attn_v.weight",
            (n_kv_head * head_dim, d_model),
            types["attn_v"],
            hf=hf + "self_attn.v_proj.weight",
        )
        tensor(
            f"blk.{i}.attn_output.weight",
            (d_model, n_head * head_dim),
            types["attn_output"],
            hf=hf + "self_attn.o_proj.weight",
        )
        tensor(f"blk.{i}.ffn_norm.weight", (d_model,), hf=hf + "post_attention_layernorm.weight")
        for kind, name, shape in (
            ("ffn_gate", "gate_proj", (ffn, d_model)),
            ("ffn_up", "up_proj", (ffn, d_model)),
            ("ffn_down", "down_proj", (d_model, ffn)),
        ):
            tensor(f"blk.{i}.{kind}.weight", shape, types[kind], hf=f"{hf}mlp.{name}.weight")
    tensor("output_norm.weight", (d_model,), hf="model.norm.weight")
    if not tied:
        tensor("output.weight", (V, d_model), "Q4_1", 0.5, "lm_head.weight")
    if extra:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights
