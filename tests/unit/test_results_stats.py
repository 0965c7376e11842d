"""Per-run scores and across-seed statistics of the sample-efficiency table, on synthetic
curves and samples whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from moedream.results import stats

STEPS = np.arange(0, 1000, 100)  # (10,) evaluations every 100 real steps


def test_a_crossing_that_falls_back_is_not_a_sustained_hit():
    values = [0, 0, 1, 0, 0, 1, 1, 1, 1, 1]  # brief crossing at 200, held from 500
    assert stats.first_sustained_hit(STEPS, values, 0.5, hold=3) == 500
    assert stats.first_sustained_hit(STEPS, values, 0.5, hold=1) == 200


def test_no_sustained_hit_is_none_also_when_the_curve_ends_unconfirmed():
    assert stats.first_sustained_hit(STEPS, [0, 1, 1, 0, 1, 1, 0, 1, 1, 0], 0.5, hold=3) is None
    assert stats.first_sustained_hit(STEPS, [0] * 8 + [1, 1], 0.5, hold=3) is None
    assert stats.first_sustained_hit(STEPS, [1, 1, np.nan, 1, 1, 0, 0, 0, 0, 0], 1, 3) is None


def test_threshold_is_inclusive():
    assert stats.first_sustained_hit(STEPS, [0, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0, 0], 0.5, 3) == 100


def test_bad_hold_and_unordered_steps_are_refused():
    with pytest.raises(ValueError, match="hold = 0 is invalid"):
        stats.first_sustained_hit(STEPS, np.ones(10), 0.5, hold=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        stats.first_sustained_hit([0, 200, 100], [1, 1, 1], 0.5, hold=1)


def test_steps_to_threshold_counts_the_closing_evaluation_and_censors_the_rest():
    steps = np.array([0, 400, 800, 1050, 1400])  # the rollout overshot the 1000 budget
    assert stats.steps_to_threshold(steps, [0, 1, 1, 1, 1], 0.5, 3, budget=1000) == (400, True)
    # held only from 800: confirmed at 1400, after the closing evaluation, so not reached
    assert stats.steps_to_threshold(steps, [0, 0, 1, 1, 1], 0.5, 3, budget=1000) == (1050, False)


def test_final_value_is_the_mean_of_the_last_k():
    assert stats.final_value([5, 1, 2, 6], last_k=3) == 3.0
    with pytest.raises(ValueError, match="last_k"):
        stats.final_value([1, 2], last_k=3)


def test_area_under_a_linear_curve_is_its_analytic_mean():
    budget, a, b = 1000, 2.0, 0.003
    steps = np.append(np.arange(0, 1000, 100), 1050)  # overshoots the budget: cut by interpolation
    # mean of a + b*s over [0, budget] = a + b * budget / 2
    assert stats.area_under_curve(steps, a + b * steps, budget) == pytest.approx(a + b * budget / 2)


def test_area_needs_an_evaluation_at_step_zero():
    with pytest.raises(ValueError, match="evaluate before training"):
        stats.area_under_curve([100, 1000], [1, 1], 1000)


def test_iqm_is_the_mean_of_the_middle_half():
    assert stats.iqm(np.arange(1, 9)) == 4.5  # cuts 1,2 and 7,8
    assert stats.iqm([-100, 1, 2, 3, 4, 5, 6, 7, 8, 100]) == np.mean([2, 3, 4, 5, 6, 7])
    assert stats.iqm([1, 2, 9]) == 4.0  # under 4 runs nothing is cut


def test_iqm_matches_rliables_definition():
    trim_mean = pytest.importorskip("scipy.stats").trim_mean
    scores = np.random.default_rng(3).normal(size=(13, 4))
    np.testing.assert_allclose(stats.iqm(scores), trim_mean(scores, 0.25, axis=0))


def _width(interval: stats.Interval) -> float:
    return interval.hi - interval.lo


def test_bootstrap_interval_contains_the_true_mean_and_shrinks_with_more_runs():
    rng = np.random.default_rng(0)
    few, many = rng.normal(10, 2, size=10), rng.normal(10, 2, size=200)
    result = stats.aggregate({"few": few, "many": many}, reps=4000, seed=0)
    for name in ("few", "many"):
        assert result[name].lo < 10 < result[name].hi, result[name]
    assert _width(result["many"]) < _width(result["few"]) / 3  # ~ sqrt(20) narrower


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    samples = {str(i): rng.normal(10, 2, size=30) for i in range(200)}
    intervals = stats.aggregate(samples, reps=1000, seed=0)
    coverage = np.mean([iv.lo < 10 < iv.hi for iv in intervals.values()])
    assert 0.88 <= coverage <= 0.99, coverage


def test_aggregate_is_reproducible_and_refuses_nan():
    scores = {"a": np.random.default_rng(2).normal(size=8)}
    assert stats.aggregate(scores, reps=500, seed=4) == stats.aggregate(scores, reps=500, seed=4)
    assert stats.aggregate(scores, reps=500, seed=4) != stats.aggregate(scores, reps=500, seed=5)
    with pytest.raises(ValueError, match="finite"):
        stats.aggregate({"a": np.array([1.0, np.nan])})


def _step_curve(hit: int, budget: int = 3000, every: int = 10):
    steps = np.arange(0, budget + 1, every)
    return steps, (steps >= hit).astype(float)


def test_ratio_of_a_variant_reaching_the_threshold_three_times_faster_is_three():
    hits = np.array([300, 330, 360, 390, 420, 450, 480, 510])  # baseline; the variant needs 1/3
    per_run = {
        name: [stats.steps_to_threshold(*_step_curve(h), 0.5, 3, 3000) for h in scale]
        for name, scale in {"baseline": hits, "variant": hits // 3}.items()
    }
    steps = {name: np.array([s for s, reached in runs]) for name, runs in per_run.items()}
    np.testing.assert_array_equal(steps["variant"] * 3, steps["baseline"])
    ratio = stats.threshold_ratio(steps["baseline"], steps["variant"], reps=4000, seed=0)
    assert ratio.point == pytest.approx(3.0)
    assert 2.3 < ratio.lo < 3.0 < ratio.hi < 3.9, ratio


def test_ratio_refuses_a_threshold_held_from_step_zero():
    with pytest.raises(ValueError, match="raise the threshold"):
        stats.threshold_ratio([100, 200], [0, 100])


@pytest.mark.parametrize(
    ("ratio", "baseline_censored", "variant_censored", "expected"),
    [
        (stats.Interval(2.0, 1.5, 2.5), False, False, "better"),
        (stats.Interval(2.0, 1.5, 2.5), True, False, "better"),  # censoring only lowers it
        (stats.Interval(2.0, 1.5, 2.5), False, True, "not shown: variant runs not reached"),
        (stats.Interval(0.5, 0.3, 0.8), False, True, "worse"),  # censoring only raises it
        (stats.Interval(0.5, 0.3, 0.8), True, False, "not shown: baseline runs not reached"),
        (stats.Interval(1.1, 0.9, 1.4), False, False, "no difference shown"),
        (stats.Interval(1.0, 1.0, 1.0), False, False, "no difference shown"),
    ],
)
def test_verdict_claims_only_what_the_interval_and_censoring_allow(
    ratio, baseline_censored, variant_censored, expected
):
    assert stats.verdict(ratio, baseline_censored, variant_censored).startswith(expected)


@pytest.mark.parametrize(
    ("prob", "df", "expected"),  # Student's t table
    [(0.95, 1, 6.313752), (0.95, 4, 2.131847), (0.975, 10, 2.228139), (0.95, 1000, 1.646379)],
)
def test_t_quantile_matches_the_t_table(prob, df, expected):
    assert stats.t_quantile(prob, df) == pytest.approx(expected, abs=1e-5)


def test_mean_t_interval_of_known_differences():
    # mean 1, sd 1 over 5 runs: half-width t(0.95, 4) / sqrt(5) = 0.953392
    point, lo, hi = stats.mean_t_interval([0.0, 0.0, 1.0, 2.0, 2.0])
    assert point == pytest.approx(1.0)
    assert (lo, hi) == pytest.approx((1 - 0.953392, 1 + 0.953392), abs=1e-5)
    with pytest.raises(ValueError, match=">= 2 runs"):
        stats.mean_t_interval([1.0])
    with pytest.raises(ValueError, match="0.5 <= prob < 1"):
        stats.t_quantile(1.0, 4)
