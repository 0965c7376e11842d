"""A small partially observed two-agent memory task (PettingZoo ParallelEnv).

Two agents walk on a ``grid_size`` x ``grid_size`` grid whose cells carry random tile colours
(drawn anew every episode). Each agent sees only its own cell: its position and that cell's
tile colour. At step 0 a cue (one of ``n_cues``) is shown to agent_0 (or to both agents); at
step ``cue_delay`` a query flag comes on and each agent must answer the cue with its action; the
last observation then reveals the cue to both agents (the feedback), and the episode ends.

So a world model has two things to remember far beyond a short context:
- the tile colour of a cell seen long ago, needed when an agent revisits it (spatial recall);
- the cue shown at step 0, needed to predict the final reveal (episodic recall).

Observation of each agent (float32, ``obs_dim = 2 * grid_size + n_tiles + n_cues + 2``)::

    [ x one-hot (G) | y one-hot (G) | tile one-hot (n_tiles) | cue one-hot (n_cues) | query | t/T ]

Actions: ``Discrete(5 + n_cues)``: 0 stay, 1 up, 2 down, 3 left, 4 right, ``5 + j`` answer cue
``j`` (and stay). Each agent receives the team reward: the fraction of agents that answered the
query correctly (0, 0.5 or 1), paid on the query step; any other step pays 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from moedream.config import ConfigBase, check, check_choice

N_MOVES = 5
MOVES = np.array([[0, 0], [0, -1], [0, 1], [-1, 0], [1, 0]], dtype=np.int64)
"""(dx, dy) of actions 0..4: stay, up, down, left, right. Answers (>= 5) stay in place."""


@dataclasses.dataclass
class MemoryTaskConfig(ConfigBase):
    grid_size: int = 5
    """Side of the square grid the agents move in."""
    n_tiles: int = 4
    """Number of tile colours; every cell gets a random colour each episode."""
    n_cues: int = 3
    """Number of possible cues (and of answer actions)."""
    cue_delay: int = 24
    """Step at which the query flag is on and the agents must answer; the episode has
    ``cue_delay + 1`` steps (the last observation reveals the cue)."""
    cue_visible_to: Literal["agent_0", "both"] = "agent_0"
    """Who sees the cue at step 0 (agent_1 must rely on the team reward otherwise)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        for name, low in (("grid_size", 2), ("n_tiles", 1), ("n_cues", 2), ("cue_delay", 1)):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            check(ok, f"{prefix}{name}", value, f"must be an integer >= {low}")
        check_choice(f"{prefix}cue_visible_to", self.cue_visible_to, ("agent_0", "both"))

    @property
    def obs_dim(self) -> int:
        return 2 * self.grid_size + self.n_tiles + self.n_cues + 2

    @property
    def horizon(self) -> int:
        return self.cue_delay + 1


@dataclasses.dataclass(frozen=True)
class ObsLayout:
    """Where each part sits in an agent's observation vector (slices)."""

    x: slice
    y: slice
    tile: slice
    cue: slice
    query: int
    time: int

    @classmethod
    def of(cls, cfg: MemoryTaskConfig) -> ObsLayout:
        g, n_t, n_c = cfg.grid_size, cfg.n_tiles, cfg.n_cues
        return cls(
            x=slice(0, g),
            y=slice(g, 2 * g),
            tile=slice(2 * g, 2 * g + n_t),
            cue=slice(2 * g + n_t, 2 * g + n_t + n_c),
            query=2 * g + n_t + n_c,
            time=2 * g + n_t + n_c + 1,
        )


def positions_from_obs(obs: np.ndarray, cfg: MemoryTaskConfig) -> np.ndarray:
    """Grid positions read back from observations: [..., obs_dim] -> [..., 2] int64 (x, y)."""
    layout = ObsLayout.of(cfg)
    obs = np.asarray(obs)
    return np.stack([obs[..., layout.x].argmax(-1), obs[..., layout.y].argmax(-1)], -1)


def move(positions: np.ndarray, actions: np.ndarray, grid_size: int) -> np.ndarray:
    """Deterministic motion: positions [..., 2] and actions [...] -> next positions [..., 2].

    Agents may share a cell; walls clip the move.
    """
    actions = np.asarray(actions, dtype=np.int64)
    delta = MOVES[np.where(actions < N_MOVES, actions, 0)]  # [..., 2]
    return np.clip(np.asarray(positions) + delta, 0, grid_size - 1)


class MemoryTaskEnv(ParallelEnv):
    """The memory task with agents ``agent_0`` and ``agent_1`` (see the module docstring).

    ``infos[agent]["position"]`` holds the agent's (x, y) cell and ``infos[agent]["cue"]`` the
    episode's cue, so a spatial memory can be keyed by position without decoding observations.
    """

    metadata = {"name": "memory_task_v0", "render_modes": ["ansi"], "is_parallelizable": True}

    def __init__(self, config: MemoryTaskConfig | None = None, render_mode: str | None = None):
        self.config = config or MemoryTaskConfig()
        self.config.validate()
        self.render_mode = render_mode
        self.layout = ObsLayout.of(self.config)
        self.possible_agents = ["agent_0", "agent_1"]
        self.agents: list[str] = []
        dim = self.config.obs_dim
        self._obs_space = spaces.Box(0.0, 1.0, shape=(dim,), dtype=np.float32)
        self._act_space = spaces.Discrete(N_MOVES + self.config.n_cues)
        self._rng = np.random.default_rng()
        self._positions = np.zeros((2, 2), dtype=np.int64)
        self._tiles = np.zeros((self.config.grid_size,) * 2, dtype=np.int64)
        self._cue = 0
        self._t = 0

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    @property
    def positions(self) -> np.ndarray:
        """Current cells of the agents, [n_agents, 2] (x, y)."""
        return self._positions.copy()

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self._obs_space.seed(seed)
            self._act_space.seed(seed)
        g = self.config.grid_size
        self._tiles = self._rng.integers(0, self.config.n_tiles, size=(g, g))
        self._positions = self._rng.integers(0, g, size=(2, 2))
        self._cue = int(self._rng.integers(0, self.config.n_cues))
        self._t = 0
        self.agents = list(self.possible_agents)
        return self._observations(), self._infos()

    def step(self, actions: dict[str, int]):
        if not self.agents:
            raise RuntimeError("MemoryTaskEnv.step called after the episode ended; call reset()")
        acts = np.array([int(actions[a]) for a in self.possible_agents], dtype=np.int64)
        if np.any((acts < 0) | (acts >= self._act_space.n)):
            raise ValueError(f"actions {acts.tolist()} out of range [0, {self._act_space.n})")
        team = 0.0
        if self._t == self.config.cue_delay:
            team = float(np.mean(acts - N_MOVES == self._cue))
        self._positions = move(self._positions, acts, self.config.grid_size)
        self._t += 1
        done = self._t > self.config.cue_delay
        agents = self.possible_agents
        observations, infos = self._observations(), self._infos()
        rewards = {a: team for a in agents}
        terminations = {a: done for a in agents}
        truncations = {a: False for a in agents}
        if done:
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        grid = [[str(c) for c in row] for row in self._tiles.T]
        for i, (x, y) in enumerate(self._positions):
            grid[y][x] = "AB"[i]
        return "\n".join("".join(row) for row in grid) + f"\nt={self._t} cue={self._cue}"

    def close(self) -> None:
        pass

    def _observations(self) -> dict[str, np.ndarray]:
        cfg, lay = self.config, self.layout
        reveal = self._t > cfg.cue_delay
        out = {}
        for i, agent in enumerate(self.possible_agents):
            x, y = self._positions[i]
            o = np.zeros(cfg.obs_dim, dtype=np.float32)
            o[lay.x.start + x] = 1.0
            o[lay.y.start + y] = 1.0
            o[lay.tile.start + self._tiles[x, y]] = 1.0
            sees_cue = self._t == 0 and (cfg.cue_visible_to == "both" or i == 0)
            if sees_cue or reveal:
                o[lay.cue.start + self._cue] = 1.0
            o[lay.query] = float(self._t == cfg.cue_delay)
            o[lay.time] = self._t / cfg.horizon
            out[agent] = o
        return out

    def _infos(self) -> dict[str, dict[str, Any]]:
        return {
            a: {"position": self._positions[i].copy(), "cue": self._cue, "t": self._t}
            for i, a in enumerate(self.possible_agents)
        }


def random_episodes(
    cfg: MemoryTaskConfig, n_episodes: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """Episodes of a random policy (random moves, a random answer at the query step).

    Each is ``{"obs": [T+1, 2, D], "actions": [T, 2] int, "positions": [T+1, 2, 2], "cue": int}``
    with T = ``cfg.horizon``; episode i uses env seed ``seed + i``.
    """
    env = MemoryTaskEnv(cfg)
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(n_episodes):
        obs, infos = env.reset(seed=seed + i)
        frames, acts, poss = [_stack(obs, env)], [], [env.positions]
        while env.agents:
            if env._t == cfg.cue_delay:
                joint = rng.integers(N_MOVES, N_MOVES + cfg.n_cues, size=2)
            else:
                joint = rng.integers(0, N_MOVES, size=2)
            obs, _, _, _, infos = env.step(
                {a: int(joint[j]) for j, a in enumerate(env.possible_agents)}
            )
            frames.append(_stack(obs, env))
            acts.append(joint)
            poss.append(env.positions)
        episodes.append(
            {
                "obs": np.stack(frames),
                "actions": np.stack(acts).astype(np.int64),
                "positions": np.stack(poss),
                "cue": int(infos["agent_0"]["cue"]),
            }
        )
    return episodes


def _stack(obs: dict[str, np.ndarray], env: MemoryTaskEnv) -> np.ndarray:
    return np.stack([obs[a] for a in env.possible_agents])
