"""Connector pieces (connectors v2) that give the team modules what they need.

- :class:`AddAgentIndex` (env-to-module and learner): column ``agent_index`` [B] int64, the
  agent's position in the env's agent order, for the shared planner's agent-id embedding.
- :class:`AddJointObservation` (learner): column ``joint_obs`` [B, N * D], the observations of
  all agents at the same env step (zero-padded to D, in the env's agent order), for the
  centralised reflector.
- :class:`CountImaginedSteps` (learner): counts the agent steps of imagined episodes (ids
  starting with ``imagined-``) that really reached the learner, as learner metrics.
- :class:`UpdateObsNormStats` (learner, with ``obs_norm``): merges the real observations of
  each update into the perceiver's running mean/std.

They run before RLlib's default pieces (custom learner pieces are placed after PPO's
AddOneTsToEpisodesAndTruncate and before AddObservationsFromEpisodesToBatch), and iterate the
episodes in the same order as those pieces, so rows line up with ``obs``. RLlib calls a piece
with keyword arguments only; those a piece does not use (``explore``, ``shared_data``, ...)
land in ``**kwargs``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2

from moedream.policies.names import (
    AGENT_INDEX,
    IMAGINED_PREFIX,
    IMAGINED_STEPS_KEY,
    JOINT_OBS,
    OBS_NORM_COUNT_KEY,
    PERCEIVER,
    REAL_STEPS_KEY,
)


class AddAgentIndex(ConnectorV2):
    """Adds ``agent_index`` (position of the agent in ``agent_ids``) to every row."""

    def __init__(
        self,
        input_observation_space=None,
        input_action_space=None,
        *,
        agent_ids: list[str],
        as_learner_connector: bool = False,
        **kwargs,
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.agent_ids = list(agent_ids)
        self._as_learner_connector = as_learner_connector

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes, **kwargs) -> Any:
        if AGENT_INDEX in batch:
            return batch
        for sa_episode in self.single_agent_episode_iterator(
            episodes, agents_that_stepped_only=not self._as_learner_connector
        ):
            index = self.agent_ids.index(sa_episode.agent_id)
            if self._as_learner_connector:
                n = len(sa_episode)
                self.add_n_batch_items(
                    batch, AGENT_INDEX, np.full(n, index, dtype=np.int64), n, sa_episode
                )
            else:
                self.add_batch_item(batch, AGENT_INDEX, np.int64(index), sa_episode)
        return batch


class AddJointObservation(ConnectorV2):
    """Adds ``joint_obs`` [N * D]: all agents' observations at each of the agent's steps.

    Requires that all agents step together (true for Overcooked and MaMuJoCo).
    """

    def __init__(
        self,
        input_observation_space=None,
        input_action_space=None,
        *,
        agent_ids: list[str],
        obs_dim: int,
        **kwargs,
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.agent_ids = list(agent_ids)
        self.obs_dim = int(obs_dim)

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes, **kwargs) -> Any:
        if JOINT_OBS in batch:
            return batch
        for episode in episodes:
            joint_cache: dict[int, np.ndarray] = {}
            for agent_id in episode.agent_ids:
                sa_episode = episode.agent_episodes[agent_id]
                n = len(sa_episode)
                if n not in joint_cache:
                    joint_cache[n] = self._joint(episode, n)
                self.add_n_batch_items(batch, JOINT_OBS, joint_cache[n], n, sa_episode)
        return batch

    def _joint(self, episode, n: int) -> np.ndarray:
        """The first n observations of every agent -> [n, N * D] float32."""
        out = np.zeros((n, len(self.agent_ids), self.obs_dim), dtype=np.float32)
        for i, agent_id in enumerate(self.agent_ids):
            sa = episode.agent_episodes[agent_id]
            if len(sa) != n:
                raise ValueError(
                    f"AddJointObservation needs all agents to step together; agent {agent_id!r} "
                    f"has {len(sa)} steps in episode {episode.id_!r}, another has {n}"
                )
            obs = np.asarray(sa.get_observations(slice(0, n)), dtype=np.float32).reshape(n, -1)
            out[:, i, : obs.shape[1]] = obs
        return out.reshape(n, -1)


class CountImaginedSteps(ConnectorV2):
    """Logs how many real and imagined agent steps the learner received (per update call)."""

    def __call__(
        self, *, rl_module, batch: dict[str, Any], episodes, metrics=None, **kwargs
    ) -> Any:
        imagined = real = 0
        for episode in episodes:
            # PPO's learner already added one artificial step per agent episode.
            steps = sum(max(len(sa) - 1, 0) for sa in episode.agent_episodes.values())
            if _is_imagined(episode):
                imagined += steps
            else:
                real += steps
        if metrics is not None:
            metrics.log_value(IMAGINED_STEPS_KEY, imagined, reduce="sum")
            metrics.log_value(REAL_STEPS_KEY, real, reduce="sum")
        return batch


class UpdateObsNormStats(ConnectorV2):
    """Learner connector piece: merges the REAL observations of the update into the
    perceiver's running mean/std (imagined episodes, ids ``imagined-...``, are skipped).

    It runs once per learner update, before PPO's GAE piece computes values, so one update
    (all epochs and minibatches) and its value targets use one set of statistics; the env
    runners get the new statistics with the weights sync after the update. It adds the rows
    the batch gets (the episode's observations up to its length) and logs the lifetime count as
    learner metric ``moedream_obs_norm_count``. A no-op when the perceiver has no normaliser.
    """

    def __call__(
        self, *, rl_module, batch: dict[str, Any], episodes, metrics=None, **kwargs
    ) -> Any:
        norm = getattr(rl_module[PERCEIVER], "obs_norm", None) if PERCEIVER in rl_module else None
        if norm is None:
            return batch
        by_size: dict[int, list[np.ndarray]] = {}
        for episode in episodes:
            if _is_imagined(episode):
                continue
            for sa_episode in episode.agent_episodes.values():
                n = len(sa_episode)
                if n == 0:
                    continue
                obs = np.asarray(sa_episode.get_observations(slice(0, n)), dtype=np.float32)
                obs = obs.reshape(n, -1)  # [T, D_i]
                by_size.setdefault(obs.shape[1], []).append(obs)
        for rows in by_size.values():
            norm.update(torch.as_tensor(np.concatenate(rows)))  # [sum T, D_i]
        if metrics is not None:
            metrics.log_value(OBS_NORM_COUNT_KEY, float(norm.count.max()), window=1)
        return batch


def _is_imagined(episode) -> bool:
    return str(episode.id_).startswith(IMAGINED_PREFIX)


def env_to_module_pieces(
    env=None, spaces=None, device=None, *, agent_ids: list[str]
) -> list[ConnectorV2]:
    """``config.env_runners(env_to_module_connector=partial(env_to_module_pieces, agent_ids=...))``."""
    return [AddAgentIndex(agent_ids=agent_ids)]


def learner_pieces(
    input_observation_space=None,
    input_action_space=None,
    *,
    agent_ids: list[str],
    obs_dim: int,
    obs_norm: bool = False,
) -> list[ConnectorV2]:
    """``config.learners(learner_connector=partial(learner_pieces, agent_ids=..., obs_dim=...))``.

    ``obs_norm``: the perceiver normalises observations; :class:`UpdateObsNormStats` goes first,
    so the whole update (and PPO's value targets) uses the statistics it leaves.
    """
    pieces = [
        CountImaginedSteps(),
        AddAgentIndex(agent_ids=agent_ids, as_learner_connector=True),
        AddJointObservation(agent_ids=agent_ids, obs_dim=obs_dim),
    ]
    return [UpdateObsNormStats(), *pieces] if obs_norm else pieces
