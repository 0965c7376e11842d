"""The tiny pipeline configs the tests share (the local call, the `ray job submit` one and the
model-based sweep): configs/quickstart*.yaml with every budget cut so each stage runs in
seconds.

Every stage runs, and the world model is retrained every iteration (in the background, as the
configs say: iteration 0's fine-tune is served from iteration 1 on) and hot-swapped, each with
a few optimiser steps: that they learn is tested in test_train_distributed.py and
test_world_model_retrain.py.
"""

from __future__ import annotations

from typing import Any

from moedream.config import load_yaml, merged
from moedream.platform.quickstart import ENV_CONFIGS

TINY: dict[str, Any] = {
    "collect": {"episodes": 4, "episodes_per_shard": 2},
    "world_model": {"checkpoint_every": 10, "train": {"steps": 10, "log_every": 5, "eval_every": 10}},
    "agents": {"train_batch_size": 800, "minibatch_size": 200, "num_epochs": 2, "iterations": 2,
               "num_env_runners": 1, "imagination": {"horizon": 5, "imagined_ratio": 0.5,
                                                     "world_model_retrain_every": 1,
                                                     "world_model": {"retrain_steps": 8}}},
    "eval_episodes": 1,
}  # fmt: skip


def tiny_pipeline(env: str, *, name: str, out: str, http_port: int) -> dict[str, Any]:
    """The default pipeline config of ``env`` on tiny budgets and 100-step episodes."""
    data = merged(load_yaml(ENV_CONFIGS[env]), TINY)
    data.update(name=name, out=out, http_port=http_port)
    limit = "horizon" if env == "overcooked" else "max_episode_steps"
    data["collect"]["env_options"][limit] = 100
    return data
