"""Tests for model.py: the decoder that carries the RoPE variants of the YaRN paper (Peng et al.,
arXiv 2309.00071).

Tiny models (vocab 97, d_model 32, 4 heads of 8, 1-2 layers, pretraining context L = 16), CPU,
float64 wherever a result is compared with a reference. Rope base 100 rather than 10000 so that
every pair turns noticeably inside a few dozen positions and a wrong rotation shows. Weights are
redrawn at std 1/sqrt(fan_in) (`sharp`) where positions must matter: at the init's std 0.02
attention is nearly uniform and RoPE changes hardly reach the logits.

The groups:
  1 SDPA parity with a float64 reference (YaRN temperature included), every available backend
  2 causality                                  6 config validation
  3 KV-cache decoding = the full pass          7 tied head, loss, training steps
  4 dynamic variants scale with seq_len        8 generate
  5 set_rope and the fp32 rotary tables        9 flops_per_token and num_params
                                              10 compiled decoding = the full pass
                                                 (torch.compile, once per module)
"""

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(REPO))

import rope  # noqa: E402
import generate  # noqa: E402
from generate import RULES  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from rope import DYNAMIC_VARIANTS, VARIANTS, RopeConfig  # noqa: E402

V = 97  # vocab
L = 16  # original (pretraining) context and block size of every tiny model
S = 4.0  # the scale of the static extended variants
BASE = 100.0
STATIC_VARIANTS = tuple(v for v in VARIANTS if v not in DYNAMIC_VARIANTS)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# --------------------------------------------------------------------------------------------------
# Helpers


def longrope_factors(pairs: int, factor: float) -> dict:
    """LongRoPE divisors of the shape its search finds: near 1 for the fast pairs, rising to s for
    the slowest; the short ones milder."""
    return {
        "short_factor": tuple(1.0 + 0.1 * d for d in range(pairs)),
        "long_factor": tuple(1.0 + (factor - 1.0) * (d + 1) / pairs for d in range(pairs)),
    }


def rope_config(variant: str, factor: float = S, pairs: int = 4, **kw) -> RopeConfig:
    """Variant `variant` extending L = 16 by `factor`; the dynamic ones with factor 1 (plain RoPE up
    to L), except LongRoPE (whose factor only sets its attention factor). pairs: |D|/2, for
    LongRoPE's per-pair divisors."""
    kw.setdefault("base", BASE)
    if variant == "default":
        return RopeConfig(**kw)
    if variant in ("linear", "ntk"):
        return RopeConfig(type=variant, factor=factor, **kw)
    if variant == "longrope":
        return RopeConfig(
            type=variant, factor=factor, original_context=L, **longrope_factors(pairs, factor), **kw
        )
    if variant in DYNAMIC_VARIANTS:
        return RopeConfig(type=variant, factor=1.0, original_context=L, **kw)
    return RopeConfig(type=variant, factor=factor, original_context=L, **kw)


def model_config(
    variant="default", n_layer=2, n_head=4, n_kv_head=0, d_model=32, **rope_kw
) -> ModelConfig:
    pairs = int(d_model // n_head * rope_kw.get("partial_rotary_factor", 1.0)) // 2
    return ModelConfig(
        vocab_size=V,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_model=d_model,
        block_size=L,
        rope=rope_config(variant, pairs=pairs, **rope_kw),
    )


def make_model(variant="default", seed=0, dtype=torch.float64, sharp=True, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(model_config(variant, **kw))
    if sharp:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, p.shape[1] ** -0.5)
    return model.to(dtype).eval()


def tokens(B, T, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def sample_tokens(
    model,
    idx,
    n,
    temperature=1.0,
    top_k=None,
    generator=None,
    vocab_limit=None,
    rule="follow",
    stop_token=None,
):
    """generate.generate choosing with generate.sampler: the new tokens (B,), one by one."""
    choose = generate.sampler(temperature, top_k, generator, vocab_limit)
    return generate.generate(model, idx, n, choose, rule, stop_token=stop_token)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add synchronization, which costs 10-30x on a
    busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_tables(model: Transformer, length: int, seq_len=None):
    """The cos/sin tables of the model's variant for positions 0..length-1, from rope.py
    directly."""
    freqs, factor = rope.frequencies(model.config.head_dim, model.config.rope, seq_len)
    return rope.cos_sin_table(freqs, factor, torch.arange(length, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# 1. SDPA parity: the attention module equals softmax(q k^T / sqrt(hd) / t + causal mask) v in
#    float64


def rotate_reference(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate_half form, float64: x * cos + rotate_half(x) * sin on the first
    2*angles.shape[-1] channels (half-split pairs j, j + |D|/2), the rest passed through. angles (T,
    |D|/2)."""
    half = angles.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1)
    rotate_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotate_half * sin, rest), dim=-1)


def yarn_inv_t(config: ModelConfig) -> float:
    """1/t = (0.1 ln s + 1)^2, the paper's Eq. 22 squared (no attention_factor / mscale overrides
    here)."""
    return (0.1 * math.log(config.rope.factor) + 1.0) ** 2


def attention_weights(attn, config: ModelConfig):
    """W_q, W_k, W_v, W_o of an Attention module in float64 on the CPU (W_q, W_k, W_v are stacked in
    wqkv)."""
    sizes = [config.n_head * config.head_dim] + [config.kv_heads * config.head_dim] * 2
    wq, wk, wv = attn.wqkv.weight.detach().double().cpu().split(sizes)
    return wq, wk, wv, attn.wo.weight.detach().double().cpu()


def reference_attention(
    attn, x: torch.Tensor, config: ModelConfig, inv_t: float | None = None
) -> torch.Tensor:
    """The module's output recomputed from its weights in float64. The temperature multiplies the
    whole logit, as the paper writes it (softmax(q^T k / (t sqrt(|D|))), default 1/t = yarn_inv_t),
    not folded into the rotation; only the frequencies come from rope.py."""
    x = x.detach().double().cpu()
    wq, wk, wv, wo = attention_weights(attn, config)
    B, T, _ = x.shape
    H, H_kv, hd = config.n_head, config.kv_heads, config.head_dim
    q = (x @ wq.T).view(B, T, H, hd).transpose(1, 2)
    k = (x @ wk.T).view(B, T, H_kv, hd).transpose(1, 2)
    v = (x @ wv.T).view(B, T, H_kv, hd).transpose(1, 2)
    freqs, _ = rope.frequencies(hd, config.rope)  # the attention factor deliberately dropped
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs.double()[None, :]
    q, k = rotate_reference(q, angles), rotate_reference(k, angles)
    k = k.repeat_interleave(H // H_kv, dim=1)  # query head h reads kv head h // (H / H_kv)
    v = v.repeat_interleave(H // H_kv, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd)
    logits = logits * (yarn_inv_t(config) if inv_t is None else inv_t)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    logits = logits.masked_fill(future, float("-inf"))
    y = logits.softmax(dim=-1) @ v
    return y.transpose(1, 2).reshape(B, T, H * hd) @ wo.T


BACKENDS = (
    SDPBackend.MATH,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
)
NOT_AVAILABLE = ("No available kernel", "No viable backend")


def under_each_backend(fn) -> dict:
    """{backend name: fn()} for every SDPA backend that has a kernel for these inputs."""
    results = {}
    for backend in BACKENDS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the "why this kernel cannot run" warnings
                with sdpa_kernel(backend):
                    results[backend.name] = fn()
        except RuntimeError as e:
            # a cuDNN graph that fails to build for these small shapes is cuDNN's limit, not a wrong
            # answer
            cudnn_refused = backend == SDPBackend.CUDNN_ATTENTION and "cudnn" in str(e).lower()
            if not cudnn_refused and not any(m in str(e) for m in NOT_AVAILABLE):
                raise
    return results


def attention_outputs(model, x, tf32=False) -> dict:
    """{backend: the first block's attention output for x (positions 0..T-1, l' = T)}, every
    available backend."""
    attn, T = model.blocks[0].attn, x.shape[1]

    def run():
        with torch.no_grad():
            cos, sin = model.rotary(0, T, T)
            return attn(x, cos, sin)

    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        outputs = under_each_backend(run)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    assert "MATH" in outputs, "the math backend runs everywhere"
    return outputs


def random_input(model, T=24, device="cpu", dtype=torch.float32):
    x = torch.randn(2, T, model.config.d_model, generator=torch.Generator().manual_seed(1))
    return x.to(device, dtype)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize(
    "device, dtype, tol",
    [
        ("cpu", torch.float32, 1e-5),
        ("cpu", torch.bfloat16, 2e-2),
        pytest.param("cuda", torch.float32, 1e-5, marks=CUDA),
        pytest.param("cuda", torch.bfloat16, 2e-2, marks=CUDA),
    ],
)
def test_attention_equals_float64_reference_with_yarn_temperature(device, dtype, tol, n_kv_head):
    s = 8.0  # 1/t = (0.1 ln 8 + 1)^2 = 1.46
    model = make_model("yarn", n_kv_head=n_kv_head, factor=s, dtype=dtype).to(device)
    x = random_input(model, T=24, device=device, dtype=dtype)  # T past L = 16
    attn = model.blocks[0].attn
    expected = reference_attention(attn, x, model.config)
    without_temperature = reference_attention(attn, x, model.config, inv_t=1.0)
    assert (
        max_diff(expected, without_temperature) > 20 * tol
    )  # the temperature matters for these weights
    outputs = attention_outputs(model, x)
    if device == "cuda" and (dtype == torch.bfloat16 or n_kv_head == model.config.n_head):
        # measured on an H200, torch 2.11: fp32 with grouped-query heads has only the math kernel
        # (flash and cuDNN take half precision, the efficient kernel no enable_gqa); every other
        # case has a fused one
        assert set(outputs) - {"MATH"}, (
            "on CUDA a fused kernel (flash, efficient or cuDNN) should run"
        )
    for name, out in outputs.items():
        assert out.dtype == dtype and out.shape == expected.shape
        torch.testing.assert_close(
            out.double().cpu(),
            expected,
            atol=tol,
            rtol=tol,
            msg=lambda m, name=name: f"backend {name}: {m}",
        )
        assert not torch.allclose(out.double().cpu(), without_temperature, atol=tol, rtol=tol), (
            f"backend {name}: the output also matches attention without the YaRN temperature"
        )


@pytest.mark.parametrize("variant", ["default", "ntk_by_parts", "yarn"])
def test_partial_rotary_attention_equals_reference(variant):
    """|D| = head_dim / 2: channels 4..7 of each head pass through unrotated. yarn with
    attention_factor 1 (no temperature) so that only the rotation and pass-through are under test
    here; see the next test."""
    kw = dict(attention_factor=1.0) if variant == "yarn" else {}
    model = make_model(variant, n_kv_head=2, partial_rotary_factor=0.5, dtype=torch.float32, **kw)
    x = random_input(model)
    expected = reference_attention(model.blocks[0].attn, x, model.config, inv_t=1.0)
    for name, out in attention_outputs(model, x).items():
        torch.testing.assert_close(
            out.double(),
            expected,
            atol=1e-5,
            rtol=1e-5,
            msg=lambda m, name=name: f"backend {name}: {m}",
        )


def test_yarn_temperature_with_partial_rotary_scales_the_rotated_share():
    """With partial rotary the attention factor, folded into cos and sin, multiplies only the
    rotated channels: their share of q.k gets 1/t and the pass-through channels' share keeps
    temperature 1. This is what transformers' partial-rotary models (Phi, GPT-NeoX) compute;
    rope.apply_rope documents it. The paper's whole-logit temperature is a different function, and
    this test tells them apart."""
    model = make_model("yarn", factor=8.0, partial_rotary_factor=0.5, dtype=torch.float32)
    attn, config = model.blocks[0].attn, model.config
    x = random_input(model)
    xd = x.detach().double()
    wq, wk, wv, wo = attention_weights(attn, config)
    B, T, _ = x.shape
    H, H_kv, hd = config.n_head, config.kv_heads, config.head_dim
    q = (xd @ wq.T).view(B, T, H, hd).transpose(1, 2)
    k = (xd @ wk.T).view(B, T, H_kv, hd).transpose(1, 2).repeat_interleave(H // H_kv, dim=1)
    v = (xd @ wv.T).view(B, T, H_kv, hd).transpose(1, 2).repeat_interleave(H // H_kv, dim=1)
    freqs, _ = rope.frequencies(hd, config.rope)
    rot = 2 * freqs.numel()
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs.double()[None, :]
    q, k = rotate_reference(q, angles), rotate_reference(k, angles)
    rotated_share = q[..., :rot] @ k[..., :rot].transpose(-1, -2)
    passed_share = q[..., rot:] @ k[..., rot:].transpose(-1, -2)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)

    def attend(logits):
        y = logits.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
        return y.transpose(1, 2).reshape(B, T, H * hd) @ wo.T

    expected = attend((rotated_share * yarn_inv_t(config) + passed_share) / math.sqrt(hd))
    whole_logit = attend((rotated_share + passed_share) * yarn_inv_t(config) / math.sqrt(hd))
    assert (expected - whole_logit).abs().max() > 1e-3  # the two conventions really differ here
    for name, out in attention_outputs(model, x).items():
        torch.testing.assert_close(
            out.double(),
            expected,
            atol=1e-5,
            rtol=1e-5,
            msg=lambda m, name=name: f"backend {name}: {m}",
        )


def test_attention_factor_of_yarn_is_the_papers_temperature():
    """sqrt(1/t) = 0.1 ln s + 1 sits in the rotary tables, so q.k carries 1/t; plain RoPE's tables
    have norm 1."""
    for s in (2.0, 4.0, 16.0):
        model = make_model("yarn", factor=s)
        cos, sin = model.rotary(0, 40, 40)
        norm = (cos.double() ** 2 + sin.double() ** 2).sqrt()
        torch.testing.assert_close(
            norm, torch.full_like(norm, 0.1 * math.log(s) + 1), atol=1e-6, rtol=0
        )
    cos, sin = make_model("default").rotary(
        0, 40, 40
    )  # a column per rotated channel: 8 of head_dim 8
    torch.testing.assert_close(
        cos.double() ** 2 + sin.double() ** 2, torch.ones(40, 8, dtype=torch.float64)
    )


def test_cache_mask_shape_and_pattern():
    """Queries at positions 4, 5, 6 of a cache of 8 see the keys up to their own position, never the
    rest."""
    mask = make_model("default").new_cache(1, 8).mask(torch.tensor([4, 5, 6]))
    expected = torch.tensor(
        [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


# --------------------------------------------------------------------------------------------------
# 2. Causality: future tokens never change past logits


@settings(max_examples=6, deadline=None)
@given(T=st.integers(2, 40), data=st.data())
@pytest.mark.parametrize("variant", VARIANTS)
def test_future_tokens_do_not_change_past_logits(variant, T, data):
    cut = data.draw(st.integers(1, T - 1), label="cut")  # positions >= cut are changed
    seq_len = data.draw(st.sampled_from([None, T, 2 * T]), label="seq_len")  # both passes use it
    model = make_model(variant, n_kv_head=data.draw(st.sampled_from([4, 2, 1]), label="n_kv_head"))
    idx = tokens(2, T, seed=T)
    other = idx.clone()
    other[:, cut:] = (
        idx[:, cut:] + 1 + tokens(2, T - cut, seed=cut) % (V - 1)
    ) % V  # every future token differs
    with torch.no_grad():
        a, b = model(idx, seq_len=seq_len), model(other, seq_len=seq_len)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=1e-12, rtol=0)
    assert max_diff(a[:, cut:], b[:, cut:]) > 1e-3  # the changed positions do change


# --------------------------------------------------------------------------------------------------
# 3. KV-cache decoding equals the full forward pass (dynamic variants: seq_len = the cache capacity)


@st.composite
def cache_plans(draw):
    """(T, prefill, chunk_end, extra capacity, n_kv_head): prefill [0, prefill), one chunk
    [prefill, chunk_end), then token by token to T; chunk_end == prefill + 1 is pure
    token-by-token decoding."""
    T = draw(st.integers(2, 40))
    prefill = draw(st.integers(1, T - 1))
    chunk_end = draw(st.integers(prefill + 1, T))
    return T, prefill, chunk_end, draw(st.sampled_from([0, 0, 5])), draw(st.sampled_from([4, 2, 1]))


def decode_in_pieces(model, idx, pieces, max_len):
    cache = model.new_cache(idx.shape[0], max_len)
    outs = []
    with torch.no_grad():
        for a, b in pieces:
            assert cache.pos == a
            outs.append(model(idx[:, a:b], cache=cache))
    assert cache.pos == pieces[-1][1]
    return torch.cat(outs, dim=1)


@settings(max_examples=8, deadline=None)
@given(plan=cache_plans())
@example(plan=(40, 7, 8, 0, 2))  # token by token far past L, GQA
@example(plan=(40, 9, 33, 0, 4))  # a long chunk after the prefill (the explicit causal mask)
@example(plan=(12, 3, 10, 5, 1))  # inside L, capacity beyond the sequence, multi-query
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_forward(variant, plan):
    T, prefill, chunk_end, extra, n_kv_head = plan
    model = make_model(variant, n_kv_head=n_kv_head)
    idx = tokens(2, T, seed=T + prefill)
    pieces = [(0, prefill), (prefill, chunk_end)] + [(i, i + 1) for i in range(chunk_end, T)]
    max_len = T + extra
    cached = decode_in_pieces(model, idx, pieces, max_len)
    with torch.no_grad():
        full = model(idx, seq_len=max_len)  # the seq_len the cache fixes for dynamic variants
    assert cached.shape == full.shape == (2, T, V)
    torch.testing.assert_close(cached, full, atol=1e-9, rtol=0)


@pytest.mark.parametrize("variant", ["yarn", "dynamic_yarn"])
def test_last_n_1_prefill_equals_the_last_row_and_fills_the_cache(variant):
    model = make_model(variant)
    idx = tokens(2, 30, seed=11)
    with torch.no_grad():
        full = model(idx, seq_len=34)
        last = model(idx, seq_len=34, last_n=1)
        torch.testing.assert_close(last, full[:, -1:], atol=1e-12, rtol=0)
        cache = model.new_cache(2, 34)
        last = model(idx[:, :25], cache=cache, last_n=1)
        assert last.shape == (2, 1, V) and cache.pos == 25
        rest = torch.cat([model(idx[:, i : i + 1], cache=cache) for i in range(25, 30)], dim=1)
    torch.testing.assert_close(last, full[:, 24:25], atol=1e-9, rtol=0)
    torch.testing.assert_close(rest, full[:, 25:], atol=1e-9, rtol=0)


@pytest.mark.parametrize("variant", ["yarn", "dynamic_yarn"])
def test_last_n_gives_the_last_rows_of_the_full_logits_and_their_loss(variant):
    model = make_model(variant)
    idx, targets = tokens(2, 30, seed=12), tokens(2, 30, seed=13)
    with torch.no_grad():
        full = model(idx, seq_len=34)
        for n in (1, 7, 30):
            part = model(idx, seq_len=34, last_n=n)
            assert part.shape == (2, n, V)
            torch.testing.assert_close(part, full[:, -n:], atol=1e-12, rtol=0)
        expected = F.cross_entropy(full[:, -7:].reshape(-1, V), targets[:, -7:].reshape(-1))
        loss = model(idx, targets, seq_len=34, last_n=7)  # the last 7 targets only
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6, check_dtype=False)
        for bad in (0, 31):
            with pytest.raises(ValueError, match="last_n"):
                model(idx, last_n=bad)


def test_cache_overflow_raises_naming_the_capacity():
    model = make_model("yarn")
    cache = model.new_cache(1, 5)
    idx = tokens(1, 8)
    with torch.no_grad():
        model(idx[:, :4], cache=cache)
        with pytest.raises(ValueError, match=r"\b5 positions"):
            model(idx[:, 4:6], cache=cache)
        assert cache.pos == 4  # the refused call left the cache as it was
        model(idx[:, 4:5], cache=cache)  # exactly full is fine
        with pytest.raises(ValueError, match=r"\b5 positions"):
            model(idx[:, 5:6], cache=cache)
        with pytest.raises(ValueError, match=r"\b5 positions"):
            model(idx[:, :6], cache=model.new_cache(1, 5))


def test_cache_dtype_and_shape_follow_the_model():
    model = make_model("default", n_kv_head=2, dtype=torch.float32)
    cache = model.new_cache(3, 11)
    assert len(cache.k) == len(cache.v) == model.config.n_layer
    assert (
        cache.k[0].shape == (3, 2, 11, model.config.head_dim) and cache.k[0].dtype == torch.float32
    )
    assert make_model("default").new_cache(1, 4).v[1].dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# 4. Dynamic variants: the output follows seq_len past L, plain RoPE up to L (LongRoPE: its short
#    factors up to L, its long ones past it)


def short_context_twin(variant: str) -> Transformer:
    """A model with the same weights (same seed) computing what `variant` computes while l' <= L:
    plain RoPE for the dynamic scalings; for LongRoPE, the same config with the long factors
    replaced by the short ones."""
    if variant != "longrope":
        return make_model("default")
    twin = make_model(variant)
    twin.set_rope(twin.config.rope.replace(long_factor=twin.config.rope.short_factor))
    return twin


@pytest.mark.parametrize("variant", DYNAMIC_VARIANTS)
def test_dynamic_variant_depends_on_seq_len_only_past_L(variant):
    model = make_model(variant)
    plain = short_context_twin(variant)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    idx = tokens(2, 12)
    with torch.no_grad():
        reference = plain(idx)
        for seq_len in (None, 12, L):  # l' <= L: s = 1, plain RoPE bit for bit
            assert torch.equal(model(idx, seq_len=seq_len), reference), seq_len
        at_32, at_64 = model(idx, seq_len=32), model(idx, seq_len=64)
        assert max_diff(at_32, reference) > 1e-3
        if variant == "longrope":  # one switch, at L: the long factors whatever l' past L
            assert torch.equal(at_64, at_32)
        else:
            assert max_diff(at_64, at_32) > 1e-3
        long = tokens(2, 40)
        assert (
            max_diff(model(long), plain(long)) > 1e-3
        )  # a forward pass past L scales for its own length
        cached = decode_in_pieces(
            model, idx, [(0, 5)] + [(i, i + 1) for i in range(5, 12)], max_len=64
        )
        torch.testing.assert_close(
            cached, at_64, atol=1e-9, rtol=0
        )  # the cache's capacity sets the scale
        assert max_diff(cached, reference) > 1e-3


@pytest.mark.parametrize("variant, static", [("dynamic", "ntk"), ("dynamic_yarn", "yarn")])
def test_dynamic_variant_at_length_sL_equals_its_static_variant_at_s(variant, static):
    """Dynamic NTK with alpha 1 at l' = 4L is NTK-aware with s = 4;
    dynamic YaRN at l' = 4L is YaRN with s = 4."""
    idx = tokens(1, 30)
    with torch.no_grad():
        dynamic = make_model(variant)(idx, seq_len=4 * L)
        fixed = make_model(static, factor=4.0)(idx)
    torch.testing.assert_close(dynamic, fixed, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------------
# 5. set_rope and the rotary tables


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "default"])
def test_set_rope_keeps_every_parameter_and_changes_logits_past_L(variant):
    model = make_model("default")
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    ids = {name: id(p) for name, p in model.named_parameters()}
    idx = tokens(2, 40)
    with torch.no_grad():
        old = model(idx)
        model.set_rope(rope_config(variant))
        new = model(idx)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert {
        name: id(p) for name, p in model.named_parameters()
    } == ids  # the same tensors, not copies
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.config.rope == rope_config(variant) and model.config.block_size == L
    assert max_diff(new[:, L:], old[:, L:]) > 1e-3
    model.set_rope(rope_config("default"))
    with torch.no_grad():
        assert torch.equal(model(idx), old)  # and back


def test_set_rope_block_size_and_device():
    model = make_model("default", dtype=torch.float32)
    model.set_rope(rope_config("yarn"), block_size=24)
    assert model.config.block_size == 24 and model.rotary.cos.shape == (
        24,
        8,
    )  # a column per rotated channel
    assert model.rotary.cos.device == model.tok_emb.weight.device


@pytest.mark.parametrize("variant", VARIANTS)
def test_tables_are_fp32_buffers_outside_the_state_dict(variant):
    model = make_model(variant, dtype=torch.float32)
    assert not any("rotary" in k or k.endswith((".cos", ".sin")) for k in model.state_dict())
    with torch.no_grad():
        model(tokens(1, 20))  # builds the dynamic tables
    assert model.rotary.cos.dtype == model.rotary.sin.dtype == torch.float32
    assert not any("rotary" in k for k in model.state_dict())
    assert {name for name, _ in model.named_parameters()}.isdisjoint({"rotary.cos", "rotary.sin"})


@pytest.mark.parametrize("variant", ["yarn", "llama3", "dynamic_yarn"])
@pytest.mark.parametrize("cast", ["bfloat16", "half", "double"])
def test_tables_stay_fp32_after_casting_the_model(variant, cast):
    model = make_model(variant, dtype=torch.float32)
    with torch.no_grad():
        model(tokens(1, 40))  # built (and, for dynamic, built at l' = 40) before the cast
        getattr(model, cast)() if cast != "bfloat16" else model.to(torch.bfloat16)
        param_dtype = {"bfloat16": torch.bfloat16, "half": torch.float16, "double": torch.float64}[
            cast
        ]
        assert model.tok_emb.weight.dtype == param_dtype
        assert model.rotary.cos.dtype == model.rotary.sin.dtype == torch.float32
        if not model.config.rope.is_dynamic:
            n = model.rotary.cos.shape[0]
            cos, sin = fresh_tables(model, n)
            assert torch.equal(model.rotary.cos, cos) and torch.equal(model.rotary.sin, sin)
        for T in (40, 12, 70):  # 40 first: the l' the dynamic table had before the cast
            logits = model(tokens(1, T))
            assert logits.dtype == param_dtype and torch.isfinite(logits).all()
            assert model.rotary.cos.dtype == torch.float32
            cos, sin = fresh_tables(model, T, seq_len=T)
            assert torch.equal(model.rotary.cos[:T], cos) and torch.equal(model.rotary.sin[:T], sin)
        model.float()
        assert model.rotary.cos.dtype == torch.float32


@pytest.mark.parametrize("variant", STATIC_VARIANTS)
def test_tables_grow_on_demand_with_the_same_frequencies(variant):
    model = make_model(variant)
    cos0, sin0 = model.rotary.cos.clone(), model.rotary.sin.clone()
    assert cos0.shape == (L, 8)  # prebuilt for block_size, a column per rotated channel
    idx = tokens(2, 3 * L + 5)
    with torch.no_grad():
        long = model(idx)
        short = model(idx[:, :L])
    assert model.rotary.cos.shape[0] >= 3 * L + 5
    assert torch.equal(model.rotary.cos[:L], cos0) and torch.equal(model.rotary.sin[:L], sin0)
    cos, sin = fresh_tables(model, model.rotary.cos.shape[0])
    assert torch.equal(model.rotary.cos, cos) and torch.equal(model.rotary.sin, sin)
    torch.testing.assert_close(long[:, :L], short, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------------
# 6. Config validation


def test_default_config_is_valid_and_derived_sizes():
    c = model_config(n_head=4, n_kv_head=2, d_model=32)
    assert (c.head_dim, c.kv_heads, c.hidden_dim) == (8, 2, 128)
    assert model_config(n_kv_head=0).kv_heads == 4
    assert ModelConfig(d_model=96, n_head=4, ffn_hidden=100).hidden_dim == 100
    assert ModelConfig(d_model=96, n_head=4).hidden_dim == 256  # 8/3 * 96 = 256
    ModelConfig()


@pytest.mark.parametrize(
    "changes, field_name",
    [
        (dict(d_model=30, n_head=4), "d_model"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(n_head=4, n_kv_head=8), "n_kv_head"),
        (dict(d_model=24, n_head=8), "head_dim"),  # head_dim 3: odd rotary dim
        (
            dict(d_model=40, n_head=4, rope=RopeConfig(partial_rotary_factor=0.5)),
            "rotary dim",
        ),  # 10 * 0.5 = 5
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=-1), "n_layer"),
        (dict(n_head=0), "n_head"),
        (dict(d_model=-32), "d_model"),
        (dict(block_size=0), "block_size"),
        (dict(n_kv_head=-1), "n_kv_head"),
        (dict(ffn_hidden=-64), "ffn_hidden"),
        (dict(n_layer=True), "n_layer"),
        (dict(n_kv_head=False), "n_kv_head"),
        (dict(d_model="64"), "d_model"),
        (dict(block_size=16.0), "block_size"),
        (dict(vocab_size=None), "vocab_size"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(norm_eps=1.5), "norm_eps"),
        (dict(rope="yarn"), "rope"),
        (dict(rope={"type": "yarn"}), "rope"),
    ],
)
def test_bad_config_raises_naming_the_field(changes, field_name):
    kw = dict(vocab_size=V, n_layer=1, n_head=4, d_model=32, block_size=L)
    kw.update(changes)
    with pytest.raises(ValueError, match=field_name):
        ModelConfig(**kw)


INT_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model", "block_size", "n_kv_head", "ffn_hidden")
NON_INTS = st.one_of(
    st.booleans(),
    st.text(max_size=5),
    st.floats(allow_nan=True),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(INT_FIELDS), value=st.one_of(NON_INTS, st.integers(-(2**40), -1)))
def test_non_int_or_negative_sizes_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        ModelConfig(**{name: value})


@pytest.mark.parametrize(
    "d, field_name",
    [
        ({"n_layers": 2}, "n_layers"),
        ({"rope": {"kind": "yarn"}}, "kind"),
        ({"rope": {"type": "yarn", "factor": 2.0, "original_context": 16, "scale": 2}}, "scale"),
        ({"rope": {"type": "yarn"}}, "original_context"),
        ({"rope": {"type": "bogus"}}, "bogus"),
        ({"d_model": 33}, "d_model"),
    ],
)
def test_from_dict_rejects_unknown_keys_and_bad_values(d, field_name):
    with pytest.raises(ValueError, match=field_name):
        ModelConfig.from_dict(d)


@settings(max_examples=25, deadline=None)
@given(
    variant=st.sampled_from(VARIANTS),
    n_kv=st.sampled_from([0, 1, 2, 4]),
    n_layer=st.integers(1, 12),
    factor=st.floats(1.0, 64.0),
    ffn=st.sampled_from([0, 96]),
    eps=st.sampled_from([1e-5, 1e-6]),
)
def test_to_dict_from_dict_round_trip(variant, n_kv, n_layer, factor, ffn, eps):
    c = ModelConfig(
        vocab_size=V,
        n_layer=n_layer,
        n_head=4,
        n_kv_head=n_kv,
        d_model=32,
        ffn_hidden=ffn,
        norm_eps=eps,
        block_size=L,
        rope=rope_config(variant, factor=factor),
    )
    d = c.to_dict()
    assert isinstance(d["rope"], dict)
    assert ModelConfig.from_dict(d) == c
    assert (
        ModelConfig.from_dict(json.loads(json.dumps(d))) == c
    )  # as a checkpoint or config file stores it


# --------------------------------------------------------------------------------------------------
# 7. Tied head, loss, training


def test_head_is_tied_to_the_embedding():
    model = make_model("yarn", sharp=False)
    assert model.lm_head.weight is model.tok_emb.weight
    assert sum(1 for _ in model.parameters()) == len(list(model.named_parameters()))
    assert "lm_head.weight" not in dict(model.named_parameters())  # one Parameter, listed once


def test_loss_is_cross_entropy_of_the_logits_with_ignore_index():
    model = make_model("yarn")
    idx, targets = tokens(3, 20, seed=1), tokens(3, 20, seed=2)
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets)
        # the loss is computed in fp32 (logits.float()) even for this float64 model: compare at fp32
        # precision
        expected = F.cross_entropy(logits.view(-1, V), targets.view(-1))
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6, check_dtype=False)
        masked = targets.clone()
        masked[0, :7] = -1
        masked[2, 15:] = -1
        keep = masked != -1
        expected = F.cross_entropy(
            logits[keep], targets[keep]
        )  # the mean over the kept targets only
        torch.testing.assert_close(
            model(idx, masked), expected, atol=1e-6, rtol=1e-6, check_dtype=False
        )
        assert (
            abs(model(idx, masked).item() - loss.item()) > 1e-3
        )  # the ignored targets did count before
    assert loss.dim() == 0


def test_loss_accepts_non_contiguous_targets():
    """The natural next-token slice idx[:, 1:] is not contiguous (targets.view(-1) raised for it
    before e81d0b3)."""
    model = make_model("default", sharp=False)
    idx = tokens(2, 12, seed=9)
    x, y = idx[:, :-1], idx[:, 1:]
    assert not y.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(x, y), model(x, y.contiguous()), atol=0, rtol=0)


def test_chunked_loss_equals_the_plain_loss_and_gradients():
    model = make_model("yarn")
    idx, targets = tokens(2, 20, seed=3), tokens(2, 20, seed=4)
    targets[1, :6] = -1
    grads = []
    for threshold in (Transformer.loss_chunk_threshold, 0):
        model.zero_grad()
        model.loss_chunk_threshold, model.loss_chunk_elements = threshold, 7 * V  # chunks of 7 rows
        loss = model(idx, targets)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, g_plain), (chunked, g_chunked) = grads
    # both compute the cross-entropy in fp32: agreement at fp32 precision
    torch.testing.assert_close(chunked, plain, atol=2e-6, rtol=0)
    for name in g_plain:
        torch.testing.assert_close(
            g_chunked[name],
            g_plain[name],
            atol=1e-7,
            rtol=1e-6,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    with torch.no_grad():
        torch.testing.assert_close(
            model(idx, targets), plain, atol=2e-6, rtol=0
        )  # the no-grad branch


def test_loss_at_init_is_about_ln_vocab_and_training_lowers_it():
    torch.manual_seed(0)
    model = Transformer(model_config("yarn", n_layer=2, d_model=32))
    idx = tokens(4, 17, seed=5)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    loss0 = model(x, y)
    assert abs(loss0.item() - math.log(V)) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model.lm_head.weight is model.tok_emb.weight  # still tied after the optimizer
    assert losses[-1] < 0.7 * losses[0]


# --------------------------------------------------------------------------------------------------
# 8. generate


def greedy_reference(model, idx, n, rule="follow"):
    """Argmax of a full forward pass without cache, re-run after each new token, with the l' the
    rule gives."""
    seq = idx
    with torch.no_grad():
        for _ in range(n):
            seq_len = generate.rope_seq_len(model.config.rope, seq.shape[1], idx.shape[1] + n, rule)
            nxt = model(seq, seq_len=seq_len)[:, -1].argmax(dim=-1)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
    return seq[:, idx.shape[1] :]


@pytest.mark.parametrize("rule", ["follow", "capacity"])
@pytest.mark.parametrize("variant", ["yarn", "dynamic_yarn", "dynamic", "longrope"])
def test_greedy_generation_equals_uncached_argmax(variant, rule):
    model = make_model(variant)
    idx = tokens(2, 8, seed=6)
    n = 20  # 28 positions, past L = 16
    out = torch.stack(list(sample_tokens(model, idx, n, temperature=0, rule=rule)), dim=1)
    assert out.shape == (2, n) and out.dtype == torch.long
    assert torch.equal(out, greedy_reference(model, idx, n, rule))
    top1 = sample_tokens(model, idx, n, temperature=0.7, top_k=1, rule=rule)
    top1 = torch.stack(list(top1), dim=1)
    assert torch.equal(top1, out)  # top_k = 1 is greedy at any temperature


def decoded_logits(model, idx, n, rule, compile=False):
    """(tokens (B, n) greedily decoded with the cache, the logits each was chosen from,
    (B, n, V))."""
    logits = []

    def choose(step_logits):
        logits.append(step_logits)
        return step_logits.argmax(dim=-1)

    out = torch.stack(list(generate.generate(model, idx, n, choose, rule, compile)), dim=1)
    return out, torch.stack(logits, dim=1)


@pytest.mark.parametrize("variant", DYNAMIC_VARIANTS)
def test_follow_rule_every_step_equals_a_full_forward_at_its_scale_across_scale_changes(variant):
    """Under 'follow', the scale steps at L, 2L and 4L (l' 16 -> 32 -> 64 here) and each step
    re-prefills; at every step the cached logits equal a full forward pass of that prefix at seq_len
    = its rounded l'."""
    model = make_model(variant)
    idx = tokens(2, 5, seed=8)
    n = 50  # prefix lengths 5 .. 54: through L = 16, 32 and 64
    out, logits = decoded_logits(model, idx, n, "follow")
    seq = torch.cat((idx, out), dim=1)
    lengths = set()
    with torch.no_grad():
        for i in range(n):
            prefix = seq[:, : idx.shape[1] + i]
            n_max = idx.shape[1] + n
            length = generate.rope_seq_len(model.config.rope, prefix.shape[1], n_max, "follow")
            lengths.add(length)
            full = model(prefix, seq_len=length)[:, -1]
            torch.testing.assert_close(logits[:, i], full, atol=1e-9, rtol=0)
    assert lengths == {L, 2 * L, 4 * L}  # three scales, two changes
    capacity = decoded_logits(model, idx, n, "capacity")[1]
    assert (
        max_diff(capacity[:, : L - idx.shape[1]], logits[:, : L - idx.shape[1]]) > 1e-3
    )  # the rules do differ


@pytest.mark.parametrize("variant", ["dynamic", "dynamic_yarn"])
def test_follow_rule_gives_a_prompt_shorter_than_L_exactly_plain_ropes_logits(variant):
    """A short prompt headed for a long generation: every step until the sequence passes L is plain
    RoPE's, bit for bit (under 'capacity' the whole generation runs at s = 60 / 16 from its first
    token)."""
    model, plain = make_model(variant), make_model("default")
    idx = tokens(1, 4, seed=9)
    _, ours = decoded_logits(model, idx, 56, "follow")
    _, theirs = decoded_logits(plain, idx, 56, "follow")
    within = L - idx.shape[1] + 1  # the steps predicting from prefixes of 4 .. 16 tokens
    assert torch.equal(ours[:, :within], theirs[:, :within])
    assert max_diff(ours[:, within:], theirs[:, within:]) > 1e-3
    assert (
        max_diff(decoded_logits(model, idx, 56, "capacity")[1][:, :within], theirs[:, :within])
        > 1e-3
    )


def test_rope_seq_len_rules():
    model = make_model("dynamic_yarn")
    cfg = model.config.rope
    seq_lens = [generate.rope_seq_len(cfg, n, 100, "follow") for n in (1, 16, 17, 32, 33, 100)]
    assert seq_lens == [16, 16, 32, 32, 64, 128]
    assert generate.rope_seq_len(cfg, 5, 100, "capacity") == 100
    static = make_model("yarn").config.rope
    assert generate.rope_seq_len(static, 5, 100, "follow") == 100  # static: l' is never read
    with pytest.raises(ValueError, match="rope rule"):
        generate.rope_seq_len(cfg, 5, 100, "grow")


def test_generate_stops_at_stop_token():
    model = make_model("yarn")
    idx = tokens(1, 5, seed=7)
    full = torch.cat(list(sample_tokens(model, idx, 12, temperature=0)))
    stop = int(full[4])
    first = int((full == stop).nonzero()[0])  # the stop token's first appearance
    out = torch.cat(list(sample_tokens(model, idx, 12, temperature=0, stop_token=stop)))
    assert out.tolist() == full[: first + 1].tolist()  # yielded, then stopped
    never = torch.cat(list(sample_tokens(model, idx, 12, temperature=0, stop_token=V + 5)))
    assert torch.equal(never, full)


def test_generate_vocab_limit_draws_only_ids_below_it():
    model = make_model("yarn")
    idx = tokens(2, 6, seed=10)
    out = torch.stack(list(sample_tokens(model, idx, 10, temperature=0, vocab_limit=10)), dim=1)
    seq = idx
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq)[:, -1, :10].argmax(dim=-1)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
    assert torch.equal(out, seq[:, 6:])
    g = torch.Generator().manual_seed(0)
    sampled = sample_tokens(model, idx, 30, temperature=2.0, vocab_limit=7, generator=g)
    sampled = torch.stack(list(sampled), dim=1)
    assert sampled.max() < 7 and len(set(sampled.flatten().tolist())) > 1


@pytest.mark.parametrize("temperature", [-1.0, -1e-9])
def test_negative_temperature_raises(temperature):
    model = make_model("default")
    with pytest.raises(ValueError, match="temperature"):
        list(sample_tokens(model, tokens(1, 3), 4, temperature=temperature))


def test_seeded_sampling_is_reproducible():
    model = make_model(
        "yarn", sharp=False
    )  # nearly uniform next-token distributions: samples vary with the seed
    idx = tokens(2, 4)

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        out = sample_tokens(model, idx, 16, temperature=1.0, generator=g, **kw)
        return torch.stack(list(out), dim=1)

    assert torch.equal(sample(123), sample(123))
    assert torch.equal(sample(9, top_k=5), sample(9, top_k=5))
    assert not torch.equal(sample(123), sample(124))
    assert ((sample(3, top_k=V) >= 0) & (sample(3, top_k=V) < V)).all()


def test_top_k_only_samples_among_the_k_best():
    model = make_model("yarn")
    idx = tokens(1, 6, seed=8)
    g = torch.Generator().manual_seed(0)
    first = [sample_tokens(model, idx, 1, temperature=5.0, top_k=3, generator=g) for _ in range(40)]
    first = torch.stack([next(one) for one in first])
    with torch.no_grad():
        best3 = set(model(idx)[0, -1].topk(3).indices.tolist())
    assert set(first.flatten().tolist()) <= best3
    assert len(set(first.flatten().tolist())) > 1  # and it does sample


# --------------------------------------------------------------------------------------------------
# 9. flops_per_token and num_params


@pytest.mark.parametrize("n_kv_head, ffn_hidden", [(0, 0), (2, 0), (1, 72)])
def test_num_params_counts_the_tied_weight_once_and_flops_formula(n_kv_head, ffn_hidden):
    vocab, n_layer, n_head, d = V, 2, 4, 32
    c = ModelConfig(
        vocab_size=vocab,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_model=d,
        ffn_hidden=ffn_hidden,
        block_size=L,
    )
    model = Transformer(c)
    hd = d // n_head
    kv = (n_kv_head or n_head) * hd
    hidden = ffn_hidden or 128  # 8/3 * 32 = 85.3, rounded up to a multiple of 64
    per_layer = d + d * d + 2 * d * kv + d * d + d + 3 * d * hidden  # norm, wqkv, wo, norm, w13 w2
    N = vocab * d + n_layer * per_layer + d  # embedding = head (once), blocks, final norm
    assert model.num_params() == N
    unique = {id(p): p.numel() for m in model.modules() for p in m.parameters(recurse=False)}
    assert sum(unique.values()) == N
    for T in (1, 16, 1000):
        assert model.flops_per_token(T) == 6 * N + 6 * n_layer * d * T


def test_training_after_decoding_a_dynamic_variant():
    """Decoding runs under inference_mode; the RoPE tables it rebuilds must still serve a training
    step."""
    model = make_model("dynamic_yarn", dtype=torch.float32)
    list(sample_tokens(model, tokens(1, 10), 30, temperature=0))  # l' steps past L: tables rebuilt
    model.train()
    model(tokens(2, 40), tokens(2, 40, seed=1)).backward()
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Previous-token embeddings (prev_tokens = K)


def test_prev_tokens_embed_exactly_the_k_tokens_before_each_position():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, block_size=L, prev_tokens=3)
    )
    idx = tokens(2, 9)
    x = model.embed(idx, 0)
    E, P = model.tok_emb.weight, model.prev_emb.weight
    for t in range(9):
        prev = [idx[:, t - k] if t - k >= 0 else torch.full((2,), V - 1) for k in (1, 2, 3)]
        want = E[idx[:, t]] + sum(P[(k - 1) * V + p] for k, p in zip((1, 2, 3), prev))
        torch.testing.assert_close(x[:, t], want)
    assert (
        model.num_params()
        == (V + 3 * V) * 16 + sum(p.numel() for p in model.blocks.parameters()) + 16
    )
    assert model.flops_per_token(10) < 6 * model.num_params()  # lookups are not matmuls


@pytest.mark.parametrize("variant", ["default", "dynamic_yarn"])
def test_prev_tokens_cached_decoding_equals_the_full_forward(variant):
    model = prev_tokens_model(variant)
    idx = tokens(2, 5, seed=3)
    out, logits = decoded_logits(model, idx, 30, "follow")
    seq = torch.cat((idx, out), dim=1)
    with torch.no_grad():
        for i in range(30):
            n = idx.shape[1] + i
            seq_len = generate.rope_seq_len(model.config.rope, n, 35, "follow")
            full = model(seq[:, :n], seq_len=seq_len)[:, -1]
            torch.testing.assert_close(logits[:, i], full, atol=1e-9, rtol=0)


# --------------------------------------------------------------------------------------------------
# 10. Compiled decoding (generate.compiled_step: torch.compile, inductor on CPU) equals the full
#     forward pass. Compiling is slow on CPU, so the module compiles two graphs once (one shape for
#     every variant, and one with previous-token embeddings) and then forbids any recompilation: a
#     new variant, rule, l' or cache must reuse the graph.

P, N = (
    5,
    50,
)  # prompt and new tokens: prefixes 5 .. 54, through L = 16, 32 and 64 under the follow rule


def prev_tokens_model(variant: str) -> Transformer:
    torch.manual_seed(0)
    return (
        Transformer(
            ModelConfig(
                vocab_size=V,
                n_layer=2,
                n_head=2,
                d_model=16,
                block_size=L,
                prev_tokens=2,
                rope=rope_config(variant),
            )
        )
        .double()
        .eval()
    )


@pytest.fixture(scope="module")
def compiled_once():
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for model in (make_model("yarn"), prev_tokens_model("default")):
        decoded_logits(model, tokens(2, P), N, "follow", compile=True)
    assert (
        torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    )  # it compiled, and did not fall back
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def assert_each_step_equals_a_full_forward(model, idx, rule, logits, out):
    """Step i's logits equal a full forward pass of its prefix at the l' the rule gives that prefix:
    float64, within 1e-9, the tolerance of the eager tests above."""
    seq = torch.cat((idx, out), dim=1)
    with torch.no_grad():
        for i in range(out.shape[1]):
            prefix = seq[:, : idx.shape[1] + i]
            length = generate.rope_seq_len(model.config.rope, prefix.shape[1], seq.shape[1], rule)
            full = model(prefix, seq_len=length)[:, -1]
            torch.testing.assert_close(logits[:, i], full, atol=1e-9, rtol=0)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_decoding_equals_a_full_forward_of_each_prefix(compiled_once, variant, rule):
    model, idx = make_model(variant), tokens(2, P, seed=8)
    out, logits = decoded_logits(model, idx, N, rule, compile=True)
    assert_each_step_equals_a_full_forward(model, idx, rule, logits, out)
    assert torch.equal(out, decoded_logits(model, idx, N, rule)[0])  # the eager path's tokens


@pytest.mark.parametrize("variant", ["default", "dynamic_yarn"])
def test_compiled_decoding_with_previous_token_embeddings(compiled_once, variant):
    model, idx = prev_tokens_model(variant), tokens(2, P, seed=3)
    out, logits = decoded_logits(model, idx, N, "follow", compile=True)
    assert_each_step_equals_a_full_forward(model, idx, "follow", logits, out)
