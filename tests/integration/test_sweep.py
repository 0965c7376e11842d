"""`moedream sweep`: a real Tune sweep of two tiny MBMAPPO trials on the local cluster, and an
interrupted sweep (the CLI in a subprocess, stopped with SIGINT) resumed with --resume."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moedream.config import ConfigError
from moedream.platform.commands import sweep

pytestmark = pytest.mark.integration


def write_sweep_yaml(tmp_path, storage_path, **changes) -> str:
    agents = tmp_path / "agents.yaml"
    agents.write_text(
        yaml.safe_dump(
            {
                "env": "overcooked",
                "env_options": {
                    "layout": "cramped_room",
                    "horizon": 100,
                    "shaped_reward_weight": 1.0,
                },
                "num_env_runners": 0,  # each trial samples in its own actor: no runner start-up
                "train_batch_size": 200,
                "minibatch_size": 100,
                "num_epochs": 1,
                "team": {
                    "embedding_dim": 16,
                    "perceiver_hidden": [16],
                    "planner_hidden": [16],
                    "reflector_hidden": [16],
                },
            }
        )
    )
    data = {
        "name": "tiny",
        "storage_path": storage_path,
        "agents": str(agents),
        "search_space": {"lr": {"type": "grid", "values": [0.0003, 0.001]}},
        "num_samples": 1,
        "max_iterations": 2,
        "grace_period": 1,
        "max_concurrent_trials": 2,
    }
    data.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_sweep_config_errors_name_fields(tmp_path, storage_path):
    bad_type = write_sweep_yaml(tmp_path, storage_path, search_space={"lr": {"type": "gaussian"}})
    with pytest.raises(ConfigError, match=r"search_space\.lr"):
        sweep.load_config(argparse.Namespace(config=bad_type))
    missing = write_sweep_yaml(
        tmp_path, storage_path, search_space={"lr": {"type": "uniform", "low": 1}}
    )
    with pytest.raises(ConfigError, match=r"search_space\.lr.*high"):
        sweep.load_config(argparse.Namespace(config=missing))
    with pytest.raises(ConfigError, match="reduction_factor"):
        sweep.load_config(
            argparse.Namespace(config=write_sweep_yaml(tmp_path, storage_path, reduction_factor=1))
        )
    for key, match in [
        ("learning_rate", r"search_space\.learning_rate"),
        ("imagination.horizn", r"search_space\.imagination\.horizn.*horizon"),  # lists fields
    ]:
        search = {key: {"type": "choice", "values": [1]}}
        unknown = write_sweep_yaml(tmp_path, storage_path, search_space=search)
        with pytest.raises(ConfigError, match=match):
            sweep.param_space(sweep.load_config(argparse.Namespace(config=unknown)), storage_path)


def test_param_space_searches_imagination_fields(tmp_path, storage_path):
    """imagination.<field> keys: the settings go to Tune as a dict with the sampler inside;
    every other field keeps the agents config's value."""
    config = write_sweep_yaml(
        tmp_path,
        storage_path,
        search_space={
            "lr": {"type": "grid", "values": [0.001]},
            "imagination.horizon": {"type": "grid", "values": [3, 5]},
        },
    )
    space = sweep.param_space(sweep.load_config(argparse.Namespace(config=config)), storage_path)
    assert space["lr"] == {"grid_search": [0.001]}
    assert space["imagination"]["horizon"] == {"grid_search": [3, 5]}
    assert space["imagination"]["imagined_ratio"] == 1.0 and space["imagination"]["gate"] is True


def test_two_tiny_trials_and_summary_table(ray_cluster, tmp_path, storage_path, capsys):
    # an imagination field too: each trial turns the searched dict back into its settings
    search = {
        "lr": {"type": "grid", "values": [0.0003, 0.001]},
        "imagination.horizon": {"type": "choice", "values": [3]},
    }
    config = write_sweep_yaml(tmp_path, storage_path, search_space=search)
    args = argparse.Namespace(config=config, resume=False, storage_path=None, num_samples=None,
                              max_iterations=None, max_real_env_steps=None)  # fmt: skip
    assert sweep.run(args) == 0
    out = capsys.readouterr().out
    assert "best trials of tiny" in out and "lr" in out and "TERMINATED" in out
    with capsys.disabled():
        print(
            out[max(0, out.index("best trials of tiny") - 40) :]
        )  # the summary table, for the log
    cfg = sweep.load_config(args)
    results = sweep.build_tuner(cfg, resume=True).get_results()  # resumable from storage_path
    assert len(results) == 2 and not results.errors
    headers, rows = sweep.summary_rows(results, cfg)
    # the YAML was written with sorted keys: the searched columns come in that order
    assert headers[:5] == ["trial", "status", "imagination", "imagination.horizon", "lr"]
    assert sorted(r[4] for r in rows) == [0.0003, 0.001]
    for row in rows:
        assert row[2] == "model-free" and row[3] == 3  # imagination off: horizon unused
        # no statuses given: OK / ERROR; ASHA (grace period 1) may stop one early
        assert row[1] == "OK" and row[6] in (1, 2)
        assert math.isfinite(row[5])  # team return of finished 100-step episodes
        assert row[7] == 200 * row[6]  # real env steps
    assert max(row[6] for row in rows) == 2
    # each trial's algorithm turned the searched dict back into its ImaginationConfig
    assert {type(r.config["imagination"]).__name__ for r in results} == {"ImaginationConfig"}


def test_resume_without_a_sweep_and_new_sweep_over_one_fail_clearly(tmp_path, storage_path):
    args = argparse.Namespace(
        config=write_sweep_yaml(tmp_path, storage_path),
        resume=True,
        storage_path=None,
        num_samples=None,
        max_iterations=None,
        max_real_env_steps=None,
    )
    with pytest.raises(ConfigError, match=r"--resume: no sweep to resume in .*tiny"):
        sweep.run(args)  # fails before starting Ray
    with pytest.raises(ConfigError, match="checkpoint_every"):
        sweep.load_config(
            argparse.Namespace(config=write_sweep_yaml(tmp_path, storage_path, checkpoint_every=-1))
        )


# ---------------------------------------------------------------------------------------------
# An interrupted sweep resumes: the CLI as a separate driver on the session cluster

REPO = Path(__file__).resolve().parents[2]
RESUME_ITERATIONS = 6


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "moedream.platform.cli", "sweep", *args]


def cli_env(ray_cluster) -> dict[str, str]:
    address = ray_cluster.get_runtime_context().gcs_address
    return {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}


def trial_iterations(exp_dir: Path) -> dict[str, list[int]]:
    """trial folder name -> the training_iteration of every result it reported so far."""
    out = {}
    for result_file in sorted(exp_dir.glob("*/result.json")):
        lines = [ln for ln in result_file.read_text().splitlines() if ln.strip()]
        out[result_file.parent.name] = [json.loads(ln)["training_iteration"] for ln in lines]
    return out


def has_checkpoint(exp_dir: Path, trial: str) -> bool:
    return any((exp_dir / trial).glob("checkpoint_*/*"))


def wait_until_one_finished_one_checkpointed(proc, exp_dir: Path, log: Path, timeout=150.0):
    """Poll the experiment folder until one trial finished and the other has checkpointed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before it was interrupted:\n{log.read_text()[-3000:]}")
        its = trial_iterations(exp_dir) if exp_dir.is_dir() else {}
        done = [t for t, i in its.items() if i and i[-1] == RESUME_ITERATIONS]
        running = [t for t, i in its.items() if i and i[-1] < RESUME_ITERATIONS]
        if done and running and has_checkpoint(exp_dir, running[0]):
            return done[0], running[0]
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no finished + checkpointed trials in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_interrupted_sweep_resumes_where_it_stopped(ray_cluster, tmp_path, storage_path):
    """One trial at a time (FIFO), a checkpoint every iteration: SIGINT the CLI once the first
    trial finished and the second checkpointed, then `--resume`."""
    config = write_sweep_yaml(
        tmp_path,
        storage_path,
        scheduler="fifo",
        max_concurrent_trials=1,
        max_iterations=RESUME_ITERATIONS,
        checkpoint_every=1,
    )
    exp_dir = Path(storage_path) / "tiny"
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cli("--config", config), cwd=REPO, env=cli_env(ray_cluster), stdout=out, stderr=out
        )
        try:
            finished, interrupted = wait_until_one_finished_one_checkpointed(proc, exp_dir, log)
            proc.send_signal(signal.SIGINT)  # Tune saves the experiment state and returns
            code = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    first = log.read_text()
    assert code == 130, first[-3000:]
    assert "--resume" in first and "unfinished trial" in first
    before = trial_iterations(exp_dir)
    assert before[finished] == list(range(1, RESUME_ITERATIONS + 1))
    assert 1 <= len(before[interrupted]) < RESUME_ITERATIONS
    assert before[interrupted] == list(range(1, len(before[interrupted]) + 1))

    resumed = subprocess.run(
        cli("--config", config, "--resume"),
        cwd=REPO,
        env=cli_env(ray_cluster),
        capture_output=True,
        text=True,
        timeout=150,
    )
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "best trials of tiny" in output and output.count("TERMINATED") >= 2
    print(output[output.index("best trials of tiny") - 40 :])  # the summary, for the log

    # the same experiment folder, the same two trials
    assert sorted(p.name for p in Path(storage_path).iterdir()) == ["tiny"]
    after = trial_iterations(exp_dir)
    assert sorted(after) == sorted(before)
    # the finished trial was not run again
    assert after[finished] == before[finished]
    # the interrupted one continued from its checkpoint (no restart at iteration 1) to the end
    new = after[interrupted][len(before[interrupted]) :]
    assert new and 1 < new[0] <= before[interrupted][-1] + 1, (before, after)
    assert new == list(range(new[0], RESUME_ITERATIONS + 1))
    cfg = sweep.load_config(argparse.Namespace(config=config))
    assert set(sweep.trial_statuses(cfg).values()) == {"TERMINATED"}


# ---------------------------------------------------------------------------------------------
# A model-based sweep: two trials imagine through one served world model and one gate actor


@pytest.mark.slow
def test_model_based_sweep_trials_share_one_served_world_model(
    ray_cluster, trained_run, tmp_path, storage_path, capsys
):
    from moedream.coherence.gate import get_gate
    from moedream.platform.quickstart import QuickstartConfig
    from moedream.platform.serve.deploy import served_checkpoint
    from moedream.platform.serve.names import APP_NAME, DEPLOYMENT_NAME
    from moedream.platform.serve.runner import checkpoint_fingerprint
    from tests.pipelines import copy_run, tiny_pipeline
    from tests.ray_head import free_port

    # the pipeline's data and world model are made (tests/integration/test_quickstart.py shows
    # those stages); the sweep resumes it: serve and gate, then the trials
    copy_run(trained_run("overcooked"), tmp_path, "mb")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline_data = tiny_pipeline("overcooked", name="mb", out=str(tmp_path), http_port=free_port())
    pipeline.write_text(yaml.safe_dump(pipeline_data))
    overrides = {"num_env_runners": 0, "train_batch_size": 200, "minibatch_size": 100,
                 "num_epochs": 1, "imagination": {"world_model_retrain_every": 0}}  # fmt: skip
    config = write_sweep_yaml(
        tmp_path, storage_path, name="mb_sweep", agents="", pipeline=str(pipeline),
        agents_overrides=overrides, budget="real_env_steps", max_real_env_steps=200,
        grace_period=200, search_space={"imagination.horizon": {"type": "grid", "values": [3, 5]}},
    )  # fmt: skip
    args = argparse.Namespace(config=config, resume=False, storage_path=None, num_samples=None,
                              max_iterations=None, max_real_env_steps=None)  # fmt: skip
    assert sweep.run(args) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out[out.index("best trials of mb_sweep") - 40 :])  # the summary, for the log
    assert "one served world model for every trial" in out

    cfg = sweep.load_config(args)
    results = sweep.build_tuner(cfg, resume=True).get_results()
    assert len(results) == 2 and not results.errors
    ledger = json.loads((tmp_path / "mb" / "stages.json").read_text())
    assert list(ledger) == ["collect", "world_model", "serve", "gate"]  # no agents stage
    collected = ledger["collect"]["record"]["env_steps"]
    headers, rows = sweep.summary_rows(results, cfg, shared_real_steps=collected)
    assert headers[:4] == ["trial", "status", "imagination", "imagination.horizon"]
    assert sorted(r[3] for r in rows) == [3, 5]
    for row in rows:
        assert row[2] == "model-based"
        assert row[-1] == 200 + collected  # the trial's real steps + the shared collection
    for result in results:
        assert result.metrics["moedream"]["imagined_env_steps_lifetime"] > 0
        assert result.metrics["training_iteration"] == 1  # stopped by the real-step budget
        assert result.metrics["moedream"]["real_env_steps_lifetime"] == 200
    # one Serve app, still serving the pipeline's world model (no trial swapped it) ...
    world_model = ledger["world_model"]["record"]["checkpoint"]
    served = served_checkpoint(APP_NAME, DEPLOYMENT_NAME)
    assert served["id"] == checkpoint_fingerprint(world_model)[0]
    # ... and one gate actor, which judged both trials' imagination
    gate_cfg = QuickstartConfig.from_yaml(pipeline).gate_actor_config()
    stats = ray_cluster.get(get_gate(gate_cfg).stats.remote())
    judged = sum(v for k, v in stats.items() if k.endswith("/judged"))
    imagined = sum(r.metrics["moedream"]["imagined_env_steps_lifetime"] for r in results)
    assert judged > 0 and imagined > 0, stats


def test_pipeline_sweep_rejects_what_trials_cannot_share(tmp_path, storage_path):
    from moedream.platform.quickstart import DEFAULT_CONFIG

    retrain = write_sweep_yaml(tmp_path, storage_path, agents="", pipeline=str(DEFAULT_CONFIG))
    with pytest.raises(ConfigError, match="world_model_retrain_every.*hot-swap"):
        sweep.base_agents_config(sweep.load_config(argparse.Namespace(config=retrain)))
    overrides = {"imagination": {"world_model_retrain_every": 0}}
    for key in ("gate.approve_h7", "imagination.provider"):
        shared = write_sweep_yaml(
            tmp_path, storage_path, agents="", pipeline=str(DEFAULT_CONFIG),
            agents_overrides=overrides, search_space={key: {"type": "choice", "values": [1]}},
        )  # fmt: skip
        with pytest.raises(ConfigError, match=rf"search_space\.{key}.*share one served"):
            sweep.base_agents_config(sweep.load_config(argparse.Namespace(config=shared)))
    both = write_sweep_yaml(tmp_path, storage_path, pipeline=str(DEFAULT_CONFIG))
    with pytest.raises(ConfigError, match="exactly one of `agents`"):
        sweep.load_config(argparse.Namespace(config=both))
    no_budget = write_sweep_yaml(tmp_path, storage_path, budget="real_env_steps")
    with pytest.raises(ConfigError, match="max_real_env_steps"):
        sweep.load_config(argparse.Namespace(config=no_budget))
