"""Categorical next-observation head for features that take few values (one-hots, counts).

Shape legend: (M) rows (batch x time), (N) agents, (D) observation size, (C) observation
tokens per agent-step, (P) features per observation token (D = C * P), (V) values per feature,
(d) model width, (L) latent size (RSSM h + z), (A) encoded action size.

A feature's classes (its vocabulary) are the sorted set of values it takes in the data the
model's normalisation was fitted on (``value_vocabulary``), or of its one-step changes with
``discrete_target: delta``; a feature with more than V of them is continuous and left to the
diffusion head.
For each observation token c of agent i the head reads the token's backbone output, the
token's own current features, which token it is, agent i's whole current observation, the
latent and the joint action (agent i's first), and gives logits over each of its P features'
next values:

    logits_{c,p,:} = MLP([tok_c, x_c, pos_c, o_i, h, z, a_joint])_{p,:}
                     + stay_p * onehot(value index of x_{c,p})

The stay term makes "nothing changes" the default (most features of a step do not change),
so the network only learns where things move (with delta classes the stay class is the
zero delta). Overcooked is deterministic given the joint
action: a categorical with its mode on the right value has zero error, where a Gaussian
diffusion in normalised space blurs one-hots and counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def joint_actions(action: Tensor) -> Tensor:
    """Each agent's view of the joint action, its own first: action [M, N, A] -> [M, N, N*A]
    (row i holds a_i, a_{i+1}, ..., a_{i-1}). Overcooked is deterministic given the joint
    action, so a cell's next values need the partner's move too, not only its own."""
    n = action.shape[1]
    order = (torch.arange(n)[:, None] + torch.arange(n)[None]) % n  # [N, N] ego first
    return action[:, order.to(action.device)].flatten(-2)  # [M, N, N*A]


class DiscreteObsHead(nn.Module):
    """Logits over next values of every observation feature, one MLP shared by all tokens.

    Its first layer is split so that what every token of an agent shares (the agent's whole
    observation, the latent, the joint action) is projected once per agent, not per token:

        pre_c = W_t tok_c + W_x x_c + pos_c + W_o o + W_l [h, z] + W_a a_joint
    """

    def __init__(
        self,
        *,
        d_model: int,
        latent_dim: int,
        obs_dim: int,
        tokens: int,
        n_agents: int,
        action_dim: int,
        hidden: int,
        values: int,
    ) -> None:
        super().__init__()
        self.per_token, self.values = obs_dim // tokens, values
        self.token_in = nn.Linear(d_model + self.per_token, hidden)
        self.agent_in = nn.Linear(obs_dim + latent_dim + n_agents * action_dim, hidden, bias=False)
        self.position = nn.Parameter(torch.zeros(tokens, hidden))  # which cell a token decodes
        self.net = nn.Sequential(
            nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, self.per_token * values),
        )  # fmt: skip
        self.stay = nn.Parameter(torch.full((self.per_token,), 3.0))  # logit bonus of "no change"

    def forward(
        self, tokens: Tensor, latent: Tensor, obs_norm: Tensor, action: Tensor, current: Tensor
    ) -> Tensor:
        """tokens [M, N, C, d], latent [M, L], obs_norm [M, N, D], action [M, N, A], current
        [M, N, D] long (value index of each current feature) -> logits [M, N, D, V]."""
        m, n, c, _ = tokens.shape
        own = obs_norm.float().unflatten(-1, (c, self.per_token))  # [M, N, C, P]
        per_token = self.token_in(torch.cat([tokens.float(), own], -1))  # [M, N, C, hidden]
        agent = torch.cat(
            [
                obs_norm.float(),
                latent.float()[:, None].expand(m, n, -1),
                joint_actions(action.float()),
            ],
            -1,
        )  # fmt: skip  [M, N, D + L + N*A]
        pre = per_token + self.position + self.agent_in(agent)[:, :, None]  # [M, N, C, hidden]
        logits = self.net(pre).float().unflatten(-1, (self.per_token, self.values))
        stay = F.one_hot(current.view(m, n, c, self.per_token), self.values) * self.stay[:, None]
        return (logits + stay).flatten(2, 3)  # [M, N, D, V]
