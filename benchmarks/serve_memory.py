"""Serving with episode memory: imagine throughput with an episode's memory experts vs the plain
model through the Serve DeploymentHandle at batch 64 (goal: memory >= 0.5x plain), and an
eviction stress (more episodes posted than the cache holds while imagine requests name them):
every request must be answered or refused with a 404, none lost (5xx) or answered wrongly.

Starts its own local Ray (RAY_AUTH_MODE=disabled) and shuts it down. Plain and memory calls
alternate (``interleaved_times``) so that load from other users of the machine hits both alike;
best of ``repeats``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved_times, parse_args, record  # noqa: E402

# serve_throughput sets RAY_AUTH_MODE / RAY_USAGE_STATS_ENABLED and the numpy aliases that
# overcooked_ai_py needs before anything below imports them
from serve_throughput import SMALL_MODEL, free_port, make_request  # noqa: E402

from moedream.envs import env_spec  # noqa: E402
from moedream.platform.serve.schemas import RequestError  # noqa: E402
from moedream.world_model.model import WorldModel, WorldModelConfig  # noqa: E402


@dataclasses.dataclass
class Args:
    batch: int = 64
    """Rows per imagine call."""
    horizon: int = 4
    repeats: int = 3
    threads: int = 1
    """torch threads in the replica."""
    episode_steps: int = 40
    """Real steps posted per episode."""
    capacity: int = 4
    """memory.max_adapters: episodes one replica holds."""
    stress_episodes: int = 12
    """Episodes posted during the eviction stress (> capacity)."""
    stress_requests: int = 96
    """Imagine requests (batch 4) sent during the stress, each naming a posted episode."""
    lora_steps: int = 20


def episode(spec, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(steps + 1, spec.n_agents, spec.obs_dim)).astype(np.float32)
    return obs, rng.integers(0, min(spec.action_dims), size=(steps, spec.n_agents))


def post(handle, spec, args: Args, index: int) -> dict:
    obs, action = episode(spec, args.episode_steps, index)
    body = {"episode_id": f"ep-{index}", "obs": obs, "actions": action, "seed": index}
    return handle.remember_episode.remote(body).result()


def throughput(args: Args, spec, handle) -> list[list]:
    post(handle, spec, args, 0)
    plain = make_request(spec, args.batch, args.horizon)
    with_memory = {**plain, "episode_id": "ep-0"}
    times = interleaved_times(
        {
            "plain": lambda: handle.imagine.remote(plain).result(),
            "memory": lambda: handle.imagine.remote(with_memory).result(),
        },
        warmup=1,
        repeats=args.repeats,
    )
    transitions = args.batch * args.horizon
    best = {name: min(t) for name, t in times.items()}
    return [[name, transitions / best[name], best["plain"] / best[name]] for name in best]


def eviction_stress(args: Args, spec, handle) -> dict:
    """Posts ``stress_episodes`` episodes one after another while a pool sends imagine requests
    naming any episode posted so far; counts answers, 404s and anything else."""
    posted: list[int] = []
    outcomes = {"answered": 0, "404": 0, "other": 0}

    def ask(seed: int) -> str:
        pick = np.random.default_rng(seed).integers(len(posted))  # any episode posted so far
        req = {**make_request(spec, 4, args.horizon, seed), "episode_id": f"ep-{posted[pick]}"}
        try:
            out = handle.imagine.remote(req).result()
            return "answered" if np.isfinite(out["obs"]).all() else "other"
        except RequestError as err:
            return "404" if "episode_id" == err.field else "other"
        except Exception:  # noqa: BLE001 - counted: a lost request
            return "other"

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        post(handle, spec, args, 100)
        posted.append(100)
        futures = [pool.submit(ask, seed) for seed in range(args.stress_requests)]
        for index in range(101, 100 + args.stress_episodes):
            post(handle, spec, args, index)
            posted.append(index)
        for future in futures:
            outcomes[future.result()] += 1
    outcomes["wall_s"] = time.perf_counter() - start
    return outcomes


def main(args: Args) -> None:
    import ray
    from ray import serve

    from moedream.platform.serve import APP_NAME, DEPLOYMENT_NAME, build_app

    torch.set_num_threads(args.threads)
    spec = env_spec("overcooked")
    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig.from_dict(SMALL_MODEL), spec).eval()
    path = str(model.save(os.path.join(tempfile.mkdtemp(prefix="serve_memory_"), "wm.safetensors")))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        memory = {"max_adapters": args.capacity, "lora_steps": args.lora_steps,
                  "lora_validation": 0.0}  # fmt: skip
        user_config = {"checkpoint": path, "num_threads": args.threads, "max_batch": args.batch,
                       "max_body_bytes": 64 * 2**20, "memory": memory}  # fmt: skip
        serve.run(build_app(user_config), name=APP_NAME, route_prefix="/")
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
        rows = throughput(args, spec, handle)
        print(rows, flush=True)
        stress = eviction_stress(args, spec, handle)
        cache = handle.episodes.remote().result()
        print(stress, cache, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    report(args, rows, stress, cache)


def report(args: Args, rows: list[list], stress: dict, cache: dict) -> None:
    (_, plain, _), (_, memory, ratio) = rows
    lost = stress["other"]
    body = (
        f"Small world model (overcooked cramped_room spec, d_model 64, 2 MoE layers x 4 experts, "
        f"3 flow-Euler steps), batch {args.batch} x horizon {args.horizon} per imagine call "
        f"through the handle, {args.threads} torch thread(s) in the replica, best of "
        f"{args.repeats}, plain and memory calls alternated, machine shared with other jobs. "
        f"Memory: one posted episode of {args.episode_steps} real steps (LoRA rank 8, "
        f"{args.lora_steps} steps, kept; spatial retrieval unfitted). Transitions/s: plain "
        f"{plain:.0f}, memory {memory:.0f} ({ratio:.2f}x; goal >= 0.5x: "
        f"{'met' if ratio >= 0.5 else 'NOT met'}). Eviction stress: cache of {args.capacity}, "
        f"{args.stress_episodes} episodes posted one after another while 4 threads sent "
        f"{args.stress_requests} imagine requests (batch 4) each naming an episode posted so "
        f"far: {stress['answered']} answered, {stress['404']} refused 404 (evicted), {lost} lost "
        f"(5xx or other) in {stress['wall_s']:.1f} s; the replica counted "
        f"{cache['evictions']} evictions, {cache['hits']} hits, {cache['misses']} misses "
        f"(goal no request lost: {'met' if lost == 0 else 'NOT met'})."
    )
    record("serve_memory", "Serving with episode memory: throughput and eviction", body)


if __name__ == "__main__":
    main(parse_args(Args, __doc__))
