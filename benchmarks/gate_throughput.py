"""Coherence gate throughput: trajectory-steps/s and latency for batches of 64 trajectories x 15
steps, the kernel alone (judge + truncate) vs through the central gate actor
(judge_and_refine), in one run.

Real data: Overcooked cramped_room (2 agents x 96 features) random-policy windows; the gate is
fitted on other episodes. Through the actor, every call pays a ``ray.put`` of a fresh batch, the
actor call, and the atomic write of the counters to disk (the gate persists after every call).
"Pipelined" keeps ``in_flight`` calls outstanding (the actor still runs them one at a time).
Starts its own local Ray (RAY_AUTH_MODE=disabled) and shuts it down at the end.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table, parse_args, record  # noqa: E402

from moedream.coherence.kernel import GateConfig, Normalizer, judge, truncate  # noqa: E402
from moedream.platform.commands.calibrate_gate import (  # noqa: E402
    collect_random_episodes,
    windows_from_episodes,
)


@dataclasses.dataclass
class Args:
    env: str = "overcooked"
    """Env whose real windows are judged (overcooked or mamujoco)."""
    batch: int = 64
    """Trajectories per judge call."""
    horizon: int = 15
    """Steps per trajectory."""
    calls: int = 200
    """Timed calls per mode (after 10 warm-up calls)."""
    in_flight: int = 8
    """Outstanding calls in the pipelined actor mode."""
    model_outputs: bool = True
    """Judge with a world model's ensemble outputs (the model terms) and truncate, as the gate
    does on imagination; --no-model-outputs judges the bare real windows."""


def real_batches(args: Args):
    """A fitted normalizer and a pool of real batches [batch, horizon+1, N, D], with a tiny
    untrained world model's outputs on them (``--model-outputs``: what the gate receives
    from Serve, so the model terms run too; calibrated on other windows)."""
    episodes = collect_random_episodes(args.env, n_episodes=12, max_steps=150, seed=0)
    config = GateConfig()
    normalizer = Normalizer.fit([e["obs"] for e in episodes[:6]], config)
    windows = windows_from_episodes(episodes[6:], args.horizon, stride=1)
    if args.model_outputs:
        windows = with_model_outputs(args, windows, normalizer, config)
    rng = np.random.default_rng(0)
    pool = [windows.select(rng.choice(len(windows.obs), args.batch)) for _ in range(16)]
    return config, normalizer, pool


def with_model_outputs(args: Args, windows, normalizer: Normalizer, config: GateConfig):
    from gate_faults import MODEL

    from moedream.coherence.model_calibration import calibrate_model_terms, model_view
    from moedream.envs import env_spec
    from moedream.world_model.model import WorldModel, WorldModelConfig

    backbone = {**MODEL["backbone"], "max_context": args.horizon}
    model_cfg = WorldModelConfig.from_dict({**MODEL, "backbone": backbone})
    model = WorldModel(model_cfg, env_spec(args.env))
    data = {k: getattr(windows, k) for k in ("obs", "action", "reward", "terminated")}
    model.fit_normalization(data)
    half = len(windows.obs) // 2
    calibrate_model_terms(normalizer, model, {k: v[:half] for k, v in data.items()}, config)
    return model_view(model, {k: v[half:] for k, v in data.items()})


def summarize(
    mode: str, latencies: list[float], steps_per_call: int, wall: float | None = None
) -> list:
    lat = np.asarray(latencies) * 1e3
    wall = wall if wall is not None else float(np.sum(latencies))
    return [
        mode,
        len(latencies) * steps_per_call / wall,
        float(np.median(lat)),
        float(np.percentile(lat, 99)),
    ]


def time_kernel(args: Args, config, normalizer, pool) -> list[float]:
    for b in pool[:10]:
        truncate(judge(b, normalizer, config), b, config)
    out = []
    for i in range(args.calls):
        start = time.perf_counter()
        batch = pool[i % len(pool)]
        truncate(judge(batch, normalizer, config), batch, config)  # the actor's default refine
        out.append(time.perf_counter() - start)
    return out


def time_actor(ray, gate, args: Args, pool) -> list[float]:
    ray.get([gate.judge_and_refine.remote(b, args.env, "bench") for b in pool[:10]])
    out = []
    for i in range(args.calls):
        start = time.perf_counter()
        ray.get(gate.judge_and_refine.remote(ray.put(pool[i % len(pool)]), args.env, "bench"))
        out.append(time.perf_counter() - start)
    return out


def time_pipelined(ray, gate, args: Args, pool) -> tuple[list[float], float]:
    """Latency of each call from submit to result, with ``in_flight`` calls outstanding."""
    submitted: dict = {}
    latencies: list[float] = []
    start = time.perf_counter()
    for i in range(args.calls):
        if len(submitted) >= args.in_flight:
            done, _ = ray.wait(list(submitted), num_returns=1)
            latencies.append(time.perf_counter() - submitted.pop(done[0]))
        ref = gate.judge_and_refine.remote(ray.put(pool[i % len(pool)]), args.env, "bench")
        submitted[ref] = time.perf_counter()
    while submitted:
        done, _ = ray.wait(list(submitted), num_returns=1)
        latencies.append(time.perf_counter() - submitted.pop(done[0]))
    return latencies, time.perf_counter() - start


def main(args: Args) -> None:
    torch.set_num_threads(1)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from moedream.coherence.gate import GateActorConfig, get_or_create_gate

    config, normalizer, pool = real_batches(args)
    steps = args.batch * args.horizon
    rows = [summarize("kernel alone", time_kernel(args, config, normalizer, pool), steps)]
    print(rows[-1], flush=True)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    try:
        with tempfile.TemporaryDirectory() as state_dir:
            gate = get_or_create_gate(
                GateActorConfig(kernel=config, actor_name="bench_gate", namespace="bench"),
                normalizer,
                state_dir,
            )
            rows.append(summarize("actor, sequential", time_actor(ray, gate, args, pool), steps))
            print(rows[-1], flush=True)
            lat, wall = time_pipelined(ray, gate, args, pool)
            rows.append(summarize(f"actor, {args.in_flight} in flight", lat, steps, wall))
            print(rows[-1], flush=True)
            ray.kill(gate, no_restart=True)
    finally:
        ray.shutdown()
    table = markdown_table(
        ["mode", "trajectory-steps/s", "median latency (ms)", "p99 latency (ms)"], rows
    )
    note = (
        f"{args.env} real windows, batches of {args.batch} trajectories x {args.horizon} steps, "
        f"{args.calls} timed calls per mode; default GateConfig (L2 drift, stall and support "
        "checks"
        + (
            ", and the model terms on a tiny untrained world model's ensemble outputs"
            if args.model_outputs
            else "; no model outputs"
        )
        + "), judge then truncate (`judge_and_refine` in the actor). The actor rows include "
        "`ray.put` of the batch, the call, and the atomic JSON "
        "write of the counters after every call. Load average at the end: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine: figures are noisy)."
    )
    record("gate_throughput", "Coherence gate throughput: kernel vs actor", note + "\n\n" + table)


if __name__ == "__main__":
    main(parse_args(Args, __doc__.splitlines()[0]))
