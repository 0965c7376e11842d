"""The small world-model configs the tests share, one per purpose, so a size changes in one place.

- ``TINY``: shape, loss, checkpoint and fine-tune tests (a forward pass costs microseconds).
- ``SERVED``: models that Serve replicas load and sample in integration tests (2 sampler steps,
  context 8: enough for the request shapes the tests send).
Learning tests that must reach an accuracy keep their own, larger configs beside their
thresholds.
"""

from __future__ import annotations

from typing import Any

from moedream.world_model.model import WorldModelConfig

TINY: dict[str, Any] = {
    "d_model": 16,
    "cond_dim": 24,
    "backbone": {"num_layers": 2, "num_heads": 2, "max_context": 6},
    "moe": {"d_hidden": 16, "num_experts": 4, "top_k": 2, "dropless": True},
    "rssm": {"deter": 12, "hidden": 16, "stoch": 4},
    "diffusion": {"hidden": 16, "layers": 1, "time_embed_dim": 8},
    "heads": {"hidden": 16, "ensemble_size": 3, "ensemble_hidden": 16},
}
SERVED: dict[str, Any] = {
    "d_model": 32,
    "cond_dim": 32,
    "backbone": {"num_layers": 1, "num_heads": 2, "max_context": 8},
    "moe": {"d_hidden": 32, "num_experts": 4, "top_k": 2},
    "rssm": {"deter": 16, "hidden": 16, "stoch": 4},
    "diffusion": {"hidden": 32, "layers": 1},
    "sampler": {"num_steps": 2},
    "heads": {"hidden": 16, "ensemble_size": 2, "ensemble_hidden": 16},
}


def tiny_config(**changes: Any) -> WorldModelConfig:
    """``TINY`` with top-level sections replaced by ``changes``."""
    return WorldModelConfig.from_dict({**TINY, **changes})


def served_config(**changes: Any) -> WorldModelConfig:
    """``SERVED`` with top-level sections replaced by ``changes``."""
    return WorldModelConfig.from_dict({**SERVED, **changes})
