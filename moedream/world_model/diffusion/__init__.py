"""Diffusion head of the world model: the denoiser (network + loss) apart from the sampler
(a diffusers scheduler loop over any ``predict_fn``).

diffusers itself is imported only where a scheduler is built (``training_scheduler``,
``build_scheduler``): its import takes seconds, which every Ray worker that loads these
modules without building a denoiser or sampler would pay otherwise.
"""

from __future__ import annotations

from moedream.lazy import lazy_getattr

_EXPORTS = {
    "Denoiser": "denoiser",
    "DiffusionConfig": "denoiser",
    "DiffusionSampler": "sampler",
    "SamplerConfig": "sampler",
    "check_compatible": "sampler",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
