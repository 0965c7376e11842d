"""The world-model endpoint under bounded concurrent loopback load while its replica is killed:
requests lost after the client's retry (goal 0) and p50/p99 latency before, during and after.

Starts its own local Ray (RAY_AUTH_MODE=disabled) with Serve on a free loopback port, serves the
small model of serve_throughput.py, and runs ``--clients`` threads, each sending imagine
requests (batch 1, horizon ``--horizon``) through ``WorldModelClient`` with a RetryConfig, for
``--before-s`` seconds; then kills the replica (``ray.kill``: Serve starts a new one) and keeps
the load on until ``--after-s`` seconds after the new replica answered. Phases: requests done
before the kill; requests in flight at the kill or sent before the new replica answered
(closed-loop clients: those in flight wait in their retries); requests sent after that.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table, parse_args, record  # noqa: E402
from serve_throughput import SMALL_MODEL, free_port, make_request  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from moedream.envs import env_spec  # noqa: E402
from moedream.platform.retry import RetryConfig  # noqa: E402
from moedream.world_model.model import WorldModel, WorldModelConfig  # noqa: E402


@dataclasses.dataclass
class Args:
    clients: int = 8
    """Concurrent HTTP clients (threads of this process)."""
    horizon: int = 4
    before_s: float = 15.0
    """Load before the kill."""
    after_s: float = 15.0
    """Load after the new replica answered."""
    attempts: int = 5
    timeout_s: float = 60.0
    """The client's RetryConfig: attempts, seconds per attempt."""
    backoff_s: float = 0.5
    max_recovery_s: float = 180.0
    """Give up (and say so) if no new replica serves within this long."""


@dataclasses.dataclass
class Sent:
    start: float
    seconds: float
    ok: bool
    failed_attempts: int


def client_loop(index: int, url: str, spec, args: Args, stop: threading.Event, out: list) -> None:
    from moedream.platform.serve.client import WorldModelClient

    retry = RetryConfig(attempts=args.attempts, timeout_s=args.timeout_s,
                        backoff_s=args.backoff_s)  # fmt: skip
    client, k = WorldModelClient(url, retry=retry), 0
    while not stop.is_set():
        req = make_request(spec, 1, args.horizon, seed=index * 100_000 + k)
        body = {"start_obs": req["start_obs"].tolist(), "actions": req["actions"].tolist(),
                "horizon": args.horizon, "seed": req["seed"]}  # fmt: skip
        failed_before, start = client.failed_attempts, time.monotonic()
        try:
            client.imagine_json(body)
            ok = True
        except Exception:  # noqa: BLE001 - a lost request: counted
            ok = False
        out.append(
            Sent(start, time.monotonic() - start, ok, client.failed_attempts - failed_before)
        )
        k += 1


def wait_for_new_replica(handle, old_actor_id: str, deadline: float) -> float | None:
    """time.monotonic() when a replica other than ``old_actor_id`` answered, or None."""
    while time.monotonic() < deadline:
        try:
            if handle.stats.remote().result(timeout_s=10)["actor_id"] != old_actor_id:
                return time.monotonic()
        except Exception:  # noqa: BLE001 - no replica yet
            pass
        time.sleep(0.2)
    return None


def phase_row(name: str, sent: list[Sent]) -> list:
    lat = np.array([s.seconds for s in sent if s.ok]) * 1000
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    return [name, len(sent), sum(not s.ok for s in sent),
            sum(s.failed_attempts > 0 for s in sent), sum(s.failed_attempts for s in sent),
            pct(50), pct(99), float(lat.max()) if len(lat) else float("nan")]  # fmt: skip


def main(args: Args) -> None:
    import ray
    from ray import serve

    from moedream.platform.serve import APP_NAME, DEPLOYMENT_NAME, build_app

    torch.set_num_threads(1)
    spec = env_spec("overcooked")
    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig.from_dict(SMALL_MODEL), spec).eval()
    path = str(model.save(os.path.join(tempfile.mkdtemp(prefix="serve_chaos_"), "wm.safetensors")))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"checkpoint": path, "num_threads": 1}), name=APP_NAME,
                  route_prefix="/")  # fmt: skip
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
        victim = handle.stats.remote().result(timeout_s=60)
        stop, sent = threading.Event(), []
        url = f"http://127.0.0.1:{port}"
        threads = [threading.Thread(target=client_loop, args=(i, url, spec, args, stop, sent))
                   for i in range(args.clients)]  # fmt: skip
        for t in threads:
            t.start()
        time.sleep(args.before_s)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        print("killed the replica", flush=True)
        recovered_at = wait_for_new_replica(handle, victim["actor_id"],
                                            killed_at + args.max_recovery_s)  # fmt: skip
        print("new replica serving" if recovered_at else "NO new replica", flush=True)
        time.sleep(args.after_s if recovered_at else 0)
        stop.set()
        for t in threads:
            t.join()
    finally:
        serve.shutdown()
        ray.shutdown()
    report(args, sent, killed_at, recovered_at)


def report(args: Args, sent: list[Sent], killed_at: float, recovered_at: float | None) -> None:
    end = recovered_at if recovered_at is not None else float("inf")
    phases = [
        ("before: done before the kill", [s for s in sent if s.start + s.seconds < killed_at]),
        ("during: in flight at the kill or sent before the new replica answered",
         [s for s in sent if s.start + s.seconds >= killed_at and s.start < end]),
        ("after: sent once the new replica answered", [s for s in sent if s.start >= end]),
    ]  # fmt: skip
    rows = [phase_row(name, part) for name, part in phases]
    table = markdown_table(["phase", "requests", "lost after retry", "requests retried",
                            "failed attempts", "p50 ms", "p99 ms", "max ms"], rows)  # fmt: skip
    lost = sum(r[2] for r in rows)
    recovery = f"{recovered_at - killed_at:.1f} s" if recovered_at else "none within the limit"
    body = (
        f"Small world model of serve_throughput.py, HTTP on loopback, {args.clients} concurrent "
        f"clients (threads of the benchmark process), batch 1 x horizon {args.horizon} per "
        f"request, client RetryConfig(attempts={args.attempts}, timeout_s={args.timeout_s}, "
        f"backoff_s={args.backoff_s}). The replica was killed after {args.before_s:.0f} s; a new "
        f"replica answered {recovery} later; the load ran {args.after_s:.0f} s more. The "
        f"machine was shared with other jobs (2 cores), so latencies are loaded-machine "
        f"figures.\n\n{table}\n\nGoal 0 requests lost after the client's retry: "
        f"{'met' if lost == 0 else 'NOT met'} ({lost} lost)."
    )
    record("serve_chaos", "World-model endpoint: a replica killed under load", body)


if __name__ == "__main__":
    main(parse_args(Args, __doc__))
