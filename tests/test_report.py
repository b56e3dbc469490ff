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
    return {"ppl": {"8": {"doc_nll": list(doc_nll)}}, "retrieval": {"8": {"trial_acc": trials}}}


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


def test_temperature_claims_keep_their_names_when_the_best_factor_moves():
    """Two runs whose sweeps pick different best factors still compare claim by claim (agree matches names)."""
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.5, 16)

    def sweep(best):
        nll = {a: base + (0.0 if a == best else 0.05) + rng.normal(0, 0.001, 16) for a in ("1.0", "1.1", "1.2")}
        return {"4": {"paper": "1.1", "factors": {a: {"doc_nll": list(x), "nll": float(x.mean())}
                                                  for a, x in nll.items()}}}

    one, other = report.temperature_claims(sweep("1.1")), report.temperature_claims(sweep("1.2"))
    assert [c["claim"] for c in one] == [c["claim"] for c in other]
    assert "best 1.100" in one[0]["evidence"] and "best 1.200" in other[0]["evidence"]
    assert [c["held"] for c in one] == ["yes", "yes"] and other[0]["held"] == "no"  # the paper's 1.1 lost by 0.05
    assert report.agree(one, other) == ["4. Temperature, s=4: the paper's \u221a(1/t) = 1.100 is as good as the "
                                        "sweep's best, A = the paper's, B = the best"]


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
        return {"retrieval": {str(T): {"trial_acc": {"0.0": list(acc)}, "chance": [0.25] * 4,
                                       "mean": float(np.mean(acc))} for T in (8, 16)}}

    copies, guesses = recall_run([1.0, 0.9, 0.95, 1.0]), recall_run([0.2, 0.3, 0.25, 0.2])
    good = {"no_finetune": {"default": copies}, "finetuned": {"yarn": [copies], "linear": [guesses]}}
    assert [c["held"] for c in report.retrieval_claims(good, 8, 16)] == ["yes", "yes", "yes"]
    bad = {"no_finetune": {"default": guesses}, "finetuned": {"yarn": [copies], "linear": [guesses]}}
    held = [c["held"] for c in report.retrieval_claims(bad, 8, 16)]
    assert held == ["within noise", report.CONTROL_FAILED, report.CONTROL_FAILED]
    assert report.agree([{"claim": "5b", "held": report.CONTROL_FAILED}], [{"claim": "5b", "held": "yes"}]) == []
