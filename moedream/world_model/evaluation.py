"""How well a world model predicts one real step: held-out windows and their scores.

Plain numpy: the caller runs the model (in-process or through Serve) on ``eval_windows``'
context and scores its predictions against the real next step with ``prediction_scores``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moedream.envs.spec import EnvSpec


def eval_windows(
    episodes: list[Any], spec: EnvSpec, window: int, rows: int, rng: np.random.Generator
) -> dict[str, np.ndarray] | None:
    """Up to ``rows`` random windows of ``window`` steps (shorter where the episodes are
    shorter, at least 1) from ``episodes`` (moedream.data Episodes): the last step of each is
    the one to predict, the earlier ones its context. None if no episode has a step."""
    lengths = np.array([ep.length for ep in episodes], dtype=np.int64)
    if not lengths.size or lengths.max() < 1:
        return None
    window = int(max(1, min(window, lengths.max())))
    usable = [ep for ep in episodes if ep.length >= window]
    starts = [(k, s) for k, ep in enumerate(usable) for s in range(ep.length - window + 1)]
    picks = rng.choice(len(starts), size=min(rows, len(starts)), replace=False)
    obs, action, reward = [], [], []
    for i in picks:
        k, s = starts[int(i)]
        ep = usable[k]
        obs.append(ep.obs[s : s + window + 1])
        action.append(spec.encode_actions(ep.action[s : s + window]))
        reward.append(ep.reward[s : s + window])
    return {
        "obs": np.asarray(obs, dtype=np.float32),  # [M, T+1, N, D]
        "action": np.asarray(action, dtype=np.float32),  # [M, T, N, A]
        "reward": np.asarray(reward, dtype=np.float32),  # [M, T, N]
    }


def prediction_scores(
    *,
    pred_obs: np.ndarray,
    pred_reward: np.ndarray,
    obs: np.ndarray,
    next_obs: np.ndarray,
    reward: np.ndarray,
) -> dict[str, float]:
    """One-step prediction quality against real outcomes (rows M; obs [M, N, D], rewards [M]).

    wm_eval_reward_mae vs wm_eval_reward_mae_const (predicting the batch's mean reward: a model
    that does not beat it has learnt nothing about reward), wm_eval_reward_corr (Pearson; NaN
    when either side is constant), wm_eval_obs_rel_err = RMS(pred - next) / RMS(next - obs)
    (< 1: better than predicting no change), wm_eval_rows.
    """
    pred_reward = np.asarray(pred_reward, dtype=np.float64).reshape(-1)
    reward = np.asarray(reward, dtype=np.float64).reshape(-1)
    mae = float(np.mean(np.abs(pred_reward - reward)))
    const = float(np.mean(np.abs(reward - reward.mean())))
    corr = (
        float(np.corrcoef(pred_reward, reward)[0, 1])
        if pred_reward.std() > 1e-9 and reward.std() > 1e-9
        else float("nan")
    )
    change = float(np.sqrt(np.mean((np.asarray(next_obs) - np.asarray(obs)) ** 2)))
    err = float(np.sqrt(np.mean((np.asarray(pred_obs) - np.asarray(next_obs)) ** 2)))
    return {
        "wm_eval_reward_mae": mae,
        "wm_eval_reward_mae_const": const,
        "wm_eval_reward_corr": corr,
        "wm_eval_obs_rel_err": err / change if change > 0 else float("nan"),
        "wm_eval_rows": float(reward.size),
    }
