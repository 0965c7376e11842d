"""``run_distributed``: the Ray Train ``TorchTrainer`` of a distributed world-model run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moedream.platform.train.config import DistributedTrainConfig, check_cluster, check_data
from moedream.platform.train.loop import train_loop_per_worker

FORWARDED_ENV = ("RAY_AUTH_MODE", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")


def preflight(cfg: DistributedTrainConfig) -> None:
    """Every check that can fail before a worker starts: config, data, cluster capacity."""
    import ray

    check_inputs(cfg)
    check_cluster(cfg, ray.cluster_resources())


def check_inputs(cfg: DistributedTrainConfig) -> None:
    """The checks that need no cluster: config, data, resume checkpoint."""
    cfg.validate()
    check_data(cfg)
    if cfg.resume_from:
        _check_resume(cfg.resume_from)


def _check_resume(path: str) -> None:
    from moedream.config import ConfigError

    folder = Path(path)
    missing = [
        f for f in ("trainer_state.json", "world_model.safetensors") if not (folder / f).is_file()
    ]
    if missing:
        raise ConfigError(
            f"config field `resume_from` = {path!r} is invalid: not a moedream training checkpoint "
            f"(missing {missing}); pass a checkpoint_* folder of an earlier run"
        )


def build_trainer(
    cfg: DistributedTrainConfig,
    *,
    loop: Any = train_loop_per_worker,
    loop_config: dict[str, Any] | None = None,
):
    """The TorchTrainer (gloo on CPU, nccl on GPU) for ``cfg``; ``loop`` defaults to the
    world-model training loop."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = cfg.worker_resources()
    scaling = ScalingConfig(
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
    )
    run = RunConfig(
        name=cfg.name,
        storage_path=_storage_uri(cfg.storage_path),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        worker_runtime_env={
            "env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        },
    )
    return TorchTrainer(
        loop,
        train_loop_config=loop_config
        if loop_config is not None
        else {"train_config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run,
    )


def _storage_uri(path: str) -> str:
    """Local paths made absolute (workers run elsewhere); URIs (s3://, gs://) kept."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_distributed(cfg: DistributedTrainConfig):
    """Train the world model on a Ray cluster (joins RAY_ADDRESS or starts a local one) and
    return the ray.train.Result (``result.checkpoint`` holds world_model.safetensors)."""
    from moedream.platform.ray_setup import init_ray

    cfg = cfg.replace(storage_path=_storage_uri(cfg.storage_path))
    check_inputs(cfg)  # before starting or joining a cluster
    init_ray()
    preflight(cfg)
    if "://" not in cfg.storage_path:
        Path(cfg.storage_path, cfg.name).mkdir(parents=True, exist_ok=True)
    result = build_trainer(cfg).fit()
    if result.error is not None:
        raise result.error
    return result
