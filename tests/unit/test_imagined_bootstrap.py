"""Imagined episodes cut at their horizon reach PPO's GAE truncated, so it bootstraps there."""

from __future__ import annotations

import numpy as np
import pytest

from moedream.world_model.trajectory import Trajectories
from tests.gae import last_value_targets

GAMMA, LAMBDA = 0.9, 0.95
LENGTHS = (5, 2, 3)  # rows 0 and 1 are cut (at H, at the gate's kept prefix); row 2 ...
TERMINAL_ROW, TERMINAL_STEP = 2, 1  # ... has a predicted termination at its step 1


@pytest.fixture(scope="module")
def imagined():
    from moedream.envs import env_spec
    from moedream.policies.rl_modules import team_module_spec

    spec = env_spec("overcooked")
    module = team_module_spec(
        spec, embedding_dim=16, perceiver_hidden=[16], planner_hidden=[16], reflector_hidden=[16]
    ).build()
    b, h = len(LENGTHS), max(LENGTHS)
    rng = np.random.default_rng(0)
    terminated = np.zeros((b, h, spec.n_agents), np.float32)
    terminated[TERMINAL_ROW, TERMINAL_STEP] = 1.0
    trajs = Trajectories(
        obs=rng.normal(size=(b, h + 1, spec.n_agents, spec.obs_dim)).astype(np.float32),
        action=np.eye(spec.action_dim, dtype=np.float32)[rng.integers(0, 6, (b, h, 2))],
        reward=np.ones((b, h, spec.n_agents), np.float32),
        terminated=terminated,
        length=np.array(LENGTHS),
    )
    return trajs, module, spec


def _episodes(imagined, bootstrap_truncated: bool) -> list:
    from moedream.policies.imagination import build_imagined_episodes

    trajs, module, spec = imagined
    return build_imagined_episodes(trajs, module, spec, bootstrap_truncated=bootstrap_truncated)


def _last_value_targets(episodes: list, values_of) -> list[float]:
    return last_value_targets(episodes, values_of, GAMMA, LAMBDA)


def test_cut_episodes_are_truncated_and_predicted_ends_terminated(imagined):
    episodes = _episodes(imagined, bootstrap_truncated=True)
    assert [e.env_steps() for e in episodes] == [5, 2, TERMINAL_STEP + 1]
    for row, episode in enumerate(episodes):
        cut = row != TERMINAL_ROW
        assert (episode.is_truncated, episode.is_terminated) == (cut, not cut)
        for agent_episode in episode.agent_episodes.values():  # what PPO's learner reads
            assert (agent_episode.is_truncated, agent_episode.is_terminated) == (cut, not cut)


def test_gae_bootstraps_from_the_critic_at_the_cut_only(imagined):
    value_after_cut = 7.0
    values_of = lambda n: np.append(np.zeros(n, np.float32), value_after_cut)  # noqa: E731
    targets = _last_value_targets(_episodes(imagined, bootstrap_truncated=True), values_of)
    # reward 1 at the last step, plus gamma V(s_H) where the rollout was cut, nothing past a
    # predicted termination
    assert targets == pytest.approx([1 + GAMMA * value_after_cut] * 2 + [1.0])


def test_without_bootstrap_a_cut_is_the_end_of_the_episode(imagined):
    episodes = _episodes(imagined, bootstrap_truncated=False)
    assert all(a.is_terminated for e in episodes for a in e.agent_episodes.values())
    values_of = lambda n: np.append(np.zeros(n, np.float32), 7.0)  # noqa: E731
    assert _last_value_targets(episodes, values_of) == pytest.approx([1.0] * 3)
