"""The MoE-diffusion world model (plain PyTorch, never imports ray).

Public names are imported lazily, so that ``from moedream.world_model import expert_parallel``
(used by moe.py itself) neither cycles nor pays for diffusers::

    from moedream.world_model import WorldModel, WorldModelConfig, TrainConfig
"""

from __future__ import annotations

from moedream.lazy import lazy_getattr

_EXPORTS = {
    "WorldModel": "model",
    "WorldModelConfig": "model",
    "WorldModelState": "model",
    "CheckpointError": "model",
    "LossWeights": "model",
    "BackboneConfig": "backbone",
    "RSSMConfig": "rssm",
    "HeadsConfig": "heads",
    "TrainConfig": "train_local",
    "train_step": "train_local",
    "evaluate": "train_local",
    "Trajectories": "trajectory",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
