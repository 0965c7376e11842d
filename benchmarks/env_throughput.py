"""Env steps/s: the raw env vs our PettingZoo wrapper vs through RLlib's MultiAgentEnvRunner,
for Overcooked cramped_room and MaMuJoCo HalfCheetah 2x3, in one run. Goal: wrapper overhead
<= 10% of raw.

"Raw" does the same work the wrapper does, without the wrapper: OvercookedEnv.step plus the
same observation encoding (featurize_state_mdp), and gymnasium_robotics' own parallel env.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table, record  # noqa: E402

from moedream.envs import make_env  # noqa: E402


@dataclasses.dataclass
class Args:
    steps: int = 4000
    """Joint steps per measurement."""
    repeats: int = 5
    """Best of this many measurements (the machine is shared)."""
    rllib: bool = True
    """Also measure through RLlib's env runner."""


def _best_interleaved(fns, repeats: int) -> list[float]:
    """Best of ``repeats`` for each fn, alternating them so machine load hits both alike."""
    best = [0.0] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = max(best[i], fn())
    return best


def raw_overcooked(steps: int) -> float:
    from overcooked_ai_py.mdp.actions import Action
    from overcooked_ai_py.mdp.overcooked_env import OvercookedEnv
    from overcooked_ai_py.mdp.overcooked_mdp import OvercookedGridworld

    from moedream.envs import _compat  # noqa: F401

    env = OvercookedEnv.from_mdp(
        OvercookedGridworld.from_layout_name("cramped_room"), horizon=400, info_level=0
    )
    env.reset(regen_mdp=False)
    env.featurize_state_mdp(env.state)  # builds the planner once, outside the timing
    acts = np.random.default_rng(0).integers(0, 6, size=(steps, 2))
    start = time.perf_counter()
    for a0, a1 in acts:
        state, _, done, _ = env.step((Action.INDEX_TO_ACTION[a0], Action.INDEX_TO_ACTION[a1]))
        env.featurize_state_mdp(state)
        if done:
            env.reset(regen_mdp=False)
    return steps / (time.perf_counter() - start)


def raw_mamujoco(steps: int) -> float:
    from gymnasium_robotics import mamujoco_v1

    env = mamujoco_v1.parallel_env("HalfCheetah", "2x3", max_episode_steps=1000)
    return _run_parallel(env, steps)


def wrapped(name: str, steps: int) -> float:
    return _run_parallel(make_env(name), steps)


def _run_parallel(env, steps: int) -> float:
    env.reset(seed=0)
    agents = list(env.possible_agents)
    rng = np.random.default_rng(0)
    spaces = {a: env.action_space(a) for a in agents}
    if hasattr(spaces[agents[0]], "n"):
        acts = [
            {a: int(x) for a, x in zip(agents, row)}
            for row in rng.integers(0, 6, (steps, len(agents)))
        ]
    else:
        shape = spaces[agents[0]].shape
        acts = [
            {a: rng.uniform(-1, 1, shape).astype(np.float32) for a in agents} for _ in range(steps)
        ]
    start = time.perf_counter()
    for joint in acts:
        env.step(joint)
        if not env.agents:
            env.reset()
    return steps / (time.perf_counter() - start)


def rllib_runner(name: str, steps: int) -> float:
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner

    from moedream.envs import register_rllib_envs

    register_rllib_envs()
    config = (
        PPOConfig()
        .environment(f"moedream/{name}", env_config={})
        .multi_agent(policies={"shared"}, policy_mapping_fn=lambda aid, *a, **k: "shared")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=1)
    )
    runner = MultiAgentEnvRunner(config=config)
    runner.sample(num_timesteps=200, random_actions=True)  # warm-up
    start = time.perf_counter()
    episodes = runner.sample(num_timesteps=steps, random_actions=True)
    elapsed = time.perf_counter() - start
    done = sum(e.env_steps() for e in episodes)
    runner.stop()
    return done / elapsed


def main(args: Args) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rows = []
    for name, raw in (("overcooked", raw_overcooked), ("mamujoco", raw_mamujoco)):
        raw_sps, wrap_sps = _best_interleaved(
            [lambda: raw(args.steps), lambda: wrapped(name, args.steps)], args.repeats
        )
        rllib_sps = rllib_runner(name, args.steps) if args.rllib else float("nan")
        overhead = raw_sps / wrap_sps - 1.0
        rows.append(
            [
                name,
                raw_sps,
                wrap_sps,
                f"{100 * overhead:+.1f}%",
                rllib_sps,
                "yes" if overhead <= 0.10 else "NO",
            ]
        )
        print(rows[-1], flush=True)
    table = markdown_table(
        [
            "env",
            "raw steps/s",
            "wrapper steps/s",
            "wrapper overhead",
            "RLlib env runner steps/s",
            "overhead <= 10%",
        ],
        rows,
    )
    note = (
        "Joint (all-agent) steps per second with random actions, best of "
        f"{args.repeats} x {args.steps} steps. The RLlib figure includes RLlib's connectors "
        "and episode bookkeeping (random actions, no model forward pass)."
    )
    record(
        "env_throughput",
        "Env throughput: raw vs wrapper vs RLlib env runner",
        note + "\n\n" + table,
    )


if __name__ == "__main__":
    main(Args())
