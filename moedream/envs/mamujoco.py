"""Multi-agent MuJoCo (gymnasium_robotics ``mamujoco_v1``): one robot, its joints split among
agents. The reward is the team's, given to every agent."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from pettingzoo.utils.wrappers import BaseParallelWrapper

from moedream.config import ConfigBase, check, check_choice

SCENARIOS = ("HalfCheetah", "Ant", "Hopper", "Walker2d", "Swimmer", "Humanoid", "Reacher")


@dataclasses.dataclass
class MaMuJoCoConfig(ConfigBase):
    scenario: str = "HalfCheetah"
    """The robot: one of HalfCheetah, Ant, Hopper, Walker2d, Swimmer, Humanoid, Reacher."""
    agent_conf: str = "2x3"
    """How joints are split among agents, e.g. 2x3 (2 agents of 3 joints), 6x1."""
    agent_obsk: int = 1
    """Observation depth: how many hops of neighbouring joints an agent sees."""
    max_episode_steps: int = 1000
    """Steps before truncation."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_choice(f"{prefix}scenario", self.scenario, SCENARIOS)
        check(
            isinstance(self.agent_conf, str) and "x" in self.agent_conf,
            f"{prefix}agent_conf",
            self.agent_conf,
            "must look like '2x3' (agents x joints)",
        )
        check(self.agent_obsk >= 0, f"{prefix}agent_obsk", self.agent_obsk, "must be >= 0")
        check(
            self.max_episode_steps > 0,
            f"{prefix}max_episode_steps",
            self.max_episode_steps,
            "must be > 0",
        )


def make_mamujoco(config: MaMuJoCoConfig | None = None, render_mode: str | None = None) -> Any:
    """The gymnasium_robotics parallel env; float32 observations, as its spaces declare."""
    from gymnasium_robotics import mamujoco_v1

    config = config or MaMuJoCoConfig()
    config.validate()
    try:
        env = mamujoco_v1.parallel_env(
            config.scenario,
            config.agent_conf,
            agent_obsk=config.agent_obsk,
            max_episode_steps=config.max_episode_steps,
            render_mode=render_mode,
        )
    except Exception as err:  # gymnasium_robotics raises many kinds for a bad partition
        raise ValueError(
            f"mamujoco: scenario {config.scenario!r} with agent_conf {config.agent_conf!r} "
            f"is not available ({err}); try e.g. HalfCheetah 2x3, HalfCheetah 6x1, Ant 2x4"
        ) from err
    return _Float32Obs(env)


class _Float32Obs(BaseParallelWrapper):
    """Casts observations to float32 (mamujoco returns float64 under float32 spaces) and
    rewards to float."""

    def __init__(self, env: Any):
        super().__init__(env)
        self._env = env

    def reset(self, seed: int | None = None, options: dict | None = None):
        obs, infos = self._env.reset(seed=seed, options=options)
        return _cast(obs), infos

    def step(self, actions: dict[str, np.ndarray]):
        obs, rew, term, trunc, infos = self._env.step(actions)
        rew = {a: float(r) for a, r in rew.items()}
        return _cast(obs), rew, term, trunc, infos


def _cast(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {a: np.asarray(o, dtype=np.float32) for a, o in obs.items()}
