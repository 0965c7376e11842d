"""The model-based pipeline, stage by stage, resumable from its run folder.

    collect -> world_model -> serve -> gate -> agents -> report

(the stage bodies live in moedream/platform/quickstart.py, beside the config they read). Each
finished stage is recorded in ``<run>/stages.json`` with what it made and a fingerprint of the
config sections it depends on; a re-run skips a recorded stage whose fingerprint still matches
(and says so), and runs again every stage from the first one whose config changed. ``serve``
and ``gate`` are services living in the Ray cluster: a resumed run reuses them when they are
still up, and otherwise starts them again from their records (a Serve app or an actor does not
outlive its cluster). `moedream train`, `python -m moedream.platform.jobs.train` and
`moedream quickstart` all run this.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from moedream.config import ConfigError
from moedream.files import atomic_write_text

STAGES = ("collect", "world_model", "serve", "gate", "agents", "report")
IMAGINATION_STAGES = STAGES[:4]
"""What a `provider: world_model` agent run needs: data, a trained model, its Serve app, the
gate actor."""
LEDGER = "stages.json"

DESCRIPTIONS = {
    "collect": "collect real episodes on Ray",
    "world_model": "train the MoE-diffusion world model with Ray Train (expert parallel)",
    "serve": "deploy the world model with Ray Serve",
    "gate": "fit the coherence gate on real data and start the gate actor",
    "agents": "train the team (MBMAPPO) on real + gated imagined rollouts",
    "report": "evaluate the team against the random team and write the report",
}
# Config sections each stage reads (its fingerprint covers these and every earlier stage's); a
# dotted name is one setting of a section (serve fits the episode memory when imagination uses it;
# the gate calibrates on windows of the imagination horizon).
SECTIONS = {
    "collect": ("collect",),
    "world_model": ("world_model",),
    "serve": ("serve", "agents.imagination.memory"),
    "gate": ("gate", "gate_actor", "agents.imagination.horizon"),
    "agents": ("agents",),
    "report": ("eval_episodes",),
}
SERVICES = ("serve", "gate")
"""Stages whose product lives in the Ray cluster, not in the run folder."""
# Services a stage needs up while it runs (started again from their records if they are not).
NEEDS_LIVE = {"agents": ("serve", "gate"), "report": ("gate",)}


def parse_stages(text: str | None) -> tuple[str, ...]:
    """'collect,world_model' -> the stages in pipeline order; None or '' -> all of them."""
    if not text:
        return STAGES
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ConfigError(
            f"--stages: unknown stage(s) {unknown}; choose from {','.join(STAGES)} "
            "(comma-separated, e.g. --stages collect,world_model)"
        )
    return tuple(s for s in STAGES if s in names)


class StageLedger:
    """``<run>/stages.json``: stage -> {fingerprint, seconds, finished_at, record}."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LEDGER
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"{self.path} is not valid JSON ({err}); delete it to run every stage again"
                ) from None

    def finished(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        """The stage's record with ``seconds`` if it finished with this fingerprint, else None."""
        entry = self.entries.get(stage)
        if not entry or entry.get("fingerprint") != fingerprint:
            return None
        return {**entry["record"], "seconds": entry["seconds"]}

    def record(self, stage: str, fingerprint: str, seconds: float, record: dict[str, Any]) -> None:
        """Record a finished stage; the records of later stages are dropped (they were made from
        what this stage replaced)."""
        later = STAGES[STAGES.index(stage) + 1 :]
        self.entries = {k: v for k, v in self.entries.items() if k not in later}
        self.entries[stage] = {"fingerprint": fingerprint, "seconds": seconds,
                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "record": record}  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.entries, indent=1, default=str))


def fingerprints(cfg: Any) -> dict[str, str]:
    """stage -> sha256 of the config sections of that stage and every stage before it."""
    data = cfg.to_dict()
    out, seen = {}, []
    for stage in STAGES:
        seen += [(name, _setting(data, name)) for name in SECTIONS[stage]]
        out[stage] = hashlib.sha256(
            json.dumps(seen, sort_keys=True, default=str).encode()
        ).hexdigest()
    return out


def _setting(data: dict[str, Any], dotted: str) -> Any:
    """``data``'s value at a dotted name ('agents.imagination.horizon'), None where it is unset."""
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def run_pipeline(cfg: Any, stages: Iterable[str] = STAGES) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (in pipeline order) of the pipeline on ``cfg``, a QuickstartConfig.

    Every stage before the last one asked for must be recorded or asked for too; returns the
    record of every stage up to the last one asked for (recorded or just made).
    """
    from moedream.platform.ray_setup import init_ray

    ledger, prints = StageLedger(cfg.run_dir), fingerprints(cfg)
    plan = plan_stages(ledger, prints, stages, cfg.run_dir)  # errors before Ray starts
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    print(f"pipeline {cfg.name}: run folder {cfg.run_dir} (finished stages: {ledger.path})")
    init_ray()
    records: dict[str, dict[str, Any]] = {}
    for k, (stage, done) in enumerate(plan, start=1):
        header = f"\n[{k}/{len(STAGES)}] {stage}: {DESCRIPTIONS[stage]}"
        if done is not None:
            print(f"{header}\n  finished earlier ({done['seconds']:.0f} s): skipped", flush=True)
            records[stage] = done
            continue
        print(header, flush=True)
        _ensure_services(cfg, NEEDS_LIVE.get(stage, ()), records)
        start = time.perf_counter()
        made = _stage_function(stage)(cfg, records)
        seconds = time.perf_counter() - start
        ledger.record(stage, prints[stage], seconds, made)
        records[stage] = {**made, "seconds": seconds}
    if plan[-1][0] in SERVICES:  # the services are what was asked for: skipped ones must be up
        _ensure_services(cfg, [s for s, done in plan if s in SERVICES and done], records)
    return records


def plan_stages(
    ledger: StageLedger, prints: dict[str, str], stages: Iterable[str], run_dir: Path
) -> list[tuple[str, dict[str, Any] | None]]:
    """(stage, its record if it is skipped else None) up to the last stage asked for.

    A stage runs if it is not recorded with its current fingerprint, or if a stage before it
    runs (it would be made from what that one replaces); such a stage must be asked for.
    """
    wanted = set(stages)
    if not wanted:
        raise ConfigError(f"--stages: no stage given; choose from {','.join(STAGES)}")
    last = max(STAGES.index(s) for s in wanted)
    plan, rerun = [], False
    for stage in STAGES[: last + 1]:
        done = None if rerun else ledger.finished(stage, prints[stage])
        if done is None and stage not in wanted:
            raise ConfigError(_missing_stage(run_dir, stage, ledger.entries.get(stage), rerun))
        rerun = rerun or done is None
        plan.append((stage, done))
    return plan


def _missing_stage(run_dir: Path, stage: str, entry: dict[str, Any] | None, after: bool) -> str:
    if after:
        why = "a stage before it runs again, so its record is out of date"
    elif entry:
        why = "its config (or an earlier stage's) changed since it ran"
    else:
        why = "it has not run"
    return (
        f"stage `{stage}` is needed by the stages asked for, but {why} in {run_dir}: add it "
        "to --stages (or leave --stages out to run every stage that is not finished)"
    )


def _ensure_services(cfg: Any, services: Iterable[str], records: dict[str, dict[str, Any]]) -> None:
    """Start again those of the recorded ``services`` that are not up (resumed runs)."""
    from moedream.platform import quickstart as qs

    checks: dict[str, tuple[Callable, Callable]] = {
        "serve": (qs.serve_is_running, qs.serve_stage),
        "gate": (qs.gate_is_running, qs.restart_gate),
    }
    for service in services:
        is_running, start = checks[service]
        if is_running(cfg, records[service]):
            print(f"  {service}: recorded and still running: reused")
        else:
            print(f"  {service}: recorded but not running (a new cluster?): started again")
            start(cfg, records)


def _stage_function(stage: str) -> Callable[[Any, dict[str, Any]], dict[str, Any]]:
    from moedream.platform import quickstart

    return getattr(quickstart, f"{stage}_stage")
