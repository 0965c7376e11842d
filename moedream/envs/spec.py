"""What a world model, a policy or a data file needs to know about a multi-agent env.

Plain numpy: imported by the world model (which never imports ray) as well as by the envs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import numpy as np


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """Agents, observation and action sizes of one env configuration.

    Observations of all agents are padded to ``obs_dim`` (the largest agent's) when stacked
    into ``[..., n_agents, obs_dim]`` arrays. Discrete actions are indices in
    ``range(action_dim)``; continuous ones are vectors of ``action_dim`` (padded likewise).
    """

    env_name: str
    agent_ids: tuple[str, ...]
    obs_dims: tuple[int, ...]
    action_kind: Literal["discrete", "continuous"]
    action_dims: tuple[int, ...]
    env_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_agents(self) -> int:
        return len(self.agent_ids)

    @property
    def obs_dim(self) -> int:
        return max(self.obs_dims)

    @property
    def action_dim(self) -> int:
        return max(self.action_dims)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EnvSpec:
        d = json.loads(text)
        for key in ("agent_ids", "obs_dims", "action_dims"):
            d[key] = tuple(d[key])
        return cls(**d)

    def stack_obs(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """{agent: [obs_dim_i]} -> [n_agents, obs_dim] float32, zero-padded."""
        out = np.zeros((self.n_agents, self.obs_dim), dtype=np.float32)
        for i, agent in enumerate(self.agent_ids):
            o = np.asarray(obs[agent], dtype=np.float32).reshape(-1)
            out[i, : o.shape[0]] = o
        return out

    def unstack_obs(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        """[n_agents, obs_dim] -> {agent: [obs_dim_i]}."""
        return {a: obs[i, : self.obs_dims[i]] for i, a in enumerate(self.agent_ids)}

    def stack_actions(self, actions: dict[str, Any]) -> np.ndarray:
        """{agent: action} -> [n_agents] int64 (discrete) or [n_agents, action_dim] float32."""
        if self.action_kind == "discrete":
            return np.asarray([int(actions[a]) for a in self.agent_ids], dtype=np.int64)
        out = np.zeros((self.n_agents, self.action_dim), dtype=np.float32)
        for i, agent in enumerate(self.agent_ids):
            a = np.asarray(actions[agent], dtype=np.float32).reshape(-1)
            out[i, : a.shape[0]] = a
        return out

    def unstack_actions(self, actions: np.ndarray) -> dict[str, Any]:
        if self.action_kind == "discrete":
            return {a: int(actions[i]) for i, a in enumerate(self.agent_ids)}
        return {a: actions[i, : self.action_dims[i]] for i, a in enumerate(self.agent_ids)}

    def encode_actions(self, actions: np.ndarray) -> np.ndarray:
        """Actions as model input: [..., n_agents] ints -> one-hot [..., n_agents, action_dim];
        continuous [..., n_agents, action_dim] pass through as float32."""
        if self.action_kind == "discrete":
            return np.eye(self.action_dim, dtype=np.float32)[np.asarray(actions, dtype=np.int64)]
        return np.asarray(actions, dtype=np.float32)
