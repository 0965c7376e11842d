"""The YAML spec of a sample-efficiency comparison: the shared protocol, the variants and the
baseline, validated with errors that name the field and the fix.

Layout::

    baseline: model_free            # the row every speed-up is measured against
    protocol:                       # shared by every variant, so rows compare like with like
      seeds: [0, 1, 2, 3, 4]
      budget_real_steps: 100000     # every real env step counts, world-model data included
      eval_every_real_steps: 5000   # evaluate at step 0 and then every this many real steps
      eval_episodes: 10
      metric: eval_return           # key of the metrics dict train_fn reports
      threshold: 50.0               # or baseline_final: the baseline row's final value (IQM)
      hold: 3                       # consecutive evaluations at or above the threshold
      final_last_k: 3               # final value = mean of the last k evaluations
      bootstrap_reps: 50000
      bootstrap_seed: 0
    variants:
      - name: model_free
        overrides: {}
      - name: imagination_h5
        overrides: {imagination.horizon: 5}
        description: world model + 5 imagined steps per real one
      - name: replay_matched
        replay_matched_to: imagination_h5   # its overrides are derived from that variant's
    train: {...}                    # optional: the train_fn's own settings (see its module)

``replay_matched_to`` only names the variant here; the train_fn's side derives what it means
(moedream/results/variants.py for the platform).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from pathlib import Path
from typing import Any

from moedream.config import ConfigBase, ConfigError, check, check_positive_ints, load_yaml

BASELINE_FINAL = "baseline_final"
"""protocol.threshold meaning "the baseline row's final value": the IQM over the baseline's
finished runs of each run's final value (moedream.results.summary.resolve_threshold)."""
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # also a directory name
VARIANT_FIELDS = ("name", "overrides", "description", "replay_matched_to")
TOP_FIELDS = ("baseline", "protocol", "variants", "train")


@dataclasses.dataclass
class Protocol(ConfigBase):
    """How every variant is run, evaluated and scored."""

    seeds: tuple[int, ...]
    budget_real_steps: int
    eval_every_real_steps: int
    eval_episodes: int
    metric: str
    threshold: float | str
    """A fixed value of ``metric``, or ``baseline_final`` (BASELINE_FINAL): what the baseline
    reaches at the budget, so each row is timed to the baseline's own final level."""
    hold: int = 3
    final_last_k: int = 3
    bootstrap_reps: int = 50_000
    bootstrap_seed: int = 0

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        counts = ("budget_real_steps", "eval_every_real_steps", "eval_episodes", "hold")
        check_positive_ints(self, prefix, (*counts, "final_last_k", "bootstrap_reps"))
        ok = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds)
        ok = ok and 0 < len(self.seeds) == len(set(self.seeds))
        check(ok, f"{prefix}seeds", self.seeds, "must be a non-empty list of distinct ints >= 0")
        check(
            self.bootstrap_seed >= 0, f"{prefix}bootstrap_seed", self.bootstrap_seed, "must be >= 0"
        )
        check(bool(self.metric), f"{prefix}metric", self.metric, "must name a reported metric")
        fixed = isinstance(self.threshold, numbers.Real) and not isinstance(self.threshold, bool)
        ok = self.threshold == BASELINE_FINAL or (fixed and math.isfinite(self.threshold))
        check(ok, f"{prefix}threshold", self.threshold,
              f"must be a finite number or {BASELINE_FINAL!r}")  # fmt: skip
        self._check_fits_budget(prefix)

    def _check_fits_budget(self, prefix: str) -> None:
        """hold and final_last_k count evaluations: no more than a run makes."""
        evaluations = self.budget_real_steps // self.eval_every_real_steps + 1
        for name in ("hold", "final_last_k"):
            value = getattr(self, name)
            allowed = f"must be <= the {evaluations} evaluations a run makes within the budget"
            check(value <= evaluations, f"{prefix}{name}", value, allowed)


@dataclasses.dataclass
class Variant:
    """One row of the table: its name, the config overrides that make it, the shared protocol."""

    name: str
    overrides: dict[str, Any]
    protocol: Protocol
    description: str = ""
    replay_matched_to: str = ""
    """Another variant's name: this one re-uses each real batch as often as that one does,
    without its imagination (the control a model-based variant must beat)."""


@dataclasses.dataclass
class ResultsSpec:
    """A validated comparison: the protocol, the variants in table order, the baseline's name,
    and the train_fn's own settings (``train``, checked by the train_fn)."""

    protocol: Protocol
    variants: tuple[Variant, ...]
    baseline: str
    train: dict[str, Any] = dataclasses.field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def _require(data: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"`{where.rstrip('.') or 'spec'}` must be a mapping, got {data!r}")
    for name in fields:
        if name not in data:
            raise ConfigError(f"config field `{where}{name}` is missing: add it to the spec")


def _protocol(data: Any) -> Protocol:
    required = tuple(
        f.name for f in dataclasses.fields(Protocol) if f.default is dataclasses.MISSING
    )
    _require(data, required, "protocol.")
    protocol = Protocol.from_dict(data, prefix="protocol.")
    protocol.validate("protocol.")
    return protocol


def _variant(data: Any, index: int, protocol: Protocol) -> Variant:
    where = f"variants[{index}]."
    _require(data, ("name",), where)
    unknown = sorted(set(data) - set(VARIANT_FIELDS))
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in `{where[:-1]}`; valid: {VARIANT_FIELDS}")
    name, overrides = data["name"], data.get("overrides") or {}
    ok = isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None
    check(ok, f"{where}name", name, "must be letters, digits, _ . - (it names a directory)")
    check(isinstance(overrides, dict), f"{where}overrides", overrides, "must be a mapping")
    description = data.get("description", "")
    check(isinstance(description, str), f"{where}description", description, "must be a string")
    matched = data.get("replay_matched_to", "")
    check(isinstance(matched, str), f"{where}replay_matched_to", matched, "must be a variant name")
    return Variant(name, dict(overrides), protocol, description, matched)


def _check_replay_matched(variants: tuple[Variant, ...]) -> None:
    """Each replay_matched_to names another variant that is not itself derived."""
    by_name = {v.name: v for v in variants}
    for index, variant in enumerate(variants):
        target = variant.replay_matched_to
        if not target:
            continue
        field = f"variants[{index}].replay_matched_to"
        check(target in by_name and target != variant.name, field, target,
              f"must name another variant, one of {sorted(set(by_name) - {variant.name})}")  # fmt: skip
        check(not by_name[target].replay_matched_to, field, target,
              "must name a variant that is not itself replay-matched")  # fmt: skip


def spec_from_dict(data: Any) -> ResultsSpec:
    """A validated :class:`ResultsSpec` from the YAML's mapping; ConfigError naming the field."""
    _require(data, ("baseline", "protocol", "variants"), "")
    unknown = sorted(set(data) - set(TOP_FIELDS))
    if unknown:
        raise ConfigError(f"unknown top-level field(s) {unknown}; valid: {', '.join(TOP_FIELDS)}")
    train = data.get("train") or {}
    check(isinstance(train, dict), "train", train, "must be a mapping of the train_fn's settings")
    protocol, raw = _protocol(data["protocol"]), data["variants"]
    check(isinstance(raw, list) and len(raw) > 0, "variants", raw, "must be a non-empty list")
    variants = tuple(_variant(item, i, protocol) for i, item in enumerate(raw))
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    check(not repeated, "variants[].name", repeated, "each variant needs its own name")
    check(data["baseline"] in names, "baseline", data["baseline"], f"must be one of {names}")
    _check_replay_matched(variants)
    return ResultsSpec(protocol, variants, data["baseline"], dict(train))


def load_spec(path: str | Path) -> ResultsSpec:
    """:func:`spec_from_dict` of a YAML file; errors say which file."""
    try:
        return spec_from_dict(load_yaml(path))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
