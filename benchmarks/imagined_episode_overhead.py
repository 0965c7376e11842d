"""CPU seconds of one PPO update on the same imagined env steps cut into many short episodes
(one per imagined branch, as MBMAPPO learns them) vs a few long ones, and of the learner's
connector pass (episodes -> train batch, GAE) alone, timed in turn in one run.

What it isolates: the per-episode work of an imagination round's update, apart from its SGD.
The rows are the results table's model-based round (configs/results/overcooked.yaml: batch
8000, imagined_ratio 1, horizon 5 -> 1600 branches of 5 steps) against 16 episodes of 500
steps (the same 8000 env steps), random trajectories (the cost does not depend on their
values), the configs/agents_overcooked.yaml team, 6 epochs, minibatch 1000. CPU time is this
process's: on a shared machine the wall clock mostly measures the wait for a core.

    .venv/bin/python benchmarks/imagined_episode_overhead.py
    .venv/bin/python benchmarks/imagined_episode_overhead.py --repeats 1 --no-record   # quick look
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402

CONFIG = "configs/agents_overcooked.yaml"


@dataclasses.dataclass
class Args:
    env_steps: int = 8000
    """imagined env steps in each set (one round at batch 8000, imagined_ratio 1)"""
    short: int = 5
    """steps per episode of the many-episode set (the imagination horizon)"""
    long: int = 500
    """steps per episode of the few-episode set"""
    num_epochs: int = 6
    minibatch_size: int = 1000
    repeats: int = 3
    record: bool = True


def random_trajectories(spec, b: int, h: int, seed: int = 0):
    """b random trajectories of h steps (sparse 0/1 observations like Overcooked's features)."""
    from moedream.world_model.trajectory import Trajectories

    rng = np.random.default_rng(seed)
    n = spec.n_agents
    return Trajectories(
        obs=(rng.random((b, h + 1, n, spec.obs_dim)) < 0.1).astype(np.float32),
        action=spec.encode_actions(rng.integers(0, spec.action_dim, size=(b, h, n))),
        reward=(rng.normal(size=(b, h, n)) * 0.1).astype(np.float32),
        terminated=np.zeros((b, h, n), np.float32),
    )


def cpu_and_wall(call) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    call()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(args: Args) -> dict[str, dict[str, list[float]]]:
    """Per episode set: CPU and wall seconds of the connector pass and of the whole update."""
    from moedream.platform.agents import AgentsConfig, build_algo_config
    from moedream.platform.ray_setup import init_ray
    from moedream.policies.imagination import build_imagined_episodes

    init_ray()
    cfg = AgentsConfig.from_yaml(CONFIG).replace(
        num_env_runners=0,
        train_batch_size=args.minibatch_size,
        minibatch_size=args.minibatch_size,
        num_epochs=args.num_epochs,
    )
    algo = build_algo_config(cfg, logdir_root=tempfile.mkdtemp()).build_algo()
    try:
        spec, learner = algo.config.env_spec, algo.learner_group._learner
        module = algo.config.get_multi_rl_module_spec(
            spaces=algo.env_runner_group.get_spaces(), inference_only=True
        ).build()
        sets = {
            f"{args.env_steps // h} episodes of {h} steps": build_imagined_episodes(
                random_trajectories(spec, args.env_steps // h, h), module, spec
            )
            for h in (args.short, args.long)
        }
        algo._sample_real()  # the update reads the sampled-steps counter
        times = {name: {k: [] for k in ("connector", "update")} for name in sets}
        for _ in range(args.repeats):
            for name, episodes in sets.items():  # in turn: load hits both alike
                times[name]["connector"].append(cpu_and_wall(lambda e=episodes: learner._learner_connector(
                    rl_module=learner.module, batch={}, episodes=copy.deepcopy(e),
                    shared_data={}, metrics=learner.metrics,
                )))  # fmt: skip
                algo._stage_seconds = {}
                times[name]["update"].append(
                    cpu_and_wall(lambda e=episodes: algo._update(copy.deepcopy(e), args.num_epochs))
                )
        return times
    finally:
        algo.stop()


def main() -> None:
    args = parse_args(Args, __doc__)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    times = measure(args)
    load_after = os.getloadavg()[0]
    rows = []
    for name, parts in times.items():
        median = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in parts.items()}
        rows.append([name, *median["connector"], *median["update"]])
    headers = ["imagined episodes", "connector CPU s", "connector wall s", "update CPU s",
               "update wall s"]  # fmt: skip
    body = (
        f"{args.env_steps} random imagined env steps (Overcooked cramped_room, team of {CONFIG}) "
        f"learnt in one PPO update ({args.num_epochs} epochs, minibatch {args.minibatch_size}), "
        f"cut into episodes two ways; the connector pass (episodes -> train batch, incl. GAE's "
        f"value forward) timed alone and as part of the update (PPO's learner adds one "
        f"bootstrap row per agent episode, so the short episodes also mean more rows). Medians "
        f"of {args.repeats} "
        f"repeats in turn, 1 torch thread, CPU s = this process's CPU time. 1-min load average "
        f"{load_before:.1f} before, {load_after:.1f} after on {os.cpu_count()} logical CPUs "
        "(a shared machine: wall seconds are mostly the wait for a core).\n\n"
        + markdown_table(headers, rows)
    )
    publish("imagined_episode_overhead", "Learner update: many short vs few long imagined "
            "episodes", body, args.record)  # fmt: skip


if __name__ == "__main__":
    main()
