"""Team metrics: what one training iteration reports, and evaluation against a random team."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from ray.rllib.utils.metrics import ALL_MODULES

from moedream.envs import make_env
from moedream.envs.overcooked import SOUP_REWARD
from moedream.envs.spec import EnvSpec
from moedream.policies.imagination import TeamPolicy
from moedream.policies.names import IMAGINED_STEPS_KEY, REAL_STEPS_KEY


def iteration_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat, namespaced metrics of one ``Algorithm.train()`` result (NaN where absent)."""
    md = result.get("moedream", {})
    runners = result.get("env_runners", {})
    learners = result.get("learners", {})
    out = {
        "charts/real_env_steps": md.get("real_env_steps_lifetime", np.nan),
        "charts/imagined_env_steps": md.get("imagined_env_steps_lifetime", 0.0),
        "charts/real_env_steps_iter": md.get("real_env_steps", np.nan),
        "charts/imagined_env_steps_iter": md.get("imagined_env_steps", 0.0),
        # real env steps a stand-in provider (EnvReplayImaginer) took itself; 0 for world models
        "charts/provider_env_steps": md.get("provider_env_steps_lifetime", 0.0),
        "charts/team_return": runners.get("moedream_team_return", np.nan),
        "charts/soups_per_episode": runners.get("moedream_soups", np.nan),
        "gate/approve_rate": md.get("gate_approve_rate", np.nan),
        "gate/refine_rate": md.get("gate_refine_rate", np.nan),
        "gate/reject_rate": md.get("gate_reject_rate", np.nan),
        "imagination/rounds": md.get("imagination_rounds", 0.0),
        "imagination/imagined_reward_per_step": md.get("imagined_reward_per_step", np.nan),
        "imagination/real_reward_per_step": md.get("real_reward_per_step", np.nan),
        "imagination/penalty_per_step": md.get("imagined_penalty_per_step", 0.0),
        "learner/imagined_agent_steps": learners.get(IMAGINED_STEPS_KEY, 0.0),
        "learner/real_agent_steps": learners.get(REAL_STEPS_KEY, np.nan),
    }
    for key, value in md.items():  # the imagination provider's own figures
        if key.startswith("provider_") and isinstance(value, (int, float)):
            out[f"provider/{key[len('provider_') :]}"] = value
        if key.startswith("time_") and isinstance(value, (int, float)):  # MBMAPPO's stages
            out[f"time/{key[len('time_') :]}"] = value
    for module_id, stats in learners.items():
        if isinstance(stats, dict) and "total_loss" in stats:
            for key in ("total_loss", "policy_loss", "vf_loss", "entropy", "mean_kl_loss"):
                if key in stats:
                    out[f"losses/{module_id}/{key}"] = stats[key]
            if "curr_kl_coeff" in stats:  # PPO's adaptive KL penalty weight after the update
                out[f"losses/{module_id}/kl_coeff"] = stats["curr_kl_coeff"]
    team = learners.get(ALL_MODULES, {})  # TeamPPOTorchLearner: the largest pre-clip norm
    if isinstance(team, dict) and "gradients_team_global_norm" in team:
        out["losses/grad_global_norm"] = team["gradients_team_global_norm"]
    return {k: float(v) for k, v in out.items()}


@dataclasses.dataclass
class TeamEvaluation:
    team_return: float
    soups_per_episode: float  # NaN for envs without soups
    episodes: int
    team_return_std: float = 0.0  # across episodes

    @property
    def standard_error(self) -> float:
        return self.team_return_std / max(self.episodes, 1) ** 0.5

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def evaluate_team(
    policy: TeamPolicy | None,
    env_name: str,
    env_options: dict[str, Any],
    spec: EnvSpec,
    *,
    episodes: int = 3,
    seed: int = 0,
) -> TeamEvaluation:
    """Mean team return (shared reward: one agent's) and soups over full episodes.

    ``policy=None`` is the uniformly random team (the baseline).
    """
    env = make_env(env_name, **env_options)
    returns, soups = [], []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        total, sparse, done = 0.0, 0.0, False
        while not done:
            joint = spec.stack_obs(obs)[None]  # [1, N, D]
            if policy is None:
                actions = {a: env.action_space(a).sample() for a in spec.agent_ids}
            else:
                acts = policy.act(joint)[0]
                actions = spec.unstack_actions(acts)
                if spec.action_kind == "continuous":
                    actions = {a: np.clip(v, -1.0, 1.0) for a, v in actions.items()}
            obs, rew, term, trunc, info = env.step(actions)
            first = spec.agent_ids[0]
            total += float(rew[first])
            sparse += float(info.get(first, {}).get("sparse_reward", np.nan))
            done = any(bool(term[a]) or bool(trunc[a]) for a in spec.agent_ids)
        returns.append(total)
        soups.append(sparse / SOUP_REWARD)
    env.close()
    return TeamEvaluation(
        float(np.mean(returns)),
        float(np.mean(soups)),
        episodes,
        float(np.std(returns, ddof=1)) if episodes > 1 else 0.0,
    )
