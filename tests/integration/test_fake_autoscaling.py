"""Autoscaling on one machine: Ray's fake multi-node provider scales a private cluster up for a
moedream-shaped job and removes the idle workers afterwards.

The cluster is this test's own (its own GCS port, temp dir and process session), not the shared
`ray_cluster` fixture: a process can drive only one Ray cluster, so the job runs as a separate
driver process, and this test never calls ray.init (it reads node states with a plain GCS
client). tests/ray_head.py starts the `ray start --head --block` process in a new session, so
every process of this cluster (GCS, raylets, autoscaler, the fake worker nodes the autoscaler
starts, their workers) is in its process group and names the private temp dir, and stops only
those processes. It never uses `ray stop`, which would stop every Ray cluster on the machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.ray_head import check_head_alive, free_port, running_head, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

TRAIN_RESOURCE = "moedream_train"  # what a Ray Train world-model worker asks for
HEAD_NODE_TYPE = "ray.head.default"  # the fake provider's fixed head type
MAX_WORKERS = 3


def fake_cluster_config(gcs_address: str) -> dict:
    """A complete autoscaler config (Ray 2.60's wheel lacks the fake provider's example.yaml)."""
    return {
        "cluster_name": "moedream-fake",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {},
        "docker": {},
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            # Env runners' nodes.
            "cpu_worker": {
                "resources": {"CPU": 2, "object_store_memory": 100 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
            # World-model training nodes, as in cluster/*.yaml.
            "gpu_train_worker": {
                "resources": {
                    "CPU": 1,
                    "GPU": 1,
                    TRAIN_RESOURCE: 1,
                    "object_store_memory": 100 * 1024**2,
                },
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


# The job: the gate on the head (0.25 CPU), 4 one-CPU env runners (the head has 1 CPU), and one
# Train-worker-shaped task ({"GPU": 1, "moedream_train": 1}) that only a gpu_train_worker offers.
DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import ray

    ray.init(address=os.environ["FAKE_CLUSTER_ADDRESS"], log_to_driver=False)

    @ray.remote(num_cpus=0.25)
    class Gate:
        def verdict(self, scores):
            return [s >= 0.7 for s in scores]

    @ray.remote(num_cpus=1)
    class EnvRunner:
        def sample(self, seed):
            return ray.get_runtime_context().get_node_id(), sum(range(seed * 1000))

    @ray.remote(num_gpus=1, resources={"moedream_train": 1})
    def train_step():
        return ray.get_runtime_context().get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES")

    gate = Gate.remote()
    ray.get(gate.verdict.remote([]), timeout=60)  # placed on the head before any runner is
    # asked for, so the head's 1 CPU is already 0.25 short: a runner racing the gate there
    # could otherwise take it
    runners = [EnvRunner.remote() for _ in range(4)]
    samples = ray.get([r.sample.remote(i) for i, r in enumerate(runners)], timeout=150)
    train_node, visible = ray.get(train_step.remote(), timeout=150)
    verdicts = ray.get(gate.verdict.remote([0.9, 0.1]), timeout=30)
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    print("RESULT " + json.dumps({
        "samples": samples, "train_node": train_node, "visible": visible,
        "verdicts": verdicts, "nodes": nodes,
    }))
    """
)


def alive_nodes(gcs_client) -> set[str]:
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    infos = gcs_client.get_all_node_info(timeout=10)
    return {node_id.hex() for node_id, info in infos.items() if info.state == GcsNodeInfo.ALIVE}


@pytest.fixture
def fake_cluster():
    """A private autoscaling Ray cluster: yields (gcs address, temp dir); always stopped."""
    from ray._raylet import GcsClient

    # Short path: Ray's unix sockets live under it and socket paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="mdf", dir="/tmp")
    port = free_port()
    address = f"127.0.0.1:{port}"
    config_path = Path(temp_dir) / "autoscaler.json"
    config_path.write_text(json.dumps(fake_cluster_config(address)))
    env = dict(
        os.environ,
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    head_args = [
        f"--port={port}",
        f"--autoscaling-config={config_path}",
        "--num-cpus=1",
        "--object-store-memory=100000000",
        "--include-dashboard=false",
        f"--dashboard-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    ]
    with running_head(temp_dir, head_args, env) as head:

        def gcs_listening() -> bool:
            check_head_alive(head, temp_dir)
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(gcs_listening, 90, "the head's GCS port", 0.5)
        client = GcsClient(address=address)
        wait_for(lambda: len(alive_nodes(client)) == 1, 60, "the head node")
        yield address, temp_dir, client


def test_job_scales_fake_cluster_up_then_idle_workers_are_removed(fake_cluster):
    address, temp_dir, client = fake_cluster
    (head_node,) = alive_nodes(client)

    started = time.monotonic()
    driver = Path(temp_dir) / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, FAKE_CLUSTER_ADDRESS=address, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    job = subprocess.run(
        [sys.executable, str(driver)], env=env, capture_output=True, text=True, timeout=180
    )
    scale_up_s = time.monotonic() - started
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    (line,) = [ln for ln in job.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))

    # Scaled up: the runners needed 4 CPUs the head does not have, on the 2-CPU worker type.
    runner_nodes = {node for node, _ in result["samples"]}
    assert [total for _, total in result["samples"]] == [sum(range(i * 1000)) for i in range(4)]
    assert head_node not in runner_nodes and len(runner_nodes) == 2
    nodes = result["nodes"]
    assert all(nodes[n]["CPU"] == 2 and TRAIN_RESOURCE not in nodes[n] for n in runner_nodes)
    # The Train-shaped task ran on the one node type that offers moedream_train.
    assert nodes[result["train_node"]][TRAIN_RESOURCE] == 1
    assert result["train_node"] not in runner_nodes | {head_node}
    assert result["visible"] == "0"
    assert result["verdicts"] == [True, False]
    assert len(nodes) == 1 + MAX_WORKERS

    # Scaled down: with the job gone, idle workers go after idle_timeout_minutes (6 s).
    finished = time.monotonic()
    wait_for(lambda: alive_nodes(client) == {head_node}, 90, "idle workers to be removed", 2)
    print(f"scale-up + job {scale_up_s:.1f} s, scale-down {time.monotonic() - finished:.1f} s")
