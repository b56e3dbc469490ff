"""RoPE and the context-extension methods of the YaRN paper (Peng et al., arXiv 2309.00071) as
small pure functions, in the paper's symbols: |D| = dim a head's rotated channels, d a pair of them,
theta_d = b^(-2d/|D|) its frequency (inv_freq), lambda_d = 2 pi / theta_d its wavelength, r_d =
L / lambda_d its rotations in L, l' = seq_len the current sequence length (the dynamic variants read
it), t the temperature; b, s and L are RopeConfig's base, factor and original_context (L' = s L).
A variant maps (dim, cfg, seq_len) to (inv_freq, attention_factor): fp32 frequencies theta'_d (pair
d turns by m theta'_d at position m) and a factor folded into cos and sin (q.k gets its square,
YaRN's 1/t). Angles are formed in float64 and kept in float32, never bf16 (whose positions collide
above 256).
"""

import math
from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class RopeConfig:
    """A RoPE variant and its parameters, named as in Hugging Face's rope_parameters:
    type                   default linear ntk dynamic ntk_by_parts yarn dynamic_yarn llama3 longrope
    base                   b
    factor                 s, the scale (dynamic_yarn: the least s; dynamic: HF's alpha)
    original_context       L, the pretraining context (0 = not set)
    partial_rotary_factor  the share of head_dim rotated
    beta_fast              the paper's beta: pairs making more rotations in L keep theta_d
    beta_slow              the paper's alpha: pairs making fewer get theta_d / s
    truncate               round the ramp's ends to whole pairs
    attention_factor       sqrt(1/t); none = 0.1 ln s + 1 (or DeepSeek's mscale ratio)
    mscale                 DeepSeek-V2: sqrt(1/t) = m(s, mscale) / m(s, mscale_all_dim)
    mscale_all_dim         DeepSeek-V2: m(s, c) = 0.1 c ln s + 1
    low_freq_factor        Llama 3: wavelengths over L / low_freq_factor get theta_d / s
    high_freq_factor       Llama 3: wavelengths under L / high_freq_factor keep theta_d
    short_factor           LongRoPE: a divisor per pair while l' <= L
    long_factor            LongRoPE: a divisor per pair once l' > L
    """

    type: str = "default"
    base: float = 10000.0
    factor: float = 1.0
    original_context: int = 0
    partial_rotary_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("short_factor", "long_factor"):  # JSON gives lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        validate(self)

    def replace(self, **changes) -> "RopeConfig":
        return replace(self, **changes)

    @property
    def is_dynamic(self) -> bool:
        return self.type in DYNAMIC_VARIANTS


# The variants: (dim, cfg, seq_len) -> (inv_freq, attention_factor)
def base_inv_freq(dim: int, base: float) -> torch.Tensor:
    """theta_d = b^(-2d/|D|), float64."""
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def default_rope(dim, cfg, seq_len=None):
    """Plain RoPE (Su et al.): theta_d."""
    return base_inv_freq(dim, cfg.base).float(), 1.0


def linear_rope(dim, cfg, seq_len=None):
    """Position Interpolation (Chen et al.): m -> m/s, so theta_d / s."""
    return (base_inv_freq(dim, cfg.base) / cfg.factor).float(), 1.0


def ntk_base(base: float, dim: int, s: float) -> float:
    """NTK-aware base change (paper Eq. 16): b' = b s^(|D|/(|D|-2))."""
    if dim <= 2:
        raise ValueError(f"NTK-aware scaling needs a rotary dim > 2, got {dim}")
    return base * s ** (dim / (dim - 2))


def ntk_rope(dim, cfg, seq_len=None):
    """NTK-aware: plain RoPE at base b'."""
    return base_inv_freq(dim, ntk_base(cfg.base, dim, cfg.factor)).float(), 1.0


def dynamic_ntk_rope(dim, cfg, seq_len=None):
    """Dynamic NTK (transformers'; factor is alpha): NTK-aware at s = alpha l'/L - alpha + 1, l' =
    max(seq_len, L)."""
    L, alpha = cfg.original_context, cfg.factor
    seq_len = max(seq_len or L, L)
    base = ntk_base(cfg.base, dim, alpha * seq_len / L - (alpha - 1))
    return base_inv_freq(dim, base).float(), 1.0


def correction_dim(rotations: float, dim: int, base: float, L: int) -> float:
    """The pair d making r rotations in L: d = |D| ln(L / (2 pi r)) / (2 ln b) (paper Eq. 17)."""
    if not L / (2 * math.pi * rotations) > 0:
        raise ValueError(f"rope beta ({rotations} rotations) is too large for original_context {L}")
    return dim * math.log(L / (2 * math.pi * rotations)) / (2 * math.log(base))


def ramp_bounds(dim: int, cfg: RopeConfig) -> tuple[float, float]:
    """Where the ramp starts (r_d = beta_fast) and ends (beta_slow): rounded out when truncate,
    clamped to [0, |D|-1] as in the official code (test_rope's xfails)."""
    low = correction_dim(cfg.beta_fast, dim, cfg.base, cfg.original_context)
    high = correction_dim(cfg.beta_slow, dim, cfg.base, cfg.original_context)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def ramp(dim: int, cfg: RopeConfig) -> torch.Tensor:
    """1 - gamma(r_d) per pair, float64, linear in d between the bounds (Eq. 18's ends): 0 keeps
    theta_d, 1 is theta_d / s."""
    low, high = ramp_bounds(dim, cfg)
    if low == high:
        high += 0.001  # the official code's guard against a zero-width ramp
    d = torch.arange(dim // 2, dtype=torch.float64)
    return ((d - low) / (high - low)).clamp(0.0, 1.0)


def by_parts_inv_freq(dim: int, cfg: RopeConfig, s: float) -> torch.Tensor:
    """NTK-by-parts (paper Def. 2): (1 - gamma_d) theta_d / s + gamma_d theta_d."""
    theta = base_inv_freq(dim, cfg.base)
    if s == 1.0:
        return theta  # no extension: plain RoPE, bit for bit
    interpolate = ramp(dim, cfg)  # 1 - gamma
    return theta / s * interpolate + theta * (1.0 - interpolate)


def yarn_mscale(s: float, coefficient: float = 1.0) -> float:
    """sqrt(1/t) = 0.1 ln(s) + 1 (paper Eq. 22); 1 for s <= 1. coefficient: DeepSeek's mscale."""
    return 1.0 if s <= 1 else 0.1 * coefficient * math.log(s) + 1.0


def yarn_attention_factor(cfg: RopeConfig, s: float) -> float:
    """sqrt(1/t), folded into cos and sin."""
    if cfg.attention_factor is not None:
        return float(cfg.attention_factor)
    if cfg.mscale and cfg.mscale_all_dim:  # DeepSeek-V2's; truthiness as in the official code
        return yarn_mscale(s, cfg.mscale) / yarn_mscale(s, cfg.mscale_all_dim)
    return yarn_mscale(s)


def ntk_by_parts_rope(dim, cfg, seq_len=None):
    """NTK-by-parts: the ramp without temperature."""
    return by_parts_inv_freq(dim, cfg, cfg.factor).float(), 1.0


def yarn_rope(dim, cfg, seq_len=None):
    """YaRN: NTK-by-parts and the temperature sqrt(1/t) = 0.1 ln(s) + 1."""
    return by_parts_inv_freq(dim, cfg, cfg.factor).float(), yarn_attention_factor(cfg, cfg.factor)


def dynamic_yarn_rope(dim, cfg, seq_len=None):
    """Dynamic YaRN (paper Sec. 3.3): YaRN at s = max(1, l'/L), never below factor."""
    s = max(cfg.factor, (seq_len or cfg.original_context) / cfg.original_context)
    return by_parts_inv_freq(dim, cfg, s).float(), yarn_attention_factor(cfg, s)


def llama3_rope(dim, cfg, seq_len=None):
    """Llama 3.1: wavelengths under L/high_freq_factor keep theta_d, over L/low_freq_factor get
    theta_d / s, a blend linear in r_d between."""
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
    """LongRoPE (Ding et al. 2024) as Hugging Face's: theta_d / f_d, f_d searched per pair
    (short_factor while l' <= L, long_factor past it); attention sqrt(1 + ln s / ln L) for s > 1."""
    L, s = cfg.original_context, cfg.factor
    name = "long_factor" if (seq_len or 0) > L else "short_factor"
    divisors = torch.tensor(getattr(cfg, name), dtype=torch.float64)
    inv_freq = (base_inv_freq(dim, cfg.base) / divisors).float()
    if not bool(torch.isfinite(inv_freq).all()):
        raise ValueError(
            f"rope {name} has entries so small that theta_d / {name}_d overflows "
            f"float32: {getattr(cfg, name)!r}"
        )
    if cfg.attention_factor is not None:
        return inv_freq, float(cfg.attention_factor)
    if s <= 1:
        return inv_freq, 1.0
    if L < 2:
        raise ValueError(
            f"rope type 'longrope' with factor {s} > 1 needs original_context >= 2 "
            f"(its attention factor divides by ln L), got {L}; or attention_factor"
        )
    return inv_freq, math.sqrt(1 + math.log(s) / math.log(L))


# The dispatch: a variant's name -> its function
ROPE_VARIANTS = {
    "default": default_rope,
    "linear": linear_rope,
    "ntk": ntk_rope,
    "dynamic": dynamic_ntk_rope,
    "ntk_by_parts": ntk_by_parts_rope,
    "yarn": yarn_rope,
    "dynamic_yarn": dynamic_yarn_rope,
    "llama3": llama3_rope,
    "longrope": longrope_rope,
}
VARIANTS = tuple(ROPE_VARIANTS)
DYNAMIC_VARIANTS = ("dynamic", "dynamic_yarn", "longrope")  # they read l'
NEEDS_ORIGINAL_CONTEXT = tuple(v for v in VARIANTS if v not in ("default", "linear", "ntk"))  # L


# A head's frequencies and tables
def rotary_dim(head_dim: int, cfg: RopeConfig) -> int:
    """|D|: a head's rotated channels, an even number (they rotate in pairs)."""
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    dim = int(head_dim * cfg.partial_rotary_factor)
    if dim < 2 or dim % 2:
        raise ValueError(
            f"rotary dim int(head_dim {head_dim} x partial_rotary_factor "
            f"{cfg.partial_rotary_factor}) = {dim} must be even and >= 2"
        )
    for name in ("short_factor", "long_factor"):
        if cfg.type == "longrope" and len(getattr(cfg, name)) != dim // 2:
            raise ValueError(
                f"rope {name} has {len(getattr(cfg, name))} numbers; rotary dim "
                f"{dim} has {dim // 2} frequency pairs (LongRoPE: one divisor each)"
            )
    return dim


def frequencies(head_dim: int, cfg: RopeConfig, seq_len: int | None = None):
    """(inv_freq, attention_factor) of variant cfg for heads of head_dim, at l' = seq_len."""
    return ROPE_VARIANTS[cfg.type](rotary_dim(head_dim, cfg), cfg, seq_len)


def cos_sin_table(inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor):
    """apply_rope's fp32 tables (positions m, |D|): for the pair (j, j + |D|/2), cos is a cos(m
    theta'_j) in both columns, sin is -a sin(m theta'_j) in column j and +a sin(m theta'_j) in the
    other (a = attention_factor). Angles in float64, so that positions like 1M lose nothing."""
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float64)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    return torch.cat((cos, cos), dim=-1).float(), torch.cat((-sin, sin), dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first |D| channels of x (..., T, head_dim) in half-split pairs: (x_j, x_j') ->
    (x_j cos - x_j' sin, x_j' cos + x_j sin), j' = j + |D|/2, as x cos + roll(x, |D|/2) sin with
    cos_sin_table's signed tables (T, |D|); the other channels pass through. fp32 inside."""
    rotary, dim = cos.shape[-1], x.shape[-1]
    rot = x if rotary == dim else x[..., :rotary]
    rot = rot if rot.dtype == torch.float32 else rot.float()
    rotated = rot * cos + rot.roll(rotary // 2, dims=-1) * sin
    rotated = rotated if rotated.dtype == x.dtype else rotated.to(x.dtype)
    return rotated if rotary == dim else torch.cat((rotated, x[..., rotary:]), dim=-1)


# Validation
def is_number(x) -> bool:
    """A finite int or float (not a bool, nor an int too large for a float)."""
    return type(x) in (int, float) and (abs(x) < 2**1023 if type(x) is int else math.isfinite(x))


NUMBERS = tuple(f.name for f in fields(RopeConfig) if f.type in (float, float | None))
OPTIONAL = tuple(f.name for f in fields(RopeConfig) if f.type == float | None)  # None allowed


def validate(cfg: RopeConfig) -> None:
    """Raise a ValueError naming the field, its value and the allowed range."""
    if cfg.type not in VARIANTS:
        raise ValueError(f"rope type {cfg.type!r} is unknown; known types: {', '.join(VARIANTS)}")
    for name in NUMBERS:
        value, optional = getattr(cfg, name), name in OPTIONAL
        if not (is_number(value) or (optional and value is None)):
            raise ValueError(
                f"rope {name} must be a finite number{' or None' * optional}, got {value!r}"
            )
    L = cfg.original_context
    if type(L) is not int or not 0 <= L <= 2**40 or type(cfg.truncate) is not bool:
        raise ValueError(
            f"rope original_context must be an int in [0, 2^40] and truncate a bool, got {L!r} "
            f"and {cfg.truncate!r}"
        )
    if cfg.base <= 1.0:
        raise ValueError(f"rope base must be > 1 (typically 10000), got {cfg.base}")
    if cfg.factor < 1.0:
        raise ValueError(f"rope factor (the scale s) must be >= 1, got {cfg.factor}")
    if not 0.0 < cfg.partial_rotary_factor <= 1.0:
        raise ValueError(
            f"rope partial_rotary_factor must be in (0, 1], got {cfg.partial_rotary_factor}"
        )
    if cfg.type in NEEDS_ORIGINAL_CONTEXT and L <= 0:
        raise ValueError(
            f"rope type {cfg.type!r} needs original_context > 0 (L, the block size "
            f"it was pretrained at), got {L}"
        )
    by_parts = cfg.type in ("ntk_by_parts", "yarn", "dynamic_yarn")
    if by_parts and not 0 < cfg.beta_slow < cfg.beta_fast:  # alpha, beta: rotations in L
        raise ValueError(
            f"rope beta_fast ({cfg.beta_fast}) must be > beta_slow ({cfg.beta_slow}) > 0; "
            "the defaults are 32 and 1"
        )
    if cfg.type == "llama3" and not 0 < cfg.low_freq_factor < cfg.high_freq_factor:
        raise ValueError(
            f"rope high_freq_factor ({cfg.high_freq_factor}) must be > "
            f"low_freq_factor ({cfg.low_freq_factor}) > 0"
        )
    if cfg.attention_factor is not None and cfg.attention_factor <= 0:
        raise ValueError(f"rope attention_factor must be > 0, got {cfg.attention_factor}")
    for name in ("short_factor", "long_factor"):
        value = getattr(cfg, name)
        positive = isinstance(value, tuple) and all(is_number(v) and v > 0 for v in value)
        if value is not None and not positive:
            raise ValueError(f"rope {name} must be a tuple of numbers > 0, got {value!r}")
        if cfg.type == "longrope" and not value:
            raise ValueError(f"rope type 'longrope' needs {name}, a divisor per frequency pair")
