"""The results runner's bookkeeping (resume, durable points, done markers), the spec's
validation and the summary table.

The train_fn here is a small deterministic function drawing synthetic learning curves: what is
under test is the runner's and the table's arithmetic and record keeping, not any learning.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moedream.config import ConfigError
from moedream.results.provenance import code_label, code_version
from moedream.results.runner import done_path, points_path, run_all
from moedream.results.spec import load_spec, spec_from_dict
from moedream.results.summary import CURVES_FILE, SUMMARY_FILE, summarise

BUDGET, EVERY = 1000, 100
# metric per real step: "fast" reaches 0.5 at step 100, "slow" at 300 (3x), "never" stays < 0.5
RATES = {"slow": 1 / 600, "fast": 1 / 200, "never": 1 / 4000, "same": 1 / 600}
COSTS = {"fast": 3}  # seconds per real step x 100: "fast" takes 3x the wall-clock, others 1x


def spec_dict(variants=("slow", "fast"), seeds=(0, 1)) -> dict:
    return {
        "baseline": "slow",
        "protocol": {
            "seeds": list(seeds),
            "budget_real_steps": BUDGET,
            "eval_every_real_steps": EVERY,
            "eval_episodes": 2,
            "metric": "eval_return",
            "threshold": 0.5,
            "bootstrap_reps": 2000,
        },
        "variants": [
            {"name": name, "overrides": {"rate": RATES[name], "cost": COSTS.get(name, 1)}}
            for name in variants
        ],
    }


class SyntheticTrainer:
    """Reports min(1, rate * step) + 0.01 * seed every EVERY real steps up to the budget, and
    can fail once at a chosen (variant, seed, step)."""

    def __init__(self, fail_at: tuple[str, int, int] | None = None):
        self.calls: list[tuple[str, int]] = []
        self.fail_at = fail_at

    def __call__(self, variant, seed, callback):
        self.calls.append((variant.name, seed))
        for step in range(0, variant.protocol.budget_real_steps + 1, EVERY):
            if (variant.name, seed, step) == self.fail_at:
                self.fail_at = None
                raise RuntimeError("worker lost")
            value = min(1.0, variant.overrides["rate"] * step) + 0.01 * seed
            seconds = step / 100 * variant.overrides["cost"]
            callback(step, seconds, {"eval_return": value, "episodes": 2})


def test_a_failed_run_restarts_from_scratch_and_finished_runs_are_skipped(tmp_path, caplog):
    spec = spec_from_dict(spec_dict())
    first = SyntheticTrainer(fail_at=("slow", 1, 500))
    with pytest.raises(RuntimeError, match="worker lost"):
        run_all(spec, first, tmp_path)
    assert first.calls == [("slow", 0), ("slow", 1)]
    assert done_path(tmp_path, "slow", 0).exists() and not done_path(tmp_path, "slow", 1).exists()
    assert len(points_path(tmp_path, "slow", 1).read_text().splitlines()) == 5  # 0..400 kept

    second = SyntheticTrainer()
    with caplog.at_level(logging.INFO, logger="moedream.results.runner"):
        trained = run_all(spec, second, tmp_path)
    assert second.calls == trained == [("slow", 1), ("fast", 0), ("fast", 1)]
    assert (
        "slow seed 1: unfinished, restarting from scratch (dropping 5 evaluations)" in caplog.text
    )
    lines = points_path(tmp_path, "slow", 1).read_text().splitlines()
    assert [json.loads(line)["real_steps"] for line in lines] == list(range(0, BUDGET + 1, EVERY))
    assert run_all(spec, SyntheticTrainer(), tmp_path) == []


def test_bad_evaluation_reports_are_refused_and_leave_no_done_marker(tmp_path):
    spec = spec_from_dict(spec_dict(variants=("slow",), seeds=(0,)))

    def late_start(variant, seed, callback):
        callback(100, 1.0, {"eval_return": 0.0})

    def no_metric(variant, seed, callback):
        callback(0, 0.0, {"return": 0.0})

    def stops_early(variant, seed, callback):
        for step in range(0, 600, EVERY):
            callback(step, 0.0, {"eval_return": 0.0})

    def skips_evaluations(variant, seed, callback):
        callback(0, 0.0, {"eval_return": 0.0})
        callback(BUDGET, 1.0, {"eval_return": 1.0})

    cases = [
        (late_start, "evaluate at real step 0"),
        (no_metric, "protocol.metric = 'eval_return'"),
        (stops_early, "the last at real step 500; it must evaluate every 100"),
        (skips_evaluations, "returned after 2 evaluations"),
    ]
    for train_fn, message in cases:
        with pytest.raises(ValueError, match=message):
            run_all(spec, train_fn, tmp_path)
        assert not done_path(tmp_path, "slow", 0).exists()


def test_changed_overrides_do_not_mix_with_recorded_runs(tmp_path):
    run_all(spec_from_dict(spec_dict(variants=("slow",), seeds=(0,))), SyntheticTrainer(), tmp_path)
    changed = spec_dict(variants=("slow",), seeds=(0,))
    changed["variants"][0]["overrides"]["rate"] = 0.5
    with pytest.raises(ConfigError, match="use a new out_dir or a new variant name"):
        run_all(spec_from_dict(changed), SyntheticTrainer(), tmp_path)


def _row(markdown: str, variant: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {variant} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_summary_table_has_the_hand_computed_rows(tmp_path):
    spec = spec_from_dict(spec_dict(variants=("slow", "fast", "never", "same"), seeds=(0, 1, 2, 3)))
    run_all(spec, SyntheticTrainer(), tmp_path)
    done_path(tmp_path, "same", 3).unlink()  # as if it had been interrupted
    markdown = summarise(tmp_path, spec)
    assert (tmp_path / SUMMARY_FILE).read_text() == markdown
    assert (tmp_path / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # seeds add 0.00..0.03: IQM of 4 runs is the mean of the middle two (+0.015)
    # slow: final 1.015, AUC (300 + 400) / 1000 + 0.015, 0.5 held from step 300, 10 s at budget
    slow = ["slow", "4/4", "1.015 [1, 1.03]", "0.715 [0.7, 0.73]", "300 [300, 300]", "4/4"]
    code = code_label(code_version())  # every run ran this work tree's code
    wallclock = ["10 [10, 10]", "1"]
    assert _row(markdown, "slow") == [*slow, *wallclock, "1 (baseline)", "baseline", code]
    fast = _row(markdown, "fast")
    assert fast[3:5] == ["0.915 [0.9, 0.93]", "100 [100, 100]"]  # AUC (900 + 50) / 1000
    assert fast[6:] == ["30 [30, 30]", "3.00x [3.00, 3.00]", "3.00x [3.00, 3.00]", "better", code]
    never = _row(markdown, "never")  # censored at the budget, kept: 300 / 1000
    assert never[4:6] == ["1,000 [1,000, 1,000]", "0/4"]
    assert never[7:10] == ["1.00x [1.00, 1.00]", "0.30x [0.30, 0.30]", "worse"]
    same = _row(markdown, "same")
    # an unfinished row's verdict is provisional: the protocol asks for every seed
    assert same[1] == "3/4" and same[9] == "provisional (3/4 runs vs 4/4): no difference shown"
    assert "Not finished, so not in the table: same seed 3." in markdown
    # every reported metric at the closing evaluation (columns sorted: episodes, eval_return)
    at_budget = markdown.split("Every metric at the evaluation closing the budget")[1]
    assert "| variant | episodes | eval_return |" in at_budget
    assert _row(at_budget, "slow") == ["slow", "2 [2, 2]", "1.015 [1, 1.03]"]
    assert _row(at_budget, "never")[2] == "0.265 [0.25, 0.28]"  # 1000 / 4000 + 0.015


def test_valid_yaml_loads_with_defaults(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict()))
    spec = load_spec(path)
    assert [v.name for v in spec.variants] == ["slow", "fast"] and spec.baseline == "slow"
    assert spec.protocol.hold == 3 and spec.protocol.seeds == (0, 1)
    assert spec.variants[1].protocol is spec.protocol and spec.variants[1].overrides == {
        "rate": 0.005,
        "cost": 3,
    }


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _edited(protocol=None, variants=None, **top) -> dict:
    data = spec_dict()
    data["protocol"].update(protocol or {})
    data["variants"] = variants if variants is not None else data["variants"]
    return {**data, **top}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {**spec_dict(), "protocol": _without(spec_dict()["protocol"], "budget_real_steps")},
            "`protocol.budget_real_steps` is missing",
        ),
        (_without(spec_dict(), "baseline"), "`baseline` is missing"),
        (_edited(baseline="fastest"), "`baseline` = 'fastest' is invalid: must be one of"),
        (_edited({"eval_every_real_steps": 0}), "`protocol.eval_every_real_steps` = 0"),
        (
            _edited({"threshold": "high"}),
            "`protocol.threshold` = 'high' is invalid: must be a finite number or 'baseline_final'",
        ),
        (
            _edited({"seeds": [0, 0]}),
            "`protocol.seeds` = (0, 0) is invalid: must be a non-empty list of distinct",
        ),
        (
            _edited({"hold": 12}),
            "`protocol.hold` = 12 is invalid: must be <= the 11 evaluations a run makes",
        ),
        (_edited({"holds": 3}), "unknown config field(s) ['protocol.holds']"),
        (_edited(variants=[]), "`variants` = [] is invalid: must be a non-empty list"),
        (_edited(variants=[{"name": "slow"}, {"name": "slow"}]), "each variant needs its own name"),
        (_edited(variants=[{"name": "a/b"}]), "`variants[0].name` = 'a/b' is invalid"),
        (
            _edited(variants=[{"name": "slow", "overide": {}}]),
            "unknown field(s) ['overide'] in `variants[0]`",
        ),
        (_edited(variants=[{"name": "slow", "overrides": [1]}]), "`variants[0].overrides` = [1]"),
        ({**spec_dict(), "seeds": [0]}, "unknown top-level field(s) ['seeds']"),
    ],
)
def test_spec_errors_name_the_field_and_the_fix(data, message):
    with pytest.raises(ConfigError) as error:
        spec_from_dict(data)
    assert message in str(error.value)


CRASHING_RUN = """
import os, sys
from moedream.results.runner import run_all
from moedream.results.spec import spec_from_dict
from tests.unit.test_results_runner import spec_dict

def dies(variant, seed, callback):
    for step in (0, 100, 200):
        callback(step, 0.0, {"eval_return": 0.0})
    os._exit(3)  # no cleanup: only what the runner flushed survives

run_all(spec_from_dict(spec_dict(variants=("slow",), seeds=(0,))), dies, sys.argv[1])
"""


def test_points_reported_before_a_hard_crash_are_on_disk(tmp_path):
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", CRASHING_RUN, str(tmp_path)], cwd=root)
    assert done.returncode == 3
    assert len(points_path(tmp_path, "slow", 0).read_text().splitlines()) == 3
    assert not done_path(tmp_path, "slow", 0).exists()


class ResumableTrainer(SyntheticTrainer):
    """SyntheticTrainer with a resume point after each evaluation (``saved`` of them), as
    PlatformTrainer keeps one; ``resumed`` records what the runner asked for."""

    def __init__(self, fail_at=None, saved: dict | None = None):
        super().__init__(fail_at)
        self.saved = saved if saved is not None else {}
        self.resumed: list[int] = []

    def resume_point(self, variant, seed):
        return self.saved.get((variant.name, seed), 0)

    def __call__(self, variant, seed, callback, *, resumed=0):
        self.calls.append((variant.name, seed))
        self.resumed.append(resumed)
        for step in range(resumed * EVERY, variant.protocol.budget_real_steps + 1, EVERY):
            if (variant.name, seed, step) == self.fail_at:
                self.fail_at = None
                raise RuntimeError("killed")
            value = min(1.0, variant.overrides["rate"] * step) + 0.01 * seed
            callback(step, step / 100, {"eval_return": value})
            self.saved[(variant.name, seed)] = step // EVERY + 1


def test_an_unfinished_run_resumes_after_its_resume_point_and_keeps_its_rows(tmp_path, caplog):
    spec = spec_from_dict(spec_dict(variants=("slow",), seeds=(0,)))
    first = ResumableTrainer(fail_at=("slow", 0, 500))
    with pytest.raises(RuntimeError, match="killed"):
        run_all(spec, first, tmp_path)
    before = points_path(tmp_path, "slow", 0).read_text().splitlines()
    assert len(before) == 5 and first.saved[("slow", 0)] == 5
    # A kill between a row's write and its resume point: the row past the point is dropped.
    first.saved[("slow", 0)] = 4

    second = ResumableTrainer(saved=first.saved)
    with caplog.at_level(logging.INFO, logger="moedream.results.runner"):
        assert run_all(spec, second, tmp_path) == [("slow", 0)]
    assert second.resumed == [4]
    assert "slow seed 0: unfinished, resuming after evaluation 4 of 5 recorded" in caplog.text
    lines = points_path(tmp_path, "slow", 0).read_text().splitlines()
    assert lines[:4] == before[:4]  # the rows up to the resume point are the first sitting's
    assert [json.loads(line)["real_steps"] for line in lines] == list(range(0, BUDGET + 1, EVERY))
    assert json.loads(done_path(tmp_path, "slow", 0).read_text())["evaluations"] == 11


def test_a_resume_point_past_the_recorded_rows_restarts_the_run(tmp_path, caplog):
    spec = spec_from_dict(spec_dict(variants=("slow",), seeds=(0,)))
    with pytest.raises(RuntimeError, match="killed"):
        run_all(spec, ResumableTrainer(fail_at=("slow", 0, 300)), tmp_path)
    second = ResumableTrainer(saved={("slow", 0): 7})  # more than the 3 rows on record
    with caplog.at_level(logging.INFO, logger="moedream.results.runner"):
        run_all(spec, second, tmp_path)
    assert second.resumed == [0]  # told to start over
    assert "restarting from scratch (dropping 3 evaluations)" in caplog.text
    assert len(points_path(tmp_path, "slow", 0).read_text().splitlines()) == BUDGET // EVERY + 1


def test_a_resumed_run_must_continue_past_its_recorded_rows(tmp_path):
    spec = spec_from_dict(spec_dict(variants=("slow",), seeds=(0,)))
    with pytest.raises(RuntimeError, match="killed"):
        run_all(spec, ResumableTrainer(fail_at=("slow", 0, 300)), tmp_path)

    class Repeats(ResumableTrainer):  # reports the resume point's evaluation again
        def __call__(self, variant, seed, callback, *, resumed=0):
            callback((resumed - 1) * EVERY, 1.0, {"eval_return": 0.0})

    with pytest.raises(ValueError, match="evaluation at real step 200 after one at 200"):
        run_all(spec, Repeats(saved={("slow", 0): 3}), tmp_path)


def test_a_baseline_final_threshold_is_the_baseline_rows_final_iqm(tmp_path):
    """threshold: baseline_final times every row to the level the baseline ends at: "slow"
    ends at 1 + 0.01 x seed, IQM 1.015. Seeds 2-3 hold that from step 600 ("fast": 200), seeds
    0-1 end below it in both rows and stay in at the budget."""
    data = spec_dict(variants=("slow", "fast"), seeds=(0, 1, 2, 3))
    data["protocol"]["threshold"] = "baseline_final"
    spec = spec_from_dict(data)
    run_all(spec_from_dict({**data, "variants": data["variants"][1:], "baseline": "fast"}),
            SyntheticTrainer(), tmp_path)  # fmt: skip
    pending = summarise(tmp_path, spec)  # no finished baseline run: no threshold yet
    assert "slow's final IQM (no finished run yet)" in pending
    assert _row(pending, "fast")[4:6] == ["-", "-"]

    run_all(spec, SyntheticTrainer(), tmp_path)
    markdown = summarise(tmp_path, spec)
    assert "real steps to eval_return >= 1.015 (slow's final IQM) (held 3 evals)" in markdown
    slow, fast = _row(markdown, "slow"), _row(markdown, "fast")
    assert slow[2] == "1.015 [1, 1.03]" and slow[4:6] == ["800 [600, 1,000]", "2/4"]
    assert fast[4:6] == ["600 [200, 1,000]", "2/4"]
    assert fast[8].startswith("1.33x")  # IQM 800 / 600


def test_wallclock_is_compared_with_the_baseline_and_the_replay_matched_control(tmp_path):
    """The cost of imagination: "fast" takes 3x the baseline's seconds, the control 2x, so
    "fast" costs 1.5x its control."""
    data = spec_dict(variants=("slow", "fast"), seeds=(0, 1))
    control = {"name": "control", "replay_matched_to": "fast",
               "overrides": {"rate": RATES["slow"], "cost": 2}}  # fmt: skip
    data["variants"].append(control)
    spec = spec_from_dict(data)
    run_all(spec, SyntheticTrainer(), tmp_path)
    markdown = summarise(tmp_path, spec)
    assert "| wall-clock s | wall-clock vs slow | wall-clock vs control | speed-up vs slow |" in (
        markdown
    )
    assert _row(markdown, "fast")[6:9] == [
        "30 [30, 30]",
        "3.00x [3.00, 3.00]",
        "1.50x [1.50, 1.50]",
    ]
    assert _row(markdown, "control")[7:9] == ["2.00x [2.00, 2.00]", "1"]
    assert _row(markdown, "slow")[7:9] == ["1", "0.50x [0.50, 0.50]"]
