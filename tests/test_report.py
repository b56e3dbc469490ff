"""report.py's statistics: t critical values, paired per-document intervals, the verdict rule across seeds, and
the agreement check between two runs. Synthetic numbers, so every expected verdict is known."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import report  # noqa: E402


@pytest.mark.parametrize("df, value", [(1, 12.706), (2, 4.303), (4, 2.776), (15, 2.131), (30, 2.042), (1000, 1.962)])
def test_t_quantile_matches_the_tables(df, value):
    assert report.t_quantile(0.975, df) == pytest.approx(value, abs=2e-3)


def test_interval_covers_the_mean_with_the_t_half_width():
    d = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    mean, low, high = report.interval(d)
    half = 2.776 * np.std(d, ddof=1) / np.sqrt(5)
    assert mean == 3.0 and low == pytest.approx(3 - half, abs=1e-3) and high == pytest.approx(3 + half, abs=1e-3)
    assert report.interval(np.array([1.0]))[1:] == (-np.inf, np.inf)  # one value: no interval


def run(doc_nll, recall=None):
    """A run as eval.py writes it, at one context (T = 8): each document's NLL, each trial's recall."""
    trials = {"0.0": list(recall if recall is not None else [0.5] * 4)}
    return {"ppl": {"8": {"doc_nll": list(doc_nll)}},
            "retrieval": {"8": {"trial_acc": trials, "distance": {"0.0": 6}}}}


def test_a_claim_holds_only_if_every_seed_agrees():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, 16)  # the documents differ a lot, the models' differences little: pairing matters
    better = [run(base - 0.1 + rng.normal(0, 0.01, 16)) for _ in range(3)]
    same = [run(base + rng.normal(0, 0.01, 16)) for _ in range(3)]
    assert report.compare(better, same, 8)["verdict"] == "yes"
    assert report.compare(same, better, 8)["verdict"] == "no"
    assert report.compare(same, [run(base + rng.normal(0, 0.01, 16)) for _ in range(3)], 8)["verdict"] == \
        "within noise"
    mixed = better[:2] + [run(base + 0.1)]  # one seed the other way: not decided
    assert report.compare(mixed, same, 8)["verdict"] == "within noise"
    single = report.compare(better, [run(base)], 8)  # one run stands for every seed of the other side
    assert single["seeds"] == 3 and single["verdict"] == "yes" and single["mean"] == pytest.approx(-0.1, abs=0.01)


def test_recall_is_better_when_higher():
    hi, lo = [run([1.0] * 4, [0.9, 0.8, 0.95, 0.85])], [run([1.0] * 4, [0.1, 0.2, 0.15, 0.05])]
    result = report.compare(hi, lo, 8, key="retrieval")
    assert result["verdict"] == "yes" and result["mean"] > 0  # A - B, positive: A recalls more
    assert report.compare(lo, hi, 8, key="retrieval")["verdict"] == "no"


def test_agree_ignores_within_noise_and_reports_opposite_verdicts():
    a = [{"claim": "x", "held": "yes"}, {"claim": "y", "held": "within noise"}, {"claim": "z", "held": "no"}]
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
    assert nothing["verdict"] == report.NOT_RUN and report.evidence(nothing) == "its stages did not finish"
    assert report.compare([None], better, 8)["verdict"] == report.NOT_RUN  # the pretrained side missing


def test_retrieval_claims_past_a_failed_control_are_not_decided():
    def recall_run(acc):
        return {"retrieval": {str(T): {"trial_acc": {"0.0": list(acc)}, "distance": {"0.0": 2 * T},
                                       "chance": [0.25] * 4, "no_needle": [0.0, 0.05, 0.0, 0.1]} for T in (8, 16)}}

    copies, guesses = recall_run([1.0, 1.0, 1.0, 1.0]), recall_run([0.2, 0.3, 0.25, 0.2])
    good = {"no_finetune": {"default": copies}, "finetuned": {"yarn": [copies], "linear": [guesses]}}
    assert [c["held"] for c in report.retrieval_claims(good, 8, 16)] == ["yes"] * 5
    bad = {"no_finetune": {"default": guesses}, "finetuned": {"yarn": [copies], "linear": [guesses]}}
    held = [c["held"] for c in report.retrieval_claims(bad, 8, 16)]
    assert held == ["within noise", "yes"] + [report.CONTROL_FAILED] * 3
    assert report.agree([{"claim": "5b", "held": report.CONTROL_FAILED}], [{"claim": "5b", "held": "yes"}]) == []


def world(good: bool, seeds: int = 3, docs: int = 16, trials: int = 12) -> dict:
    """Synthetic results in which every claim must come out "yes" (good) or every one "no" (not good): YaRN best
    or worst at every comparison, the paper's temperature best or worst, YaRN's loss curve fast or slow."""
    rng = np.random.default_rng(7)
    L, s, s_long = 8, 4, 8
    Le, far = L * s, L * s_long
    base = rng.normal(3.0, 0.5, docs)  # documents differ much more than methods: pairing matters
    sign = -1 if good else 1  # YaRN's advantage, in nats

    def ppl_run(offset_at: dict) -> dict:  # offset_at: {context: nats added to every document}
        return {"ppl": {str(T): {"doc_nll": list(base + off + rng.normal(0, 0.005, docs)),
                                 "nll": float((base + off).mean())} for T, off in offset_at.items()}}

    def with_recall(r: dict, acc: float, no_needle: float) -> dict:
        noise = 0.0 if acc in (0.0, 1.0) else 0.02  # whole needles stay whole (exact match)
        r["retrieval"] = {str(T): {"trial_acc": {str(d): list(np.clip(acc + rng.normal(0, noise, trials), 0, 1))
                                                 for d in (0.0, 0.5)},
                                   "distance": {"0.0": T - 4, "0.5": (T - 4) // 2}, "chance": [0.26] * trials,
                                   "no_needle": list(no_needle + rng.normal(0, 0.01, trials))} for T in (L, Le)}
        r["retrieval"][str(Le)]["mean"] = acc
        return r

    ladder = (L, Le, 2 * Le, far)
    good_at = {T: 0.2 * sign for T in ladder}  # YaRN, and the dynamic YaRN, where they must win or lose
    nft = {m: with_recall(ppl_run({T: 0.0 for T in ladder}), 1.0, 0.0 if good else 0.9)
           for m in ("default", "linear", "ntk", "ntk_by_parts", "dynamic")}
    nft["default"] = with_recall(ppl_run({L: 0.5 * sign, Le: 0.0, 2 * Le: 0.0, far: 0.0}), 1.0,
                                 0.0 if good else 0.9)  # short-context check: the pretrained model at L
    nft["yarn"] = with_recall(ppl_run(good_at), 1.0, 0.0)
    nft["dynamic_yarn"] = with_recall(ppl_run({T: 0.4 * sign for T in ladder}), 1.0, 0.0)
    ft = {m: [with_recall(ppl_run({T: 0.0 for T in ladder}), 0.5 if good else 1.0, 0.0) for _ in range(seeds)]
          for m in ("default", "linear", "ntk", "ntk_by_parts")}
    ft["yarn"] = [with_recall(ppl_run(good_at), 1.0 if good else 0.0, 0.0) for _ in range(seeds)]
    long = {"yarn": [ppl_run({Le: 0.0, far: 0.2 * sign}) for _ in range(seeds)],
            **{m: [ppl_run({Le: 0.0, far: 0.0}) for _ in range(seeds)] for m in ("linear", "ntk")}}
    odd = np.arange(docs) % 2 == 1
    shape = {0.0: 0.0, 0.04: 0.3, 0.07: 0.3, 0.1: 0.4, 0.13: 0.3, 0.16: 0.3}  # the bad world's shape, per a
    temperature = {}
    for scale in (2, 4):
        by_a = {}
        for a in (0.0, 0.04, 0.07, 0.1, 0.13, 0.16, 0.2, 0.3):
            if good:  # a parabola with its minimum at the paper's a = 0.1
                off = np.full(docs, 5.0 * (a - 0.1) ** 2)
            elif a in (0.2, 0.3):  # odd documents like a = 0.2, even ones 0.3; each hates the other's choice
                off = np.where(odd == (a == 0.2), -0.01, 0.2)
            else:  # none (a = 0) is best on average; the paper's a = 0.1 costs 0.4 nats
                off = np.full(docs, shape[a])
            by_a[str(a)] = {"doc_nll": list(base + off + rng.normal(0, 0.001, docs))}
        temperature[str(scale)] = {"context": scale * L, "a": by_a}
    pi_curve = list(np.linspace(2.5, 2.0, 20))
    yarn_curve = list(np.full(20, 1.5) if good else np.full(20, 3.0))
    curves = {"linear": [{"train": pi_curve, "val": {}}] * seeds, "yarn": [{"train": yarn_curve, "val": {}}] * seeds}
    scratch = [ppl_run({Le: -0.2 * sign})]
    return {"config": {"L": L, "s": s, "s_long": s_long, "scratch_long": True, "temp_scales": [2, 4],
                       "finetune_seeds": list(range(seeds)), "finetune_steps": 20},
            "no_finetune": nft, "finetuned": ft, "long": long, "scratch_long": scratch, "temperature": temperature,
            "curves": curves}


@pytest.mark.parametrize("good", [True, False])
def test_every_claim_can_come_out_either_way(good):
    """Numbers built for it turn every claim "yes", and numbers built against it turn every claim "no": none is
    fixed by construction (the old temperature claims, best-of-the-sweep tested on its own documents, were)."""
    found = report.claims(world(good))
    assert len(found) == 29
    # the control (claim 5) holds in both worlds: were it "no", claims 5b-5d would not be decided (tested above)
    expected = {c["claim"]: "yes" if good or c["claim"].startswith("5. ") else "no" for c in found}
    wrong = [(c["claim"], c["held"], c["evidence"]) for c in found if c["held"] != expected[c["claim"]]]
    assert not wrong, wrong
    assert sum(c["primary"] for c in found) == report.PRIMARY + 1  # the 8 interval comparisons and claim 6


def test_primary_claims_use_the_bonferroni_level():
    rng = np.random.default_rng(3)
    base = rng.normal(3.0, 0.5, 16)
    a = [run(base - 0.02 + rng.normal(0, 0.025, 16))]  # about 3 standard errors: beyond 95%, not beyond 99.4%
    b = [run(base)]
    assert report.compare(a, b, 8)["verdict"] == "yes"
    assert report.compare(a, b, 8, level=report.PRIMARY_LEVEL)["verdict"] == "within noise"
    assert "99.38% CI" in report.evidence(report.compare(a, b, 8, level=report.PRIMARY_LEVEL))


def test_fitted_a_finds_the_vertex_and_cross_fitting_uses_the_other_half():
    a_grid = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)
    temp = {"4": {"a": {str(a): {"doc_nll": [3.0 + 4 * (a - 0.13) ** 2] * 6} for a in a_grid}}}
    assert report.fitted_a(temp) == pytest.approx(0.13, abs=1e-9)  # exact for a parabola
    # documents at even positions are best at a = 0.2, odd ones at a = 0.0: each half gets the other's choice
    nll = {a: [3.0 - (0.1 if (a == 0.2) == (i % 2 == 0) and a in (0.0, 0.2) else 0.0) for i in range(6)]
           for a in a_grid}
    temp = {"4": {"a": {str(a): {"doc_nll": v} for a, v in nll.items()}}}
    chosen = report.cross_fitted(temp, "4")
    assert list(chosen) == [nll[0.0][0], nll[0.2][1]] * 3  # never the document's own best


def test_steps_to_target_on_a_hand_made_curve():
    pi = [3.0 - 0.05 * k for k in range(21)]  # 3.0 down to 2.0
    assert report.smooth([1, 2, 3, 4, 5, 6])[-1] == pytest.approx(4.0)  # the trailing mean of 5: (2+..+6)/5
    target = report.smooth(pi)[-1]  # 2.1, the mean of the last 5 steps
    assert target == pytest.approx(2.1)
    assert report.steps_to(pi, target) == 20
    fast = [2.5 - 0.2 * k for k in range(21)]  # smoothed, at or below 2.1 from step 4 on: (2.5+2.3+2.1+1.9+1.7)/5
    assert report.steps_to(fast, target) == 4
    assert report.steps_to([9.0] * 21, target) is None
    curves = {"linear": [{"train": pi, "val": {}}], "yarn": [{"train": fast, "val": {}}]}
    held = {c["claim"][:2]: c["held"] for c in report.efficiency_claims(curves, {})}
    assert held == {"6.": "yes", "6b": "yes"}  # 4 <= 20 / 2.5; and below PI at every step
    slow = [{"train": [2.5 - 0.03 * k for k in range(21)], "val": {}}]  # reaches 2.1 only at step 16
    assert report.efficiency_claims({"linear": curves["linear"], "yarn": slow}, {})[0]["held"] == "no"


def test_replication_sorts_claims_by_how_two_runs_agree():
    a = [{"claim": k, "held": v} for k, v in (("p", "yes"), ("q", "no"), ("r", "yes"), ("t", "within noise"))]
    b = [{"claim": k, "held": v} for k, v in (("p", "yes"), ("q", "yes"), ("r", "within noise"),
                                               ("t", "within noise"))]
    assert report.replication(a, b) == {"same": ["p"], "weakened": ["r"], "contradicted": ["q"], "undecided": ["t"]}
