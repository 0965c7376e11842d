"""The tiny pipeline configs the tests share (the local call, the `ray job submit` one and the
model-based sweep): configs/quickstart*.yaml with every budget cut so each stage runs in
seconds; and the run folder of such a pipeline whose first two stages finished, built once per
test session and copied by each test that runs the later stages.

Every stage runs, and the world model is retrained every iteration (in the background, as the
configs say: iteration 0's fine-tune is served from iteration 1 on) and hot-swapped, each with
a few optimiser steps: that they learn is tested in test_train_distributed.py and
test_world_model_retrain.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from moedream.config import load_yaml, merged
from moedream.platform.quickstart import ENV_CONFIGS, QuickstartConfig

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


TRAINED_STAGES = ("collect", "world_model")
"""The stages whose products are files only (data, checkpoint): the tests share them; the
services (Serve, gate) live in each test's own cluster."""


def shared_tmp(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this session sees (the workers' base temp dirs
    are siblings); the session's own base temp dir without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def trained_run_folder(env: str, shared: Path) -> Path:
    """The run folder of ``tiny_pipeline(env)`` after its collect and world_model stages, made
    by the first test of the session that asks (under a file lock: other workers wait, then
    find both stages recorded and skip them)."""
    from filelock import FileLock

    from moedream.platform.pipeline import run_pipeline
    from tests.ray_head import free_port

    out = shared / f"trained_{env}"
    cfg = QuickstartConfig.from_dict(
        tiny_pipeline(env, name="trained", out=str(out), http_port=free_port())
    )
    with FileLock(f"{out}.lock"):
        run_pipeline(cfg, TRAINED_STAGES)  # a no-op once recorded
    return cfg.run_dir


def copy_run(source: Path, out: Path, name: str) -> Path:
    """``source`` copied to ``out/name``: a run interrupted after the source's stages (the
    pipeline's ledger keys on config fingerprints, not on the name; the world model record
    keeps pointing at the source's checkpoint, which no test writes)."""
    return Path(shutil.copytree(source, out / name))
