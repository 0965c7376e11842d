"""The memory experts' config: which experts, their PoCE weights, LoRA, spatial memory."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from moedream.config import ConfigBase, check, check_choice, check_positive, check_positive_ints

EXPERTS = ("short", "long", "spatial")
FORMS = ("sum", "shared_prior")
TRANSITION_KEYS = ("cell", "cell_and_neighbours")


def _check_int(field: str, value: Any, low: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    check(ok, field, value, f"must be an integer >= {low}")


def _check_fraction(field: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1
    check(ok, field, value, "must be a number in [0, 1)")


@dataclasses.dataclass
class MemoryConfig(ConfigBase):
    """Memory experts on a WorldModel, composed by PoCE (see :mod:`.compose`): switches, PoCE
    weights, LoRA, spatial memory, spatial adapter.

    Defaults measured on Overcooked cramped_room (benchmarks/memory_overcooked.py): alpha 2
    on the LoRA expert (the authors' value) made long rollouts worse; 1 on every expert is the
    default here. Fit the spatial expert with :meth:`MemoryExperts.fit_spatial`.
    """

    # Which experts take part (switch one off for an ablation; at least one must stay on).
    short_term: bool = True
    """Short-term expert: the world model's denoiser with its normal (short-context) cond."""
    long_term: bool = True
    """Long-term expert: a per-episode LoRA adapter of the denoiser finetuned at test time."""
    spatial: bool = True
    """Spatial expert: what memory holds at the agents' positions (``spatial_mode``)."""
    alpha_short: float = 1.0
    """1 = the short-term conditional as is (its null pass is skipped). Other values contrast
    against the null condition D(x, t, 0): only meaningful when the world model was trained
    with ``diffusion.cond_dropout`` > 0."""
    alpha_long: float = 1.0
    """PoCE weight of the LoRA expert (2, the authors' value, worsened long rollouts)."""
    alpha_spatial: float = 1.0
    """PoCE weight of the spatial expert."""
    form: Literal["sum", "shared_prior"] = "shared_prior"
    """'shared_prior': eps_u + sum_i a_i (eps_i^c - eps_i^u) (one prior, the default);
    'sum': sum_i [eps_i^u + a_i (eps_i^c - eps_i^u)] (the authors' form; counts the prior once
    per expert)."""

    # Long-term expert (test-time LoRA).
    lora_rank: int = 8
    """LoRA rank (the authors used 64 on video models; 8 suffices for small MLP denoisers)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = lora_alpha / lora_rank)."""
    lora_steps: int = 60
    """Adam steps of test-time finetuning per ``remember`` call."""
    lora_lr: float = 3e-3
    """Learning rate of the test-time finetuning."""
    lora_batch_size: int = 64
    """Transitions per finetuning step (sampled with replacement from the episode)."""
    lora_validation: float = 0.25
    """Fraction of an episode's latest transitions held out at each ``remember``: the LoRA
    adapter is fitted on the rest and kept only if it lowers the denoiser's loss on them,
    else reset to zero (the long-term expert abstains: eps^c = eps^u). 0 = always keep."""
    max_adapters: int = 16
    """Episodes remembered at once (LoRA adapters and spatial memories); the least recently
    used is evicted beyond it."""
    eviction: Literal["lru", "fifo"] = "lru"
    """Which adapter goes when full: least recently used ('lru') or oldest finetuned ('fifo')."""

    # Spatial expert.
    spatial_mode: Literal["retrieval", "adapter"] = "retrieval"
    """How the spatial expert conditions the denoiser on what memory holds at a position.
    'retrieval' (default): the product of the short-term expert's Gaussian and the real
    transition memory holds for (cell, action), weighted per state and feature by the scale
    head's variance against the memory's measured error (see :mod:`.experts`). No learned
    weights, so nothing to mismatch between training and test. 'adapter': the learned cond
    offset g(R, cond) of the retrieved observations (``fit_spatial`` trains it)."""
    spatial_capacity: int = 512
    """Entries kept per episode in the spatial memory (oldest dropped beyond it)."""
    spatial_k: int = 8
    """Stored observations retrieved per agent for the adapter (nearest to its position)."""
    key_dim: int = 2
    """Size of a position key (2 for a grid cell, 3 for a MuJoCo body position)."""
    position_offset: int = -2
    """Index of the first of ``key_dim`` position features in each agent's observation
    (negative: from the end of the agent's real features). Overcooked's featurized
    observation ends with the agent's absolute (x, y) cell: -2."""
    round_positions: bool = True
    """Round query positions to the grid (grid worlds: an imagined position drifts off-grid)."""
    transition_key: Literal["cell", "cell_and_neighbours"] = "cell"
    """What the retrieval expert's transition memory matches, beside the action: the agent's
    cell ('cell'), or also the other agents' offsets when adjacent ('cell_and_neighbours': a
    remembered move is reused only with the same neighbours, which may block it). On
    Overcooked with per-episode moves (benchmarks/memory_overcooked.py) 'cell' gives the lower
    40-step error: it answers more often, and the fusion weight, measured with the same key,
    absorbs the moves a neighbour blocked."""
    recent_gap: int | None = None
    """Entries of the last ``recent_gap`` steps are not retrieved (the short-term context
    already holds them); None = the backbone's max_context."""

    # Spatial adapter (spatial_mode 'adapter').
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
        for name in ("short_term", "long_term", "spatial", "round_positions"):
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
        check_positive(f"{prefix}adapter_lr", self.adapter_lr)
        check_choice(f"{prefix}form", self.form, FORMS)
        check_choice(f"{prefix}eviction", self.eviction, ("lru", "fifo"))
        check_choice(f"{prefix}spatial_mode", self.spatial_mode, ("retrieval", "adapter"))
        check_choice(f"{prefix}transition_key", self.transition_key, TRANSITION_KEYS)
        check_choice(f"{prefix}adapter_data", self.adapter_data, ("imagined", "teacher_forced"))
        for name in ("lora_rank", "lora_steps", "lora_batch_size", "max_adapters",
                     "spatial_capacity", "spatial_k", "key_dim"):  # fmt: skip
            _check_int(f"{prefix}{name}", getattr(self, name), 1)
        check_positive_ints(
            self,
            prefix,
            ("adapter_hidden", "adapter_steps", "adapter_batch_size", "adapter_horizon"),
        )
        check(
            isinstance(self.position_offset, int) and not isinstance(self.position_offset, bool),
            f"{prefix}position_offset",
            self.position_offset,
            "must be an integer (a feature index; negative counts from the end)",
        )
        gap = self.recent_gap
        ok = gap is None or (isinstance(gap, int) and not isinstance(gap, bool) and gap >= 0)
        check(ok, f"{prefix}recent_gap", gap, "must be null or an integer >= 0")
        _check_fraction(f"{prefix}lora_validation", self.lora_validation)
        _check_fraction(f"{prefix}adapter_dropout", self.adapter_dropout)

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
