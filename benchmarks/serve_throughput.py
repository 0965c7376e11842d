"""World-model serving throughput: imagined transitions/s through the Serve DeploymentHandle vs
calling ``WorldModel.imagine`` in-process, at batch 1, 32 and 256 in one run (goal: handle >=
0.8x in-process at 256), and HTTP p50/p99 latency and throughput with 32 concurrent clients on
loopback (bounded in requests and seconds).

Starts its own local Ray (RAY_AUTH_MODE=disabled) and shuts it down. The replica and this
process use the same torch thread count (``--threads``), so the ratio measures serving
overhead, not a different thread budget. Measurements alternate in-process and handle calls so
that load from other users of the machine hits both alike; best of ``repeats``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table, record  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from moedream.envs import (
    _compat,  # noqa: E402,F401  (numpy aliases before overcooked_ai_py)
    env_spec,  # noqa: E402
)
from moedream.world_model.model import WorldModel, WorldModelConfig  # noqa: E402


@dataclasses.dataclass
class Args:
    batches: tuple[int, ...] = (1, 32, 256)
    """Rows per imagine call."""
    horizon: int = 4
    """Imagined steps per call."""
    repeats: int = 3
    """Best of this many timed calls per batch size (after one warm-up)."""
    threads: int = 1
    """torch threads in this process and in the replica."""
    http_clients: int = 32
    http_requests: int = 320
    """Total HTTP requests (batch 1, horizon ``horizon``) across the clients."""
    http_seconds: float = 60.0
    """Stop the HTTP phase after this long even if requests remain."""
    max_batch_size: int = 16
    """Serve batching: requests per @serve.batch call."""


SMALL_MODEL = {
    "d_model": 64,
    "cond_dim": 64,
    "backbone": {"num_layers": 2, "num_heads": 4, "max_context": 8},
    "moe": {"d_hidden": 128, "num_experts": 4, "top_k": 2},
    "rssm": {"deter": 64, "hidden": 64, "stoch": 16},
    "diffusion": {"hidden": 128, "layers": 2},
    "sampler": {"num_steps": 3},
    "heads": {"hidden": 64, "ensemble_size": 4, "ensemble_hidden": 64},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_request(spec, batch: int, horizon: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "start_obs": rng.normal(size=(batch, spec.n_agents, spec.obs_dim)).astype(np.float32),
        "actions": rng.integers(0, min(spec.action_dims), size=(batch, horizon, spec.n_agents)),
        "horizon": horizon,
        "seed": seed,
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def handle_vs_inprocess(args: Args, model: WorldModel, handle) -> list[list]:
    rows = []
    for batch in args.batches:
        req = make_request(model.spec, batch, args.horizon)

        def local(req=req):
            gen = torch.Generator().manual_seed(req["seed"])
            model.imagine(req["start_obs"], req["actions"], req["horizon"], generator=gen)

        def remote(req=req):
            handle.imagine.remote(req).result()

        local(), remote()  # warm-up
        best_local, best_remote = float("inf"), float("inf")
        for _ in range(args.repeats):
            best_local = min(best_local, timed(local))
            best_remote = min(best_remote, timed(remote))
        transitions = batch * args.horizon
        rows.append([batch, transitions / best_local, transitions / best_remote,
                     best_local / best_remote, best_remote - best_local])  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def http_load(args: Args, spec, url: str) -> dict:
    from moedream.platform.serve.client import WorldModelClient

    deadline = time.time() + args.http_seconds
    per_client = max(1, args.http_requests // args.http_clients)

    def client_loop(index: int) -> tuple[list[float], int]:
        client, latencies, errors = WorldModelClient(url), [], 0
        for k in range(per_client):
            if time.time() > deadline:
                break
            req = make_request(spec, 1, args.horizon, seed=index * 1000 + k)
            body = {"start_obs": req["start_obs"].tolist(), "actions": req["actions"].tolist(),
                    "horizon": args.horizon, "seed": req["seed"]}  # fmt: skip
            start = time.perf_counter()
            try:
                client.imagine_json(body)
                latencies.append(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - counted and reported
                errors += 1
        return latencies, errors

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.http_clients) as pool:
        outcomes = list(pool.map(client_loop, range(args.http_clients)))
    wall = time.perf_counter() - start
    latencies = np.array([lat for lats, _ in outcomes for lat in lats])
    errors = sum(e for _, e in outcomes)
    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "rps": len(latencies) / wall,
        "transitions_per_s": len(latencies) * args.horizon / wall,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
    }


def main(args: Args) -> None:
    import ray
    from ray import serve

    from moedream.platform.serve import APP_NAME, DEPLOYMENT_NAME, build_app

    torch.set_num_threads(args.threads)
    spec = env_spec("overcooked")
    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig.from_dict(SMALL_MODEL), spec).eval()
    ckpt_dir = tempfile.mkdtemp(prefix="serve_bench_")
    path = str(model.save(os.path.join(ckpt_dir, "world_model.safetensors")))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        user_config = {"checkpoint": path, "num_threads": args.threads, "max_batch_size": args.max_batch_size,
                       "max_batch": max(args.batches), "max_body_bytes": 64 * 2**20}  # fmt: skip
        serve.run(build_app(user_config), name=APP_NAME, route_prefix="/")
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
        rows = handle_vs_inprocess(args, model, handle)
        http = http_load(args, spec, f"http://127.0.0.1:{port}")
        stats = handle.stats.remote().result()
        print(http, stats, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    report(args, rows, http, stats)


def report(args: Args, rows: list[list], http: dict, stats: dict) -> None:
    table = markdown_table(
        [
            "batch",
            "in-process transitions/s",
            "handle transitions/s",
            "handle / in-process",
            "handle overhead s/call",
        ],  # fmt: skip
        rows,
    )
    http_table = markdown_table(
        [
            "clients",
            "requests",
            "errors",
            "wall s",
            "requests/s",
            "transitions/s",
            "p50 ms",
            "p99 ms",
        ],
        [
            [
                args.http_clients,
                http["requests"],
                http["errors"],
                http["wall_s"],
                http["rps"],
                http["transitions_per_s"],
                http["p50_ms"],
                http["p99_ms"],
            ]
        ],  # fmt: skip
    )
    ratio = rows[-1][3]
    body = (
        f"Small world model (overcooked cramped_room spec, d_model 64, "
        f"2 MoE layers x 4 experts, 3 flow-Euler steps), horizon {args.horizon}, "
        f"{args.threads} torch thread(s) in both the driver and the replica, best of {args.repeats}.\n\n"
        f"{table}\n\nGoal handle >= 0.8x in-process at batch {args.batches[-1]}: "
        f"{'met' if ratio >= 0.8 else 'NOT met'} ({ratio:.2f}x).\n\n"
        f"HTTP on loopback, batch 1 x horizon {args.horizon} per request, "
        f"{args.http_clients} concurrent clients (threads in the driver, sharing its 2 cores with "
        f"the replica), Serve max_batch_size {args.max_batch_size}:\n\n{http_table}\n\n"
        f"Observed Serve batch sizes (requests per batch: count): {stats['batch_size_histogram']}."
    )
    record("serve_throughput", "World-model serving: handle vs in-process, HTTP under load", body)


if __name__ == "__main__":
    main(Args())
