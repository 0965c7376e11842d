"""Memory experts of a :class:`WorldModel`: per-episode memories and the PoCE predict_fn
composed from them, which ``WorldModel.imagine`` / ``transition`` take as their ``memory``.

The diffusion head samples from the PoCE composition (``MemoryConfig.form``, :mod:`.compose`)
of

    expert   eps_i^c                     eps_i^u              its memory
    short    D(x, t, cond)               D(x, t, 0)           the backbone's last K steps + RSSM
    long     D_lora(e)(x, t, cond)       D(x, t, cond)        episode e stored in a LoRA adapter
    spatial  D(x, t, cond) moved to the  D(x, t, cond)        past transitions retrieved by
             memory (retrieval), or                           position: what really followed
             D(x, t, cond + g(R, cond))                       an action on this cell (R)
             (adapter)

where D is the world model's own denoiser and ``cond`` its normal (short-context) condition.
The regressed mean and predicted scale around the diffusion residual stay the world model's,
so every expert works in the model's diffusion target space (the scaled residual
x0 = (delta - mean(cond)) / scale(cond)). The long-term and spatial contrasts isolate what
their memory adds to the short-term conditional; a null memory (no retrieval, or a LoRA
adapter that failed its validation) gives eps^c = eps^u exactly.

Retrieval spatial expert (``spatial_mode='retrieval'``, default): each denoising step turns
the short-term prediction into its x0 estimate, maps it to the next observation o_hat, and
multiplies two Gaussians over the next observation per agent and feature: the short-term
one (mean o_hat, variance (scale(cond) * delta_std)^2) and, when memory holds a real
transition from the agent's current cell with its current action, the observation m that
followed it (variance ``spatial_fusion.mse``, measured by :meth:`MemoryExperts.fit_spatial`
on real episodes). x0 moves to the product's mean, and back to the objective's prediction
(eps, v or flow velocity) at the same (x_t, t).

Memory lives per episode id: ``remember(episode_id, obs, action)`` stores a real episode (or
its latest part) in a bounded spatial memory and finetunes that episode's LoRA adapter
(:class:`MemoryStore`, peft) on the denoiser's own targets of the episode. ``recall(ids)``
names the episode of each row of a batch; passed as ``memory=`` to ``imagine``, it reads the
memories and never writes them (an imagined branch must not overwrite what was really seen).
Rows without an episode id sample from the plain denoiser::

    memory = MemoryExperts(model, MemoryConfig())
    memory.fit_spatial(training_episodes)           # [(obs [L+1, N, D], actions), ...]
    memory.remember("ep-7", obs, actions)           # the episode's real steps so far
    state = model.observe(obs[None], actions[None])
    traj = model.imagine(state, plan, horizon, memory=memory.recall(["ep-7"]))
    save_memory(memory, path); load_memory(path, model)   # see :mod:`.checkpoint`

Cost per denoising step: one batched denoiser pass over B (short, alpha_short = 1; the
retrieval spatial expert adds no pass), 2B (+ adapter spatial) or 3B rows (+ the null
condition when alpha_short != 1), plus one LoRA pass over B rows with the long-term expert;
the transition lookup runs at every denoising step, the adapter once per imagined step.
Nothing grows with the episode length (memories are bounded by ``spatial_capacity``).

Shapes: (B)atch, (L) episode steps, (N) agents, (D) obs size, (A) encoded action size,
(P) position key size, (S) situation key size, (k) retrievals, (C) cond size, X = N * D.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moedream.config import ConfigError
from moedream.world_model.diffusion.sampler import PredictFn
from moedream.world_model.memory.compose import compose_predictions
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.memory.long_term import MemoryStore
from moedream.world_model.memory.spatial import EpisodeSpatialStore
from moedream.world_model.memory.spatial_adapter import SpatialAdapter, train_spatial_adapter
from moedream.world_model.model import WorldModel, WorldModelState

_FAR = 99.0  # the offset key of an agent that is not adjacent


class SpatialFusion(nn.Module):
    """What the retrieval spatial expert knows about its memory: per agent and feature, the
    mean square error of "the observation that followed the latest time this action was
    taken on this cell" as a prediction of the next observation, measured on real episodes
    (inf before :meth:`MemoryExperts.fit_spatial` and on padding: memory never used)."""

    def __init__(self, n_agents: int, obs_dim: int) -> None:
        super().__init__()
        self.register_buffer("mse", torch.full((n_agents, obs_dim), torch.inf))  # [N, D]
        self.register_buffer("hits", torch.zeros((), dtype=torch.long))  # fitting hits


@dataclasses.dataclass
class Fusion:
    """The retrieval spatial expert's inputs during one imagined step's denoising."""

    current: Tensor  # [B, N, D] o_t
    mean: Tensor  # [B, X] regressed mean of the normalised delta (0 for 'delta')
    r_std: Tensor  # [B, X] predicted residual scale (1 without a scale head)
    value: Tensor  # [B, N, D] memory's answer: the real o_{t+1} after (situation, action)
    hit: Tensor  # [B, N] bool: memory holds such a transition


@dataclasses.dataclass(frozen=True)
class Recall:
    """The ``memory`` argument of ``WorldModel.imagine`` / ``transition``: which episode's
    memory each row reads (None: none), and the composition (experts, alphas, form, spatial
    mode) of ``cfg``, the memory's config when the recall was made."""

    memory: MemoryExperts
    episode_ids: tuple[str | None, ...]
    cfg: MemoryConfig

    def predict_fn(
        self, model: WorldModel, state: WorldModelState, action: Tensor, cond: Tensor
    ) -> PredictFn | None:
        """The composed predict_fn of one imagined step (None when no row has an episode)."""
        if model is not self.memory.model:
            raise ValueError(
                "this memory belongs to another world model (its LoRA adapters copy that "
                "model's denoiser): build MemoryExperts(model, ...) for the model that imagines"
            )
        if len(self.episode_ids) != state.batch_size:
            raise ValueError(
                f"recall has {len(self.episode_ids)} episode ids for a batch of "
                f"{state.batch_size} rows: pass one id (or None) per row"
            )
        if all(e is None for e in self.episode_ids):
            return None
        step = state.step
        if step is None:  # a state built by hand: no step known, memory reads as of step 0
            step = torch.zeros(state.batch_size, dtype=torch.long, device=cond.device)
        return self.memory.composed_predict_fn(
            self.cfg, self.episode_ids, state.current_obs, step, action, cond
        )


class MemoryExperts:
    """The memory experts of one WorldModel: config, the retrieval expert's measured error
    and the spatial adapter (weights), per-episode spatial memories and LoRA adapters."""

    def __init__(self, model: WorldModel, config: MemoryConfig | None = None) -> None:
        self.model = model
        self.cfg = self._checked(config or MemoryConfig())
        n, d, device = model.spec.n_agents, model.spec.obs_dim, model.obs_mean.device
        self.spatial_adapter = SpatialAdapter(
            n, d, self.cfg.key_dim, model.config.cond_dim, self.cfg.adapter_hidden
        ).to(device)
        self.spatial_fusion = SpatialFusion(n, d).to(device)
        self.store: MemoryStore | None = None  # created at the first LoRA finetune
        self.spatial_stores: OrderedDict[str, EpisodeSpatialStore] = OrderedDict()

    def _checked(self, cfg: MemoryConfig) -> MemoryConfig:
        cfg.validate("memory.")
        cond_dropout = self.model.config.diffusion.cond_dropout
        if cfg.short_term and cfg.alpha_short != 1.0 and cond_dropout == 0:
            raise ConfigError(
                f"config field `memory.alpha_short` = {cfg.alpha_short} contrasts against the "
                "null condition, which this world model never trained on "
                "(`diffusion.cond_dropout` = 0): set memory.alpha_short to 1.0 or train with "
                "diffusion.cond_dropout > 0"
            )
        return cfg

    def set_config(self, cfg: MemoryConfig) -> None:
        """Switch experts, weights or memory settings between calls (ablations); memories and
        adapters are kept. Recalls made before keep the composition they were made with."""
        if cfg.transition_key != self.cfg.transition_key:
            raise ConfigError(
                f"config field `memory.transition_key` cannot change from "
                f"{self.cfg.transition_key!r} to {cfg.transition_key!r} on a built memory (its "
                "transition tables and measured error use the key): build a new MemoryExperts"
            )
        self.cfg = self._checked(cfg)

    def recall(self, episode_ids: Sequence[str | None]) -> Recall:
        """The ``memory=`` argument for a batch whose rows belong to ``episode_ids``."""
        return Recall(self, tuple(episode_ids), self.cfg)

    # ----------------------------------------------------------------------- positions

    def positions(self, obs: Tensor, *, rounded: bool = True) -> Tensor:
        """Agents' position keys from observations [..., N, D] -> [..., N, P] (rounded to the
        grid with ``round_positions``, unless ``rounded`` is False)."""
        keys = [obs[..., i, start : start + self.cfg.key_dim]
                for i, start in enumerate(self.position_starts())]  # fmt: skip
        pos = torch.stack(keys, dim=-2)  # [..., N, P]
        return pos.round() if self.cfg.round_positions and rounded else pos

    def situations(self, obs: Tensor) -> Tensor:
        """Transition-memory keys from observations [..., N, D]: each agent's cell [..., N, P]
        (``transition_key`` 'cell'), or [..., N, P * N] with every other agent's offset from
        it when it is adjacent (|offset| <= 1 per key dim, i.e. it may block or be blocked)
        and a far sentinel otherwise ('cell_and_neighbours'), so a remembered move is only
        reused when the neighbourhood's occupancy is the same."""
        pos = self.positions(obs)  # [..., N, P]
        if self.cfg.transition_key == "cell":
            return pos
        n = pos.shape[-2]
        parts = [pos]
        for shift in range(1, n):
            other = pos.roll(-shift, dims=-2) - pos  # [..., N, P] the agent `shift` further on
            near = (other.abs().amax(-1, keepdim=True) <= 1.0).to(pos.dtype)
            parts.append(other * near + _FAR * (1 - near))
        return torch.cat(parts, -1)

    def position_starts(self) -> list[int]:
        """Index of each agent's first position feature in its observation."""
        cfg, starts = self.cfg, []
        for i, dim in enumerate(self.model.spec.obs_dims):
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
        gap = self.cfg.recent_gap
        return self.model.config.backbone.max_context if gap is None else gap

    # ----------------------------------------------------------------------- the denoiser's targets

    @torch.no_grad()
    def denoiser_pairs(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """The diffusion head's own training pairs along one episode, teacher-forced with the
        normal short context: obs [L+1, N, D], encoded action [L, N, A] -> cond [L, C] (step t
        conditioned on o_{t-K+1..t}), x0 [L, X] (the normalised, scaled residual of
        o_{t+1} - o_t, as in ``WorldModel.loss``)."""
        model = self.model
        k, steps = model.config.backbone.max_context, action.shape[0]
        first = min(k, steps)
        conds = []
        with model._eval_mode():
            # the first window gives steps 0..first-1; then one K-step window ending at each
            # later step (batched), of which the last position is used
            enc = model._encode_windows(
                {"obs": obs[None, : first + 1], "action": action[None, :first]}, None, sample=False
            )
            conds.append(enc["cond"])  # [first, C]
            if steps > first:
                idx = torch.arange(first, steps, device=obs.device)[:, None]  # [W, 1]
                span = idx - k + 1 + torch.arange(k + 1, device=obs.device)  # [W, K + 1]
                batch = {"obs": obs[span], "action": action[span[:, :k]]}  # [W, K+1, N, D]
                enc = model._encode_windows(batch, None, sample=False)
                conds.append(enc["cond"].reshape(len(idx), k, -1)[:, -1])  # [W, C]
            cond = torch.cat(conds)  # [L, C]
            delta = (obs[1:] - obs[:-1] - model.delta_mean) / model.delta_std  # [L, N, D]
            x0 = self.scaled_residual((delta * model.obs_mask).flatten(1), cond)
        return cond, x0

    def scaled_residual(self, x0: Tensor, cond: Tensor) -> Tensor:
        """Normalised deltas [M, X] -> the diffusion target given cond [M, C]."""
        model = self.model
        if model.config.diffusion_target != "delta":
            x0 = x0 - model.mean_head(cond).float()
        if model.scale_head is not None:
            x0 = x0 / model._residual_std(model.scale_head(cond).float())
        return x0

    # ----------------------------------------------------------------------- memory contents

    def memory_store(self) -> MemoryStore:
        """The per-episode LoRA adapters (on a frozen private copy of the denoiser)."""
        if self.store is None:
            self.store = MemoryStore(self.model.denoiser, self.cfg)
        return self.store

    def refresh_base(self) -> None:
        """Copy the model's current denoiser into the LoRA store's frozen base (after more
        training of the world model)."""
        if self.store is not None:
            self.store.sync_base(self.model.denoiser)

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
        model = self.model
        obs = model._tensor(obs).float()
        action = model._encode_action(action, (obs.shape[0] - 1,))
        model._check_window(obs[None], action[None], "remember(obs, action)")
        steps = start_step + torch.arange(obs.shape[0], device=obs.device)
        if start_step > 0:  # o_0 of this part was stored as the last obs of the previous one
            obs_new, steps_new = obs[1:], steps[1:]
        else:
            obs_new, steps_new = obs, steps
        store = self._spatial_store(episode_id)
        store.add(self.positions(obs_new), obs_new, steps_new)
        if action.shape[0] > 0:
            store.add_transitions(self.situations(obs[:-1]), action, obs[1:], steps[1:])
        if not (finetune and self.cfg.long_term and action.shape[0] > 0):
            return {}
        cond, x0 = self.denoiser_pairs(obs, action)
        with torch.enable_grad():
            return self.memory_store().finetune_pairs(
                episode_id, x0, cond, generator=generator, validation=self.cfg.lora_validation
            )

    def _spatial_store(self, episode_id: str) -> EpisodeSpatialStore:
        stores, cfg = self.spatial_stores, self.cfg
        if episode_id in stores:
            stores.move_to_end(episode_id)
            return stores[episode_id]
        while len(stores) >= cfg.max_adapters:  # same bound and policy as the LoRA adapters
            stores.popitem(last=False)
        stores[episode_id] = EpisodeSpatialStore(
            self.model.spec.obs_dim, cfg.key_dim, cfg.spatial_capacity, self.model.obs_mean.device
        )
        return stores[episode_id]

    def forget(self, episode_id: str) -> None:
        """Drop an episode's spatial memory and LoRA adapter."""
        self.spatial_stores.pop(episode_id, None)
        if self.store is not None and episode_id in self.store:
            self.store.evict(episode_id)

    # ----------------------------------------------------------------------- composition

    def composed_predict_fn(
        self,
        cfg: MemoryConfig,
        episode_ids: Sequence[str | None],
        current: Tensor,
        step: Tensor,
        action: Tensor,
        cond: Tensor,
    ) -> PredictFn:
        """predict_fn(x_t [B, X], t [B], cond [B, C]) -> the PoCE composition [B, X] for one
        imagined step from o_t = ``current`` [B, N, D] at episode ``step`` [B] with encoded
        ``action`` [B, N, A] (its memory lookups done once: they do not depend on x_t)."""
        ids = list(episode_ids)
        offset = fusion = None
        if cfg.spatial and cfg.spatial_mode == "adapter":
            offset = self.spatial_adapter(self.retrievals(current, ids, step), cond)  # [B, C]
        if cfg.spatial and cfg.spatial_mode == "retrieval":
            fusion = self.fusion_inputs(ids, current, step, action, cond)
        return lambda x_t, t, c: self.compose(
            self.expert_predictions(x_t, t, c, ids, offset, fusion, cfg=cfg), cfg=cfg
        )

    def expert_predictions(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: Tensor,
        episode_ids: Sequence[str | None],
        spatial_offset: Tensor | None = None,
        fusion: Fusion | None = None,
        *,
        cfg: MemoryConfig | None = None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """{expert: (eps^c [B, X], eps^u [B, X])} of the enabled experts (short, long, spatial).
        The spatial expert is the adapter's cond + g(R, cond) pass ('adapter' mode) or the
        short-term prediction fused with the cells' memory (``fusion``, 'retrieval' mode)."""
        cfg, b, denoiser = cfg or self.cfg, x_t.shape[0], self.model.denoiser
        null_needed = cfg.short_term and cfg.alpha_short != 1.0
        adapter = cfg.spatial and cfg.spatial_mode == "adapter"
        conds = [cond]
        if adapter:
            conds.append(cond + (spatial_offset if spatial_offset is not None else 0.0))
        if null_needed:
            conds.append(torch.zeros_like(cond))
        k = len(conds)
        preds = denoiser(x_t.repeat(k, 1), t.repeat(k), torch.cat(conds)).split(b)
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

    def compose(
        self, experts: dict[str, tuple[Tensor, Tensor]], *, cfg: MemoryConfig | None = None
    ) -> Tensor:
        """PoCE of expert predictions (see :mod:`.compose`). With the short-term expert off,
        the short-term conditional stays the prior and only its contrast is dropped."""
        cfg, names = cfg or self.cfg, list(experts)
        return compose_predictions(
            [experts[n][0] for n in names],
            [experts[n][1] for n in names],
            [cfg.alpha(n) for n in names],
            cfg.form,
        )

    # ----------------------------------------------------------------------- retrieval expert

    def fusion_inputs(
        self,
        episode_ids: Sequence[str | None],
        current: Tensor,
        step: Tensor,
        action: Tensor,
        cond: Tensor,
    ) -> Fusion:
        """What the retrieval spatial expert needs at one imagined step (cond [B, C]),
        including memory's answers (looked up once: they do not depend on x_t)."""
        model, x = self.model, self.model.denoiser.x_dim
        mean = cond.new_zeros(cond.shape[0], x)
        if model.config.diffusion_target != "delta":
            mean = model.mean_head(cond).float()
        r_std = cond.new_ones(cond.shape[0], x)
        if model.scale_head is not None:
            r_std = model._residual_std(model.scale_head(cond).float())
        value, hit = self.transition_lookup(episode_ids, self.situations(current), action, step)
        return Fusion(current, mean, r_std, value, hit)

    def fused_prediction(self, x_t: Tensor, t: Tensor, pred: Tensor, fz: Fusion) -> Tensor:
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
        model, denoiser = self.model, self.model.denoiser
        x0 = denoiser.x0_from_prediction(pred, x_t, t)  # [B, X]
        b, (n, d) = x0.shape[0], model.obs_mask.shape
        o_hat = fz.current + (x0 * fz.r_std + fz.mean).view(b, n, d) * model.delta_std
        o_hat = o_hat + model.delta_mean  # [B, N, D] the short-term next observation
        weight = fz.hit[..., None] * self.fusion_weight(fz)  # [B, N, D]
        if not bool((weight > 0).any()):  # memory trusted nowhere: exactly eps^u
            return pred
        pull = weight * (fz.value - o_hat)  # [B, N, D]
        fused = x0 + (pull / model.delta_std * model.obs_mask).flatten(1) / fz.r_std
        return denoiser.prediction_from_x0(fused, x_t, t)

    def fusion_weight(self, fz: Fusion) -> Tensor:
        """[B, N, D] weight of memory against the short-term expert: var_s / (var_s + mse)."""
        b, (n, d) = fz.r_std.shape[0], self.model.obs_mask.shape
        var_s = (fz.r_std.view(b, n, d) * self.model.delta_std).pow(2)  # raw units
        return var_s / (var_s + self.spatial_fusion.mse.clamp_min(1e-8))

    def transition_lookup(
        self, episode_ids: Sequence[str | None], cells: Tensor, action: Tensor, step: Tensor
    ) -> tuple[Tensor, Tensor]:
        """situations [B, N, S], encoded actions [B, N, A] -> (the real next observation after
        that action in that situation in each row's episode memory, among transitions ending
        before ``step - recent_gap`` [B, N, D]; hit [B, N] bool)."""
        b, n = cells.shape[:2]
        value = cells.new_zeros(b, n, self.model.spec.obs_dim)
        hit = torch.zeros(b, n, dtype=torch.bool, device=cells.device)
        # one lookup per (episode, step) group: a served batch is many rows of one episode
        groups: dict[tuple[str, int], list[int]] = {}
        for row, (episode_id, row_step) in enumerate(zip(episode_ids, step.tolist())):
            if episode_id is not None and episode_id in self.spatial_stores:
                groups.setdefault((episode_id, row_step - self.recent_gap), []).append(row)
        for (episode_id, before), rows in groups.items():
            idx = torch.tensor(rows, device=cells.device)  # [G]
            found, found_hit = self.spatial_stores[episode_id].lookup_transition(
                cells[idx].flatten(0, 1), action[idx].flatten(0, 1), before
            )  # [G * N, D], [G * N]
            value[idx], hit[idx] = found.view(len(rows), n, -1), found_hit.view(len(rows), n)
        return value, hit

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
        the loop. 'adapter': trains the adapter (:func:`.spatial_adapter.train_spatial_adapter`).
        Returns {"hits": (step, agent) answers used, "losses": adapter losses}."""
        if self.cfg.spatial_mode == "adapter":
            with torch.enable_grad():
                losses = train_spatial_adapter(
                    self, episodes, steps=steps, generator=generator, writer=writer,
                    progress=progress,
                )  # fmt: skip
            return {"hits": 0, "losses": losses}
        model = self.model
        err = torch.zeros_like(self.spatial_fusion.mse)  # [N, D] sum (m - y)^2 on hits
        hits = torch.zeros(model.spec.n_agents, device=err.device)  # [N]
        for obs, action in episodes:
            obs = model._tensor(obs).float()  # [L+1, N, D]
            action = model._encode_action(action, (obs.shape[0] - 1,))
            store = EpisodeSpatialStore(
                obs.shape[2], self.cfg.key_dim, self.cfg.spatial_capacity, obs.device
            )
            pos = self.situations(obs)  # [L+1, N, S]
            ends = torch.arange(1, obs.shape[0], device=obs.device)  # steps of o_{t+1}
            store.add_transitions(pos[:-1], action, obs[1:], ends)
            for t in range(action.shape[0]):  # o_{t+1} imagined from o_t: memory <= t - gap
                value, hit = store.lookup_transition(pos[t], action[t], t - self.recent_gap)
                err += (value - obs[t + 1]).pow(2) * hit[:, None]
                hits += hit
        mse = err / hits.clamp_min(1)[:, None]
        ok = (hits[:, None] > 0) & model.obs_mask.bool()
        self.spatial_fusion.mse.copy_(torch.where(ok, mse, torch.inf))
        self.spatial_fusion.hits.fill_(int(hits.sum()))
        return {"hits": int(hits.sum()), "losses": []}

    # ----------------------------------------------------------------------- adapter inputs

    def retrievals(
        self, current: Tensor, episode_ids: Sequence[str | None], step: Tensor
    ) -> Tensor:
        """The spatial adapter's input [B, N, k, D + P + 1]: entries of each row's episode
        memory near each agent's current position (observations normalised, relative to the
        current one), stored before ``step - recent_gap``; all padding for rows without one."""
        cfg = self.cfg
        query = self.positions(current)  # [B, N, P]
        rows = []
        for b, episode_id in enumerate(episode_ids):
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
        model = self.model
        n, d, k, p = current.shape[1], current.shape[2], self.cfg.spatial_k, self.cfg.key_dim
        out = current.new_zeros(current.shape[0], n, k, d + p + 1)
        cur = model.normalize_obs(current)  # [B, N, D]
        mean, std = model.obs_mean.mean(0), model.obs_std.mean(0)  # [D]: any agent's obs
        for b, r in enumerate(raw):
            if r.shape[-1] == 0:
                continue
            valid = r[..., -1:]  # [N, k, 1]
            rel = ((r[..., :d] - mean) / std - cur[b][:, None]) * valid  # [N, k, D]
            out[b] = torch.cat([rel, r[..., d:]], dim=-1)
        return out
