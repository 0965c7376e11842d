"""Categorical next-observation head for features that take few values (one-hots, counts).

Shape legend: (M) rows (batch x time), (N) agents, (D) observation size, (C) observation
tokens per agent-step, (P) features per observation token (D = C * P), (V) values per feature,
(d) model width, (L) latent size (RSSM h + z), (A) encoded action size.

A feature's vocabulary is the sorted set of values it takes in the data the model's
normalisation was fitted on (``value_vocabulary``); a feature with more than V values is
continuous and left to the diffusion head. For each observation token the head reads the
token's backbone output, the latent, the token's own current features and the agent's action,
and gives logits over each of its P features' next values:

    logits_{c,p,:} = MLP([tok_c, h, z, x_c, a])_{p,:} + stay_p * onehot(value index of x_{c,p})

The stay term makes "nothing changes" the default (most features of a step do not change),
so the network only learns where things move. Overcooked is deterministic given the joint
action: a categorical with its mode on the right value has zero error, where a Gaussian
diffusion in normalised space blurs one-hots and counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moedream.world_model.layers import mlp


def value_vocabulary(values: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Per-feature sorted distinct values: values [R, N, D] -> (vocabulary [N, D, V] padded
    with each feature's largest value, counts [N, D] long: distinct values, V + 1 where a
    feature has more than V = ``size`` (continuous))."""
    rows, n, d = values.shape
    flat = values.reshape(rows, n * d).t()  # [N*D, R]
    vocab = torch.empty(n * d, size, dtype=values.dtype, device=values.device)
    counts = torch.empty(n * d, dtype=torch.long, device=values.device)
    for j in range(n * d):
        distinct = torch.unique(flat[j])  # sorted
        counts[j] = distinct.numel() if distinct.numel() <= size else size + 1
        kept = distinct[:size]
        vocab[j, : kept.numel()] = kept
        vocab[j, kept.numel() :] = kept[-1]
    return vocab.view(n, d, size), counts.view(n, d)


def nearest_index(x: Tensor, vocab: Tensor) -> Tensor:
    """Index of the vocabulary value nearest to each feature: x [..., N, D], vocab [N, D, V]
    -> [..., N, D] long (a value never seen maps to its nearest seen one)."""
    return (x.unsqueeze(-1) - vocab).abs().argmin(-1)


class DiscreteObsHead(nn.Module):
    """Logits over next values of every observation feature, one MLP shared by all tokens."""

    def __init__(
        self,
        *,
        d_model: int,
        latent_dim: int,
        per_token: int,
        action_dim: int,
        hidden: int,
        values: int,
    ) -> None:
        super().__init__()
        self.per_token, self.values = per_token, values
        self.net = mlp(d_model + latent_dim + per_token + action_dim, hidden, per_token * values)
        self.stay = nn.Parameter(torch.full((per_token,), 3.0))  # logit bonus of "no change"

    def forward(
        self, tokens: Tensor, latent: Tensor, obs_norm: Tensor, action: Tensor, current: Tensor
    ) -> Tensor:
        """tokens [M, N, C, d], latent [M, L], obs_norm [M, N, D], action [M, N, A], current
        [M, N, D] long (value index of each current feature) -> logits [M, N, D, V]."""
        m, n, c, _ = tokens.shape
        x = torch.cat(
            [
                tokens.float(),
                latent.float()[:, None, None].expand(m, n, c, -1),
                obs_norm.float().unflatten(-1, (c, self.per_token)),
                action.float()[:, :, None].expand(m, n, c, -1),
            ],
            -1,
        )  # [M, N, C, d + L + P + A]
        logits = self.net(x).float().unflatten(-1, (self.per_token, self.values))  # [M,N,C,P,V]
        stay = F.one_hot(current.view(m, n, c, self.per_token), self.values) * self.stay[:, None]
        return (logits + stay).flatten(2, 3)  # [M, N, D, V]
