"""The code and config each results run records (git commit, dirty flag, resolved config per
sitting) and the table's code column and warnings, on synthetic curves; runs recorded before
this bookkeeping still load."""

from __future__ import annotations

import json
import subprocess

import pytest

from moedream.results import runner
from moedream.results.provenance import code_version, mixed_code_warnings
from moedream.results.runner import done_path, points_path, run_all
from moedream.results.spec import spec_from_dict
from moedream.results.summary import summarise
from tests.unit.test_results_runner import ResumableTrainer, SyntheticTrainer, _row, spec_dict

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def git(repository, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repository), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_code_version_is_the_commit_and_whether_tracked_files_changed(tmp_path):
    assert code_version(tmp_path) == {"commit": "unknown", "dirty": False}  # not a work tree
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "scratch.txt").write_text("untracked\n")  # run folders and scratch files
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_version(tmp_path) == {"commit": head, "dirty": True}


class ConfiguredTrainer(ResumableTrainer):
    """ResumableTrainer that can say what it trains with, as PlatformTrainer does."""

    def resolved_config(self, variant, seed):
        return {"agents": {"seed": seed, "rate": variant.overrides["rate"]}}


def on_code(monkeypatch, commit: str, dirty: bool = False) -> None:
    """The runner sees ``commit`` as the work tree's code (as if run from that checkout)."""
    monkeypatch.setattr(runner, "code_version", lambda: {"commit": commit, "dirty": dirty})


def test_a_run_resumed_on_other_code_records_both_sittings(tmp_path, monkeypatch):
    spec = spec_from_dict(spec_dict(variants=("slow",), seeds=(0,)))
    on_code(monkeypatch, COMMIT_A)
    first = ConfiguredTrainer(fail_at=("slow", 0, 500))
    with pytest.raises(RuntimeError, match="killed"):
        run_all(spec, first, tmp_path)
    on_code(monkeypatch, COMMIT_B, dirty=True)
    run_all(spec, ConfiguredTrainer(saved=first.saved), tmp_path)

    rows = [json.loads(line) for line in points_path(tmp_path, "slow", 0).read_text().splitlines()]
    assert [r["code"]["commit"][0] for r in rows] == ["a"] * 5 + ["b"] * 6
    assert [i for i, r in enumerate(rows) if "config" in r] == [0, 5]  # once per sitting
    config = rows[5]["config"]
    assert config["resolved"] == {"agents": {"seed": 0, "rate": 1 / 600}}
    assert config["variant"]["overrides"] == {"rate": 1 / 600, "cost": 1}
    assert config["seed"] == 0 and config["variant"]["budget_real_steps"] == 1000

    done = json.loads(done_path(tmp_path, "slow", 0).read_text())
    assert done["evaluations"] == 11
    sittings = [(s["first_evaluation"], s["evaluations"], s["code"]) for s in done["sittings"]]
    assert sittings == [
        (0, 5, {"commit": COMMIT_A, "dirty": False}),
        (5, 6, {"commit": COMMIT_B, "dirty": True}),
    ]
    assert done["sittings"][1]["config"] == config

    markdown = summarise(tmp_path, spec)
    assert _row(markdown, "slow")[-1] == "aaaaaaa (0); bbbbbbb+dirty (0)"
    assert "`slow` mixes code versions: aaaaaaa (seeds 0); bbbbbbb+dirty (seeds 0)" in markdown
    assert "`slow` ran code no commit pins (bbbbbbb+dirty:" in markdown


def test_the_table_names_each_rows_commit_and_warns_when_its_seeds_differ(tmp_path, monkeypatch):
    spec = spec_from_dict(spec_dict(variants=("slow", "fast"), seeds=(0, 1, 2)))
    on_code(monkeypatch, COMMIT_A)
    run_all(spec_from_dict(spec_dict(variants=("slow", "fast"), seeds=(0, 1))), SyntheticTrainer(),
            tmp_path)  # fmt: skip
    on_code(monkeypatch, COMMIT_B)
    run_all(spec, SyntheticTrainer(), tmp_path)  # only seed 2 of each is left

    markdown = summarise(tmp_path, spec)
    assert _row(markdown, "fast")[-1] == "aaaaaaa (0, 1); bbbbbbb (2)"
    assert "`fast` mixes code versions: aaaaaaa (seeds 0, 1); bbbbbbb (seeds 2)" in markdown
    assert "`slow` mixes code versions" in markdown
    assert "no commit pins" not in markdown

    (tmp_path / "again").mkdir()
    run_all(spec, SyntheticTrainer(), tmp_path / "again")
    again = summarise(tmp_path / "again", spec)
    assert _row(again, "fast")[-1] == "bbbbbbb" and "Warning" not in again


def test_runs_recorded_before_the_bookkeeping_load_as_unrecorded(tmp_path, monkeypatch):
    """Rows without "code" and a done file of {"evaluations": n} (older runner) still make the
    table; an old unfinished run resumed now records its new sitting's code beside them."""
    spec = spec_from_dict(spec_dict(variants=("slow",), seeds=(0, 1)))
    on_code(monkeypatch, COMMIT_A)
    first = ResumableTrainer(fail_at=("slow", 1, 300))
    with pytest.raises(RuntimeError, match="killed"):
        run_all(spec, first, tmp_path)
    for seed in (0, 1):  # strip what the older runner did not write
        path = points_path(tmp_path, "slow", seed)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        old = [{k: r[k] for k in ("real_steps", "wallclock_s", "metrics")} for r in rows]
        path.write_text("".join(json.dumps(r) + "\n" for r in old))
    done_path(tmp_path, "slow", 0).write_text(json.dumps({"evaluations": 11}))

    run_all(spec, ResumableTrainer(saved=first.saved), tmp_path)
    done = json.loads(done_path(tmp_path, "slow", 1).read_text())
    assert [(s["first_evaluation"], s["code"]) for s in done["sittings"]] == [
        (0, None),
        (3, {"commit": COMMIT_A, "dirty": False}),
    ]
    markdown = summarise(tmp_path, spec)
    assert _row(markdown, "slow")[-1] == "unrecorded (0, 1); aaaaaaa (1)"
    assert "`slow` ran code no commit pins (unrecorded:" in markdown


def test_one_clean_commit_across_seeds_gives_no_warning():
    assert mixed_code_warnings({0: ("aaaaaaa",), 1: ("aaaaaaa",)}, "row") == []
    assert len(mixed_code_warnings({0: ("unknown",)}, "row")) == 1
