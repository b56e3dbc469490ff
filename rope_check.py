"""Check a RoPE implementation against golden cases with known answers and against RoPE's invariants (hypothesis).
The cases, in data/rope_golden.json (plain JSON that describes its format under "format"), are grouped by the
mistakes engines have shipped: YaRN's attention_factor, DeepSeek's mscale ratio, truncate, factor against L,
dynamic scaling, LongRoPE's switch at L, bf16.

    python rope_check.py --impl transformers        # or rope (this repository), or package.module:function
    python rope_check.py --impl my_engine.rope:init_rope --table my_engine.rope:cos_sin
    python rope_check.py --write_golden             # recompute the golden answers from the cases' inputs

--impl: (rope_parameters, head_dim, max_position_embeddings, seq_len) -> (inv_freq, attention_factor), as
transformers' ROPE_INIT_FUNCTIONS with the config unpacked. --table (optional): (inv_freq, attention_factor,
positions) -> (cos, sin), each [position][pair] = a cos(m theta'_d), a sin(m theta'_d), whatever the engine's
layout. A row per case and invariant: its bug class (bf16 for any failure that is the right answer in a 16-bit
float), pass/FAIL, the largest error against its tolerance; exit status 1 if one fails.
"""

import copy
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
CASE = {"name": str, "bug_class": str, "rope_parameters": dict, "head_dim": int,
        "max_position_embeddings": int, "seq_len": (int, type(None))}
ANSWERS = {"inv_freq": [NUMBER], "attention_factor": NUMBER, "cos": [[NUMBER]], "sin": [[NUMBER]]}
# 16-bit floats and a few of their roundings, relative (bf16's 8 significant bits make positions above 256 collide)
HALF = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8}


# Adapters: this repository's rope.py and transformers
def rope_table(inv_freq, attention_factor, positions):
    """rope.py's tables (float64 angles) per pair: pair d's cos is column d, its sin column d + |D|/2."""
    cos, sin = rope.cos_sin_table(inv_freq, attention_factor, positions)
    return cos[:, : inv_freq.numel()], sin[:, inv_freq.numel():]


def transformers_impl(rope_parameters, head_dim, max_position_embeddings, seq_len):
    """transformers' own function for the type, on a LlamaConfig of these values: ROPE_INIT_FUNCTIONS, or for
    'default' LlamaRotaryEmbedding's (which, as Llama has no partial rotary, ignores partial_rotary_factor)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    transformers.logging.set_verbosity_error()  # e.g. its warning about yarn's factor and max_position_embeddings
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=max_position_embeddings,
                                      rope_parameters=dict(rope_parameters))
    init = ROPE_INIT_FUNCTIONS.get(rope_parameters["rope_type"], LlamaRotaryEmbedding.compute_default_rope_parameters)
    return init(config, device="cpu", seq_len=seq_len)


def transformers_table(inv_freq, attention_factor, positions):
    """LlamaRotaryEmbedding's forward pass with these frequencies (its angles are float32 products)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    half = inv_freq.numel()
    module = LlamaRotaryEmbedding(transformers.LlamaConfig(hidden_size=8 * half, num_attention_heads=4,
                                                           head_dim=2 * half))
    module.inv_freq, module.attention_scaling = inv_freq.float(), attention_factor
    cos, sin = module(torch.zeros(1, len(positions), 2 * half), positions[None])
    return cos[0, :, :half], sin[0, :, :half]


ADAPTERS = {"rope": (hf.hf_inv_freq, rope_table), "transformers": (transformers_impl, transformers_table)}


def load_function(spec: str, flag: str):
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name) if module and name else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--{flag} {spec}: {e} (its module must import from where the command runs)") from None
    if not callable(function):
        raise ValueError(f"--{flag} must be package.module:function or one of {', '.join(ADAPTERS)}, got {spec!r}")
    return function


# Golden cases
def call(impl, case):
    """impl on a case's inputs, a fresh copy (an implementation that edits its input cannot edit the case); a case is
    a golden file's entry or a tuple (rope_parameters, head_dim, max_position_embeddings, seq_len)."""
    if isinstance(case, dict):
        case = case["rope_parameters"], case["head_dim"], case["max_position_embeddings"], case["seq_len"]
    return impl(*copy.deepcopy(case))


def write_golden(path) -> None:
    """Recompute every case's answers with rope.py and rewrite the file, each list of numbers on one line, each
    float32 number as the shortest decimal that reads back as it."""
    golden = read_golden(path, answers=False)
    for case in golden["cases"]:
        inv_freq, factor = call(hf.hf_inv_freq, case)
        cos, sin = rope_table(inv_freq, factor, torch.tensor(golden["positions"]))
        float32 = [t.float().numpy().astype(str).astype(float).tolist() for t in (inv_freq, cos, sin)]
        case.update(zip(("inv_freq", "cos", "sin"), float32), attention_factor=factor)
    text = re.sub(r"\[\s+([-+.\deE,\s]+?)\s*\]", lambda m: "[" + " ".join(m[1].split()) + "]",
                  json.dumps(golden, indent=1))
    atomic_write(path, text + "\n")


def worst(name: str, got, want, tol) -> tuple[float, str]:
    """(largest |got - want| / tol, where and how large): a NaN or a shape mismatch is infinitely far."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want, dtype=torch.float64)
    if got.shape != want.shape:
        return math.inf, f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    error, tol = (got - want).abs().nan_to_num(math.inf), torch.as_tensor(tol, dtype=torch.float64).expand_as(want)
    i = torch.unravel_index((error / tol).argmax(), want.shape)
    where = f"{name}{[int(j) for j in i]}" if i else name
    return float(error[i] / tol[i]), f"{where} off by {error[i]:.3g} (tolerance {tol[i]:.3g})"


def in_16_bits(got, want, tol) -> bool:
    """got holds bf16 (or float16) numbers within a few of their roundings (and tol) of want."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want, dtype=torch.float64)
    return any(torch.equal(got.to(t).double(), got) and worst("", got, want, tol + rel * want.abs())[0] <= 1
               for t, rel in HALF.items())


def check_case(case: dict, golden: dict, impl, table) -> tuple[str, bool, str]:
    """(bug class, passed, largest error) of impl (and table) on a case: the case's class, or bf16 where the failure
    is the right answer in a 16-bit float (the frequencies, the tables' values or their positions)."""
    try:
        inv_freq, factor = call(impl, case)
    except Exception as e:  # an implementation refusing a valid config fails the case; the checker goes on
        return case["bug_class"], False, f"raised {type(e).__name__}: {e}"
    tol, a, want = golden["tolerance"], case["attention_factor"], torch.tensor(case["inv_freq"], dtype=torch.float64)
    rows = [worst("attention_factor", float(factor), a, tol["attention_factor"] * a),
            worst("inv_freq", inv_freq, want, tol["inv_freq"] * want.abs())]
    half = [in_16_bits(inv_freq, want, tol["inv_freq"] * want.abs())]
    if table is not None:
        positions = torch.tensor(golden["positions"])
        cos, sin = table(want.float(), a, positions)
        angle_tol = a * (tol["table"] + positions.double()[:, None] * want[None] * 2.0**-23)
        rows += [worst(f"{n}[position, pair]", got, case[n], angle_tol) for n, got in (("cos", cos), ("sin", sin))]
        half += [in_16_bits(cos, case["cos"], angle_tol) and in_16_bits(sin, case["sin"], angle_tol)]
        half += [all(worst("", g, r, angle_tol)[0] <= 1 for g, r in zip((cos, sin), rope_table(
            want.float(), a, positions.to(t)))) for t in HALF]  # positions in a 16-bit float
    ratio, detail = max(rows, key=lambda r: r[0])
    return "bf16" if ratio > 1 and rows[0][0] <= 1 and any(half) else case["bug_class"], ratio <= 1, detail


# Invariants, on configs hypothesis draws
@st.composite
def hf_configs(draw, kinds, factor=None, within_L=False):
    """(rope_parameters, head_dim, max_position_embeddings, seq_len): heads 4..256, bases 100..1e6, L 64..16384,
    s 1..64, beta_fast 4..64 > beta_slow 0.25..4 (the ramp's ends stay inside its clamps), LongRoPE divisors
    0.5..64; seq_len none, or up to L (within_L) or 64 L. The dynamic type reads L from max_position_embeddings."""
    kind = draw(st.sampled_from(kinds))
    head_dim, L = 2 * draw(st.integers(2, 128)), draw(st.integers(64, 16384))
    s = draw(st.floats(1.0, 64.0)) if factor is None else factor
    p = {"rope_type": kind, "rope_theta": draw(st.floats(100.0, 1e6)), "factor": s}
    if kind in ("yarn", "llama3", "longrope"):
        p["original_max_position_embeddings"] = L
    if kind == "yarn":
        p.update(beta_fast=draw(st.floats(4.0, 64.0)), beta_slow=draw(st.floats(0.25, 4.0, exclude_max=True)),
                 truncate=draw(st.booleans()))
    if kind == "llama3":
        p.update(low_freq_factor=1.0, high_freq_factor=4.0)
    if kind == "longrope":
        divisors = st.lists(st.floats(0.5, 64.0), min_size=head_dim // 2, max_size=head_dim // 2)
        p.update(short_factor=draw(divisors), long_factor=draw(divisors))
    seq_len = draw(st.none() | st.integers(1, L if within_L else 64 * L))
    return p, head_dim, L if kind == "dynamic" else round(s * L), seq_len


def compare(tol, got, inv_freq, factor=None, pairs=None) -> tuple[float, str]:
    """Largest error / tolerance of got = (inv_freq, attention_factor) against the expected ones (inv_freq on
    pairs; factor None: not checked); the detail starts with bf16 where inv_freq is the expected one in 16 bits."""
    limit = tol["inv_freq"] * inv_freq.abs()
    limit = limit if pairs is None else torch.where(pairs, limit, 1e300)  # pairs left free: never too far
    rows = [worst("inv_freq", got[0], inv_freq, limit)]
    if factor is not None:
        rows.append(worst("attention_factor", float(got[1]), factor, tol["attention_factor"] * factor))
    ratio, detail = max(rows, key=lambda r: r[0])
    half = ratio > 1 and all(r[0] <= 1 for r in rows[1:]) and in_16_bits(got[0], inv_freq, limit)
    return ratio, f"bf16: {detail}" if half else detail


def theta(c) -> torch.Tensor:
    return rope.base_inv_freq(c[1], c[0]["rope_theta"])  # plain RoPE's theta_d = b^(-2d/|D|), float64


def by_parts(c, impl, tol):
    """NTK-by-parts (YaRN with attention_factor 1): r_d = L theta_d / 2 pi > beta_fast keeps theta_d, r_d < beta_slow
    gets theta_d / s (a hair of margin: the ramp's ends come from logs)."""
    p, r = c[0], c[0]["original_max_position_embeddings"] * theta(c) / (2 * math.pi)
    fast, slow = r > p["beta_fast"] * (1 + 1e-9), r < p["beta_slow"] * (1 - 1e-9)
    return compare(tol, call(impl, c), torch.where(fast, theta(c), theta(c) / p["factor"]), pairs=fast | slow)


def yarn_temperature(c, impl, tol):
    """YaRN's frequencies are NTK-by-parts' (attention_factor 1, which comes back as 1), its factor 0.1 ln s + 1."""
    f, a = call(impl, (dict(c[0], attention_factor=1.0), *c[1:]))
    return max(compare(tol, call(impl, c), torch.as_tensor(f).double(), 0.1 * math.log(c[0]["factor"]) + 1),
               worst("attention_factor given as 1.0", float(a), 1.0, tol["attention_factor"]))


def relative_position(drawn, impl, table):
    """<R(m) q, R(n) k> = <R(m + delta) q, R(n + delta) k>, a float32 rounding of the angles allowed."""
    c, (m, n, delta), seed = drawn
    inv_freq, a = call(impl, c)
    inv_freq = torch.as_tensor(inv_freq).float()
    cos, sin = (t.double() for t in table(inv_freq, a, torch.tensor([m, n, m + delta, n + delta])))
    q, k = torch.randn(2, 2, inv_freq.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    rq, rk = [torch.stack((x[0] * cos - x[1] * sin, x[1] * cos + x[0] * sin)) for x in (q, k)]
    tol = a * a * q.norm() * k.norm() * (1e-5 + (m + n + 2 * delta) * inv_freq.max() * 2.0**-21)
    return worst("q.k", (rq[:, 0] * rk[:, 1]).sum(), (rq[:, 2] * rk[:, 3]).sum(), tol)


def finite(drawn, impl, table):
    inv_freq, a = call(impl, drawn[0])
    values = [torch.as_tensor(inv_freq).double(), torch.tensor(float(a))]
    values += list(table(values[0].float(), a, torch.tensor([0, drawn[1]]))) if table else []
    ok = all(bool(v.isfinite().all()) for v in values) and min(float(v.min()) for v in values[:2]) > 0
    return 0.0 if ok else math.inf, "inv_freq and attention_factor > 0, all finite (tables too)"


def invariants(impl, table, tol) -> list:
    """(name, bug class, strategy, check: drawn -> (error / tolerance, detail))."""
    scaled, every = ("linear", "yarn", "llama3"), ("linear", "yarn", "llama3", "dynamic", "longrope")
    position = st.integers(0, 10**6)
    rows = [
        ("s = 1 is plain RoPE", "coverage", hf_configs(scaled, factor=1.0),
         lambda c: compare(tol, call(impl, c), theta(c), 1.0)),
        ("PI (linear) is theta_d / s", "coverage", hf_configs(("linear",)),
         lambda c: compare(tol, call(impl, c), theta(c) / c[0]["factor"], 1.0)),
        ("NTK-by-parts: r_d > beta_fast kept, < beta_slow /s", "factor_vs_L", hf_configs(("yarn",)).map(
            lambda c: (dict(c[0], attention_factor=1.0), *c[1:])), lambda c: by_parts(c, impl, tol)),
        ("YaRN is NTK-by-parts with 0.1 ln s + 1", "attention_factor", hf_configs(("yarn",)),
         lambda c: yarn_temperature(c, impl, tol)),
        ("dynamic at l' <= L is plain RoPE", "dynamic", hf_configs(("dynamic",), within_L=True),
         lambda c: compare(tol, call(impl, c), theta(c), 1.0)),
        ("no NaN or inf", "coverage", st.tuples(hf_configs(every), position), lambda d: finite(d, impl, table)),
        ("q.k depends on m - n only", "bf16", st.tuples(hf_configs(every), st.tuples(position, position, position),
                                                          st.integers(0, 2**32 - 1)),
         lambda d: relative_position(d, impl, table)),
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

    runner = settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    try:
        runner(given(strategy)(example))()
    except Exception as e:  # the check's AssertionError, or the implementation's own error on a valid config
        why = str(e) if isinstance(e, AssertionError) else f"raised {type(e).__name__}: {e}"
        return False, " ".join(" ".join([why, *getattr(e, "__notes__", [])[:1]]).split())
    return True, largest[1]


# Command line
@dataclass(frozen=True)
class CheckConfig:
    impl: str = "rope"  # rope (this repository), transformers, or package.module:function (see the docstring)
    table: str = ""  # package.module:function for cos/sin tables (default: rope's or transformers' with those)
    golden: str = ""  # the golden file (default: data/rope_golden.json beside this script)
    examples: int = 100  # hypothesis examples per invariant; 0: the golden cases only
    write_golden: bool = False  # first recompute the golden file's answers from its inputs with rope.py


def read_golden(path, answers: bool = True) -> dict:
    """The golden file, checked to hold what the checker reads (with the answers, unless they are
    about to be computed)."""
    fix = (f"it is not a golden cases file: this repository's is {GOLDEN.relative_to(REPO)} (git "
           "checkout restores it)")
    shape = {"tolerance": dict.fromkeys(("inv_freq", "attention_factor", "table"), NUMBER),
             "positions": [int], "bug_classes": {str: str},
             "cases": [{**CASE, **(ANSWERS if answers else {})}]}
    golden = read_json(path, fix, shape, f"--golden {path}")
    named = {"bf16", *(case["bug_class"] for case in golden["cases"])}  # bf16: check_case's own
    unknown = sorted(named - set(golden["bug_classes"]))
    if unknown:
        raise ValueError(f"--golden {path}: bug_classes has no {', '.join(unknown)}; {fix}")
    return golden


def check(impl, table, golden: dict, examples: int) -> list[tuple[str, str, bool, str]]:
    """(name, bug class, passed, largest error): a row per golden case, in the file's order, then per invariant."""
    rows = [(case["name"], *check_case(case, golden, impl, table)) for case in golden["cases"]]
    for name, bug_class, strategy, test in invariants(impl, table, golden["tolerance"]) if examples else []:
        ok, detail = run_invariant(test, strategy, examples)
        rows.append((name, "bf16" if detail.startswith("bf16") else bug_class, ok, detail))
    return rows


def main(argv) -> None:
    args = flags.build(CheckConfig, flags.parse(argv, flags.flag_table((CheckConfig, "")), "python rope_check.py",
                                                __doc__))
    if args.examples < 0:
        raise ValueError(f"--examples must be >= 0, got {args.examples}")
    sys.path.append(str(Path.cwd()))  # --impl's module may live where the command runs
    impl, table = ADAPTERS.get(args.impl) or (load_function(args.impl, "impl"), None)
    table = load_function(args.table, "table") if args.table else table
    if args.write_golden:
        write_golden(check_writable(args.golden or GOLDEN, "--golden", folder=False))
    golden = read_golden(args.golden or GOLDEN)
    rows = check(impl, table, golden, args.examples)
    print(f"{'case or invariant':<50} {'bug class':<16} {'result':<6} largest error")
    for name, bug_class, ok, detail in rows:
        print(f"{name:<50} {bug_class:<16} {'pass' if ok else 'FAIL':<6} {detail}")
    failed = sorted({bug_class for _, bug_class, ok, _ in rows if not ok})
    print(f"{sum(ok for _, _, ok, _ in rows)} of {len(rows)} checks passed"
          + ("" if table else "; cos/sin tables not checked (give --table)"))
    for bug_class in failed:
        print(f"FAIL {bug_class}: {golden['bug_classes'][bug_class]}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(flags.cli(main))
