"""Memory experts of the world model, composed with its denoiser by PoCE.

- :mod:`.config`: ``MemoryConfig`` (experts on/off, alphas, form, LoRA, spatial memory).
- :mod:`.compose`: ``compose_predictions`` (the two PoCE forms, pure function).
- :mod:`.experts`: ``MemoryExperts`` (a WorldModel's per-episode memories) and its
  ``recall(episode_ids)``, the ``memory=`` argument of ``WorldModel.imagine`` / ``transition``.
- :mod:`.spatial`: ``EpisodeSpatialStore`` and ``retrieve_nearest`` (memory keyed by position).
- :mod:`.spatial_adapter`: the learned spatial expert and its training.
- :mod:`.long_term`: ``MemoryStore`` (per-episode test-time LoRA adapters, LRU-bounded).
- :mod:`.checkpoint`: ``save_memory`` / ``load_memory``.
"""

from moedream.world_model.memory.checkpoint import load_memory, save_memory
from moedream.world_model.memory.compose import compose_predictions
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.memory.experts import MemoryExperts, Recall
from moedream.world_model.memory.long_term import MemoryStore
from moedream.world_model.memory.spatial import EpisodeSpatialStore, retrieve_nearest

__all__ = [
    "EpisodeSpatialStore",
    "MemoryConfig",
    "MemoryExperts",
    "MemoryStore",
    "Recall",
    "compose_predictions",
    "load_memory",
    "retrieve_nearest",
    "save_memory",
]
