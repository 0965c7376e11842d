"""Running mean/std observation normaliser (plain PyTorch, no Ray).

:class:`RunningObsNorm` keeps, per observation dimension, the count, mean and sum of squared
deviations (M2) of every observation it was updated with, merged batch by batch with Chan et
al.'s parallel form of Welford's algorithm (a batch of n rows with mean m_b and M2_b into
running (c, m, M2)):

    δ = m_b − m;  c' = c + n;  m' = m + δ · n / c';  M2' = M2 + M2_b + δ² · c · n / c'

and normalises ``clip((x − m) / sqrt(M2 / c + eps), −clip, clip)``. The statistics are
buffers, so ``state_dict`` (RLlib's weight sync and checkpoints) carries them.

Counts are per dimension: agents of one team may have observations of different sizes
D_i <= D, and a batch of [..., D_i] rows updates (and is normalised by) the first D_i
dimensions only. A dimension that was never updated passes through unchanged (not clipped),
so a fresh normaliser is the identity.
"""

from __future__ import annotations

import torch
from torch import nn


class RunningObsNorm(nn.Module):
    """obs [..., D_i] (D_i <= dim) -> clipped standardised obs [..., D_i] float32."""

    def __init__(self, dim: int, *, clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RunningObsNorm: dim = {dim} is invalid: must be > 0")
        if not clip > 0:
            raise ValueError(f"RunningObsNorm: clip = {clip} is invalid: must be > 0")
        self.dim, self.clip, self.eps = int(dim), float(clip), float(eps)
        # float64: the running sums stay exact over millions of steps
        self.register_buffer("count", torch.zeros(dim, dtype=torch.float64))  # [D]
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))  # [D]
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))  # [D]

    @property
    def var(self) -> torch.Tensor:
        """Population variance [D] (numpy's ``var`` with ddof=0); 1 where never updated."""
        seen = self.count > 0
        return torch.where(seen, self.m2 / self.count.clamp(min=1), torch.ones_like(self.m2))

    @property
    def std(self) -> torch.Tensor:
        """sqrt(var + eps) [D]; 1 where never updated."""
        seen = self.count > 0
        return torch.where(seen, torch.sqrt(self.var + self.eps), torch.ones_like(self.m2))

    @torch.no_grad()
    def update(self, obs: torch.Tensor) -> None:
        """Merge a batch obs [..., D_i] (D_i <= dim) into the statistics of dims [:D_i]."""
        d = obs.shape[-1]
        if d > self.dim:
            raise ValueError(f"RunningObsNorm.update: obs has {d} dims, the normaliser {self.dim}")
        x = obs.reshape(-1, d).to(device=self.mean.device, dtype=torch.float64)  # [M, D_i]
        if x.shape[0] == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError(
                "RunningObsNorm.update: observations contain NaN or inf; the statistics would "
                "be corrupted (check the env or drop those episodes)"
            )
        n = float(x.shape[0])
        batch_mean = x.mean(dim=0)  # [D_i]
        batch_m2 = ((x - batch_mean) ** 2).sum(dim=0)  # [D_i]
        count, mean = self.count[:d], self.mean[:d]
        total = count + n
        delta = batch_mean - mean
        self.mean[:d] = mean + delta * (n / total)
        self.m2[:d] = self.m2[:d] + batch_m2 + delta**2 * count * n / total
        self.count[:d] = total

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        d = obs.shape[-1]
        if d > self.dim:
            raise ValueError(f"RunningObsNorm: obs has {d} dims, the normaliser {self.dim}")
        obs = obs.float()
        mean = self.mean[:d].to(torch.float32)  # [D_i]
        std = self.std[:d].to(torch.float32)  # [D_i]
        out = ((obs - mean) / std).clamp(-self.clip, self.clip)  # [..., D_i]
        return torch.where(self.count[:d] > 0, out, obs)  # never updated: unchanged, unclipped

    def extra_repr(self) -> str:
        return f"dim={self.dim}, clip={self.clip}, eps={self.eps}"
