"""Imagined joint transitions per second (batch 256, few-step sampler) vs the real MaMuJoCo
HalfCheetah 2x3 env's steps per second, both measured in the same run.

The model is the configs/world_model.yaml one, untrained (speed does not depend on the
weights). Goal: imagination >= 1x the real env.

    .venv/bin/python benchmarks/imagination_speed.py
    .venv/bin/python benchmarks/imagination_speed.py --horizon 4 --no-record   # quick look
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402
from moedream.envs import env_spec, make_env  # noqa: E402
from moedream.world_model.diffusion import SamplerConfig  # noqa: E402
from moedream.world_model.model import WorldModel, WorldModelConfig  # noqa: E402

ENV = ("mamujoco", {"scenario": "HalfCheetah", "agent_conf": "2x3"})


@dataclasses.dataclass
class Args:
    batch_size: int = 256
    horizon: int = 16
    sampler_steps: tuple[int, ...] = (1, 4)
    """few-step sampler settings to measure (flow-matching Euler steps)"""
    env_steps: int = 3000
    threads: int = 1
    record: bool = True


def real_env_steps_per_s(steps: int) -> float:
    """Random-action steps/s of one real env (resets included)."""
    name, options = ENV
    env = make_env(name, **options)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        actions = {a: env.action_space(a).sample() for a in env.agents}
        env.step(actions)
        if not env.agents:
            env.reset()
    return steps / (time.perf_counter() - start)


def imagined_per_s(model: WorldModel, args: Args, num_steps: int) -> tuple[float, float]:
    """(joint transitions/s, seconds) of one imagine() call of batch x horizon."""
    spec = model.spec
    rng = np.random.default_rng(0)
    start_obs = rng.normal(size=(args.batch_size, spec.n_agents, spec.obs_dim)).astype(np.float32)
    plan = rng.uniform(
        -1, 1, size=(args.batch_size, args.horizon, spec.n_agents, spec.action_dim)
    ).astype(np.float32)
    sampler = SamplerConfig(scheduler="flow_euler", num_steps=num_steps)
    model.imagine(start_obs, plan[:, :2], 2, sampler=sampler)  # warm-up
    start = time.perf_counter()
    model.imagine(start_obs, plan, args.horizon, sampler=sampler)
    seconds = time.perf_counter() - start
    return args.batch_size * args.horizon / seconds, seconds


def main() -> None:
    args = parse_args(Args, __doc__)
    torch.set_num_threads(args.threads)
    env_rate = real_env_steps_per_s(args.env_steps)
    spec = env_spec(ENV[0], **ENV[1])
    model = WorldModel(
        WorldModelConfig.from_yaml("configs/world_model.yaml", section="model"), spec
    )
    rows = [["real env (1 process)", "-", f"{env_rate:.0f}", "1.00x"]]
    for num_steps in args.sampler_steps:
        rate, seconds = imagined_per_s(model, args, num_steps)
        rows.append(
            [
                f"imagine, batch {args.batch_size}, H={args.horizon}",
                num_steps,
                f"{rate:.0f}",
                f"{rate / env_rate:.2f}x",
            ]
        )
        print(rows[-1], flush=True)
    table = markdown_table(["source", "sampler steps", "joint transitions/s", "vs real env"], rows)
    body = (
        f"MaMuJoCo HalfCheetah 2x3 (2 agents, obs 12, action 3). World model: configs/world_model.yaml "
        f"(untrained weights; context up to {model.config.backbone.max_context} steps recomputed each step, "
        f"no KV cache), flow-matching Euler sampler, {args.threads} thread(s). Goal: >= 1x the real env.\n\n{table}"
    )
    publish("imagination_speed", "Imagination speed vs the real env", body, args.record)


if __name__ == "__main__":
    main()
