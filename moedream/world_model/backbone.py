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


KeyValues = tuple[Tensor, Tensor]
"""One attention layer's keys and values of the tokens so far, [B, heads, P, d_head] each."""


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

    def forward_next(self, x: Tensor, past: KeyValues | None) -> tuple[Tensor, KeyValues]:
        """The tokens of one new time step, x [B, S, d], attending to every earlier token (keys
        and values ``past`` [B, heads, P, d_head] each, None at the first step) and to each
        other: the block-causal mask's rows for that step, without recomputing the past.
        -> (y [B, S, d], the keys and values of past + new tokens)."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, d // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, d_head]
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # [B, heads, P+S, .]
        y = F.scaled_dot_product_attention(q, k, v)  # every key is visible: no mask
        return self.out(y.transpose(1, 2).reshape(b, s, d)), (k, v)


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
        return self._feed_forward(x, modality)

    def forward_next(
        self, x: Tensor, past: KeyValues | None, modality: Tensor
    ) -> tuple[Tensor, MoEStats, KeyValues]:
        """One new time step's tokens x [B, S, d] after the cached ``past`` (see
        SelfAttention.forward_next), modality [S] -> (x, stats, keys and values so far)."""
        attended, key_values = self.attn.forward_next(self.norm_attn(x), past)
        x, stats = self._feed_forward(x + attended, modality)
        return x, stats, key_values

    def _feed_forward(self, x: Tensor, modality: Tensor) -> tuple[Tensor, MoEStats]:
        """x [B, Q, d] after attention, modality [Q] -> (x + MoE(LN(x)) [B, Q, d], stats)."""
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
        x = self._embed(obs, action, self.time_embed[:t])  # [B, T, N, S, d]
        s = x.shape[3]
        x = x.reshape(b, t * n * s, -1)  # [B, Q, d], time-major
        mask = block_causal_mask(t, n * s, x.device)  # [Q, Q]
        modality = self.tokenizer.modality.repeat(t * n)  # [Q]
        stats = []
        for block in self.blocks:
            x, layer_stats = block(x, mask, modality)
            stats.append(layer_stats)
        return self._output(x, b, t, n, s, stats)

    def encode_next(
        self, *, obs: Tensor, action: Tensor, past: list[KeyValues] | None
    ) -> tuple[BackboneOutput, list[KeyValues]]:
        """What :meth:`encode` gives for the LAST step of a context, computing only that step:
        obs [B, N, D] normalised and action [B, N, A] of the step after the steps whose keys and
        values ``past`` holds (one entry per layer, from the previous call; None for the
        first step). Attention is causal in time and the MoE drops no token in eval mode
        (``moe.eval_dropless``), so the earlier steps' outputs do not depend on this one and
        the result equals re-encoding the whole context, up to float rounding.
        -> (features [B, 1, N, d], tokens [B, 1, N, S, d], stats of this step's tokens only;
        keys and values per layer including this step)."""
        b, n, _ = obs.shape
        t = 0 if past is None else past[0][0].shape[2] // (n * self.tokenizer.modality.numel())
        if t >= self.cfg.max_context:
            raise ValueError(
                f"encode_next: the context already has {t} steps, backbone.max_context="
                f"{self.cfg.max_context}; re-encode the last max_context steps with encode()"
            )
        x = self._embed(obs[:, None], action[:, None], self.time_embed[t : t + 1])
        s = x.shape[3]
        x = x.reshape(b, n * s, -1)  # [B, N*S, d]
        modality = self.tokenizer.modality.repeat(n)  # [N*S]
        stats, key_values = [], []
        for i, block in enumerate(self.blocks):
            x, layer_stats, kv = block.forward_next(x, None if past is None else past[i], modality)
            stats.append(layer_stats)
            key_values.append(kv)
        return self._output(x, b, 1, n, s, stats), key_values

    def _embed(self, obs: Tensor, action: Tensor, time_embed: Tensor) -> Tensor:
        """obs [B, T, N, D], action [B, T, N, A], time_embed [T, d] -> tokens [B, T, N, S, d]."""
        x = self.tokenizer(obs, action)  # [B, T, N, S, d]
        return x + self.agent_embed[:, None] + time_embed[:, None, None]

    def _output(
        self, x: Tensor, b: int, t: int, n: int, s: int, stats: list[MoEStats]
    ) -> BackboneOutput:
        """The last block's x [B, T*N*S, d] -> features and tokens (see BackboneOutput)."""
        tokens = self.norm_out(x).view(b, t, n, s, -1)  # [B, T, N, S, d]
        features = tokens[:, :, :, self.tokenizer.summary_token]  # [B, T, N, d]
        return BackboneOutput(features=features, tokens=tokens, stats=stats)
