"""The central coherence gate: one named, detached Ray actor around the kernel.

Every imagined batch passes through it before it is learned from::

    gate = get_or_create_gate(GateActorConfig(kernel=config), normalizer, state_dir="runs/gate")
    result = ray.get(gate.judge_and_refine.remote(ray.put(trajs), "overcooked", "planner"))
    keep = result.trajectories.select(result.approved_index())

Object refs: Ray resolves an ObjectRef passed as a *top-level* argument before the method runs,
so ``judge.remote(ref)`` receives the Trajectories (no copy through the caller). A ref nested
inside a list or dict is not resolved by Ray; the gate resolves such a ref itself when it is the
``trajs`` argument's value.

Refine (``GateActorConfig.refine_mode``): "truncate" (the default) keeps the coherent prefix of
every finite trajectory that is not approved when it has at least ``GateConfig.min_prefix``
steps (kernel.truncate): the kept steps are ones the gate trusts, and the learner gets a
shorter imagined episode. "reimagine": REFINE trajectories are re-imagined from the same start observation and action plan with
the sampling noise shrunk by ``noise_shrink`` per try (1.0 -> 0.75 -> 0.5625), at most
``max_refine_tries`` times; whatever is still not approved is rejected. The re-imaginer is either
a Python callable ``reimagine(trajs, noise_scale) -> Trajectories`` given at construction, or the
world model's Ray Serve deployment (``GateActorConfig.reimaginer_app`` / ``reimaginer_deployment``)
whose ``imagine`` method receives :func:`reimagine_request`'s dict and returns Trajectories (or
its ``to_dict()`` form).

Settings: the kernel's maths are a ``GateConfig`` (kernel.py); ``GateActorConfig``
(actor_config.py, re-exported here) holds it together with what only the actor needs: its name,
namespace and CPUs, the re-imaginer, the refine loop and the H7 histogram of its counters.

Fault tolerance: ``max_restarts=-1`` restarts the actor after a crash or ``ray.kill(...,
no_restart=False)``; its counters are written atomically to ``state_dir`` after every call and
reloaded in ``__init__``. With ``max_task_retries=-1`` calls in flight during a restart are
retried, so counting is at-least-once (a call killed between its write and its reply is counted
twice; verdicts are deterministic, so the retried reply is the same).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray

from moedream.coherence.actor_config import GateActorConfig
from moedream.coherence.kernel import (
    CAUSES,
    LEARNER_TERMS,
    QUANTILE_TERMS,
    GateResult,
    Normalizer,
    Verdict,
    judge,
    truncate,
)
from moedream.files import atomic_path, atomic_write_text
from moedream.platform.serve.request import imagine_request
from moedream.world_model.trajectory import BATCH_FIELDS, Trajectories

Reimaginer = Callable[[Trajectories, float], Trajectories]
STATE_VERSION = 1
COUNTERS = (
    "judged",
    "approve",
    "refine",
    "reject",
    "entered_refine",
    "refine_attempts",
    "refine_recovered",
    "truncated",
)
CAUSE_COUNTERS = ("causes", "truncated_causes")
"""Per cause (kernel.CAUSES): trajectories not approved at first judgement, and those of them
that truncation kept."""


def reimagine_request(
    trajs: Trajectories, noise_scale: float, seed: int, prediction: str = "sample"
) -> dict[str, Any]:
    """The request the gate sends to the Serve deployment's ``imagine`` method: replay the
    trajectories' encoded joint actions (open loop) from their first observations, over their
    horizon, with the sampling noise scaled by ``noise_scale`` and a different ``seed`` per try,
    predicted as the imaginer predicted them (``prediction``: "sample" or "mean").
    JSON-ready (nested lists). The reply must hold B trajectories of the same horizon H
    (Trajectories or its to_dict())."""
    return imagine_request(
        np.asarray(trajs.obs[:, 0]),
        np.asarray(trajs.action),
        horizon=int(trajs.horizon),
        noise_scale=float(noise_scale),
        seed=int(seed),
        prediction=prediction,
        as_lists=True,
    )


class CoherenceGate:
    """The gate actor (create it with :func:`get_or_create_gate`)."""

    def __init__(
        self,
        config: GateActorConfig,
        normalizer: dict[str, Any] | Normalizer,
        state_dir: str,
        reimagine: Reimaginer | None = None,
    ):
        self.config = config
        self.config.validate()
        self.normalizer = (
            normalizer if isinstance(normalizer, Normalizer) else Normalizer.from_dict(normalizer)
        )
        self.state_path = Path(state_dir) / f"{config.actor_name}.json"
        self.normalizer_path = Path(state_dir) / f"{config.actor_name}_normalizer.json"
        if self.normalizer_path.is_file():  # a refit (refit / set_normalizer) outlives restarts
            self.normalizer = Normalizer.load(self.normalizer_path)
        self.model_view_path = Path(state_dir) / f"{config.actor_name}_model_view.npz"
        self._model_view = load_model_view(self.model_view_path)  # the last calibration's
        self.state = load_state(self.state_path, config.h7_bins)
        self.state["starts"] += 1
        self._reimagine_fn = reimagine
        self._handle = None
        self._persist()

    # -- judging -------------------------------------------------------------------------------

    def judge(
        self,
        trajs: Trajectories | Any,
        env_name: str = "default",
        policy_id: str = "default",
        record: bool = True,
    ) -> GateResult:
        """Verdicts for a batch (Trajectories, its ObjectRef, or its to_dict()); no refine.
        ``record=False`` leaves the counters alone (e.g. to check the gate on REAL data)."""
        trajs = resolve_trajectories(trajs)
        result = judge(trajs, self.normalizer, self.config.kernel)
        if record:
            self._record(result, env_name, policy_id, entered_refine=0, attempts=0, recovered=0)
        return result

    # -- φ ---------------------------------------------------------------------------------------

    def refit(self, sequences: list[np.ndarray] | np.ndarray) -> dict[str, float]:
        """Refit φ on real observation sequences (episodes [T_i+1, N, D] or windows
        [B, T+1, N, D]), e.g. the agents' latest real episodes: φ fitted on a random policy's
        collection calls a trained team's real steps incoherent (they are larger and reach
        states random play never does). The model terms are measured in units of φ (σ_Δ, the
        mean real step), so they are recalibrated in the new φ's units on the model's view of
        held-out real windows that :meth:`calibrate_model_terms` last received (kept: σ_r,
        and every quantile when there is no such view); the learner-calibrated quantiles (kl,
        ensemble, value_gap) are kept and the support [min, max] is the union of the old and
        the new one. Persisted in the state dir, so a restarted actor keeps it."""
        new = Normalizer.fit(sequences, self.config.kernel)
        old = self.normalizer
        if (new.n_agents, new.obs_dim) != (old.n_agents, old.obs_dim):
            raise ValueError(
                f"refit sequences have {new.n_agents} agents x {new.obs_dim} features; this gate "
                f"judges {old.n_agents} x {old.obs_dim}: send observations of the same env"
            )
        # calibrated on the model's outputs or the learner's critic, not on these sequences
        for metric in ("kl", "ensemble", *QUANTILE_TERMS, *LEARNER_TERMS):
            if metric in old.quantiles:
                new.quantiles[metric] = old.quantiles[metric]
        new.reward_std, new.error_curve = old.reward_std, old.error_curve
        new.error_std = old.error_std  # the model's error, in raw units: not φ's
        # the support only widens: states real data visited before stay on support
        new.state_min = np.minimum(new.state_min, old.state_min)
        new.state_max = np.maximum(new.state_max, old.state_max)
        if self._model_view is not None:  # the model terms in the new φ's units
            new.calibrate_model_terms(*self._model_view, self.config.kernel)
        self.set_normalizer(new)
        return {"refit_steps": float(new.n_steps), "refit_l2_quantile": new.quantiles["l2"]}

    def calibrate_model_terms(
        self, view: Trajectories | Any, real_reward: np.ndarray
    ) -> dict[str, float]:
        """Recalibrate the model terms (kernel.Normalizer.calibrate_model_terms) on ``view``,
        the served model's teacher-forced view of held-out REAL windows
        (coherence.model_calibration.model_view), with their real rewards [B, H, N]: e.g.
        after every retrain, since a retrained model's disagreement and error have their own
        scale. Counted (gate/model_calibrations); the view is kept (and persisted) so that a
        refit of φ recalibrates the terms in its units. Returns each fitted quantile
        (``<term>_quantile``) and the count of calibrations so far (``model_calibrations``)."""
        view = resolve_trajectories(view)
        real_reward = np.asarray(real_reward, np.float32)
        norm = Normalizer.from_dict(self.normalizer.to_dict())
        fitted = norm.calibrate_model_terms(view, real_reward, self.config.kernel)
        save_model_view(self.model_view_path, view, real_reward)
        self._model_view = (view, real_reward)
        self.state["model_calibrations"] = int(self.state.get("model_calibrations", 0)) + 1
        self._store_normalizer(norm)  # not a refit of φ: the refit counter stays
        return {**{f"{m}_quantile": q for m, q in fitted.items()},
                "model_calibrations": float(self.state["model_calibrations"])}  # fmt: skip

    def calibrate_value_term(self, residuals: np.ndarray) -> dict[str, float]:
        """Calibrate the reflector's term on the team critic's TD residuals of real steps
        (kernel.Normalizer.calibrate_value_term), e.g. every iteration as the critic learns.
        Persisted like a refit."""
        norm = Normalizer.from_dict(self.normalizer.to_dict())
        q = norm.calibrate_value_term(residuals, self.config.kernel)
        self.state["value_calibrations"] = int(self.state.get("value_calibrations", 0)) + 1
        self._store_normalizer(norm)  # not a refit of φ: the refit counter stays
        return {"value_gap_quantile": q}

    def set_normalizer(self, normalizer: dict[str, Any] | Normalizer) -> None:
        """Replace φ (persisted, see :meth:`refit`)."""
        norm = (
            normalizer if isinstance(normalizer, Normalizer) else Normalizer.from_dict(normalizer)
        )
        self.state["refits"] = int(self.state.get("refits", 0)) + 1
        self._store_normalizer(norm)

    def _store_normalizer(self, norm: Normalizer) -> None:
        norm.save(self.normalizer_path)  # atomic: a crash leaves the old file or the new one
        self.normalizer = norm
        self._persist()

    def get_normalizer(self) -> dict[str, Any]:
        return self.normalizer.to_dict()

    def judge_and_refine(
        self,
        trajs: Trajectories | Any,
        env_name: str = "default",
        policy_id: str = "default",
        noise_scale: float | None = None,
        seed: int = 0,
        prediction: str = "sample",
    ) -> GateResult:
        """Judge, re-imagine REFINE trajectories up to max_refine_tries times, reject the rest.
        ``result.trajectories`` holds the final batch (re-imagined rows replaced).
        ``prediction``: how the deployment re-imagines them ("sample", or "mean" for
        trajectories imagined from the regressed mean; a ``reimagine`` callable ignores it)."""
        trajs = resolve_trajectories(trajs)
        first = judge(trajs, self.normalizer, self.config.kernel)
        if self.config.refine_mode == "truncate":
            result, kept = truncate(first, trajs, self.config.kernel)
            result.trajectories = kept
            self._record(result, env_name, policy_id, 0, 0, 0, first=first)
            return result
        base = self.config.initial_noise_scale if noise_scale is None else float(noise_scale)
        entered = np.flatnonzero(first.verdicts == Verdict.REFINE)
        if entered.size and self._reimagine_fn is None and not self.config.reimaginer_app:
            raise ValueError(
                "judge_and_refine needs a re-imaginer: pass reimagine= to get_or_create_gate or "
                "set GateActorConfig.reimaginer_app and reimaginer_deployment (or call judge)"
            )
        result, attempts = self._refine(trajs, first, entered, (base, seed, prediction))
        recovered = int(np.sum(result.verdicts[entered] == Verdict.APPROVE))
        self._record(result, env_name, policy_id, len(entered), attempts, recovered, first=first)
        return result

    def _refine(
        self,
        trajs: Trajectories,
        result: GateResult,
        pending: np.ndarray,
        how: tuple[float, int, str],
    ) -> tuple[GateResult, int]:
        """``how``: (base noise scale, seed, prediction) of the re-imaginations."""
        base, seed, prediction = how
        current, final = trajs, _copy_result(result)
        attempts = 0
        for k in range(1, self.config.max_refine_tries + 1):
            if pending.size == 0:
                break
            subset = current.select(pending)
            new = self._reimagine(subset, base * self.config.noise_shrink**k, seed + k, prediction)
            _check_reimagined(subset, new)
            attempts += int(pending.size)
            again = judge(new, self.normalizer, self.config.kernel)
            again.tries[:] = k
            _assign_rows(final, pending, again)
            current = _replace_rows(current, pending, new)
            pending = pending[again.verdicts != Verdict.APPROVE]
        for i in pending:  # still not approved after the last try
            final.reasons[i] = f"refine failed: {final.reasons[i]}"
            final.verdicts[i] = Verdict.REJECT
        final.trajectories = current
        return final, attempts

    def _reimagine(
        self, trajs: Trajectories, noise_scale: float, seed: int, prediction: str = "sample"
    ) -> Trajectories:
        if self._reimagine_fn is not None:
            return self._reimagine_fn(trajs, noise_scale)
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(
                self.config.reimaginer_deployment, app_name=self.config.reimaginer_app
            )
        request = reimagine_request(trajs, noise_scale, seed, prediction)
        reply = self._handle.imagine.remote(request).result()
        return resolve_trajectories(reply)

    # -- counters --------------------------------------------------------------------------------

    def _record(
        self,
        result: GateResult,
        env_name: str,
        policy_id: str,
        entered_refine: int,
        attempts: int,
        recovered: int,
        first: GateResult | None = None,
    ) -> None:
        """Count ``result``'s verdicts; the causes are those of ``first`` (the judgement before
        any refine), so a truncated trajectory still counts what was wrong with it."""
        c = self._counters(env_name, policy_id)
        first = first or result
        truncated = (
            result.truncated if result.truncated is not None else np.zeros(len(result), bool)
        )
        c["truncated"] += int(np.sum(truncated))
        for i in np.flatnonzero(first.verdicts != Verdict.APPROVE):
            cause = first.cause[i] if first.cause is not None else ""
            if cause:
                c["causes"][cause] = c["causes"].get(cause, 0) + 1
                if truncated[i]:
                    c["truncated_causes"][cause] = c["truncated_causes"].get(cause, 0) + 1
        c["judged"] += len(result)
        for verdict in Verdict:
            c[verdict.name.lower()] += int(np.sum(result.verdicts == verdict))
        c["entered_refine"] += entered_refine
        c["refine_attempts"] += attempts
        c["refine_recovered"] += recovered
        c["h7_sum"] += float(np.sum(result.h7))
        horizon = result.coherence.shape[1]
        bins = (np.asarray(result.n_coherent) * self.config.h7_bins) // horizon  # exact
        for b in np.minimum(bins, self.config.h7_bins - 1):
            c["h7_hist"][int(b)] += 1
        for reason in result.reasons:
            c["reasons"][reason] = c["reasons"].get(reason, 0) + 1
        self.state["calls"] += 1
        self._persist()

    def _counters(self, env_name: str, policy_id: str) -> dict[str, Any]:
        per_env = self.state["counters"].setdefault(str(env_name), {})
        if str(policy_id) not in per_env:
            per_env[str(policy_id)] = new_counters(self.config.h7_bins)
        counters = per_env[str(policy_id)]
        for key, value in new_counters(self.config.h7_bins).items():  # state of an older gate
            counters.setdefault(key, value)
        return counters

    def _persist(self) -> None:
        # Process-crash safe (temp file + rename); no fsync per call (see atomic_write_text).
        atomic_write_text(self.state_path, json.dumps(self.state), durable=False)

    def stats(self) -> dict[str, float]:
        """Flat TensorBoard-ready scalars, e.g. ``gate/overcooked/default/approve_rate``."""
        return stats_from_state(self.state)

    def raw_state(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.state))

    def ping(self) -> int:
        return int(self.state["starts"])


# ---------------------------------------------------------------------------------------------
# the actor's life


_ACTOR_OPTIONS = {"max_restarts": -1, "max_task_retries": -1, "lifetime": "detached"}
RemoteCoherenceGate = ray.remote(CoherenceGate)


def get_or_create_gate(
    config: GateActorConfig,
    normalizer: Normalizer,
    state_dir: str | Path,
    reimagine: Reimaginer | None = None,
) -> ray.actor.ActorHandle:
    """The gate actor named ``config.actor_name`` in ``config.namespace``, created if missing
    (an existing actor keeps the config, normalizer and re-imaginer it was created with)."""
    config.validate()
    options = dict(
        _ACTOR_OPTIONS,
        name=config.actor_name,
        namespace=config.namespace,
        get_if_exists=True,
        num_cpus=config.num_cpus,
    )
    return RemoteCoherenceGate.options(**options).remote(
        config, normalizer.to_dict(), str(state_dir), reimagine
    )


def get_gate(config: GateActorConfig) -> ray.actor.ActorHandle:
    """The running gate actor (raises ValueError if it was never created)."""
    return ray.get_actor(config.actor_name, namespace=config.namespace)


def resolve_trajectories(trajs: Any) -> Trajectories:
    """Trajectories from Trajectories, an ObjectRef of one, or a to_dict() mapping."""
    if isinstance(trajs, ray.ObjectRef):
        trajs = ray.get(trajs)
    if isinstance(trajs, dict):
        trajs = Trajectories.from_dict(trajs)
    if not isinstance(trajs, Trajectories):
        raise TypeError(
            f"the gate judges Trajectories (or an ObjectRef / to_dict() of one), got "
            f"{type(trajs).__name__}"
        )
    return trajs


# ---------------------------------------------------------------------------------------------
# state and stats (plain data, JSON on disk)


def new_counters(h7_bins: int) -> dict[str, Any]:
    out: dict[str, Any] = {name: 0 for name in COUNTERS}
    out.update(h7_sum=0.0, h7_hist=[0] * h7_bins, reasons={})
    out.update({name: {} for name in CAUSE_COUNTERS})
    return out


def load_state(path: Path, h7_bins: int) -> dict[str, Any]:
    """The persisted counters, or fresh ones when ``path`` does not exist yet."""
    if not path.is_file():
        return {
            "version": STATE_VERSION,
            "h7_bins": h7_bins,
            "starts": 0,
            "calls": 0,
            "counters": {},
        }
    state = json.loads(path.read_text())
    if state.get("version") != STATE_VERSION or state.get("h7_bins") != h7_bins:
        raise ValueError(
            f"gate state {str(path)!r} has version {state.get('version')} and "
            f"{state.get('h7_bins')} H7 bins; this gate expects {STATE_VERSION} and {h7_bins}. "
            "Use another state_dir or delete the file to start the counters afresh"
        )
    return state


def stats_from_state(state: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {
        "gate/starts": float(state["starts"]),
        "gate/calls": float(state["calls"]),
        "gate/refits": float(state.get("refits", 0)),
        "gate/value_calibrations": float(state.get("value_calibrations", 0)),
        "gate/model_calibrations": float(state.get("model_calibrations", 0)),
    }
    bins = int(state["h7_bins"])
    for env_name, per_env in state["counters"].items():
        for policy_id, c in per_env.items():
            key = f"gate/{env_name}/{policy_id}"
            judged = max(c["judged"], 1)
            for name in COUNTERS:
                out[f"{key}/{name}"] = float(c.get(name, 0))
            out[f"{key}/truncated_rate"] = c.get("truncated", 0) / judged
            for counter in CAUSE_COUNTERS:  # e.g. gate/overcooked/team/causes/reward
                counts = {cause: 0 for cause in CAUSES} | c.get(counter, {})  # every cause
                for cause, count in counts.items():
                    out[f"{key}/{counter}/{cause}"] = float(count)
                    out[f"{key}/{counter}/{cause}_rate"] = count / judged
            for verdict in ("approve", "refine", "reject"):
                out[f"{key}/{verdict}_rate"] = c[verdict] / judged
            out[f"{key}/mean_h7"] = c["h7_sum"] / judged
            for b, count in enumerate(c["h7_hist"]):
                out[f"{key}/h7_hist/{b / bins:.2f}-{(b + 1) / bins:.2f}"] = float(count)
            for reason, count in c["reasons"].items():
                out[f"{key}/reason/{_slug(reason)}"] = float(count)
    return out


def write_stats_to_tensorboard(stats: dict[str, float], writer: Any, step: int) -> int:
    """Write every scalar of :meth:`CoherenceGate.stats` and one H7 histogram per (env, policy)
    to a torch SummaryWriter. Returns the number of scalars written."""
    hists: dict[str, list[tuple[float, float, float]]] = {}
    for key, value in sorted(stats.items()):
        writer.add_scalar(key, value, step)
        match = re.fullmatch(r"(.*)/h7_hist/([0-9.]+)-([0-9.]+)", key)
        if match:
            hists.setdefault(match[1], []).append((float(match[2]), float(match[3]), value))
    for prefix, buckets in hists.items():
        _write_histogram(writer, f"{prefix}/h7", sorted(buckets), step)
    return len(stats)


def _write_histogram(
    writer: Any, tag: str, buckets: list[tuple[float, float, float]], step: int
) -> None:
    counts = np.array([b[2] for b in buckets])
    if counts.sum() == 0:
        return
    centres = np.array([(b[0] + b[1]) / 2 for b in buckets])
    writer.add_histogram_raw(
        tag,
        min=float(buckets[int(np.flatnonzero(counts)[0])][0]),
        max=float(buckets[int(np.flatnonzero(counts)[-1])][1]),
        num=int(counts.sum()),
        sum=float(np.sum(counts * centres)),
        sum_squares=float(np.sum(counts * centres**2)),
        bucket_limits=[b[1] for b in buckets],
        bucket_counts=counts.tolist(),
        global_step=step,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# The fields of a model view the model terms read (kernel.raw_model_terms).
MODEL_VIEW_FIELDS = ("obs", "action", "reward", "terminated", "obs_std", "ensemble_obs",
                     "ensemble_reward", "reward_spread")  # fmt: skip


def save_model_view(path: Path, view: Trajectories, real_reward: np.ndarray) -> None:
    """The last calibration's model view and real rewards, as .npz (atomic)."""
    arrays = {f: np.asarray(getattr(view, f)) for f in MODEL_VIEW_FIELDS}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, real_reward=real_reward, **arrays)


def load_model_view(path: Path) -> tuple[Trajectories, np.ndarray] | None:
    """(view, real rewards) saved by :func:`save_model_view`, or None if there is none."""
    if not path.is_file():
        return None
    with np.load(path) as data:
        view = Trajectories(**{f: data[f] for f in MODEL_VIEW_FIELDS})
        return view, data["real_reward"]


# ---------------------------------------------------------------------------------------------
# row surgery for the refine loop


def _copy_result(result: GateResult) -> GateResult:
    return dataclasses.replace(
        result,
        verdicts=result.verdicts.copy(),
        h7=result.h7.copy(),
        n_coherent=result.n_coherent.copy(),
        coherence=result.coherence.copy(),
        drift=result.drift.copy(),
        reasons=list(result.reasons),
        metrics={k: v.copy() for k, v in result.metrics.items()},
        tries=result.tries.copy(),
        causes=None if result.causes is None else result.causes.copy(),
        cause=None if result.cause is None else list(result.cause),
        truncated=None if result.truncated is None else result.truncated.copy(),
    )


def _assign_rows(final: GateResult, rows: np.ndarray, new: GateResult) -> None:
    for name in ("verdicts", "h7", "n_coherent", "coherence", "drift", "tries", "causes"):
        if getattr(final, name) is not None and getattr(new, name) is not None:
            getattr(final, name)[rows] = getattr(new, name)
    for name in final.metrics.keys() & new.metrics.keys():
        final.metrics[name][rows] = new.metrics[name]
    for j, i in enumerate(rows):
        final.reasons[i] = new.reasons[j]
        if final.cause is not None and new.cause is not None:
            final.cause[i] = new.cause[j]


def _replace_rows(base: Trajectories, rows: np.ndarray, new: Trajectories) -> Trajectories:
    """``base`` with ``rows`` taken from ``new``; optional fields absent from either stay as
    ``base`` has them."""
    fields = {}
    for f in BATCH_FIELDS:
        old, repl = getattr(base, f), getattr(new, f)
        if old is None or repl is None:
            fields[f] = old
            continue
        merged = np.array(old, dtype=np.result_type(old, repl), copy=True)
        merged[rows] = repl
        fields[f] = merged
    return Trajectories(**fields, expert_load=base.expert_load)


def _check_reimagined(asked: Trajectories, got: Trajectories) -> None:
    if got.obs.shape != asked.obs.shape:
        raise ValueError(
            f"the re-imaginer returned obs of shape {got.obs.shape} for a request of "
            f"{asked.obs.shape}; it must return one trajectory of the same horizon per request"
        )


__all__ = [
    "CoherenceGate",
    "GateActorConfig",
    "RemoteCoherenceGate",
    "get_gate",
    "get_or_create_gate",
    "reimagine_request",
    "resolve_trajectories",
    "stats_from_state",
    "write_stats_to_tensorboard",
]
