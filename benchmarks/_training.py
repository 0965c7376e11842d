"""Readers of finished team-training runs for benchmarks: final evaluations, TensorBoard means,
mean ± SE and paired differences with a t interval (gate_training, memory_training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def final_points(out_dir: Path, variant: str, seeds: tuple[int, ...]) -> dict[int, dict]:
    """Seed -> the metrics of its evaluation at the budget (finished runs only)."""
    from moedream.results.runner import done_path, points_path

    out = {}
    for seed in seeds:
        if done_path(out_dir, variant, seed).exists():
            lines = points_path(out_dir, variant, seed).read_text().splitlines()
            out[seed] = json.loads(lines[-1])
    return out


def iteration_values(run_dir: Path, prefix: str) -> dict[str, list[float]]:
    """Every TensorBoard scalar of a run whose tag starts with ``prefix`` (the prefix cut
    off): its value at each iteration, in order (agents.train writes them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for events in sorted(run_dir.glob("team/tensorboard/events.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(prefix):
                out.setdefault(tag[len(prefix) :], []).extend(e.value for e in acc.Scalars(tag))
    return out


def iteration_means(run_dir: Path, prefix: str) -> dict[str, float]:
    """Mean over a run's iterations of every TensorBoard scalar under ``prefix``."""
    return {k: float(np.mean(v)) for k, v in iteration_values(run_dir, prefix).items()}


def mean_se(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 run)"
    se = np.std(values, ddof=1) / math.sqrt(len(values))
    return f"{np.mean(values):.{digits}f} ± {se:.{digits}f}"


def paired_t_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of paired differences (NaN with fewer than 2)."""
    from moedream.results.stats import mean_t_interval

    if len(differences) < 2:
        return math.nan, math.nan
    _, lo, hi = mean_t_interval(differences, confidence)
    return lo, hi


def train_seed_by_seed_and_record(args, spec, trainer, body, bench: str, title: str) -> None:
    """Train every (variant, seed) of ``spec`` not yet finished (unless ``args.summarise_only``),
    seed by seed so that a cut-short sitting still pairs the variants; then print ``body()`` or,
    with ``args.record``, record it as block ``bench`` with the command that trains."""
    import dataclasses
    import sys

    from _common import record

    if not args.summarise_only:
        from moedream.platform.ray_setup import init_ray
        from moedream.results.runner import run_all

        init_ray()
        for seed in spec.protocol.seeds:
            one = dataclasses.replace(spec.protocol, seeds=(seed,))
            run_all(dataclasses.replace(spec, protocol=one), trainer, args.out)
    text = body()
    if not args.record:
        print(text)
        return
    trains = [a for a in sys.argv[1:] if a != "--summarise-only"]
    record(bench, title, text, " ".join([f"python benchmarks/{bench}.py", *trains]))
