"""Step-by-step imagination that encodes each imagined step once (a key/value cache over the
context) yet gives what stateless one-step requests give (Serve's imagine, re-encoding the
whole context every step), up to float rounding.

Shape legend: (B) rows, (N) agents, (D) observation size, (A) encoded action size, (t) steps
imagined so far, (L) MoE layers, (E) experts.

Serve answers step t of a rollout as ``model.imagine(obs_t, [a_t], 1, context=(o_<t, a_<t),
generator=Generator().manual_seed(seed_t))``, one request per chunk of at most ``chunk_rows``
rows, each with its own generator. That call runs the backbone over all t + 1 steps twice
(``observe`` over the context, ``transition`` over context + step), draws the context's
posterior latents, then the step's prior latent and diffusion noise. Here the backbone runs
once per step, over the new step's tokens only, attending to the cached keys and values:
attention is causal in time and, in eval mode, the MoE drops no token, so an earlier step's
outputs never depend on a later one. Everything that draws from the generator (the posterior
latents of the context, then :meth:`WorldModel.transition_from`) still runs per chunk in the
same order with the same seed, so the draws are the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moedream.world_model.backbone import KeyValues
from moedream.world_model.diffusion import SamplerConfig
from moedream.world_model.model import Prediction, WorldModel, WorldModelState, check_prediction
from moedream.world_model.moe import expert_counts
from moedream.world_model.trajectory import OPTIONAL_STEP_FIELDS


def supports_cached_context(model: WorldModel, horizon: int) -> bool:
    """Whether :class:`CachedContextRollout` gives ``model``'s stateless-step answers for
    ``horizon`` steps: the context must fit ``max_context`` (a longer one slides its window,
    which changes every step's time embedding), and no token may depend on the other tokens
    of the batch (the native MoE without capacity drops in eval mode, or the dense FFN)."""
    moe = model.config.moe
    per_token = moe.backend == "dense" or (
        moe.backend == "native" and (moe.dropless or moe.eval_dropless)
    )
    return per_token and horizon <= model.config.backbone.max_context


@dataclasses.dataclass
class _Context:
    """What the rows have imagined so far."""

    obs: list[Tensor]  # t + 1 of [B, N, D]: the start, then every imagined observation
    actions: list[Tensor]  # t of [B, N, A]
    features: list[Tensor]  # t of [B, N, d]: each step's backbone features
    key_values: list[KeyValues] | None  # per layer, every imagined step's keys and values
    expert_counts: Tensor | None  # [L, B, E]: each row's (token, expert) assignments so far


class CachedContextRollout:
    """B rollouts from ``start`` [B, N, D], advanced one step per :meth:`step`."""

    def __init__(
        self,
        model: WorldModel,
        start: np.ndarray,
        *,
        chunk_rows: int,
        sampler: SamplerConfig | None = None,
        noise_scale: float | None = None,
        prediction: Prediction = "sample",
    ) -> None:
        check_prediction(prediction)
        if model.training:
            raise ValueError("CachedContextRollout needs a model in eval mode (call .eval())")
        self.model, self.chunk_rows = model, int(chunk_rows)
        self.sampler = model._sampler(sampler)  # built once, not once per chunk and step
        self.noise_scale, self.prediction = noise_scale, prediction
        obs = model._tensor(np.asarray(start, dtype=np.float32))  # [B, N, D]
        self._context = _Context([obs], [], [], None, None)

    @torch.no_grad()
    def step(self, action: np.ndarray, seed: int) -> dict[str, np.ndarray | None]:
        """Encoded actions [B, N, A] (or indices [B, N]) at the current observations -> the
        step as a one-step Trajectories' fields: obs [B, 2, N, D] (current, next), reward and
        terminated [B, 1, N], the ensemble's outputs [B, 1, ...], expert_load [L, E] (of the
        first chunk, as the replies of Serve's requests are read)."""
        model, ctx = self.model, self._context
        t, rows = len(ctx.actions), ctx.obs[0].shape[0]
        action_t = model._encode_action(action, (rows,))  # [B, N, A]
        encoded, ctx.key_values = model.backbone.encode_next(
            obs=model.normalize_obs(ctx.obs[-1]), action=action_t, past=ctx.key_values
        )
        tokens = encoded.tokens[:, 0]  # [B, N, S, d]
        self._count_experts(encoded.stats, rows)
        context = {
            "obs": torch.stack(ctx.obs, 1),  # [B, t+1, N, D]
            "action": torch.stack([*ctx.actions, action_t], 1)[:, :t],  # [B, t, N, A]
            "features": torch.stack(ctx.features, 1) if t else None,  # [B, t, N, d]
        }
        outs = [
            self._chunk_step(chunk, context, action_t, tokens, seed)
            for chunk in _chunks(rows, self.chunk_rows)
        ]
        ctx.obs.append(torch.cat([out["next_obs"] for out in outs]))
        ctx.actions.append(action_t)
        ctx.features.append(encoded.features[:, 0])
        return _as_step_fields(outs, ctx.obs[-2])

    def _chunk_step(
        self,
        chunk: slice,
        context: dict[str, Tensor | None],
        action: Tensor,
        tokens: Tensor,
        seed: int,
    ) -> dict[str, Tensor]:
        """One chunk's step, drawing from its own generator in the order Serve's request does:
        the context's posterior latents, then the transition."""
        model = self.model
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
        obs, actions, features = (
            context["obs"][chunk],
            context["action"][chunk],
            context["features"],
        )
        t = actions.shape[1]
        latent = (
            model.posterior_latent(features[chunk], actions, generator)
            if t
            else model.rssm.initial(obs.shape[0], obs.device)
        )
        counts = self._context.expert_counts[:, chunk]  # [L, b, E]
        tokens_so_far = counts.shape[1] * (t + 1) * tokens.shape[1] * tokens.shape[2]
        load = counts.sum(1) / max(1, tokens_so_far * self.model.config.moe.top_k)  # [L, E]
        out, _ = model.transition_from(
            WorldModelState(obs=obs, action=actions, rssm=latent), action[chunk], tokens[chunk],
            load, sampler=self.sampler, noise_scale=self.noise_scale, generator=generator,
            prediction=self.prediction,
        )  # fmt: skip
        return out

    def _count_experts(self, stats: list[Any], rows: int) -> None:
        """Add this step's (token, expert) assignments per row: [L, B, E] (zeros for the dense
        FFN, whose stats report no load)."""
        e = self.model.config.moe.num_experts
        step = torch.stack([
            torch.zeros(rows, e, device=s.expert_load.device) if s.assignments is None
            else expert_counts(s.assignments, e).view(rows, -1, e).sum(1)
            for s in stats
        ])  # fmt: skip
        ctx = self._context
        ctx.expert_counts = step if ctx.expert_counts is None else ctx.expert_counts + step


def _chunks(rows: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]


def _as_step_fields(outs: list[dict[str, Tensor]], current: Tensor) -> dict[str, np.ndarray | None]:
    """The chunks' transition outputs -> one-step Trajectories fields over all rows (numpy)."""
    cat = lambda key: torch.cat([o[key] for o in outs])[:, None].cpu().numpy()  # noqa: E731
    next_obs = torch.cat([o["next_obs"] for o in outs])  # [B, N, D]
    fields = {"obs": torch.stack([current, next_obs], 1).cpu().numpy()}  # [B, 2, N, D]
    for key in ("reward", "terminated", *OPTIONAL_STEP_FIELDS):  # td_residual: not the model's
        fields[key] = cat(key) if key in outs[0] else None
    fields["expert_load"] = outs[0]["expert_load"].cpu().numpy()  # [L, E]
    return fields
