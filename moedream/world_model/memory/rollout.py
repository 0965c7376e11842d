"""One episode's live memory and imagination through the composed experts.

``EpisodeMemory`` keeps what the experts read while an episode (real or imagined) unfolds: the
last K frames for the short-term context and a bounded :class:`SpatialMemory`; the long-term
memory lives in the :class:`MemoryStore` under the same ``episode_id``. Per step the cost is
constant in the episode length.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from moedream.world_model.diffusion import DiffusionSampler
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.memory.network import MemoryBatch
from moedream.world_model.memory.predictor import ComposedPredictor
from moedream.world_model.memory.spatial import SpatialMemory


class EpisodeMemory:
    """Short-term frames + spatial memory of one episode (N agents, obs D, action A, key P)."""

    def __init__(
        self,
        cfg: MemoryConfig,
        *,
        n_agents: int,
        obs_dim: int,
        action_dim: int,
        episode_id: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg, self.episode_id, self.device = cfg, episode_id, torch.device(device)
        self.n_agents, self.obs_dim, self.action_dim = n_agents, obs_dim, action_dim
        self.frames: deque[Tensor] = deque(maxlen=cfg.context_len)  # each [N, D + A]
        self.spatial = SpatialMemory(obs_dim, cfg.key_dim, cfg.spatial_capacity, device=device)
        self.obs: Tensor | None = None  # the latest observation [N, D]

    def reset(self, obs: Tensor, positions: Tensor) -> None:
        """Start from o_0 [N, D] at positions [N, P]."""
        self.frames.clear()
        self.obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        self.spatial.add(positions, self.obs)

    def batch(self, action: Tensor, next_positions: Tensor) -> MemoryBatch:
        """Inputs for predicting the next obs after ``action`` [N, A]; agents then at
        ``next_positions`` [N, P]: a MemoryBatch of one row."""
        if self.obs is None:
            raise RuntimeError("EpisodeMemory.batch called before reset(obs, positions)")
        action = torch.as_tensor(action, dtype=torch.float32, device=self.device)
        k = self.cfg.context_len
        past = list(self.frames)[max(0, len(self.frames) - (k - 1)) :]
        frames = past + [torch.cat([self.obs, action], dim=-1)]  # <= K of [N, D + A]
        context = torch.zeros(k, self.n_agents, self.obs_dim + self.action_dim, device=self.device)
        context[k - len(frames) :] = torch.stack(frames)  # zero frames before the start
        spatial = self.spatial.retrieve(next_positions, self.cfg.spatial_k)  # [N, k, S]
        return MemoryBatch(action[None], context[None], spatial[None])

    def observe(self, action: Tensor, next_obs: Tensor, next_positions: Tensor) -> None:
        """Append a step (real or imagined): action [N, A], then next_obs [N, D] at positions."""
        action = torch.as_tensor(action, dtype=torch.float32, device=self.device)
        self.frames.append(torch.cat([self.obs, action], dim=-1))
        self.obs = torch.as_tensor(next_obs, dtype=torch.float32, device=self.device)
        self.spatial.add(next_positions, self.obs)


@torch.no_grad()
def imagine(
    predictor: ComposedPredictor,
    sampler: DiffusionSampler,
    memories: list[EpisodeMemory],
    actions: Tensor,
    positions: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Roll B episodes forward H steps with given actions, batched over episodes.

    actions [B, H, N, A]; positions [B, H, N, P] of the agents at each imagined step (known from
    the actions in grid worlds; from the predicted state in general). Imagined observations
    enter each episode's memory. Returns the imagined observations [B, H, N, D].
    """
    b, h, n = actions.shape[:3]
    ids = [m.episode_id for m in memories]
    out = []
    for step in range(h):
        batch = MemoryBatch.cat(
            [m.batch(actions[i, step], positions[i, step]) for i, m in enumerate(memories)]
        )
        x0 = predictor.sample(sampler, batch, ids, generator=generator).reshape(
            b, n, -1
        )  # [B, N, D]
        for i, m in enumerate(memories):
            m.observe(actions[i, step], x0[i], positions[i, step])
        out.append(x0)
    return torch.stack(out, dim=1)  # [B, H, N, D]
