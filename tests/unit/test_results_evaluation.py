"""evaluate_team, the results table's evaluation: fixed-seed episodes in lockstep, repeatable,
and the torch generator of the caller left as it was."""

from __future__ import annotations

import numpy as np
import torch

from moedream.envs import env_spec
from moedream.policies.metrics import evaluate_team

OPTIONS = {"layout": "cramped_room", "horizon": 30, "shaped_reward_weight": 1.0}


class SamplingTeam:
    """Samples uniform actions from torch's global generator and records each call's batch."""

    def __init__(self):
        self.batches: list[tuple[int, ...]] = []

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.batches.append(obs.shape)
        return torch.randint(0, 6, obs.shape[:2]).numpy()


def test_episodes_run_in_lockstep_and_repeat_exactly_with_the_seed():
    spec = env_spec("overcooked", **OPTIONS)
    team = SamplingTeam()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = evaluate_team(team, "overcooked", OPTIONS, spec, episodes=3, seed=1_000_000)
    assert torch.rand(1) == before  # the caller's generator is restored
    assert team.batches == [(3, spec.n_agents, spec.obs_dim)] * 30  # one call per step for all
    again = evaluate_team(SamplingTeam(), "overcooked", OPTIONS, spec, episodes=3, seed=1_000_000)
    assert again == first and first.episodes == 3
    assert first.soups_per_episode == 0.0  # 30 random steps cook no soup
    random_team = evaluate_team(None, "overcooked", OPTIONS, spec, episodes=2, seed=5)
    assert random_team == evaluate_team(None, "overcooked", OPTIONS, spec, episodes=2, seed=5)


class StayingTeam:
    """Takes action 4 (Overcooked's STAY) on every other step, action 5 otherwise."""

    def __init__(self):
        self.calls = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.full(obs.shape[:2], 4 if self.calls % 2 else 5)


def test_action_rates_count_every_agent_step():
    spec = env_spec("overcooked", **OPTIONS)
    result = evaluate_team(StayingTeam(), "overcooked", OPTIONS, spec, episodes=2, seed=3)
    assert result.action_rates == (0.0, 0.0, 0.0, 0.0, 0.5, 0.5)
    uniform = evaluate_team(None, "overcooked", OPTIONS, spec, episodes=4, seed=3)
    assert len(uniform.action_rates) == 6 and abs(sum(uniform.action_rates) - 1.0) < 1e-9
    assert min(uniform.action_rates) > 0.08  # 240 uniform agent steps: every action taken
