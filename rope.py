"""Rotary position embeddings (RoPE) and the context-extension methods compared in the YaRN paper (Peng, Quesnelle,
Fan, Shippole, arXiv 2309.00071), side by side as small pure functions. The paper's notation:
    |D|  rotary dimension (rotated channels: head_dim, or a fraction of it); d = 0 .. |D|/2 - 1 the pair index
    b    base ("rope_theta"); theta_d = b^(-2d/|D|) pair d's angular frequency, lambda_d = 2 pi / theta_d its
         wavelength in tokens
    L    the original (pretraining) context; s the scale factor, L' = s L the extended context
    r_d  = L / lambda_d, the full rotations pair d makes inside L
    t    the attention temperature: YaRN multiplies the logits by 1/t, sqrt(1/t) = 0.1 ln(s) + 1
Every variant is a function (rotary_dim, cfg, seq_len) -> (inv_freq, attention_factor): fp32 frequencies theta'_d
(pair d's angle at position m is m theta'_d) and a factor folded into cos and sin, so q.k gets its square (YaRN's
1/t); seq_len is the current length l', read by the dynamic variants only. Pairs are half-split, channel j with
j + |D|/2, as in Hugging Face (hf.interleaved_to_half_split converts Meta's (2j, 2j+1)). Frequencies and angles are
formed in float64, kept in float32, never in bf16 (whose positions collide above 256).
"""

import math
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch


# Config
@dataclass(frozen=True)
class RopeConfig:
    """One RoPE variant and its parameters. Field names follow Hugging Face's rope_parameters where they exist."""

    type: str = "default"  # the variant: default linear ntk dynamic ntk_by_parts yarn dynamic_yarn llama3 longrope
    base: float = 10000.0  # b
    factor: float = 1.0  # s; dynamic_yarn: the smallest s; dynamic (NTK): HF's alpha (1 = plain RoPE up to L)
    original_context: int = 0  # L, the pretraining context (0 = not set; required by the variants that read it)
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated; the rest passes through
    beta_fast: float = 32.0  # the paper's beta: pairs with more rotations r_d in L keep theta_d (NTK-by-parts, YaRN)
    beta_slow: float = 1.0  # the paper's alpha: pairs with fewer rotations r_d in L get theta_d / s; a ramp between
    truncate: bool = True  # round the ramp ends to whole pairs (floor/ceil), as the official code and HF do
    attention_factor: float | None = None  # YaRN's sqrt(1/t), folded into cos/sin; None = DeepSeek's or 0.1 ln s + 1
    mscale: float | None = None  # DeepSeek-V2: with mscale_all_dim set too, sqrt(1/t) = m(s, mscale) / m(s, all_dim)
    mscale_all_dim: float | None = None  # DeepSeek-V2, as mscale; m(s, c) = 0.1 c ln s + 1
    low_freq_factor: float = 1.0  # Llama 3: wavelengths over L / low_freq_factor get theta_d / s
    high_freq_factor: float = 4.0  # Llama 3: wavelengths under L / high_freq_factor keep theta_d; a blend between
    short_factor: tuple[float, ...] | None = None  # LongRoPE: a divisor per pair (|D|/2 numbers) while l' <= L
    long_factor: tuple[float, ...] | None = None  # LongRoPE: a divisor per pair (|D|/2 numbers) once l' > L

    def __post_init__(self):
        for name in ("short_factor", "long_factor"):  # JSON gives lists; a frozen config holds tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        validate(self)

    def replace(self, **changes) -> "RopeConfig":
        return RopeConfig(**{**asdict(self), **changes})

    @property
    def is_dynamic(self) -> bool:
        return self.type in DYNAMIC_VARIANTS


# The variants: (rotary_dim, cfg, seq_len) -> (inv_freq fp32 [|D|/2], attention_factor)
def base_inv_freq(dim: int, base: float) -> torch.Tensor:
    """theta_d = b^(-2d/|D|), d = 0 .. |D|/2 - 1, in float64."""
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def default_rope(dim, cfg, seq_len=None):
    """Plain RoPE (Su et al.): theta_d."""
    return base_inv_freq(dim, cfg.base).float(), 1.0


def linear_rope(dim, cfg, seq_len=None):
    """Position Interpolation (Chen et al.): positions m -> m/s, i.e. theta_d / s for every pair."""
    return (base_inv_freq(dim, cfg.base) / cfg.factor).float(), 1.0


def ntk_base(base: float, dim: int, scale: float) -> float:
    """NTK-aware base change (paper Eq. 16): b' = b * s^(|D|/(|D|-2)). It makes the last pair exactly PI's theta/s."""
    if dim <= 2:
        raise ValueError(f"NTK-aware scaling needs a rotary dim > 2 (the exponent is |D|/(|D|-2)), got {dim}")
    return base * scale ** (dim / (dim - 2))


def ntk_rope(dim, cfg, seq_len=None):
    """NTK-aware (static): plain RoPE with base b' = b * s^(|D|/(|D|-2)). No temperature."""
    return base_inv_freq(dim, ntk_base(cfg.base, dim, cfg.factor)).float(), 1.0


def dynamic_ntk_rope(dim, cfg, seq_len=None):
    """Dynamic NTK, transformers' `dynamic` with alpha = factor: b' = b (alpha l'/L - (alpha - 1))^(|D|/(|D|-2)),
    l' = max(seq_len, L); plain RoPE while l' <= L."""
    L = cfg.original_context
    length = max(seq_len or L, L)
    alpha = cfg.factor
    return base_inv_freq(dim, ntk_base(cfg.base, dim, alpha * length / L - (alpha - 1))).float(), 1.0


def correction_dim(rotations: float, dim: int, base: float, L: int) -> float:
    """The (fractional) pair index d whose wavelength fits `rotations` times into L: solves L / lambda_d = r,
    d = |D| ln(L / (2 pi r)) / (2 ln b). Uses the original base b and the original L (paper Eq. 17 prints b')."""
    if not L / (2 * math.pi * rotations) > 0:
        raise ValueError(f"rope beta ({rotations} rotations) is too large for original_context {L}")
    return dim * math.log(L / (2 * math.pi * rotations)) / (2 * math.log(base))


def ramp_bounds(dim: int, cfg: RopeConfig) -> tuple[float, float]:
    """Pair indices (low, high) where the ramp starts and ends: below low r_d > beta_fast, above high r_d < beta_slow.
    Rounded outward when cfg.truncate and clamped to [0, |D|-1], as the official code and transformers do; a bound
    outside that range (beta_fast < 1, or L < 2 pi beta_slow) can flip the ramp (tests/test_rope.py's xfails)."""
    low = correction_dim(cfg.beta_fast, dim, cfg.base, cfg.original_context)
    high = correction_dim(cfg.beta_slow, dim, cfg.base, cfg.original_context)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def ramp(dim: int, cfg: RopeConfig) -> torch.Tensor:
    """Each pair's interpolation weight 1 - gamma(r_d), float64: 0 keeps theta_d, 1 is theta_d / s. Linear in the
    pair index between low and high, as the official code and transformers compute it (the paper's Eq. 18 is
    linear in r_d; the endpoints agree)."""
    low, high = ramp_bounds(dim, cfg)
    if low == high:
        high += 0.001  # the official code's guard against a zero-width ramp
    d = torch.arange(dim // 2, dtype=torch.float64)
    return ((d - low) / (high - low)).clamp(0.0, 1.0)


def by_parts_inv_freq(dim: int, cfg: RopeConfig, scale: float) -> torch.Tensor:
    """NTK-by-parts (paper Def. 2): h(theta_d) = (1 - gamma_d) theta_d / s + gamma_d theta_d, float64."""
    theta = base_inv_freq(dim, cfg.base)
    if scale == 1.0:
        return theta  # no extension: plain RoPE, bit for bit
    interpolate = ramp(dim, cfg)  # 1 - gamma
    return theta / scale * interpolate + theta * (1.0 - interpolate)


def yarn_mscale(scale: float, coefficient: float = 1.0) -> float:
    """sqrt(1/t) = 0.1 ln(s) + 1 (paper Eq. 22), and 1 for s <= 1. `coefficient` is DeepSeek's mscale knob."""
    return 1.0 if scale <= 1 else 0.1 * coefficient * math.log(scale) + 1.0


def yarn_attention_factor(cfg: RopeConfig, scale: float) -> float:
    """The factor folded into cos and sin (so logits get its square, 1/t)."""
    if cfg.attention_factor is not None:
        return float(cfg.attention_factor)
    if cfg.mscale and cfg.mscale_all_dim:  # DeepSeek-V2's form; truthiness as in the official/HF code
        return yarn_mscale(scale, cfg.mscale) / yarn_mscale(scale, cfg.mscale_all_dim)
    return yarn_mscale(scale)


def ntk_by_parts_rope(dim, cfg, seq_len=None):
    """NTK-by-parts: the per-pair ramp, no temperature."""
    return by_parts_inv_freq(dim, cfg, cfg.factor).float(), 1.0


def yarn_rope(dim, cfg, seq_len=None):
    """YaRN: NTK-by-parts plus the attention temperature sqrt(1/t) = 0.1 ln(s) + 1 folded into cos/sin."""
    return by_parts_inv_freq(dim, cfg, cfg.factor).float(), yarn_attention_factor(cfg, cfg.factor)


def dynamic_yarn_rope(dim, cfg, seq_len=None):
    """Dynamic YaRN (paper Sec. 3.3): YaRN at s = max(1, l'/L), never below `factor` (the s a model was fine-tuned
    at); plain RoPE while l' <= L with factor 1."""
    scale = max(cfg.factor, (seq_len or cfg.original_context) / cfg.original_context)
    return by_parts_inv_freq(dim, cfg, scale).float(), yarn_attention_factor(cfg, scale)


def llama3_rope(dim, cfg, seq_len=None):
    """Llama 3.1: wavelengths under L/high_freq_factor keep theta_d, over L/low_freq_factor get theta_d/s, and
    between them a blend linear in r_d: smooth = (r_d - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    theta = base_inv_freq(dim, cfg.base)
    L, s = cfg.original_context, cfg.factor
    if s == 1.0:
        return theta.float(), 1.0  # no extension: plain RoPE, bit for bit
    wavelength = 2 * math.pi / theta
    smooth = (L / wavelength - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    blended = (1 - smooth) * theta / s + smooth * theta
    inv_freq = torch.where(wavelength > L / cfg.low_freq_factor, theta / s, blended)
    inv_freq = torch.where(wavelength < L / cfg.high_freq_factor, theta, inv_freq)
    return inv_freq.float(), 1.0


def longrope_rope(dim, cfg, seq_len=None):
    """LongRoPE (Ding et al. 2024), as Hugging Face's `longrope` (Phi-3): theta_d / f_d with a searched divisor f_d
    per pair, f = short_factor while l' <= L (or l' unknown) and long_factor once l' > L. The attention factor does
    not depend on l': attention_factor when given, else sqrt(1 + ln s / ln L) for s > 1 and 1 for s <= 1, s being
    `factor` (Hugging Face's default for it, max_position_embeddings / L, is hf.from_hf's business)."""
    L, s = cfg.original_context, cfg.factor
    name = "long_factor" if (seq_len or 0) > L else "short_factor"
    divisors = torch.tensor(getattr(cfg, name), dtype=torch.float64)
    inv_freq = (base_inv_freq(dim, cfg.base) / divisors).float()
    if not bool(torch.isfinite(inv_freq).all()):
        raise ValueError(f"rope {name} has entries so small that theta_d / {name}_d overflows float32 "
                         f"(theta_0 = 1): {getattr(cfg, name)!r}")
    if cfg.attention_factor is not None:
        return inv_freq, float(cfg.attention_factor)
    if s <= 1:
        return inv_freq, 1.0
    if L < 2:
        raise ValueError(f"rope type 'longrope' with factor {s} > 1 needs original_context >= 2 for its attention "
                         f"factor sqrt(1 + ln s / ln L), got {L}; or give attention_factor")
    return inv_freq, math.sqrt(1 + math.log(s) / math.log(L))


# The dispatch: each variant's function and what it reads; the lists of variants below are derived from it
class Variant(NamedTuple):
    frequencies: Callable  # (rotary_dim, cfg, seq_len) -> (inv_freq, attention_factor)
    dynamic: bool = False  # its frequencies depend on the current length l'
    needs_L: bool = False  # it reads original_context, L


ROPE_VARIANTS = {
    "default": Variant(default_rope),
    "linear": Variant(linear_rope),
    "ntk": Variant(ntk_rope),
    "dynamic": Variant(dynamic_ntk_rope, dynamic=True, needs_L=True),
    "ntk_by_parts": Variant(ntk_by_parts_rope, needs_L=True),
    "yarn": Variant(yarn_rope, needs_L=True),
    "dynamic_yarn": Variant(dynamic_yarn_rope, dynamic=True, needs_L=True),
    "llama3": Variant(llama3_rope, needs_L=True),
    "longrope": Variant(longrope_rope, dynamic=True, needs_L=True),  # short or long factors by l'
}
VARIANTS = tuple(ROPE_VARIANTS)
DYNAMIC_VARIANTS = tuple(name for name, v in ROPE_VARIANTS.items() if v.dynamic)
NEEDS_ORIGINAL_CONTEXT = tuple(name for name, v in ROPE_VARIANTS.items() if v.needs_L)


# A head's frequencies, the tables, and applying them
def rotary_dim(head_dim: int, cfg: RopeConfig) -> int:
    """|D|: the number of rotated channels of a head; must be even (channels rotate in pairs)."""
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    dim = int(head_dim * cfg.partial_rotary_factor)
    if dim < 2 or dim % 2:
        raise ValueError(
            f"rotary dim = int(head_dim {head_dim} * partial_rotary_factor {cfg.partial_rotary_factor}) = {dim} "
            "must be even and >= 2; change head_dim or partial_rotary_factor"
        )
    for name in ("short_factor", "long_factor"):
        if cfg.type == "longrope" and len(getattr(cfg, name)) != dim // 2:
            raise ValueError(f"rope {name} has {len(getattr(cfg, name))} numbers; rotary dim {dim} has {dim // 2} "
                             "frequency pairs, and LongRoPE needs one divisor per pair")
    return dim


def inv_freq(head_dim: int, cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Frequencies (fp32, |D|/2) and attention factor of variant cfg for heads of head_dim, at current length l'."""
    return ROPE_VARIANTS[cfg.type].frequencies(rotary_dim(head_dim, cfg), cfg, seq_len)


def cos_sin_table(inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor):
    """The tables apply_rope reads, fp32, a row per position m and a column per rotated channel: for the pair
    (j, j + |D|/2) at angle m theta'_j, cos is a cos(m theta'_j) in both columns and sin is -a sin(m theta'_j) in
    column j, +a sin(m theta'_j) in column j + |D|/2. Angles are formed in float64 from the fp32 frequencies, so
    that large positions (1M) lose nothing."""
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float64)[None, :]
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    return torch.cat((cos, cos), dim=-1).float(), torch.cat((-sin, sin), dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first |D| = cos.shape[-1] channels of x (..., T, head_dim) in half-split pairs (j, j + |D|/2):
    (x_j, x_{j+|D|/2}) -> (x_j cos - x_{j+|D|/2} sin, x_{j+|D|/2} cos + x_j sin), written as
    x * cos + roll(x, |D|/2) * sin with cos_sin_table's signed tables (T, |D|), broadcast over leading dims;
    the remaining channels pass through. Computed in fp32, returned in x's dtype. With partial rotary, an attention
    factor in the tables scales only the rotated channels' share of q.k, as in transformers' Phi and GPT-NeoX."""
    rotary, dim = cos.shape[-1], x.shape[-1]
    rot = x if rotary == dim else x[..., :rotary]
    rot = rot if rot.dtype == torch.float32 else rot.float()
    rotated = rot * cos + rot.roll(rotary // 2, dims=-1) * sin
    rotated = rotated if rotated.dtype == x.dtype else rotated.to(x.dtype)
    return rotated if rotary == dim else torch.cat((rotated, x[..., rotary:]), dim=-1)


# Validation
def is_number(x) -> bool:
    """A finite int or float, not a bool (an int too large for a float is not one)."""
    return type(x) in (int, float) and (abs(x) < 2**1023 if type(x) is int else math.isfinite(x))


def validate(cfg: RopeConfig) -> None:
    """Raise a ValueError naming the field, its value and the allowed range."""
    if cfg.type not in VARIANTS:
        raise ValueError(f"rope type {cfg.type!r} is unknown; known types: {', '.join(VARIANTS)}")
    for name in ("base", "factor", "partial_rotary_factor", "beta_fast", "beta_slow", "low_freq_factor",
                 "high_freq_factor", "attention_factor", "mscale", "mscale_all_dim"):
        value, optional = getattr(cfg, name), name in ("attention_factor", "mscale", "mscale_all_dim")
        if not (is_number(value) or (optional and value is None)):
            raise ValueError(f"rope {name} must be a finite number{' or None' if optional else ''}, got {value!r}")
    if type(cfg.original_context) is not int or type(cfg.truncate) is not bool:
        raise ValueError(f"rope original_context must be an int and truncate True or False, got "
                         f"{cfg.original_context!r} and {cfg.truncate!r}")
    for name in ("short_factor", "long_factor"):
        value = getattr(cfg, name)
        if value is not None and not (isinstance(value, tuple) and all(is_number(v) and v > 0 for v in value)):
            raise ValueError(f"rope {name} must be a tuple of numbers > 0 (one per frequency pair), got {value!r}")
    by_parts, L = cfg.type in ("ntk_by_parts", "yarn", "dynamic_yarn"), cfg.original_context
    checks = [
        (cfg.base > 1.0, f"rope base must be > 1 (typically 10000), got {cfg.base}"),
        (cfg.factor >= 1.0, f"rope factor (the scale s) must be >= 1 (< 1 shrinks the context), got {cfg.factor}"),
        (0.0 < cfg.partial_rotary_factor <= 1.0, f"rope partial_rotary_factor must be in (0, 1], got "
                                                 f"{cfg.partial_rotary_factor}"),
        (cfg.type not in NEEDS_ORIGINAL_CONTEXT or L > 0, f"rope type {cfg.type!r} needs original_context (L, the "
         f"pretraining context length) > 0, got {L}; set it to the block size the model was pretrained at"),
        (0 <= L <= 2**40, f"rope original_context must be in [0, 2^40], got {L}"),
        (not by_parts or cfg.beta_slow > 0, f"rope beta_slow (alpha) must be > 0 rotations, got {cfg.beta_slow}"),
        (not by_parts or cfg.beta_fast > cfg.beta_slow, f"rope beta_fast ({cfg.beta_fast}) must be > beta_slow "
         f"({cfg.beta_slow}): beta_fast bounds the high-frequency pairs kept as they are (default 32), beta_slow "
         "the fully interpolated ones (default 1)"),
        (cfg.type != "llama3" or cfg.low_freq_factor > 0, f"rope low_freq_factor must be > 0, got "
                                                          f"{cfg.low_freq_factor}"),
        (cfg.type != "llama3" or cfg.high_freq_factor > cfg.low_freq_factor, f"rope high_freq_factor "
         f"({cfg.high_freq_factor}) must be > low_freq_factor ({cfg.low_freq_factor})"),
        (cfg.attention_factor is None or cfg.attention_factor > 0, f"rope attention_factor must be > 0, got "
                                                                   f"{cfg.attention_factor}"),
    ] + [(cfg.type != "longrope" or getattr(cfg, name), f"rope type 'longrope' needs {name}: |D|/2 numbers, one "
          "divisor per frequency pair") for name in ("short_factor", "long_factor")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
