"""Team metrics: what one training iteration reports, and evaluation against a random team."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
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
    action_rates: tuple[float, ...] = ()
    """Discrete envs: the fraction of all agents' evaluation steps spent on each action index
    (what a team learnt to do, e.g. from a model that rewards one action); () if continuous."""

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

    ``policy=None`` is the uniformly random team (the baseline). Episode k resets its env with
    seed ``seed + k`` and the team's action sampling is seeded with ``seed`` (torch's global
    generator is restored afterwards), so a given policy meets the same episodes every call.
    The episodes run in lockstep: one batched policy call per step for all unfinished ones.
    """
    envs = [make_env(env_name, **env_options) for _ in range(episodes)]
    obs = [env.reset(seed=seed + k)[0] for k, env in enumerate(envs)]
    returns, sparse = np.zeros(episodes), np.zeros(episodes)
    counts = np.zeros(spec.action_dim if spec.action_kind == "discrete" else 0)
    running = list(range(episodes))
    first = spec.agent_ids[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while running:
            actions = _team_actions(
                policy, [obs[k] for k in running], [envs[k] for k in running], spec
            )
            still = []
            for k, action in zip(running, actions):
                if counts.size:
                    np.add.at(counts, [int(action[a]) for a in spec.agent_ids], 1)
                obs[k], rew, term, trunc, info = envs[k].step(action)
                returns[k] += float(rew[first])
                sparse[k] += float(info.get(first, {}).get("sparse_reward", np.nan))
                if not any(bool(term[a]) or bool(trunc[a]) for a in spec.agent_ids):
                    still.append(k)
            running = still
    for env in envs:
        env.close()
    return TeamEvaluation(
        float(np.mean(returns)),
        float(np.mean(sparse / SOUP_REWARD)),
        episodes,
        float(np.std(returns, ddof=1)) if episodes > 1 else 0.0,
        tuple(float(c) for c in counts / max(counts.sum(), 1.0)),
    )


def _team_actions(
    policy: TeamPolicy | None, obs: list[dict[str, Any]], envs: list[Any], spec: EnvSpec
) -> list[dict[str, Any]]:
    """Each running episode's joint action: one policy call over all of them ([M, N, D])."""
    if policy is None:
        return [{a: env.action_space(a).sample() for a in spec.agent_ids} for env in envs]
    joint = np.stack([spec.stack_obs(o) for o in obs])  # [M, N, D]
    actions = [spec.unstack_actions(row) for row in policy.act(joint)]
    if spec.action_kind == "continuous":
        actions = [{a: np.clip(v, -1.0, 1.0) for a, v in act.items()} for act in actions]
    return actions
