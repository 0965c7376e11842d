"""Spatial memory: past observations keyed by position, retrieved nearest to a query position.

Keys are positions (a grid cell in Overcooked or the memory task, body positions in MuJoCo)
given by the caller; values are single-agent observations. Every agent writes into and reads
from the same memory (a cell seen by one agent is remembered for the other).

A retrieval for one query is ``[k, D + key_dim + 1]``: per retrieved entry its observation, its
offset ``key - query`` and a valid flag (0 rows pad when fewer than k entries exist). Entries
are ranked by distance, ties broken by recency (the newest observation of a cell first; within
one step, the later agent's entry first).
"""

from __future__ import annotations

import torch
from torch import Tensor

_RECENCY_TIEBREAK = 1e-6  # << any distance gap between distinct grid cells


def retrieve_nearest(keys: Tensor, values: Tensor, times: Tensor, query: Tensor, k: int) -> Tensor:
    """keys [M, P], values [M, D], times [M], query [Q, P] -> retrievals [Q, k, D + P + 1].

    P = key_dim. Pure function; M may be 0 (all rows padding).
    """
    q, p = query.shape
    d = values.shape[-1]
    out = query.new_zeros(q, k, d + p + 1)  # [Q, k, D + P + 1]
    m = keys.shape[0]
    if m == 0:
        return out
    dist = torch.cdist(query.double(), keys.double())  # [Q, M] float64: exact tie-breaks
    age = (times.max() - times).double()  # [M] 0 = newest
    score = dist + _RECENCY_TIEBREAK * age[None, :]  # [Q, M]
    n = min(k, m)
    idx = score.topk(n, dim=-1, largest=False).indices  # [Q, n]
    out[:, :n, :d] = values[idx].to(out.dtype)  # [Q, n, D]
    out[:, :n, d : d + p] = (keys[idx] - query[:, None, :]).to(out.dtype)  # [Q, n, P]
    out[:, :n, -1] = 1.0
    return out


class SpatialMemory:
    """A bounded store of (position, observation) of one episode; oldest entries dropped first."""

    def __init__(
        self, obs_dim: int, key_dim: int, capacity: int, device: torch.device | str = "cpu"
    ):
        if capacity < 1:
            raise ValueError(f"SpatialMemory `capacity` = {capacity} must be >= 1")
        self.obs_dim, self.key_dim, self.capacity = obs_dim, key_dim, capacity
        self.keys = torch.zeros(0, key_dim, device=device)  # [M, P]
        self.values = torch.zeros(0, obs_dim, device=device)  # [M, D]
        self.times = torch.zeros(0, dtype=torch.long, device=device)  # [M]
        self._clock = 0

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def add(self, positions: Tensor, observations: Tensor) -> None:
        """Store one step: positions [N, P] and observations [N, D] of the N agents."""
        positions = torch.as_tensor(positions, dtype=torch.float32, device=self.keys.device)
        observations = torch.as_tensor(observations, dtype=torch.float32, device=self.keys.device)
        if positions.shape[-1] != self.key_dim or observations.shape[-1] != self.obs_dim:
            raise ValueError(
                f"SpatialMemory.add expects positions [N, {self.key_dim}] and observations "
                f"[N, {self.obs_dim}], got {tuple(positions.shape)} and {tuple(observations.shape)}"
            )
        n = positions.shape[0]
        times = self._clock + torch.arange(n, device=self.keys.device)  # one tick per entry
        self.keys = torch.cat([self.keys, positions])[-self.capacity :]
        self.values = torch.cat([self.values, observations])[-self.capacity :]
        self.times = torch.cat([self.times, times])[-self.capacity :]
        self._clock += n

    def retrieve(self, query: Tensor, k: int) -> Tensor:
        """query [N, P] (e.g. the agents' positions at the predicted step) -> [N, k, D + P + 1]."""
        query = torch.as_tensor(query, dtype=torch.float32, device=self.keys.device)
        return retrieve_nearest(self.keys, self.values, self.times, query, k)
