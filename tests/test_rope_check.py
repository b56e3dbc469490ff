"""rope_check.py: the golden file is what rope.py computes and what transformers computes;
rope.py and transformers pass every case and invariant, and every check of the applied rotation;
each bug class, planted in a copy of rope.py's function (or of the reference rotation), fails and
is named."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hf  # noqa: E402
import rope  # noqa: E402
import rope_check  # noqa: E402

GOLDEN = rope_check.read_golden(rope_check.GOLDEN)
EXAMPLES = 25  # hypothesis examples per invariant here (the command's default is 100)


def failing(rows) -> set[str]:
    return {bug_class for _, bug_class, ok, _ in rows if not ok}


# --------------------------------------------------------------------------------------------------
# The golden file


def test_golden_file_is_what_rope_py_computes(tmp_path):
    """Regenerating the answers from the cases' inputs gives the committed file, byte for byte."""
    copy = tmp_path / "golden.json"
    copy.write_text(rope_check.GOLDEN.read_text())
    rope_check.write_golden(copy)
    assert copy.read_text() == rope_check.GOLDEN.read_text()


def test_golden_file_format():
    """Every field the docstring documents; every Hugging Face type and every bug class has cases;
    positions past 256 and at 1,000,000; the dynamic cases run from long to short (state kept from a
    longer call shows)."""
    cases, classes = GOLDEN["cases"], GOLDEN["bug_classes"]
    assert set(GOLDEN["tolerance"]) == {"inv_freq", "attention_factor", "table"}
    assert 257 in GOLDEN["positions"] and 10**6 in GOLDEN["positions"]
    assert len({c["name"] for c in cases}) == len(cases)
    assert {c["rope_parameters"]["rope_type"] for c in cases} == set(hf.HF_TYPES)
    assert {c["bug_class"] for c in cases} == set(classes)
    for c in cases:
        assert set(c) == {
            "name",
            "bug_class",
            "why",
            "rope_parameters",
            "head_dim",
            "max_position_embeddings",
            "seq_len",
            "inv_freq",
            "attention_factor",
            "cos",
            "sin",
        }, c["name"]
        pairs = (
            rope.rotary_dim(
                c["head_dim"], hf.from_hf(c["rope_parameters"], c["max_position_embeddings"])
            )
            // 2
        )
        assert len(c["inv_freq"]) == pairs
        assert [len(row) for row in c["cos"] + c["sin"]] == [pairs] * 2 * len(GOLDEN["positions"])
    dynamic = [c["seq_len"] or 0 for c in cases if c["rope_parameters"]["rope_type"] == "dynamic"]
    assert dynamic == sorted(dynamic, reverse=True) and dynamic[0] > 2048


def test_golden_numbers_by_hand():
    """A few answers from the formulas, independently of rope.py: the attention factors the bug
    reports quote."""
    answer = {c["name"]: c for c in GOLDEN["cases"]}
    assert answer["yarn_attention_factor_given"]["attention_factor"] == 1.25
    assert answer["mscale_equal_s16"]["attention_factor"] == 1.0
    assert answer["yarn_paper"]["attention_factor"] == pytest.approx(
        0.1 * math.log(16) + 1
    )  # 1.2773
    assert answer["mscale_ratio"]["attention_factor"] == pytest.approx(
        (0.0707 * math.log(40) + 1) / (0.1 * math.log(40) + 1)
    )
    assert answer["longrope_factor_null"]["attention_factor"] == pytest.approx(
        math.sqrt(1 + math.log(32) / math.log(4096))
    )
    theta = [10000.0 ** (-2 * d / 128) for d in range(64)]
    assert answer["default_llama2"]["inv_freq"] == pytest.approx(theta, rel=1e-7)
    assert answer["linear_pi"]["inv_freq"] == pytest.approx([t / 4 for t in theta[::2]], rel=1e-7)
    m, d = (
        10**6,
        1,
    )  # position 1,000,000 of pair 1: angle 1e6 * inv_freq, from the float32 frequency in the file
    angle = m * float(torch.tensor(answer["default_llama2"]["inv_freq"][d]))
    assert answer["default_llama2"]["cos"][-1][d] == pytest.approx(math.cos(angle), abs=1e-7)


def test_transformers_passes_every_golden_case_and_invariant():
    """The golden file against transformers' ROPE_INIT_FUNCTIONS and LlamaRotaryEmbedding, every
    case (all six Hugging Face types); its tables form angles in float32, which the table tolerance
    allows."""
    pytest.importorskip("transformers")
    rows = rope_check.check(*rope_check.ADAPTERS["transformers"], GOLDEN, EXAMPLES)
    assert not failing(rows), [r for r in rows if not r[2]]
    assert len(rows) == len(GOLDEN["cases"]) + 7  # and the 7 invariants


def test_rope_py_passes_every_golden_case_and_invariant():
    rows = rope_check.check(*rope_check.ADAPTERS["rope"], GOLDEN, EXAMPLES)
    assert not failing(rows), [r for r in rows if not r[2]]


# --------------------------------------------------------------------------------------------------
# Planted bugs: a copy of rope.py's Hugging Face function (or of its tables) with one mistake each


def without(p: dict, *keys) -> dict:
    return {k: v for k, v in p.items() if k not in keys}


def attention_factor_as_input(p, head_dim, mp, seq_len):
    """A given attention_factor run through 0.1 ln s + 1 again, instead of used as the final
    multiplier."""
    inv_freq, a = hf.hf_inv_freq(p, head_dim, mp, seq_len)
    return inv_freq, a * rope.yarn_mscale(p["factor"]) if "attention_factor" in p and p[
        "rope_type"
    ] == "yarn" else a


def mscale_ignored(p, head_dim, mp, seq_len):
    return hf.hf_inv_freq(without(p, "mscale", "mscale_all_dim"), head_dim, mp, seq_len)


def truncate_ignored(p, head_dim, mp, seq_len):
    return hf.hf_inv_freq(without(p, "truncate"), head_dim, mp, seq_len)


def L_from_max_position_embeddings(p, head_dim, mp, seq_len):  # noqa: N802
    return hf.hf_inv_freq(dict(p, original_max_position_embeddings=mp), head_dim, mp, seq_len)


def dynamic_scale_never_shrinks():
    """A dynamic scale kept from the longest call so far (a base not restored, keys left at a stale
    scale)."""
    longest = [0]

    def impl(p, head_dim, mp, seq_len):
        if p["rope_type"] == "dynamic":
            longest[0] = max(longest[0], seq_len or 0)
            seq_len = longest[0] or None
        return hf.hf_inv_freq(p, head_dim, mp, seq_len)

    return impl


def longrope_switch_at_L(p, head_dim, mp, seq_len):  # noqa: N802
    """long_factor from l' >= L instead of l' > L."""
    L = p.get("original_max_position_embeddings") or mp
    return hf.hf_inv_freq(
        p, head_dim, mp, seq_len + 1 if p["rope_type"] == "longrope" and seq_len == L else seq_len
    )


def inv_freq_in_bf16(p, head_dim, mp, seq_len):
    inv_freq, a = hf.hf_inv_freq(p, head_dim, mp, seq_len)
    return inv_freq.bfloat16().float(), a


def positions_in_bf16(inv_freq, a, positions):
    angles = positions.bfloat16().float()[:, None] * inv_freq.float()[None, :]
    return a * angles.cos(), a * angles.sin()


def tables_in_bf16(inv_freq, a, positions):
    return [t.bfloat16().float() for t in rope_check.rope_table(inv_freq, a, positions)]


PLANTED = {  # name: (bug class, impl, table)
    "attention_factor_as_input": (
        "attention_factor",
        attention_factor_as_input,
        rope_check.rope_table,
    ),
    "mscale_ignored": ("mscale", mscale_ignored, rope_check.rope_table),
    "truncate_ignored": ("truncate", truncate_ignored, rope_check.rope_table),
    "L_from_max_position_embeddings": (
        "factor_vs_L",
        L_from_max_position_embeddings,
        rope_check.rope_table,
    ),
    "dynamic_scale_never_shrinks": ("dynamic", dynamic_scale_never_shrinks, rope_check.rope_table),
    "longrope_switch_at_L": ("longrope_switch", longrope_switch_at_L, rope_check.rope_table),
    "inv_freq_in_bf16": ("bf16", inv_freq_in_bf16, rope_check.rope_table),
    "positions_in_bf16": ("bf16", hf.hf_inv_freq, positions_in_bf16),
    "tables_in_bf16": ("bf16", hf.hf_inv_freq, tables_in_bf16),
}


@pytest.mark.parametrize("name", PLANTED)
def test_planted_bug_is_caught_and_named(name):
    """The copy fails at least one golden case of its class, and every failing row (case or
    invariant) names that class and no other."""
    bug_class, impl, table = PLANTED[name]
    impl = impl() if impl is dynamic_scale_never_shrinks else impl
    rows = rope_check.check(impl, table, GOLDEN, EXAMPLES)
    cases = {c["name"] for c in GOLDEN["cases"]}
    assert failing(rows) == {bug_class}, [r for r in rows if not r[2]]
    assert any(not ok for case, _, ok, _ in rows if case in cases)


def test_planted_bugs_reproduce_the_reported_numbers():
    """The attention factors of the bug reports: 1.2773 for 1.0 (mscale ignored at s = 16)."""
    case = next(c for c in GOLDEN["cases"] if c["name"] == "mscale_equal_s16")
    assert round(rope_check.call(mscale_ignored, case)[1], 4) == 1.2773


# --------------------------------------------------------------------------------------------------
# The applied rotation: rope.py's and transformers' hooks pass; planted bugs in the reference hook


def applied_rows(hook, layout="half_split"):
    return rope_check.run_checks(rope_check.applied_checks(hook, layout), EXAMPLES)


@pytest.mark.parametrize("layout", rope_check.LAYOUTS)
@pytest.mark.parametrize("name", rope_check.APPLY_ADAPTERS)
def test_rope_and_transformers_rotations_pass(name, layout):
    """rope.py's apply_rope, GPT-NeoX's apply_rotary_pos_emb (half-split) and DeepSeek-V2's
    apply_rotary_emb (interleaved), each with its own rotary embedding, pass every applied check."""
    if name == "transformers":
        pytest.importorskip("transformers")
    rows = applied_rows(rope_check.APPLY_ADAPTERS[name][layout], layout)
    assert not failing(rows) and len(rows) == 4, [r for r in rows if not r[2]]


def test_softmax_scale_by_hand():
    """DeepSeek-V2's numbers: s = 40, mscale = mscale_all_dim = 0.707, a 192-channel head: YaRN's
    factor in q and k is 1 and the softmax scale (0.0707 ln 40 + 1)^2 / sqrt(192); none without
    mscale_all_dim."""
    p = {
        "rope_type": "yarn",
        "factor": 40.0,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
    }
    assert hf.hf_inv_freq(p, 64, 163840)[1] == 1.0
    m = 0.0707 * math.log(40) + 1
    assert rope_check.softmax_scale(p, 192) == pytest.approx(m * m / math.sqrt(192), rel=1e-12)
    assert rope_check.softmax_scale(without(p, "mscale_all_dim"), 192) == 1 / math.sqrt(192)


def scale_folded_into_q_and_k(q, k, positions, p, head_dim, mp):
    """DeepSeek's m(s, mscale_all_dim)^2 folded into q and k, m each; no softmax scale returned."""
    q, k, scale = rope_check.rope_apply(q, k, positions, p, head_dim, mp)
    m = math.sqrt(scale * math.sqrt(head_dim))
    return q * m, k * m


def factor_in_softmax_scale(q, k, positions, p, head_dim, mp):
    """Pure rotations (no factor in cos and sin) and YaRN's a^2 in the softmax scale instead."""
    a = hf.hf_inv_freq(p, head_dim, mp)[1]
    q, k, scale = rope_check.rope_apply(
        q, k, positions, dict(p, attention_factor=1.0), head_dim, mp
    )
    return q, k, scale * a * a


@pytest.mark.parametrize("hook", [scale_folded_into_q_and_k, factor_in_softmax_scale])
def test_either_place_for_the_scale_passes(hook):
    """On full heads a factor may sit in q and k or in the softmax scale: the logits are checked."""
    rows = applied_rows(hook)
    assert not failing(rows), [r for r in rows if not r[2]]


def interleaved_pairs(q, k, positions, p, head_dim, mp):
    """Right frequencies and tables, pairs (2j, 2j + 1) in a half-split model (or the reverse)."""
    return rope_check.rope_apply(q, k, positions, p, head_dim, mp, layout="interleaved")


def partial_rotary_ignored(q, k, positions, p, head_dim, mp):
    """The whole head rotated, at frequencies for head_dim (as Llama's default type does)."""
    return rope_check.rope_apply(q, k, positions, dict(p, partial_rotary_factor=1.0), head_dim, mp)


def rotary_dim_from_head_dim(q, k, positions, p, head_dim, mp):
    """The first |D| channels rotated at b^(-2d/head_dim) = (b^(|D|/head_dim))^(-2d/|D|)."""
    base = p["rope_theta"] ** p.get("partial_rotary_factor", 1.0)
    return rope_check.rope_apply(q, k, positions, dict(p, rope_theta=base), head_dim, mp)


def positions_ignored(q, k, positions, p, head_dim, mp):
    """0..T-1 instead of the positions given (a KV cache's offset lost)."""
    return rope_check.rope_apply(q, k, torch.arange(len(positions)), p, head_dim, mp)


def positions_in_bf16_applied(q, k, positions, p, head_dim, mp):
    return rope_check.rope_apply(q, k, positions.bfloat16(), p, head_dim, mp)


def rotated_in_bf16(q, k, positions, p, head_dim, mp):
    """q and k rotated in bf16 (the tables in fp32), returned in float32."""
    q, k, scale = rope_check.rope_apply(q.bfloat16(), k.bfloat16(), positions, p, head_dim, mp)
    return q.float(), k.float(), scale


def yarn_factor_not_folded(q, k, positions, p, head_dim, mp):
    """YaRN's frequencies without its factor in q and k (tables built without attention_scaling)."""
    return rope_check.rope_apply(q, k, positions, dict(p, attention_factor=1.0), head_dim, mp)


def softmax_mscale_missing(q, k, positions, p, head_dim, mp):
    """The factor in q and k right, the softmax scale left at 1/sqrt(head_dim)."""
    return rope_check.rope_apply(q, k, positions, p, head_dim, mp)[:2]


PLANTED_APPLIED = {  # name: (bug class, hook, --layout)
    "interleaved_pairs_said_half_split": ("layout", interleaved_pairs, "half_split"),
    "half_split_pairs_said_interleaved": ("layout", rope_check.rope_apply, "interleaved"),
    "partial_rotary_ignored": ("partial_rotary", partial_rotary_ignored, "half_split"),
    "rotary_dim_from_head_dim": ("partial_rotary", rotary_dim_from_head_dim, "half_split"),
    "positions_ignored": ("positions", positions_ignored, "half_split"),
    "positions_in_bf16_applied": ("bf16", positions_in_bf16_applied, "half_split"),
    "rotated_in_bf16": ("bf16", rotated_in_bf16, "half_split"),
    "yarn_factor_not_folded": ("attention_scale", yarn_factor_not_folded, "half_split"),
    "softmax_mscale_missing": ("attention_scale", softmax_mscale_missing, "half_split"),
}


@pytest.mark.parametrize("name", PLANTED_APPLIED)
def test_planted_rotation_bug_is_caught_and_named(name):
    """Exactly the bug's class fails; a layout mismatch names both layouts in every failing row."""
    bug_class, hook, layout = PLANTED_APPLIED[name]
    rows = applied_rows(hook, layout)
    assert failing(rows) == {bug_class}, [r for r in rows if not r[2]]
    if bug_class == "layout":
        other = next(n for n in rope_check.LAYOUTS if n != layout)
        said = f"layout: {other} pairs {rope_check.LAYOUTS[other]}, --layout {layout}"
        assert all(detail.startswith(said) for _, _, ok, detail in rows if not ok), rows


def test_missing_softmax_mscale_shows_as_its_factor():
    """DeepSeek-V2's settings without the softmax scale's m^2: logits 1 / (0.0707 ln 40 + 1)^2
    = 0.6291 times the reference's, and the detail says so."""
    p = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
    }
    check = rope_check.applied(rope_check.logits_error, softmax_mscale_missing, "half_split")
    ratio, detail = check(((p, 64, 163840), [0, 1, 2, 3], 0))
    factor = 1 / (0.0707 * math.log(40) + 1) ** 2
    assert ratio > 1 and detail.endswith(f"they are {factor:.4g} x the reference's"), detail
    assert "0.6291" in detail


# --------------------------------------------------------------------------------------------------
# The command line


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "rope_check.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_transformers_passes():
    pytest.importorskip("transformers")
    out = run_cli("--impl", "transformers", "--examples", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    n = len(GOLDEN["cases"]) + 7 + 4  # the cases, the invariants, the applied rotation's checks
    assert f"{n} of {n} checks passed" in out.stdout


def test_cli_user_module_fails_and_names_the_class(tmp_path):
    """A module where the command runs, given as module:function: exit status 1, the failing rows,
    and what the class means; tables unchecked without --table."""
    (tmp_path / "my_engine.py").write_text(
        "import hf\n\n\ndef init(p, head_dim, mp, seq_len):\n    p.pop('truncate', None)\n"
        "    return hf.hf_inv_freq(p, head_dim, mp, seq_len)\n"
    )
    out = run_cli("--impl", "my_engine:init", "--examples", "5", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "gpt_oss_truncate_false" in out.stdout
    assert f"FAIL truncate: {GOLDEN['bug_classes']['truncate']}" in out.stdout
    assert "tables not checked" in out.stdout and "applied rotation not checked" in out.stdout


def test_cli_user_hook_in_the_wrong_layout(tmp_path):
    """A half-split hook given as interleaved: exit status 1, only the layout class fails, and the
    message names both layouts."""
    (tmp_path / "my_engine.py").write_text(
        "import rope_check\n\n\ndef rotate(q, k, positions, p, head_dim, mp):\n"
        "    return rope_check.rope_apply(q, k, positions, p, head_dim, mp)\n"
    )
    out = run_cli(
        "--apply", "my_engine:rotate", "--layout", "interleaved", "--examples", "5", cwd=tmp_path
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith("FAIL")] == [
        "FAIL layout"
    ]
    said = "layout: half_split pairs (j, j + |D|/2), --layout interleaved (2j, 2j + 1)"
    assert said in out.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (["--impl", "nonsense"], "must be package.module:function"),
        (["--impl", "no_such_module:f"], "No module named 'no_such_module'"),
        (["--impl", "rope:no_such_function"], "has no attribute 'no_such_function'"),
        (["--golden", "/nonexistent.json"], "not a golden cases file"),
        (["--examples", "-1"], "--examples must be >= 0"),
        (["--layout", "diagonal"], "--layout must be half_split or interleaved"),
        (["--apply", "nonsense"], "--apply must be package.module:function"),
    ],
)
def test_cli_errors(args, match):
    out = run_cli(*args)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and match in out.stderr, (
        out.stderr
    )
    assert "Traceback" not in out.stderr


def test_golden_json_reads_without_this_repository():
    """Plain JSON: numbers, strings, lists, objects (no NaN or Infinity, which other languages'
    parsers reject)."""
    json.loads(
        rope_check.GOLDEN.read_text(),
        parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"),
    )


def test_the_docs_counts_are_the_checker_s():
    """docs/rope_check.md gives the number of cases and invariants and every bug class."""
    section = (ROOT / "docs" / "rope_check.md").read_text()
    assert f"the {len(GOLDEN['cases'])} cases" in section
    assert (
        f"{len(rope_check.invariants(None, rope_check.rope_table, GOLDEN['tolerance']))} invariants"
        in section
    )
    assert all(f"| `{bug_class}` |" in section for bug_class in GOLDEN["bug_classes"])
    assert f"{len(rope_check.applied_checks(None, 'half_split'))} checks of the applied" in section
    assert all(f"| `{bug_class}` |" in section for bug_class in rope_check.APPLIED_CLASSES)
