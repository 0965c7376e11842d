"""The one home of the imagination settings: what MBMAPPO imagines, how much, and from whom.

:class:`ImaginationConfig` is the ``imagination:`` section of an agents config
(``AgentsConfig.imagination``) and, whole, MBMAPPOConfig's ``imagination`` attribute
(``MBMAPPOConfig().model_based(imagination=ImaginationConfig(...))``). It imports neither Ray
nor the rest of moedream, so both sides can import it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moedream.config import ConfigBase, check, check_choice, check_positive, is_int
from moedream.platform.serve.names import APP_NAME

PROVIDERS = ("world_model", "env_replay")


@dataclasses.dataclass
class ImaginationConfig(ConfigBase):
    """Imagination settings of MBMAPPO (``enabled: false`` = the model-free MAPPO baseline)."""

    enabled: bool = False
    """Learn from imagined rollouts too (false = the model-free MAPPO baseline)."""
    provider: str = "world_model"
    """Who imagines: 'world_model' (the Serve application `serve_app_name`, gated by the
    coherence gate actor; `moedream train` starts both) or, only when asked for by name,
    'env_replay' (steps real env copies: a test stand-in, NOT a world model, labelled as such
    in logs and summaries)."""
    horizon: int = 10
    """Steps per imagined rollout (H)."""
    imagined_ratio: float = 1.0
    """Imagined env steps requested per real env step, per imagination round (the total per
    real step is imagined_ratio * updates)."""
    updates: int = 1
    """PPO updates per real batch that learn from imagination: the first on real + imagined
    episodes, each further one on freshly imagined episodes under the just-updated planner
    (many policy updates per real step: the model-based lever). 1 = one mixed update."""
    later_epochs: int = 0
    """PPO epochs of each of the ``updates - 1`` updates after the first (those on fresh
    imagination, with the real batch too when real_every_update); 0 = the algorithm's
    num_epochs, as in the first update. The learner's time grows with the epochs."""
    start_iteration: int = 0
    """Iterations before this one (0-based) update on real episodes only, while the world
    model already observes (and retrains on) them."""
    real_every_update: bool = False
    """Every one of the `updates` PPO updates also learns from the real batch (an anchor: PPO's
    clipped ratio pulls the planner back where imagination moved it against real advantages);
    false = the real batch is learnt from in the first update only."""
    uncertainty_penalty: float = 0.0
    """MOPO's pessimism: each kept imagined step's reward, for every agent, minus this times
    the world model's ensemble spread at that step, so the planner earns less where the model
    is unsure and cannot climb its errors (0 = off)."""
    bootstrap_truncated: bool = True
    """PPO bootstraps from the critic's value of the last imagined state of a rollout cut at
    its horizon (or at the prefix the gate kept): the imagined episode is truncated, not
    terminated, unless the world model predicted termination. false = the cut is treated as
    the episode's end (no bootstrap: the value of a five-step branch is its five rewards)."""
    world_model_retrain_every: int = 0
    """Retrain the world model every this many iterations (0 = never)."""
    gate: bool = True
    """Learn only from trajectories the coherence gate keeps."""
    memory: bool = False
    """Branch each imagination round from the latest real episodes WITH their memory
    (provider 'world_model'): each branch posts its real episode prefix to the served model's
    episode memory (the Serve ``remember_episode`` path) and its rollouts are imagined with
    that episode id, so the memory experts (per-episode LoRA, spatial) compose into them;
    long horizons (20-50) are where memory can pay. False: rollouts start from sampled real
    states with the plain served model."""
    memory_branches: int = 4
    """Real-episode prefixes posted per imagination round when ``memory`` is on (each post
    finetunes one LoRA adapter in the replica; keep it <= the replica's memory.max_adapters);
    the round's rows are split evenly between them."""
    serve_app_name: str = APP_NAME
    """Ray Serve application serving the world model (provider 'world_model')."""
    world_model: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Options of the served world-model provider (ServedWorldModelImaginerFactory in
    moedream/platform/model_based.py): checkpoint_dir (required to retrain), base_data_path,
    episode_dir, store_max_steps, retrain_steps, retrain_batch_size, retrain_lr, ..."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        for name in ("enabled", "real_every_update", "gate", "memory", "bootstrap_truncated"):
            value = getattr(self, name)
            check(isinstance(value, bool), f"{prefix}{name}", value, "must be true or false")
        check_choice(f"{prefix}provider", self.provider, PROVIDERS)
        check(
            is_int(self.horizon) and self.horizon > 0,
            f"{prefix}horizon",
            self.horizon,
            "must be an integer > 0 (steps per imagined rollout)",
        )
        check_positive(f"{prefix}imagined_ratio", self.imagined_ratio, allow_zero=True)
        check(
            not self.enabled or self.imagined_ratio > 0,
            f"{prefix}imagined_ratio",
            self.imagined_ratio,
            "must be > 0 when imagination is enabled (or set enabled: false)",
        )
        check(
            is_int(self.updates) and self.updates >= 1,
            f"{prefix}updates",
            self.updates,
            "must be an integer >= 1 (PPO updates per real batch using imagination; 1 = one "
            "update on real + imagined episodes)",
        )
        check(
            is_int(self.later_epochs) and self.later_epochs >= 0,
            f"{prefix}later_epochs",
            self.later_epochs,
            "must be an integer >= 0 (PPO epochs of the updates after the first; 0 = num_epochs)",
        )
        check(
            is_int(self.start_iteration) and self.start_iteration >= 0,
            f"{prefix}start_iteration",
            self.start_iteration,
            "must be an integer >= 0 (0 = imagine from the first iteration)",
        )
        check(
            not self.memory or self.provider == "world_model",
            f"{prefix}memory",
            self.memory,
            "needs provider 'world_model' (episode memory lives in the served world model); "
            "set memory: false for provider 'env_replay'",
        )
        check(
            not (self.memory and (self.world_model or {}).get("prediction") == "mean"),
            f"{prefix}memory",
            self.memory,
            "composes the memory experts into diffusion samples, which prediction 'mean' "
            "skips: set imagination.world_model.prediction: sample, or memory: false",
        )
        check(
            is_int(self.memory_branches) and self.memory_branches >= 1,
            f"{prefix}memory_branches",
            self.memory_branches,
            "must be an integer >= 1 (real-episode prefixes posted per imagination round)",
        )
        check_positive(f"{prefix}uncertainty_penalty", self.uncertainty_penalty, allow_zero=True)
        check(
            is_int(self.world_model_retrain_every) and self.world_model_retrain_every >= 0,
            f"{prefix}world_model_retrain_every",
            self.world_model_retrain_every,
            "must be an integer >= 0 (0 = never retrain)",
        )
        check(
            isinstance(self.serve_app_name, str) and bool(self.serve_app_name),
            f"{prefix}serve_app_name",
            self.serve_app_name,
            "must be a non-empty string naming the Serve application",
        )
        check(
            isinstance(self.world_model, dict),
            f"{prefix}world_model",
            self.world_model,
            "must be a mapping of world-model provider options",
        )

    def epochs_of_later_updates(self, num_epochs: int) -> int:
        """PPO epochs of each update after the first, given the algorithm's ``num_epochs``."""
        return self.later_epochs or num_epochs

    def real_batch_passes(self, num_epochs: int) -> int:
        """Passes PPO makes over each real batch in an imagining iteration: the first update's
        ``num_epochs``, plus every later update's epochs when real_every_update (the count a
        replay-matched model-free control repeats; without imagination it is num_epochs)."""
        if not (self.enabled and self.real_every_update):
            return num_epochs
        return num_epochs + (self.updates - 1) * self.epochs_of_later_updates(num_epochs)
