"""Memory experts for the diffusion world model, composed by PoCE.

- :mod:`.config`: ``MemoryConfig`` (experts on/off, alphas, form, context, LoRA, spatial).
- :mod:`.compose`: ``compose_predictions`` (the two PoCE forms, pure function).
- :mod:`.network`: ``MemoryDenoiserNet`` (context/spatial encoders + ``Denoiser``), batches.
- :mod:`.spatial`: ``SpatialMemory`` and ``retrieve_nearest`` (observations keyed by position).
- :mod:`.long_term`: ``MemoryStore`` (per-episode test-time LoRA adapters, LRU-bounded).
- :mod:`.predictor`: ``ComposedPredictor`` (experts -> ``predict_fn`` for DiffusionSampler).
- :mod:`.rollout`: ``EpisodeMemory`` (one episode's live memory) and one-step/imagined rollouts.
"""

from moedream.world_model.memory.compose import compose_predictions
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.memory.long_term import MemoryStore
from moedream.world_model.memory.network import (
    EpisodeHistory,
    MemoryBatch,
    MemoryDenoiserNet,
    train_memory_net,
    transitions,
)
from moedream.world_model.memory.predictor import ComposedPredictor
from moedream.world_model.memory.spatial import SpatialMemory, retrieve_nearest

__all__ = [
    "ComposedPredictor",
    "EpisodeHistory",
    "MemoryBatch",
    "MemoryConfig",
    "MemoryDenoiserNet",
    "MemoryStore",
    "SpatialMemory",
    "compose_predictions",
    "retrieve_nearest",
    "train_memory_net",
    "transitions",
]
