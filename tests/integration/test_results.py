"""The results runner through the platform's own train_fn, tiny: a model-free and a model-based
variant (its own world model per seed: collect, Ray Train, Serve, gate) x 2 seeds, then the
table; a second pass trains nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moedream.results.platform_train import PlatformTrainer
from moedream.results.runner import points_path, run_all
from moedream.results.spec import spec_from_dict
from moedream.results.summary import summarise
from moedream.results.variants import resolve
from tests.ray_head import free_port
from tests.world_models import SERVED

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EPISODE, BATCH, COLLECTED = 50, 200, 2 * 50  # the model-based rows collect 2 random episodes
TEAM = {"embedding_dim": 16, "perceiver_hidden": [16], "planner_hidden": [16],
        "reflector_hidden": [16]}  # fmt: skip
TINY = {
    "env_options.horizon": EPISODE,
    "num_env_runners": 0,  # sample in the driver: no actor start-up
    "train_batch_size": BATCH,
    "minibatch_size": 100,
    "num_epochs": 1,
    "team": TEAM,
}
WORLD_MODEL = {
    "imagination.enabled": True,
    "imagination.provider": "world_model",
    "imagination.updates": 2,
    "imagination.imagined_ratio": 0.25,
    "prepare.collect.episodes": 2,
    "prepare.collect.episodes_per_shard": 1,
    "prepare.world_model.model": SERVED,
    "prepare.world_model.checkpoint_every": 5,
    "prepare.world_model.train.steps": 5,
    "prepare.world_model.train.log_every": 5,
    "prepare.world_model.train.eval_every": 5,
}


def tiny_spec() -> dict:
    return {
        "baseline": "model_free",
        "protocol": {
            "seeds": [0, 1],
            "budget_real_steps": BATCH,  # one training iteration per run
            "eval_every_real_steps": BATCH,
            "eval_episodes": 2,
            "metric": "team_return",
            "threshold": 1.0,
            "hold": 1,
            "final_last_k": 1,
            "bootstrap_reps": 200,
        },
        "train": {
            "agents_config": str(ROOT / "configs/agents_overcooked.yaml"),
            "prepare_config": str(ROOT / "configs/quickstart.yaml"),
            "http_port": free_port(),
        },
        "variants": [
            {"name": "model_free", "overrides": TINY},
            {"name": "model_based", "overrides": {**TINY, **WORLD_MODEL}},
        ],
    }


def points(out: Path, variant: str, seed: int) -> list[dict]:
    return [json.loads(line) for line in points_path(out, variant, seed).read_text().splitlines()]


def test_two_variants_two_seeds_through_the_platform(ray_cluster, tmp_path):
    spec = resolve(spec_from_dict(tiny_spec()))
    trainer = PlatformTrainer(spec, tmp_path, progress=False)
    trained = run_all(spec, trainer, tmp_path)
    assert trained == [("model_free", 0), ("model_free", 1), ("model_based", 0), ("model_based", 1)]

    for seed in (0, 1):
        free = points(tmp_path, "model_free", seed)
        assert [p["real_steps"] for p in free] == [0, BATCH]
        assert all(math.isnan(p["metrics"]["gate_approve_rate"]) for p in free)
        based = points(tmp_path, "model_based", seed)
        # The world model's random episodes count: its evaluations sit that much further on; the
        # evaluation closing the budget is the first at or past it.
        assert [p["real_steps"] for p in based] == [0, COLLECTED + BATCH]
        last = based[-1]["metrics"]
        assert last["imagined_env_steps"] > 0
        assert 0.0 <= last["gate_approve_rate"] <= 1.0 and 0.0 <= last["coherent_fraction"] <= 1.0
        wallclock = [p["wallclock_s"] for p in based]
        assert wallclock == sorted(wallclock)
        for point in free + based:
            assert point["metrics"]["soups_per_episode"] >= 0.0
            assert point["metrics"]["team_return"] >= 0.0  # shaped Overcooked reward
        world_model = tmp_path / "model_based" / f"seed_{seed}_run" / "prepare" / "data"
        assert list(world_model.glob("*.parquet")), "each seed collects its own episodes"
        # The untrained team (initialised from the seed) meets the same fixed-seed evaluation
        # episodes in both variants.
        for key in ("team_return", "soups_per_episode"):
            assert free[0]["metrics"][key] == based[0]["metrics"][key]

    markdown = summarise(tmp_path, spec)
    assert "| model_free | 2/2 |" in markdown and "| model_based | 2/2 |" in markdown
    assert run_all(spec, trainer, tmp_path) == []  # finished runs are skipped
