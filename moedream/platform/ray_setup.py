"""Starting or joining a Ray cluster the same way from every entry point.

On a laptop (no RAY_ADDRESS), moedream starts a local cluster with more logical CPUs than the
machine has cores (``DEFAULT_LOGICAL_CPUS``): Train workers, Serve replicas, env runners and the
gate actor then fit at once. That is the one way moedream fits them on 2 cores; the configs'
``num_cpus`` per actor are sized for it (see configs/quickstart.yaml). On a cluster
(RAY_ADDRESS set, or inside ``ray job submit``) it joins the existing cluster. What every Ray
worker moedream starts needs from the driver's environment is here too (``worker_env_vars``,
``job_runtime_env``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

DEFAULT_LOGICAL_CPUS = 8
SERVE_PROXY_READY_TIMEOUT_S = "60"
"""Serve's HTTP proxy readiness check timeout in a local cluster (Ray's default: 5 s). On a
loaded 2-core machine the proxy missed three 5 s checks in a row, Serve killed it and the main
job died at its serve stage; the process environment wins if it sets one."""


def init_ray(num_cpus: int | None = None, *, address: str | None = None) -> None:
    """Connect to RAY_ADDRESS (or ``address``) if given, else start a local cluster."""
    import ray

    # Explicit auth mode: token auth silently turns on once ~/.ray/auth_token exists.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if "PYTHONHASHSEED" not in os.environ:
        print(
            "moedream: PYTHONHASHSEED is not set, so runs with one seed can differ (RLlib's "
            "results depend on the string-hash order); `export PYTHONHASHSEED=0` to repeat a "
            "run exactly (the Makefile does)",
            file=sys.stderr,
        )
    env_vars = worker_env_vars()
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
    else:  # the local cluster's processes (Serve's controller and proxy too) inherit it
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", SERVE_PROXY_READY_TIMEOUT_S)
        ray.init(
            num_cpus=num_cpus or DEFAULT_LOGICAL_CPUS,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env_vars},
        )


TRAIN_HEALTH_CHECK_INTERVAL_S = "0.5"  # seconds, see worker_env_vars


def worker_env_vars() -> dict[str, str]:
    """Environment of every Ray worker moedream starts (runtime_env ``env_vars``).

    PYTHONHASHSEED: RLlib's results depend on the iteration order of sets of strings (which set,
    not pinned down yet), and Python randomises string hashes per process, so two runs with the
    same ``seed`` trained differently (checked: identical weights after one iteration with
    PYTHONHASHSEED 1 twice, different ones with 1 and 2). Workers get the driver's value, or
    0; the driver's own is fixed by the Makefile (export PYTHONHASHSEED=0 elsewhere).

    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray Train's controller polls its workers every 2 s by
    default, and a worker's report queue holds one report, so every report, checkpoint and
    run end of a world-model training waits up to that long; moedream's runs report every few
    seconds, so it polls every 0.5 s unless the environment says otherwise.
    """
    return {
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0"),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_HEALTH_CHECK_INTERVAL_S
        ),
    }


def job_runtime_env() -> dict[str, Any]:
    """The code-shipping parts of this job's runtime env (a `ray job submit --working-dir`
    job's moedream must reach the Serve app's build task and replicas too)."""
    import ray

    env = dict(ray.get_runtime_context().runtime_env or {})
    return {k: env[k] for k in ("working_dir", "py_modules", "env_vars") if env.get(k)}
