"""Shared fixtures. Unit tests never start Ray; integration tests share one local cluster.

The cluster is started with more logical CPUs than the machine has cores (8 on 2 cores), the
one way moedream fits Train workers, Serve replicas, env runners and the gate at once on a
laptop (see configs/quickstart.yaml). It is stopped at the end of the session: never `ray stop`,
which would stop every Ray process on the machine.

Serve is shut down around every test module, except between modules that ask for
`serve_on_loopback` (Serve with its HTTP proxy on 127.0.0.1 at one port for the session): those
run back to back, after the other integration tests, and share one Serve controller and proxy.
"""

from __future__ import annotations

import os
import sys

import pytest

from moedream.platform.ray_setup import TRAIN_HEALTH_CHECK_INTERVAL_S
from tests.ray_head import free_port, kill_all

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A loaded test machine starts Ray's processes slowly. The driver waits 30 s for the GCS to
# bind its port (settable: raised here). The raylet waits a fixed ~15 s for its dashboard
# agent's port files, then aborts ("Timed out waiting for file .../metrics_agent_port_..."),
# which the driver reports as "The current node timed out during startup"; Ray 2.60 has no
# setting for that wait (RAY_raylet_start_wait_time_s and RAY_agent_register_timeout_ms did
# not change it), so the ray_cluster fixture retries the start once.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
# Ray Train's controller polls its workers (see moedream.platform.ray_setup.worker_env_vars);
# the test cluster, the drivers tests start and the private heads inherit this environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_HEALTH_CHECK_INTERVAL_S)

LOGICAL_CPUS = 8


def pytest_configure(config):
    """One torch thread in the test process: on 2 cores shared with Ray workers, OpenMP's
    spinning threads slow small-model tests down several times over."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for every integration test of the session."""
    import ray

    from moedream.platform.ray_setup import worker_env_vars

    start_args = dict(
        num_cpus=LOGICAL_CPUS,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=False,
        runtime_env={"env_vars": worker_env_vars()},  # as init_ray: same seed, same run
    )
    children = _child_pids()
    try:
        ray.init(**start_args)
    except Exception as first:  # noqa: BLE001 - Ray raises a bare Exception on this timeout
        _retry_start(ray, start_args, first, children)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve was never started in this session
        pass
    ray.shutdown()


def _retry_start(ray, start_args: dict, first: Exception, children: set[int]) -> None:
    """Starts the cluster a second time after a failed start: on a loaded machine the raylet
    can miss Ray's fixed 30 s registration deadline ("The current node timed out during
    startup"). A second failure fails the session, naming both errors."""
    print(f"\nRay's local cluster did not start ({first}); retrying once", file=sys.stderr)
    _stop_half_started_node(children)
    try:
        ray.init(**start_args)
    except Exception as second:
        raise RuntimeError(
            f"Ray's local cluster failed to start twice: first {first!r}, then {second!r}; "
            "if the machine is overloaded, run the integration tests when it is less busy"
        ) from second


def _child_pids() -> set[int]:
    import psutil

    return {proc.pid for proc in psutil.Process().children(recursive=True)}


def _stop_half_started_node(children: set[int]) -> None:
    """Kills the processes a failed `ray.init` left (its GCS, raylet, monitors: this process's
    children not in ``children``; Ray keeps no handle to stop them), so they do not run beside
    the retry."""
    import psutil

    kill_all([p for p in psutil.Process().children(recursive=True) if p.pid not in children])


SHARED_SERVE = "serve_on_loopback"
SHARING_MODULES = pytest.StashKey[set]()  # names of the modules whose tests share Serve


def pytest_collection_modifyitems(config, items):
    """Integration tests first, the modules that share Serve last among them and back to back
    (Serve starts once for all of them), then the unit tests (a stable sort: the order within
    each group stays). With pytest-xdist (`make test`: --dist loadfile --no-loadscope-reorder,
    which hands out modules in this order) the long integration modules start first and the
    many short unit modules fill in at the end, so the workers finish together."""
    sharing = {_module_name(item) for item in items if SHARED_SERVE in item.fixturenames}
    config.stash[SHARING_MODULES] = sharing

    def group(item) -> int:
        if item.get_closest_marker("integration") is None:
            return 2
        return 1 if _module_name(item) in sharing else 0

    items.sort(key=group)


def _module_name(item) -> str | None:
    module = getattr(item, "module", None)  # None for items that are not Python functions
    return module.__name__ if module is not None else None


def _shutdown_serve() -> None:
    ray = sys.modules.get("ray")  # never imported: no cluster, nothing to stop
    if ray is not None and ray.is_initialized():
        from ray import serve

        serve.shutdown()


@pytest.fixture(scope="module", autouse=True)
def no_serve_left_to_the_next_module(request):
    """Shuts Serve down before and after each test module that does not share it: `serve.start`
    on a running Serve keeps the first caller's settings, so a module that starts it without
    an HTTP proxy (or on another port) would leave the next one with no proxy on its port."""
    shares = request.module.__name__ in request.config.stash.get(SHARING_MODULES, set())
    if not shares:
        _shutdown_serve()  # left running by a module that shares it
    yield
    if not shares:
        _shutdown_serve()


@pytest.fixture(scope="session")
def serve_http_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def serve_on_loopback(ray_cluster, serve_http_port) -> int:
    """Serve with its HTTP proxy on 127.0.0.1 at the session's port (returned). Modules asking
    for it leave Serve running for the next one: each deletes the apps it deployed."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": serve_http_port})  # no-op if up
    return serve_http_port


@pytest.fixture(scope="session")
def trained_run(ray_cluster, tmp_path_factory):
    """``trained_run(env)``: the tiny pipeline's run folder (tests/pipelines.py) after its
    collect and world_model stages, made once per session for all workers; copy it
    (tests.pipelines.copy_run) before running later stages in it."""
    from tests.pipelines import shared_tmp, trained_run_folder

    return lambda env: trained_run_folder(env, shared_tmp(tmp_path_factory))


@pytest.fixture
def storage_path(tmp_path):
    """Where Train/Tune/RLlib write, instead of ~/ray_results."""
    path = tmp_path / "ray_results"
    path.mkdir()
    return str(path)
