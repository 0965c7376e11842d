"""Spatial memory of one episode: observations and transitions keyed by position.

Keys are positions (a grid cell in Overcooked or the memory task, body positions in MuJoCo)
read from the observations by the caller; values are single-agent observations. Every agent
writes into and reads from the same memory (a cell seen by one agent is remembered for the
other). Two bounded tables, oldest entries dropped first:

- observations (position, observation, step), retrieved nearest to a query position. A
  retrieval for one query is ``[k, D + key_dim + 1]``: per retrieved entry its observation, its
  offset ``key - query`` and a valid flag (0 rows pad when fewer than k entries exist). Entries
  are ranked by distance, ties broken by recency (the newest observation of a cell first;
  within one step, the later agent's entry first);
- transitions (situation and action at o_t, o_{t+1}, step), looked up by exact match: what
  really followed the latest time an action was taken in a situation.
"""

from __future__ import annotations

import torch
from torch import Tensor

_RECENCY_TIEBREAK = 1e-6  # << any distance gap between distinct grid cells
_SAME_CELL = 1e-4  # |key - query| below this: the same (rounded) position

_TABLES = ("keys", "values", "steps", "t_keys", "t_actions", "t_next", "t_steps")


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


class EpisodeSpatialStore:
    """One episode's (position, observation, step) entries and its transitions (situation and
    action at o_t, o_{t+1}, step), each table bounded by ``capacity`` (oldest dropped)."""

    def __init__(self, obs_dim: int, key_dim: int, capacity: int, device) -> None:
        if capacity < 1:
            raise ValueError(f"spatial memory `capacity` = {capacity} must be >= 1")
        self.capacity = capacity
        self.keys = torch.zeros(0, key_dim, device=device)  # [M, P]
        self.values = torch.zeros(0, obs_dim, device=device)  # [M, D]
        self.steps = torch.zeros(0, dtype=torch.long, device=device)  # [M] ascending
        # transition table, created at the first add_transitions (its key and action sizes)
        self.t_keys: Tensor | None = None  # [M, S] situation at o_t
        self.t_actions: Tensor | None = None  # [M, A] action taken there
        self.t_next: Tensor | None = None  # [M, D] o_{t+1}
        self.t_steps: Tensor | None = None  # [M] ascending, step of o_{t+1}

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def add(self, positions: Tensor, obs: Tensor, steps: Tensor) -> None:
        """positions [L, N, P], obs [L, N, D], steps [L] (episode steps of these observations)."""
        if positions.shape[-1] != self.keys.shape[-1] or obs.shape[-1] != self.values.shape[-1]:
            raise ValueError(
                f"spatial memory: positions [L, N, {self.keys.shape[-1]}] and observations "
                f"[L, N, {self.values.shape[-1]}] expected, got {tuple(positions.shape)} and "
                f"{tuple(obs.shape)}"
            )
        n = positions.shape[1]
        self.keys = torch.cat([self.keys, positions.reshape(-1, positions.shape[-1])])
        self.values = torch.cat([self.values, obs.reshape(-1, obs.shape[-1])])
        self.steps = torch.cat([self.steps, steps.to(self.steps).repeat_interleave(n)])
        self.keys, self.values, self.steps = (
            v[-self.capacity :] for v in (self.keys, self.values, self.steps)
        )

    def retrieve(self, query: Tensor, k: int, before_step: int) -> Tensor:
        """query [N, P] -> [N, k, D + P + 1] from entries with step <= ``before_step``."""
        usable = int((self.steps <= before_step).sum())  # steps ascending: a prefix
        return retrieve_nearest(
            self.keys[:usable], self.values[:usable], self.steps[:usable], query, k
        )

    def add_transitions(
        self, situations: Tensor, actions: Tensor, next_obs: Tensor, steps: Tensor
    ) -> None:
        """situations [L, N, S] and encoded actions [L, N, A] at o_t, next_obs [L, N, D] =
        o_{t+1}, steps [L] (episode steps of o_{t+1})."""
        n, s, a = situations.shape[1], situations.shape[-1], actions.shape[-1]
        if self.t_keys is None:
            dev = self.keys.device
            self.t_keys = torch.zeros(0, s, device=dev)
            self.t_actions = torch.zeros(0, a, device=dev)
            self.t_next = torch.zeros(0, self.values.shape[-1], device=dev)
            self.t_steps = torch.zeros(0, dtype=torch.long, device=dev)
        parts = (
            situations.reshape(-1, s),
            actions.reshape(-1, a),
            next_obs.reshape(-1, self.values.shape[-1]),
        )
        self.t_keys, self.t_actions, self.t_next = (
            torch.cat([old, new])[-self.capacity :]
            for old, new in zip((self.t_keys, self.t_actions, self.t_next), parts, strict=True)
        )
        steps = steps.to(self.t_steps).repeat_interleave(n)
        self.t_steps = torch.cat([self.t_steps, steps])[-self.capacity :]

    def lookup_transition(
        self, query: Tensor, action: Tensor, before_step: int
    ) -> tuple[Tensor, Tensor]:
        """query situations [Q, S] and encoded actions [Q, A] -> (the observation that really
        followed the latest time that action was taken in that situation [Q, D], hit [Q]
        bool), among transitions whose o_{t+1} has step <= ``before_step`` (no hit: zeros)."""
        q, d = query.shape[0], self.values.shape[-1]
        if self.t_steps is None or len(self.t_steps) == 0:
            return query.new_zeros(q, d), torch.zeros(q, dtype=torch.bool, device=query.device)
        usable = int((self.t_steps <= before_step).sum())  # steps ascending: a prefix
        keys, acts = self.t_keys[:usable], self.t_actions[:usable]  # [M, S], [M, A]
        same = ((keys[None] - query[:, None]).abs().amax(-1) <= _SAME_CELL) & (
            (acts[None] - action[:, None]).abs().amax(-1) <= _SAME_CELL
        )  # [Q, M]
        order = torch.arange(usable, device=query.device)
        latest = torch.where(same, order, -1).amax(-1) if usable else order.new_full((q,), -1)
        hit = latest >= 0
        value = self.t_next[:usable][latest.clamp_min(0)] if usable else query.new_zeros(q, d)
        return value * hit[:, None], hit

    def tables(self) -> dict[str, Tensor]:
        """Every stored tensor by name (to save the memory); see :meth:`from_tables`."""
        return {name: getattr(self, name) for name in _TABLES if getattr(self, name) is not None}

    @classmethod
    def from_tables(cls, tables: dict[str, Tensor], capacity: int) -> EpisodeSpatialStore:
        """The store :meth:`tables` described (on the tables' device)."""
        store = cls(tables["values"].shape[-1], tables["keys"].shape[-1], capacity,
                    tables["keys"].device)  # fmt: skip
        for name in _TABLES:
            if name in tables:
                setattr(store, name, tables[name])
        return store
