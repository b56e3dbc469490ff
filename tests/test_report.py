"""report.py's statistics: t critical values, paired per-document intervals, the verdict rule across
seeds, and the agreement check between two runs. Synthetic numbers, so every expected verdict is
known."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import report  # noqa: E402


@pytest.mark.parametrize(
    "df, value", [(1, 12.706), (2, 4.303), (4, 2.776), (15, 2.131), (30, 2.042), (1000, 1.962)]
)
def test_t_quantile_matches_the_tables(df, value):
    assert report.t_quantile(0.975, df) == pytest.approx(value, abs=2e-3)


def test_interval_covers_the_mean_with_the_t_half_width():
    d = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    mean, low, high = report.interval(d)
    half = 2.776 * np.std(d, ddof=1) / np.sqrt(5)
    assert (
        mean == 3.0
        and low == pytest.approx(3 - half, abs=1e-3)
        and high == pytest.approx(3 + half, abs=1e-3)
    )
    assert report.interval(np.array([1.0]))[1:] == (-np.inf, np.inf)  # one value: no interval


def run(doc_nll, recall=None):
    """A run as eval.py writes it, at one context (T = 8): each document's NLL, each trial's
    recall."""
    trials = {"0.0": list(recall if recall is not None else [0.5] * 4)}
    return {
        "ppl": {"8": {"doc_nll": list(doc_nll)}},
        "retrieval": {"8": {"trial_acc": trials, "distance": {"0.0": 6}}},
    }


def test_a_claim_holds_only_if_every_seed_agrees():
    rng = np.random.default_rng(0)
    base = rng.normal(
        3.0, 0.5, 16
    )  # the documents differ a lot, the models' differences little: pairing matters
    better = [run(base - 0.1 + rng.normal(0, 0.01, 16)) for _ in range(3)]
    same = [run(base + rng.normal(0, 0.01, 16)) for _ in range(3)]
    assert report.compare(better, same, 8)["verdict"] == "yes"
    assert report.compare(same, better, 8)["verdict"] == "no"
    assert (
        report.compare(same, [run(base + rng.normal(0, 0.01, 16)) for _ in range(3)], 8)["verdict"]
        == "within noise"
    )
    mixed = better[:2] + [run(base + 0.1)]  # one seed the other way: not decided
    assert report.compare(mixed, same, 8)["verdict"] == "within noise"
    single = report.compare(
        better, [run(base)], 8
    )  # one run stands for every seed of the other side
    assert (
        single["seeds"] == 3
        and single["verdict"] == "yes"
        and single["mean"] == pytest.approx(-0.1, abs=0.01)
    )


def test_recall_is_better_when_higher():
    hi, lo = [run([1.0] * 4, [0.9, 0.8, 0.95, 0.85])], [run([1.0] * 4, [0.1, 0.2, 0.15, 0.05])]
    result = report.compare(hi, lo, 8, key="retrieval")
    assert result["verdict"] == "yes" and result["mean"] > 0  # A - B, positive: A recalls more
    assert report.compare(lo, hi, 8, key="retrieval")["verdict"] == "no"


def test_agree_ignores_within_noise_and_reports_opposite_verdicts():
    a = [
        {"claim": "x", "held": "yes"},
        {"claim": "y", "held": "within noise"},
        {"claim": "z", "held": "no"},
    ]
    b = [{"claim": "x", "held": "yes"}, {"claim": "y", "held": "no"}, {"claim": "z", "held": "yes"}]
    assert report.agree(a, b) == ["z"]


def test_a_seed_that_did_not_run_is_left_out_and_no_seed_at_all_is_not_run():
    rng = np.random.default_rng(2)
    base = rng.normal(3.0, 0.5, 16)
    better = [run(base - 0.1 + rng.normal(0, 0.01, 16)) for _ in range(3)]
    same = [run(base + rng.normal(0, 0.01, 16)), None, None]
    partial = report.compare(better, same, 8)
    assert partial["verdict"] == "yes" and partial["seeds"] == 1 and partial["of"] == 3
    assert "1 of 3 seeds" in report.evidence(partial)
    nothing = report.compare(better, [None, None, None], 8)
    assert (
        nothing["verdict"] == report.NOT_RUN
        and report.evidence(nothing) == "its stages did not finish"
    )
    assert (
        report.compare([None], better, 8)["verdict"] == report.NOT_RUN
    )  # the pretrained side missing


def test_retrieval_claims_past_a_failed_control_are_not_decided():
    def recall_run(acc):
        return {
            "retrieval": {
                str(T): {
                    "trial_acc": {"0.0": list(acc)},
                    "distance": {"0.0": 2 * T},
                    "chance": [0.25] * 4,
                    "ceiling": [0.0635] * 4,
                    "no_needle": [0.0, 0.05, 0.0, 0.1],
                }
                for T in (8, 16)
            }
        }

    copies, guesses = recall_run([1.0, 1.0, 1.0, 1.0]), recall_run([0.2, 0.3, 0.25, 0.2])
    good = {
        "no_finetune": {"default": copies},
        "finetuned": {"yarn": [copies], "linear": [guesses]},
    }
    assert [c["held"] for c in report.retrieval_claims(good, 8, 16)] == ["yes"] * 5
    bad = {
        "no_finetune": {"default": guesses},
        "finetuned": {"yarn": [copies], "linear": [guesses]},
    }
    held = [c["held"] for c in report.retrieval_claims(bad, 8, 16)]
    assert held == ["within noise", "yes"] + [report.CONTROL_FAILED] * 3
    assert (
        report.agree(
            [{"claim": "5b", "held": report.CONTROL_FAILED}], [{"claim": "5b", "held": "yes"}]
        )
        == []
    )


def curve_points(base: np.ndarray, offsets: dict, rng) -> dict:
    """A fine-tune's curve as report.gather writes it: held-out NLL per document after each step."""
    docs = {
        str(k): list(base + off + rng.normal(0, 0.005, len(base))) for k, off in offsets.items()
    }
    return {
        "train": list(np.linspace(2.5, 2.0, 20)),
        "doc_nll": docs,
        "val": {k: float(np.mean(v)) for k, v in docs.items()},
    }


def world(good: bool, seeds: int = 3, docs: int = 16, trials: int = 12) -> dict:
    """Synthetic results in which every claim must come out "yes" (good) or every one "no" (not
    good): YaRN best or worst at every comparison, the paper's temperature best or worst, PI and
    NTK-aware slow or fast to reach YaRN's held-out level, and the same on the ablation's model."""
    rng = np.random.default_rng(7)
    L, s, s_long = 8, 4, 8
    Le, far = L * s, L * s_long
    base = rng.normal(3.0, 0.5, docs)  # documents differ much more than methods: pairing matters
    sign = -1 if good else 1  # YaRN's advantage, in nats

    def ppl_run(offset_at: dict) -> dict:  # offset_at: {context: nats added to every document}
        return {
            "ppl": {
                str(T): {
                    "doc_nll": list(base + off + rng.normal(0, 0.005, docs)),
                    "nll": float((base + off).mean()),
                }
                for T, off in offset_at.items()
            }
        }

    def with_recall(r: dict, acc: float, no_needle: float) -> dict:
        noise = 0.0 if acc in (0.0, 1.0) else 0.02  # whole needles stay whole (exact match)
        r["retrieval"] = {
            str(T): {
                "trial_acc": {
                    str(d): list(np.clip(acc + rng.normal(0, noise, trials), 0, 1))
                    for d in (0.0, 0.5)
                },
                "distance": {"0.0": T - 4, "0.5": (T - 4) // 2},
                "chance": [0.26] * trials,
                "ceiling": [0.0635] * trials,
                "no_needle": list(no_needle + rng.normal(0, 0.01, trials)),
            }
            for T in (L, Le)
        }
        r["retrieval"][str(Le)]["mean"] = acc
        return r

    ladder = (L, Le, 2 * Le, far)
    good_at = {
        T: 0.2 * sign for T in ladder
    }  # YaRN, and the dynamic YaRN, where they must win or lose
    nft = {
        m: with_recall(ppl_run({T: 0.0 for T in ladder}), 1.0, 0.04)
        for m in ("default", "linear", "ntk", "ntk_by_parts", "dynamic")
    }
    at_L = {L: 0.5 * sign, Le: 0.0, 2 * Le: 0.0, far: 0.0}  # short-context check: pretrained, at L
    nft["default"] = with_recall(ppl_run(at_L), 1.0, 0.04)
    nft["yarn"] = with_recall(ppl_run(good_at), 1.0, 0.0)
    nft["dynamic_yarn"] = with_recall(ppl_run({T: 0.4 * sign for T in ladder}), 1.0, 0.0)
    ft = {
        m: [
            with_recall(ppl_run({T: 0.0 for T in ladder}), 0.5 if good else 1.0, 0.0)
            for _ in range(seeds)
        ]
        for m in ("default", "linear", "ntk")
    }
    ft["yarn"] = [with_recall(ppl_run(good_at), 1.0 if good else 0.0, 0.0) for _ in range(seeds)]
    long = {
        "yarn": [ppl_run({Le: 0.0, far: 0.2 * sign}) for _ in range(seeds)],
        **{m: [ppl_run({Le: 0.0, far: 0.0}) for _ in range(seeds)] for m in ("linear", "ntk")},
    }
    odd = np.arange(docs) % 2 == 1
    shape = {
        0.0: 0.0,
        0.04: 0.3,
        0.07: 0.3,
        0.1: 0.4,
        0.13: 0.3,
        0.16: 0.3,
    }  # the bad world's shape, per a
    temperature = {}
    for scale in (2, 4):
        by_a = {}
        for a in (0.0, 0.04, 0.07, 0.1, 0.13, 0.16, 0.2, 0.3):
            if good:  # a parabola with its minimum at the paper's a = 0.1
                off = np.full(docs, 5.0 * (a - 0.1) ** 2)
            elif a in (
                0.2,
                0.3,
            ):  # odd documents like a = 0.2, even ones 0.3; each hates the other's choice
                off = np.where(odd == (a == 0.2), -0.01, 0.2)
            else:  # none (a = 0) is best on average; the paper's a = 0.1 costs 0.4 nats
                off = np.full(docs, shape[a])
            by_a[str(a)] = {"doc_nll": list(base + off + rng.normal(0, 0.001, docs))}
        temperature[str(scale)] = {"context": scale * L, "a": by_a}
    # YaRN's curve reaches its level (its NLL after 20 steps) by 20; the others: slow (above it
    # past 50 steps, 2.5x YaRN's), or fast (below it after 5); at the budgets 10 and 50, YaRN below
    # them, or above
    others = (
        {0: 0.6, 5: 0.5, 10: 0.4, 20: 0.3, 50: 0.2, 100: 0.15, 200: 0.1}
        if good
        else {0: 0.6, 5: -0.1, 10: -0.15, 20: -0.2, 50: -0.25}
    )
    yarn_curve = {0: 0.2, 5: 0.1, 10: 0.05, 20: 0.0, 50: -0.05}
    curves = {
        "yarn": [curve_points(base, yarn_curve, rng) for _ in range(seeds)],
        **{m: [curve_points(base, others, rng) for _ in range(seeds)] for m in ("linear", "ntk")},
    }
    plain = {
        "no_finetune": {
            "default": ppl_run({L: 0.0}),
            "linear": ppl_run({L: 0.3, Le: 0.0}),
            "ntk": ppl_run({Le: 0.0}),
            "yarn": ppl_run({Le: 0.2 * sign}),
        },
        "finetuned": {
            "linear": [ppl_run({L: 0.1, Le: 0.0})],
            "ntk": [ppl_run({L: 0.0, Le: 0.0})],
            "yarn": [ppl_run({L: 0.0, Le: 0.2 * sign})],
        },
    }
    scratch = [ppl_run({Le: -0.2 * sign})]
    config = {
        "L": L,
        "s": s,
        "s_long": s_long,
        "scratch_long": True,
        "temp_scales": [2, 4],
        "finetune_seeds": list(range(seeds)),
        "finetune_steps": 20,
        "finetune_batch": 2,
        "curve_steps": [5, 10, 20, 50, 100, 200],
        "budgets": [10, 50],
        "plain_steps": 100,
    }
    return {
        "config": config,
        "no_finetune": nft,
        "finetuned": ft,
        "long": long,
        "scratch_long": scratch,
        "temperature": temperature,
        "curves": curves,
        "plain": plain,
    }


@pytest.mark.parametrize("good", [True, False])
def test_every_claim_can_come_out_either_way(good):
    """Numbers built for it turn every claim "yes", and numbers built against it turn every claim
    "no": none is fixed by construction (the old temperature claims, best-of-the-sweep tested on its
    own documents, were)."""
    found = report.claims(world(good))
    assert len(found) == 35
    # the control (claims 5 and 5a) holds in both worlds: were claim 5 "no", claims 5b-5d would
    # not be decided (tested above); a world in which 5a is "no" is below
    control = ("5. ", "5a. ")
    expected = {
        c["claim"]: "yes" if good or c["claim"].startswith(control) else "no" for c in found
    }
    wrong = [
        (c["claim"], c["held"], c["evidence"]) for c in found if c["held"] != expected[c["claim"]]
    ]
    assert not wrong, wrong
    assert sum(c["primary"] for c in found) == report.PRIMARY  # the 9 of the Bonferroni family
    assert [c["family"] for c in found].count("ablation") == 4
    assert len({c["claim"] for c in found}) == len(found)  # no claim twice


def test_claim_5a_is_no_for_a_control_that_does_not_use_the_needle():
    """A model that recalls as well without the needle as with it (about the ceiling, 0.0635,
    either way: it guesses) has a lift below the best guess's: 5a is "no", and so is the control,
    so 5b-5d are not decided."""
    rng = np.random.default_rng(4)

    def guesses():
        return list(0.06 + rng.normal(0, 0.01, 12))

    guess = {
        str(T): {
            "trial_acc": {"0.0": guesses()},
            "distance": {"0.0": 2 * T},
            "chance": [0.26] * 12,
            "ceiling": [0.0635] * 12,
            "no_needle": guesses(),
        }
        for T in (8, 16)
    }
    res = {
        "no_finetune": {"default": {"retrieval": guess}},
        "finetuned": {"yarn": [{"retrieval": guess}], "linear": [{"retrieval": guess}]},
    }
    held = {c["claim"][:3]: c["held"] for c in report.retrieval_claims(res, 8, 16)}
    assert held["5. "] == "no" and held["5a."] == "no", held
    assert held["5b."] == held["5c."] == report.CONTROL_FAILED


def test_the_temperature_bootstrap_resamples_documents_jointly_across_s():
    """Each document prefers a_i at s = 2 and 0.2 - a_i at s = 4, so every document's sum over s
    is least at a = 0.1: resampled jointly, every resample fits 0.1; resampled apart, the fits
    would spread."""
    a_grid = (0.0, 0.04, 0.07, 0.1, 0.13, 0.16, 0.2)
    prefer = np.linspace(0.02, 0.18, 16)

    def sweep(best: np.ndarray) -> dict:  # each document's NLL, a parabola around its best a
        return {"a": {str(a): {"doc_nll": list(3.0 + 4 * (a - best) ** 2)} for a in a_grid}}

    temp = {"2": sweep(prefer), "4": sweep(0.2 - prefer)}
    picks = np.random.default_rng(1).integers(0, 16, (500, 16))
    assert np.allclose(report.fitted_a(temp, picks), 0.1, atol=1e-9)
    assert report.fitted_a(temp, np.arange(16)[None]) == pytest.approx(report.fitted_a(temp))
    alone = {"2": sweep(prefer[picks[0]]), "4": sweep(0.2 - prefer[picks[1]])}  # apart: not 0.1
    assert abs(report.fitted_a(alone) - 0.1) > 1e-3
    claim = report.temperature_claims(temp, {"s": 2, "temp_scales": [2, 4]})[1]
    assert claim["held"] == "yes" and "10,000 resamples" in claim["evidence"]


def test_primary_claims_use_the_bonferroni_level():
    rng = np.random.default_rng(3)
    base = rng.normal(3.0, 0.5, 16)
    a = [
        run(base - 0.02 + rng.normal(0, 0.025, 16))
    ]  # about 3 standard errors: beyond 95%, not beyond 99.4%
    b = [run(base)]
    assert report.compare(a, b, 8)["verdict"] == "yes"
    assert report.compare(a, b, 8, level=report.PRIMARY_LEVEL)["verdict"] == "within noise"
    assert "99.44% CI" in report.evidence(report.compare(a, b, 8, level=report.PRIMARY_LEVEL))


def test_fitted_a_finds_the_vertex_and_cross_fitting_uses_the_other_half():
    a_grid = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)
    temp = {"4": {"a": {str(a): {"doc_nll": [3.0 + 4 * (a - 0.13) ** 2] * 6} for a in a_grid}}}
    assert report.fitted_a(temp) == pytest.approx(0.13, abs=1e-9)  # exact for a parabola
    # documents at even positions are best at a = 0.2, odd ones at a = 0.0: each half gets the
    # other's choice
    nll = {
        a: [
            3.0 - (0.1 if (a == 0.2) == (i % 2 == 0) and a in (0.0, 0.2) else 0.0) for i in range(6)
        ]
        for a in a_grid
    }
    temp = {"4": {"a": {str(a): {"doc_nll": v} for a, v in nll.items()}}}
    chosen = report.cross_fitted(temp, "4")
    assert list(chosen) == [nll[0.0][0], nll[0.2][1]] * 3  # never the document's own best


def test_crossing_interpolates_in_log_steps_and_is_inf_when_never_reached():
    steps = np.array([0, 5, 10, 20, 50])
    nll = np.array([[1.0], [0.9], [0.8], [0.7], [0.6]])
    assert report.crossing(nll, steps, np.array(0.9))[0] == pytest.approx(5)  # at a point
    half = np.expm1((np.log1p(20) + np.log1p(50)) / 2)  # halfway from 0.7 to 0.6, in log(1 + step)
    assert report.crossing(nll, steps, np.array(0.65))[0] == pytest.approx(half)
    assert report.crossing(nll, steps, np.array(1.2))[0] == 0  # already there before any step
    assert report.crossing(nll, steps, np.array(0.5))[0] == np.inf
    up_and_down = np.array([[1.0], [0.6], [0.9], [0.5], [0.4]])  # the first crossing counts
    assert report.crossing(up_and_down, steps, np.array(0.7))[0] < 5


def test_efficiency_is_decided_at_2_5x_yarns_steps_with_a_paired_interval():
    rng = np.random.default_rng(5)
    base = rng.normal(1.2, 0.2, 16)
    yarn = curve_points(base, {0: 0.05, 20: 0.0}, rng)
    c = {"finetune_steps": 20, "finetune_batch": 2, "L": 8, "s": 4}

    def decide(offsets, seeds=3):
        pi = [curve_points(base, offsets, rng) for _ in range(seeds)]
        return report.efficiency_claims({"yarn": [yarn] * seeds, "linear": pi}, c)[0]

    slow = decide({0: 0.3, 20: 0.1, 50: 0.04, 100: 0.02, 200: 0.01})  # not there within 200 steps
    assert slow["held"] == "yes" and "PI needs > 200 [> 200, > 200], > 200" in slow["evidence"]
    assert decide({0: 0.3, 20: 0.1, 50: 0.02, 100: -0.02})["held"] == "yes"  # between 50 and 100
    assert decide({0: 0.3, 20: 0.02, 50: -0.02})["held"] == "no"  # between 20 and 50: under 2.5x
    assert decide({0: 0.3, 20: 0.1, 50: 0.0005})["held"] == "within noise"  # at the line at 50
    short = decide({0: 0.3, 20: 0.1})  # no curve run to 2.5x: not decided
    assert short["held"] == report.NOT_RUN


def test_replication_sorts_claims_by_how_two_runs_agree():
    a = [
        {"claim": k, "held": v}
        for k, v in (("p", "yes"), ("q", "no"), ("r", "yes"), ("t", "within noise"))
    ]
    b = [
        {"claim": k, "held": v}
        for k, v in (("p", "yes"), ("q", "yes"), ("r", "within noise"), ("t", "within noise"))
    ]
    assert report.replication(a, b) == {
        "same": ["p"],
        "weakened": ["r"],
        "contradicted": ["q"],
        "undecided": ["t"],
    }
