"""Saving and loading a memory world model: MemoryDenoiserNet weights + every config it needs.

One safetensors file holds the shared network's weights and, in its metadata, the
``MemoryConfig``, the ``DiffusionConfig``, the ``SamplerConfig`` to imagine with, the sizes
(agents, obs, encoded action), a format tag and the sha256 of the weights, so that a Serve
replica or a test rebuilds exactly the trained network. Plain torch + safetensors (no ray).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from moedream.config import ConfigError
from moedream.world_model.diffusion import DiffusionConfig, DiffusionSampler, SamplerConfig
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.memory.network import MemoryDenoiserNet

FORMAT = "moedream-memory-net-v1"
WEIGHTS_FILE = "memory_net.safetensors"


class MemoryCheckpointError(ValueError):
    """A memory checkpoint is missing, unreadable, corrupted or does not fit its config."""


@dataclasses.dataclass
class MemoryCheckpoint:
    """A loaded memory world model: the network (eval mode) and the sampler settings."""

    net: MemoryDenoiserNet
    sampler_config: SamplerConfig
    path: str
    checkpoint_id: str
    """First 16 hex digits of the weights' sha256."""

    @property
    def memory_config(self) -> MemoryConfig:
        return self.net.cfg

    @property
    def diffusion_config(self) -> DiffusionConfig:
        return self.net.denoiser.cfg

    def sampler(self) -> DiffusionSampler:
        return DiffusionSampler(self.diffusion_config, self.sampler_config)


def weights_path(path: str | Path) -> Path:
    """A directory path means ``<dir>/memory_net.safetensors``."""
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() or not path.suffix else path


def _digest(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_memory_checkpoint(
    path: str | Path, net: MemoryDenoiserNet, sampler_config: SamplerConfig
) -> Path:
    """Write ``net`` with its configs to ``path`` (a file, or a directory to hold
    ``memory_net.safetensors``); atomic (readers never see a half-written file)."""
    from safetensors.torch import save_file

    sampler_config.validate("sampler.")
    path = weights_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "memory_config": json.dumps(net.cfg.to_dict()),
        "diffusion_config": json.dumps(net.denoiser.cfg.to_dict()),
        "sampler_config": json.dumps(sampler_config.to_dict()),
        "sizes": json.dumps(
            {"n_agents": net.n_agents, "obs_dim": net.obs_dim, "action_dim": net.action_dim}
        ),
        "sha256": _digest(tensors),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_memory_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> MemoryCheckpoint:
    """Rebuild a saved memory network (eval mode) on ``map_location``; raises
    :class:`MemoryCheckpointError` naming the path and the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    file = weights_path(path)
    if not file.is_file():
        raise MemoryCheckpointError(f"memory checkpoint {str(file)!r} does not exist")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise MemoryCheckpointError(f"{str(file)!r} is not a readable checkpoint ({err})") from None
    if metadata.get("format") != FORMAT:
        raise MemoryCheckpointError(
            f"{str(file)!r} is not a moedream memory checkpoint (format "
            f"{metadata.get('format')!r}, expected {FORMAT!r})"
        )
    sha = metadata.get("sha256", "")
    if sha != _digest(tensors):
        raise MemoryCheckpointError(f"{str(file)!r} is corrupted: weights do not match sha256")
    try:
        memory = MemoryConfig.from_dict(json.loads(metadata["memory_config"]))
        diffusion = DiffusionConfig.from_dict(json.loads(metadata["diffusion_config"]))
        sampler = SamplerConfig.from_dict(json.loads(metadata["sampler_config"]))
        sizes = json.loads(metadata["sizes"])
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise MemoryCheckpointError(
            f"{str(file)!r}: stored configs are unreadable ({err})"
        ) from None
    net = MemoryDenoiserNet(memory, diffusion, **sizes)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise MemoryCheckpointError(
            f"{str(file)!r}: weights do not fit the configs ({err})"
        ) from None
    return MemoryCheckpoint(net.to(map_location).eval(), sampler, str(file), sha[:16])
