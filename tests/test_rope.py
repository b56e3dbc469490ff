"""Property tests for rope.py: the RoPE variants of the YaRN paper (Peng et al., arXiv 2309.00071).

Notation as in rope.py: |D| the rotary dim, d the pair index, theta_d = b^(-2d/|D|), lambda_d = 2 pi
/ theta_d, L the original context, s the scale, r_d = L / lambda_d the rotations pair d makes inside
L.

Hypothesis draws the variants, head dims 8..256 (with partial rotary), bases 100..1e6, scales 1..64,
original contexts 64..16384, LongRoPE divisors 0.05..100 and positions up to 1,000,000. The groups:
  1 ramp            4 no unseen angles     7 Hugging Face parity
  2 identities      5 config validation    8 to_hf round trip
  3 relative pos.   6 channel layout       9 fp32 tables, float64 angles
                                          10 LongRoPE
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf  # noqa: E402
import rope  # noqa: E402
import rope_check  # noqa: E402
from rope import VARIANTS, RopeConfig, apply_rope, cos_sin_table, frequencies  # noqa: E402

DYNAMIC = rope.DYNAMIC_VARIANTS  # dynamic, dynamic_yarn, longrope: seq_len matters
RESCALING = ("dynamic", "dynamic_yarn")  # the dynamic variants whose scale follows l'
BY_PARTS = ("ntk_by_parts", "yarn", "dynamic_yarn")

# --------------------------------------------------------------------------------------------------
# Strategies

BASES = st.one_of(
    st.sampled_from([100.0, 1e4, 5e5, 1e6]), st.floats(2.0, 6.0).map(lambda e: 10.0**e)
)
SCALES = st.one_of(st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]), st.floats(1.0, 64.0))
STRETCHES = st.one_of(
    st.sampled_from([2.0, 4.0, 8.0, 16.0, 32.0, 64.0]), st.floats(1.01, 64.0)
)  # s > 1
CONTEXTS = st.one_of(
    st.sampled_from([64, 256, 1024, 2048, 4096, 8192, 16384]), st.integers(64, 16384)
)
POSITIONS = st.integers(0, 10**6)
SEEDS = st.integers(0, 2**32 - 1)
DIVISORS = st.one_of(
    st.sampled_from([1.0, 1, 2, 0.5]), st.floats(0.05, 100.0)
)  # LongRoPE's f_d (JSON gives ints too)


def divisor_lists(pairs):
    """short_factor / long_factor: one positive divisor per frequency pair."""
    return st.lists(DIVISORS, min_size=pairs, max_size=pairs)


def seq_lens(L):
    """l' for a dynamic variant: unknown (None), within L, or beyond it (up to 64 L)."""
    return st.none() | st.integers(1, L) | st.integers(L + 1, 64 * L)


@st.composite
def betas(draw):
    """(beta_fast, beta_slow) with beta_fast >= 4 > beta_slow; the paper's 32/1 half the time.
    beta_fast >= 4 keeps the ramp's low end inside rope.ramp_bounds' clamp |D| - 1 for every drawn b
    >= 100, L <= 16384, |D| >= 4 (r_d at d = |D| - 1 is at most 2.6), and L >= 64 > 2 pi beta_slow
    keeps its high end above 0; outside those the clamps degenerate (see test_ramp_degenerate_*)."""
    if draw(st.booleans()):
        return 32.0, 1.0
    return draw(st.floats(4.0, 64.0)), draw(st.floats(0.25, 4.0, exclude_max=True))


@st.composite
def heads(draw, partial=True):
    """(head_dim, partial_rotary_factor, |D|) with |D| = int(head_dim * partial) even, >= 4,
    head_dim <= 256."""
    p = draw(st.sampled_from([1.0, 1.0, 0.5, 0.25])) if partial else 1.0
    half = draw(st.integers(2 if p < 1 else 4, int(128 * p)))  # |D| / 2
    head_dim = int(2 * half / p)
    assert int(head_dim * p) == 2 * half
    return head_dim, p, 2 * half


@st.composite
def setups(draw, types=VARIANTS, partial=True, factors=SCALES, temperature=False):
    """(head_dim, cfg, seq_len): a valid config of a drawn variant; seq_len is drawn for the dynamic
    variants. temperature: also draw YaRN's attention_factor / mscale knobs (LongRoPE's
    attention_factor)."""
    kind = draw(st.sampled_from(types))
    head_dim, p, dim = draw(heads(partial))
    kw = dict(type=kind, base=draw(BASES), partial_rotary_factor=p)
    if kind != "default":
        kw["factor"] = draw(factors)
    if kind in rope.NEEDS_ORIGINAL_CONTEXT:
        kw["original_context"] = draw(CONTEXTS)
    if kind == "longrope":
        kw.update(
            short_factor=draw(divisor_lists(dim // 2)), long_factor=draw(divisor_lists(dim // 2))
        )
        if temperature:
            kw["attention_factor"] = draw(st.none() | st.floats(0.1, 4.0))
    if kind in BY_PARTS:
        fast, slow = draw(betas())
        kw.update(beta_fast=fast, beta_slow=slow, truncate=draw(st.booleans()))
        if temperature:
            kw.update(
                attention_factor=draw(st.none() | st.floats(0.1, 4.0)),
                mscale=draw(st.none() | st.floats(0.0, 2.0)),
                mscale_all_dim=draw(st.none() | st.floats(0.0, 2.0)),
            )
    if kind == "llama3":
        low = draw(st.floats(0.5, 4.0))
        kw.update(low_freq_factor=low, high_freq_factor=low + draw(st.floats(0.1, 16.0)))
    seq_len = None
    if kind in DYNAMIC:
        seq_len = draw(seq_lens(kw["original_context"]))
    return head_dim, RopeConfig(**kw), seq_len


def plain(head_dim, cfg):
    """Plain RoPE with cfg's base and partial rotary factor."""
    plain = RopeConfig(base=cfg.base, partial_rotary_factor=cfg.partial_rotary_factor)
    return frequencies(head_dim, plain)


def interpolated(head_dim, cfg):
    """Position Interpolation (linear) at cfg's scale, base and partial rotary factor."""
    return frequencies(
        head_dim,
        RopeConfig(
            type="linear",
            factor=cfg.factor,
            base=cfg.base,
            partial_rotary_factor=cfg.partial_rotary_factor,
        ),
    )


def same(a, b):
    """Two (inv_freq, attention_factor) results are identical, bit for bit."""
    return torch.equal(a[0], b[0]) and a[1] == b[1]


def rotations(L, dim, base):
    """r_d = L / lambda_d (float64)."""
    return L * rope.base_inv_freq(dim, base) / (2 * math.pi)


def random_vectors(seed, n, head_dim):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, head_dim, dtype=torch.float64, generator=g)


# --------------------------------------------------------------------------------------------------
# 1. The ramp (NTK-by-parts, YaRN) and the Llama-3 bands


@settings(max_examples=60, deadline=None)
@given(head=heads(partial=False), base=BASES, L=CONTEXTS, beta=betas(), truncate=st.booleans())
def test_ramp_in_unit_interval_and_monotone_in_wavelength(head, base, L, beta, truncate):
    _, _, dim = head
    cfg = RopeConfig(
        type="yarn",
        factor=2.0,
        base=base,
        original_context=L,
        beta_fast=beta[0],
        beta_slow=beta[1],
        truncate=truncate,
    )
    w = rope.ramp(dim, cfg)
    assert w.shape == (dim // 2,)
    assert torch.all((w >= 0) & (w <= 1))
    assert torch.all(w[1:] >= w[:-1])  # non-decreasing in d ...
    wavelength = 2 * math.pi / rope.base_inv_freq(dim, base)
    assert torch.all(
        wavelength[1:] > wavelength[:-1]
    )  # ... and lambda_d grows with d, so also in wavelength


@settings(max_examples=80, deadline=None)
@given(setup=setups(types=("ntk_by_parts", "yarn")))
@example(setup=(128, RopeConfig(type="yarn", factor=16.0, original_context=4096), None))
def test_by_parts_keeps_fast_pairs_and_interpolates_slow_pairs_exactly(setup):
    """r_d > beta_fast (lambda_d < L/beta_fast): theta_d as plain RoPE, bit for bit;
    r_d < beta_slow (lambda_d > L/beta_slow): theta_d/s as Position Interpolation, bit for bit;
    every pair lies between the two."""
    head_dim, cfg, _ = setup
    f, _ = frequencies(head_dim, cfg)
    keep, interp = plain(head_dim, cfg)[0], interpolated(head_dim, cfg)[0]
    r = rotations(cfg.original_context, 2 * f.numel(), cfg.base)
    fast = r > cfg.beta_fast * (
        1 + 1e-9
    )  # a hair of margin: the ramp bounds come from logs, r_d from powers
    slow = r < cfg.beta_slow * (1 - 1e-9)
    assert torch.equal(f[fast], keep[fast])
    assert torch.equal(f[slow], interp[slow])
    assert torch.all(interp <= f) and torch.all(f <= keep)


DEGENERATE = (
    "ramp_bounds clamps the ends to [0, |D| - 1] (as the official code and transformers do) "
    "and can cross them"
)


@pytest.mark.xfail(strict=True, reason=DEGENERATE)
def test_ramp_degenerate_low_end_past_clamp():
    """Every pair rotates > beta_fast times in L (r_d >= 41 > 0.375), so every pair should keep
    theta_d. The low end correction_dim(0.375) = 7.08 lies past |D| - 1 = 7, high is clamped to 7 <
    low, the ramp's slope flips and every pair is fully interpolated instead (theta/s)."""
    cfg = RopeConfig(
        type="ntk_by_parts",
        factor=2.0,
        base=100.0,
        original_context=8192,
        beta_fast=0.375,
        beta_slow=0.25,
        truncate=False,
    )
    assert torch.all(rotations(8192, 8, 100.0) > cfg.beta_fast)
    assert torch.equal(frequencies(8, cfg)[0], plain(8, cfg)[0])


@pytest.mark.xfail(strict=True, reason=DEGENERATE)
@pytest.mark.parametrize("truncate", [True, False])
def test_ramp_degenerate_high_end_below_zero(truncate):
    """L = 64 < 2 pi beta_slow: every pair rotates < beta_slow = 11 times in L (r_0 = 10.19), so
    every pair should get theta/s. correction_dim(11) = -0.53 < 0; truncated, low = high = 0 and the
    zero-width guard keeps pair 0 at theta_0; untruncated, high < low = 0 and every pair keeps
    theta_d."""
    cfg = RopeConfig(
        type="yarn",
        factor=4.0,
        base=1e4,
        original_context=64,
        beta_fast=32.0,
        beta_slow=11.0,
        truncate=truncate,
    )
    assert torch.all(rotations(64, 128, 1e4) < cfg.beta_slow)
    assert torch.equal(frequencies(128, cfg)[0], interpolated(128, cfg)[0])


@pytest.mark.parametrize(
    "dim, L, bounds",
    [
        (128, 4096, (20, 46)),
        (128, 2048, (16, 41)),
        (128, 1024, (11, 36)),
        (64, 2048, (8, 21)),
        (64, 1024, (5, 18)),
        (64, 512, (3, 16)),
        (64, 256, (0, 13)),
        (32, 256, (0, 7)),
    ],
)
def test_ramp_bounds_unit_values(dim, L, bounds):
    cfg = RopeConfig(
        type="yarn", factor=8.0, base=1e4, original_context=L, beta_fast=32.0, beta_slow=1.0
    )
    assert rope.ramp_bounds(dim, cfg) == bounds


def test_correction_dims_unrounded():
    assert rope.correction_dim(32, 128, 1e4, 4096) == pytest.approx(20.944, abs=5e-4)
    assert rope.correction_dim(1, 128, 1e4, 4096) == pytest.approx(45.027, abs=5e-4)
    cfg = RopeConfig(type="yarn", factor=8.0, original_context=4096, truncate=False)
    low, high = rope.ramp_bounds(128, cfg)
    assert (low, high) == pytest.approx((20.944, 45.027), abs=5e-4)


@settings(max_examples=80, deadline=None)
@given(setup=setups(types=("llama3",), factors=STRETCHES))
@example(setup=(128, RopeConfig(type="llama3", factor=8.0, base=5e5, original_context=8192), None))
def test_llama3_bands(setup):
    """lambda_d < L/high_freq_factor: theta_d exactly; lambda_d > L/low_freq_factor: theta_d/s
    exactly; in between strictly between the two."""
    head_dim, cfg, _ = setup
    f, a = frequencies(head_dim, cfg)
    assert a == 1.0
    keep, interp = plain(head_dim, cfg)[0], interpolated(head_dim, cfg)[0]
    L = cfg.original_context
    theta = rope.base_inv_freq(2 * f.numel(), cfg.base)
    wavelength = 2 * math.pi / theta
    high = wavelength < L / cfg.high_freq_factor
    low = wavelength > L / cfg.low_freq_factor
    assert torch.equal(f[high], keep[high])
    assert torch.equal(f[low], interp[low])
    middle = ~high & ~low
    assert torch.all(interp[middle] <= f[middle]) and torch.all(f[middle] <= keep[middle])
    # strictly, where the blend weight is not within fp32 rounding of an end
    smooth = (L / wavelength - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    strict = middle & (smooth > 1e-4) & (smooth < 1 - 1e-4)
    assert torch.all(interp[strict] < f[strict]) and torch.all(f[strict] < keep[strict])


# --------------------------------------------------------------------------------------------------
# 2. Identities


@settings(max_examples=80, deadline=None)
@given(
    setup=setups(types=tuple(v for v in VARIANTS if v != "longrope"), factors=st.just(1.0)),
    data=st.data(),
)
def test_scale_one_is_plain_rope(setup, data):
    """s = 1: every variant is plain RoPE, frequencies bit for bit and attention factor 1 (the
    dynamic ones at any seq_len <= L, and with no seq_len). LongRoPE's divisors are set apart from
    s: its identity (divisors of 1) is test_longrope_unit_factors_are_plain_rope."""
    head_dim, cfg, _ = setup
    seq_len = None
    if cfg.is_dynamic:
        seq_len = data.draw(st.none() | st.integers(1, cfg.original_context))
    f, a = frequencies(head_dim, cfg, seq_len)
    assert torch.equal(f, plain(head_dim, cfg)[0])
    assert a == 1.0


@settings(max_examples=60, deadline=None)
@given(head=heads(), base=BASES, s=SCALES, positions=st.lists(POSITIONS, min_size=1, max_size=8))
@example(head=(128, 1.0, 128), base=1e4, s=4.0, positions=[0, 1, 7, 4096, 10**6])
def test_position_interpolation_is_plain_rope_at_m_over_s(head, base, s, positions):
    """PI's table at position m equals plain RoPE's at m/s. The two use different fp32 roundings of
    the frequency (fp32(theta/s) vs fp32(theta)/s), which moves the angle m theta/s by at most 2^-23
    of itself; beyond that only the fp32 rounding of cos and sin remains."""
    head_dim, p, _ = head
    lin = RopeConfig(type="linear", factor=s, base=base, partial_rotary_factor=p)
    f, a = frequencies(head_dim, lin)
    f0, a0 = frequencies(head_dim, RopeConfig(base=base, partial_rotary_factor=p))
    assert a == a0 == 1.0
    m = torch.tensor(positions, dtype=torch.int64)
    cos, sin = cos_sin_table(f, a, m)
    cos0, sin0 = cos_sin_table(f0, a0, m.double() / s)
    angle = m.double()[:, None] * f.double().repeat(2)[None, :]  # the tables' columns: pair j twice
    tol = 3e-7 + angle * 2.0**-23
    assert torch.all((cos.double() - cos0.double()).abs() <= tol)
    assert torch.all((sin.double() - sin0.double()).abs() <= tol)


@settings(max_examples=60, deadline=None)
@given(head=heads(), kind=st.sampled_from(RESCALING), base=BASES, L=CONTEXTS, data=st.data())
def test_dynamic_is_plain_rope_until_L_and_departs_beyond(head, kind, base, L, data):
    head_dim, p, _ = head
    cfg = RopeConfig(type=kind, base=base, original_context=L, partial_rotary_factor=p)  # factor 1
    reference = plain(head_dim, cfg)
    within = data.draw(st.none() | st.integers(1, L), label="seq_len <= L")
    assert same(frequencies(head_dim, cfg, within), reference)
    beyond = data.draw(st.integers(L + 1, 64 * L), label="seq_len > L")
    assert not same(frequencies(head_dim, cfg, beyond), reference)


@pytest.mark.parametrize("alpha, stretch", [(1, 2), (2, 2), (8, 2), (4, 3), (8, 16)])
def test_dynamic_ntk_factor_is_alpha(alpha, stretch):
    """rope type "dynamic" with factor alpha at l' = stretch L is static NTK-aware at s = alpha l'/L
    - (alpha - 1) (Hugging Face's formula): factor 8 at 2L is already s = 9, unlike dynamic_yarn,
    whose factor is its smallest s."""
    L = 256
    cfg = RopeConfig(type="dynamic", factor=float(alpha), original_context=L)
    assert same(frequencies(128, cfg, L), plain(128, cfg))
    s = alpha * stretch - (alpha - 1)
    ntk = RopeConfig(type="ntk", factor=float(s))
    assert same(frequencies(128, cfg, stretch * L), frequencies(128, ntk))


def test_ramp_lower_end_is_clamped_so_pair_0_is_kept_even_below_beta_fast():
    """head_dim 64, L = 128: r_0 = L / 2 pi = 20.4 < beta_fast = 32, so D(beta_fast) < 0; rounded
    down and clamped to 0, the ramp still gives pair 0 weight 0, i.e. theta_0 is kept exactly (as
    the official code does)."""
    cfg = RopeConfig(type="yarn", factor=4.0, original_context=128)
    assert rope.correction_dim(cfg.beta_fast, 64, cfg.base, 128) < 0
    assert rope.ramp_bounds(64, cfg)[0] == 0
    f, _ = frequencies(64, cfg)
    assert f[0].item() == 1.0 and f[1].item() < plain(64, cfg)[0][1].item()


@pytest.mark.parametrize("truncate", [True, False])
def test_zero_width_ramp_guard_matches_transformers(truncate):
    """L = 64 <= 2 pi beta_slow (beta_slow = 11): truncated, both ramp ends land on pair 0 and the
    official code's high += 0.001 guard decides the ramp; untruncated, the high end is below 0 (the
    clamped-ramp edge recorded as expected failures below). Either way rope.py computes what
    transformers does."""
    pytest.importorskip("transformers")
    params = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 11.0,
        "truncate": truncate,
    }
    cfg = hf.from_hf(params, max_position_embeddings=256)
    if truncate:
        assert rope.ramp_bounds(64, cfg) == (0, 0)
    theirs, their_factor = hf_oracle(params, 64, 256, None)
    ours, our_factor = hf.hf_inv_freq(dict(params), 64, 256, None)
    assert torch.allclose(ours.double(), theirs.double(), rtol=1e-6, atol=0)
    assert our_factor == pytest.approx(float(their_factor), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(setup=setups(types=("dynamic_yarn",), temperature=True), data=st.data())
def test_dynamic_yarn_at_length_sL_is_static_yarn_at_s(setup, data):
    """Dynamic YaRN at total length l' is static YaRN at s = l'/L; never below the fine-tuned
    factor."""
    head_dim, cfg, _ = setup
    L = cfg.original_context
    seq_len = data.draw(st.integers(L, 64 * L), label="seq_len")
    stretched = cfg.replace(factor=1.0)
    yarn = cfg.replace(type="yarn", factor=seq_len / L)
    assert same(frequencies(head_dim, stretched, seq_len), frequencies(head_dim, yarn))
    short = data.draw(st.integers(1, max(1, int(cfg.factor * L))), label="seq_len <= factor * L")
    assert same(frequencies(head_dim, cfg, short), frequencies(head_dim, cfg.replace(type="yarn")))


@settings(max_examples=60, deadline=None)
@given(
    head=heads(partial=False),
    base=BASES,
    L=CONTEXTS,
    s=SCALES,
    m=POSITIONS,
    n=POSITIONS,
    seed=SEEDS,
)
def test_yarn_multiplies_logits_by_temperature(head, base, L, s, m, n, seed):
    """YaRN's logits are those without the temperature times (0.1 ln s + 1)^2 = 1/t (paper Eq. 22).
    (Full rotary: with partial rotary the factor only reaches the rotated channels, as in
    transformers.)"""
    head_dim, p, _ = head
    cfg = RopeConfig(type="yarn", factor=s, base=base, original_context=L, partial_rotary_factor=p)
    f, a = frequencies(head_dim, cfg)
    root = 0.1 * math.log(s) + 1
    assert a == pytest.approx(root, rel=1e-12)
    f1, a1 = frequencies(head_dim, cfg.replace(attention_factor=1.0))
    assert torch.equal(f, f1) and a1 == 1.0
    q, k = random_vectors(seed, 2, head_dim)

    def logit(factor):
        cos, sin = cos_sin_table(f, factor, torch.tensor([m, n]))
        return float(
            apply_rope(q[None], cos[:1], sin[:1])[0] @ apply_rope(k[None], cos[1:], sin[1:])[0]
        )

    assert logit(a) == pytest.approx(
        root**2 * logit(1.0), abs=1e-5 * root**2 * float(q.norm() * k.norm())
    )


@pytest.mark.parametrize(
    "s, root", [(2, 1.0693), (4, 1.1386), (8, 1.2079), (16, 1.2773), (32, 1.3466)]
)
def test_yarn_temperature_values(s, root):
    _, a = frequencies(128, RopeConfig(type="yarn", factor=float(s), original_context=4096))
    assert round(a, 4) == root
    assert round(rope.yarn_mscale(s), 4) == root


@settings(max_examples=60, deadline=None)
@given(head=heads(), base=BASES, s=STRETCHES)
def test_ntk_aware_interpolates_only_the_last_pair(head, base, s):
    """Paper App. A.1: b' = b s^(|D|/(|D|-2)) makes the last pair theta/s (up to fp32 rounding);
    the others lie between theta/s and theta."""
    head_dim, p, _ = head
    cfg = RopeConfig(type="ntk", factor=s, base=base, partial_rotary_factor=p)
    f, a = frequencies(head_dim, cfg)
    assert a == 1.0
    keep, interp = plain(head_dim, cfg)[0], interpolated(head_dim, cfg)[0]
    torch.testing.assert_close(f[-1], interp[-1], rtol=2.0**-22, atol=0.0)
    assert f[0] == keep[0]
    assert torch.all(interp[1:-1] < f[1:-1]) and torch.all(f[1:-1] < keep[1:-1])


# --------------------------------------------------------------------------------------------------
# 3. Relative position and norm


@settings(max_examples=120, deadline=None)
@given(setup=setups(temperature=True), m=POSITIONS, n=POSITIONS, delta=POSITIONS, seed=SEEDS)
@example(
    setup=(128, RopeConfig(type="yarn", factor=16.0, original_context=4096), None),
    m=10**6,
    n=3,
    delta=10**6,
    seed=0,
)
def test_logits_depend_only_on_relative_position(setup, m, n, delta, seed):
    """<R(m) q, R(n) k> = <R(m + delta) q, R(n + delta) k> for every variant
    (fp32 rotation: rtol 1e-4 of a^2|q||k|)."""
    head_dim, cfg, seq_len = setup
    f, a = frequencies(head_dim, cfg, seq_len)
    cos, sin = cos_sin_table(f, a, torch.tensor([m, n, m + delta, n + delta]))
    q, k = random_vectors(seed, 2, head_dim)
    rq = apply_rope(q.expand(4, head_dim), cos, sin)
    rk = apply_rope(k.expand(4, head_dim), cos, sin)
    scale = a * a * float(q.norm() * k.norm())
    assert float(rq[0] @ rk[1]) == pytest.approx(float(rq[2] @ rk[3]), abs=1e-4 * scale)


@settings(max_examples=80, deadline=None)
@given(
    setup=setups(temperature=True),
    positions=st.lists(POSITIONS, min_size=1, max_size=6),
    seed=SEEDS,
)
def test_rotation_scales_norm_by_attention_factor(setup, positions, seed):
    """|R(m) x| = a |x| on the rotated channels; the others pass through unchanged."""
    head_dim, cfg, seq_len = setup
    f, a = frequencies(head_dim, cfg, seq_len)
    dim = 2 * f.numel()
    cos, sin = cos_sin_table(f, a, torch.tensor(positions))
    x = random_vectors(seed, len(positions), head_dim)
    y = apply_rope(x, cos, sin)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(
        y[:, :dim].norm(dim=-1), a * x[:, :dim].norm(dim=-1), rtol=1e-5, atol=0.0
    )
    assert torch.equal(y[:, dim:], x[:, dim:])


# --------------------------------------------------------------------------------------------------
# 4. No unseen angles


@st.composite
def extension(draw):
    """(head_dim, p, base, L, L') with at least one pair of wavelength >= L,
    and L' = s L an integer >= 2L."""
    head_dim, p, dim = draw(heads())
    base = draw(BASES)
    longest = 2 * math.pi * base ** ((dim - 2) / dim)  # lambda of the last pair
    assume(longest >= 64)
    L = draw(st.integers(64, min(16384, math.floor(longest))))
    return head_dim, p, base, L, draw(st.integers(2 * L, 64 * L))


@settings(max_examples=80, deadline=None)
@given(ext=extension(), beta=betas(), truncate=st.booleans())
@example(ext=(128, 1.0, 1e4, 4096, 16 * 4096), beta=(32.0, 1.0), truncate=True)
def test_no_unseen_angles(ext, beta, truncate):
    """Paper Sec. 3.1-3.2. On pairs with lambda_d >= L, plain RoPE never completes a rotation inside
    the pretraining window: the largest angle it was trained on is L theta_d. At scale s the largest
    position is sL - 1. PI, NTK-by-parts and YaRN (beta_slow >= 1) keep (sL - 1) theta'_d <= L
    theta_d on every such pair: no angle the model never saw. Plain RoPE (s >= 2) exceeds it.
    NTK-aware exceeds it on every such pair but the last, which it interpolates exactly (theta/s, up
    to rounding): its pair d gets theta_d s^(-2d/(|D|-2)), so (sL - 1) theta'_d > L theta_d exactly
    when L (s - s^(2d/(|D|-2))) > 1. That holds for all but the last pair unless s L is small
    against |D| (e.g. s = 2, L = 64, |D| = 256: pair 126 reaches 0.998 L theta); the test checks the
    exceedance where that margin is clear of fp32 rounding."""
    head_dim, p, base, L, Lp = ext
    s = Lp / L
    last = Lp - 1  # the largest position inside the extended window
    common = dict(base=base, partial_rotary_factor=p)
    theta = frequencies(head_dim, RopeConfig(**common))[0].double()
    dim = 2 * theta.numel()
    unseen = 2 * math.pi / rope.base_inv_freq(dim, base) >= L  # lambda_d >= L
    assert unseen.any()
    bound = L * theta[unseen]
    extended = [
        RopeConfig(type="linear", factor=s, **common),
        *(
            RopeConfig(
                type=kind,
                factor=s,
                original_context=L,
                beta_fast=beta[0],
                beta_slow=max(beta[1], 1.0),
                truncate=truncate,
                **common,
            )
            for kind in ("ntk_by_parts", "yarn")
        ),
    ]
    for cfg in extended:
        f = frequencies(head_dim, cfg)[0].double()
        assert torch.all(last * f[unseen] <= bound), cfg.type
    assert torch.all(last * theta[unseen] > bound)  # plain RoPE goes beyond
    ntk = frequencies(head_dim, RopeConfig(type="ntk", factor=s, **common))[0].double()
    assert last * ntk[-1] <= L * theta[-1]  # the last pair is interpolated
    d = torch.arange(dim // 2, dtype=torch.float64)
    ideal = (
        last * s ** (-2 * d / (dim - 2)) / L - 1
    )  # relative excess of NTK-aware's angle, exact arithmetic
    clear = unseen & (d < dim // 2 - 1) & (ideal > 1e-5)
    assert torch.all(last * ntk[clear] > L * theta[clear])


# --------------------------------------------------------------------------------------------------
# 5. Config validation

FINITE = dict(allow_nan=False, allow_infinity=False)


def unit_divisors(kind, pairs):
    """The short_factor / long_factor a longrope config needs to exist (divisors of 1); nothing for
    the others."""
    return (
        dict(short_factor=(1.0,) * pairs, long_factor=(1.0,) * pairs) if kind == "longrope" else {}
    )


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(VARIANTS), factor=st.floats(max_value=1.0, exclude_max=True, **FINITE))
@example(kind="yarn", factor=0.999999)
def test_factor_below_one_rejected(kind, factor):
    with pytest.raises(ValueError, match=r"rope factor\b"):
        RopeConfig(type=kind, factor=factor, original_context=4096)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(BY_PARTS), slow=st.floats(0.01, 100.0), less=st.floats(0.0, 100.0))
@example(kind="yarn", slow=1.0, less=0.0)
def test_beta_fast_not_above_beta_slow_rejected(kind, slow, less):
    with pytest.raises(ValueError, match=r"rope beta_fast\b"):
        RopeConfig(
            type=kind, factor=2.0, original_context=4096, beta_fast=slow - less, beta_slow=slow
        )


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(VARIANTS), half=st.integers(1, 128))
def test_odd_head_dim_rejected(kind, half):
    cfg = RopeConfig(type=kind, factor=2.0, original_context=4096, **unit_divisors(kind, half))
    with pytest.raises(ValueError, match=r"head_dim"):
        frequencies(2 * half + 1, cfg)


@pytest.mark.parametrize(
    "head_dim, partial", [(10, 0.5), (64, 0.25 + 1 / 64), (6, 0.5), (20, 0.25)]
)
def test_odd_partial_rotary_dim_rejected(head_dim, partial):
    assert int(head_dim * partial) % 2 == 1
    cfg = RopeConfig(type="yarn", factor=2.0, original_context=4096, partial_rotary_factor=partial)
    with pytest.raises(ValueError, match=r"partial_rotary_factor"):
        frequencies(head_dim, cfg)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(rope.NEEDS_ORIGINAL_CONTEXT), L=st.integers(-(2**40), 0))
@example(kind="yarn", L=0)
def test_missing_original_context_rejected(kind, L):
    with pytest.raises(ValueError, match=r"original_context"):
        RopeConfig(type=kind, factor=2.0, original_context=L)


@settings(max_examples=30, deadline=None)
@given(kind=st.text(max_size=20).filter(lambda t: t not in VARIANTS))
@example(kind="YaRN")
@example(kind="ntk-by-parts")
def test_unknown_type_rejected_listing_known_ones(kind):
    with pytest.raises(ValueError, match=r"unknown") as caught:
        RopeConfig(type=kind)
    message = str(caught.value)
    assert all(repr(v)[1:-1] in message for v in VARIANTS)
    assert "type" in message


@settings(max_examples=30, deadline=None)
@given(base=st.floats(max_value=1.0, **FINITE))
@example(base=1.0)
def test_base_not_above_one_rejected(base):
    with pytest.raises(ValueError, match=r"rope base\b"):
        RopeConfig(base=base)


NUMERIC_FIELDS = (
    "base",
    "factor",
    "partial_rotary_factor",
    "beta_fast",
    "beta_slow",
    "low_freq_factor",
    "high_freq_factor",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", NUMERIC_FIELDS)
@pytest.mark.parametrize("kind", ["yarn", "llama3", "longrope"])
def test_non_finite_values_rejected(kind, name, value):
    kw = dict(type=kind, factor=2.0, original_context=4096, **unit_divisors(kind, 4))
    kw[name] = value
    with pytest.raises(ValueError, match=rf"rope {name}\b"):
        RopeConfig(**kw)


@settings(max_examples=30, deadline=None)
@given(low=st.floats(0.01, 100.0), less=st.floats(0.0, 100.0))
@example(low=1.0, less=0.0)
def test_llama3_band_order_rejected(low, less):
    with pytest.raises(ValueError, match=r"rope high_freq_factor\b"):
        RopeConfig(
            type="llama3",
            factor=8.0,
            original_context=8192,
            low_freq_factor=low,
            high_freq_factor=low - less,
        )


# --------------------------------------------------------------------------------------------------
# 6. Channel layout


def rotate_interleaved(x, cos, sin):
    """Meta's layout: pair j is channels (2j, 2j+1). float64 reference; cos, sin as cos_sin_table
    lays them out (pair j's cos at columns j and j + |D|/2, its sin with the sign of column j +
    |D|/2)."""
    x = x.double()
    even, odd = x[..., 0::2], x[..., 1::2]
    half = cos.shape[-1] // 2
    c, s = cos[..., :half].double(), sin[..., half:].double()
    out = torch.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = odd * c + even * s
    return out


@settings(max_examples=60, deadline=None)
@given(
    setup=setups(partial=False, temperature=True),
    positions=st.lists(POSITIONS, min_size=1, max_size=6),
    seed=SEEDS,
)
def test_interleaved_layout_is_a_permutation_of_half_split(setup, positions, seed):
    head_dim, cfg, seq_len = setup
    perm = hf.interleaved_to_half_split(head_dim)
    assert torch.equal(perm.sort().values, torch.arange(head_dim))
    f, a = frequencies(head_dim, cfg, seq_len)
    cos, sin = cos_sin_table(f, a, torch.tensor(positions))
    x = random_vectors(seed, len(positions), head_dim)
    expected = rotate_interleaved(x, cos, sin)[..., perm]
    torch.testing.assert_close(
        apply_rope(x[..., perm], cos, sin), expected, rtol=0.0, atol=2e-6 * a
    )


# --------------------------------------------------------------------------------------------------
# 7. Hugging Face parity


ABSENT = object()


def optional(strategy, absent=True):
    """The value, None, or (when absent) the key left out."""
    choices = [strategy, st.none()] + ([st.just(ABSENT)] if absent else [])
    return st.one_of(*choices)


@st.composite
def hf_parameters(draw, rope_type):
    """(rope_parameters, head_dim, max_position_embeddings, seq_len) that transformers accepts and
    rope.py must agree with: even rotary dim >= 4, factor >= 1, beta_fast > beta_slow once
    defaulted, attention_factor > 0, high_freq_factor > low_freq_factor, |D|/2 positive longrope
    divisors. Optional keys are sometimes absent."""
    head_dim = 2 * draw(st.integers(2, 128))
    params = {"rope_type": rope_type}

    def put(key, value):
        if value is not ABSENT:
            params[key] = value

    put("rope_theta", draw(st.one_of(BASES, st.just(ABSENT))))
    partial = draw(
        st.one_of(st.just(ABSENT), st.sampled_from([1.0, 0.5, 0.25]), st.floats(0.05, 1.0))
    )
    dim = head_dim
    if partial is not ABSENT:
        dim = int(head_dim * partial)
        assume(dim >= 4 and dim % 2 == 0)
        params["partial_rotary_factor"] = partial
    mp = draw(st.integers(64, 65536))
    seq_len = None
    if rope_type in ("linear", "dynamic", "llama3"):
        params["factor"] = draw(SCALES)
    if rope_type == "dynamic":
        seq_len = draw(st.none() | st.integers(1, 64 * mp))
        # transformers' dynamic type takes L from max_position_embeddings and ignores this key; so
        # must rope.py
        put("original_max_position_embeddings", draw(st.one_of(CONTEXTS, st.just(ABSENT))))
    if rope_type in ("yarn", "llama3", "longrope"):
        put("original_max_position_embeddings", draw(st.one_of(CONTEXTS, st.just(ABSENT))))
    original = params.get("original_max_position_embeddings", mp)
    if rope_type == "longrope":
        # factor absent or None: transformers takes s = max_position_embeddings / L, also when it is
        # below 1 (then its attention factor is 1, as at s = 1)
        put("factor", draw(optional(SCALES)))
        put("attention_factor", draw(optional(st.floats(0.1, 4.0))))
        params.update(
            short_factor=draw(divisor_lists(dim // 2)), long_factor=draw(divisor_lists(dim // 2))
        )
        seq_len = draw(seq_lens(original))
    if rope_type == "yarn":
        factor = draw(st.one_of(SCALES, st.none()))
        if factor is None:
            assume(mp >= original)  # transformers then takes s = max_position_embeddings / original
        params["factor"] = factor
        put("beta_fast", draw(optional(st.one_of(st.floats(1.0, 64.0), st.just(0)))))
        put("beta_slow", draw(optional(st.one_of(st.floats(0.25, 8.0), st.just(0)))))
        assume((params.get("beta_fast") or 32) > (params.get("beta_slow") or 1))
        put("attention_factor", draw(optional(st.floats(0.1, 4.0))))
        put("mscale", draw(optional(st.one_of(st.floats(0.0, 2.0), st.just(0)))))
        put("mscale_all_dim", draw(optional(st.one_of(st.floats(0.0, 2.0), st.just(0)))))
        put("truncate", draw(st.sampled_from([True, False, ABSENT])))
    if rope_type == "llama3":
        low = draw(st.floats(0.25, 4.0))
        params.update(low_freq_factor=low, high_freq_factor=low + draw(st.floats(0.1, 16.0)))
    return params, head_dim, mp, seq_len


def hf_oracle(params, head_dim, mp, seq_len):
    """transformers' own frequencies for the config (rope_check's adapter). Its 'default' ignores
    partial_rotary_factor (Llama has no partial rotary); linear with factor 1 is plain RoPE that
    honours it."""
    if params["rope_type"] == "default" and params.get("partial_rotary_factor", 1.0) != 1.0:
        params = dict(params, rope_type="linear", factor=1.0)
    return rope_check.transformers_impl(params, head_dim, mp, seq_len)


U32 = 2.0**-24  # fp32 unit roundoff


def hf_tolerance(params, head_dim, mp, seq_len, ours):
    """Per-pair bound on |rope.py - transformers|. rope.py forms theta_d in float64 and rounds once;
    transformers works in fp32 throughout, so its errors are the bound:
      b ** (2d/|D|) with b and the exponent rounded to fp32: (1 + (2d/|D|)(1 + ln b)) u relative,
      plus a few u for pow, reciprocal and scaling (b the effective base: dynamic NTK's grows with
      seq_len);
      yarn's ramp w = (d - low)/(high - low) and llama3's blend weight
      (L/lambda_d - low)/(high - low) in fp32: an error dw moves the blend theta/s (1 - w) + theta w
      by theta (1 - 1/s) dw, which is large against the value when s is large and the band narrow.
      Measured: a few u on most pairs, up to ~300 u on blend pairs;
      longrope's divisor, rounded to fp32 and multiplied in, adds two u (inside the few u above).
    Doubled for slack; a wrong formula (a pair off in the ramp, another temperature, ...) is far
    outside."""
    base = float(params.get("rope_theta", 10000.0))
    dim = 2 * ours.numel()
    x = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    theta = base**-x
    kind = params["rope_type"]
    effective = base
    if kind == "dynamic":
        f = params["factor"]
        length = max(seq_len or mp, mp)
        effective = base * (f * length / mp - (f - 1)) ** (dim / (dim - 2))
    tol = 2 * U32 * (6 + x * (1 + math.log(effective))) * ours.double().abs()
    weight, width, scale = None, None, 1.0
    if kind == "yarn":
        L = params.get("original_max_position_embeddings", mp)
        scale = params["factor"] if params["factor"] is not None else mp / L
        log_b = math.log(base)

        def corr(rotations):
            return dim * math.log(L / (2 * math.pi * rotations)) / (2 * log_b)

        low, high = corr(params.get("beta_fast") or 32), corr(params.get("beta_slow") or 1)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        d = torch.arange(dim // 2, dtype=torch.float64)
        weight, width = (d - low) / (high - low), abs(high - low)
        spread = (abs(low) + (d - low).abs()) / width
    if kind == "llama3":
        L = params.get("original_max_position_embeddings", mp)
        scale, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        r = L * theta / (2 * math.pi)
        weight, width = (r - lo) / (hi - lo), hi - lo
        spread = 4 * (r.abs() + lo) / width
    if weight is not None:  # pairs inside the blend, with a margin for fp32's view of its edges
        inside = (weight > -1e-3) & (weight < 1 + 1e-3)
        tol = tol + torch.where(inside, 2 * U32 * theta * (1 - 1 / scale) * (4 + 2 * spread), 0.0)
    return tol


HF_EXAMPLES = 70  # per type; 6 types
HF_WORST = {}  # rope_type -> largest |ours - theirs| / tolerance seen (for the curious: pytest -s)


@pytest.mark.parametrize("rope_type", hf.HF_TYPES)
def test_hugging_face_parity(rope_type):
    pytest.importorskip("transformers")
    compared = []

    @settings(max_examples=HF_EXAMPLES, deadline=None)
    @given(case=hf_parameters(rope_type))
    def check(case):
        params, head_dim, mp, seq_len = case
        theirs, their_factor = hf_oracle(params, head_dim, mp, seq_len)
        ours, our_factor = hf.hf_inv_freq(dict(params), head_dim, mp, seq_len)
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape
        error = (ours.double() - theirs.double()).abs()
        tol = hf_tolerance(params, head_dim, mp, seq_len, ours)
        worst = float((error / tol).max())
        HF_WORST[rope_type] = max(HF_WORST.get(rope_type, 0.0), worst)
        assert worst <= 1.0, (ours, theirs, error / tol)
        assert our_factor == pytest.approx(float(their_factor), rel=1e-12)
        compared.append(params)

    check()
    assert len(compared) >= 60  # 6 types: >= 360 configurations compared in all


# --------------------------------------------------------------------------------------------------
# 8. to_hf round trip


EXPRESSED_AS = {
    "ntk": "default",
    "ntk_by_parts": "yarn",
}  # hf.to_hf's rope_type where it is not ours


@settings(max_examples=100, deadline=None)
@given(
    setup=setups(types=tuple(v for v in VARIANTS if v != "dynamic_yarn"), temperature=True),
    mp=st.integers(1, 10**6),
)
def test_to_hf_round_trip_is_exact(setup, mp):
    """hf.to_hf then hf.hf_inv_freq gives the same frequencies and attention factor, bit for bit,
    for every variant transformers can express: ntk as default with base b * s^(|D|/(|D|-2)),
    ntk_by_parts as yarn with attention_factor 1, the others as themselves. max_position_embeddings
    does not matter (the factor and L are written out), except for dynamic, where transformers reads
    L from it."""
    head_dim, cfg, seq_len = setup
    if cfg.type == "dynamic":
        mp = cfg.original_context
    params = hf.to_hf(cfg, head_dim)
    assert params["rope_type"] == EXPRESSED_AS.get(cfg.type, cfg.type)
    assert same(hf.hf_inv_freq(params, head_dim, mp, seq_len), frequencies(head_dim, cfg, seq_len))


@settings(max_examples=30, deadline=None)
@given(setup=setups(types=("dynamic_yarn",)))
def test_to_hf_refuses_variants_without_equivalent(setup):
    """Dynamic YaRN is the one variant transformers has no type for."""
    head_dim, cfg, _ = setup
    with pytest.raises(ValueError, match=r"no Hugging Face equivalent"):
        hf.to_hf(cfg, head_dim)


# --------------------------------------------------------------------------------------------------
# 9. Tables


@settings(max_examples=60, deadline=None)
@given(
    setup=setups(temperature=True),
    positions=st.lists(st.integers(0, 10**6), min_size=1, max_size=6),
)
@example(
    setup=(128, RopeConfig(type="yarn", factor=16.0, original_context=4096), None),
    positions=[10**6],
)
def test_tables_are_fp32_with_float64_angles(setup, positions):
    """cos/sin tables are fp32, but the angle m theta'_d is formed in float64: at m = 1,000,000 an
    fp32 angle would be off by up to ~0.03 rad."""
    head_dim, cfg, seq_len = setup
    f, a = frequencies(head_dim, cfg, seq_len)
    assert f.dtype == torch.float32
    positions = positions + [10**6]
    cos, sin = cos_sin_table(f, a, torch.tensor(positions))
    assert cos.dtype == sin.dtype == torch.float32
    assert cos.shape == sin.shape == (len(positions), 2 * f.numel())  # a column per rotated channel
    freqs = f.tolist()
    want_cos = torch.tensor(
        [[math.cos(m * w) * a for w in freqs] for m in positions], dtype=torch.float64
    )
    want_sin = torch.tensor(
        [[math.sin(m * w) * a for w in freqs] for m in positions], dtype=torch.float64
    )
    half = f.numel()  # pair j is (j, j + half): cos in both columns, -sin then +sin
    for got, want in (
        (cos[:, :half], want_cos),
        (cos[:, half:], want_cos),
        (sin[:, :half], -want_sin),
        (sin[:, half:], want_sin),
    ):
        assert (got.double() - want).abs().max() < 1e-6 * max(a, 1.0)


# --------------------------------------------------------------------------------------------------
# 10. LongRoPE: a divisor per pair, short_factor up to L and long_factor past it


def divided(head_dim, cfg, divisors):
    """theta_d / f_d from plain RoPE's fp32 theta_d, in float64 (within one fp32 rounding of
    rope.py's)."""
    return plain(head_dim, cfg)[0].double() / torch.tensor(divisors, dtype=torch.float64)


def assert_divided(freqs, expected):
    """freqs (fp32) is expected (float64) up to the two fp32 roundings between them (theta_d's and
    the result's)."""
    torch.testing.assert_close(freqs.double(), expected, rtol=2.0**-23, atol=0.0)


@settings(max_examples=60, deadline=None)
@given(setup=setups(types=("longrope",), temperature=True), data=st.data())
def test_longrope_long_factors_apply_only_past_L(setup, data):
    """l' <= L, or unknown: theta_d / short_factor_d, whatever long_factor is. l' > L: theta_d /
    long_factor_d, whatever short_factor is. The attention factor is the same on both sides."""
    head_dim, cfg, _ = setup
    L = cfg.original_context
    within = data.draw(st.none() | st.integers(1, L), label="l' <= L")
    beyond = data.draw(st.integers(L + 1, 64 * L), label="l' > L")
    others = tuple(2.0 * f + 1.0 for f in cfg.short_factor)  # another divisor on every pair
    short, a_short = frequencies(head_dim, cfg, within)
    assert_divided(short, divided(head_dim, cfg, cfg.short_factor))
    assert same((short, a_short), frequencies(head_dim, cfg.replace(long_factor=others), within))
    long, a_long = frequencies(head_dim, cfg, beyond)
    assert_divided(long, divided(head_dim, cfg, cfg.long_factor))
    assert same((long, a_long), frequencies(head_dim, cfg.replace(short_factor=others), beyond))
    assert a_short == a_long


def test_longrope_switches_at_L_exactly():
    """Phi-3-mini-128k's shape (L = 4096, s = 32, |D| = 96): the short factors at l' = L, the long
    ones at L + 1."""
    cfg = RopeConfig(
        type="longrope",
        factor=32.0,
        original_context=4096,
        short_factor=(1.0,) * 48,
        long_factor=tuple(1.0 + d for d in range(48)),
    )
    assert same(frequencies(96, cfg, 4096), frequencies(96, cfg))
    assert_divided(frequencies(96, cfg, 4096)[0], divided(96, cfg, cfg.short_factor))
    assert_divided(frequencies(96, cfg, 4097)[0], divided(96, cfg, cfg.long_factor))


@settings(max_examples=60, deadline=None)
@given(setup=setups(types=("longrope",)), unit_attention=st.booleans(), data=st.data())
def test_longrope_unit_factors_are_plain_rope(setup, unit_attention, data):
    """Divisors of 1 on every pair, with attention_factor 1 (any s) or s = 1: plain RoPE bit for
    bit, at any l'."""
    head_dim, cfg, _ = setup
    ones = (1.0,) * len(cfg.short_factor)
    cfg = cfg.replace(short_factor=ones, long_factor=ones)
    cfg = cfg.replace(attention_factor=1.0) if unit_attention else cfg.replace(factor=1.0)
    seq_len = data.draw(seq_lens(cfg.original_context), label="l'")
    assert same(frequencies(head_dim, cfg, seq_len), plain(head_dim, cfg))


@pytest.mark.parametrize(
    "s, L, attention_factor, expected",
    [
        (
            32.0,
            4096,
            None,
            math.sqrt(17 / 12),
        ),  # Phi-3-mini-128k: s = 131072 / 4096, ln 32 / ln 4096 = 5/12
        (4.0, 32, None, math.sqrt(1.4)),  # ln 4 / ln 32 = 2/5
        (1.0, 4096, None, 1.0),  # no extension, no temperature
        (32.0, 4096, 0.75, 0.75),  # given: it wins
    ],
)
def test_longrope_attention_factor_values(s, L, attention_factor, expected):
    cfg = RopeConfig(
        type="longrope",
        factor=s,
        original_context=L,
        attention_factor=attention_factor,
        **unit_divisors("longrope", 8),
    )
    for seq_len in (None, L, L + 1):
        assert frequencies(16, cfg, seq_len)[1] == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("name", ["short_factor", "long_factor"])
@pytest.mark.parametrize("value", [None, (), []])
def test_longrope_missing_factors_rejected(name, value):
    kw = {**unit_divisors("longrope", 8), name: value}
    with pytest.raises(ValueError, match=rf"rope type 'longrope' needs {name}\b"):
        RopeConfig(type="longrope", factor=4.0, original_context=4096, **kw)


@settings(max_examples=40, deadline=None)
@given(head=heads(), name=st.sampled_from(["short_factor", "long_factor"]), data=st.data())
def test_longrope_factors_of_the_wrong_length_rejected(head, name, data):
    """The lists must have |D|/2 entries for the head they meet: rope.rotary_dim (so
    rope.frequencies) and ModelConfig raise naming the field, the count and the |D|/2
    expected."""
    from model import ModelConfig

    head_dim, p, dim = head
    n = data.draw(st.integers(1, 160).filter(lambda n: n != dim // 2), label="entries")
    kw = {**unit_divisors("longrope", dim // 2), name: (1.0,) * n}
    cfg = RopeConfig(
        type="longrope", factor=4.0, original_context=4096, partial_rotary_factor=p, **kw
    )
    match = rf"rope {name} has {n} numbers; rotary dim {dim} has {dim // 2} frequency pairs"
    with pytest.raises(ValueError, match=match):
        rope.rotary_dim(head_dim, cfg)
    with pytest.raises(ValueError, match=match):
        frequencies(head_dim, cfg)
    with pytest.raises(ValueError, match=match):
        ModelConfig(n_head=2, d_model=2 * head_dim, rope=cfg)


@pytest.mark.parametrize(
    "bad", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, True, "1", None, 10**400]
)
@pytest.mark.parametrize("name", ["short_factor", "long_factor"])
def test_longrope_non_positive_or_non_finite_divisors_rejected(name, bad):
    factors = [1.0, 2.0, bad, 4.0]
    kw = {**unit_divisors("longrope", 4), name: factors}
    with pytest.raises(ValueError, match=rf"rope {name} must be a tuple of numbers > 0"):
        RopeConfig(type="longrope", factor=4.0, original_context=4096, **kw)


@pytest.mark.parametrize("value", ["1111", 1.0, {0: 1.0}])
def test_longrope_factors_that_are_not_lists_rejected(value):
    with pytest.raises(ValueError, match=r"rope short_factor must be a tuple"):
        RopeConfig(
            type="longrope",
            factor=4.0,
            original_context=4096,
            short_factor=value,
            long_factor=(1.0,) * 4,
        )


def test_longrope_divisors_too_small_for_fp32_rejected():
    """theta_0 / f_0 = 1 / 1e-300 is no fp32 number: an error naming the list, not infinite
    frequencies (only the list in use is computed, so the other may be anything positive)."""
    cfg = RopeConfig(
        type="longrope",
        factor=4.0,
        original_context=64,
        short_factor=(1.0,) * 8,
        long_factor=(1e-300,) + (1.0,) * 7,
    )
    assert torch.isfinite(frequencies(16, cfg)[0]).all()
    with pytest.raises(ValueError, match=r"rope long_factor has entries so small"):
        frequencies(16, cfg, 65)


def test_longrope_attention_factor_needs_L_above_one():
    """sqrt(1 + ln s / ln L) divides by ln L = 0 at L = 1: a ValueError, unless attention_factor is
    given."""
    cfg = RopeConfig(
        type="longrope", factor=4.0, original_context=1, **unit_divisors("longrope", 8)
    )
    with pytest.raises(ValueError, match=r"original_context >= 2"):
        frequencies(16, cfg)
    assert frequencies(16, cfg.replace(attention_factor=1.5))[1] == 1.5
    assert frequencies(16, cfg.replace(factor=1.0))[1] == 1.0
