"""The gate-training benchmark's goal test on synthetic paired runs whose verdicts are known:
equivalence within the margin, measurably worse without the gate, and an uninformative budget."""

from __future__ import annotations

import pytest

from benchmarks.gate_training import criterion

SEEDS = range(5)
ACTION = "action_rate_4"


def runs(good_final, bias_gate_final, bias_no_gate_final, untrained=(5.0, 6.0, 5.0, 4.0, 5.0)):
    """{variant: {seed: (metrics at step 0, metrics at the budget)}} from per-seed returns."""

    def variant(finals):
        return {s: ({"team_return": untrained[s], ACTION: 0.2},
                    {"team_return": finals[s], ACTION: 0.2}) for s in SEEDS}  # fmt: skip

    return {"good_gate": variant(good_final), "bias_gate": variant(bias_gate_final),
            "bias_no_gate": variant(bias_no_gate_final)}  # fmt: skip


GOOD = (12.0, 13.0, 11.0, 12.0, 12.0)  # learning gain 7.0 ± 0.3 over the untrained team


def test_a_gated_team_close_to_the_good_run_and_a_worse_ungated_one_meet_the_goal():
    near = tuple(g + d for g, d in zip(GOOD, (0.3, -0.2, 0.1, -0.3, 0.2), strict=True))
    text = criterion(runs(GOOD, near, tuple(g - 4 for g in GOOD)), ACTION, margin=0.5)
    assert "above 0, informative" in text
    assert "margin δ = 0.5 × 7.00 = 3.50" in text
    assert "inside ±δ" in text and "not inside" not in text
    assert "below 0 (one-sided" in text
    assert text.endswith("Goal: **met**.")


def test_a_gated_team_short_by_more_than_the_margin_does_not():
    short = tuple(g - 5 for g in GOOD)
    text = criterion(runs(GOOD, short, tuple(g - 4 for g in GOOD)), ACTION, margin=0.5)
    assert "not inside ±δ" in text
    assert text.endswith("Goal: **not met**.")


@pytest.mark.parametrize("margin", [0.5, 10.0])
def test_a_good_model_team_that_did_not_learn_makes_the_comparison_uninformative(margin):
    flat = (5.5, 5.0, 5.5, 4.5, 4.0)  # mean gain 0, any margin
    text = criterion(runs(flat, flat, tuple(f - 3 for f in flat)), ACTION, margin=margin)
    assert "not shown above 0: the comparison is not informative" in text
    assert text.endswith("Goal: **not met**.")


def test_fewer_than_two_common_seeds_give_no_verdict():
    one = runs(GOOD, GOOD, GOOD)
    one["bias_gate"] = {0: one["bias_gate"][0]}
    assert "needs >= 2 seeds" in criterion(one, ACTION, margin=0.5)
