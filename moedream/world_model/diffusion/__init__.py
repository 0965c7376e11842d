"""Diffusion head of the world model: the denoiser (network + loss) apart from the sampler
(a diffusers scheduler loop over any ``predict_fn``)."""

from moedream.world_model.diffusion.denoiser import Denoiser, DiffusionConfig
from moedream.world_model.diffusion.sampler import (
    DiffusionSampler,
    SamplerConfig,
    check_compatible,
)

__all__ = ["Denoiser", "DiffusionConfig", "DiffusionSampler", "SamplerConfig", "check_compatible"]
