"""Environments: one registry, so a name selects an env everywhere (CLI, RLlib, tests).

>>> env = make_env("overcooked", layout="cramped_room")
>>> env = make_env("mamujoco", scenario="HalfCheetah", agent_conf="2x3")
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from moedream.config import ConfigBase, ConfigError
from moedream.envs import _compat  # noqa: F401  numpy-2 aliases, before any overcooked_ai_py import
from moedream.envs.spec import EnvSpec


@dataclasses.dataclass(frozen=True)
class _Entry:
    config_cls: Callable[[], type[ConfigBase]]
    factory: Callable[..., Any]


def _overcooked_cfg():
    from moedream.envs.overcooked import OvercookedConfig

    return OvercookedConfig


def _overcooked(config, render_mode=None):
    from moedream.envs.overcooked import OvercookedParallelEnv

    return OvercookedParallelEnv(config, render_mode=render_mode)


def _mamujoco_cfg():
    from moedream.envs.mamujoco import MaMuJoCoConfig

    return MaMuJoCoConfig


def _mamujoco(config, render_mode=None):
    from moedream.envs.mamujoco import make_mamujoco

    return make_mamujoco(config, render_mode=render_mode)


def _memory_cfg():
    from moedream.envs.memory_task import MemoryTaskConfig

    return MemoryTaskConfig


def _memory(config, render_mode=None):
    from moedream.envs.memory_task import MemoryTaskEnv

    return MemoryTaskEnv(config)


ENVS: dict[str, _Entry] = {
    "overcooked": _Entry(_overcooked_cfg, _overcooked),
    "mamujoco": _Entry(_mamujoco_cfg, _mamujoco),
    "memory": _Entry(_memory_cfg, _memory),
}


def env_names() -> list[str]:
    return sorted(ENVS)


def env_config(name: str, **options: Any) -> ConfigBase:
    """The typed config of env ``name`` with ``options`` applied (validated)."""
    if name not in ENVS:
        raise ConfigError(f"unknown env {name!r}; valid env names: {env_names()}")
    cls = ENVS[name].config_cls()
    try:
        return cls.from_dict(options)
    except ConfigError as err:
        raise ConfigError(f"env {name!r}: {err}") from None


def episode_limit(name: str, **options: Any) -> int | None:
    """Steps per episode of env ``name`` (Overcooked ``horizon``, MuJoCo
    ``max_episode_steps``), or None when the env sets no limit."""
    cfg = env_config(name, **options).to_dict()
    limit = cfg.get("horizon", cfg.get("max_episode_steps"))
    return int(limit) if limit else None


def make_env(name: str, render_mode: str | None = None, **options: Any) -> Any:
    """A PettingZoo ParallelEnv for ``name`` ('overcooked', 'mamujoco', 'memory')."""
    config = env_config(name, **options)  # validates the name and options first
    return ENVS[name].factory(config, render_mode=render_mode)


@functools.cache
def _spec_cached(name: str, options_key: tuple) -> EnvSpec:
    options = dict(options_key)
    env = make_env(name, **options)
    agents = tuple(env.possible_agents)
    obs_dims = tuple(int(_flat_size(env.observation_space(a))) for a in agents)
    first = env.action_space(agents[0])
    if hasattr(first, "n"):
        kind, act_dims = "discrete", tuple(int(env.action_space(a).n) for a in agents)
    else:
        kind, act_dims = "continuous", tuple(int(_flat_size(env.action_space(a))) for a in agents)
    env.close()
    full = env_config(name, **options).to_dict()
    return EnvSpec(name, agents, obs_dims, kind, act_dims, full)


def env_spec(name: str, **options: Any) -> EnvSpec:
    """Agents and space sizes of env ``name`` with ``options`` (cached per configuration)."""
    return _spec_cached(name, tuple(sorted(options.items())))


def _flat_size(space: Any) -> int:
    size = 1
    for d in space.shape:
        size *= d
    return size


def register_rllib_envs() -> None:
    """Register every env with Ray Tune/RLlib as ``moedream/<name>`` (a ParallelPettingZooEnv
    whose agents are never terminated and truncated at once: :func:`termination_wins`).

    RLlib's env config is passed to :func:`make_env` as options.
    """
    from ray.tune.registry import register_env

    for name in ENVS:
        register_env(f"moedream/{name}", lambda cfg, _n=name: rllib_env(_n, **dict(cfg or {})))


def rllib_env(name: str, **options: Any) -> Any:
    """Env ``name`` as RLlib steps it: a ParallelPettingZooEnv of :func:`make_env`, with
    ``__all__`` flags and :func:`termination_wins`."""
    return _rllib_env_class()(make_env(name, **options))


def termination_wins(terminateds: dict[str, bool], truncateds: dict[str, bool]) -> dict:
    """``truncateds`` without the agents ``terminateds`` also ends (Gymnasium: an episode that
    terminated at its time limit is terminated), so that an agent episode RLlib finds truncated
    AND terminated was truncated by the env (moedream.policies.episode_ends)."""
    return {a: bool(v) and not terminateds.get(a, False) for a, v in truncateds.items()}


@functools.cache
def _rllib_env_class() -> type:
    from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv

    class MoedreamRLlibEnv(ParallelPettingZooEnv):
        def step(self, action_dict):
            obs, rewards, terminateds, truncateds, infos = self.par_env.step(action_dict)
            truncateds = termination_wins(terminateds, truncateds)
            terminateds = {**terminateds, "__all__": all(terminateds.values())}
            truncateds["__all__"] = all(truncateds.values())
            return obs, rewards, terminateds, truncateds, infos

    return MoedreamRLlibEnv


__all__ = [
    "EnvSpec",
    "env_config",
    "env_names",
    "env_spec",
    "episode_limit",
    "make_env",
    "register_rllib_envs",
    "rllib_env",
    "termination_wins",
]
