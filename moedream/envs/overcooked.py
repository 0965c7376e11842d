"""Overcooked-AI as a PettingZoo ParallelEnv (written by us: the package's gym wrapper is broken).

Two cooks share a kitchen; each delivered soup pays the team 20 (the sparse reward). An optional
shaped reward (placing onions, picking up dishes and soups) helps exploration; its weight is
``shaped_reward_weight`` (0 = sparse only).

``moves: per_episode`` makes a task where only an episode's own history tells its dynamics: at
every reset the four move actions (up, down, right, left) are shuffled by a permutation drawn
from the reset's seed (stay and interact keep their meaning). The permutation is not in the
observation; a world model must infer it from the moves it has seen this episode.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gymnasium import spaces
from overcooked_ai_py.mdp.actions import Action
from overcooked_ai_py.mdp.overcooked_env import OvercookedEnv
from overcooked_ai_py.mdp.overcooked_mdp import OvercookedGridworld
from pettingzoo import ParallelEnv

from moedream.config import ConfigBase, check, check_choice, check_positive
from moedream.envs import _compat  # noqa: F401  (already imported by moedream.envs, first)

SOUP_REWARD = 20.0
"""What one delivered soup pays the team (overcooked_ai's sparse reward)."""

ENCODINGS = ("featurized", "grid")
MOVE_MODES = ("fixed", "per_episode")
N_MOVES = 4
"""Action indices 0..3 are the moves (north, south, east, west); 4 is stay, 5 interact."""


@functools.cache
def available_layouts() -> tuple[str, ...]:
    import overcooked_ai_py

    folder = Path(overcooked_ai_py.__file__).parent / "data" / "layouts"
    return tuple(sorted(p.stem for p in folder.glob("*.layout")))


@dataclasses.dataclass
class OvercookedConfig(ConfigBase):
    layout: str = "cramped_room"
    """Layout name from overcooked_ai_py's data/layouts (e.g. cramped_room, coordination_ring)."""
    horizon: int = 400
    """Steps per episode; the episode is truncated (not terminated) at the horizon."""
    encoding: Literal["featurized", "grid"] = "featurized"
    """featurized: 96-dim hand-made features; grid: lossless (width, height, 26) planes."""
    shaped_reward_weight: float = 0.0
    """Weight of the shaped reward added to the sparse soup reward (0 = sparse only)."""
    moves: Literal["fixed", "per_episode"] = "fixed"
    """fixed: action i always moves the same way; per_episode: the four moves are shuffled at
    every reset (hidden per-episode dynamics, see the module docstring)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_choice(f"{prefix}layout", self.layout, available_layouts())
        check(
            isinstance(self.horizon, int) and self.horizon > 0,
            f"{prefix}horizon",
            self.horizon,
            "must be an integer > 0",
        )
        check_choice(f"{prefix}encoding", self.encoding, ENCODINGS)
        check_positive(f"{prefix}shaped_reward_weight", self.shaped_reward_weight, allow_zero=True)
        check_choice(f"{prefix}moves", self.moves, MOVE_MODES)


class OvercookedParallelEnv(ParallelEnv):
    """Overcooked with agents ``agent_0``/``agent_1``, 6 discrete actions each.

    Rewards: every agent receives the team reward (sparse + weight * shaped, summed over cooks).
    ``infos[agent]`` holds ``sparse_reward`` and ``shaped_reward`` of the team for the step and,
    with ``moves: per_episode``, ``action_map``: the Overcooked action each index plays this
    episode (also in the reset infos).
    """

    metadata = {"name": "overcooked_v0", "render_modes": ["ansi"], "is_parallelizable": True}

    def __init__(self, config: OvercookedConfig | None = None, render_mode: str | None = None):
        self.config = config or OvercookedConfig()
        self.config.validate()
        self.render_mode = render_mode
        mdp = OvercookedGridworld.from_layout_name(self.config.layout)
        self._env = OvercookedEnv.from_mdp(mdp, horizon=self.config.horizon, info_level=0)
        self.possible_agents = ["agent_0", "agent_1"]
        self.agents: list[str] = []
        self._obs_shape = self._encode(self._env.state)[0].shape
        self._obs_space = spaces.Box(-np.inf, np.inf, shape=self._obs_shape, dtype=np.float32)
        self._act_space = spaces.Discrete(len(Action.ALL_ACTIONS))
        self._rng = np.random.default_rng()
        self.action_map = np.arange(len(Action.ALL_ACTIONS))
        """[6] int: the Overcooked action index that our action i plays this episode."""

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self._obs_space.seed(seed)
            self._act_space.seed(seed)
            self._rng = np.random.default_rng(seed)
        if self.config.moves == "per_episode":
            self.action_map[:N_MOVES] = self._rng.permutation(N_MOVES)
        # regen_mdp=False keeps the layout and its motion planner (else recomputed every episode).
        self._env.reset(regen_mdp=False)
        self.agents = list(self.possible_agents)
        obs = self._encode(self._env.state)
        infos = {a: self._map_info() for a in self.agents}
        return {a: obs[i] for i, a in enumerate(self.agents)}, infos

    def step(self, actions: dict[str, int]):
        joint = tuple(
            Action.INDEX_TO_ACTION[self.action_map[int(actions[a])]] for a in self.possible_agents
        )
        state, sparse, done, info = self._env.step(joint)
        shaped = float(sum(info["shaped_r_by_agent"]))
        team = float(sparse) + self.config.shaped_reward_weight * shaped
        obs = self._encode(state)
        agents = self.possible_agents
        observations = {a: obs[i] for i, a in enumerate(agents)}
        rewards = {a: team for a in agents}
        terminations = {a: False for a in agents}  # Overcooked never ends early.
        truncations = {a: bool(done) for a in agents}
        infos = {
            a: {"sparse_reward": float(sparse), "shaped_reward": shaped, **self._map_info()}
            for a in agents
        }
        if done:
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    def render(self) -> str | None:
        return str(self._env) if self.render_mode == "ansi" else None

    def close(self) -> None:
        pass

    def scripted_team(self, epsilon: float = 0.1, seed: int = 0) -> Callable[[Any], dict]:
        """A competent scripted team (overcooked_ai's GreedyHumanModel for both cooks: fetch
        onions, cook, plate, serve) as a policy ``obs -> {agent: action index}`` for
        ``moedream.data.rollout_episode``; each action is replaced by a random one with
        probability ``epsilon`` (varied episodes, states off the greedy path). Seeded: the
        same ``seed`` gives the same episodes."""
        from overcooked_ai_py.agents.agent import AgentPair, GreedyHumanModel
        from overcooked_ai_py.planning.planners import (
            NO_COUNTERS_PARAMS,
            MediumLevelActionManager,
        )

        check(0.0 <= epsilon <= 1.0, "epsilon", epsilon, "must be a probability in [0, 1]")
        mlam = MediumLevelActionManager.from_pickle_or_compute(
            self._env.mdp, NO_COUNTERS_PARAMS, force_compute=False
        )
        team = AgentPair(GreedyHumanModel(mlam), GreedyHumanModel(mlam))
        team.set_mdp(self._env.mdp)
        rng = np.random.default_rng(seed)
        n_actions = len(Action.ALL_ACTIONS)

        def policy(obs: Any) -> dict[str, int]:
            # GreedyHumanModel breaks ties with numpy's global generator: seed it from ours
            np.random.seed(int(rng.integers(2**31)))
            joint = team.joint_action(self._env.state)
            return {
                agent: int(rng.integers(n_actions))
                if rng.random() < epsilon
                else self._index_playing(Action.ACTION_TO_INDEX[joint[i][0]])
                for i, agent in enumerate(self.possible_agents)
            }

        return policy

    def _index_playing(self, overcooked_index: int) -> int:
        """Our action index that plays Overcooked action ``overcooked_index`` this episode."""
        return int(np.flatnonzero(self.action_map == overcooked_index)[0])

    def _map_info(self) -> dict[str, np.ndarray]:
        return {"action_map": self.action_map.copy()} if self.config.moves == "per_episode" else {}

    def _encode(self, state) -> list[np.ndarray]:
        if self.config.encoding == "featurized":
            feats = self._env.featurize_state_mdp(state)
        else:
            feats = self._env.lossless_state_encoding_mdp(state)
        return [np.asarray(f, dtype=np.float32) for f in feats]
