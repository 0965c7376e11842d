"""The memory experts' shared network and batches.

One denoiser serves the short-term and spatial experts: its condition is built from three
parts, each with a null form (zeros plus a 0 flag), so the same weights give every expert's
conditional and unconditional prediction::

    cond = [ action_emb | context_emb * m_ctx, m_ctx | spatial_emb * m_sp, m_sp ]   [B, 3E + 2]

- action: the joint action of the current step (always given: it is the control, not memory);
- context: the last K steps (o_s, a_s), s = t-K+1..t (zero frames before the episode start);
- spatial: per agent, the k stored observations nearest to its position at the predicted step.

The long-term expert is a LoRA adapter on this network (``long_term.MemoryStore``).
Shapes: (B)atch, (N) agents, (D) obs size, (A) encoded action size, (K) context length,
(k) retrievals, (P) key size, (E) embedding size, X = N * D (the predicted joint observation).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from moedream.world_model.diffusion import Denoiser, DiffusionConfig
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.memory.spatial import _RECENCY_TIEBREAK


@dataclasses.dataclass
class EpisodeHistory:
    """One episode (or its prefix) as tensors.

    obs [T+1, N, D] o_0..o_T, actions [T, N, A] encoded a_0..a_{T-1}, positions [T+1, N, P].
    """

    obs: Tensor
    actions: Tensor
    positions: Tensor

    def __post_init__(self) -> None:
        t1 = self.obs.shape[0]
        if self.actions.shape[0] != t1 - 1 or self.positions.shape[:2] != self.obs.shape[:2]:
            raise ValueError(
                f"EpisodeHistory needs obs [T+1, N, D], actions [T, N, A], positions [T+1, N, P]; "
                f"got {tuple(self.obs.shape)}, {tuple(self.actions.shape)}, {tuple(self.positions.shape)}"
            )

    @classmethod
    def from_arrays(
        cls, obs, actions, positions, device: torch.device | str = "cpu"
    ) -> EpisodeHistory:
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        return cls(as_t(obs), as_t(actions), as_t(positions))

    @property
    def steps(self) -> int:
        return int(self.actions.shape[0])

    def prefix(self, steps: int) -> EpisodeHistory:
        """The first ``steps`` transitions (obs o_0..o_steps)."""
        return EpisodeHistory(
            self.obs[: steps + 1], self.actions[:steps], self.positions[: steps + 1]
        )


@dataclasses.dataclass
class MemoryBatch:
    """Inputs of B predictions of a next joint observation (and its target when known).

    action [B, N, A], context [B, K, N, D + A], spatial [B, N, k, D + P + 1], target [B, X].
    """

    action: Tensor
    context: Tensor
    spatial: Tensor
    target: Tensor | None = None

    def __len__(self) -> int:
        return int(self.action.shape[0])

    def index(self, idx: Tensor) -> MemoryBatch:
        target = None if self.target is None else self.target[idx]
        return MemoryBatch(self.action[idx], self.context[idx], self.spatial[idx], target)

    def to(self, device: torch.device | str) -> MemoryBatch:
        return MemoryBatch(
            *(None if v is None else v.to(device) for v in dataclasses.astuple(self))
        )

    @staticmethod
    def cat(batches: list[MemoryBatch]) -> MemoryBatch:
        targets = [b.target for b in batches]
        target = None if any(t is None for t in targets) else torch.cat(targets)
        return MemoryBatch(
            torch.cat([b.action for b in batches]),
            torch.cat([b.context for b in batches]),
            torch.cat([b.spatial for b in batches]),
            target,
        )


def context_frames(history: EpisodeHistory) -> Tensor:
    """Frames (o_s, a_s) for s = 0..T-1: [T, N, D + A]."""
    return torch.cat([history.obs[:-1], history.actions], dim=-1)


def transitions(
    history: EpisodeHistory,
    cfg: MemoryConfig,
    *,
    include_reset: bool = True,
    with_spatial: bool = True,
) -> MemoryBatch:
    """Every transition of an episode as a batch with targets: predict o_{t+1}, t = -1..T-1.

    The reset transition (t = -1) predicts o_0 from an empty context and a zero action.
    Spatial retrievals for o_{t+1} see only o_0..o_t (no leak of the target); with
    ``with_spatial=False`` they are left empty.
    """
    k_ctx, n, d = cfg.context_len, history.obs.shape[1], history.obs.shape[2]
    frames = context_frames(history)  # [T, N, D + A]
    pad = frames.new_zeros(k_ctx, *frames.shape[1:])
    padded = torch.cat([pad, frames])  # [K + T, N, D + A]
    context = padded.unfold(0, k_ctx, 1).permute(0, 3, 1, 2)  # [T + 1, K, N, D + A]
    zero_action = history.actions.new_zeros(1, *history.actions.shape[1:])
    action = torch.cat([zero_action, history.actions])  # [T + 1, N, A]
    if with_spatial:
        spatial = spatial_retrievals(history, cfg)  # [T + 1, N, k, S]
    else:  # all padding (callers that only use the short-term cond skip the O(T^2) lookup)
        spatial = history.obs.new_zeros(
            history.obs.shape[0], n, cfg.spatial_k, d + history.positions.shape[2] + 1
        )
    target = history.obs.reshape(history.obs.shape[0], n * d)  # [T + 1, X]
    batch = MemoryBatch(action, context, spatial, target)
    return batch if include_reset else batch.index(torch.arange(1, len(batch)))


def spatial_retrievals(history: EpisodeHistory, cfg: MemoryConfig) -> Tensor:
    """Retrievals for predicting o_j, j = 0..T, from the memory o_0..o_{j-1} (the last
    ``spatial_capacity`` entries), queried at positions_j: [T + 1, N, k, D + P + 1].

    Vectorised equivalent of filling a :class:`SpatialMemory` step by step (tested equal).
    """
    t1, n, d = history.obs.shape
    p, k = history.positions.shape[2], cfg.spatial_k
    keys = history.positions.reshape(t1 * n, p)  # [M, P], entry e stored at step e // N
    values = history.obs.reshape(t1 * n, d)  # [M, D]
    step = torch.arange(t1 * n, device=keys.device) // n  # [M]
    query = history.positions  # [T + 1, N, P]
    j = torch.arange(t1, device=keys.device)[:, None]  # [T + 1, 1] the predicted step
    flat = torch.arange(t1 * n, device=keys.device)[None, :]  # [1, M]
    usable = (step[None, :] < j) & (flat >= j * n - cfg.spatial_capacity)  # [T + 1, M]
    dist = torch.cdist(query.double(), keys.double()[None].expand(t1, -1, -1))  # [T + 1, N, M]
    age = (j * n - 1 - flat).double()  # [T + 1, M] entries since this one (0 = newest)
    score = dist + _RECENCY_TIEBREAK * age[:, None, :]
    score = score.masked_fill(~usable[:, None, :], float("inf"))
    m = min(k, t1 * n)
    top = score.topk(m, dim=-1, largest=False)  # [T + 1, N, m]
    valid = top.values.isfinite()[..., None].to(values.dtype)  # [T + 1, N, m, 1]
    out = values.new_zeros(t1, n, k, d + p + 1)
    out[:, :, :m, :d] = values[top.indices] * valid
    out[:, :, :m, d : d + p] = (keys[top.indices] - query[:, :, None, :]) * valid
    out[:, :, :m, -1:] = valid
    return out


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.SiLU(), nn.Linear(hidden, out))


class MemoryDenoiserNet(nn.Module):
    """Context encoders + :class:`Denoiser`: the short-term and spatial experts' shared weights."""

    def __init__(
        self,
        cfg: MemoryConfig,
        diffusion: DiffusionConfig,
        *,
        n_agents: int,
        obs_dim: int,
        action_dim: int,
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.n_agents, self.obs_dim, self.action_dim = cfg, n_agents, obs_dim, action_dim
        e, k_ctx, n = cfg.embed_dim, cfg.context_len, n_agents
        entry = obs_dim + cfg.key_dim + 1
        self.action_enc = _mlp(n * action_dim, e, e)
        self.context_enc = _mlp(k_ctx * n * (obs_dim + action_dim), 2 * e, e)
        self.spatial_entry = _mlp(entry, e, e)
        self.spatial_score = nn.Linear(e, 1)
        self.spatial_out = nn.Linear(n * e, e)
        self.cond_dim = 3 * e + 2
        self.x_dim = n * obs_dim
        self.denoiser = Denoiser(diffusion, self.x_dim, self.cond_dim)

    def cond(
        self, batch: MemoryBatch, use_context: Tensor | bool, use_spatial: Tensor | bool
    ) -> Tensor:
        """Condition [B, 3E + 2]; ``use_*`` ([B] bool or a bool) replace a part by null where False."""
        b = len(batch)
        m_ctx = self._mask(use_context, b, batch.action)  # [B, 1]
        m_sp = self._mask(use_spatial, b, batch.action)  # [B, 1]
        act = self.action_enc(batch.action.reshape(b, -1))  # [B, E]
        ctx = self.context_enc(batch.context.reshape(b, -1)) * m_ctx  # [B, E]
        sp = self._encode_spatial(batch.spatial) * m_sp  # [B, E]
        return torch.cat([act, ctx, m_ctx, sp, m_sp], dim=-1)  # [B, 3E + 2]

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x_t [B, X], t [B], cond [B, C] -> the denoiser's prediction [B, X]."""
        return self.denoiser(x_t, t, cond)

    def loss(
        self, batch: MemoryBatch, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Denoising loss with each memory part dropped to null at its configured rate."""
        if batch.target is None:
            raise ValueError("MemoryDenoiserNet.loss needs a batch with `target` (the next obs)")
        b, dev = len(batch), batch.action.device
        use_ctx = torch.rand(b, generator=generator, device=dev) >= self.cfg.context_dropout
        use_sp = torch.rand(b, generator=generator, device=dev) >= self.cfg.spatial_dropout
        cond = self.cond(batch, use_ctx, use_sp)
        loss, logs = self.denoiser.loss(batch.target, cond, generator=generator)
        return loss, {f"memory/{k.split('/')[-1]}": v for k, v in logs.items()}

    def _encode_spatial(self, spatial: Tensor) -> Tensor:
        b, n = spatial.shape[:2]
        h = self.spatial_entry(spatial)  # [B, N, k, E]
        valid = spatial[..., -1:] > 0  # [B, N, k, 1]
        score = self.spatial_score(h).masked_fill(~valid, -1e9)  # [B, N, k, 1]
        weight = score.softmax(dim=2) * valid.any(dim=2, keepdim=True)  # [B, N, k, 1]
        pooled = (weight * h).sum(dim=2)  # attention pooling over retrievals [B, N, E]
        return self.spatial_out(pooled.reshape(b, -1))  # [B, E]

    @staticmethod
    def _mask(use: Tensor | bool, b: int, like: Tensor) -> Tensor:
        if isinstance(use, bool):
            return like.new_full((b, 1), float(use))
        return use.to(like.dtype).reshape(b, 1)


def train_memory_net(
    net: MemoryDenoiserNet,
    data: MemoryBatch,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    generator: torch.Generator | None = None,
    writer=None,
    progress: bool = False,
) -> list[float]:
    """Train the shared network on transitions ``data`` (with targets); returns the losses.

    ``writer``: an optional ``torch.utils.tensorboard.SummaryWriter`` (scalars ``memory/*``).
    """
    from tqdm import trange

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    net.train()
    losses = []
    dev = data.action.device
    for step in trange(steps, disable=not progress, desc="memory net"):
        idx = torch.randint(
            0, len(data), (min(batch_size, len(data)),), generator=generator, device=dev
        )
        loss, logs = net.loss(data.index(idx), generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if writer is not None:
            for key, value in logs.items():
                writer.add_scalar(key, value, step)
    net.eval()
    return losses
