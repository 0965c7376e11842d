"""`moedream sweep`: a real Tune sweep of two tiny MBMAPPO trials on the local cluster."""

from __future__ import annotations

import argparse
import math

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
    unknown = sweep.load_config(
        argparse.Namespace(
            config=write_sweep_yaml(
                tmp_path,
                storage_path,
                search_space={"learning_rate": {"type": "choice", "values": [1]}},
            )
        )
    )
    with pytest.raises(ConfigError, match=r"search_space\.learning_rate"):
        sweep.param_space(unknown, storage_path)


def test_two_tiny_trials_and_summary_table(ray_cluster, tmp_path, storage_path, capsys):
    config = write_sweep_yaml(tmp_path, storage_path)
    args = argparse.Namespace(
        config=config, resume=False, storage_path=None, num_samples=None, max_iterations=None
    )
    assert sweep.run(args) == 0
    out = capsys.readouterr().out
    assert "best trials of tiny" in out and "lr" in out
    with capsys.disabled():
        print(
            out[max(0, out.index("best trials of tiny") - 40) :]
        )  # the summary table, for the log
    cfg = sweep.load_config(args)
    results = sweep.build_tuner(cfg, resume=True).get_results()  # resumable from storage_path
    assert len(results) == 2 and not results.errors
    headers, rows = sweep.summary_rows(results, cfg)
    assert headers[:3] == ["trial", "status", "lr"]
    assert sorted(r[2] for r in rows) == [0.0003, 0.001]
    for row in rows:
        assert row[1] == "OK" and row[4] in (1, 2)  # ASHA (grace period 1) may stop one early
        assert math.isfinite(row[3])  # team return of finished 100-step episodes
        assert row[5] == 200 * row[4]  # real env steps
    assert max(row[4] for row in rows) == 2
