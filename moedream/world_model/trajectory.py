"""The batch formats shared by the data loader, the world model, Serve and the coherence gate.

Plain numpy/torch containers; no ray. Shapes use B = batch, T = window length (transitions),
H = imagination horizon, N = agents, D = padded observation size, A = encoded action size
(one-hot size for discrete actions, vector size for continuous ones).

Training windows (from ``moedream.data``), as a dict of tensors:
    obs        [B, T + 1, N, D] float32   o_0 .. o_T
    action     [B, T, N, A]     float32   encoded a_0 .. a_{T-1}
    reward     [B, T, N]        float32   r_t received after a_t
    terminated [B, T, N]        float32   1.0 where the episode ended at step t (not truncation)
"""

from __future__ import annotations

import dataclasses

import numpy as np

WINDOW_KEYS = ("obs", "action", "reward", "terminated")
OPTIONAL_STEP_FIELDS = (
    "uncertainty",
    "obs_std",
    "ensemble_obs",
    "ensemble_reward",
    "reward_spread",
    "td_residual",
)
"""Per-step model outputs (and the team critic's residual) a Trajectories may carry (each
[B, H, ...] or None)."""
BATCH_FIELDS = (*WINDOW_KEYS, *OPTIONAL_STEP_FIELDS, "length")
"""Every field with a leading batch axis (expert_load has none)."""


@dataclasses.dataclass
class Trajectories:
    """A batch of imagined (or real) multi-agent trajectories, all of horizon H.

    obs          [B, H + 1, N, D]   start observation then H predicted ones
    action       [B, H, N, A]       encoded joint actions that were taken
    reward       [B, H, N]          predicted (or real) rewards
    terminated   [B, H, N]          predicted termination probabilities (or real 0/1)
    uncertainty  [B, H] or None     ensemble spread per step (None for real data)
    obs_std      [B, H, N, D] or None  per-feature std of the predicted next-observation
                                     distribution where the model gives one (for KL drift)
    expert_load  [L, E] or None     fraction of tokens routed to each expert per MoE layer
    ensemble_obs     [B, H, N, D] or None  the ensemble's mean prediction of each next obs
    ensemble_reward  [B, H, N] or None     the ensemble's mean reward prediction
    reward_spread    [B, H, N] or None     std of the reward across ensemble members
    td_residual      [B, H] or None        the team critic's one-step TD residual
                                           r̄_t + γ(1 − d̄_t)V(o_{t+1}) − V(o_t) (set by the
                                           learner that builds the batch, for the gate)
    length           [B] int or None       valid steps of each row (the gate truncates a row
                                           at its first incoherent step); None: all H
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    uncertainty: np.ndarray | None = None
    obs_std: np.ndarray | None = None
    expert_load: np.ndarray | None = None
    ensemble_obs: np.ndarray | None = None
    ensemble_reward: np.ndarray | None = None
    reward_spread: np.ndarray | None = None
    td_residual: np.ndarray | None = None
    length: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return int(self.obs.shape[0])

    @property
    def horizon(self) -> int:
        return int(self.obs.shape[1] - 1)

    def __post_init__(self) -> None:
        b, h1 = self.obs.shape[:2]
        for name in ("action", "reward", "terminated"):
            arr = getattr(self, name)
            if arr.shape[:2] != (b, h1 - 1):
                raise ValueError(
                    f"Trajectories.{name} has leading shape {arr.shape[:2]}, expected "
                    f"{(b, h1 - 1)} to match obs {self.obs.shape}"
                )
        if self.length is not None:
            length = np.asarray(self.length)
            if length.shape != (b,) or length.min(initial=1) < 1 or length.max(initial=1) >= h1:
                raise ValueError(
                    f"Trajectories.length must be [B={b}] step counts in 1..{h1 - 1}, got "
                    f"{length.tolist()}"
                )

    def to_dict(self) -> dict[str, list | None]:
        """JSON-ready nested lists (None kept as None)."""
        return {
            f.name: None
            if getattr(self, f.name) is None
            else np.asarray(getattr(self, f.name)).tolist()
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict) -> Trajectories:
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            dtype = np.int64 if f.name == "length" else np.float32
            kwargs[f.name] = None if value is None else np.asarray(value, dtype=dtype)
        return cls(**kwargs)

    def lengths(self) -> np.ndarray:
        """[B] valid steps of each row (H where ``length`` is None)."""
        if self.length is None:
            return np.full(self.batch_size, self.horizon, dtype=np.int64)
        return np.asarray(self.length, dtype=np.int64)

    def select(self, index: np.ndarray | list[int]) -> Trajectories:
        """The trajectories at ``index`` along the batch axis."""
        fields = {
            name: None if getattr(self, name) is None else getattr(self, name)[index]
            for name in BATCH_FIELDS
        }
        return Trajectories(**fields, expert_load=self.expert_load)
