"""Memory experts wired into the real :class:`WorldModel`: PoCE sampling inside ``imagine``.

``MemoryWorldModel`` is a :class:`WorldModel` subclass (same weights, same ``observe`` /
``transition`` / ``imagine``) whose diffusion head samples from the PoCE composition of

    expert   eps_i^c                     eps_i^u              its memory
    short    D(x, t, cond)               D(x, t, 0)           the backbone's last K steps + RSSM
    long     D_lora(e)(x, t, cond)       D(x, t, cond)        episode e stored in a LoRA adapter
    spatial  D(x, t, cond) moved to the  D(x, t, cond)        past transitions retrieved by
             memory (retrieval), or                           position: what really followed
             D(x, t, cond + g(R, cond))                       an action on this cell (R)
             (adapter)

where D is the world model's own denoiser and ``cond`` its normal (short-context) condition.
The composition (``MemoryConfig.form``, :mod:`.compose`) replaces ``self.denoiser`` as the
sampler's ``predict_fn``; the regressed mean and predicted scale around the diffusion residual
stay the world model's, so every expert works in the model's diffusion target space (the
scaled residual x0 = (delta - mean(cond)) / scale(cond)). The long-term and spatial contrasts
isolate what their memory adds to the short-term conditional; a null memory (no retrieval, or
a LoRA adapter that failed its validation) gives eps^c = eps^u exactly.

Retrieval spatial expert (``spatial_mode='retrieval'``, default): each denoising step turns
the short-term prediction into its x0 estimate, maps it to the next observation o_hat, and
multiplies two Gaussians over the next observation per agent and feature: the short-term
one (mean o_hat, variance (scale(cond) * delta_std)^2) and, when memory holds a real
transition from the agent's current cell with its current action, the observation m that
followed it (variance ``spatial_fusion.mse``, measured by :meth:`fit_spatial` on real
episodes). x0 moves to the product's mean, and back to the objective's prediction (eps, v or
flow velocity) at the same (x_t, t).

Memory lives per episode id: ``remember(episode_id, obs, action)`` stores a real episode (or
its latest part) in a bounded spatial memory and finetunes that episode's LoRA adapter
(``MemoryStore``, peft) on the denoiser's own targets of the episode; ``observe_episodes``
does that and returns a :class:`MemoryState` carrying the episode ids, which ``transition``
and ``imagine`` then use for each row. Imagination reads the memories and never writes them
(an imagined branch must not overwrite what was really seen). Rows without an episode id,
and the teacher-forced ``predict_windows``, sample from the plain denoiser.

Cost per denoising step: one batched denoiser pass over B (short, alpha_short = 1; the
retrieval spatial expert adds no pass), 2B (+ adapter spatial) or 3B rows (+ the null
condition when alpha_short != 1), plus one LoRA pass over B rows with the long-term expert;
the transition lookup runs at every denoising step, the adapter once per imagined step.
Nothing grows with the episode length (memories are bounded by ``spatial_capacity``).

Shapes: (B)atch, (L) episode steps, (N) agents, (D) obs size, (A) encoded action size,
(P) position key size, (k) retrievals, (C) cond size, X = N * D.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moedream.config import ConfigError, check, check_choice, check_positive, check_positive_ints
from moedream.envs.spec import EnvSpec
from moedream.world_model.diffusion import Denoiser, DiffusionSampler
from moedream.world_model.memory.compose import compose_predictions
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.memory.long_term import MemoryStore
from moedream.world_model.memory.spatial import retrieve_nearest
from moedream.world_model.model import WorldModel, WorldModelConfig, WorldModelState


@dataclasses.dataclass
class WorldModelMemoryConfig(MemoryConfig):
    """Memory experts on a WorldModel: switches, PoCE weights, LoRA, spatial memory, adapter.

    Defaults measured on Overcooked cramped_room (benchmarks/memory_overcooked.py): alpha 2
    on the LoRA expert (the authors' value) made long rollouts worse; 1 on every expert is the
    default here. Fit the spatial expert with :meth:`MemoryWorldModel.fit_spatial`.
    """

    alpha_short: float = 1.0
    """1 = the short-term conditional as is (its null pass is skipped). Other values contrast
    against the null condition D(x, t, 0): only meaningful when the world model was trained
    with ``diffusion.cond_dropout`` > 0."""
    alpha_long: float = 1.0
    """PoCE weight of the LoRA expert (2, the authors' value, worsened long rollouts)."""
    alpha_spatial: float = 1.0
    spatial_mode: Literal["retrieval", "adapter"] = "retrieval"
    """How the spatial expert conditions the denoiser on what memory holds at a position.
    'retrieval' (default): the product of the short-term expert's Gaussian and the real
    transition memory holds for (cell, action), weighted per state and feature by the scale
    head's variance against the memory's measured error (see the module docstring). No
    learned weights, so nothing to mismatch between training and test. 'adapter': the learned
    cond offset g(R, cond) of the retrieved observations (``train_spatial_adapter``)."""
    lora_steps: int = 60
    lora_lr: float = 3e-3
    lora_validation: float = 0.25
    """Fraction of an episode's latest transitions held out at each ``remember``: the LoRA
    adapter is fitted on the rest and kept only if it lowers the denoiser's loss on them,
    else reset to zero (the long-term expert abstains: eps^c = eps^u). 0 = always keep."""
    spatial_k: int = 8
    """Stored observations retrieved per agent for the adapter (nearest to its position)."""
    position_offset: int = -2
    """Index of the first of ``key_dim`` position features in each agent's observation
    (negative: from the end of the agent's real features). Overcooked's featurized
    observation ends with the agent's absolute (x, y) cell: -2."""
    round_positions: bool = True
    """Round query positions to the grid (grid worlds: an imagined position drifts off-grid)."""
    recent_gap: int | None = None
    """Entries of the last ``recent_gap`` steps are not retrieved (the short-term context
    already holds them); None = the backbone's max_context."""
    adapter_hidden: int = 64
    """Width of the spatial adapter g (retrievals -> cond offset)."""
    adapter_steps: int = 300
    adapter_lr: float = 2e-3
    adapter_batch_size: int = 128
    adapter_dropout: float = 0.2
    """Training probability of a null memory (offset 0) for the spatial adapter."""
    adapter_data: Literal["imagined", "teacher_forced"] = "imagined"
    """What the spatial adapter learns from. 'imagined': the model's own short-context
    rollouts from real prefixes (memory = the prefix), with targets pointing from each
    imagined observation to the real next one, so the memory learns to pull a drifting
    rollout back; 'teacher_forced': real contexts (measured on Overcooked: the adapter then
    learns almost nothing, a real 4-step context leaves little for memory to add)."""
    adapter_horizon: int = 24
    """Imagined steps per real prefix when ``adapter_data`` is 'imagined'."""
    adapter_target_clip: float = 5.0
    """Clamp of the corrective targets (normalised residual units)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check(
            isinstance(self.position_offset, int) and not isinstance(self.position_offset, bool),
            f"{prefix}position_offset",
            self.position_offset,
            "must be an integer (a feature index; negative counts from the end)",
        )
        check(
            isinstance(self.round_positions, bool),
            f"{prefix}round_positions",
            self.round_positions,
            "must be true or false",
        )
        gap = self.recent_gap
        ok = gap is None or (isinstance(gap, int) and not isinstance(gap, bool) and gap >= 0)
        check(ok, f"{prefix}recent_gap", gap, "must be null or an integer >= 0")
        check_choice(f"{prefix}adapter_data", self.adapter_data, ("imagined", "teacher_forced"))
        check_choice(f"{prefix}spatial_mode", self.spatial_mode, ("retrieval", "adapter"))
        check_positive_ints(
            self,
            prefix,
            ("adapter_hidden", "adapter_steps", "adapter_batch_size", "adapter_horizon"),
        )
        check_positive(f"{prefix}adapter_lr", self.adapter_lr)
        ok = isinstance(self.lora_validation, (int, float)) and 0.0 <= self.lora_validation < 1
        check(ok, f"{prefix}lora_validation", self.lora_validation, "must be a number in [0, 1)")
        ok = isinstance(self.adapter_dropout, (int, float)) and 0.0 <= self.adapter_dropout < 1
        check(ok, f"{prefix}adapter_dropout", self.adapter_dropout, "must be a number in [0, 1)")


@dataclasses.dataclass
class MemoryState(WorldModelState):
    """A :class:`WorldModelState` whose rows belong to episodes with memory.

    episode_ids  one id (or None: no memory) per row
    step         [B] long: the episode step of the current observation (for ``recent_gap``)
    """

    episode_ids: tuple[str | None, ...] = ()
    step: Tensor | None = None


class _DenoiserHolder(nn.Module):
    """The denoiser under the attribute name ``MemoryStore`` targets (``denoiser.*``)."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.denoiser(x_t, t, cond)


class EpisodeSpatialStore:
    """One episode's (position, observation, step) entries and its transitions (position and
    action at o_t, o_{t+1}), oldest dropped beyond capacity."""

    def __init__(self, n_agents: int, obs_dim: int, key_dim: int, capacity: int, device) -> None:
        self.n_agents, self.capacity = n_agents, capacity
        self.keys = torch.zeros(0, key_dim, device=device)  # [M, P]
        self.values = torch.zeros(0, obs_dim, device=device)  # [M, D]
        self.steps = torch.zeros(0, dtype=torch.long, device=device)  # [M] ascending

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def add(self, positions: Tensor, obs: Tensor, steps: Tensor) -> None:
        """positions [L, N, P], obs [L, N, D], steps [L] (episode steps of these observations)."""
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
        self, positions: Tensor, actions: Tensor, next_obs: Tensor, steps: Tensor
    ) -> None:
        """positions [L, N, P] and encoded actions [L, N, A] at o_t, next_obs [L, N, D] =
        o_{t+1}, steps [L] (episode steps of o_{t+1})."""
        n, p, a = positions.shape[1], positions.shape[-1], actions.shape[-1]
        if not hasattr(self, "t_keys"):
            dev = self.keys.device
            self.t_keys = torch.zeros(0, p, device=dev)  # [M, P] cell of o_t
            self.t_actions = torch.zeros(0, a, device=dev)  # [M, A] action taken there
            self.t_next = torch.zeros(0, self.values.shape[-1], device=dev)  # [M, D] o_{t+1}
            self.t_steps = torch.zeros(0, dtype=torch.long, device=dev)  # [M] ascending
        parts = (
            positions.reshape(-1, p),
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
        """query cells [Q, P] and encoded actions [Q, A] -> (the observation that really
        followed the latest time that action was taken on that cell [Q, D], hit [Q] bool),
        among transitions whose o_{t+1} has step <= ``before_step`` (no hit: zeros)."""
        q, d = query.shape[0], self.values.shape[-1]
        if not hasattr(self, "t_keys") or len(self.t_steps) == 0:
            return query.new_zeros(q, d), torch.zeros(q, dtype=torch.bool, device=query.device)
        usable = int((self.t_steps <= before_step).sum())  # steps ascending: a prefix
        keys, acts = self.t_keys[:usable], self.t_actions[:usable]  # [M, P], [M, A]
        same = ((keys[None] - query[:, None]).abs().amax(-1) <= _SAME_CELL) & (
            (acts[None] - action[:, None]).abs().amax(-1) <= _SAME_CELL
        )  # [Q, M]
        order = torch.arange(usable, device=query.device)
        latest = torch.where(same, order, -1).amax(-1) if usable else order.new_full((q,), -1)
        hit = latest >= 0
        value = self.t_next[:usable][latest.clamp_min(0)] if usable else query.new_zeros(q, d)
        return value * hit[:, None], hit


_FAR = 99.0  # the offset key of an agent that is not adjacent
_SAME_CELL = 1e-4  # |key - query| below this: the same (rounded) position


class SpatialFusion(nn.Module):
    """What the retrieval spatial expert knows about its memory: per agent and feature, the
    mean square error of "the observation that followed the latest time this action was
    taken on this cell" as a prediction of the next observation, measured on real episodes
    (inf before :meth:`MemoryWorldModel.fit_spatial` and on padding: memory never used)."""

    def __init__(self, n_agents: int, obs_dim: int) -> None:
        super().__init__()
        self.register_buffer("mse", torch.full((n_agents, obs_dim), torch.inf))  # [N, D]
        self.register_buffer("hits", torch.zeros((), dtype=torch.long))  # fitting hits


class SpatialAdapter(nn.Module):
    """g(R, cond) -> cond offset [B, C]: retrieved observations (relative to the current one)
    pooled by attention per agent, then mixed with the condition. Zero at initialisation and
    exactly zero for rows whose retrievals are all padding (a null memory)."""

    def __init__(self, n_agents: int, obs_dim: int, key_dim: int, cond_dim: int, hidden: int):
        super().__init__()
        self.entry = nn.Sequential(
            nn.Linear(obs_dim + key_dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.score = nn.Linear(hidden, 1)
        self.mix = nn.Sequential(nn.Linear(n_agents * hidden + cond_dim, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, cond_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, entries: Tensor, cond: Tensor) -> Tensor:
        """entries [B, N, k, D + P + 1] (last column: valid flag), cond [B, C] -> [B, C]."""
        b = entries.shape[0]
        h = self.entry(entries)  # [B, N, k, H]
        valid = entries[..., -1:] > 0  # [B, N, k, 1]
        score = self.score(h).masked_fill(~valid, -1e9)  # [B, N, k, 1]
        weight = score.softmax(dim=2) * valid.any(dim=2, keepdim=True)  # [B, N, k, 1]
        pooled = (weight * h).sum(dim=2).reshape(b, -1)  # [B, N*H]
        offset = self.out(self.mix(torch.cat([pooled, cond.detach()], dim=-1)))  # [B, C]
        has_memory = valid.flatten(1).any(dim=1, keepdim=True)  # [B, 1]
        return offset * has_memory.to(offset.dtype)


@dataclasses.dataclass
class _SampleContext:
    """What the composed predict_fn of one imagined step needs."""

    episode_ids: list[str | None]
    spatial_entries: Tensor | None  # [B, N, k, D + P + 1], None: adapter off
    current: Tensor | None = None  # [B, N, D] o_t (retrieval spatial expert)
    step: Tensor | None = None  # [B] episode step of o_t
    action: Tensor | None = None  # [B, N, A] encoded a_t


@dataclasses.dataclass
class _Fusion:
    """The retrieval spatial expert's inputs during one imagined step's denoising."""

    episode_ids: list[str | None]
    current: Tensor  # [B, N, D]
    step: Tensor  # [B]
    action: Tensor  # [B, N, A]
    mean: Tensor  # [B, X] regressed mean of the normalised delta (0 for 'delta')
    r_std: Tensor  # [B, X] predicted residual scale (1 without a scale head)
    value: Tensor  # [B, N, D] memory's answer: the real o_{t+1} after (situation, action)
    hit: Tensor  # [B, N] bool: memory holds such a transition


class MemoryWorldModel(WorldModel):
    """A WorldModel whose imagination samples from the PoCE composition of memory experts."""

    def __init__(
        self,
        config: WorldModelConfig,
        spec: EnvSpec,
        memory: WorldModelMemoryConfig | None = None,
        *,
        ep_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(config, spec, ep_group=ep_group)
        self.memory_cfg = memory or WorldModelMemoryConfig()
        self.memory_cfg.validate("memory.")
        self._check_memory_config(self.memory_cfg)
        n, d, p = spec.n_agents, spec.obs_dim, self.memory_cfg.key_dim
        self.spatial_adapter = SpatialAdapter(
            n, d, p, config.cond_dim, self.memory_cfg.adapter_hidden
        )
        self.spatial_fusion = SpatialFusion(n, d)
        self.store: MemoryStore | None = None  # created at the first remember()
        self.spatial_stores: OrderedDict[str, EpisodeSpatialStore] = OrderedDict()
        self._context: _SampleContext | None = None
        self._recorded: list[Tensor] | None = None  # conds of imagined steps, when recording

    @classmethod
    def from_world_model(
        cls, model: WorldModel, memory: WorldModelMemoryConfig | None = None
    ) -> MemoryWorldModel:
        """A memory world model with a copy of ``model``'s weights (``model`` is untouched)."""
        out = cls(model.config, model.spec, memory).to(model.obs_mean.device)
        missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.startswith(_MEMORY_PREFIXES) for k in missing):
            raise ValueError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        return out.train(model.training)

    def _check_memory_config(self, cfg: WorldModelMemoryConfig) -> None:
        if cfg.short_term and cfg.alpha_short != 1.0 and self.config.diffusion.cond_dropout == 0:
            raise ConfigError(
                f"config field `memory.alpha_short` = {cfg.alpha_short} contrasts against the "
                "null condition, which this world model never trained on "
                "(`diffusion.cond_dropout` = 0): set memory.alpha_short to 1.0 or train with "
                "diffusion.cond_dropout > 0"
            )

    def set_memory_config(self, cfg: WorldModelMemoryConfig) -> None:
        """Switch experts or weights (ablations); memories and adapters are kept."""
        cfg.validate("memory.")
        self._check_memory_config(cfg)
        self.memory_cfg = cfg

    # ----------------------------------------------------------------------- memory contents

    def positions(self, obs: Tensor, *, rounded: bool = True) -> Tensor:
        """Agents' position keys from observations [..., N, D] -> [..., N, P] (rounded to the
        grid with ``round_positions``, unless ``rounded`` is False)."""
        keys = [obs[..., i, start : start + self.memory_cfg.key_dim]
                for i, start in enumerate(self.position_starts())]  # fmt: skip
        pos = torch.stack(keys, dim=-2)  # [..., N, P]
        return pos.round() if self.memory_cfg.round_positions and rounded else pos

    def situations(self, obs: Tensor) -> Tensor:
        """Transition-memory keys [..., N, P * N] from observations [..., N, D]: each agent's
        cell, then every other agent's offset from it when it is adjacent (|offset| <= 1 per
        key dim, i.e. it may block or be blocked) and a far sentinel otherwise, so a remembered
        move is only reused when the neighbourhood's occupancy is the same."""
        pos = self.positions(obs)  # [..., N, P]
        n = pos.shape[-2]
        parts = [pos]
        for shift in range(1, n):
            other = pos.roll(-shift, dims=-2) - pos  # [..., N, P] the agent `shift` further on
            near = (other.abs().amax(-1, keepdim=True) <= 1.0).to(pos.dtype)
            parts.append(other * near + _FAR * (1 - near))
        return torch.cat(parts, -1)

    def position_starts(self) -> list[int]:
        """Index of each agent's first position feature in its observation."""
        cfg, starts = self.memory_cfg, []
        for i, dim in enumerate(self.spec.obs_dims):
            start = cfg.position_offset % dim if cfg.position_offset < 0 else cfg.position_offset
            if start + cfg.key_dim > dim:
                raise ConfigError(
                    f"config field `memory.position_offset` = {cfg.position_offset} with "
                    f"key_dim {cfg.key_dim} leaves agent {i}'s observation ({dim} features)"
                )
            starts.append(start)
        return starts

    @property
    def recent_gap(self) -> int:
        gap = self.memory_cfg.recent_gap
        return self.config.backbone.max_context if gap is None else gap

    @torch.no_grad()
    def denoiser_pairs(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """The diffusion head's own training pairs along one episode, teacher-forced with the
        normal short context: obs [L+1, N, D], encoded action [L, N, A] -> cond [L, C] (step t
        conditioned on o_{t-K+1..t}), x0 [L, X] (the normalised, scaled residual of
        o_{t+1} - o_t, as in ``WorldModel.loss``)."""
        k, steps = self.config.backbone.max_context, action.shape[0]
        first = min(k, steps)
        conds = []
        with self._eval_mode():
            # the first window gives steps 0..first-1; then one K-step window ending at each
            # later step (batched), of which the last position is used
            enc = self._encode_windows(
                {"obs": obs[None, : first + 1], "action": action[None, :first]}, None, sample=False
            )
            conds.append(enc["cond"])  # [first, C]
            if steps > first:
                idx = torch.arange(first, steps, device=obs.device)[:, None]  # [W, 1]
                span = idx - k + 1 + torch.arange(k + 1, device=obs.device)  # [W, K + 1]
                batch = {"obs": obs[span], "action": action[span[:, :k]]}  # [W, K+1, N, D]
                enc = self._encode_windows(batch, None, sample=False)
                conds.append(enc["cond"].reshape(len(idx), k, -1)[:, -1])  # [W, C]
            cond = torch.cat(conds)  # [L, C]
            x0 = self._residual_target(obs, cond)
        return cond, x0

    def _residual_target(self, obs: Tensor, cond: Tensor) -> Tensor:
        """x0 [L, X] of WorldModel.loss for the steps of obs [L+1, N, D] given cond [L, C]."""
        delta = (obs[1:] - obs[:-1] - self.delta_mean) / self.delta_std  # [L, N, D]
        return self._scaled_residual((delta * self.obs_mask).flatten(1), cond)

    def _scaled_residual(self, x0: Tensor, cond: Tensor) -> Tensor:
        """Normalised deltas [M, X] -> the diffusion target given cond [M, C]."""
        if self.config.diffusion_target != "delta":
            x0 = x0 - self.mean_head(cond).float()
        if self.scale_head is not None:
            x0 = x0 / self._residual_std(self.scale_head(cond).float())
        return x0

    def memory_store(self) -> MemoryStore:
        """The per-episode LoRA adapters (on a frozen private copy of the denoiser)."""
        if self.store is None:
            self.store = MemoryStore(_DenoiserHolder(self.denoiser), self.memory_cfg)
        return self.store

    def refresh_memory_base(self) -> None:
        """Copy the current denoiser into the LoRA store's frozen base (after more training)."""
        if self.store is not None:
            self.store.sync_base(_DenoiserHolder(self.denoiser))

    @torch.no_grad()
    def remember(
        self,
        episode_id: str,
        obs: Any,
        action: Any,
        *,
        start_step: int = 0,
        finetune: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """Store a real episode (or its next part) under ``episode_id``: obs [L+1, N, D],
        encoded actions [L, N, A] (or discrete indices [L, N]), o_0 at ``start_step``.
        Fills the spatial memory and (``finetune``, long-term expert on) trains the episode's
        LoRA adapter on these transitions; returns the finetuning logs."""
        obs = self._tensor(obs).float()
        action = self._encode_action(action, (obs.shape[0] - 1,))
        self._check_window(obs[None], action[None], "remember(obs, action)")
        steps = start_step + torch.arange(obs.shape[0], device=obs.device)
        if start_step > 0:  # o_0 of this part was stored as the last obs of the previous one
            obs_new, steps_new = obs[1:], steps[1:]
        else:
            obs_new, steps_new = obs, steps
        store = self._spatial_store(episode_id)
        store.add(self.positions(obs_new), obs_new, steps_new)
        if action.shape[0] > 0:
            store.add_transitions(self.situations(obs[:-1]), action, obs[1:], steps[1:])
        if not (finetune and self.memory_cfg.long_term and action.shape[0] > 0):
            return {}
        cond, x0 = self.denoiser_pairs(obs, action)
        with torch.enable_grad():
            return self.memory_store().finetune_pairs(
                episode_id,
                x0,
                cond,
                generator=generator,
                validation=self.memory_cfg.lora_validation,
            )

    def _spatial_store(self, episode_id: str) -> EpisodeSpatialStore:
        stores, cfg = self.spatial_stores, self.memory_cfg
        if episode_id in stores:
            stores.move_to_end(episode_id)
            return stores[episode_id]
        while len(stores) >= cfg.max_adapters:  # same bound and policy as the LoRA adapters
            stores.popitem(last=False)
        stores[episode_id] = EpisodeSpatialStore(
            self.spec.n_agents, self.spec.obs_dim, cfg.key_dim, cfg.spatial_capacity,
            self.obs_mean.device,
        )  # fmt: skip
        return stores[episode_id]

    def forget(self, episode_id: str) -> None:
        """Drop an episode's spatial memory and LoRA adapter."""
        self.spatial_stores.pop(episode_id, None)
        if self.store is not None and episode_id in self.store:
            self.store.evict(episode_id)

    @torch.no_grad()
    def observe_episodes(
        self,
        episode_ids: Sequence[str | None],
        obs: Any,
        action: Any,
        *,
        remember: bool = True,
        generator: torch.Generator | None = None,
    ) -> MemoryState:
        """Like :meth:`observe` for B whole episodes so far (obs [B, T+1, N, D], actions
        [B, T, N, A]): remembers each (``remember``; skip when already stored with
        :meth:`remember`) and returns the state to imagine from, carrying the episode ids."""
        obs = self._tensor(obs).float()
        action = self._encode_action(action, (obs.shape[0], obs.shape[1] - 1))
        if len(episode_ids) != obs.shape[0]:
            raise ValueError(
                f"observe_episodes: {len(episode_ids)} episode ids for {obs.shape[0]} episodes"
            )
        if remember:
            for b, episode_id in enumerate(episode_ids):
                if episode_id is not None:
                    self.remember(episode_id, obs[b], action[b], generator=generator)
        state = self.observe(obs, action)
        step = torch.full((obs.shape[0],), obs.shape[1] - 1, device=obs.device)
        return MemoryState(**_fields(state), episode_ids=tuple(episode_ids), step=step)

    # ----------------------------------------------------------------------- imagination

    @torch.no_grad()
    def transition(
        self,
        state: WorldModelState,
        action: Tensor,
        *,
        sampler: DiffusionSampler,
        noise_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], WorldModelState]:
        """One imagined step; rows of a :class:`MemoryState` sample from the composed experts."""
        ids = list(getattr(state, "episode_ids", ()) or ())
        if not ids or all(e is None for e in ids):
            return super().transition(
                state, action, sampler=sampler, noise_scale=noise_scale, generator=generator
            )
        step = state.step if state.step is not None else torch.zeros(len(ids), dtype=torch.long)
        current = state.current_obs
        retrieved = self._retrievals(current, ids, step)
        self._context = _SampleContext(ids, retrieved, current, step, action)
        try:
            out, new_state = super().transition(
                state, action, sampler=sampler, noise_scale=noise_scale, generator=generator
            )
        finally:
            self._context = None
        return out, MemoryState(**_fields(new_state), episode_ids=tuple(ids), step=step + 1)

    def _retrievals(self, current: Tensor, ids: list[str | None], step: Tensor) -> Tensor | None:
        """Entries [B, N, k, D + P + 1] near each agent's current position (normalised, relative
        to the current observation), or None when the spatial expert is off."""
        if not self.memory_cfg.spatial or self.memory_cfg.spatial_mode != "adapter":
            return None
        return self._gather_retrievals(current, ids, step)

    def _gather_retrievals(self, current: Tensor, ids: list[str | None], step: Tensor) -> Tensor:
        cfg = self.memory_cfg
        query = self.positions(current)  # [B, N, P]
        rows = []
        for b, episode_id in enumerate(ids):
            store = self.spatial_stores.get(episode_id) if episode_id is not None else None
            if store is None:
                rows.append(current.new_zeros(current.shape[1], cfg.spatial_k, 0))
                continue
            rows.append(store.retrieve(query[b], cfg.spatial_k, int(step[b]) - self.recent_gap))
        return self.spatial_entries(rows, current)

    def spatial_entries(self, raw: list[Tensor] | Tensor, current: Tensor) -> Tensor:
        """Raw retrievals (per row [N, k, D + P + 1], or [] width 0 for no memory) and the
        current obs [B, N, D] -> the adapter's input [B, N, k, D + P + 1]: each retrieved
        observation normalised and taken relative to the agent's current one."""
        n, d, k = current.shape[1], current.shape[2], self.memory_cfg.spatial_k
        p = self.memory_cfg.key_dim
        out = current.new_zeros(current.shape[0], n, k, d + p + 1)
        cur = self.normalize_obs(current)  # [B, N, D]
        mean, std = self.obs_mean.mean(0), self.obs_std.mean(0)  # [D]: any agent's obs
        for b, r in enumerate(raw):
            if r.shape[-1] == 0:
                continue
            valid = r[..., -1:]  # [N, k, 1]
            rel = ((r[..., :d] - mean) / std - cur[b][:, None]) * valid  # [N, k, D]
            out[b] = torch.cat([rel, r[..., d:]], dim=-1)
        return out

    def _sample_delta(
        self,
        cond: Tensor,
        sampler: DiffusionSampler,
        noise_scale: float | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """As WorldModel._sample_delta, with the composed experts as the predict_fn inside
        ``transition`` of a MemoryState (else the plain denoiser)."""
        if self._recorded is not None:
            self._recorded.append(cond)
        if self._context is None:
            return super()._sample_delta(cond, sampler, noise_scale, generator)
        ctx = self._context
        offset = fusion = None
        if ctx.spatial_entries is not None:
            offset = self.spatial_adapter(ctx.spatial_entries, cond)  # [B, C]
        if self.memory_cfg.spatial and self.memory_cfg.spatial_mode == "retrieval":
            fusion = self.fusion_inputs(ctx.episode_ids, ctx.current, ctx.step, ctx.action, cond)
        predict_fn = self.composed_predict_fn(ctx.episode_ids, offset, fusion)
        return super()._sample_delta(cond, sampler, noise_scale, generator, predict_fn)

    def fusion_inputs(
        self,
        episode_ids: list[str | None],
        current: Tensor,
        step: Tensor,
        action: Tensor,
        cond: Tensor,
    ) -> _Fusion:
        """What the retrieval spatial expert needs at one imagined step (cond [B, C]),
        including memory's answers (looked up once: they do not depend on x_t)."""
        x = self.denoiser.x_dim
        mean = cond.new_zeros(cond.shape[0], x)
        if self.config.diffusion_target != "delta":
            mean = self.mean_head(cond).float()
        r_std = cond.new_ones(cond.shape[0], x)
        if self.scale_head is not None:
            r_std = self._residual_std(self.scale_head(cond).float())
        value, hit = self.transition_lookup(episode_ids, self.situations(current), action, step)
        return _Fusion(list(episode_ids), current, step, action, mean, r_std, value, hit)

    def composed_predict_fn(
        self,
        episode_ids: list[str | None],
        spatial_offset: Tensor | None,
        fusion: _Fusion | None = None,
    ):
        """predict_fn(x_t [B, X], t [B], cond [B, C]) -> the PoCE composition [B, X]."""
        return lambda x_t, t, cond: self.compose(
            self.expert_predictions(x_t, t, cond, episode_ids, spatial_offset, fusion)
        )

    def expert_predictions(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: Tensor,
        episode_ids: Sequence[str | None],
        spatial_offset: Tensor | None,
        fusion: _Fusion | None = None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """{expert: (eps^c [B, X], eps^u [B, X])} of the enabled experts (short, long, spatial).
        The spatial expert is the adapter's cond + g(R, cond) pass ('adapter' mode) or the
        short-term prediction fused with the cells' memory (``fusion``, 'retrieval' mode)."""
        cfg, b = self.memory_cfg, x_t.shape[0]
        null_needed = cfg.short_term and cfg.alpha_short != 1.0
        adapter = cfg.spatial and cfg.spatial_mode == "adapter"
        conds = [cond]
        if adapter:
            conds.append(cond + (spatial_offset if spatial_offset is not None else 0.0))
        if null_needed:
            conds.append(torch.zeros_like(cond))
        k = len(conds)
        preds = self.denoiser(x_t.repeat(k, 1), t.repeat(k), torch.cat(conds)).split(b)
        f_ctx = preds[0]
        out: dict[str, tuple[Tensor, Tensor]] = {}
        if cfg.short_term:  # alpha 1: eps^u cancels (u + 1 (c - u) = c); pass c in its place
            out["short"] = (f_ctx, preds[-1] if null_needed else f_ctx)
        if cfg.long_term:
            long = self.memory_store().predict(x_t, t, cond, list(episode_ids))
            out["long"] = (long, f_ctx)
        if adapter:
            out["spatial"] = (preds[1], f_ctx)
        elif cfg.spatial:
            fused = f_ctx if fusion is None else self.fused_prediction(x_t, t, f_ctx, fusion)
            out["spatial"] = (fused, f_ctx)
        return out

    # ----------------------------------------------------------------------- retrieval expert

    def fused_prediction(self, x_t: Tensor, t: Tensor, pred: Tensor, fz: _Fusion) -> Tensor:
        """The retrieval spatial expert's eps^c [B, X]: the short-term prediction ``pred``
        with its x0 estimate moved to the product of two Gaussians over the next observation,
        then turned back into a prediction (in the diffusion target space: x0 is the scaled
        residual). One Gaussian is the short-term expert's (its estimate, variance (r
        delta_std)^2 from the scale head, per state and feature); the other, for each agent
        whose memory holds a real transition from its current cell with its current action,
        is the observation that followed it (variance ``spatial_fusion.mse``, measured on real
        episodes). A cell/action pair memory never saw adds nothing (eps^c = eps^u)."""
        if not bool(fz.hit.any()):
            return pred
        x0 = self._x0_from_prediction(pred, x_t, t)  # [B, X]
        b, (n, d) = x0.shape[0], self.obs_mask.shape
        o_hat = fz.current + (x0 * fz.r_std + fz.mean).view(b, n, d) * self.delta_std
        o_hat = o_hat + self.delta_mean  # [B, N, D] the short-term next observation
        weight = fz.hit[..., None] * self.fusion_weight(fz)  # [B, N, D]
        if not bool((weight > 0).any()):  # memory trusted nowhere: exactly eps^u
            return pred
        pull = weight * (fz.value - o_hat)  # [B, N, D]
        fused = x0 + (pull / self.delta_std * self.obs_mask).flatten(1) / fz.r_std
        return self._prediction_from_x0(fused, x_t, t)

    def fusion_weight(self, fz: _Fusion) -> Tensor:
        """[B, N, D] weight of memory against the short-term expert: var_s / (var_s + mse)."""
        b, (n, d) = fz.r_std.shape[0], self.obs_mask.shape
        var_s = (fz.r_std.view(b, n, d) * self.delta_std).pow(2)  # raw units
        return var_s / (var_s + self.spatial_fusion.mse.clamp_min(1e-8))

    def transition_lookup(
        self, episode_ids: Sequence[str | None], cells: Tensor, action: Tensor, step: Tensor
    ) -> tuple[Tensor, Tensor]:
        """cells [B, N, P], encoded actions [B, N, A] -> (the real next observation after
        that action on that cell in each row's episode memory, among transitions ending
        before ``step - recent_gap`` [B, N, D]; hit [B, N] bool)."""
        b, n = cells.shape[:2]
        value = cells.new_zeros(b, n, self.spec.obs_dim)
        hit = torch.zeros(b, n, dtype=torch.bool, device=cells.device)
        for row, episode_id in enumerate(episode_ids):
            store = self.spatial_stores.get(episode_id) if episode_id is not None else None
            if store is not None:
                before = int(step[row]) - self.recent_gap
                value[row], hit[row] = store.lookup_transition(cells[row], action[row], before)
        return value, hit

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """x_t = a x0 + s eps at scheduler time t [B] -> (a, s) [B, 1]."""
        dcfg = self.config.diffusion
        if dcfg.objective == "flow":
            sigma = (t / dcfg.num_train_timesteps).clamp(1e-4, 1.0)[:, None]
            return 1.0 - sigma, sigma
        abar = self.denoiser.scheduler.alphas_cumprod.to(t.device)[t.long()][:, None].float()
        return abar.sqrt(), (1.0 - abar).sqrt().clamp_min(1e-4)

    def _x0_from_prediction(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self._alpha_sigma(t)
        objective = self.config.diffusion.objective
        if objective == "flow":  # v = eps - x0, x_t = (1 - s) x0 + s eps
            return x_t - s * pred
        if objective == "eps":
            return (x_t - s * pred) / a.clamp_min(1e-4)
        return a * x_t - s * pred  # v = a eps - s x0

    def _prediction_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self._alpha_sigma(t)
        objective = self.config.diffusion.objective
        if objective == "flow":
            return (x_t - x0) / s
        eps = (x_t - a * x0) / s
        return eps if objective == "eps" else a * eps - s * x0

    @torch.no_grad()
    def fit_spatial(
        self,
        episodes: Sequence[tuple[Any, Any]],
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        writer=None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Fit the spatial expert on real episodes [(obs [L+1, N, D], actions), ...] (not the
        ones it is evaluated on).

        'retrieval': measures the memory's error exactly as imagination uses it: replaying
        each episode, at every step the transition memory (of that episode, before the short
        context) is asked what follows the agent's action on its cell; the mean square error
        of that answer against the real next observation, per agent and feature, becomes
        ``spatial_fusion.mse`` (inf where memory never answered). Real data only, no model in
        the loop. 'adapter': trains the adapter (``train_spatial_adapter``). Returns {"hits":
        (step, agent) answers used, "losses": adapter losses}."""
        losses: list[float] = []
        if self.memory_cfg.spatial_mode == "adapter":
            with torch.enable_grad():
                losses = self.train_spatial_adapter(
                    episodes, steps=steps, generator=generator, writer=writer, progress=progress
                )
            return {"hits": 0, "losses": losses}
        err = torch.zeros_like(self.spatial_fusion.mse)  # [N, D] sum (m - y)^2 on hits
        hits = torch.zeros(self.spec.n_agents, device=err.device)  # [N]
        for obs, action in episodes:
            obs = self._tensor(obs).float()  # [L+1, N, D]
            action = self._encode_action(action, (obs.shape[0] - 1,))
            store = EpisodeSpatialStore(
                obs.shape[1], obs.shape[2], self.memory_cfg.key_dim,
                self.memory_cfg.spatial_capacity, obs.device,
            )  # fmt: skip
            pos = self.situations(obs)  # [L+1, N, S]
            ends = torch.arange(1, obs.shape[0], device=obs.device)  # steps of o_{t+1}
            store.add_transitions(pos[:-1], action, obs[1:], ends)
            for t in range(action.shape[0]):  # o_{t+1} imagined from o_t: memory <= t - gap
                value, hit = store.lookup_transition(pos[t], action[t], t - self.recent_gap)
                err += (value - obs[t + 1]).pow(2) * hit[:, None]
                hits += hit
        mse = err / hits.clamp_min(1)[:, None]
        ok = (hits[:, None] > 0) & self.obs_mask.bool()
        self.spatial_fusion.mse.copy_(torch.where(ok, mse, torch.inf))
        self.spatial_fusion.hits.fill_(int(hits.sum()))
        return {"hits": int(hits.sum()), "losses": losses}

    def compose(self, experts: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """PoCE of expert predictions (see :mod:`.compose`). With the short-term expert off,
        the short-term conditional stays the prior and only its contrast is dropped."""
        names = list(experts)
        return compose_predictions(
            [experts[n][0] for n in names],
            [experts[n][1] for n in names],
            [self.memory_cfg.alpha(n) for n in names],
            self.memory_cfg.form,
        )

    # ----------------------------------------------------------------------- spatial adapter

    def spatial_training_data(self, obs: Tensor, action: Tensor) -> dict[str, Tensor]:
        """Inputs of the spatial adapter along one real episode: cond [L, C], x0 [L, X] and the
        retrievals [L, N, k, D + P + 1] that imagination would see at each step (memory o_0 ..
        o_{t - recent_gap}, queried at the agents' positions in o_t)."""
        cond, x0 = self.denoiser_pairs(obs, action)
        cfg, n = self.memory_cfg, obs.shape[1]
        store = EpisodeSpatialStore(n, obs.shape[2], cfg.key_dim, cfg.spatial_capacity, obs.device)
        store.add(self.positions(obs), obs, torch.arange(obs.shape[0], device=obs.device))
        steps = action.shape[0]
        query = self.positions(obs[:steps])  # [L, N, P]
        raw = [store.retrieve(query[t], cfg.spatial_k, t - self.recent_gap) for t in range(steps)]
        if cfg.spatial_capacity < len(store):
            raise ValueError("spatial_training_data: the episode exceeds spatial_capacity")
        return {"cond": cond, "x0": x0, "entries": self.spatial_entries(raw, obs[:steps])}

    @torch.no_grad()
    def imagined_training_data(
        self,
        episodes: Sequence[tuple[Tensor, Tensor]],
        prefixes: Sequence[int],
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Corrective data for the spatial adapter: from each real prefix (every episode x
        every prefix length) the model imagines ``adapter_horizon`` steps with the real
        actions (short-term expert alone); per imagined step its cond [M, C], the retrievals
        from the prefix's memory at the imagined positions [M, N, k, S] and the target x0
        [M, X] that turns the imagined observation into the real next one."""
        cfg, h = self.memory_cfg, self.memory_cfg.adapter_horizon
        parts = []
        for p in prefixes:
            usable = [(o, a) for o, a in episodes if a.shape[0] >= p + h]
            if not usable:
                continue
            ids = [f"__adapter_{i}" for i in range(len(usable))]
            obs = torch.stack([o[: p + 1] for o, _ in usable])  # [B, p+1, N, D]
            act = torch.stack([a for _, a in usable])  # [B, L, N, A]
            for i, episode_id in enumerate(ids):
                self.remember(episode_id, obs[i], act[i, :p], finetune=False)
            saved, self.memory_cfg = self.memory_cfg, cfg.only("short").replace(alpha_short=1.0)
            self._recorded = []
            try:
                state = self.observe_episodes(ids, obs, act[:, :p], remember=False)
                traj = self.imagine(state, act[:, p : p + h], h, generator=generator)
                conds = torch.stack(self._recorded, 1)  # [B, H, C]
            finally:
                self._recorded, self.memory_cfg = None, saved
            current = self._tensor(traj.obs[:, :-1]).float()  # [B, H, N, D] imagined o_t
            real_next = torch.stack([o[p + 1 : p + 1 + h] for o, _ in usable])  # [B, H, N, D]
            entries = [
                self._gather_retrievals(current[:, j], ids, torch.full((len(ids),), p + j))
                for j in range(h)
            ]
            for episode_id in ids:
                self.forget(episode_id)
            delta = (real_next - current - self.delta_mean) / self.delta_std * self.obs_mask
            x0 = self._scaled_residual(delta.flatten(-2).flatten(0, 1), conds.flatten(0, 1))
            clip = cfg.adapter_target_clip
            parts.append(
                {
                    "cond": conds.flatten(0, 1),
                    "x0": x0.clamp(-clip, clip),
                    "entries": torch.stack(entries, 1).flatten(0, 1),
                }
            )
        if not parts:
            raise ValueError(
                f"imagined_training_data: no episode is long enough for a prefix in {list(prefixes)}"
                f" plus memory.adapter_horizon = {h} steps"
            )
        return {key: torch.cat([q[key] for q in parts]) for key in parts[0]}

    def train_spatial_adapter(
        self,
        episodes: Sequence[tuple[Any, Any]],
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        writer=None,
        progress: bool = False,
    ) -> list[float]:
        """Train the spatial adapter on real episodes [(obs [L+1, N, D], actions), ...] with the
        world model frozen: the denoiser's own loss with cond + g(R, cond); memory dropped to
        null at ``adapter_dropout``. Returns the losses (TensorBoard ``memory/spatial_loss``)."""
        from tqdm import trange

        cfg = self.memory_cfg
        tensors = []
        for obs, action in episodes:
            obs = self._tensor(obs).float()
            tensors.append((obs, self._encode_action(action, (obs.shape[0] - 1,))))
        if cfg.adapter_data == "imagined":
            shortest = min(a.shape[0] for _, a in tensors)
            k = self.config.backbone.max_context
            prefixes = range(k, max(k + 1, shortest - cfg.adapter_horizon + 1), 8)
            data = self.imagined_training_data(tensors, list(prefixes), generator=generator)
        else:
            parts = [self.spatial_training_data(obs, action) for obs, action in tensors]
            data = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        frozen = [p for p in self.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        adapter_params = list(self.spatial_adapter.parameters())
        for p in adapter_params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(adapter_params, lr=cfg.adapter_lr, weight_decay=1e-4)
        losses: list[float] = []
        total = len(data["cond"])
        dev = data["cond"].device
        self.denoiser.eval()
        try:
            for step in trange(steps or cfg.adapter_steps, disable=not progress, desc="spatial"):
                idx = torch.randint(
                    0, total, (min(cfg.adapter_batch_size, total),), generator=generator, device=dev
                )
                keep = torch.rand(len(idx), generator=generator, device=dev) >= cfg.adapter_dropout
                entries = data["entries"][idx] * keep[:, None, None, None].to(dev)
                cond = data["cond"][idx]
                offset = self.spatial_adapter(entries, cond)  # [b, C]
                loss, _ = self.denoiser.loss(data["x0"][idx], cond + offset, generator=generator)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if writer is not None:
                    writer.add_scalar("memory/spatial_loss", losses[-1], step)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return losses


_MEMORY_PREFIXES = ("spatial_adapter.", "spatial_fusion.")


def _fields(state: WorldModelState) -> dict[str, Any]:
    return {"obs": state.obs, "action": state.action, "rssm": state.rssm}


def with_memory(
    model: WorldModel, memory: WorldModelMemoryConfig | None = None
) -> MemoryWorldModel:
    """``MemoryWorldModel.from_world_model``: the same model, imagining with memory experts."""
    return MemoryWorldModel.from_world_model(model, memory)
