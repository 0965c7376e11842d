"""The learned spatial expert (``spatial_mode='adapter'``): a cond offset g(R, cond) from
observations retrieved by position, and its training with the world model frozen.

Shapes: (B)atch, (L) episode steps, (N) agents, (D) obs size, (A) encoded action size,
(P) position key size, (k) retrievals, (C) cond size, (H) imagined steps, X = N * D.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moedream.world_model.memory.spatial import EpisodeSpatialStore
from moedream.world_model.model import WorldModel, WorldModelState

if TYPE_CHECKING:
    from moedream.world_model.memory.experts import MemoryExperts


class SpatialAdapter(nn.Module):
    """g(R, cond) -> cond offset [B, C]: retrieved observations (relative to the current one)
    pooled by attention per agent, then mixed with the condition. Zero at initialisation and
    exactly zero for rows whose retrievals are all padding (a null memory)."""

    def __init__(self, n_agents: int, obs_dim: int, key_dim: int, cond_dim: int, hidden: int):
        super().__init__()
        self.entry = nn.Sequential(
            nn.Linear(obs_dim + key_dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.score = nn.Linear(hidden, 1)
        self.mix = nn.Sequential(nn.Linear(n_agents * hidden + cond_dim, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, cond_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, entries: Tensor, cond: Tensor) -> Tensor:
        """entries [B, N, k, D + P + 1] (last column: valid flag), cond [B, C] -> [B, C]."""
        b = entries.shape[0]
        h = self.entry(entries)  # [B, N, k, H]
        valid = entries[..., -1:] > 0  # [B, N, k, 1]
        score = self.score(h).masked_fill(~valid, -1e9)  # [B, N, k, 1]
        weight = score.softmax(dim=2) * valid.any(dim=2, keepdim=True)  # [B, N, k, 1]
        pooled = (weight * h).sum(dim=2).reshape(b, -1)  # [B, N*H]
        offset = self.out(self.mix(torch.cat([pooled, cond.detach()], dim=-1)))  # [B, C]
        has_memory = valid.flatten(1).any(dim=1, keepdim=True)  # [B, 1]
        return offset * has_memory.to(offset.dtype)


class _CondRecorder:
    """A ``memory`` argument for ``WorldModel.imagine`` that keeps every imagined step's cond
    [B, C] and samples with the plain denoiser."""

    def __init__(self) -> None:
        self.conds: list[Tensor] = []

    def predict_fn(
        self, model: WorldModel, state: WorldModelState, action: Tensor, cond: Tensor
    ) -> None:
        self.conds.append(cond)


def spatial_training_data(memory: MemoryExperts, obs: Tensor, action: Tensor) -> dict[str, Tensor]:
    """Inputs of the spatial adapter along one real episode: cond [L, C], x0 [L, X] and the
    retrievals [L, N, k, D + P + 1] that imagination would see at each step (memory o_0 ..
    o_{t - recent_gap}, queried at the agents' positions in o_t)."""
    cond, x0 = memory.denoiser_pairs(obs, action)
    cfg = memory.cfg
    store = EpisodeSpatialStore(obs.shape[2], cfg.key_dim, cfg.spatial_capacity, obs.device)
    store.add(memory.positions(obs), obs, torch.arange(obs.shape[0], device=obs.device))
    steps = action.shape[0]
    query = memory.positions(obs[:steps])  # [L, N, P]
    gap = memory.recent_gap
    raw = [store.retrieve(query[t], cfg.spatial_k, t - gap) for t in range(steps)]
    if cfg.spatial_capacity < len(store):
        raise ValueError("spatial_training_data: the episode exceeds spatial_capacity")
    return {"cond": cond, "x0": x0, "entries": memory.spatial_entries(raw, obs[:steps])}


@torch.no_grad()
def imagined_training_data(
    memory: MemoryExperts,
    episodes: Sequence[tuple[Tensor, Tensor]],
    prefixes: Sequence[int],
    *,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Corrective data for the spatial adapter: from each real prefix (every episode x every
    prefix length) the model imagines ``adapter_horizon`` steps with the real actions (plain
    denoiser: the short-term expert alone); per imagined step its cond [M, C], the
    retrievals from the prefix's memory at the imagined positions [M, N, k, S] and the target
    x0 [M, X] that turns the imagined observation into the real next one."""
    model, cfg, h = memory.model, memory.cfg, memory.cfg.adapter_horizon
    parts = []
    for p in prefixes:
        usable = [(o, a) for o, a in episodes if a.shape[0] >= p + h]
        if not usable:
            continue
        ids = [f"__adapter_{i}" for i in range(len(usable))]
        obs = torch.stack([o[: p + 1] for o, _ in usable])  # [B, p+1, N, D]
        act = torch.stack([a for _, a in usable])  # [B, L, N, A]
        for i, episode_id in enumerate(ids):
            memory.remember(episode_id, obs[i], act[i, :p], finetune=False)
        recorder = _CondRecorder()
        state = model.observe(obs, act[:, :p])
        traj = model.imagine(state, act[:, p : p + h], h, generator=generator, memory=recorder)
        conds = torch.stack(recorder.conds, 1)  # [B, H, C]
        current = model._tensor(traj.obs[:, :-1]).float()  # [B, H, N, D] imagined o_t
        real_next = torch.stack([o[p + 1 : p + 1 + h] for o, _ in usable])  # [B, H, N, D]
        entries = [
            memory.retrievals(current[:, j], ids, torch.full((len(ids),), p + j)) for j in range(h)
        ]
        for episode_id in ids:
            memory.forget(episode_id)
        delta = (real_next - current - model.delta_mean) / model.delta_std * model.obs_mask
        x0 = memory.scaled_residual(delta.flatten(-2).flatten(0, 1), conds.flatten(0, 1))
        clip = cfg.adapter_target_clip
        parts.append(
            {
                "cond": conds.flatten(0, 1),
                "x0": x0.clamp(-clip, clip),
                "entries": torch.stack(entries, 1).flatten(0, 1),
            }
        )
    if not parts:
        raise ValueError(
            f"imagined_training_data: no episode is long enough for a prefix in {list(prefixes)}"
            f" plus memory.adapter_horizon = {h} steps"
        )
    return {key: torch.cat([q[key] for q in parts]) for key in parts[0]}


def train_spatial_adapter(
    memory: MemoryExperts,
    episodes: Sequence[tuple[Any, Any]],
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    writer=None,
    progress: bool = False,
) -> list[float]:
    """Train ``memory.spatial_adapter`` on real episodes [(obs [L+1, N, D], actions), ...] with
    the world model frozen: the denoiser's own loss with cond + g(R, cond); memory dropped to
    null at ``adapter_dropout``. Returns the losses (TensorBoard ``memory/spatial_loss``)."""
    from tqdm import trange

    model, cfg = memory.model, memory.cfg
    tensors = []
    for obs, action in episodes:
        obs = model._tensor(obs).float()
        tensors.append((obs, model._encode_action(action, (obs.shape[0] - 1,))))
    if cfg.adapter_data == "imagined":
        shortest = min(a.shape[0] for _, a in tensors)
        k = model.config.backbone.max_context
        prefixes = range(k, max(k + 1, shortest - cfg.adapter_horizon + 1), 8)
        data = imagined_training_data(memory, tensors, list(prefixes), generator=generator)
    else:
        parts = [spatial_training_data(memory, obs, action) for obs, action in tensors]
        data = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    adapter = memory.spatial_adapter
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.adapter_lr, weight_decay=1e-4)
    losses: list[float] = []
    total, dev = len(data["cond"]), data["cond"].device
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with model._eval_mode():
            for step in trange(steps or cfg.adapter_steps, disable=not progress, desc="spatial"):
                idx = torch.randint(
                    0, total, (min(cfg.adapter_batch_size, total),), generator=generator, device=dev
                )
                keep = torch.rand(len(idx), generator=generator, device=dev) >= cfg.adapter_dropout
                entries = data["entries"][idx] * keep[:, None, None, None].to(dev)
                cond = data["cond"][idx]
                offset = adapter(entries, cond)  # [b, C]
                loss, _ = model.denoiser.loss(data["x0"][idx], cond + offset, generator=generator)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if writer is not None:
                    writer.add_scalar("memory/spatial_loss", losses[-1], step)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return losses
