"""The pipeline end to end on the shared local cluster, with tiny budgets: collect -> Ray Train
(2 workers, expert parallel) -> Serve -> gate -> MBMAPPO with gated imagination -> report; a
run interrupted after the world model (the session's `trained_run`, copied) resumes from its
run folder, skipping what finished.

On Overcooked, `make run`'s environment. Every stage on MaMuJoCo (continuous actions through
Serve, the gate and the team) runs in tests/integration/test_job_submit.py: the same stages
twice locally would add minutes to the suite and prove nothing env-specific beyond it."""

from __future__ import annotations

import json

import pytest

from moedream.config import ConfigError
from moedream.platform.pipeline import run_pipeline
from moedream.platform.quickstart import QuickstartConfig, run_quickstart
from tests.pipelines import TRAINED_STAGES, copy_run, tiny_pipeline
from tests.ray_head import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = "overcooked"


def test_pipeline_resumes_runs_every_stage_and_writes_its_report(trained_run, tmp_path, capsys):
    cfg = QuickstartConfig.from_dict(
        tiny_pipeline(ENV, name="qs", out=str(tmp_path), http_port=free_port())
    )
    with pytest.raises(ConfigError, match="stage `collect` .* has not run"):
        run_pipeline(cfg, ["agents"])  # nothing to train agents from yet
    # an interrupted run: it got as far as the world model
    run_dir = copy_run(trained_run(ENV), tmp_path, cfg.name)
    first = run_pipeline(cfg, TRAINED_STAGES)
    shards = {p.name: p.stat().st_mtime_ns for p in (run_dir / "data").glob("*.parquet")}
    capsys.readouterr()

    out = run_quickstart(cfg)  # the whole pipeline on the same run folder: resumes
    log = capsys.readouterr().out
    assert log.count("finished earlier") == 2, log[:3000]
    assert "[1/6] collect" in log and "[2/6] world_model" in log
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "data").glob("*.parquet")} == shards
    assert out["world_model"]["checkpoint"] == first["world_model"]["checkpoint"]
    ledger = json.loads((run_dir / "stages.json").read_text())
    assert list(ledger) == ["collect", "world_model", "serve", "gate", "agents", "report"]

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
    # The background retrain started in iteration 0 went to the run's own folder and Serve
    # serves it from iteration 1 on (iteration 1's is cancelled when the run ends).
    assert [h.get("provider/wm_checkpoint_version") for h in history] == [0, 1]
    assert (run_dir / "world_model_retrain" / "retrain_0" / "world_model.safetensors").is_file()
    assert (run_dir / "agents" / "team" / "tensorboard").is_dir()

    # Everything finished: a third run skips every stage and trains nothing.
    capsys.readouterr()
    again = run_pipeline(cfg)
    assert capsys.readouterr().out.count("finished earlier") == 6
    assert again["agents"]["checkpoint"] == out["agents"]["checkpoint"]
