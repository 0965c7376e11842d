"""The gate actor's settings: where it runs, what re-imagines and how, what it counts.

``GateActorConfig`` belongs to the actor (moedream/coherence/gate.py re-exports it) but lives
apart from it without ray, so a YAML config that holds it validates before Ray starts, and the
imagination provider can default to the actor's name without importing ray.
"""

from __future__ import annotations

import dataclasses

from moedream.coherence.kernel import GateConfig
from moedream.config import ConfigBase, check, check_choice, check_positive

ACTOR_NAME = "moedream_coherence_gate"
"""The gate actor's default Ray name (a named, detached actor)."""
NAMESPACE = "moedream"
"""Its default Ray namespace."""
REFINE_MODES = ("truncate", "reimagine")


@dataclasses.dataclass
class GateActorConfig(ConfigBase):
    """The gate actor around the kernel: where it runs, what re-imagines REFINE trajectories
    and how (gate.py's docstring), and the H7 histogram of its counters."""

    kernel: GateConfig = dataclasses.field(default_factory=GateConfig)
    """The kernel's maths (bands, calibration, metric weights) the actor judges with."""
    actor_name: str = ACTOR_NAME
    """Name of the central gate actor."""
    namespace: str = NAMESPACE
    """Ray namespace of the gate actor."""
    num_cpus: float = 0.25
    """Logical CPUs reserved by the gate actor."""
    reimaginer_app: str = ""
    """Ray Serve application holding the world-model deployment used to refine ('' = none)."""
    reimaginer_deployment: str = ""
    """Deployment name inside reimaginer_app whose `imagine` method re-imagines trajectories."""
    refine_mode: str = "truncate"
    """What REFINE does (gate.py's docstring): "truncate" keeps a non-approved trajectory's
    coherent prefix; "reimagine" re-imagines REFINE rows through the re-imaginer."""
    max_refine_tries: int = 2
    """Re-imagination attempts for a REFINE trajectory before it is rejected."""
    noise_shrink: float = 0.75
    """Each refine try samples with noise_scale multiplied by this (0.75, 0.56, ...)."""
    initial_noise_scale: float = 1.0
    """Noise scale the judged trajectories were imagined with (try k uses it * shrink**k)."""
    h7_bins: int = 10
    """Bins of the H7 histogram kept per (env, policy)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        for name in ("actor_name", "namespace"):
            value = getattr(self, name)
            check(isinstance(value, str) and bool(value), f"{prefix}{name}", value,
                  "must be a non-empty string")  # fmt: skip
        check_positive(f"{prefix}num_cpus", self.num_cpus)
        check_choice(f"{prefix}refine_mode", self.refine_mode, REFINE_MODES)
        check(
            bool(self.reimaginer_app) == bool(self.reimaginer_deployment),
            f"{prefix}reimaginer_deployment",
            self.reimaginer_deployment,
            f"set both reimaginer_app ({self.reimaginer_app!r}) and reimaginer_deployment, or "
            "neither",
        )
        check(
            isinstance(self.max_refine_tries, int) and self.max_refine_tries >= 0,
            f"{prefix}max_refine_tries",
            self.max_refine_tries,
            "must be an integer >= 0",
        )
        check(
            isinstance(self.noise_shrink, (int, float)) and 0.0 < self.noise_shrink <= 1.0,
            f"{prefix}noise_shrink",
            self.noise_shrink,
            "must be in (0, 1]: each refine try multiplies the noise scale by it",
        )
        check_positive(f"{prefix}initial_noise_scale", self.initial_noise_scale, allow_zero=True)
        check(
            isinstance(self.h7_bins, int) and self.h7_bins >= 1,
            f"{prefix}h7_bins",
            self.h7_bins,
            "must be an integer >= 1",
        )
