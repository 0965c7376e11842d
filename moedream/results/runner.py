"""Run every (variant, seed) of a spec that has not finished, recording each evaluation durably.

On disk, under ``out_dir``::

    <variant>/variant.json        the overrides and protocol it was run with
    <variant>/seed_<k>.jsonl      one line per evaluation: {"real_steps", "wallclock_s", "metrics",
                                  "code"}, the first of each sitting also "config"
    <variant>/seed_<k>.done       written atomically once the run has evaluated at its budget:
                                  {"evaluations", "sittings": [{"first_evaluation",
                                  "evaluations", "code", "config"}, ...]}

``code`` is the git commit and dirty flag of the work tree the sitting ran
(moedream.results.provenance); ``config`` is what the sitting trained with: the variant's
overrides and protocol, and the train_fn's resolved configs when it has
``resolved_config(variant, seed)``. A sitting is one call of ``train_fn``: a resumed run has
one per sitting, so a run continued on other code records both versions.

Each evaluation is flushed and fsynced as it is reported, so a crash loses at most the point
being written. Re-running skips finished runs. An unfinished run continues from its last resume
point when ``train_fn`` can resume (it has ``resume_point(variant, seed)``, the evaluations its
saved state covers; moedream.results.platform_train): the curve keeps its rows up to that
evaluation and ``train_fn(variant, seed, callback, resumed=n)`` reports the evaluations after
them. Otherwise (or without a resume point) the run restarts from scratch and its partial file
is truncated; the log says which.

``train_fn(variant, seed, callback)`` trains ``variant`` with ``seed`` and calls
``callback(real_steps, wallclock_s, metrics)`` at every evaluation: first at real step 0 (before
training), then every ``protocol.eval_every_real_steps`` up to and including the budget.
``real_steps`` counts every real environment step, including data collected to train a world
model; imagined steps never count. ``metrics`` comes from separate evaluation episodes, not
from training episodes.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from moedream.config import ConfigError
from moedream.files import atomic_write_text
from moedream.results.provenance import code_version, sittings
from moedream.results.spec import Protocol, ResultsSpec, Variant

log = logging.getLogger(__name__)

Callback = Callable[[int, float, dict[str, Any]], None]
TrainFn = Callable[[Variant, int, Callback], None]


def points_path(out_dir: Path, variant: str, seed: int) -> Path:
    return Path(out_dir) / variant / f"seed_{seed}.jsonl"


def done_path(out_dir: Path, variant: str, seed: int) -> Path:
    return Path(out_dir) / variant / f"seed_{seed}.done"


class EvaluationLog:
    """The callback given to train_fn: checks each evaluation point and appends it durably."""

    def __init__(
        self,
        file: TextIO,
        protocol: Protocol,
        run: str,
        recorded: Sequence[dict[str, Any]] = (),
        sitting: dict[str, Any] | None = None,
    ):
        """``recorded``: the points already in ``file`` (a resumed run continues after them);
        ``sitting``: {"code", "config"} of this sitting, stamped on the rows it writes."""
        self.file, self.protocol, self.run = file, protocol, run
        self.points = list(recorded)
        self.last_steps = int(recorded[-1]["real_steps"]) if recorded else -1
        self.code = (sitting or {}).get("code")
        self.config = (sitting or {}).get("config")
        self.first_of_sitting = True

    @property
    def count(self) -> int:
        return len(self.points)

    def __call__(self, real_steps: int, wallclock_s: float, metrics: dict[str, Any]) -> None:
        self._check(real_steps, metrics)
        point = {
            "real_steps": int(real_steps),
            "wallclock_s": float(wallclock_s),
            "metrics": metrics,
            "code": self.code,
        }
        if self.first_of_sitting:  # the config once per sitting: it is large and fixed
            point["config"] = self.config
        line = json.dumps(point, default=_plain)
        self.file.write(line + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.points.append(json.loads(line))
        self.last_steps, self.first_of_sitting = int(real_steps), False

    def _check(self, real_steps: int, metrics: dict[str, Any]) -> None:
        if self.count == 0 and real_steps != 0:
            raise ValueError(
                f"{self.run}: the first evaluation is at real step {real_steps}; evaluate at "
                f"real step 0 (before training) so every curve covers the same span"
            )
        if real_steps <= self.last_steps:
            raise ValueError(
                f"{self.run}: evaluation at real step {real_steps} after one at "
                f"{self.last_steps}; real steps must increase between evaluations"
            )
        value = metrics.get(self.protocol.metric) if isinstance(metrics, dict) else None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError(
                f"{self.run}: metrics {metrics!r} lack a number under protocol.metric = "
                f"{self.protocol.metric!r}; report it at every evaluation"
            )

    def check_finished(self) -> None:
        """ValueError unless the run evaluated at its budget and at the protocol's interval."""
        budget, every = self.protocol.budget_real_steps, self.protocol.eval_every_real_steps
        if self.last_steps < budget or self.count < budget // every + 1:
            raise ValueError(
                f"{self.run}: train_fn returned after {self.count} evaluations, the last at real "
                f"step {self.last_steps}; it must evaluate every {every} real steps up to the "
                f"budget {budget} (protocol.eval_every_real_steps, protocol.budget_real_steps)"
            )


def _plain(value: Any) -> Any:
    """JSON for numpy scalars in metrics."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metric value {value!r} is not JSON-serialisable; report numbers")


def _run_settings(variant: Variant) -> dict[str, Any]:
    """What a recorded run depends on: results made with other settings must not be mixed in."""
    p = variant.protocol
    settings = {
        "overrides": variant.overrides,
        "budget_real_steps": p.budget_real_steps,
        "eval_every_real_steps": p.eval_every_real_steps,
        "eval_episodes": p.eval_episodes,
    }
    return json.loads(json.dumps(settings, default=_plain))  # tuples -> lists, as read back


def _claim_variant_dir(out_dir: Path, variant: Variant) -> None:
    """Create ``out_dir/<variant>``, or check it was recorded with the same settings."""
    directory = Path(out_dir) / variant.name
    directory.mkdir(parents=True, exist_ok=True)
    record, settings = directory / "variant.json", _run_settings(variant)
    if not record.exists():
        atomic_write_text(record, json.dumps(settings, indent=2, sort_keys=True))
    elif json.loads(record.read_text()) != settings:
        raise ConfigError(
            f"variant {variant.name!r}: {record} was recorded with settings "
            f"{record.read_text().strip()}, the spec now says {json.dumps(settings)}; "
            f"use a new out_dir or a new variant name rather than mixing the two"
        )


def run_one(
    variant: Variant, seed: int, train_fn: TrainFn, out_dir: Path, code: dict | None = None
) -> bool:
    """Train one (variant, seed) unless already done; True if it trained. ``code``: the code
    version to stamp on its rows (default: this work tree's, moedream.results.provenance)."""
    points, done = points_path(out_dir, variant.name, seed), done_path(out_dir, variant.name, seed)
    run = f"{variant.name} seed {seed}"
    if done.exists():
        log.info("%s: finished before, skipped", run)
        return False
    kept = _kept_points(points, variant, seed, train_fn, run)
    atomic_write_text(points, "".join(json.dumps(p) + "\n" for p in kept))
    sitting = {"code": code or code_version(), "config": _sitting_config(train_fn, variant, seed)}
    with open(points, "a") as file:
        evaluations = EvaluationLog(file, variant.protocol, run, recorded=kept, sitting=sitting)
        if kept:
            train_fn(variant, seed, evaluations, resumed=len(kept))
        else:
            train_fn(variant, seed, evaluations)
        evaluations.check_finished()
    record = {"evaluations": evaluations.count, "sittings": sittings(evaluations.points)}
    atomic_write_text(done, json.dumps(record, default=_plain))
    log.info("%s: finished after %d evaluations", run, evaluations.count)
    return True


def _sitting_config(train_fn: TrainFn, variant: Variant, seed: int) -> dict[str, Any]:
    """What this sitting trains with: the variant's settings and, when ``train_fn`` can say,
    its resolved configs (base YAMLs with the overrides applied, so a changed base shows)."""
    resolved = getattr(train_fn, "resolved_config", None)
    config = {"variant": _run_settings(variant), "seed": seed}
    if resolved is not None:
        config["resolved"] = resolved(variant, seed)
    return json.loads(json.dumps(config, default=_plain))


def _kept_points(
    points: Path, variant: Variant, seed: int, train_fn: TrainFn, run: str
) -> list[dict[str, Any]]:
    """The recorded evaluations an unfinished run resumes after ([] = start from scratch)."""
    if not points.exists():
        return []
    lines = points.read_text().splitlines()
    resume_point = getattr(train_fn, "resume_point", None)
    covered = resume_point(variant, seed) if resume_point is not None else 0
    if covered and covered <= len(lines):
        log.warning("%s: unfinished, resuming after evaluation %d of %d recorded", run, covered,
                    len(lines))  # fmt: skip
        return [json.loads(line) for line in lines[:covered]]
    log.warning("%s: unfinished, restarting from scratch (dropping %d evaluations)", run,
                len(lines))  # fmt: skip
    return []


def run_all(spec: ResultsSpec, train_fn: TrainFn, out_dir: str | Path) -> list[tuple[str, int]]:
    """Run every unfinished (variant, seed) in spec order; the (variant, seed) pairs trained."""
    trained, code = [], code_version()  # the code this process loaded, once
    for variant in spec.variants:
        _claim_variant_dir(Path(out_dir), variant)
        for seed in spec.protocol.seeds:
            if run_one(variant, seed, train_fn, Path(out_dir), code):
                trained.append((variant.name, seed))
    return trained
