"""The verdict rule of the studies (experiments.report.Comparison): paired t intervals and verdicts."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from experiments.report import Comparison, verdict_table


def test_the_interval_is_the_paired_t_interval_with_n_minus_1_degrees_of_freedom():
    c = Comparison("a - b", +1, (1.0, 2.0, 3.0))
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.3027 from the t table, so 2 ± 4.3027 / sqrt(3).
    lo, hi = c.ci
    assert c.mean == 2.0 and lo == pytest.approx(2 - 4.30265 / math.sqrt(3), abs=1e-4)
    assert hi == pytest.approx(2 + 4.30265 / math.sqrt(3), abs=1e-4)
    # The same interval as scipy's one-sample t test of the differences (an independent route).
    diffs = (0.26, 3.78, 2.24, -0.4)
    expected = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert Comparison("x", -1, diffs).ci == pytest.approx((expected.low, expected.high))


@pytest.mark.parametrize(
    "diffs, direction, verdict",
    [
        ((2.08, 3.76, 2.26), +1, "reproduced"),  # interval above 0, the paper's side
        ((2.08, 3.76, 2.26), -1, "contradicted"),  # the same interval against a paper that has a < b
        ((-2.08, -3.76, -2.26), -1, "reproduced"),
        ((-2.08, -3.76, -2.26), +1, "contradicted"),
        ((-1.16, -3.30, -1.06), +1, "inconclusive"),  # all 3 below 0, but the interval reaches past 0
        ((1.0, -1.0, 0.5), +1, "inconclusive"),
    ],
)
def test_each_verdict(diffs, direction, verdict):
    assert Comparison("a - b", direction, diffs).verdict == verdict


def test_without_an_interval_the_verdict_is_inconclusive():
    one = Comparison("a - b", +1, (5.0,), seeds=(0,))
    assert one.ci is None and one.verdict == "inconclusive" and one.cells()[2] == ""
    none = Comparison("a - b", +1, ())
    assert none.ci is None and none.verdict == "inconclusive" and math.isnan(none.mean)
    assert none.cells() == ("no seeds", "", "", "inconclusive")
    # Two seeds give an interval, with t(0.975, 1) = 12.706: wide, so agreeing seeds can stay inconclusive.
    two = Comparison("a - b", +1, (1.0, 2.0))  # sd / sqrt(n) = 0.7071 / 1.4142 = 0.5
    assert two.ci == pytest.approx((1.5 - 12.7062 * 0.5, 1.5 + 12.7062 * 0.5), abs=1e-3)
    assert two.verdict == "inconclusive"
    assert Comparison("a - b", +1, (1.0, 1.01)).verdict == "reproduced"


def test_paired_differences_are_taken_seed_by_seed():
    def r(seed, acc):
        return {"tags": {"seed": seed}, "summary": {"eval/accuracy": acc}}

    c = Comparison.paired("a - b", [r(2, 0.9), r(0, 0.5), r(1, 0.7)], [r(1, 0.6), r(0, 0.4)], +1)
    assert c.seeds == (0, 1) and c.diffs == pytest.approx((10.0, 10.0))
    assert c.ci == pytest.approx((10.0, 10.0)) and c.verdict == "reproduced"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="paper_direction"):
        Comparison("a - b", 0, (1.0,))
    with pytest.raises(ValueError, match="2 differences but 1 seeds"):
        Comparison("a - b", 1, (1.0, 2.0), seeds=(0,))


def test_the_table_shows_per_seed_values_mean_interval_and_verdict():
    table = verdict_table([Comparison("multi - same", +1, (2.0, 0.24, 0.96), (0, 1, 2), paper="+0.2 to +1")])
    header, _, row = table.splitlines()
    assert header.startswith("| comparison (a - b) | paper | seeds | per seed | mean | 95% CI")
    cells = "| multi - same | +0.2 to +1 | 0, 1, 2 | +2.00 / +0.24 / +0.96 | +1.07 | [-1.13, +3.26] |"
    assert row == cells + " inconclusive |"
