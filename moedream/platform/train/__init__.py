"""Distributed world-model training on Ray Train with expert parallelism (native or DeepSpeed).

    from moedream.platform.train import DistributedTrainConfig, run_distributed
    result = run_distributed(DistributedTrainConfig.load("configs/world_model_distributed.yaml"))

See docs/distributed_training.md. Modules: ``config`` (typed config + pre-start checks),
``parallel`` (process groups, expert sharding, native / DeepSpeed engines), ``loop`` (the
per-worker loop: data, checkpoints, TensorBoard), ``trainer`` (TorchTrainer), ``check``
(expert-parallel vs single-process equivalence).
"""

from moedream.platform.train.config import DistributedTrainConfig, check_cluster, check_data
from moedream.platform.train.trainer import build_trainer, preflight, run_distributed

__all__ = [
    "DistributedTrainConfig",
    "build_trainer",
    "check_cluster",
    "check_data",
    "preflight",
    "run_distributed",
]
