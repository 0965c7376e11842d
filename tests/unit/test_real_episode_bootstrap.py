"""Real episodes the env truncates at its time limit reach PPO's GAE truncated (bootstrapped)
with ``bootstrap_truncated_episodes``; without it, as RLlib marks them: terminated."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from moedream.envs import rllib_env, termination_wins
from moedream.policies.episode_ends import restore_truncation
from tests.gae import last_value_targets

HORIZON = 5
OPTIONS = {"layout": "cramped_room", "horizon": HORIZON, "shaped_reward_weight": 1.0}
GAMMA, LAMBDA = 0.9, 0.95
VALUE_AFTER_LAST = 7.0


@pytest.fixture(scope="module")
def sampled() -> list:
    """Two whole real Overcooked episodes, sampled by RLlib's own MultiAgentEnvRunner (in this
    process) from the env the platform registers."""
    from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner

    from moedream.platform.agents import AgentsConfig, build_algo_config

    cfg = AgentsConfig.from_dict({
        "env": "overcooked", "env_options": OPTIONS, "num_env_runners": 0,
        "train_batch_size": 2 * HORIZON, "minibatch_size": HORIZON,
        "team": {"embedding_dim": 8, "perceiver_hidden": [8], "planner_hidden": [8],
                 "reflector_hidden": [8]},
    })  # fmt: skip
    runner = MultiAgentEnvRunner(config=build_algo_config(cfg, logdir_root=None))
    try:
        return runner.sample(num_episodes=2, random_actions=True)
    finally:
        runner.stop()


def _values_of(n: int) -> np.ndarray:
    return np.append(np.zeros(n, np.float32), VALUE_AFTER_LAST)  # V(s_T) only is nonzero


def _last_rewards(episodes: list) -> list[float]:
    return [float(next(iter(e.agent_episodes.values())).get_rewards(-1)) for e in episodes]


def test_the_env_truncates_every_agent_at_the_horizon_and_terminates_none():
    env = rllib_env("overcooked", **OPTIONS)
    env.reset(seed=0)
    stay = {a: 4 for a in env.get_agent_ids()}  # every agent: interact
    for t in range(1, HORIZON + 1):
        _, _, terminateds, truncateds, _ = env.step(stay)
        assert not any(terminateds.values())
        assert set(truncateds.values()) == {t == HORIZON}  # every agent and __all__


def test_termination_wins_over_truncation_for_one_agent():
    assert termination_wins({"a": True, "b": False}, {"a": True, "b": True}) == {
        "a": False, "b": True
    }  # fmt: skip


def test_rllib_terminates_an_episode_the_env_truncated(sampled):
    """The bug: RLlib's MultiAgentEpisode terminates the episode once every agent is done,
    so GAE drops V(s_T) at the horizon."""
    episodes = copy.deepcopy(sampled)
    assert [e.env_steps() for e in episodes] == [HORIZON] * 2
    assert all(a.is_terminated for e in episodes for a in e.agent_episodes.values())
    targets = last_value_targets(episodes, _values_of, GAMMA, LAMBDA)
    assert targets == pytest.approx(_last_rewards(episodes))


def test_restored_truncation_bootstraps_from_the_critic_at_the_horizon(sampled):
    episodes = copy.deepcopy(sampled)
    assert all(restore_truncation(e) for e in episodes)
    for episode in episodes:
        assert (episode.is_truncated, episode.is_terminated) == (True, False)
        for agent_episode in episode.agent_episodes.values():  # what PPO's learner reads
            assert (agent_episode.is_truncated, agent_episode.is_terminated) == (True, False)
    targets = last_value_targets(episodes, _values_of, GAMMA, LAMBDA)
    expected = [r + GAMMA * VALUE_AFTER_LAST for r in _last_rewards(episodes)]
    assert targets == pytest.approx(expected)


def test_a_real_termination_stays_terminated():
    from ray.rllib.env.multi_agent_episode import MultiAgentEpisode

    episode = MultiAgentEpisode()
    episode.add_env_reset(observations={"a": 0, "b": 0})
    done = {"a": True, "b": True, "__all__": True}
    episode.add_env_step(observations={"a": 1, "b": 1}, actions={"a": 0, "b": 0},
                         rewards={"a": 1.0, "b": 1.0}, terminateds=done)  # fmt: skip
    assert not restore_truncation(episode)
    assert episode.is_terminated and not episode.is_truncated
    assert all(a.is_terminated for a in episode.agent_episodes.values())


def test_the_setting_reaches_the_algorithm_config_and_must_be_true_or_false():
    from moedream.config import ConfigError
    from moedream.platform.agents import AgentsConfig, build_algo_config

    for value in (True, False):
        cfg = AgentsConfig.from_dict({"bootstrap_truncated_episodes": value})
        assert build_algo_config(cfg).bootstrap_truncated_episodes is value
    with pytest.raises(ConfigError, match="bootstrap_truncated_episodes.*true or false"):
        AgentsConfig.from_dict({"bootstrap_truncated_episodes": "yes"})
