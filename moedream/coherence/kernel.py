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
6. Model terms: accuracy and rewards. Smoothness alone approves a model that moves like real
   data but predicts the wrong thing. When the world model sends its ensemble's outputs
   (Trajectories.obs_std, ensemble_obs, ensemble_reward, reward_spread; the reward and
   dynamics heads are separate networks from the K ensemble members, so a fault in one shows
   as a gap to the other), every step also gets (each [B, H]; σ_r = real reward std):
   gap_t           = sqrt(mean_f ((o_{t+1} − ô^ens_{t+1})/σ_e)²)   imagined step vs the
                     ensemble's expected next obs (on real data: its one-step error), per
                     feature in units of σ_e, the RMS of the ensemble's real one-step error
                     of that feature (floored at ``std_floor`` times its RMS over features)
   obs_spread_t    = sqrt(mean_f (std_k ô_{t+1,k}/σ_Δ)²)          ensemble disagreement, obs
   reward_spread_t = mean_i std_k r_{t,i,k} / σ_r                  ensemble disagreement, reward
   reward_gap_t    = mean_i |r_{t,i} − r̄^ens_{t,i}| / σ_r          reward head vs ensemble mean
   error_t         = E[gap | obs_spread = obs_spread_t] / m̄        expected one-step error
   E[gap | spread] is the binned mean of the model's real one-step error on real windows, in
   σ_Δ units (sqrt(mean_f ((o_{t+1} − ô^ens_{t+1})/σ_Δ)²)), per level of disagreement
   (monotone, extrapolated in proportion beyond the last bin); m̄ is the mean real step
   magnitude, the error of predicting "nothing changes". Why σ_e and not σ_Δ for gap: where
   real changes are rare jumps (a pot starting to cook) σ_Δ is tiny and a model misses the
   jumps, so in σ_Δ units a few real steps set the gap's quantile at about nine times its
   median and a dynamics head corrupted on every feature stays under it; in units of the
   model's own per-feature error a real step is ordinary everywhere. Every term is
   calibrated like drift, on the model's teacher-forced outputs on held-out real windows
   (:meth:`Normalizer.calibrate_model_terms`): s = q·C*/(1 − C*) with q its
   ``model_calibration_quantile`` there (0.99: each term alone fails 1% of real steps, so that
   together with drift a real trajectory seen through a good model is still mostly approved;
   a joint widening to 1% for all terms together costs most of the sensitivity to a corrupted
   dynamics head); for error_t, q is at least ``error_reference``, so a step is incoherent for
   its expected error only when that error also exceeds a copy predictor's (error_reference =
   1). σ_r is 1 (raw reward units) where real rewards never vary. Uncalibrated terms and
   absent fields are skipped.
6b. The reflector's term: does the imagined trajectory agree with what the team's centralised
   critic V (the reflector) learnt from real data? The learner that builds the imagined batch
   computes every step's TD residual (Trajectories.td_residual, [B, H]; r̄ the agents' mean
   reward, d̄ their mean termination probability, γ the team's discount)
   δ_t = r̄_t + γ(1 − d̄_t)V(o_{t+1}) − V(o_t)
   and, each iteration, the same residual on its latest REAL episodes with the same critic.
   value_gap_t = |δ_t|, calibrated like the model terms (:meth:`Normalizer.calibrate_value_term`):
   q is the real residuals' ``model_calibration_quantile``, at least ``value_reference``·σ_r, so
   a step is incoherent when the critic finds its imagined reward-plus-next-value further off
   than it finds 99% of real steps. The discounted sum of δ along a trajectory is its imagined
   return plus bootstrap minus V at its real start state; δ_t places that inconsistency at the
   step that makes it, so truncation can keep the steps before it.
7. Causes. Every term belongs to one cause: drift (the weighted mean of section 3, and gap),
   reward (reward_gap), disagreement (obs_spread, reward_spread, error), value (value_gap,
   the reflector's). A cause's ratio is its
   largest weighted term ratio w·m/s, and D_t = max over causes (so one bad cause is enough:
   a weighted mean would dilute it); with only the real-data metrics D_t is exactly section 3's.
   An incoherent step's cause is stall if frozen, else support if off support, else the cause
   with the largest ratio; a trajectory's cause is the most frequent among its incoherent steps.
8. H7 = n_coherent / H with n_coherent = #{t: C_t ≥ C*}; verdict APPROVE if H7 ≥ approve_h7,
   REFINE if refine_h7 ≤ H7 < approve_h7, REJECT below. The bands are compared in exact integer
   arithmetic (n·den ≥ num·H with the band as a fraction), so H7 = 0.70 approves and 0.4999
   rejects with no float error. NaN or inf in any field rejects the trajectory with the reason.
   A row with ``length`` L < H is judged on its first L steps (H7 = n_coherent / L).
9. Truncation (:func:`truncate`, the REFINE that fixes a rollout): a trajectory that is not
   approved keeps its coherent prefix, the steps before its first incoherent one, when that
   prefix has at least ``min_prefix`` steps; it is then approved with ``length`` = the prefix.
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
TRAJECTORY_FIELDS = ("obs", "action", "reward", "terminated", "uncertainty", "obs_std",
                     "ensemble_obs", "ensemble_reward", "reward_spread", "td_residual")  # fmt: skip

# GateActorConfig's fields (moedream/coherence/actor_config.py). GateConfig refuses them with a pointer
# there rather than as unknown keys: a YAML written when they were kernel settings then says
# where they live.
ACTOR_FIELDS = ("actor_name", "namespace", "num_cpus", "reimaginer_app", "reimaginer_deployment",
                "refine_mode", "max_refine_tries", "noise_shrink", "initial_noise_scale", "h7_bins")  # fmt: skip

MODEL_TERMS = ("gap", "obs_spread", "reward_spread", "reward_gap", "error", "value_gap")
# Terms calibrated by quantile on the model's outputs on held-out real windows.
QUANTILE_TERMS = ("gap", "obs_spread", "reward_spread", "reward_gap", "error")
# Terms calibrated on what the learner sends (the real TD residuals of its critic).
LEARNER_TERMS = ("value_gap",)
CAUSES = ("drift", "reward", "disagreement", "support", "stall", "value")
TERM_CAUSE = {"gap": "drift", "reward_gap": "reward", "obs_spread": "disagreement",
              "reward_spread": "disagreement", "error": "disagreement",
              "value_gap": "value"}  # fmt: skip

REASON_COHERENT = "coherent"
REASON_LOW_COHERENCE = "low coherence"
REASON_FROZEN = "frozen state"
REASON_OFF_SUPPORT = "off support"
REASON_REWARD = "reward inconsistent"
REASON_DISAGREEMENT = "ensemble disagreement"
REASON_VALUE = "value inconsistent"
CAUSE_REASON = {"drift": REASON_LOW_COHERENCE, "reward": REASON_REWARD,
                "disagreement": REASON_DISAGREEMENT, "support": REASON_OFF_SUPPORT,
                "stall": REASON_FROZEN, "value": REASON_VALUE}  # fmt: skip
TRUNCATED_PREFIX = "truncated: "


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
    model_calibration_quantile: float = 0.99
    """Quantile of each model term on held-out real windows mapped to coherence_threshold
    (higher than calibration_quantile: a step must pass every cause at once)."""
    weight_gap: float = 1.0
    """Weight of the gap between the imagined next obs and the ensemble's mean (drift cause)."""
    weight_obs_spread: float = 1.0
    """Weight of the ensemble's disagreement on the next obs (disagreement cause)."""
    weight_reward_spread: float = 1.0
    """Weight of the ensemble's disagreement on the reward (disagreement cause)."""
    weight_reward_gap: float = 1.0
    """Weight of the reward head's gap to the ensemble's mean reward (reward cause)."""
    weight_error: float = 1.0
    """Weight of the expected one-step error (disagreement cause)."""
    error_reference: float = 1.0
    """Least expected one-step error, in units of the mean real step (a copy predictor's
    error), that maps to coherence_threshold (the calibrated quantile when that is larger)."""
    weight_value_gap: float = 1.0
    """Weight of the reflector's TD residual on imagined steps (value cause)."""
    value_reference: float = 0.1
    """Least TD residual, in real reward stds σ_r, that maps to coherence_threshold (the
    calibrated quantile when that is larger): a critic that predicts real rewards exactly
    would otherwise call any imagined reward noise incoherent."""
    min_prefix: int = 2
    """Truncation keeps a non-approved trajectory's coherent prefix of at least this many steps."""

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
        for name in ("coherence_threshold", "calibration_quantile", "stall_quantile",
                     "model_calibration_quantile"):  # fmt: skip
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
        for term in MODEL_TERMS:
            check_positive(f"{prefix}weight_{term}", getattr(self, f"weight_{term}"),
                           allow_zero=True)  # fmt: skip
        for name in ("kl_reference", "ensemble_reference", "std_floor", "support_margin",
                     "error_reference", "value_reference"):  # fmt: skip
            check_positive(f"{prefix}{name}", getattr(self, name))
        check(
            isinstance(self.min_prefix, int) and self.min_prefix >= 1,
            f"{prefix}min_prefix",
            self.min_prefix,
            "must be an integer >= 1 (the shortest coherent prefix truncation keeps)",
        )

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
        return {m: float(getattr(self, f"weight_{m}")) for m in (*METRICS, *MODEL_TERMS)}


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
    mean_step: float = 0.0
    """Mean real step magnitude sqrt(mean_f (Δo/σ_Δ)²): the error of predicting no change."""
    reward_std: float = 0.0
    """Real reward std σ_r (set by calibrate_model_terms; 0 = model terms uncalibrated)."""
    error_curve: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """E[one-step error | obs_spread] on held-out real windows, the error in σ_Δ units:
    {"spread": [...], "error": [...]}."""
    error_std: np.ndarray | None = None
    """[N, D] σ_e: per-feature RMS of the ensemble's real one-step error on held-out windows
    (floored), the unit of gap (set by calibrate_model_terms; None: σ_Δ)."""

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
        self.mean_step = float(np.mean(all_mags))
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

    def calibrate_model_terms(
        self, trajs: Trajectories, real_reward: np.ndarray, config: GateConfig, bins: int = 10
    ) -> dict[str, float]:
        """Calibrate the model terms (module docstring, section 6) on HELD-OUT real windows as
        the served model sees them (:func:`model_view`: real obs, the model's teacher-forced
        rewards and ensemble outputs); ``real_reward`` [B, H, N] are their real rewards (σ_r).
        Returns the fitted quantiles."""
        missing = [f for f in ("obs_std", "ensemble_obs", "ensemble_reward", "reward_spread")
                   if getattr(trajs, f) is None]  # fmt: skip
        if missing:
            raise ValueError(
                f"calibrate_model_terms needs the model's {missing} on real windows; build them "
                "with moedream.coherence.model_calibration.model_view"
            )
        spread = float(np.std(np.asarray(real_reward, np.float64)))
        self.reward_std = spread if spread > 1e-8 else 1.0  # constant real rewards: raw units
        real_error = np.asarray(trajs.obs, np.float64)[:, 1:] - trajs.ensemble_obs  # [B,H,N,D]
        self.error_std = _floored(np.sqrt(np.mean(real_error**2, axis=(0, 1))), config.std_floor)
        values = raw_model_terms(trajs, self)
        q = config.model_calibration_quantile
        one_step = rms_ratio(real_error, self.delta_std)  # [B, H], in σ_Δ units
        self.error_curve = error_curve(values["obs_spread"], one_step, bins)
        values["error"] = expected_error(values["obs_spread"], self.error_curve) / self.mean_step
        fitted = {m: float(np.quantile(values[m], q)) for m in QUANTILE_TERMS}
        self.quantiles.update(fitted)
        return fitted

    def calibrate_value_term(self, residuals: np.ndarray, config: GateConfig) -> float:
        """Calibrate value_gap (module docstring, section 6b) on the team critic's TD residuals
        of REAL steps (any shape; e.g. the latest real batch, with the critic the imagined batch
        will be scored with). Returns the fitted quantile of |δ|."""
        values = np.abs(np.asarray(residuals, np.float64)).ravel()
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError(
                f"calibrate_value_term needs finite real TD residuals, got {values.size} values"
                f"{'' if values.size == 0 else ' with NaN or inf'}; send the real batch's residuals"
            )
        q = float(np.quantile(values, config.model_calibration_quantile))
        self.quantiles["value_gap"] = q
        return q

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
        if self.error_std is not None:
            out["error_std"] = np.asarray(self.error_std).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        fields = {f.name for f in dataclasses.fields(cls)}
        optional = {"mean_step", "reward_std", "error_curve", "error_std"}  # absent: older files
        missing = sorted(fields - set(data) - optional)
        if missing:
            raise ValueError(f"normalizer data lacks {missing}; save it with Normalizer.save")
        kwargs = {k: data[k] for k in fields if k in data}
        for name in ARRAY_FIELDS:
            kwargs[name] = np.asarray(data[name], dtype=np.float64)
        if data.get("error_std") is not None:
            kwargs["error_std"] = np.asarray(data["error_std"], dtype=np.float64)
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
    if not (std > 0).any():
        raise ValueError(f"real {what} never vary; cannot calibrate the gate on this data")
    return mean, _floored(std, floor_fraction)


def _floored(scale: np.ndarray, floor_fraction: float) -> np.ndarray:
    """Per-feature scales [N, D] floored at ``floor_fraction`` times the RMS of the nonzero
    ones (so a feature that never varies does not divide by zero); all ones if none varies."""
    nonzero = scale > 0
    if not nonzero.any():
        return np.ones_like(scale)
    typical = float(np.sqrt(np.mean(scale[nonzero] ** 2)))
    return np.maximum(scale, floor_fraction * typical)


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


def td_residuals(
    value: np.ndarray, reward: np.ndarray, terminated: np.ndarray, gamma: float
) -> np.ndarray:
    """The reflector's one-step TD residuals (section 6b): the team critic's values
    value [B, T+1] of the obs, reward [B, T, N], terminated [B, T, N] (0/1, or a model's
    probabilities) -> δ [B, T] = r̄_t + γ(1 − d̄_t)V(o_{t+1}) − V(o_t), r̄ and d̄ the means over
    agents."""
    value = np.asarray(value, np.float64)
    done = np.mean(np.asarray(terminated, np.float64), axis=2)  # [B, T]
    team_reward = np.mean(np.asarray(reward, np.float64), axis=2)  # [B, T]
    return team_reward + gamma * (1.0 - done) * value[:, 1:] - value[:, :-1]


def rms_ratio(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x [B, H, N, D] / scale [N, D] -> sqrt(mean_f (x/scale)²) [B, H]."""
    return np.sqrt(np.mean((np.asarray(x, np.float64) / scale) ** 2, axis=(2, 3)))


def raw_model_terms(trajs: Trajectories, normalizer: Normalizer) -> dict[str, np.ndarray]:
    """The model terms [B, H] (module docstring, section 6) whose inputs are available:
    gap and obs_spread need ensemble_obs / obs_std (gap in σ_e once calibrated, else σ_Δ),
    the reward terms need σ_r (calibrated),
    error needs obs_spread and the calibrated error curve."""
    out: dict[str, np.ndarray] = {}
    if trajs.ensemble_obs is not None:
        nxt = np.asarray(trajs.obs, np.float64)[:, 1:]  # [B, H, N, D]
        unit = normalizer.delta_std if normalizer.error_std is None else normalizer.error_std
        out["gap"] = rms_ratio(nxt - trajs.ensemble_obs, unit)
    if trajs.obs_std is not None:
        out["obs_spread"] = rms_ratio(trajs.obs_std, normalizer.delta_std)
    sigma_r = normalizer.reward_std
    if sigma_r > 0 and trajs.reward_spread is not None:
        out["reward_spread"] = (
            np.mean(np.asarray(trajs.reward_spread, np.float64), axis=2) / sigma_r
        )
    if sigma_r > 0 and trajs.ensemble_reward is not None:
        gap = np.abs(np.asarray(trajs.reward, np.float64) - trajs.ensemble_reward)  # [B, H, N]
        out["reward_gap"] = np.mean(gap, axis=2) / sigma_r
    if "obs_spread" in out and normalizer.error_curve and normalizer.mean_step > 0:
        out["error"] = expected_error(out["obs_spread"], normalizer.error_curve)
        out["error"] = out["error"] / normalizer.mean_step
    if trajs.td_residual is not None:
        out["value_gap"] = np.abs(np.asarray(trajs.td_residual, np.float64))
    return out


def error_curve(spread: np.ndarray, error: np.ndarray, bins: int) -> dict[str, list[float]]:
    """E[error | spread] from paired samples: the mean of both per quantile bin of spread,
    made non-decreasing (more disagreement never predicts less error)."""
    spread, error = np.ravel(spread), np.ravel(error)
    edges = np.quantile(spread, np.linspace(0.0, 1.0, bins + 1))
    which = np.clip(np.searchsorted(edges, spread, side="right") - 1, 0, bins - 1)
    used = [k for k in range(bins) if np.any(which == k)]
    centres = [float(spread[which == k].mean()) for k in used]
    means = np.maximum.accumulate([float(error[which == k].mean()) for k in used])
    return {"spread": centres, "error": [float(v) for v in means]}


def expected_error(spread: np.ndarray, curve: dict[str, list[float]]) -> np.ndarray:
    """Spread [B, H] -> expected one-step error [B, H]: the curve interpolated, and beyond its
    last point the last error in proportion to the spread (away from the data the error grows
    with the disagreement; a flat extrapolation would call any novelty harmless)."""
    xs, ys = np.asarray(curve["spread"]), np.asarray(curve["error"])
    inside = np.interp(spread, xs, ys)
    beyond = ys[-1] * spread / max(xs[-1], 1e-12)
    return np.where(spread > xs[-1], beyond, inside)


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
    """[B] 'coherent', or the main cause's CAUSE_REASON ('low coherence', 'reward
    inconsistent', 'ensemble disagreement', 'off support', 'frozen state'), or 'non-finite values
    in obs'; prefixed 'truncated: ' by :func:`truncate`."""
    metrics: dict[str, np.ndarray]
    """Raw per-step metrics [B, H] that were active and available (l2, l1, kl, ensemble,
    dispersion, and the model terms)."""
    tries: np.ndarray
    """[B] int refine tries spent on each trajectory (0 from plain judge)."""
    causes: np.ndarray | None = None
    """[B, H] int8 cause of each incoherent step: 0 coherent, k = 1 + index in CAUSES."""
    cause: list[str] | None = None
    """[B] the trajectory's main cause (CAUSES) among its incoherent steps ('' if none)."""
    truncated: np.ndarray | None = None
    """[B] bool: approved by truncation to its coherent prefix (see :func:`truncate`)."""
    trajectories: Trajectories | None = None
    """The final trajectories (re-imagined rows replaced, truncated rows shortened)."""

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
    terms = model_terms(clean, normalizer, config)
    ratios = cause_ratios(metrics, terms, normalizer, config)  # cause -> [B, H]
    drift = np.max(np.stack(list(ratios.values())), axis=0)  # [B, H]
    coherence = 1.0 / (1.0 + drift)
    frozen = (
        frozen_steps(clean.obs, normalizer)
        if config.stall_check
        else np.zeros(drift.shape, dtype=bool)
    )
    off = normalizer.off_support(clean.obs, config)  # [B, H]
    coherence = np.where(frozen | off, 0.0, coherence)
    coherence[bad] = 0.0
    lengths = trajs.lengths()  # [B]
    valid = np.arange(coherence.shape[1]) < lengths[:, None]  # [B, H]
    coherent = (coherence >= config.coherence_threshold) & valid
    n_coherent = np.sum(coherent, axis=1)
    verdicts = verdicts_from_counts(n_coherent, lengths, config)
    verdicts[bad] = Verdict.REJECT
    causes = step_causes(ratios, frozen, off, ~coherent & valid)
    cause = [_main_cause(row) for row in causes]
    reasons = [
        _reason(v, fields, c) for v, fields, c in zip(verdicts, nonfinite, cause, strict=True)
    ]
    return GateResult(
        verdicts=verdicts,
        h7=n_coherent / lengths,
        n_coherent=n_coherent,
        coherence=coherence,
        drift=drift,
        reasons=reasons,
        metrics={**metrics, **terms},
        tries=np.zeros(len(verdicts), dtype=np.int64),
        causes=causes,
        cause=cause,
        truncated=np.zeros(len(verdicts), dtype=bool),
    )


def step_causes(
    ratios: dict[str, np.ndarray], frozen: np.ndarray, off: np.ndarray, incoherent: np.ndarray
) -> np.ndarray:
    """[B, H] int8 cause codes (1 + index in CAUSES; 0 where coherent): stall if frozen, else
    support if off support, else the ratio cause (drift, reward, disagreement) that is largest."""
    names = list(ratios)
    largest = np.argmax(np.stack([ratios[n] for n in names]), axis=0)  # [B, H]
    codes = np.array([CAUSES.index(n) + 1 for n in names], dtype=np.int8)[largest]
    codes = np.where(off, CAUSES.index("support") + 1, codes)
    codes = np.where(frozen, CAUSES.index("stall") + 1, codes)
    return np.where(incoherent, codes, 0).astype(np.int8)


def _main_cause(step_codes: np.ndarray) -> str:
    """The most frequent cause among a row's incoherent steps ('' if it has none)."""
    counts = np.bincount(step_codes, minlength=len(CAUSES) + 1)[1:]
    return CAUSES[int(np.argmax(counts))] if counts.any() else ""


def _reason(verdict: int, nonfinite: list[str], cause: str) -> str:
    if nonfinite:
        return "non-finite values in " + ", ".join(nonfinite)
    if verdict == Verdict.APPROVE:
        return REASON_COHERENT
    return CAUSE_REASON.get(cause, REASON_LOW_COHERENCE)


def truncate(
    result: GateResult, trajs: Trajectories, config: GateConfig
) -> tuple[GateResult, Trajectories]:
    """REFINE by truncation (module docstring, section 9): every finite trajectory that is not
    approved and whose coherent prefix has >= ``min_prefix`` steps is approved with ``length``
    set to that prefix. Returns a new result (``truncated`` marks those rows) and trajectories."""
    incoherent = result.coherence < config.coherence_threshold  # [B, H]
    horizon = incoherent.shape[1]
    prefix = np.where(incoherent.any(axis=1), np.argmax(incoherent, axis=1), horizon)
    prefix = np.minimum(prefix, trajs.lengths())
    finite = np.array([not r.startswith("non-finite") for r in result.reasons])
    cut = (result.verdicts != Verdict.APPROVE) & finite & (prefix >= config.min_prefix)
    out = dataclasses.replace(
        result,
        verdicts=np.where(cut, Verdict.APPROVE, result.verdicts).astype(np.int8),
        reasons=[
            TRUNCATED_PREFIX + r if c else r for r, c in zip(result.reasons, cut, strict=True)
        ],
        truncated=cut,
    )
    if not cut.any():
        return out, trajs
    return out, dataclasses.replace(trajs, length=np.where(cut, prefix, trajs.lengths()))


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


def model_terms(
    trajs: Trajectories, normalizer: Normalizer, config: GateConfig
) -> dict[str, np.ndarray]:
    """The model terms [B, H] that are active (weight > 0), available and calibrated."""
    weights = config.weights()
    values = raw_model_terms(trajs, normalizer)
    return {m: v for m, v in values.items() if weights[m] > 0 and m in normalizer.quantiles}


def cause_ratios(
    metrics: dict[str, np.ndarray],
    terms: dict[str, np.ndarray],
    normalizer: Normalizer,
    config: GateConfig,
) -> dict[str, np.ndarray]:
    """Per cause, its largest weighted term ratio w·m/s [B, H] (section 7); the drift cause
    always holds the real-data drift D of section 3."""
    weights = config.weights()
    out = {"drift": combined_drift(metrics, normalizer, config)}
    for m, values in terms.items():
        q = normalizer.quantiles[m]
        if m == "error":  # never stricter than "worse than predicting no change"
            q = max(q, config.error_reference)
        if m == "value_gap":  # never stricter than a fraction of a real reward std
            q = max(q, config.value_reference * (normalizer.reward_std or 1.0))
        scale = drift_scale(q, config.coherence_threshold)
        ratio = weights[m] * values / scale if scale > 0 else np.where(values > 0, np.inf, 0.0)
        cause = TERM_CAUSE[m]
        out[cause] = np.maximum(out[cause], ratio) if cause in out else ratio
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
    step_obs = obs.shape[:1] + (obs.shape[1] - 1,) + obs.shape[2:]  # [B, H, N, D]
    for name, want in (
        ("obs_std", step_obs),
        ("ensemble_obs", step_obs),
        ("ensemble_reward", step_obs[:3]),
        ("reward_spread", step_obs[:3]),
        ("uncertainty", obs.shape[:1] + (obs.shape[1] - 1,)),
        ("td_residual", obs.shape[:1] + (obs.shape[1] - 1,)),
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
    "CAUSES",
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
    "td_residuals",
    "truncate",
    "verdicts_from_counts",
]
