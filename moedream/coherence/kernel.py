"""The coherence kernel: is an imagined multi-agent trajectory trustworthy enough to learn from?

Plain numpy, vectorised over a batch; never imports ray (the actor lives in ``gate.py``).

Shapes: B batch, H horizon, N agents, D features per agent; "mean_f" is a mean over the N*D
features. The seed authors' kernel is ΔΦ_t = ‖φ(t) − φ(t−1)‖₂, C_t = 1/(1 + ΔΦ_t); their raw L2
changes with the units of the observations. Here every quantity is measured against real data:

1. φ (:class:`Normalizer`), fitted on real sequences: per-feature mean/std of states (μ_s, σ_s)
   and of real step changes Δo_t = o_{t+1} − o_t (μ_Δ, σ_Δ). Normalised step change
   z_t = (Δo_t − μ_Δ) / σ_Δ. Stds are floored at ``std_floor`` times the typical (RMS) std of the
   features that do change, so a feature constant in real data does not divide by zero.
2. Drift metrics per step t (each [B, H]):
   l2_t   = sqrt(mean_f z_t²)                  (RMS, so it does not grow with N*D)
   l1_t   = mean_f |z_t|
   kl_t   = mean_f KL(N(o_t, s_{t-1}) ‖ N(o_{t+1}, s_t))   where obs_std s is given (s_{-1} := s_0)
   ens_t  = uncertainty_t / RMS(σ_Δ)           (ensemble spread in units of a real step)
   disp_t = mean_d Σ_i ‖x_{t+1,i} − x̄_{t+1}‖²,  x = (o − μ_s)/σ_s   (inter-agent dispersion)
3. Calibration. With C* = ``coherence_threshold`` and q_m the real data's
   ``calibration_quantile`` of metric m:   C = 1/(1 + m/s_m),  C(q_m) = C*  ⇔  s_m = q_m·C*/(1 − C*)
   (0.95 and 0.70 give s = 2.33·q95). Active metrics are combined as a weighted mean of their
   calibrated ratios: D_t = Σ_m w_m m_t/s_m / Σ_m w_m, C_t = 1/(1 + D_t). A real step at every
   active metric's q95 thus gets exactly C*, on any environment and in any units.
4. Stall (the two-sided part). A frozen state has a step change far *below* real data, which the
   drift metrics above score as perfectly coherent. A step is *stalled* when its uncentred
   normalised magnitude sqrt(mean_f (Δo_t/σ_Δ)²) is below ``stall_fraction`` times the mean real
   magnitude. Real envs stall too (a random cook bumping a wall in Overcooked leaves ~19% of
   steps unchanged), so single stalled steps are fine; what real data never shows is a *long run*
   of them. The normalizer learns ``max_stall_run``, the longest run real data exceeds on at most
   1 − ``stall_quantile`` of its steps; steps deeper than that into a run get C_t = 0. The
   stall floor is also at least the real data's (1 − ``stall_quantile``) quantile of magnitudes,
   so a model that only jitters where real bodies always move (MuJoCo) stalls too.
5. Support. Step drift cannot see a trajectory that moves like real data through states real
   data never visits (an untrained model turning Overcooked's one-hot features into dense
   noise). A step is *off support* when more than ``support_tolerance`` of its features leave the
   real range [min − m·σ_s, max + m·σ_s] (m = ``support_margin``); it gets C_t = 0 as well.
6. H7 = n_coherent / H with n_coherent = #{t: C_t ≥ C*}; verdict APPROVE if H7 ≥ approve_h7,
   REFINE if refine_h7 ≤ H7 < approve_h7, REJECT below. The bands are compared in exact integer
   arithmetic (n·den ≥ num·H with the band as a fraction), so H7 = 0.70 approves and 0.4999
   rejects with no float error. NaN or inf in any field rejects the trajectory with the reason.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from moedream.config import ConfigBase, ConfigError, check, check_fraction, check_positive
from moedream.files import atomic_write_text
from moedream.world_model.trajectory import Trajectories

METRICS = ("l2", "l1", "kl", "ensemble", "dispersion")
# Metrics calibrated on real data (the others need model outputs, see calibrate_model_metrics).
REAL_METRICS = ("l2", "l1", "dispersion")
ARRAY_FIELDS = ("state_mean", "state_std", "delta_mean", "delta_std", "state_min", "state_max")
TRAJECTORY_FIELDS = ("obs", "action", "reward", "terminated", "uncertainty", "obs_std")

# GateActorConfig's fields (moedream/coherence/actor_config.py). GateConfig refuses them with a pointer
# there rather than as unknown keys: a YAML written when they were kernel settings then says
# where they live.
ACTOR_FIELDS = ("actor_name", "namespace", "num_cpus", "reimaginer_app", "reimaginer_deployment",
                "max_refine_tries", "noise_shrink", "initial_noise_scale", "h7_bins")  # fmt: skip

REASON_COHERENT = "coherent"
REASON_LOW_COHERENCE = "low coherence"
REASON_FROZEN = "frozen state"
REASON_OFF_SUPPORT = "off support"


class Verdict(enum.IntEnum):
    APPROVE = 0
    REFINE = 1
    REJECT = 2


@dataclasses.dataclass
class GateConfig(ConfigBase):
    """The kernel's maths: verdict bands, calibration against real data, the stall and support
    checks and the metric weights. The gate actor's own settings (name, namespace, CPUs, its
    re-imaginer and refine loop) are GateActorConfig's (moedream/coherence/actor_config.py)."""

    approve_h7: float = 0.70
    """APPROVE when H7 (fraction of coherent steps) >= this."""
    refine_h7: float = 0.50
    """REFINE when refine_h7 <= H7 < approve_h7; REJECT below."""
    coherence_threshold: float = 0.70
    """A step is coherent when C_t >= this; a real step at the calibration quantile maps to it."""
    calibration_quantile: float = 0.95
    """Quantile of real step drift that maps to C = coherence_threshold."""
    stall_quantile: float = 0.99
    """Real data exceeds the learnt longest stall run on at most 1 - this of its steps."""
    stall_fraction: float = 0.05
    """A step moving less than this fraction of the mean real step (normalised) is stalled."""
    stall_check: bool = True
    """Zero the coherence of steps deep in a stall run (frozen states); False disables it."""
    support_margin: float = 0.5
    """A feature is off support beyond the real [min, max] widened by this many state stds."""
    support_tolerance: float = 0.1
    """A step is off support when more than this fraction of its features are (1 disables)."""
    std_floor: float = 0.1
    """Per-feature stds are floored at this fraction of the typical std of changing features."""
    weight_l2: float = 1.0
    """Weight of the L2 (RMS) normalised step drift, the primary metric."""
    weight_l1: float = 0.0
    """Weight of the L1 (mean absolute) normalised step drift."""
    weight_kl: float = 0.0
    """Weight of the KL between consecutive predicted Gaussians (only where obs_std is given)."""
    weight_ensemble: float = 0.0
    """Weight of the ensemble disagreement (only where uncertainty is given)."""
    weight_dispersion: float = 0.0
    """Weight of the inter-agent dispersion of normalised observations."""
    kl_reference: float = 1.0
    """Mean per-feature KL (nats) mapped to coherence_threshold until calibrate_model_metrics."""
    ensemble_reference: float = 1.0
    """Ensemble spread, in units of a typical real step change, mapped to coherence_threshold
    until calibrate_model_metrics sets it from the model."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        for name in ("approve_h7", "refine_h7", "stall_fraction", "support_tolerance"):
            check_fraction(f"{prefix}{name}", getattr(self, name))
        check(
            self.refine_h7 <= self.approve_h7,
            f"{prefix}refine_h7",
            self.refine_h7,
            f"must be <= approve_h7 ({self.approve_h7}): the refine band lies below approval",
        )
        for name in ("coherence_threshold", "calibration_quantile", "stall_quantile"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and 0.0 < value < 1.0
            check(ok, f"{prefix}{name}", value, "must be strictly between 0 and 1")
        for name in ("weight_l2", "weight_l1", "weight_kl", "weight_ensemble", "weight_dispersion"):
            check_positive(f"{prefix}{name}", getattr(self, name), allow_zero=True)
        check(
            self.weight_l2 + self.weight_l1 + self.weight_dispersion > 0,
            f"{prefix}weight_l2",
            self.weight_l2,
            "weight_l2 + weight_l1 + weight_dispersion must be > 0 (a metric calibrated on real "
            "data must be active); set weight_l2: 1.0",
        )
        for name in ("kl_reference", "ensemble_reference", "std_floor", "support_margin"):
            check_positive(f"{prefix}{name}", getattr(self, name))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, prefix: str = "") -> GateConfig:
        """As ConfigBase.from_dict; a setting of the gate actor gets an error naming its home."""
        moved = sorted(set(data or {}) & set(ACTOR_FIELDS)) if isinstance(data, dict) else []
        if moved:
            raise ConfigError(
                f"config field(s) {[prefix + k for k in moved]} belong to the gate actor, not to "
                "the kernel's GateConfig: set them in GateActorConfig "
                "(moedream/coherence/actor_config.py); in a quickstart YAML, under the top-level "
                "`gate_actor` section"
            )
        return super().from_dict(data, prefix=prefix)

    def weights(self) -> dict[str, float]:
        return {m: float(getattr(self, f"weight_{m}")) for m in METRICS}


# ---------------------------------------------------------------------------------------------
# phi: the normalizer fitted on real data


@dataclasses.dataclass
class Normalizer:
    """φ: per-feature statistics of real states and step changes, and the metric quantiles.

    Arrays are [N, D] (agents, features). ``quantiles[m]`` is the real data's
    ``calibration_quantile`` of metric m; the drift scale is derived from it at judge time
    (s_m = q_m·C*/(1 − C*), see the module docstring).
    """

    state_mean: np.ndarray
    state_std: np.ndarray
    delta_mean: np.ndarray
    delta_std: np.ndarray
    state_min: np.ndarray
    state_max: np.ndarray
    step_rms: float
    """RMS over changing features of the real step-change std (raw units)."""
    quantiles: dict[str, float]
    calibration_quantile: float
    stall_floor: float
    max_stall_run: int
    stall_rate: float
    """Fraction of real steps that are stalled (for reports)."""
    n_steps: int

    @property
    def n_agents(self) -> int:
        return int(self.state_mean.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.state_mean.shape[1])

    @classmethod
    def fit(cls, sequences: np.ndarray | Sequence[np.ndarray], config: GateConfig) -> Normalizer:
        """Fit on real observation sequences: an array [B, T+1, N, D] (training windows) or a
        list of episodes [T_i+1, N, D]. Step changes never cross a sequence boundary."""
        seqs = _as_sequences(sequences)
        deltas = np.concatenate([np.diff(s, axis=0) for s in seqs])  # [M, N, D]
        states = np.concatenate(seqs)  # [M', N, D]
        state_mean, state_std = _mean_std(states, config.std_floor, "states")
        delta_mean, delta_std = _mean_std(deltas, config.std_floor, "step changes")
        changing = deltas.std(axis=0) > 0
        step_rms = float(np.sqrt(np.mean(deltas.std(axis=0)[changing] ** 2)))
        norm = cls(
            state_mean=state_mean,
            state_std=state_std,
            delta_mean=delta_mean,
            delta_std=delta_std,
            state_min=states.min(axis=0),
            state_max=states.max(axis=0),
            step_rms=step_rms,
            quantiles={},
            calibration_quantile=float(config.calibration_quantile),
            stall_floor=0.0,
            max_stall_run=0,
            stall_rate=0.0,
            n_steps=int(deltas.shape[0]),
        )
        norm._fit_quantiles(seqs, config)
        norm._fit_stall(seqs, config)
        return norm

    def _fit_quantiles(self, seqs: list[np.ndarray], config: GateConfig) -> None:
        q = config.calibration_quantile
        values: dict[str, list[np.ndarray]] = {m: [] for m in REAL_METRICS}
        for seq in seqs:
            obs = seq[None]  # [1, T+1, N, D]
            z = self.normalised_step(obs)
            values["l2"].append(l2_drift(z)[0])
            values["l1"].append(l1_drift(z)[0])
            values["dispersion"].append(inter_agent_dispersion(self.normalised_state(obs))[0])
        for m, vals in values.items():
            self.quantiles[m] = float(np.quantile(np.concatenate(vals), q))
        if self.quantiles["l2"] <= 0:
            raise ValueError("real step changes have zero drift at the calibration quantile")

    def _fit_stall(self, seqs: list[np.ndarray], config: GateConfig) -> None:
        mags = [step_magnitude(self.raw_step_ratio(s[None]))[0] for s in seqs]  # each [T]
        all_mags = np.concatenate(mags)
        self.stall_floor = float(
            max(
                config.stall_fraction * np.mean(all_mags),
                np.quantile(all_mags, 1.0 - config.stall_quantile),
            )
        )
        runs = np.concatenate([stall_runs(m[None] <= self.stall_floor)[0] for m in mags])
        self.stall_rate = float(np.mean(runs > 0))
        allowed = 1.0 - config.stall_quantile
        longest = int(runs.max(initial=0))
        self.max_stall_run = next(
            (k for k in range(longest + 1) if np.mean(runs > k) <= allowed), longest
        )

    def calibrate_model_metrics(self, trajs: Trajectories, config: GateConfig) -> None:
        """Set the KL and ensemble quantiles from a world model's imagined rollouts started at
        real states (outputs that real data does not have). Replaces the config references."""
        if trajs.obs_std is not None:
            kl = kl_drift(trajs.obs, trajs.obs_std, self.delta_std * config.std_floor)
            self.quantiles["kl"] = float(np.quantile(kl, config.calibration_quantile))
        if trajs.uncertainty is not None:
            ens = ensemble_disagreement(trajs.uncertainty, self.step_rms)
            self.quantiles["ensemble"] = float(np.quantile(ens, config.calibration_quantile))

    # -- phi -------------------------------------------------------------------------------

    def normalised_state(self, obs: np.ndarray) -> np.ndarray:
        """[..., N, D] -> (o − μ_s)/σ_s, float64."""
        return (np.asarray(obs, np.float64) - self.state_mean) / self.state_std

    def normalised_step(self, obs: np.ndarray) -> np.ndarray:
        """obs [B, H+1, N, D] -> z [B, H, N, D] = (Δo − μ_Δ)/σ_Δ."""
        delta = np.diff(np.asarray(obs, np.float64), axis=1)
        return (delta - self.delta_mean) / self.delta_std

    def off_support(self, obs: np.ndarray, config: GateConfig) -> np.ndarray:
        """obs [B, H+1, N, D] -> [B, H] bool: o_{t+1} has too many features out of range."""
        nxt = np.asarray(obs, np.float64)[:, 1:]  # [B, H, N, D]
        margin = config.support_margin * self.state_std
        out = (nxt < self.state_min - margin) | (nxt > self.state_max + margin)
        return np.mean(out, axis=(2, 3)) > config.support_tolerance

    def raw_step_ratio(self, obs: np.ndarray) -> np.ndarray:
        """obs [B, H+1, N, D] -> Δo/σ_Δ [B, H, N, D] (uncentred: zero for a frozen state)."""
        return np.diff(np.asarray(obs, np.float64), axis=1) / self.delta_std

    # -- persistence -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (world-model checkpoints embed it; the gate actor receives it)."""
        out = dataclasses.asdict(self)
        for name in ARRAY_FIELDS:
            out[name] = np.asarray(out[name]).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(data))
        if missing:
            raise ValueError(f"normalizer data lacks {missing}; save it with Normalizer.save")
        kwargs = {k: data[k] for k in fields}
        for name in ARRAY_FIELDS:
            kwargs[name] = np.asarray(data[name], dtype=np.float64)
        kwargs["quantiles"] = {k: float(v) for k, v in data["quantiles"].items()}
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temp file + rename)."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"normalizer file {str(path)!r} does not exist; fit one with "
                "`moedream calibrate-gate --out PATH`"
            )
        return cls.from_dict(json.loads(path.read_text()))


def _as_sequences(sequences: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(sequences, np.ndarray):
        if sequences.ndim != 4:
            raise ValueError(
                f"real sequences have shape {sequences.shape}; expected [B, T+1, N, D] windows "
                "or a list of episodes [T_i+1, N, D]"
            )
        sequences = list(sequences)
    seqs = [np.asarray(s, dtype=np.float64) for s in sequences]
    if not seqs or any(s.ndim != 3 or s.shape[0] < 2 for s in seqs):
        raise ValueError(
            "real sequences must be a non-empty list of episodes [T_i+1, N, D] with T_i >= 1"
        )
    if len({s.shape[1:] for s in seqs}) != 1:
        raise ValueError(f"real sequences differ in [N, D]: {sorted({s.shape[1:] for s in seqs})}")
    if not all(np.isfinite(s).all() for s in seqs):
        raise ValueError("real sequences contain NaN or inf; clean the episode data first")
    return seqs


def _mean_std(x: np.ndarray, floor_fraction: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over axis 0 of [M, N, D]; std floored (see module docstring)."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    changing = std > 0
    if not changing.any():
        raise ValueError(f"real {what} never vary; cannot calibrate the gate on this data")
    typical = float(np.sqrt(np.mean(std[changing] ** 2)))
    return mean, np.maximum(std, floor_fraction * typical)


# ---------------------------------------------------------------------------------------------
# drift metrics, each -> [B, H]


def l2_drift(z: np.ndarray) -> np.ndarray:
    """z [B, H, N, D] -> sqrt(mean_f z²) [B, H]."""
    return np.sqrt(np.mean(z**2, axis=(2, 3)))


def l1_drift(z: np.ndarray) -> np.ndarray:
    """z [B, H, N, D] -> mean_f |z| [B, H]."""
    return np.mean(np.abs(z), axis=(2, 3))


def step_magnitude(ratio: np.ndarray) -> np.ndarray:
    """Δo/σ_Δ [B, H, N, D] -> sqrt(mean_f (Δo/σ_Δ)²) [B, H] (uncentred, for the stall test)."""
    return np.sqrt(np.mean(ratio**2, axis=(2, 3)))


def kl_drift(obs: np.ndarray, obs_std: np.ndarray, std_floor: np.ndarray) -> np.ndarray:
    """Mean per-feature KL(N(o_t, s_{t-1}) ‖ N(o_{t+1}, s_t)) between consecutive predicted
    Gaussians; obs [B, H+1, N, D], obs_std [B, H, N, D], std_floor [N, D] -> [B, H]. KL is
    invariant to per-feature affine rescaling, so raw units are fine."""
    obs = np.asarray(obs, np.float64)
    s1 = np.maximum(np.asarray(obs_std, np.float64), std_floor)  # s_t      [B, H, N, D]
    s0 = np.concatenate([s1[:, :1], s1[:, :-1]], axis=1)  # s_{t-1}, s_{-1} := s_0
    mu0, mu1 = obs[:, :-1], obs[:, 1:]
    kl = np.log(s1 / s0) + (s0**2 + (mu0 - mu1) ** 2) / (2.0 * s1**2) - 0.5
    return kl.mean(axis=(2, 3))


def ensemble_disagreement(uncertainty: np.ndarray, step_rms: float) -> np.ndarray:
    """Ensemble spread [B, H] (raw obs units) in units of a typical real step change."""
    return np.asarray(uncertainty, np.float64) / step_rms


def inter_agent_dispersion(x: np.ndarray) -> np.ndarray:
    """Normalised obs [B, H+1, N, D] -> mean_d Σ_i (x_{t+1,i,d} − x̄_{t+1,d})² [B, H]."""
    nxt = x[:, 1:]  # [B, H, N, D]
    return np.mean(np.sum((nxt - nxt.mean(axis=2, keepdims=True)) ** 2, axis=2), axis=2)


def stall_runs(stalled: np.ndarray) -> np.ndarray:
    """[B, H] bool -> [B, H] int: length of the stall run ending at each step (0 if moving)."""
    runs = np.zeros(stalled.shape, dtype=np.int64)
    run = np.zeros(stalled.shape[0], dtype=np.int64)
    for t in range(stalled.shape[1]):
        run = (run + 1) * stalled[:, t]
        runs[:, t] = run
    return runs


def drift_scale(quantile_value: float, coherence_threshold: float) -> float:
    """s such that 1/(1 + q/s) = C*:  s = q·C*/(1 − C*)."""
    return quantile_value * coherence_threshold / (1.0 - coherence_threshold)


# ---------------------------------------------------------------------------------------------
# judging


@dataclasses.dataclass
class GateResult:
    """Verdicts for a batch of B trajectories of horizon H."""

    verdicts: np.ndarray
    """[B] int8 Verdict values."""
    h7: np.ndarray
    """[B] fraction of coherent steps."""
    n_coherent: np.ndarray
    """[B] int number of steps with C_t >= coherence_threshold."""
    coherence: np.ndarray
    """[B, H] C_t (0 where stalled too long, off support or non-finite)."""
    drift: np.ndarray
    """[B, H] combined calibrated drift D_t (C_t = 1/(1 + D_t) before the stall test)."""
    reasons: list[str]
    """[B] 'coherent', 'low coherence', 'frozen state', 'off support', 'non-finite values in obs'."""
    metrics: dict[str, np.ndarray]
    """Raw per-step metrics [B, H] that were available (l2, l1, kl, ensemble, dispersion)."""
    tries: np.ndarray
    """[B] int refine tries spent on each trajectory (0 from plain judge)."""
    trajectories: Trajectories | None = None
    """The final trajectories (re-imagined rows replaced) from judge_and_refine."""

    def __len__(self) -> int:
        return int(self.verdicts.shape[0])

    def verdict_names(self) -> list[str]:
        return [Verdict(int(v)).name for v in self.verdicts]

    def counts(self) -> dict[str, int]:
        return {v.name: int(np.sum(self.verdicts == v)) for v in Verdict}

    def approved_index(self) -> np.ndarray:
        return np.flatnonzero(self.verdicts == Verdict.APPROVE)


def judge(trajs: Trajectories, normalizer: Normalizer, config: GateConfig) -> GateResult:
    """Score every trajectory of the batch and give its verdict (see the module docstring)."""
    _check_compatible(trajs, normalizer, config)
    nonfinite = nonfinite_fields(trajs)  # [B] list of field names
    bad = np.array([bool(f) for f in nonfinite])
    clean = _zero_nonfinite(trajs) if bad.any() else trajs
    metrics = drift_metrics(clean, normalizer, config)
    drift = combined_drift(metrics, normalizer, config)  # [B, H]
    coherence = 1.0 / (1.0 + drift)
    frozen = (
        frozen_steps(clean.obs, normalizer)
        if config.stall_check
        else np.zeros(drift.shape, dtype=bool)
    )
    off = normalizer.off_support(clean.obs, config)  # [B, H]
    coherence = np.where(frozen | off, 0.0, coherence)
    coherence[bad] = 0.0
    n_coherent = np.sum(coherence >= config.coherence_threshold, axis=1)
    horizon = coherence.shape[1]
    verdicts = verdicts_from_counts(n_coherent, horizon, config)
    verdicts[bad] = Verdict.REJECT
    low = coherence < config.coherence_threshold
    causes = np.stack([np.sum(frozen & low, axis=1), np.sum(off & ~frozen & low, axis=1)], axis=1)
    reasons = [
        _reason(v, fields, c, lo)
        for v, fields, c, lo in zip(verdicts, nonfinite, causes, low.sum(axis=1), strict=True)
    ]
    return GateResult(
        verdicts=verdicts,
        h7=n_coherent / horizon,
        n_coherent=n_coherent,
        coherence=coherence,
        drift=drift,
        reasons=reasons,
        metrics=metrics,
        tries=np.zeros(len(verdicts), dtype=np.int64),
    )


def _reason(verdict: int, nonfinite: list[str], causes: np.ndarray, n_low: int) -> str:
    """The main cause of a verdict: causes = (frozen steps, off-support steps) among the
    incoherent ones; whichever explains at least half of them names it."""
    if nonfinite:
        return "non-finite values in " + ", ".join(nonfinite)
    if verdict == Verdict.APPROVE:
        return REASON_COHERENT
    n_frozen, n_off = int(causes[0]), int(causes[1])
    if 2 * max(n_frozen, n_off) >= n_low:
        return REASON_FROZEN if n_frozen >= n_off else REASON_OFF_SUPPORT
    return REASON_LOW_COHERENCE


def drift_metrics(
    trajs: Trajectories, normalizer: Normalizer, config: GateConfig
) -> dict[str, np.ndarray]:
    """The raw per-step metrics [B, H] that are active (weight > 0) and available."""
    weights = config.weights()
    out: dict[str, np.ndarray] = {}
    if weights["l2"] > 0 or weights["l1"] > 0:
        z = normalizer.normalised_step(trajs.obs)  # [B, H, N, D]
        if weights["l2"] > 0:
            out["l2"] = l2_drift(z)
        if weights["l1"] > 0:
            out["l1"] = l1_drift(z)
    if weights["kl"] > 0 and trajs.obs_std is not None:
        floor = normalizer.delta_std * config.std_floor
        out["kl"] = kl_drift(trajs.obs, trajs.obs_std, floor)
    if weights["ensemble"] > 0 and trajs.uncertainty is not None:
        out["ensemble"] = ensemble_disagreement(trajs.uncertainty, normalizer.step_rms)
    if weights["dispersion"] > 0:
        out["dispersion"] = inter_agent_dispersion(normalizer.normalised_state(trajs.obs))
    return out


def combined_drift(
    metrics: dict[str, np.ndarray], normalizer: Normalizer, config: GateConfig
) -> np.ndarray:
    """D_t = Σ_m w_m m_t/s_m / Σ_m w_m over the available metrics -> [B, H]."""
    weights = config.weights()
    references = {"kl": config.kl_reference, "ensemble": config.ensemble_reference}
    total = None
    weight_sum = 0.0
    for m, values in metrics.items():
        q = normalizer.quantiles.get(m, references.get(m))
        scale = drift_scale(q, config.coherence_threshold)
        term = weights[m] * values / scale if scale > 0 else np.where(values > 0, np.inf, 0.0)
        total = term if total is None else total + term
        weight_sum += weights[m]
    return total / weight_sum


def frozen_steps(obs: np.ndarray, normalizer: Normalizer) -> np.ndarray:
    """[B, H] bool: steps deeper into a stall run than real data allows."""
    stalled = step_magnitude(normalizer.raw_step_ratio(obs)) <= normalizer.stall_floor
    return stall_runs(stalled) > normalizer.max_stall_run


def verdicts_from_counts(n_coherent: np.ndarray, horizon: int, config: GateConfig) -> np.ndarray:
    """Exact band test on H7 = n/H: n·den ≥ num·H with each band edge as a fraction."""
    n = np.asarray(n_coherent, dtype=np.int64)
    approve = _fraction(config.approve_h7)
    refine = _fraction(config.refine_h7)
    verdicts = np.full(n.shape, Verdict.REJECT, dtype=np.int8)
    verdicts[n * refine.denominator >= refine.numerator * horizon] = Verdict.REFINE
    verdicts[n * approve.denominator >= approve.numerator * horizon] = Verdict.APPROVE
    return verdicts


def judge_coherence(coherence: np.ndarray, config: GateConfig) -> tuple[np.ndarray, np.ndarray]:
    """(verdicts [B], h7 [B]) from per-step coherence [B, H]; H7 from integer counts."""
    coherence = np.asarray(coherence, dtype=np.float64)
    n = np.sum(coherence >= config.coherence_threshold, axis=1)
    return verdicts_from_counts(n, coherence.shape[1], config), n / coherence.shape[1]


def _fraction(value: float) -> Fraction:
    """The band edge as the simple fraction it was meant to be (0.7 -> 7/10, not 0.69999...)."""
    return Fraction(value).limit_denominator(10**9)


def nonfinite_fields(trajs: Trajectories) -> list[list[str]]:
    """For each trajectory, the fields holding NaN or inf."""
    out: list[list[str]] = [[] for _ in range(trajs.batch_size)]
    for name in TRAJECTORY_FIELDS:
        arr = getattr(trajs, name)
        if arr is None:
            continue
        arr = np.asarray(arr)
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        for i in np.flatnonzero(bad):
            out[i].append(name)
    return out


def _zero_nonfinite(trajs: Trajectories) -> Trajectories:
    fix = lambda a: (
        None
        if a is None
        else np.nan_to_num(np.asarray(a, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    )  # noqa: E731
    return dataclasses.replace(
        trajs, **{name: fix(getattr(trajs, name)) for name in TRAJECTORY_FIELDS}
    )


def _check_compatible(trajs: Trajectories, normalizer: Normalizer, config: GateConfig) -> None:
    if not isinstance(trajs, Trajectories):
        raise TypeError(
            f"the gate judges moedream.world_model.trajectory.Trajectories, got {type(trajs).__name__}"
        )
    obs = np.asarray(trajs.obs)
    if obs.ndim != 4 or obs.shape[1] < 2:
        raise ValueError(f"Trajectories.obs has shape {obs.shape}; expected [B, H+1, N, D], H >= 1")
    expected = (normalizer.n_agents, normalizer.obs_dim)
    if obs.shape[2:] != expected:
        raise ValueError(
            f"Trajectories.obs has [N, D] = {obs.shape[2:]} but the normalizer was fitted on "
            f"{expected}; fit the gate on this env's data (moedream calibrate-gate)"
        )
    for name, want in (
        ("obs_std", obs.shape[:1] + (obs.shape[1] - 1,) + obs.shape[2:]),
        ("uncertainty", obs.shape[:1] + (obs.shape[1] - 1,)),
    ):
        arr = getattr(trajs, name)
        if arr is not None and np.asarray(arr).shape != want:
            raise ValueError(
                f"Trajectories.{name} has shape {np.asarray(arr).shape}, expected {want}"
            )
    if abs(normalizer.calibration_quantile - config.calibration_quantile) > 1e-12:
        raise ValueError(
            f"the normalizer was fitted at calibration_quantile {normalizer.calibration_quantile} "
            f"but config.calibration_quantile is {config.calibration_quantile}; refit the "
            "normalizer with this config"
        )


__all__ = [
    "GateConfig",
    "GateResult",
    "Normalizer",
    "Verdict",
    "combined_drift",
    "drift_metrics",
    "drift_scale",
    "ensemble_disagreement",
    "frozen_steps",
    "inter_agent_dispersion",
    "judge",
    "judge_coherence",
    "kl_drift",
    "l1_drift",
    "l2_drift",
    "nonfinite_fields",
    "stall_runs",
    "step_magnitude",
    "verdicts_from_counts",
]
