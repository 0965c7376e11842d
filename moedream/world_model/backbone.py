"""MoE transformer over the tokens of every agent-step through time.

Shape legend: (B)atch, (T)ime steps in the context, (N) agents, (D) observation size,
(A) encoded action size, (d) model width, (S) tokens per agent-step (from the tokenizer, see
tokenizers.py), (Q) = T * N * S tokens in the sequence.

    token_{t,i,s} = Tokenizer(o_{t,i}, a_{t,i})_s + agent_i + time_t   [B, T, N, S, d]

Attention is causal in time and full within one step: token (t, i, s) sees every (t', j, s')
with t' <= t. Blocks are pre-norm:

    x = x + Attn(LN(x));   y, stats = MoE(LN(x) | modality);   x = x + y

so the feature of (t, i) (the output of the tokenizer's summary token) summarises o_{<=t},
a_{<=t} of all agents: the state from which the world model predicts o_{t+1}, r_t and the
termination at t. With ``modality_routing`` each MoE router also sees a learned embedding of
the token's modality (cell, agent, action, ...) and balances expert load per modality.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moedream.config import ConfigBase, check, check_positive_ints
from moedream.world_model.moe import MoEConfig, MoEFeedForward, MoEStats
from moedream.world_model.tokenizers import MODALITIES, Tokenizer


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
    modality_routing: bool = False
    """Add a learned modality embedding to each MoE router's input (not to the token) and
    compute the load-balancing loss per modality, so experts can specialise by modality."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_positive_ints(self, prefix, ("num_layers", "num_heads", "max_context"))
        check(0.0 <= self.dropout < 1.0, f"{prefix}dropout", self.dropout, "must be in [0, 1)")


def block_causal_mask(steps: int, per_step: int, device: torch.device | None = None) -> Tensor:
    """[Q, Q] bool, True where token q may attend to token k: time(k) <= time(q).

    Tokens are ordered time-major (index t * per_step + j, per_step = N agents x S tokens), so
    the tokens of one step see each other.
    """
    time = torch.arange(steps, device=device).repeat_interleave(per_step)  # [Q]
    return time[None, :] <= time[:, None]  # [Q(q), Q(k)]


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
        self.router_modality = (
            nn.Embedding(len(MODALITIES), d_model) if cfg.modality_routing else None
        )

    def forward(self, x: Tensor, mask: Tensor, modality: Tensor) -> tuple[Tensor, MoEStats]:
        """x [B, Q, d], mask [Q, Q], modality [Q] long -> (x [B, Q, d], stats)."""
        x = x + self.attn(self.norm_attn(x), mask)  # [B, Q, d]
        if self.router_modality is None:
            y, stats = self.ff(self.norm_ff(x))  # [B, Q, d]
        else:
            route = self.router_modality(modality).expand_as(x)  # [B, Q, d]
            groups = modality.expand(x.shape[0], -1)  # [B, Q]
            y, stats = self.ff(self.norm_ff(x), route_input=route, groups=groups)
        return x + y, stats


@dataclasses.dataclass
class BackboneOutput:
    """features [B, T, N, d]: each agent-step's summary-token output; tokens [B, T, N, S, d]:
    every token's output; stats: one MoEStats per layer."""

    features: Tensor
    tokens: Tensor
    stats: list[MoEStats]


class Backbone(nn.Module):
    """forward(obs [B, T, N, D] normalised, action [B, T, N, A]) -> (features [B, T, N, d],
    [MoEStats per layer]); ``encode`` also returns every token's output."""

    def __init__(
        self,
        *,
        cfg: BackboneConfig,
        moe: MoEConfig,
        tokenizer: Tokenizer,
        n_agents: int,
        ep_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        d = moe.d_model
        self.cfg = cfg
        self.n_agents = n_agents
        self.tokenizer = tokenizer
        self.agent_embed = nn.Parameter(torch.randn(n_agents, d) * 0.02)
        self.time_embed = nn.Parameter(torch.randn(cfg.max_context, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, cfg, moe, ep_group) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(d)

    def forward(self, *, obs: Tensor, action: Tensor) -> tuple[Tensor, list[MoEStats]]:
        out = self.encode(obs=obs, action=action)
        return out.features, out.stats

    def encode(self, *, obs: Tensor, action: Tensor) -> BackboneOutput:
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
        x = self.tokenizer(obs, action)  # [B, T, N, S, d]
        s = x.shape[3]
        x = x + self.agent_embed[:, None] + self.time_embed[:t, None, None]  # [B, T, N, S, d]
        x = x.reshape(b, t * n * s, -1)  # [B, Q, d], time-major
        mask = block_causal_mask(t, n * s, x.device)  # [Q, Q]
        modality = self.tokenizer.modality.repeat(t * n)  # [Q]
        stats = []
        for block in self.blocks:
            x, layer_stats = block(x, mask, modality)
            stats.append(layer_stats)
        tokens = self.norm_out(x).view(b, t, n, s, -1)  # [B, T, N, S, d]
        features = tokens[:, :, :, self.tokenizer.summary_token]  # [B, T, N, d]
        return BackboneOutput(features=features, tokens=tokens, stats=stats)
