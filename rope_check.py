"""Check a RoPE implementation against golden cases with known answers and against RoPE's invariants
(hypothesis). The cases, in data/rope_golden.json (plain JSON that describes its format under
"format"), are grouped by the mistakes engines have shipped: YaRN's attention_factor, DeepSeek's
mscale ratio, truncate, factor against L, dynamic scaling, LongRoPE's switch at L, bf16.

    python rope_check.py --impl transformers  # or rope (rope.py), or package.module:function
    python rope_check.py --impl my_engine.rope:init_rope --table my_engine.rope:cos_sin
    python rope_check.py --impl my_engine.rope:init_rope --apply my_engine.rope:rotate
    python rope_check.py --write_golden       # recompute the golden answers from the cases' inputs

--impl: (rope_parameters, head_dim, max_position_embeddings, seq_len) -> (inv_freq,
attention_factor), as transformers' ROPE_INIT_FUNCTIONS with the config unpacked. --table
(optional): (inv_freq, attention_factor, positions) -> (cos, sin), each [position][pair] = a cos(m
theta'_d), a sin(m theta'_d), whatever the engine's layout. --apply (optional; --impl rope and
transformers bring theirs): (q, k, positions, rope_parameters, head_dim, max_position_embeddings) ->
(q', k') or (q', k', softmax_scale), q and k float32 [batch, head, T, head_dim], positions int64
[T]; q' and k' in the same channel order, the first |D| channels rotated in pairs of --layout
(half_split: (j, j + |D|/2), as rotate_half; interleaved: (2j, 2j + 1), as Meta's llama), the rest
untouched; softmax_scale multiplies q'.k' (default 1/sqrt(head_dim)). Checked on drawn configs
against rope.py: the pairs, partial rotary, positions up to 1e6, and the logits q'.k' x
softmax_scale, so that a factor may sit in q and k or in the scale (the reference has YaRN's factor
in q and k, DeepSeek's m(s, mscale_all_dim)^2 in the scale). A row per case and check: its bug class
(bf16 for any failure that is the right answer in a 16-bit float, layout for one that is the other
layout's), pass/FAIL, the largest error against its tolerance; exit status 1 if one fails.
"""

import copy
import functools
import importlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flags
import hf
import rope
from system import REPO, atomic_write, check_writable, read_json

GOLDEN = REPO / "data" / "rope_golden.json"
# A golden case (system.shape_problem): its inputs, then the answers that write_golden computes
NUMBER = (int, float)
CASE = {
    "name": str,
    "bug_class": str,
    "rope_parameters": dict,
    "head_dim": int,
    "max_position_embeddings": int,
    "seq_len": (int, type(None)),
}
ANSWERS = {"inv_freq": [NUMBER], "attention_factor": NUMBER, "cos": [[NUMBER]], "sin": [[NUMBER]]}
# 16-bit floats and a few of their roundings, relative (bf16's 8 significant bits make positions
# above 256 collide)
HALF = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8}


# Adapters: this repository's rope.py and transformers
def rope_table(inv_freq, attention_factor, positions):
    """rope.py's tables (float64 angles): pair d's cos is column d, its sin column d + |D|/2."""
    cos, sin = rope.cos_sin_table(inv_freq, attention_factor, positions)
    return cos[:, : inv_freq.numel()], sin[:, inv_freq.numel() :]


def transformers_impl(rope_parameters, head_dim, max_position_embeddings, seq_len):
    """transformers' own function for the type, on a LlamaConfig of these values:
    ROPE_INIT_FUNCTIONS, or for 'default' LlamaRotaryEmbedding's (which, as Llama has no partial
    rotary, ignores partial_rotary_factor)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    # e.g. its warning about yarn's factor and max_position_embeddings
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(rope_parameters),
    )
    init = ROPE_INIT_FUNCTIONS.get(
        rope_parameters["rope_type"], LlamaRotaryEmbedding.compute_default_rope_parameters
    )
    return init(config, device="cpu", seq_len=seq_len)


def transformers_table(inv_freq, attention_factor, positions):
    """LlamaRotaryEmbedding's forward pass with these frequencies (its angles: float32 products)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    half = inv_freq.numel()
    module = LlamaRotaryEmbedding(
        transformers.LlamaConfig(hidden_size=8 * half, num_attention_heads=4, head_dim=2 * half)
    )
    module.inv_freq, module.attention_scaling = inv_freq.float(), attention_factor
    cos, sin = module(torch.zeros(1, len(positions), 2 * half), positions[None])
    return cos[0, :, :half], sin[0, :, :half]


ADAPTERS = {
    "rope": (hf.hf_inv_freq, rope_table),
    "transformers": (transformers_impl, transformers_table),
}


def load_function(spec: str, flag: str):
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name) if module and name else None
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"--{flag} {spec}: {e} (its module must import from where the command runs)"
        ) from None
    if not callable(function):
        raise ValueError(
            f"--{flag} must be package.module:function or one of {', '.join(ADAPTERS)}, got "
            f"{spec!r}"
        )
    return function


# Golden cases
def call(impl, case):
    """impl on a case's inputs, a fresh copy (an implementation that edits its input cannot edit the
    case); a case is a golden file's entry or a tuple (rope_parameters, head_dim,
    max_position_embeddings, seq_len)."""
    if isinstance(case, dict):
        case = (
            case["rope_parameters"],
            case["head_dim"],
            case["max_position_embeddings"],
            case["seq_len"],
        )
    return impl(*copy.deepcopy(case))


def write_golden(path) -> None:
    """Recompute every case's answers with rope.py and rewrite the file, each list of numbers on one
    line, each float32 number as the shortest decimal that reads back as it."""
    golden = read_golden(path, answers=False)
    for case in golden["cases"]:
        inv_freq, factor = call(hf.hf_inv_freq, case)
        cos, sin = rope_table(inv_freq, factor, torch.tensor(golden["positions"]))
        float32 = [
            t.float().numpy().astype(str).astype(float).tolist() for t in (inv_freq, cos, sin)
        ]
        case.update(zip(("inv_freq", "cos", "sin"), float32), attention_factor=factor)
    text = re.sub(
        r"\[\s+([-+.\deE,\s]+?)\s*\]",
        lambda m: "[" + " ".join(m[1].split()) + "]",
        json.dumps(golden, indent=1),
    )
    atomic_write(path, text + "\n")


def worst(name: str, got, want, tol) -> tuple[float, str]:
    """(largest |got - want| / tol, where and how large): a NaN or a shape mismatch is infinitely
    far."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want, dtype=torch.float64)
    if got.shape != want.shape:
        return math.inf, f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    error, tol = (
        (got - want).abs().nan_to_num(math.inf),
        torch.as_tensor(tol, dtype=torch.float64).expand_as(want),
    )
    i = torch.unravel_index((error / tol).argmax(), want.shape)
    where = f"{name}{[int(j) for j in i]}" if i else name
    return float(error[i] / tol[i]), f"{where} off by {error[i]:.3g} (tolerance {tol[i]:.3g})"


def in_16_bits(got, want, tol) -> bool:
    """got holds bf16 (or float16) numbers within a few of their roundings (and tol) of want."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want, dtype=torch.float64)
    return any(
        torch.equal(got.to(t).double(), got)
        and worst("", got, want, tol + rel * want.abs())[0] <= 1
        for t, rel in HALF.items()
    )


def check_case(case: dict, golden: dict, impl, table) -> tuple[str, bool, str]:
    """(bug class, passed, largest error) of impl (and table) on a case: the case's class, or bf16
    where the failure is the right answer in a 16-bit float (the frequencies, the tables' values or
    their positions)."""
    try:
        inv_freq, factor = call(impl, case)
    except (
        Exception
    ) as e:  # an implementation refusing a valid config fails the case; the checker goes on
        return case["bug_class"], False, f"raised {type(e).__name__}: {e}"
    tol, a, want = (
        golden["tolerance"],
        case["attention_factor"],
        torch.tensor(case["inv_freq"], dtype=torch.float64),
    )
    rows = [
        worst("attention_factor", float(factor), a, tol["attention_factor"] * a),
        worst("inv_freq", inv_freq, want, tol["inv_freq"] * want.abs()),
    ]
    half = [in_16_bits(inv_freq, want, tol["inv_freq"] * want.abs())]
    if table is not None:
        positions = torch.tensor(golden["positions"])
        cos, sin = table(want.float(), a, positions)
        angle_tol = a * (tol["table"] + positions.double()[:, None] * want[None] * 2.0**-23)
        rows += [
            worst(f"{n}[position, pair]", got, case[n], angle_tol)
            for n, got in (("cos", cos), ("sin", sin))
        ]
        half += [
            in_16_bits(cos, case["cos"], angle_tol) and in_16_bits(sin, case["sin"], angle_tol)
        ]
        half += [
            all(
                worst("", g, r, angle_tol)[0] <= 1
                for g, r in zip((cos, sin), rope_table(want.float(), a, positions.to(t)))
            )
            for t in HALF
        ]  # positions in a 16-bit float
    ratio, detail = max(rows, key=lambda r: r[0])
    return (
        "bf16" if ratio > 1 and rows[0][0] <= 1 and any(half) else case["bug_class"],
        ratio <= 1,
        detail,
    )


# Invariants, on configs hypothesis draws
@st.composite
def hf_configs(draw, kinds, factor=None, within_L=False):
    """(rope_parameters, head_dim, max_position_embeddings, seq_len): heads 4..256, bases 100..1e6,
    L 64..16384, s 1..64, beta_fast 4..64 > beta_slow 0.25..4 (the ramp's ends stay inside its
    clamps), LongRoPE divisors 0.5..64; seq_len none, or up to L (within_L) or 64 L. The dynamic
    type reads L from max_position_embeddings."""
    kind = draw(st.sampled_from(kinds))
    head_dim, L = 2 * draw(st.integers(2, 128)), draw(st.integers(64, 16384))
    s = draw(st.floats(1.0, 64.0)) if factor is None else factor
    p = {"rope_type": kind, "rope_theta": draw(st.floats(100.0, 1e6)), "factor": s}
    if kind in ("yarn", "llama3", "longrope"):
        p["original_max_position_embeddings"] = L
    if kind == "yarn":
        p.update(
            beta_fast=draw(st.floats(4.0, 64.0)),
            beta_slow=draw(st.floats(0.25, 4.0, exclude_max=True)),
            truncate=draw(st.booleans()),
        )
    if kind == "llama3":
        p.update(low_freq_factor=1.0, high_freq_factor=4.0)
    if kind == "longrope":
        divisors = st.lists(st.floats(0.5, 64.0), min_size=head_dim // 2, max_size=head_dim // 2)
        p.update(short_factor=draw(divisors), long_factor=draw(divisors))
    seq_len = draw(st.none() | st.integers(1, L if within_L else 64 * L))
    return p, head_dim, L if kind == "dynamic" else round(s * L), seq_len


def compare(tol, got, inv_freq, factor=None, pairs=None) -> tuple[float, str]:
    """Largest error / tolerance of got = (inv_freq, attention_factor) against the expected ones
    (inv_freq on pairs; factor None: not checked); the detail starts with bf16 where inv_freq is the
    expected one in 16 bits."""
    limit = tol["inv_freq"] * inv_freq.abs()
    limit = (
        limit if pairs is None else torch.where(pairs, limit, 1e300)
    )  # pairs left free: never too far
    rows = [worst("inv_freq", got[0], inv_freq, limit)]
    if factor is not None:
        rows.append(
            worst("attention_factor", float(got[1]), factor, tol["attention_factor"] * factor)
        )
    ratio, detail = max(rows, key=lambda r: r[0])
    half = ratio > 1 and all(r[0] <= 1 for r in rows[1:]) and in_16_bits(got[0], inv_freq, limit)
    return ratio, f"bf16: {detail}" if half else detail


def theta(c) -> torch.Tensor:
    return rope.base_inv_freq(
        c[1], c[0]["rope_theta"]
    )  # plain RoPE's theta_d = b^(-2d/|D|), float64


def by_parts(c, impl, tol):
    """NTK-by-parts (YaRN with attention_factor 1): r_d = L theta_d / 2 pi > beta_fast keeps
    theta_d, r_d < beta_slow gets theta_d / s (a hair of margin: the ramp's ends come from logs)."""
    p, r = c[0], c[0]["original_max_position_embeddings"] * theta(c) / (2 * math.pi)
    fast, slow = r > p["beta_fast"] * (1 + 1e-9), r < p["beta_slow"] * (1 - 1e-9)
    return compare(
        tol, call(impl, c), torch.where(fast, theta(c), theta(c) / p["factor"]), pairs=fast | slow
    )


def yarn_temperature(c, impl, tol):
    """YaRN's frequencies are NTK-by-parts' (attention_factor 1, which comes back as 1), its factor
    0.1 ln s + 1."""
    f, a = call(impl, (dict(c[0], attention_factor=1.0), *c[1:]))
    return max(
        compare(
            tol, call(impl, c), torch.as_tensor(f).double(), 0.1 * math.log(c[0]["factor"]) + 1
        ),
        worst("attention_factor given as 1.0", float(a), 1.0, tol["attention_factor"]),
    )


def relative_position(drawn, impl, table):
    """<R(m) q, R(n) k> = <R(m + delta) q, R(n + delta) k>, up to float32 rounding of the angles."""
    c, (m, n, delta), seed = drawn
    inv_freq, a = call(impl, c)
    inv_freq = torch.as_tensor(inv_freq).float()
    cos, sin = (t.double() for t in table(inv_freq, a, torch.tensor([m, n, m + delta, n + delta])))
    q, k = torch.randn(
        2, 2, inv_freq.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    rq, rk = [torch.stack((x[0] * cos - x[1] * sin, x[1] * cos + x[0] * sin)) for x in (q, k)]
    tol = a * a * q.norm() * k.norm() * (1e-5 + (m + n + 2 * delta) * inv_freq.max() * 2.0**-21)
    return worst("q.k", (rq[:, 0] * rk[:, 1]).sum(), (rq[:, 2] * rk[:, 3]).sum(), tol)


def finite(drawn, impl, table):
    inv_freq, a = call(impl, drawn[0])
    values = [torch.as_tensor(inv_freq).double(), torch.tensor(float(a))]
    values += list(table(values[0].float(), a, torch.tensor([0, drawn[1]]))) if table else []
    ok = (
        all(bool(v.isfinite().all()) for v in values)
        and min(float(v.min()) for v in values[:2]) > 0
    )
    return 0.0 if ok else math.inf, "inv_freq and attention_factor > 0, all finite (tables too)"


def invariants(impl, table, tol) -> list:
    """(name, bug class, strategy, check: drawn -> (error / tolerance, detail))."""
    scaled, every = (
        ("linear", "yarn", "llama3"),
        ("linear", "yarn", "llama3", "dynamic", "longrope"),
    )
    position = st.integers(0, 10**6)
    rows = [
        (
            "s = 1 is plain RoPE",
            "coverage",
            hf_configs(scaled, factor=1.0),
            lambda c: compare(tol, call(impl, c), theta(c), 1.0),
        ),
        (
            "PI (linear) is theta_d / s",
            "coverage",
            hf_configs(("linear",)),
            lambda c: compare(tol, call(impl, c), theta(c) / c[0]["factor"], 1.0),
        ),
        (
            "NTK-by-parts: r_d > beta_fast kept, < beta_slow /s",
            "factor_vs_L",
            hf_configs(("yarn",)).map(lambda c: (dict(c[0], attention_factor=1.0), *c[1:])),
            lambda c: by_parts(c, impl, tol),
        ),
        (
            "YaRN is NTK-by-parts with 0.1 ln s + 1",
            "attention_factor",
            hf_configs(("yarn",)),
            lambda c: yarn_temperature(c, impl, tol),
        ),
        (
            "dynamic at l' <= L is plain RoPE",
            "dynamic",
            hf_configs(("dynamic",), within_L=True),
            lambda c: compare(tol, call(impl, c), theta(c), 1.0),
        ),
        (
            "no NaN or inf",
            "coverage",
            st.tuples(hf_configs(every), position),
            lambda d: finite(d, impl, table),
        ),
        (
            "q.k depends on m - n only",
            "bf16",
            st.tuples(
                hf_configs(every),
                st.tuples(position, position, position),
                st.integers(0, 2**32 - 1),
            ),
            lambda d: relative_position(d, impl, table),
        ),
    ]
    return rows if table else rows[:-1]


def run_invariant(check, strategy, examples: int) -> tuple[bool, str]:
    """(passed, the largest error, or the failing example) of check over hypothesis' examples."""
    largest = [-1.0, "no example"]

    def example(drawn):
        ratio, detail = check(drawn)
        largest[:] = max(largest, [ratio, detail], key=lambda r: r[0])
        if not ratio <= 1:  # hypothesis then shrinks to the simplest example that fails
            raise AssertionError(detail)

    runner = settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    try:
        runner(given(strategy)(example))()
    except (
        Exception
    ) as e:  # the check's AssertionError, or the implementation's own error on a valid config
        why = str(e) if isinstance(e, AssertionError) else f"raised {type(e).__name__}: {e}"
        return False, " ".join(" ".join([why, *getattr(e, "__notes__", [])[:1]]).split())
    return True, largest[1]


# The applied rotation: a hook's rotated q and k (and softmax scale) against rope.py's apply_rope
LAYOUTS = {"half_split": "(j, j + |D|/2)", "interleaved": "(2j, 2j + 1)"}  # a pair's channels
APPLIED_CLASSES = {  # what a failing class of the applied rotation means
    "layout": "pairs as --layout says: half-split as rotate_half (Hugging Face, GPT-NeoX), "
    "interleaved as Meta's llama and GPT-J; in the other, cos and sin are right and most "
    "channels wrong",
    "partial_rotary": "the first |D| = int(head_dim partial_rotary_factor) channels rotate at "
    "b^(-2d/|D|), the rest pass through bit-identical",
    "positions": "the positions given, not 0..T-1 (a cache's offset lost), up to 1e6 in fp32",
    "attention_scale": "q.k x scale gets YaRN's factor squared (the factor in q and k), and with "
    "mscale_all_dim a softmax scale m(s, mscale_all_dim)^2 / sqrt(head_dim)",
}


def softmax_scale(p: dict, head_dim: int) -> float:
    """1/sqrt(head_dim), times m(s, mscale_all_dim)^2 on every channel where mscale_all_dim is
    set (DeepSeek-V2's softmax_scale, transformers' yarn_apply_mscale), beside YaRN's factor."""
    deepseek = p.get("mscale_all_dim") and p.get("rope_type") != "default"
    m = rope.yarn_mscale(p["factor"], p["mscale_all_dim"]) if deepseek else 1.0
    return m * m / math.sqrt(head_dim)


def rope_apply(q, k, positions, p, head_dim, mp, layout="half_split"):
    """The reference: rope.py's tables (angles in float64) and apply_rope, on the layout's pairs
    (the channels put in half-split order and back)."""
    inv_freq, a = hf.hf_inv_freq(p, head_dim, mp)
    cos, sin = rope.cos_sin_table(inv_freq, a, positions)
    rotary = cos.shape[-1]
    pairs = hf.interleaved_to_half_split(rotary) if layout == "interleaved" else range(rotary)
    order = torch.cat((torch.as_tensor(pairs), torch.arange(rotary, head_dim)))
    q, k = (rope.apply_rope(x[..., order], cos, sin)[..., order.argsort()] for x in (q, k))
    return q, k, softmax_scale(p, head_dim)


def transformers_apply(q, k, positions, p, head_dim, mp):
    """GPT-NeoX's rotary embedding and apply_rotary_pos_emb (rotate_half, partial rotary)."""
    import transformers
    from transformers.modeling_rope_utils import yarn_apply_mscale
    from transformers.models.gpt_neox import modeling_gpt_neox as neox

    transformers.logging.set_verbosity_error()
    p = dict(p, partial_rotary_factor=p.get("partial_rotary_factor", 1.0))  # GPT-NeoX's: 0.25
    config = transformers.GPTNeoXConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        max_position_embeddings=mp,
        rope_parameters=p,
    )
    cos, sin = neox.GPTNeoXRotaryEmbedding(config)(q, positions[None])
    return *neox.apply_rotary_pos_emb(q, k, cos, sin), yarn_apply_mscale(p, head_dim**-0.5)


def transformers_apply_interleaved(q, k, positions, p, head_dim, mp):
    """DeepSeek-V2's rotary embedding and apply_rotary_emb (interleaved pairs as complex numbers)
    on the first |D| channels (as DeepSeek's qk_rope_head_dim)."""
    import transformers
    from transformers.modeling_rope_utils import yarn_apply_mscale
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as deepseek

    transformers.logging.set_verbosity_error()
    rotary = int(head_dim * p.get("partial_rotary_factor", 1.0))
    config = transformers.DeepseekV2Config(
        qk_rope_head_dim=rotary,
        max_position_embeddings=mp,
        rope_parameters=dict(p, partial_rotary_factor=1.0),
    )
    cis = deepseek.DeepseekV2RotaryEmbedding(config)(q, positions[None])
    rq, rk = deepseek.apply_rotary_emb(q[..., :rotary], k[..., :rotary], cis)
    scale = yarn_apply_mscale(p, head_dim**-0.5)
    return torch.cat((rq, q[..., rotary:]), -1), torch.cat((rk, k[..., rotary:]), -1), scale


APPLY_ADAPTERS = {  # --apply's name: {--layout: hook}
    "rope": {layout: functools.partial(rope_apply, layout=layout) for layout in LAYOUTS},
    "transformers": {
        "half_split": transformers_apply,
        "interleaved": transformers_apply_interleaved,
    },
}


@st.composite
def applied_cases(draw, kinds, spread=False, partial=False, deepseek=False):
    """(config, positions, seed of q and k): hf_configs' (partial: 1/4, 1/2 or 3/4 of a head of 8k
    channels rotated; deepseek: mscale and mscale_all_dim each absent, 0.707 or 1); positions
    0..T-1, T 2..8, or (spread) up to 8 distinct ones in 0..1e6, then 257 and 1e6, in any order."""
    p, head_dim, mp, _ = draw(hf_configs(kinds))
    if partial:
        p["partial_rotary_factor"] = draw(st.sampled_from((0.25, 0.5, 0.75)))
        head_dim = -(-head_dim // 8) * 8
    for name in ("mscale", "mscale_all_dim") if deepseek else ():
        p[name] = draw(st.sampled_from((None, 0.707, 1.0)))
    if spread:
        positions = draw(st.lists(st.integers(0, 10**6), max_size=8, unique=True))
        positions += [m for m in (257, 10**6) if m not in positions]
    else:
        positions = list(range(draw(st.integers(2, 8))))
    return (p, head_dim, mp), positions, draw(st.integers(0, 2**32 - 1))


def rotation_error(got, want, x, rotary, positions):
    """Largest error / tolerance of the rotated q and k: the channels past |D| bit-identical to the
    input's; the rotated ones within float32 arithmetic and a few float32 roundings of each angle
    m theta'_d (theta'_d <= 1 here), relative to the rotated head's norm."""
    for name, g, x_in in zip("qk", got, x):
        if not torch.equal(torch.as_tensor(g)[..., rotary:], x_in[..., rotary:]):
            return math.inf, f"{name}[..., {rotary}:] changed (channels past |D| pass through)"
    tol = 2.0**-20 + positions.double()[:, None] * 2.0**-21
    rows = [
        worst(n, g, w, tol * w.double().norm(dim=-1, keepdim=True))
        for n, g, w in zip("qk", got, want)
    ]
    return max(rows, key=lambda r: r[0])


def logits_error(got, want, x, rotary, positions):
    """The logits scale q'_i . k'_j at every pair of positions (float32 sums, relative to the
    reference's scale |q'_i| |k'_j|); where they are right up to one factor, the factor."""
    g, w = (
        torch.as_tensor(q).double() @ torch.as_tensor(k).double().mT * s for q, k, s in (got, want)
    )
    q_norm, k_norm = (y.double().norm(dim=-1) for y in want[:2])
    tol = want[2] * 2.0**-18 * q_norm[..., :, None] * k_norm[..., None, :]
    ratio, detail = worst("logits[batch, head, i, j]", g, w, tol)
    r = float((g * w).sum() / (w * w).sum()) if g.shape == w.shape else math.nan
    scaled = ratio > 1 and worst("", g, r * w, tol)[0] <= 1
    return ratio, f"{detail}; they are {r:.4g} x the reference's" if scaled else detail


def applied(error, hook, layout):
    """drawn -> error's (error / tolerance, detail) of the hook against rope_apply; a failure named
    layout where it is the other layout's right answer, bf16 where it is the right answer at
    positions in a 16-bit float or is q and k rounded to one."""

    def against_reference(drawn):
        (p, head_dim, mp), positions, seed = drawn
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 1, 2, len(positions), head_dim, generator=generator)
        positions, rotary = torch.tensor(positions), rope.rotary_dim(head_dim, hf.from_hf(p, mp))
        got = tuple(hook(*x.clone(), positions.clone(), copy.deepcopy(p), head_dim, mp))
        got = got if len(got) == 3 else (*got, 1 / math.sqrt(head_dim))
        want = rope_apply(*x, positions, p, head_dim, mp, layout)
        ratio, detail = error(got, want, x, rotary, positions)
        other = next(name for name in LAYOUTS if name != layout)

        def right_at(at, pairs):  # got is the reference's answer at positions at, in pairs
            reference = rope_apply(*x, at, p, head_dim, mp, pairs)
            return error(got, reference, x, rotary, positions)[0] <= 1

        rounded = [
            in_16_bits(g, w, 2.0**-7 * w.double().norm(dim=-1, keepdim=True))
            for g, w in zip(got[:2], want[:2])
        ]
        if ratio > 1 and right_at(positions, other):
            said = f"{other} pairs {LAYOUTS[other]}, --layout {layout} {LAYOUTS[layout]}"
            detail = f"layout: {said}: {detail}"
        elif ratio > 1 and (all(rounded) or any(right_at(positions.to(t), layout) for t in HALF)):
            detail = f"bf16: {detail}"
        return ratio, detail

    return against_reference


def applied_checks(hook, layout) -> list:
    """invariants' rows, for the applied rotation."""
    plain = ("default", "linear", "llama3")  # attention factor 1: the rotation alone
    run = functools.partial(applied, hook=hook, layout=layout)
    return [
        ("pairs rotate as --layout says", "layout", applied_cases(plain), run(rotation_error)),
        (
            "partial rotary: the rest untouched",
            "partial_rotary",
            applied_cases(plain, partial=True),
            run(rotation_error),
        ),
        (
            "positions as given, up to 1e6, fp32 angles",
            "positions",
            applied_cases(plain, spread=True),
            run(rotation_error),
        ),
        (
            "logits q.k x scale: YaRN's a^2, DeepSeek's m^2",
            "attention_scale",
            applied_cases(("yarn",), deepseek=True),
            run(logits_error),
        ),
    ]


# Command line
@dataclass(frozen=True)
class CheckConfig:
    """rope_check.py's settings.

    impl          rope (this repository), transformers, or package.module:function (see the
                  docstring)
    table         package.module:function for cos/sin tables (default: rope's or transformers' with
                  those)
    apply         rope, transformers or module:function rotating q and k (default: --impl's)
    layout        --apply's pairs: half_split (j, j + |D|/2), interleaved (2j, 2j+1)
    golden        the golden file (default: data/rope_golden.json beside this script)
    examples      hypothesis examples per invariant; 0: the golden cases only
    write_golden  first recompute the golden file's answers from its inputs with rope.py
    """

    impl: str = "rope"
    table: str = ""
    apply: str = ""
    layout: str = "half_split"
    golden: str = ""
    examples: int = 100
    write_golden: bool = False


def read_golden(path, answers: bool = True) -> dict:
    """The golden file, checked to hold what the checker reads (with the answers, unless they are
    about to be computed)."""
    fix = (
        f"it is not a golden cases file: this repository's is {GOLDEN.relative_to(REPO)} (git "
        "checkout restores it)"
    )
    shape = {
        "tolerance": dict.fromkeys(("inv_freq", "attention_factor", "table"), NUMBER),
        "positions": [int],
        "bug_classes": {str: str},
        "cases": [{**CASE, **(ANSWERS if answers else {})}],
    }
    golden = read_json(path, fix, shape, f"--golden {path}")
    named = {"bf16", *(case["bug_class"] for case in golden["cases"])}  # bf16: check_case's own
    unknown = sorted(named - set(golden["bug_classes"]))
    if unknown:
        raise ValueError(f"--golden {path}: bug_classes has no {', '.join(unknown)}; {fix}")
    return golden


def check(impl, table, golden: dict, examples: int, apply=None, layout="half_split") -> list:
    """(name, bug class, passed, largest error): a row per golden case, in the file's order, then
    per invariant, then (given a hook, apply) per check of the applied rotation."""
    rows = [(case["name"], *check_case(case, golden, impl, table)) for case in golden["cases"]]
    drawn = invariants(impl, table, golden["tolerance"])
    drawn += applied_checks(apply, layout) if apply else []
    return rows + (run_checks(drawn, examples) if examples else [])


def run_checks(drawn: list, examples: int) -> list[tuple[str, str, bool, str]]:
    """(name, bug class, passed, largest error) per row of invariants or applied_checks."""
    rows = []
    for name, bug_class, strategy, test in drawn:
        ok, detail = run_invariant(test, strategy, examples)
        named = detail.split(":")[0]  # bf16 or layout, named so whatever the check's class
        rows.append((name, named if named in ("bf16", "layout") else bug_class, ok, detail))
    return rows


def main(argv) -> None:
    args = flags.build(
        CheckConfig,
        flags.parse(argv, flags.flag_table((CheckConfig, "")), "python rope_check.py", __doc__),
    )
    if args.examples < 0:
        raise ValueError(f"--examples must be >= 0, got {args.examples}")
    if args.layout not in LAYOUTS:
        raise ValueError(f"--layout must be {' or '.join(LAYOUTS)}, got {args.layout!r}")
    sys.path.append(str(Path.cwd()))  # --impl's module may live where the command runs
    impl, table = ADAPTERS.get(args.impl) or (load_function(args.impl, "impl"), None)
    table = load_function(args.table, "table") if args.table else table
    hook = args.apply or (args.impl if args.impl in ADAPTERS else "")  # rope's, transformers'
    apply = (
        APPLY_ADAPTERS[hook][args.layout]
        if hook in APPLY_ADAPTERS
        else (hook and load_function(hook, "apply"))
    )
    if args.write_golden:
        write_golden(check_writable(args.golden or GOLDEN, "--golden", folder=False))
    golden = read_golden(args.golden or GOLDEN)
    rows = check(impl, table, golden, args.examples, apply, args.layout)
    print(f"{'case or invariant':<50} {'bug class':<16} {'result':<6} largest error")
    for name, bug_class, ok, detail in rows:
        print(f"{name:<50} {bug_class:<16} {'pass' if ok else 'FAIL':<6} {detail}")
    failed = sorted({bug_class for _, bug_class, ok, _ in rows if not ok})
    print(
        f"{sum(ok for _, _, ok, _ in rows)} of {len(rows)} checks passed"
        + ("" if table else "; cos/sin tables not checked (give --table)")
        + ("" if apply else "; the applied rotation not checked (give --apply)")
    )
    meaning = golden["bug_classes"] | APPLIED_CLASSES
    for bug_class in failed:
        print(f"FAIL {bug_class}: {meaning[bug_class]}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(flags.cli(main))
