"""The sampling loop: a diffusers scheduler driven by any ``predict_fn`` (holds no weights).

``predict_fn(x_t [B, X], t [B] float32, cond [B, C]) -> prediction [B, X]`` may be a
:class:`~moedream.world_model.diffusion.denoiser.Denoiser` or any composition of several (PoCE
memory experts, guidance): the sampler never assumes a single network. The prediction must be
what the objective trains (eps, v or flow velocity).

Every ``sample`` call works on its own copy of the scheduler (``set_timesteps`` and ``step``
mutate scheduler state), so concurrent and batched calls are safe. Schedulers stay on the CPU
(their tables are read as scalars); x, noise and t live on ``cond``'s device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from moedream.config import ConfigBase, ConfigError, check, check_choice, check_positive
from moedream.world_model.diffusion.denoiser import (
    DiffusionConfig,
    check_int,
    ddpm_schedule_kwargs,
)

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

PredictFn = Callable[[Tensor, Tensor, Tensor], Tensor]
SCHEDULERS = ("ddpm", "ddim", "flow_euler")
# Which training objectives each sampling scheduler can invert.
SCHEDULER_OBJECTIVES = {"ddpm": ("eps", "v"), "ddim": ("eps", "v"), "flow_euler": ("flow",)}


@dataclass
class SamplerConfig(ConfigBase):
    """Which diffusers scheduler, how many steps, how much noise."""

    scheduler: Literal["ddpm", "ddim", "flow_euler"] = "flow_euler"
    num_steps: int = 4  # few-step default (DIAMOND uses 3 Euler steps)
    eta: float = 0.0  # DDIM only: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise
    # Multiplies the initial noise and any per-step stochastic noise (the coherence gate
    # shrinks it by 0.75 per refine try). 0 makes every scheduler deterministic.
    noise_scale: float = 1.0
    # Clamp every predicted x0 to [-clip, clip] (for normalised data); None = no clamp.
    clip: float | None = None

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_choice(f"{prefix}scheduler", self.scheduler, SCHEDULERS)
        check_int(f"{prefix}num_steps", self.num_steps, 1, 1000)
        check_positive(f"{prefix}eta", self.eta, allow_zero=True)
        check(self.eta <= 1.0, f"{prefix}eta", self.eta, "must be a number in [0, 1]")
        check_positive(f"{prefix}noise_scale", self.noise_scale, allow_zero=True)
        if self.clip is not None:
            check_positive(f"{prefix}clip", self.clip)


def check_compatible(
    diffusion_cfg: DiffusionConfig,
    sampler_cfg: SamplerConfig,
    *,
    diffusion_prefix: str = "diffusion.",
    sampler_prefix: str = "sampler.",
) -> None:
    """Raise a :class:`ConfigError` naming both fields unless the scheduler inverts the objective."""
    objective, scheduler = diffusion_cfg.objective, sampler_cfg.scheduler
    allowed = list(SCHEDULER_OBJECTIVES.get(scheduler, ()))
    if objective not in allowed:
        fits = [name for name, objs in SCHEDULER_OBJECTIVES.items() if objective in objs]
        raise ConfigError(
            f"config fields `{diffusion_prefix}objective` = {objective!r} and "
            f"`{sampler_prefix}scheduler` = {scheduler!r} are incompatible: {scheduler!r} needs "
            f"objective in {allowed}; set `{sampler_prefix}scheduler` to one of {fits} or "
            f"`{diffusion_prefix}objective` to one of {allowed}"
        )
    if sampler_cfg.num_steps > diffusion_cfg.num_train_timesteps:
        raise ConfigError(
            f"config field `{sampler_prefix}num_steps` = {sampler_cfg.num_steps} is invalid: must "
            f"be <= `{diffusion_prefix}num_train_timesteps` = {diffusion_cfg.num_train_timesteps}"
        )


def build_scheduler(
    diffusion_cfg: DiffusionConfig, cfg: SamplerConfig
) -> DDPMScheduler | DDIMScheduler | FlowMatchEulerDiscreteScheduler:
    """A diffusers scheduler configured exactly as the denoiser was trained."""
    # Imported on first use, as in denoiser.training_scheduler (seconds per process).
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if cfg.scheduler == "flow_euler":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=diffusion_cfg.num_train_timesteps
        )
    kwargs = ddpm_schedule_kwargs(diffusion_cfg)
    kwargs.update(
        clip_sample=cfg.clip is not None,
        clip_sample_range=cfg.clip or 1.0,
        # "trailing" starts at t = T-1, where x_T is pure noise; "leading" would start a few-step
        # chain at t = 750 from pure noise (Lin et al. 2024, "Common diffusion noise schedules
        # and sample steps are flawed").
        timestep_spacing="trailing",
    )
    if cfg.scheduler == "ddim":
        return DDIMScheduler(**kwargs, set_alpha_to_one=True)
    return DDPMScheduler(**kwargs)


class DiffusionSampler:
    """Draws x0 [B, X] given cond [B, C] by running a diffusers scheduler over ``predict_fn``."""

    def __init__(self, denoiser_cfg: DiffusionConfig, cfg: SamplerConfig) -> None:
        denoiser_cfg.validate()
        cfg.validate()
        check_compatible(denoiser_cfg, cfg)
        self.denoiser_cfg, self.cfg = denoiser_cfg, cfg
        self._template = build_scheduler(denoiser_cfg, cfg)  # copied per call, never stepped

    def sample(
        self,
        predict_fn: PredictFn,
        cond: Tensor,
        x_dim: int,
        *,
        generator: torch.Generator | None = None,
        noise_scale: float | None = None,
        x_init: Tensor | None = None,
    ) -> Tensor:
        """cond [B, C] -> x0 [B, x_dim] on cond's device and dtype.

        ``x_init`` [B, x_dim] replaces the initial noise draw (used as given: ``noise_scale``
        then only scales per-step noise). ``generator`` must live on cond's device. Gradients
        flow if enabled: wrap the call in ``torch.no_grad()`` for imagination.
        """
        scale = self.cfg.noise_scale if noise_scale is None else noise_scale
        check_positive("noise_scale", scale, allow_zero=True)
        scheduler = self._fresh_scheduler()
        x = self._initial_x(cond, x_dim, generator, scale, x_init)  # [B, X]
        for index, t in enumerate(scheduler.timesteps):
            t_batch = t.to(device=cond.device, dtype=torch.float32).expand(cond.shape[0])  # [B]
            pred = predict_fn(x, t_batch, cond)  # [B, X]
            self._check_prediction(pred, x)
            x = self._step(scheduler, index, t, pred, x, generator, scale)
        return x

    def _fresh_scheduler(self):
        """A private copy of the scheduler with its timesteps set (CPU tables; x stays on cond's device)."""
        scheduler = copy.deepcopy(self._template)
        n = self.cfg.num_steps
        if self.cfg.scheduler == "flow_euler":
            # Equal sigma steps 1, 1-1/n, ..., 1/n, then 0. The default linspace(1, sigma_min, n)
            # wastes the last step on 0.001 -> 0 (2 steps would act as 1).
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1].tolist())
        else:
            scheduler.set_timesteps(n)
        return scheduler

    def _initial_x(
        self,
        cond: Tensor,
        x_dim: int,
        generator: torch.Generator | None,
        scale: float,
        x_init: Tensor | None,
    ) -> Tensor:
        shape = (cond.shape[0], x_dim)
        if x_init is not None:
            if tuple(x_init.shape) != shape:
                raise ValueError(
                    f"`x_init` must have shape [B, x_dim] = {shape}, got {tuple(x_init.shape)}"
                )
            return x_init.to(device=cond.device, dtype=cond.dtype)
        noise = torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype)
        return noise * (scale * getattr(self._template, "init_noise_sigma", 1.0))

    def _step(
        self,
        scheduler,
        index: int,
        t: Tensor,
        pred: Tensor,
        x: Tensor,
        generator: torch.Generator | None,
        scale: float,
    ) -> Tensor:
        kind = self.cfg.scheduler
        if kind == "flow_euler":
            pred = self._clip_flow_velocity(scheduler, index, pred, x)
            return scheduler.step(pred, t, x).prev_sample  # x + (sigma_next - sigma) v
        if kind == "ddim":
            noise = None
            if self.cfg.eta > 0:  # only DDIM with eta > 0 draws per-step noise
                noise = scale * torch.randn(
                    x.shape, generator=generator, device=x.device, dtype=x.dtype
                )
            return scheduler.step(
                pred,
                int(t),
                x,
                eta=self.cfg.eta,
                use_clipped_model_output=self.cfg.clip is not None,
                variance_noise=noise,
            ).prev_sample
        return self._ddpm_step(scheduler, int(t), pred, x, generator, scale)

    def _clip_flow_velocity(self, scheduler, index: int, v: Tensor, x: Tensor) -> Tensor:
        """Clamp x0 = x - sigma v to [-clip, clip] and return the velocity that lands on it."""
        if self.cfg.clip is None:
            return v
        sigma = float(scheduler.sigmas[index])  # > 0 for every step taken
        x0 = (x - sigma * v).clamp(-self.cfg.clip, self.cfg.clip)
        return (x - x0) / sigma

    @staticmethod
    def _ddpm_step(
        scheduler: DDPMScheduler,
        t: int,
        pred: Tensor,
        x: Tensor,
        generator: torch.Generator | None,
        scale: float,
    ) -> Tensor:
        if scale == 1.0:
            return scheduler.step(pred, t, x, generator=generator).prev_sample
        # DDPMScheduler.step draws its own noise: x_prev = mean(x, pred) + sigma_t z. Step twice
        # with the same z: stepping zeros isolates sigma_t z (mean(0, 0) = 0), so we can rescale
        # only the stochastic part: x_prev + (scale - 1) sigma_t z.
        seed = int(
            torch.randint(0, 2**62, (1,), generator=generator, device=_gen_device(generator))
        )
        prev = scheduler.step(pred, t, x, generator=_seeded(seed, x.device)).prev_sample
        zeros = torch.zeros_like(x)
        noise = scheduler.step(zeros, t, zeros, generator=_seeded(seed, x.device)).prev_sample
        return prev + (scale - 1.0) * noise

    @staticmethod
    def _check_prediction(pred: Tensor, x: Tensor) -> None:
        if not isinstance(pred, Tensor) or pred.shape != x.shape:
            got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
            raise ValueError(
                f"`predict_fn` must return a tensor of shape {tuple(x.shape)}, got {got}"
            )


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
