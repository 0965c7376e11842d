"""Turn one agent-step (observation + action) into backbone tokens, one tokenizer per modality.

Shape legend: (B)atch, (T)ime, (N) agents, (D) observation size, (A) encoded action size,
(d) model width, (S) tokens per agent-step, (C) observation tokens per agent-step,
(P) observation features per observation token (D = C * P).

Every tokenizer maps obs [B, T, N, D] (normalised) and action [B, T, N, A] to tokens
[B, T, N, S, d] and states, as plain attributes:

    modality      [S] long   the modality of each token (an index into ``MODALITIES``)
    obs_tokens    C          tokens 0..C-1 carry the observation, P = D / C features each,
                             feature c * P + p in token c (what a per-token head decodes)
    summary_token index of the token whose output is the agent's feature (reward,
                             termination, RSSM and the joint condition read it)

- ``flat``: one token o + a per agent-step (any vector observation: featurized Overcooked,
  MaMuJoCo). C = 1, P = D.
- ``grid``: Overcooked's lossless grid encoding (width x height cells of 26 planes): a token
  per cell (its planes + a learned cell position), an agent-state token and an action token.
  The world changes in a few cells per step, so a cell's next planes are decoded from its own
  token: the head sees a 26-plane cell, not a 520-feature vector.

``tokenizer_for(kind, spec)`` picks one; "auto" chooses by the env spec, so a new env adds a
tokenizer here, not a model.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from moedream.config import ConfigError
from moedream.envs.spec import EnvSpec

MODALITIES = ("state", "cell", "agent", "action")
"""Every modality a token can have; the router's modality embedding has one row per name."""

TokenizerKind = Literal["auto", "flat", "grid"]
TOKENIZER_KINDS = ("auto", "flat", "grid")
GRID_PLANES = 26
"""Planes per cell of overcooked_ai's lossless state encoding (players, orientations, map,
pot contents, cook time, objects, urgency)."""


class FlatTokenizer(nn.Module):
    """One token per agent-step: W_o o + W_a a (the vector-observation tokenizer)."""

    def __init__(self, obs_dim: int, action_dim: int, d_model: int) -> None:
        super().__init__()
        self.obs_embed = nn.Linear(obs_dim, d_model)
        self.action_embed = nn.Linear(action_dim, d_model)
        self.register_buffer(
            "modality", torch.tensor([MODALITIES.index("state")]), persistent=False
        )
        self.obs_tokens = 1
        self.summary_token = 0

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        """obs [B, T, N, D], action [B, T, N, A] -> tokens [B, T, N, 1, d]."""
        return (self.obs_embed(obs) + self.action_embed(action)).unsqueeze(-2)


class GridTokenizer(nn.Module):
    """Cell tokens of a grid observation, then an agent-state token and an action token."""

    def __init__(self, cells: int, planes: int, action_dim: int, d_model: int) -> None:
        super().__init__()
        self.cells, self.planes = cells, planes
        self.cell_embed = nn.Linear(planes, d_model)
        self.cell_position = nn.Parameter(torch.randn(cells, d_model) * 0.02)
        # the agent-state token: a learned query whose output summarises the agent's step
        self.agent_token = nn.Parameter(torch.randn(d_model) * 0.02)
        self.action_embed = nn.Linear(action_dim, d_model)
        modality = [MODALITIES.index("cell")] * cells
        modality += [MODALITIES.index("agent"), MODALITIES.index("action")]
        self.register_buffer("modality", torch.tensor(modality), persistent=False)
        self.obs_tokens = cells
        self.summary_token = cells

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        """obs [B, T, N, C*P], action [B, T, N, A] -> tokens [B, T, N, C + 2, d]."""
        cells = obs.unflatten(-1, (self.cells, self.planes))  # [B, T, N, C, P]
        cell_tokens = self.cell_embed(cells) + self.cell_position  # [B, T, N, C, d]
        agent = self.agent_token.expand(*obs.shape[:-1], 1, -1)  # [B, T, N, 1, d]
        act = self.action_embed(action).unsqueeze(-2)  # [B, T, N, 1, d]
        return torch.cat([cell_tokens, agent.to(cell_tokens.dtype), act], -2)


Tokenizer = FlatTokenizer | GridTokenizer


def resolve_kind(kind: str, spec: EnvSpec) -> str:
    """The tokenizer "auto" stands for with ``spec``: grid for Overcooked's grid encoding."""
    if kind != "auto":
        return kind
    grid = spec.env_name == "overcooked" and spec.env_config.get("encoding") == "grid"
    return "grid" if grid else "flat"


def tokenizer_for(kind: str, spec: EnvSpec, d_model: int) -> Tokenizer:
    """The tokenizer ``kind`` (see ``TOKENIZER_KINDS``) for ``spec``'s observations."""
    kind = resolve_kind(kind, spec)
    if kind == "flat":
        return FlatTokenizer(spec.obs_dim, spec.action_dim, d_model)
    if kind == "grid":
        if spec.obs_dim % GRID_PLANES:
            raise ConfigError(
                f"config field `tokenizer` = 'grid' needs observations of cells x {GRID_PLANES} "
                f"planes (Overcooked with encoding: grid); this env's observations have "
                f"{spec.obs_dim} features: use tokenizer: flat (or auto)"
            )
        return GridTokenizer(spec.obs_dim // GRID_PLANES, GRID_PLANES, spec.action_dim, d_model)
    raise ConfigError(
        f"config field `tokenizer` = {kind!r} is invalid: must be one of {list(TOKENIZER_KINDS)}"
    )
