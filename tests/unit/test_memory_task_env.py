"""The memory task env: PettingZoo API, determinism, cue and tile semantics."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from moedream.config import ConfigError
from moedream.envs import env_spec, make_env
from moedream.envs.memory_task import (
    MemoryTaskConfig,
    MemoryTaskEnv,
    ObsLayout,
    move,
    positions_from_obs,
)


def _rollout(env: MemoryTaskEnv, seed: int, action_seed: int = 0):
    rng = np.random.default_rng(action_seed)
    obs, infos = env.reset(seed=seed)
    frames, rewards = [obs], []
    while env.agents:
        actions = {a: int(rng.integers(0, env.action_space(a).n)) for a in env.agents}
        obs, rew, term, trunc, infos = env.step(actions)
        frames.append(obs)
        rewards.append(rew)
    return frames, rewards, infos


def test_parallel_api():
    parallel_api_test(MemoryTaskEnv(MemoryTaskConfig(cue_delay=6)), num_cycles=50)


def test_registry_and_spec():
    env = make_env("memory", grid_size=4, cue_delay=5)
    assert isinstance(env, MemoryTaskEnv)
    spec = env_spec("memory", grid_size=4, cue_delay=5)
    assert spec.agent_ids == ("agent_0", "agent_1")
    assert spec.obs_dims == (MemoryTaskConfig(grid_size=4).obs_dim,) * 2
    assert spec.action_kind == "discrete" and spec.action_dims == (5 + 3,) * 2


def test_seeded_determinism_and_seed_changes_episode():
    env = MemoryTaskEnv()
    a, ra, _ = _rollout(env, seed=3)
    b, rb, _ = _rollout(env, seed=3)
    for fa, fb in zip(a, b, strict=True):
        for agent in fa:
            np.testing.assert_array_equal(fa[agent], fb[agent])
    assert ra == rb
    c, _, _ = _rollout(env, seed=4)
    assert any(not np.array_equal(fa["agent_0"], fc["agent_0"]) for fa, fc in zip(a, c))


def test_cue_shown_first_then_hidden_then_revealed():
    cfg = MemoryTaskConfig(cue_delay=7)
    env, lay = MemoryTaskEnv(cfg), ObsLayout.of(cfg)
    frames, _, infos = _rollout(env, seed=11)
    cue = infos["agent_0"]["cue"]
    assert len(frames) == cfg.horizon + 1
    assert (
        frames[0]["agent_0"][lay.cue].argmax() == cue and frames[0]["agent_0"][lay.cue].sum() == 1
    )
    assert frames[0]["agent_1"][lay.cue].sum() == 0  # only agent_0 sees it by default
    for f in frames[1:-1]:
        assert f["agent_0"][lay.cue].sum() == 0 and f["agent_1"][lay.cue].sum() == 0
    assert frames[cfg.cue_delay]["agent_0"][lay.query] == 1.0
    for agent in ("agent_0", "agent_1"):
        assert frames[-1][agent][lay.cue].argmax() == cue  # the reveal


def test_reward_counts_correct_answers():
    cfg = MemoryTaskConfig(cue_delay=3)
    env = MemoryTaskEnv(cfg)
    _, infos = env.reset(seed=0)
    cue = infos["agent_0"]["cue"]
    for _ in range(cfg.cue_delay):
        _, rew, term, _, _ = env.step({"agent_0": 0, "agent_1": 0})
        assert rew["agent_0"] == 0.0 and not term["agent_0"]
    wrong = 5 + (cue + 1) % cfg.n_cues
    _, rew, term, _, _ = env.step({"agent_0": 5 + cue, "agent_1": wrong})
    assert rew == {"agent_0": 0.5, "agent_1": 0.5} and all(term.values())
    assert env.agents == []
    with pytest.raises(RuntimeError, match="reset"):
        env.step({"agent_0": 0, "agent_1": 0})


def test_tiles_are_a_function_of_position_and_positions_decode():
    cfg = MemoryTaskConfig(cue_delay=40)
    env, lay = MemoryTaskEnv(cfg), ObsLayout.of(cfg)
    frames, _, _ = _rollout(env, seed=5)
    seen: dict[tuple, int] = {}
    revisits = 0
    for f in frames:
        for agent in f:
            pos = tuple(positions_from_obs(f[agent], cfg))
            tile = int(f[agent][lay.tile].argmax())
            revisits += pos in seen
            assert seen.setdefault(pos, tile) == tile
    assert revisits > 10


def test_move_is_the_env_dynamics():
    cfg = MemoryTaskConfig(cue_delay=20)
    env = MemoryTaskEnv(cfg)
    _, infos = env.reset(seed=1)
    rng = np.random.default_rng(1)
    for _ in range(cfg.cue_delay):
        acts = rng.integers(0, 8, size=2)
        expected = move(env.positions, acts, cfg.grid_size)
        _, _, _, _, infos = env.step({"agent_0": acts[0], "agent_1": acts[1]})
        np.testing.assert_array_equal(env.positions, expected)
        np.testing.assert_array_equal(infos["agent_1"]["position"], expected[1])


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="grid_size"):
        MemoryTaskConfig.from_dict({"grid_size": 1})
    with pytest.raises(ConfigError, match="cue_visible_to"):
        MemoryTaskConfig.from_dict({"cue_visible_to": "agent_7"})
