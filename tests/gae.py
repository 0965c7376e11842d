"""GAE's value targets of episodes as PPO's learner computes them, for the bootstrap tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def last_value_targets(
    episodes: list, values_of: Callable[[int], np.ndarray], gamma: float, lambda_: float
) -> list[float]:
    """Per episode (its first agent): GAE's value target of its last real step, computed by
    RLlib's own PPO learner pieces (AddOneTsToEpisodesAndTruncate, compute_value_targets) from
    the episode's rewards and critic values ``values_of(length)`` [length + 1] (the extra one:
    the state after the last step)."""
    from ray.rllib.connectors.learner import AddOneTsToEpisodesAndTruncate
    from ray.rllib.core.columns import Columns
    from ray.rllib.utils.postprocessing.value_predictions import compute_value_targets

    batch: dict = {}
    AddOneTsToEpisodesAndTruncate()(rl_module=None, batch=batch, episodes=episodes,
                                    shared_data={})  # fmt: skip
    targets = []
    for episode in episodes:
        agent, agent_episode = next(iter(episode.agent_episodes.items()))
        key = next(k for k in batch[Columns.TERMINATEDS] if k[1] == agent and
                   k[0].startswith(episode.id_))  # fmt: skip
        terminateds = np.asarray(batch[Columns.TERMINATEDS][key], np.float32)  # [L + 1]
        truncateds = np.asarray(batch[Columns.TRUNCATEDS][key], np.float32)
        rewards = np.asarray(agent_episode.get_rewards(), np.float32)  # the phantom step's 0 last
        length = len(terminateds) - 1
        assert rewards.shape == (length + 1,) and rewards[-1] == 0.0
        target = compute_value_targets(
            values_of(length), rewards, terminateds, truncateds, gamma, lambda_
        )
        targets.append(float(target[length - 1]))
    return targets
