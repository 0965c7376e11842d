"""Saving and loading :class:`MemoryExperts`: config, weights and every episode's memory.

One safetensors file beside the world model's own checkpoint. Tensors: the spatial adapter
and fusion weights (``weights/``), each episode's spatial memory tables (``spatial/<i>/``),
the LoRA store's frozen base and each episode's adapter (``lora_base/``, ``lora/<i>/``).
Metadata: a format tag and version, the memory config, the world model's config and env spec
(a memory only fits the model it was built on), the episode ids in eviction order, and the
sha256 of the tensors. Loading rebuilds the memory on a given world model and refuses one
saved with another config or env.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from moedream.config import ConfigError
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.memory.experts import MemoryExperts
from moedream.world_model.memory.spatial import EpisodeSpatialStore
from moedream.world_model.model import WorldModel
from moedream.world_model.safetensors_file import (
    CheckpointError,
    read_checkpoint,
    write_checkpoint,
)

FORMAT = "moedream.world_model.memory"
FORMAT_VERSION = "1"
MEMORY_FILE = "memory.safetensors"
LEGACY_TRANSITION_KEY = "cell_and_neighbours"  # the only key before the config had the field


def _file(path: str | Path) -> Path:
    """A directory path means ``<dir>/memory.safetensors``."""
    path = Path(path)
    return path / MEMORY_FILE if path.is_dir() else path


def _model_identity(model: WorldModel) -> dict[str, str]:
    return {
        "world_model_config": json.dumps(model.config.to_dict(), sort_keys=True),
        "env_spec": model.spec.to_json(),
    }


def save_memory(memory: MemoryExperts, path: str | Path) -> Path:
    """Write ``memory`` to ``path`` (a file, or a directory to hold ``memory.safetensors``);
    atomic: readers never see a half-written file."""
    path = _file(path)
    tensors: dict[str, Tensor] = {}
    for name, module in (("spatial_adapter", memory.spatial_adapter),
                         ("spatial_fusion", memory.spatial_fusion)):  # fmt: skip
        for key, value in module.state_dict().items():
            tensors[f"weights/{name}.{key}"] = value
    spatial_ids = list(memory.spatial_stores)
    for i, store in enumerate(memory.spatial_stores.values()):
        for key, value in store.tables().items():
            tensors[f"spatial/{i}/{key}"] = value
    lora_ids: list[str] = []
    last_kept: dict[str, int] = {}
    if memory.store is not None:
        for key, value in memory.store.base_state_dict().items():
            tensors[f"lora_base/{key}"] = value
        for i, (episode_id, weights) in enumerate(memory.store.adapters().items()):
            lora_ids.append(episode_id)
            tensors.update({f"lora/{i}/{key}": value for key, value in weights.items()})
        last_kept = dict(memory.store.last_kept)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "memory_config": json.dumps(memory.cfg.to_dict(), sort_keys=True),
        **_model_identity(memory.model),
        "spatial_episodes": json.dumps(spatial_ids),
        "lora_episodes": json.dumps(lora_ids),
        "lora_last_kept": json.dumps(last_kept),
        "has_lora_store": json.dumps(memory.store is not None),
    }
    return write_checkpoint(path, tensors, metadata)


def load_memory(path: str | Path, model: WorldModel) -> MemoryExperts:
    """Rebuild the memory :func:`save_memory` wrote, on ``model`` (the world model it was
    built on); raises CheckpointError naming the path and the problem."""
    path = _file(path)
    metadata, tensors = _read(path)
    where = repr(str(path))
    for key, expected in _model_identity(model).items():
        if metadata.get(key) != expected:
            raise CheckpointError(
                f"{where} holds a memory of a world model with another {key.replace('_', ' ')}: "
                "load it on the world model it was saved with"
            )
    try:
        stored = json.loads(metadata["memory_config"])
        if isinstance(stored, dict):
            stored.setdefault("transition_key", LEGACY_TRANSITION_KEY)
        cfg = MemoryConfig.from_dict(stored)
        spatial_ids = json.loads(metadata["spatial_episodes"])
        lora_ids = json.loads(metadata["lora_episodes"])
        last_kept = json.loads(metadata["lora_last_kept"])
        has_store = json.loads(metadata["has_lora_store"])
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: stored memory metadata is unreadable ({err})") from None
    device = model.obs_mean.device
    tensors = {k: v.to(device) for k, v in tensors.items()}
    memory = MemoryExperts(model, cfg)
    for name in ("spatial_adapter", "spatial_fusion"):
        weights = _group(tensors, f"weights/{name}.")
        try:
            getattr(memory, name).load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{where}: {name} weights do not fit ({err})") from None
    for i, episode_id in enumerate(spatial_ids):
        tables = _group(tensors, f"spatial/{i}/")
        memory.spatial_stores[episode_id] = EpisodeSpatialStore.from_tables(
            tables, cfg.spatial_capacity
        )
    if has_store:
        store = memory.memory_store()
        base = store.base_state_dict()
        for key, value in _group(tensors, "lora_base/").items():
            base[key].copy_(value)
        for i, episode_id in enumerate(lora_ids):
            store.import_adapter(episode_id, _group(tensors, f"lora/{i}/"))
        store.last_kept.update(last_kept)
    return memory


def _read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    metadata, tensors = read_checkpoint(path, kind="memory", fmt=FORMAT)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has memory format version {metadata.get('format_version')!r}; this "
            f"moedream reads version {FORMAT_VERSION}"
        )
    return metadata, tensors


def _group(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
