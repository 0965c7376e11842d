"""`ray job submit` to a local head: distributed world-model training, and the whole pipeline
(`python -m moedream.platform.jobs.train`) on tiny budgets, resumed after its world model. The
pipeline runs on MaMuJoCo (the local pipeline test, test_quickstart.py, on Overcooked), so
continuous actions go through every stage: Serve, the gate, the team's imagination, the report.

The shared `ray_cluster` fixture has no dashboard (no job server), so this module starts its own
head (one for both tests): `ray start --head --include-dashboard true --block` in a new session with a private temp
dir, submits the job over the dashboard's HTTP address, and stops only that head: SIGTERM to
its `ray start --block`, then SIGKILL to the leftovers of that process group / temp dir (tests/ray_head.py,
shared with test_fake_autoscaling.py). Never `ray stop`: it would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from moedream.data import collect_episodes
from tests.pipelines import TRAINED_STAGES, copy_run, tiny_pipeline
from tests.ray_head import RAY_BIN, check_head_alive, free_port, running_head, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]


def head_env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    # Not the session cluster's RAY_ADDRESS (ray.init exports it): the private head, its job
    # agent and `ray job submit` must not reach for the shared cluster.
    inherited = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return dict(
        inherited,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python`
    )


@pytest.fixture(scope="module")
def local_head():
    """A private head with a dashboard (job server); yields its HTTP address; always stopped."""
    temp_dir = tempfile.mkdtemp(prefix="mdj", dir="/tmp")  # short: unix socket paths <= 107 B
    port, dashboard_port = free_port(), free_port()
    head_args = [
        f"--port={port}", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", "--num-cpus=4",
        # The job agent's HTTP port defaults to 52365, which the session cluster's agent
        # already holds: without a port of its own this head never gets a job agent.
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    with running_head(temp_dir, head_args, head_env()) as head:

        def job_server_up() -> bool:
            check_head_alive(head, temp_dir)
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(job_server_up, 180, "the head's job server", 1.0)
        yield address


def tiny_job_config(path: Path) -> Path:
    config = yaml.safe_load((REPO / "configs" / "world_model_distributed.yaml").read_text())
    config.update(name="job", checkpoint_every=3, progress=True, cpus_per_worker=1)
    config["train"].update(
        steps=6, batch_size=8, window=4, log_every=3, eval_every=3, eval_windows=8, precision="fp32"
    )
    config["model"] = {"d_model": 32, "cond_dim": 32, "moe": {"d_hidden": 32, "num_experts": 4},
                       "diffusion": {"hidden": 32, "layers": 1}}  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def submit_when_an_agent_is_up(submit: list[str], patience_s: float = 120.0):
    """`ray job submit`, retried while the new head's job agent is still starting (its job
    server answers before an agent registers: "No available agent to submit job")."""
    deadline = time.monotonic() + patience_s
    while True:
        job = subprocess.run(
            submit, cwd=REPO, env=head_env(), capture_output=True, text=True, timeout=540
        )
        if "No available agent" not in job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(3.0)


def test_ray_job_submit_trains_and_leaves_a_checkpoint(local_head, tmp_path):
    data = tmp_path / "episodes"
    for shard in range(2):
        collect_episodes(
            "mamujoco", {"max_episode_steps": 20}, 2, data / f"shard-{shard}.parquet", seed=shard
        )
    config = tiny_job_config(tmp_path / "job.yaml")
    storage = tmp_path / "ray_results"
    submission_id = f"moedream-test-{os.getpid()}"
    submit = [
        str(RAY_BIN), "job", "submit", "--address", local_head, "--submission-id", submission_id,
        "--working-dir", ".", "--",
        "python", "-m", "moedream.platform.jobs.train_world_model", "--config", str(config),
        "--data", str(data), "--storage-path", str(storage),
    ]  # fmt: skip
    job = submit_when_an_agent_is_up(submit)
    logs = job.stdout[-4000:] + job.stderr[-4000:]
    assert job.returncode == 0, f"`ray job submit` failed; output:\n{logs}"
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(local_head).get_job_status(submission_id)
    assert status == JobStatus.SUCCEEDED, f"job status {status}; logs:\n{logs}"
    assert "finished at step 6" in job.stdout, logs

    checkpoints = sorted(p for p in (storage / "job").glob("checkpoint_*") if p.is_dir())
    assert checkpoints, f"no checkpoint under {storage / 'job'}"
    assert (checkpoints[-1] / "world_model.safetensors").is_file()
    assert (checkpoints[-1] / "trainer_state.json").is_file()


def test_ray_job_submit_runs_the_whole_pipeline(local_head, trained_run, tmp_path):
    config = tmp_path / "pipeline.yaml"
    data = tiny_pipeline("mamujoco", name="job", out=str(tmp_path / "runs"), http_port=free_port())
    # collected data and a trained world model (Ray Train in a job: the test above): the job
    # resumes the run and starts the services and the team in its own cluster
    run_dir = copy_run(trained_run("mamujoco"), tmp_path / "runs", "job")
    # one iteration, no retrain (tested locally): the job only has to run every stage
    data["agents"].update(iterations=1)
    data["agents"]["imagination"]["world_model_retrain_every"] = 0
    config.write_text(yaml.safe_dump(data))
    submit = [
        str(RAY_BIN), "job", "submit", "--address", local_head, "--working-dir", ".", "--",
        "python", "-m", "moedream.platform.jobs.train", "--config", str(config),
    ]  # fmt: skip
    job = submit_when_an_agent_is_up(submit)
    logs = job.stdout[-6000:] + job.stderr[-4000:]
    assert job.returncode == 0, f"`ray job submit` failed; output:\n{logs}"
    for k, stage in enumerate(["collect", "world_model", "serve", "gate", "agents", "report"], 1):
        assert f"[{k}/6] {stage}" in job.stdout, logs
    assert job.stdout.count("finished earlier") == len(TRAINED_STAGES), logs
    ledger = json.loads((run_dir / "stages.json").read_text())
    assert list(ledger) == ["collect", "world_model", "serve", "gate", "agents", "report"]
    (history,) = ledger["agents"]["record"]["history"]
    # the team imagined through the served model, and the gate judged every trajectory
    kept = history["charts/imagined_env_steps_iter"]
    assert kept > 0 and history["learner/imagined_agent_steps"] == pytest.approx(2 * kept)
    rates = history["gate/approve_rate"] + history["gate/refine_rate"] + history["gate/reject_rate"]
    assert rates == pytest.approx(1.0)
    assert 0.7 <= ledger["gate"]["record"]["holdout_real_approval"] <= 1.0
    assert "team return, trained (eval)" in (run_dir / "report.md").read_text()
    # resuming (skipping recorded stages) is shown locally: tests/integration/test_quickstart.py
