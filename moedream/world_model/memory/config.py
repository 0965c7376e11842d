"""The memory experts' config: which experts, their PoCE weights, context sizes, LoRA, spatial."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from moedream.config import ConfigBase, check, check_choice, check_positive

EXPERTS = ("short", "long", "spatial")
FORMS = ("sum", "shared_prior")


def _check_int(field: str, value: Any, low: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    check(ok, field, value, f"must be an integer >= {low}")


@dataclasses.dataclass
class MemoryConfig(ConfigBase):
    """Memory experts composed by PoCE (see :mod:`moedream.world_model.memory.compose`)."""

    # Which experts take part (switch one off for an ablation; at least one must stay on).
    short_term: bool = True
    """Short-term expert: the denoiser conditioned on the last ``context_len`` steps."""
    long_term: bool = True
    """Long-term expert: a per-episode LoRA adapter finetuned at test time on the episode."""
    spatial: bool = True
    """Spatial expert: the denoiser conditioned on past observations retrieved by position."""
    alpha_short: float = 2.0
    """PoCE weight of the short-term expert (the authors' code uses 2 for every expert)."""
    alpha_long: float = 2.0
    """PoCE weight of the long-term expert."""
    alpha_spatial: float = 2.0
    """PoCE weight of the spatial expert."""
    form: Literal["sum", "shared_prior"] = "shared_prior"
    """'shared_prior': eps_u + sum_i a_i (eps_i^c - eps_i^u) (one prior, the default);
    'sum': sum_i [eps_i^u + a_i (eps_i^c - eps_i^u)] (the authors' form; counts the prior once
    per expert)."""

    # Short-term context and the shared network's embeddings.
    context_len: int = 4
    """K: steps of (observation, action) the short-term expert sees (including the current)."""
    embed_dim: int = 64
    """Width of the action, context and spatial embeddings that form the denoiser's cond."""
    context_dropout: float = 0.2
    """Training probability of replacing the short-term context by null (for eps^u)."""
    spatial_dropout: float = 0.2
    """Training probability of replacing the spatial retrievals by null (for eps^u)."""

    # Long-term expert (test-time LoRA).
    lora_rank: int = 8
    """LoRA rank (the authors used 64 on video models; 8 suffices for small MLP denoisers)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = lora_alpha / lora_rank)."""
    lora_steps: int = 40
    """Adam steps of test-time finetuning per ``finetune`` call (authors: a few hundred). On
    the memory task, fitting harder (150 steps, lr 3e-3) recalls the cue more often but worsens
    long-horizon error (the adapter overfits the prefix); see benchmarks/memory_experts.py."""
    lora_lr: float = 1e-3
    """Learning rate of the test-time finetuning."""
    lora_batch_size: int = 64
    """Transitions per finetuning step (sampled with replacement from the episode)."""
    max_adapters: int = 16
    """Adapters (episodes) kept at once; the least recently used is evicted beyond it."""
    eviction: Literal["lru", "fifo"] = "lru"
    """Which adapter goes when full: least recently used ('lru') or oldest finetuned ('fifo')."""

    # Spatial expert.
    spatial_capacity: int = 512
    """Observations kept per episode in the spatial memory (oldest dropped beyond it)."""
    spatial_k: int = 4
    """Nearest stored observations retrieved per agent."""
    key_dim: int = 2
    """Size of a position key (2 for a grid cell, 3 for a MuJoCo body position)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        for name in ("short_term", "long_term", "spatial"):
            value = getattr(self, name)
            check(isinstance(value, bool), f"{prefix}{name}", value, "must be true or false")
        check(
            self.short_term or self.long_term or self.spatial,
            f"{prefix}short_term",
            self.short_term,
            "at least one of short_term, long_term, spatial must be true",
        )
        for name in ("alpha_short", "alpha_long", "alpha_spatial", "lora_alpha", "lora_lr"):
            check_positive(f"{prefix}{name}", getattr(self, name))
        check_choice(f"{prefix}form", self.form, FORMS)
        check_choice(f"{prefix}eviction", self.eviction, ("lru", "fifo"))
        for name in (
            "context_len",
            "embed_dim",
            "lora_rank",
            "lora_steps",
            "lora_batch_size",
            "max_adapters",
            "spatial_capacity",
            "spatial_k",
            "key_dim",
        ):
            _check_int(f"{prefix}{name}", getattr(self, name), 1)
        for name in ("context_dropout", "spatial_dropout"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and 0.0 <= value < 1.0
            check(ok, f"{prefix}{name}", value, "must be a number in [0, 1)")

    @property
    def enabled_experts(self) -> tuple[str, ...]:
        """Names of the enabled experts, in the order short, long, spatial."""
        on = {"short": self.short_term, "long": self.long_term, "spatial": self.spatial}
        return tuple(name for name in EXPERTS if on[name])

    def alpha(self, expert: str) -> float:
        return {"short": self.alpha_short, "long": self.alpha_long, "spatial": self.alpha_spatial}[
            expert
        ]

    def only(self, *experts: str) -> MemoryConfig:
        """A copy with only ``experts`` enabled (for ablations)."""
        for name in experts:
            check_choice("expert", name, EXPERTS)
        return self.replace(
            short_term="short" in experts, long_term="long" in experts, spatial="spatial" in experts
        )
