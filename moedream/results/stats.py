"""Score each run of a sample-efficiency comparison and aggregate the scores across seeds.

Per run (one evaluation curve of ``(real_steps, metric)`` points): the first *sustained* hit of
a threshold, the area under the curve over the budget and the final value. Across runs: the
interquartile mean (IQM) with a 95% percentile interval from a stratified bootstrap, as in
rliable (Agarwal et al., "Deep RL at the Edge of the Statistical Precipice", 2021).

Why by hand and not ``rliable``: rliable 1.2.0 requires ``arch<8``, and arch 7.2.0 fails at
import with pandas 3.1.1, which ray[rllib,train] installs here (arch calls
``pandas.util._decorators.deprecate_kwarg`` with the signature pandas 3 removed), so
``from rliable import library`` raises; pinning pandas < 3 for one optional statistic would
change the tested set of everything else. The computation is small: ``iqm`` is rliable's
``aggregate_iqm`` (scipy's 25% ``trim_mean``: ``int(0.25 * runs)`` runs cut at each end), and
with one task per table cell rliable's stratified bootstrap is resampling the runs with
replacement, which ``bootstrap_iqm`` does (each variant is its own stratum).

Paired comparisons of few seeds (the same seed trained two ways) use the mean difference and
its Student-t interval instead (``mean_t_interval``): with five runs a bootstrap interval is too
narrow. ``t_quantile`` is computed here because scipy is not a dependency.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import numpy as np

CONFIDENCE = 0.95
# Bound on resampled values held at once: reps are drawn in chunks below it.
_MAX_RESAMPLED = 4_000_000


class Interval(NamedTuple):
    """A point estimate and its confidence interval."""

    point: float
    lo: float
    hi: float


def _curve(steps, values) -> tuple[np.ndarray, np.ndarray]:
    """(n,), (n,) float arrays, checked: same length, at least one point, strictly increasing."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.ndim != 1 or steps.shape != values.shape or steps.size == 0:
        raise ValueError(
            f"a curve needs 1-D steps and values of one length >= 1, got shapes "
            f"{steps.shape} and {values.shape}"
        )
    if np.any(np.diff(steps) <= 0):
        raise ValueError("curve steps must be strictly increasing (one evaluation per step)")
    return steps, values


def first_sustained_hit(steps, values, threshold: float, hold: int) -> float | None:
    """The step of the first evaluation from which ``values >= threshold`` held for ``hold``
    consecutive evaluations, or None if that never happened.

    A crossing that falls back before ``hold`` evaluations is not a hit, nor is one still
    unconfirmed when the curve ends. NaN counts as below the threshold.
    """
    steps, values = _curve(steps, values)
    if not isinstance(hold, int) or isinstance(hold, bool) or hold < 1:
        raise ValueError(f"hold = {hold!r} is invalid: must be an integer >= 1 (evaluations)")
    streak = 0
    for i, at_or_above in enumerate(values >= threshold):  # (n,) bool
        streak = streak + 1 if at_or_above else 0
        if streak == hold:
            return float(steps[i - hold + 1])
    return None


def clip_to_budget(steps, values, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """The points up to and including the first evaluation at or past ``budget``: the one that
    closes the budget counts even if the last rollout overshot it; later ones do not."""
    steps, values = _curve(steps, values)
    end = min(int(np.searchsorted(steps, budget, side="left")) + 1, steps.size)
    return steps[:end], values[:end]


def steps_to_threshold(steps, values, threshold, hold, budget) -> tuple[float, bool]:
    """(real steps, reached): the first sustained hit within the budget, or, censored, the real
    steps the run spent (its closing evaluation) with reached=False: kept, never dropped."""
    steps, values = clip_to_budget(steps, values, budget)
    hit = first_sustained_hit(steps, values, threshold, hold)
    return (float(steps[-1]), False) if hit is None else (hit, True)


def final_value(values, last_k: int) -> float:
    """Mean of the last ``last_k`` evaluations."""
    values = np.asarray(values, dtype=float)
    if last_k < 1 or values.size < last_k:
        raise ValueError(f"final value needs last_k >= 1 evaluations, got {values.size}/{last_k}")
    return float(values[-last_k:].mean())


def area_under_curve(steps, values, budget: float) -> float:
    """Mean of the metric over real steps [0, budget]: the trapezoid area of the piecewise
    linear curve divided by the budget, cut at the budget by interpolation.

    The curve must start with an evaluation at step 0 and reach the budget, so every run's
    area covers the same span.
    """
    steps, values = _curve(steps, values)
    if steps[0] != 0 or steps[-1] < budget:
        raise ValueError(
            f"area under the curve needs evaluations at real step 0 and at the budget {budget}, "
            f"got steps {steps[0]:g}..{steps[-1]:g}: evaluate before training and at the budget"
        )
    inside = steps < budget
    xs = np.append(steps[inside], budget)
    ys = np.append(values[inside], np.interp(budget, steps, values))
    return float(np.trapezoid(ys, xs) / budget)


def iqm(scores) -> np.ndarray | float:
    """Interquartile mean over the first axis (runs): (runs, *rest) -> rest.

    Cuts ``int(0.25 * runs)`` runs at each end (scipy's ``trim_mean``, as rliable), so with
    fewer than 4 runs it is the plain mean.
    """
    ordered = np.sort(np.asarray(scores, dtype=float), axis=0)
    cut = int(0.25 * ordered.shape[0])
    return ordered[cut : ordered.shape[0] - cut].mean(axis=0)


def bootstrap_iqm(scores, reps: int, rng: np.random.Generator) -> np.ndarray:
    """IQM of ``reps`` resamples of the runs drawn with replacement: (runs, *rest) -> (reps, *rest).

    A curve (runs, T) is resampled whole: one draw of runs serves every point of it.
    """
    scores = np.asarray(scores, dtype=float)
    runs = scores.shape[0]
    per_chunk = max(1, _MAX_RESAMPLED // max(1, scores.size))
    chunks = []
    for start in range(0, reps, per_chunk):
        picks = rng.integers(0, runs, size=(runs, min(per_chunk, reps - start)))  # (runs, chunk)
        chunks.append(iqm(scores[picks]))  # (chunk, *rest)
    return np.concatenate(chunks)


def percentile_interval(boot: np.ndarray, confidence: float = CONFIDENCE):
    """(lo, hi) percentiles of bootstrap estimates along the first axis."""
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(boot, [tail, 100 - tail], axis=0)
    return lo, hi


def variant_rng(seed: int, name: str) -> np.random.Generator:
    """A stream per (seed, name): a variant's interval does not depend on the other variants."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _runs(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    if scores.ndim < 1 or scores.shape[0] == 0 or not np.all(np.isfinite(scores)):
        raise ValueError(f"{name}: scores must hold >= 1 run of finite values, got {scores!r}")
    return scores


def aggregate(
    scores_by_variant: dict[str, np.ndarray],
    reps: int = 50_000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, Interval]:
    """Per variant, IQM across runs and its stratified-bootstrap percentile interval.

    ``scores_by_variant`` maps a variant to its per-run scores (runs,); ``seed`` fixes the
    resampling so a table is reproducible.
    """
    out = {}
    for name, scores in scores_by_variant.items():
        scores = _runs(scores, name)
        lo, hi = percentile_interval(
            bootstrap_iqm(scores, reps, variant_rng(seed, name)), confidence
        )
        out[name] = Interval(float(iqm(scores)), float(lo), float(hi))
    return out


def threshold_ratio(
    baseline_steps,
    variant_steps,
    reps: int = 50_000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Interval:
    """IQM(baseline steps to threshold) / IQM(variant steps to threshold), with a percentile
    interval from resampling each variant's runs independently (each is its own stratum).

    > 1 means the variant needs fewer real steps. Each run's steps are its own first sustained
    hit; a censored run enters at the budget. That makes the ratio a lower bound when baseline
    runs are censored (they would need more) and an upper bound when variant runs are; see
    ``verdict`` for what may be claimed then.
    """
    base, var = _runs(baseline_steps, "baseline"), _runs(variant_steps, "variant")
    if np.any(base <= 0) or np.any(var <= 0):
        raise ValueError(
            "steps to threshold must be > 0: a run holding the threshold from real step 0 "
            "measures no learning; raise the threshold"
        )
    return iqm_ratio(base, var, reps, seed, confidence)


def iqm_ratio(
    numerator, denominator, reps: int = 50_000, seed: int = 0, confidence: float = CONFIDENCE
) -> Interval:
    """IQM(numerator runs) / IQM(denominator runs) of positive per-run scores, with a
    percentile interval from resampling each side's runs independently (one stratum each)."""
    top, bottom = _runs(numerator, "numerator"), _runs(denominator, "denominator")
    boot = bootstrap_iqm(top, reps, variant_rng(seed, "baseline")) / bootstrap_iqm(
        bottom, reps, variant_rng(seed, "variant")
    )
    lo, hi = percentile_interval(boot, confidence)
    return Interval(float(iqm(top) / iqm(bottom)), float(lo), float(hi))


def verdict(ratio: Interval, baseline_censored: bool, variant_censored: bool) -> str:
    """What a speed-up interval shows: "better", "worse", "no difference shown", or "not
    shown" when censored runs leave only a bound on the side the interval is on."""
    if ratio.lo <= 1 <= ratio.hi:
        return "no difference shown"
    if ratio.lo > 1:
        # the variant's censored runs would need more steps: the true ratio could be below 1
        if variant_censored:
            return "not shown: variant runs not reached, the ratio is an upper bound"
        return "better"
    # the baseline's censored runs would need more steps: the true ratio could be above 1
    if baseline_censored:
        return "not shown: baseline runs not reached, the ratio is a lower bound"
    return "worse"


def t_quantile(prob: float, df: int) -> float:
    """Student's t quantile: the x with P(T <= x) = ``prob`` (0.5 <= prob < 1) for ``df`` >= 1
    degrees of freedom, by bisection on the density integrated numerically (error < 1e-6)."""
    if not 0.5 <= prob < 1 or not isinstance(df, int) or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= prob < 1 and an integer df >= 1, got "
                         f"prob={prob!r}, df={df!r}")  # fmt: skip
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:  # 0.5 + the density's integral over [0, x] (it is symmetric)
        grid = np.linspace(0.0, x, 20_001)
        return 0.5 + float(np.trapezoid(scale * (1 + grid**2 / df) ** (-(df + 1) / 2), grid))

    lo, hi = 0.0, 1.0
    while cdf(hi) < prob:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-7:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < prob else (lo, mid)
    return (lo + hi) / 2


def mean_t_interval(values, confidence: float = 0.90) -> Interval:
    """The mean of ``values`` (>= 2 finite runs) and its two-sided Student-t interval.

    On paired differences (variant minus baseline, seed by seed) a 90% interval inside
    (-delta, +delta) is the two one-sided tests (TOST) of equivalence within delta at the 5%
    level, and a 90% interval below 0 is a one-sided t-test at 5% that the variant is worse.
    """
    values = _runs(values, "values")
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"a t interval needs >= 2 runs, got {values.size}")
    mean = float(values.mean())
    half = t_quantile((1 + confidence) / 2, values.size - 1) * values.std(ddof=1)
    half /= math.sqrt(values.size)
    return Interval(mean, mean - half, mean + half)
