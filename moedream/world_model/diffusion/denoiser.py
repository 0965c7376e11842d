"""The denoiser: a conditional MLP that owns its training loss (DIAMOND-style).

It knows the forward (noising) process through a diffusers scheduler, and its inverse (the x0
estimate of a prediction, used by compositions that act on x0), never the sampling loop: that
lives in :mod:`moedream.world_model.diffusion.sampler`, which drives any ``predict_fn``.

Shapes: (B)atch, (X) = x_dim, (C) = cond_dim, (H) = hidden. Timesteps ``t`` are floats in the
scheduler's units: integers 0..T-1 for eps/v (DDPM), sigma * T in (0, T] for flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moedream.config import ConfigBase, check, check_choice

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

OBJECTIVES = ("eps", "v", "flow")
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")


def check_int(field: str, value: Any, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high)
    allowed = f"must be an integer in [{low}, {high}]" if high else f"must be an integer >= {low}"
    check(ok, field, value, allowed)


@dataclass
class DiffusionConfig(ConfigBase):
    """The denoiser network and its training objective.

    objective:
      - ``eps``: DDPM noising x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, predict eps.
      - ``v``: same noising, predict v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0.
      - ``flow``: rectified flow x_t = (1 - t) x0 + t eps, predict the velocity eps - x0.
    """

    objective: Literal["eps", "v", "flow"] = "flow"
    num_train_timesteps: int = 1000
    # eps/v only. eps needs "linear" or "scaled_linear": with squaredcos_cap_v2, abar at t = T-1
    # is ~2e-9 and sampling from pure noise divides the eps error by sqrt(abar) ~ 5e-5 (measured:
    # DDIM samples at |x| ~ 1e3). v is fine with cosine: x0 = sqrt(abar) x - sqrt(1-abar) v.
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    hidden: int = 256
    layers: int = 3
    time_embed_dim: int = 64
    # Probability of training on a zero (null) condition, so that predict_fn(x_t, t, zeros) is
    # the unconditional prediction that guidance and PoCE contrast against. 0 = never.
    cond_dropout: float = 0.0

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_choice(f"{prefix}objective", self.objective, OBJECTIVES)
        check_int(f"{prefix}num_train_timesteps", self.num_train_timesteps, 2)
        check_choice(f"{prefix}beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_int(f"{prefix}hidden", self.hidden, 1)
        check_int(f"{prefix}layers", self.layers, 1)
        check_int(f"{prefix}time_embed_dim", self.time_embed_dim, 2)
        even = self.time_embed_dim % 2 == 0
        check(even, f"{prefix}time_embed_dim", self.time_embed_dim, "must be even (sin + cos)")
        check(
            not (self.objective == "eps" and self.beta_schedule == "squaredcos_cap_v2"),
            f"{prefix}beta_schedule",
            self.beta_schedule,
            f"objective 'eps' cannot be sampled from pure noise with the cosine schedule "
            f"(alpha_bar at the last timestep ~ 2e-9); set `{prefix}beta_schedule: linear` or "
            f"`{prefix}objective: v`",
        )
        ok = isinstance(self.cond_dropout, (int, float)) and 0.0 <= self.cond_dropout < 1.0
        check(ok, f"{prefix}cond_dropout", self.cond_dropout, "must be a number in [0, 1)")


def ddpm_schedule_kwargs(cfg: DiffusionConfig) -> dict[str, Any]:
    """Scheduler settings shared by training (add_noise) and DDPM/DDIM sampling."""
    prediction_type = {"eps": "epsilon", "v": "v_prediction"}[cfg.objective]
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": prediction_type,
    }


def training_scheduler(cfg: DiffusionConfig) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The diffusers scheduler whose forward process defines x_t during training."""
    # Imported here, not at module level: diffusers takes seconds to import, and most Ray
    # workers that load the world model's modules (env runners, learners, drivers reading
    # configs) never build a denoiser.
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if cfg.objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps)
    return DDPMScheduler(**ddpm_schedule_kwargs(cfg), clip_sample=False)


class SinusoidalTimeEmbedding(nn.Module):
    """t [B] (scheduler units) -> [B, dim]; t is rescaled to 0..1000 whatever T is."""

    def __init__(self, dim: int, num_train_timesteps: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs * (1000.0 / num_train_timesteps), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        args = t.float()[:, None] * self.freqs[None, :]  # [B, dim/2]
        return torch.cat([args.sin(), args.cos()], dim=-1)  # [B, dim]


class FiLMResBlock(nn.Module):
    """h + MLP(LayerNorm(h) * (1 + scale(c)) + shift(c)); FiLM starts as the identity."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(hidden, 2 * hidden)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.film(F.silu(c)).chunk(2, dim=-1)  # [B, H] each
        y = self.norm(h) * (1.0 + scale) + shift
        return h + self.fc2(F.silu(self.fc1(y)))  # [B, H]


class Denoiser(nn.Module):
    """Predicts eps, v or the flow velocity from (x_t, t, cond); owns the training loss."""

    def __init__(self, cfg: DiffusionConfig, x_dim: int, cond_dim: int) -> None:
        super().__init__()
        cfg.validate()
        check_int("x_dim", x_dim, 1)
        check_int("cond_dim", cond_dim, 0)
        self.cfg, self.x_dim, self.cond_dim = cfg, x_dim, cond_dim
        hidden = cfg.hidden
        self.time_embed = SinusoidalTimeEmbedding(cfg.time_embed_dim, cfg.num_train_timesteps)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.cond_proj = nn.Linear(cond_dim, hidden) if cond_dim > 0 else None
        self.in_proj = nn.Linear(x_dim + cond_dim, hidden)  # concat conditioning
        self.blocks = nn.ModuleList(FiLMResBlock(hidden) for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, x_dim)
        # Plain object (no weights): its alphas/sigmas define the forward process.
        self.scheduler = training_scheduler(cfg)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x_t [B, X], t [B] float (scheduler units), cond [B, C] -> prediction [B, X]."""
        self._check_inputs(x_t, cond, "x_t")
        c = self.time_mlp(self.time_embed(t).to(x_t.dtype))  # [B, H]
        if self.cond_proj is not None:
            c = c + self.cond_proj(cond)  # FiLM conditioning [B, H]
        h = self.in_proj(torch.cat([x_t, cond], dim=-1))  # [B, H]
        for block in self.blocks:
            h = block(h, c)
        return self.out_proj(self.out_norm(h))  # [B, X]

    def noisy_input(
        self, x0: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample t and noise: x0 [B, X] -> (x_t [B, X], t [B] float, target [B, X]).

        Shared by :meth:`loss` and by anything that trains a copy of this denoiser (memory
        experts). ``generator`` must live on x0's device.
        """
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        index = torch.randint(
            0, self.cfg.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device
        )  # [B]
        if self.cfg.objective == "flow":
            return self._flow_noising(x0, noise, index)
        return self._ddpm_noising(x0, noise, index)

    def _ddpm_noising(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, eq. 4)
        x_t = self.scheduler.add_noise(x0, noise, t)
        if self.cfg.objective == "eps":
            target = noise
        else:  # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0  (Salimans & Ho 2022)
            target = self.scheduler.get_velocity(x0, noise, t)
        return x_t, t.to(x0.dtype), target

    def _flow_noising(
        self, x0: Tensor, noise: Tensor, index: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        # x_t = (1 - sigma) x0 + sigma eps, velocity target eps - x0 (rectified flow). Same
        # formula and sigma table as FlowMatchEulerDiscreteScheduler.scale_noise, which looks
        # timesteps up one sample at a time in Python (~50 ms per 4k samples); tested equal.
        sigmas = self.scheduler.sigmas.to(device=x0.device, dtype=x0.dtype)
        sigma = sigmas[index][:, None]  # [B, 1]
        x_t = sigma * noise + (1.0 - sigma) * x0
        t = self.scheduler.timesteps.to(x0.device)[index].to(x0.dtype)  # sigma * T, [B]
        return x_t, t, noise - x0

    def x0_from_prediction(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The x0 estimate [B, X] implied by a prediction [B, X] (eps, v or flow velocity) at
        (x_t [B, X], t [B]): the inverse of :meth:`noisy_input`'s forward process."""
        a, s = self._alpha_sigma(t)
        if self.cfg.objective == "flow":  # v = eps - x0, x_t = (1 - s) x0 + s eps
            return x_t - s * pred
        if self.cfg.objective == "eps":
            return (x_t - s * pred) / a.clamp_min(1e-4)
        return a * x_t - s * pred  # v = a eps - s x0

    def prediction_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The prediction [B, X] this objective trains on whose x0 estimate at (x_t, t) is
        ``x0`` [B, X] (inverse of :meth:`x0_from_prediction`)."""
        a, s = self._alpha_sigma(t)
        if self.cfg.objective == "flow":
            return (x_t - x0) / s
        eps = (x_t - a * x0) / s
        return eps if self.cfg.objective == "eps" else a * eps - s * x0

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """x_t = a x0 + s eps at scheduler time t [B] -> (a, s) [B, 1]. The floors keep the
        inversions finite at the ends of the schedule."""
        if self.cfg.objective == "flow":
            sigma = (t / self.cfg.num_train_timesteps).clamp(1e-4, 1.0)[:, None]
            return 1.0 - sigma, sigma
        abar = self.scheduler.alphas_cumprod.to(t.device)[t.long()][:, None].float()
        return abar.sqrt(), (1.0 - abar).sqrt().clamp_min(1e-4)

    def loss(
        self, x0: Tensor, cond: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """MSE between the prediction and the objective's target; x0 [B, X], cond [B, C]."""
        self._check_inputs(x0, cond, "x0")
        x_t, t, target = self.noisy_input(x0, generator)
        cond = self._drop_cond(cond, generator)
        pred = self(x_t, t, cond)  # [B, X]
        per_sample = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B]
        loss = per_sample.mean()
        return loss, self._loss_logs(loss, per_sample, t)

    def _drop_cond(self, cond: Tensor, generator: torch.Generator | None) -> Tensor:
        if not self.training or self.cfg.cond_dropout == 0.0 or self.cond_dim == 0:
            return cond
        u = torch.rand(cond.shape[0], generator=generator, device=cond.device)  # [B]
        keep = (u >= self.cfg.cond_dropout).to(cond.dtype)[:, None]  # [B, 1]
        return cond * keep

    def _loss_logs(self, loss: Tensor, per_sample: Tensor, t: Tensor) -> dict[str, float]:
        logs = {"diffusion/loss": loss.item()}
        high = t >= self.cfg.num_train_timesteps / 2  # the half of the chain few-step relies on
        if high.any():
            logs["diffusion/loss_high_noise"] = per_sample[high].mean().item()
        if (~high).any():
            logs["diffusion/loss_low_noise"] = per_sample[~high].mean().item()
        return logs

    def _check_inputs(self, x: Tensor, cond: Tensor, x_name: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ValueError(
                f"`{x_name}` must have shape [B, x_dim={self.x_dim}], got {tuple(x.shape)}"
            )
        if cond.dim() != 2 or cond.shape != (x.shape[0], self.cond_dim):
            raise ValueError(
                f"`cond` must have shape [B={x.shape[0]}, cond_dim={self.cond_dim}], "
                f"got {tuple(cond.shape)}"
            )
