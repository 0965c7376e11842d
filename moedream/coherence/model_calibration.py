"""Calibrate the gate's model terms: the served world model's view of held-out real windows.

Torch, never ray. :func:`model_view` runs the model teacher-forced on real windows (real obs and
actions as context, every step predicted once) and packs its predictions the way imagined
trajectories carry them, with the REAL next observations as ``obs``: the kernel's terms then
measure the model's one-step error and disagreement on data it did not train on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moedream.coherence.kernel import GateConfig, Normalizer
from moedream.world_model.trajectory import Trajectories


def model_view(model: Any, windows: dict[str, np.ndarray], batch: int = 256) -> Trajectories:
    """Real windows (obs [B, T+1, N, D], action [B, T, N, A], reward, terminated [B, T, N])
    -> Trajectories with the real obs and the model's teacher-forced reward, termination and
    ensemble outputs (``model``: a WorldModel; T <= its backbone.max_context)."""
    parts = []
    for start in range(0, len(windows["obs"]), batch):
        rows = {k: np.asarray(v[start : start + batch]) for k, v in windows.items()}
        pred = model.predict_windows(rows, noise_scale=0.0)
        parts.append({k: v.cpu().numpy() for k, v in pred.items()})
    pred = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Trajectories(
        obs=np.asarray(windows["obs"], np.float32),
        action=np.asarray(windows["action"], np.float32),
        reward=pred["reward"],
        terminated=pred["terminated"],
        uncertainty=pred["uncertainty"],
        obs_std=pred["obs_std"],
        ensemble_obs=pred["ensemble_obs"],
        ensemble_reward=pred["ensemble_reward"],
        reward_spread=pred["reward_spread"],
    )


def context_steps(model: Any, horizon: int) -> int:
    """Steps of the held-out windows ``model`` (a WorldModel) can view: the horizon, at most its
    backbone's context."""
    return min(int(horizon), int(model.config.backbone.max_context))


def within_context(model: Any, windows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Real windows cut to their first :func:`context_steps` steps (obs keeps one more)."""
    steps = context_steps(model, windows["action"].shape[1])
    return {k: v[:, : steps + 1] if k == "obs" else v[:, :steps] for k, v in windows.items()}


def calibrate_model_terms(
    normalizer: Normalizer, model: Any, held_out: dict[str, np.ndarray], config: GateConfig
) -> dict[str, float]:
    """Fit the model terms' quantiles and error curve on held-out real windows (in place)."""
    view = model_view(model, held_out)
    return normalizer.calibrate_model_terms(view, held_out["reward"], config)
