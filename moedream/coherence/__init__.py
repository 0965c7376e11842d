"""The coherence gate: which imagined trajectories are trustworthy enough to learn from.

``kernel`` is plain numpy (phi, drift metrics, C, H7, verdicts; its maths settings are
``GateConfig``) and ``actor_config`` (the gate actor's settings, ``GateActorConfig``) needs no
ray either: both are imported here. ``gate`` (the central Ray actor) imports ray, so its names
load lazily on first use.
"""

from __future__ import annotations

from typing import Any

from moedream.coherence.actor_config import GateActorConfig
from moedream.coherence.kernel import GateConfig, GateResult, Normalizer, Verdict, judge

_GATE_NAMES = (
    "CoherenceGate",
    "get_gate",
    "get_or_create_gate",
    "reimagine_request",
    "write_stats_to_tensorboard",
)


def __getattr__(name: str) -> Any:
    if name in _GATE_NAMES:
        from moedream.coherence import gate

        return getattr(gate, name)
    raise AttributeError(f"module 'moedream.coherence' has no attribute {name!r}")


__all__ = [
    "GateActorConfig",
    "GateConfig",
    "GateResult",
    "Normalizer",
    "Verdict",
    "judge",
    *_GATE_NAMES,
]
