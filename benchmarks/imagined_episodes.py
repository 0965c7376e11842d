"""Seconds to turn one imagination round's kept trajectories into RLlib episodes: each episode
built whole (``build_imagined_episodes``) vs step by step (``add_env_reset`` + one
``add_env_step`` per imagined step, how it was built before), timed in turn in one run.

The round is the results table's model-based one (configs/results/overcooked.yaml: batch 8000,
imagined_ratio 1, horizon 5 -> 1600 trajectories of 5 steps, Overcooked cramped_room) with
the configs/agents_overcooked.yaml team; the trajectories are random (the cost does not depend
on their values).

    .venv/bin/python benchmarks/imagined_episodes.py
    .venv/bin/python benchmarks/imagined_episodes.py --trajectories 200 --no-record   # quick look
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_times, markdown_table, parse_args, publish  # noqa: E402

CONFIG = "configs/agents_overcooked.yaml"


@dataclasses.dataclass
class Args:
    trajectories: int = 1600
    """imagined trajectories in the round (batch 8000 x imagined_ratio 1 / horizon 5)"""
    horizon: int = 5
    warmup: int = 1
    repeats: int = 5
    record: bool = True


def step_by_step(trajs, module, spec, seq_no: int = 0) -> list:
    """The trajectories as episodes built one ``add_env_step`` per imagined step (the reference
    the whole-episode build is tested equal to; discrete actions, one shared planner)."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.env.multi_agent_episode import MultiAgentEpisode
    from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

    from moedream.policies.imagination import TeamPolicy, decode_actions
    from moedream.policies.names import IMAGINED_PREFIX, planner_id

    agents, b, h = spec.agent_ids, trajs.batch_size, trajs.horizon
    columns = (Columns.ACTION_DIST_INPUTS, Columns.ACTION_LOGP, WEIGHTS_SEQ_NO)
    actions = decode_actions(trajs.action, spec)  # [B, H, N]
    flat = trajs.obs[:, :h].reshape(b * h, spec.n_agents, spec.obs_dim)  # [B * H, N, D]
    policy = TeamPolicy(module, spec, True)
    with torch.no_grad():
        inputs = [x.numpy() for x in policy.dist_inputs(flat)]  # per agent [B * H, K]
        logps = [
            d.logp(torch.as_tensor(actions.reshape(b * h, -1)[:, i])).numpy()
            for i, d in enumerate(policy.distributions(flat))
        ]
    box = gym.spaces.Box(-np.inf, np.inf, (spec.obs_dim,), np.float32)
    episodes = []
    for row in range(b):
        episode = MultiAgentEpisode(
            id_=f"{IMAGINED_PREFIX}{row}",
            observation_space=gym.spaces.Dict({a: box for a in agents}),
            action_space=gym.spaces.Dict({a: gym.spaces.Discrete(spec.action_dim) for a in agents}),
            agent_to_module_mapping_fn=lambda agent_id, ep: planner_id(agent_id, True),
        )
        episode.add_env_reset(observations={a: trajs.obs[row, 0, i] for i, a in enumerate(agents)})
        steps = int(trajs.lengths()[row])
        for t in range(steps):
            end = bool(trajs.terminated[row, t].max() >= 0.5)
            cut = t == steps - 1 and not end
            k = row * h + t
            episode.add_env_step(
                observations={a: trajs.obs[row, t + 1, i] for i, a in enumerate(agents)},
                actions={a: np.int64(actions[row, t, i]) for i, a in enumerate(agents)},
                rewards={a: float(trajs.reward[row, t, i]) for i, a in enumerate(agents)},
                terminateds={**{a: end for a in agents}, "__all__": end},
                truncateds={**{a: cut for a in agents}, "__all__": cut},
                extra_model_outputs={
                    a: dict(zip(columns, (inputs[i][k], np.float32(logps[i][k]), seq_no)))
                    for i, a in enumerate(agents)
                },
            )
            if end:
                break
        episodes.append(episode.to_numpy())
    return episodes


def random_round(spec, b: int, h: int, seed: int = 0):
    """b random trajectories of h steps (Trajectories) for the env spec."""
    from moedream.world_model.trajectory import Trajectories

    rng = np.random.default_rng(seed)
    n = spec.n_agents
    return Trajectories(
        obs=rng.normal(size=(b, h + 1, n, spec.obs_dim)).astype(np.float32),
        action=spec.encode_actions(rng.integers(0, spec.action_dim, size=(b, h, n))),
        reward=rng.normal(size=(b, h, n)).astype(np.float32),
        terminated=np.zeros((b, h, n), np.float32),
    )


def team_module(spec):
    from moedream.platform.agents import AgentsConfig
    from moedream.policies.rl_modules import team_module_spec

    t = AgentsConfig.from_yaml(CONFIG).team
    return team_module_spec(
        spec,
        embedding_dim=t.embedding_dim,
        perceiver_hidden=t.perceiver_hidden,
        planner_hidden=t.planner_hidden,
        reflector_hidden=t.reflector_hidden,
        agent_embedding_dim=t.agent_embedding_dim,
    ).build()


def main() -> None:
    from moedream.envs import env_spec
    from moedream.policies.imagination import build_imagined_episodes

    args = parse_args(Args, __doc__)
    torch.set_num_threads(1)
    spec = env_spec("overcooked", layout="cramped_room", horizon=400)
    module = team_module(spec)
    trajs = random_round(spec, args.trajectories, args.horizon)
    steps = {
        "step by step (before)": lambda: step_by_step(trajs, module, spec),
        "whole episodes (now)": lambda: build_imagined_episodes(trajs, module, spec),
    }
    load_before = os.getloadavg()[0]
    times = interleaved_times(steps, warmup=args.warmup, repeats=args.repeats)
    load_after = os.getloadavg()[0]
    base = statistics.median(times["step by step (before)"])
    rows = [
        [name, statistics.median(t), min(t), max(t), f"{base / statistics.median(t):.2f}x"]
        for name, t in times.items()
    ]
    body = (
        f"{args.trajectories} imagined trajectories of {args.horizon} steps (Overcooked "
        f"cramped_room, team of {CONFIG}) -> MultiAgentEpisodes for PPO's learner, incl. the "
        f"planner's log-probs. Built in turn, {args.repeats} times each after {args.warmup} "
        f"warm-up; 1 torch thread. 1-min load average {load_before:.1f} before, "
        f"{load_after:.1f} after on {os.cpu_count()} logical CPUs (a shared machine: the "
        "ratio is what compares).\n\n"
        + markdown_table(["build", "median s", "min s", "max s", "speed-up (median)"], rows)
    )
    publish("imagined_episodes", "Imagined episodes: built whole vs step by step", body,
            args.record)  # fmt: skip


if __name__ == "__main__":
    main()
