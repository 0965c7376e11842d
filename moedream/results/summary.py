"""Turn the finished runs of a spec into the sample-efficiency table (Markdown) and the IQM
evaluation curves with confidence bands (PNG).

Only finished runs (with a ``done`` marker) are scored; the table gives finished/declared runs
per variant and lists the unfinished ones. Runs that never sustain the threshold stay in, counted
at the budget, and the table says how many reached it. Each row names the code (git commit) its
runs ran, and the table warns under it when a row's runs ran different code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure

from moedream.results import stats
from moedream.results.provenance import mixed_code_warnings, run_code_labels
from moedream.results.runner import done_path, points_path
from moedream.results.spec import BASELINE_FINAL, Protocol, ResultsSpec

SUMMARY_FILE, CURVES_FILE = "summary.md", "curves.png"


class Run(NamedTuple):
    """One finished run's evaluation curve, cut at the evaluation closing its budget."""

    seed: int
    steps: np.ndarray  # (n,) real steps at each evaluation
    values: np.ndarray  # (n,) protocol.metric at each evaluation
    wallclock_s: float  # at the closing evaluation
    codes: tuple[str, ...]  # code labels of its sittings up to the closing evaluation


class Scores(NamedTuple):
    """Per-run scores of one variant, each (runs,)."""

    final: np.ndarray
    auc: np.ndarray
    steps_to_threshold: np.ndarray  # the run's real steps spent where not reached
    reached: np.ndarray  # bool
    wallclock_s: np.ndarray


def load_run(out_dir: Path, variant: str, seed: int, protocol: Protocol) -> Run | None:
    """The finished run's curve, or None if it has no done marker."""
    if not done_path(out_dir, variant, seed).exists():
        return None
    with points_path(out_dir, variant, seed).open() as file:
        points = [json.loads(line) for line in file]
    steps = np.array([p["real_steps"] for p in points], dtype=float)
    values = np.array([p["metrics"][protocol.metric] for p in points], dtype=float)
    steps, values = stats.clip_to_budget(steps, values, protocol.budget_real_steps)
    kept = points[: steps.size]
    return Run(seed, steps, values, float(kept[-1]["wallclock_s"]), run_code_labels(kept))


def resolve_threshold(runs: dict[str, list[Run]], spec: ResultsSpec) -> ResultsSpec:
    """The spec with a numeric protocol.threshold: ``baseline_final`` becomes the IQM of the
    baseline's finished runs' final values (NaN while none has finished)."""
    p = spec.protocol
    if p.threshold != BASELINE_FINAL:
        return spec
    finals = [stats.final_value(r.values, p.final_last_k) for r in runs[spec.baseline]]
    value = float(stats.iqm(np.array(finals))) if finals else math.nan
    return dataclasses.replace(spec, protocol=dataclasses.replace(p, threshold=value))


def _threshold_text(spec: ResultsSpec, declared: float | str) -> str:
    """The threshold as the table names it, saying where a baseline_final one came from."""
    value = spec.protocol.threshold
    if declared != BASELINE_FINAL:
        return f"{value:g}"
    if math.isnan(value):
        return f"{spec.baseline}'s final IQM (no finished run yet)"
    return f"{value:.4g} ({spec.baseline}'s final IQM)"


def score(runs: list[Run], protocol: Protocol) -> Scores:
    """Each run scored the same way: final value, AUC, own first sustained hit, wall-clock."""
    p, budget = protocol, protocol.budget_real_steps
    hits = [stats.steps_to_threshold(r.steps, r.values, p.threshold, p.hold, budget) for r in runs]
    return Scores(
        final=np.array([stats.final_value(r.values, p.final_last_k) for r in runs]),
        auc=np.array([stats.area_under_curve(r.steps, r.values, budget) for r in runs]),
        steps_to_threshold=np.array([h[0] for h in hits]),
        reached=np.array([h[1] for h in hits]),
        wallclock_s=np.array([r.wallclock_s for r in runs]),
    )


def _interval(iv: stats.Interval, fmt: str) -> str:
    return f"{iv.point:{fmt}} [{iv.lo:{fmt}}, {iv.hi:{fmt}}]"


def wallclock_references(spec: ResultsSpec) -> list[str]:
    """The rows whose wall-clock each row's is divided by: the baseline, and the first
    replay-matched control (same real passes, no imagination: the cost of imagination)."""
    controls = [v.name for v in spec.variants if v.replay_matched_to and v.name != spec.baseline]
    return [spec.baseline, *controls[:1]]


def _wallclock_ratio_cell(base: Scores | None, mine: Scores, protocol: Protocol) -> str:
    """IQM(variant wall-clock) / IQM(reference wall-clock) at the budget, > 1 costs more time."""
    if base is None:
        return "-"
    ratio = stats.iqm_ratio(
        mine.wallclock_s, base.wallclock_s, protocol.bootstrap_reps, protocol.bootstrap_seed
    )
    return f"{ratio.point:.2f}x [{ratio.lo:.2f}, {ratio.hi:.2f}]"


def _code_cell(runs: list[Run]) -> str:
    """The code labels of a row's runs: one label, or each with the seeds that ran it."""
    labels = list(dict.fromkeys(label for run in runs for label in run.codes))
    if len(labels) == 1:
        return labels[0]
    return "; ".join(
        f"{label} ({', '.join(str(r.seed) for r in runs if label in r.codes)})" for label in labels
    )


def _speedup_cells(base: Scores | None, mine: Scores, protocol: Protocol) -> list[str]:
    """[speed-up vs baseline, verdict] for a non-baseline row."""
    if base is None:
        return ["-", "baseline has no finished runs"]
    ratio = stats.threshold_ratio(
        base.steps_to_threshold,
        mine.steps_to_threshold,
        protocol.bootstrap_reps,
        protocol.bootstrap_seed,
    )
    shown = stats.verdict(ratio, not base.reached.all(), not mine.reached.all())
    seeds = len(protocol.seeds)
    if min(base.reached.size, mine.reached.size) < seeds:  # a verdict needs every seed's run
        shown = (f"provisional ({mine.reached.size}/{seeds} runs vs {base.reached.size}/{seeds}):"
                 f" {shown}")  # fmt: skip
    return [f"{ratio.point:.2f}x [{ratio.lo:.2f}, {ratio.hi:.2f}]", shown]


def _row(name: str, runs: list[Run], by_name: dict[str, Scores], spec: ResultsSpec) -> list[str]:
    p, scores, base = spec.protocol, by_name[name], by_name.get(spec.baseline)

    def agg(values: np.ndarray, fmt: str) -> str:
        iv = stats.aggregate({name: values}, p.bootstrap_reps, p.bootstrap_seed)[name]
        return _interval(iv, fmt)

    known = not math.isnan(p.threshold)  # a baseline_final one needs a finished baseline run
    cells = [
        agg(scores.final, ".4g"),
        agg(scores.auc, ".4g"),
        agg(scores.steps_to_threshold, ",.0f") if known else "-",
        f"{int(scores.reached.sum())}/{scores.reached.size}" if known else "-",
        agg(scores.wallclock_s, ".0f"),
        *[
            "1" if name == ref else _wallclock_ratio_cell(by_name.get(ref), scores, p)
            for ref in wallclock_references(spec)
        ],
    ]
    tail = (
        ["1 (baseline)", "baseline"] if name == spec.baseline else _speedup_cells(base, scores, p)
    )
    return [name, f"{scores.final.size}/{len(p.seeds)}", *cells, *tail, _code_cell(runs)]


def _header(spec: ResultsSpec, threshold: str) -> list[str]:
    p = spec.protocol
    return [
        f"# Sample efficiency: `{p.metric}`",
        "",
        f"Budget {p.budget_real_steps:,} real environment steps per run (every real step counts, "
        "data collected to train a world model included; imagined steps do not). Evaluation "
        f"episodes ({p.eval_episodes} per evaluation) at real step 0 and every "
        f"{p.eval_every_real_steps:,} real steps; seeds {list(p.seeds)}.",
        "",
        f"Cells: IQM across runs [95% stratified-bootstrap CI, {p.bootstrap_reps:,} resamples, "
        f"seed {p.bootstrap_seed}]. Final: mean of the last {p.final_last_k} evaluations up to "
        "the one closing the budget. AUC: mean of the metric over [0, budget] (trapezoid on "
        f"real steps). Steps to {threshold}: each run's own first evaluation from which the "
        f"metric stayed >= it for {p.hold} consecutive evaluations; a run that "
        "never did counts at the real steps it spent (not reached). Wall-clock: at the closing "
        "evaluation (without the evaluations' own time), and its IQM over the baseline's and the "
        "replay-matched control's (> 1 costs more time: with the control, what imagination "
        "costs beyond re-learning the real batches). Speed-up: IQM(baseline steps) / IQM(variant "
        "steps), > 1 is fewer real steps; not-reached runs make it a bound, which the verdict "
        "accounts for. Code: the git commit each row's runs ran (+dirty: with uncommitted "
        "changes; unrecorded: run before commits were recorded), with the seeds per commit "
        "when they differ.",
        "",
    ]


def render_table(runs: dict[str, list[Run]], spec: ResultsSpec) -> str:
    """The Markdown summary: header, one row per variant in spec order, unfinished runs."""
    declared = spec.protocol.threshold
    spec = resolve_threshold(runs, spec)
    p, threshold = spec.protocol, _threshold_text(spec, declared)
    scores = {name: score(r, p) for name, r in runs.items() if r}
    columns = [
        "variant",
        "finished runs",
        f"final {p.metric}",
        f"AUC {p.metric}",
        f"real steps to {p.metric} >= {threshold} (held {p.hold} evals)",
        "reached",
        "wall-clock s",
        *[f"wall-clock vs {ref}" for ref in wallclock_references(spec)],
        f"speed-up vs {spec.baseline}",
        "verdict",
        "code",
    ]
    lines = [
        *_header(spec, threshold),
        "| " + " | ".join(columns) + " |",
        "|" + " --- |" * len(columns),
    ]
    for variant in spec.variants:
        if variant.name in scores:
            row = _row(variant.name, runs[variant.name], scores, spec)
        else:
            dashes = ["-"] * (len(columns) - 4)
            row = [variant.name, f"0/{len(p.seeds)}", *dashes, "no finished runs", "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += _code_warnings(runs, spec)
    unfinished = [
        f"{v.name} seed {s}"
        for v in spec.variants
        for s in p.seeds
        if s not in {r.seed for r in runs[v.name]}
    ]
    if unfinished:
        lines += ["", "Not finished, so not in the table: " + ", ".join(unfinished) + "."]
    return "\n".join(lines) + "\n"


def _code_warnings(runs: dict[str, list[Run]], spec: ResultsSpec) -> list[str]:
    """Lines under the table for each row whose finished runs did not all run one commit."""
    warnings = [
        warning
        for variant in spec.variants
        for warning in mixed_code_warnings(
            {r.seed: r.codes for r in runs[variant.name]}, variant.name
        )
    ]
    return ["", *[f"**Warning:** {w}." for w in warnings]] if warnings else []


def _on_grid(runs: list[Run], protocol: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """(T,) real-step grid of the protocol's evaluations and (runs, T) curves interpolated on it."""
    budget, every = protocol.budget_real_steps, protocol.eval_every_real_steps
    grid = np.unique(np.append(np.arange(0, budget + 1, every), budget)).astype(float)
    return grid, np.stack([np.interp(grid, r.steps, r.values) for r in runs])


def plot_curves(runs: dict[str, list[Run]], spec: ResultsSpec, path: Path) -> None:
    """IQM evaluation curve per variant with its 95% bootstrap band, threshold dashed."""
    p = resolve_threshold(runs, spec).protocol
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for name, variant_runs in runs.items():
        if not variant_runs:
            continue
        grid, curves = _on_grid(variant_runs, p)  # (T,), (runs, T)
        boot = stats.bootstrap_iqm(
            curves, p.bootstrap_reps, stats.variant_rng(p.bootstrap_seed, name)
        )
        lo, hi = stats.percentile_interval(boot)
        (line,) = axes.plot(grid, stats.iqm(curves), label=f"{name} ({len(variant_runs)} runs)")
        axes.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2)
    if not math.isnan(p.threshold):
        axes.axhline(p.threshold, color="grey", linestyle="--", linewidth=1, label="threshold")
    axes.set(xlabel="real environment steps", ylabel=f"{p.metric} (IQM, 95% CI)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def closing_metrics(out_dir: Path, variant: str, seed: int, protocol: Protocol) -> dict:
    """Every metric of the finished run's evaluation closing its budget ({} if unfinished)."""
    run = load_run(out_dir, variant, seed, protocol)
    if run is None:
        return {}
    with points_path(out_dir, variant, seed).open() as file:
        points = [json.loads(line) for line in file]
    return points[run.steps.size - 1]["metrics"]


def render_metrics_at_budget(out_dir: Path, spec: ResultsSpec) -> str:
    """Markdown: per variant, the IQM [95% CI] across finished runs of every reported metric at
    the evaluation closing the budget ("-" where a metric is not a number, e.g. the gate's
    without imagination)."""
    p = spec.protocol
    at_budget = {
        v.name: [m for s in p.seeds if (m := closing_metrics(out_dir, v.name, s, p))]
        for v in spec.variants
    }
    keys = sorted({k for runs in at_budget.values() for m in runs for k in m})
    lines = [
        "| variant | " + " | ".join(keys) + " |",
        "|" + " --- |" * (len(keys) + 1),
    ]
    for name, runs in at_budget.items():
        cells = []
        for key in keys:
            values = np.array([float(m.get(key, np.nan)) for m in runs], dtype=float)
            if not runs or np.isnan(values).any():
                cells.append("-")
                continue
            iv = stats.aggregate({name: values}, p.bootstrap_reps, p.bootstrap_seed)[name]
            cells.append(_interval(iv, ".4g"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(out_dir: str | Path, spec: ResultsSpec) -> str:
    """Write ``summary.md`` and ``curves.png`` into ``out_dir`` from its finished runs; the
    Markdown text."""
    out_dir = Path(out_dir)
    runs = {
        v.name: [
            run
            for seed in spec.protocol.seeds
            if (run := load_run(out_dir, v.name, seed, spec.protocol)) is not None
        ]
        for v in spec.variants
    }
    markdown = (
        render_table(runs, spec)
        + "\nEvery metric at the evaluation closing the budget (IQM across finished runs "
        "[95% CI]):\n\n" + render_metrics_at_budget(out_dir, spec)
    )
    (out_dir / SUMMARY_FILE).write_text(markdown)
    plot_curves(runs, spec, out_dir / CURVES_FILE)
    return markdown
