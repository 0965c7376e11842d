"""ComposedPredictor: the enabled memory experts as one ``predict_fn`` for DiffusionSampler.

The experts and their two predictions at (x_t, t), with f the shared network, L the same
network with the episode's LoRA adapter, a the action, ctx the short-term context, sp the
spatial retrievals and ∅ a null part::

    expert   eps_i^c            eps_i^u            its memory context
    short    f(a, ctx, ∅)       f(a, ∅, ∅)         the last K steps
    long     L(a, ctx, ∅)       f(a, ctx, ∅)       the episode stored in the adapter
    spatial  f(a, ctx, sp)      f(a, ctx, ∅)       observations retrieved by position

Each contrast isolates what one memory adds: the short-term expert against the action-only
prior, the long-term and spatial experts against the short-term conditional (their other
inputs stay; only their memory is nulled). The shared prior eps^u of the "shared_prior" form
is the unconditional prediction of the first enabled expert (short, long, spatial order), so
with one expert and alpha = 1 both forms return that expert's eps^c, and with every alpha = 1
the shared-prior composition is L(ctx) + f(ctx, sp) - f(ctx). Switching the short-term expert
off keeps the context as the prior (positions are not predictable without it) and drops only
its contrast. See :mod:`.compose` for the forms.

Cost per denoising step: one batched pass of f over 2 (short) or 3 (+ spatial) rows per
sample, plus one LoRA pass per sample when the long-term expert is on; nothing grows with
the episode length (the spatial memory is bounded by ``spatial_capacity``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from moedream.world_model.diffusion import DiffusionSampler
from moedream.world_model.memory.compose import compose_predictions
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.memory.long_term import MemoryStore
from moedream.world_model.memory.network import MemoryBatch, MemoryDenoiserNet

ROWS = ("null", "context", "spatial")  # the three conditions of f, stacked in the cond tensor


class ComposedPredictor:
    """Builds PoCE predictions of the experts enabled in ``cfg`` (default ``net.cfg``)."""

    def __init__(
        self,
        net: MemoryDenoiserNet,
        cfg: MemoryConfig | None = None,
        store: MemoryStore | None = None,
    ) -> None:
        self.net, self.cfg, self.store = net, cfg or net.cfg, store
        self.cfg.validate()
        if self.cfg.long_term and store is None:
            raise ValueError(
                "ComposedPredictor: `long_term` is enabled but no MemoryStore was given; pass "
                "store=MemoryStore(net) or set MemoryConfig.long_term=False"
            )

    def conditions(self, batch: MemoryBatch) -> Tensor:
        """The three conditions (null, context, context + spatial) flattened: [B, 3 * C]."""
        rows = [
            self.net.cond(batch, use_context=False, use_spatial=False),
            self.net.cond(batch, use_context=True, use_spatial=False),
            self.net.cond(batch, use_context=True, use_spatial=True),
        ]
        return torch.cat(rows, dim=-1)  # [B, 3C]

    def expert_predictions(
        self, x_t: Tensor, t: Tensor, conds: Tensor, episode_ids: Sequence[str | None] | None = None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """{expert: (eps^c [B, X], eps^u [B, X])} for the enabled experts, in order."""
        b, c = x_t.shape[0], self.net.cond_dim
        rows = conds.reshape(b, len(ROWS), c)  # [B, 3, C]
        needed = self._rows_needed()
        idx = [ROWS.index(r) for r in needed]
        k = len(idx)
        flat_cond = rows[:, idx].transpose(0, 1).reshape(k * b, c)  # [k*B, C] row-major by row
        preds = self.net(x_t.repeat(k, 1), t.repeat(k), flat_cond).reshape(k, b, -1)  # [k, B, X]
        f = dict(zip(needed, preds, strict=True))
        out: dict[str, tuple[Tensor, Tensor]] = {}
        if self.cfg.short_term:
            out["short"] = (f["context"], f["null"])
        if self.cfg.long_term:
            ids = list(episode_ids) if episode_ids is not None else [None] * b
            out["long"] = (self.store.predict(x_t, t, rows[:, 1], ids), f["context"])
        if self.cfg.spatial:
            out["spatial"] = (f["spatial"], f["context"])
        return out

    def predict(self, x_t: Tensor, t: Tensor, conds: Tensor, episode_ids=None) -> Tensor:
        """The PoCE composition [B, X] (what the sampler calls)."""
        experts = self.expert_predictions(x_t, t, conds, episode_ids)
        names = list(experts)
        return compose_predictions(
            [experts[n][0] for n in names],
            [experts[n][1] for n in names],
            [self.cfg.alpha(n) for n in names],
            self.cfg.form,
        )

    def predict_fn(
        self, episode_ids: Sequence[str | None] | None = None
    ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """``predict_fn(x_t, t, conds)`` for :meth:`DiffusionSampler.sample` (conds from
        :meth:`conditions`); ``episode_ids`` select each row's LoRA adapter."""
        return lambda x_t, t, conds: self.predict(x_t, t, conds, episode_ids)

    @torch.no_grad()
    def sample(
        self,
        sampler: DiffusionSampler,
        batch: MemoryBatch,
        episode_ids: Sequence[str | None] | None = None,
        *,
        generator: torch.Generator | None = None,
        noise_scale: float | None = None,
    ) -> Tensor:
        """Draw the next joint observations of ``batch`` from the composed experts: [B, X]."""
        conds = self.conditions(batch)
        return sampler.sample(
            self.predict_fn(episode_ids),
            conds,
            self.net.x_dim,
            generator=generator,
            noise_scale=noise_scale,
        )

    def _rows_needed(self) -> list[str]:
        needed = ["null"] if self.cfg.short_term else []
        if self.cfg.short_term or self.cfg.long_term or self.cfg.spatial:
            needed.append("context")
        if self.cfg.spatial:
            needed.append("spatial")
        return needed
