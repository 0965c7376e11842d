"""MoE transformer over per-agent tokens through time.

Shape legend: (B)atch, (T)ime steps in the context, (N) agents, (D) observation size,
(A) encoded action size, (d) model width, (S) = T * N tokens.

    token_{t,i} = W_o o_{t,i} + W_a a_{t,i} + agent_i + time_t          [B, T, N, d]

Attention is causal in time and full across the agents of one step: token (t, i) sees every
(t', j) with t' <= t. Blocks are pre-norm:

    x = x + Attn(LN(x));   y, stats = MoE(LN(x));   x = x + y

so the feature of (t, i) summarises o_{<=t}, a_{<=t} of all agents: the state from which the
world model predicts o_{t+1}, r_t and the termination at t.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moedream.config import ConfigBase, check, check_positive_ints
from moedream.world_model.moe import MoEConfig, MoEFeedForward, MoEStats


@dataclasses.dataclass
class BackboneConfig(ConfigBase):
    num_layers: int = 2
    num_heads: int = 4
    max_context: int = 8
    """Longest context (time steps) the time embedding covers; longer inputs are rejected and
    imagination keeps the last ``max_context`` steps. Train on windows of this length (the
    trainer's ``window``): time embeddings past the training window get no gradient, so
    imagined contexts longer than it are out of distribution."""
    dropout: float = 0.0

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_positive_ints(self, prefix, ("num_layers", "num_heads", "max_context"))
        check(0.0 <= self.dropout < 1.0, f"{prefix}dropout", self.dropout, "must be in [0, 1)")


def block_causal_mask(steps: int, agents: int, device: torch.device | None = None) -> Tensor:
    """[S, S] bool, True where token q may attend to token k: time(k) <= time(q).

    Tokens are ordered time-major (index t * N + i), so agents of one step see each other.
    """
    time = torch.arange(steps, device=device).repeat_interleave(agents)  # [S]
    return time[None, :] <= time[:, None]  # [S(q), S(k)]


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by backbone.num_heads ({num_heads})"
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, d // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, d_head]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, heads, S, d_head]
        return self.out(y.transpose(1, 2).reshape(b, s, d))  # [B, S, d]


class Block(nn.Module):
    """Pre-norm transformer block whose feed-forward is a (sparse) MoE layer."""

    def __init__(
        self, d_model: int, cfg: BackboneConfig, moe: MoEConfig, ep_group: dist.ProcessGroup | None
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, cfg.num_heads, cfg.dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = MoEFeedForward(moe, ep_group=ep_group)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, MoEStats]:
        x = x + self.attn(self.norm_attn(x), mask)  # [B, S, d]
        y, stats = self.ff(self.norm_ff(x))  # [B, S, d]
        return x + y, stats


class Backbone(nn.Module):
    """forward(obs [B, T, N, D] normalised, action [B, T, N, A]) -> (features [B, T, N, d],
    [MoEStats per layer])."""

    def __init__(
        self,
        *,
        cfg: BackboneConfig,
        moe: MoEConfig,
        obs_dim: int,
        action_dim: int,
        n_agents: int,
        ep_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        d = moe.d_model
        self.cfg = cfg
        self.n_agents = n_agents
        self.obs_embed = nn.Linear(obs_dim, d)
        self.action_embed = nn.Linear(action_dim, d)
        self.agent_embed = nn.Parameter(torch.randn(n_agents, d) * 0.02)
        self.time_embed = nn.Parameter(torch.randn(cfg.max_context, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, cfg, moe, ep_group) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(d)

    def forward(self, *, obs: Tensor, action: Tensor) -> tuple[Tensor, list[MoEStats]]:
        b, t, n, _ = obs.shape
        if t > self.cfg.max_context:
            raise ValueError(
                f"backbone got a context of {t} steps, more than backbone.max_context="
                f"{self.cfg.max_context}; raise max_context or pass a shorter window"
            )
        if n != self.n_agents or action.shape[:3] != obs.shape[:3]:
            raise ValueError(
                f"backbone expects obs [B, T, {self.n_agents}, D] and action [B, T, "
                f"{self.n_agents}, A] with equal B, T; got {tuple(obs.shape)} and {tuple(action.shape)}"
            )
        # token = obs embedding + action embedding + agent embedding + time embedding
        x = self.obs_embed(obs) + self.action_embed(action)  # [B, T, N, d]
        x = x + self.agent_embed[None, None] + self.time_embed[:t, None][None]  # [B, T, N, d]
        x = x.reshape(b, t * n, -1)  # [B, S, d], time-major
        mask = block_causal_mask(t, n, x.device)  # [S, S]
        stats = []
        for block in self.blocks:
            x, layer_stats = block(x, mask)
            stats.append(layer_stats)
        return self.norm_out(x).view(b, t, n, -1), stats  # [B, T, N, d]
