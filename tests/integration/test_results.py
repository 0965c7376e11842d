"""The results runner through the platform's own train_fn, tiny: a model-free and a model-based
variant (its own world model: collect, Ray Train, Serve, gate) on one seed, the model-based run
killed after its second evaluation and resumed in a second pass, then the table; a third pass
trains nothing. (Several seeds, and a seed's own world-model folder and collection seed, are
the runner's and the trainer's bookkeeping: tests/unit/test_results_runner.py and
test_results_variants.py.)"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest

from moedream.results.platform_train import PlatformTrainer
from moedream.results.resume import RunCheckpoints
from moedream.results.runner import points_path, run_all
from moedream.results.spec import spec_from_dict
from moedream.results.summary import summarise
from moedream.results.variants import resolve
from tests.ray_head import free_port
from tests.world_models import SERVED

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EPISODE, BATCH, COLLECTED = 50, 200, 2 * 50  # the model-based row collects 2 random episodes
SEED = 1
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
    # fine-tune the served model every iteration, in the driver: each resume point has a
    # retrained model that a resumed run must serve again
    "imagination.world_model_retrain_every": 1,
    "imagination.world_model.retrain_in_background": False,
    "imagination.world_model.retrain_steps": 5,
}


def tiny_spec() -> dict:
    return {
        "baseline": "model_free",
        "protocol": {
            "seeds": [SEED],
            "budget_real_steps": 2 * BATCH,
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


def test_two_variants_through_the_platform_with_a_resumed_run(ray_cluster, tmp_path):
    import ray

    from moedream.coherence.actor_config import ACTOR_NAME, NAMESPACE

    spec = resolve(spec_from_dict(tiny_spec()))
    trainer = PlatformTrainer(spec, tmp_path, progress=False)
    # The model-based run's sitting is killed after training its second iteration, before
    # evaluating it (the 6th evaluation of the pass, after the model-free run's 3): it resumes
    # from its 2nd evaluation in a new sitting.
    with pytest.raises(Interrupted):
        run_all(spec, InterruptedTrainer(trainer, at=6), tmp_path)
    before = points(tmp_path, "model_based", SEED)
    assert [p["real_steps"] for p in before] == [0, COLLECTED + BATCH]
    ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE), no_restart=True)  # as a new cluster
    assert run_all(spec, trainer, tmp_path) == [("model_based", SEED)]
    check_resumed(trainer, spec, tmp_path, before)

    free = points(tmp_path, "model_free", SEED)
    assert [p["real_steps"] for p in free] == [0, BATCH, 2 * BATCH]
    assert all(math.isnan(p["metrics"]["gate_approve_rate"]) for p in free)
    based = points(tmp_path, "model_based", SEED)
    # The world model's random episodes count: its evaluations sit that much further on; the
    # evaluation closing the budget is the first at or past it.
    assert [p["real_steps"] for p in based] == [0, COLLECTED + BATCH, COLLECTED + 2 * BATCH]
    last = based[-1]["metrics"]
    assert last["imagined_env_steps"] > 0
    assert 0.0 <= last["gate_approve_rate"] <= 1.0 and 0.0 <= last["coherent_fraction"] <= 1.0
    wallclock = [p["wallclock_s"] for p in based]
    assert wallclock == sorted(wallclock)
    for point in free + based:
        assert point["metrics"]["soups_per_episode"] >= 0.0
        assert point["metrics"]["team_return"] >= 0.0  # shaped Overcooked reward
    world_model = tmp_path / "model_based" / f"seed_{SEED}_run" / "prepare" / "data"
    assert list(world_model.glob("*.parquet")), "the run collects its world model's episodes"
    # The untrained team (initialised from the seed) meets the same fixed-seed evaluation
    # episodes in both variants.
    for key in ("team_return", "soups_per_episode"):
        assert free[0]["metrics"][key] == based[0]["metrics"][key]

    markdown = summarise(tmp_path, spec)
    assert "| model_free | 1/1 |" in markdown and "| model_based | 1/1 |" in markdown
    assert run_all(spec, trainer, tmp_path) == []  # finished runs are skipped


class Interrupted(Exception):
    """Stands for the kill of a sitting (the runner's process ends mid-run)."""


class InterruptedTrainer:
    """PlatformTrainer whose evaluation callback raises at its ``at``-th call, before recording
    it (as if the process were killed while the run trained past its resume point)."""

    def __init__(self, trainer: PlatformTrainer, at: int):
        self.trainer, self.at, self.calls = trainer, at, 0

    def resume_point(self, variant, seed):
        return self.trainer.resume_point(variant, seed)

    def __call__(self, variant, seed, callback, **kwargs):
        def interrupting(*args):
            self.calls += 1
            if self.calls == self.at:
                raise Interrupted
            callback(*args)

        self.trainer(variant, seed, interrupting, **kwargs)


def check_resumed(trainer: PlatformTrainer, spec, out: Path, before: list[dict]) -> None:
    """The resumed run kept its first sitting's rows, counted each real step once and came back
    with its episode store and its retrained world model."""
    after = points(out, "model_based", SEED)
    assert after[:2] == before
    # each sitting records what it trained with, the resolved configs included
    assert ["config" in p for p in after] == [True, False, True]
    resolved = after[2]["config"]["resolved"]
    assert resolved["agents"]["seed"] == SEED and resolved["prepare"]["collect"]["seed"] == SEED
    # The restored real-step count goes on: the iteration the killed sitting trained past its
    # resume point is neither counted nor lost.
    assert [p["real_steps"] for p in after] == [0, COLLECTED + BATCH, COLLECTED + 2 * BATCH]
    assert after[2]["wallclock_s"] > after[1]["wallclock_s"]
    assert after[2]["metrics"]["imagined_env_steps"] > before[1]["metrics"]["imagined_env_steps"]
    checkpoints = RunCheckpoints(trainer.run_dir(spec.variants[1], SEED))
    final = checkpoints.latest()
    assert (final.evaluations, final.team_real_steps) == (3, 2 * BATCH)
    with open(checkpoints.path(final) / "algorithm_state.pkl", "rb") as f:
        provider = pickle.load(f)["moedream_imagination"]
    # the episode store came back (the first sitting's batch + the resumed one's) ...
    assert provider["store"]["added_steps"] == 2 * BATCH
    # ... and the resumed iteration fine-tuned the model the first sitting had retrained
    assert provider["checkpoint_version"] == 2
    info = json.loads((Path(provider["checkpoint"]).parent / "retrain.json").read_text())
    assert Path(info["source_checkpoint"]).parent.name == "retrain_0"
