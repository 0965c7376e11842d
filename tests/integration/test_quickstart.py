"""The main job end to end on the shared local cluster, with tiny budgets: collect -> Ray Train
(2 workers, expert parallel) -> Serve -> gate -> MBMAPPO with gated imagination -> report."""

from __future__ import annotations

import pytest

from moedream.config import load_yaml
from moedream.platform.quickstart import ENV_CONFIGS, QuickstartConfig, run_quickstart
from tests.ray_head import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Tiny budgets: every stage runs, and the world model is retrained once (the config retrains
# every 2 iterations) and hot-swapped, each with a few optimiser steps: that they learn is
# tested in test_train_distributed.py and test_world_model_retrain.py.
TINY = {
    "collect": {"episodes": 4, "episodes_per_shard": 2},
    "world_model": {"checkpoint_every": 10, "train": {"steps": 10, "log_every": 5, "eval_every": 10}},
    "agents": {"train_batch_size": 800, "minibatch_size": 200, "num_epochs": 2, "iterations": 2,
               "num_env_runners": 1, "imagination": {"horizon": 5, "imagined_ratio": 0.5,
                                                     "world_model": {"retrain_steps": 8}}},
    "eval_episodes": 1,
}  # fmt: skip


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize("env", ["overcooked", "mamujoco"])
def test_quickstart_runs_every_stage_and_writes_its_report(ray_cluster, tmp_path, env):
    data = _merge(load_yaml(ENV_CONFIGS[env]), TINY)
    data.update(name=f"qs_{env}", out=str(tmp_path), http_port=free_port())
    if env == "overcooked":
        data["collect"]["env_options"]["horizon"] = 100
    else:
        data["collect"]["env_options"]["max_episode_steps"] = 100
    out = run_quickstart(QuickstartConfig.from_dict(data))

    run_dir = tmp_path / f"qs_{env}"
    report = (run_dir / "report.md").read_text()
    for png in ("return_vs_real_steps.png", "gate_rates.png", "expert_load.png"):
        assert (run_dir / png).stat().st_size > 1000, png
        assert png in report
    history = out["agents"]["history"]
    assert len(history) == 2
    # Imagination went through the served world model and the central gate.
    judged = out["gate"]["stats"]
    assert sum(v for k, v in judged.items() if k.endswith("/judged")) > 0, judged
    rates = [
        h["gate/approve_rate"] + h["gate/refine_rate"] + h["gate/reject_rate"] for h in history
    ]
    assert rates == pytest.approx([1.0, 1.0])
    kept = history[-1]["charts/imagined_env_steps_iter"]
    assert history[-1]["learner/imagined_agent_steps"] == pytest.approx(2 * kept)
    # Fitted on 3 tiny episodes here; tests/unit/test_coherence_kernel.py holds the >= 95% bar.
    assert 0.7 <= out["gate"]["holdout_real_approval"] <= 1.0
    losses = [v for k, v in history[-1].items() if k.startswith("losses/")]
    assert losses and all(v == v and abs(v) < 1e6 for v in losses)
    assert out["world_model"]["checkpoint"].endswith("world_model.safetensors")
    # The retrain of iteration 1 went to the run's own folder and is what Serve now serves.
    assert history[-1].get("provider/wm_checkpoint_version") == 1, "no retrain was served"
    assert (run_dir / "world_model_retrain" / "retrain_1" / "world_model.safetensors").is_file()
    assert (run_dir / "agents" / "team" / "tensorboard").is_dir()
